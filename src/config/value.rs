//! The value types the sections share: durations and addresses as the file writes them
//! (strings), and the rules that several keys follow (a range, a nonzero duration).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Visitor};

use super::{ConfigError, invalid};

/// Deserializes a duration written as `"15s"`, `"500ms"`, `"24h"`.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Humantime;
    impl Visitor<'_> for Humantime {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string such as \"15s\" (a duration)")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|e| {
                E::custom(format!(
                    "{text:?} is not a duration like \"15s\" or \"24h\" ({e})"
                ))
            })
        }
    }
    d.deserialize_string(Humantime)
}

/// Deserializes an address written as `"127.0.0.1:8080"`.
pub(crate) fn address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    struct Address;
    impl Visitor<'_> for Address {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string such as \"127.0.0.1:8080\" (an address)")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
            text.parse().map_err(|_| {
                E::custom(format!(
                    "{text:?} is not an address of the form 127.0.0.1:8080"
                ))
            })
        }
    }
    d.deserialize_string(Address)
}

/// Collects an error unless `min <= value <= max`.
pub(crate) fn within(
    errs: &mut Vec<ConfigError>,
    key: &'static str,
    value: usize,
    min: usize,
    max: usize,
) {
    if !(min..=max).contains(&value) {
        errs.push(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
}

/// Collects an error if `value` is zero.
pub(crate) fn nonzero(errs: &mut Vec<ConfigError>, key: &'static str, value: Duration) {
    if value.is_zero() {
        errs.push(invalid(key, "must be greater than 0"));
    }
}
