//! The listener: worker threads, each with its own single-threaded runtime, accepting on the
//! one bound socket; per connection TLS, HTTP/1.1 or HTTP/2, and the time limits of SPEC §9;
//! graceful drain.
//!
//! Limits are process-wide (one connection semaphore for all workers). Every connection has a
//! watchdog that enforces, from accept: `header_read_timeout` for the TLS handshake, the HTTP/2
//! preface and the first request head (and for every later HTTP/1 head), and `idle_timeout`
//! for a keep-alive HTTP/1 connection or an HTTP/2 connection with no open stream. Idle tracking
//! is ours rather than hyper's, whose HTTP/1 header timer would also close a keep-alive
//! connection that is merely waiting for its next request.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::admin::Health;
use crate::config::ServerConfig;
use crate::error::{Body, BoxError};
use crate::proxy::{self, ClientCert, Gate, Peer, SharedGate};

/// How often expired cache entries are swept.
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How often (in access-log flush ticks) each worker closes upstream connections idle too long.
const UPSTREAM_SWEEP_TICKS: u32 = 10;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// HTTP/2 PING interval and the time a PING may go unanswered before the peer counts as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// How many workers a config asks for: `[server] workers`, else one per core this process may
/// use (`available_parallelism` respects affinity and cgroup quota).
pub fn worker_count(server: &ServerConfig) -> usize {
    server.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
}

thread_local! {
    /// This thread's worker index; `usize::MAX` on other threads.
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
    /// The gate this worker's requests use.
    static LOCAL_GATE: RefCell<Option<Arc<WorkerGate>>> = const { RefCell::new(None) };
}

/// A worker's handle on the gate in force: its requests share this worker-local reference
/// count rather than bouncing the gate's own between cores.
struct WorkerGate(Arc<Gate>);

impl std::ops::Deref for WorkerGate {
    type Target = Gate;

    fn deref(&self) -> &Gate {
        &self.0
    }
}

/// The calling thread's worker index (`usize::MAX` outside the workers): per-worker state,
/// such as the upstream pools' idle lists, is indexed by it.
pub fn worker_slot() -> usize {
    WORKER.with(Cell::get)
}

/// The gate in force, for one request.
fn gate_for_request(shared: &SharedGate) -> Arc<WorkerGate> {
    let current = shared.load();
    LOCAL_GATE.with(|local| {
        let mut local = local.borrow_mut();
        match &*local {
            Some(gate) if Arc::ptr_eq(&gate.0, &*current) => Arc::clone(gate),
            _ => {
                let gate = Arc::new(WorkerGate(arc_swap::Guard::into_inner(current)));
                *local = Some(Arc::clone(&gate));
                gate
            }
        }
    })
}

/// The time limits of a connection (the starting config's).
#[derive(Clone, Copy)]
struct Limits {
    header_read: Duration,
    idle: Duration,
    /// The watchdog's longest sleep: a quarter of the shorter limit, 50 ms to 2.5 s.
    tick: Duration,
}

/// What every worker shares.
struct Shared {
    gate: SharedGate,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Becomes true on SIGTERM: stop accepting, close idle connections, finish in-flight ones.
    drain: watch::Receiver<bool>,
    /// Becomes true when the drain is over: workers return (what is left is dropped).
    stop: watch::Receiver<bool>,
}

/// Serves until `shutdown` resolves, then drains in-flight requests for up to
/// `server.drain_timeout`. Connection settings (limits, timeouts, workers) are the starting
/// config's; routes, validators and certificates follow reloads. Runs on the control runtime;
/// the workers run on threads of their own.
pub async fn serve(
    gate: SharedGate,
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let initial = gate.load_full();
    let server = &initial.config.server;
    let workers = worker_count(server);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(server.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(server.max_concurrent_streams)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let max_connections = server.max_connections;
    let connections = Arc::new(Semaphore::new(max_connections));
    let (drain_tx, drain) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        gate: Arc::clone(&gate),
        builder,
        limits: Limits {
            header_read: server.header_read_timeout,
            idle: server.idle_timeout,
            tick: (server.header_read_timeout.min(server.idle_timeout) / 4)
                .clamp(Duration::from_millis(50), Duration::from_millis(2500)),
        },
        connections: Arc::clone(&connections),
        drain,
        stop,
    });
    let drain_timeout = server.drain_timeout;
    drop(initial);

    let listener = listener
        .into_std()
        .map_err(|e| format!("cannot hand the listener to the workers: {e}"))?;
    let mut threads = Vec::with_capacity(workers);
    for index in 0..workers {
        let listener = listener
            .try_clone()
            .map_err(|e| format!("cannot share the listener: {e}"))?;
        let shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("tokengate-worker-{index}"))
            .spawn(move || run_worker(index, listener, shared))
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        threads.push(thread);
    }
    // The workers hold the socket now.
    drop(listener);
    tracing::info!(workers, "workers started");

    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(CACHE_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let gate = gate.load();
            gate.cache().purge_expired();
            crate::validate::purge_principals();
            crate::telemetry::cache_entries(gate.cache().len());
        }
    });

    shutdown.await;
    health.start_draining();
    let _ = drain_tx.send(true);
    tracing::info!(timeout = ?drain_timeout, "draining connections");
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain_timeout, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
        crate::access_log::sync();
    })
    .await;
    sweeper.abort();
    Ok(())
}

/// One worker: a single-threaded runtime accepting on its copy of the listener.
fn run_worker(index: usize, listener: std::net::TcpListener, shared: Arc<Shared>) {
    WORKER.with(|w| w.set(index));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, worker = index, "cannot start a worker runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, worker = index, "cannot register the listener");
                return;
            }
        };
        let upkeep = tokio::spawn(upkeep(Arc::clone(&shared.gate)));
        accept(listener, &shared).await;
        let mut stop = shared.stop.clone();
        let _ = stop.wait_for(|stopped| *stopped).await;
        upkeep.abort();
    });
    // Dropping the runtime drops whatever outlived the drain.
    drop(runtime);
    crate::access_log::flush_thread();
}

/// Accepts until the drain starts.
async fn accept(listener: TcpListener, shared: &Arc<Shared>) {
    let mut drain = shared.drain.clone();
    loop {
        // Wait for a free connection slot first: over the limit, clients queue in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&shared.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = drain.wait_for(|d| *d) => return,
        };
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = drain.wait_for(|d| *d) => return,
        };
        tokio::spawn(connection(Arc::clone(shared), tcp, addr, permit));
    }
}

/// A worker's periodic chores: hand buffered access lines to the writer and drop a replaced
/// gate (every second), and close upstream connections idle past their time.
async fn upkeep(gate: SharedGate) {
    let mut tick = tokio::time::interval(crate::access_log::FLUSH_INTERVAL);
    let mut ticks: u32 = 0;
    loop {
        tick.tick().await;
        crate::access_log::flush_thread();
        // Let go of a gate a reload replaced, even on a worker no request has reached since:
        // it holds its routes' upstream pools and their idle connections.
        drop(gate_for_request(&gate));
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(UPSTREAM_SWEEP_TICKS) {
            gate.load().sweep_idle_upstreams();
        }
    }
}

/// One accepted connection: TLS within the header-read deadline, then HTTP.
async fn connection(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let first_deadline = Instant::now() + shared.limits.header_read;
    let state = Arc::new(ConnectionState::new(permit));
    // New handshakes use the certificate in force now.
    let acceptor = shared.gate.load().acceptor.clone();
    let Some(acceptor) = acceptor else {
        let peer = Peer::new(addr, false, None);
        return drive(&shared, tcp, peer, state, first_deadline).await;
    };
    let handshake = crate::tls::handshake(&acceptor, tcp);
    match tokio::time::timeout_at(first_deadline, handshake).await {
        Ok(Ok(stream)) => {
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(ClientCert::of_chain)
                .map(Arc::new);
            let peer = Peer::new(addr, true, client);
            drive(&shared, stream, peer, state, first_deadline).await;
        }
        // A TCP probe that closed without a byte is not a failed handshake.
        Ok(Err(crate::tls::HandshakeError::Closed)) => {}
        Ok(Err(e)) => {
            crate::telemetry::tls_handshake_error();
            tracing::info!(client = %addr.ip(), error = %e, "TLS handshake failed");
        }
        Err(_) => {
            crate::telemetry::tls_handshake_error();
            tracing::info!(client = %addr.ip(), "TLS handshake not completed within header_read_timeout");
        }
    }
}

/// Serves HTTP on one connection, under its watchdog. Each request uses the gate in force when
/// it arrives.
async fn drive<I>(
    shared: &Arc<Shared>,
    io: I,
    peer: Peer,
    state: Arc<ConnectionState>,
    first_deadline: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let peer = Arc::new(peer);
    let service = {
        let gate = Arc::clone(&shared.gate);
        let state = Arc::clone(&state);
        service_fn(move |request: Request<Incoming>| {
            let in_flight = InFlight::begin(&state, request.version());
            let gate = gate_for_request(&gate);
            let peer = Arc::clone(&peer);
            async move {
                let response = proxy::handle(&gate, &peer, request).await;
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
    let served = shared.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let mut drain = shared.drain.clone();
    let mut draining = false;
    // Set when the watchdog asked an idle connection to close: it gets one more header-read
    // period to do so, then it is dropped.
    let mut close_by: Option<Instant> = None;
    let mut watch = Watch::new(first_deadline);
    loop {
        let now = Instant::now();
        let (verdict, wake) = watch.check(&state, now, shared.limits);
        match verdict {
            Verdict::Expired => {
                tracing::debug!(client = %addr.ip(), "connection closed: too slow");
                return;
            }
            Verdict::Idle if close_by.is_none() && !draining => {
                served.as_mut().graceful_shutdown();
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
                served.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// What a connection's requests and socket tell its watchdog. Shared by the connection task,
/// its requests and its socket (which may outlive the task as an upgraded tunnel): the
/// connection slot is given back when the last of them is gone. Only counters and flags: the
/// request path reads no clock for the watchdog.
struct ConnectionState {
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
    fn new(permit: OwnedSemaphorePermit) -> ConnectionState {
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
