#!/usr/bin/env bash
# Instructions per INSERT transaction on an unwatched and on a watched table,
# counted by valgrind's callgrind in a single-user PostgreSQL backend (BENCHMARKS.md,
# "Where the time goes"). Instruction counts do not drift with the virtual CPUs' speed,
# so two builds of the capture functions can be compared exactly.
#
#   bench/capture-instructions.sh [statements]      (default 2000; needs valgrind)
#   ROWS=50 bench/capture-instructions.sh 200       (50-row statements; default ROWS=1)
#
# Installs the schema with $PGFEED (default ./target/release/pgfeed) and uses the
# PostgreSQL binaries from $PG_BIN (default: the newest /usr/lib/postgresql/*/bin). Run as root, it runs
# PostgreSQL as the postgres user. Everything lives in a temporary directory, removed at
# the end.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-2000}
rows=${ROWS:-1}
[[ "$rows" =~ ^[1-9][0-9]*$ ]] || { echo "ROWS must be a positive integer, not '$rows'" >&2; exit 1; }
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
pgfeed=${PGFEED:-./target/release/pgfeed}
[ -x "$pgfeed" ] || { echo "$pgfeed not found: cargo build --release --bins" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }

dir=$(mktemp -d)
trap 'as_pg "$pg_bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
as_pg() {
    if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown postgres "$dir"
as_pg "$pg_bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
port=$((20000 + RANDOM % 20000))
as_pg "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port -k $dir -c fsync=off" -w start >/dev/null
url="postgres://postgres@/postgres?host=$dir&port=$port"
"$pgfeed" install --database-url "$url" >/dev/null
"$pg_bin/psql" -q -X -v ON_ERROR_STOP=1 "$url" <<'SQL'
CREATE TABLE plain (id bigserial PRIMARY KEY, tenant text NOT NULL,
                    sent_us bigint NOT NULL DEFAULT 0, pad text);
CREATE TABLE watched (LIKE plain INCLUDING ALL);
SELECT pgfeed.watch('watched', 'tenant') \g /dev/null
SQL
as_pg "$pg_bin/pg_ctl" -D "$dir/data" -w stop >/dev/null

# One statement per line: single-user mode runs each as its own transaction.
count() { # <table> <statements>
    local script="$dir/$1.sql"
    for ((i = 0; i < $2; i++)); do
        if [ "$rows" = 1 ]; then
            echo "INSERT INTO $1 (tenant, pad) VALUES ('t$((i % 100))', repeat('x', 100));"
        else
            echo "INSERT INTO $1 (tenant, pad) SELECT 't' || (g % 100), repeat('x', 100) FROM generate_series(1, $rows) AS g;"
        fi
    done >"$script"
    [ "$(id -u)" = 0 ] && chown postgres "$script"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        "$pg_bin/postgres" --single -D "$dir/data" -c fsync=off postgres \
        <"$script" >/dev/null 2>"$dir/valgrind.log"
    grep -oP 'Collected : \K[0-9]+' "$dir/valgrind.log"
}
start=$(count plain 0)
plain=$(( ($(count plain "$n") - start) / n ))
watched=$(( ($(count watched "$n") - start) / n ))
echo "instructions per $rows-row INSERT transaction ($n each, start-up of $start subtracted):"
echo "  unwatched $plain"
echo "  watched   $watched (+$((watched - plain)))"
