//! Tools beyond Rust and PostgreSQL that a few tests need (Chromium and chromedriver for
//! `tests/browser.rs`, valgrind for the benchmark's instruction counts): such a test runs
//! when its tools are on `PATH`, says it skipped and why when they are not, and fails,
//! saying what to install, when [`REQUIRE_TOOLS`] is set (as `.ci/run` does), so that CI
//! runs every test.

use std::io::Write;
use std::path::PathBuf;

/// The environment variable that makes missing tools a failure rather than a skip: set to
/// `1` (any value but empty or `0`), every test that needs a tool must run.
pub const REQUIRE_TOOLS: &str = "PGFEED_TEST_REQUIRE_TOOLS";

/// Where program `name` is: the first directory of `PATH` that holds a file of that name.
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether [`REQUIRE_TOOLS`] asks for every tool-dependent test to run.
pub fn tools_required() -> bool {
    std::env::var_os(REQUIRE_TOOLS).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether program `name` is on `PATH`, for the test `what_needs_it` (e.g. "the browser
/// test (tests/browser.rs)"), which returns at once when this is false. A missing tool
/// fails the test, saying what to install, under [`REQUIRE_TOOLS`]; otherwise a line on
/// the terminal says the test skipped and why (written past the test harness's capture,
/// so that a plain `cargo test` shows it).
#[track_caller]
pub fn require_tool(name: &str, what_needs_it: &str) -> bool {
    if tool_path(name).is_some() {
        return true;
    }
    let install = install_hint(name);
    assert!(
        !tools_required(),
        "{what_needs_it} needs `{name}`, which is not on PATH, and {REQUIRE_TOOLS} is set: \
         {install}"
    );
    // `eprintln!` would be captured (and hidden) for a test that passes.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {what_needs_it}: `{name}` is not on PATH; {install}. Set {REQUIRE_TOOLS}=1 \
         to make this a failure."
    );
    false
}

/// How to install `name` (the Debian packages `.ci/run` installs).
fn install_hint(name: &str) -> String {
    let packages = match name {
        "chromium" | "chromium-browser" => "chromium fonts-liberation",
        "chromedriver" => "chromium-driver",
        "valgrind" => "valgrind",
        "node" => "nodejs",
        "npm" => "npm",
        "psql" => "postgresql-client",
        other => return format!("install `{other}`"),
    };
    format!("install it with `apt-get install {packages}` (Debian)")
}
