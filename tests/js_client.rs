//! The JavaScript client package, `clients/js` (`@pgfeed/client`), against a real gateway.
//!
//! Builds it from its lock file (`npm ci`, `npm run build`), packs it (`npm pack`: the
//! tarball holds the ESM and CommonJS builds and their types, not the sources), then runs
//! its Node tests (`node --test`, one file at a time, since one of them prunes the
//! journal) with an in-process gateway's URL, the secret its tokens are signed with and the
//! database's URL in the environment: live changes, resume after a cut connection, token
//! renewal on expiry and on a 401, fetch then subscribe, `reset`, typed errors, the
//! EventSource transport, the React hook and the TanStack Query invalidation, and the packed
//! tarball installed and loaded as ESM and as CommonJS, its types checked by `tsc`.
//!
//! Needs `node` (18.17 or newer), `npm` and `psql`. Without them it prints a skip line and
//! passes, unless `PGFEED_TEST_REQUIRE_TOOLS=1`, when it fails saying what to install.

use pgfeed_testkit as support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{Gateway, TestDb};
use tokio::process::Command;

/// Bound for one npm or node command: catches hangs (npm fetches from the registry).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// The package's directory.
fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Whether `node`, `npm` and `psql` are all there ([`support::require_tool`]: each
/// missing one is a skip line, or a failure naming what to install under
/// `PGFEED_TEST_REQUIRE_TOOLS=1`).
fn tools_present(test: &str) -> bool {
    ["node", "npm", "psql"]
        .into_iter()
        .fold(true, |found, tool| {
            support::require_tool(tool, test) & found
        })
}

/// Runs `program args` in the package's directory with `env`, and returns its output,
/// failing with everything it printed unless it succeeds.
async fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let what = format!("{program} {}", args.join(" "));
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(package_dir())
        .env("npm_config_update_notifier", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("`{what}` did not finish within {COMMAND_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("running `{what}`: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{what}` failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    output
}

/// `npm pack`s the built package into `dir`; checks what the tarball holds and returns its
/// path.
async fn pack(dir: &Path) -> PathBuf {
    let dest = dir.to_str().unwrap();
    // The build already ran; --ignore-scripts keeps `npm pack` from running anything else.
    let out = run(
        "npm",
        &[
            "pack",
            "--json",
            "--ignore-scripts",
            "--pack-destination",
            dest,
        ],
        &[],
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "npm pack --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let entry = &report[0];
    assert_eq!(entry["name"], "@pgfeed/client", "{report}");
    let files: Vec<&str> = entry["files"]
        .as_array()
        .expect("npm pack lists the files")
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for expected in [
        "package.json",
        "README.md",
        "dist/esm/index.js",
        "dist/esm/index.d.ts",
        "dist/esm/react.js",
        "dist/esm/react.d.ts",
        "dist/cjs/index.js",
        "dist/cjs/index.d.ts",
        "dist/cjs/react.js",
        "dist/cjs/react.d.ts",
        "dist/cjs/package.json",
    ] {
        assert!(
            files.contains(&expected),
            "the tarball holds {expected}: {files:?}"
        );
    }
    assert!(
        files.iter().all(|f| !f.starts_with("src/")
            && !f.starts_with("test/")
            && !f.contains("node_modules")),
        "the tarball holds only the build: {files:?}"
    );
    dir.join(entry["filename"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_package_builds_packs_and_passes_its_node_tests_against_a_gateway() {
    if !tools_present("the JavaScript client test") {
        return;
    }
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    // Quick reconnects, and a token refused the moment its `exp` passes.
    let gw = Gateway::start_with(support::sources_with(
        &db,
        &[
            ("PGFEED_SERVER_RETRY", "200ms"),
            ("PGFEED_AUTH_LEEWAY", "0s"),
        ],
    ))
    .await;

    run("npm", &["ci"], &[]).await;
    run("npm", &["run", "build"], &[]).await;
    let scratch = std::env::temp_dir().join(format!("pgfeed-js-client-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let tarball = pack(&scratch).await;

    let mut files: Vec<PathBuf> = std::fs::read_dir(package_dir().join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().is_some_and(|p| p.ends_with(".test.mjs")))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "the package's tests: {files:?}");
    let url = format!("http://{}", gw.addr);
    let env = [
        ("PGFEED_URL", url.as_str()),
        ("PGFEED_SECRET", support::SECRET),
        ("DATABASE_URL", db.url.as_str()),
        ("PGFEED_PACKAGE_TARBALL", tarball.to_str().unwrap()),
    ];
    for file in &files {
        let file = file.to_str().unwrap();
        let out = run("node", &["--test", "--test-reporter=tap", file], &env).await;
        let report = String::from_utf8_lossy(&out.stdout);
        println!("{report}");
        // `node --test` passes a file whose tests were all skipped: none may be here.
        assert!(
            !report.lines().any(|l| l.contains("# SKIP")),
            "{file}: no test skipped with the gateway given:\n{report}"
        );
        assert!(
            report.lines().any(|l| l.starts_with("ok ")),
            "{file}: tests ran:\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    gw.stop().await;
}
