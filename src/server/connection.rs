//! One client connection, under its watchdog: `header_read_timeout` from accept (the TLS
//! handshake is bounded by the caller; here the HTTP/2 preface, the first request head and every
//! later HTTP/1 head), `idle_timeout` between requests (HTTP/2: no open stream). The watchdog's
//! bookkeeping is counters and flags that requests and the socket update without reading a
//! clock; it looks at them at least every tick.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Version};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{gate_for_request, Limits, Shared};
use crate::error::BoxError;
use crate::identity::Peer;
use crate::proxy;
use crate::upstream::Body;

/// Serves HTTP on one connection, under its watchdog. Each request uses the gate in force when
/// it arrives.
pub(super) async fn drive<I>(
    shared: &Arc<Shared>,
    io: I,
    peer: Peer,
    state: Arc<ConnectionState>,
    first_deadline: Instant,
    http1_only: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let peer = Arc::new(peer);
    let service = {
        let gate = Arc::clone(&shared.gate);
        let state = Arc::clone(&state);
        service_fn(move |request: Request<Incoming>| {
            let version = request.version();
            let in_flight = InFlight::begin(&state, version);
            let gate = gate_for_request(&gate);
            let peer = Arc::clone(&peer);
            async move {
                let mut response = proxy::handle(&gate, &peer, request).await;
                // tokengate's own answers get their header names' case; a proxied one keeps
                // what the upstream client recorded (`preserve_header_case`) or is written in
                // lower case, at no cost.
                if version != Version::HTTP_2 && !response.body().is_proxied() {
                    if let Some(case) = OWN_CASE.get() {
                        *response.extensions_mut() = case.clone();
                    }
                }
                Ok::<_, Infallible>(response.map(|body| TrackedBody {
                    inner: body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let io = TokioIo::new(Tracked {
        io,
        state: Arc::clone(&state),
    });
    // hyper-util's `http1_only` does nothing for connections with upgrades, so a TLS client
    // that did not negotiate h2 is served by hyper's own HTTP/1 connection.
    if http1_only {
        // Boxed: inline, every connection's task would have room for both kinds.
        let mut served = Box::pin(shared.http1.serve_connection(io, service).with_upgrades());
        let close = |served: Pin<&mut _>| {
            hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(served)
        };
        watch(shared, served.as_mut(), close, addr, &state, first_deadline).await;
    } else {
        let served = shared.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(served);
        let close = |served: Pin<&mut _>| {
            hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(served)
        };
        watch(shared, served, close, addr, &state, first_deadline).await;
    }
}

/// Runs `served` under the connection's watchdog until it ends or is too slow; `close` asks it
/// to close once idle (when idle too long, or when the drain begins).
async fn watch<F, E>(
    shared: &Arc<Shared>,
    mut served: Pin<&mut F>,
    close: impl Fn(Pin<&mut F>),
    addr: std::net::SocketAddr,
    state: &ConnectionState,
    first_deadline: Instant,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut drain = shared.drain.clone();
    let mut draining = false;
    // Set when the watchdog asked an idle connection to close: it gets one more header-read
    // period to do so, then it is dropped.
    let mut close_by: Option<Instant> = None;
    let mut watch = Watch::new(first_deadline);
    loop {
        let now = Instant::now();
        let (verdict, wake) = watch.check(state, now, shared.limits);
        match verdict {
            Verdict::Expired => {
                tracing::debug!(client = %addr.ip(), "connection closed: too slow");
                return;
            }
            Verdict::Idle if close_by.is_none() && !draining => {
                close(served.as_mut());
                close_by = Some(now + shared.limits.header_read);
            }
            _ => {}
        }
        if close_by.is_some_and(|by| now >= by) {
            return;
        }
        // Requests starting and ending, and heads beginning, do not wake the watchdog (that
        // would cost every request a task wake-up); it looks again at least every tick, so a
        // limit is enforced at most a tick late.
        let wake = wake.min(now + shared.limits.tick);
        let wake = close_by.map_or(wake, |by| wake.min(by));
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(client = %addr.ip(), error = %e, "connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                draining = true;
                close(served.as_mut());
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// The header names tokengate's own responses carry, in their conventional case; hyper (which
/// holds names in lower case) writes them so over HTTP/1. A name missing here is written in lower
/// case. Some twice: a response may carry two.
const CONVENTIONAL_NAMES: &[&str] = &[
    "Allow",
    "Cache-Control",
    "Connection",
    "Content-Length",
    "Content-Security-Policy",
    "Content-Type",
    "Date",
    "ExceptionClass",
    "ExceptionMessage",
    "Location",
    "Referrer-Policy",
    "Retry-After",
    "WWW-Authenticate",
    "WWW-Authenticate",
    "X-Content-Type-Options",
    "X-Request-Id",
    "X-Rucio-Auth-Account",
    "X-Rucio-Auth-Token",
    "X-Rucio-Auth-Token-Expires",
    "X-Tokengate-Uri",
];

/// [`conventional_case`], made once when the server starts ([`record_conventional_case`]).
static OWN_CASE: std::sync::OnceLock<http::Extensions> = std::sync::OnceLock::new();

/// Makes [`conventional_case`]'s extensions, once, for every connection's own answers.
pub(super) async fn record_conventional_case() {
    if OWN_CASE.get().is_none() {
        let _ = OWN_CASE.set(conventional_case().await);
    }
}

/// Extensions that make hyper write [`CONVENTIONAL_NAMES`] in their case.
pub(super) async fn conventional_case() -> http::Extensions {
    let names: Vec<&[u8]> = CONVENTIONAL_NAMES.iter().map(|n| n.as_bytes()).collect();
    crate::upstream::case_extensions(&names).await
}

/// What a connection's requests and socket tell its watchdog. Shared by the connection task,
/// its requests and its socket (which may outlive the task as an upgraded tunnel): the
/// connection slot is given back when the last of them is gone. Only counters and flags: the
/// request path reads no clock for the watchdog.
pub(super) struct ConnectionState {
    _permit: OwnedSemaphorePermit,
    /// Requests (HTTP/2 streams) whose response has not been sent completely.
    active: AtomicUsize,
    /// Requests begun and ended so far: a change means the connection was not idle.
    events: AtomicU64,
    /// Bytes arrived while no request was in progress: an HTTP/1 request head has begun.
    head_begun: AtomicBool,
    /// A request has arrived.
    served: AtomicBool,
    http2: AtomicBool,
}

impl ConnectionState {
    pub(super) fn new(permit: OwnedSemaphorePermit) -> ConnectionState {
        ConnectionState {
            _permit: permit,
            active: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            head_begun: AtomicBool::new(false),
            served: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        }
    }

    /// Bytes arrived: on an idle connection, a request head has begun.
    fn bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) == 0 && !self.head_begun.load(Ordering::Relaxed) {
            self.head_begun.store(true, Ordering::Relaxed);
        }
    }
}

enum Verdict {
    Fine,
    Idle,
    Expired,
}

/// The watchdog's own clock-keeping for one connection: when it saw the connection go idle and
/// a head begin. Activity is noticed at the watchdog's next look (at most a tick late), so the
/// limits are enforced at most a tick late, never early.
struct Watch {
    first_deadline: Instant,
    idle_since: Instant,
    seen_events: u64,
    head_since: Option<Instant>,
}

impl Watch {
    fn new(first_deadline: Instant) -> Watch {
        Watch {
            first_deadline,
            idle_since: Instant::now(),
            seen_events: 0,
            head_since: None,
        }
    }

    /// Whether the connection broke a limit, is idle, or is fine; and when to look again.
    fn check(
        &mut self,
        state: &ConnectionState,
        now: Instant,
        limits: Limits,
    ) -> (Verdict, Instant) {
        if !state.served.load(Ordering::Relaxed) {
            if now >= self.first_deadline {
                return (Verdict::Expired, now);
            }
            return (Verdict::Fine, self.first_deadline);
        }
        let events = state.events.load(Ordering::Relaxed);
        if events != self.seen_events {
            self.seen_events = events;
            self.idle_since = now;
            self.head_since = None;
        }
        if state.active.load(Ordering::Relaxed) > 0 {
            return (Verdict::Fine, now + limits.idle);
        }
        if !state.http2.load(Ordering::Relaxed) && state.head_begun.load(Ordering::Relaxed) {
            // A head is on its way: the header-read limit applies, not the idle one.
            let since = *self.head_since.get_or_insert(now);
            let deadline = since + limits.header_read;
            if now >= deadline {
                return (Verdict::Expired, now);
            }
            return (Verdict::Fine, deadline);
        }
        let idle_deadline = self.idle_since + limits.idle;
        if now >= idle_deadline {
            return (Verdict::Idle, now);
        }
        (Verdict::Fine, idle_deadline)
    }
}

/// A request in progress on a connection; when dropped (the response sent, or the request
/// abandoned) the connection may become idle.
struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn begin(state: &Arc<ConnectionState>, version: Version) -> InFlight {
        state.active.fetch_add(1, Ordering::Relaxed);
        state.events.fetch_add(1, Ordering::Relaxed);
        state.head_begun.store(false, Ordering::Relaxed);
        state.served.store(true, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            state.http2.store(true, Ordering::Relaxed);
        }
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it has been sent.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's socket, telling the watchdog when bytes arrive.
struct Tracked<I> {
    io: I,
    state: Arc<ConnectionState>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper keeps the case it parsed only when the whole head parses: every name is recorded.
    #[tokio::test]
    async fn every_conventional_name_is_recorded() {
        let extensions = conventional_case().await;
        assert!(
            !extensions.is_empty(),
            "the in-memory request did not parse"
        );
        let mut response = http::Response::new(http_body_util::Empty::<Bytes>::new());
        *response.extensions_mut() = extensions;
        assert!(!response.extensions().is_empty());
    }
}
