//! Listening sockets: binding one, and the bounded accept loop of the side listeners (admin,
//! verify). Below everything that listens, so that none of them reaches into another.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// The accept loop of a side listener (admin, verify): at most `limit` connections at once
/// (more wait in the backlog), each handed to `serve` with the permit it must hold until it
/// ends; an accept error is logged and retried after a pause.
pub async fn accept_bounded(
    listener: TcpListener,
    limit: usize,
    what: &'static str,
    mut serve: impl FnMut(tokio::net::TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit),
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(limit));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((tcp, client)) => serve(tcp, client, permit),
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
