# The gateway's image: built with the Rust toolchain, run on a slim Debian as the numeric
# user 10001 (Kubernetes' runAsNonRoot accepts only a numeric user). Configure it with the
# file named by PGFEED_CONFIG (by default deploy/pgfeed.toml, copied below: mount yours
# over it) and secrets in the environment (DATABASE_URL, PGFEED_AUTH_SECRET). README:
# "Deploy".
FROM rust:1-bookworm AS build
WORKDIR /src
# The dependencies, in a layer of their own that only the manifests and Cargo.lock change:
# built once against empty crates. The workspace's other members (the test kit and the
# benchmark) are never built here, but Cargo reads their manifests.
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml ./testkit/
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src testkit/src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked -p pgfeed --bin pgfeed \
    && rm -rf src
# Everything the binary embeds (include_str!): the sources, the SQL, the API description
# and the demo's pages.
COPY src ./src
COPY sql ./sql
COPY api ./api
COPY examples ./examples
# build.rs puts the git commit in `pgfeed --version`: there is no .git here, so it takes
# PGFEED_GIT_COMMIT, the REVISION build argument (also the image's revision label below).
COPY build.rs ./
ARG REVISION
# COPY keeps the files' times, which may be older than the empty crate's build.
RUN touch src/main.rs src/lib.rs \
    && PGFEED_GIT_COMMIT="${REVISION}" cargo build --release --locked -p pgfeed --bin pgfeed

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pgfeed" \
      org.opencontainers.image.description="A realtime gateway for PostgreSQL: row changes as tenant-filtered Server-Sent Events" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# curl: the HEALTHCHECK. Debian's stable packages are not pinned: their security updates
# should come with a rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pgfeed \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgfeed
COPY --from=build /src/target/release/pgfeed /usr/local/bin/pgfeed
COPY deploy/healthcheck.sh /usr/local/bin/pgfeed-healthcheck
COPY deploy/pgfeed.toml /etc/pgfeed/pgfeed.toml
# Only where the config file is: no PGFEED_<KEY> here, since the environment overrides
# the file and would silently win over a mounted one.
ENV PGFEED_CONFIG=/etc/pgfeed/pgfeed.toml
USER 10001:10001
EXPOSE 8080
# Follows the configured listen address (PGFEED_SERVER_LISTEN, else the config file).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["pgfeed-healthcheck"]
ENTRYPOINT ["pgfeed"]
CMD ["serve"]
