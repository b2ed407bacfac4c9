//! TLS: PEM loading, the rustls server config (ALPN `[server.tls] alpn`), optional client
//! certificates, and the handshake as one function returning what the rest needs to know.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::x509::ProxyChainVerifier;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Reads a PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// The server's TLS config: certificate, key, ALPN, and client certificates when `client_ca`
/// is set.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(load_certs(ca)?);
            if added == 0 {
                return Err(format!(
                    "client_ca {} holds no usable CA certificate",
                    ca.display()
                ));
            }
            builder.with_client_cert_verifier(client_verifier(tls, roots, provider)?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "certificate {} and key {} do not fit: {e}",
            tls.cert.display(),
            tls.key.display()
        )
    })?;
    config.alpn_protocols = tls.alpn.iter().map(|p| p.id().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The client-certificate verifier: rustls' stock webpki verifier, which refuses proxy
/// certificates, or with `proxy_certificates` one that also accepts grid proxy chains
/// ([`crate::x509`]).
fn client_verifier(
    tls: &TlsConfig,
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let roots = Arc::new(roots);
    if tls.proxy_certificates {
        let verifier = ProxyChainVerifier::new(roots, provider, tls.client_auth_required)?;
        return Ok(Arc::new(verifier));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
    let verifier = if tls.client_auth_required {
        verifier
    } else {
        verifier.allow_unauthenticated()
    };
    verifier
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    /// The client closed the connection without sending a byte: a TCP probe (health check,
    /// port scan), not a failed handshake.
    Closed,
    /// The client began with an HTTP method, not a TLS record: plain HTTP on the TLS port.
    /// The connection is handed back to be answered in plain HTTP.
    PlainHttp(TcpStream),
    /// The handshake failed or timed out; the reason.
    Failed(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Closed => f.write_str("closed before the handshake began"),
            HandshakeError::PlainHttp(_) => f.write_str("plain HTTP sent to the TLS port"),
            HandshakeError::Failed(reason) => f.write_str(reason),
        }
    }
}

impl From<HandshakeError> for String {
    fn from(e: HandshakeError) -> String {
        e.to_string()
    }
}

/// Runs the server side of a handshake, bounded in time.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    let handshake = async {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) => return Err(HandshakeError::Closed),
            // A TLS record starts with its type (22, a handshake); an HTTP request with a
            // method, which is letters.
            Ok(_) if first[0].is_ascii_uppercase() => return Err(HandshakeError::PlainHttp(tcp)),
            _ => {}
        }
        acceptor
            .accept(tcp)
            .await
            .map_err(|e| HandshakeError::Failed(e.to_string()))
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Failed("handshake timed out".to_string())),
    }
}
