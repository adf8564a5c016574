//! Sans-I/O parsing of an HTTP/1.1 response as pgfeed sends it: the head, the body
//! (chunked, by `Content-Length`, or until the server closes) and the Server-Sent Events
//! frames in it. The tests' clients ([`crate::get`], [`crate::SseClient`]) and the
//! benchmark's thousands of streams feed [`ResponseParser`] the bytes they read: one parser
//! for all, which allocates nothing per frame (a stream's two buffers grow to its largest
//! read and are reused).

use std::sync::LazyLock;

use memchr::memmem;

/// The searchers of the parser, built once: a frame's end, a line's end, a head's end.
static FRAME_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\n\n"));
static CRLF: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\r\n"));
static HEAD_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memmem::find(haystack, needle)
}

/// The status code (0 when unreadable) and the headers (names lower-cased) of a response
/// head, without its final blank line.
pub fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// A request head: `method path`, `Host`, `Connection: close`, then `headers`, then the
/// blank line. The server closes the connection after the response (or the stream).
pub fn request_head(
    method: &str,
    path: &str,
    host: impl std::fmt::Display,
    headers: &[(&str, &str)],
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// A response head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status code (0 when unreadable).
    pub status: u16,
    /// Headers, names lower-cased (none from [`ResponseParser::without_headers`]).
    pub headers: Vec<(String, String)>,
}

/// How the body is delimited, and where its decoding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// `Transfer-Encoding: chunked`: reading a hex size line.
    ChunkSize,
    /// Inside a chunk's data, this many bytes left.
    ChunkData(usize),
    /// The CRLF after a chunk's data, this many bytes left.
    ChunkCrlf(usize),
    /// `Content-Length`: this many bytes left.
    Length(usize),
    /// Neither: the body ends when the server closes.
    UntilClose,
    /// The last chunk, or the last byte of the length, was read.
    Complete,
}

/// An HTTP/1.1 response fed as it arrives: the head once complete, then the body decoded
/// into a buffer that is read either whole ([`ResponseParser::unread`]) or frame by frame
/// ([`ResponseParser::next_frame`]).
#[derive(Debug)]
pub struct ResponseParser {
    head: Option<Head>,
    body: Body,
    /// Bytes received and not yet decoded (the head, or chunk framing, still incomplete).
    raw: Vec<u8>,
    /// Decoded body; its first `read` bytes were consumed by [`Self::next_frame`].
    text: Vec<u8>,
    read: usize,
    /// Whether [`Head::headers`] is kept (else empty, once the body's delimiting is known).
    keep_headers: bool,
}

impl Default for ResponseParser {
    fn default() -> Self {
        ResponseParser {
            head: None,
            body: Body::UntilClose,
            raw: Vec::new(),
            text: Vec::new(),
            read: 0,
            keep_headers: true,
        }
    }
}

impl ResponseParser {
    /// A parser before the first byte.
    pub fn new() -> ResponseParser {
        ResponseParser::default()
    }

    /// A parser that keeps only the status of the head (its headers are read for the
    /// body's delimiting, then dropped): a stream among thousands holds no header strings.
    pub fn without_headers() -> ResponseParser {
        ResponseParser {
            keep_headers: false,
            ..ResponseParser::default()
        }
    }

    /// Feeds bytes read from the connection. Returns how many bytes of body they decoded:
    /// the last ones of [`Self::unread`]. An unreadable chunk size is `InvalidData`.
    pub fn feed(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.read > 0 {
            self.text.drain(..self.read);
            self.read = 0;
        }
        self.raw.extend_from_slice(bytes);
        if self.head.is_none() {
            let Some(end) = HEAD_END.find(&self.raw) else {
                return Ok(0);
            };
            let (status, headers) = parse_head(&String::from_utf8_lossy(&self.raw[..end]));
            self.raw.drain(..end + 4);
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            self.body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                Body::ChunkSize
            } else if let Some(n) = header("content-length").and_then(|v| v.parse().ok()) {
                if n == 0 {
                    Body::Complete
                } else {
                    Body::Length(n)
                }
            } else {
                Body::UntilClose
            };
            let headers = if self.keep_headers {
                headers
            } else {
                Vec::new()
            };
            self.head = Some(Head { status, headers });
        }
        let before = self.text.len();
        self.decode()?;
        Ok(self.text.len() - before)
    }

    /// Moves what `raw` holds of the body into `text`.
    fn decode(&mut self) -> std::io::Result<()> {
        let mut pos = 0;
        loop {
            let avail = self.raw.len() - pos;
            match self.body {
                Body::Complete => {
                    pos = self.raw.len();
                    break;
                }
                Body::UntilClose => {
                    self.text.extend_from_slice(&self.raw[pos..]);
                    pos = self.raw.len();
                    break;
                }
                Body::Length(left) => {
                    let take = left.min(avail);
                    self.text.extend_from_slice(&self.raw[pos..pos + take]);
                    pos += take;
                    self.body = if take == left {
                        Body::Complete
                    } else {
                        Body::Length(left - take)
                    };
                    break;
                }
                Body::ChunkSize => {
                    let Some(nl) = CRLF.find(&self.raw[pos..]) else {
                        break;
                    };
                    let line = &self.raw[pos..pos + nl];
                    let hex = line.split(|b| *b == b';').next().unwrap_or(b"");
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                        .ok_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                        })?;
                    pos += nl + 2;
                    self.body = if size == 0 {
                        Body::Complete
                    } else {
                        Body::ChunkData(size)
                    };
                }
                Body::ChunkData(left) => {
                    if avail == 0 {
                        break;
                    }
                    let take = left.min(avail);
                    self.text.extend_from_slice(&self.raw[pos..pos + take]);
                    pos += take;
                    self.body = if take == left {
                        Body::ChunkCrlf(2)
                    } else {
                        Body::ChunkData(left - take)
                    };
                }
                Body::ChunkCrlf(left) => {
                    if avail == 0 {
                        break;
                    }
                    let take = left.min(avail);
                    pos += take;
                    self.body = if take == left {
                        Body::ChunkSize
                    } else {
                        Body::ChunkCrlf(left - take)
                    };
                }
            }
        }
        self.raw.drain(..pos);
        Ok(())
    }

    /// The response head, once it has arrived.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// Whether the body is complete: its last chunk or the last byte of its
    /// `Content-Length` was read. A body without either ends when the server closes, which
    /// only the reader of the connection sees.
    pub fn is_complete(&self) -> bool {
        self.body == Body::Complete
    }

    /// The decoded body not yet consumed as frames.
    pub fn unread(&self) -> &[u8] {
        &self.text[self.read..]
    }

    /// The next complete SSE frame of the body (ended by a blank line), consumed.
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        let start = self.read;
        let end = start + FRAME_END.find(&self.text[start..])?;
        self.read = end + 2;
        Some(Frame {
            block: &self.text[start..end],
        })
    }
}

/// One Server-Sent Events frame, borrowed from the parser's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The frame's lines, without the blank line that ended it.
    block: &'a [u8],
}

/// One line of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// `:` and anything after (a heartbeat such as `: keepalive`).
    Comment(&'a [u8]),
    /// The value of `retry: `.
    Retry(&'a [u8]),
    /// The value of `id: `.
    Id(&'a [u8]),
    /// The value of `event: `.
    Event(&'a [u8]),
    /// The value of one `data: ` line.
    Data(&'a [u8]),
    /// Any other line.
    Other(&'a [u8]),
}

impl<'a> Frame<'a> {
    /// The frame's size as sent: its lines and the blank line (chunk framing aside).
    pub fn size(&self) -> usize {
        self.block.len() + 2
    }

    /// The frame's lines (a trailing `\r` removed), in order.
    pub fn fields(&self) -> impl Iterator<Item = Field<'a>> + use<'a> {
        self.block.split(|b| *b == b'\n').map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b":") {
                Field::Comment(line)
            } else if let Some(v) = line.strip_prefix(b"retry: ") {
                Field::Retry(v)
            } else if let Some(v) = line.strip_prefix(b"id: ") {
                Field::Id(v)
            } else if let Some(v) = line.strip_prefix(b"event: ") {
                Field::Event(v)
            } else if let Some(v) = line.strip_prefix(b"data: ") {
                Field::Data(v)
            } else {
                Field::Other(line)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunked SSE response in three chunks: `retry:`, a change, a comment and `live`.
    const STREAM: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
        Transfer-Encoding: chunked\r\n\r\n\
        a\r\nretry: 5\n\n\r\n\
        28\r\nid: 1.0\nevent: change\ndata: {\"seq\": 1}\n\n\r\n\
        22\r\n: keepalive\n\nevent: live\ndata: 1\n\n\r\n\
        0\r\n\r\n";

    /// Every frame's fields, as text.
    fn frames(parser: &mut ResponseParser) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        while let Some(frame) = parser.next_frame() {
            out.push(frame.fields().map(|f| format!("{f:?}")).collect());
        }
        out
    }

    #[test]
    fn a_stream_fed_whole_or_byte_by_byte_gives_the_same_frames() {
        let mut whole = ResponseParser::new();
        whole.feed(STREAM).unwrap();
        assert_eq!(whole.head().map(|h| h.status), Some(200));
        assert!(whole.is_complete());
        let expected = frames(&mut whole);
        assert_eq!(expected.len(), 4, "{expected:?}");

        let mut bytes = ResponseParser::new();
        let mut seen = Vec::new();
        let mut decoded = 0;
        for b in STREAM {
            decoded += bytes.feed(std::slice::from_ref(b)).unwrap();
            seen.extend(frames(&mut bytes));
        }
        assert_eq!(seen, expected);
        assert_eq!(decoded, 0xa + 0x28 + 0x22, "every body byte decoded once");
        assert!(bytes.is_complete());
    }

    #[test]
    fn without_headers_the_body_is_still_de_chunked() {
        let mut p = ResponseParser::without_headers();
        p.feed(STREAM).unwrap();
        assert!(
            p.head()
                .is_some_and(|h| h.status == 200 && h.headers.is_empty())
        );
        assert!(p.is_complete());
        assert_eq!(frames(&mut p).len(), 4);
    }

    #[test]
    fn fields_and_sizes_of_a_change_frame() {
        let mut p = ResponseParser::new();
        p.feed(STREAM).unwrap();
        p.next_frame().unwrap();
        let change = p.next_frame().unwrap();
        assert_eq!(change.size(), 0x28);
        let fields: Vec<Field<'_>> = change.fields().collect();
        assert_eq!(
            fields,
            [
                Field::Id(b"1.0"),
                Field::Event(b"change"),
                Field::Data(b"{\"seq\": 1}"),
            ]
        );
    }

    #[test]
    fn a_content_length_body_is_complete_at_its_length() {
        let mut p = ResponseParser::new();
        let n = p
            .feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nab")
            .unwrap();
        assert_eq!((n, p.is_complete()), (2, false));
        p.feed(b"cd").unwrap();
        assert!(p.is_complete());
        assert_eq!(p.unread(), b"abcd");
        assert_eq!(p.head().map(|h| h.status), Some(404));
    }

    #[test]
    fn an_unreadable_chunk_size_is_an_error() {
        let mut p = ResponseParser::new();
        let e = p
            .feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
