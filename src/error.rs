//! The one error type of the request path, and the one table that turns it into a response.
//!
//! Every step of the chain (`credential`, `validate`, `upstream`, ...) returns a [`ProxyError`];
//! [`ProxyError::into_response`] is the only place that decides status codes and bodies, so the
//! SPEC §4 table lives here and is locked by a unit test.

pub use crate::body::{full, Body};
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// A boxed error, as body streams carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request did not reach the upstream, or the upstream did not answer.
///
/// Tagged by where the fault lies: the client (`MissingCredentials`, `InvalidCredentials`,
/// `ConflictingCredentials`, `BodyTooLarge`, `BadRequest`), the authentication backend
/// (`BackendUnavailable`), or the upstream (`UpstreamUnavailable`, `UpstreamTimeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// No credential on a route with `auth = "required"`.
    MissingCredentials,
    /// A credential no validator recognises, expired or revoked.
    InvalidCredentials,
    /// Two different credentials in one request.
    ConflictingCredentials,
    /// A validator or store could not be reached and nothing was cached (fail closed).
    BackendUnavailable,
    /// The upstream refused or reset the connection.
    UpstreamUnavailable,
    /// The upstream did not answer within the route's timeout.
    UpstreamTimeout,
    /// The route's `max_inflight` requests are in flight already.
    UpstreamBusy,
    /// The client sent no request-body byte for `body_read_timeout`.
    RequestTimeout,
    /// The request body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// No route matches the request path.
    NoRoute,
    /// A request tokengate cannot forward (e.g. a header value it cannot carry).
    BadRequest,
    /// A method an endpoint of tokengate's own does not answer.
    MethodNotAllowed,
    /// An endpoint switched off in the config (`self_service = false`).
    Disabled,
    /// A token tokengate issued was used to create a token (SPEC §9).
    TokensCannotMint,
    /// A cookie-authenticated call from another origin.
    CrossOrigin,
    /// A cookie-authenticated POST to the JSON token API without a JSON content type.
    JsonRequired,
    /// The upstream answered `101` without completing the upgrade the client asked for; both
    /// connections are closed.
    UpgradeRefused,
}

impl ProxyError {
    /// The status code of the SPEC §4 table.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::MissingCredentials | ProxyError::InvalidCredentials => {
                StatusCode::UNAUTHORIZED
            }
            ProxyError::ConflictingCredentials | ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::BackendUnavailable | ProxyError::UpstreamBusy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamUnavailable | ProxyError::UpgradeRefused => StatusCode::BAD_GATEWAY,
            ProxyError::Disabled => StatusCode::NOT_FOUND,
            ProxyError::TokensCannotMint | ProxyError::CrossOrigin => StatusCode::FORBIDDEN,
            ProxyError::JsonRequired => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The human-readable message of the JSON body.
    pub fn message(self) -> &'static str {
        match self {
            ProxyError::MissingCredentials => "Credentials required",
            ProxyError::InvalidCredentials => "Invalid credentials",
            ProxyError::ConflictingCredentials => "Conflicting credentials",
            ProxyError::BackendUnavailable => "Authentication backend unavailable",
            ProxyError::UpstreamUnavailable | ProxyError::UpgradeRefused => "Upstream unavailable",
            ProxyError::Disabled => "Not found",
            ProxyError::TokensCannotMint => "Tokens cannot mint tokens",
            ProxyError::CrossOrigin => "Cross-origin request refused",
            ProxyError::JsonRequired => "JSON body required",
            ProxyError::UpstreamTimeout => "Upstream timeout",
            ProxyError::UpstreamBusy => "Upstream busy",
            ProxyError::RequestTimeout => "Request timeout",
            ProxyError::BodyTooLarge => "Request body too large",
            ProxyError::NoRoute => "No route",
            ProxyError::BadRequest => "Bad request",
            ProxyError::MethodNotAllowed => "Method not allowed",
        }
    }

    /// The ready-made response: JSON body, and `WWW-Authenticate` when credentials are missing.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status(), error_body(self.message()));
        match self {
            ProxyError::MissingCredentials => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokengate\""),
                );
            }
            // The client may already have sent bytes for the tunnel: never read them as
            // requests.
            ProxyError::UpstreamBusy => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::UpgradeRefused | ProxyError::BadRequest | ProxyError::RequestTimeout => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ProxyError {}

/// `{"error":"<message>"}`, serialised once.
fn error_body(message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message }).to_string())
}

/// A response with a JSON body tokengate makes itself.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_matches_spec() {
        let table = [
            (ProxyError::MissingCredentials, 401, "Credentials required"),
            (ProxyError::InvalidCredentials, 401, "Invalid credentials"),
            (
                ProxyError::ConflictingCredentials,
                400,
                "Conflicting credentials",
            ),
            (
                ProxyError::BackendUnavailable,
                503,
                "Authentication backend unavailable",
            ),
            (ProxyError::UpstreamUnavailable, 502, "Upstream unavailable"),
            (ProxyError::UpstreamTimeout, 504, "Upstream timeout"),
            (ProxyError::BodyTooLarge, 413, "Request body too large"),
            (ProxyError::BadRequest, 400, "Bad request"),
            (ProxyError::UpstreamBusy, 503, "Upstream busy"),
            (ProxyError::RequestTimeout, 408, "Request timeout"),
            (
                ProxyError::TokensCannotMint,
                403,
                "Tokens cannot mint tokens",
            ),
            (ProxyError::JsonRequired, 415, "JSON body required"),
            (ProxyError::UpgradeRefused, 502, "Upstream unavailable"),
        ];
        for (error, status, message) in table {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.message(), message, "{error:?}");
        }
    }

    #[test]
    fn missing_credentials_challenges() {
        let response = ProxyError::MissingCredentials.into_response();
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"tokengate\""
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let other = ProxyError::InvalidCredentials.into_response();
        assert!(other.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
