//! The small things a user expects of the `pgfeed` command (issue 19, item 7), tried as
//! the user would: `--version` with the commit, shell completions, bare `pgfeed` printing
//! help, `unwatch` twice, `server.listen` as `localhost:PORT` and `:PORT`, and key files
//! named relative to the config file.

use pgfeed_testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::TestDb;

/// `pgfeed ARGS` in `dir` (else the test's directory), with none of the caller's
/// `PGFEED_*` variables (but the test suite's) and no `DATABASE_URL` unless `db` is given.
fn pgfeed_in(
    dir: Option<&Path>,
    db: Option<&TestDb>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfeed"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") {
            cmd.env_remove(k);
        }
    }
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    if let Some(db) = db {
        cmd.env("DATABASE_URL", &db.url);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running pgfeed")
}

fn pgfeed(args: &[&str], env: &[(&str, &str)]) -> Output {
    pgfeed_in(None, None, args, env)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh directory for one test.
fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfeed-cli-small-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn version_names_the_package_version_and_the_git_commit() {
    let out = pgfeed(&["--version"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!("pgfeed {} (", env!("CARGO_PKG_VERSION")))
            && line.ends_with(")\n"),
        "{line:?}"
    );
    // Built inside a git checkout (and not told another commit): that checkout's HEAD.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Ok(head) = head
        && head.status.success()
        && std::env::var_os("PGFEED_GIT_COMMIT").is_none()
    {
        let head = String::from_utf8(head.stdout).unwrap();
        assert!(
            line.contains(&format!("({})", head.trim())),
            "{line:?} names the commit {head}"
        );
    }
}

#[test]
fn the_image_build_passes_its_revision_as_the_commit() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .unwrap()
            .replace("\\\n", " ");
    let build_stage: Vec<&str> = dockerfile
        .split("\nFROM ")
        .nth(1)
        .unwrap()
        .lines()
        .map(str::trim)
        .collect();
    assert!(build_stage.contains(&"COPY build.rs ./"), "{build_stage:?}");
    assert!(
        build_stage.iter().any(|l| l.starts_with("ARG REVISION")),
        "{build_stage:?}"
    );
    let last_build = build_stage
        .iter()
        .rev()
        .find(|l| l.contains("cargo build"))
        .unwrap();
    assert!(
        last_build.contains("PGFEED_GIT_COMMIT=\"${REVISION}\""),
        "{last_build}"
    );
}

#[test]
fn completions_for_each_shell_name_the_subcommands_without_a_config() {
    // A broken config file (named as the image names it) does not matter.
    let dir = tempdir("completions");
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[server\nlisten = nope").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = pgfeed(
            &["completions", shell],
            &[("PGFEED_CONFIG", broken.to_str().unwrap())],
        );
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for sub in [
            "serve",
            "install",
            "watch",
            "unwatch",
            "status",
            "token",
            "completions",
        ] {
            assert!(script.contains(sub), "{shell} script names {sub}");
        }
        if shell == "bash" {
            let path = dir.join("pgfeed.bash");
            std::fs::write(&path, &script).unwrap();
            let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(check.status.success(), "bash -n: {}", stderr(&check));
        }
    }
    let out = pgfeed(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tcsh"), "{}", stderr(&out));
}

#[test]
fn bare_pgfeed_prints_help_and_serves_nothing() {
    // With a listen address at hand, as if it could serve: it does not.
    let out = pgfeed(&[], &[("PGFEED_SERVER_LISTEN", "127.0.0.1:0")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let help = stderr(&out);
    assert!(help.contains("Usage: pgfeed"), "{help}");
    assert!(help.contains("serve"), "{help}");
    assert!(!help.contains("pgfeed serving"), "{help}");

    // Options without a subcommand: still no server, a usage error.
    let out = pgfeed(&["--database-url", "postgres://localhost/x"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("Usage: pgfeed"), "{}", stderr(&out));
}

#[tokio::test]
async fn unwatch_twice_or_of_an_unwatched_table_succeeds_and_says_so() {
    let db = TestDb::empty().await;
    let ok = |out: &Output| assert!(out.status.success(), "{}", stderr(out));
    ok(&pgfeed_in(None, Some(&db), &["install"], &[]));
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, tenant text);
             CREATE TABLE plain (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let run = |args: &[&str]| pgfeed_in(None, Some(&db), args, &[]);
    ok(&run(&["watch", "items", "--tenant-column", "tenant"]));

    let first = run(&["unwatch", "items"]);
    ok(&first);
    assert!(
        stderr(&first).contains("no longer watching items"),
        "{}",
        stderr(&first)
    );
    for table in ["items", "plain", "public.plain"] {
        let again = run(&["unwatch", table]);
        ok(&again);
        assert!(
            stderr(&again).contains(&format!("{table} is not watched; nothing to do")),
            "{}",
            stderr(&again)
        );
    }
    let status = pgfeed_in(None, Some(&db), &["status", "--json"], &[]);
    ok(&status);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["watched"], serde_json::json!([]));

    // In SQL too: a notice, no error.
    db.client()
        .await
        .batch_execute("SELECT pgfeed.unwatch('items'); SELECT pgfeed.unwatch('plain')")
        .await
        .unwrap();

    // A table that does not exist is still an error that names it.
    let missing = run(&["unwatch", "no_such_table"]);
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("no_such_table\" does not exist"),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test]
async fn serve_listens_on_every_interface_for_a_port_alone_and_on_a_host_name() {
    let db = TestDb::new().await;
    // `--listen :PORT`: every interface, so loopback too.
    let port = support::free_addr().port();
    let cmd = support::pgfeed_command(&db, &["serve", "--listen", &format!(":{port}")]);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let gw = support::ChildGateway::start_command(cmd, loopback, None).await;
    let log = gw.log_text();
    let start = log
        .lines()
        .find(|l| l.contains("pgfeed serving"))
        .unwrap_or_else(|| panic!("a start-up line: {log}"));
    assert!(start.contains(&format!("0.0.0.0:{port}")), "{start}");
    // The start-up line names the version and the commit, as `--version` does.
    assert!(
        start.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && start.contains(&format!("commit=\"{}\"", pgfeed::cli::COMMIT)),
        "{start}"
    );
    assert_eq!(
        support::get_soon(loopback, "/healthz", &[]).await.status,
        200
    );
    drop(gw);

    // PGFEED_SERVER_LISTEN=localhost:PORT: resolved, IPv4 first.
    let port = support::free_addr().port();
    let mut cmd = support::pgfeed_command(&db, &["serve"]);
    cmd.env("PGFEED_SERVER_LISTEN", format!("localhost:{port}"));
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let gw = support::ChildGateway::start_command(cmd, loopback, None).await;
    assert_eq!(
        support::get_soon(loopback, "/healthz", &[]).await.status,
        200
    );
    drop(gw);

    // A name that resolves to nothing: refused before anything starts, naming the key.
    let out = pgfeed_in(
        None,
        Some(&db),
        &[
            "serve",
            "--check-config",
            "--listen",
            "nowhere.invalid:8080",
        ],
        &[("PGFEED_AUTH_SECRET", support::SECRET)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("server.listen") && stderr(&out).contains("nowhere.invalid"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn key_files_named_in_the_config_file_are_found_next_to_it() {
    // The config and its key in one directory, the process started in another.
    let conf = tempdir("keys-conf");
    let elsewhere = tempdir("keys-cwd");
    std::fs::create_dir_all(conf.join("keys")).unwrap();
    let pem = rcgen::KeyPair::generate().unwrap().public_key_pem();
    std::fs::write(conf.join("keys/jwt.pub.pem"), &pem).unwrap();
    let config = conf.join("pgfeed.toml");
    let check = |file_text: &str, env: &[(&str, &str)]| {
        std::fs::write(&config, file_text).unwrap();
        let mut env = env.to_vec();
        env.push(("DATABASE_URL", "postgres://db.example/app"));
        pgfeed_in(
            Some(&elsewhere),
            None,
            &[
                "--config",
                config.to_str().unwrap(),
                "serve",
                "--check-config",
            ],
            &env,
        )
    };
    let out = check("[auth]\npublic_key_file = \"keys/jwt.pub.pem\"\n", &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A missing one: the error names the path it looked for, next to the config file.
    let out = check("[auth]\npublic_key_file = \"keys/missing.pem\"\n", &[]);
    assert_eq!(out.status.code(), Some(1));
    let wanted = conf.join("keys/missing.pem");
    assert!(
        stderr(&out).contains("auth.public_key_file")
            && stderr(&out).contains(wanted.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
    let out = check("[auth]\njwks_file = \"keys/missing.json\"\n", &[]);
    assert_eq!(out.status.code(), Some(1));
    let wanted = conf.join("keys/missing.json");
    assert!(
        stderr(&out).contains("auth.jwks_file") && stderr(&out).contains(wanted.to_str().unwrap()),
        "{}",
        stderr(&out)
    );

    // Given by the environment, relative to the working directory: not found there...
    let out = check("", &[("PGFEED_AUTH_PUBLIC_KEY_FILE", "keys/jwt.pub.pem")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read keys/jwt.pub.pem"),
        "{}",
        stderr(&out)
    );
    // ...until it is there.
    std::fs::create_dir_all(elsewhere.join("keys")).unwrap();
    std::fs::write(elsewhere.join("keys/jwt.pub.pem"), &pem).unwrap();
    let out = check("", &[("PGFEED_AUTH_PUBLIC_KEY_FILE", "keys/jwt.pub.pem")]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&conf).unwrap();
    std::fs::remove_dir_all(&elsewhere).unwrap();
}
