//! pgfeed's test kit, shared by the product's tests and the benchmark: a throwaway
//! PostgreSQL cluster per test binary, a fresh database per test, the gateway in-process on
//! port 0 or as a child process, and a small HTTP/SSE client over a raw socket (so tests
//! control exactly when they read).
//!
//! The cluster is [`pgfeed::cluster`]'s throwaway cluster (the local `initdb`/`pg_ctl`, as
//! the `postgres` user when run as root) unless `PGFEED_TEST_DATABASE_URL` points at an
//! existing server. Its watchdog stops and removes it when the test binary exits. If
//! neither works the tests fail with a message saying what to install: they never skip.

pub mod demo_process;
mod http_client;
mod sse;
pub mod wire;

pub use http_client::{Response, assert_error, exchange, get, get_soon, request};
pub use sse::{Event, SseClient};
use wire::find;
pub use wire::parse_head;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgfeed::cluster::{Cluster, Search};
use pgfeed::config::{Config, Sources};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The HS256 secret every test gateway uses.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Generous bound for anything that should happen "soon": catches hangs, not slowness.
pub const SOON: Duration = Duration::from_secs(20);

/// The `pgfeed` binary of this build: `target/<profile>/pgfeed`, beside the directory
/// holding the running test executable (`target/<profile>/deps/`). `PGFEED_BIN` overrides.
/// `cargo test` builds it for the product's own tests; a member tested alone needs
/// `cargo build --bin pgfeed` first, and this says so rather than running something stale.
pub fn pgfeed_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("PGFEED_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("pgfeed{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --bin pgfeed` (or the whole `cargo test`) first",
        bin.display()
    );
    bin
}

/// Where the test server is.
pub struct Server {
    /// URL of the `postgres` maintenance database, with `{db}` standing for the name.
    url_template: String,
    /// The cluster we started, if any (absent with `PGFEED_TEST_DATABASE_URL`).
    pub cluster: Option<Cluster>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The server for this test binary, started on first use: the library's throwaway
/// cluster (stopped and removed by its watchdog when the test binary exits).
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("PGFEED_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server {
            url_template: replace_dbname(&url),
            cluster: None,
        },
        _ => {
            let cluster = Cluster::start_with(
                &Search::local(),
                "max_connections = 300\nshared_buffers = 64MB",
            )
            .unwrap_or_else(|e| panic!("cannot start the test cluster: {e}"));
            Server {
                url_template: format!("postgres://postgres@127.0.0.1:{}/{{db}}", cluster.port()),
                cluster: Some(cluster),
            }
        }
    })
}

fn replace_dbname(url: &str) -> String {
    // postgres://user@host:port/dbname?params -> .../{db}?params
    let (base, params) = url
        .split_once('?')
        .map_or((url, None), |(b, p)| (b, Some(p)));
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match params {
        Some(p) => format!("{prefix}/{{db}}?{p}"),
        None => format!("{prefix}/{{db}}"),
    }
}

impl Server {
    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        self.url_template.replace("{db}", db)
    }
}

/// Connects to `url`, driving the connection in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test, with the pgfeed schema installed. Dropped (with
/// its connections) when the value is dropped.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates the database and installs the schema.
    pub async fn new() -> TestDb {
        TestDb::empty().await.with_schema().await
    }

    /// Creates the database without the schema.
    pub async fn empty() -> TestDb {
        TestDb::create("").await
    }

    /// Creates a `SQL_ASCII` database (which stores any byte, UTF-8 or not, in `text`)
    /// and installs the schema.
    pub async fn sql_ascii() -> TestDb {
        TestDb::create(" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .await
            .with_schema()
            .await
    }

    /// Creates a database of a new name with `CREATE DATABASE {name}{options}`.
    async fn create(options: &str) -> TestDb {
        let server = server();
        let name = format!(
            "pgfeed_test_{}_{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&server.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}{options}"))
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        TestDb {
            url: server.url(&name),
            name,
        }
    }

    /// Installs the schema in this database.
    async fn with_schema(self) -> TestDb {
        let mut client = connect(&self.url).await;
        pgfeed::schema::install(&mut client)
            .await
            .expect("installing the schema");
        self
    }

    /// A new connection to this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = server().url("postgres");
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

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

/// A local address whose port nobody listens on right now, for a child `pgfeed serve`.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

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

/// Waits until the gateway at `addr` (in-process or a `pgfeed serve` child) answers
/// `/readyz` with 200, for at most [`SOON`].
pub async fn wait_until_ready(addr: SocketAddr) {
    let deadline = Instant::now() + SOON;
    while !get(addr, "/readyz", &[])
        .await
        .is_ok_and(|r| r.status == 200)
    {
        assert!(
            Instant::now() < deadline,
            "gateway at {addr} not ready within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        let config = Config::load(&sources).expect("test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pgfeed::serve(config.clone(), listener, shutdown.clone()));
        let gw = Gateway {
            addr,
            shutdown,
            task,
            config,
        };
        gw.wait_ready().await;
        gw
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

/// The server's message for a failed statement (the driver's text says only "db error").
pub fn server_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// `batch_execute` for statements that must succeed.
#[allow(async_fn_in_trait)] // only awaited in place by tests, never spawned
pub trait Run {
    /// Runs `sql`; it must succeed (else the test fails with the server's message).
    async fn run(&self, sql: &str);
}

impl Run for tokio_postgres::Client {
    async fn run(&self, sql: &str) {
        self.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("`{sql}`: {}", server_message(&e)));
    }
}

impl Run for tokio_postgres::Transaction<'_> {
    async fn run(&self, sql: &str) {
        self.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("`{sql}`: {}", server_message(&e)));
    }
}

/// The `bigint` in the first column of the one row `sql` returns.
pub async fn query_i64(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    c.query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Terminates the gateway's LISTEN connection(s) on `db`; returns how many were ended.
pub async fn terminate_listener(db: &TestDb) -> i64 {
    let admin = connect(&server().url("postgres")).await;
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&db.name, &pgfeed::listener::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `check` returns true, polling every 20 ms, for at most [`SOON`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SOON;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway at `addr` answers `/readyz` with `status` (200 ready, 503 not).
pub async fn until_readyz(addr: SocketAddr, status: u16) {
    let what = format!("/readyz answers {status}");
    eventually(&what, || async {
        get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == status)
    })
    .await;
}

/// A TCP proxy in front of PostgreSQL that can freeze its connections: bytes stop flowing
/// but the sockets stay open, as in a network partition that sends no reset.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Connections accepted before this generation are frozen.
    frozen_before: tokio::sync::watch::Sender<u64>,
    /// Generation of the next accepted connection.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While true, accepted connections wait before connecting to the server.
    held: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// A proxy to the server behind `url`.
    pub async fn start(url: &str) -> Proxy {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            _ => panic!("the proxy needs a TCP host"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen_before, _) = tokio::sync::watch::channel(0u64);
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let (held, _) = tokio::sync::watch::channel(false);
        let (tx, gen_counter, mut hold) =
            (frozen_before.clone(), generation.clone(), held.subscribe());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let my_gen = gen_counter.fetch_add(1, Ordering::SeqCst);
                if hold.wait_for(|held| !held).await.is_err() {
                    return;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, tx.subscribe(), my_gen));
                tokio::spawn(pipe(sr, cw, tx.subscribe(), my_gen));
            }
        });
        Proxy {
            addr,
            frozen_before,
            generation,
            held,
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let user = config.get_user().unwrap_or("postgres");
        let db = config.get_dbname().unwrap_or("postgres");
        format!("postgres://{user}@{}/{db}", self.addr)
    }

    /// Holds new connections (they wait, unanswered) until [`Proxy::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets held and new connections through.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Freezes every connection open now; later ones flow normally.
    pub fn freeze_existing(&self) {
        let current = self.generation.load(Ordering::SeqCst);
        self.frozen_before.send_replace(current);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen_before: tokio::sync::watch::Receiver<u64>,
    generation: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *frozen_before.borrow() > generation {
            // Hold both sockets open and move nothing, forever.
            std::future::pending::<()>().await;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *frozen_before.borrow() > generation {
                        continue;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = frozen_before.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
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

/// Waits until `check` returns true, polling every 20 ms, for at most `wait`: for what must
/// happen well before a periodic fallback would make it happen anyway.
pub async fn eventually_within<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {wait:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates login role `{db}_{what}` (roles are cluster-wide, so named after the test's
/// database), password `pw`, with no privileges beyond PUBLIC's; returns its name.
pub async fn create_login_role(db: &TestDb, what: &str) -> String {
    create_login_role_with(db, what, "INHERIT").await
}

/// [`create_login_role`] with `inherit` (`INHERIT` or `NOINHERIT`) spelled out.
pub async fn create_login_role_with(db: &TestDb, what: &str, inherit: &str) -> String {
    let role = format!("{}_{what}", db.name);
    connect(&server().url("postgres"))
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOCREATEDB NOCREATEROLE {inherit}"
        ))
        .await
        .unwrap_or_else(|e| panic!("creating role {role}: {e}"));
    role
}

/// Connects to the test database as `role` (password `pw`).
pub async fn connect_as_role(db: &TestDb, role: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    config.user(role).password("pw");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting as {role}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// An application role as issue 15 pictures it: not a superuser, owner of the test
/// database and of its `public` schema (as on PostgreSQL 15 through the database owner). Returns its name and a
/// connection as it.
pub async fn app_owner(db: &TestDb, what: &str) -> (String, tokio_postgres::Client) {
    let role = create_login_role(db, what).await;
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} OWNER TO {role}; ALTER SCHEMA public OWNER TO {role}",
            db.name
        ))
        .await
        .unwrap_or_else(|e| panic!("handing the database to {role}: {e}"));
    let client = connect_as_role(db, &role).await;
    (role, client)
}

/// The `pgfeed` binary with `args` on `db`, with a clean environment (no `PGFEED_*` of
/// the caller's but the test secret), killed when dropped.
pub fn pgfeed_command(db: &TestDb, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(crate::pgfeed_bin());
    cmd.args(args).env_remove("DATABASE_URL").kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET);
    cmd
}

/// Runs [`pgfeed_command`] to its end; killed and the test failed after [`SOON`].
pub async fn pgfeed_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    let mut cmd = pgfeed_command(db, args);
    tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`pgfeed {}` did not finish within {SOON:?}", args.join(" ")))
        .expect("running pgfeed")
}

/// `pgfeed status --json` on `db`, parsed.
pub async fn status_json(db: &TestDb) -> serde_json::Value {
    let out = pgfeed_cli(db, &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "pgfeed status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The entry of `table` (qualified) in `pgfeed status --json`, if it is listed.
pub async fn status_entry(db: &TestDb, table: &str) -> Option<serde_json::Value> {
    status_json(db).await["watched"]
        .as_array()
        .expect("status lists watched tables")
        .iter()
        .find(|w| w["table"] == table)
        .cloned()
}

/// The tables `pgfeed status --json` lists (its `watched` entries' `table`), in its order.
pub fn status_tables(status: &serde_json::Value) -> Vec<&str> {
    status["watched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["table"].as_str().unwrap())
        .collect()
}

/// A `pgfeed serve` child process on a free port ([`pgfeed_command`]), for tests that stop
/// and resume the whole gateway with signals. Its log goes to a file; killed when dropped.
pub struct ChildGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The process.
    pub child: tokio::process::Child,
    /// Its standard error (the log).
    pub log: std::path::PathBuf,
}

impl ChildGateway {
    /// Starts `pgfeed serve` on `db` with the environment variables `env` added, and waits
    /// until `/readyz` answers 200.
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> ChildGateway {
        let addr = free_addr();
        let log = std::env::temp_dir().join(format!("{}-{}.log", db.name, addr.port()));
        let file = std::fs::File::create(&log).expect("creating the gateway's log file");
        let mut cmd = pgfeed_command(db, &["serve", "--listen", &addr.to_string()]);
        cmd.envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(file);
        let mut child = cmd.spawn().expect("starting pgfeed serve");
        let deadline = Instant::now() + SOON;
        while !get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == 200)
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "pgfeed serve exited ({status}) before it was ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pgfeed serve not ready within {SOON:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ChildGateway { addr, child, log }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// Sends it `signal` (a name as `kill` takes it: `STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {}: {status}", self.pid());
    }

    /// Opens `tenant`'s whole stream and reads it up to `live`.
    pub async fn live(&self, tenant: &str) -> SseClient {
        let auth = format!("Bearer {}", hs256_token(tenant));
        assert_streams(self.addr, "/v1/stream", &[("Authorization", &auth)]).await
    }

    /// The value of the sample `name` on its `/metrics` page.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        sample(&get_soon(self.addr, "/metrics", &[]).await.body, name)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Notices (`SEVERITY: message`) received on a connection.
pub type Notices = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Connects with `config`, collecting the server's notices and warnings.
pub async fn connect_collecting_notices(
    config: &tokio_postgres::Config,
) -> (tokio_postgres::Client, Notices) {
    let (client, mut connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting as {:?}: {e}", config.get_user()));
    let notices = Notices::default();
    let sink = std::sync::Arc::clone(&notices);
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                    sink.lock()
                        .unwrap()
                        .push(format!("{}: {}", n.severity(), n.message()))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, notices)
}

/// [`pgfeed_command`] run through `sh -c '{shell}; exec pgfeed ARGS'`, for what only the
/// shell can set before the gateway starts, such as `ulimit -n 128`.
pub fn pgfeed_shell_command(db: &TestDb, shell: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{shell}; exec \"$0\" \"$@\""))
        .arg(crate::pgfeed_bin())
        .args(args)
        .env_remove("DATABASE_URL")
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET);
    cmd
}

impl ChildGateway {
    /// Starts `cmd`, a `pgfeed serve` listening on `addr`, with its stderr to a log file
    /// (or to `stderr` when given, e.g. a pipe the test closes), and waits until `/readyz`
    /// answers 200.
    pub async fn start_command(
        mut cmd: tokio::process::Command,
        addr: SocketAddr,
        stderr: Option<std::process::Stdio>,
    ) -> ChildGateway {
        let log = std::env::temp_dir().join(format!(
            "pgfeed-child-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let stderr = match stderr {
            Some(stderr) => stderr,
            None => std::fs::File::create(&log)
                .expect("creating the gateway's log file")
                .into(),
        };
        cmd.stdout(std::process::Stdio::null()).stderr(stderr);
        let mut child = cmd.spawn().expect("starting pgfeed serve");
        let deadline = Instant::now() + SOON;
        while !get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == 200)
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "pgfeed serve exited ({status}) before it was ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pgfeed serve not ready within {SOON:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ChildGateway { addr, child, log }
    }

    /// Waits (at most [`SOON`]) for the process to exit and returns its status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(SOON, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "pgfeed serve still running after {SOON:?}: {}",
                    self.log_text()
                )
            })
            .expect("waiting for pgfeed serve")
    }
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
/// A TCP proxy in front of PostgreSQL that freezes each connection whose client sends
/// `needle` (a piece of a statement's text, sent when it is prepared), once armed: from
/// then on that connection moves no byte either way, as if its query ran for ever.
/// Connections that never send it flow normally.
pub struct FreezingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Whether sending `needle` freezes a connection.
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections frozen so far.
    frozen: std::sync::Arc<AtomicUsize>,
}

impl FreezingProxy {
    /// A proxy to the server behind `url`, not armed yet.
    pub async fn start(url: &str, needle: &'static [u8]) -> FreezingProxy {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            _ => panic!("the proxy needs a TCP host"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen = std::sync::Arc::new(AtomicUsize::new(0));
        let (armed_, frozen_) = (armed.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (stop, _) = tokio::sync::watch::channel(false);
                let (armed, frozen, stop_tx) = (armed_.clone(), frozen_.clone(), stop.clone());
                let mut stopped = stop.subscribe();
                // Client to server, watching for the needle (also across reads).
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buf[..n]);
                        if armed.load(Ordering::SeqCst) && find(&tail, needle).is_some() {
                            frozen.fetch_add(1, Ordering::SeqCst);
                            stop_tx.send_replace(true);
                            // Hold both halves open and move nothing, for ever.
                            let _keep = (cr, sw);
                            return std::future::pending::<()>().await;
                        }
                        let keep = tail.len().saturating_sub(needle.len());
                        tail.drain(..keep);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                // Server to client, until the connection is frozen.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            read = sr.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if *stopped.borrow() {
                                        break;
                                    }
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                            _ = stopped.changed() => break,
                        }
                    }
                    let _keep = (sr, cw);
                    std::future::pending::<()>().await;
                });
            }
        });
        FreezingProxy {
            addr,
            armed,
            frozen,
        }
    }

    /// From now on, a connection that sends the needle is frozen.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections were frozen.
    pub fn frozen(&self) -> usize {
        self.frozen.load(Ordering::SeqCst)
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let user = config.get_user().unwrap_or("postgres");
        let db = config.get_dbname().unwrap_or("postgres");
        format!("postgres://{user}@{}/{db}", self.addr)
    }
}

/// Resident memory of process `pid`, in KiB (0 when it cannot be read).
pub fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
