//! The value types the sections share: durations and addresses as the file writes them
//! (strings; a listen address may be a host name or `:PORT`), and the rules that several
//! keys follow (a range, a nonzero duration).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
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

/// Deserializes a listen address (`server.listen`), written as [`listen_address`] reads it.
pub(crate) fn address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    struct Address;
    impl Visitor<'_> for Address {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string such as \"127.0.0.1:8080\" (an address)")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
            listen_address(text).map_err(E::custom)
        }
    }
    d.deserialize_string(Address)
}

/// Reads a listen address: `IP:PORT` (`127.0.0.1:8080`, `[::1]:8080`), `:PORT` (every
/// IPv4 interface, `0.0.0.0:PORT`, as Go's `:8080` means every interface), or
/// `HOST:PORT` (`localhost:8080`), resolved once, here: its first IPv4 address, else its
/// first address (as Go listens on a name). The error says which forms there are.
pub(crate) fn listen_address(text: &str) -> Result<SocketAddr, String> {
    const FORMS: &str = "write IP:PORT (127.0.0.1:8080, [::1]:8080), HOST:PORT \
                         (localhost:8080) or :PORT (every IPv4 interface, 0.0.0.0:PORT)";
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port: {FORMS}"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?} has no valid port (0 to 65535): {FORMS}"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if host.contains([':', '[', ']', '/', ' ']) {
        return Err(format!("{text:?} is not an address: {FORMS}"));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the host name {host:?} in {text:?} ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("the host name {host:?} in {text:?} resolves to no address"))
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
