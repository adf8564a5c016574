//! Runs the README's quickstart block as written (with the built binary, a test database and
//! a free port), including its `psql` insert and `curl -N` stream, so that the README's
//! commands stay true.

use pgfeed_testkit as support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::TestDb;

/// The lines of the README's quickstart block.
fn quickstart() -> Vec<String> {
    let readme = support::readme();
    let start = readme
        .find("<!-- quickstart:begin -->")
        .expect("README has a quickstart block");
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("quickstart block ends");
    support::first_sh_block(&readme[start..end])
}

fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is needed by the README quickstart test: install it (Debian: apt-get install {tool})"
    );
}

#[tokio::test]
async fn readme_quickstart_works_as_written() {
    require("psql");
    require("curl");
    let db = TestDb::empty().await;
    let port = support::free_addr().port();
    let dir = std::env::temp_dir().join(format!("pgfeed-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("stream.out");
    let bin = env!("CARGO_BIN_EXE_pgfeed");

    let mut script = vec!["set -eu".to_string()];
    let mut saw = (false, false, false);
    for line in quickstart() {
        // The test supplies its own database, and cargo has already built the binary.
        if line.starts_with("export DATABASE_URL=") || line.starts_with("cargo build") {
            continue;
        }
        let mut line = line
            .replace("./target/release/pgfeed", bin)
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        if line.contains(" serve &") {
            saw.0 = true;
            script.push(line);
            // A person typing the next line gives the server time to start; a script waits.
            script.push(format!(
                "for i in $(seq 200); do curl -sf http://127.0.0.1:{port}/readyz >/dev/null && break; sleep 0.1; done"
            ));
            continue;
        }
        if line.starts_with("curl -N") {
            saw.1 = true;
            line = line.replacen(" &", &format!(" > {} &", out.display()), 1);
            script.push(line);
            script.push(format!(
                "for i in $(seq 200); do grep -q 'event: live' {} && break; sleep 0.1; done",
                out.display()
            ));
            continue;
        }
        if line.starts_with("psql \"$DATABASE_URL\" -c \"INSERT") {
            saw.2 = true;
        }
        script.push(line);
    }
    assert_eq!(
        saw,
        (true, true, true),
        "the quickstart still has serve, curl and the psql insert"
    );
    script.push(format!(
        "for i in $(seq 200); do grep -q '\"op\":\"insert\"' {} && break; sleep 0.1; done",
        out.display()
    ));
    script.push("kill %1 %2 2>/dev/null || true".into());
    script.push("wait || true".into());

    let mut child = Command::new("bash")
        .args(["-c", &script.join("\n")])
        .env("DATABASE_URL", &db.url)
        .env("PGFEED_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("PGFEED_AUTH_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the quickstart script did not finish");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    let stream = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.success(),
        "quickstart failed: {}\n{}\nstream: {stream}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let event = stream
        .lines()
        .find_map(|l| {
            l.strip_prefix("data: ")
                .filter(|d| d.contains("\"op\":\"insert\""))
        })
        .unwrap_or_else(|| panic!("no insert event in the curl output: {stream}"));
    let event: serde_json::Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["table"], "public.orders");
    assert_eq!(event["tenant"], "acme");
    assert_eq!(event["new"]["status"], "paid");
    assert!(stream.starts_with("retry: "), "{stream}");
}
