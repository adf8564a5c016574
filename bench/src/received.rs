//! What a benchmark stream makes of the bytes it receives: the testkit's
//! [`ResponseParser`] (the tests' parser too) splits the response into frames without
//! allocating per frame; [`Reader`] checks each change frame against the run's rows (its
//! tenant, its place in order, its sequence number) and times it from the send time the
//! row carries. No JSON parsing: the few keys are found with `memmem`.

use std::sync::{Arc, LazyLock};

use memchr::memmem;
use pgfeed_testkit::wire::{Field, ResponseParser};

use crate::subscribers::{SubResult, SubShared};

static KEY_SEQ: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"seq\":"));
static KEY_SENT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"sent_us\":"));
static KEY_TENANT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"tenant\":"));

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// The integer after `key` in `data`.
fn json_int(data: &[u8], key: &memmem::Finder<'_>) -> Option<i64> {
    let at = key.find(data)? + key.needle().len();
    let s = skip_ws(&data[at..]);
    let (neg, s) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: i64 = 0;
    for &b in &s[..digits] {
        v = v.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Whether every `"tenant":` string in `data` equals `tenant` (and there is at least one).
fn tenants_match(data: &[u8], tenant: &[u8]) -> bool {
    let mut seen = false;
    for at in KEY_TENANT.find_iter(data) {
        let s = skip_ws(&data[at + KEY_TENANT.needle().len()..]);
        let Some(s) = s.strip_prefix(b"\"") else {
            return false;
        };
        let Some(end) = memchr::memchr(b'"', s) else {
            return false;
        };
        if &s[..end] != tenant {
            return false;
        }
        seen = true;
    }
    seen
}

fn parse_position(id: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(id).ok()?;
    let (c, o) = s.trim().split_once('.')?;
    Some((c.parse().ok()?, o.parse().ok()?))
}

/// One stream's reader: the response so far and what its change frames must satisfy.
pub(crate) struct Reader {
    /// The response: head, de-chunked body, frames.
    pub(crate) parser: ResponseParser,
    check: Check,
}

/// What a stream checks of each change it receives.
struct Check {
    tenant: Arc<str>,
    /// Position of the previous change.
    last_pos: (u64, u64),
}

impl Reader {
    pub(crate) fn new(tenant: Arc<str>) -> Reader {
        Reader {
            parser: ResponseParser::without_headers(),
            check: Check {
                tenant,
                last_pos: (0, 0),
            },
        }
    }

    /// The response's status, once its head has arrived.
    pub(crate) fn status(&self) -> Option<u16> {
        self.parser.head().map(|h| h.status)
    }

    /// Feeds received bytes; returns the number of change events in them (none until the
    /// head says 200). An unreadable chunk size is an error.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        now: u64,
        res: &mut SubResult,
        shared: &SubShared,
    ) -> std::io::Result<u64> {
        self.parser.feed(bytes)?;
        if self.status() != Some(200) {
            return Ok(0);
        }
        let mut changes = 0;
        while let Some(frame) = self.parser.next_frame() {
            let mut id: Option<&[u8]> = None;
            let mut event: &[u8] = b"message";
            let mut data: Option<&[u8]> = None;
            for field in frame.fields() {
                match field {
                    Field::Data(v) => data = Some(v),
                    Field::Event(v) => event = v,
                    Field::Id(v) => id = Some(v),
                    _ => {}
                }
            }
            match event {
                b"change" => {
                    changes += 1;
                    res.change_frames += 1;
                    res.change_bytes += frame.size() as u64;
                    self.check.change(id, data, now, res, shared);
                }
                b"live" => res.live = true,
                b"message" => {}
                _ => res.other_control += 1,
            }
        }
        Ok(changes)
    }
}

impl Check {
    fn change(
        &mut self,
        id: Option<&[u8]>,
        data: Option<&[u8]>,
        now: u64,
        res: &mut SubResult,
        shared: &SubShared,
    ) {
        let Some(data) = data else {
            res.malformed += 1;
            return;
        };
        if let Some(pos) = id.and_then(parse_position) {
            if pos <= self.last_pos {
                res.out_of_order += 1;
            }
            self.last_pos = pos;
        }
        let (Some(seq), Some(sent)) = (json_int(data, &KEY_SEQ), json_int(data, &KEY_SENT)) else {
            res.malformed += 1;
            return;
        };
        let rel = seq - shared.base;
        let own_rows = rel >= 0 && (rel as u64) % shared.write_tenants == u64::from(res.tenant);
        if !own_rows || !tenants_match(data, self.tenant.as_bytes()) {
            res.leaks += 1;
            return;
        }
        res.seqs.push(u32::try_from(rel).unwrap_or(u32::MAX));
        let lat = now.saturating_sub(u64::try_from(sent).unwrap_or(0));
        res.lat_us.push(u32::try_from(lat).unwrap_or(u32::MAX));
    }
}
