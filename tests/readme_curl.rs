//! Runs every `curl` line of the README's reference sections (outside the quickstart,
//! which tests/readme.rs runs) against a gateway set up like the quickstart, so that the
//! documented examples keep working.

use pgfeed_testkit as support;

use support::{Gateway, TestDb};

/// `curl` lines in the README's shell blocks, except the quickstart's.
fn curl_lines() -> Vec<String> {
    let readme = support::readme();
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("quickstart block");
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in readme[end..].lines() {
        if line.starts_with("```sh") {
            in_sh = true;
        } else if line.starts_with("```") {
            in_sh = false;
        } else if in_sh && line.starts_with("curl ") {
            lines.push(line.to_string());
        }
    }
    lines
}

#[tokio::test]
async fn readme_curl_lines_work() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, status text);
             SELECT pgfeed.watch('orders', 'tenant');",
        )
        .await
        .unwrap();
    let jwt = Gateway::start(&db).await;
    let mut sources = support::sources(&db);
    sources.env.retain(|(k, _)| k != "PGFEED_AUTH_SECRET");
    sources
        .env
        .push(("PGFEED_AUTH_MODE".into(), "trusted_header".into()));
    let trusted = Gateway::start_with(sources).await;
    let token = jwt.token("acme");

    let lines = curl_lines();
    assert!(lines.len() >= 7, "the README's curl examples: {lines:?}");
    for line in lines {
        let (command, comment) = line.split_once("   #").unwrap_or((&line, ""));
        let port = if command.contains("X-Tenant-Id") {
            trusted.addr.port()
        } else {
            jwt.addr.port()
        };
        let command = command
            .replacen("curl ", "curl --max-time 2 ", 1)
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        // tokio's Command: the gateway runs on this test's runtime and must keep serving.
        let out = tokio::process::Command::new("bash")
            .args(["-c", &command])
            .env("TOKEN", &token)
            .output()
            .await
            .expect("bash and curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if command.contains(" -N ") {
            // A stream: curl stops at --max-time (exit 28) after `live`.
            assert!(
                text.contains("event: live") || text.contains(r#""event":"live""#),
                "{line}\n→ {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!text.contains("\"error\""), "{line}\n→ {text}");
        } else {
            let body: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{line}\n→ not JSON ({e}): {text}"));
            if comment.contains("401") {
                assert_eq!(body["error"]["code"], "unauthorized", "{line}");
            } else if comment.contains("414") {
                assert_eq!(body["error"]["code"], "uri_too_long", "{line}");
            } else if command.contains("/openapi.json") {
                assert_eq!(body["openapi"], "3.1.0", "{line}");
            } else {
                assert!(body["position"].is_string(), "{line}\n→ {text}");
            }
        }
    }
    jwt.stop().await;
    trusted.stop().await;
}
