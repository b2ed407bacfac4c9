//! The request path: an outer handler (access log, error → response) around an inner handler
//! that is a straight chain of steps: route → extract credential → validate → rewrite →
//! forward.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use std::borrow::Cow;

use tokio::sync::mpsc;

use crate::cache::{Cache, Provenance};
use crate::config::{AuthMode, Config, RouteConfig};
use crate::credential;
use crate::endpoints::{self, Endpoint, TokenService};
use crate::error::{Body, BoxError, ProxyError};
use crate::rewrite::{self, Forwarding, Values};
use crate::rucio::{self, RucioEndpoint};
use crate::store::{self, Store};
use crate::telemetry::{AuthMetrics, AuthResult, RouteMetrics};
use crate::token;
use crate::upstream::{self, HttpClient};
use crate::validate::{self, Identity, Validators, Verdict};

/// Everything the request path needs, built once from a config (and again on reload).
pub struct Gate {
    /// The checked config.
    pub config: Config,
    /// The TLS acceptor of the main listener, when TLS is configured.
    pub acceptor: Option<TlsAcceptor>,
    routes: Vec<Route>,
    validators: Arc<Validators>,
    cache: Arc<Cache>,
    auth_metrics: AuthMetrics,
    /// `route` metrics of tokengate's own endpoints, and of requests no route matched.
    own_metrics: [(&'static str, RouteMetrics); OWN_ROUTES.len()],
    /// Where issued tokens live (shared by every gate generation).
    pub store: Arc<Store>,
    usage: UsageSender,
}

/// The `route` label of requests no route matched.
const NO_ROUTE: &str = "-";

/// `route` labels of what tokengate answers itself (`Endpoint::label`, `RucioEndpoint::label`).
const OWN_ROUTES: [&str; 6] = [
    NO_ROUTE,
    "tokengate:tokens",
    "tokengate:insight",
    "tokengate:auth/x509",
    "tokengate:auth/x509_proxy",
    "tokengate:auth/validate",
];

/// Hands `(token hash, ms)` last-use marks to the background writer.
pub type UsageSender = mpsc::Sender<([u8; 32], i64)>;

/// The gate in force; reload swaps it, requests load it.
pub type SharedGate = Arc<ArcSwap<Gate>>;

struct Route {
    config: RouteConfig,
    client: HttpClient,
    metrics: RouteMetrics,
}

/// What the connection knows about the client.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate, when the client presented one.
    pub client: Option<Arc<ClientCert>>,
}

/// The identity of a verified client certificate (or proxy chain): its end-entity DN, in both
/// forms, computed once per connection.
#[derive(Debug)]
pub struct ClientCert {
    /// `/C=CH/O=Example/CN=Alice`.
    pub slash: String,
    /// `CN=Alice,O=Example,C=CH`.
    pub rfc2253: String,
}

impl ClientCert {
    /// The DN of the verified chain `certs` (leaf first), or `None` without a certificate.
    pub fn of_chain(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Option<ClientCert> {
        if certs.is_empty() {
            return None;
        }
        let dn = |format| match crate::x509::end_entity_dn(certs, format) {
            Ok(dn) => Some(dn),
            Err(e) => {
                tracing::warn!(error = %e, "verified client certificate without a usable DN");
                None
            }
        };
        Some(ClientCert {
            slash: dn(crate::x509::DnFormat::Slash)?,
            rfc2253: dn(crate::x509::DnFormat::Rfc2253)?,
        })
    }

    /// The DN in `format`.
    pub fn dn(&self, format: crate::x509::DnFormat) -> &str {
        match format {
            crate::x509::DnFormat::Slash => &self.slash,
            crate::x509::DnFormat::Rfc2253 => &self.rfc2253,
        }
    }
}

impl Gate {
    /// Builds the TLS acceptor, clients, validators and the cache for a config. The previous
    /// gate's cache is kept when the validators and cache settings are unchanged, so a reload
    /// does not send every client back to the validators.
    pub fn new(
        config: Config,
        store: Arc<Store>,
        usage: UsageSender,
        previous: Option<&Gate>,
    ) -> Result<Gate, String> {
        let acceptor = match &config.server.tls {
            Some(tls) => Some(TlsAcceptor::from(crate::tls::server_config(tls)?)),
            None => None,
        };
        let default_client = upstream::client(None)?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let client = match &route.upstream_ca {
                Some(ca) => upstream::client(Some(ca))?,
                None => default_client.clone(),
            };
            routes.push(Route {
                config: route.clone(),
                client,
                metrics: RouteMetrics::new(&route.path_prefix),
            });
        }
        let validators = Arc::new(Validators::new(
            &config.validators,
            &default_client,
            Arc::clone(&store),
            config.tokens.jwt.clone(),
        ));
        let cache = match previous {
            Some(p)
                if p.config.validators == config.validators
                    && p.config.cache == config.cache
                    && same_jwt_key(&p.config, &config) =>
            {
                Arc::clone(&p.cache)
            }
            _ => Cache::new(&config.cache),
        };
        Ok(Gate {
            config,
            acceptor,
            routes,
            validators,
            cache,
            auth_metrics: AuthMetrics::new(),
            own_metrics: OWN_ROUTES.map(|label| (label, RouteMetrics::new(label))),
            store,
            usage,
        })
    }

    /// Where last-use marks go (kept across reloads).
    pub fn usage(&self) -> UsageSender {
        self.usage.clone()
    }

    /// The validation cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The metrics of one of tokengate's own endpoints (`None`: no route matched).
    fn own_metrics(&self, endpoint: Option<&str>) -> &RouteMetrics {
        let label = endpoint.unwrap_or(NO_ROUTE);
        let found = self.own_metrics.iter().find(|(l, _)| *l == label);
        &found.unwrap_or(&self.own_metrics[0]).1
    }

    /// The route with the longest `path_prefix` that `path` starts with.
    fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.config.path_prefix.as_str()))
    }
}

/// Whether two configs sign and check JWT API keys with the same key.
fn same_jwt_key(a: &Config, b: &Config) -> bool {
    match (&a.tokens.jwt, &b.tokens.jwt) {
        (None, None) => true,
        (Some(a), Some(b)) => a.kid() == b.kid(),
        _ => false,
    }
}

/// What the access log line says about a request, filled in as the chain goes.
#[derive(Default)]
pub(crate) struct Outcome<'g> {
    route: Option<&'g Route>,
    endpoint: Option<&'static str>,
    identity: Option<Arc<Identity>>,
    source: Option<&'g str>,
    /// The decision, and who made it (`cache` or the validator).
    auth: Option<(AuthResult, &'static str)>,
    upstream: Option<std::time::Duration>,
}

/// Handles one request: the inner chain, then one access-log line, whatever happened.
pub async fn handle(gate: Arc<Gate>, peer: Peer, request: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let mut outcome = Outcome::default();
    let response = match forward_request(&gate, &peer, request, &mut outcome).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let duration = start.elapsed();
    let status = response.status().as_u16();
    match outcome.route {
        Some(route) => route.metrics.request(status, duration, outcome.upstream),
        None => gate
            .own_metrics(outcome.endpoint)
            .request(status, duration, None),
    }
    if let Some((result, by)) = outcome.auth {
        gate.auth_metrics.record(result, by);
    }
    tracing::info!(
        target: "access",
        method = %method,
        // The query may carry a credential (`query:NAME` sources): only the path is logged.
        path = uri.path(),
        status,
        route = outcome
            .route
            .map(|r| r.config.path_prefix.as_str())
            .or(outcome.endpoint)
            .unwrap_or("-"),
        subject = outcome.identity.as_deref().map_or("-", |i| i.subject.as_str()),
        source = outcome.source.unwrap_or("-"),
        auth = outcome.auth.map_or("-", |(result, _)| result.label()),
        validator = outcome.auth.map_or("-", |(_, by)| by),
        client = %peer.addr.ip(),
        duration_ms = duration.as_secs_f64() * 1000.0,
        upstream_ms = outcome.upstream.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
    );
    response
}

/// The inner chain. Every early return is an error that `handle` turns into a response.
async fn forward_request<'g>(
    gate: &'g Gate,
    peer: &Peer,
    mut request: Request<Incoming>,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    if let Some(endpoint) = rucio::route(&gate.config.x509, request.uri().path()) {
        outcome.endpoint = Some(endpoint.label());
        let (parts, _) = request.into_parts();
        return serve_rucio(gate, peer, endpoint, &parts, outcome).await;
    }
    if let Some(endpoint) = endpoints::route(&gate.config.endpoints, request.uri().path()) {
        outcome.endpoint = Some(endpoint.label());
        let (parts, body) = request.into_parts();
        let service = TokenService {
            store: &gate.store,
            cache: &gate.cache,
            config: &gate.config.tokens,
        };
        if endpoint == Endpoint::InsightRevoke && parts.method == Method::GET {
            // Always 200, valid or not (no oracle): the presented token is not validated first.
            let presented = parts
                .headers
                .get("x-auth-token")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|t| !t.is_empty() && (!token::is_ours(t) || token::well_formed(t)));
            return Ok(service.insight_revoke(presented).await);
        }
        let (caller, token) = match identify(gate, &parts, outcome).await? {
            Some(found) => found,
            // Insight.io: a verified client certificate is a caller too.
            None => match (&endpoint, client_caller(gate, peer).await?) {
                (Endpoint::InsightCreate | Endpoint::InsightList, Some(caller)) => {
                    outcome.auth = Some((AuthResult::Allowed, "x509"));
                    (caller, Cow::Borrowed(""))
                }
                _ => {
                    outcome.auth = Some((AuthResult::Missing, "none"));
                    return Err(ProxyError::MissingCredentials);
                }
            },
        };
        outcome.identity = Some(Arc::clone(&caller));
        return endpoints::serve(&service, &endpoint, &parts.method, &caller, &token, body).await;
    }
    let route = gate
        .route_for(request.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    outcome.route = Some(route);

    let max_body = gate.config.server.max_body_bytes;
    if max_body > 0 && declared_length(&request).is_some_and(|n| n > max_body) {
        return Err(ProxyError::BodyTooLarge);
    }
    let client_upgrade = rewrite::upgrade_protocol(request.headers())
        .is_some()
        .then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();

    // Extract and validate.
    let sources = gate.config.sources.as_slice();
    let mut token_for_upstream = None;
    let identity = if route.config.auth == AuthMode::None {
        None
    } else {
        match identify(gate, &parts, outcome).await? {
            None if route.config.auth == AuthMode::Required => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                return Err(ProxyError::MissingCredentials);
            }
            None => None,
            Some((identity, token)) => {
                let needs_token = route
                    .config
                    .upstream_auth
                    .as_ref()
                    .is_some_and(|(_, t)| t.uses_token());
                if needs_token {
                    token_for_upstream = Some(token.into_owned());
                }
                Some(identity)
            }
        }
    };

    // Rewrite.
    let forwarding = Forwarding {
        client_ip: peer.addr.ip(),
        tls: peer.tls,
        values: Values {
            token: token_for_upstream.as_deref(),
            identity: identity.as_deref(),
            source: outcome.source,
            client_dn: peer
                .client
                .as_deref()
                .map(|c| c.dn(gate.config.x509.dn_format)),
        },
    };
    rewrite::request(&mut parts, &route.config, sources, &forwarding);
    outcome.identity = identity;

    // Forward.
    let body: Body = if max_body > 0 {
        Limited::new(body, max_body as usize).boxed_unsync()
    } else {
        body.map_err(BoxError::from).boxed_unsync()
    };
    let upstream_start = Instant::now();
    let response = upstream::forward(
        &route.client,
        Request::from_parts(parts, body),
        route.config.timeout,
    )
    .await;
    outcome.upstream = Some(upstream_start.elapsed());
    let mut response = response?;

    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = if upgraded {
        rewrite::upgrade_protocol(response.headers()).cloned()
    } else {
        None
    };
    rewrite::remove_hop_by_hop(response.headers_mut(), upgrade.as_ref());
    if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(relay_upgrade(client_upgrade, upstream_upgrade));
    }
    Ok(response.map(|b| b.map_err(BoxError::from).boxed_unsync()))
}

/// Extract and validate: the caller's identity and credential, `None` without a credential.
async fn identify<'p, 'g>(
    gate: &'g Gate,
    parts: &'p http::request::Parts,
    outcome: &mut Outcome<'g>,
) -> Result<Option<(Arc<Identity>, Cow<'p, str>)>, ProxyError> {
    let Some(credential) = credential::extract(parts, &gate.config.sources)? else {
        return Ok(None);
    };
    outcome.source = Some(credential.source.label());
    // A mistyped or random `tg_` string is refused before any cache or store work.
    if token::is_ours(&credential.token) && !token::well_formed(&credential.token) {
        outcome.auth = Some((AuthResult::Denied, "store"));
        return Err(ProxyError::InvalidCredentials);
    }
    let identity = authenticate(gate, &credential.token, outcome).await?;
    if let Some(usage) = &identity.usage {
        let now = store::now_ms();
        if usage.due(now) {
            // Off the request path; if the writer is behind, this use is simply not recorded.
            let _ = gate.usage.try_send((usage.hash, now));
        }
    }
    Ok(Some((identity, credential.token)))
}

/// The Rucio endpoints: token exchange for a client certificate, and token validation.
async fn serve_rucio<'g>(
    gate: &'g Gate,
    peer: &Peer,
    endpoint: RucioEndpoint,
    parts: &http::request::Parts,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed);
    }
    match endpoint {
        RucioEndpoint::X509 | RucioEndpoint::X509Proxy => {
            let response = rucio::exchange(
                &gate.store,
                &gate.config.x509,
                &gate.config.tokens,
                peer.client.as_deref(),
                &parts.headers,
            )
            .await;
            let result = match response.status() {
                StatusCode::OK => AuthResult::Allowed,
                StatusCode::SERVICE_UNAVAILABLE => AuthResult::Error,
                _ if peer.client.is_none() => AuthResult::Missing,
                _ => AuthResult::Denied,
            };
            outcome.source = Some("x509");
            outcome.auth = Some((result, "x509"));
            Ok(response)
        }
        RucioEndpoint::Validate => match identify(gate, parts, outcome).await {
            Ok(Some((identity, _))) => {
                let response = rucio::validated(&identity);
                outcome.identity = Some(identity);
                Ok(response)
            }
            Ok(None) => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                Ok(rucio::no_token())
            }
            Err(ProxyError::InvalidCredentials) => Ok(rucio::cannot_authenticate(
                "Cannot authenticate: the token is invalid or has expired",
            )),
            Err(e) => Err(e),
        },
    }
}

/// The caller behind a verified client certificate with no token: its DN's default account.
async fn client_caller(gate: &Gate, peer: &Peer) -> Result<Option<Arc<Identity>>, ProxyError> {
    let Some(client) = peer.client.as_deref() else {
        return Ok(None);
    };
    let dn = client.dn(gate.config.x509.dn_format);
    let accounts = rucio::accounts_for(&gate.store, &gate.config.x509, dn)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "token store unavailable");
            ProxyError::BackendUnavailable
        })?;
    Ok(Some(Arc::new(Identity {
        subject: dn.to_string(),
        account: accounts
            .into_iter()
            .next()
            .unwrap_or_else(|| dn.to_string()),
        dn: Some(dn.to_string()),
        token_id: None,
        validator: "x509",
        expires: None,
        usage: None,
    })))
}

/// Cache, then validators: the identity behind a credential.
async fn authenticate(
    gate: &Gate,
    token: &str,
    outcome: &mut Outcome<'_>,
) -> Result<Arc<Identity>, ProxyError> {
    let key = validate::hash(token);
    let validators = &gate.validators;
    let (verdict, provenance) = gate
        .cache
        .get_or_validate(key, || {
            let validators = Arc::clone(validators);
            let token = token.to_string();
            async move { validators.validate(&token, &key).await }
        })
        .await;
    match verdict {
        Ok(Verdict::Allowed(identity)) => {
            let by = match provenance {
                Provenance::Cache => "cache",
                Provenance::Validated => identity.validator,
            };
            outcome.auth = Some((AuthResult::Allowed, by));
            Ok(identity)
        }
        Ok(Verdict::Denied) => {
            let by = match provenance {
                Provenance::Cache => "cache",
                Provenance::Validated => gate.validators.decided_by(token, false),
            };
            outcome.auth = Some((AuthResult::Denied, by));
            Err(ProxyError::InvalidCredentials)
        }
        Err(_) => {
            outcome.auth = Some((AuthResult::Error, gate.validators.decided_by(token, true)));
            Err(ProxyError::BackendUnavailable)
        }
    }
}

/// The request's `Content-Length`, when it declares one.
fn declared_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Copies bytes both ways between an upgraded client connection and the upstream's.
async fn relay_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_own_endpoint_has_its_metrics() {
        let endpoints = [
            Endpoint::Tokens.label(),
            Endpoint::InsightCreate.label(),
            RucioEndpoint::X509.label(),
            RucioEndpoint::X509Proxy.label(),
            RucioEndpoint::Validate.label(),
        ];
        for label in endpoints {
            assert!(OWN_ROUTES.contains(&label), "{label}");
        }
    }
}
