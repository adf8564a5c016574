//! `[database]`: where the application's database is, and the pool that reads it.

use std::time::Duration;

use serde::Deserialize;

use super::value::{duration, nonzero, within};
use super::{ConfigError, Secret, invalid};

/// The `[database]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `database.url`: where the application's database is (a `postgres://` URL or a
    /// libpq key=value string). Required by every command but `token`: see
    /// [`DatabaseConfig::url`].
    pub url: Option<Secret>,
    /// `database.pool_size`: connections for journal reads, besides the one LISTEN
    /// connection.
    pub pool_size: usize,
    /// `database.query_timeout`: longest a journal query may take before its connection
    /// is discarded, so that a silently dead connection cannot hang a reader.
    #[serde(deserialize_with = "duration")]
    pub query_timeout: Duration,
    /// `database.health_interval`: how often the listener checks its connection with a
    /// NOTIFY to itself; one that does not come back within another interval marks the
    /// connection dead.
    #[serde(deserialize_with = "duration")]
    pub health_interval: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> DatabaseConfig {
        DatabaseConfig {
            url: None,
            pool_size: 8,
            query_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(5),
        }
    }
}

impl DatabaseConfig {
    /// The database URL, or the error that says how to set it.
    pub fn url(&self) -> Result<&Secret, ConfigError> {
        self.url.as_ref().ok_or_else(|| {
            invalid(
                "database.url",
                "is required: set it in the config file, or DATABASE_URL / PGFEED_DATABASE_URL",
            )
        })
    }

    /// The section's rules; each problem is collected in `errs`.
    pub fn validate(&self, errs: &mut Vec<ConfigError>) {
        if self
            .url
            .as_ref()
            .is_some_and(|u| u.expose().trim().is_empty())
        {
            errs.push(invalid("database.url", "must not be empty"));
        }
        within(errs, "database.pool_size", self.pool_size, 1, 1000);
        nonzero(errs, "database.query_timeout", self.query_timeout);
        nonzero(errs, "database.health_interval", self.health_interval);
    }
}
