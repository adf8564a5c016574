//! The test server and its databases: the throwaway cluster (or `PGFEED_TEST_DATABASE_URL`),
//! a fresh database per test ([`TestDb`]) with the pgfeed schema, connections to it, and
//! small helpers for statements that must succeed.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use pgfeed::cluster::{Cluster, Search};

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

/// A `REPEATABLE READ` transaction on `client`: its snapshot is taken at its first
/// statement.
pub async fn repeatable_read(
    client: &mut tokio_postgres::Client,
) -> tokio_postgres::Transaction<'_> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting a REPEATABLE READ transaction: {e}"))
}

/// How many changes the journal (`pgfeed.changes`) of the database behind `c` holds.
pub async fn journal_len(c: &tokio_postgres::Client) -> i64 {
    query_i64(c, "SELECT count(*) FROM pgfeed.changes", &[]).await
}

/// Terminates the gateway's LISTEN connection(s) on `db`; returns how many were ended.
pub async fn terminate_listener(db: &TestDb) -> i64 {
    let admin = connect(&server().url("postgres")).await;
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&db.name, &pgfeed::db::LISTENER_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
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
