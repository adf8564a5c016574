//! The benchmark tool builds and runs: its smoke preset against a real PostgreSQL (a
//! throwaway cluster, or a fresh database on `PGFEED_TEST_DATABASE_URL`) delivers every
//! change exactly once to the right tenant; the instruction-count script for capture runs.
//! Correctness only: performance figures are never asserted in tests.

use std::process::Command;

#[test]
fn bench_smoke_preset_delivers_everything_once_to_the_right_tenant() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfeed-bench"));
    cmd.args([
        "--preset",
        "smoke",
        "--pgfeed-bin",
        pgfeed_testkit::pgfeed_bin().to_str().expect("a UTF-8 path"),
    ]);
    if let Ok(url) = std::env::var("PGFEED_TEST_DATABASE_URL")
        && !url.is_empty()
    {
        cmd.args(["--database-url", &url, "--fresh-database"]);
    }
    let out = cmd.output().expect("running pgfeed-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgfeed-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"bench\":"))
        .unwrap_or_else(|| panic!("no JSON line in the output:\n{stdout}\n{stderr}"));
    let report: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the JSON line does not parse ({e}): {line}"));
    assert_eq!(report["ok"], true, "{line}");
    let totals = &report["totals"];
    for key in [
        "missing",
        "duplicated",
        "leaks",
        "phantom",
        "out_of_order",
        "malformed",
        "streams_failed",
    ] {
        assert_eq!(totals[key].as_f64(), Some(0.0), "{key} in {line}");
    }
    let expected = totals["expected"].as_f64().expect("expected deliveries");
    assert!(expected > 0.0, "the smoke run delivered something: {line}");
    assert_eq!(totals["received"].as_f64(), Some(expected), "{line}");
    assert_eq!(
        report["summary"]["subscribers_live"].as_f64(),
        report["params"]["subscribers"].as_f64(),
        "every stream went live: {line}"
    );
}

#[test]
fn capture_instruction_count_script_runs() {
    if !pgfeed_testkit::require_tool(
        "valgrind",
        "the instruction-count test (bench/tests/smoke.rs)",
    ) {
        return;
    }
    // bench/capture-instructions.sh (BENCHMARKS.md, "Where the time goes") on a few
    // statements: it must keep working and print both counts. Counts are not asserted
    // beyond their presence and that capture does some work.
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/capture-instructions.sh"
        ))
        .arg("20")
        .env("PGFEED", pgfeed_testkit::pgfeed_bin())
        .output()
        .expect("running bench/capture-instructions.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let count = |label: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` count in:\n{stdout}\n{stderr}"))
    };
    let (unwatched, watched) = (count("unwatched"), count("watched"));
    assert!(unwatched > 0, "{stdout}");
    assert!(watched > unwatched, "capture did no work?\n{stdout}");
}
