//! The `oauth2_introspection` validator: an OAuth 2.0 authorization server's token
//! introspection endpoint (RFC 7662).
//!
//! The credential is sent as `POST url` with the form `token=…&token_type_hint=access_token`,
//! tokengate's client credentials in HTTP Basic (RFC 6749 §2.3.1: each form-encoded first).
//! A `200` with a JSON object is an answer: `active: true` with a subject (`subject_claim`,
//! else `username`), an `exp` still ahead, an `nbf` passed, and the configured `iss` / `aud`
//! is valid; every other answer is "not recognised" (401, remembered for `negative_ttl`). Any
//! other status (the server refusing tokengate's own credentials included), a body that is not
//! a JSON object, a refused connection or a timeout is "unavailable" (503, fail closed, not
//! cached). Calls are bounded like an `introspect` validator's (`max_concurrent` slots,
//! round-robin by client; `timeout`) and guarded by the failed-credential limit.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{header, HeaderValue, Method, Request, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use super::Remote;
use crate::config::OAuth2Config;
use crate::identity::{facts_of, principal, BackendError, Identity, ValidatedBy};
use crate::limits::Key;
use crate::upstream::{full, HttpClient};

/// `application/x-www-form-urlencoded`: everything but ASCII letters, digits and `*-._` is
/// percent-encoded (a space as `%20`, which every form decoder reads).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

fn form(value: &str) -> String {
    utf8_percent_encode(value, FORM).to_string()
}

/// The `oauth2_introspection` validator.
pub(super) struct OAuth2Introspector {
    remote: Remote,
    /// `Basic base64(id:secret)`, marked sensitive; none without client credentials.
    authorization: Option<HeaderValue>,
    audience: Vec<String>,
    issuer: Option<String>,
    subject_claim: String,
    groups_claim: Option<String>,
    /// The claims the config uses, kept from the answer.
    claims: Vec<String>,
}

impl OAuth2Introspector {
    /// The validator of a `[[validator]] type = "oauth2_introspection"` table; `claims`: the
    /// claims the config uses.
    pub(super) fn new(
        config: &OAuth2Config,
        client: &HttpClient,
        claims: &[String],
    ) -> OAuth2Introspector {
        let url = &config.url;
        crate::jwt_validator::warn_if_plain_http(
            url,
            "oauth2_introspection validator: url",
            "credentials and the client secret can be read in transit",
        );
        OAuth2Introspector {
            remote: Remote::new(url, client, config.max_concurrent, config.timeout),
            authorization: config
                .client
                .as_ref()
                .map(|(id, secret)| basic(id, secret.expose())),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            subject_claim: config.subject_claim.clone(),
            groups_claim: config.groups_claim.clone(),
            claims: claims.to_vec(),
        }
    }

    /// Asks the endpoint about `token`, for a credential `client` presented. `Ok(None)`: not
    /// recognised (inactive, or its answer fails a check).
    pub(super) async fn introspect(
        &self,
        token: &str,
        client: Key,
    ) -> Result<Option<Arc<Identity>>, BackendError> {
        let url = &self.remote.url;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let form = format!("token={}&token_type_hint=access_token", form(token));
        let request = request
            .body(full(form))
            .map_err(|e| BackendError(format!("introspection request: {e}")))?;
        let (status, body) = self.remote.call(request, client).await?;
        if status != StatusCode::OK {
            return Err(BackendError(format!(
                "introspection endpoint {url} answered {status}"
            )));
        }
        let answer = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                BackendError(format!(
                    "introspection endpoint {url}: the answer is not a JSON object"
                ))
            })?;
        Ok(self.identity(&answer, SystemTime::now()).map(Arc::new))
    }

    /// The identity an answer vouches for at `now`; `None` when it vouches for none (the
    /// reason logged at debug level, never the credential).
    fn identity(&self, answer: &Value, now: SystemTime) -> Option<Identity> {
        let refused = |reason: &str| {
            tracing::debug!(reason, "oauth2_introspection: credential not recognised");
            None
        };
        if answer.get("active") != Some(&Value::Bool(true)) {
            return refused("not active");
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        // `exp` and `nbf` are NumericDates; one that is there but unreadable is not ignored.
        let time = |name: &str| answer.get(name).map(Value::as_f64);
        let expires = match time("exp") {
            None => None,
            // Beyond what the clock can hold: no cap but the cache's TTL.
            Some(Some(exp)) if exp > now => Duration::try_from_secs_f64(exp)
                .ok()
                .and_then(|d| UNIX_EPOCH.checked_add(d)),
            Some(Some(_)) => return refused("exp has passed"),
            Some(None) => return refused("exp is not a number"),
        };
        match time("nbf") {
            Some(Some(nbf)) if nbf > now => return refused("nbf is in the future"),
            Some(None) => return refused("nbf is not a number"),
            _ => {}
        }
        if let Some(issuer) = &self.issuer {
            if answer.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return refused("iss is not the configured issuer");
            }
        }
        if !self.audience.is_empty() {
            let named = |a: &str| self.audience.iter().any(|want| want == a);
            let fits = match answer.get("aud") {
                Some(Value::String(aud)) => named(aud),
                Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(named),
                _ => false,
            };
            if !fits {
                return refused("aud holds none of the configured audiences");
            }
        }
        let subject =
            [self.subject_claim.as_str(), "username"]
                .iter()
                .find_map(|name| match answer.get(*name) {
                    Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                    Some(n @ Value::Number(_)) => Some(n.to_string()),
                    _ => None,
                });
        let Some(subject) = subject else {
            return refused("no subject");
        };
        let mut identity =
            Identity::of(principal(&subject, &subject, None), ValidatedBy::Introspect);
        identity.expires = expires;
        identity.facts = facts_of(
            answer,
            self.groups_claim.as_deref(),
            &["scope"],
            &self.claims,
        );
        Some(identity)
    }
}

/// The `Authorization` value of client credentials: `Basic base64(form(id):form(secret))`.
fn basic(id: &str, secret: &str) -> HeaderValue {
    let pair = format!("{}:{}", form(id), form(secret));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value =
        HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validator(audience: &[&str], issuer: Option<&str>) -> OAuth2Introspector {
        let config = OAuth2Config {
            url: "http://127.0.0.1:9/introspect".parse().unwrap(),
            client: None,
            audience: audience.iter().map(|a| a.to_string()).collect(),
            issuer: issuer.map(str::to_string),
            subject_claim: "sub".into(),
            groups_claim: Some("realm_access.roles".into()),
            timeout: Duration::from_secs(1),
            max_concurrent: 1,
        };
        let client = crate::upstream::client(None).unwrap();
        OAuth2Introspector::new(&config, &client, &["client_id".to_string()])
    }

    const NOW: u64 = 1_700_000_000;

    fn at(answer: Value, v: &OAuth2Introspector) -> Option<Identity> {
        v.identity(&answer, UNIX_EPOCH + Duration::from_secs(NOW))
    }

    #[test]
    fn client_credentials_are_form_encoded_then_basic() {
        // RFC 6749 §2.3.1: each part form-encoded first, so a `:` in the id cannot split it.
        let value = basic("my client:1", "s€cret/+=");
        let text = value.to_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "my%20client%3A1:s%E2%82%ACcret%2F%2B%3D"
        );
        assert!(value.is_sensitive());
        assert_eq!(form("a.b-c_d*e~f&g=h"), "a.b-c_d*e%7Ef%26g%3Dh");
    }

    #[test]
    fn an_active_answer_gives_the_identity_and_its_facts() {
        let v = validator(&[], None);
        let identity = at(
            json!({
                "active": true,
                "sub": "alice",
                "exp": NOW + 60,
                "scope": "read  write",
                "client_id": "app",
                "realm_access": {"roles": ["ops", "dev"]},
            }),
            &v,
        )
        .expect("valid");
        assert_eq!(identity.principal.subject, "alice");
        assert_eq!(identity.principal.account, "alice");
        assert_eq!(
            identity.expires,
            Some(UNIX_EPOCH + Duration::from_secs(NOW + 60))
        );
        assert_eq!(
            identity.scopes(),
            ["read".into(), "write".into()] as [Box<str>; 2]
        );
        assert_eq!(
            identity.groups(),
            ["ops".into(), "dev".into()] as [Box<str>; 2]
        );
        assert_eq!(
            identity.claim("client_id"),
            Some(&["app".into()] as &[Box<str>])
        );
        assert_eq!(identity.validator, ValidatedBy::Introspect);
        // Without `sub`, `username` names the subject; without `exp`, the cache's TTL rules.
        let identity = at(json!({"active": true, "username": "bob"}), &v).expect("valid");
        assert_eq!(identity.principal.subject, "bob");
        assert_eq!(identity.expires, None);
    }

    #[test]
    fn answers_that_vouch_for_nobody() {
        let v = validator(&["api", "other"], Some("https://idp.example"));
        let good = json!({"active": true, "sub": "a", "iss": "https://idp.example", "aud": "api"});
        assert!(at(good.clone(), &v).is_some());
        let listed = json!({"active": true, "sub": "a", "iss": "https://idp.example",
                            "aud": ["x", "other"]});
        assert!(at(listed, &v).is_some());
        let with = |key: &str, value: Value| {
            let mut a = good.clone();
            a[key] = value;
            a
        };
        let without = |key: &str| {
            let mut a = good.clone();
            a.as_object_mut().unwrap().remove(key);
            a
        };
        for (case, answer) in [
            ("inactive", with("active", json!(false))),
            ("active as a string", with("active", json!("true"))),
            ("no active", without("active")),
            ("expired", with("exp", json!(NOW - 1))),
            ("expires now", with("exp", json!(NOW))),
            ("exp unreadable", with("exp", json!("soon"))),
            ("not yet valid", with("nbf", json!(NOW + 30))),
            ("nbf unreadable", with("nbf", json!(null))),
            ("wrong issuer", with("iss", json!("https://evil.example"))),
            ("no issuer", without("iss")),
            ("wrong audience", with("aud", json!("elsewhere"))),
            ("no audience", without("aud")),
            ("no subject", without("sub")),
            ("empty subject", with("sub", json!(""))),
        ] {
            assert!(at(answer, &v).is_none(), "{case}");
        }
        assert!(at(with("nbf", json!(NOW - 30)), &v).is_some());
    }
}
