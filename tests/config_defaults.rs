//! The defaults are stated once, in the section structs of `src/config/`: this test holds
//! `config.example.toml` and README's table of keys to them, and checks that every key
//! has its environment variable. No database is needed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use pgfeed::config::{Config, Sources, keys};

const EXAMPLE: &str = include_str!("../config.example.toml");
const README: &str = include_str!("../README.md");

/// A file of its own holding `text`, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgfeed-config-defaults-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The settings with `section.name = value` (TOML) in a file, and nothing else.
fn with_file(section: &str, name: &str, value: &str) -> Result<Config, String> {
    let file = TempFile::new(&format!("[{section}]\n{name} = {value}\n"));
    Config::load(&Sources {
        file: Some(file.0.clone()),
        ..Default::default()
    })
    .map_err(|e| e.to_string())
}

/// The key that must be set with `dotted` (`server.tls_cert_file` and
/// `server.tls_key_file` go together), if any.
fn partner(dotted: &str) -> Option<&'static str> {
    match dotted {
        "server.tls_cert_file" => Some("server.tls_key_file"),
        "server.tls_key_file" => Some("server.tls_cert_file"),
        _ => None,
    }
}

fn defaults() -> String {
    format!("{:?}", Config::load(&Sources::default()).unwrap())
}

/// The example file's `key = value` lines by `section.key`: (value, whether it is set
/// rather than commented out).
fn example() -> BTreeMap<String, (String, bool)> {
    let mut section = "";
    let mut found = BTreeMap::new();
    for line in EXAMPLE.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
            continue;
        }
        let (text, set) = match line.strip_prefix("# ") {
            Some(commented) => (commented, false),
            None => (line, true),
        };
        if let Some((key, value)) = text.split_once(" = ")
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            // A key's first line wins (`database.url` shows two examples).
            found
                .entry(format!("{section}.{key}"))
                .or_insert((value.to_string(), set));
        }
    }
    found
}

#[test]
fn the_example_file_sets_every_key_to_its_default() {
    let documented = example();
    let defaults = defaults();
    for key in keys() {
        let Some((value, set)) = documented.get(key.dotted) else {
            panic!("config.example.toml does not document `{}`", key.dotted);
        };
        if *set {
            let loaded = with_file(key.section, key.name, value)
                .unwrap_or_else(|e| panic!("config.example.toml's `{}`: {e}", key.dotted));
            assert_eq!(
                format!("{loaded:?}"),
                defaults,
                "config.example.toml sets `{} = {value}`, which is not its default",
                key.dotted
            );
        }
    }
    for key in documented.keys() {
        assert!(
            keys().iter().any(|k| k.dotted == key),
            "config.example.toml documents `{key}`, which is no key"
        );
    }
}

#[test]
fn the_readme_states_the_defaults() {
    let table: Vec<&str> = README
        .lines()
        .skip_while(|l| *l != "| key | default |")
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(!table.is_empty(), "README has no `| key | default |` table");
    let documented = example();
    let defaults = defaults();
    let mut stated = Vec::new();
    for row in table {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let [names, values] = cells[..] else {
            panic!("README row of other than two cells: {row}");
        };
        let names: Vec<&str> = backticked(names)
            .into_iter()
            .filter(|n| keys().iter().any(|k| k.dotted == *n))
            .collect();
        assert!(!names.is_empty(), "README row names no key: {row}");
        let values: Vec<&str> = if names.len() > 1 && values.contains(" / ") {
            values.split(" / ").collect()
        } else {
            vec![values; names.len()]
        };
        assert_eq!(names.len(), values.len(), "README row: {row}");
        for (name, value) in names.into_iter().zip(values) {
            stated.push(name);
            let key = keys().iter().find(|k| k.dotted == name).unwrap();
            match backticked(value).first().filter(|_| value.starts_with('`')) {
                Some(literal) => {
                    let loaded = with_file(key.section, key.name, literal)
                        .unwrap_or_else(|e| panic!("README's default of `{name}`: {e}"));
                    assert_eq!(
                        format!("{loaded:?}"),
                        defaults,
                        "README says `{name}` defaults to {literal}, which is not its default"
                    );
                }
                // "none": the example file shows it commented out, never set.
                None if value.starts_with("none") => assert!(
                    documented.get(name).is_some_and(|(_, set)| !set),
                    "README says `{name}` has no default, but config.example.toml sets it"
                ),
                // A rule in words (half the CPUs, one of three is required).
                None => {}
            }
        }
    }
    for key in keys() {
        assert!(
            stated.contains(&key.dotted),
            "README's table of keys does not list `{}`",
            key.dotted
        );
    }
}

#[test]
fn every_key_has_its_environment_variable() {
    let documented = example();
    for key in keys() {
        assert_eq!(
            key.env,
            format!(
                "PGFEED_{}_{}",
                key.section.to_uppercase(),
                key.name.to_uppercase()
            )
        );
        let (value, _) = &documented[key.dotted];
        // The example's value as an environment variable writes it: strings unquoted,
        // lists comma-separated.
        let parsed = format!("v = {value}").parse::<toml::Table>().unwrap();
        let text = match &parsed["v"] {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
                .join(","),
            _ => value.clone(),
        };
        let mut env = vec![(key.env.clone(), text)];
        let mut file_lines = format!("{} = {value}\n", key.name);
        if let Some(other) = partner(key.dotted) {
            let other = keys().iter().find(|k| k.dotted == other).unwrap();
            let (other_value, _) = &documented[other.dotted];
            env.push((other.env.clone(), other_value.trim_matches('"').to_string()));
            file_lines.push_str(&format!("{} = {other_value}\n", other.name));
        }
        let from_env = Config::load(&Sources {
            env,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{}: {e}", key.env));
        assert!(
            from_env.warnings.is_empty(),
            "{}: {:?}",
            key.env,
            from_env.warnings
        );
        let file = TempFile::new(&format!("[{}]\n{file_lines}", key.section));
        let from_file = Config::load(&Sources {
            file: Some(file.0.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            format!("{from_env:?}"),
            format!("{from_file:?}"),
            "{} does not set `{}`",
            key.env,
            key.dotted
        );
    }
}

/// The `backticked` parts of a README cell.
fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}
