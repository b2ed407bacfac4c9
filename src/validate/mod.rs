//! Validate: who a credential belongs to. The validators are tried in order; the first that
//! recognises the credential decides; one that cannot be reached makes the answer "backend
//! unavailable" unless a later one recognises the credential (fail closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};

use crate::config::{IntrospectConfig, StaticToken, ValidatorConfig};
use crate::error::Refusal;
pub use crate::identity::{
    hash, principal, purge_principals, BackendError, Identity, Principal, Usage, ValidatedBy,
    USAGE_WRITE_INTERVAL_MS,
};
use crate::jwt::JwtKey;
use crate::jwt_validator::JwtValidator;
use crate::limits::{Key, Limiter};
use crate::store::{Store, TokenRecord};
use crate::upstream::HttpClient;
use crate::upstream::{full, Body};

mod oauth2;
mod slots;

use oauth2::OAuth2Introspector;
use slots::FairSlots;

impl Identity {
    /// The identity behind an issued token: its owner, and the scopes and groups it was
    /// given at creation (for route rules).
    pub fn of_record(record: TokenRecord) -> Identity {
        let to_time = |ms: i64| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        let names = |list: Vec<String>| list.into_iter().map(String::into_boxed_str).collect();
        let facts = crate::identity::Facts {
            groups: names(record.groups),
            scopes: names(record.scopes),
            claims: Vec::new(),
        }
        .boxed();
        Identity {
            usage: Some(Arc::new(Usage::new(record.hash, record.last_used_ms))),
            expires: record.expires_ms.map(to_time),
            principal: principal(&record.subject, &record.account, record.dn.as_deref()),
            token_id: Some(record.id.into()),
            validator: ValidatedBy::Store,
            facts,
        }
    }
}

/// The outcome of a validation that reached its backends.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Valid: the identity.
    Allowed(Arc<Identity>),
    /// No validator recognises the credential.
    Denied,
}

/// Why a validation has no verdict (never cached).
#[derive(Debug, Clone)]
pub enum Failure {
    /// A validator or the store could not be reached (fail closed).
    Backend(BackendError),
    /// Not asked: the client is over its failed-credential limit (`[limits] failed_auth`), and
    /// the credential needed a call to a remote validator.
    Throttled(Refusal),
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Failure {
        Failure::Backend(e)
    }
}

/// The validators, in order: the store (for tokens tokengate issued), then the configured ones.
pub struct Validators {
    store: Arc<Store>,
    jwt: Option<Arc<JwtKey>>,
    list: Vec<Validator>,
    /// The failed-credential buckets, per client: consulted before a call to a remote
    /// validator (introspection), never for what is checked locally.
    failed_auth: Option<Arc<Limiter>>,
}

enum Validator {
    /// Token hashes → identity. Looking up a SHA-256 (not the secret) keeps the comparison
    /// free of timing leaks about the token itself.
    Static(HashMap<[u8; 32], Arc<Identity>>),
    Introspect(Box<Introspector>),
    Jwt(Box<JwtValidator>),
    /// An RFC 7662 endpoint: a remote call like `Introspect`, limited and labelled the same.
    OAuth2(Box<OAuth2Introspector>),
}

impl Validator {
    fn kind(&self) -> &'static str {
        match self {
            Validator::Static(_) => "static",
            Validator::Introspect(_) | Validator::OAuth2(_) => "introspect",
            Validator::Jwt(_) => "jwt",
        }
    }

    /// Whether asking it is a call to a remote endpoint, which the failed-credential limit
    /// guards.
    fn is_remote(&self) -> bool {
        matches!(self, Validator::Introspect(_) | Validator::OAuth2(_))
    }

    /// Whether it may be unreachable for `token`: an introspection endpoint, or a JWKS when
    /// the token is a JWT.
    fn may_fail_on(&self, token: &str) -> bool {
        match self {
            Validator::Static(_) => false,
            Validator::Introspect(_) | Validator::OAuth2(_) => true,
            Validator::Jwt(j) => j.fetches() && crate::jwt_validator::looks_like_jwt(token),
        }
    }
}

struct Introspector {
    config: IntrospectConfig,
    remote: Remote,
    /// The claims the config uses, kept from the answer.
    claims: Vec<String>,
}

/// The most of an introspection response that is read.
const INTROSPECT_BODY_LIMIT: usize = 64 * 1024;

/// A remote validator's endpoint, and how calls to it are bounded.
struct Remote {
    url: Uri,
    client: HttpClient,
    /// Calls in flight at once (`max_concurrent`; each holds a connection): a flood of
    /// distinct credentials waits here, within the validator's timeout, instead of opening a
    /// socket each; the slots go round-robin by client.
    calls: FairSlots,
    max_concurrent: usize,
    timeout: Duration,
}

impl Remote {
    fn new(url: &Uri, client: &HttpClient, max_concurrent: usize, timeout: Duration) -> Remote {
        Remote {
            url: url.clone(),
            client: client.clone(),
            calls: FairSlots::new(max_concurrent),
            max_concurrent,
            timeout,
        }
    }

    /// Sends `request` for `client` and reads the answer (at most [`INTROSPECT_BODY_LIMIT`]).
    ///
    /// Waiting for a free call slot has its own bound; a call, once sent, keeps its slot
    /// until the validator answers or `timeout` has passed since it was sent. (Had one
    /// deadline covered both, a call that waited long would be cut off early and its slot
    /// handed on while the validator was still working on it: more than `max_concurrent`
    /// in flight there.) The validation runs in its own task (the cache's), so a caller
    /// that gives up does not cancel it. Slots go round-robin by client address.
    async fn call(
        &self,
        request: Request<Body>,
        client: Key,
    ) -> Result<(StatusCode, Bytes), BackendError> {
        let _slot = self
            .calls
            .acquire(client, self.timeout)
            .await
            .ok_or_else(|| {
                BackendError(format!(
                    "introspection endpoint {}: all {} call slots busy",
                    self.url, self.max_concurrent
                ))
            })?;
        let call = async {
            let response =
                self.client.request(request).await.map_err(|e| {
                    BackendError(format!("introspection endpoint {}: {e}", self.url))
                })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), INTROSPECT_BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| BackendError(format!("introspection body: {e}")))?
                .to_bytes();
            Ok::<_, BackendError>((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| BackendError(format!("introspection endpoint {} timed out", self.url)))?
    }
}

impl Validators {
    /// Builds the validators of the config.
    /// `jwt`: the key of JWT API keys, when configured (`[tokens] jwt_key`); `failed_auth`: the
    /// failed-credential limit.
    pub fn new(
        configs: &[ValidatorConfig],
        client: &HttpClient,
        store: Arc<Store>,
        jwt: Option<Arc<JwtKey>>,
        failed_auth: Option<Arc<Limiter>>,
        claims: &[String],
    ) -> Validators {
        let list = configs
            .iter()
            .map(|c| match c {
                ValidatorConfig::Static(tokens) => Validator::Static(static_map(tokens)),
                ValidatorConfig::Introspect(config) => {
                    Validator::Introspect(Box::new(Introspector {
                        config: config.clone(),
                        remote: Remote::new(
                            &config.url,
                            client,
                            config.max_concurrent,
                            config.timeout,
                        ),
                        claims: claims.to_vec(),
                    }))
                }
                ValidatorConfig::Jwt(config) => {
                    Validator::Jwt(Box::new(JwtValidator::new(config, client, claims)))
                }
                ValidatorConfig::OAuth2(config) => {
                    Validator::OAuth2(Box::new(OAuth2Introspector::new(config, client, claims)))
                }
            })
            .collect();
        Validators {
            store,
            jwt,
            list,
            failed_auth,
        }
    }

    /// Asks each validator in turn, for a credential `client` presented.
    pub async fn validate(
        &self,
        token: &str,
        key: &[u8; 32],
        client: Key,
    ) -> Result<Verdict, Failure> {
        // A `tg_` token is ours: only the store can vouch for it (its checksum was checked
        // before the cache).
        if crate::token::is_ours(token) {
            return Ok(self.issued(key, ValidatedBy::Store).await?);
        }
        // A JWT API key of ours: signature, algorithm, issuer and expiry first (a forged or
        // expired key never reaches the store), then the store says whether it was revoked.
        if let Some(jwt) = self.jwt.as_ref().filter(|k| k.recognises(token)) {
            return match jwt.verify(token) {
                Some(_) => Ok(self.issued(key, ValidatedBy::Jwt).await?),
                None => Ok(Verdict::Denied),
            };
        }
        let mut failure = None;
        // A token taken from the client's failed-credential bucket before the first remote
        // call: the call counts as failed until it succeeds (then it is given back), so a
        // burst of concurrent requests cannot all reach the validator before one fails.
        let mut taken = None;
        for validator in &self.list {
            if validator.is_remote() {
                if let (Some(limit), None) = (&self.failed_auth, taken) {
                    if let Err(refusal) = limit.take(client).await {
                        return Err(Failure::Throttled(refusal));
                    }
                    taken = Some(limit);
                }
            }
            let answer = match validator {
                Validator::Static(map) => Ok(map.get(key).cloned()),
                Validator::Introspect(i) => i.introspect(token, key, client).await,
                Validator::Jwt(j) => j.validate(token).await,
                Validator::OAuth2(o) => o.introspect(token, client).await,
            };
            match answer {
                Ok(Some(identity)) => {
                    if let Some(limit) = taken {
                        limit.refund(client).await;
                    }
                    return Ok(Verdict::Allowed(identity));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e.0, "validator unavailable");
                    failure = Some(e);
                }
            }
        }
        match failure {
            Some(e) => Err(Failure::Backend(e)),
            None => Ok(Verdict::Denied),
        }
    }
}

impl Validators {
    /// The failed-credential limit's refusal for `client`, when validating `token` would need a
    /// remote call (an `introspect` or `oauth2_introspection` validator would be asked before
    /// any local one recognised it) and the client's bucket is empty: checked before a validation is started, so that a
    /// throttled client costs no validation task. (The token is taken in the validation.)
    pub fn throttled(&self, token: &str, key: &[u8; 32], client: Key) -> Option<Refusal> {
        let limit = self.failed_auth.as_ref()?;
        if crate::token::is_ours(token) || self.jwt.as_ref().is_some_and(|k| k.recognises(token)) {
            return None;
        }
        for validator in &self.list {
            match validator {
                Validator::Static(map) if map.contains_key(key) => return None,
                Validator::Jwt(_) if crate::jwt_validator::looks_like_jwt(token) => return None,
                v if v.is_remote() => return limit.empty(client),
                _ => {}
            }
        }
        None
    }

    /// Which validator turned `token` down (or failed on it), for the `source` label of
    /// `tokengate_auth_total`: the store for `tg_` tokens, `jwt` for JWT API keys of ours and
    /// for JWTs when a jwt validator is configured, the first validator that could have been
    /// unreachable for a failure, else the last validator consulted (all were, in order).
    /// Only called off the cache-hit path.
    pub fn decided_by(&self, token: &str, failed: bool) -> &'static str {
        if crate::token::is_ours(token) {
            return "store";
        }
        if self.jwt.as_ref().is_some_and(|k| k.recognises(token)) {
            return "jwt";
        }
        if failed {
            return self
                .list
                .iter()
                .find(|v| v.may_fail_on(token))
                .map_or("none", Validator::kind);
        }
        // A JWT turned down: the jwt validator is the one that looked at it closely.
        if crate::jwt_validator::looks_like_jwt(token)
            && self.list.iter().any(|v| matches!(v, Validator::Jwt(_)))
        {
            return "jwt";
        }
        self.list.last().map_or("none", Validator::kind)
    }

    /// A token tokengate issued: only the store can vouch for it.
    async fn issued(
        &self,
        key: &[u8; 32],
        validator: ValidatedBy,
    ) -> Result<Verdict, BackendError> {
        match self.store.find(key).await {
            Ok(Some(record)) => {
                let mut identity = Identity::of_record(record);
                identity.validator = validator;
                Ok(Verdict::Allowed(Arc::new(identity)))
            }
            Ok(None) => Ok(Verdict::Denied),
            Err(e) => {
                tracing::warn!(error = %e, "token store unavailable");
                Err(BackendError(e.0))
            }
        }
    }
}

fn static_map(tokens: &[StaticToken]) -> HashMap<[u8; 32], Arc<Identity>> {
    tokens
        .iter()
        .map(|t| {
            let mut identity =
                Identity::of(principal(&t.subject, &t.account, None), ValidatedBy::Static);
            identity.facts = crate::identity::Facts {
                groups: t.groups.iter().map(|g| g.as_str().into()).collect(),
                scopes: t.scopes.iter().map(|s| s.as_str().into()).collect(),
                claims: Vec::new(),
            }
            .boxed();
            (t.sha256, Arc::new(identity))
        })
        .collect()
}

impl Introspector {
    /// `Ok(None)`: the endpoint does not recognise the credential (401/403/404).
    async fn introspect(
        &self,
        token: &str,
        key: &[u8; 32],
        client: Key,
    ) -> Result<Option<Arc<Identity>>, BackendError> {
        let c = &self.config;
        let values = crate::rewrite::Values {
            token: Some(token),
            ..Default::default()
        };
        let value = c
            .value
            .render(&values)
            .ok_or_else(|| BackendError("credential cannot be carried in a header".into()))?;
        let request = Request::builder()
            .method(Method::GET)
            .uri(c.url.clone())
            .header(c.header.clone(), value)
            .header(http::header::ACCEPT, "application/json")
            .body(full(Bytes::new()))
            .map_err(|e| BackendError(format!("introspection request: {e}")))?;
        let (status, body) = self.remote.call(request, client).await?;
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        ) {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(BackendError(format!(
                "introspection endpoint {} answered {status}",
                c.url
            )));
        }
        let json = || {
            serde_json::from_slice::<serde_json::Value>(&body)
                .map_err(|e| BackendError(format!("introspection response is not JSON: {e}")))
        };
        let parsed = if c.subject.is_some()
            || c.account.is_some()
            || c.groups.is_some()
            || c.scopes.is_some()
            || !self.claims.is_empty()
        {
            Some(json()?)
        } else {
            None
        };
        let pick = |pointer: &Option<String>| -> Result<Option<String>, BackendError> {
            let (Some(pointer), Some(doc)) = (pointer, &parsed) else {
                return Ok(None);
            };
            match doc.pointer(pointer) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(v @ serde_json::Value::Number(_)) => Ok(Some(v.to_string())),
                _ => Err(BackendError(format!(
                    "introspection response has no value at {pointer}"
                ))),
            }
        };
        let subject = match pick(&c.subject)? {
            Some(s) => s,
            None => hex::encode(&key[..8]),
        };
        let account = pick(&c.account)?;
        let account = account.as_deref().unwrap_or(&subject);
        let mut identity =
            Identity::of(principal(&subject, account, None), ValidatedBy::Introspect);
        if let Some(doc) = &parsed {
            // Groups and scopes at their pointers (a list, or one string: scopes split on
            // spaces), and the claims the config uses (dotted paths).
            let at = |pointer: &Option<String>| {
                pointer
                    .as_deref()
                    .and_then(|p| doc.pointer(p))
                    .and_then(crate::identity::values_of)
                    .unwrap_or_default()
            };
            let scopes = at(&c.scopes)
                .iter()
                .flat_map(|s| s.split(' '))
                .filter(|s| !s.is_empty())
                .map(Box::from)
                .collect();
            let claims = self
                .claims
                .iter()
                .filter_map(|n| Some((n.as_str().into(), crate::identity::json_values(doc, n)?)))
                .collect();
            identity.facts = crate::identity::Facts {
                groups: at(&c.groups),
                scopes,
                claims,
            }
            .boxed();
        }
        Ok(Some(Arc::new(identity)))
    }
}

/// How long a verdict may be cached: the cache's TTL, never past the credential's own expiry.
pub fn lifetime(verdict: &Verdict, ttl: Duration, negative_ttl: Duration) -> Duration {
    match verdict {
        Verdict::Denied => negative_ttl,
        Verdict::Allowed(identity) => match identity.expires {
            None => ttl,
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(ttl),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hex::encode(hash("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn lifetime_never_outlives_credential() {
        let mut id = Identity::of(principal("a", "a", None), ValidatedBy::Static);
        let hour = Duration::from_secs(3600);
        let ten = Duration::from_secs(10);
        assert_eq!(
            lifetime(&Verdict::Allowed(Arc::new(id.clone())), hour, ten),
            hour
        );
        assert_eq!(lifetime(&Verdict::Denied, hour, ten), ten);
        id.expires = Some(SystemTime::now() + Duration::from_secs(60));
        let l = lifetime(&Verdict::Allowed(Arc::new(id.clone())), hour, ten);
        assert!(
            l <= Duration::from_secs(60) && l > Duration::from_secs(58),
            "{l:?}"
        );
        id.expires = Some(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            lifetime(&Verdict::Allowed(Arc::new(id)), hour, ten),
            Duration::ZERO
        );
    }
}
