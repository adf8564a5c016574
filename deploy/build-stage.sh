#!/usr/bin/env bash
# Runs the Dockerfile's build stage without Docker: its WORKDIR, COPY (from this
# repository, the build context) and RUN lines, as written, under the directory DIR
# (which stands for the image's root), so the binary the image would contain is built by
# the same commands: DIR/src/target/release/pgfeed. A release build from scratch takes
# minutes; give DIR a target/release of an earlier build (DIR/src/target) to reuse it.
#
#   deploy/build-stage.sh /tmp/pgfeed-image
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:?usage: deploy/build-stage.sh DIR}
mkdir -p "$root"
root=$(cd "$root" && pwd)
# The first stage, continuation lines joined.
stage=$(awk '/^FROM /{n++} n==1' "$repo/Dockerfile" | sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta')
workdir=/
while IFS= read -r line; do
    case "$line" in
        "" | \#* | FROM\ *) ;;
        WORKDIR\ *)
            workdir=${line#WORKDIR }
            mkdir -p "$root$workdir"
            ;;
        COPY\ *)
            read -r -a args <<< "${line#COPY }"
            dest=${args[-1]}
            [[ "$dest" = /* ]] || dest="$workdir/$dest"
            mkdir -p "$root$(dirname "$dest")"
            # Several sources, or a destination ending in `/`: a directory, made if missing.
            [[ ${#args[@]} -gt 2 || "$dest" == */ ]] && mkdir -p "$root$dest"
            for src in "${args[@]:0:${#args[@]}-1}"; do
                if [[ ${#args[@]} -gt 2 || "$dest" == */ ]]; then
                    cp -a "$repo/$src" "$root$dest/"
                else
                    cp -a "$repo/$src" "$root$dest"
                fi
            done
            ;;
        ARG\ *)
            # A build argument: the caller's variable of that name, else the default.
            arg=${line#ARG }
            name=${arg%%=*}
            if [ -z "${!name+set}" ]; then
                default=""
                [[ "$arg" == *=* ]] && default=${arg#*=}
                export "$name=$default"
            else
                export "${name?}"
            fi
            ;;
        RUN\ *)
            echo "== RUN ${line#RUN }"
            (cd "$root$workdir" && bash -euc "${line#RUN }")
            ;;
        *)
            echo "deploy/build-stage.sh: cannot run this Dockerfile line: $line" >&2
            exit 1
            ;;
    esac
done <<< "$stage"
echo "built: $root$workdir/target/release/pgfeed"
