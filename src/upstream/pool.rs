//! The upstream connection pool of one route, and the exchange on one of its connections:
//! HTTP/1.1 over TCP, TLS or a Unix socket, spoken by tokengate itself ([`super::h1`]), in the
//! request's own task (no connection task, no channel).
//!
//! - at most `max_inflight` requests at once, process-wide (an exchange holds its slot until
//!   the response body has been streamed, or for the life of an upgraded tunnel); beyond it the
//!   caller gets [`ProxyError::UpstreamBusy`] at once;
//! - at most `max_idle_connections` idle keep-alive connections, process-wide, each closed after
//!   [`IDLE_TIMEOUT`]; idle lists are kept per worker thread (no lock shared between workers);
//! - a connection goes back to the pool only after a complete, well-framed response to a fully
//!   written request, with nothing after it; never after a timeout, an error or an aborted body;
//! - a pooled connection that the upstream closed while it sat idle is found out before the
//!   request is written (or, in a race, by the write failing or the upstream closing without a
//!   byte of answer), and the request is retried once on a fresh connection when it can be.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::io::poll_read_buf;

use super::case::CaseBook;
use super::conn::Conn;
use super::h1::{self, Decoded, Decoder, Framing, Head, RequestBody};
use super::spare;
use super::Body;
use crate::error::{BoxError, ProxyError};

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a TCP connect (and TLS handshake) to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What one read from an upstream asks for at most; also the largest body that is read whole
/// before the response is answered (so that a short one is a 502, not a truncated 200).
const READ_BUF: usize = 16 * 1024;
/// What the first read of a response asks for (most responses fit: the head and a small body).
const FIRST_READ: usize = 4096;
/// A complete request body up to this size is written with the head, in one write.
const INLINE_BODY: usize = 16 * 1024;

/// Where a pool's connections go.
enum Target {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// The pool of one upstream.
pub struct Pool {
    target: Target,
    /// For logs: `host:port` or `unix:/path`.
    name: String,
    /// `Host` for requests that do not keep the client's.
    host: HeaderValue,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    max_inflight: usize,
    max_idle: usize,
    /// Keep the case of header names: the request's written in title case, the response's as
    /// the upstream wrote them (through [`CaseBook`]).
    preserve_header_case: bool,
    case: CaseBook,
    inflight: AtomicUsize,
    idle_count: AtomicUsize,
    /// One idle list per worker (the last for any other thread); each is only ever locked by
    /// its own thread, so the lock is never contended.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    /// A pool for `upstream` (`http://host:port` or `https://host:port`; with `socket`, the
    /// Unix socket it names instead, `upstream` giving only the `Host`) used by `workers`
    /// worker threads; `tls` is the client config for https (its roots: the route's
    /// `upstream_ca` or the system's).
    pub fn new(
        upstream: &Uri,
        socket: Option<&std::path::Path>,
        tls: Option<Arc<rustls::ClientConfig>>,
        (max_inflight, max_idle): (usize, usize),
        preserve_header_case: bool,
        workers: usize,
    ) -> Result<Pool, String> {
        let authority: Authority = upstream
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {upstream} has no host"))?;
        let scheme = upstream.scheme().cloned().unwrap_or(Scheme::HTTP);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if scheme == Scheme::HTTPS {
            let config = tls.ok_or("an https upstream needs a TLS client config")?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("upstream host {host}: {e}"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        let (target, name) = match socket {
            Some(path) => (
                Target::Unix(path.to_path_buf()),
                format!("unix:{}", path.display()),
            ),
            None => {
                let port = authority
                    .port_u16()
                    .unwrap_or(if tls.is_some() { 443 } else { 80 });
                (Target::Tcp { host, port }, authority.to_string())
            }
        };
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream authority {authority}: {e}"))?;
        Ok(Pool {
            target,
            name,
            host,
            tls,
            max_inflight,
            max_idle,
            preserve_header_case,
            case: CaseBook::default(),
            inflight: AtomicUsize::new(0),
            idle_count: AtomicUsize::new(0),
            // One list per worker, and one for any other thread.
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    /// The upstream's `host:port`, for `Host` when the client's is not kept.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Takes an in-flight slot, or says the upstream is busy (at once, never a wait). The slot
    /// is released when the exchange is over (see [`PooledBody`]).
    pub fn claim(self: &Arc<Self>) -> Result<Slot, ProxyError> {
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= self.max_inflight {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::UpstreamBusy);
        }
        Ok(Slot(Arc::clone(self)))
    }

    /// Sends `request` (origin-form URI, `Host` set) in `slot`, waiting until `deadline` at
    /// most for the response head (and for a small body, read whole). The response body gives
    /// the connection back to the pool when it ends cleanly.
    pub fn send(
        &self,
        slot: Slot,
        request: Request<Body>,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<Response<PooledBody>, ProxyError>> + Send + '_
    {
        // The head is written here, before the future: what the future keeps across its
        // awaits is the head's bytes, not the request (hyper keeps one request's future per
        // connection, so its size is every connection's).
        let (parts, mut body) = request.into_parts();
        let framing = request_framing(&parts, &body);
        let mut head = spare::head_buffer();
        h1::encode_request(&parts, framing, self.preserve_header_case, &mut head);
        // A small complete body goes out with the head, in one write, and can be written
        // again should a stale connection make a retry necessary.
        if let Body::Full(Some(bytes)) = &body {
            if bytes.len() <= INLINE_BODY {
                head.extend_from_slice(bytes);
                body = Body::Full(None);
            }
        }
        let head = head.freeze();
        let chunked = framing == RequestBody::Chunked;
        let http::request::Parts {
            method, headers, ..
        } = parts;
        spare::keep_header_map(headers);
        // Boxed: the exchange's state (the connection, its buffers, a timer) is needed while
        // a request is in flight, not for the life of every client connection.
        Box::pin(self.exchange(slot, head, body, chunked, method, deadline))
    }

    async fn exchange(
        &self,
        slot: Slot,
        head: Bytes,
        mut body: Body,
        chunked: bool,
        method: Method,
        deadline: Instant,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let retry_allowed = body.is_end_stream() && idempotent(&method);
        let exchange = async {
            let mut fresh = false;
            loop {
                let (mut conn, reused) = match (!fresh).then(|| self.checkout()).flatten() {
                    Some(conn) => (conn, true),
                    // Boxed: the connect future (TLS included) is large and rarely needed;
                    // inline, every request's future would carry (and move) it.
                    None => (Box::pin(self.connect()).await?, false),
                };
                match exchange(&mut conn, &head, &mut body, chunked, &method).await {
                    Ok(got) => return Ok((conn, got)),
                    // Nothing of an answer: the idle connection had been closed by the
                    // upstream. Once, on a fresh connection.
                    Err(Failure::Unwritten(_)) if reused => fresh = true,
                    Err(Failure::Unanswered(_)) if reused && retry_allowed => fresh = true,
                    Err(e) => return Err(e),
                }
            }
        };
        let exchanged = tokio::time::timeout_at(deadline, exchange).await;
        spare::keep_head_buffer(head);
        let exchanged = match exchanged {
            Err(_) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => return Err(self.failed(e)),
            Ok(Ok(exchanged)) => exchanged,
        };
        let (
            mut conn,
            Got {
                head,
                mut read,
                written,
            },
        ) = exchanged;
        let mut keep = head.keep_alive && written;
        if !written && head.status.as_u16() < 400 {
            // An upstream that says yes before it has the whole request has not read it.
            return Err(self.failed(Failure::Early(head.status)));
        }
        let extensions = match head.case {
            Some(print) if self.preserve_header_case => match self.case.known(print) {
                Some(known) => Some(known),
                // Boxed: learning runs hyper's parser, a large future, rarely.
                None => Some(Box::pin(self.case.learn(print, &head.raw)).await),
            },
            _ => None,
        };
        let Head {
            status,
            headers,
            framing,
            ..
        } = head;
        let inner = if status == StatusCode::SWITCHING_PROTOCOLS {
            Inner::Upgrade(Some((conn, read)))
        } else {
            if let Framing::Length(n) = framing {
                if n <= READ_BUF as u64 && (read.len() as u64) < n {
                    // Small: read whole before answering, so that a short body is a 502.
                    let rest = tokio::time::timeout_at(
                        deadline,
                        read_at_least(&mut conn, &mut read, n as usize),
                    )
                    .await;
                    match rest {
                        Err(_) => return Err(ProxyError::UpstreamTimeout),
                        Ok(Err(e)) => return Err(self.failed(e)),
                        Ok(Ok(())) => {}
                    }
                }
            }
            let mut decoder = Decoder::new(framing);
            match framing {
                Framing::Empty => {
                    keep &= read.is_empty();
                    if keep {
                        self.checkin(conn);
                    }
                    spare::keep_read_buffer(read);
                    Inner::Complete(None)
                }
                Framing::Length(n) if read.len() as u64 >= n => {
                    let data = match decoder.decode(&mut read) {
                        Ok(Decoded::Data(data)) => data,
                        _ => Bytes::new(),
                    };
                    keep &= read.is_empty();
                    if keep {
                        self.checkin(conn);
                    }
                    spare::keep_read_buffer(read);
                    Inner::Complete(Some(data))
                }
                Framing::Length(_) => Inner::Stream(Box::new(Stream {
                    conn,
                    read,
                    decoder,
                    keep,
                    first: None,
                })),
                Framing::Chunked | Framing::Close => {
                    // What arrived with the head is decoded now: bad framing in it is still a
                    // 502, and a body that is all here frees the connection at once.
                    let mut parts = Vec::new();
                    let ended = loop {
                        match decoder.decode(&mut read) {
                            Ok(Decoded::Data(data)) if data.is_empty() => {}
                            Ok(Decoded::Data(data)) => parts.push(data),
                            Ok(Decoded::More) => break false,
                            Ok(Decoded::End) => break true,
                            Err(e) => return Err(self.failed(Failure::Protocol(e))),
                        }
                    };
                    let first = match parts.len() {
                        0 => None,
                        1 => parts.pop(),
                        _ => Some(Bytes::from(parts.concat())),
                    };
                    if ended {
                        keep &= read.is_empty();
                        if keep {
                            self.checkin(conn);
                        }
                        spare::keep_read_buffer(read);
                        Inner::Complete(first)
                    } else {
                        Inner::Stream(Box::new(Stream {
                            conn,
                            read,
                            decoder,
                            keep: keep && framing == Framing::Chunked,
                            first,
                        }))
                    }
                }
            }
        };
        let mut response = Response::new(PooledBody {
            inner,
            slot: Some(slot),
        });
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        if let Some(extensions) = extensions {
            *response.extensions_mut() = extensions;
        }
        Ok(response)
    }

    /// What a failed exchange means for the client, logged once here.
    fn failed(&self, failure: Failure) -> ProxyError {
        let upstream = &self.name;
        match failure {
            Failure::ClientBody(e) => super::classify(&*e),
            Failure::Connect(e) => {
                tracing::warn!(%upstream, error = %e, "cannot connect to the upstream");
                ProxyError::UpstreamUnavailable
            }
            Failure::Unwritten(e) | Failure::Io(e) => {
                tracing::warn!(%upstream, error = %e, "upstream connection failed");
                ProxyError::UpstreamUnavailable
            }
            Failure::Unanswered(e) => {
                tracing::warn!(%upstream, error = %e, "upstream closed the connection without an answer");
                ProxyError::UpstreamUnavailable
            }
            Failure::Protocol(e) => {
                tracing::warn!(%upstream, error = %e, "upstream response refused");
                ProxyError::UpstreamUnavailable
            }
            Failure::Early(status) => {
                tracing::warn!(%upstream, %status, "upstream answered before the request was written in full");
                ProxyError::UpstreamUnavailable
            }
        }
    }

    fn slot_list(&self) -> &Mutex<Vec<Idle>> {
        let i = crate::worker::slot().min(self.idle.len() - 1);
        &self.idle[i]
    }

    /// The most recently used idle connection of this worker that is still open and young.
    fn checkout(&self) -> Option<Conn> {
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut idle) = list.pop() {
            self.idle_count.fetch_sub(1, Ordering::AcqRel);
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.is_reusable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange ended cleanly, unless the pool is full.
    fn checkin(&self, conn: Conn) {
        if self.idle_count.fetch_add(1, Ordering::AcqRel) >= self.max_idle {
            self.idle_count.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes this worker's connections idle for longer than [`IDLE_TIMEOUT`] (or closed by
    /// the upstream).
    pub fn sweep(&self) {
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        let before = list.len();
        list.retain_mut(|idle| idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.is_reusable());
        self.idle_count
            .fetch_sub(before - list.len(), Ordering::AcqRel);
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        let connect = async {
            match &self.target {
                Target::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).await?)),
                Target::Tcp { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    let _ = tcp.set_nodelay(true);
                    match &self.tls {
                        None => Ok(Conn::Tcp(tcp)),
                        Some((connector, name)) => {
                            let tls = connector.connect(name.clone(), tcp).await?;
                            Ok(Conn::Tls(Box::new(tls)))
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Failure::Connect(e)),
            Err(_) => Err(Failure::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }
}

/// How the request body goes on the wire: its length when known (the client's
/// `Content-Length`, or a complete body), else chunked; nothing for a request without one.
fn request_framing(parts: &http::request::Parts, body: &Body) -> RequestBody {
    let declared = parts.headers.contains_key(http::header::CONTENT_LENGTH);
    match body.size_hint().exact() {
        Some(0) if !declared => RequestBody::None,
        Some(n) => RequestBody::Length(n),
        None if body.is_end_stream() => RequestBody::None,
        None => RequestBody::Chunked,
    }
}

/// Methods whose request may be sent twice (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Why an exchange failed.
enum Failure {
    Connect(io::Error),
    /// The request head could not be written: the upstream had closed the connection.
    Unwritten(io::Error),
    /// The upstream closed the connection (or reset it) before a byte of answer.
    Unanswered(io::Error),
    Io(io::Error),
    Protocol(h1::Error),
    /// The client's request body failed (its fault: 400, 408 or 413).
    ClientBody(BoxError),
    /// A final, non-error answer before the request was written in full.
    Early(StatusCode),
}

/// What an exchange got: the final response head, what was read after it, and whether the
/// request was written in full before it came.
struct Got {
    head: Head,
    read: BytesMut,
    written: bool,
}

/// Writes the request on `conn` and reads the final response head (1xx skipped, 101 kept).
async fn exchange(
    conn: &mut Conn,
    head: &Bytes,
    body: &mut Body,
    chunked: bool,
    method: &Method,
) -> Result<Got, Failure> {
    let mut out = Out::bytes(head.clone());
    poll_fn(|cx| out.poll_write(conn, cx))
        .await
        .map_err(Failure::Unwritten)?;
    let mut read = spare::read_buffer(FIRST_READ);
    let early = if body.is_end_stream() {
        None
    } else {
        // Let the upstream see the head before the body (TLS buffers it otherwise).
        poll_fn(|cx| Pin::new(&mut *conn).poll_flush(cx))
            .await
            .map_err(Failure::Io)?;
        stream_body(conn, body, chunked, &mut read, method).await?
    };
    poll_fn(|cx| Pin::new(&mut *conn).poll_flush(cx))
        .await
        .map_err(Failure::Io)?;
    if let Some(head) = early {
        return Ok(Got {
            head,
            read,
            written: false,
        });
    }
    loop {
        if let Some(head) = final_head(&mut read, method)? {
            return Ok(Got {
                head,
                read,
                written: true,
            });
        }
        let empty = read.is_empty();
        read.reserve(if empty { FIRST_READ } else { READ_BUF });
        match conn.read_buf(&mut read).await {
            Ok(0) if empty => return Err(Failure::Unanswered(io::ErrorKind::UnexpectedEof.into())),
            Ok(0) => return Err(Failure::Protocol(h1::Error::ClosedBeforeHead)),
            Ok(_) => {}
            Err(e) if empty => return Err(Failure::Unanswered(e)),
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

/// The next final response head in `read` (interim 1xx ones skipped; 101 is final here).
fn final_head(read: &mut BytesMut, method: &Method) -> Result<Option<Head>, Failure> {
    loop {
        match h1::parse_head(read, method, spare::header_map).map_err(Failure::Protocol)? {
            Some(head) if head.status.is_informational() && head.status != 101 => continue,
            found => return Ok(found),
        }
    }
}

/// Streams the client's body to the upstream (chunked when its length is unknown), reading
/// meanwhile: a final response head that arrives before the body is written in full ends the
/// writing and is returned.
async fn stream_body(
    conn: &mut Conn,
    body: &mut Body,
    chunked: bool,
    read: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, Failure> {
    let mut out: Option<Out> = None;
    let mut ended = false;
    poll_fn(|cx| loop {
        if let Some(pending) = &mut out {
            match pending.poll_write(conn, cx) {
                Poll::Ready(Ok(())) => {
                    out = None;
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Io(e))),
                Poll::Pending => {}
            }
        } else if !ended {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            out = Some(Out::chunk(data, chunked));
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Failure::ClientBody(e))),
                Poll::Ready(None) => {
                    ended = true;
                    if chunked {
                        out = Some(Out::bytes(Bytes::from_static(b"0\r\n\r\n")));
                    }
                    continue;
                }
                Poll::Pending => {}
            }
        } else {
            return Poll::Ready(Ok(None));
        }
        // Waiting on the client or the upstream: has the upstream answered already?
        if read.len() == read.capacity() {
            read.reserve(READ_BUF);
        }
        match poll_read_buf(Pin::new(&mut *conn), cx, read) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())))
            }
            Poll::Ready(Ok(_)) => match final_head(read, method) {
                Ok(Some(head)) => return Poll::Ready(Ok(Some(head))),
                Ok(None) => continue,
                Err(e) => return Poll::Ready(Err(e)),
            },
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Io(e))),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Reads until `read` holds at least `n` bytes (a small body, read whole).
async fn read_at_least(conn: &mut Conn, read: &mut BytesMut, n: usize) -> Result<(), Failure> {
    read.reserve(n - read.len());
    while read.len() < n {
        match conn.read_buf(read).await {
            Ok(0) => return Err(Failure::Protocol(h1::Error::Truncated)),
            Ok(_) => {}
            Err(e) => return Err(Failure::Io(e)),
        }
    }
    Ok(())
}

/// Bytes being written: a chunk's size line, its data and its CRLF (or plain bytes), as one
/// vectored write, resumed where a partial write left off.
struct Out {
    line: [u8; 18],
    line_at: u8,
    data: Bytes,
    tail: &'static [u8],
    done: usize,
}

impl Out {
    fn bytes(data: Bytes) -> Out {
        Out {
            line: [0; 18],
            line_at: 18,
            data,
            tail: b"",
            done: 0,
        }
    }

    fn chunk(data: Bytes, chunked: bool) -> Out {
        if !chunked {
            return Out::bytes(data);
        }
        let mut line = [0; 18];
        let at = 18 - h1::chunk_header(data.len(), &mut line).len();
        Out {
            line,
            line_at: at as u8,
            data,
            tail: b"\r\n",
            done: 0,
        }
    }

    fn poll_write(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let parts: [&[u8]; 3] = [&self.line[self.line_at as usize..], &self.data, self.tail];
            let mut skip = self.done;
            let mut slices = [IoSlice::new(&[]); 3];
            let mut count = 0;
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[count] = IoSlice::new(&part[skip..]);
                skip = 0;
                count += 1;
            }
            if count == 0 {
                return Poll::Ready(Ok(()));
            }
            let written = ready!(Pin::new(&mut *conn).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.done += written;
        }
    }
}

/// The slot an exchange holds; released when dropped.
pub struct Slot(Arc<Pool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream response body: read from the connection as the client takes it (or already
/// whole, when small), giving the connection back to the pool when it ends cleanly (a body
/// dropped early closes it), and holding the in-flight slot until then.
pub struct PooledBody {
    inner: Inner,
    slot: Option<Slot>,
}

enum Inner {
    /// Read whole already (the connection is back in the pool, or closed).
    Complete(Option<Bytes>),
    /// Still on the connection (boxed: the common response is read whole, and hyper keeps
    /// room for one body in every client connection).
    Stream(Box<Stream>),
    /// A 101: the connection, and what the upstream sent after the head.
    Upgrade(Option<(Conn, BytesMut)>),
}

/// A response body still on its connection.
struct Stream {
    conn: Conn,
    read: BytesMut,
    decoder: Decoder,
    /// Whether the connection can be pooled once the body has ended.
    keep: bool,
    /// Body bytes decoded already (those that came with the head), sent first.
    first: Option<Bytes>,
}

impl PooledBody {
    /// For an upgraded (101) exchange: the connection, the bytes the upstream already sent
    /// on it, and the slot, to be held for the tunnel's life.
    pub fn into_upgrade(mut self) -> Option<(Conn, BytesMut, Slot)> {
        match &mut self.inner {
            Inner::Upgrade(io) => {
                let (conn, read) = io.take()?;
                Some((conn, read, self.slot.take()?))
            }
            _ => None,
        }
    }

    /// The body has ended: the connection goes back to the pool if it may, and the slot is
    /// released.
    fn finish(&mut self) {
        let inner = std::mem::replace(&mut self.inner, Inner::Complete(None));
        if let Inner::Stream(stream) = inner {
            let Stream {
                conn, read, keep, ..
            } = *stream;
            if let (true, Some(slot)) = (keep && read.is_empty(), self.slot.as_ref()) {
                slot.0.checkin(conn);
            }
            spare::keep_read_buffer(read);
        }
        self.slot = None;
    }

    /// The body failed (bad framing, or the connection): the connection is closed, the slot
    /// released.
    fn fail<E>(&mut self, error: E) -> BoxError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        if let Some(slot) = &self.slot {
            tracing::warn!(upstream = %slot.0.name, %error, "upstream response body failed");
        }
        self.inner = Inner::Complete(None);
        self.slot = None;
        BoxError::from(error)
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let (conn, read, decoder) = match &mut this.inner {
                Inner::Complete(data) => {
                    let data = data.take();
                    if data.is_none() {
                        this.slot = None;
                    }
                    return Poll::Ready(data.filter(|d| !d.is_empty()).map(|d| Ok(Frame::data(d))));
                }
                Inner::Upgrade(_) => return Poll::Ready(None),
                Inner::Stream(stream) => {
                    let Stream {
                        conn,
                        read,
                        decoder,
                        first,
                        ..
                    } = &mut **stream;
                    if let Some(data) = first.take() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    (conn, read, decoder)
                }
            };
            match decoder.decode(read) {
                Ok(Decoded::Data(data)) => {
                    if decoder.is_done() {
                        this.finish();
                    }
                    if data.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
            if read.capacity() - read.len() < 1024 {
                read.reserve(READ_BUF);
            }
            match ready!(poll_read_buf(Pin::new(conn), cx, read)) {
                Ok(0) => match decoder.eof() {
                    Ok(()) => {
                        // Close-delimited: over, and the connection with it.
                        if let Inner::Stream(stream) = &mut this.inner {
                            stream.keep = false;
                        }
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
                },
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Complete(data) => data.as_ref().is_none_or(Bytes::is_empty),
            Inner::Stream(stream) => stream.first.is_none() && stream.decoder.is_done(),
            Inner::Upgrade(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Complete(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Stream(stream) => match stream.decoder.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Inner::Upgrade(_) => SizeHint::with_exact(0),
        }
    }
}
