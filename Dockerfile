# Multi-stage build: compile with the Rust toolchain, run on a slim Debian with a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY api ./api
COPY examples ./examples
RUN cargo build --release --locked --bin pgfeed

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home pgfeed
COPY --from=build /src/target/release/pgfeed /usr/local/bin/pgfeed
USER pgfeed
# Configure through the environment: DATABASE_URL, PGFEED_AUTH_SECRET, ...
ENV PGFEED_SERVER_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["pgfeed"]
CMD ["serve"]
