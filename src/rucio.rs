//! Rucio token exchange (SPEC §5, `[x509]`): `GET /auth/x509` and `GET /auth/x509_proxy`
//! trade a verified client certificate (or grid proxy chain) for a token of kind `x509`;
//! `GET /auth/validate` tells what a token is. Answers are shaped as the stock Rucio client
//! expects: the token and its expiry in `X-Rucio-Auth-Token*` headers, failures as `401` with
//! `ExceptionClass` / `ExceptionMessage` headers and the same two fields as JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::config::{TokenFormat, TokensConfig, X509Config};
use crate::identity::ClientCert;
use crate::identity::Identity;
use crate::response::json_response;
use crate::store::{Kind, Store};
use crate::token::{issue, Issue};
use crate::upstream::{full, Body};

/// A Rucio endpoint of the main listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RucioEndpoint {
    /// `/auth/x509` (an end-entity certificate or a proxy chain).
    X509,
    /// `/auth/x509_proxy` (the same; the stock client uses it for proxies).
    X509Proxy,
    /// `/auth/validate`.
    Validate,
}

impl RucioEndpoint {
    /// The name in the access log's `route` field.
    pub fn label(self) -> &'static str {
        match self {
            RucioEndpoint::X509 => "tokengate:auth/x509",
            RucioEndpoint::X509Proxy => "tokengate:auth/x509_proxy",
            RucioEndpoint::Validate => "tokengate:auth/validate",
        }
    }
}

/// Which Rucio endpoint, if any, `path` is (only with `[x509]` enabled).
pub fn route(config: &X509Config, path: &str) -> Option<RucioEndpoint> {
    if !config.enabled {
        return None;
    }
    match path.strip_suffix('/').unwrap_or(path) {
        "/auth/x509" => Some(RucioEndpoint::X509),
        "/auth/x509_proxy" => Some(RucioEndpoint::X509Proxy),
        "/auth/validate" => Some(RucioEndpoint::Validate),
        _ => None,
    }
}

static RUCIO_ACCOUNT: HeaderName = HeaderName::from_static("x-rucio-account");
static RUCIO_APP_ID: HeaderName = HeaderName::from_static("x-rucio-appid");
static RUCIO_VO: HeaderName = HeaderName::from_static("x-rucio-vo");
static RUCIO_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-rucio-auth-token");
static RUCIO_AUTH_TOKEN_EXPIRES: HeaderName = HeaderName::from_static("x-rucio-auth-token-expires");
static RUCIO_AUTH_ACCOUNT: HeaderName = HeaderName::from_static("x-rucio-auth-account");
static EXCEPTION_CLASS: HeaderName = HeaderName::from_static("exceptionclass");
static EXCEPTION_MESSAGE: HeaderName = HeaderName::from_static("exceptionmessage");

/// The longest `ExceptionMessage` (SPEC §5).
const MAX_EXCEPTION_MESSAGE: usize = 125;

/// The accounts a DN may use, the default first: `[[x509.identity]]` of the config, then the
/// mapping in the store (`tokengate identity add`).
pub async fn accounts_for(
    store: &Store,
    config: &X509Config,
    dn: &str,
) -> Result<Vec<String>, crate::store::StoreError> {
    let mut accounts: Vec<String> = config
        .identities
        .iter()
        .filter(|(d, _)| d == dn)
        .flat_map(|(_, a)| a.iter().cloned())
        .collect();
    for account in store.identity_accounts(dn).await? {
        if !accounts.contains(&account) {
            accounts.push(account);
        }
    }
    Ok(accounts)
}

/// `/auth/x509` and `/auth/x509_proxy`: a token for the certificate's DN and the requested
/// (or default) account.
pub async fn exchange(
    store: &Store,
    x509: &X509Config,
    tokens: &TokensConfig,
    client: Option<&ClientCert>,
    headers: &HeaderMap,
    address: std::net::IpAddr,
) -> Response<Body> {
    let Some(client) = client else {
        return cannot_authenticate("Cannot authenticate: no verified client certificate");
    };
    let dn = client.dn(x509.dn_format);
    let requested = headers
        .get(&RUCIO_ACCOUNT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|a| !a.is_empty());
    let accounts = match accounts_for(store, x509, dn).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "token store unavailable");
            return crate::error::ProxyError::BackendUnavailable.into_response();
        }
    };
    let account = match requested {
        Some(wanted) if accounts.iter().any(|a| a == wanted) => wanted.to_string(),
        Some(wanted) => {
            tracing::info!(
                dn,
                account = wanted,
                "x509 exchange refused: account not allowed"
            );
            return cannot_authenticate(&format!(
                "Cannot authenticate to account {wanted} with given credentials"
            ));
        }
        None => match accounts.first() {
            Some(a) => a.clone(),
            None => {
                tracing::info!(dn, "x509 exchange refused: DN not mapped");
                return cannot_authenticate(&format!("Cannot authenticate: {dn} is not mapped"));
            }
        },
    };
    let what = Issue {
        subject: &account,
        account: Some(&account),
        name: "x509",
        ttl: Some(x509.token_ttl),
        kind: Kind::X509,
        dn: Some(dn),
        format: Some(TokenFormat::Opaque),
        // x509 tokens carry no scopes or groups (only API tokens do).
        scopes: None,
        minter: crate::token::Minter::Operator,
    };
    let (token, record) = match issue(store, tokens, what).await {
        Ok(issued) => issued,
        Err(e) => {
            tracing::warn!(error = %e, "token store unavailable");
            return crate::error::ProxyError::BackendUnavailable.into_response();
        }
    };
    crate::audit::record(
        crate::audit::Event::Exchanged,
        &record,
        crate::audit::Actor::Holder,
        Some(address),
    );
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    tracing::info!(
        dn,
        account = %account,
        token_id = %record.id,
        app_id = text(&RUCIO_APP_ID).unwrap_or("-"),
        vo = text(&RUCIO_VO).unwrap_or("-"),
        "x509 token issued"
    );
    let expires = record.expires_ms.map_or_else(SystemTime::now, |ms| {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    });
    let mut response = Response::new(full(Bytes::new()));
    let h = response.headers_mut();
    let mut set = |name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name.clone(), v);
        }
    };
    set(&RUCIO_AUTH_TOKEN, &token);
    set(&RUCIO_AUTH_TOKEN_EXPIRES, &rucio_date(expires));
    set(&RUCIO_AUTH_ACCOUNT, &account);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    response
}

/// `/auth/validate` for a valid credential: `{"account","identity","lifetime"}`.
pub fn validated(identity: &Identity) -> Response<Body> {
    let lifetime = identity
        .expires
        .map(|at| humantime::format_rfc3339_seconds(at).to_string());
    let body = json!({
        "account": identity.account,
        "identity": identity.dn.as_deref().unwrap_or(&identity.subject),
        "lifetime": lifetime,
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// `/auth/validate` without a credential: 400.
pub fn no_token() -> Response<Body> {
    exception(
        StatusCode::BAD_REQUEST,
        "CannotAuthenticate",
        "Cannot authenticate: no token given",
    )
}

/// A refused exchange or validation: 401, `ExceptionClass: CannotAuthenticate`.
pub fn cannot_authenticate(message: &str) -> Response<Body> {
    exception(StatusCode::UNAUTHORIZED, "CannotAuthenticate", message)
}

/// A Rucio exception: the class and the message as headers and as JSON. The message is one
/// line of at most 125 characters (it travels in a header).
fn exception(status: StatusCode, class: &'static str, message: &str) -> Response<Body> {
    let mut line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() > MAX_EXCEPTION_MESSAGE {
        line = line.chars().take(MAX_EXCEPTION_MESSAGE - 3).collect();
        line.push_str("...");
    }
    let body = json!({"ExceptionClass": class, "ExceptionMessage": line});
    let mut response = json_response(status, Bytes::from(body.to_string()));
    let h = response.headers_mut();
    h.insert(EXCEPTION_CLASS.clone(), HeaderValue::from_static(class));
    // A non-ASCII DN cannot be a header value as is: fall back to its ASCII part.
    let ascii: String = line.chars().filter(char::is_ascii).collect();
    if let Ok(v) = HeaderValue::from_str(&ascii) {
        h.insert(EXCEPTION_MESSAGE.clone(), v);
    }
    response
}

/// `%a, %d %b %Y %H:%M:%S UTC`, as Rucio writes `X-Rucio-Auth-Token-Expires`.
pub fn rucio_date(at: SystemTime) -> String {
    let http = httpdate::fmt_http_date(at);
    match http.strip_suffix(" GMT") {
        Some(rest) => format!("{rest} UTC"),
        None => http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_in_rucio_form() {
        let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(rucio_date(at), "Sun, 06 Nov 1994 08:49:37 UTC");
    }

    #[test]
    fn exception_messages_are_one_short_line() {
        let long = format!("first\nsecond {}", "x".repeat(300));
        let r = cannot_authenticate(&long);
        assert_eq!(r.status(), 401);
        let m = r.headers()["exceptionmessage"].to_str().unwrap();
        assert!(m.len() <= MAX_EXCEPTION_MESSAGE, "{}", m.len());
        assert!(m.starts_with("first second"));
        assert_eq!(r.headers()["exceptionclass"], "CannotAuthenticate");
    }

    #[test]
    fn routes_only_when_enabled() {
        let mut c = X509Config::default();
        assert_eq!(route(&c, "/auth/x509"), None);
        c.enabled = true;
        assert_eq!(route(&c, "/auth/x509"), Some(RucioEndpoint::X509));
        assert_eq!(
            route(&c, "/auth/x509_proxy/"),
            Some(RucioEndpoint::X509Proxy)
        );
        assert_eq!(route(&c, "/auth/validate"), Some(RucioEndpoint::Validate));
        assert_eq!(route(&c, "/auth/x509x"), None);
    }
}
