//! pgfeed's test kit, shared by the product's tests and the benchmark: a throwaway
//! PostgreSQL cluster per test binary, a fresh database per test, the gateway in-process on
//! port 0 or as a child process, and a small HTTP/SSE client over a raw socket (so tests
//! control exactly when they read).
//!
//! The cluster is [`pgfeed::cluster`]'s throwaway cluster (the local `initdb`/`pg_ctl`, as
//! the `postgres` user when run as root) unless `PGFEED_TEST_DATABASE_URL` points at an
//! existing server. Its watchdog stops and removes it when the test binary exits. If
//! neither works the tests fail with a message saying what to install: they never skip.
//! Only the tests that need a tool beyond Rust and PostgreSQL (Chromium, valgrind) skip
//! when it is missing, and not when CI asks for them all ([`require_tool`]).
//!
//! Where things are, one concern a file (re-exported here, so tests write `support::X`):
//! [`db`] the server and a database per test, [`roles`] login roles, [`gateway`] the
//! in-process gateway and what tests do with one, [`child`] the `pgfeed` binary (CLI and
//! `pgfeed serve`), [`proxy`] proxies in front of PostgreSQL, [`wait`] bounded waits,
//! [`tools`] external tools, [`docs`] the README, [`demo_process`] `pgfeed demo` and
//! [`workload`] randomized workloads against a model (these two used by their module
//! path); the one HTTP/SSE client of the tests and the benchmark: [`wire`] its parser
//! (response heads, chunked bodies, SSE frames), `http_client.rs` requests, `sse.rs`
//! streams.

pub mod certs;
pub mod child;
pub mod db;
pub mod demo_process;
pub mod docs;
pub mod gateway;
pub mod proxy;
pub mod roles;
pub mod tempdir;
pub mod tools;
pub mod wait;
pub mod workload;

pub use certs::{CertPair, cert_pair};
pub use child::*;
pub use db::*;
pub use docs::*;
pub use gateway::*;
pub use proxy::*;
pub use roles::*;
pub use tempdir::TempDir;
pub use tools::*;
pub use wait::*;

mod http_client;
mod sse;
pub mod wire;

pub use http_client::{Response, assert_error, exchange, get, get_soon, request};
pub use sse::{Event, SseClient};
pub use wire::parse_head;

use std::time::Duration;

/// The HS256 secret every test gateway uses.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Generous bound for anything that should happen "soon": catches hangs, not slowness.
pub const SOON: Duration = Duration::from_secs(20);
