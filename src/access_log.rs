//! The access log: one line per request, off the hot path's costs.
//!
//! Lines are formatted by hand (no `tracing` field machinery) into a per-worker buffer that is
//! handed to a writer thread when it reaches 64 KiB or once a second, as nginx's
//! `access_log … buffer=64k flush=1s`: whole lines only, one `write` per batch under the
//! standard-output lock (so a line is never torn by another writer of this process), and the
//! writer sleeps on its channel instead of spinning. Audit and other log lines do not go
//! through this buffer: they are written at once. `RUST_LOG` still decides (`access=off`).

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// How much a worker buffers before handing lines to the writer.
const BUFFER_BYTES: usize = 64 * 1024;
/// Lines are handed over once the buffer is this full, so that the next line rarely makes it
/// grow (a reallocation would copy the whole buffer).
const HAND_OVER_AT: usize = BUFFER_BYTES - 4 * 1024;
/// The room a pending line's head starts with; heads this size or smaller are reused.
const PENDING_BYTES: usize = 512;
/// Heads a thread keeps for reuse (more are freed): one per concurrent streamed response.
const MAX_SPARE: usize = 256;
/// How often workers hand over what they have.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Batches waiting for the writer; beyond it a worker waits (as nginx waits on a slow disk).
const QUEUE: usize = 16;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (the default).
    Json,
    /// `key=value` pairs for humans.
    Text,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Chooses the format (once, at startup; JSON otherwise).
pub fn init(format: Format) {
    let _ = FORMAT.set(format);
}

/// What one access line says.
pub struct Line<'a> {
    /// The request method.
    pub method: &'a str,
    /// The path as the client sent it (never the query: it may hold a credential).
    pub path: &'a str,
    /// The response status.
    pub status: u16,
    /// The route's prefix, or `tokengate:…` for tokengate's own endpoints.
    pub route: Option<&'a str>,
    /// The verified subject.
    pub subject: Option<&'a str>,
    /// The dialect the credential came in.
    pub source: Option<&'a str>,
    /// Without a credential: a known dialect the request used that the config does not accept
    /// (written only when set).
    pub ignored: Option<&'static str>,
    /// The rule that answered 403 (`deny[0]`, `no allow`; written only when set).
    pub rule: Option<&'a str>,
    /// The limit that answered 429 (`failed_auth`, `subject`, `token`, `client`; written only
    /// when set).
    pub limit: Option<&'static str>,
    /// `allowed`, `denied`, `missing`, `error`.
    pub auth: Option<&'a str>,
    /// Who decided (`cache`, a validator, `x509`, `none`).
    pub validator: Option<&'a str>,
    /// The client's address (as text: the connection makes it once).
    pub client: &'a str,
    /// From request head to response head.
    pub duration: Duration,
    /// The upstream's share of it.
    pub upstream: Option<Duration>,
    /// `X-Request-Id` (the client's, or the one tokengate made).
    pub request_id: &'a str,
    /// The W3C trace id, when the request is part of a trace.
    pub trace_id: Option<&'a str>,
    /// The client's `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// The `Host` (or HTTP/2 `:authority`) the client asked for.
    pub host: Option<&'a str>,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub protocol: &'static str,
    /// The id of the issued token that authenticated the request (never the token).
    pub token_id: Option<&'a str>,
}

/// A line waiting for its response body to end: everything but `bytes_sent`.
pub struct Pending {
    head: Vec<u8>,
    format: Format,
}

impl Pending {
    /// Completes the line with the body bytes sent, and appends it like `write`.
    pub fn finish(self, bytes_sent: u64) {
        let buffered = crate::worker::slot() != usize::MAX;
        BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.extend_from_slice(&self.head);
            finish_line(&mut buffer, bytes_sent, self.format);
            if !buffered || buffer.len() >= HAND_OVER_AT {
                hand_over(&mut buffer);
            }
        });
        let mut head = self.head;
        if head.capacity() <= PENDING_BYTES {
            head.clear();
            SPARE.with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < MAX_SPARE {
                    spare.push(head);
                }
            });
        }
    }
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(BUFFER_BYTES));
    static ENABLED: Cell<Option<bool>> = const { Cell::new(None) };
    /// Heads of finished pending lines, kept for the next ones (no allocation per request).
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// The current second, formatted (`2026-11-27T08:54:47`): formatted once a second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes `now` as RFC 3339 UTC with microseconds (`2026-11-27T08:54:47.123456Z`).
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `…:47Z` without the `Z`: the fraction goes in between.
            second.1 = text.trim_end_matches('Z').to_string();
            second.0 = secs;
        }
        out.extend_from_slice(second.1.as_bytes());
    });
    out.push(b'.');
    padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// Whether access lines are wanted (`RUST_LOG`, read once at start-up: the filter is not
/// reloaded, so the answer is asked of `tracing` once per thread and then remembered).
pub fn enabled() -> bool {
    ENABLED.with(|enabled| match enabled.get() {
        Some(yes) => yes,
        None => {
            let yes = tracing::enabled!(target: "access", tracing::Level::INFO);
            // Only a worker remembers: it starts after logging is set up, while other threads
            // (tests, the CLI) may ask before.
            if crate::worker::slot() != usize::MAX {
                enabled.set(Some(yes));
            }
            yes
        }
    })
}

/// Appends one line whose response body is `bytes_sent` long. Worker threads buffer it; any
/// other thread writes it at once.
pub fn write(line: &Line<'_>, bytes_sent: u64) {
    let buffered = crate::worker::slot() != usize::MAX;
    let format = *FORMAT.get().unwrap_or(&Format::Json);
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        format_line(&mut buffer, line, format);
        finish_line(&mut buffer, bytes_sent, format);
        if !buffered || buffer.len() >= HAND_OVER_AT {
            hand_over(&mut buffer);
        }
    });
}

/// Formats a line whose response body is still streaming; `Pending::finish` completes it.
pub fn pending(line: &Line<'_>) -> Pending {
    let format = *FORMAT.get().unwrap_or(&Format::Json);
    let mut head = SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(PENDING_BYTES));
    format_line(&mut head, line, format);
    Pending { head, format }
}

fn finish_line(out: &mut Vec<u8>, bytes_sent: u64, format: Format) {
    number(out, bytes_sent);
    out.extend_from_slice(match format {
        Format::Json => b"}\n",
        Format::Text => b"\n",
    });
}

/// A decimal number.
fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A decimal number of at least `width` digits, zero-padded (the fraction of a second).
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    // u64::MAX has 20 digits.
    let mut digits = [b'0'; 20];
    let mut rest = n;
    let mut first = digits.len();
    while rest > 0 {
        first -= 1;
        digits[first] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    // At least one digit, and `width` of them (up to 20).
    let width = width.clamp(1, digits.len());
    out.extend_from_slice(&digits[first.min(digits.len() - width)..]);
}

/// Hands this thread's buffered lines to the writer (the workers' once-a-second tick, and
/// their last act).
pub fn flush_thread() {
    BUFFER.with(|buffer| hand_over(&mut buffer.borrow_mut()));
}

/// Waits until every batch handed over so far has been written (at shutdown).
pub fn sync() {
    let (done, wait) = sync_channel(1);
    if writer().send(Batch::Sync(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(5));
    }
}

enum Batch {
    Lines(Vec<u8>),
    Sync(SyncSender<()>),
}

fn hand_over(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    let full = std::mem::replace(buffer, Vec::with_capacity(BUFFER_BYTES));
    let _ = writer().send(Batch::Lines(full));
}

/// The writer thread's queue, started on first use.
fn writer() -> &'static SyncSender<Batch> {
    static WRITER: OnceLock<SyncSender<Batch>> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (send, receive) = sync_channel::<Batch>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("tokengate-access-log".into())
            .spawn(move || {
                while let Ok(batch) = receive.recv() {
                    match batch {
                        Batch::Lines(lines) => {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(&lines);
                            let _ = out.flush();
                        }
                        Batch::Sync(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access-log writer");
        }
        send
    })
}

fn format_line(out: &mut Vec<u8>, line: &Line<'_>, format: Format) {
    // Writing into a Vec cannot fail: the results are ignored.
    let now = SystemTime::now();
    match format {
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out, now);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"access\",\"method\":");
            json_plain(out, Some(line.method));
            let text = |out: &mut Vec<u8>, name: &[u8], value: Option<&str>| {
                out.extend_from_slice(name);
                json_string(out, value);
            };
            let plain = |out: &mut Vec<u8>, name: &[u8], value: Option<&str>| {
                out.extend_from_slice(name);
                json_plain(out, value);
            };
            text(out, b",\"path\":", Some(line.path));
            out.extend_from_slice(b",\"status\":");
            number(out, u64::from(line.status));
            text(out, b",\"route\":", line.route);
            text(out, b",\"subject\":", line.subject);
            text(out, b",\"source\":", line.source);
            if line.ignored.is_some() {
                plain(out, b",\"ignored\":", line.ignored);
            }
            if line.limit.is_some() {
                plain(out, b",\"limit\":", line.limit);
            }
            if line.rule.is_some() {
                text(out, b",\"rule\":", line.rule);
            }
            plain(out, b",\"auth\":", line.auth);
            plain(out, b",\"validator\":", line.validator);
            plain(out, b",\"client\":", Some(line.client));
            out.extend_from_slice(b",\"duration_ms\":");
            millis(out, Some(line.duration));
            out.extend_from_slice(b",\"upstream_ms\":");
            millis(out, line.upstream);
            plain(out, b",\"request_id\":", Some(line.request_id));
            plain(out, b",\"trace_id\":", line.trace_id);
            text(out, b",\"user_agent\":", line.user_agent);
            text(out, b",\"host\":", line.host);
            plain(out, b",\"protocol\":", Some(line.protocol));
            text(out, b",\"token_id\":", line.token_id);
            // `finish_line` writes the number and closes the object.
            out.extend_from_slice(b",\"bytes_sent\":");
        }
        Format::Text => {
            timestamp(out, now);
            let _ = write!(
                out,
                "  INFO access: method={} path={} status={} route={} subject={} source={} \
                 auth={} validator={} client={}",
                line.method,
                line.path.escape_debug(),
                line.status,
                line.route.unwrap_or("-"),
                line.subject.unwrap_or("-").escape_debug(),
                line.source.unwrap_or("-"),
                line.auth.unwrap_or("-"),
                line.validator.unwrap_or("-"),
                line.client,
            );
            if let Some(ignored) = line.ignored {
                let _ = write!(out, " ignored={ignored}");
            }
            if let Some(limit) = line.limit {
                let _ = write!(out, " limit={limit}");
            }
            if let Some(rule) = line.rule {
                let _ = write!(out, " rule={rule:?}");
            }
            out.extend_from_slice(b" duration_ms=");
            millis(out, Some(line.duration));
            out.extend_from_slice(b" upstream_ms=");
            millis(out, line.upstream);
            let _ = write!(
                out,
                " request_id={} trace_id={} user_agent={:?} host={} protocol={} token_id={} bytes_sent=",
                line.request_id,
                line.trace_id.unwrap_or("-"),
                line.user_agent.unwrap_or("-"),
                line.host.unwrap_or("-").escape_debug(),
                line.protocol,
                line.token_id.unwrap_or("-"),
            );
        }
    }
}

/// A duration in milliseconds with microsecond precision (`0.249`), or `null`.
fn millis(out: &mut Vec<u8>, d: Option<Duration>) {
    match d {
        Some(d) => {
            let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            number(out, micros / 1000);
            out.push(b'.');
            padded(out, micros % 1000, 3);
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string (escaped), or `null`.
fn json_string(out: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        out.extend_from_slice(b"null");
        return;
    };
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if any_escape(bytes) {
        escape_into(out, bytes);
    } else {
        // The common value (a path, an id, a host) needs no escape: one copy.
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// A JSON string that tokengate made or checked itself (a label, a generated or checked id, an
/// address, a method token), which holds nothing to escape; `null` for `None`.
fn json_plain(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => {
            debug_assert!(!any_escape(value.as_bytes()), "{value:?}");
            out.reserve(value.len() + 2);
            out.push(b'"');
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Copies `bytes`, escaping what JSON needs escaped: `"`, `\`, controls and DEL.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !ESCAPED[usize::from(b)] {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// Whether `bytes` hold anything JSON needs escaped, looked at eight bytes at a time.
fn any_escape(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        if needs_escape(u64::from_le_bytes(word.try_into().expect("8 bytes"))) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| ESCAPED[usize::from(b)])
}

/// The bytes JSON needs escaped: controls, DEL, `"` and `\`.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b == 0x7f || b == b'"' as usize || b == b'\\' as usize;
        b += 1;
    }
    table
};

/// Whether any of the eight bytes in `word` is a control character, DEL, `"` or `\` (bytes of
/// 0x80 and above are UTF-8 and need no escape). Exact: no byte is reported that is not one.
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte's high bit in `zero(x)` is set exactly when that byte of `x` is zero (the exact
    // form, without the borrow that the shorter `(x - ONES) & !x & HIGH` lets through).
    let zero = |x: u64| !(((x & !HIGH) + !HIGH) | x | !HIGH);
    // Bytes below 0x20: their top three bits are zero.
    let control = zero(word & (0xe0 * ONES));
    let quote = zero(word ^ (u64::from(b'"') * ONES));
    let backslash = zero(word ^ (u64::from(b'\\') * ONES));
    let delete = zero(word ^ (0x7f * ONES));
    (control | quote | backslash | delete) & HIGH != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            method: "GET",
            path: "/a\"b\n",
            status: 200,
            route: Some("/"),
            subject: Some("al\\ice"),
            source: None,
            ignored: None,
            limit: None,
            rule: None,
            auth: Some("allowed"),
            validator: Some("cache"),
            client: "127.0.0.1",
            duration: Duration::from_micros(1249),
            upstream: None,
            request_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            trace_id: None,
            user_agent: Some("curl/8 \"x\""),
            host: Some("api.example"),
            protocol: "HTTP/1.1",
            token_id: Some("tok_1"),
        }
    }

    #[test]
    fn json_lines_parse_with_nulls_and_rounded_durations() {
        let mut out = Vec::new();
        format_line(&mut out, &line(), Format::Json);
        finish_line(&mut out, 42, Format::Json);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["subject"], "al\\ice");
        assert_eq!(v["source"], serde_json::Value::Null);
        assert_eq!(v["upstream_ms"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"].as_f64(), Some(1.249));
        assert_eq!(v["target"], "access");
        assert_eq!(v["request_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["trace_id"], serde_json::Value::Null);
        assert_eq!(v["user_agent"], "curl/8 \"x\"");
        assert_eq!(v["host"], "api.example");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["token_id"], "tok_1");
        assert_eq!(v["bytes_sent"], 42);
        let stamp = v["timestamp"].as_str().unwrap();
        assert!(stamp.ends_with('Z') && stamp.contains('T'), "{stamp}");
        assert_eq!(stamp.len(), "2026-11-27T08:54:47.123456Z".len(), "{stamp}");
        let parsed = humantime::parse_rfc3339(stamp).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(skew < Duration::from_secs(5), "{stamp}");
    }

    #[test]
    fn json_strings_escape_exactly_what_json_needs() {
        // Every byte value, alone and at every position of a longer run, against serde_json.
        let mut samples: Vec<String> = (0u8..0x80)
            .map(|b| char::from(b).to_string())
            .chain(["é", "日本", "a\u{7f}b", ""].map(String::from))
            .collect();
        for b in [0u8, 0x1f, b'"', b'\\', 0x7f, b' ', b'~'] {
            for at in 0..20 {
                let mut s = "abcdefghijklmnopqrs".to_string();
                s.insert(at, char::from(b));
                samples.push(s);
            }
        }
        for sample in samples {
            let mut out = Vec::new();
            json_string(&mut out, Some(&sample));
            let back: String = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!("{sample:?} -> {:?}: {e}", String::from_utf8_lossy(&out))
            });
            assert_eq!(back, sample);
            let raw = &out[1..out.len() - 1];
            assert!(
                !raw.iter().any(|&b| b < 0x20 || b == 0x7f),
                "{sample:?} -> {out:?}"
            );
        }
        let mut out = Vec::new();
        json_string(&mut out, None);
        assert_eq!(out, b"null");
    }

    #[test]
    fn padded_numbers() {
        for (n, width, text) in [
            (0, 3, "000"),
            (7, 3, "007"),
            (249, 3, "249"),
            (1234, 3, "1234"),
            (42, 6, "000042"),
            (0, 0, "0"),
            (10, 1, "10"),
            (u64::MAX, 3, "18446744073709551615"),
            (5, 25, "00000000000000000005"),
        ] {
            let mut out = Vec::new();
            padded(&mut out, n, width);
            assert_eq!(String::from_utf8(out).unwrap(), text, "{n} {width}");
        }
    }

    #[test]
    fn text_lines_are_one_line() {
        let mut out = Vec::new();
        format_line(&mut out, &line(), Format::Text);
        finish_line(&mut out, 7, Format::Text);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.contains("status=200") && text.contains("duration_ms=1.249"));
        assert!(text.ends_with(" bytes_sent=7\n"), "{text}");
        assert!(text.contains(r#"user_agent="curl/8 \"x\"""#), "{text}");
    }
}
