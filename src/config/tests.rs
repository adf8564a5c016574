//! The loader's and the sections' unit tests.

use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn base() -> Vec<(String, String)> {
    env(&[
        ("DATABASE_URL", "postgres://x/y"),
        ("PGFEED_AUTH_SECRET", "0123456789abcdef"),
    ])
}

#[test]
fn defaults_apply() {
    let c = Config::load(&Sources {
        env: base(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.server.heartbeat, Duration::from_secs(15));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.journal.retention, Duration::from_secs(24 * 3600));
    assert_eq!(c.auth.tenant_claim, "tenant_id");
    assert!(c.auth.tables_claim.is_none());
}

#[test]
fn threads_default_to_half_the_cpus_and_are_checked() {
    let load = |threads: Option<&str>| {
        let mut e = base();
        if let Some(t) = threads {
            e.push(("PGFEED_SERVER_THREADS".into(), t.into()));
        }
        Config::load(&Sources {
            env: e,
            ..Default::default()
        })
    };
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(load(None).unwrap().server.threads, (cpus / 2).max(1));
    assert_eq!(load(Some("3")).unwrap().server.threads, 3);
    for bad in ["0", "-1", "100000", "many"] {
        let err = load(Some(bad)).unwrap_err().to_string();
        assert!(err.contains("server.threads"), "{bad}: {err}");
    }
    let err = load(Some("-1")).unwrap_err().to_string();
    assert!(err.contains("must not be negative, got -1"), "{err}");
    let err = load(Some("0")).unwrap_err().to_string();
    assert!(err.contains("must be between 1 and 1024, got 0"), "{err}");
}

#[test]
fn replay_concurrency_defaults_to_half_the_pool_and_is_checked() {
    let load = |pool: &str, replays: Option<&str>| {
        let mut e = base();
        e.push(("PGFEED_DATABASE_POOL_SIZE".into(), pool.into()));
        if let Some(r) = replays {
            e.push(("PGFEED_JOURNAL_REPLAY_CONCURRENCY".into(), r.into()));
        }
        Config::load(&Sources {
            env: e,
            ..Default::default()
        })
    };
    assert_eq!(load("8", None).unwrap().journal.replay_concurrency(8), 4);
    assert_eq!(load("1", None).unwrap().journal.replay_concurrency(1), 1);
    assert_eq!(
        load("8", Some("8")).unwrap().journal.replay_concurrency(8),
        8
    );
    for bad in ["0", "-2", "9", "all"] {
        let err = load("8", Some(bad)).unwrap_err().to_string();
        assert!(err.contains("journal.replay_concurrency"), "{bad}: {err}");
    }
}

#[test]
fn file_then_env_then_flags() {
    let dir = std::env::temp_dir().join(format!("pgfeed-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1\"\nheartbeat = \"3s\"\n[database]\nurl = \"postgres://file/db\"\n").unwrap();
    let mut e = base();
    e.push(("PGFEED_SERVER_LISTEN".into(), "127.0.0.1:2".into()));
    let c = Config::load(&Sources {
        file: Some(path.clone()),
        env: e.clone(),
        flags: vec![],
    })
    .unwrap();
    assert_eq!(c.server.listen.port(), 2);
    assert_eq!(c.server.heartbeat, Duration::from_secs(3));
    // DATABASE_URL from the environment overrides the file.
    assert_eq!(c.database_url().unwrap().expose(), "postgres://x/y");
    let c = Config::load(&Sources {
        file: Some(path),
        env: e,
        flags: vec![("server.listen", "127.0.0.1:3".into())],
    })
    .unwrap();
    assert_eq!(c.server.listen.port(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_name_the_key() {
    let mut e = base();
    e.push(("PGFEED_SERVER_HEARTBEAT".into(), "soon".into()));
    let err = Config::load(&Sources {
        env: e,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.heartbeat"), "{err}");

    let c = Config::load(&Sources {
        env: env(&[("PGFEED_AUTH_SECRET", "0123456789abcdef")]),
        ..Default::default()
    })
    .unwrap();
    let err = c.database_url().unwrap_err().to_string();
    assert!(err.contains("database.url"), "{err}");

    // A misspelt variable is not fatal (Kubernetes injects PGFEED_* variables of its
    // own), but it is named in a warning.
    let mut e = base();
    e.push(("PGFEED_SERVER_LISTN".into(), "x".into()));
    let c = Config::load(&Sources {
        env: e,
        ..Default::default()
    })
    .unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("PGFEED_SERVER_LISTN")),
        "{:?}",
        c.warnings
    );

    let mut e = base();
    e.push(("PGFEED_DATABASE_POOL_SIZE".into(), "many".into()));
    let err = Config::load(&Sources {
        env: e,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("database.pool_size"), "{err}");
}

#[test]
fn unknown_file_key_is_named() {
    let dir = std::env::temp_dir().join(format!("pgfeed-config-u-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("b.toml");
    std::fs::write(&path, "[server]\nlisten_addr = \"x\"\n").unwrap();
    let err = Config::load(&Sources {
        file: Some(path),
        env: base(),
        flags: vec![],
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("listen_addr"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn secret_debug_is_redacted() {
    let c = Config::load(&Sources {
        env: base(),
        ..Default::default()
    })
    .unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("0123456789abcdef") && !shown.contains("postgres://x/y"),
        "{shown}"
    );
}

#[test]
fn keys_are_read_from_the_structs() {
    let all = keys();
    let find = |dotted: &str| all.iter().find(|k| k.dotted == dotted).unwrap();
    assert_eq!(find("server.listen").kind, Kind::Str);
    assert_eq!(find("server.heartbeat").kind, Kind::Str);
    assert_eq!(find("server.live_buffer").kind, Kind::Int);
    assert_eq!(find("server.max_stream_rate").kind, Kind::Int);
    assert_eq!(find("journal.replay_concurrency").kind, Kind::Int);
    assert_eq!(find("auth.allow_remote").kind, Kind::Bool);
    assert_eq!(find("auth.mode").kind, Kind::Str);
    assert_eq!(find("database.url").kind, Kind::Str);
    assert_eq!(find("auth.public_key_file").kind, Kind::Str);
    assert_eq!(find("cors.allowed_origins").kind, Kind::List);
    assert_eq!(find("log.format").env, "PGFEED_LOG_FORMAT");
    assert_eq!(find("auth.jwks_url").env, "PGFEED_AUTH_JWKS_URL");
    assert_eq!(all.len(), 41);
    let sections: Vec<&str> = all.iter().map(|k| k.section).fold(vec![], |mut v, s| {
        if v.last() != Some(&s) {
            v.push(s);
        }
        v
    });
    assert_eq!(
        sections,
        ["database", "server", "auth", "journal", "cors", "log"]
    );
}

#[test]
fn listen_takes_a_host_name_or_only_a_port() {
    let listen = |value: &str, by_env: bool| {
        let mut sources = Sources {
            env: base(),
            ..Default::default()
        };
        if by_env {
            sources
                .env
                .push(("PGFEED_SERVER_LISTEN".into(), value.to_string()));
        } else {
            sources.flags.push(("server.listen", value.to_string()));
        }
        Config::load(&sources).map(|c| c.server.listen)
    };
    for by_env in [true, false] {
        let addr = listen("localhost:8081", by_env).unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 8081);
        assert_eq!(
            listen(":8082", by_env).unwrap(),
            "0.0.0.0:8082".parse().unwrap()
        );
        assert_eq!(
            listen("[::1]:8083", by_env).unwrap(),
            "[::1]:8083".parse().unwrap()
        );
        assert_eq!(
            listen("127.0.0.1:8084", by_env).unwrap(),
            "127.0.0.1:8084".parse().unwrap()
        );
    }
    // `localhost` is loopback, so the modes that need it accept it.
    let mut e = base();
    e.push(("PGFEED_AUTH_MODE".into(), "none".into()));
    e.push(("PGFEED_SERVER_LISTEN".into(), "localhost:8080".into()));
    Config::load(&Sources {
        env: e,
        ..Default::default()
    })
    .unwrap();

    // Every refusal names the key, where the value came from, and the forms there are.
    for (value, says) in [
        ("8080", "has no port"),
        ("localhost", "has no port"),
        (":http", "no valid port"),
        ("localhost:70000", "no valid port"),
        ("::1:8080", "is not an address"),
        ("nowhere.invalid:8080", "nowhere.invalid"),
    ] {
        let err = listen(value, true).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{value}: {err}");
        assert!(err.contains("PGFEED_SERVER_LISTEN"), "{value}: {err}");
        assert!(err.contains(says), "{value}: {err}");
    }
    let err = listen(":x", false).unwrap_err().to_string();
    assert!(err.contains("server.listen"), "{err}");
    assert!(
        err.contains("localhost:8080") && err.contains(":PORT"),
        "{err}"
    );
}

#[test]
fn listen_in_a_file_may_be_a_host_name() {
    let dir = std::env::temp_dir().join(format!("pgfeed-config-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgfeed.toml");
    std::fs::write(&path, "[server]\nlisten = \"localhost:9\"\n").unwrap();
    let c = Config::load(&Sources {
        file: Some(path.clone()),
        env: base(),
        ..Default::default()
    })
    .unwrap();
    assert!(c.server.listen.ip().is_loopback());
    std::fs::write(&path, "[server]\nlisten = \"nowhere.invalid:9\"\n").unwrap();
    let err = Config::load(&Sources {
        file: Some(path.clone()),
        env: base(),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("server.listen") && err.contains("line 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn key_files_in_the_config_file_are_relative_to_it() {
    let dir = std::env::temp_dir().join(format!("pgfeed-config-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgfeed.toml");
    let load = |text: &str, vars: &[(&str, &str)]| {
        std::fs::write(&path, text).unwrap();
        let mut e = env(&[("DATABASE_URL", "postgres://x/y")]);
        e.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Config::load(&Sources {
            file: Some(path.clone()),
            env: e,
            ..Default::default()
        })
        .unwrap()
    };
    let c = load("[auth]\npublic_key_file = \"keys/jwt.pem\"\n", &[]);
    assert_eq!(c.auth.public_key_file, Some(dir.join("keys/jwt.pem")));
    let c = load("[auth]\njwks_file = \"../jwks.json\"\n", &[]);
    assert_eq!(c.auth.jwks_file, Some(dir.join("../jwks.json")));
    let c = load("auth.jwks_file = \"jwks.json\"\n", &[]);
    assert_eq!(c.auth.jwks_file, Some(dir.join("jwks.json")));
    // Absolute stays absolute.
    let c = load("[auth]\njwks_file = \"/etc/pgfeed/jwks.json\"\n", &[]);
    assert_eq!(c.auth.jwks_file, Some("/etc/pgfeed/jwks.json".into()));
    // From the environment (even over the file's): relative to the working directory.
    let c = load(
        "[auth]\njwks_file = \"file.json\"\n",
        &[("PGFEED_AUTH_JWKS_FILE", "env.json")],
    );
    assert_eq!(c.auth.jwks_file, Some("env.json".into()));
    let c = load("", &[("PGFEED_AUTH_PUBLIC_KEY_FILE", "keys/env.pem")]);
    assert_eq!(c.auth.public_key_file, Some("keys/env.pem".into()));
    std::fs::remove_dir_all(&dir).unwrap();
}
