//! The gateway in-process ([`Gateway`], on port 0) and what tests do with a running
//! gateway of either kind: settings, tokens, a watched tenant table, streams that must
//! start, the `/metrics` page.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgfeed::config::{Config, Sources};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{SECRET, SOON, SseClient, TestDb, get, get_soon};

/// Settings for a test gateway on `db`; tests add entries before starting it.
pub fn sources(db: &TestDb) -> Sources {
    Sources {
        file: None,
        env: vec![
            ("DATABASE_URL".into(), db.url.clone()),
            ("PGFEED_AUTH_SECRET".into(), SECRET.into()),
            ("PGFEED_SERVER_LISTEN".into(), "127.0.0.1:0".into()),
        ],
        flags: Vec::new(),
    }
}

/// [`sources`] with the environment variables `env` added after the defaults.
pub fn sources_with(db: &TestDb, env: &[(&str, &str)]) -> Sources {
    let mut sources = sources(db);
    sources
        .env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    sources
}

/// Settings that prune commits older than a second, every 100 ms.
pub const FAST_PRUNING: &[(&str, &str)] = &[
    ("PGFEED_JOURNAL_RETENTION", "1s"),
    ("PGFEED_JOURNAL_PRUNE_INTERVAL", "100ms"),
];

/// A token for `tenant` signed with [`SECRET`], valid ten minutes.
pub fn hs256_token(tenant: &str) -> String {
    pgfeed::auth::mint(
        &pgfeed::config::AuthConfig::hs256(SECRET),
        tenant,
        None,
        Duration::from_secs(600),
    )
    .unwrap()
}

/// A gateway running in-process.
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancelling it shuts the gateway down.
    pub shutdown: CancellationToken,
    /// The `serve` task.
    pub task: tokio::task::JoinHandle<Result<(), pgfeed::ServeError>>,
    /// Its settings.
    pub config: Config,
}

impl Gateway {
    /// Starts a gateway with default test settings and waits until it is ready.
    pub async fn start(db: &TestDb) -> Gateway {
        Gateway::start_with(sources(db)).await
    }

    /// Starts a gateway with `sources` and waits until it is ready.
    pub async fn start_with(sources: Sources) -> Gateway {
        let gw = Gateway::spawn(sources).await;
        gw.wait_ready().await;
        gw
    }

    /// Starts a gateway with `sources`, listening, without waiting for it to be ready
    /// (for a gateway this client cannot ask: TLS on the listener).
    pub async fn spawn(sources: Sources) -> Gateway {
        let config = Config::load(&sources).expect("test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pgfeed::serve(config.clone(), listener, shutdown.clone()));
        Gateway {
            addr,
            shutdown,
            task,
            config,
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + SOON;
        loop {
            if let Ok(r) = get(self.addr, "/readyz", &[]).await
                && r.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready within {SOON:?}"
            );
            assert!(
                !self.task.is_finished(),
                "gateway task ended before becoming ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A token for `tenant` from this gateway's secret.
    pub fn token(&self, tenant: &str) -> String {
        pgfeed::auth::mint(&self.config.auth, tenant, None, Duration::from_secs(3600)).unwrap()
    }

    /// Opens `/v1/stream?{query}` as `tenant` and waits for the response head.
    pub async fn stream(&self, tenant: &str, query: &str) -> SseClient {
        let token = self.token(tenant);
        SseClient::open(
            self.addr,
            &format!("/v1/stream?{query}"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await
    }

    /// Opens the whole stream of `tenant` and reads it up to `live`, which must come with
    /// status 200 and no changes before it.
    pub async fn live(&self, tenant: &str) -> SseClient {
        let mut s = self.stream(tenant, "").await;
        assert_eq!(s.status, 200, "{}", s.raw);
        assert!(s.until_live().await.is_empty());
        s
    }

    /// Opens the stream of `tenant` with `Last-Event-ID: last_event_id` and `query`.
    pub async fn resume(&self, tenant: &str, query: &str, last_event_id: &str) -> SseClient {
        let auth = format!("Bearer {}", self.token(tenant));
        SseClient::open(
            self.addr,
            &format!("/v1/stream?{query}"),
            &[("Authorization", &auth), ("Last-Event-ID", last_event_id)],
        )
        .await
    }

    /// Shuts down and waits for `serve` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(SOON, self.task)
            .await
            .expect("gateway stops in time")
            .expect("serve task")
            .expect("serve returns Ok");
    }
}

/// The value of the metrics sample named `name` (with its labels, exactly as rendered).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_once(' ').is_some_and(|(n, _)| n == name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The gateway's `/metrics` page.
pub async fn scrape(gw: &Gateway) -> String {
    let r = get(gw.addr, "/metrics", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type").unwrap().contains("openmetrics"),
        "{:?}",
        r.headers
    );
    r.body
}

/// Creates a tenant table `name(id serial pk, tenant text, body text, secret text)` and
/// watches it with tenant column `tenant`.
pub async fn tenant_table(db: &TestDb, name: &str) {
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE {name} (id serial PRIMARY KEY, tenant text NOT NULL, body text, secret text);
         SELECT pgfeed.watch('{name}', 'tenant');"
    ))
    .await
    .unwrap();
}

/// Inserts a row of `tenant` into a [`tenant_table`] named `notes`.
pub async fn insert_note(db: &TestDb, tenant: &str, body: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO notes (tenant, body) VALUES ($1, $2)",
            &[&tenant, &body],
        )
        .await
        .unwrap();
}

/// Creates and watches [`tenant_table`] `table` on `db`, starts a gateway with [`sources`]
/// plus `env`, and opens `acme`'s stream, read up to `live`.
pub async fn start_with_acme_stream(
    db: &TestDb,
    table: &str,
    env: &[(&str, &str)],
) -> (Gateway, SseClient) {
    tenant_table(db, table).await;
    let gw = Gateway::start_with(sources_with(db, env)).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    (gw, s)
}

/// Opens a stream and checks that it started: 200, SSE, and `live` first.
pub async fn assert_streams(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
    let mut s = SseClient::open(addr, path, headers).await;
    assert_eq!(s.status, 200, "{path}: {}", s.raw);
    assert_eq!(
        s.headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str()),
        Some("text/event-stream")
    );
    assert!(s.until_live().await.is_empty());
    s
}

/// A connection that sent `head` and then reads nothing, with a receive buffer of a few
/// KiB: the client that stopped reading.
pub async fn stalled_reader(addr: SocketAddr, head: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// The `pgfeed_subscribers` gauge of the gateway at `addr`.
pub async fn subscribers(addr: SocketAddr) -> Option<f64> {
    sample(
        &get_soon(addr, "/metrics", &[]).await.body,
        "pgfeed_subscribers",
    )
}

/// The position of a received change (its data's `position`), parsed.
#[track_caller]
pub fn position(change: &serde_json::Value) -> pgfeed::change::Position {
    let text = change["position"]
        .as_str()
        .unwrap_or_else(|| panic!("no position: {change}"));
    text.parse()
        .unwrap_or_else(|e| panic!("position {text:?} does not parse: {e}"))
}

/// `op table v` of a change whose rows have a text column `v` (`-` where it has no row,
/// as a truncate): short enough to compare whole.
pub fn op_table_v(e: &serde_json::Value) -> String {
    let row = if e["new"].is_object() {
        &e["new"]
    } else {
        &e["old"]
    };
    format!(
        "{} {} {}",
        e["op"].as_str().unwrap(),
        e["table"].as_str().unwrap(),
        row["v"].as_str().unwrap_or("-")
    )
}
