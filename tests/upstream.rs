//! The HTTP/1.1 upstream client, black box: what the gate makes of what an upstream writes.
//!
//! A. Real upstreams — nginx, HAProxy and a Python `http.server` (HTTP/1.1, keep-alive) — each
//!    with keep-alive reuse (the upstream sees fewer connections than requests), a chunked
//!    body, an 8 MiB body (SHA-256 compared), `HEAD` (no body, `Content-Length` kept), 204,
//!    304, `Expect: 100-continue` with a body (the upstream answers 100, then 200), a 103 Early
//!    Hints before a 200 (HAProxy and Python; nginx 1.22 cannot send one), and an upstream that
//!    closes idle keep-alive connections (no 502).
//! B. A hostile upstream (a raw socket writing exact bytes): framing two readers could read
//!    differently (`Transfer-Encoding` with `Content-Length`, conflicting or invalid lengths,
//!    codings other than one final `chunked`, bad chunk sizes), oversized or too many headers,
//!    obs-fold, a bare CR, a 2xx before the request body was sent, a body shorter than its
//!    length, an unasked 101. Each is a 502 (an early 4xx is passed on); the next request is
//!    answered on another upstream connection (the bad one is never reused: bytes the
//!    upstream wrote after the bad response, a smuggled second response, never reach anyone);
//!    and two clients interleaved each get their own body.
//!
//! The client side is a raw socket wherever framing matters. Every wait is bounded.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

const TOKEN: &str = "upstream-test-token-5d1f";

/// The large body: 8 MiB of the pattern of [`pattern_sha256`].
const LARGE: usize = 8 * 1024 * 1024;
/// The `Expect: 100-continue` upload (under HAProxy's 16 KiB buffer, so it can count it whole).
const UPLOAD: usize = 8000;
/// The slow upload of the early-response cases: 1 MiB, 16 KiB every 10 ms.
const SLOW_UPLOAD: usize = 1024 * 1024;
const SLOW_PIECE: usize = 16 * 1024;

/// The gate: one worker (one pool, so connection counts are exact), the memory store, a static
/// token (unused: the route is open), one open route to `up` whose response-head timeout is 3 s.
fn gate_config(port: u16, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
workers = 1

[store]
backend = "memory"

{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "none"
timeout = "3s"
"#,
        validator = static_validator(&[(TOKEN, "alice", "ops")]),
    )
}

fn start_gate(up: u16) -> Gate {
    Gate::start(&gate_config(free_port(), up))
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 on a socket (both sides)
// ---------------------------------------------------------------------------------------------

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of a header in a raw head (names compared case-insensitively; the first one).
fn head_value(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// How a message body ends.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the peer closes.
    Close,
}

/// Why reading stopped before a whole message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The peer closed (EOF or reset).
    Closed,
    /// The deadline passed.
    Timeout,
    /// Bytes that are not HTTP/1.1 framing.
    Malformed,
}

/// One side of an HTTP/1.1 connection: what was read and not yet used, and the write half
/// (taken away for a concurrent upload).
struct Wire {
    read: OwnedReadHalf,
    write: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        let (read, write) = stream.into_split();
        Wire {
            read,
            write: Some(write),
            buf: Vec::new(),
        }
    }

    async fn connect(port: u16) -> Wire {
        Wire::new(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        )
    }

    /// Writes `bytes`; `false` when the peer is gone.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let write = self.write.as_mut().expect("the write half");
        write.write_all(bytes).await.is_ok()
    }

    /// Reads more into the buffer.
    async fn fill(&mut self, deadline: Instant) -> Result<(), End> {
        // Straight into the buffer's spare room: no large array in the future.
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout_at(deadline, self.read.read_buf(&mut self.buf)).await {
            Err(_) => Err(End::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => Err(End::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The next head (without its final CRLFCRLF), taken out of the buffer.
    async fn head(&mut self, deadline: Instant) -> Result<String, End> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return Ok(head);
            }
            self.fill(deadline).await?;
        }
    }

    /// The position of the next CRLF from `from`, reading more as needed.
    async fn line_end(&mut self, from: usize, deadline: Instant) -> Result<usize, End> {
        loop {
            if let Some(at) = find(&self.buf[from..], b"\r\n") {
                return Ok(from + at);
            }
            self.fill(deadline).await?;
        }
    }

    /// A body framed as `framing`: the bytes read (all of them, also when it ended early) and
    /// whether it ended where its framing said.
    async fn body(&mut self, framing: Framing, deadline: Instant) -> (Vec<u8>, Result<(), End>) {
        match framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    if let Err(e) = self.fill(deadline).await {
                        return (std::mem::take(&mut self.buf), Err(e));
                    }
                }
                (self.buf.drain(..n).collect(), Ok(()))
            }
            Framing::Close => loop {
                match self.fill(deadline).await {
                    Ok(()) => {}
                    Err(End::Closed) => return (std::mem::take(&mut self.buf), Ok(())),
                    Err(e) => return (std::mem::take(&mut self.buf), Err(e)),
                }
            },
            Framing::Chunked => {
                let mut out = Vec::new();
                loop {
                    let line = match self.line_end(0, deadline).await {
                        Ok(at) => at,
                        Err(e) => return (out, Err(e)),
                    };
                    let text = String::from_utf8_lossy(&self.buf[..line]).into_owned();
                    let size_text = text.split(';').next().unwrap_or_default().trim();
                    let Ok(size) = usize::from_str_radix(size_text, 16) else {
                        return (out, Err(End::Malformed));
                    };
                    if size == 0 {
                        // Trailer lines up to an empty one.
                        self.buf.drain(..line + 2);
                        loop {
                            let end = match self.line_end(0, deadline).await {
                                Ok(at) => at,
                                Err(e) => return (out, Err(e)),
                            };
                            self.buf.drain(..end + 2);
                            if end == 0 {
                                return (out, Ok(()));
                            }
                        }
                    }
                    let data = line + 2;
                    while self.buf.len() < data + size + 2 {
                        if let Err(e) = self.fill(deadline).await {
                            let have = self.buf.len().min(data + size);
                            out.extend_from_slice(&self.buf[data.min(have)..have]);
                            self.buf.clear();
                            return (out, Err(e));
                        }
                    }
                    if &self.buf[data + size..data + size + 2] != b"\r\n" {
                        return (out, Err(End::Malformed));
                    }
                    out.extend_from_slice(&self.buf[data..data + size]);
                    self.buf.drain(..data + size + 2);
                }
            }
        }
    }

    /// One response: interim (1xx) responses are collected, then the final one is read by its
    /// framing (none after `HEAD`, 204, 304 or 101).
    async fn response(&mut self, head_request: bool, within: Duration) -> Reply {
        let deadline = Instant::now() + within;
        let mut interim = Vec::new();
        let (status, head) = loop {
            let head = match self.head(deadline).await {
                Ok(head) => head,
                Err(end) => {
                    return Reply {
                        interim,
                        status: None,
                        head: String::new(),
                        body: std::mem::take(&mut self.buf),
                        end: Some(end),
                    }
                }
            };
            let Some(status) = raw_status(head.as_bytes()) else {
                return Reply {
                    interim,
                    status: None,
                    head,
                    body: Vec::new(),
                    end: Some(End::Malformed),
                };
            };
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            break (status, head);
        };
        let framing = if head_request || matches!(status, 101 | 204 | 304) {
            Framing::Length(0)
        } else if head_value(&head, "transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"))
        {
            Framing::Chunked
        } else if let Some(n) =
            head_value(&head, "content-length").and_then(|v| v.parse::<usize>().ok())
        {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        let (body, ended) = self.body(framing, deadline).await;
        Reply {
            interim,
            status: Some(status),
            head,
            body,
            end: ended.err(),
        }
    }

    /// Waits up to `within` for an interim response and takes it (its status); a final
    /// response's head is left to be read; `None` when nothing came.
    async fn interim(&mut self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        let head = self.head(deadline).await.ok()?;
        let status = raw_status(head.as_bytes());
        match status {
            Some(s) if (100..200).contains(&s) && s != 101 => Some(s),
            _ => {
                let mut back = head.into_bytes();
                back.extend_from_slice(b"\r\n\r\n");
                self.buf.splice(0..0, back);
                None
            }
        }
    }
}

/// A response as read off the wire.
#[derive(Debug)]
struct Reply {
    /// 1xx statuses before the final response.
    interim: Vec<u16>,
    /// `None`: no (parsable) final head.
    status: Option<u16>,
    head: String,
    body: Vec<u8>,
    /// `None`: the body ended where its framing said; else why it did not.
    end: Option<End>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        head_value(&self.head, name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn complete(&self) -> bool {
        self.status.is_some() && self.end.is_none()
    }

    /// A short description for failure messages.
    fn brief(&self) -> String {
        let body = self.text();
        let body: String = body.chars().take(120).collect();
        format!(
            "status {:?} interim {:?} end {:?} body {} bytes {:?}; head {:?}",
            self.status,
            self.interim,
            self.end,
            self.body.len(),
            body,
            self.head.chars().take(300).collect::<String>()
        )
    }
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: upstream-test\r\n\r\n").into_bytes()
}

/// One request on a new connection to the gate (10 s for the response).
async fn exchange(port: u16, request: &[u8], head_request: bool) -> Reply {
    exchange_within(port, request, head_request, Duration::from_secs(10)).await
}

async fn exchange_within(port: u16, request: &[u8], head_request: bool, within: Duration) -> Reply {
    let mut wire = Wire::connect(port).await;
    wire.send(request).await;
    wire.response(head_request, within).await
}

async fn get_once(port: u16, path: &str) -> Reply {
    exchange(port, &get_request(path), false).await
}

/// The pattern of [`pattern_sha256`]: 64 KiB blocks, block `i` is `i` (8 bytes, big-endian)
/// then the byte `i % 251`.
fn pattern(total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total);
    let mut i: u64 = 0;
    while out.len() < total {
        let mut block = vec![(i % 251) as u8; 64 * 1024];
        block[..8].copy_from_slice(&i.to_be_bytes());
        let n = (total - out.len()).min(block.len());
        out.extend_from_slice(&block[..n]);
        i += 1;
    }
    out
}

fn sha256(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// The chunked body every real upstream sends: `line 0\n` … `line 19999\n` (~190 KB).
fn chunked_text() -> String {
    (0..20_000).map(|i| format!("line {i}\n")).collect()
}

// ---------------------------------------------------------------------------------------------
// A. Real upstreams
// ---------------------------------------------------------------------------------------------

/// A real upstream serving, on every one of the three:
/// - `/keep…`: 200 `port=<the gate's source port>` (and `X-Peer-Port`), for counting connections;
/// - `/chunked`: [`chunked_text`] with `Transfer-Encoding: chunked`;
/// - `/large`: [`LARGE`] pattern bytes with `Content-Length` (also to `HEAD`);
/// - `/nocontent`: 204; `/notmod`: 304;
/// - `POST /upload`: reads the body (answering `Expect: 100-continue` with 100), then 200
///   `len=<bytes read> expect=<the Expect it saw>`;
/// - `/early` (not nginx): 103 Early Hints, then 200 `early-body`;
/// - idle keep-alive connections are closed by the upstream after 1 s.
struct Real {
    what: &'static str,
    port: u16,
    _server: ChildServer,
    _files: Option<tempfile::TempDir>,
}

fn binary(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    on_path
        .chain([PathBuf::from("/usr/sbin").join(name)])
        .find(|p| p.is_file())
}

impl Real {
    fn nginx() -> Option<Real> {
        if nginx_binary().is_none() {
            missing_tool("nginx", "nginx-light");
            return None;
        }
        let files = tempfile::tempdir().expect("tempdir");
        std::fs::write(files.path().join("large.bin"), pattern(LARGE)).expect("large.bin");
        std::fs::write(files.path().join("chunked.txt"), chunked_text()).expect("chunked.txt");
        let docroot = files.path().display().to_string();
        // The chunked body: SSI on a static file drops its Content-Length, so nginx chunks it
        // (no Lua, no proxying). The upload: nginx reads the body (sending 100 Continue) to
        // proxy it to its own /sink, which reports the Content-Length nginx computed from it.
        let server = start_nginx(|port| {
            format!(
                r#"server {{
        listen 127.0.0.1:{port};
        keepalive_timeout 1s;
        keepalive_requests 10000;
        location /keep {{ add_header X-Peer-Port $remote_port; return 200 "port=$remote_port\n"; }}
        location = /chunked {{ alias {docroot}/chunked.txt; default_type text/plain; ssi on; ssi_types text/plain; }}
        location = /large {{ alias {docroot}/large.bin; default_type application/octet-stream; }}
        location = /nocontent {{ return 204; }}
        location = /notmod {{ return 304; }}
        location = /upload {{
            client_body_buffer_size 1m;
            proxy_set_header X-Seen-Expect $http_expect;
            proxy_pass http://127.0.0.1:{port}/sink;
        }}
        location = /sink {{ return 200 "len=$content_length expect=$http_x_seen_expect"; }}
    }}"#
            )
        })?;
        Some(Real {
            what: "nginx",
            port: server.port,
            _server: server,
            _files: Some(files),
        })
    }

    fn haproxy() -> Option<Real> {
        let Some(haproxy) = binary("haproxy") else {
            missing_tool("haproxy", "haproxy");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        // Lua services for the bodies `http-request return` cannot make (over one buffer, or
        // without a length); the rest is haproxy's own `return` and `early-hint`. haproxy
        // answers `Expect: 100-continue` itself when `wait-for-body` waits, and then removes
        // the header: it is saved first.
        let lua = r#"
core.register_service("large", "http", function(applet)
  local total = 8388608
  applet:set_status(200)
  applet:add_header("content-type", "application/octet-stream")
  applet:add_header("content-length", tostring(total))
  applet:start_response()
  if applet.method == "HEAD" then return end
  local i = 0
  local left = total
  while left > 0 do
    local n = math.min(65536, left)
    local block = string.pack(">I8", i) .. string.rep(string.char(i % 251), 65536 - 8)
    applet:send(block:sub(1, n))
    left = left - n
    i = i + 1
  end
end)
core.register_service("chunked", "http", function(applet)
  applet:set_status(200)
  applet:add_header("content-type", "text/plain")
  applet:start_response()
  for b = 0, 19 do
    local t = {}
    for i = b * 1000, b * 1000 + 999 do t[#t + 1] = "line " .. i .. "\n" end
    applet:send(table.concat(t))
  end
end)
"#;
        let lua_path = write_file(dir.path(), "services.lua", lua);
        let cfg = format!(
            r#"global
    lua-load {lua}

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 1s

frontend fe
    bind 127.0.0.1:{port}
    http-request early-hint link "</hint.css>; rel=preload" if {{ path /early }}
    http-request return status 200 content-type text/plain string "early-body" if {{ path /early }}
    http-request return status 204 if {{ path /nocontent }}
    http-request return status 304 hdr etag "\"v1\"" if {{ path /notmod }}
    http-request return status 200 content-type text/plain lf-string "port=%[src_port]" hdr x-peer-port "%[src_port]" if {{ path_beg /keep }}
    http-request set-var(txn.expect) req.hdr(expect) if {{ path /upload }}
    http-request wait-for-body time 5s at-least 16k if {{ path /upload }}
    http-request return status 200 content-type text/plain lf-string "len=%[req.body_len] expect=%[var(txn.expect)]" if {{ path /upload }}
    http-request use-service lua.large if {{ path /large }}
    http-request use-service lua.chunked if {{ path /chunked }}
    http-request return status 404 content-type text/plain string "no such fixture"
"#,
            lua = lua_path.display()
        );
        let cfg_path = write_file(dir.path(), "haproxy.cfg", &cfg);
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn haproxy");
        let server = ChildServer::listening("haproxy", port, child, Some(dir), Some(log));
        Some(Real {
            what: "haproxy",
            port,
            _server: server,
            _files: None,
        })
    }

    fn python() -> Option<Real> {
        let Some(server) = python_app("python http.server", PYTHON_APP) else {
            missing_tool("python3", "python3");
            return None;
        };
        Some(Real {
            what: "python",
            port: server.port,
            _server: server,
            _files: None,
        })
    }
}

/// The Python upstream: `http.server` speaking HTTP/1.1 with keep-alive (its handler reads
/// `Expect: 100-continue` and answers 100 itself); idle connections time out after 1 s.
/// `/close…` answers like `/keep…`, then closes the connection without having said so.
const PYTHON_APP: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LARGE = 8 * 1024 * 1024

def pattern(total):
    i, left = 0, total
    while left > 0:
        n = min(65536, left)
        yield (i.to_bytes(8, "big") + bytes([i % 251]) * (65536 - 8))[:n]
        left -= n
        i += 1

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 1

    def log_message(self, *args):
        pass

    def small(self, status, body, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0]
        port = str(self.client_address[1])
        if path.startswith("/keep") or path.startswith("/close"):
            self.small(200, ("port=" + port + "\n").encode(), [("X-Peer-Port", port)])
            if path.startswith("/close"):
                self.wfile.flush()
                self.close_connection = True
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for b in range(20):
                piece = "".join("line %d\n" % i for i in range(b * 1000, b * 1000 + 1000)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/large":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(LARGE))
            self.end_headers()
            if self.command != "HEAD":
                for block in pattern(LARGE):
                    self.wfile.write(block)
        elif path == "/nocontent":
            self.send_response(204)
            self.end_headers()
        elif path == "/notmod":
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
        elif path == "/early":
            self.send_response_only(103)
            self.send_header("Link", "</hint.css>; rel=preload")
            self.end_headers()
            self.small(200, b"early-body")
        else:
            self.small(404, b"no such fixture")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            n = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                n += len(self.rfile.read(size))
                self.rfile.readline()
        else:
            n = len(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.small(200, ("len=%d expect=%s" % (n, self.headers.get("Expect", ""))).encode())

class Server(ThreadingHTTPServer):
    daemon_threads = True

Server(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The upstream's view of the connection a `/keep` answer came on: the gate's source port.
fn peer_port(reply: &Reply, what: &str) -> u16 {
    let text = reply.text();
    text.trim()
        .strip_prefix("port=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{what}: not a /keep answer: {}", reply.brief()))
}

/// Ten requests one after another on one client connection: all 200, and the upstream saw
/// them on at most two connections (one worker, so one is expected).
async fn keep_alive(real: &Real) {
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    let mut ports = Vec::new();
    for i in 0..10 {
        client.send(&get_request(&format!("/keep/{i}"))).await;
        let reply = client.response(false, Duration::from_secs(10)).await;
        assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
        assert!(reply.complete(), "{}: {}", real.what, reply.brief());
        ports.push(peer_port(&reply, real.what));
    }
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    println!(
        "{}: 10 requests on {} upstream connection(s): {ports:?}",
        real.what,
        distinct.len()
    );
    assert!(
        distinct.len() <= 2,
        "{}: upstream connections not reused: {ports:?}",
        real.what
    );
}

/// The fixture itself chunks `/chunked` (checked directly), and through the gate the body is
/// exactly [`chunked_text`]; the client connection then still serves a next request.
async fn chunked(real: &Real) {
    let direct = exchange(real.port, &get_request("/chunked"), false).await;
    assert!(
        direct
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked")),
        "{}: the fixture does not chunk /chunked: {}",
        real.what,
        direct.brief()
    );
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    client.send(&get_request("/chunked")).await;
    let reply = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
    assert!(reply.complete(), "{}: {}", real.what, reply.brief());
    assert!(
        reply.text() == chunked_text(),
        "{}: chunked body differs ({} bytes, expected {})",
        real.what,
        reply.body.len(),
        chunked_text().len()
    );
    client.send(&get_request("/keep/after-chunked")).await;
    let next = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(next.status, Some(200), "{}: {}", real.what, next.brief());
    peer_port(&next, real.what);
}

/// 8 MiB through the gate, byte for byte.
async fn large(real: &Real) {
    let gate = start_gate(real.port);
    let started = Instant::now();
    let reply = exchange(gate.port, &get_request("/large"), false).await;
    assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
    assert!(reply.complete(), "{}: {}", real.what, reply.brief());
    assert_eq!(reply.body.len(), LARGE, "{}: body length", real.what);
    assert_eq!(
        sha256(&reply.body),
        pattern_sha256(LARGE as u64),
        "{}: body differs",
        real.what
    );
    println!(
        "{}: 8 MiB in {} ms",
        real.what,
        started.elapsed().as_millis()
    );
}

/// `HEAD /large`: 200 with the upstream's `Content-Length` and no body; the next response on
/// the same client connection is read right (no stray body bytes in between).
async fn head(real: &Real) {
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    client
        .send(b"HEAD /large HTTP/1.1\r\nHost: upstream-test\r\n\r\n")
        .await;
    let reply = client.response(true, Duration::from_secs(10)).await;
    assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
    assert_eq!(
        reply.header("content-length").as_deref(),
        Some(LARGE.to_string().as_str()),
        "{}: Content-Length of the HEAD answer: {}",
        real.what,
        reply.brief()
    );
    client.send(&get_request("/keep/after-head")).await;
    let next = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(
        next.status,
        Some(200),
        "{}: after HEAD: {}",
        real.what,
        next.brief()
    );
    peer_port(&next, real.what);
}

/// A bodiless status (204 or 304) arrives without a body, and the next response on the same
/// client connection is read right.
async fn bodiless(real: &Real, path: &str, status: u16) {
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: upstream-test\r\nIf-None-Match: \"v1\"\r\n\r\n");
    client.send(request.as_bytes()).await;
    let reply = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(
        reply.status,
        Some(status),
        "{}: {}",
        real.what,
        reply.brief()
    );
    assert!(
        reply.header("transfer-encoding").is_none(),
        "{}: a {status} with Transfer-Encoding: {}",
        real.what,
        reply.brief()
    );
    client.send(&get_request("/keep/after")).await;
    let next = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(
        next.status,
        Some(200),
        "{}: after {status}: {}",
        real.what,
        next.brief()
    );
    peer_port(&next, real.what);
}

async fn no_content(real: &Real) {
    bodiless(real, "/nocontent", 204).await;
}

async fn not_modified(real: &Real) {
    bodiless(real, "/notmod", 304).await;
}

/// `POST /upload` with `Expect: 100-continue`: the client sends the body after the gate's 100
/// (or after 2 s without one, as curl does after 1 s); the upstream saw the `Expect` (so it
/// answered 100 first) and the whole body, and the client gets its 200.
async fn expect_continue(real: &Real) {
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: upstream-test\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {UPLOAD}\r\nExpect: 100-continue\r\n\r\n"
    );
    client.send(head.as_bytes()).await;
    let started = Instant::now();
    let continued = client.interim(Duration::from_secs(2)).await;
    println!(
        "{}: the gate's interim answer to Expect: {continued:?} after {} ms",
        real.what,
        started.elapsed().as_millis()
    );
    client.send(&vec![b'e'; UPLOAD]).await;
    let reply = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
    assert_eq!(
        reply.text().trim(),
        format!("len={UPLOAD} expect=100-continue"),
        "{}: what the upstream read",
        real.what
    );
}

/// The fixture sends 103 before its 200 (checked directly); through the gate the client gets
/// the 200 with its body (a 103 passed on before it is allowed).
async fn early_hints(real: &Real) {
    let direct = exchange(real.port, &get_request("/early"), false).await;
    assert!(
        direct.interim.contains(&103),
        "{}: the fixture sent no 103: {}",
        real.what,
        direct.brief()
    );
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    client.send(&get_request("/early")).await;
    let reply = client.response(false, Duration::from_secs(10)).await;
    println!(
        "{}: interim responses the client saw: {:?}",
        real.what, reply.interim
    );
    assert_eq!(reply.status, Some(200), "{}: {}", real.what, reply.brief());
    assert!(reply.complete(), "{}: {}", real.what, reply.brief());
    assert_eq!(reply.text(), "early-body", "{}", real.what);
    assert!(
        reply.interim.iter().all(|s| *s == 103),
        "{}: an interim status other than the upstream's: {:?}",
        real.what,
        reply.interim
    );
    client.send(&get_request("/keep/after-early")).await;
    let next = client.response(false, Duration::from_secs(10)).await;
    assert_eq!(next.status, Some(200), "{}: {}", real.what, next.brief());
}

/// The upstream closes idle keep-alive connections after 1 s: a request 1.5 s after the last
/// one is a 200 on a new upstream connection (not a 502), three times over.
async fn idle_close(real: &Real) {
    let gate = start_gate(real.port);
    let first = get_once(gate.port, "/keep/idle-0").await;
    assert_eq!(first.status, Some(200), "{}: {}", real.what, first.brief());
    let mut last = peer_port(&first, real.what);
    for i in 1..=3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reply = get_once(gate.port, &format!("/keep/idle-{i}")).await;
        assert_eq!(
            reply.status,
            Some(200),
            "{}: after the upstream closed the idle connection: {}",
            real.what,
            reply.brief()
        );
        let port = peer_port(&reply, real.what);
        assert_ne!(
            port, last,
            "{}: the upstream did not close its idle connection (the test means nothing)",
            real.what
        );
        last = port;
    }
}

/// One `#[tokio::test]` per check, in a module per upstream.
macro_rules! real_upstream_tests {
    ($module:ident, $start:path, [$($check:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    let Some(real) = $start() else { return };
                    super::$check(&real).await;
                }
            )*
        }
    };
}

// nginx 1.22 (Debian 12) has no `early_hints` directive (nginx 1.29) and drops an upstream's
// 1xx, so it cannot send a 103: early_hints runs against HAProxy and Python only.
real_upstream_tests!(
    nginx,
    Real::nginx,
    [
        keep_alive,
        chunked,
        large,
        head,
        no_content,
        not_modified,
        expect_continue,
        idle_close
    ]
);
real_upstream_tests!(
    haproxy,
    Real::haproxy,
    [
        keep_alive,
        chunked,
        large,
        head,
        no_content,
        not_modified,
        expect_continue,
        early_hints,
        idle_close
    ]
);
real_upstream_tests!(
    python,
    Real::python,
    [
        keep_alive,
        chunked,
        large,
        head,
        no_content,
        not_modified,
        expect_continue,
        early_hints,
        idle_close
    ]
);

/// Python closing each connection right after its response, without `Connection: close`:
/// twenty requests back to back are all 200, each on a new upstream connection.
#[tokio::test(flavor = "multi_thread")]
async fn python_closing_after_each_response_without_saying_so_causes_no_502() {
    let Some(real) = Real::python() else { return };
    let gate = start_gate(real.port);
    let mut client = Wire::connect(gate.port).await;
    let mut ports = Vec::new();
    for i in 0..20 {
        client.send(&get_request(&format!("/close/{i}"))).await;
        let reply = client.response(false, Duration::from_secs(10)).await;
        assert_eq!(reply.status, Some(200), "request {i}: {}", reply.brief());
        ports.push(peer_port(&reply, "python"));
    }
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        20,
        "python did not close each connection (the test means nothing): {ports:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// B. A hostile upstream
// ---------------------------------------------------------------------------------------------

/// Written after every bad response on the same connection: should the gate read past the bad
/// response and reuse the connection, this is what the next request would get.
const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";

/// What the hostile upstream saw.
#[derive(Default)]
struct HostileState {
    /// Connections accepted; each gets the next number (from 1).
    accepted: AtomicUsize,
    /// Request heads that arrived on a connection after a bad response was written on it.
    reused_after_bad: AtomicUsize,
    /// The connection that carried the last bad response.
    last_bad_conn: AtomicUsize,
    /// Paths of the requests that arrived on a connection already used for a bad response.
    reuse_log: Mutex<Vec<String>>,
}

/// A raw upstream on the test's runtime. `/good/…` is answered well (200, the path as body,
/// `X-Upstream-Conn: <connection number>`); `/bad/<case>/…` gets the bytes of [`bad_answer`].
struct Hostile {
    port: u16,
    state: Arc<HostileState>,
}

/// One answer of the hostile upstream.
struct Answer {
    bytes: Vec<u8>,
    /// Written as soon as the head arrived, before the request body is read.
    early: bool,
    /// Close the connection after writing.
    close: bool,
    /// A bad answer: the connection must not carry another request.
    bad: bool,
}

fn good_answer(path: &str, conn: usize) -> Answer {
    Answer {
        bytes: format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Upstream-Conn: {conn}\r\n\r\n{path}",
            path.len()
        )
        .into_bytes(),
        early: false,
        close: false,
        bad: false,
    }
}

/// A bad answer: `head` (status line and header lines, CRLF-separated, no final CRLFCRLF), the
/// blank line, `body`, then [`SMUGGLED`]; the connection stays open.
fn bad(head: &str, body: &[u8]) -> Answer {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(SMUGGLED);
    Answer {
        bytes,
        early: false,
        close: false,
        bad: true,
    }
}

fn bad_answer(case: &str, path: &str, conn: usize) -> Answer {
    let ok = "HTTP/1.1 200 OK";
    match case {
        // 1. Transfer-Encoding with Content-Length, both orders; the readings differ.
        "te-cl" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked\r\nContent-Length: 0"),
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
        "cl-te" => bad(
            &format!("{ok}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"),
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
        // 2. Two differing lengths; invalid ones.
        "cl-twice" => bad(
            &format!("{ok}\r\nContent-Length: 5\r\nContent-Length: 6"),
            b"hello!",
        ),
        "cl-list" => bad(&format!("{ok}\r\nContent-Length: 5, 6"), b"hello!"),
        "cl-1x" => bad(&format!("{ok}\r\nContent-Length: 1x"), b"h"),
        "cl-minus" => bad(&format!("{ok}\r\nContent-Length: -1"), b"h"),
        "cl-plus" => bad(&format!("{ok}\r\nContent-Length: +5"), b"hello"),
        // 3. Codings other than one final chunked.
        "te-gzip" => bad(&format!("{ok}\r\nTransfer-Encoding: gzip"), b"hello"),
        "te-chunked-gzip" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked, gzip"),
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
        "te-chunked-then-gzip" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip"),
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
        // 4. Chunk sizes: overflowing 64 bits, not hex, a 0x prefix.
        "chunk-overflow" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked"),
            b"FFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
        ),
        "chunk-nonhex" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked"),
            b"zz\r\nhello\r\n0\r\n\r\n",
        ),
        "chunk-0x" => bad(
            &format!("{ok}\r\nTransfer-Encoding: chunked"),
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ),
        // 5. 100 KiB of headers (50 of 2 KiB, so under any count limit); 200 headers (small).
        "big-head" => {
            let mut head = format!("{ok}\r\nContent-Length: 5");
            for i in 0..50 {
                head.push_str(&format!("\r\nX-Big-{i:02}: {}", "a".repeat(2048)));
            }
            bad(&head, b"hello")
        }
        "many-headers" => {
            let mut head = format!("{ok}\r\nContent-Length: 5");
            for i in 0..200 {
                head.push_str(&format!("\r\nX-Many-{i:03}: v"));
            }
            bad(&head, b"hello")
        }
        // 6. obs-fold, with a space and with a tab.
        "fold-space" => bad(
            &format!("{ok}\r\nX-Folded: a\r\n b\r\nContent-Length: 5"),
            b"hello",
        ),
        "fold-tab" => bad(
            &format!("{ok}\r\nContent-Length: 5\r\nX-Folded: a\r\n\tb"),
            b"hello",
        ),
        // 7. A bare CR inside a header line (in a value; in the status line's reason).
        "bare-cr" => bad(&format!("{ok}\r\nX-Cr: a\rb\r\nContent-Length: 5"), b"hello"),
        "bare-cr-reason" => bad("HTTP/1.1 200 O\rK\r\nContent-Length: 5", b"hello"),
        // 8. A final response before the request body was read: a 2xx (bad), a 413 (passed
        // on, the connection not reused).
        "early-2xx" => Answer {
            early: true,
            ..bad(
                &format!("{ok}\r\nContent-Length: {}", path.len()),
                path.as_bytes(),
            )
        },
        "early-413" => Answer {
            bytes: format!(
                "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nX-Upstream-Conn: {conn}\r\n\r\ntoo large"
            )
            .into_bytes(),
            early: true,
            close: false,
            bad: true,
        },
        // 9. A body shorter than its length, then the upstream closes: small, and large.
        "short-small" => {
            let mut bytes = format!("{ok}\r\nContent-Length: 100\r\n\r\n").into_bytes();
            bytes.extend_from_slice(&[b's'; 50]);
            Answer {
                bytes,
                early: false,
                close: true,
                bad: true,
            }
        }
        "short-large" => {
            let mut bytes = format!("{ok}\r\nContent-Length: {}\r\n\r\n", 1024 * 1024).into_bytes();
            bytes.extend_from_slice(&vec![b'L'; 200 * 1024]);
            Answer {
                bytes,
                early: false,
                close: true,
                bad: true,
            }
        }
        // 10. A 101 to a request that did not ask to upgrade.
        "upgrade-101" => bad(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket",
            b"",
        ),
        other => panic!("no hostile case {other}"),
    }
}

impl Hostile {
    async fn start() -> Hostile {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("local_addr").port();
        let state = Arc::new(HostileState::default());
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let st = Arc::clone(&st);
                tokio::spawn(async move { hostile_connection(stream, conn, &st).await });
            }
        });
        Hostile { port, state }
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    fn reused_after_bad(&self) -> usize {
        self.state.reused_after_bad.load(Ordering::SeqCst)
    }
}

async fn hostile_connection(stream: TcpStream, conn: usize, state: &HostileState) {
    let mut wire = Wire::new(stream);
    let mut tainted = false;
    loop {
        let deadline = Instant::now() + Duration::from_secs(60);
        let Ok(head) = wire.head(deadline).await else {
            return;
        };
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if tainted {
            state.reused_after_bad.fetch_add(1, Ordering::SeqCst);
            state.reuse_log.lock().await.push(path.clone());
        }
        let answer = match path.strip_prefix("/bad/") {
            Some(rest) => bad_answer(rest.split('/').next().unwrap_or_default(), &path, conn),
            None => good_answer(&path, conn),
        };
        if answer.bad {
            tainted = true;
            state.last_bad_conn.store(conn, Ordering::SeqCst);
        }
        if answer.early && !wire.send(&answer.bytes).await {
            return;
        }
        let framing = if head_value(&head, "transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else {
            Framing::Length(
                head_value(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        };
        if wire.body(framing, deadline).await.1.is_err() {
            return;
        }
        if !answer.early && !wire.send(&answer.bytes).await {
            return;
        }
        if answer.close {
            return;
        }
    }
}

/// What the client must get for a bad answer.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 502.
    BadGateway,
    /// The upstream's early status and body, passed on.
    PassedOn(u16, &'static str),
    /// Either a 502, or a head whose body ends early: the client's connection closed before
    /// the declared end, never a complete-looking response.
    NeverComplete,
}

/// Checks one reply to a bad answer; `Err` says what was wrong.
fn judge(case: &str, expect: Expect, reply: &Reply) -> Result<(), String> {
    let fine = match expect {
        Expect::BadGateway => reply.status == Some(502),
        Expect::PassedOn(status, body) => {
            reply.status == Some(status) && reply.complete() && reply.text() == body
        }
        Expect::NeverComplete => {
            reply.status == Some(502) || (reply.status.is_some() && reply.end == Some(End::Closed))
        }
    };
    if fine {
        Ok(())
    } else {
        Err(format!(
            "{case}: expected {expect:?}, got {}",
            reply.brief()
        ))
    }
}

/// How long the client waits for the answer to a bad request (the route's head timeout is
/// 3 s; a body that never ends is cut off here).
const BAD_WAIT: Duration = Duration::from_secs(5);

/// A request for a bad answer: a GET, or for the early cases a POST of [`SLOW_UPLOAD`] bytes
/// sent slowly while the response is read.
async fn bad_request(port: u16, case: &str, path: &str) -> Reply {
    if !case.starts_with("early-") {
        return exchange_within(port, &get_request(path), false, BAD_WAIT).await;
    }
    let mut wire = Wire::connect(port).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: upstream-test\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {SLOW_UPLOAD}\r\n\r\n"
    );
    wire.send(head.as_bytes()).await;
    let mut write = wire.write.take().expect("the write half");
    let upload = tokio::spawn(async move {
        let piece = vec![b'u'; SLOW_PIECE];
        for _ in 0..SLOW_UPLOAD / SLOW_PIECE {
            if write.write_all(&piece).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Keep the write half open (no FIN) until the test is done with the reply.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let reply = wire.response(false, BAD_WAIT).await;
    upload.abort();
    reply
}

/// A good request: a 200 whose body is its own path; the connection number it came on.
fn judge_good(path: &str, reply: &Reply) -> Result<usize, String> {
    if reply.status != Some(200) || !reply.complete() || reply.text() != path {
        return Err(format!(
            "{path}: expected 200 with its own path, got {}",
            reply.brief()
        ));
    }
    reply
        .header("x-upstream-conn")
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{path}: no X-Upstream-Conn: {}", reply.brief()))
}

/// The whole check of one hostile case, against a fresh upstream and gate:
/// 1. a good request (so the pool holds an idle connection, which the bad request then takes);
/// 2. the bad request: `expect`;
/// 3. the next request: a 200 with its own body, on a connection other than the bad one;
/// 4. two clients at once, one alternating bad and good requests on new connections, the other
///    good requests on one keep-alive connection: every good body is its own path;
/// 5. no request ever arrived on a connection after a bad answer on it.
async fn hostile_case(case: &str, expect: Expect) -> Result<(), String> {
    let up = Hostile::start().await;
    let gate = start_gate(up.port);
    let port = gate.port;

    let warm = format!("/good/{case}/warm");
    judge_good(&warm, &get_once(port, &warm).await)?;

    let reply = bad_request(port, case, &format!("/bad/{case}/first")).await;
    println!("{case}: {}", reply.brief());
    judge(case, expect, &reply)?;
    let bad_conn = up.state.last_bad_conn.load(Ordering::SeqCst);
    let accepted_before = up.accepted();

    let next = format!("/good/{case}/next");
    let next_conn = judge_good(&next, &get_once(port, &next).await)?;
    println!(
        "{case}: bad answer on upstream connection {bad_conn}, the next request on {next_conn}"
    );
    // The pool held only the connection the bad answer came on: the next one must be new.
    if next_conn == bad_conn || next_conn <= accepted_before {
        return Err(format!(
            "{case}: the request after the bad answer (on upstream connection {bad_conn}) went on \
             connection {next_conn}, not on a new one (connections before it: {accepted_before})"
        ));
    }

    // Two clients interleaved.
    let alternating = async {
        let mut errors = Vec::new();
        for i in 0..4 {
            let reply = bad_request(port, case, &format!("/bad/{case}/a{i}")).await;
            if let Err(e) = judge(case, expect, &reply) {
                errors.push(e);
            }
            let path = format!("/good/{case}/a{i}");
            if let Err(e) = judge_good(&path, &get_once(port, &path).await) {
                errors.push(e);
            }
        }
        errors
    };
    let steady = async {
        let mut errors = Vec::new();
        let mut wire = Wire::connect(port).await;
        for i in 0..12 {
            let path = format!("/good/{case}/b{i}");
            if !wire.send(&get_request(&path)).await {
                errors.push(format!(
                    "{path}: the gate closed a good client's connection"
                ));
                break;
            }
            let reply = wire.response(false, Duration::from_secs(10)).await;
            if let Err(e) = judge_good(&path, &reply) {
                errors.push(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        errors
    };
    let (mut errors, steady_errors) = tokio::join!(alternating, steady);
    errors.extend(steady_errors);

    let reused = up.reused_after_bad();
    if reused > 0 {
        errors.push(format!(
            "{case}: {reused} request(s) sent on an upstream connection after a bad answer on it: {:?}",
            up.state.reuse_log.lock().await
        ));
    }
    println!("{case}: {} upstream connections in all", up.accepted());
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// Runs every case (all of them, also after one failed) and fails naming each that did.
async fn hostile_cases(cases: &[&str], expect: Expect) {
    let mut failures = Vec::new();
    for case in cases {
        if let Err(e) = hostile_case(case, expect).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_chunked_with_content_length_is_502() {
    hostile_cases(&["te-cl", "cl-te"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_conflicting_or_invalid_content_length_is_502() {
    hostile_cases(
        &["cl-twice", "cl-list", "cl-1x", "cl-minus", "cl-plus"],
        Expect::BadGateway,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_coding_other_than_one_final_chunked_is_502() {
    hostile_cases(
        &["te-gzip", "te-chunked-gzip", "te-chunked-then-gzip"],
        Expect::BadGateway,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bad_chunk_size_is_502() {
    hostile_cases(
        &["chunk-overflow", "chunk-nonhex", "chunk-0x"],
        Expect::BadGateway,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_oversized_or_too_many_response_headers_are_502() {
    hostile_cases(&["big-head", "many-headers"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_obs_fold_is_502() {
    hostile_cases(&["fold-space", "fold-tab"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bare_cr_in_a_header_line_is_502() {
    hostile_cases(&["bare-cr", "bare-cr-reason"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_2xx_before_the_request_body_was_sent_is_502() {
    hostile_cases(&["early-2xx"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_early_413_is_passed_on_and_its_connection_not_reused() {
    hostile_cases(&["early-413"], Expect::PassedOn(413, "too large")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_short_small_body_is_502() {
    hostile_cases(&["short-small"], Expect::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_short_large_body_never_looks_complete() {
    hostile_cases(&["short-large"], Expect::NeverComplete).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_unasked_101_is_502() {
    hostile_cases(&["upgrade-101"], Expect::BadGateway).await;
}

/// The hostile upstream's good answers, and the raw reader, are themselves right: a plain
/// sequence through the gate reuses one upstream connection and echoes each path (so the
/// hostile tests' "another connection" and "its own body" mean something).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_fixture_good_answers_are_reused_and_echoed() {
    let up = Hostile::start().await;
    let gate = start_gate(up.port);
    let mut conns = Vec::new();
    for i in 0..5 {
        let path = format!("/good/plain/{i}");
        let reply = get_once(gate.port, &path).await;
        conns.push(judge_good(&path, &reply).unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(
        conns.iter().all(|c| *c == conns[0]),
        "good answers were not reused: {conns:?}"
    );
    assert_eq!(up.accepted(), 1);
    assert_eq!(up.reused_after_bad(), 0);
}
