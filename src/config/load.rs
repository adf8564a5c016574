//! Reading the layers: the file, then the environment, then flags, into one TOML table
//! (key files the config file names relative to itself made relative to its directory);
//! then each key is read on its own (so that every bad value is reported, with where it
//! came from), the whole into [`Config`], and the sections' rules checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::keys::{self, Key, Kind, keys};
use super::{Config, ConfigError};

/// Where settings come from, besides the file.
#[derive(Debug, Default)]
pub struct Sources {
    /// The `--config` file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (the process environment in `main`, a map in tests).
    pub env: Vec<(String, String)>,
    /// Flag overrides as (key, value), highest precedence.
    pub flags: Vec<(&'static str, String)>,
}

impl Sources {
    /// Sources with the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Sources {
        Sources {
            file,
            env: std::env::vars().collect(),
            flags: Vec::new(),
        }
    }
}

/// See [`Config::load`].
pub(super) fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let mut errs = Vec::new();
    // Where each key was set, for its errors.
    let mut origins: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut table = match &sources.file {
        Some(path) => {
            let (table, text) = read_file(path)?;
            check_file(table, path, &text, &mut errs, &mut origins)
        }
        None => toml::Table::new(),
    };
    // The keys whose value is the file's (not overridden below), for relative paths.
    let mut from_file: BTreeSet<&'static str> = origins.keys().copied().collect();
    let (overrides, warnings) = env_overrides(&sources.env);
    let flags = sources.flags.iter().filter_map(|(dotted, value)| {
        let key = keys().iter().find(|k| k.dotted == *dotted)?;
        Some((format!("flag for `{dotted}`"), key, value.clone()))
    });
    for (origin, key, value) in overrides.into_iter().chain(flags) {
        match set_key(&mut table, key, value, &origin) {
            Ok(()) => {
                from_file.remove(key.dotted);
                origins.insert(key.dotted, origin);
            }
            Err(err) => errs.push(err),
        }
    }
    if let Some(path) = &sources.file {
        relative_to_file(&mut table, path, &from_file);
    }
    // Each value on its own: one of the wrong type is reported and left at its default,
    // so that the rules below still see (and report) every other problem.
    for key in keys() {
        let Some(value) = table
            .get_mut(key.section)
            .and_then(toml::Value::as_table_mut)
            .and_then(|t| t.remove(key.name))
        else {
            continue;
        };
        let mut alone = toml::Table::new();
        alone.insert(key.name.to_string(), value.clone());
        let mut section = toml::Table::new();
        section.insert(key.section.to_string(), toml::Value::Table(alone));
        let problem = wrong_type(key.kind, &value).or_else(|| {
            let e = section.try_into::<Config>().err()?;
            Some(match value.as_integer() {
                // Counts are unsigned: say so rather than serde's "expected usize".
                Some(v) if v < 0 => format!("must not be negative, got {v}"),
                _ => e.message().to_string(),
            })
        });
        match problem {
            None => {
                if let Some(t) = table
                    .get_mut(key.section)
                    .and_then(toml::Value::as_table_mut)
                {
                    t.insert(key.name.to_string(), value);
                }
            }
            Some(message) => errs.push(ConfigError::Invalid {
                key: key.dotted,
                message,
            }),
        }
    }
    let mut config = table
        .try_into::<Config>()
        .map_err(|e| ConfigError::Source {
            origin: sources.file.as_ref().map_or("settings".to_string(), |p| {
                format!("settings from {}", p.display())
            }),
            message: e.message().to_string(),
        })?;
    config.validate(&mut errs);
    if !errs.is_empty() {
        return Err(locate(many(errs), &origins));
    }
    config.warnings = warnings;
    Ok(config)
}

/// The keys naming a file, which the config file may give relative to its own directory.
const PATH_KEYS: &[&str] = &[
    "auth.public_key_file",
    "auth.jwks_file",
    "server.tls_cert_file",
    "server.tls_key_file",
];

/// Makes each relative path of [`PATH_KEYS`] that the config file `path` set (`from_file`)
/// relative to the file's directory, as an absolute path: the same file whatever the
/// working directory. Set by the environment or a flag, a path stays relative to the
/// working directory.
fn relative_to_file(table: &mut toml::Table, path: &Path, from_file: &BTreeSet<&'static str>) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    for dotted in PATH_KEYS.iter().filter(|k| from_file.contains(*k)) {
        let Some((section, name)) = dotted.split_once('.') else {
            continue;
        };
        let Some(toml::Value::String(value)) = table
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .and_then(|t| t.get_mut(name))
        else {
            continue;
        };
        if !value.is_empty() && Path::new(value.as_str()).is_relative() {
            *value = dir.join(value.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// What is wrong with a value not of its key's kind, in an operator's words; `None` for
/// strings, whose own deserializer says what it expected (a duration, an address, a mode).
fn wrong_type(kind: Kind, value: &toml::Value) -> Option<String> {
    let wanted = match kind {
        Kind::Int if !value.is_integer() => "an integer (without quotes)",
        Kind::Bool if !value.is_bool() => "true or false",
        Kind::List
            if !value
                .as_array()
                .is_some_and(|items| items.iter().all(toml::Value::is_str)) =>
        {
            "a list of strings"
        }
        _ => return None,
    };
    let shown: String = value.to_string().chars().take(64).collect();
    Some(format!(
        "must be {wanted}, got {} `{shown}`",
        value.type_str()
    ))
}

fn read_file(path: &Path) -> Result<(toml::Table, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok((table, text))
}

/// One error, or all of them.
fn many(mut errs: Vec<ConfigError>) -> ConfigError {
    if errs.len() == 1 {
        errs.remove(0)
    } else {
        ConfigError::Many(errs)
    }
}

/// Adds where an invalid value came from to its error.
fn locate(err: ConfigError, origins: &BTreeMap<&'static str, String>) -> ConfigError {
    match err {
        ConfigError::Invalid { key, message } => match origins.get(key) {
            Some(origin) => ConfigError::Invalid {
                key,
                message: format!("{message} (set by {origin})"),
            },
            None => ConfigError::Invalid { key, message },
        },
        ConfigError::Many(errs) => {
            ConfigError::Many(errs.into_iter().map(|e| locate(e, origins)).collect())
        }
        other => other,
    }
}

/// The file's known sections and keys, each unknown one reported with its file and line;
/// records where each key was set.
fn check_file(
    table: toml::Table,
    path: &Path,
    text: &str,
    errs: &mut Vec<ConfigError>,
    origins: &mut BTreeMap<&'static str, String>,
) -> toml::Table {
    let place = |section: &str, key: Option<&str>| match find_line(text, section, key) {
        Some(line) => format!("{} line {line}", path.display()),
        None => path.display().to_string(),
    };
    let mut sections: Vec<&str> = keys().iter().map(|k| k.section).collect();
    sections.dedup();
    let mut known = toml::Table::new();
    for (section, value) in table {
        if !sections.contains(&section.as_str()) {
            errs.push(ConfigError::Source {
                origin: place(&section, None),
                message: format!(
                    "unknown section `[{section}]` (the sections are {})",
                    sections.join(", ")
                ),
            });
            continue;
        }
        let toml::Value::Table(values) = value else {
            errs.push(ConfigError::Source {
                origin: place(&section, None),
                message: format!("`{section}` must be a section (`[{section}]`)"),
            });
            continue;
        };
        let mut kept = toml::Table::new();
        for (name, value) in values {
            let origin = place(&section, Some(&name));
            match keys::find(&section, &name) {
                Some(key) => {
                    origins.insert(key.dotted, origin);
                    kept.insert(name, value);
                }
                None => errs.push(ConfigError::Source {
                    origin,
                    message: format!(
                        "unknown key `{section}.{name}` (see config.example.toml for the keys)"
                    ),
                }),
            }
        }
        known.insert(section, toml::Value::Table(kept));
    }
    known
}

/// The 1-based line of `[section]` (no `key`) or of `key = ...` inside it, as most files
/// write them (dotted `section.key = ...` at the top too).
fn find_line(text: &str, section: &str, key: Option<&str>) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_string();
            if key.is_none() && current == section {
                return Some(i + 1);
            }
            continue;
        }
        let Some(key) = key else { continue };
        let Some((left, _)) = line.split_once('=') else {
            continue;
        };
        let left = left.trim().trim_matches('"');
        if (current == section && left == key)
            || (current.is_empty() && left == format!("{section}.{key}"))
        {
            return Some(i + 1);
        }
    }
    None
}

/// Environment variables that set keys, as (origin, key, value), and warnings for the
/// `PGFEED_` variables that name no key. `DATABASE_URL` sets `database.url` unless
/// `PGFEED_DATABASE_URL` does. `PGFEED_TEST_*` belongs to the test suite, `PGFEED_LOG` to
/// logging and `PGFEED_CONFIG` names the config file; any other `PGFEED_` variable that
/// names no key is ignored with a warning (Kubernetes injects `PGFEED_SERVICE_HOST`,
/// `PGFEED_PORT`, ... for a Service named `pgfeed`), while an unknown key in the config
/// file stays an error.
fn env_overrides(env: &[(String, String)]) -> (Vec<(String, &'static Key, String)>, Vec<String>) {
    let mut found: BTreeMap<&'static str, (String, &'static Key, String)> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (name, value) in env {
        if name == "DATABASE_URL" {
            if let Some(key) = keys::find("database", "url") {
                found.entry(key.dotted).or_insert_with(|| {
                    (format!("environment variable {name}"), key, value.clone())
                });
            }
            continue;
        }
        let Some(rest) = name.strip_prefix("PGFEED_") else {
            continue;
        };
        if rest.starts_with("TEST_") || rest == "LOG" || rest == "CONFIG" {
            continue;
        }
        match keys().iter().find(|k| k.env.eq_ignore_ascii_case(name)) {
            Some(key) => {
                found.insert(
                    key.dotted,
                    (format!("environment variable {name}"), key, value.clone()),
                );
            }
            None => warnings.push(format!(
                "ignoring environment variable {name}: it names no setting (see config.example.toml for the keys)"
            )),
        }
    }
    (found.into_values().collect(), warnings)
}

/// Sets `key` in the table from a string, converting it to the key's kind.
fn set_key(
    table: &mut toml::Table,
    key: &Key,
    value: String,
    origin: &str,
) -> Result<(), ConfigError> {
    let dotted = key.dotted;
    let value = match key.kind {
        Kind::Str => toml::Value::String(value),
        Kind::Bool => match value.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => {
                return Err(ConfigError::Source {
                    origin: origin.to_string(),
                    message: format!("`{dotted}` must be true or false, got {value:?}"),
                });
            }
        },
        Kind::List => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| toml::Value::String(v.to_string()))
                .collect(),
        ),
        Kind::Int => {
            toml::Value::Integer(value.trim().parse().map_err(|_| ConfigError::Source {
                origin: origin.to_string(),
                message: format!("`{dotted}` must be an integer, got {value:?}"),
            })?)
        }
    };
    let entry = table
        .entry(key.section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(key.name.to_string(), value);
            Ok(())
        }
        _ => Err(ConfigError::Source {
            origin: origin.to_string(),
            message: format!("`{}` must be a table", key.section),
        }),
    }
}
