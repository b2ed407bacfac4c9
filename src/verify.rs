//! Forward-auth decisions (`[verify]`, SPEC §5): an ingress that already proxies (nginx
//! `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`) asks whether a request may pass and
//! what the upstream should see.
//!
//! Each question names the original request in the configured ingress's dialect only (a client
//! could send another dialect's headers through). The path is normalised as the proxy does
//! (SPEC §9) and picks the route; the credential comes from the question's own headers and goes
//! through the same cache and validators. The answer is 200 with the route's `upstream_auth`
//! and identity headers as response headers, or SPEC §4's error: nginx turns anything but
//! 2xx/401/403 into a 500, so in `nginx` mode a 400 or 404 is answered 403.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::access_log;
use crate::config::{AuthMode, Ingress};
use crate::error::ProxyError;
use crate::proxy::{Gate, Outcome, SharedGate};
use crate::rewrite::Values;
use crate::telemetry::AuthResult;
use crate::upstream::Body;

/// Connections the decision listener serves at once; more wait in the accept backlog. An
/// ingress keeps a few keep-alive connections per worker.
const VERIFY_CONNECTIONS: usize = 1024;

/// The header an ingress may use for `[verify] token` when `Authorization` carries the
/// client's own credential.
pub static X_TOKENGATE_VERIFY: HeaderName = HeaderName::from_static("x-tokengate-verify");
/// On a 200: the path and query the ingress should forward (normalised, no query credential).
pub static X_TOKENGATE_URI: HeaderName = HeaderName::from_static("x-tokengate-uri");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Serves decisions on `listener` until the task is dropped: a connection limit, a TLS
/// handshake and request head within `header_read_timeout`, HTTP/1.1 and HTTP/2.
pub async fn serve(listener: TcpListener, gate: SharedGate, acceptor: Option<TlsAcceptor>) {
    let server = gate.load().config.server.clone();
    let header_read_timeout = server.header_read_timeout;
    let lifetime = server.idle_timeout * LIFETIME_IN_IDLE_TIMEOUTS;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(server.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(server.idle_timeout)
        .max_concurrent_streams(server.max_concurrent_streams);
    let builder = Arc::new(builder);
    crate::listener::accept_bounded(listener, VERIFY_CONNECTIONS, "verify", |tcp, client, permit| {
        let gate = Arc::clone(&gate);
        let builder = Arc::clone(&builder);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let service = service_fn(move |request| {
                let gate = Arc::clone(&gate);
                async move { Ok::<_, Infallible>(handle(&gate.load(), request, client).await) }
            });
            match acceptor {
                None => {
                    // A client that says nothing is not waited for.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(header_read_timeout, tcp.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let connection = builder.serve_connection(TokioIo::new(tcp), service);
                    for_a_lifetime(connection, lifetime).await;
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(header_read_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            crate::telemetry::tls_handshake_error();
                            tracing::warn!(client = %client, error = %e, "verify: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let connection = builder.serve_connection(TokioIo::new(tls), service);
                    for_a_lifetime(connection, lifetime).await;
                }
            }
        });
    })
    .await;
}

/// The longest a decision connection is kept, in `[server] idle_timeout`s (5 min by default):
/// then it is closed gracefully (the request in flight is answered) and the ingress reconnects.
/// It bounds how long a connection that only answers HTTP/2 pings, and never asks, can hold one
/// of the listener's slots.
const LIFETIME_IN_IDLE_TIMEOUTS: u32 = 5;
/// How long a connection closing gracefully may take to finish its requests.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves `connection` for at most `lifetime`, then closes it gracefully.
async fn for_a_lifetime<C>(connection: C, lifetime: Duration)
where
    C: std::future::Future + GracefulShutdown,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = tokio::time::sleep(lifetime) => connection.as_mut().shut_down(),
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// A connection that can stop taking new requests and finish the ones it has.
trait GracefulShutdown {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdown for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// One decision, its metrics and its access-log line.
pub async fn handle(
    gate: &Gate,
    mut request: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let start = Instant::now();
    let Some(verify) = gate.config.verify.as_ref() else {
        return ProxyError::NoRoute.into_response();
    };
    let context = crate::trace::Context::take(request.headers_mut());
    let real_client = ingress_client(gate, client.ip(), request.headers());
    let (parts, _body) = request.into_parts();
    let mut outcome = Outcome::new(real_client);
    let mut original = None;
    let mut response = match decide(gate, verify, parts, &mut outcome, &mut original).await {
        Ok(response) => response,
        Err(error) => gate.error_response(error),
    };
    // nginx's auth_request takes only 2xx, 401 and 403; anything else is a 500 to the client.
    if verify.ingress == Ingress::Nginx
        && matches!(
            response.status(),
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::TOO_MANY_REQUESTS
        )
    {
        *response.status_mut() = StatusCode::FORBIDDEN;
    }
    response.headers_mut().insert(
        crate::trace::X_REQUEST_ID.clone(),
        context.request_id.clone(),
    );
    let duration = start.elapsed();
    let status = response.status().as_u16();
    if let Some(route) = outcome.route {
        route.metrics.request(status, duration, None);
        if let Some(limit) = outcome.limit.and_then(|l| route.metrics.limited(l)) {
            limit.increment(1);
        }
        if outcome.rule.is_some() {
            route.metrics.forbidden().increment(1);
        }
    }
    if let Some((result, by)) = outcome.auth {
        gate.auth_metrics.record(result, by);
    }
    if access_log::enabled() {
        let identity = outcome.identity.as_deref();
        let client_ip = real_client.to_string();
        let (method, uri, host) = match &original {
            Some(Original { method, uri, host }) => (method.as_str(), uri.path(), host.as_deref()),
            None => ("-", "-", None),
        };
        access_log::write(
            &access_log::Line {
                method,
                path: uri,
                status,
                route: outcome
                    .route
                    .map(|r| r.config.path_prefix.as_str())
                    .or(Some("tokengate:verify")),
                limit: outcome.limit,
                rule: outcome.rule,
                subject: identity.map(|i| i.subject.as_str()),
                source: outcome.source,
                ignored: outcome.ignored,
                auth: outcome.auth.map(|(result, _)| result.label()),
                validator: outcome.auth.map(|(_, by)| by),
                client: &client_ip,
                duration,
                upstream: None,
                request_id: context.request_id.to_str().unwrap_or_default(),
                trace_id: context.trace_id(),
                user_agent: None,
                host,
                protocol: "verify",
                token_id: identity.and_then(|i| i.token_id.as_deref()),
            },
            0,
        );
    }
    response
}

/// The original request a question is about.
struct Original {
    method: Method,
    uri: Uri,
    host: Option<String>,
}

/// The decision chain: who asks, about which request, on which route, with what credential.
async fn decide<'g>(
    gate: &'g Gate,
    verify: &crate::config::VerifyConfig,
    mut parts: http::request::Parts,
    outcome: &mut Outcome<'g>,
    original: &mut Option<Original>,
) -> Result<Response<Body>, ProxyError> {
    if let Some(expected) = &verify.token {
        if !asked_by_ingress(&mut parts.headers, expected.expose()) {
            return Ok(verify_token_required());
        }
    }
    let (method, uri, host) = original_request(verify.ingress, &parts)?;
    let mut uri = uri;
    // The same normalisation as the proxy: the route is the one the upstream will serve.
    crate::proxy::normalize_path(&mut uri)?;
    *original = Some(Original {
        method: method.clone(),
        uri: uri.clone(),
        host,
    });
    let route = match gate.choose(uri.path(), false)? {
        crate::proxy::Target::Route(route) => route,
        _ => return Err(ProxyError::NoRoute),
    };
    outcome.route = Some(route);
    // The question's headers with the original request line: the credential sources (query
    // and cookie ones too) read the original request.
    parts.method = method;
    let mut headers = HeaderMap::new();
    // What the ingress should forward: exactly what was decided, without query credentials.
    headers.insert(
        X_TOKENGATE_URI.clone(),
        gate.boundary().forwarded_path_and_query(&uri),
    );
    parts.uri = uri;
    route.limit_client(outcome).await?;
    // The route's rules, with the method the ingress names.
    if route.config.auth == AuthMode::None {
        route.authorize(&parts, None, false, outcome)?;
        return Ok(allowed(headers));
    }
    let caller = match crate::proxy::identify(gate, None, &parts, outcome).await? {
        Some(caller) => {
            route.authorize(&parts, Some(&caller), false, outcome)?;
            route.limit_caller(&caller, outcome).await?;
            caller
        }
        None if route.config.auth == AuthMode::Required => {
            outcome.auth = Some((AuthResult::Missing, "none"));
            return Err(ProxyError::MissingCredentials);
        }
        None => {
            route.authorize(&parts, None, false, outcome)?;
            return Ok(allowed(headers));
        }
    };
    let values = Values {
        token: Some(&caller.token),
        identity: Some(&caller.identity),
        source: outcome.source,
        client_dn: None,
    };
    for (name, template) in &route.config.identity_headers {
        match template.render_checked(&values) {
            Ok(Some(value)) => {
                headers.insert(name.clone(), value);
            }
            Ok(None) => {}
            Err(_) => return Err(crate::proxy::unrenderable(outcome)),
        }
    }
    if let Some((name, template)) = &route.config.upstream_auth {
        match template.render_checked(&values) {
            Ok(Some(value)) => {
                headers.insert(name.clone(), value);
            }
            Ok(None) => {}
            Err(_) => return Err(crate::proxy::unrenderable(outcome)),
        }
    }
    outcome.identity = Some(caller.identity);
    Ok(allowed(headers))
}

/// Whether the question carries `[verify] token` (`Authorization: Bearer`, or
/// `X-Tokengate-Verify` where `Authorization` is the client's); the header that carried it is
/// removed so that it is never read as the client's credential.
fn asked_by_ingress(headers: &mut HeaderMap, expected: &str) -> bool {
    let matches = |value: Option<&HeaderValue>, bearer: bool| {
        value
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                if bearer {
                    crate::credential::bearer_token(v)
                } else {
                    Some(v.trim())
                }
            })
            .is_some_and(|presented| bool::from(presented.as_bytes().ct_eq(expected.as_bytes())))
    };
    if matches(headers.get(&X_TOKENGATE_VERIFY), false) {
        headers.remove(&X_TOKENGATE_VERIFY);
        return true;
    }
    if matches(headers.get(header::AUTHORIZATION), true) {
        headers.remove(header::AUTHORIZATION);
        return true;
    }
    false
}

/// The client the ingress asks about: from the ingress's `X-Forwarded-For` (or, without one,
/// `X-Real-IP`) when the ingress is a trusted proxy, else the ingress itself.
fn ingress_client(
    gate: &Gate,
    ingress: std::net::IpAddr,
    headers: &http::HeaderMap,
) -> std::net::IpAddr {
    let trusted = &gate.config.server.trusted_proxies;
    if trusted.is_empty() {
        return ingress;
    }
    let forwarded = headers.get_all("x-forwarded-for");
    if forwarded.iter().next().is_some() {
        return trusted.client(ingress, forwarded.iter());
    }
    match headers.get("x-real-ip") {
        Some(real) => trusted.client(ingress, std::iter::once(real)),
        None => trusted.client(ingress, std::iter::empty()),
    }
}

fn verify_token_required() -> Response<Body> {
    let mut response = crate::response::json_response(
        StatusCode::UNAUTHORIZED,
        bytes::Bytes::from_static(br#"{"error":"Verify token required"}"#),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tokengate-verify\""),
    );
    response
}

/// The original method, URI and host, from the ingress's own headers only.
fn original_request(
    ingress: Ingress,
    parts: &http::request::Parts,
) -> Result<(Method, Uri, Option<String>), ProxyError> {
    let text = |name: &HeaderName| -> Result<Option<&str>, ProxyError> {
        let mut values = parts.headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            // Two answers to "which request": refuse rather than pick one.
            return Err(ProxyError::BadRequest);
        }
        first
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| ProxyError::BadRequest)
            })
            .transpose()
    };
    let method = |value: Option<&str>| -> Result<Method, ProxyError> {
        match value {
            None => Ok(Method::GET),
            Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| ProxyError::BadRequest),
        }
    };
    let uri = |value: Option<&str>| -> Result<Uri, ProxyError> {
        let value = value.ok_or(ProxyError::BadRequest)?;
        if !value.starts_with('/') {
            return Err(ProxyError::BadRequest);
        }
        value.parse::<Uri>().map_err(|_| ProxyError::BadRequest)
    };
    match ingress {
        Ingress::Nginx => Ok((
            method(text(&X_ORIGINAL_METHOD)?)?,
            uri(text(&X_ORIGINAL_URI)?)?,
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string),
        )),
        Ingress::Traefik => Ok((
            method(text(&X_FORWARDED_METHOD)?)?,
            uri(text(&X_FORWARDED_URI)?)?,
            text(&X_FORWARDED_HOST)?.map(str::to_string),
        )),
        Ingress::Envoy => Ok((
            parts.method.clone(),
            uri(parts.uri.path_and_query().map(|p| p.as_str()))?,
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string),
        )),
    }
}

/// 200: the request may pass; `headers` are what the upstream should receive.
fn allowed(headers: HeaderMap) -> Response<Body> {
    let mut response = Response::new(crate::upstream::full(bytes::Bytes::new()));
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)], uri: &str) -> http::request::Parts {
        let mut builder = Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_ingress_reads_only_its_own_headers() {
        let p = parts(
            &[
                ("x-original-uri", "/nginx?a=1"),
                ("x-original-method", "POST"),
                ("x-forwarded-uri", "/traefik"),
                ("x-forwarded-method", "PUT"),
            ],
            "/envoy/path",
        );
        let (m, u, _) = original_request(Ingress::Nginx, &p).unwrap();
        assert_eq!((m.as_str(), u.to_string().as_str()), ("POST", "/nginx?a=1"));
        let (m, u, _) = original_request(Ingress::Traefik, &p).unwrap();
        assert_eq!((m.as_str(), u.path()), ("PUT", "/traefik"));
        let (m, u, _) = original_request(Ingress::Envoy, &p).unwrap();
        assert_eq!((m.as_str(), u.path()), ("GET", "/envoy/path"));
        // nginx mode never falls back to Traefik's headers.
        let only_traefik = parts(&[("x-forwarded-uri", "/traefik")], "/verify");
        assert!(original_request(Ingress::Nginx, &only_traefik).is_err());
    }

    #[test]
    fn two_or_odd_original_uris_are_refused() {
        let two = parts(
            &[("x-original-uri", "/a"), ("x-original-uri", "/b")],
            "/verify",
        );
        assert!(original_request(Ingress::Nginx, &two).is_err());
        let absolute = parts(&[("x-original-uri", "http://evil/a")], "/verify");
        assert!(original_request(Ingress::Nginx, &absolute).is_err());
    }

    #[test]
    fn the_verify_token_is_checked_and_removed() {
        let secret = "verify-token-0123456789";
        let mut h = parts(&[("authorization", &format!("Bearer {secret}"))], "/").headers;
        assert!(asked_by_ingress(&mut h, secret));
        assert!(h.get("authorization").is_none());
        let mut h = parts(
            &[
                ("x-tokengate-verify", secret),
                ("authorization", "Bearer client"),
            ],
            "/",
        )
        .headers;
        assert!(asked_by_ingress(&mut h, secret));
        assert_eq!(h.get("authorization").unwrap(), "Bearer client");
        let mut h = parts(&[("authorization", "Bearer wrong")], "/").headers;
        assert!(!asked_by_ingress(&mut h, secret));
        assert!(!asked_by_ingress(&mut HeaderMap::new(), secret));
    }
}
