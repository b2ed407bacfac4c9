//! The responses tokengate makes itself: a JSON body with the right content type, and an error
//! of the request path ([`ProxyError`]) as its status, message and headers — the one place
//! that turns one into the other.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::error::{error_body, ProxyError};
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
}
