//! TLS to PostgreSQL (issue 19): `database.url`'s libpq `sslmode` and `sslrootcert` against
//! a cluster of this test's own that only accepts encrypted connections (`hostssl` lines
//! only, as managed services with `force_ssl` do), with a CA and a server certificate
//! (for `localhost` only) that the test makes. The gateway streams end to end under
//! `verify-full`, the CLI installs under it, `require` encrypts without verifying, a wrong
//! CA is refused, and a host name the certificate does not name is refused under
//! `verify-full` but accepted under `verify-ca`. `pgfeed demo` runs against it too.

use pgfeed_testkit as support;
use pgfeed_testkit::demo_process;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;

use pgfeed::cluster::{Cluster, Search};
use pgfeed::config::Sources;
use pgfeed::db::{DbConfig, DbError};
use support::{Gateway, SECRET, SOON};
use tokio::sync::OnceCell;

/// The cluster and the files the test made.
struct Setup {
    /// The cluster (`ssl = on`, `hostssl` only); its watchdog removes it, certificates
    /// included, when the test binary exits.
    cluster: Cluster,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server presents.
    other_ca: PathBuf,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();
static DB_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn setup() -> &'static Setup {
    SETUP.get_or_init(make_setup).await
}

async fn make_setup() -> Setup {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(&Search::local())
            .unwrap_or_else(|e| panic!("cannot start a cluster of this test's own: {e}"))
    })
    .await
    .unwrap();
    // The certificates live in the cluster's directory, so they go with it.
    let dir = cluster.dir().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let support::CertPair {
        ca: ca_pem,
        cert: server_pem,
        key: server_key,
    } = support::cert_pair("pgfeed test CA", &["localhost"]);
    let other_ca_pem = support::cert_pair("some other CA", &["localhost"]).ca;
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    };
    let ca = write("ca.pem", &ca_pem, 0o644);
    let other_ca = write("other-ca.pem", &other_ca_pem, 0o644);
    let cert = write("server.pem", &server_pem, 0o644);
    // PostgreSQL refuses a key file others can read.
    let key = write("server.key", &server_key, 0o600);
    if is_root() {
        // The cluster runs as `postgres`, which must own the key.
        let chowned = std::process::Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(chowned, "cannot hand {} to postgres", dir.display());
    }
    // Still plain here: switch TLS on and accept nothing but TLS over TCP from now on
    // (the local socket stays, for pg_ctl).
    let admin = pgfeed::db::connect(&DbConfig::parse(&cluster.url()).unwrap())
        .await
        .expect("the new cluster accepts plain connections before TLS is set up");
    // One statement at a time: ALTER SYSTEM refuses a multi-statement batch.
    for (name, value) in [
        ("ssl_cert_file", cert.display().to_string()),
        ("ssl_key_file", key.display().to_string()),
        ("ssl", "on".to_string()),
    ] {
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .await
            .unwrap();
    }
    let hba = cluster.dir().join("data").join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl all all ::1/128 trust\n",
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    drop(admin);
    let setup = Setup {
        cluster,
        ca,
        other_ca,
    };
    // The reload is asynchronous: wait until new connections get its settings.
    let log = setup.cluster.dir().join("data").join("server.log");
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let tls = try_connect(&setup.url("127.0.0.1", "postgres", "sslmode=require")).await;
        let plain = try_connect(&setup.url("127.0.0.1", "postgres", "sslmode=disable")).await;
        if tls.is_ok() && plain.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster did not switch to TLS only; server log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    setup
}

impl Setup {
    /// A URL of database `db` on `host` with `params` (a query string).
    fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{db}?{params}",
            self.cluster.port()
        )
    }

    /// `sslmode=MODE&sslrootcert=THE CA`.
    fn verified(&self, mode: &str) -> String {
        format!("sslmode={mode}&sslrootcert={}", self.ca.display())
    }

    /// A new database, created over a `verify-full` connection.
    async fn database(&self) -> String {
        let name = format!(
            "tls_{}",
            DB_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let admin =
            connect(&self.url("localhost", "postgres", &self.verified("verify-full"))).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    let config = DbConfig::parse(url)?;
    tokio::time::timeout(SOON, pgfeed::db::connect(&config))
        .await
        .unwrap_or_else(|_| panic!("connecting did not finish within {SOON:?}"))
}

async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting with {url}: {}", chain(&e)))
}

/// An error with its causes, as the CLI prints them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

async fn refused(url: &str) -> String {
    match try_connect(url).await {
        Ok(_) => panic!("{url} was accepted"),
        Err(err) => chain(&err),
    }
}

/// Whether the session of `client` is encrypted, according to the server.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `pgfeed ARGS` with `DATABASE_URL=url` and a clean environment.
async fn pgfeed(url: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgfeed"));
    cmd.args(args).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") || k.starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DATABASE_URL", url)
        .env("PGFEED_AUTH_SECRET", SECRET);
    tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`pgfeed {}` did not finish within {SOON:?}", args.join(" ")))
        .expect("running pgfeed")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_streams_from_a_tls_only_server_under_verify_full() {
    let setup = setup().await;
    let db = setup.database().await;
    // The server takes nothing but TLS.
    let plain = refused(&setup.url("127.0.0.1", &db, "sslmode=disable")).await;
    assert!(plain.contains("no encryption"), "{plain}");

    let url = setup.url("localhost", &db, &setup.verified("verify-full"));
    let install = pgfeed(&url, &["install"]).await;
    assert!(install.status.success(), "{}", stderr(&install));
    let app = connect(&url).await;
    assert!(encrypted(&app).await);
    app.batch_execute(
        "CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, body text)",
    )
    .await
    .unwrap();
    let watch = pgfeed(&url, &["watch", "orders", "--tenant-column", "tenant"]).await;
    assert!(watch.status.success(), "{}", stderr(&watch));

    let gw = Gateway::start_with(Sources {
        file: None,
        env: vec![
            ("DATABASE_URL".into(), url.clone()),
            ("PGFEED_AUTH_SECRET".into(), SECRET.into()),
            ("PGFEED_SERVER_LISTEN".into(), "127.0.0.1:0".into()),
        ],
        flags: Vec::new(),
    })
    .await;
    let mut stream = gw.live("acme").await;
    app.execute(
        "INSERT INTO orders (tenant, body) VALUES ('acme', 'over tls')",
        &[],
    )
    .await
    .unwrap();
    let change = stream.next_change().await;
    assert_eq!(change["new"]["body"], "over tls", "{change}");

    // Every connection of the gateway, the pool's and the LISTEN one, is encrypted.
    let sessions: Vec<(String, bool)> = app
        .query(
            "SELECT a.application_name, s.ssl
               FROM pg_catalog.pg_stat_activity a
               JOIN pg_catalog.pg_stat_ssl s USING (pid)
              WHERE a.datname = current_database() AND a.application_name LIKE 'pgfeed%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        sessions.iter().any(|(name, _)| name == "pgfeed-listener"),
        "{sessions:?}"
    );
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    gw.stop().await;

    let status = pgfeed(&url, &["status"]).await;
    assert!(status.status.success(), "{}", stderr(&status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_startup_options_are_kept_over_tls() {
    let setup = setup().await;
    let url = setup.url("localhost", "postgres", &setup.verified("verify-full"));
    let config = pgfeed::db::parse_url(&pgfeed::config::Secret::new(url)).unwrap();
    let client = pgfeed::db::connect(&config).await.unwrap();
    assert!(encrypted(&client).await);
    let row = client
        .query_one(
            "SELECT current_setting('search_path'), current_setting('jit')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pg_catalog,pg_temp");
    assert_eq!(row.get::<_, String>(1), "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_and_prefer_encrypt_without_verifying() {
    let setup = setup().await;
    // No CA given, and the certificate does not name 127.0.0.1: still encrypted.
    for params in ["sslmode=require", "sslmode=prefer", ""] {
        let client = connect(&setup.url("127.0.0.1", "postgres", params)).await;
        assert!(encrypted(&client).await, "{params}");
    }
    // libpq: `require` with a CA verifies the chain, as `verify-ca` does.
    let err = refused(&setup.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=require&sslrootcert={}", setup.other_ca.display()),
    ))
    .await;
    assert!(err.contains("not signed by a CA in sslrootcert"), "{err}");
    let client = connect(&setup.url("127.0.0.1", "postgres", &setup.verified("require"))).await;
    assert!(encrypted(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_with_a_clear_error() {
    let setup = setup().await;
    let db = setup.database().await;
    for mode in ["verify-ca", "verify-full"] {
        let url = setup.url(
            "localhost",
            &db,
            &format!("sslmode={mode}&sslrootcert={}", setup.other_ca.display()),
        );
        let err = refused(&url).await;
        assert!(
            err.contains("TLS")
                && err.contains(&format!(
                    "the server's certificate is not signed by a CA in sslrootcert (`{}`)",
                    setup.other_ca.display()
                )),
            "{mode}: {err}"
        );
        let out = pgfeed(&url, &["install"]).await;
        assert!(!out.status.success(), "{mode}: install succeeded");
        let text = stderr(&out);
        assert!(
            text.starts_with("error: cannot connect to PostgreSQL at localhost:")
                && text.contains("not signed by a CA in sslrootcert")
                && !text.contains("panicked"),
            "{mode}: {text}"
        );
    }
    // Verification with no CA named uses the system's roots, which do not hold the
    // test's CA.
    match try_connect(&setup.url("localhost", &db, "sslmode=verify-full")).await {
        Ok(_) => panic!("the system's roots trusted the test's CA"),
        Err(DbError::Tls(err)) => {
            // A machine without any: said so, at once.
            assert!(
                err.to_string().contains("no trusted root certificates"),
                "{err}"
            );
        }
        Err(err) => assert!(
            chain(&err).contains("not signed by a CA this system trusts"),
            "{}",
            chain(&err)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_the_certificate_does_not_name_is_refused_under_verify_full_only() {
    let setup = setup().await;
    // The certificate names `localhost`; 127.0.0.1 is the same server by another name.
    let err = refused(&setup.url("127.0.0.1", "postgres", &setup.verified("verify-full"))).await;
    assert!(err.contains("not valid for name"), "{err}");
    assert!(err.contains("127.0.0.1"), "{err}");
    let client = connect(&setup.url("127.0.0.1", "postgres", &setup.verified("verify-ca"))).await;
    assert!(encrypted(&client).await);
    // The key/value form and `hostaddr` (connect to the address, verify the name) too.
    let kv = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert='{}'",
        setup.cluster.port(),
        setup.ca.display()
    );
    let client = connect(&kv).await;
    assert!(encrypted(&client).await);
    let kv = format!(
        "hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full \
         sslrootcert='{}'",
        setup.cluster.port(),
        setup.ca.display()
    );
    let err = refused(&kv).await;
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_parameters_are_named_and_the_password_never_shown() {
    let setup = setup().await;
    let base = format!(
        "postgres://postgres:hunter2-secret@localhost:{}/postgres",
        setup.cluster.port()
    );
    let cases = [
        (
            "sslmode=allow",
            "error: invalid setting `database.url`: sslmode: unsupported value `allow`",
        ),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "error: invalid setting `database.url`: sslrootcert: cannot use `/nonexistent/ca.pem`",
        ),
        (
            "sslmode=require&sslrootcert=system",
            "error: invalid setting `database.url`: sslmode: weak sslmode `require` may not be \
             used with sslrootcert=system",
        ),
    ];
    for (params, expected) in cases {
        let out = pgfeed(&format!("{base}?{params}"), &["status"]).await;
        assert!(!out.status.success(), "{params}");
        let text = stderr(&out);
        assert!(text.starts_with(expected), "{params}: {text}");
        assert!(!text.contains("hunter2"), "{params}: {text}");
    }
    // Not a PEM file at all.
    let not_pem = setup.cluster.dir().join("tls").join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let out = pgfeed(
        &format!("{base}?sslmode=verify-ca&sslrootcert={}", not_pem.display()),
        &["status"],
    )
    .await;
    assert!(
        stderr(&out).contains("no PEM certificate"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_against_a_tls_only_database_under_verify_full() {
    let setup = setup().await;
    let db = setup.database().await;
    let url = setup.url("localhost", &db, &setup.verified("verify-full"));
    let (status, log, banner) = tokio::task::spawn_blocking(move || {
        let demo = demo_process::DemoProcess::start(
            &["--listen", "127.0.0.1:0"],
            &[("DATABASE_URL", url.as_str())],
        );
        let banner = demo.banner.database.clone();
        let (status, _, log) = demo.stop();
        (status, log, banner)
    })
    .await
    .unwrap();
    assert!(banner.contains("demo_orders created"), "{banner}\n{log}");
    assert!(status.success(), "{log}");
    let client = connect(&setup.url("localhost", &db, &setup.verified("verify-full"))).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM demo_orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0);
}

/// A server without TLS (the suite's own cluster): `prefer` falls back to a plain
/// connection, `require` and the verify modes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_unless_plain_is_allowed() {
    let setup = setup().await;
    let plain = support::server().url("postgres");
    let with = |params: &str| format!("{plain}?{params}");
    for params in ["sslmode=prefer", "sslmode=disable", ""] {
        let client = connect(&with(params)).await;
        assert!(!encrypted(&client).await, "{params}");
    }
    for params in [
        "sslmode=require".to_string(),
        setup.verified("verify-ca"),
        setup.verified("verify-full"),
    ] {
        let err = refused(&with(&params)).await;
        assert!(
            err.contains("server does not support TLS"),
            "{params}: {err}"
        );
    }
}
