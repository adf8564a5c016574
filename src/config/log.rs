//! `[log]`: the format of the log (its level comes from `PGFEED_LOG`, see
//! [`crate::logging`]).

use serde::Deserialize;

/// The `[log]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `log.format`: `text` for people, `json` for log pipelines.
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogConfig {
    /// Whether the log is JSON.
    pub fn json(&self) -> bool {
        self.format == LogFormat::Json
    }
}
