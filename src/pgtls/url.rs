//! `sslmode` and `sslrootcert` taken out of a connection string (URL or key=value), as
//! libpq reads them, leaving every other byte for the driver.

use super::TlsError;

/// The URL without the TLS parameters, and what they asked for.
pub(crate) struct Split {
    /// `database.url` less `sslmode` and `sslrootcert`, for tokio-postgres to parse.
    pub(crate) rest: String,
    /// `sslmode`, if given.
    pub(crate) sslmode: Option<String>,
    /// `sslrootcert`, if given.
    pub(crate) sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string, URL
/// (`postgres://...?sslmode=...`) or key/value (`host=... sslmode=...`) as libpq reads
/// both, leaving every other byte as it was.
pub(crate) fn split(url: &str) -> Result<Split, TlsError> {
    let mut out = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            out.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            out.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    let rest = match ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))
    {
        Some(_) => split_url(url, &mut take)?,
        None => split_key_values(url, &mut take)?,
    };
    out.rest = rest;
    Ok(out)
}

/// The URL form: parameters follow the first `?` after the credentials (tokio-postgres
/// takes everything up to the first `@` as credentials), `&`-separated, percent-encoded.
fn split_url(url: &str, take: &mut impl FnMut(&str, String) -> bool) -> Result<String, TlsError> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return Ok(url.to_string());
    };
    let mut kept: Vec<&str> = Vec::new();
    for pair in url[q + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = match percent_decode(key).as_slice() {
            b"sslmode" => "sslmode",
            b"sslrootcert" => "sslrootcert",
            _ => {
                kept.push(pair);
                continue;
            }
        };
        let value = String::from_utf8(percent_decode(value)).map_err(|_| TlsError::Invalid {
            parameter: name,
            reason: "the value is not valid UTF-8 once percent-decoded".into(),
        })?;
        take(name, value);
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The key/value form: `key = value` pairs separated by white space, a value either
/// single-quoted or bare, `\` escaping the next character in both (libpq's rules, as
/// tokio-postgres implements them). Pairs this module takes are cut out whole.
fn split_key_values(
    s: &str,
    take: &mut impl FnMut(&str, String) -> bool,
) -> Result<String, TlsError> {
    let mut rest = String::with_capacity(s.len());
    let mut it = s.char_indices().peekable();
    let mut kept_from = 0;
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else { break };
        let mut end = start;
        while let Some((i, c)) = it.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            end = i + c.len_utf8();
        }
        let key = &s[start..end];
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if it.next_if(|(_, c)| *c == '=').is_none() {
            // Malformed: leave it to the driver, which says where.
            return Ok(s.to_string());
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = !quoted;
        while let Some(&(_, c)) = it.peek() {
            if quoted && c == '\'' {
                it.next();
                closed = true;
                break;
            }
            if !quoted && c.is_whitespace() {
                break;
            }
            it.next();
            if c == '\\' {
                if let Some((_, escaped)) = it.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed {
            return Ok(s.to_string());
        }
        let pair_end = it.peek().map_or(s.len(), |&(i, _)| i);
        if take(key, value) {
            rest.push_str(&s[kept_from..start]);
            kept_from = pair_end;
        }
    }
    rest.push_str(&s[kept_from..]);
    Ok(rest)
}
