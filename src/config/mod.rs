//! Configuration as data: the checked [`Config`] (values, durations, paths, the places they were
//! written), made by `check` from the raw TOML structs of `raw`. Every error carries the line
//! and column it was found at, so `tokengate check` prints `PATH:LINE:COL: message`. Nothing here
//! builds a runtime object; `gate` does, from this.

mod check;
mod raw;

use check::{read, Checker};
pub use raw::parse_byte_size;
use raw::RawTokens;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Uri};
use toml::Spanned;

use crate::credential::Source;
use crate::template::Template;
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

/// Where in the config file a value was written, so that a step building its runtime object from
/// it later (loading a certificate, say) can report the failure there. Not part of the value:
/// two positions always compare equal, so configs that say the same compare equal wherever they
/// say it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl PartialEq for Position {
    fn eq(&self, _: &Position) -> bool {
        true
    }
}

impl Eq for Position {}

impl Config {
    /// An error at `at` in this config's file.
    pub fn error_at(&self, at: Position, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.origin.clone(),
            line: at.line,
            col: at.col,
            message: message.into(),
        }
    }
}

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
    /// `[limits]`: abuse control for the whole process.
    pub limits: LimitsConfig,
    /// The file this config was read from, as given (for error messages).
    pub origin: PathBuf,
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
    /// The scopes a user may give an API token (`scopes`; route rules say what each allows).
    pub scopes: Vec<String>,
    /// The scopes a token made with a login credential that has no scope facts of its own may
    /// have, and has when the request names none (`login_scopes`; default: all of `scopes`).
    /// Also what the admin API and the CLI give when they name none.
    pub login_scopes: Vec<String>,
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
    /// More request headers removed on every route, beside the built-in list (lower case).
    pub strip_headers: Vec<http::HeaderName>,
    /// Networks whose `X-Forwarded-For` is believed: the real client address.
    pub trusted_proxies: crate::client_addr::TrustedProxies,
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
    /// Where the table was written.
    pub at: Position,
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
    /// An OAuth 2.0 authorization server's token introspection endpoint (RFC 7662).
    OAuth2(OAuth2Config),
}

impl ValidatorConfig {
    /// The validator's type, as in the config and the `source` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidatorConfig::Static(_) => "static",
            ValidatorConfig::Introspect(_) => "introspect",
            ValidatorConfig::Jwt(_) => "jwt",
            ValidatorConfig::OAuth2(_) => "oauth2_introspection",
        }
    }
}

/// `type = "jwt"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtValidatorConfig {
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// `aud` must hold one of these, when any is set.
    pub audience: Vec<String>,
    /// The claim (dotted path) holding the token's groups.
    pub groups_claim: Option<String>,
    /// Where the verification keys come from.
    pub keys: JwtKeySource,
    /// The claim that names the subject (default `sub`).
    pub subject_claim: String,
    /// How long fetching the JWKS (or the discovery document) may take.
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
        /// Where `public_key` was written.
        at: Position,
    },
    /// An HMAC secret (HS256/HS384/HS512).
    Secret(Secret),
    /// OIDC discovery: the JWKS named by `jwks_uri` in this
    /// `{issuer}/.well-known/openid-configuration` document, whose `issuer` must be the
    /// configured one; both are fetched when first needed and refreshed like a `Jwks` URL.
    Discovery(Uri),
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
    /// Its groups, for route rules.
    pub groups: Vec<String>,
    /// Its scopes, for route rules.
    pub scopes: Vec<String>,
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
    /// Where the groups come from: a JSON pointer (an array, or one string).
    pub groups: Option<String>,
    /// Where the scopes come from: a JSON pointer (an array, or a space-separated string).
    pub scopes: Option<String>,
    /// How long one call may take (waiting for a free call slot included).
    pub timeout: Duration,
    /// Calls in flight at once; more wait (SPEC §9: every validator's calls are capped).
    pub max_concurrent: usize,
}

/// `type = "oauth2_introspection"` (RFC 7662).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Config {
    /// The introspection endpoint, called with `POST` and a form-encoded `token`.
    pub url: Uri,
    /// The client credentials tokengate presents with HTTP Basic (RFC 6749 §2.3.1), when set.
    pub client: Option<(String, Secret)>,
    /// `aud` must hold one of these, when any is set.
    pub audience: Vec<String>,
    /// The `iss` an answer must carry, when set.
    pub issuer: Option<String>,
    /// The member naming the subject (default `sub`; `username` when it is absent).
    pub subject_claim: String,
    /// The member (dotted path) holding the groups.
    pub groups_claim: Option<String>,
    /// How long one call may take; waiting for a free call slot has a bound of its own as long.
    pub timeout: Duration,
    /// Calls in flight at once; more wait for a slot, served round-robin by client.
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
    /// `scheme://authority` of the upstream (for a Unix socket, `http://localhost`: its `Host`).
    pub upstream: Uri,
    /// The Unix socket the upstream listens on (`upstream = "unix:/path"`), instead of TCP.
    pub upstream_socket: Option<PathBuf>,
    /// Whether a credential is needed.
    pub auth: AuthMode,
    /// Forward the client's Host header (else the upstream's authority).
    pub preserve_host: bool,
    /// Time allowed for the upstream's response head.
    pub timeout: Duration,
    /// CA bundle for an https:// upstream (else the system roots).
    pub upstream_ca: Option<PathBuf>,
    /// Where `upstream_ca` was written.
    pub upstream_ca_at: Position,
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
    /// `[[route.rate_limit]]`, in the order written; every one applies.
    pub rate_limits: Vec<RateLimitConfig>,
    /// `[[route.deny]]`: a request matching one is refused (403).
    pub deny: Vec<Rule>,
    /// `[[route.allow]]`: when there are any, a request must match one (else 403).
    pub allow: Vec<Rule>,
    /// `preflight = "pass"`: a CORS preflight goes to the upstream without a credential.
    pub preflight_passes: bool,
}

/// One `[[route.deny]]` or `[[route.allow]]` (SPEC §10): every key given must match (and),
/// within a key any value listed (or). Absent keys match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// How the log line names it: `deny[0]`, `allow[2]`.
    pub label: String,
    /// Request methods (compared case-insensitively).
    pub methods: Option<Vec<http::Method>>,
    /// Whole-segment path prefixes, normalised.
    pub paths: Option<Vec<String>>,
    /// Verified subjects.
    pub subjects: Option<Vec<String>>,
    /// Verified accounts.
    pub accounts: Option<Vec<String>>,
    /// Groups, one of which the credential must have.
    pub groups: Option<Vec<String>>,
    /// Scopes, one of which the credential must have.
    pub scopes: Option<Vec<String>>,
    /// Where the credential came from.
    pub sources: Option<Vec<RuleSource>>,
    /// Networks the client address lies in.
    pub clients: Option<Vec<ipnet::IpNet>>,
    /// Claims (dotted path) and the values one of which they must have.
    pub claims: Vec<(String, Vec<String>)>,
}

impl Rule {
    /// Whether the rule reads anything but the client address (then a credential is needed).
    pub fn needs_credential(&self) -> bool {
        self.methods.is_some()
            || self.paths.is_some()
            || self.subjects.is_some()
            || self.accounts.is_some()
            || self.groups.is_some()
            || self.scopes.is_some()
            || self.sources.is_some()
            || !self.claims.is_empty()
    }
}

/// A rule's `sources` entry: a dialect, or `x509` (a credential from a certificate exchange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// A credential source, as `[credentials] sources` names it.
    Dialect(Source),
    /// A token exchanged for a client certificate.
    X509,
}

/// A token bucket: `count` tokens come back every `period`, and it holds at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens per `period` (at least 1).
    pub count: u32,
    /// The period of `count` (longer than 0).
    pub period: Duration,
    /// The most tokens the bucket holds: requests allowed at once after a quiet spell.
    pub burst: u32,
}

/// What a bucket counts for: whose requests share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Invalid credentials per client address (`[limits] failed_auth`).
    FailedAuth,
    /// Requests per verified subject.
    Subject,
    /// Requests per credential.
    Token,
    /// Requests per client address.
    Client,
}

impl LimitKind {
    /// The name in the access log, the `limit` metric label and the `RateLimit` headers.
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::FailedAuth => "failed_auth",
            LimitKind::Subject => "subject",
            LimitKind::Token => "token",
            LimitKind::Client => "client",
        }
    }
}

/// One `[[route.rate_limit]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Whose requests share a bucket (`per`): `subject`, `token` or `client`.
    pub per: LimitKind,
    /// The bucket (`rate` and `burst`).
    pub bucket: BucketConfig,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Invalid credentials per client address before it gets 429 without a validator being
    /// asked; `None` (`failed_auth = "0"`): unlimited.
    pub failed_auth: Option<BucketConfig>,
    /// The most buckets of each kind held at once (memory bound).
    pub max_tracked: usize,
    /// Keep the buckets in the Redis store, shared by every replica.
    pub shared: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            failed_auth: Some(BucketConfig {
                count: 20,
                period: Duration::from_secs(60),
                burst: 10,
            }),
            max_tracked: 100_000,
            shared: false,
        }
    }
}

/// Parses a rate, `"N/PERIOD"` (`"100/1s"`, `"20/1m"`, `"1000/1h"`): `None` for `"0"` (off).
pub fn parse_rate(text: &str) -> Result<Option<(u32, Duration)>, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(None);
    }
    let wrong =
        || format!("invalid rate {text:?}: expected N/PERIOD, e.g. \"100/1s\" or \"20/1m\"");
    let (count, period) = text.split_once('/').ok_or_else(wrong)?;
    let count: u32 = count.trim().parse().map_err(|_| wrong())?;
    let period = period.trim();
    // "100/s" reads as "100/1s".
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(period).map_err(|_| wrong())?
    } else {
        parse_duration(&format!("1{period}")).map_err(|_| wrong())?
    };
    if count == 0 || period.is_zero() {
        return Err(format!(
            "invalid rate {text:?}: N and PERIOD must be more than 0 (\"0\" turns the limit off)"
        ));
    }
    if period > Duration::from_secs(24 * 3600) {
        return Err(format!(
            "invalid rate {text:?}: the period is at most a day"
        ));
    }
    Ok(Some((count, period)))
}

/// `serve --listen`: the main listener's address, whatever the file says (on reload too).
static LISTEN_OVERRIDE: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// Makes every later `Config::load` listen on `addr` (`serve --listen`); set once, at startup.
pub fn override_listen(addr: SocketAddr) {
    let _ = LISTEN_OVERRIDE.set(addr);
}

impl Config {
    /// The claims (dotted paths) that route rules and identity headers read: what validators
    /// keep of a JWT or an introspection answer, beside groups and scopes.
    pub fn claim_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for route in &self.routes {
            let rules = route.deny.iter().chain(&route.allow);
            let from_rules = rules.flat_map(|r| r.claims.iter().map(|(n, _)| n.as_str()));
            let templates = route
                .identity_headers
                .iter()
                .map(|(_, t)| t)
                .chain(route.upstream_auth.as_ref().map(|(_, t)| t));
            let from_templates = templates.flat_map(|t| t.claim_names());
            for name in from_rules.chain(from_templates) {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
        names
    }

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
    fn token_scopes_and_login_scopes_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.tokens.scopes.is_empty() && c.tokens.login_scopes.is_empty());
        let c = parse(&format!(
            "[tokens]\nscopes = [\"read\", \"write\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.tokens.login_scopes,
            ["read", "write"],
            "default: all scopes"
        );
        let c = parse(&format!(
            "[tokens]\nscopes = [\"read\", \"write\"]\nlogin_scopes = []\n{MINIMAL}"
        ))
        .unwrap();
        assert!(c.tokens.login_scopes.is_empty());
        for (bad, col, says) in [
            (
                "login_scopes = [\"read\", \"admin\"]",
                25,
                "not in [tokens] scopes",
            ),
            ("login_scopes = [\"read\", \"read\"]", 25, "twice"),
        ] {
            let text = format!("[tokens]\nscopes = [\"read\", \"write\"]\n{bad}\n{MINIMAL}");
            let e = parse(&text).unwrap_err();
            assert_eq!((e.line, e.col), (3, col), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        for bad in [
            "[\"read\", \"read\"]",
            "[\"\"]",
            "[\"read write\"]",
            "[\"a,b\"]",
        ] {
            let e = parse(&format!("[tokens]\nscopes = {bad}\n{MINIMAL}")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
        }
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
            scopes: Vec::new(),
            login_scopes: Vec::new(),
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
