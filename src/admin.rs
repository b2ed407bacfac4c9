//! The admin listener (SPEC §7): `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use subtle::ConstantTimeEq;

use crate::endpoints::{bad_request, read_create_request, TokenService};
use crate::proxy::SharedGate;
use crate::response::json_response;
use crate::upstream::{full, Body};

/// What readiness depends on beyond the config being loaded.
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    /// Marks the process as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The current gate (for the cache gauge).
    pub gate: SharedGate,
    /// Draining and readiness.
    pub health: Arc<Health>,
    /// The Prometheus exporter.
    pub metrics: Option<PrometheusHandle>,
}

/// Connections the admin listener serves at once (scrapers, probes, operators); more wait in
/// the accept backlog.
const ADMIN_CONNECTIONS: usize = 64;
/// The longest an admin connection is kept (scrapers and probes reconnect).
const ADMIN_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves the admin endpoints on `listener` until the task is dropped. Bounded like the main
/// listener: a connection limit, and a request head (also the next one on a keep-alive
/// connection) within `header_read_timeout`.
pub async fn serve(listener: TcpListener, state: AdminState) {
    let header_read_timeout = state.gate.load().config.server.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_read_timeout)
        .max_concurrent_streams(16);
    let builder = Arc::new(builder);
    crate::listener::accept_bounded(
        listener,
        ADMIN_CONNECTIONS,
        "admin",
        |tcp, client, permit| {
            let state = state.clone();
            let builder = Arc::clone(&builder);
            tokio::spawn(async move {
                let _permit = permit;
                // A client that says nothing is not waited for (the HTTP/1 head timer starts only
                // once a protocol is known).
                let mut first = [0u8; 1];
                match tokio::time::timeout(header_read_timeout, tcp.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, request, client.ip()).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, connection).await;
            });
        },
    )
    .await;
}

async fn handle(
    state: &AdminState,
    request: Request<Incoming>,
    client: std::net::IpAddr,
) -> Response<Body> {
    let path = request.uri().path();
    if path == "/tokens" || path.starts_with("/tokens/") {
        return tokens(state, request, client).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return status_json(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match path {
        "/healthz" => status_json(StatusCode::OK, "ok"),
        "/readyz" => {
            if state.health.is_draining() {
                return status_json(StatusCode::SERVICE_UNAVAILABLE, "draining");
            }
            let store = Arc::clone(&state.gate.load().store);
            match tokio::time::timeout(READY_STORE_TIMEOUT, store.ping()).await {
                Ok(Ok(())) => status_json(StatusCode::OK, "ready"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "not ready: token store unreachable");
                    status_json(StatusCode::SERVICE_UNAVAILABLE, "token store unreachable")
                }
                Err(_) => status_json(StatusCode::SERVICE_UNAVAILABLE, "token store unreachable"),
            }
        }
        "/metrics" => {
            let Some(handle) = &state.metrics else {
                return status_json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metrics recorder not installed",
                );
            };
            crate::telemetry::cache_entries(state.gate.load().cache().len());
            crate::telemetry::collect_process();
            let mut response = Response::new(full(handle.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => status_json(StatusCode::NOT_FOUND, "not found"),
    }
}

/// How long `/readyz` waits for the store.
const READY_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The admin token API: any user's tokens, with the admin bearer token.
async fn tokens(
    state: &AdminState,
    request: Request<Incoming>,
    client: std::net::IpAddr,
) -> Response<Body> {
    let gate = state.gate.load_full();
    let body_timeout = gate.config.server.body_read_timeout;
    let Some(expected) = gate.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return json_response(
            StatusCode::NOT_FOUND,
            Bytes::from(r#"{"error":"The admin token API is off: set [admin] token"}"#),
        );
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::credential::bearer_token)
        .unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(expected.expose().as_bytes())) {
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            Bytes::from(r#"{"error":"Admin token required"}"#),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tokengate-admin\""),
        );
        return response;
    }
    let service = TokenService {
        store: &gate.store,
        cache: gate.cache(),
        config: &gate.config.tokens,
        actor: crate::audit::Actor::Admin,
        client: Some(client),
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let user = request.uri().query().and_then(|q| {
        crate::credential::query_pairs(q)
            .find(|(k, _)| *k == "user")
            .and_then(|(_, v)| percent_encoding::percent_decode_str(v).decode_utf8().ok())
            .map(|v| v.into_owned())
    });
    match (method, path.strip_prefix("/tokens/")) {
        (Method::POST, None) => {
            match read_create_request(request.into_body(), body_timeout).await {
                Ok(create) => match create.user.clone() {
                    Some(user) if !user.is_empty() => {
                        // No minting credential: any configured scope; `login_scopes`
                        // when the request names none (what the user would get).
                        let minter = crate::token::Minter::Operator;
                        service
                            .create(&user, create.account.as_deref(), &create, minter)
                            .await
                    }
                    _ => bad_request("user is required"),
                },
                Err(bad) => bad.into_response(),
            }
        }
        (Method::GET, None) => service.list(user.as_deref()).await,
        (Method::DELETE, Some(id)) if !id.is_empty() => service.revoke(id, None).await,
        _ => status_json(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

fn status_json(status: StatusCode, text: &str) -> Response<Body> {
    json_response(
        status,
        Bytes::from(serde_json::json!({ "status": text }).to_string()),
    )
}
