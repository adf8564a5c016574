//! The API description in `api/` (the OpenAPI document and the event schemas) against the
//! real server: it is valid OpenAPI 3.1 with valid JSON Schemas; its paths and methods are
//! exactly what a gateway answers and what the router names; its error codes are exactly
//! those the source can produce, with the statuses the README's table gives; and real
//! events and responses from a real gateway validate against it.

use pgfeed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Gateway, SOON, SseClient, TestDb, eventually, request, sources_with};

/// Where the `api/` files are registered for resolving references, so that the OpenAPI
/// document's relative `change.schema.json` resolves as it does in the repository and on
/// the server.
const BASE: &str = "file:///pgfeed/api/";

/// The files of the API description, as served.
const FILES: [&str; 3] = ["openapi.json", "change.schema.json", "control.schema.json"];

/// Methods probed on every path.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
];

/// Request headers, as name and value.
type Headers<'a> = Vec<(&'a str, &'a str)>;

/// The origin the test gateway allows.
const ORIGIN: &str = "https://app.example";

fn repo_file(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {full}: {e}"))
}

fn api_file(name: &str) -> Value {
    serde_json::from_str(&repo_file(&format!("api/{name}")))
        .unwrap_or_else(|e| panic!("api/{name} is not JSON: {e}"))
}

fn document() -> Value {
    api_file("openapi.json")
}

/// The three files, registered under [`BASE`].
fn registry() -> jsonschema::Registry<'static> {
    let mut builder = jsonschema::Registry::new();
    for name in FILES {
        builder = builder
            .add(format!("{BASE}{name}"), api_file(name))
            .expect("a valid URI");
    }
    builder.prepare().expect("the API files form a registry")
}

/// A validator for the schema at `reference` (relative to `api/`, e.g.
/// `change.schema.json` or `openapi.json#/components/schemas/Error`), formats checked.
fn validator(registry: &jsonschema::Registry<'static>, reference: &str) -> jsonschema::Validator {
    jsonschema::options()
        .with_registry(registry)
        .with_base_uri(format!("{BASE}test.json"))
        .should_validate_formats(true)
        .build(&json!({ "$ref": reference }))
        .unwrap_or_else(|e| panic!("building a validator for {reference}: {e}"))
}

/// The errors of `instance` against `v`, as text (empty when valid).
fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

#[track_caller]
fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errs = errors(v, instance);
    let shown: String = instance.to_string().chars().take(400).collect();
    assert!(errs.is_empty(), "{what}: {shown} is invalid: {errs:#?}");
}

#[track_caller]
fn assert_invalid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    assert!(
        !errors(v, instance).is_empty(),
        "{what}: {instance} should be refused"
    );
}

/// JSON pointer escaping of one reference token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Follows a `$ref` in `file`: the value it names, if any.
fn resolve(file: &str, reference: &str) -> Option<Value> {
    let (target, pointer) = reference.split_once('#').unwrap_or((reference, ""));
    let target = if target.is_empty() { file } else { target };
    if !FILES.contains(&target) {
        return None;
    }
    api_file(target).pointer(pointer).cloned()
}

/// Every `$ref` value in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The operations of the document: (path, lower-case method) → operation.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            assert!(
                METHODS.contains(&method.to_ascii_uppercase().as_str()),
                "{path}: {method} is not an operation this test probes"
            );
            out.insert((path.clone(), method.clone()), op.clone());
        }
    }
    out
}

/// The reference of the response an operation documents for `status`, as
/// `openapi.json#/...`, or `None` if it documents none.
fn response_ref(doc: &Value, path: &str, method: &str, status: u16) -> Option<String> {
    let response = doc["paths"][path][method]["responses"].get(status.to_string())?;
    Some(match response["$ref"].as_str() {
        Some(r) => format!("openapi.json{r}"),
        None => format!(
            "openapi.json#/paths/{}/{method}/responses/{status}",
            escape(path)
        ),
    })
}

/// The error codes an error response (by reference) allows.
fn response_codes(reference: &str) -> Vec<String> {
    let response = resolve("openapi.json", reference.trim_start_matches("openapi.json"))
        .unwrap_or_else(|| panic!("{reference} resolves"));
    let schema = &response["content"]["application/json"]["schema"];
    let codes = &schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"];
    codes
        .as_array()
        .unwrap_or_else(|| panic!("{reference}: an error response lists its codes"))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The media type without parameters.
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

#[test]
fn the_document_is_openapi_3_1_and_its_schemas_are_json_schema() {
    let doc = document();
    // The OpenAPI Initiative's schema of 3.1 documents (tests/data/README.md says where
    // it comes from).
    let oas: Value = serde_json::from_str(&repo_file("tests/data/oas-3.1-schema.json")).unwrap();
    let oas = jsonschema::validator_for(&oas).expect("the OAS 3.1 schema compiles");
    assert_valid(
        &oas,
        &doc,
        "api/openapi.json against the OpenAPI 3.1 schema",
    );
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "the document's version is the crate's"
    );
    let mut broken = doc.clone();
    broken.as_object_mut().unwrap().remove("info");
    assert_invalid(&oas, &broken, "a document without `info`");

    for name in ["change.schema.json", "control.schema.json"] {
        let schema = api_file(name);
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("api/{name} is not a valid JSON Schema: {e}");
        }
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("components.schemas.{name} is not a valid JSON Schema: {e}");
        }
    }

    // Every reference resolves, in the document and in the schemas.
    for file in FILES {
        let mut found = Vec::new();
        refs(&api_file(file), &mut found);
        assert!(!found.is_empty(), "{file} has references");
        for r in found {
            assert!(resolve(file, &r).is_some(), "{file}: $ref {r:?} resolves");
        }
    }
    // And the schemas compile with their references.
    let registry = registry();
    for reference in [
        "change.schema.json",
        "control.schema.json",
        "openapi.json#/components/schemas/Error",
        "openapi.json#/components/schemas/ChangeEvent",
        "openapi.json#/components/schemas/ControlEvent",
    ] {
        validator(&registry, reference);
    }
}

/// Scans `src/` for `ApiError::new(status, code, message)`: every code it can produce,
/// with where. A code given by a variable is one of the snake_case string literals the
/// enclosing function has before the call (outside `json!`).
fn source_error_codes() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files = Vec::new();
    let mut dirs = vec![format!("{}/src", env!("CARGO_MANIFEST_DIR"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.to_string_lossy().into_owned());
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut calls = 0;
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("//") {
                    ""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        const CALL: &str = "ApiError::new(";
        for (at, _) in text.match_indices(CALL) {
            calls += 1;
            let line = text[..at].matches('\n').count() + 1;
            let place = format!("src/{name}:{line}");
            let args = split_args(&text[at + CALL.len()..]);
            let code = args
                .get(1)
                .unwrap_or_else(|| panic!("{place}: ApiError::new has a code argument"))
                .trim();
            if let Some(literal) = code.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
                out.entry(literal.to_string()).or_default().push(place);
            } else if code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                let start = text[..at]
                    .rfind("fn ")
                    .unwrap_or_else(|| panic!("{place}: no enclosing function"));
                let literals = snake_literals(&strip_json_macros(&text[start..at]));
                assert!(
                    !literals.is_empty(),
                    "{place}: cannot tell which codes `{code}` holds"
                );
                for literal in literals {
                    out.entry(literal).or_default().push(place.clone());
                }
            } else {
                panic!("{place}: cannot tell the code of ApiError::new from {code:?}");
            }
        }
    }
    assert!(
        calls >= 10,
        "found only {calls} ApiError::new calls in src/"
    );
    out
}

/// The top-level comma-separated arguments of a call whose text starts after its `(`.
fn split_args(text: &str) -> Vec<String> {
    let mut args = vec![String::new()];
    let mut depth = 0;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let arg = args.last_mut().unwrap();
                arg.push(c);
                while let Some(s) = chars.next() {
                    arg.push(s);
                    if s == '\\' {
                        arg.extend(chars.next());
                    } else if s == '"' {
                        break;
                    }
                }
                continue;
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => break,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                args.push(String::new());
                continue;
            }
            _ => {}
        }
        args.last_mut().unwrap().push(c);
    }
    args
}

/// `text` without the arguments of its `json!(...)` invocations.
fn strip_json_macros(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("json!(") {
        out.push_str(&rest[..at]);
        let inner = &rest[at + "json!(".len()..];
        let args = split_args(inner).join(",");
        rest = &inner[(args.len() + 1).min(inner.len())..];
    }
    out.push_str(rest);
    out
}

/// The string literals of `text` that look like error codes (`snake_case`).
fn snake_literals(text: &str) -> Vec<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            !s.is_empty()
                && s.split('_')
                    .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
        })
        .map(str::to_string)
        .collect()
}

/// The README's table of error codes: (status, code) pairs.
fn readme_error_table() -> BTreeSet<(u16, String)> {
    let readme = repo_file("README.md");
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.starts_with("| status | `error.code` |"))
        .skip(2);
    let mut out = BTreeSet::new();
    for line in lines.by_ref().take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let status = cells[1]
            .parse()
            .unwrap_or_else(|_| panic!("README: a status in {line:?}"));
        let code = cells[2].trim_matches('`').to_string();
        out.insert((status, code));
    }
    assert!(out.len() >= 10, "README's error table: {out:?}");
    out
}

#[test]
fn every_error_code_the_source_produces_is_in_the_document_and_the_readme() {
    let doc = document();
    let source = source_error_codes();
    let source_codes: BTreeSet<&str> = source.keys().map(String::as_str).collect();
    let enum_codes: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        source_codes, enum_codes,
        "the codes src/ can produce ({source:?}) against the document's ErrorCode enum"
    );

    // (status, code) as the document's operations give them; the two responses no
    // operation can carry (any other path, any other method) have their own statuses.
    let mut pairs = BTreeSet::new();
    let mut used = BTreeSet::new();
    for ((path, method), op) in operations(&doc) {
        for status in op["responses"].as_object().unwrap().keys() {
            let status: u16 = status.parse().expect("a numeric status");
            let reference = response_ref(&doc, &path, &method, status).unwrap();
            used.insert(reference.clone());
            if status >= 400 {
                for code in response_codes(&reference) {
                    pairs.insert((status, code));
                }
            }
        }
    }
    let unused: BTreeSet<String> = doc["components"]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(|name| format!("openapi.json#/components/responses/{name}"))
        .filter(|r| !used.contains(r))
        .collect();
    let outside = [(404, "NotFound"), (405, "MethodNotAllowed")];
    assert_eq!(
        unused,
        outside
            .iter()
            .map(|(_, n)| format!("openapi.json#/components/responses/{n}"))
            .collect(),
        "every response but those of unknown paths and methods belongs to an operation"
    );
    for (status, name) in outside {
        for code in response_codes(&format!("openapi.json#/components/responses/{name}")) {
            pairs.insert((status, code));
        }
    }
    let codes_in_responses: BTreeSet<&str> = pairs.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        codes_in_responses, enum_codes,
        "every code is some response's"
    );
    assert_eq!(
        readme_error_table(),
        pairs,
        "README's error table against the document's responses"
    );
}

/// The paths the router matches: the path-like string literals of the HTTP code (every
/// file of `src/http/`).
fn router_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let dir = format!("{}/src/http", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".rs"))
        .map(|name| format!("src/http/{name}"))
        .collect();
    files.sort();
    assert!(files.len() > 1, "no HTTP code found in {dir}");
    for file in files {
        for line in repo_file(&file).lines() {
            let code = line.split("//").next().unwrap_or("");
            for literal in code.split('"').skip(1).step_by(2) {
                if literal.starts_with('/')
                    && literal.len() > 1
                    && literal
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "/._-".contains(c))
                {
                    out.insert(literal.to_string());
                }
            }
        }
    }
    out
}

/// A gateway with a watched tenant table and CORS for [`ORIGIN`].
async fn gateway(db: &TestDb, env: &[(&str, &str)]) -> Gateway {
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, tenant text NOT NULL, status text,
                              amount numeric, tags text[], meta jsonb, due timestamptz);
         SELECT pgfeed.watch('orders', 'tenant');
         CREATE TABLE announcements (id serial PRIMARY KEY, body text);
         SELECT pgfeed.watch('announcements', public => true);",
    )
    .await
    .unwrap();
    let mut all = vec![("PGFEED_CORS_ALLOWED_ORIGINS", ORIGIN)];
    all.extend_from_slice(env);
    Gateway::start_with(sources_with(db, &all)).await
}

/// One request answered in full (never a stream).
async fn probe(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> support::Response {
    request(addr, method, path, headers, SOON).await
}

/// Checks that `r`, the answer to `method path`, is one the document gives that operation:
/// its status is documented, its content type too, and a JSON body validates.
#[track_caller]
fn assert_documented_answer(
    doc: &Value,
    registry: &jsonschema::Registry<'static>,
    method: &str,
    path: &str,
    r: &support::Response,
) {
    let what = format!("{method} {path}");
    let lower = method.to_ascii_lowercase();
    let reference = response_ref(doc, path, &lower, r.status)
        .unwrap_or_else(|| panic!("{what}: status {} is not documented: {r:?}", r.status));
    let response = resolve("openapi.json", reference.trim_start_matches("openapi.json")).unwrap();
    let Some(content) = response["content"].as_object() else {
        assert!(r.body.is_empty(), "{what}: no content documented: {r:?}");
        return;
    };
    if method == "HEAD" {
        assert!(r.body.is_empty(), "{what}: {r:?}");
        return;
    }
    let content_type = r.header("content-type").unwrap_or_default();
    let (media, _) = content
        .iter()
        .find(|(m, _)| essence(m) == essence(content_type))
        .unwrap_or_else(|| panic!("{what}: content type {content_type:?} is not documented"));
    if essence(media) == "application/json" {
        let v = validator(
            registry,
            &format!("{reference}/content/{}/schema", escape(media)),
        );
        assert_valid(&v, &r.json(), &format!("{what} ({})", r.status));
    }
}

#[tokio::test]
async fn the_documented_routes_and_methods_are_exactly_those_the_server_answers() {
    let doc = document();
    let registry = registry();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        router_paths(),
        documented,
        "the paths named in src/http/ against the document's"
    );

    let db = TestDb::new().await;
    let gw = gateway(&db, &[]).await;
    let auth = format!("Bearer {}", gw.token("acme"));
    let ops = operations(&doc);
    for path in &documented {
        for method in METHODS {
            let what = format!("{method} {path}");
            let is_documented = ops.contains_key(&(path.clone(), method.to_ascii_lowercase()));
            if method == "GET" && path == "/v1/stream" {
                assert!(is_documented);
                let s = SseClient::open(gw.addr, path, &[("Authorization", &auth)]).await;
                assert_eq!(s.status, 200, "{what}: {}", s.raw);
                let content_type = s.headers.iter().find(|(k, _)| k == "content-type");
                let media = &doc["paths"][path]["get"]["responses"]["200"]["content"];
                assert!(
                    content_type.is_some_and(|(_, v)| media.get(essence(v)).is_some()),
                    "{what}: {:?}",
                    s.headers
                );
                continue;
            }
            let r = probe(
                gw.addr,
                method,
                path,
                &[
                    ("Authorization", &auth),
                    ("Origin", ORIGIN),
                    ("Access-Control-Request-Method", "GET"),
                ],
            )
            .await;
            if is_documented {
                assert!(
                    r.status != 404 && r.status != 405,
                    "{what} is documented but not answered: {r:?}"
                );
                assert!(r.status < 300, "{what}: {r:?}");
                assert_documented_answer(&doc, &registry, method, path, &r);
            } else {
                assert_eq!(
                    r.status, 405,
                    "{what} is not documented but answered: {r:?}"
                );
                if method == "HEAD" {
                    continue;
                }
                let v = validator(
                    &registry,
                    "openapi.json#/components/responses/MethodNotAllowed/content/application~1json/schema",
                );
                assert_valid(&v, &r.json(), &what);
            }
        }
    }
    // The documents served are the ones in the repository.
    for name in FILES {
        let r = probe(gw.addr, "GET", &format!("/{name}"), &[]).await;
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), api_file(name), "/{name} serves api/{name}");
    }

    // Anything else is a 404.
    let not_found = validator(
        &registry,
        "openapi.json#/components/responses/NotFound/content/application~1json/schema",
    );
    for path in [
        "/",
        "/v1",
        "/v1/",
        "/v1/stream/",
        "/v1/streams",
        "/v2/stream",
        "/openapi.yaml",
        "/api/openapi.json",
        "/schemas/change.schema.json",
        "/healthz/",
        "/HEALTHZ",
    ] {
        for method in ["GET", "OPTIONS", "POST"] {
            let r = probe(gw.addr, method, path, &[("Authorization", &auth)]).await;
            assert_eq!(r.status, 404, "{method} {path}: {r:?}");
            assert_valid(&not_found, &r.json(), &format!("{method} {path}"));
        }
    }

    // Errors the operations document, as a careless client meets them.
    let long_query = format!("/healthz?{}", "a".repeat(9000));
    let cases: Vec<(&str, String, Headers, u16)> = vec![
        ("GET", "/v1/stream".into(), vec![], 401),
        (
            "GET",
            "/v1/stream".into(),
            vec![("Authorization", "Bearer nonsense")],
            401,
        ),
        (
            "GET",
            "/v1/stream?ops=upsert".into(),
            vec![("Authorization", &auth)],
            400,
        ),
        (
            "GET",
            "/v1/stream?last_event_id=999999999.0".into(),
            vec![("Authorization", &auth)],
            400,
        ),
        ("GET", "/v1/position".into(), vec![], 401),
        (
            "GET",
            "/v1/position?tenant=acme".into(),
            vec![("Authorization", &auth)],
            400,
        ),
        ("OPTIONS", "/v1/stream".into(), vec![], 403),
        (
            "OPTIONS",
            "/metrics".into(),
            vec![("Origin", "https://evil.example")],
            403,
        ),
        ("GET", long_query, vec![], 414),
    ];
    for (method, target, headers, status) in cases {
        let r = probe(gw.addr, method, &target, &headers).await;
        assert_eq!(r.status, status, "{method} {target}: {r:?}");
        let path = target.split('?').next().unwrap();
        assert_documented_answer(&doc, &registry, method, path, &r);
    }
    gw.stop().await;
}

/// Reads NDJSON lines from `s` until `enough` says the lines so far suffice.
async fn ndjson_until(s: &mut SseClient, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let lines: Vec<Value> = s
            .raw
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect();
        if enough(&lines) {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NDJSON lines so far: {:?}",
            s.raw
        );
        s.assert_quiet(Duration::from_millis(50)).await;
    }
}

fn kinds(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["event"].as_str().unwrap_or("?"))
        .collect()
}

async fn open(gw: &Gateway, query: &str, token: &str, ndjson: bool) -> SseClient {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if ndjson {
        headers.push(("Accept", "application/x-ndjson"));
    }
    let s = SseClient::open(gw.addr, &format!("/v1/stream{query}"), &headers).await;
    assert_eq!(s.status, 200, "{}", s.raw);
    s
}

#[tokio::test]
async fn real_change_live_and_keepalive_events_validate_against_the_schemas() {
    let registry = registry();
    let change = validator(&registry, "change.schema.json");
    let control = validator(&registry, "control.schema.json");
    let live = validator(&registry, "control.schema.json#/$defs/live");
    let db = TestDb::new().await;
    let gw = gateway(&db, &[("PGFEED_SERVER_HEARTBEAT", "200ms")]).await;
    let token = gw.token("acme");
    let mut sse_full = open(&gw, "", &token, false).await;
    let mut sse_keys = open(&gw, "?payload=keys", &token, false).await;
    let mut nd_full = open(&gw, "", &token, true).await;
    let mut nd_keys = open(&gw, "?payload=keys", &token, true).await;
    for s in [&mut sse_full, &mut sse_keys] {
        let e = s.next().await.expect("live");
        assert_eq!(e.event, "live", "{e:?}");
        assert_valid(&live, &e.json(), "SSE live");
        assert_invalid(
            &control,
            &e.json(),
            "SSE data (no `event`) as an NDJSON line",
        );
    }

    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO orders VALUES (1, 'acme', 'new', 123456789012345678901234567890.5,
                                    '{a,b}', '{\"k\": [1, null]}', '2026-01-02 03:04:05+00');
         INSERT INTO orders VALUES (2, 'globex', 'new', 1, NULL, NULL, NULL);
         UPDATE orders SET status = 'paid', amount = 2 WHERE id = 1;
         DELETE FROM orders WHERE id = 1;
         INSERT INTO announcements (body) VALUES ('for everyone');
         TRUNCATE orders;",
    )
    .await
    .unwrap();

    let expected = ["insert", "update", "delete", "insert", "truncate"];
    for (s, full) in [(&mut sse_full, true), (&mut sse_keys, false)] {
        let mut ops = Vec::new();
        for _ in 0..expected.len() {
            let event = s.next_change().await;
            assert_valid(&change, &event, "an SSE change");
            assert_eq!(event.get("event"), None, "SSE data carries no `event`");
            assert_eq!(
                event.get("new").is_some() || event.get("old").is_some(),
                full && event["op"] != "truncate",
                "{event}"
            );
            ops.push(event["op"].as_str().unwrap().to_string());
            if event["table"] == "public.announcements" {
                assert_eq!(event.get("tenant"), None, "a public change: {event}");
            }
        }
        assert_eq!(ops, expected);
        s.assert_quiet(Duration::from_millis(500)).await;
        assert!(s.comments > 0, "keep-alive comments: {:?}", s.raw);
    }
    for s in [&mut nd_full, &mut nd_keys] {
        let lines = ndjson_until(s, |lines| {
            lines.iter().filter(|l| l["event"] == "change").count() == expected.len()
                && lines.iter().any(|l| l["event"] == "keepalive")
        })
        .await;
        assert_eq!(kinds(&lines)[0], "live", "{lines:?}");
        for line in &lines {
            match line["event"].as_str() {
                Some("change") => assert_valid(&change, line, "an NDJSON change"),
                _ => assert_valid(&control, line, "an NDJSON control line"),
            }
        }
    }

    // The schemas have teeth: real events, altered, are refused.
    let mut s = open(&gw, "?tables=announcements", &token, false).await;
    s.until_live().await;
    c.batch_execute("INSERT INTO announcements (body) VALUES ('again')")
        .await
        .unwrap();
    let insert = s.next_change().await;
    assert_valid(&change, &insert, "a public insert");
    let altered = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = insert.clone();
        f(v.as_object_mut().unwrap());
        v
    };
    for (what, bad) in [
        (
            "no pk",
            altered(&|m| {
                m.remove("pk");
            }),
        ),
        (
            "an unknown field",
            altered(&|m| {
                m.insert("extra".into(), json!(1));
            }),
        ),
        (
            "an unknown op",
            altered(&|m| {
                m.insert("op".into(), json!("upsert"));
            }),
        ),
        (
            "an insert with old",
            altered(&|m| {
                m.insert("old".into(), json!({"id": 1}));
            }),
        ),
        (
            "a local time",
            altered(&|m| {
                m.insert("committed_at".into(), json!("2026-01-02 03:04:05"));
            }),
        ),
        (
            "a numeric position",
            altered(&|m| {
                m.insert("position".into(), json!(42));
            }),
        ),
        (
            "a truncate with a row",
            altered(&|m| {
                m.insert("op".into(), json!("truncate"));
            }),
        ),
    ] {
        assert_invalid(&change, &bad, what);
    }
    assert_invalid(
        &live,
        &json!({"position": "1.0", "reason": "x"}),
        "live with a reason",
    );
    assert_invalid(
        &control,
        &json!({"event": "later", "position": "1.0"}),
        "an unknown event",
    );
    assert_invalid(
        &control,
        &json!({"position": "1.0"}),
        "an NDJSON line without event",
    );
    gw.stop().await;
}

#[tokio::test]
async fn real_reset_expired_and_shutdown_events_validate_against_the_control_schema() {
    let registry = registry();
    let control = validator(&registry, "control.schema.json");
    let def = |name: &str| validator(&registry, &format!("control.schema.json#/$defs/{name}"));
    let db = TestDb::new().await;
    let mut env = support::FAST_PRUNING.to_vec();
    env.push(("PGFEED_AUTH_LEEWAY", "0s"));
    let gw = gateway(&db, &env).await;
    let token = gw.token("acme");
    let c = db.client().await;

    // reset: resuming from a position the journal no longer keeps.
    let mut s = open(&gw, "", &token, false).await;
    s.until_live().await;
    // Two commits: the first's position is then behind the head.
    for id in [1, 2] {
        c.batch_execute(&format!(
            "INSERT INTO orders (id, tenant) VALUES ({id}, 'acme')"
        ))
        .await
        .unwrap();
    }
    let old = s.next_change().await["position"]
        .as_str()
        .unwrap()
        .to_string();
    s.next_change().await;
    eventually("the journal is pruned", || async {
        support::journal_len(&c).await == 0
    })
    .await;
    let mut r = gw.resume("acme", "", &old).await;
    let e = r.next().await.expect("an event");
    assert_eq!(e.event, "reset", "{e:?}");
    assert_valid(&def("reset"), &e.json(), "SSE reset");
    let mut r = open(&gw, &format!("?last_event_id={old}"), &token, true).await;
    let lines = ndjson_until(&mut r, |l| !l.is_empty()).await;
    assert_eq!(kinds(&lines)[0], "reset", "{lines:?}");
    assert_valid(&control, &lines[0], "NDJSON reset");

    // expired: a token that lives two seconds.
    let short = pgfeed::auth::mint(&gw.config.auth, "acme", None, Duration::from_secs(2)).unwrap();
    let mut sse = open(&gw, "", &short, false).await;
    let mut nd = open(&gw, "", &short, true).await;
    sse.until_live().await;
    let e = sse.next().await.expect("an event before the end");
    assert_eq!(e.event, "expired", "{e:?}");
    assert_valid(&def("expired"), &e.json(), "SSE expired");
    let lines = ndjson_until(&mut nd, |l| l.iter().any(|l| l["event"] == "expired")).await;
    for line in &lines {
        assert_valid(&control, line, "NDJSON up to expired");
    }

    // shutdown.
    let mut sse = open(&gw, "", &token, false).await;
    let mut nd = open(&gw, "", &token, true).await;
    sse.until_live().await;
    ndjson_until(&mut nd, |l| !l.is_empty()).await;
    gw.shutdown.cancel();
    let e = sse.next().await.expect("an event before the end");
    assert_eq!(e.event, "shutdown", "{e:?}");
    assert_valid(&def("shutdown"), &e.json(), "SSE shutdown");
    let lines = ndjson_until(&mut nd, |l| l.iter().any(|l| l["event"] == "shutdown")).await;
    for line in &lines {
        assert_valid(&control, line, "NDJSON up to shutdown");
    }
    tokio::time::timeout(SOON, gw.task)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
}
