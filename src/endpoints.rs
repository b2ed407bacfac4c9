//! Endpoints tokengate answers itself (SPEC §5): the caller's own token API under
//! `[endpoints] tokens_prefix`, the Insight.io token endpoints, and the token operations the
//! admin listener's API shares with them.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use crate::audit::{self, Actor, Event};
use crate::cache::Cache;
use crate::clock::rfc3339;
use crate::config::{EndpointsConfig, TokensConfig};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::response::json_response;
use crate::store::{Kind, Store, TokenRecord};
use crate::token::{issue, Issue, IssueError, Minter};
use crate::upstream::{full, Body};

/// The largest JSON body a token request may have.
const MAX_REQUEST_BODY: usize = 16 * 1024;

/// An endpoint of the main listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `{prefix}/tokens`: POST creates, GET lists the caller's tokens.
    Tokens,
    /// `{prefix}/tokens/{id}`: DELETE revokes one of the caller's tokens.
    Token(String),
    /// `GET /api/createApiToken`.
    InsightCreate,
    /// `GET /api/revokeApiToken`.
    InsightRevoke,
    /// `GET /api/getApiTokens`.
    InsightList,
}

impl Endpoint {
    /// Whether `method` on this endpoint creates a token.
    pub fn mints(&self, method: &Method) -> bool {
        matches!(
            (self, method),
            (Endpoint::Tokens, &Method::POST) | (Endpoint::InsightCreate, &Method::GET)
        )
    }

    /// The name in the access log's `route` field.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Tokens | Endpoint::Token(_) => "tokengate:tokens",
            Endpoint::InsightCreate | Endpoint::InsightRevoke | Endpoint::InsightList => {
                "tokengate:insight"
            }
        }
    }
}

/// The Insight.io endpoints' paths: create, revoke, list.
pub const INSIGHT_PATHS: [&str; 3] = [
    "/api/createApiToken",
    "/api/revokeApiToken",
    "/api/getApiTokens",
];

/// Which endpoint, if any, a path is.
pub fn route(config: &EndpointsConfig, path: &str) -> Option<Endpoint> {
    if let Some(rest) = path.strip_prefix(config.tokens_prefix.as_str()) {
        if rest == "/tokens" || rest == "/tokens/" {
            return Some(Endpoint::Tokens);
        }
        if let Some(id) = rest.strip_prefix("/tokens/") {
            if !id.is_empty() && !id.contains('/') {
                return Some(Endpoint::Token(id.to_string()));
            }
        }
    }
    if config.insight {
        return match INSIGHT_PATHS.iter().position(|p| *p == path) {
            Some(0) => Some(Endpoint::InsightCreate),
            Some(1) => Some(Endpoint::InsightRevoke),
            Some(2) => Some(Endpoint::InsightList),
            _ => None,
        };
    }
    None
}

/// What token operations need, and who asks (for the audit line).
pub struct TokenService<'a> {
    /// Where tokens live.
    pub store: &'a Store,
    /// The validation cache (revocation evicts from it).
    pub cache: &'a Cache,
    /// `[tokens]`.
    pub config: &'a TokensConfig,
    /// Who asks.
    pub actor: Actor<'a>,
    /// From where, when over the network.
    pub client: Option<IpAddr>,
}

/// What a create request may say.
pub struct CreateRequest {
    /// The label.
    pub name: String,
    /// Lifetime; `None`: the default.
    pub ttl: Option<Duration>,
    /// The owner (admin API only).
    pub user: Option<String>,
    /// The account (admin API only).
    pub account: Option<String>,
    /// The scopes asked for; `None`: the minter's allowance.
    pub scopes: Option<Vec<String>>,
}

/// Why a create request was not read.
#[derive(Debug)]
pub enum BadCreate {
    /// The body did not arrive within the time allowed (408).
    Timeout,
    /// It is not a create request (400 with this message).
    Invalid(String),
}

impl BadCreate {
    /// The response.
    pub fn into_response(self) -> Response<Body> {
        match self {
            BadCreate::Timeout => ProxyError::RequestTimeout.into_response(),
            BadCreate::Invalid(message) => bad_request(&message),
        }
    }
}

impl From<String> for BadCreate {
    fn from(message: String) -> Self {
        BadCreate::Invalid(message)
    }
}

/// Reads a JSON create request (`{"name":..,"ttl":..,"scopes":[..]}`, all optional; `ttl` a
/// duration string or seconds) that must arrive whole within `within`. An empty body is an
/// empty request.
pub async fn read_create_request<B>(body: B, within: Duration) -> Result<CreateRequest, BadCreate>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bytes = read_body(body, within).await?;
    Ok(parse_create_request(&bytes)?)
}

/// Reads a token request's body (JSON, or the token page's form), which must arrive whole
/// within `within` and be at most 16 KiB.
pub async fn read_body<B>(body: B, within: Duration) -> Result<Bytes, BadCreate>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let collected = tokio::time::timeout(within, Limited::new(body, MAX_REQUEST_BODY).collect())
        .await
        .map_err(|_| BadCreate::Timeout)?;
    Ok(collected
        .map_err(|_| BadCreate::Invalid("request body is too large or unreadable".to_string()))?
        .to_bytes())
}

/// Parses a JSON create request.
fn parse_create_request(bytes: &[u8]) -> Result<CreateRequest, String> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(bytes).map_err(|e| format!("body is not JSON: {e}"))?
    };
    let Value::Object(map) = value else {
        return Err("body must be a JSON object".to_string());
    };
    for key in map.keys() {
        if !matches!(key.as_str(), "name" | "ttl" | "user" | "account" | "scopes") {
            return Err(format!("unknown field {key:?}"));
        }
    }
    let text = |key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key} must be a string")),
        }
    };
    let ttl = match map.get("ttl") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(crate::config::parse_duration(s)?),
        Some(Value::Number(n)) => Some(Duration::from_secs(
            n.as_u64().ok_or("ttl must be a whole number of seconds")?,
        )),
        Some(_) => {
            return Err("ttl must be a duration such as \"30d\", or seconds".to_string());
        }
    };
    let scopes = match map.get("scopes") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("scopes must be a list of scope names")?,
        ),
        Some(_) => return Err("scopes must be a list of scope names".to_string()),
    };
    Ok(CreateRequest {
        name: text("name")?.unwrap_or_default(),
        ttl,
        user: text("user")?,
        account: text("account")?,
        scopes,
    })
}

impl TokenService<'_> {
    /// Creates an API token for `subject`, minted by `minter`:
    /// `201 {"id","token","created","expires","scopes",..}`.
    pub async fn create(
        &self,
        subject: &str,
        account: Option<&str>,
        request: &CreateRequest,
        minter: Minter<'_>,
    ) -> Response<Body> {
        match self.create_token(subject, account, request, minter).await {
            Ok((token, record)) => {
                let body = json!({
                    "id": record.id,
                    "token": token,
                    "name": record.name,
                    "subject": record.subject,
                    "account": record.account,
                    "created": rfc3339(record.created_ms),
                    "expires": record.expires_ms.map(rfc3339),
                    "scopes": record.scopes,
                });
                no_store(json_response(
                    StatusCode::CREATED,
                    Bytes::from(body.to_string()),
                ))
            }
            Err(e) => not_issued(&e),
        }
    }

    /// Creates an API token for `subject`, minted by `minter` (which bounds its scopes), and
    /// writes the audit line: the secret (shown once) and its record.
    pub async fn create_token(
        &self,
        subject: &str,
        account: Option<&str>,
        request: &CreateRequest,
        minter: Minter<'_>,
    ) -> Result<(String, TokenRecord), IssueError> {
        let what = Issue {
            subject,
            account,
            name: &request.name,
            ttl: request.ttl,
            kind: Kind::Api,
            dn: None,
            format: None,
            scopes: request.scopes.as_deref(),
            minter,
        };
        let (token, record) = issue(self.store, self.config, what).await?;
        self.audit(Event::Created, &record);
        Ok((token, record))
    }

    fn audit(&self, event: Event, record: &TokenRecord) {
        audit::record(event, record, self.actor, self.client);
    }

    /// Lists tokens (never their secrets), of one subject or all.
    pub async fn list(&self, subject: Option<&str>) -> Response<Body> {
        match self.store.list(subject).await {
            Ok(records) => {
                let list: Vec<Value> = records.iter().map(describe).collect();
                json_response(StatusCode::OK, Bytes::from(Value::Array(list).to_string()))
            }
            Err(e) => store_down(&e),
        }
    }

    /// Revokes a token by id (only `owner`'s, when given): 204, or 404.
    pub async fn revoke(&self, id: &str, owner: Option<&str>) -> Response<Body> {
        match self.revoke_token(id, owner).await {
            Ok(Some(_)) => {
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                response
            }
            Ok(None) => json_response(
                StatusCode::NOT_FOUND,
                Bytes::from(r#"{"error":"No such token"}"#),
            ),
            Err(e) => store_down(&e),
        }
    }

    /// Revokes a token by id (only `owner`'s, when given), evicts it from the cache and writes
    /// the audit line; `None`: no such token.
    pub async fn revoke_token(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<TokenRecord>, crate::store::StoreError> {
        let revoked = self.store.revoke(id, owner).await?;
        if let Some(record) = &revoked {
            self.cache.evict(&record.hash);
            self.audit(Event::Revoked, record);
        }
        Ok(revoked)
    }

    /// Insight.io `createApiToken` (`?scopes=read,write` optional): the new token as the body.
    pub async fn insight_create(&self, caller: &Identity, query: Option<&str>) -> Response<Body> {
        let scopes = insight_scopes(query);
        let what = Issue {
            subject: &caller.subject,
            account: Some(&caller.account),
            name: "insight",
            ttl: None,
            kind: Kind::Api,
            dn: None,
            format: None,
            scopes: scopes.as_deref(),
            minter: Minter::Caller(caller),
        };
        match issue(self.store, self.config, what).await {
            Ok((token, record)) => {
                self.audit(Event::Created, &record);
                let mut response = no_store(Response::new(full(token)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                response
            }
            Err(e) => not_issued(&e),
        }
    }

    /// Insight.io `revokeApiToken`: revokes the presented token; 200 whatever it was.
    pub async fn insight_revoke(&self, token: Option<&str>) -> Response<Body> {
        if let Some(token) = token {
            let hash = crate::identity::hash(token);
            self.cache.evict(&hash);
            match self.store.revoke_hash(&hash, None).await {
                Ok(Some(record)) => self.audit(Event::Revoked, &record),
                Ok(None) => {}
                Err(e) => return store_down(&e),
            }
        }
        json_response(StatusCode::OK, Bytes::from_static(b"{}"))
    }

    /// Insight.io `getApiTokens`: `[{"uid","apiToken","created","lastUsed"}]`, times in ms.
    pub async fn insight_list(&self, subject: &str) -> Response<Body> {
        match self.store.list(Some(subject)).await {
            Ok(records) => {
                let list: Vec<Value> = records
                    .iter()
                    .map(|r| json!({"uid": r.subject, "apiToken": r.id, "created": r.created_ms, "lastUsed": r.last_used_ms}))
                    .collect();
                json_response(StatusCode::OK, Bytes::from(Value::Array(list).to_string()))
            }
            Err(e) => store_down(&e),
        }
    }
}

/// The scopes of `createApiToken?scopes=read,write`: `None` without the parameter, none for
/// `scopes=` (empty).
fn insight_scopes(query: Option<&str>) -> Option<Vec<String>> {
    let (_, value) = crate::credential::query_pairs(query?).find(|(k, _)| *k == "scopes")?;
    let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned();
    Some(
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// Answers a main-listener endpoint (the request's `head`) for an authenticated caller.
pub async fn serve(
    service: &TokenService<'_>,
    endpoint: &Endpoint,
    head: &http::request::Parts,
    caller: &Identity,
    presented: &str,
    body: hyper::body::Incoming,
    body_timeout: Duration,
) -> Result<Response<Body>, ProxyError> {
    let subject = caller.subject.as_str();
    let query = head.uri.query();
    let response = match (endpoint, &head.method) {
        (Endpoint::Tokens, &Method::POST) => match read_create_request(body, body_timeout).await {
            Ok(request) if request.user.is_some() || request.account.is_some() => {
                let _ = request;
                bad_request("user and account can only be set through the admin API")
            }
            Ok(request) => {
                let minter = Minter::Caller(caller);
                service
                    .create(subject, Some(&caller.account), &request, minter)
                    .await
            }
            Err(bad) => bad.into_response(),
        },
        (Endpoint::Tokens, &Method::GET) => service.list(Some(subject)).await,
        (Endpoint::Token(id), &Method::DELETE) => service.revoke(id, Some(subject)).await,
        (Endpoint::InsightCreate, &Method::GET) => service.insight_create(caller, query).await,
        (Endpoint::InsightRevoke, &Method::GET) => service.insight_revoke(Some(presented)).await,
        (Endpoint::InsightList, &Method::GET) => service.insight_list(subject).await,
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from(r#"{"error":"Method not allowed"}"#),
        ),
    };
    Ok(response)
}

/// A token as lists show it: everything but the secret.
pub fn describe(r: &TokenRecord) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "subject": r.subject,
        "account": r.account,
        "kind": r.kind.as_str(),
        "created": rfc3339(r.created_ms),
        "expires": r.expires_ms.map(rfc3339),
        "lastUsed": r.last_used_ms.map(rfc3339),
        "scopes": r.scopes,
    })
}

/// A token in a response must not be cached by anyone.
fn no_store(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    response
}

/// 400 with a message.
pub fn bad_request(message: &str) -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        Bytes::from(json!({ "error": message }).to_string()),
    )
}

/// 400 naming the cap for a lifetime over `max_ttl` or the scope refused, else 503.
fn not_issued(e: &IssueError) -> Response<Body> {
    match e {
        IssueError::Lifetime(message) | IssueError::Scope(message) => bad_request(message),
        IssueError::Store(e) => store_down(e),
    }
}

pub(crate) fn store_down(e: &crate::store::StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "token store unavailable");
    ProxyError::BackendUnavailable.into_response()
}
