//! The HTTP API as a client sees it: authentication failures, bad requests, unknown routes
//! and methods, health and position endpoints, stream options (`payload`, `ops`, `tables`),
//! heartbeats, NDJSON, and a token that expires mid-stream. Real HTTP against an
//! in-process gateway.

use pgfeed_testkit as support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgfeed::change::Position;
use serde_json::{Value, json};
use support::{Gateway, Response, SOON, SseClient, TestDb, assert_streams, get_soon, request};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with `claims`, signed by `alg` with `secret`.
fn sign(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Asserts `r` is a JSON error with `status`, and returns its message.
#[track_caller]
fn assert_error(r: &Response, status: u16, what: &str) -> String {
    support::assert_error(r, status, what).1
}

#[tokio::test]
async fn auth_failures_are_401_json_and_never_stream() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let exp = now() + 3600;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let good_claims = json!({"tenant_id": "acme", "exp": exp});

    let other_secret = sign(Algorithm::HS256, &good_claims, "another-secret-0123456789");
    let expired = sign(
        Algorithm::HS256,
        &json!({"tenant_id": "acme", "exp": now() - 600}),
        support::SECRET,
    );
    let not_yet = sign(
        Algorithm::HS256,
        &json!({"tenant_id": "acme", "exp": exp, "nbf": now() + 600}),
        support::SECRET,
    );
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(good_claims.to_string())
    );
    // The right secret, but not the configured algorithm.
    let hs512 = sign(Algorithm::HS512, &good_claims, support::SECRET);
    let hs384 = sign(Algorithm::HS384, &good_claims, support::SECRET);
    // A valid HS256 token whose header is swapped for `none`, keeping the signature.
    let valid = gw.token("acme");
    let swapped = format!(
        "{}.{}",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        valid.split_once('.').unwrap().1
    );
    let no_tenant = sign(
        Algorithm::HS256,
        &json!({"sub": "acme", "exp": exp}),
        support::SECRET,
    );
    let empty_tenant = sign(
        Algorithm::HS256,
        &json!({"tenant_id": "", "exp": exp}),
        support::SECRET,
    );
    let no_exp = sign(
        Algorithm::HS256,
        &json!({"tenant_id": "acme"}),
        support::SECRET,
    );

    let bearer = |t: &str| format!("Bearer {t}");
    // (what, headers, query)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String);
    let cases: Vec<Case> = vec![
        ("no token", vec![], String::new()),
        (
            "another secret",
            vec![("Authorization", bearer(&other_secret))],
            String::new(),
        ),
        (
            "expired",
            vec![("Authorization", bearer(&expired))],
            String::new(),
        ),
        (
            "nbf in the future",
            vec![("Authorization", bearer(&not_yet))],
            String::new(),
        ),
        (
            "alg none",
            vec![("Authorization", bearer(&alg_none))],
            String::new(),
        ),
        (
            "alg none, signature kept",
            vec![("Authorization", bearer(&swapped))],
            String::new(),
        ),
        (
            "HS512",
            vec![("Authorization", bearer(&hs512))],
            String::new(),
        ),
        (
            "HS384",
            vec![("Authorization", bearer(&hs384))],
            String::new(),
        ),
        (
            "garbage header",
            vec![("Authorization", "garbage".to_string())],
            String::new(),
        ),
        (
            "garbage bearer",
            vec![("Authorization", "Bearer not.a.jwt".to_string())],
            String::new(),
        ),
        (
            "basic scheme",
            vec![("Authorization", format!("Basic {valid}"))],
            String::new(),
        ),
        (
            "empty bearer",
            vec![("Authorization", "Bearer ".to_string())],
            String::new(),
        ),
        (
            "no tenant claim",
            vec![("Authorization", bearer(&no_tenant))],
            String::new(),
        ),
        (
            "empty tenant claim",
            vec![("Authorization", bearer(&empty_tenant))],
            String::new(),
        ),
        (
            "no exp",
            vec![("Authorization", bearer(&no_exp))],
            String::new(),
        ),
        (
            "expired access_token",
            vec![],
            format!("access_token={expired}"),
        ),
        (
            "alg none access_token",
            vec![("Accept", "application/x-ndjson".to_string())],
            format!("access_token={alg_none}"),
        ),
        (
            "garbage access_token",
            vec![],
            "access_token=garbage".to_string(),
        ),
    ];
    let mut codes = std::collections::BTreeMap::new();
    for (what, headers, query) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get_soon(gw.addr, &format!("/v1/stream?{query}"), &headers).await;
        assert_error(&r, 401, what);
        assert!(
            !r.body.contains("acme"),
            "{what}: the error echoes no claim: {}",
            r.body
        );
        codes.insert(
            *what,
            r.json()["error"]["code"].as_str().unwrap().to_string(),
        );
    }
    assert_ne!(
        codes["expired"], codes["another secret"],
        "an expired token is told apart: {codes:?}"
    );

    // The same valid token works from either place.
    let mut h = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &bearer(&valid))]).await;
    let mut q = assert_streams(gw.addr, &format!("/v1/stream?access_token={valid}"), &[]).await;
    // And the rejected requests registered nothing: the two streams are the only ones, so
    // a change goes to exactly them.
    db.client()
        .await
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'hello')")
        .await
        .unwrap();
    assert_eq!(h.next_change().await["new"]["body"], "hello");
    assert_eq!(q.next_change().await["new"]["body"], "hello");
    gw.stop().await;
}

#[tokio::test]
async fn bad_requests_are_400_json_naming_the_problem() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    let auth = format!("Bearer {}", gw.token("acme"));
    for (query, extra, names) in [
        ("tabels=notes", None, "tabels"),
        ("ops=upsert", None, "ops"),
        ("ops=", None, "ops"),
        ("ops=insert,,delete", None, "ops"),
        ("payload=rows", None, "payload"),
        ("payload=", None, "payload"),
        ("last_event_id=abc", None, "last_event_id"),
        ("last_event_id=1.2.3", None, "last_event_id"),
        ("last_event_id=-1.2", None, "last_event_id"),
        ("tables=a.b.c", None, "tables"),
        ("tables=notes;drop", None, "tables"),
        ("ops=insert&ops=delete", None, "ops"),
        ("payload=keys&payload=keys", None, "payload"),
        ("", Some("abc"), "Last-Event-ID"),
        ("", Some("1.x"), "Last-Event-ID"),
        ("", Some("12"), "Last-Event-ID"),
    ] {
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(id) = extra {
            headers.push(("Last-Event-ID", id));
        }
        let r = get_soon(gw.addr, &format!("/v1/stream?{query}"), &headers).await;
        let message = assert_error(&r, 400, &format!("?{query} {extra:?}"));
        assert!(
            message.contains(names),
            "?{query} {extra:?}: the message names {names}: {message}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_and_other_methods_405() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    let auth = format!("Bearer {}", gw.token("acme"));
    for path in [
        "/",
        "/nope",
        "/v1",
        "/v1/streams",
        "/v1/stream/extra",
        "/v2/stream",
        "/healthz/x",
    ] {
        let r = get_soon(gw.addr, path, &[("Authorization", &auth)]).await;
        assert_error(&r, 404, path);
    }
    for (method, path) in [
        ("POST", "/v1/stream"),
        ("PUT", "/v1/stream"),
        ("DELETE", "/v1/position"),
        ("POST", "/healthz"),
    ] {
        let r = request(gw.addr, method, path, &[], SOON).await;
        assert_error(&r, 405, &format!("{method} {path}"));
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 has Allow: {r:?}"));
        assert!(
            allow.split(',').any(|m| m.trim() == "GET"),
            "{method} {path}: Allow: {allow}"
        );
    }
    // The same connection-level client gets a normal answer for GET: the helper is sound.
    assert_eq!(
        request(gw.addr, "GET", "/healthz", &[], SOON).await.status,
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn health_readiness_and_position() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    assert_eq!(get_soon(gw.addr, "/healthz", &[]).await.status, 200);
    assert_eq!(get_soon(gw.addr, "/readyz", &[]).await.status, 200);

    // /v1/position needs a token.
    assert_error(
        &get_soon(gw.addr, "/v1/position", &[]).await,
        401,
        "position without a token",
    );
    let bad = sign(
        Algorithm::HS256,
        &json!({"tenant_id": "acme", "exp": now() + 60}),
        "not-the-secret-0123456",
    );
    assert_error(
        &get_soon(
            gw.addr,
            "/v1/position",
            &[("Authorization", &format!("Bearer {bad}"))],
        )
        .await,
        401,
        "position with a bad token",
    );
    let token = gw.token("acme");
    let auth = format!("Bearer {token}");
    let position = |r: Response| -> Position {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
        body["position"]
            .as_str()
            .unwrap_or_else(|| panic!("position is a string: {body}"))
            .parse()
            .unwrap_or_else(|e| panic!("position is <commit>.<ord>: {e}"))
    };
    let before = position(get_soon(gw.addr, "/v1/position", &[("Authorization", &auth)]).await);

    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    db.client()
        .await
        .batch_execute(
            "BEGIN;
             INSERT INTO notes (tenant, body) VALUES ('acme', 'one'), ('acme', 'two');
             UPDATE notes SET body = 'three' WHERE body = 'one';
             COMMIT;",
        )
        .await
        .unwrap();
    let changes = [
        s.next_change().await,
        s.next_change().await,
        s.next_change().await,
    ];
    let last: Position = changes[2]["position"].as_str().unwrap().parse().unwrap();
    let after = position(get_soon(gw.addr, "/v1/position", &[("Authorization", &auth)]).await);
    assert!(after > before, "{after} > {before}");
    assert_eq!(
        after, last,
        "the head is the position of the write's last change"
    );
    // The token may also come in the query; the answer is the same.
    let via_query =
        position(get_soon(gw.addr, &format!("/v1/position?access_token={token}"), &[]).await);
    assert_eq!(via_query, last);

    // A client that reads its data now and streams from that position misses nothing and
    // gets nothing twice.
    let mut resumed = gw.stream("acme", &format!("last_event_id={after}")).await;
    assert!(resumed.until_live().await.is_empty());
    db.client()
        .await
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'four')")
        .await
        .unwrap();
    let four = resumed.next_change().await;
    assert_eq!(four["new"]["body"], "four");
    assert!(
        four["position"]
            .as_str()
            .unwrap()
            .parse::<Position>()
            .unwrap()
            > after
    );
    gw.stop().await;
}

#[tokio::test]
async fn payload_keys_sends_keys_and_changed_only() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut keys = gw.stream("acme", "payload=keys").await;
    let mut full = gw.stream("acme", "payload=full").await;
    keys.until_live().await;
    full.until_live().await;
    let c = db.client().await;
    let id: i32 = c
        .query_one(
            "INSERT INTO notes (tenant, body, secret) VALUES ('acme', 'visible-body', 'row-secret') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "UPDATE notes SET body = 'edited-body', secret = 'other-secret' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    c.execute("DELETE FROM notes WHERE id = $1", &[&id])
        .await
        .unwrap();

    for (op, changed) in [
        ("insert", None),
        ("update", Some(json!(["body", "secret"]))),
        ("delete", None),
    ] {
        let k = keys.next_change().await;
        let f = full.next_change().await;
        assert_eq!(k["op"], op);
        assert_eq!(k["position"], f["position"], "the same change");
        assert_eq!(k["pk"], json!({"id": id}), "{k}");
        assert_eq!(k["table"], "public.notes");
        assert_eq!(k["tenant"], "acme");
        assert!(
            k.get("new").is_none() && k.get("old").is_none(),
            "no rows with payload=keys: {k}"
        );
        assert_eq!(k.get("changed"), changed.as_ref(), "{k}");
        assert!(
            f.get("new").is_some() || f.get("old").is_some(),
            "payload=full has rows: {f}"
        );
    }
    for value in ["visible-body", "row-secret", "edited-body", "other-secret"] {
        assert!(
            !keys.raw.contains(value),
            "{value} reached a payload=keys stream: {}",
            keys.raw
        );
        assert!(full.raw.contains(value), "{value} is in the full stream");
    }
    keys.assert_quiet(Duration::from_millis(200)).await;
    gw.stop().await;
}

#[tokio::test]
async fn ops_delete_delivers_only_deletes() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "ops=delete").await;
    s.until_live().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO notes (id, tenant, body) VALUES (1, 'acme', 'a'), (2, 'acme', 'b');
         UPDATE notes SET body = 'a2' WHERE id = 1;
         DELETE FROM notes WHERE id = 1;
         INSERT INTO notes (id, tenant, body) VALUES (3, 'acme', 'c');
         UPDATE notes SET body = 'c2' WHERE id = 3;
         INSERT INTO notes (id, tenant, body) VALUES (4, 'globex', 'g');
         DELETE FROM notes WHERE id = 4;
         DELETE FROM notes WHERE id = 2;
         UPDATE notes SET body = 'c3' WHERE id = 3;
         DELETE FROM notes WHERE id = 3;",
    )
    .await
    .unwrap();
    // Each is the very next event: no insert or update, and not globex's delete, came in
    // between.
    for (id, body) in [(1, "a2"), (2, "b"), (3, "c3")] {
        let e = s.next().await.expect("stream open");
        assert_eq!(e.event, "change", "{e:?}");
        let d = e.json();
        assert_eq!(d["op"], "delete", "{d}");
        assert_eq!(d["pk"], json!({"id": id}));
        assert_eq!(d["old"]["body"], body);
    }
    s.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}

#[tokio::test]
async fn tables_accepts_bare_and_qualified_names() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("CREATE SCHEMA crm")
        .await
        .unwrap();
    support::tenant_table(&db, "notes").await;
    support::tenant_table(&db, "memos").await;
    support::tenant_table(&db, "crm.leads").await;
    let gw = Gateway::start(&db).await;
    let queries = [
        ("tables=notes", vec!["public.notes"]),
        ("tables=public.memos", vec!["public.memos"]),
        ("tables=crm.leads", vec!["crm.leads"]),
        (
            "tables=public.notes,crm.leads",
            vec!["public.notes", "crm.leads"],
        ),
        (
            "tables=memos,%20notes",
            vec!["public.memos", "public.notes"],
        ),
        ("", vec!["public.notes", "public.memos", "crm.leads"]),
    ];
    let mut streams = Vec::new();
    for (query, _) in &queries {
        let mut s = gw.stream("acme", query).await;
        assert_eq!(s.status, 200, "{query}");
        s.until_live().await;
        streams.push(s);
    }
    let c = db.client().await;
    let writes = [
        "memos",
        "notes",
        "crm.leads",
        "notes",
        "memos",
        "crm.leads",
        "notes",
    ];
    for (i, table) in writes.iter().enumerate() {
        c.execute(
            &format!("INSERT INTO {table} (tenant, body) VALUES ('acme', $1)"),
            &[&format!("w{i}")],
        )
        .await
        .unwrap();
    }
    for ((query, tables), s) in queries.iter().zip(&mut streams) {
        let want: Vec<(String, String)> = writes
            .iter()
            .enumerate()
            .map(|(i, t)| (pgfeed::names::table_key(t).unwrap(), format!("w{i}")))
            .filter(|(t, _)| tables.contains(&t.as_str()))
            .collect();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let e = s.next_change().await;
            got.push((
                e["table"].as_str().unwrap().to_string(),
                e["new"]["body"].as_str().unwrap().to_string(),
            ));
        }
        assert_eq!(got, want, "?{query}");
        s.assert_quiet(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn idle_streams_get_keepalive_comments() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let mut sources = support::sources(&db);
    sources
        .env
        .push(("PGFEED_SERVER_HEARTBEAT".into(), "200ms".into()));
    let gw = Gateway::start_with(sources).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    assert_eq!(
        s.comments, 0,
        "no comment before the first heartbeat interval"
    );
    // About a second of silence holds several 200 ms keepalives (and no event).
    let started = tokio::time::Instant::now();
    while s.comments < 3 {
        assert!(
            started.elapsed() < SOON,
            "keepalives every 200ms: {} in {:?}",
            s.comments,
            s.raw
        );
        s.assert_quiet(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "three keepalives at a 200 ms heartbeat took {elapsed:?}"
    );
    assert!(s.raw.contains(": keepalive\n\n"), "{:?}", s.raw);
    // The stream is still a stream: a change arrives after the keepalives.
    db.client()
        .await
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'after keepalives')")
        .await
        .unwrap();
    assert_eq!(s.next_change().await["new"]["body"], "after keepalives");

    // With the default heartbeat (15 s), an idle second is silent.
    let quiet_gw = Gateway::start(&db).await;
    let mut q = quiet_gw.stream("acme", "").await;
    q.until_live().await;
    q.assert_quiet(Duration::from_millis(600)).await;
    assert_eq!(q.comments, 0, "{:?}", q.raw);
    quiet_gw.stop().await;
    gw.stop().await;
}

/// Reads until `raw` holds `n` complete lines (NDJSON has no blank-line frames, so the
/// SSE parser never yields an event; `assert_quiet` just accumulates the body).
async fn ndjson_lines(s: &mut SseClient, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + SOON;
    while s.raw.matches('\n').count() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} lines within {SOON:?}: {:?}",
            s.raw
        );
        s.assert_quiet(Duration::from_millis(50)).await;
    }
    s.raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[tokio::test]
async fn ndjson_stream_sends_json_lines() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let auth = format!("Bearer {}", gw.token("acme"));
    let mut s = SseClient::open(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &auth), ("Accept", "application/x-ndjson")],
    )
    .await;
    assert_eq!(s.status, 200);
    let content_type = s
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone());
    assert_eq!(content_type.as_deref(), Some("application/x-ndjson"));
    let lines = ndjson_lines(&mut s, 1).await;
    assert_eq!(lines[0]["event"], "live", "{:?}", s.raw);
    assert!(lines[0]["position"].is_string());

    db.client()
        .await
        .batch_execute(
            "INSERT INTO notes (tenant, body) VALUES ('acme', 'first');
             INSERT INTO notes (tenant, body) VALUES ('globex', 'not for acme');
             UPDATE notes SET body = 'second' WHERE body = 'first';",
        )
        .await
        .unwrap();
    let lines = ndjson_lines(&mut s, 3).await;
    assert_eq!(lines.len(), 3, "{:?}", s.raw);
    assert_eq!(lines[1]["event"], "change");
    assert_eq!(lines[1]["op"], "insert");
    assert_eq!(lines[1]["table"], "public.notes");
    assert_eq!(lines[1]["new"]["body"], "first");
    assert_eq!(lines[2]["event"], "change");
    assert_eq!(lines[2]["op"], "update");
    assert_eq!(lines[2]["old"]["body"], "first");
    assert_eq!(lines[2]["changed"], json!(["body"]));
    let p1: Position = lines[1]["position"].as_str().unwrap().parse().unwrap();
    let p2: Position = lines[2]["position"].as_str().unwrap().parse().unwrap();
    assert!(p1 < p2);
    s.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(s.raw.matches('\n').count(), 3, "nothing else: {:?}", s.raw);
    for sse in ["retry:", "data:", "id:", "event:"] {
        assert!(
            !s.raw.contains(sse),
            "no SSE framing ({sse}) in NDJSON: {:?}",
            s.raw
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_token_that_expires_ends_its_stream() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let token = pgfeed::auth::mint(&gw.config.auth, "acme", None, Duration::from_secs(2)).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    // A token that lives on is unaffected: it sees the change after the other stream ends.
    let mut lasting = gw.stream("acme", "").await;
    lasting.until_live().await;
    let mut s = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;

    db.client()
        .await
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'before expiry')")
        .await
        .unwrap();
    let change = s.next_change().await;
    assert_eq!(change["new"]["body"], "before expiry");
    assert_eq!(lasting.next_change().await["new"]["body"], "before expiry");

    let e = s
        .next_within(Duration::from_secs(15))
        .await
        .expect("an `expired` event, not a bare end");
    assert_eq!(e.event, "expired", "{e:?}");
    let ended_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        ended_at >= exp as f64 - 0.5,
        "not before the token's exp: {ended_at} < {exp}"
    );
    let data = e.json();
    assert!(data["reason"].is_string(), "{data}");
    assert_eq!(
        data["position"], change["position"],
        "it tells where to resume: {data}"
    );
    assert!(s.next().await.is_none(), "the body ends after `expired`");

    db.client()
        .await
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'after expiry')")
        .await
        .unwrap();
    assert_eq!(lasting.next_change().await["new"]["body"], "after expiry");
    gw.stop().await;
}

/// A connection whose first request is not a stream goes to hyper with the bytes already
/// read (here a pipelined second request too), and hyper serves a stream on it as well.
#[tokio::test]
async fn a_stream_after_another_request_on_the_same_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let token = gw.token("acme");
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let requests = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    socket.write_all(requests.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + support::SOON;
    while !String::from_utf8_lossy(&received).contains("event: live") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut buf))
            .await
            .expect("both responses in time")
            .unwrap();
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    let first = text.find("HTTP/1.1 200").unwrap();
    assert!(text[first..].contains(r#"{"status":"ok"}"#), "{text}");
    let second = text[first + 1..]
        .find("HTTP/1.1 200")
        .expect("a second response")
        + first
        + 1;
    assert!(
        text[second..].contains("content-type: text/event-stream"),
        "{text}"
    );
    gw.stop().await;
}
