//! The listener: worker threads, each with its own single-threaded runtime, accepting on the
//! one bound socket; per connection TLS, HTTP/1.1 or HTTP/2, and the time limits of SPEC §9;
//! graceful drain.
//!
//! Limits are process-wide (one connection semaphore for all workers). The TLS handshake must
//! end within `header_read_timeout` of accept; then the connection's watchdog ([`connection`])
//! holds the rest of SPEC §9's time limits. Idle tracking is ours rather than hyper's, whose
//! HTTP/1 header timer would also close a keep-alive connection that is merely waiting for its
//! next request.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::admin::Health;
use crate::identity::{ClientCert, Peer};
use crate::proxy::{Gate, SharedGate};

mod connection;
mod misdirected;

use connection::{drive, ConnectionState};

/// How often expired cache entries are swept.
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How often (in access-log flush ticks) each worker closes upstream connections idle too long.
const UPSTREAM_SWEEP_TICKS: u32 = 10;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// HTTP/2 PING interval and the time a PING may go unanswered before the peer counts as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

thread_local! {
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
    /// HTTP/1.1 or HTTP/2, whichever the client speaks.
    builder: auto::Builder<TokioExecutor>,
    /// HTTP/1.1 only: TLS connections that did not negotiate `h2`.
    http1: hyper::server::conn::http1::Builder,
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
    let workers = crate::worker::count(server);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        // Vectored writes (head and body chunks queued, not copied): a flattened write buffer
        // saves ~1 % of a small request's instructions, but it keeps the capacity it grew to,
        // so every idle keep-alive connection that once carried a large body would hold
        // ~440 KiB (tests/floods.rs).
        .writev(true)
        .max_buf_size(server.max_header_bytes)
        // No title case: header names as HTTP/1 clients have always seen them
        // (`X-Rucio-Auth-Token`, which a seed's `sed` looks for) come from the case each
        // response carries (`connection::conventional_case` for tokengate's own, the upstream's
        // for a proxied one); title-casing every name would cost every response.
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(server.max_concurrent_streams)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .header_read_timeout(None)
        .writev(true)
        .max_buf_size(server.max_header_bytes)
        .keep_alive(true);
    connection::record_conventional_case().await;
    let max_connections = server.max_connections;
    let connections = Arc::new(Semaphore::new(max_connections));
    let (drain_tx, drain) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        gate: Arc::clone(&gate),
        builder,
        http1,
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
            gate.limits().purge();
            crate::identity::purge_principals();
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
    crate::worker::become_worker(index);
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
    match acceptor {
        None => {
            let mut first = [0u8; 1];
            match tokio::time::timeout_at(first_deadline, tcp.peek(&mut first)).await {
                Ok(Ok(1..)) if first[0] == misdirected::TLS_HANDSHAKE => {
                    misdirected::tls_on_plain(addr.ip());
                }
                Ok(Ok(1..)) => {
                    let peer = Peer::new(addr, false, None);
                    drive(&shared, tcp, peer, state, first_deadline, false).await;
                }
                _ => {}
            }
        }
        // Boxed: the handshake and a TLS connection's futures are twice the size of a plain
        // one's; inline, every plain connection's task would be that large too.
        Some(acceptor) => {
            Box::pin(tls_connection(
                &shared,
                &acceptor,
                tcp,
                addr,
                state,
                first_deadline,
            ))
            .await
        }
    }
}

/// A TLS connection: the handshake (within `header_read_timeout` of the accept), then HTTP.
async fn tls_connection(
    shared: &Arc<Shared>,
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    state: Arc<ConnectionState>,
    first_deadline: Instant,
) {
    let handshake = crate::tls::handshake(acceptor, tcp);
    match tokio::time::timeout_at(first_deadline, handshake).await {
        Ok(Ok(stream)) => {
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(ClientCert::of_chain)
                .map(Arc::new);
            // HTTP/2 only when it was negotiated, or offered and the client chose nothing.
            let http1_only = match stream.get_ref().1.alpn_protocol() {
                Some(protocol) => protocol != b"h2",
                None => !acceptor.config().alpn_protocols.iter().any(|p| p == b"h2"),
            };
            let peer = Peer::new(addr, true, client);
            drive(shared, stream, peer, state, first_deadline, http1_only).await;
        }
        // A TCP probe that closed without a byte is not a failed handshake.
        Ok(Err(crate::tls::HandshakeError::Closed)) => {}
        Ok(Err(crate::tls::HandshakeError::PlainHttp(tcp))) => {
            crate::telemetry::tls_handshake_error();
            misdirected::plain_http_on_tls(tcp, addr.ip(), first_deadline).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, D, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_plain_connection_task_stays_small() {
        // Every connection is a task of this size for its whole life; with the TLS path
        // inlined, a plain connection's was 7 KiB.
        let size = returned_size::<
            _,
            Arc<Shared>,
            tokio::net::TcpStream,
            SocketAddr,
            OwnedSemaphorePermit,
            _,
        >(&connection);
        assert!(size <= 3072, "a connection's future is {size} bytes");
    }
}
