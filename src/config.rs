//! Configuration: the raw TOML structs (serde, unknown keys refused) and the checked runtime
//! [`Config`] made from them. Every error carries the line and column it was found at, so
//! `tokengate check` can print `PATH:LINE:COL: message` (SPEC §3).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Uri};
use serde::Deserialize;
use toml::Spanned;

use crate::credential::Source;
use crate::rewrite::Template;
pub use crate::x509::DnFormat;

/// A configuration error with the place it was found at.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file's path as given.
    pub path: PathBuf,
    /// 1-based line; 0 when the error is not about a place in the file (e.g. unreadable).
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line.max(1),
            self.col.max(1),
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// A secret value from the config (`"${env:NAME}"`, `"${file:/path}"` or literal); its `Debug`
/// never shows the value, so a config dump or an error cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw TOML structs: exactly the keys of SPEC §3, nothing else.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    verify: Option<Spanned<RawVerify>>,
    #[serde(default)]
    endpoints: RawEndpoints,
    #[serde(default)]
    credentials: RawCredentials,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    tokens: RawTokens,
    x509: Option<Spanned<RawX509>>,
    #[serde(default, rename = "validator")]
    validators: Vec<Spanned<RawValidator>>,
    #[serde(default, rename = "route")]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<ByteSize>>,
    header_read_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    body_read_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_concurrent_streams: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
    allow_underscores_in_headers: Option<bool>,
    strip_headers: Option<Vec<Spanned<String>>>,
    drain_timeout: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
    client_auth: Option<Spanned<String>>,
    proxy_certificates: Option<bool>,
    alpn: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    listen: Spanned<String>,
    ingress: Spanned<String>,
    token: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    tokens_prefix: Option<Spanned<String>>,
    self_service: Option<bool>,
    page: Option<bool>,
    login_url: Option<Spanned<String>>,
    insight: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    sources: Option<Spanned<Vec<Spanned<String>>>>,
    keep: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    ttl: Option<Spanned<String>>,
    negative_ttl: Option<Spanned<String>>,
    max_entries: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    default_ttl: Option<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    jwt_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawX509 {
    enabled: Option<bool>,
    token_ttl: Option<Spanned<String>>,
    dn_format: Option<Spanned<String>>,
    #[serde(default)]
    identity: Vec<RawIdentity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    dn: String,
    accounts: Vec<String>,
}

/// One `[[validator]]` table. All keys of all types are listed here (rather than an internally
/// tagged enum) so that an unknown key is reported at its own line and column.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValidator {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    // static
    #[serde(default)]
    token: Vec<Spanned<RawStaticToken>>,
    // jwt
    issuer: Option<Spanned<String>>,
    audience: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    public_key: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    subject_claim: Option<Spanned<String>>,
    // introspect
    url: Option<Spanned<String>>,
    header: Option<Spanned<String>>,
    value: Option<Spanned<String>>,
    subject: Option<Spanned<String>>,
    account: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    max_concurrent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStaticToken {
    sha256: Spanned<String>,
    subject: String,
    account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Spanned<String>,
    upstream: Spanned<String>,
    auth: Option<Spanned<String>>,
    preserve_host: Option<bool>,
    timeout: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<String>>,
    upstream_auth: Option<RawUpstreamAuth>,
    #[serde(default)]
    identity_headers: HashMap<String, Spanned<String>>,
    upgrades: Option<Vec<Spanned<String>>>,
    max_inflight: Option<Spanned<i64>>,
    max_idle_connections: Option<Spanned<i64>>,
    preserve_header_case: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamAuth {
    header: Spanned<String>,
    value: Spanned<String>,
}

/// A byte size: an integer, or a string with an optional unit (`"0"`, `"10MB"`, `"1GiB"`).
struct ByteSize(u64);

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

// ---------------------------------------------------------------------------------------------
// The checked configuration.

/// The checked configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main listener.
    pub server: ServerConfig,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
    /// The forward-auth decision listener, when configured.
    pub verify: Option<VerifyConfig>,
    /// Where tokengate looks for a credential, in order.
    pub sources: Vec<Source>,
    /// Sources forwarded unchanged (`[credentials] keep`), in addition to the upstream form.
    pub keep: Vec<Source>,
    /// The validation cache.
    pub cache: CacheConfig,
    /// The validators, tried in order.
    pub validators: Vec<ValidatorConfig>,
    /// The routes, longest `path_prefix` first.
    pub routes: Vec<RouteConfig>,
    /// Where issued tokens live.
    pub store: StoreConfig,
    /// Issued API tokens.
    pub tokens: TokensConfig,
    /// The endpoints tokengate answers itself on the main listener.
    pub endpoints: EndpointsConfig,
    /// `[x509]`.
    pub x509: X509Config,
}

/// `[x509]`: token exchange for client certificates (Rucio).
#[derive(Debug, Clone)]
pub struct X509Config {
    /// Serve `/auth/x509`, `/auth/x509_proxy` and `/auth/validate`.
    pub enabled: bool,
    /// Lifetime of an exchanged token.
    pub token_ttl: Duration,
    /// How DNs are written (identity mapping, `{dn}`, `/auth/validate`).
    pub dn_format: DnFormat,
    /// `[[x509.identity]]`: DN → accounts, the first the default.
    pub identities: Vec<(String, Vec<String>)>,
}

impl Default for X509Config {
    fn default() -> Self {
        X509Config {
            enabled: false,
            token_ttl: Duration::from_secs(3600),
            dn_format: DnFormat::Slash,
            identities: Vec::new(),
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process only.
    Memory,
    /// An SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A Redis server shared by replicas.
    Redis {
        /// `redis://` URL (may hold a password).
        url: Secret,
        /// Prefix of every key and channel, so several deployments can share a server.
        prefix: String,
    },
}

/// `[tokens]`.
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// Lifetime of a new API token when the request names none (capped by `max_ttl`); zero =
    /// until revoked.
    pub default_ttl: Duration,
    /// No API token outlives this; zero = no cap.
    pub max_ttl: Duration,
    /// `opaque` (`tg_...`) or `jwt`.
    pub format: TokenFormat,
    /// The JWT signing key (`jwt_key`: PEM or HMAC secret), when configured.
    pub jwt: Option<std::sync::Arc<crate::jwt::JwtKey>>,
}

/// The format of new API tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFormat {
    /// `tg_` + randomness + checksum.
    Opaque,
    /// A signed JWT whose `jti` is the token id.
    Jwt,
}

/// `[endpoints]`.
#[derive(Debug, Clone)]
pub struct EndpointsConfig {
    /// Mount point of the caller's own token API on the main listener.
    pub tokens_prefix: String,
    /// Whether callers may create tokens on the main listener (listing and revoking stay).
    pub self_service: bool,
    /// Serve the token page for browsers at `{tokens_prefix}/`.
    pub page: bool,
    /// Where the page sends a browser without a credential (`?rd=<path>` added); `None`: a
    /// 401 page. An absolute `http(s)://` URL or a path.
    pub login_url: Option<String>,
    /// Serve the Insight.io endpoints.
    pub insight: bool,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the main listener.
    pub listen: SocketAddr,
    /// Request heads larger than this are answered 431.
    pub max_header_bytes: usize,
    /// Request bodies larger than this are answered 413; 0 = unlimited (streamed).
    pub max_body_bytes: u64,
    /// From accept: a client that has not completed the TLS handshake, the HTTP/2 preface and
    /// its first request head within this is disconnected; later request heads get as long.
    pub header_read_timeout: Duration,
    /// A keep-alive HTTP/1 connection, or an HTTP/2 connection with no open stream, is closed
    /// after this long.
    pub idle_timeout: Duration,
    /// No request-body byte for this long → 408, and the upstream request is aborted.
    pub body_read_timeout: Duration,
    /// Connections open at once (process-wide); further clients wait in the accept queue.
    pub max_connections: usize,
    /// HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Worker threads, each with its own runtime accepting on the listener; `None`: one per
    /// available core (affinity and cgroup quota respected).
    pub workers: Option<usize>,
    /// Forward request headers whose name has `_` (many frameworks read `X_Auth_User` as
    /// `X-Auth-User`, so by default they are dropped).
    pub allow_underscores_in_headers: bool,
    /// More request headers removed on every route, beside SPEC §9's list (lower case).
    pub strip_headers: Vec<http::HeaderName>,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// TLS; `None` serves plain HTTP.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate.
    pub client_auth_required: bool,
    /// Accept RFC 3820 / Globus proxy chains.
    pub proxy_certificates: bool,
    /// The protocols offered in ALPN, in order of preference: `h2`, `http/1.1` or both.
    pub alpn: Vec<Alpn>,
}

/// A protocol the TLS listener offers in ALPN (`[server.tls] alpn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`.
    Http2,
    /// `http/1.1`.
    Http1,
}

impl Alpn {
    /// The protocol's ALPN identifier.
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http2 => b"h2",
            Alpn::Http1 => b"http/1.1",
        }
    }
}

/// `[verify]`: forward-auth decisions for an ingress (SPEC §5).
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Address of the decision listener.
    pub listen: SocketAddr,
    /// Which headers name the original request.
    pub ingress: Ingress,
    /// The bearer token the ingress must send (required off loopback, unless TLS with client
    /// certificates is used).
    pub token: Option<Secret>,
    /// TLS for the decision listener (its `client_ca` makes client certificates required).
    pub tls: Option<TlsConfig>,
}

/// The ingress that asks for decisions, and so where the original request is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// nginx `auth_request`: `X-Original-URI`, `X-Original-Method`.
    Nginx,
    /// Traefik `ForwardAuth`: `X-Forwarded-Uri`, `X-Forwarded-Method`, `X-Forwarded-Host`.
    Traefik,
    /// Envoy `ext_authz` (HTTP service): the request's own path and method.
    Envoy,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// The bearer token of the admin token API.
    pub token: Option<Secret>,
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a successful validation is trusted.
    pub ttl: Duration,
    /// How long a failed validation is remembered.
    pub negative_ttl: Duration,
    /// The most entries kept; beyond it old entries are evicted.
    pub max_entries: usize,
}

/// One `[[validator]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidatorConfig {
    /// Fixed tokens by SHA-256 hash.
    Static(Vec<StaticToken>),
    /// An HTTP endpoint that answers 2xx for a valid credential.
    Introspect(IntrospectConfig),
    /// JWTs signed by an outside identity provider.
    Jwt(JwtValidatorConfig),
}

impl ValidatorConfig {
    /// The validator's type, as in the config and the `source` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidatorConfig::Static(_) => "static",
            ValidatorConfig::Introspect(_) => "introspect",
            ValidatorConfig::Jwt(_) => "jwt",
        }
    }
}

/// `type = "jwt"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtValidatorConfig {
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// An `aud` a token must carry, when set.
    pub audience: Option<String>,
    /// Where the verification keys come from.
    pub keys: JwtKeySource,
    /// The claim that names the subject (default `sub`).
    pub subject_claim: String,
    /// How long fetching the JWKS may take.
    pub timeout: Duration,
}

/// The keys of a `jwt` validator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeySource {
    /// A JWKS document fetched over HTTP(S) and refreshed on unknown `kid`s.
    Jwks(Uri),
    /// A public key (PEM: RSA, P-256, P-384 or Ed25519) read from a file at load.
    PublicKey {
        /// The file, watched for changes.
        path: PathBuf,
        /// Its contents.
        pem: String,
    },
    /// An HMAC secret (HS256/HS384/HS512).
    Secret(Secret),
}

/// One `[[validator.token]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticToken {
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// Who the token belongs to.
    pub subject: String,
    /// The account; the subject when not given.
    pub account: String,
}

/// `type = "introspect"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntrospectConfig {
    /// The endpoint.
    pub url: Uri,
    /// The header the credential is presented in.
    pub header: HeaderName,
    /// The header's value; `{token}` is replaced with the credential.
    pub value: Template,
    /// Where the subject comes from: a JSON pointer into the response, or the hash prefix.
    pub subject: Option<String>,
    /// Where the account comes from: a JSON pointer; the subject when not given.
    pub account: Option<String>,
    /// How long one call may take (waiting for a free call slot included).
    pub timeout: Duration,
    /// Calls in flight at once; more wait (SPEC §9: every validator's calls are capped).
    pub max_concurrent: usize,
}

/// `auth = ...` of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid credential is needed.
    Required,
    /// A credential is validated when present; requests without one pass without identity.
    Optional,
    /// No validation; credentials are still stripped.
    None,
}

/// One `[[route]]`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Requests whose path starts with this go here (longest wins).
    pub path_prefix: String,
    /// `scheme://authority` of the upstream.
    pub upstream: Uri,
    /// Whether a credential is needed.
    pub auth: AuthMode,
    /// Forward the client's Host header (else the upstream's authority).
    pub preserve_host: bool,
    /// Time allowed for the upstream's response head.
    pub timeout: Duration,
    /// CA bundle for an https:// upstream (else the system roots).
    pub upstream_ca: Option<PathBuf>,
    /// The credential form the upstream expects.
    pub upstream_auth: Option<(HeaderName, Template)>,
    /// Identity headers set from the verified identity.
    pub identity_headers: Vec<(HeaderName, Template)>,
    /// `Upgrade` protocols passed through (lower case); never `h2c`.
    pub upgrades: Vec<String>,
    /// Requests in flight to this upstream at once (process-wide); more → 503.
    pub max_inflight: usize,
    /// Idle keep-alive connections kept to this upstream (process-wide).
    pub max_idle_connections: usize,
    /// HTTP/1 responses keep the case of the upstream's header names (else lower case).
    pub preserve_header_case: bool,
}

/// `serve --listen`: the main listener's address, whatever the file says (on reload too).
static LISTEN_OVERRIDE: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// Makes every later `Config::load` listen on `addr` (`serve --listen`); set once, at startup.
pub fn override_listen(addr: SocketAddr) {
    let _ = LISTEN_OVERRIDE.set(addr);
}

impl Config {
    /// Reads and checks a config file (with `serve --listen` applied).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let mut config = Config::parse(path, &text)?;
        if let Some(addr) = LISTEN_OVERRIDE.get() {
            config.server.listen = *addr;
        }
        Ok(config)
    }

    /// Checks config text; `path` is used in messages and to resolve relative file paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let checker = Checker { path, text };
        checker.check(checker.raw()?)
    }
}

/// What the store commands (`token`, `identity`) use of a config: the whole file is parsed
/// (a typo anywhere is still an error), but only these tables are checked, so a secret that
/// only the server needs (an upstream's key, the admin token) need not be set to list tokens.
#[derive(Debug, Clone)]
pub struct StoreParts {
    /// `[store]`.
    pub store: StoreConfig,
    /// `[tokens]` (the defaults unless loaded for issuing).
    pub tokens: TokensConfig,
    /// `[x509]` (its identity mappings).
    pub x509: X509Config,
}

impl StoreParts {
    /// Reads a config file and checks `[server]`, `[store]` and `[x509]`, and `[tokens]` (its
    /// signing key, say) only when `issuing`: listing and revoking tokens do not sign any.
    pub fn load(path: &Path, issuing: bool) -> Result<StoreParts, ConfigError> {
        let text = read(path)?;
        let checker = Checker { path, text: &text };
        let raw = checker.raw()?;
        let server = checker.server(raw.server)?;
        let tokens = if issuing {
            &raw.tokens
        } else {
            &RawTokens::default()
        };
        Ok(StoreParts {
            store: checker.store(&raw.store)?,
            tokens: checker.tokens(tokens)?,
            x509: match &raw.x509 {
                Some(x) => checker.x509(x, &server)?,
                None => X509Config::default(),
            },
        })
    }
}

/// A config file's text.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        line: 0,
        col: 0,
        message: format!("cannot read config: {e}"),
    })
}

/// Turns raw structs into the checked config, with the text at hand for line:col.
struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    /// The TOML, parsed into the raw structs (unknown keys refused).
    fn raw(&self) -> Result<RawConfig, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.error(span, e.message().trim().to_string())
        })
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        ConfigError {
            path: self.path.to_owned(),
            line,
            col,
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span(), message)
    }

    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).map_err(|m| self.at(v, m)),
        }
    }

    /// A duration that must not be zero (a zero timeout would close everything at once).
    fn nonzero(
        &self,
        value: &Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(value, default)?;
        match value {
            Some(v) if d.is_zero() => Err(self.at(v, "must be longer than 0")),
            _ => Ok(d),
        }
    }

    fn positive(&self, value: &Option<Spanned<i64>>, default: usize) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() > 0 => Ok(*v.get_ref() as usize),
            Some(v) => Err(self.at(v, "must be a positive number")),
        }
    }

    /// Resolves `${env:NAME}` and `${file:/path}`; anything else is taken literally.
    fn secret(&self, value: &Spanned<String>) -> Result<Secret, ConfigError> {
        resolve_secret(value.get_ref())
            .map(Secret)
            .map_err(|m| self.at(value, m))
    }

    /// A file path from the config, relative to the config file's folder.
    fn file(&self, value: &Spanned<String>) -> PathBuf {
        let path = Path::new(value.get_ref());
        if path.is_absolute() {
            return path.to_owned();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn check(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let admin = match raw.admin {
            None => None,
            Some(admin) => Some(AdminConfig {
                listen: self.socket_addr(&admin.listen)?,
                token: admin.token.as_ref().map(|t| self.secret(t)).transpose()?,
            }),
        };
        let verify = match &raw.verify {
            None => None,
            Some(verify) => Some(self.verify(verify)?),
        };
        let endpoints =
            EndpointsConfig {
                tokens_prefix: match &raw.endpoints.tokens_prefix {
                    None => "/_tokengate".to_string(),
                    Some(prefix)
                        if prefix.get_ref().starts_with('/')
                            && crate::path::reads_alike(prefix.get_ref()) =>
                    {
                        prefix.get_ref().trim_end_matches('/').to_string()
                    }
                    Some(prefix) => {
                        return Err(self.at(
                            prefix,
                            "tokens_prefix must start with '/' and hold no '%', ';', space or \
                         segment ending in '.'",
                        ))
                    }
                },
                self_service: raw.endpoints.self_service.unwrap_or(true),
                page: raw.endpoints.page.unwrap_or(false),
                login_url: match &raw.endpoints.login_url {
                    None => None,
                    Some(url) if login_url_ok(url.get_ref()) => Some(url.get_ref().clone()),
                    Some(url) => return Err(self.at(
                        url,
                        "login_url must be an http:// or https:// URL, or a path starting with '/'",
                    )),
                },
                insight: raw.endpoints.insight.unwrap_or(false),
            };
        let sources = self.sources(&raw.credentials, server.allow_underscores_in_headers)?;
        let keep = self.keep(&raw.credentials, &sources)?;
        let cache = CacheConfig {
            ttl: self.duration(&raw.cache.ttl, Duration::from_secs(3600))?,
            negative_ttl: self.duration(&raw.cache.negative_ttl, Duration::from_secs(10))?,
            max_entries: self.positive(&raw.cache.max_entries, 1_000_000)?,
        };
        let store = self.store(&raw.store)?;
        let tokens = self.tokens(&raw.tokens)?;
        let x509 = match &raw.x509 {
            Some(x) => self.x509(x, &server)?,
            None => X509Config::default(),
        };
        let validators = raw
            .validators
            .iter()
            .map(|v| self.validator(v))
            .collect::<Result<Vec<_>, _>>()?;
        let mut routes = Vec::new();
        for r in &raw.routes {
            let route = self.route(r)?;
            if routes
                .iter()
                .any(|o: &RouteConfig| o.path_prefix == route.path_prefix)
            {
                return Err(self.at(&r.get_ref().path_prefix, "duplicate path_prefix"));
            }
            routes.push(route);
        }
        if routes.is_empty() {
            return Err(self.error(0..0, "no [[route]]: at least one route is needed"));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        for (source, raw_keep) in keep.iter().zip(raw.credentials.keep.iter().flatten()) {
            let Some(name) = source.header() else {
                continue;
            };
            let set_by_route = routes.iter().any(|r| {
                r.identity_headers.iter().any(|(h, _)| h == name)
                    || r.upstream_auth.as_ref().is_some_and(|(h, _)| h == name)
            });
            if set_by_route {
                return Err(self.at(
                    raw_keep,
                    "a kept credential cannot be a header a route sets (identity or upstream_auth)",
                ));
            }
        }
        Ok(Config {
            server,
            admin,
            verify,
            sources,
            keep,
            cache,
            validators,
            routes,
            store,
            tokens,
            endpoints,
            x509,
        })
    }

    fn tls(&self, tls: &Spanned<RawTls>) -> Result<TlsConfig, ConfigError> {
        let t = tls.get_ref();
        let client_auth_required = match t.client_auth.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "optional")) => false,
            Some((_, "required")) => true,
            Some((v, other)) => {
                return Err(self.at(
                    v,
                    format!("client_auth must be \"optional\" or \"required\", not {other:?}"),
                ))
            }
        };
        if client_auth_required && t.client_ca.is_none() {
            return Err(self.at(tls, "client_auth = \"required\" needs client_ca"));
        }
        let config = TlsConfig {
            cert: self.file(&t.cert),
            key: self.file(&t.key),
            client_ca: t.client_ca.as_ref().map(|c| self.file(c)),
            client_auth_required,
            proxy_certificates: t.proxy_certificates.unwrap_or(false),
            alpn: self.alpn(t.alpn.as_ref())?,
        };
        // Load the files now, so `check` catches a missing or mismatched certificate.
        crate::tls::server_config(&config).map_err(|m| self.at(tls, m))?;
        Ok(config)
    }

    /// `alpn`: `h2` and/or `http/1.1`, each once; both when unset.
    fn alpn(&self, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> Result<Vec<Alpn>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(vec![Alpn::Http2, Alpn::Http1]);
        };
        let mut offered = Vec::new();
        for name in raw.get_ref() {
            let protocol = match name.get_ref().as_str() {
                "h2" => Alpn::Http2,
                "http/1.1" => Alpn::Http1,
                other => {
                    return Err(self.at(
                        name,
                        format!("alpn offers \"h2\" and \"http/1.1\", not {other:?}"),
                    ))
                }
            };
            if offered.contains(&protocol) {
                return Err(self.at(name, format!("alpn names {:?} twice", name.get_ref())));
            }
            offered.push(protocol);
        }
        if offered.is_empty() {
            return Err(self.at(raw, "alpn needs at least one of \"h2\", \"http/1.1\""));
        }
        Ok(offered)
    }

    /// `[verify]`: off loopback, the listener must know who asks (SPEC §5).
    fn verify(&self, raw: &Spanned<RawVerify>) -> Result<VerifyConfig, ConfigError> {
        let v = raw.get_ref();
        let listen = self.socket_addr(&v.listen)?;
        let ingress = match v.ingress.get_ref().as_str() {
            "nginx" => Ingress::Nginx,
            "traefik" => Ingress::Traefik,
            "envoy" => Ingress::Envoy,
            other => {
                return Err(self.at(
                    &v.ingress,
                    format!("ingress must be \"nginx\", \"traefik\" or \"envoy\", not {other:?}"),
                ))
            }
        };
        let token = v.token.as_ref().map(|t| self.secret(t)).transpose()?;
        if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(self.at(
                v.token.as_ref().unwrap_or(&v.listen),
                "[verify] token must be at least 16 characters",
            ));
        }
        let mut tls = v.tls.as_ref().map(|t| self.tls(t)).transpose()?;
        if let Some(tls) = &mut tls {
            // Client certificates on the decision listener identify the ingress: never optional.
            tls.client_auth_required = tls.client_ca.is_some();
        }
        let client_certificates = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !listen.ip().is_loopback() && token.is_none() && !client_certificates {
            return Err(self.at(
                raw,
                "[verify] listens beyond loopback: set token, or [verify.tls] with client_ca \
                 (its answers can carry an upstream's secret)",
            ));
        }
        Ok(VerifyConfig {
            listen,
            ingress,
            token,
            tls,
        })
    }

    fn socket_addr(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().map_err(|_| {
            self.at(
                value,
                format!(
                    "invalid listen address {:?}: expected IP:PORT",
                    value.get_ref()
                ),
            )
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = match &raw.listen {
            Some(l) => self.socket_addr(l)?,
            None => SocketAddr::from(([0, 0, 0, 0], 8443)),
        };
        let max_header_bytes = self.positive(&raw.max_header_bytes, 16384)?;
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if max_header_bytes < 8192 {
            if let Some(v) = &raw.max_header_bytes {
                return Err(self.at(v, "max_header_bytes must be at least 8192"));
            }
        }
        let tls = raw.tls.as_ref().map(|tls| self.tls(tls)).transpose()?;
        let mut strip_headers = Vec::new();
        for name in raw.strip_headers.iter().flatten() {
            let parsed = http::HeaderName::from_bytes(name.get_ref().as_bytes())
                .map_err(|_| self.at(name, "strip_headers: not a header name"))?;
            strip_headers.push(parsed);
        }
        Ok(ServerConfig {
            listen,
            max_header_bytes,
            max_body_bytes: raw.max_body_bytes.map_or(0, |b| b.into_inner().0),
            header_read_timeout: self.nonzero(&raw.header_read_timeout, Duration::from_secs(10))?,
            idle_timeout: self.nonzero(&raw.idle_timeout, Duration::from_secs(60))?,
            body_read_timeout: self.nonzero(&raw.body_read_timeout, Duration::from_secs(30))?,
            max_connections: self.positive(&raw.max_connections, 10_000)?,
            max_concurrent_streams: u32::try_from(self.positive(&raw.max_concurrent_streams, 100)?)
                .unwrap_or(u32::MAX),
            workers: raw
                .workers
                .as_ref()
                .map(|w| self.positive(&Some(w.clone()), 1))
                .transpose()?,
            allow_underscores_in_headers: raw.allow_underscores_in_headers.unwrap_or(false),
            strip_headers,
            drain_timeout: self.duration(&raw.drain_timeout, Duration::from_secs(30))?,
            tls,
        })
    }

    fn sources(
        &self,
        raw: &RawCredentials,
        allow_underscores: bool,
    ) -> Result<Vec<Source>, ConfigError> {
        let Some(list) = &raw.sources else {
            return Ok(Source::defaults());
        };
        if list.get_ref().is_empty() {
            return Err(self.at(list, "sources must name at least one credential source"));
        }
        let mut sources = Vec::new();
        for s in list.get_ref() {
            let source = Source::parse(s.get_ref()).map_err(|m| self.at(s, m))?;
            if matches!(&source, Source::Header(name) if name.as_str().contains('_'))
                && !allow_underscores
            {
                return Err(self.at(
                    s,
                    "a header name with '_' is dropped at the boundary (many frameworks read \
                     X_Auth_User as X-Auth-User): rename it, or set [server] \
                     allow_underscores_in_headers = true",
                ));
            }
            if sources.contains(&source) {
                return Err(self.at(
                    s,
                    format!("credential source {:?} listed twice", s.get_ref()),
                ));
            }
            sources.push(source);
        }
        Ok(sources)
    }

    /// `[credentials] keep`: each a configured source, and none an identity header's name.
    fn keep(&self, raw: &RawCredentials, sources: &[Source]) -> Result<Vec<Source>, ConfigError> {
        let mut keep = Vec::new();
        for k in raw.keep.iter().flatten() {
            let source = Source::parse(k.get_ref()).map_err(|m| self.at(k, m))?;
            if !sources.contains(&source) {
                return Err(self.at(
                    k,
                    format!(
                        "keep names {:?}, which is not one of [credentials] sources",
                        k.get_ref()
                    ),
                ));
            }
            keep.push(source);
        }
        Ok(keep)
    }

    fn store(&self, raw: &RawStore) -> Result<StoreConfig, ConfigError> {
        let backend = raw
            .backend
            .as_ref()
            .map_or("sqlite", |b| b.get_ref().as_str());
        match backend {
            "memory" => Ok(StoreConfig::Memory),
            "sqlite" => Ok(StoreConfig::Sqlite {
                path: match &raw.path {
                    Some(p) => self.file(p),
                    None => self.file(&Spanned::new(0..0, "tokengate.db".to_string())),
                },
            }),
            "redis" => {
                let named = raw.backend.as_ref().expect("backend named redis");
                let url = raw
                    .url
                    .as_ref()
                    .ok_or_else(|| self.at(named, "backend = \"redis\" needs url"))?;
                let secret = self.secret(url)?;
                if !secret.expose().starts_with("redis://")
                    && !secret.expose().starts_with("rediss://")
                {
                    return Err(self.at(url, "store url must start with redis:// or rediss://"));
                }
                Ok(StoreConfig::Redis {
                    url: secret,
                    prefix: raw
                        .prefix
                        .clone()
                        .unwrap_or_else(|| "tokengate:".to_string()),
                })
            }
            other => Err(self.at(
                raw.backend.as_ref().expect("backend named"),
                format!("store backend must be \"sqlite\", \"redis\" or \"memory\", not {other:?}"),
            )),
        }
    }

    fn tokens(&self, raw: &RawTokens) -> Result<TokensConfig, ConfigError> {
        let format = match raw.format.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "opaque")) => TokenFormat::Opaque,
            Some((_, "jwt")) => TokenFormat::Jwt,
            Some((f, _)) => return Err(self.at(f, "tokens format must be \"opaque\" or \"jwt\"")),
        };
        let jwt = match &raw.jwt_key {
            None => None,
            Some(spanned) => {
                let secret = self.secret(spanned)?;
                let key = crate::jwt::JwtKey::from_config(secret.expose())
                    .map_err(|m| self.at(spanned, m))?;
                Some(std::sync::Arc::new(key))
            }
        };
        if format == TokenFormat::Jwt && jwt.is_none() {
            return Err(self.at(
                raw.format.as_ref().expect("format named"),
                "format = \"jwt\" needs jwt_key",
            ));
        }
        Ok(TokensConfig {
            default_ttl: self.duration(&raw.default_ttl, DEFAULT_TOKEN_TTL)?,
            max_ttl: self.duration(&raw.max_ttl, MAX_TOKEN_TTL)?,
            format,
            jwt,
        })
    }

    fn x509(
        &self,
        raw: &Spanned<RawX509>,
        server: &ServerConfig,
    ) -> Result<X509Config, ConfigError> {
        let x = raw.get_ref();
        let token_ttl = self.duration(&x.token_ttl, Duration::from_secs(3600))?;
        if token_ttl.is_zero() {
            return Err(self.at(
                x.token_ttl.as_ref().expect("a zero ttl was written"),
                "x509 token_ttl must be longer than 0",
            ));
        }
        let dn_format = match &x.dn_format {
            None => DnFormat::Slash,
            Some(f) => match f.get_ref().as_str() {
                "slash" => DnFormat::Slash,
                "rfc2253" => DnFormat::Rfc2253,
                _ => return Err(self.at(f, "dn_format must be \"slash\" or \"rfc2253\"")),
            },
        };
        if x.identity.iter().any(|i| {
            i.accounts.iter().any(String::is_empty) || i.accounts.is_empty() || i.dn.is_empty()
        }) {
            return Err(self.at(
                raw,
                "every [[x509.identity]] needs a dn and at least one account",
            ));
        }
        let enabled = x.enabled != Some(false);
        if enabled && server.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            return Err(self.at(
                raw,
                "[x509] needs client certificates: set [server.tls] client_ca (or enabled = false)",
            ));
        }
        Ok(X509Config {
            enabled,
            token_ttl,
            dn_format,
            identities: x
                .identity
                .iter()
                .map(|i| (i.dn.clone(), i.accounts.clone()))
                .collect(),
        })
    }

    fn validator(&self, raw: &Spanned<RawValidator>) -> Result<ValidatorConfig, ConfigError> {
        let v = raw.get_ref();
        if let Some(m) = &v.max_concurrent {
            if v.kind.get_ref() != "introspect" {
                return Err(self.at(m, "max_concurrent applies to introspect validators"));
            }
        }
        match v.kind.get_ref().as_str() {
            "static" => {
                if v.token.is_empty() {
                    return Err(self.at(
                        raw,
                        "a static validator needs at least one [[validator.token]]",
                    ));
                }
                let mut tokens = Vec::new();
                for t in &v.token {
                    let sha = self.secret(&t.get_ref().sha256)?;
                    let bytes = hex::decode(sha.expose().trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| {
                            self.at(
                                &t.get_ref().sha256,
                                "sha256 must be 64 hex digits (see `tokengate hash TOKEN`)",
                            )
                        })?;
                    tokens.push(StaticToken {
                        sha256: bytes,
                        subject: t.get_ref().subject.clone(),
                        account: t
                            .get_ref()
                            .account
                            .clone()
                            .unwrap_or_else(|| t.get_ref().subject.clone()),
                    });
                }
                Ok(ValidatorConfig::Static(tokens))
            }
            "introspect" => {
                let url = v
                    .url
                    .as_ref()
                    .ok_or_else(|| self.at(raw, "an introspect validator needs url"))?;
                let uri = self.http_url(url, "url")?;
                let header = match &v.header {
                    Some(h) => self.header_name(h)?,
                    None => http::header::AUTHORIZATION,
                };
                let value = match &v.value {
                    Some(val) => self.template(val)?,
                    None if header == http::header::AUTHORIZATION => {
                        Template::parse("Bearer {token}").map_err(|m| self.at(raw, m))?
                    }
                    None => Template::parse("{token}").map_err(|m| self.at(raw, m))?,
                };
                Ok(ValidatorConfig::Introspect(IntrospectConfig {
                    url: uri,
                    header,
                    value,
                    subject: v
                        .subject
                        .as_ref()
                        .map(|s| self.json_pointer(s))
                        .transpose()?,
                    account: v
                        .account
                        .as_ref()
                        .map(|s| self.json_pointer(s))
                        .transpose()?,
                    timeout: self.duration(&v.timeout, Duration::from_secs(2))?,
                    max_concurrent: self.positive(&v.max_concurrent, 64)?,
                }))
            }
            "jwt" => {
                let sources = [
                    v.jwks_url.is_some(),
                    v.public_key.is_some(),
                    v.secret.is_some(),
                ];
                if sources.iter().filter(|s| **s).count() != 1 {
                    return Err(self.at(
                        raw,
                        "a jwt validator needs exactly one of jwks_url, public_key, secret",
                    ));
                }
                let keys = if let Some(url) = &v.jwks_url {
                    JwtKeySource::Jwks(self.http_url(url, "jwks_url")?)
                } else if let Some(file) = &v.public_key {
                    let path = self.file(file);
                    let pem = std::fs::read_to_string(&path).map_err(|e| {
                        self.at(
                            file,
                            format!("cannot read public_key {}: {e}", path.display()),
                        )
                    })?;
                    crate::jwt_validator::public_key(&pem).map_err(|m| self.at(file, m))?;
                    JwtKeySource::PublicKey { path, pem }
                } else {
                    let field = v.secret.as_ref().expect("one key source");
                    let secret = self.secret(field)?;
                    if secret.expose().len() < 32 {
                        return Err(
                            self.at(field, "a jwt validator secret needs at least 32 bytes")
                        );
                    }
                    JwtKeySource::Secret(secret)
                };
                let text = |s: &Option<Spanned<String>>, what: &str| match s {
                    Some(s) if s.get_ref().is_empty() => {
                        Err(self.at(s, format!("{what} must not be empty")))
                    }
                    Some(s) => Ok(Some(s.get_ref().clone())),
                    None => Ok(None),
                };
                Ok(ValidatorConfig::Jwt(JwtValidatorConfig {
                    issuer: text(&v.issuer, "issuer")?,
                    audience: text(&v.audience, "audience")?,
                    keys,
                    subject_claim: text(&v.subject_claim, "subject_claim")?
                        .unwrap_or_else(|| "sub".to_string()),
                    timeout: self.duration(&v.timeout, Duration::from_secs(2))?,
                }))
            }
            other => Err(self.at(
                &v.kind,
                format!(
                    "validator type must be \"static\", \"introspect\" or \"jwt\", not {other:?}"
                ),
            )),
        }
    }

    /// An absolute http:// or https:// URL.
    fn http_url(&self, value: &Spanned<String>, key: &str) -> Result<Uri, ConfigError> {
        value
            .get_ref()
            .parse()
            .ok()
            .filter(|u: &Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            })
            .ok_or_else(|| {
                self.at(
                    value,
                    format!("{key} must be an absolute http:// or https:// URL"),
                )
            })
    }

    fn json_pointer(&self, value: &Spanned<String>) -> Result<String, ConfigError> {
        match value.get_ref().strip_prefix("json:") {
            Some(pointer) if pointer.is_empty() || pointer.starts_with('/') => {
                Ok(pointer.to_string())
            }
            _ => Err(self.at(value, "expected \"json:/pointer\", e.g. \"json:/uid\"")),
        }
    }

    fn header_name(&self, value: &Spanned<String>) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(value.get_ref().as_bytes())
            .map_err(|_| self.at(value, format!("invalid header name {:?}", value.get_ref())))
    }

    fn template(&self, value: &Spanned<String>) -> Result<Template, ConfigError> {
        let resolved = self.secret(value)?;
        Template::parse(resolved.expose()).map_err(|m| {
            if is_secret(value.get_ref()) {
                // The message would quote the secret.
                self.at(
                    value,
                    "the value, after ${...} substitution, is not a valid header value template",
                )
            } else {
                self.at(value, m)
            }
        })
    }

    fn route(&self, raw: &Spanned<RawRoute>) -> Result<RouteConfig, ConfigError> {
        let r = raw.get_ref();
        let prefix = r.path_prefix.get_ref();
        if !prefix.starts_with('/') {
            return Err(self.at(&r.path_prefix, "path_prefix must start with '/'"));
        }
        // Requests are routed by their normalised path: a prefix that is not normal would
        // never match.
        if crate::path::normalize(prefix).ok().as_deref() != Some(prefix.as_str()) {
            return Err(self.at(
                &r.path_prefix,
                "path_prefix must be a normalised path (no '//', dot segments or %-escaped \
                 letters)",
            ));
        }
        // Routes are picked under several readings of a path (SPEC §9); a prefix that the
        // readings would themselves change could not be matched alike under all of them.
        if !crate::path::reads_alike(prefix) {
            return Err(self.at(
                &r.path_prefix,
                "path_prefix must not hold '%', ';', a space or a segment ending in '.' \
                 (upstreams read those differently)",
            ));
        }
        let upstream: Uri = r
            .upstream
            .get_ref()
            .parse()
            .ok()
            .filter(|u: &Uri| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            })
            .ok_or_else(|| {
                self.at(
                    &r.upstream,
                    "upstream must be http://HOST:PORT or https://HOST:PORT, without a path",
                )
            })?;
        let auth = match r.auth.as_ref().map(|a| (a, a.get_ref().as_str())) {
            None | Some((_, "required")) => AuthMode::Required,
            Some((_, "optional")) => AuthMode::Optional,
            Some((_, "none")) => AuthMode::None,
            Some((a, other)) => {
                return Err(self.at(
                    a,
                    format!("auth must be \"required\", \"optional\" or \"none\", not {other:?}"),
                ))
            }
        };
        let upstream_auth = match &r.upstream_auth {
            None => None,
            Some(ua) => Some((self.header_name(&ua.header)?, self.template(&ua.value)?)),
        };
        let mut identity_headers = Vec::new();
        let mut names: Vec<_> = r.identity_headers.iter().collect();
        // HashMap order is random; keep the output stable.
        names.sort_by_key(|(_, v)| v.span().start);
        for (name, value) in names {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| self.at(value, format!("invalid header name {name:?}")))?;
            identity_headers.push((header, self.template(value)?));
        }
        if let Some((name, _)) = &upstream_auth {
            if identity_headers.iter().any(|(h, _)| h == name) {
                return Err(self.at(
                    &r.upstream_auth.as_ref().expect("checked").header,
                    "upstream_auth header is also an identity header",
                ));
            }
        }
        let mut upgrades = Vec::new();
        match &r.upgrades {
            None => upgrades.push("websocket".to_string()),
            Some(list) => {
                for u in list {
                    let protocol = u.get_ref().trim().to_ascii_lowercase();
                    if protocol.starts_with("h2c") {
                        return Err(self.at(
                            u,
                            "h2c is never passed through: a tunnel to the upstream's HTTP/2 \
                             would carry requests the gate never saw",
                        ));
                    }
                    if protocol.is_empty()
                        || !protocol.bytes().all(|b| b.is_ascii_graphic() && b != b',')
                    {
                        return Err(
                            self.at(u, "an upgrade protocol is one token, e.g. \"websocket\"")
                        );
                    }
                    upgrades.push(protocol);
                }
            }
        }
        Ok(RouteConfig {
            path_prefix: prefix.clone(),
            upstream,
            auth,
            preserve_host: r.preserve_host.unwrap_or(true),
            timeout: self.duration(&r.timeout, Duration::from_secs(60))?,
            upstream_ca: match &r.upstream_ca {
                None => None,
                Some(ca) => {
                    let path = self.file(ca);
                    crate::upstream::client(Some(&path)).map_err(|m| self.at(ca, m))?;
                    Some(path)
                }
            },
            upstream_auth,
            identity_headers,
            upgrades,
            max_inflight: self.positive(&r.max_inflight, 1024)?,
            max_idle_connections: match &r.max_idle_connections {
                None => 64,
                Some(v) if *v.get_ref() >= 0 => *v.get_ref() as usize,
                Some(v) => return Err(self.at(v, "must be 0 or more")),
            },
            preserve_header_case: r.preserve_header_case.unwrap_or(true),
        })
    }
}

/// `[tokens] default_ttl` when not set.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// `[tokens] max_ttl` when not set.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl TokensConfig {
    /// The lifetime of a new API token asked for `requested` (`None`: the default; zero:
    /// until revoked), or why it is refused: no API token outlives `max_ttl`.
    pub fn lifetime(&self, requested: Option<Duration>) -> Result<Duration, String> {
        let cap = self.max_ttl;
        match requested {
            None if cap.is_zero() => Ok(self.default_ttl),
            None if self.default_ttl.is_zero() => Ok(cap),
            None => Ok(self.default_ttl.min(cap)),
            Some(ttl) if !cap.is_zero() && (ttl.is_zero() || ttl > cap) => Err(format!(
                "ttl exceeds the longest lifetime allowed ([tokens] max_ttl = \"{}\")",
                format_duration(cap)
            )),
            Some(ttl) => Ok(ttl),
        }
    }
}

/// Whether `url` can be a `[endpoints] login_url`: an absolute http(s) URL with a host, or a
/// path on this origin (not `//host`, which browsers read as another origin).
fn login_url_ok(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    match uri.scheme_str() {
        Some("http" | "https") => uri.host().is_some_and(|h| !h.is_empty()),
        Some(_) => false,
        None => {
            url.starts_with('/')
                && !url.starts_with("//")
                && !url.contains('\\')
                && uri.authority().is_none()
        }
    }
}

/// A duration as a config writes it: in the largest unit that divides it (`"365d"`, `"90m"`,
/// `"1500ms"`), never in humantime's months of 30.44 days.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".to_string();
    }
    let units: [(u128, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    match units.iter().find(|(size, _)| ms.is_multiple_of(*size)) {
        Some((size, unit)) => format!("{}{unit}", ms / size),
        None => format!("{ms}ms"),
    }
}

/// Parses `"250ms"`, `"10s"`, `"1h"`, `"30d"`, `"0"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("invalid duration {text:?}: expected e.g. \"250ms\", \"10s\", \"1h\", \"30d\"")
    })
}

/// Replaces every `${env:NAME}` (the variable) and `${file:/path}` (the file's content,
/// trailing newline trimmed) anywhere in `text`: `"ApiKey ${env:KEY}"` works. Other text is
/// kept as it is.
pub fn resolve_secret(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let inner = &after[..end];
        let value = if let Some(name) = inner.strip_prefix("env:") {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
        } else if let Some(path) = inner.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read secret file {path}: {e}"))?
        } else {
            out.push_str(&rest[..start + 2]);
            rest = after;
            continue;
        };
        out.push_str(&rest[..start]);
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a config string draws on a secret (`${env:…}` / `${file:…}`): then nothing derived
/// from its value is ever printed.
pub fn is_secret(text: &str) -> bool {
    text.contains("${env:") || text.contains("${file:")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:8080"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.cache.ttl, Duration::from_secs(3600));
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(10));
        assert_eq!(c.server.max_header_bytes, 16384);
        assert_eq!(c.server.max_body_bytes, 0);
        assert_eq!(c.sources, Source::defaults());
        assert_eq!(c.routes[0].auth, AuthMode::Required);
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\n  bogus = 1\n").unwrap_err();
        assert_eq!((e.line, e.col), (3, 3), "{e}");
        assert!(e.message.contains("bogus"), "{e}");
        assert!(e.to_string().starts_with("t.toml:3:3: "), "{e}");
    }

    #[test]
    fn bad_duration_has_line_and_column() {
        let e = parse(&format!("{MINIMAL}[cache]\nttl = \"soon\"\n")).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert_eq!(e.col, 7, "{e}");
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn routes_sorted_longest_first() {
        let c = parse(&format!(
            "{MINIMAL}[[route]]\npath_prefix = \"/api/v2\"\nupstream = \"http://127.0.0.1:9\"\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].path_prefix, "/api/v2");
    }

    #[test]
    fn durations_are_written_as_a_config_would() {
        for (text, d) in [
            ("365d", Duration::from_secs(365 * 86_400)),
            ("36h", Duration::from_secs(36 * 3600)),
            ("90m", Duration::from_secs(90 * 60)),
            ("61s", Duration::from_secs(61)),
            ("1500ms", Duration::from_millis(1500)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text).unwrap(), d);
        }
    }

    #[test]
    fn secrets() {
        std::env::set_var("TG_TEST_SECRET", "s3cret");
        assert_eq!(resolve_secret("${env:TG_TEST_SECRET}").unwrap(), "s3cret");
        assert_eq!(
            resolve_secret("ApiKey ${env:TG_TEST_SECRET}!${x} $ {").unwrap(),
            "ApiKey s3cret!${x} $ {"
        );
        assert!(resolve_secret("${env:TG_TEST_NOT_SET_ANYWHERE}").is_err());
        assert_eq!(format!("{:?}", Secret("x".into())), "[redacted]");
        assert!(is_secret("a ${file:/x} b") && !is_secret("{token}"));
        // An invalid value drawn from a secret is reported without it.
        std::env::set_var("TG_TEST_BAD_SECRET", "bad\u{7f}value-s3cret");
        let e = parse(&format!(
            "{MINIMAL}[route.upstream_auth]\nheader = \"x-key\"\nvalue = \"k ${{env:TG_TEST_BAD_SECRET}}\"\n"
        ))
        .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn validator_concurrency() {
        let introspect = "[[validator]]\ntype = \"introspect\"\nurl = \"http://127.0.0.1:1/w\"\n";
        let c = parse(&format!("{introspect}{MINIMAL}")).unwrap();
        assert!(
            matches!(&c.validators[0], ValidatorConfig::Introspect(i) if i.max_concurrent == 64)
        );
        let c = parse(&format!("{introspect}max_concurrent = 8\n{MINIMAL}")).unwrap();
        assert!(
            matches!(&c.validators[0], ValidatorConfig::Introspect(i) if i.max_concurrent == 8)
        );
        for bad in [
            format!("{introspect}max_concurrent = 0\n{MINIMAL}"),
            format!("[[validator]]\ntype = \"static\"\nmax_concurrent = 8\n[[validator.token]]\nsha256 = \"{}\"\nsubject = \"a\"\n{MINIMAL}", "0".repeat(64)),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_lifetimes_are_capped() {
        let day = Duration::from_secs(86_400);
        let tokens = |default_ttl, max_ttl| TokensConfig {
            default_ttl,
            max_ttl,
            format: TokenFormat::Opaque,
            jwt: None,
        };
        let t = tokens(90 * day, 30 * day);
        assert_eq!(t.lifetime(None), Ok(30 * day));
        assert_eq!(t.lifetime(Some(day)), Ok(day));
        assert_eq!(t.lifetime(Some(30 * day)), Ok(30 * day));
        assert!(t
            .lifetime(Some(31 * day))
            .unwrap_err()
            .contains("max_ttl = \"30d\""));
        assert!(t.lifetime(Some(Duration::ZERO)).is_err(), "ttl 0 = forever");
        assert_eq!(
            tokens(Duration::ZERO, 30 * day).lifetime(None),
            Ok(30 * day)
        );
        let uncapped = tokens(Duration::ZERO, Duration::ZERO);
        assert_eq!(uncapped.lifetime(Some(Duration::ZERO)), Ok(Duration::ZERO));
        assert_eq!(uncapped.lifetime(None), Ok(Duration::ZERO));
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.tokens.lifetime(None),
            Ok(90 * day),
            "defaults: 90d, capped at 365d"
        );
        assert!(c.tokens.lifetime(Some(366 * day)).is_err());
    }

    #[test]
    fn boundary_settings() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.routes[0].upgrades, ["websocket"]);
        assert!(!c.server.allow_underscores_in_headers);
        assert!(c.endpoints.self_service);
        let refused = [
            ("[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nupgrades = [\"H2C\"]\n", "h2c"),
            ("[credentials]\nsources = [\"header:X_Key\"]\n", "allow_underscores_in_headers"),
            ("[credentials]\nsources = [\"bearer\"]\nkeep = [\"cookie:s\"]\n", "not one of"),
            (
                "[credentials]\nsources = [\"header:x-auth-user\"]\nkeep = [\"header:x-auth-user\"]\n\
                 [[route]]\npath_prefix = \"/x\"\nupstream = \"http://127.0.0.1:1\"\n\
                 [route.identity_headers]\n\"X-Auth-User\" = \"{subject}\"\n",
                "kept credential",
            ),
        ];
        for (extra, why) in refused {
            let text = if extra.starts_with("[[route]]") {
                extra.to_string()
            } else {
                format!("{extra}{MINIMAL}")
            };
            let e = parse(&text).unwrap_err();
            assert!(e.message.contains(why), "{why}: {e}");
        }
        let ok = parse(&format!(
            "[server]\nallow_underscores_in_headers = true\n[credentials]\n\
             sources = [\"header:X_Key\", \"cookie:session\"]\nkeep = [\"cookie:session\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(ok.keep, [Source::Cookie("session".into())]);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("0").unwrap(), 0);
        assert_eq!(parse_byte_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_byte_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_byte_size("ten").is_err());
        assert!(parse_byte_size("1XB").is_err());
    }
}
