//! The checker: raw TOML structs in, the checked `Config` out — values parsed, defaults
//! applied, every rule a config must keep, and the place of every error (`PATH:LINE:COL`).
//! Data only: what a step builds from the config (a TLS acceptor, a client) is the step's job.

use super::raw::*;
use super::*;

/// A config file's text.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        line: 0,
        col: 0,
        message: format!("cannot read config: {e}"),
    })
}

/// The keys each `[[validator]]` type reads, besides `type`.
const VALIDATOR_KEYS: &[(&str, &[&str])] = &[
    ("static", &["token"]),
    (
        "introspect",
        &[
            "url",
            "header",
            "value",
            "subject",
            "account",
            "groups",
            "scopes",
            "timeout",
            "max_concurrent",
        ],
    ),
    (
        "jwt",
        &[
            "issuer",
            "audience",
            "groups_claim",
            "jwks_url",
            "public_key",
            "secret",
            "subject_claim",
            "timeout",
        ],
    ),
    (
        "oauth2_introspection",
        &[
            "url",
            "client_id",
            "client_secret",
            "audience",
            "issuer",
            "subject_claim",
            "groups_claim",
            "timeout",
            "max_concurrent",
        ],
    ),
];

/// Turns raw structs into the checked config, with the text at hand for line:col.
pub(super) struct Checker<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Checker<'_> {
    /// The TOML, parsed into the raw structs (unknown keys refused).
    pub(super) fn raw(&self) -> Result<RawConfig, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.error(span, e.message().trim().to_string())
        })
    }

    pub(super) fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
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

    /// Where `value` was written.
    pub(super) fn position<T>(&self, value: &Spanned<T>) -> Position {
        let place = self.error(value.span(), "");
        Position {
            line: place.line,
            col: place.col,
        }
    }

    pub(super) fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span(), message)
    }

    pub(super) fn duration(
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
    pub(super) fn nonzero(
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

    pub(super) fn positive(
        &self,
        value: &Option<Spanned<i64>>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() > 0 => Ok(*v.get_ref() as usize),
            Some(v) => Err(self.at(v, "must be a positive number")),
        }
    }

    /// Resolves `${env:NAME}` and `${file:/path}`; anything else is taken literally.
    pub(super) fn secret(&self, value: &Spanned<String>) -> Result<Secret, ConfigError> {
        resolve_secret(value.get_ref())
            .map(Secret)
            .map_err(|m| self.at(value, m))
    }

    /// A file path from the config, relative to the config file's folder.
    pub(super) fn file(&self, value: &Spanned<String>) -> PathBuf {
        let path = Path::new(value.get_ref());
        if path.is_absolute() {
            return path.to_owned();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub(super) fn check(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
        let limits = self.limits(&raw.limits, &store)?;
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
            limits,
            origin: self.path.to_owned(),
        })
    }

    /// `[limits]`: the failed-credential bucket, the memory bound, sharing through Redis.
    pub(super) fn limits(
        &self,
        raw: &RawLimits,
        store: &StoreConfig,
    ) -> Result<LimitsConfig, ConfigError> {
        let defaults = LimitsConfig::default();
        let burst = match &raw.failed_auth_burst {
            None => 10,
            Some(b) => self.burst(b)?,
        };
        let failed_auth = match &raw.failed_auth {
            None => defaults.failed_auth,
            Some(rate) => parse_rate(rate.get_ref())
                .map_err(|m| self.at(rate, m))?
                .map(|(count, period)| BucketConfig {
                    count,
                    period,
                    burst,
                }),
        };
        let shared = raw.shared.as_ref().is_some_and(|s| *s.get_ref());
        if let Some(s) = raw.shared.as_ref().filter(|s| *s.get_ref()) {
            if !matches!(store, StoreConfig::Redis { .. }) {
                return Err(self.at(
                    s,
                    "shared = true keeps the buckets in Redis: it needs [store] backend = \"redis\"",
                ));
            }
        }
        Ok(LimitsConfig {
            failed_auth,
            max_tracked: self.positive(&raw.max_tracked, defaults.max_tracked)?,
            shared,
        })
    }

    /// A route's `[[route.deny]]` or `[[route.allow]]` tables (`kind`), on a route with `auth`.
    fn rules(
        &self,
        raw: &[Spanned<RawRule>],
        kind: &str,
        auth: AuthMode,
    ) -> Result<Vec<Rule>, ConfigError> {
        let mut rules = Vec::new();
        for (i, spanned) in raw.iter().enumerate() {
            let r = spanned.get_ref();
            let texts = |list: &Option<Vec<Spanned<String>>>, key: &str| match list {
                None => Ok(None),
                Some(list) if list.is_empty() => Err(self.at(
                    spanned,
                    format!("{key} = [] matches nothing: remove the key, or list values"),
                )),
                Some(list) => Ok(Some(list.iter().map(|v| v.get_ref().clone()).collect())),
            };
            let each =
                |list: &Option<Vec<Spanned<String>>>,
                 key: &str,
                 check: &dyn Fn(&Spanned<String>) -> Result<(), ConfigError>| {
                    if let Some(list) = list {
                        for value in list {
                            check(value)?;
                        }
                    }
                    texts(list, key)
                };
            let methods = each(&r.methods, "methods", &|m| {
                http::Method::from_bytes(m.get_ref().as_bytes())
                    .map(drop)
                    .map_err(|_| {
                        self.at(
                            m,
                            format!(
                                "{:?} is not an HTTP method (a token such as \"GET\")",
                                m.get_ref()
                            ),
                        )
                    })
            })?
            .map(|list: Vec<String>| {
                list.iter()
                    .map(|m| {
                        http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .expect("checked")
                    })
                    .collect()
            });
            let paths = each(&r.paths, "paths", &|p| {
                let path = p.get_ref();
                let normal = path.starts_with('/')
                    && crate::path::normalize(path).ok().as_deref() == Some(path.as_str())
                    && crate::path::reads_alike(path);
                if normal {
                    Ok(())
                } else {
                    Err(self.at(p, "a rule's path must be a normalised path starting with '/' (no '//', dot segments, '%', ';', space or segment ending in '.')"))
                }
            })?
            .map(|list: Vec<String>| {
                list.into_iter()
                    .map(|p| match p.trim_end_matches('/') {
                        "" => "/".to_string(),
                        trimmed => trimmed.to_string(),
                    })
                    .collect()
            });
            let sources = match &r.sources {
                None => None,
                Some(list) => {
                    let mut parsed = Vec::new();
                    for s in list {
                        parsed.push(match s.get_ref().as_str() {
                            "x509" => RuleSource::X509,
                            text => {
                                RuleSource::Dialect(Source::parse(text).map_err(|m| self.at(s, m))?)
                            }
                        });
                    }
                    texts(&r.sources, "sources")?;
                    Some(parsed)
                }
            };
            let clients = match &r.clients {
                None => None,
                Some(list) => {
                    texts(&r.clients, "clients")?;
                    Some(
                        list.iter()
                            .map(|c| {
                                crate::client_addr::parse_network(c.get_ref())
                                    .map_err(|m| self.at(c, format!("clients: {m}")))
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                }
            };
            let mut claims = Vec::new();
            let mut names: Vec<_> = r.claims.iter().flatten().collect();
            names.sort_by_key(|(_, v)| v.span().start);
            for (name, value) in names {
                if name.is_empty() || name.split('.').any(str::is_empty) {
                    return Err(self.at(
                        value,
                        format!("{name:?} is not a claim path (e.g. \"realm_access.roles\")"),
                    ));
                }
                let scalar = |v: &toml::Value| match v {
                    toml::Value::String(s) => Some(s.clone()),
                    toml::Value::Integer(n) => Some(n.to_string()),
                    toml::Value::Boolean(b) => Some(b.to_string()),
                    _ => None,
                };
                let values = match value.get_ref() {
                    toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
                    other => scalar(other).map(|v| vec![v]),
                }
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    self.at(value, "a claim's value is a string, number or boolean, or a non-empty list of them")
                })?;
                claims.push((name.clone(), values));
            }
            let rule = Rule {
                label: format!("{kind}[{i}]"),
                methods,
                paths,
                subjects: texts(&r.subjects, "subjects")?,
                accounts: texts(&r.accounts, "accounts")?,
                groups: texts(&r.groups, "groups")?,
                scopes: texts(&r.scopes, "scopes")?,
                sources,
                clients,
                claims,
            };
            if auth == AuthMode::None && rule.needs_credential() {
                return Err(self.at(
                    spanned,
                    "on a route with auth = \"none\" a rule can only use clients (the other keys need a credential)",
                ));
            }
            rules.push(rule);
        }
        Ok(rules)
    }

    /// A bucket's `burst`: 1 or more (a bucket that holds nothing would refuse everything).
    fn burst(&self, value: &Spanned<i64>) -> Result<u32, ConfigError> {
        u32::try_from(*value.get_ref())
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| self.at(value, "burst must be a number from 1 to 4294967295"))
    }

    /// One `[[route.rate_limit]]` of a route with `auth`.
    fn rate_limit(
        &self,
        raw: &Spanned<RawRateLimit>,
        auth: AuthMode,
    ) -> Result<RateLimitConfig, ConfigError> {
        let r = raw.get_ref();
        let per = match r.per.get_ref().as_str() {
            "subject" => LimitKind::Subject,
            "token" => LimitKind::Token,
            "client" => LimitKind::Client,
            other => {
                return Err(self.at(
                    &r.per,
                    format!("per must be \"subject\", \"token\" or \"client\", not {other:?}"),
                ))
            }
        };
        if auth == AuthMode::None && per != LimitKind::Client {
            return Err(self.at(
                &r.per,
                "a route with auth = \"none\" has no subject or token to count: use per = \"client\"",
            ));
        }
        let (count, period) = parse_rate(r.rate.get_ref())
            .map_err(|m| self.at(&r.rate, m))?
            .ok_or_else(|| {
                self.at(
                    &r.rate,
                    "a rate limit's rate cannot be \"0\" (remove the [[route.rate_limit]] instead)",
                )
            })?;
        let burst = match &r.burst {
            None => count,
            Some(b) => self.burst(b)?,
        };
        Ok(RateLimitConfig {
            per,
            bucket: BucketConfig {
                count,
                period,
                burst,
            },
        })
    }

    pub(super) fn tls(&self, tls: &Spanned<RawTls>) -> Result<TlsConfig, ConfigError> {
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
            at: self.position(tls),
        };
        Ok(config)
    }

    /// `alpn`: `h2` and/or `http/1.1`, each once; both when unset.
    pub(super) fn alpn(
        &self,
        raw: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Result<Vec<Alpn>, ConfigError> {
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
    pub(super) fn verify(&self, raw: &Spanned<RawVerify>) -> Result<VerifyConfig, ConfigError> {
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

    pub(super) fn socket_addr(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
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

    pub(super) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
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
        let mut trusted = Vec::new();
        for network in raw.trusted_proxies.iter().flatten() {
            trusted.push(
                crate::client_addr::parse_network(network.get_ref())
                    .map_err(|m| self.at(network, format!("trusted_proxies: {m}")))?,
            );
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
            trusted_proxies: crate::client_addr::TrustedProxies::new(trusted),
            drain_timeout: self.duration(&raw.drain_timeout, Duration::from_secs(30))?,
            tls,
        })
    }

    pub(super) fn sources(
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
    pub(super) fn keep(
        &self,
        raw: &RawCredentials,
        sources: &[Source],
    ) -> Result<Vec<Source>, ConfigError> {
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

    pub(super) fn store(&self, raw: &RawStore) -> Result<StoreConfig, ConfigError> {
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

    pub(super) fn tokens(&self, raw: &RawTokens) -> Result<TokensConfig, ConfigError> {
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
        let scopes = self.scope_names(raw.scopes.as_deref().unwrap_or_default(), None)?;
        let login_scopes = match &raw.login_scopes {
            None => scopes.clone(),
            Some(list) => self.scope_names(list, Some(&scopes))?,
        };
        Ok(TokensConfig {
            scopes,
            login_scopes,
            default_ttl: self.duration(&raw.default_ttl, DEFAULT_TOKEN_TTL)?,
            max_ttl: self.duration(&raw.max_ttl, MAX_TOKEN_TTL)?,
            format,
            jwt,
        })
    }

    /// `[tokens] scopes` (`known` = `None`) or `login_scopes` (each one of `known`): names a
    /// token request, a JWT's `scope` and Insight's comma-separated `scopes=` can carry (no
    /// space, no comma), each once.
    fn scope_names(
        &self,
        list: &[Spanned<String>],
        known: Option<&[String]>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut names: Vec<String> = Vec::with_capacity(list.len());
        for value in list {
            let name = value.get_ref();
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(self.at(
                    value,
                    format!("{name:?} is not a scope name (no spaces or commas, e.g. \"read\")"),
                ));
            }
            if let Some(known) = known {
                if !known.contains(name) {
                    return Err(self.at(
                        value,
                        format!("login_scopes names {name:?}, which is not in [tokens] scopes"),
                    ));
                }
            }
            if names.contains(name) {
                return Err(self.at(value, format!("scope {name:?} is listed twice")));
            }
            names.push(name.clone());
        }
        Ok(names)
    }

    pub(super) fn x509(
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

    pub(super) fn validator(
        &self,
        raw: &Spanned<RawValidator>,
    ) -> Result<ValidatorConfig, ConfigError> {
        let v = raw.get_ref();
        self.validator_keys_fit(v)?;
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
                        groups: t.get_ref().groups.clone(),
                        scopes: t.get_ref().scopes.clone(),
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
                    groups: v
                        .groups
                        .as_ref()
                        .map(|s| self.json_pointer(s))
                        .transpose()?,
                    scopes: v
                        .scopes
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
                let keys = match (sources.iter().filter(|s| **s).count(), &v.issuer) {
                    (1, _) => None,
                    // The issuer alone: its keys are found by OIDC discovery (no fetch here:
                    // `check` works offline).
                    (0, Some(issuer)) => Some(JwtKeySource::Discovery(self.discovery_url(issuer)?)),
                    _ => {
                        return Err(self.at(
                            raw,
                            "a jwt validator needs exactly one of jwks_url, public_key, secret \
                             (or issuer alone, for OIDC discovery)",
                        ))
                    }
                };
                let keys = if let Some(keys) = keys {
                    keys
                } else if let Some(url) = &v.jwks_url {
                    JwtKeySource::Jwks(self.http_url(url, "jwks_url")?)
                } else if let Some(file) = &v.public_key {
                    let path = self.file(file);
                    let pem = std::fs::read_to_string(&path).map_err(|e| {
                        self.at(
                            file,
                            format!("cannot read public_key {}: {e}", path.display()),
                        )
                    })?;
                    JwtKeySource::PublicKey {
                        path,
                        pem,
                        at: self.position(file),
                    }
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
                Ok(ValidatorConfig::Jwt(JwtValidatorConfig {
                    issuer: self.text(&v.issuer, "issuer")?,
                    audience: self.audience(&v.audience)?,
                    groups_claim: self.text(&v.groups_claim, "groups_claim")?,
                    keys,
                    subject_claim: self
                        .text(&v.subject_claim, "subject_claim")?
                        .unwrap_or_else(|| "sub".to_string()),
                    timeout: self.duration(&v.timeout, Duration::from_secs(2))?,
                }))
            }
            "oauth2_introspection" => {
                let url = v
                    .url
                    .as_ref()
                    .ok_or_else(|| self.at(raw, "an oauth2_introspection validator needs url"))?;
                let client = match (&v.client_id, &v.client_secret) {
                    (None, None) => None,
                    (Some(_), Some(secret)) => {
                        let id = self.text(&v.client_id, "client_id")?.unwrap_or_default();
                        let secret_value = self.secret(secret)?;
                        if secret_value.expose().is_empty() {
                            return Err(self.at(secret, "client_secret must not be empty"));
                        }
                        Some((id, secret_value))
                    }
                    (Some(id), None) => {
                        return Err(self.at(
                            id,
                            "client_id needs client_secret (the endpoint is called with HTTP \
                             Basic client credentials)",
                        ))
                    }
                    (None, Some(secret)) => {
                        return Err(self.at(secret, "client_secret needs client_id"))
                    }
                };
                Ok(ValidatorConfig::OAuth2(OAuth2Config {
                    url: self.http_url(url, "url")?,
                    client,
                    audience: self.audience(&v.audience)?,
                    issuer: self.text(&v.issuer, "issuer")?,
                    subject_claim: self
                        .text(&v.subject_claim, "subject_claim")?
                        .unwrap_or_else(|| "sub".to_string()),
                    groups_claim: self.text(&v.groups_claim, "groups_claim")?,
                    timeout: self.duration(&v.timeout, Duration::from_secs(2))?,
                    max_concurrent: self.positive(&v.max_concurrent, 64)?,
                }))
            }
            other => Err(self.at(
                &v.kind,
                format!(
                    "validator type must be \"static\", \"introspect\", \"jwt\" or \
                     \"oauth2_introspection\", not {other:?}"
                ),
            )),
        }
    }

    /// Refuses a key of a `[[validator]]` table that its type does not read (all types share
    /// one raw struct, so serde alone cannot).
    fn validator_keys_fit(&self, v: &RawValidator) -> Result<(), ConfigError> {
        let kind = v.kind.get_ref().as_str();
        let span = |s: Option<&Spanned<String>>| s.map(Spanned::span);
        let written = [
            ("token", v.token.first().map(Spanned::span)),
            ("issuer", span(v.issuer.as_ref())),
            ("audience", v.audience.as_ref().map(Spanned::span)),
            ("groups_claim", span(v.groups_claim.as_ref())),
            ("jwks_url", span(v.jwks_url.as_ref())),
            ("public_key", span(v.public_key.as_ref())),
            ("secret", span(v.secret.as_ref())),
            ("subject_claim", span(v.subject_claim.as_ref())),
            ("url", span(v.url.as_ref())),
            ("header", span(v.header.as_ref())),
            ("value", span(v.value.as_ref())),
            ("subject", span(v.subject.as_ref())),
            ("account", span(v.account.as_ref())),
            ("groups", span(v.groups.as_ref())),
            ("scopes", span(v.scopes.as_ref())),
            ("timeout", span(v.timeout.as_ref())),
            (
                "max_concurrent",
                v.max_concurrent.as_ref().map(Spanned::span),
            ),
            ("client_id", span(v.client_id.as_ref())),
            ("client_secret", span(v.client_secret.as_ref())),
        ];
        // An unknown type is reported as such, by the caller.
        if !VALIDATOR_KEYS.iter().any(|(k, _)| *k == kind) {
            return Ok(());
        }
        for (key, at) in written {
            let Some(at) = at else { continue };
            let types: Vec<&str> = VALIDATOR_KEYS
                .iter()
                .filter(|(_, keys)| keys.contains(&key))
                .map(|(t, _)| *t)
                .collect();
            if !types.contains(&kind) {
                return Err(self.error(
                    at,
                    format!(
                        "{key} applies to {} validators, not {kind}",
                        types.join(" and ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An optional string that, when given, must not be empty.
    fn text(&self, s: &Option<Spanned<String>>, what: &str) -> Result<Option<String>, ConfigError> {
        match s {
            Some(s) if s.get_ref().is_empty() => {
                Err(self.at(s, format!("{what} must not be empty")))
            }
            Some(s) => Ok(Some(s.get_ref().clone())),
            None => Ok(None),
        }
    }

    /// `audience`: a string or a non-empty list of them; none when not given.
    fn audience(&self, a: &Option<Spanned<OneOrMany>>) -> Result<Vec<String>, ConfigError> {
        let Some(a) = a else {
            return Ok(Vec::new());
        };
        let list = match a.get_ref() {
            OneOrMany::One(one) => vec![one.clone()],
            OneOrMany::Many(many) => many.clone(),
        };
        if list.is_empty() || list.iter().any(String::is_empty) {
            return Err(self.at(a, "audience must be a non-empty string or list"));
        }
        Ok(list)
    }

    /// The OIDC discovery document of `issuer`: `{issuer}/.well-known/openid-configuration`
    /// (a trailing slash of the issuer dropped first, as OpenID Connect Discovery §4 says).
    fn discovery_url(&self, issuer: &Spanned<String>) -> Result<Uri, ConfigError> {
        let base = issuer.get_ref().trim_end_matches('/');
        format!("{base}/.well-known/openid-configuration")
            .parse()
            .ok()
            .filter(|u: &Uri| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.query().is_none()
                    && !base.contains('#')
            })
            .ok_or_else(|| {
                self.at(
                    issuer,
                    "issuer must be an absolute http:// or https:// URL without query or \
                     fragment (alone, it is where OIDC discovery looks for the keys)",
                )
            })
    }

    /// An absolute http:// or https:// URL.
    pub(super) fn http_url(&self, value: &Spanned<String>, key: &str) -> Result<Uri, ConfigError> {
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

    pub(super) fn json_pointer(&self, value: &Spanned<String>) -> Result<String, ConfigError> {
        match value.get_ref().strip_prefix("json:") {
            Some(pointer) if pointer.is_empty() || pointer.starts_with('/') => {
                Ok(pointer.to_string())
            }
            _ => Err(self.at(value, "expected \"json:/pointer\", e.g. \"json:/uid\"")),
        }
    }

    pub(super) fn header_name(&self, value: &Spanned<String>) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(value.get_ref().as_bytes())
            .map_err(|_| self.at(value, format!("invalid header name {:?}", value.get_ref())))
    }

    pub(super) fn template(&self, value: &Spanned<String>) -> Result<Template, ConfigError> {
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

    pub(super) fn route(&self, raw: &Spanned<RawRoute>) -> Result<RouteConfig, ConfigError> {
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
        // `unix:/path`: a socket the app listens on (a sidecar and its app share a volume).
        let upstream_socket = match r.upstream.get_ref().strip_prefix("unix:") {
            Some(path) if path.starts_with('/') && path.len() > 1 && !path.contains('\0') => {
                Some(PathBuf::from(path))
            }
            Some(_) => {
                return Err(self.at(
                    &r.upstream,
                    "a Unix-socket upstream is unix:/absolute/path/to.sock",
                ))
            }
            None => None,
        };
        let upstream: Uri = match upstream_socket {
            Some(_) => Uri::from_static("http://localhost"),
            None => r
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
                        "upstream must be http://HOST:PORT, https://HOST:PORT (without a path) \
                         or unix:/PATH",
                    )
                })?,
        };
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
            upstream_socket,
            auth,
            preserve_host: r.preserve_host.unwrap_or(true),
            timeout: self.duration(&r.timeout, Duration::from_secs(60))?,
            upstream_ca: r.upstream_ca.as_ref().map(|ca| self.file(ca)),
            upstream_ca_at: r
                .upstream_ca
                .as_ref()
                .map(|ca| self.position(ca))
                .unwrap_or_default(),
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
            rate_limits: r
                .rate_limit
                .iter()
                .map(|l| self.rate_limit(l, auth))
                .collect::<Result<_, _>>()?,
            deny: self.rules(&r.deny, "deny", auth)?,
            allow: self.rules(&r.allow, "allow", auth)?,
            preflight_passes: match &r.preflight {
                None => false,
                Some(p) => match p.get_ref().as_str() {
                    "authenticate" => false,
                    "pass" => true,
                    other => {
                        return Err(self.at(
                            p,
                            format!(
                                "preflight must be \"authenticate\" or \"pass\", not {other:?}"
                            ),
                        ))
                    }
                },
            },
        })
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
