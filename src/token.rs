//! The format of the tokens tokengate issues (SPEC §5): `tg_` + 43 base64url characters of
//! 256-bit OS randomness + a 6-character base62 CRC-32 checksum, as GitHub's `ghp_` tokens. A
//! mistyped or random string fails the checksum and is rejected before any cache or store work.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{TokenFormat, TokensConfig};
use crate::identity::Identity;
use crate::store::{now_ms, Kind, Store, StoreError, TokenRecord};

/// Every issued opaque token starts with this.
pub const PREFIX: &str = "tg_";
const BODY_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
/// Length of a whole token.
pub const LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new token, and a new token id (shown in lists; never the secret).
pub fn generate() -> Result<(String, String), String> {
    let rng = SystemRandom::new();
    let mut secret = [0u8; 32];
    rng.fill(&mut secret)
        .map_err(|_| "the OS random number generator failed".to_string())?;
    let mut token = String::with_capacity(LEN);
    token.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(secret, &mut token);
    let checksum = base62(crc32fast::hash(token.as_bytes()));
    token.push_str(&checksum);
    Ok((token, new_id(&rng)?))
}

/// A random 16-character base62 token id.
fn new_id(rng: &SystemRandom) -> Result<String, String> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes)
        .map_err(|_| "the OS random number generator failed".to_string())?;
    Ok(bytes
        .iter()
        .map(|b| BASE62[usize::from(*b) % 62] as char)
        .collect())
}

/// Whether `token` looks like one of ours (`tg_` prefix), so that only the store can decide.
/// Total over any string (a byte comparison).
pub fn is_ours(token: &str) -> bool {
    token.as_bytes().starts_with(PREFIX.as_bytes())
}

/// Whether a `tg_` token is well formed: length, alphabet and checksum.
///
/// Total over any string: it works on bytes, so a credential with non-ASCII characters (a
/// percent-decoded query parameter can hold any UTF-8) is simply not well formed, never split
/// inside a character.
pub fn well_formed(token: &str) -> bool {
    let bytes = token.as_bytes();
    if bytes.len() != LEN || !bytes.starts_with(PREFIX.as_bytes()) {
        return false;
    }
    let (payload, checksum) = bytes.split_at(LEN - CHECKSUM_LEN);
    payload[PREFIX.len()..]
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && base62(crc32fast::hash(payload)).as_bytes() == checksum
}

/// What a new token is for.
pub struct Issue<'a> {
    /// Its owner.
    pub subject: &'a str,
    /// The account it acts as (the subject's when `None`).
    pub account: Option<&'a str>,
    /// A label.
    pub name: &'a str,
    /// Its lifetime; `None`: the default (for API tokens, capped by `tokens.max_ttl`); zero:
    /// until revoked.
    pub ttl: Option<Duration>,
    /// API or x509.
    pub kind: Kind,
    /// The certificate DN (x509).
    pub dn: Option<&'a str>,
    /// Opaque or JWT; `None`: `tokens.format`.
    pub format: Option<TokenFormat>,
    /// The scopes asked for; `None`: the minter's allowance. (x509 tokens have none.)
    pub scopes: Option<&'a [String]>,
    /// Who mints it: bounds its scopes, and gives it their groups.
    pub minter: Minter<'a>,
}

/// Who mints an API token. A token is never wider than its minter's allowance: the minting
/// credential's scopes that are in `[tokens] scopes` when it has any, else
/// `[tokens] login_scopes`; an operator may give any of `[tokens] scopes`.
#[derive(Clone, Copy)]
pub enum Minter<'a> {
    /// A caller's login credential (the token API, the page, Insight): the token gets its
    /// allowance by default, and its groups.
    Caller(&'a Identity),
    /// An operator (the admin API, the CLI, the demo): `login_scopes` by default (what the
    /// user would get by signing in), any configured scope when named; no groups.
    Operator,
}

/// The scopes a new API token gets: `requested` (each in `[tokens] scopes` and within the
/// minter's allowance, else the reason) or, when `None`, the allowance; in the order of
/// `[tokens] scopes`, each once.
pub fn scopes_for(
    config: &TokensConfig,
    requested: Option<&[String]>,
    minter: Minter<'_>,
) -> Result<Vec<String>, String> {
    let own: &[Box<str>] = match minter {
        Minter::Caller(identity) => identity.scopes(),
        Minter::Operator => &[],
    };
    let allowance: Vec<&String> = if own.is_empty() {
        config.login_scopes.iter().collect()
    } else {
        config
            .scopes
            .iter()
            .filter(|s| own.iter().any(|o| **o == ***s))
            .collect()
    };
    let Some(requested) = requested else {
        return Ok(allowance.into_iter().cloned().collect());
    };
    fn listed<'s>(names: impl Iterator<Item = &'s String>) -> String {
        let names: Vec<&str> = names.map(String::as_str).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }
    for name in requested {
        if !config.scopes.contains(name) {
            return Err(format!(
                "unknown scope {name:?} (the scopes a token may have: {})",
                listed(config.scopes.iter())
            ));
        }
        let allowed = match minter {
            Minter::Operator => true,
            Minter::Caller(_) => allowance.contains(&name),
        };
        if !allowed {
            let allowed = listed(allowance.iter().copied());
            return Err(if own.is_empty() {
                format!("scope {name:?} is wider than a login credential may give (it may give: {allowed})")
            } else {
                format!("scope {name:?} is wider than the asking credential's own scopes (it may give: {allowed})")
            });
        }
    }
    Ok(config
        .scopes
        .iter()
        .filter(|s| requested.contains(s))
        .cloned()
        .collect())
}

/// Why a token was not issued.
#[derive(Debug)]
pub enum IssueError {
    /// The lifetime asked for is over `[tokens] max_ttl` (a client error: 400).
    Lifetime(String),
    /// A scope asked for is unknown or wider than the minter's allowance (400).
    Scope(String),
    /// The store (or the random number generator, or the signing key) failed.
    Store(StoreError),
}

impl std::fmt::Display for IssueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IssueError::Lifetime(m) | IssueError::Scope(m) => f.write_str(m),
            IssueError::Store(e) => e.fmt(f),
        }
    }
}

impl From<StoreError> for IssueError {
    fn from(e: StoreError) -> Self {
        IssueError::Store(e)
    }
}

/// Creates a token, stores its hash, and returns the token (shown once) with its record. An
/// API token's lifetime is checked here, so no surface can issue one past `max_ttl`.
pub async fn issue(
    store: &Store,
    config: &TokensConfig,
    what: Issue<'_>,
) -> Result<(String, TokenRecord), IssueError> {
    let (ttl, scopes, groups) = match what.kind {
        Kind::Api => {
            let ttl = config.lifetime(what.ttl).map_err(IssueError::Lifetime)?;
            let scopes = scopes_for(config, what.scopes, what.minter).map_err(IssueError::Scope)?;
            let groups = match what.minter {
                Minter::Caller(identity) => {
                    identity.groups().iter().map(|g| g.to_string()).collect()
                }
                Minter::Operator => Vec::new(),
            };
            (ttl, scopes, groups)
        }
        Kind::X509 => (
            what.ttl.unwrap_or(config.default_ttl),
            Vec::new(),
            Vec::new(),
        ),
    };
    let (mut token, id) = generate().map_err(StoreError)?;
    let created_ms = now_ms();
    let expires_ms = (!ttl.is_zero())
        .then(|| created_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)));
    let account = what.account.unwrap_or(what.subject);
    if what.format.unwrap_or(config.format) == TokenFormat::Jwt {
        let key = config.jwt.as_ref().ok_or_else(|| {
            StoreError("JWT API keys need [tokens] jwt_key in the config".to_string())
        })?;
        let claims = crate::jwt::Claims {
            iss: crate::jwt::ISSUER.to_string(),
            sub: what.subject.to_string(),
            account: account.to_string(),
            jti: id.clone(),
            iat: created_ms / 1000,
            // Whole seconds, never later than the stored expiry.
            exp: expires_ms.map(|ms| ms / 1000),
        };
        token = key.sign(&claims).map_err(StoreError)?;
    }
    let record = TokenRecord {
        id,
        hash: crate::identity::hash(&token),
        subject: what.subject.to_string(),
        account: account.to_string(),
        name: what.name.to_string(),
        kind: what.kind,
        dn: what.dn.map(str::to_string),
        created_ms,
        expires_ms,
        last_used_ms: None,
        scopes,
        groups,
    };
    store.insert(&record).await?;
    crate::telemetry::token_issued(what.kind.as_str());
    Ok((token, record))
}

/// A u32 as exactly six base62 digits (62^6 > 2^32).
fn base62(mut n: u32) -> String {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let (a, id_a) = generate().unwrap();
        let (b, id_b) = generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(id_a, id_b);
        assert_eq!(a.len(), LEN);
        assert_eq!(id_a.len(), 16);
        assert!(well_formed(&a), "{a}");
        assert!(well_formed(&b), "{b}");
    }

    #[test]
    fn any_change_breaks_the_checksum() {
        let (token, _) = generate().unwrap();
        let mut bytes = token.clone().into_bytes();
        for i in PREFIX.len()..bytes.len() {
            let original = bytes[i];
            bytes[i] = if original == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes.clone()).unwrap();
            assert!(!well_formed(&changed), "{changed}");
            bytes[i] = original;
        }
        assert!(!well_formed(&token[..LEN - 1]));
        assert!(!well_formed(&format!("{token}x")));
        assert!(!well_formed("tg_short"));
        assert!(!well_formed(&token.replacen("tg_", "tx_", 1)));
    }

    /// The crash once reached through a `query:` source: a percent-decoded token of the right
    /// byte length with a two-byte character across the payload/checksum boundary.
    #[test]
    fn non_ascii_token_of_the_right_length_is_refused_not_a_panic() {
        let token = format!("tg_{}\u{e9}BBBBB", "A".repeat(42));
        assert_eq!(token.len(), LEN);
        assert!(is_ours(&token));
        assert!(!well_formed(&token));
    }

    /// Every non-ASCII character of every UTF-8 width at every byte position of a token of the
    /// right length (and one byte either side): refused, never a panic.
    #[test]
    fn non_ascii_at_every_position_is_refused() {
        let (token, _) = generate().unwrap();
        for c in [
            '\u{80}',
            '\u{e9}',
            '\u{7ff}',
            '\u{800}',
            '\u{20ac}',
            '\u{ffff}',
            '\u{1f600}',
        ] {
            let width = c.len_utf8();
            for at in 0..=LEN - width {
                for extra in [0usize, 1, 2] {
                    // Replace `width - 1 + extra` ASCII bytes: lengths LEN + 1, LEN, LEN - 1.
                    let removed = (width + extra - 1).min(LEN - at);
                    let mut s = String::with_capacity(LEN + 4);
                    s.push_str(&token[..at]);
                    s.push(c);
                    s.push_str(&token[at + removed..]);
                    assert!(!well_formed(&s), "{c:?} at {at}, extra {extra}");
                    assert_eq!(is_ours(&s), at >= PREFIX.len(), "{c:?} at {at}");
                }
            }
        }
    }

    fn scoped(scopes: &[&str], login_scopes: &[&str]) -> TokensConfig {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        TokensConfig {
            scopes: names(scopes),
            login_scopes: names(login_scopes),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::ZERO,
            format: TokenFormat::Opaque,
            jwt: None,
        }
    }

    fn caller(scopes: &[&str]) -> Identity {
        let mut identity = Identity::of(
            crate::identity::principal("s", "s", None),
            crate::identity::ValidatedBy::Static,
        );
        identity.facts = crate::identity::Facts {
            scopes: scopes.iter().map(|s| Box::from(*s)).collect(),
            ..Default::default()
        }
        .boxed();
        identity
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_token_gets_the_minters_allowance_and_never_more() {
        let config = scoped(&["read", "write", "admin"], &["read"]);
        let login = caller(&[]);
        let jwt = caller(&["openid", "write", "read"]);
        let ok = |requested: Option<&[&str]>, minter| {
            scopes_for(&config, requested.map(names).as_deref(), minter)
        };
        // Defaults: login_scopes, or the credential's scopes that are configured (in config
        // order); operators get login_scopes.
        assert_eq!(ok(None, Minter::Caller(&login)), Ok(names(&["read"])));
        assert_eq!(
            ok(None, Minter::Caller(&jwt)),
            Ok(names(&["read", "write"]))
        );
        assert_eq!(ok(None, Minter::Operator), Ok(names(&["read"])));
        // Asked for: within the allowance, deduplicated, in config order; none is none.
        assert_eq!(
            ok(Some(&["write", "read", "write"]), Minter::Caller(&jwt)),
            Ok(names(&["read", "write"]))
        );
        assert_eq!(ok(Some(&[]), Minter::Caller(&jwt)), Ok(Vec::new()));
        assert_eq!(
            ok(Some(&["admin"]), Minter::Operator),
            Ok(names(&["admin"]))
        );
        // Unknown, or wider than the minter: refused with the reason.
        let unknown = ok(Some(&["delete"]), Minter::Operator).unwrap_err();
        assert!(unknown.contains("unknown scope \"delete\""), "{unknown}");
        assert!(unknown.contains("read, write, admin"), "{unknown}");
        let wider = ok(Some(&["admin"]), Minter::Caller(&jwt)).unwrap_err();
        assert!(wider.contains("wider"), "{wider}");
        assert!(ok(Some(&["write"]), Minter::Caller(&login)).is_err());
        // A claimed scope not configured is not given (openid).
        assert!(ok(Some(&["openid"]), Minter::Caller(&jwt)).is_err());
        // Nothing configured: no scopes, and any named one is unknown.
        let none = scoped(&[], &[]);
        assert_eq!(
            scopes_for(&none, None, Minter::Caller(&jwt)),
            Ok(Vec::new())
        );
        assert!(scopes_for(&none, Some(&names(&["read"])), Minter::Operator)
            .unwrap_err()
            .contains("none"));
    }

    proptest::proptest! {
        /// Any string, and any `tg_` + characters near the token length: no panic, and only
        /// ASCII strings of the exact length can be well formed.
        #[test]
        fn well_formed_is_total(s in ".*", tail in proptest::collection::vec(proptest::char::any(), 40..52)) {
            let _ = is_ours(&s);
            let _ = well_formed(&s);
            let t: String = PREFIX.chars().chain(tail).collect();
            proptest::prop_assert!(is_ours(&t));
            if well_formed(&t) {
                proptest::prop_assert!(t.is_ascii() && t.len() == LEN);
            }
        }
    }
}
