//! The listener: accept loop, connection limits, HTTP/1.1 and HTTP/2 (ALPN or prior
//! knowledge), graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::Health;
use crate::proxy::{self, ClientCert, Peer, SharedGate};

/// How often expired cache entries are swept.
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Serves until `shutdown` resolves, then drains in-flight requests for up to
/// `server.drain_timeout`. Connection settings (limits, timeouts) are the starting config's;
/// routes, validators and certificates follow reloads.
pub async fn serve(
    shared: SharedGate,
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let initial = shared.load_full();
    let server = &initial.config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let limit = Arc::new(Semaphore::new(server.max_connections));
    let graceful = GracefulShutdown::new();
    let drain_timeout = server.drain_timeout;
    drop(initial);

    let sweeper = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CACHE_SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                let gate = shared.load();
                gate.cache().purge_expired();
                crate::telemetry::cache_entries(gate.cache().len());
            }
        })
    };

    tokio::pin!(shutdown);
    loop {
        // Wait for a free connection slot first: over the limit, clients queue in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("semaphore never closed"),
            () = &mut shutdown => break,
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
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let builder = Arc::clone(&builder);
        // New handshakes use the certificate in force now.
        let acceptor = shared.load().acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let peer = |tls, client| Peer { addr, tls, client };
            match acceptor {
                None => {
                    serve_connection(
                        shared,
                        &builder,
                        watcher,
                        TokioIo::new(tcp),
                        peer(false, None),
                    )
                    .await
                }
                Some(acceptor) => match crate::tls::handshake(&acceptor, tcp).await {
                    Ok(stream) => {
                        let client = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(ClientCert::of_chain)
                            .map(Arc::new);
                        serve_connection(
                            shared,
                            &builder,
                            watcher,
                            TokioIo::new(stream),
                            peer(true, client),
                        )
                        .await
                    }
                    // A TCP probe that closed without a byte is not a failed handshake.
                    Err(crate::tls::HandshakeError::Closed) => {}
                    Err(e) => {
                        crate::telemetry::tls_handshake_error();
                        tracing::info!(client = %addr.ip(), error = %e, "TLS handshake failed");
                    }
                },
            }
        });
    }

    health.start_draining();
    drop(listener);
    sweeper.abort();
    tracing::info!(timeout = ?drain_timeout, "draining connections");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    Ok(())
}

/// Serves HTTP on one accepted (and possibly TLS) connection. Each request uses the gate in
/// force when it arrives.
async fn serve_connection<I>(
    shared: SharedGate,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    peer: Peer,
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let service = service_fn(move |request| {
        let gate = shared.load_full();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(proxy::handle(gate, peer, request).await) }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(client = %addr.ip(), error = %e, "connection ended with an error");
    }
}
