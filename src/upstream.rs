//! Upstream: each route's bounded connection pool ([`Pool`]) speaking HTTP/1.1 itself
//! ([`h1`]: the request head, the response head and body framing, strict), the client's request
//! body on its way there (read timeout, typed errors), the one place that turns a failed
//! exchange into a status, and the (hyper) pooled client the validators use for their own calls.

mod body;
mod case;
mod conn;
pub mod h1;
mod pool;
mod spare;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::time::{Instant, Sleep};

pub use body::{full, Body, Logged};
pub use case::case_extensions;
pub use conn::Conn;
pub use pool::{Pool, PooledBody, Slot, IDLE_TIMEOUT};

use crate::error::{BoxError, ProxyError};

/// The pooled client validators use (introspection endpoints, JWKS).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Idle connections a validator's client keeps per host; with each validator's cap on
/// concurrent calls this bounds the sockets validators hold.
pub const VALIDATOR_MAX_IDLE: usize = 16;
/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS client config trusting `ca` (a PEM bundle), or the system roots when `None`.
pub fn tls_client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read upstream_ca {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "upstream_ca {} holds no usable certificate",
                    path.display()
                ));
            }
        }
        None => {
            // A machine without system roots can still reach http:// upstreams.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The validators' pooled client trusting `ca`, or the system roots when `None`.
pub fn client(ca: Option<&Path>) -> Result<HttpClient, String> {
    // hyper-rustls sets ALPN itself.
    let mut tls = (*tls_client_config(ca)?).clone();
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(VALIDATOR_MAX_IDLE)
        .build(connector))
}

/// What a failed exchange means for the client: its own body's fault (too large → 413,
/// stalled → 408, malformed → 400), else the upstream's (502).
pub fn classify(error: &(dyn std::error::Error + 'static)) -> ProxyError {
    if caused_by::<http_body_util::LengthLimitError>(error) {
        return ProxyError::BodyTooLarge;
    }
    if caused_by::<BodyTimeout>(error) {
        return ProxyError::RequestTimeout;
    }
    if caused_by::<ClientBodyError>(error) {
        tracing::info!(error = %error_chain(error), "client request body unreadable");
        return ProxyError::BadRequest;
    }
    tracing::warn!(error = %error_chain(error), "upstream request failed");
    ProxyError::UpstreamUnavailable
}

/// The client's request body could not be read (malformed chunked framing, a reset): the
/// client's fault, answered 400 rather than blamed on the upstream.
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the client's request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The client sent no request-body byte for `body_read_timeout`.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no request-body byte within body_read_timeout")
    }
}

impl std::error::Error for BodyTimeout {}

/// The client's request body on its way upstream: errors typed (so they become 400 / 408, not
/// 502), and a stall of `timeout` between frames ends it with [`BodyTimeout`], which aborts the
/// upstream request and frees its connection. The timer runs only while the client is the one
/// holding things up (a slow upstream that does not ask for more is not the client's stall).
pub struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    /// Allocated on the first stall only (most bodies arrive with their head).
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl ClientBody {
    /// Wraps a request body.
    pub fn new(inner: Incoming, timeout: Duration) -> ClientBody {
        ClientBody {
            inner,
            timeout,
            timer: None,
            armed: false,
        }
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|r| r.map_err(|e| BoxError::from(ClientBodyError(e)))))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(BodyTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `T` is somewhere in an error's chain.
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// `outer: inner: innermost`, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}
