//! Settings: a TOML file, then the environment, then command-line flags, each layer
//! overriding the one before; then validation.
//!
//! Each section of the file is one struct in a file of its own ([`DatabaseConfig`],
//! [`ServerConfig`], [`AuthConfig`], [`JournalConfig`], [`CorsConfig`], [`LogConfig`]): its
//! fields are the keys, its `Default` states every default once, its `validate` the rules.
//! The list of keys (and so the environment variables, `PGFEED_<SECTION>_<KEY>`) is read
//! from those structs ([`keys`]), never written out. [`Config::load`] reads the layers.
//!
//! Every failure names the key (and where it came from) so that an operator can fix it
//! without reading code. The config types do not implement `Serialize`, and secrets live
//! in [`Secret`], whose `Debug` prints `***`: nothing here can leak a secret into a log.

mod auth;
mod cors;
mod database;
mod journal;
mod keys;
mod load;
mod log;
mod server;
mod value;

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub use auth::{AuthConfig, AuthMode, KeySource};
pub use cors::CorsConfig;
pub use database::DatabaseConfig;
pub use journal::JournalConfig;
pub use keys::{Key, Kind, keys};
pub use load::Sources;
pub use log::{LogConfig, LogFormat};
pub use server::{ServerConfig, TlsFiles};

/// The validated settings, one field per section of the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[journal]`.
    pub journal: JournalConfig,
    /// `[cors]`.
    pub cors: CorsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// Problems that did not stop loading (unknown `PGFEED_` variables), for the caller to
    /// log once logging is set up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads and validates: file, then environment, then flags. Every problem is
    /// reported at once, each naming its `section.key` and where the value came from (the
    /// file and line, the environment variable or the flag).
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        load::load(sources)
    }

    /// The database URL, or the error that says how to set it.
    pub fn database_url(&self) -> Result<&Secret, ConfigError> {
        self.database.url()
    }

    /// Every rule of every section, each problem collected in `errs`.
    fn validate(&self, errs: &mut Vec<ConfigError>) {
        self.database.validate(errs);
        self.server.validate(errs);
        self.auth.validate(self.server.listen, errs);
        self.journal.validate(self.database.pool_size, errs);
        self.cors.validate(errs);
    }
}

/// A setting that must never be printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// The TOML parser's description, which names the line.
        message: String,
    },
    /// A key or section that does not exist, an environment variable or flag whose value
    /// is not of the key's kind.
    #[error("{origin}: {message}")]
    Source {
        /// Where the value came from, e.g. `environment variable PGFEED_SERVER_LISTEN`.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value of the wrong type, or one that breaks a rule.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The dotted key, e.g. `server.heartbeat`.
        key: &'static str,
        /// The rule it breaks.
        message: String,
    },
    /// Several of the above, all reported at once.
    #[error("{} configuration errors:{}", .0.len(), list(.0))]
    Many(Vec<ConfigError>),
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

/// The error for `key` breaking a rule.
pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests;
