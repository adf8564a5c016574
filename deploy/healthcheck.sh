#!/bin/sh
# The image's HEALTHCHECK: GET /healthz on the address pgfeed listens on, found as pgfeed
# finds it: PGFEED_SERVER_LISTEN, else `listen` in the [server] table of the file named by
# PGFEED_CONFIG, else pgfeed's default 127.0.0.1:8080. An address on every interface
# (0.0.0.0, [::]) is checked on loopback. A `serve --listen` flag is not seen: use the
# config file or PGFEED_SERVER_LISTEN instead. With TLS on the listener
# (PGFEED_SERVER_TLS_CERT_FILE, else `tls_cert_file` in [server]) it asks over HTTPS,
# without checking the certificate's name: loopback is not the name it was made for.
set -eu

# The [server] key $1 of the config file, if it sets one (a quoted string).
from_config() {
    [ -n "${PGFEED_CONFIG:-}" ] && [ -r "$PGFEED_CONFIG" ] || return 0
    awk -v key="$1" '
        /^[[:space:]]*\[/ { table = $0; gsub(/[[:space:]]/, "", table); next }
        table == "[server]" && $0 ~ "^[[:space:]]*\"?" key "\"?[[:space:]]*=" { print; exit }
        table == "" && $0 ~ "^[[:space:]]*server\\." key "[[:space:]]*=" { print; exit }
    ' "$PGFEED_CONFIG" | sed -n 's/^[^=]*=[[:space:]]*["'\'']\([^"'\'']*\)["'\''].*$/\1/p'
}

listen="${PGFEED_SERVER_LISTEN:-}"
[ -n "$listen" ] || listen=$(from_config listen)
listen="${listen:-127.0.0.1:8080}"
tls="${PGFEED_SERVER_TLS_CERT_FILE:-}"
[ -n "$tls" ] || tls=$(from_config tls_cert_file)

port="${listen##*:}"
host="${listen%:*}"
case "$host" in
    0.0.0.0 | "") host=127.0.0.1 ;;
    "[::]") host="[::1]" ;;
esac
if [ -n "$tls" ]; then
    exec curl -fsS --max-time 2 --insecure -o /dev/null "https://$host:$port/healthz"
fi
exec curl -fsS --max-time 2 -o /dev/null "http://$host:$port/healthz"
