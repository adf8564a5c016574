#!/bin/sh
# The image's HEALTHCHECK: GET /healthz on the address pgfeed listens on, found as pgfeed
# finds it: PGFEED_SERVER_LISTEN, else `listen` in the [server] table of the file named by
# PGFEED_CONFIG, else pgfeed's default 127.0.0.1:8080. An address on every interface
# (0.0.0.0, [::]) is checked on loopback. A `serve --listen` flag is not seen: use the
# config file or PGFEED_SERVER_LISTEN instead.
set -eu

listen="${PGFEED_SERVER_LISTEN:-}"
if [ -z "$listen" ] && [ -n "${PGFEED_CONFIG:-}" ] && [ -r "$PGFEED_CONFIG" ]; then
    listen=$(awk '
        /^[[:space:]]*\[/ { table = $0; gsub(/[[:space:]]/, "", table); next }
        table == "[server]" && /^[[:space:]]*"?listen"?[[:space:]]*=/ { print; exit }
        table == "" && /^[[:space:]]*server\.listen[[:space:]]*=/ { print; exit }
    ' "$PGFEED_CONFIG" | sed -n 's/^[^=]*=[[:space:]]*["'\'']\([^"'\'']*\)["'\''].*$/\1/p')
fi
listen="${listen:-127.0.0.1:8080}"

port="${listen##*:}"
host="${listen%:*}"
case "$host" in
    0.0.0.0 | "") host=127.0.0.1 ;;
    "[::]") host="[::1]" ;;
esac
exec curl -fsS --max-time 2 -o /dev/null "http://$host:$port/healthz"
