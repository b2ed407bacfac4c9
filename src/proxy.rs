//! The request path: an outer handler (access log, error → response) around an inner handler
//! that is a straight chain of steps: route → extract credential → validate → rewrite →
//! forward.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use std::borrow::Cow;

use tokio::sync::mpsc;

use crate::access_log;
use crate::audit::Actor;
use crate::cache::{Cache, Provenance};
use crate::config::{AuthMode, Config, LimitKind, RouteConfig};
use crate::credential::{self, Source};
use crate::endpoints::{self, Endpoint, TokenService};
use crate::error::ProxyError;
use crate::identity::{Identity, KeyMemo};
use crate::limits::Limiter;
use crate::page::{self, PageEndpoint};
use crate::rewrite::{self, Boundary, Forwarding, Values};
use crate::rucio::{self, RucioEndpoint};
use crate::store::{self, Store};
use crate::telemetry::{AuthMetrics, AuthResult, RouteMetrics};
use crate::token;
use crate::trace;
use crate::upstream::Body;
use crate::upstream::{self, ClientBody, Pool};
use crate::validate::{Failure, Validators, Verdict};

mod own;

use own::serve_own;

/// Everything the request path needs, built once from a config (and again on reload).
pub struct Gate {
    /// The checked config.
    pub config: Config,
    /// The TLS acceptor of the main listener, when TLS is configured.
    pub acceptor: Option<TlsAcceptor>,
    pub(crate) routes: Vec<Route>,
    pub(crate) boundary: Boundary,
    pub(crate) validators: Arc<Validators>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) auth_metrics: AuthMetrics,
    /// `route` metrics of tokengate's own endpoints, and of requests no route matched: made on
    /// first use, so endpoints that are off have no series.
    pub(crate) own_metrics: [(&'static str, OnceLock<RouteMetrics>); OWN_ROUTES.len()],
    /// Where issued tokens live (shared by every gate generation).
    pub store: Arc<Store>,
    pub(crate) usage: UsageSender,
    /// `[endpoints]` with `tokens_prefix` lower-cased, for the case-insensitive reading.
    pub(crate) folded_endpoints: crate::config::EndpointsConfig,
    /// Whether a prefix the gate matches has upper-case letters, so that even a lower-case path
    /// can pick another route when read case-insensitively.
    pub(crate) fold_always: bool,
    /// The failed-credential and rate limits' buckets.
    pub(crate) limits: crate::limits::Limits,
}

/// What a path picks under one reading.
#[derive(Clone, Copy)]
pub(crate) enum Target<'g> {
    /// One of tokengate's own endpoints.
    Own,
    /// A route.
    Route(&'g Route),
    /// Nothing (404).
    Nothing,
}

/// The `route` label of requests no route matched.
const NO_ROUTE: &str = "-";

/// `route` labels of what tokengate answers itself (`Endpoint::label`, `RucioEndpoint::label`).
pub(crate) const OWN_ROUTES: [&str; 7] = [
    NO_ROUTE,
    "tokengate:tokens",
    "tokengate:page",
    "tokengate:insight",
    "tokengate:auth/x509",
    "tokengate:auth/x509_proxy",
    "tokengate:auth/validate",
];

/// Hands `(token hash, ms)` last-use marks to the background writer.
pub type UsageSender = mpsc::Sender<([u8; 32], i64)>;

/// The gate in force; reload swaps it, requests load it.
pub type SharedGate = Arc<ArcSwap<Gate>>;

pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    pub(crate) pool: Arc<Pool>,
    pub(crate) metrics: RouteMetrics,
    /// The route's `[[route.rate_limit]]`s, as its config lists them.
    pub(crate) limits: Vec<Arc<Limiter>>,
}

impl Route {
    /// The route's rules (SPEC §10), evaluated on every request, cached credential or not: a
    /// refusal is 403, and the log line names the rule. A preflight that passes is held only
    /// by deny rules.
    pub(crate) fn authorize<'g>(
        &'g self,
        parts: &http::request::Parts,
        caller: Option<&Caller<'_, '_>>,
        preflight: bool,
        outcome: &mut Outcome<'g>,
    ) -> Result<(), ProxyError> {
        let config = &self.config;
        if config.deny.is_empty() && (config.allow.is_empty() || preflight) {
            return Ok(());
        }
        let ask = crate::authorize::Ask {
            method: &parts.method,
            path: parts.uri.path(),
            identity: caller.map(|c| &*c.identity),
            source: caller.map(|c| c.source),
            client: outcome.client,
        };
        let decided = if preflight {
            crate::authorize::deny_only(config, &ask)
        } else {
            crate::authorize::authorize(config, &ask)
        };
        decided.map_err(|rule| {
            outcome.rule = Some(rule);
            // The log line says who was refused.
            outcome.identity = caller.map(|c| Arc::clone(&c.identity));
            ProxyError::Forbidden
        })
    }

    /// The route's per-client limits: asked before the credential is looked at, so that a
    /// client over its limit costs no validation.
    pub(crate) async fn limit_client(&self, outcome: &mut Outcome<'_>) -> Result<(), ProxyError> {
        for limit in &self.limits {
            if limit.kind() == LimitKind::Client {
                let key = crate::limits::client_key(outcome.client);
                limit.take(key).await.map_err(|r| outcome.limited(r))?;
            }
        }
        Ok(())
    }

    /// The route's per-subject and per-credential limits, for a verified caller.
    pub(crate) async fn limit_caller(
        &self,
        caller: &Caller<'_, '_>,
        outcome: &mut Outcome<'_>,
    ) -> Result<(), ProxyError> {
        for limit in &self.limits {
            let key = match limit.kind() {
                LimitKind::Subject => caller.identity.principal.subject_key(),
                LimitKind::Token => crate::identity::key_of(&caller.key),
                LimitKind::Client | LimitKind::FailedAuth => continue,
            };
            if let Err(refusal) = limit.take(key).await {
                // The log line says who was held back.
                outcome.identity = Some(Arc::clone(&caller.identity));
                return Err(outcome.limited(refusal));
            }
        }
        Ok(())
    }
}

pub use crate::identity::{ClientCert, Peer};

impl Gate {
    /// Where last-use marks go (kept across reloads).
    pub fn usage(&self) -> UsageSender {
        self.usage.clone()
    }

    /// The header boundary every route shares.
    /// An error's response, its `WWW-Authenticate: Bearer` challenge only when `bearer` is a
    /// configured source (a client told to send a Bearer token that is then ignored would be
    /// misled).
    pub(crate) fn error_response(&self, error: ProxyError) -> Response<Body> {
        let mut response = error.into_response();
        if !self
            .config
            .sources
            .contains(&crate::credential::Source::Bearer)
        {
            response.headers_mut().remove(header::WWW_AUTHENTICATE);
        }
        response
    }

    pub(crate) fn boundary(&self) -> &Boundary {
        &self.boundary
    }

    /// The validation cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The limits' buckets.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    /// Closes this worker's upstream connections that have been idle too long.
    pub fn sweep_idle_upstreams(&self) {
        for route in &self.routes {
            route.pool.sweep();
        }
    }

    /// The metrics of one of tokengate's own endpoints (`None`: no route matched).
    fn own_metrics(&self, endpoint: Option<&str>) -> &RouteMetrics {
        let label = endpoint.unwrap_or(NO_ROUTE);
        let (label, metrics) = self
            .own_metrics
            .iter()
            .find(|(l, _)| *l == label)
            .unwrap_or(&self.own_metrics[0]);
        metrics.get_or_init(|| RouteMetrics::new(label))
    }

    /// The route with the longest `path_prefix` that `path` lies under, matching whole
    /// segments (case-insensitively when `fold`).
    fn route_under(&self, path: &str, fold: bool) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| crate::path::under_read(path, &r.config.path_prefix, fold))
    }

    /// Whether `path` is one of tokengate's own endpoints (case-insensitively when `fold`).
    fn is_own(&self, path: &str, fold: bool) -> bool {
        let config = &self.config;
        if !fold {
            return rucio::route(&config.x509, path).is_some()
                || endpoints::route(&config.endpoints, path).is_some()
                || page::route(&config.endpoints, path).is_some();
        }
        let lower = path.to_ascii_lowercase();
        rucio::route(&config.x509, &lower).is_some()
            || endpoints::route(&self.folded_endpoints, &lower).is_some()
            || page::route(&self.folded_endpoints, &lower).is_some()
            || (config.endpoints.insight
                && endpoints::INSIGHT_PATHS
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(path)))
    }

    fn target(&self, path: &str, fold: bool, own: bool) -> Target<'_> {
        if own && self.is_own(path, fold) {
            return Target::Own;
        }
        match self.route_under(path, fold) {
            Some(route) => Target::Route(route),
            None => Target::Nothing,
        }
    }

    /// What a normalised path is served by, under every reading an upstream may give it (SPEC
    /// §9, "One route under every reading"): the route the path picks as it is, unless another
    /// reading picks another route; then the strictest of them if they share how the request
    /// is forwarded, else 400. A reading that picks an own endpoint beside a route → 400. With
    /// `own` false (`[verify]`), own endpoints are not considered.
    pub(crate) fn choose(&self, normal: &str, own: bool) -> Result<Target<'_>, ProxyError> {
        let mut chosen = self.target(normal, false, own);
        if !self.fold_always && !crate::path::has_other_readings(normal) {
            return Ok(chosen);
        }
        if let Target::Nothing = chosen {
            // Nothing is forwarded, whatever another reading would pick.
            return Ok(chosen);
        }
        for reading in crate::path::Reading::ALL {
            let read = reading.read(normal).map_err(|_| ProxyError::BadRequest)?;
            let other = self.target(&read, reading.folds(), own);
            chosen = match (chosen, other) {
                (_, Target::Nothing) => chosen,
                (Target::Own, Target::Own) => chosen,
                (Target::Own, Target::Route(_)) | (Target::Route(_), Target::Own) => {
                    return Err(ProxyError::BadRequest)
                }
                (Target::Route(a), Target::Route(b)) => Target::Route(stricter(a, b)?),
                (Target::Nothing, _) => unreachable!("returned above"),
            };
        }
        Ok(chosen)
    }
}

/// A valid credential whose identity (or the credential itself) cannot be carried in the
/// route's headers: refused as invalid (SPEC §9), never forwarded without its identity.
pub(crate) fn unrenderable(outcome: &mut Outcome<'_>) -> ProxyError {
    tracing::warn!(
        reason = "identity_not_a_header_value",
        "credential refused: its identity cannot be carried in a header (control characters)"
    );
    outcome.auth = Some((
        AuthResult::Denied,
        outcome.auth.map_or("none", |(_, by)| by),
    ));
    ProxyError::InvalidCredentials
}

/// Of two routes a path may be read into, the one that handles it: the stricter `auth` (the
/// first on a tie), if both forward alike and have the same rules and limits; else 400, since
/// the upstream could serve either.
fn stricter<'g>(a: &'g Route, b: &'g Route) -> Result<&'g Route, ProxyError> {
    if std::ptr::eq(a, b) {
        return Ok(a);
    }
    let (x, y) = (&a.config, &b.config);
    let alike = x.upstream == y.upstream
        && x.upstream_socket == y.upstream_socket
        && x.upstream_auth == y.upstream_auth
        && x.identity_headers == y.identity_headers
        && x.preserve_host == y.preserve_host
        && x.upgrades == y.upgrades
        && x.rate_limits == y.rate_limits
        && x.deny == y.deny
        && x.allow == y.allow
        && x.preflight_passes == y.preflight_passes;
    if !alike {
        return Err(ProxyError::BadRequest);
    }
    let rank = |mode: AuthMode| match mode {
        AuthMode::Required => 2,
        AuthMode::Optional => 1,
        AuthMode::None => 0,
    };
    Ok(if rank(y.auth) > rank(x.auth) { b } else { a })
}

/// What the access log line says about a request, filled in as the chain goes.
pub(crate) struct Outcome<'g> {
    pub(crate) route: Option<&'g Route>,
    endpoint: Option<&'static str>,
    pub(crate) identity: Option<Arc<Identity>>,
    pub(crate) source: Option<&'g str>,
    /// No credential, but one in a known dialect the config does not accept.
    pub(crate) ignored: Option<&'static str>,
    /// The decision, and who made it (`cache` or the validator).
    pub(crate) auth: Option<(AuthResult, &'static str)>,
    /// The limit that answered 429.
    pub(crate) limit: Option<&'static str>,
    /// The rule that answered 403.
    pub(crate) rule: Option<&'g str>,
    /// The client address (behind trusted proxies, the one they name): the key of per-client
    /// limits and of the failed-credential limit.
    pub(crate) client: std::net::IpAddr,
    upstream: Option<std::time::Duration>,
}

impl Outcome<'_> {
    /// Nothing known yet but who the client is.
    pub(crate) fn new(client: std::net::IpAddr) -> Self {
        Outcome {
            route: None,
            endpoint: None,
            identity: None,
            source: None,
            ignored: None,
            auth: None,
            limit: None,
            rule: None,
            client,
            upstream: None,
        }
    }

    /// A 429 from `limit`, named in the log line and counted.
    pub(crate) fn limited(&mut self, refusal: crate::error::Refusal) -> ProxyError {
        self.limit = Some(refusal.limit);
        ProxyError::TooManyRequests(refusal)
    }
}

/// Handles one request: the inner chain, then one access-log line, whatever happened.
pub async fn handle(gate: &Gate, peer: &Peer, mut request: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    #[cfg(debug_assertions)]
    panic_on_request_for_tests(request.uri().path());
    let context = trace::Context::take(request.headers_mut());
    // Behind trusted proxies the client is read from X-Forwarded-For, once: for the log, the
    // per-client limits and the failed-credential limit.
    let client = client_address(gate, peer, request.headers());
    // What the log line needs of the request once it has been handed on (header and path
    // bytes are shared with the request, not copied).
    let logged = access_log::enabled().then(|| LoggedRequest {
        method: request.method().clone(),
        uri: request.uri().clone(),
        version: request.version(),
        user_agent: request.headers().get(header::USER_AGENT).cloned(),
        host: request.headers().get(header::HOST).cloned(),
        // The peer's address as text is made once per connection.
        client: (client != peer.addr.ip()).then(|| client.to_string()),
    });
    let mut outcome = Outcome::new(client);
    let mut response = match forward_request(gate, peer, request, &mut outcome).await {
        Ok(response) => response,
        Err(error) => gate.error_response(error),
    };
    response
        .headers_mut()
        .insert(trace::X_REQUEST_ID.clone(), context.request_id.clone());
    let duration = start.elapsed();
    let status = response.status().as_u16();
    let metrics = match outcome.route {
        Some(route) => &route.metrics,
        None => gate.own_metrics(outcome.endpoint),
    };
    metrics.request(status, duration, outcome.upstream);
    if let Some(limit) = outcome.limit.and_then(|l| metrics.limited(l)) {
        limit.increment(1);
    }
    if outcome.rule.is_some() {
        metrics.forbidden().increment(1);
    }
    if let Some((result, by)) = outcome.auth {
        gate.auth_metrics.record(result, by);
    }
    if let Some(request) = &logged {
        let identity = outcome.identity.as_deref();
        let user_agent = request.user_agent.as_ref().map(header_text);
        let line = access_log::Line {
            method: request.method.as_str(),
            // The query may carry a credential (`query:NAME` sources): only the path is logged.
            path: request.uri.path(),
            status,
            route: outcome
                .route
                .map(|r| r.config.path_prefix.as_str())
                .or(outcome.endpoint),
            limit: outcome.limit,
            rule: outcome.rule,
            subject: identity.map(|i| i.subject.as_str()),
            source: outcome.source,
            ignored: outcome.ignored,
            auth: outcome.auth.map(|(result, _)| result.label()),
            validator: outcome.auth.map(|(_, by)| by),
            client: request
                .client
                .as_deref()
                .unwrap_or_else(|| peer.ip.to_str().unwrap_or_default()),
            duration,
            upstream: outcome.upstream,
            request_id: context.request_id.to_str().unwrap_or_default(),
            trace_id: context.trace_id(),
            user_agent: user_agent.as_deref(),
            host: request
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .or_else(|| request.uri.authority().map(|a| a.as_str())),
            protocol: protocol(request.version),
            token_id: identity.and_then(|i| i.token_id.as_deref()),
        };
        let body = std::mem::replace(response.body_mut(), Body::Full(None));
        *response.body_mut() = match body {
            // A streamed body's line waits for its end, to count what was sent.
            Body::Upstream(stream) if request.method != Method::HEAD => Body::Logged(
                crate::upstream::Logged::new(stream, access_log::pending(&line)),
            ),
            body => {
                let sent = match request.method {
                    Method::HEAD => 0,
                    _ => hyper::body::Body::size_hint(&body).exact().unwrap_or(0),
                };
                access_log::write(&line, sent);
                body
            }
        };
    }
    response
}

/// Debug builds only: a request for `TOKENGATE_TEST_PANIC_PATH` panics with the request's
/// path in the message, so that the tests can check that a panic ends one connection, never
/// the process, and that its message is not logged.
#[cfg(debug_assertions)]
fn panic_on_request_for_tests(path: &str) {
    static TRIGGER: OnceLock<Option<String>> = OnceLock::new();
    let trigger = TRIGGER.get_or_init(|| std::env::var("TOKENGATE_TEST_PANIC_PATH").ok());
    if trigger.as_deref().is_some_and(|t| path.starts_with(t)) {
        panic!("test panic for {path}");
    }
}

/// What the access log needs of a request after it was handed on.
struct LoggedRequest {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    user_agent: Option<HeaderValue>,
    host: Option<HeaderValue>,
    /// The client behind trusted proxies; `None`: the socket's peer.
    client: Option<String>,
}

/// The real client address: the peer's, unless `[server] trusted_proxies` says to read it
/// from `X-Forwarded-For`.
pub(crate) fn client_address(
    gate: &Gate,
    peer: &Peer,
    headers: &http::HeaderMap,
) -> std::net::IpAddr {
    let trusted = &gate.config.server.trusted_proxies;
    if trusted.is_empty() {
        return peer.addr.ip();
    }
    trusted.client(peer.addr.ip(), headers.get_all(&X_FORWARDED_FOR).iter())
}

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// A header value as text for the log (bytes outside ASCII replaced).
fn header_text(value: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

/// The protocol as the access log names it.
fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

/// The inner chain. Every early return is an error that `handle` turns into a response.
async fn forward_request<'g>(
    gate: &'g Gate,
    peer: &Peer,
    mut request: Request<Incoming>,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    // Two Host headers: the gate and the upstream could each believe a different one.
    if request
        .headers()
        .get_all(header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ProxyError::BadRequest);
    }
    // HTTP/2: a `host` header that names another authority than `:authority` (RFC 9113
    // §8.3.1); the route, the upstream and the log could each believe a different one.
    if request.version() == http::Version::HTTP_2 {
        if let (Some(host), Some(authority)) = (
            request.headers().get(header::HOST),
            request.uri().authority(),
        ) {
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
            {
                return Err(ProxyError::BadRequest);
            }
        }
    }
    normalize_path(request.uri_mut())?;
    let route = match gate.choose(request.uri().path(), true)? {
        Target::Route(route) => route,
        Target::Nothing => return Err(ProxyError::NoRoute),
        Target::Own => return serve_own(gate, peer, request, outcome).await,
    };
    outcome.route = Some(route);
    forward(gate, peer, route, request, outcome).await
}

/// Replaces the request's path with its normalised form (SPEC §9), so that the route is chosen
/// by, and the upstream receives, the same path; 400 for a path that cannot be made safe.
pub(crate) fn normalize_path(uri: &mut http::Uri) -> Result<(), ProxyError> {
    let normal = match crate::path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normal)) => normal,
        Err(_) => return Err(ProxyError::BadRequest),
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    rewrite::set_path_and_query(uri, &path_and_query);
    Ok(())
}

/// A request for a route: extract and validate the credential, rewrite, forward.
async fn forward<'g>(
    gate: &'g Gate,
    peer: &Peer,
    route: &'g Route,
    mut request: Request<Incoming>,
    outcome: &mut Outcome<'g>,
) -> Result<Response<Body>, ProxyError> {
    let max_body = gate.config.server.max_body_bytes;
    if max_body > 0 && declared_length(&request).is_some_and(|n| n > max_body) {
        return Err(ProxyError::BodyTooLarge);
    }
    // Only the route's protocols may upgrade (SPEC §9); any other `Upgrade` is dropped.
    let upgrade = rewrite::upgrade_protocol(request.headers())
        .filter(|asked| {
            let asked = asked.as_bytes();
            route
                .config
                .upgrades
                .iter()
                .any(|p| asked.eq_ignore_ascii_case(p.as_bytes()))
        })
        .cloned();
    let websocket_key = match &upgrade {
        Some(_) => request.headers().get(header::SEC_WEBSOCKET_KEY).cloned(),
        None => None,
    };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();

    // Extract and validate. The upstream's credential form is rendered here, while the
    // credential is still borrowed from the request: no copy of it is made to outlive it.
    let client_dn = peer
        .client
        .as_deref()
        .map(|c| c.dn(gate.config.x509.dn_format));
    let mut token_for_identity = None;
    let mut upstream_credential = None;
    route.limit_client(outcome).await?;
    // A CORS preflight on a `preflight = "pass"` route goes on without a credential (and
    // without a body or an upgrade); only deny rules can stop it.
    let preflight = route.config.preflight_passes && is_preflight(&parts);
    if preflight && (upgrade.is_some() || has_body(&parts)) {
        return Err(ProxyError::BadRequest);
    }
    let caller = match route.config.auth {
        _ if preflight => None,
        AuthMode::None => None,
        auth => match identify(gate, Some(&peer.keys), &parts, outcome).await? {
            None if auth == AuthMode::Required => {
                outcome.auth = Some((AuthResult::Missing, "none"));
                return Err(ProxyError::MissingCredentials);
            }
            caller => caller,
        },
    };
    route.authorize(&parts, caller.as_ref(), preflight, outcome)?;
    let identity = match caller {
        None => None,
        Some(caller) => {
            route.limit_caller(&caller, outcome).await?;
            let Caller {
                identity, token, ..
            } = caller;
            if let Some((_, template)) = &route.config.upstream_auth {
                upstream_credential = template
                    .render_checked(&Values {
                        token: Some(&token),
                        identity: Some(&identity),
                        source: outcome.source,
                        client_dn,
                    })
                    .map_err(|_| unrenderable(outcome))?;
            }
            // Rare: an identity header made from the credential itself.
            if route
                .config
                .identity_headers
                .iter()
                .any(|(_, t)| t.uses_token())
            {
                token_for_identity = Some(token.into_owned());
            }
            Some(identity)
        }
    };

    // Rewrite.
    let forwarding = Forwarding {
        client_ip: &peer.ip,
        tls: peer.tls,
        values: Values {
            token: token_for_identity.as_deref(),
            identity: identity.as_deref(),
            source: outcome.source,
            client_dn,
        },
        upstream_credential,
        upstream_host: route.pool.host(),
    };
    rewrite::request(
        &mut parts,
        &route.config,
        &gate.boundary,
        forwarding,
        upgrade.as_ref(),
    )
    .map_err(|_| unrenderable(outcome))?;
    outcome.identity = identity;

    // Forward, if the upstream has room (503 at once otherwise). A broken or stalled request
    // body is the client's fault (400 / 408), not the upstream's.
    let slot = route.pool.claim()?;
    let body = ClientBody::new(body, gate.config.server.body_read_timeout);
    let body = if max_body > 0 {
        Body::Limited(Limited::new(body, max_body as usize))
    } else {
        Body::Client(body)
    };
    let upstream_start = Instant::now();
    let response = route
        .pool
        .send(
            slot,
            Request::from_parts(parts, body),
            upstream_start + route.config.timeout,
        )
        .await;
    outcome.upstream = Some(upstream_start.elapsed());
    let mut response = response?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A tunnel opens only for the upgrade the client asked for, completed as its protocol
        // says; dropping the response closes the upstream connection.
        let (Some(asked), Some(client_upgrade)) = (upgrade.as_ref(), client_upgrade) else {
            tracing::warn!(route = %route.config.path_prefix, "upstream answered 101 to a request that did not upgrade");
            return Err(ProxyError::UpgradeRefused);
        };
        if !rewrite::upgrade_completes(asked, websocket_key.as_ref(), response.headers()) {
            tracing::warn!(route = %route.config.path_prefix, "upstream answered 101 without completing the upgrade");
            return Err(ProxyError::UpgradeRefused);
        }
        rewrite::remove_hop_by_hop(response.headers_mut(), Some(asked));
        let (parts, body) = response.into_parts();
        // The tunnel holds the upstream connection, so it holds the in-flight slot too.
        let Some(upstream) = body.into_upgrade() else {
            return Err(ProxyError::UpgradeRefused);
        };
        tokio::spawn(relay_upgrade(client_upgrade, upstream));
        return Ok(Response::from_parts(
            parts,
            crate::upstream::full(Bytes::new()),
        ));
    } else {
        rewrite::remove_hop_by_hop(response.headers_mut(), None);
    }
    Ok(response.map(Body::Upstream))
}

/// Who sent a request, with what credential, found where.
pub(crate) struct Caller<'p, 'g> {
    pub(crate) identity: Arc<Identity>,
    pub(crate) token: Cow<'p, str>,
    /// The credential's SHA-256 (its cache key).
    pub(crate) key: [u8; 32],
    source: &'g Source,
}

/// Extract and validate: the caller's identity and credential, `None` without a credential.
pub(crate) async fn identify<'p, 'g>(
    gate: &'g Gate,
    keys: Option<&KeyMemo>,
    parts: &'p http::request::Parts,
    outcome: &mut Outcome<'g>,
) -> Result<Option<Caller<'p, 'g>>, ProxyError> {
    let Some(credential) = credential::extract(parts, &gate.config.sources)? else {
        outcome.ignored = credential::ignored(&parts.headers, &gate.config.sources);
        return Ok(None);
    };
    outcome.source = Some(credential.source.label());
    // A mistyped or random `tg_` string is refused before any cache or store work.
    if token::is_ours(&credential.token) && !token::well_formed(&credential.token) {
        outcome.auth = Some((AuthResult::Denied, "store"));
        return Err(ProxyError::InvalidCredentials);
    }
    let key = match keys {
        Some(keys) => keys.hash(&credential.token),
        None => crate::identity::hash(&credential.token),
    };
    let identity = authenticate(gate, &credential.token, key, outcome).await?;
    if let Some(usage) = &identity.usage {
        let now = store::now_ms();
        if usage.due(now) {
            // Off the request path; if the writer is behind, this use is simply not recorded.
            let _ = gate.usage.try_send((usage.hash, now));
        }
    }
    Ok(Some(Caller {
        identity,
        token: credential.token,
        key,
        source: credential.source,
    }))
}

/// Cache, then validators: the identity behind a credential (`key`, its hash).
async fn authenticate(
    gate: &Gate,
    token: &str,
    key: [u8; 32],
    outcome: &mut Outcome<'_>,
) -> Result<Arc<Identity>, ProxyError> {
    let validators = &gate.validators;
    let client = crate::limits::client_key(outcome.client);
    let (verdict, provenance) = match gate.cache.cached(&key) {
        Some(verdict) => (Ok(verdict), Provenance::Cache),
        None => {
            // A client over its failed-credential limit is refused before a validation starts.
            if let Some(refusal) = validators.throttled(token, &key, client) {
                return Err(outcome.limited(refusal));
            }
            gate.cache
                .get_or_validate(key, || {
                    let validators = Arc::clone(validators);
                    let token = token.to_string();
                    async move { validators.validate(&token, &key, client).await }
                })
                .await
        }
    };
    match verdict {
        Ok(Verdict::Allowed(identity)) => {
            let by = match provenance {
                Provenance::Cache => "cache",
                Provenance::Validated => identity.validator.label(),
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
        // Over the failed-credential limit: no validator was asked, so no decision to count.
        Err(Failure::Throttled(refusal)) => Err(outcome.limited(refusal)),
        Err(Failure::Backend(_)) => {
            outcome.auth = Some((AuthResult::Error, gate.validators.decided_by(token, true)));
            Err(ProxyError::BackendUnavailable)
        }
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
fn is_preflight(parts: &http::request::Parts) -> bool {
    parts.method == Method::OPTIONS
        && parts.headers.contains_key(header::ORIGIN)
        && parts
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Whether the request says it has a body.
fn has_body(parts: &http::request::Parts) -> bool {
    parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
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

/// Copies bytes both ways between an upgraded client connection and the upstream's (first
/// what the upstream sent after its 101), holding the route's in-flight slot until both are
/// closed.
async fn relay_upgrade(
    client: hyper::upgrade::OnUpgrade,
    (mut upstream, early, _slot): (upstream::Conn, bytes::BytesMut, upstream::Slot),
) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty() {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &early).await {
            tracing::debug!(error = %e, "upgraded connection closed");
            return;
        }
    }
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
            PageEndpoint::Page.label(),
            Endpoint::InsightCreate.label(),
            RucioEndpoint::X509.label(),
            RucioEndpoint::X509Proxy.label(),
            RucioEndpoint::Validate.label(),
        ];
        for label in endpoints {
            assert!(OWN_ROUTES.contains(&label), "{label}");
        }
    }

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, R>(_: &F) -> usize
    where
        F: Fn(A, B, C) -> R,
    {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_request_future_stays_small() {
        // hyper keeps one request's future per connection, allocated for the connection's
        // life, and moves it whole; a large future inlined into the request path (the gate's
        // endpoints, an upstream connect) made it 6.2 KiB.
        let size = returned_size::<_, &Gate, &Peer, Request<Incoming>, _>(&handle);
        assert!(size <= 4608, "proxy::handle's future is {size} bytes");
    }
}
