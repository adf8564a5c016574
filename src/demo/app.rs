//! The demo's own little web application, on its own port: the live page, the example
//! pages and scripts (embedded in the binary), and the application API they call:
//! `/config`, `/rows`, `/summary` and `/token`.
//!
//! It plays the part of *your* application next to the gateway: it reads the demo table
//! for the page's fetch-then-subscribe and mints the tokens the page hands to the gateway,
//! with no login (it is a demo). So that a demo pointed at a real database with the real
//! secret hands out nothing of value, it mints only for the tenants the page offers, only
//! for the demo table, and only under the demo's own claim names (see [`TENANT_CLAIM`]);
//! and on a loopback address it answers only requests whose `Host` is a loopback name with
//! its port, so that a web page elsewhere cannot reach it by rebinding its own name to
//! 127.0.0.1. The stream itself always comes from the gateway, cross-origin, so the
//! browser test exercises CORS as a real deployment would. Nothing here serves `/v1`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AuthConfig;

/// The live page.
const PAGE: &str = include_str!("page.html");
/// The JavaScript client example, which the live page imports.
const CLIENT_JS: &str = include_str!("../../examples/js-client/pgfeed-client.js");
/// The `payload=keys` dashboard example.
const DASHBOARD: &str = include_str!("../../examples/dashboard-keys/index.html");

/// The demo table, as events name it.
pub const TABLE: &str = "public.demo_orders";

/// The tenants the seed rows belong to; the page offers them even when they have no rows.
pub const TENANTS: [&str; 2] = ["acme", "globex"];

/// The claim naming the tenant in the demo's tokens, which its gateway is configured to
/// read instead of `auth.tenant_claim`. The demo may sign with the real `auth.secret`; a
/// gateway that uses that secret with its own settings finds no tenant in a demo token
/// and refuses it, whatever else it checks.
pub const TENANT_CLAIM: &str = "pgfeed_demo_tenant";

/// The claim listing the tables of the demo's tokens (only [`TABLE`]), which its gateway
/// is configured to read instead of `auth.tables_claim`: the database may have other
/// watched tables, which a demo token must not see.
pub const TABLES_CLAIM: &str = "pgfeed_demo_tables";

/// What the demo application needs to answer.
pub struct App {
    /// Reads the demo table.
    pub pool: deadpool_postgres::Pool,
    /// Signs tokens (HS256, the gateway's own secret).
    pub auth: AuthConfig,
    /// Lifetime of the tokens handed out.
    pub token_ttl: Duration,
    /// The gateway's base URL for the browser, or `None` to use the page's own host name
    /// with `gateway_port` (when the gateway listens on every interface).
    pub gateway: Option<String>,
    /// The gateway's port.
    pub gateway_port: u16,
    /// The `psql` target shown on the page (a URL or `"$DATABASE_URL"`).
    pub psql: String,
    /// The page's port, which a request's `Host` must name.
    pub page_port: u16,
    /// Whether only loopback names are answered (the page listens on a loopback
    /// address); off when `--allow-remote` put it on another, whose names are not known.
    pub loopback_only: bool,
}

/// Serves the demo application until `shutdown`.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let socket = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(err) => {
                    tracing::warn!(cause = %err, "demo page: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = Arc::clone(&app);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(answer(&app, req).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(socket), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(cause = %err, "demo page: connection ended with an error");
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

async fn answer(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if app.loopback_only && !addressed_to_loopback(&req, app.page_port) {
        return error(
            StatusCode::FORBIDDEN,
            "the demo page answers only requests for localhost, 127.0.0.1 or [::1] with its port",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed here");
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let tenant = query.get("tenant").map(String::as_str);
    match req.uri().path() {
        "/" | "/index.html" => asset(PAGE, "text/html; charset=utf-8"),
        "/dashboard" => asset(DASHBOARD, "text/html; charset=utf-8"),
        "/pgfeed-client.js" => asset(CLIENT_JS, "text/javascript; charset=utf-8"),
        "/config" => config(app).await,
        "/rows" => with_tenant(tenant, |t| rows(app, t)).await,
        "/summary" => with_tenant(tenant, |t| summary(app, t)).await,
        "/token" => {
            let tables = query.get("tables").map(String::as_str);
            with_tenant(tenant, |t| token(app, t, tables)).await
        }
        _ => error(StatusCode::NOT_FOUND, "no such page"),
    }
}

async fn with_tenant<'a, F, Fut>(tenant: Option<&'a str>, f: F) -> Response<Full<Bytes>>
where
    F: FnOnce(&'a str) -> Fut,
    Fut: std::future::Future<Output = Response<Full<Bytes>>>,
{
    match tenant {
        Some(t) if !t.is_empty() && t.len() <= 200 => f(t).await,
        _ => error(
            StatusCode::BAD_REQUEST,
            "query parameter `tenant` is required (1 to 200 bytes)",
        ),
    }
}

async fn config(app: &App) -> Response<Full<Bytes>> {
    let mut tenants: Vec<String> = TENANTS.iter().map(|t| t.to_string()).collect();
    match query_text(
        app,
        "SELECT coalesce(jsonb_agg(DISTINCT tenant), '[]')::text FROM public.demo_orders",
        None,
    )
    .await
    {
        Ok(text) => {
            let found: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
            for t in found {
                if !tenants.contains(&t) {
                    tenants.push(t);
                }
            }
        }
        Err(response) => return response,
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "gateway": app.gateway,
            "gateway_port": app.gateway_port,
            "table": TABLE,
            "tenants": tenants,
            "psql": app.psql,
        })
        .to_string(),
    )
}

/// The tenant's rows, rendered by `to_jsonb` like the rows in events, so that a row read
/// here and the same row in a change look exactly alike.
async fn rows(app: &App, tenant: &str) -> Response<Full<Bytes>> {
    match query_text(
        app,
        "SELECT coalesce(jsonb_agg(to_jsonb(o) ORDER BY o.id), '[]')::text
         FROM public.demo_orders o WHERE o.tenant = $1",
        Some(tenant),
    )
    .await
    {
        Ok(text) => json(StatusCode::OK, text),
        Err(response) => response,
    }
}

/// Orders and totals by status: what the `payload=keys` dashboard refetches.
async fn summary(app: &App, tenant: &str) -> Response<Full<Bytes>> {
    match query_text(
        app,
        "SELECT coalesce(jsonb_agg(s ORDER BY s.status), '[]')::text FROM (
             SELECT status, count(*) AS orders, coalesce(sum(amount), 0) AS total
             FROM public.demo_orders WHERE tenant = $1 GROUP BY status) s",
        Some(tenant),
    )
    .await
    {
        Ok(text) => json(StatusCode::OK, text),
        Err(response) => response,
    }
}

/// Whether a request names this page by a loopback name or address and its port, in
/// `Host` and in an absolute request target if it has one. A page elsewhere whose name
/// was rebound to 127.0.0.1 reaches the socket, but the browser sends its name.
fn addressed_to_loopback<B>(req: &Request<B>, port: u16) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let target = req.uri().authority().map(|a| a.as_str());
    host.is_some_and(|h| loopback_host(h, port)) && target.is_none_or(|t| loopback_host(t, port))
}

/// Whether `host` (`name[:port]`) is `localhost` or a loopback address, with `port`.
fn loopback_host(host: &str, port: u16) -> bool {
    let (name, given) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((name, "")) => (name, None),
            Some((name, tail)) => match tail.strip_prefix(':') {
                Some(p) => (name, Some(p)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            Some((name, p)) => (name, Some(p)),
            None => (host, None),
        },
    };
    let port_matches = match given {
        Some(p) => p.parse::<u16>() == Ok(port) && p.bytes().all(|b| b.is_ascii_digit()),
        None => port == 80,
    };
    let bracketed = host.starts_with('[');
    let loopback = match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => bracketed && ip.is_loopback(),
        Ok(IpAddr::V4(ip)) => !bracketed && ip.is_loopback(),
        Err(_) => !bracketed && name.eq_ignore_ascii_case("localhost"),
    };
    port_matches && loopback
}

/// Mints a token for `tenant` limited to the demo table, if the page offers that tenant
/// and `tables` (if asked for) names nothing else.
async fn token(app: &App, tenant: &str, tables: Option<&str>) -> Response<Full<Bytes>> {
    if let Some(tables) = tables
        && tables
            .split(',')
            .any(|t| crate::names::table_key(t).map_or(true, |t| t != TABLE))
    {
        return error(
            StatusCode::FORBIDDEN,
            "the demo mints tokens for its own table, public.demo_orders, and no other",
        );
    }
    match offered(app, tenant).await {
        Ok(true) => {}
        Ok(false) => {
            return error(
                StatusCode::FORBIDDEN,
                "the demo mints tokens only for the tenants its page offers: acme, globex \
                 and those with rows in public.demo_orders",
            );
        }
        Err(response) => return response,
    }
    match crate::auth::mint(&app.auth, tenant, Some(&[TABLE.to_string()]), app.token_ttl) {
        Ok(token) => json(
            StatusCode::OK,
            serde_json::json!({ "token": token, "expires_in": app.token_ttl.as_secs() })
                .to_string(),
        ),
        Err(err) => {
            tracing::warn!(cause = %err, "demo page: minting a token failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "cannot mint a token")
        }
    }
}

/// Whether the page offers `tenant`: a seed tenant, or one with rows in the demo table
/// (what [`config`] lists).
async fn offered(app: &App, tenant: &str) -> Result<bool, Response<Full<Bytes>>> {
    if TENANTS.contains(&tenant) {
        return Ok(true);
    }
    if tenant.contains('\0') {
        // Not a value a text column can hold.
        return Ok(false);
    }
    let found = query_text(
        app,
        "SELECT EXISTS (SELECT FROM public.demo_orders WHERE tenant = $1)::text",
        Some(tenant),
    )
    .await?;
    Ok(found == "true")
}

async fn query_text(
    app: &App,
    sql: &str,
    tenant: Option<&str>,
) -> Result<String, Response<Full<Bytes>>> {
    let unavailable = |cause: &dyn std::fmt::Display| {
        tracing::warn!(cause = %cause, "demo page: reading the demo table failed");
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is not reachable",
        )
    };
    let client = app.pool.get().await.map_err(|e| unavailable(&e))?;
    let row = match tenant {
        Some(t) => client.query_one(sql, &[&t]).await,
        None => client.query_one(sql, &[]).await,
    }
    .map_err(|e| unavailable(&e))?;
    row.try_get(0).map_err(|e| unavailable(&e))
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_");
    json(
        status,
        serde_json::json!({ "error": { "code": code, "message": message } }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_with_the_port_are_answered() {
        for host in [
            "localhost:8081",
            "LOCALHOST:8081",
            "127.0.0.1:8081",
            "127.0.0.2:8081",
            "[::1]:8081",
        ] {
            assert!(loopback_host(host, 8081), "{host}");
        }
        assert!(loopback_host("localhost", 80));
        for host in [
            "evil.example:8081",
            "localhost.evil.example:8081",
            "127.0.0.1.nip.io:8081",
            "localhost:8082",
            "localhost",
            "localhost:",
            "localhost:+8081",
            "localhost:8081:8081",
            "[::1]",
            "[::1]8081",
            "::1:8081",
            "[127.0.0.1]:8081",
            "[localhost]:8081",
            "10.0.0.1:8081",
            "[::ffff:10.0.0.1]:8081",
            "",
        ] {
            assert!(!loopback_host(host, 8081), "{host}");
        }
    }

    #[test]
    fn an_absolute_target_must_name_loopback_too() {
        let req = |target: &str, host: Option<&str>| {
            let mut b = Request::get(target);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            b.body(()).unwrap()
        };
        assert!(addressed_to_loopback(
            &req("/token", Some("localhost:8081")),
            8081
        ));
        assert!(!addressed_to_loopback(&req("/token", None), 8081));
        assert!(!addressed_to_loopback(
            &req("http://evil.example:8081/token", Some("localhost:8081")),
            8081
        ));
    }
}
