//! Upstream: the pooled HTTP client, and forwarding one request with the route's timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::error::{Body, ProxyError};

/// The pooled client used for upstreams and introspection endpoints.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled client trusting `ca` (a PEM bundle), or the system roots when `None`.
pub fn client(ca: Option<&Path>) -> Result<HttpClient, String> {
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
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector))
}

/// Sends the rewritten request; the response head must arrive within `timeout`.
pub async fn forward(
    client: &HttpClient,
    request: Request<Body>,
    timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err(ProxyError::UpstreamTimeout),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => {
            if caused_by::<http_body_util::LengthLimitError>(&e) {
                return Err(ProxyError::BodyTooLarge);
            }
            if caused_by::<ClientBodyError>(&e) {
                tracing::info!(error = %error_chain(&e), "client request body unreadable");
                return Err(ProxyError::BadRequest);
            }
            tracing::warn!(error = %error_chain(&e), "upstream request failed");
            Err(ProxyError::UpstreamUnavailable)
        }
    }
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

/// Whether `T` is somewhere in an error's chain (e.g. the body limit, the client's body).
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
