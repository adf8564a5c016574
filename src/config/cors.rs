//! `[cors]`: which browser origins may read responses.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The `[cors]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// `cors.allowed_origins` (default none): origins allowed to read responses from a
    /// browser; `"*"` allows any.
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    /// The section's rules; each problem is collected in `errs`.
    pub fn validate(&self, errs: &mut Vec<ConfigError>) {
        for origin in &self.allowed_origins {
            // A header value: visible ASCII (and spaces or tabs).
            let header_value = origin
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && header_value);
            if !ok {
                errs.push(invalid(
                    "cors.allowed_origins",
                    format!(
                        "{origin:?} is not an origin like \"https://app.example.com\" (no path, no trailing slash) or \"*\""
                    ),
                ));
            }
        }
    }
}
