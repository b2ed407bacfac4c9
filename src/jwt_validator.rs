//! The `jwt` validator (SPEC §3): JWTs signed by an outside identity provider (Keycloak,
//! Dex, Auth0, a cloud IdP), checked locally against its public keys.
//!
//! Keys come from one of: a JWKS URL (fetched when first needed, again when a token names an
//! unknown `kid` — at most once per [`JWKS_MIN_INTERVAL`] — and when the set is older than
//! [`JWKS_MAX_AGE`]), the JWKS an issuer's OIDC discovery document names (`jwks_uri`, fetched
//! and refreshed the same way; the document is read again with a refresh once it is that old,
//! and whenever the set cannot be fetched from where it said), a PEM public key file, or an
//! HMAC secret. Algorithms: RS256/384/512,
//! PS256/384/512 (RSA ≥ 2048 bits), ES256, ES384, EdDSA (Ed25519), and HS256/384/512 with a
//! secret; each key accepts only the algorithms of its own type (or the one its JWK names), so
//! an `alg` swap (RS256 → HS256 with the public key as secret, or `none`) is refused.
//!
//! A token must be signed by one of the keys, carry `exp` (in the future; 60 s leeway for
//! clock skew, also for `nbf`), the configured `iss` and `aud` when they are set, and a
//! non-empty subject claim (`subject_claim`, default `sub`). The verdict is cached like any
//! other, never past the token's `exp`.
//!
//! A header with `crit` (RFC 7515 §4.1.11) is refused: no critical extension is implemented.
//!
//! A string that is not a JWT, or a JWT none of the keys verifies, is "not recognised": the
//! next validator is asked. When the JWKS cannot be fetched and no key for the token is known,
//! the validator is unavailable (fail closed: 503 unless a later validator vouches).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{JwtKeySource, JwtValidatorConfig};
use crate::identity::{BackendError, Identity};
use crate::upstream::full;
use crate::upstream::HttpClient;

/// A token naming an unknown `kid` refetches the JWKS at most this often.
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// A JWKS older than this is fetched again when next used (as Envoy's default cache duration).
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;
/// The largest JWKS document read.
const JWKS_BODY_LIMIT: usize = 1024 * 1024;

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// One verification key and the algorithms it may be used with.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material (a secret, for HMAC).
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// Whether this key may check a token with header `kid` and `alg`.
    fn fits(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        let kid_fits = match (kid, &self.kid) {
            (Some(wanted), Some(ours)) => wanted == ours,
            _ => true,
        };
        kid_fits && self.algorithms.contains(&alg)
    }
}

/// The key of a PEM public key file: RSA (PKCS#1 or SPKI), P-256, P-384 or Ed25519.
pub(crate) fn public_key(pem: &str) -> Result<VerifyKey, String> {
    crate::jwt::install_provider();
    let bytes = pem.trim().as_bytes();
    let (key, algorithms) = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        (key, RSA.to_vec())
    } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        // An uncompressed point: 65 bytes on P-256, 97 on P-384.
        let algorithm = match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => Algorithm::ES256,
            Ok(97) => Algorithm::ES384,
            _ => return Err("public_key: only P-256 and P-384 EC keys are supported".into()),
        };
        (key, vec![algorithm])
    } else if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        (key, vec![Algorithm::EdDSA])
    } else {
        return Err(
            "public_key must be a PEM public key (RSA, P-256, P-384 or Ed25519), \
             e.g. `openssl pkey -pubout`"
                .into(),
        );
    };
    Ok(VerifyKey {
        kid: None,
        key,
        algorithms,
    })
}

/// The verification key of one JWK, or why it is skipped.
fn jwk_key(jwk: &Jwk) -> Result<VerifyKey, String> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (use is not \"sig\")".into());
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA.to_vec(),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // A shared secret has no place in a published key set.
        AlgorithmParameters::OctetKey(_) => return Err("symmetric key".into()),
        _ => return Err("unsupported key type".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_type,
        Some(named) => {
            let named: Algorithm = format!("{named:?}")
                .parse()
                .map_err(|_| format!("unsupported algorithm {named:?}"))?;
            if !by_type.contains(&named) {
                return Err(format!("algorithm {named:?} does not fit the key type"));
            }
            vec![named]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms,
    })
}

/// The usable signing keys of a JWKS document; keys of other kinds are skipped with a log line.
fn parse_jwks(body: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let mut keys = Vec::new();
    for entry in entries {
        let kid = entry.get("kid").and_then(Value::as_str).unwrap_or("-");
        match serde_json::from_value::<Jwk>(entry.clone())
            .map_err(|e| format!("malformed key: {e}"))
            .and_then(|jwk| jwk_key(&jwk))
        {
            Ok(key) => keys.push(key),
            Err(reason) => tracing::debug!(kid, reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err("JWKS holds no usable signing key".into());
    }
    Ok(keys)
}

/// The `jwt` validator.
pub struct JwtValidator {
    issuer: Option<String>,
    audience: Vec<String>,
    subject_claim: String,
    groups_claim: Option<String>,
    /// The claims the config uses (route rules, `{claim:NAME}`), kept in the identity.
    claims: Vec<String>,
    keys: Keys,
}

enum Keys {
    Fixed(Vec<VerifyKey>),
    Jwks(Box<Jwks>),
}

/// A JWKS and what was last fetched from it.
struct Jwks {
    source: KeySetSource,
    client: HttpClient,
    timeout: Duration,
    state: ArcSwap<JwksState>,
    /// Held while fetching: concurrent misses wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
}

/// Where a JWKS is found.
enum KeySetSource {
    /// A configured `jwks_url`.
    Url(Uri),
    /// OIDC discovery: the `jwks_uri` of this document, which must name `issuer`.
    Discovery { document: Uri, issuer: String },
}

impl KeySetSource {
    /// The configured place, for logs and errors.
    fn location(&self) -> &Uri {
        match self {
            KeySetSource::Url(url) => url,
            KeySetSource::Discovery { document, .. } => document,
        }
    }
}

/// Where a discovery document said the JWKS is, and when it was read.
#[derive(Clone)]
struct Discovered {
    jwks_uri: Uri,
    at: Instant,
}

#[derive(Default)]
struct JwksState {
    keys: Vec<VerifyKey>,
    /// With discovery: where the keys were last fetched from (forgotten when an attempt fails,
    /// so the next one reads the document again).
    discovered: Option<Discovered>,
    /// The last successful fetch.
    fetched: Option<Instant>,
    /// The last attempt, successful or not.
    attempted: Option<Instant>,
    /// Why the last attempt failed, if it did.
    error: Option<String>,
}

impl JwksState {
    fn knows(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        self.keys.iter().any(|k| k.fits(kid, alg))
    }
}

impl JwtValidator {
    /// The validator of a `[[validator]] type = "jwt"` table; `client` fetches the JWKS;
    /// `claims`: the claims the config uses.
    pub fn new(
        config: &JwtValidatorConfig,
        client: &HttpClient,
        claims: &[String],
    ) -> JwtValidator {
        crate::jwt::install_provider();
        let jwks = |source: KeySetSource| {
            Keys::Jwks(Box::new(Jwks {
                source,
                client: client.clone(),
                timeout: config.timeout,
                state: ArcSwap::from_pointee(JwksState::default()),
                fetching: tokio::sync::Mutex::new(()),
            }))
        };
        // Whoever can change the key set on the way can sign any token.
        let forged = "keys fetched this way can be forged in transit";
        let keys = match &config.keys {
            JwtKeySource::Jwks(url) => {
                warn_if_plain_http(url, "jwt validator: jwks_url", forged);
                jwks(KeySetSource::Url(url.clone()))
            }
            JwtKeySource::Discovery(document) => {
                warn_if_plain_http(document, "jwt validator: issuer", forged);
                jwks(KeySetSource::Discovery {
                    document: document.clone(),
                    // Set whenever discovery is: the checker made it the source.
                    issuer: config.issuer.clone().unwrap_or_default(),
                })
            }
            // Checked when the config was loaded.
            JwtKeySource::PublicKey { pem, .. } => {
                Keys::Fixed(public_key(pem).into_iter().collect())
            }
            JwtKeySource::Secret(secret) => Keys::Fixed(vec![VerifyKey {
                kid: None,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
                algorithms: HMAC.to_vec(),
            }]),
        };
        JwtValidator {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            subject_claim: config.subject_claim.clone(),
            groups_claim: config.groups_claim.clone(),
            claims: claims.to_vec(),
            keys,
        }
    }

    /// Whether the validator may be unreachable (it fetches a JWKS).
    pub fn fetches(&self) -> bool {
        matches!(self.keys, Keys::Jwks(_))
    }

    /// `Ok(None)`: not a JWT, or none of the keys vouches for it.
    pub async fn validate(&self, token: &str) -> Result<Option<Arc<Identity>>, BackendError> {
        if !looks_like_jwt(token) {
            return Ok(None);
        }
        // RFC 7515 §4.1.11: no `crit` extension is implemented, so a token naming one is
        // refused, before any key is fetched for it.
        if crate::jwt::names_critical_extensions(token) {
            tracing::debug!("jwt validator: token refused (crit header or unreadable header)");
            return Ok(None);
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        let kid = header.kid.as_deref();
        let fetched;
        let keys: &[VerifyKey] = match &self.keys {
            Keys::Fixed(keys) => keys,
            Keys::Jwks(jwks) => {
                fetched = jwks.keys_for(kid, header.alg).await?;
                &fetched.keys
            }
        };
        for key in keys.iter().filter(|k| k.fits(kid, header.alg)) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &self.validation(key))
            {
                Ok(data) => return Ok(self.identity(&data.claims)),
                Err(e) => tracing::debug!(reason = %e, "jwt validator: token refused"),
            }
        }
        Ok(None)
    }

    fn validation(&self, key: &VerifyKey) -> Validation {
        let mut v = Validation::new(key.algorithms[0]);
        v.algorithms = key.algorithms.clone();
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.required_spec_claims = ["exp".to_string()].into();
        if let Some(issuer) = &self.issuer {
            v.set_issuer(&[issuer]);
            v.required_spec_claims.insert("iss".into());
        }
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            // `aud` (a string or a list) must hold one of them.
            v.set_audience(&self.audience);
            v.required_spec_claims.insert("aud".into());
        }
        v
    }

    /// The identity of verified claims; `None` without a usable subject claim.
    fn identity(&self, claims: &Map<String, Value>) -> Option<Arc<Identity>> {
        let subject = match claims.get(&self.subject_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(n @ Value::Number(_)) => n.to_string(),
            _ => {
                tracing::debug!(
                    claim = %self.subject_claim,
                    "jwt validator: verified token has no usable subject claim"
                );
                return None;
            }
        };
        let expires = claims
            .get("exp")
            .and_then(Value::as_f64)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .map(|since| UNIX_EPOCH + since);
        let mut identity = Identity::of(
            crate::identity::principal(&subject, &subject, None),
            crate::identity::ValidatedBy::Jwt,
        );
        // `exp` is required and was checked; without a readable one, nothing is cached.
        identity.expires = expires.or(Some(SystemTime::now()));
        // Groups, scopes (`scope`: space-separated; `scp`: a list) and the claims rules use.
        let doc = Value::Object(claims.clone());
        identity.facts = crate::identity::facts_of(
            &doc,
            self.groups_claim.as_deref(),
            &["scope", "scp"],
            &self.claims,
        );
        Some(Arc::new(identity))
    }
}

/// Warns when `url` is plain http to another host, where anyone on the path can read and
/// change what travels; `risk` says what that means for `what`.
pub(crate) fn warn_if_plain_http(url: &Uri, what: &str, risk: &str) {
    if url.scheme_str() == Some("http") && !is_loopback(url) {
        tracing::warn!(url = %url, "{what} is plain http to another host; {risk} (use https)");
    }
}

/// Whether `url` names this host (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback(url: &Uri) -> bool {
    let host = url.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A compact JWS: three base64url parts, the header a JSON object (`eyJ` = `{"`).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

impl Jwks {
    /// The key set to check a token with header `kid`/`alg` against, fetched or refreshed if
    /// need be. Errors when the set cannot be fetched and no fitting key is known.
    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<JwksState>, BackendError> {
        let seen = self.state.load_full();
        let known = seen.knows(kid, alg);
        let fresh = seen.fetched.is_some_and(|t| t.elapsed() < JWKS_MAX_AGE);
        let may_fetch = seen
            .attempted
            .is_none_or(|t| t.elapsed() >= JWKS_MIN_INTERVAL);
        if (!known || !fresh) && may_fetch {
            let _one = self.fetching.lock().await;
            // Someone else may have fetched while this waited.
            if Arc::ptr_eq(&seen, &self.state.load()) {
                let now = Instant::now();
                let next = match self.fetch(&seen).await {
                    Ok((keys, discovered)) => JwksState {
                        keys,
                        discovered,
                        fetched: Some(now),
                        attempted: Some(now),
                        error: None,
                    },
                    Err(e) => {
                        let url = self.source.location();
                        tracing::warn!(url = %url, error = %e, "JWKS fetch failed");
                        JwksState {
                            keys: seen.keys.clone(),
                            discovered: None,
                            fetched: seen.fetched,
                            attempted: Some(now),
                            error: Some(e),
                        }
                    }
                };
                self.state.store(Arc::new(next));
            }
        }
        let state = self.state.load_full();
        let url = self.source.location();
        match &state.error {
            Some(e) if !state.knows(kid, alg) => {
                Err(BackendError(format!("JWKS {url} unavailable: {e}")))
            }
            _ if state.fetched.is_none() => {
                Err(BackendError(format!("JWKS {url} not fetched yet")))
            }
            _ => Ok(state),
        }
    }

    /// The key set, and with discovery where it was found. The discovery document is read
    /// again when it is as old as a key set may be ([`JWKS_MAX_AGE`]: each such refresh reads
    /// both), when the previous attempt failed, and when the set cannot be fetched from where
    /// it last said (the provider may have moved it): at most two reads of each per attempt.
    async fn fetch(
        &self,
        seen: &JwksState,
    ) -> Result<(Vec<VerifyKey>, Option<Discovered>), String> {
        let (document, issuer) = match &self.source {
            KeySetSource::Url(url) => return Ok((self.fetch_keys(url).await?, None)),
            KeySetSource::Discovery { document, issuer } => (document, issuer),
        };
        let known = seen
            .discovered
            .as_ref()
            .filter(|d| d.at.elapsed() < JWKS_MAX_AGE);
        if let Some(known) = known {
            match self.fetch_keys(&known.jwks_uri).await {
                Ok(keys) => return Ok((keys, Some(known.clone()))),
                Err(e) => tracing::warn!(
                    url = %known.jwks_uri,
                    error = %e,
                    "JWKS fetch failed; reading the OIDC discovery document again"
                ),
            }
        }
        let body = self
            .get(document)
            .await
            .map_err(|e| format!("OIDC discovery document: {e}"))?;
        let jwks_uri = discovered_jwks_uri(&body, issuer)
            .map_err(|e| format!("OIDC discovery document: {e}"))?;
        warn_if_plain_http(
            &jwks_uri,
            "jwt validator: the discovered jwks_uri",
            "keys fetched this way can be forged in transit",
        );
        let discovered = Discovered {
            jwks_uri,
            at: Instant::now(),
        };
        let keys = self
            .fetch_keys(&discovered.jwks_uri)
            .await
            .map_err(|e| format!("jwks_uri {}: {e}", discovered.jwks_uri))?;
        Ok((keys, Some(discovered)))
    }

    /// The usable keys of the JWKS at `url`.
    async fn fetch_keys(&self, url: &Uri) -> Result<Vec<VerifyKey>, String> {
        let keys = parse_jwks(&self.get(url).await?)?;
        tracing::info!(url = %url, keys = keys.len(), "JWKS fetched");
        Ok(keys)
    }

    /// The body of a 2xx answer to `GET url` (at most [`JWKS_BODY_LIMIT`], within `timeout`).
    async fn get(&self, url: &Uri) -> Result<Bytes, String> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(full(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("answered {status}"));
            }
            Limited::new(response.into_body(), JWKS_BODY_LIMIT)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("body: {e}"))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

/// The `jwks_uri` of an OIDC discovery document, which must name `issuer` as its `issuer`
/// (OpenID Connect Discovery §4.3: else anyone serving the document could vouch for another
/// issuer's tokens).
fn discovered_jwks_uri(body: &[u8], issuer: &str) -> Result<Uri, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match doc.get("issuer").and_then(Value::as_str) {
        Some(named) if named == issuer => {}
        Some(named) => return Err(format!("it names issuer {named:?}, not {issuer:?}")),
        None => return Err("it has no \"issuer\"".into()),
    }
    let uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("it has no \"jwks_uri\"")?;
    uri.parse()
        .ok()
        .filter(|u: &Uri| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
        })
        .ok_or_else(|| format!("jwks_uri {uri:?} is not an absolute http(s) URL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keys_of_other_kinds_are_skipped() {
        let body = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"sym"},
            {"kty":"EC","crv":"P-256","use":"enc","kid":"enc",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"EC","crv":"P-256","kid":"good",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"RSA","alg":"RSA-OAEP","kid":"oaep","n":"AQAB","e":"AQAB"},
            {"kty":"weird"}
        ]}"#;
        let keys = parse_jwks(body).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));
        assert_eq!(keys[0].algorithms, vec![Algorithm::ES256]);
        assert!(parse_jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#)
            .unwrap_err()
            .contains("no usable"));
        assert!(parse_jwks(b"[]").unwrap_err().contains("keys"));
        assert!(parse_jwks(b"<html>").unwrap_err().contains("JSON"));
    }

    #[test]
    fn a_key_named_for_another_family_is_skipped() {
        let jwk: Jwk = serde_json::from_str(
            r#"{"kty":"EC","crv":"P-256","alg":"RS256",
                "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#,
        )
        .unwrap();
        assert!(jwk_key(&jwk).unwrap_err().contains("does not fit"));
    }

    #[test]
    fn kid_matching() {
        let key = VerifyKey {
            kid: Some("a".into()),
            key: DecodingKey::from_secret(b"x"),
            algorithms: vec![Algorithm::RS256],
        };
        assert!(key.fits(Some("a"), Algorithm::RS256));
        assert!(key.fits(None, Algorithm::RS256));
        assert!(!key.fits(Some("b"), Algorithm::RS256));
        assert!(!key.fits(Some("a"), Algorithm::HS256));
    }

    #[test]
    fn loopback_hosts() {
        let l = |u: &str| is_loopback(&u.parse().unwrap());
        assert!(l("http://127.0.0.1:8081/jwks"));
        assert!(l("http://127.3.4.5/jwks"));
        assert!(l("http://localhost/jwks"));
        assert!(l("http://[::1]:80/jwks"));
        assert!(!l("http://idp.example/jwks"));
        assert!(!l("http://10.0.0.1/jwks"));
    }

    fn hmac_validator(secret: &[u8]) -> JwtValidator {
        crate::jwt::install_provider();
        JwtValidator {
            issuer: Some("https://idp.example".into()),
            audience: Vec::new(),
            subject_claim: "sub".into(),
            groups_claim: None,
            claims: Vec::new(),
            keys: Keys::Fixed(vec![VerifyKey {
                kid: None,
                key: DecodingKey::from_secret(secret),
                algorithms: HMAC.to_vec(),
            }]),
        }
    }

    fn signed(header: &jsonwebtoken::Header, secret: &[u8]) -> String {
        let claims = serde_json::json!({
            "iss": "https://idp.example",
            "sub": "alice",
            "exp": 4_000_000_000u64,
        });
        jsonwebtoken::encode(
            header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_critical_header_extension_is_refused() {
        let secret = b"an-hmac-secret-of-at-least-32-bytes!!";
        let validator = hmac_validator(secret);
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        let plain = signed(&header, secret);
        let identity = validator.validate(&plain).await.unwrap();
        assert_eq!(
            identity.expect("no crit: accepted").principal.subject,
            "alice"
        );
        for crit in [
            vec!["x-unknown".to_string()],
            vec!["exp".to_string()],
            vec![],
        ] {
            header.crit = Some(crit.clone());
            let token = signed(&header, secret);
            assert!(
                validator.validate(&token).await.unwrap().is_none(),
                "{crit:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_critical_header_extension_is_refused_before_fetching_keys() {
        // A JWKS that cannot be fetched: a token that needed its keys would be "unavailable".
        let client = crate::upstream::client(None).unwrap();
        let validator = JwtValidator {
            issuer: None,
            audience: Vec::new(),
            subject_claim: "sub".into(),
            groups_claim: None,
            claims: Vec::new(),
            keys: Keys::Jwks(Box::new(Jwks {
                source: KeySetSource::Url("http://127.0.0.1:9/jwks".parse().unwrap()),
                client,
                timeout: Duration::from_secs(1),
                state: ArcSwap::from_pointee(JwksState::default()),
                fetching: tokio::sync::Mutex::new(()),
            })),
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.crit = Some(vec!["x-unknown".to_string()]);
        let token = signed(&header, b"any-secret-of-at-least-32-bytes-long");
        assert!(validator.validate(&token).await.unwrap().is_none());
        let Keys::Jwks(jwks) = &validator.keys else {
            unreachable!()
        };
        assert!(jwks.state.load().attempted.is_none(), "no fetch attempted");
    }

    #[test]
    fn discovery_documents() {
        let issuer = "https://idp.example/realms/ops";
        let doc = |body: Value| discovered_jwks_uri(body.to_string().as_bytes(), issuer);
        let good = serde_json::json!({
            "issuer": issuer,
            "jwks_uri": "https://idp.example/realms/ops/certs",
        });
        assert_eq!(
            doc(good).unwrap(),
            "https://idp.example/realms/ops/certs"
                .parse::<Uri>()
                .unwrap()
        );
        let other =
            serde_json::json!({"issuer": "https://evil.example", "jwks_uri": "https://e/k"});
        assert!(doc(other).unwrap_err().contains("names issuer"));
        // A trailing slash makes another issuer: identical means identical.
        let slash = serde_json::json!({"issuer": format!("{issuer}/"), "jwks_uri": "https://e/k"});
        assert!(doc(slash).is_err());
        assert!(doc(serde_json::json!({"issuer": issuer}))
            .unwrap_err()
            .contains("jwks_uri"));
        let relative = serde_json::json!({"issuer": issuer, "jwks_uri": "/certs"});
        assert!(doc(relative).unwrap_err().contains("absolute"));
        assert!(discovered_jwks_uri(b"<html>", issuer)
            .unwrap_err()
            .contains("JSON"));
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert!(!looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.e30"));
        assert!(!looks_like_jwt("tg_abc"));
        assert!(!looks_like_jwt("a.b.c"));
    }
}
