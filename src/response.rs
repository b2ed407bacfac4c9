//! The responses tokengate makes itself: a JSON body with the right content type, and an error
//! of the request path ([`ProxyError`]) as its status, message and headers — the one place
//! that turns one into the other.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::error::{error_body, ProxyError, Refusal};
use crate::upstream::{full, Body};

impl ProxyError {
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
            ProxyError::TooManyRequests(refusal) => {
                refusal_headers(response.headers_mut(), refusal)
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

/// A 429's `Retry-After`, and the limit as the IETF httpapi draft's structured fields say it:
/// `RateLimit-Policy: "subject";q=100;w=1` (the quota and its window in seconds) and
/// `RateLimit: "subject";r=0;t=3` (nothing remaining, seconds until there is).
fn refusal_headers(headers: &mut http::HeaderMap, refusal: Refusal) {
    let mut number = itoa::Buffer::new();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(number.format(refusal.retry_after)).expect("digits"),
    );
    let policy = format!(
        "\"{}\";q={};w={}",
        refusal.limit, refusal.quota, refusal.window
    );
    let now = format!("\"{}\";r=0;t={}", refusal.limit, refusal.retry_after);
    for (name, value) in [(&RATELIMIT_POLICY, policy), (&RATELIMIT, now)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name.clone(), value);
        }
    }
}

static RATELIMIT_POLICY: header::HeaderName = header::HeaderName::from_static("ratelimit-policy");
static RATELIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit");

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

    #[test]
    fn a_refusal_says_when_to_come_back_and_which_limit() {
        let refusal = Refusal {
            limit: "subject",
            retry_after: 3,
            quota: 100,
            window: 60,
        };
        let response = ProxyError::TooManyRequests(refusal).into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"subject\";q=100;w=60"
        );
        assert_eq!(response.headers()["ratelimit"], "\"subject\";r=0;t=3");
    }
}
