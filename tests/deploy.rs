//! The deployment files (Dockerfile, .dockerignore, deploy/) against the binary and each
//! other: with no Docker engine here, what can be checked is. The image's HEALTHCHECK
//! script runs against a real gateway and follows the configured listen address as pgfeed
//! reads it; the Dockerfile copies everything the binary embeds, runs as a numeric user
//! and sets no setting in its environment; the config files it, compose and the Kubernetes
//! manifests give are accepted by `pgfeed serve --check-config`, and the manifests agree
//! with the image. Schema validation of compose.yaml and the manifests, and hadolint, run
//! in .ci/run.

use pgfeed_testkit as support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use pgfeed::config::{Config, Sources};
use support::{Gateway, TestDb, free_addr};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Runs deploy/healthcheck.sh with only `env` for pgfeed's variables; true if it passed.
async fn healthcheck(env: &[(&str, &str)]) -> bool {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg(repo("deploy/healthcheck.sh"));
    for (name, _) in std::env::vars() {
        if name.starts_with("PGFEED_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().await.expect("sh and curl");
    out.status.success()
}

/// The port pgfeed itself reads from the config file `file` and `env`.
fn pgfeed_port(file: &Path, env: &[(&str, &str)]) -> u16 {
    let mut all = vec![
        (
            "DATABASE_URL".to_string(),
            "postgres://x@127.0.0.1/x".to_string(),
        ),
        (
            "PGFEED_AUTH_SECRET".to_string(),
            support::SECRET.to_string(),
        ),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(&Sources {
        file: Some(file.to_path_buf()),
        env: all,
        flags: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    .server
    .listen
    .port()
}

#[tokio::test]
async fn the_image_healthcheck_follows_the_configured_listen_address() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    let up = gw.addr.port();
    let down = free_addr().port();
    let dir = tempdir("healthcheck");
    let file = dir.join("pgfeed.toml");
    let config = file.to_str().unwrap();

    // (file, PGFEED_SERVER_LISTEN, the port pgfeed listens on then)
    let cases: Vec<(String, Option<String>, u16)> = vec![
        (format!("[server]\nlisten = \"127.0.0.1:{up}\"\n"), None, up),
        (
            format!(
                "[log]\nformat = \"json\"\n\n[server]\nheartbeat = \"5s\"\nlisten = \"0.0.0.0:{up}\"  # every interface\n"
            ),
            None,
            up,
        ),
        (format!("[server]\nlisten = '127.0.0.1:{up}'\n"), None, up),
        (format!("server.listen = \"127.0.0.1:{up}\"\n"), None, up),
        (
            format!("[server]\nlisten = \"127.0.0.1:{down}\"\n"),
            None,
            down,
        ),
        // The environment wins over the file, as in pgfeed.
        (
            format!("[server]\nlisten = \"127.0.0.1:{down}\"\n"),
            Some(format!("127.0.0.1:{up}")),
            up,
        ),
        (
            format!("[server]\nlisten = \"127.0.0.1:{up}\"\n"),
            Some(format!("0.0.0.0:{down}")),
            down,
        ),
    ];
    for (text, listen, port) in cases {
        std::fs::write(&file, &text).unwrap();
        let mut env = vec![("PGFEED_CONFIG", config)];
        if let Some(listen) = &listen {
            env.push(("PGFEED_SERVER_LISTEN", listen));
        }
        assert_eq!(
            pgfeed_port(&file, &env[1..]),
            port,
            "pgfeed reads {text:?} with {listen:?}"
        );
        assert_eq!(
            healthcheck(&env).await,
            port == up,
            "the healthcheck with {text:?} and PGFEED_SERVER_LISTEN={listen:?}"
        );
    }
    // A gateway that stops is unhealthy.
    std::fs::write(&file, format!("[server]\nlisten = \"127.0.0.1:{up}\"\n")).unwrap();
    gw.stop().await;
    assert!(!healthcheck(&[("PGFEED_CONFIG", config)]).await);
    std::fs::remove_dir_all(dir).unwrap();
}

/// With TLS on the listener, the healthcheck asks over HTTPS: whether TLS is on comes from
/// PGFEED_SERVER_TLS_CERT_FILE or the config file, as pgfeed reads it, and a plain HTTP
/// question to a TLS listener fails (so the check is not passing by accident).
#[tokio::test]
async fn the_image_healthcheck_speaks_tls_when_the_listener_does() {
    let db = TestDb::new().await;
    let dir = tempdir("healthcheck-tls");
    let certified = rcgen::generate_simple_self_signed(vec!["pgfeed.example".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let gw = Gateway::spawn(support::sources_with(
        &db,
        &[
            ("PGFEED_SERVER_TLS_CERT_FILE", cert),
            ("PGFEED_SERVER_TLS_KEY_FILE", key),
        ],
    ))
    .await;
    let listen = gw.addr.to_string();
    let file = dir.join("pgfeed.toml");
    std::fs::write(
        &file,
        format!("[server]\nlisten = \"{listen}\"\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n"),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    // The healthcheck is the readiness probe here: the test kit's client speaks no TLS.
    let from_env = [
        ("PGFEED_SERVER_LISTEN", listen.as_str()),
        ("PGFEED_SERVER_TLS_CERT_FILE", cert),
    ];
    support::eventually("the healthcheck with TLS from the environment", || {
        healthcheck(&from_env)
    })
    .await;
    assert!(
        healthcheck(&[("PGFEED_CONFIG", config)]).await,
        "TLS from the config file"
    );
    assert!(
        !healthcheck(&[("PGFEED_SERVER_LISTEN", &listen)]).await,
        "plain HTTP to a TLS listener must fail"
    );
    gw.stop().await;
    assert!(!healthcheck(&[("PGFEED_CONFIG", config)]).await);
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfeed-deploy-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Dockerfile's instructions (continuation lines joined), as (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (word, rest) = l.split_once(' ').unwrap_or((l, ""));
            (word.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect()
}

/// The files `src/` embeds with include_str!/include_bytes! outside tests, relative to the
/// repository.
fn embedded_files() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![repo("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            for marker in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in text.match_indices(marker) {
                    let rest = &text[at + marker.len()..];
                    let relative = &rest[..rest.find('"').unwrap()];
                    let full = path.parent().unwrap().join(relative);
                    let full = full
                        .canonicalize()
                        .unwrap_or_else(|e| panic!("{}: {relative}: {e}", path.display()));
                    let root = repo("").canonicalize().unwrap();
                    out.insert(
                        full.strip_prefix(&root)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_builds_what_the_binary_embeds_runs_as_a_numeric_user_and_sets_no_setting() {
    let steps = dockerfile();
    let froms: Vec<usize> = (0..steps.len()).filter(|&i| steps[i].0 == "FROM").collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&steps[..froms[1]], &steps[froms[1]..]);

    // The dependency layer: manifests, then a build, before any source.
    let position = |what: &str, pred: &dyn Fn(&(String, String)) -> bool| {
        build
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("the build stage has {what}"))
    };
    let manifests = position("COPY Cargo.toml Cargo.lock", &|(i, a)| {
        i == "COPY" && a.starts_with("Cargo.toml Cargo.lock")
    });
    let first_build = position("a first cargo build", &|(i, a)| {
        i == "RUN" && a.contains("cargo build --release --locked")
    });
    let sources = position("COPY src", &|(i, a)| i == "COPY" && a.starts_with("src "));
    assert!(
        manifests < first_build && first_build < sources,
        "{build:?}"
    );
    let last_build = build
        .iter()
        .rposition(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .unwrap();
    assert!(last_build > sources);

    // Everything the binary embeds is copied before the last build and not ignored.
    let copied: BTreeSet<String> = build[sources..last_build]
        .iter()
        .filter(|(i, _)| i == "COPY")
        .map(|(_, a)| a.split_whitespace().next().unwrap().to_string())
        .collect();
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let embedded = embedded_files();
    assert!(embedded.len() >= 8, "{embedded:?}");
    for file in &embedded {
        let top = file.split('/').next().unwrap();
        assert!(
            copied.contains(top),
            "the binary embeds {file}, which the Dockerfile does not copy ({copied:?})"
        );
        assert!(
            !ignored
                .iter()
                .any(|p| p.trim_end_matches('/') == top || *p == file),
            ".dockerignore leaves out {file}"
        );
    }
    for needed in ["target/", ".git/"] {
        assert!(ignored.contains(&needed), ".dockerignore has {needed}");
    }

    // Cargo reads every workspace member's manifest, even to build one package: each is
    // copied before the first build, and let through .dockerignore.
    let root = read("Cargo.toml");
    let members: toml::Table = toml::from_str(&root).unwrap();
    let members = members["workspace"]["members"].as_array().unwrap();
    for member in members
        .iter()
        .map(|m| m.as_str().unwrap())
        .filter(|m| *m != ".")
    {
        let manifest = format!("{member}/Cargo.toml");
        assert!(
            build[..first_build]
                .iter()
                .any(|(i, a)| i == "COPY" && a.starts_with(&manifest)),
            "the Dockerfile copies {manifest} before its first build"
        );
        assert!(
            ignored.contains(&format!("!{manifest}").as_str())
                || !ignored.iter().any(|p| p.trim_end_matches('/') == member),
            ".dockerignore lets {manifest} through"
        );
    }

    // A numeric user, the one the Kubernetes manifests run as.
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("a USER");
    let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0) && (gid.is_empty() || gid.parse::<u32>().is_ok()),
        "USER {user} is numeric and not root"
    );
    for manifest in ["deploy/k8s/deployment.yaml", "deploy/k8s/install-job.yaml"] {
        let text = read(manifest);
        assert_eq!(
            yaml_value(&text, "image"),
            format!("pgfeed:{}", env!("CARGO_PKG_VERSION")),
            "{manifest}"
        );
        assert!(text.contains("runAsNonRoot: true"), "{manifest}");
        assert!(text.contains(&format!("runAsUser: {uid}")), "{manifest}");
    }

    // No setting in the environment: only where the config file is, which is copied there.
    let envs: Vec<&String> = runtime
        .iter()
        .filter(|(i, _)| i == "ENV")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(envs.len(), 1, "{envs:?}");
    let config_path = envs[0]
        .strip_prefix("PGFEED_CONFIG=")
        .unwrap_or_else(|| panic!("ENV sets only PGFEED_CONFIG: {}", envs[0]));
    assert!(
        runtime
            .iter()
            .any(|(i, a)| i == "COPY" && *a == format!("deploy/pgfeed.toml {config_path}")),
        "the image's config file is at PGFEED_CONFIG"
    );
    let deployment = read("deploy/k8s/deployment.yaml");
    assert!(deployment.contains(&format!("value: {config_path}")));
    let dir = Path::new(config_path).parent().unwrap().to_str().unwrap();
    assert!(deployment.contains(&format!("mountPath: {dir}")));

    // The HEALTHCHECK runs the script, which the image has, executable.
    let healthcheck = runtime
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .map(|(_, a)| a.clone())
        .expect("a HEALTHCHECK");
    assert!(
        healthcheck.contains("CMD [\"pgfeed-healthcheck\"]"),
        "{healthcheck}"
    );
    assert!(runtime.iter().any(|(i, a)| {
        i == "COPY" && a == "deploy/healthcheck.sh /usr/local/bin/pgfeed-healthcheck"
    }));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo("deploy/healthcheck.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert!(mode & 0o111 == 0o111, "deploy/healthcheck.sh is executable");

    // OCI labels, the license as Cargo.toml has it.
    let labels: String = runtime
        .iter()
        .filter(|(i, _)| i == "LABEL")
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for key in ["title", "description", "licenses", "version", "revision"] {
        assert!(
            labels.contains(&format!("org.opencontainers.image.{key}=")),
            "LABEL org.opencontainers.image.{key}"
        );
    }
    let license = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .unwrap()
        .to_string();
    assert!(labels.contains(&format!("org.opencontainers.image.licenses={license}")));
    assert!(
        runtime
            .iter()
            .any(|(i, a)| i == "ARG" && *a == format!("VERSION={}", env!("CARGO_PKG_VERSION"))),
        "the image's default version is the crate's"
    );
    // The port the image exposes is the one its config file listens on.
    let exposed = runtime
        .iter()
        .find(|(i, _)| i == "EXPOSE")
        .map(|(_, a)| a.parse::<u16>().unwrap())
        .expect("EXPOSE");
    assert_eq!(pgfeed_port(&repo("deploy/pgfeed.toml"), &[]), exposed);
}

/// The text of the `pgfeed.toml` key of deploy/k8s/configmap.yaml.
fn configmap_toml() -> String {
    let text = read("deploy/k8s/configmap.yaml");
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "pgfeed.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect();
    assert!(block.len() > 2, "the ConfigMap has pgfeed.toml");
    block.join("\n")
}

/// The value after `key:` on the line where it first appears in `text`.
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in {text}"))
        .trim()
}

#[tokio::test]
async fn the_deploy_configs_pass_pgfeed_check_config_and_the_manifests_agree() {
    let dir = tempdir("configs");
    let k8s = dir.join("configmap.toml");
    std::fs::write(&k8s, configmap_toml()).unwrap();
    let secret = read("deploy/k8s/secret.yaml");
    let compose = read("deploy/compose.yaml");
    let compose_secret = yaml_value(&compose, "PGFEED_AUTH_SECRET")
        .split_once(":-")
        .map(|(_, v)| v.trim_end_matches('}'))
        .expect("compose gives a default secret");
    let cases = [
        (
            repo("deploy/pgfeed.toml"),
            yaml_value(&compose, "DATABASE_URL").to_string(),
            compose_secret.to_string(),
        ),
        (
            k8s.clone(),
            yaml_value(&secret, "database-url").to_string(),
            yaml_value(&secret, "auth-secret").to_string(),
        ),
    ];
    for (file, url, auth_secret) in cases {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgfeed"))
            .args(["serve", "--check-config"])
            .env("PGFEED_CONFIG", &file)
            .env("DATABASE_URL", &url)
            .env("PGFEED_AUTH_SECRET", &auth_secret)
            .env_remove("PGFEED_LOG")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", file.display());
        assert!(
            !stderr.to_lowercase().contains("warn"),
            "{}: {stderr}",
            file.display()
        );
    }

    // The Deployment's probes, port and Service agree with the config and the API.
    let port = pgfeed_port(&k8s, &[]);
    let deployment = read("deploy/k8s/deployment.yaml");
    assert_eq!(yaml_value(&deployment, "containerPort"), port.to_string());
    let paths: Vec<&str> = deployment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path: "))
        .collect();
    assert_eq!(paths, ["/readyz", "/healthz"], "readiness, then liveness");
    assert!(
        deployment.contains("readinessProbe:\n            httpGet:\n              path: /readyz")
    );
    assert!(
        deployment.contains("livenessProbe:\n            httpGet:\n              path: /healthz")
    );
    assert!(deployment.contains(&format!(
        "- name: http\n              containerPort: {port}"
    )));
    let service = read("deploy/k8s/service.yaml");
    assert_eq!(yaml_value(&service, "targetPort"), "http");
    std::fs::remove_dir_all(dir).unwrap();
}
