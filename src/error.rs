//! The one error type of the request path, and the one table that turns it into a response.
//!
//! Every step of the chain (`credential`, `validate`, `upstream`, ...) returns a [`ProxyError`];
//! this is the one table of their status codes and messages, locked by a unit test; `response`
//! turns them into responses.

use bytes::Bytes;
use http::StatusCode;

/// A boxed error, as body streams carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request did not reach the upstream, or the upstream did not answer.
///
/// Tagged by where the fault lies: the client (`MissingCredentials`, `InvalidCredentials`,
/// `ConflictingCredentials`, `BodyTooLarge`, `BadRequest`), the authentication backend
/// (`BackendUnavailable`), or the upstream (`UpstreamUnavailable`, `UpstreamTimeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Over a rate limit, or the failed-credential limit (SPEC §11).
    TooManyRequests(Refusal),
    /// A valid credential that the route's rules do not let through (SPEC §10).
    Forbidden,
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

/// Which limit refused a request, and when to come back: what a 429 says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit's name (`failed_auth`, `subject`, `token`, `client`).
    pub limit: &'static str,
    /// Seconds until the bucket has a token again (at least 1).
    pub retry_after: u32,
    /// The limit's quota: `quota` requests per `window` seconds.
    pub quota: u32,
    /// The limit's window, in seconds (at least 1).
    pub window: u32,
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
            ProxyError::TokensCannotMint | ProxyError::CrossOrigin | ProxyError::Forbidden => {
                StatusCode::FORBIDDEN
            }
            ProxyError::JsonRequired => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
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
            ProxyError::TooManyRequests(_) => "Too many requests",
            ProxyError::Forbidden => "Forbidden",
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ProxyError {}

/// `{"error":"<message>"}`, serialised once.
pub fn error_body(message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message }).to_string())
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
            (ProxyError::Forbidden, 403, "Forbidden"),
            (ProxyError::UpgradeRefused, 502, "Upstream unavailable"),
            (
                ProxyError::TooManyRequests(Refusal {
                    limit: "client",
                    retry_after: 1,
                    quota: 1,
                    window: 1,
                }),
                429,
                "Too many requests",
            ),
        ];
        for (error, status, message) in table {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.message(), message, "{error:?}");
        }
    }
}
