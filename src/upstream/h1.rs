//! HTTP/1.1 toward the upstream, without I/O: the request head written into one buffer, the
//! response head parsed by `httparse`, and the response body's framing (RFC 9112 §6) decoded
//! strictly. Whatever two readers could frame differently is an [`Error`], never a guess: the
//! exchange fails (502) and its connection is closed, so no byte of one response can be read as
//! part of another.

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// The most bytes a response head may take (nginx's default is 4 or 8 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields a response head may carry.
pub const MAX_HEADERS: usize = 128;
/// The most bytes a chunk-size line's extensions may take.
const MAX_CHUNK_EXTENSION: usize = 4096;
/// The most bytes of trailer fields after the last chunk (they are read, checked and dropped).
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a response cannot be framed without guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The head is not valid HTTP/1.x: bad status line, bad header syntax, obs-fold, bare CR.
    Malformed(&'static str),
    /// The head is longer than [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    TooManyHeaders,
    /// `Transfer-Encoding` and `Content-Length` together (a smuggling classic).
    LengthAndChunked,
    /// `Content-Length` not one non-negative decimal number, or several that differ.
    BadContentLength,
    /// A transfer coding other than one final `chunked`, or any on an HTTP/1.0 response.
    UnsupportedCoding,
    /// A chunk-size line that is not hex digits (at most 16) and extensions, ended by CRLF.
    BadChunk,
    /// Trailer fields that are malformed or over [`MAX_TRAILER_BYTES`].
    BadTrailers,
    /// The upstream closed the connection before the body's declared end.
    Truncated,
    /// The upstream closed the connection before (or in) the response head.
    ClosedBeforeHead,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Malformed(what) => write!(f, "malformed response head: {what}"),
            Error::HeadTooLarge => write!(f, "response head over {MAX_HEAD_BYTES} bytes"),
            Error::TooManyHeaders => write!(f, "more than {MAX_HEADERS} response header fields"),
            Error::LengthAndChunked => {
                f.write_str("Transfer-Encoding together with Content-Length")
            }
            Error::BadContentLength => f.write_str("invalid or conflicting Content-Length"),
            Error::UnsupportedCoding => {
                f.write_str("a transfer coding other than one final chunked")
            }
            Error::BadChunk => f.write_str("malformed chunked framing"),
            Error::BadTrailers => f.write_str("malformed or oversized trailer fields"),
            Error::Truncated => f.write_str("response body shorter than its framing declared"),
            Error::ClosedBeforeHead => {
                f.write_str("connection closed before a complete response head")
            }
        }
    }
}

impl std::error::Error for Error {}

/// How the request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body, and no framing header (a GET).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (a client body of unknown length).
    Chunked,
}

/// Writes the request head into `dst`: the request line (origin form), every header of `parts`
/// but the framing ones, then the framing `body` needs. Names are written in title case
/// (`X-Auth-Token`) when `title_case`, else as `http` keeps them (lower case).
pub fn encode_request(
    parts: &http::request::Parts,
    body: RequestBody,
    title_case: bool,
    dst: &mut BytesMut,
) {
    dst.extend_from_slice(parts.method.as_str().as_bytes());
    dst.extend_from_slice(b" ");
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    dst.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        let start = dst.len();
        dst.extend_from_slice(name.as_str().as_bytes());
        if title_case {
            // In place: the first letter, and each after a `-`.
            let written = &mut dst[start..];
            written[0].make_ascii_uppercase();
            for i in 1..written.len() {
                if written[i - 1] == b'-' {
                    written[i].make_ascii_uppercase();
                }
            }
        }
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    match body {
        RequestBody::None => {}
        RequestBody::Length(n) => {
            dst.extend_from_slice(b"Content-Length: ");
            dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
        RequestBody::Chunked => dst.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    dst.extend_from_slice(b"\r\n");
}

/// The framing header of one chunk of `len` bytes (`{hex}\r\n`), into `dst`.
pub fn chunk_header(len: usize, dst: &mut [u8; 18]) -> &[u8] {
    let mut n = len;
    let mut at = 16;
    loop {
        at -= 1;
        dst[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst[16] = b'\r';
    dst[17] = b'\n';
    &dst[at..]
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The header fields (names lower-cased, values sharing the head's bytes).
    pub headers: HeaderMap,
    /// How the body that follows is framed.
    pub framing: Framing,
    /// Whether the connection may carry another exchange once this response has ended.
    pub keep_alive: bool,
    /// A fingerprint of the header names as the upstream wrote them, when any had an upper-case
    /// letter (`None`: all lower case, nothing to keep).
    pub case: Option<u64>,
    /// The head's bytes, for reading the names' case again ([`raw_names`]).
    pub raw: Bytes,
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// Parses a response head at the start of `buf`, for a request with `method`. `Ok(None)`: the
/// head is not complete yet (read more). On success the head's bytes are taken from `buf`,
/// which then starts with the body. `map(n)` gives the empty map the `n` fields go into.
pub fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    map: impl FnOnce(usize) -> HeaderMap,
) -> Result<Option<Head>, Error> {
    // Uninitialised: an initialised array of 128 fields is 4 KiB written per response.
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(Error::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
        Err(e) => return Err(Error::Malformed(parse_error(e))),
    };
    if len > MAX_HEAD_BYTES {
        return Err(Error::HeadTooLarge);
    }
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Malformed("status code"))?;
    // Where each name and value lies in the head, so that the values can share its bytes.
    let base = buf.as_ptr() as usize;
    // u16: a head is at most 64 KiB.
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = response.headers.len();
    let mut print = FNV_OFFSET;
    let mut cased = false;
    for (field, span) in response.headers.iter().zip(spans.iter_mut()) {
        let name = field.name.as_bytes();
        cased |= name.iter().any(u8::is_ascii_uppercase);
        for &b in name.iter().chain(b":") {
            print = (print ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u16;
        *span = (
            at(name),
            name.len() as u16,
            at(field.value),
            field.value.len() as u16,
        );
    }
    let raw = buf.split_to(len).freeze();
    let mut headers = map(count);
    let mut fields = Fields::default();
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let (name_at, name_len) = (usize::from(name_at), usize::from(name_len));
        let (value_at, value_len) = (usize::from(value_at), usize::from(value_len));
        let name = &raw[name_at..name_at + name_len];
        let name = header_name(name)?;
        let value = raw.slice(value_at..value_at + value_len);
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| Error::Malformed("header value"))?;
        fields.add(&name, value.as_bytes());
        headers.append(name, value);
    }
    let (framing, keep_alive) = framing(status, version, method, &fields)?;
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
        case: cased.then_some(print),
        raw,
    }))
}

/// How many header names a thread remembers as parsed (an upstream sends the same few).
const NAMES: usize = 16;

thread_local! {
    /// Header names as an upstream wrote them, and what they parsed to, most recent first.
    static PARSED_NAMES: std::cell::RefCell<Vec<(Box<[u8]>, HeaderName)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `raw` as a header name: remembered when it was seen lately (parsing one costs more than
/// comparing a few).
fn header_name(raw: &[u8]) -> Result<HeaderName, Error> {
    PARSED_NAMES.with_borrow_mut(|names| {
        if let Some(at) = names.iter().position(|(seen, _)| **seen == *raw) {
            return Ok(names[at].1.clone());
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| Error::Malformed("header name"))?;
        if names.len() == NAMES {
            names.pop();
        }
        names.insert(0, (raw.into(), name.clone()));
        Ok(name)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The header names of a head's bytes, as the upstream wrote them (for [`Head::raw`]).
pub fn raw_names(raw: &[u8]) -> Vec<Bytes> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(raw) {
        Ok(httparse::Status::Complete(_)) => response
            .headers
            .iter()
            .map(|f| Bytes::copy_from_slice(f.name.as_bytes()))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value (a bare CR or a control character)",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status code",
        httparse::Error::Token => "token",
        httparse::Error::Version => "HTTP version",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

/// What the framing needs from a head's fields, gathered as they are read (no lookups after).
#[derive(Default)]
struct Fields {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
    /// Transfer codings named, over every `Transfer-Encoding` line.
    codings: usize,
    /// Whether the last coding named was `chunked`.
    chunked_last: bool,
    /// A `Content-Length` line was there.
    length_seen: bool,
    /// Its value, when every one was the same valid number.
    length: Option<u64>,
    /// A `Content-Length` that is not a number, or two that differ.
    bad_length: bool,
}

impl Fields {
    fn add(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::CONNECTION {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::TRANSFER_ENCODING {
            for coding in value.split(|&b| b == b',') {
                self.codings += 1;
                self.chunked_last = coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if name == header::CONTENT_LENGTH {
            self.length_seen = true;
            for item in value.split(|&b| b == b',') {
                match decimal(item.trim_ascii()) {
                    Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                    _ => self.bad_length = true,
                }
            }
        }
    }
}

/// RFC 9112 §6.3 for a response, strictly: the body's framing, and whether the connection can
/// be kept afterwards.
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    fields: &Fields,
) -> Result<(Framing, bool), Error> {
    let mut keep_alive = !fields.close && (version == Version::HTTP_11 || fields.keep_alive);
    let chunked = match fields.codings {
        0 => false,
        _ if version == Version::HTTP_10 => return Err(Error::UnsupportedCoding),
        _ if fields.length_seen => return Err(Error::LengthAndChunked),
        // Exactly one coding, `chunked`, over every field line.
        1 if fields.chunked_last => true,
        _ => return Err(Error::UnsupportedCoding),
    };
    if fields.bad_length {
        return Err(Error::BadContentLength);
    }
    let length = fields.length;
    let bodiless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless {
        // A 204 that declares a body may well send one: never read another response after it.
        if status == StatusCode::NO_CONTENT && (chunked || length.is_some_and(|n| n > 0)) {
            keep_alive = false;
        }
        return Ok((Framing::Empty, keep_alive));
    }
    Ok(match (chunked, length) {
        (true, _) => (Framing::Chunked, keep_alive),
        (false, Some(0)) => (Framing::Empty, keep_alive),
        (false, Some(n)) => (Framing::Length(n), keep_alive),
        (false, None) => (Framing::Close, false),
    })
}

/// `1*DIGIT` as a `u64` (no sign, no space, no overflow).
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// Nothing more in the buffer: read more.
    More,
    /// The body has ended (the buffer holds what follows it).
    End,
}

/// A response body's framing, decoded as the bytes arrive.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug)]
enum State {
    Length(u64),
    Close,
    Done,
    /// Hex digits of a chunk size so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// Spaces after the size, before `;` or CR.
    SizeSpace(u64),
    /// Chunk extensions (ignored), up to CR.
    Extension {
        value: u64,
        len: usize,
    },
    /// The LF ending a chunk-size line.
    SizeLf(u64),
    /// Chunk data still to come.
    Data(u64),
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// The trailer section (after the last chunk), checked then dropped.
    Trailers(Vec<u8>),
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size {
                value: 0,
                digits: 0,
            },
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The body bytes still declared (for a `Content-Length` body), for size hints.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next body bytes (or framing) from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            if buf.is_empty() && !matches!(self.state, State::Done) {
                return Ok(Decoded::More);
            }
            match &mut self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(n) => {
                    let take = (*n).min(buf.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Close => return Ok(Decoded::Data(buf.split().freeze())),
                State::Data(n) => {
                    let take = (*n).min(buf.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                _ => {
                    let byte = buf[0];
                    buf.advance(1);
                    self.framing_byte(byte)?;
                }
            }
        }
    }

    /// One byte of chunked framing (sizes, extensions, CRLFs, trailers).
    fn framing_byte(&mut self, byte: u8) -> Result<(), Error> {
        self.state = match std::mem::replace(&mut self.state, State::Done) {
            State::Size { value, digits } => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    // 16 hex digits fill a u64: a 17th overflows.
                    if digits == 16 {
                        return Err(Error::BadChunk);
                    }
                    let digit = (byte as char).to_digit(16).unwrap_or(0);
                    State::Size {
                        value: value << 4 | u64::from(digit),
                        digits: digits + 1,
                    }
                }
                b' ' | b'\t' if digits > 0 => State::SizeSpace(value),
                b';' if digits > 0 => State::Extension { value, len: 0 },
                b'\r' if digits > 0 => State::SizeLf(value),
                _ => return Err(Error::BadChunk),
            },
            State::SizeSpace(value) => match byte {
                b' ' | b'\t' => State::SizeSpace(value),
                b';' => State::Extension { value, len: 0 },
                b'\r' => State::SizeLf(value),
                _ => return Err(Error::BadChunk),
            },
            State::Extension { value, len } => match byte {
                b'\r' => State::SizeLf(value),
                _ if len >= MAX_CHUNK_EXTENSION => return Err(Error::BadChunk),
                b'\t' | b' '..=b'~' | 0x80..=0xff => State::Extension {
                    value,
                    len: len + 1,
                },
                _ => return Err(Error::BadChunk),
            },
            State::SizeLf(value) => match byte {
                b'\n' if value == 0 => State::Trailers(Vec::new()),
                b'\n' => State::Data(value),
                _ => return Err(Error::BadChunk),
            },
            State::DataCr if byte == b'\r' => State::DataLf,
            State::DataLf if byte == b'\n' => State::Size {
                value: 0,
                digits: 0,
            },
            State::Trailers(mut section) => {
                if section.len() >= MAX_TRAILER_BYTES {
                    return Err(Error::BadTrailers);
                }
                section.push(byte);
                if section == b"\r\n" {
                    State::Done
                } else if section.ends_with(b"\r\n\r\n") {
                    check_trailers(&section)?;
                    State::Done
                } else {
                    State::Trailers(section)
                }
            }
            _ => return Err(Error::BadChunk),
        };
        Ok(())
    }

    /// The upstream closed the connection: the end of a close-delimited body, else too early.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(Error::Truncated),
        }
    }
}

/// Trailer fields must be well-formed header fields (they are then dropped).
fn check_trailers(section: &[u8]) -> Result<(), Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) if len == section.len() => Ok(()),
        _ => Err(Error::BadTrailers),
    }
}

/// What a whole response, given as `pieces` of bytes in arrival order and then the end of the
/// connection, frames as for a request with `method`: the final status, the body, and whether
/// the connection could carry another exchange (1xx heads skipped). For the differential test
/// and the fuzz target; the pool drives the same parser and decoder over a socket.
pub fn frame_response(method: &Method, pieces: &[&[u8]]) -> Result<(u16, Vec<u8>, bool), Error> {
    let mut buf = BytesMut::new();
    let mut pieces = pieces.iter();
    let head = loop {
        match parse_head(&mut buf, method, HeaderMap::with_capacity)? {
            Some(head) if head.status.is_informational() && head.status != 101 => continue,
            Some(head) => break head,
            None => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return Err(Error::ClosedBeforeHead),
            },
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::End => break,
            Decoded::More => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => {
                    decoder.eof()?;
                    break;
                }
            },
        }
    }
    // Bytes after the response's end on a connection that stays open: never reused.
    let rest = !buf.is_empty() || pieces.any(|p| !p.is_empty());
    let reusable = head.keep_alive && head.framing != Framing::Close && !rest;
    Ok((head.status.as_u16(), body, reusable))
}

#[cfg(test)]
mod tests;
