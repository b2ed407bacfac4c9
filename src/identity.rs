//! Who: the principals and identities validators find, the client as the connection knows it
//! (address, TLS, verified certificate), and the credential hash everything keys on. A leaf
//! shared by every step, so that none has to reach up to another for these types.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use http::HeaderValue;

/// Who a credential belongs to. Interned ([`principal`]): the many credentials of one person
/// share one, so a cached credential costs little more than its own expiry and id.
#[derive(Debug)]
pub struct Principal {
    /// Who the credential belongs to.
    pub subject: String,
    /// The account acted as.
    pub account: String,
    /// The certificate DN, when the credential came from a client certificate.
    pub dn: Option<String>,
    /// `subject` and `account` as header values, made once (`{subject}` and `{account}` in an
    /// identity header then cost no allocation per request); `None` when they cannot be one.
    subject_value: Option<HeaderValue>,
    account_value: Option<HeaderValue>,
    /// The subject's key in per-subject rate limits: 128 bits of its SHA-256, made once.
    subject_key: u128,
}

impl Principal {
    /// `subject` as a header value.
    pub fn subject_value(&self) -> Option<&HeaderValue> {
        self.subject_value.as_ref()
    }

    /// `account` as a header value.
    pub fn account_value(&self) -> Option<&HeaderValue> {
        self.account_value.as_ref()
    }

    /// The subject as per-subject buckets know it (equal subjects, equal keys).
    pub fn subject_key(&self) -> u128 {
        self.subject_key
    }
}

type PrincipalKey = (String, String, Option<String>);

/// Every principal in use, so that equal ones are one allocation.
fn principals() -> &'static DashMap<PrincipalKey, Arc<Principal>> {
    static PRINCIPALS: OnceLock<DashMap<PrincipalKey, Arc<Principal>>> = OnceLock::new();
    PRINCIPALS.get_or_init(DashMap::new)
}

/// The principal for `subject`, `account` and `dn`: the same allocation for equal ones.
pub fn principal(subject: &str, account: &str, dn: Option<&str>) -> Arc<Principal> {
    let key = (
        subject.to_string(),
        account.to_string(),
        dn.map(str::to_string),
    );
    if let Some(found) = principals().get(&key) {
        return Arc::clone(&found);
    }
    let made = Arc::new(Principal {
        // Bytes, not text: a UTF-8 name is carried as sent (obs-text); CR, LF and other
        // control characters cannot be, and `Template::render_checked` refuses them.
        subject_value: HeaderValue::from_bytes(subject.as_bytes()).ok(),
        account_value: HeaderValue::from_bytes(account.as_bytes()).ok(),
        subject_key: key_of(&hash(subject)),
        subject: key.0.clone(),
        account: key.1.clone(),
        dn: key.2.clone(),
    });
    Arc::clone(principals().entry(key).or_insert(made).value())
}

/// Forgets principals no identity uses any more (with the cache's periodic sweep).
pub fn purge_principals() {
    principals().retain(|_, p| Arc::strong_count(p) > 1);
}

/// A verified identity: who, and what this credential says about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Who (shared by all of their credentials).
    pub principal: Arc<Principal>,
    /// The id of a token tokengate issued.
    pub token_id: Option<Box<str>>,
    /// Which validator recognised it (`static`, `introspect`, ...).
    pub validator: ValidatedBy,
    /// When the credential itself expires; the cache entry never outlives it.
    pub expires: Option<SystemTime>,
    /// For tokens tokengate issued: when their last use was last written back.
    pub usage: Option<Arc<Usage>>,
    /// Groups, scopes and the claims the config uses (route rules, `{claim:NAME}`); `None`
    /// when the validator found none, so such a credential costs one pointer.
    pub facts: Option<Box<Facts>>,
}

/// What a validator says about a credential beyond who it is: what route rules (SPEC §10) and
/// placeholders read. Kept in the cached identity; rules are evaluated on every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Groups (a static token's `groups`, a JWT's `groups_claim`, an introspection answer's).
    pub groups: Vec<Box<str>>,
    /// Scopes (a static token's `scopes`, a JWT's `scope` / `scp`, an issued token's).
    pub scopes: Vec<Box<str>>,
    /// The claims the config names, by dotted path: their values as text (an array's each).
    pub claims: Vec<(Box<str>, Vec<Box<str>>)>,
}

impl Facts {
    /// `None` when there is nothing to keep.
    pub fn boxed(self) -> Option<Box<Facts>> {
        (self != Facts::default()).then(|| Box::new(self))
    }
}

/// Which validator recognised a credential (one byte in every cached identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidatedBy {
    /// A token tokengate issued, found in the store.
    Store,
    /// A `static` validator.
    Static,
    /// An `introspect` validator.
    Introspect,
    /// A `jwt` validator, or a JWT API key tokengate signed.
    Jwt,
    /// A verified client certificate.
    X509,
}

impl ValidatedBy {
    /// The name in logs and the `source` metric label.
    pub fn label(self) -> &'static str {
        match self {
            ValidatedBy::Store => "store",
            ValidatedBy::Static => "static",
            ValidatedBy::Introspect => "introspect",
            ValidatedBy::Jwt => "jwt",
            ValidatedBy::X509 => "x509",
        }
    }
}

impl std::ops::Deref for Identity {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

impl Identity {
    /// An identity with no expiry, id or usage of its own (static tokens, introspection,
    /// client certificates).
    pub fn of(principal: Arc<Principal>, validator: ValidatedBy) -> Identity {
        Identity {
            principal,
            token_id: None,
            validator,
            expires: None,
            usage: None,
            facts: None,
        }
    }

    /// The credential's groups.
    pub fn groups(&self) -> &[Box<str>] {
        self.facts.as_deref().map_or(&[], |f| &f.groups)
    }

    /// The credential's scopes.
    pub fn scopes(&self) -> &[Box<str>] {
        self.facts.as_deref().map_or(&[], |f| &f.scopes)
    }

    /// The values of the claim at dotted path `name`, when the credential had it.
    pub fn claim(&self, name: &str) -> Option<&[Box<str>]> {
        let facts = self.facts.as_deref()?;
        facts
            .claims
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The values at dotted path `path` (`realm_access.roles`) of a JSON document, as text: a
/// string as it is, a number or boolean written out, an array's each (its strings, numbers and
/// booleans); `None` when absent, null, an object or an empty array.
pub fn json_values(doc: &serde_json::Value, path: &str) -> Option<Vec<Box<str>>> {
    let mut at = doc;
    for part in path.split('.') {
        at = at.as_object()?.get(part)?;
    }
    values_of(at)
}

/// A JSON value as text values: a string, number or boolean as one, an array's each of those;
/// `None` for null, an object or an empty array.
pub fn values_of(at: &serde_json::Value) -> Option<Vec<Box<str>>> {
    fn text(v: &serde_json::Value) -> Option<Box<str>> {
        match v {
            serde_json::Value::String(s) => Some(s.as_str().into()),
            serde_json::Value::Number(n) => Some(n.to_string().into()),
            serde_json::Value::Bool(b) => Some(b.to_string().into()),
            _ => None,
        }
    }
    let values: Vec<Box<str>> = match at {
        serde_json::Value::Array(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    };
    (!values.is_empty()).then_some(values)
}

/// Facts from a JSON document (a JWT's claims, an introspection answer): groups at
/// `groups_path`, scopes from `scopes_path` (a space-separated string or an array), and the
/// `claims` the config names.
pub fn facts_of(
    doc: &serde_json::Value,
    groups_path: Option<&str>,
    scopes_paths: &[&str],
    claims: &[String],
) -> Option<Box<Facts>> {
    let groups = groups_path
        .and_then(|p| json_values(doc, p))
        .unwrap_or_default();
    let scopes = scopes_paths
        .iter()
        .find_map(|p| json_values(doc, p))
        .map(|values| {
            values
                .iter()
                .flat_map(|v| v.split(' '))
                .filter(|s| !s.is_empty())
                .map(Box::from)
                .collect()
        })
        .unwrap_or_default();
    let claims = claims
        .iter()
        .filter_map(|name| Some((name.as_str().into(), json_values(doc, name)?)))
        .collect();
    Facts {
        groups,
        scopes,
        claims,
    }
    .boxed()
}

/// Last-use bookkeeping of an issued token, shared by every request that uses it, so the
/// write-back happens at most once a minute per token without a lookup on the request path.
#[derive(Debug)]
pub struct Usage {
    /// The token's hash.
    pub hash: [u8; 32],
    last_written_ms: AtomicI64,
}

/// At most one `lastUsed` write per token per this interval.
pub const USAGE_WRITE_INTERVAL_MS: i64 = 60_000;

impl Usage {
    /// Bookkeeping for a token last written back at `last_used_ms`.
    pub fn new(hash: [u8; 32], last_used_ms: Option<i64>) -> Usage {
        Usage {
            hash,
            last_written_ms: AtomicI64::new(last_used_ms.unwrap_or(i64::MIN / 2)),
        }
    }

    /// Whether a use at `now_ms` should be written back; true for one caller per interval.
    pub fn due(&self, now_ms: i64) -> bool {
        let last = self.last_written_ms.load(Ordering::Relaxed);
        now_ms - last >= USAGE_WRITE_INTERVAL_MS
            && self
                .last_written_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// A validator could not be reached or answered nonsense.
#[derive(Debug, Clone)]
pub struct BackendError(pub String);

/// SHA-256 of a credential: the cache key and the static validator's key. Raw tokens are never
/// kept.
pub fn hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// 128 bits of a SHA-256 (a credential's or a subject's): their key in the rate limits'
/// buckets, where a collision is as likely as guessing the hash.
pub fn key_of(hash: &[u8; 32]) -> u128 {
    let mut half = [0u8; 16];
    half.copy_from_slice(&hash[..16]);
    u128::from_be_bytes(half)
}

/// What the connection knows about the client.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate, when the client presented one.
    pub client: Option<Arc<ClientCert>>,
    /// The client's address as a header value (`X-Forwarded-For`), made once per connection.
    pub ip: HeaderValue,
    /// The last credential's hash on this connection.
    pub keys: KeyMemo,
}

impl Peer {
    /// What the connection knows about a client at `addr`.
    pub fn new(addr: SocketAddr, tls: bool, client: Option<Arc<ClientCert>>) -> Peer {
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer {
            addr,
            tls,
            client,
            ip,
            keys: KeyMemo::default(),
        }
    }
}

/// A connection's memory of the last credential it carried, so that a keep-alive client
/// sending the same token on every request has it hashed once (SHA-256 of a short token is a
/// tenth of a cached request's work). What is kept is the credential's SHA-256 and a tag of
/// it: SipHash under keys of this connection's own, chosen at random; never the credential.
///
/// A different credential is mistaken for the last one only if its tag is equal: a 2^-64
/// chance per request for a client that cannot see the keys, on the one connection where the
/// last credential was sent (behind a front proxy that multiplexes clients, the only case where
/// two clients share one). Either way the SHA-256 found is then looked up as usual, so expiry
/// and revocation hold.
#[derive(Default)]
pub struct KeyMemo {
    keys: std::hash::RandomState,
    last: std::sync::Mutex<Option<(u64, [u8; 32])>>,
}

impl KeyMemo {
    /// The SHA-256 of `token` ([`hash`]), from the memory when `token` is the last one.
    pub fn hash(&self, token: &str) -> [u8; 32] {
        use std::hash::BuildHasher;
        let tag = self.keys.hash_one(token.as_bytes());
        // HTTP/2 streams of one connection may race for it: the loser hashes.
        let Ok(mut last) = self.last.try_lock() else {
            return hash(token);
        };
        match *last {
            Some((seen, key)) if seen == tag => key,
            _ => {
                let key = hash(token);
                *last = Some((tag, key));
                key
            }
        }
    }
}

impl Clone for KeyMemo {
    /// A new, empty memory (with new keys).
    fn clone(&self) -> Self {
        KeyMemo::default()
    }
}

impl std::fmt::Debug for KeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMemo")
    }
}

/// The identity of a verified client certificate (or proxy chain): its end-entity DN, in both
/// forms, computed once per connection.
#[derive(Debug)]
pub struct ClientCert {
    /// `/C=CH/O=Example/CN=Alice`.
    pub slash: String,
    /// `CN=Alice,O=Example,C=CH`.
    pub rfc2253: String,
}

impl ClientCert {
    /// The DN of the verified chain `certs` (leaf first), or `None` without a certificate.
    pub fn of_chain(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Option<ClientCert> {
        if certs.is_empty() {
            return None;
        }
        let dn = |format| match crate::x509::end_entity_dn(certs, format) {
            Ok(dn) => Some(dn),
            Err(e) => {
                tracing::warn!(error = %e, "verified client certificate without a usable DN");
                None
            }
        };
        Some(ClientCert {
            slash: dn(crate::x509::DnFormat::Slash)?,
            rfc2253: dn(crate::x509::DnFormat::Rfc2253)?,
        })
    }

    /// The DN in `format`.
    pub fn dn(&self, format: crate::x509::DnFormat) -> &str {
        match format {
            crate::x509::DnFormat::Slash => &self.slash,
            crate::x509::DnFormat::Rfc2253 => &self.rfc2253,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_memo_gives_each_credential_its_own_hash() {
        let memo = KeyMemo::default();
        let sequence = [
            "alpha-token",
            "alpha-token",
            "beta-token",
            "alpha-token",
            "",
            "beta",
        ];
        for token in sequence {
            assert_eq!(memo.hash(token), hash(token), "{token:?}");
        }
        // Tokens that differ in one byte, or only in length.
        for token in ["tg_aaaa", "tg_aaab", "tg_aaa", "tg_aaaa\0"] {
            assert_eq!(memo.hash(token), hash(token), "{token:?}");
        }
    }

    #[test]
    fn the_key_memo_keeps_a_tag_not_the_credential() {
        let memo = KeyMemo::default();
        memo.hash("secret-credential-value");
        let kept = format!("{:?}", memo.last.lock().unwrap());
        assert!(!kept.contains("secret"), "{kept}");
        // Another connection's memory starts empty and with its own keys.
        let other = memo.clone();
        assert!(other.last.lock().unwrap().is_none());
        other.hash("secret-credential-value");
        assert_ne!(
            memo.last.lock().unwrap().unwrap().0,
            other.last.lock().unwrap().unwrap().0,
            "each connection tags with keys of its own"
        );
    }
}
