//! The raw TOML structs: exactly the keys a config may have (unknown keys are refused), with
//! their places in the file (`Spanned`) for error messages. `check` turns them into `Config`.

use std::collections::HashMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) admin: Option<RawAdmin>,
    pub(super) verify: Option<Spanned<RawVerify>>,
    #[serde(default)]
    pub(super) endpoints: RawEndpoints,
    #[serde(default)]
    pub(super) credentials: RawCredentials,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) tokens: RawTokens,
    pub(super) x509: Option<Spanned<RawX509>>,
    #[serde(default, rename = "validator")]
    pub(super) validators: Vec<Spanned<RawValidator>>,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub(super) limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) failed_auth: Option<Spanned<String>>,
    pub(super) failed_auth_burst: Option<Spanned<i64>>,
    pub(super) max_tracked: Option<Spanned<i64>>,
    pub(super) shared: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) per: Spanned<String>,
    pub(super) rate: Spanned<String>,
    pub(super) burst: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) max_header_bytes: Option<Spanned<i64>>,
    pub(super) max_body_bytes: Option<Spanned<ByteSize>>,
    pub(super) header_read_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) body_read_timeout: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_concurrent_streams: Option<Spanned<i64>>,
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) allow_underscores_in_headers: Option<bool>,
    pub(super) strip_headers: Option<Vec<Spanned<String>>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) client_ca: Option<Spanned<String>>,
    pub(super) client_auth: Option<Spanned<String>>,
    pub(super) proxy_certificates: Option<bool>,
    pub(super) alpn: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVerify {
    pub(super) listen: Spanned<String>,
    pub(super) ingress: Spanned<String>,
    pub(super) token: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Spanned<String>,
    pub(super) token: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoints {
    pub(super) tokens_prefix: Option<Spanned<String>>,
    pub(super) self_service: Option<bool>,
    pub(super) page: Option<bool>,
    pub(super) login_url: Option<Spanned<String>>,
    pub(super) insight: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentials {
    pub(super) sources: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) keep: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) negative_ttl: Option<Spanned<String>>,
    pub(super) max_entries: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub(super) scopes: Option<Vec<Spanned<String>>>,
    pub(super) login_scopes: Option<Vec<Spanned<String>>>,
    pub(super) default_ttl: Option<Spanned<String>>,
    pub(super) max_ttl: Option<Spanned<String>>,
    pub(super) format: Option<Spanned<String>>,
    pub(super) jwt_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawX509 {
    pub(super) enabled: Option<bool>,
    pub(super) token_ttl: Option<Spanned<String>>,
    pub(super) dn_format: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) identity: Vec<RawIdentity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) dn: String,
    pub(super) accounts: Vec<String>,
}

/// One `[[validator]]` table. All keys of all types are listed here (rather than an internally
/// tagged enum) so that an unknown key is reported at its own line and column.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawValidator {
    #[serde(rename = "type")]
    pub(super) kind: Spanned<String>,
    // static
    #[serde(default)]
    pub(super) token: Vec<Spanned<RawStaticToken>>,
    // jwt, oauth2_introspection
    pub(super) issuer: Option<Spanned<String>>,
    pub(super) audience: Option<Spanned<OneOrMany>>,
    pub(super) groups_claim: Option<Spanned<String>>,
    pub(super) jwks_url: Option<Spanned<String>>,
    pub(super) public_key: Option<Spanned<String>>,
    pub(super) secret: Option<Spanned<String>>,
    pub(super) subject_claim: Option<Spanned<String>>,
    // introspect
    pub(super) url: Option<Spanned<String>>,
    pub(super) header: Option<Spanned<String>>,
    pub(super) value: Option<Spanned<String>>,
    pub(super) subject: Option<Spanned<String>>,
    pub(super) account: Option<Spanned<String>>,
    pub(super) groups: Option<Spanned<String>>,
    pub(super) scopes: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) max_concurrent: Option<Spanned<i64>>,
    // oauth2_introspection
    pub(super) client_id: Option<Spanned<String>>,
    pub(super) client_secret: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStaticToken {
    pub(super) sha256: Spanned<String>,
    pub(super) subject: String,
    pub(super) account: Option<String>,
    #[serde(default)]
    pub(super) groups: Vec<String>,
    #[serde(default)]
    pub(super) scopes: Vec<String>,
}

/// A string, or a list of them (`audience = "api"` or `audience = ["api", "web"]`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// One `[[route.deny]]` or `[[route.allow]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) methods: Option<Vec<Spanned<String>>>,
    pub(super) paths: Option<Vec<Spanned<String>>>,
    pub(super) subjects: Option<Vec<Spanned<String>>>,
    pub(super) accounts: Option<Vec<Spanned<String>>>,
    pub(super) groups: Option<Vec<Spanned<String>>>,
    pub(super) scopes: Option<Vec<Spanned<String>>>,
    pub(super) sources: Option<Vec<Spanned<String>>>,
    pub(super) clients: Option<Vec<Spanned<String>>>,
    pub(super) claims: Option<HashMap<String, Spanned<toml::Value>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) path_prefix: Spanned<String>,
    pub(super) upstream: Spanned<String>,
    pub(super) auth: Option<Spanned<String>>,
    pub(super) preserve_host: Option<bool>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) upstream_ca: Option<Spanned<String>>,
    pub(super) upstream_auth: Option<RawUpstreamAuth>,
    #[serde(default)]
    pub(super) identity_headers: HashMap<String, Spanned<String>>,
    pub(super) upgrades: Option<Vec<Spanned<String>>>,
    pub(super) max_inflight: Option<Spanned<i64>>,
    pub(super) max_idle_connections: Option<Spanned<i64>>,
    pub(super) preserve_header_case: Option<bool>,
    #[serde(default)]
    pub(super) rate_limit: Vec<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<RawRule>>,
    pub(super) preflight: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamAuth {
    pub(super) header: Spanned<String>,
    pub(super) value: Spanned<String>,
}

/// A byte size: an integer, or a string with an optional unit (`"0"`, `"10MB"`, `"1GiB"`).
pub(super) struct ByteSize(pub(super) u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte size such as 1048576, \"0\", \"10MB\" or \"1GiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a byte size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_byte_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Parses `"0"`, `"512"`, `"64KiB"`, `"10MB"`, `"1 GiB"`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid byte size {text:?}: expected e.g. \"10MB\""))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("invalid byte size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("byte size {text:?} is too large"))
}
