//! The upstream connection pool of one route: HTTP/1.1 over TCP or TLS, bounded.
//!
//! - at most `max_inflight` requests at once, process-wide (an exchange holds its slot until
//!   the response body has been streamed, or for the life of an upgraded tunnel); beyond it the
//!   caller gets [`ProxyError::UpstreamBusy`] at once;
//! - at most `max_idle_connections` idle keep-alive connections, process-wide, each closed after
//!   [`IDLE_TIMEOUT`]; idle lists are kept per worker thread (no lock shared between workers);
//! - a pooled connection that the upstream closed while it sat idle is found out before any byte
//!   of the request is written, and the request is retried once on a fresh connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::Body;
use crate::error::ProxyError;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a TCP connect (and TLS handshake) to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool of one upstream.
pub struct Pool {
    scheme: Scheme,
    authority: Authority,
    /// `Host` for requests that do not keep the client's.
    host: HeaderValue,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    max_inflight: usize,
    max_idle: usize,
    /// Record the case of the response's header names, so that they reach the client in it.
    preserve_header_case: bool,
    inflight: AtomicUsize,
    idle_count: AtomicUsize,
    /// One idle list per worker (the last for any other thread); each is only ever locked by
    /// its own thread, so the lock is never contended.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

struct Idle {
    send: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    /// A pool for `upstream` (`http://host:port` or `https://host:port`) used by `workers`
    /// worker threads; `tls` is the client config for https (its roots: the route's
    /// `upstream_ca` or the system's).
    pub fn new(
        upstream: &Uri,
        tls: Option<Arc<rustls::ClientConfig>>,
        (max_inflight, max_idle): (usize, usize),
        preserve_header_case: bool,
        workers: usize,
    ) -> Result<Pool, String> {
        let authority = upstream
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {upstream} has no host"))?;
        let scheme = upstream.scheme().cloned().unwrap_or(Scheme::HTTP);
        let tls = if scheme == Scheme::HTTPS {
            let config = tls.ok_or("an https upstream needs a TLS client config")?;
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("upstream host {host}: {e}"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream authority {authority}: {e}"))?;
        Ok(Pool {
            scheme,
            authority,
            host,
            tls,
            max_inflight,
            max_idle,
            preserve_header_case,
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
    /// most for the response head. The response body gives the connection back to the pool
    /// when it ends.
    pub async fn send(
        &self,
        slot: Slot,
        mut request: Request<Body>,
        deadline: Instant,
    ) -> Result<Response<PooledBody>, ProxyError> {
        // `move`: the request lives in this block only (a second copy of it would make the
        // future larger).
        let exchange = async move {
            let mut fresh = false;
            loop {
                let (mut send, reused) = match (!fresh).then(|| self.checkout()).flatten() {
                    Some(send) => (send, true),
                    // Boxed: the connect future (TLS included) is large and rarely
                    // needed; inline, every request's future would carry (and move) it.
                    None => (Box::pin(self.connect()).await?, false),
                };
                if send.ready().await.is_err() {
                    if reused {
                        fresh = true;
                        continue;
                    }
                    return Err(SendError::Closed);
                }
                match send.try_send_request(request).await {
                    Ok(response) => return Ok((response, send)),
                    Err(mut e) => match e.take_message() {
                        // Not a byte written: the idle connection had been closed by the
                        // upstream. Once, on a fresh connection.
                        Some(unsent) if reused => {
                            request = unsent;
                            fresh = true;
                        }
                        _ => return Err(SendError::Hyper(e.into_error())),
                    },
                }
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Err(SendError::Hyper(e))) => Err(super::classify(&e)),
            Ok(Err(SendError::Closed)) => {
                tracing::warn!(upstream = %self.authority, "upstream closed a new connection");
                Err(ProxyError::UpstreamUnavailable)
            }
            Ok(Err(SendError::Connect(e))) => {
                tracing::warn!(upstream = %self.authority, error = %e, "cannot connect to the upstream");
                Err(ProxyError::UpstreamUnavailable)
            }
            Ok(Ok((response, send))) => Ok(response.map(|body| PooledBody {
                body,
                send: Some(send),
                slot: Some(slot),
            })),
        }
    }

    fn slot_list(&self) -> &Mutex<Vec<Idle>> {
        let i = crate::worker::slot().min(self.idle.len() - 1);
        &self.idle[i]
    }

    /// The most recently used idle connection of this worker that is still open and young.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        while let Some(idle) = list.pop() {
            self.idle_count.fetch_sub(1, Ordering::AcqRel);
            if !idle.send.is_closed() && idle.since.elapsed() < IDLE_TIMEOUT {
                return Some(idle.send);
            }
        }
        None
    }

    /// Keeps a connection whose exchange ended cleanly, unless the pool is full.
    fn checkin(&self, send: SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        if self.idle_count.fetch_add(1, Ordering::AcqRel) >= self.max_idle {
            self.idle_count.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        list.push(Idle {
            send,
            since: Instant::now(),
        });
    }

    /// Closes this worker's connections idle for longer than [`IDLE_TIMEOUT`] (or closed by
    /// the upstream).
    pub fn sweep(&self) {
        let mut list = self.slot_list().lock().unwrap_or_else(|e| e.into_inner());
        let before = list.len();
        list.retain(|idle| !idle.send.is_closed() && idle.since.elapsed() < IDLE_TIMEOUT);
        self.idle_count
            .fetch_sub(before - list.len(), Ordering::AcqRel);
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connect = async {
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => handshake(tcp, self.preserve_header_case).await,
                Some((connector, name)) => {
                    let tls = connector.connect(name.clone(), tcp).await?;
                    handshake(tls, self.preserve_header_case).await
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(send)) => Ok(send),
            Ok(Err(e)) => Err(SendError::Connect(e)),
            Err(_) => Err(SendError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }
}

/// An HTTP/1.1 client connection on `io`, driven by a task of the current worker.
async fn handshake<I>(io: I, preserve_header_case: bool) -> std::io::Result<SendRequest<Body>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = http1::Builder::new()
        // Vectored writes: a flattened buffer would keep what a large upload grew it to on
        // every idle pooled connection (see the server's builder).
        .writev(true)
        // The response's header names reach the client in the upstream's case (hyper records
        // them per response: ~4,400 instructions a request, measured by bench/run).
        .preserve_header_case(preserve_header_case)
        .handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(send)
}

enum SendError {
    Connect(std::io::Error),
    Closed,
    Hyper(hyper::Error),
}

/// The slot an exchange holds; released when dropped.
pub struct Slot(Arc<Pool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream response body that gives its connection back to the pool when it ends cleanly
/// (a body dropped early closes the connection), and holds the in-flight slot until then.
pub struct PooledBody {
    body: Incoming,
    send: Option<SendRequest<Body>>,
    slot: Option<Slot>,
}

impl PooledBody {
    /// For an upgraded (101) exchange: the slot, to be held for the tunnel's life; the
    /// connection now belongs to the tunnel.
    pub fn into_slot(mut self) -> Option<Slot> {
        self.send = None;
        self.slot.take()
    }

    fn finish(&mut self) {
        if let (Some(send), Some(slot)) = (self.send.take(), self.slot.as_ref()) {
            slot.0.checkin(send);
        }
        self.slot = None;
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.send = None;
                this.slot = None;
            }
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
