//! One place assembles the gate from a checked config: for `serve`, for every reload, and (as a
//! dry run that keeps nothing) for `check`. The config is data; each step builds its runtime
//! object from its part of it here — the TLS acceptor, the upstream pools and clients, the
//! validators (which load public keys), the cache — and a failure is reported against the key
//! it came from (`PATH:LINE:COL`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokio_rustls::TlsAcceptor;

use crate::cache::Cache;
use crate::config::{AuthMode, Config, ConfigError, JwtKeySource, LimitKind, ValidatorConfig};
use crate::limits::Limits;
use crate::proxy::{Gate, Route, UsageSender, OWN_ROUTES};
use crate::rewrite::Boundary;
use crate::store::Store;
use crate::telemetry::{AuthMetrics, RouteMetrics};
use crate::upstream::{self, Pool};
use crate::validate::Validators;
use crate::{jwt_validator, tls};

/// Reads a config file and checks it whole: its values (`Config::load`) and what the steps
/// load from the files it names (certificates, keys, CA bundles, public keys).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check(&config)?;
    Ok(config)
}

/// [`load`] for config text (the demo's built-in example).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let config = Config::parse(path, text)?;
    check(&config)?;
    Ok(config)
}

/// Builds, and drops, every runtime part that reads a file the config names, so that `check`
/// (and a reload) catches a missing or mismatched certificate where it is configured.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let listeners = [
        config.server.tls.as_ref(),
        config.verify.as_ref().and_then(|v| v.tls.as_ref()),
    ];
    for tls in listeners.into_iter().flatten() {
        tls::server_config(tls).map_err(|m| config.error_at(tls.at, m))?;
    }
    for validator in &config.validators {
        if let ValidatorConfig::Jwt(jwt) = validator {
            if let JwtKeySource::PublicKey { pem, at, .. } = &jwt.keys {
                jwt_validator::public_key(pem).map_err(|m| config.error_at(*at, m))?;
            }
        }
    }
    for route in &config.routes {
        if let Some(ca) = &route.upstream_ca {
            upstream::client(Some(ca)).map_err(|m| config.error_at(route.upstream_ca_at, m))?;
        }
    }
    Ok(())
}

/// What `check` says about a config that works but probably not as meant.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut said = Vec::new();
    if config.verify.is_some() && config.server.trusted_proxies.is_empty() {
        said.push(
            "[verify] is set but [server] trusted_proxies is empty: every decision's client is \
             the ingress's address (list the ingress's network to read X-Forwarded-For)"
                .to_string(),
        );
    }
    said
}

/// Builds the TLS acceptor, clients, validators and the cache for a config. The previous
/// gate's cache is kept when the validators and cache settings are unchanged, so a reload does
/// not send every client back to the validators.
pub fn assemble(
    config: Config,
    store: Arc<Store>,
    usage: UsageSender,
    previous: Option<&Gate>,
) -> Result<Gate, String> {
    let acceptor = match &config.server.tls {
        Some(tls) => Some(TlsAcceptor::from(tls::server_config(tls)?)),
        None => None,
    };
    let default_client = upstream::client(None)?;
    // Kept across reloads when `[limits]` is unchanged, like the cache: a reload neither
    // forgives a client nor punishes one.
    let kept = previous
        .filter(|p| p.config.limits == config.limits)
        .map(|p| &p.limits);
    let limits = Limits::new(&config, &store, kept);
    let mut routes = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let tls = match (route.upstream.scheme_str(), &route.upstream_ca) {
            (Some("https"), ca) => Some(upstream::tls_client_config(ca.as_deref())?),
            _ => None,
        };
        let pool = Pool::new(
            &route.upstream,
            route.upstream_socket.as_deref(),
            tls,
            (route.max_inflight, route.max_idle_connections),
            route.preserve_header_case,
            crate::worker::count(&config.server),
        )?;
        let metrics = RouteMetrics::new(&route.path_prefix);
        // The limits a route can answer 429 with read 0 before the first.
        let failed_auth = config.limits.failed_auth.is_some() && route.auth != AuthMode::None;
        let kinds = route.rate_limits.iter().map(|l| l.per);
        for kind in kinds.chain(failed_auth.then_some(LimitKind::FailedAuth)) {
            metrics.limited(kind.label());
        }
        if !route.deny.is_empty() || !route.allow.is_empty() {
            metrics.forbidden();
        }
        routes.push(Route {
            config: route.clone(),
            pool: Arc::new(pool),
            metrics,
            limits: limits.route(route),
        });
    }
    let validators = Arc::new(Validators::new(
        &config.validators,
        &default_client,
        Arc::clone(&store),
        config.tokens.jwt.clone(),
        limits.failed_auth.clone(),
        &config.claim_names(),
    ));
    let cache = match previous {
        Some(p)
            if p.config.validators == config.validators
                && p.config.cache == config.cache
                // Cached identities keep only the claims the config used: a rule on a claim
                // they lack would never match (a deny rule would not apply).
                && p.config.claim_names() == config.claim_names()
                && same_jwt_key(&p.config, &config) =>
        {
            Arc::clone(&p.cache)
        }
        _ => Cache::new(&config.cache),
    };
    crate::telemetry::register(&config);
    let auth_metrics = AuthMetrics::new(&auth_sources(&config));
    let mut folded_endpoints = config.endpoints.clone();
    folded_endpoints.tokens_prefix.make_ascii_lowercase();
    let has_upper = |p: &str| p.bytes().any(|b| b.is_ascii_uppercase());
    let fold_always = config.routes.iter().any(|r| has_upper(&r.path_prefix))
        || has_upper(&config.endpoints.tokens_prefix)
        || config.endpoints.insight;
    Ok(Gate {
        folded_endpoints,
        fold_always,
        boundary: Boundary::new(&config),
        config,
        acceptor,
        routes,
        validators,
        cache,
        auth_metrics,
        own_metrics: OWN_ROUTES.map(|label| (label, OnceLock::new())),
        store,
        usage,
        limits,
    })
}

/// The `source` labels of `tokengate_auth_total` this config can produce.
fn auth_sources(config: &Config) -> Vec<&'static str> {
    let mut sources = vec!["cache", "store", "none"];
    for validator in &config.validators {
        let label = validator.kind();
        if let Some(known) = crate::telemetry::AUTH_SOURCES.iter().find(|s| **s == label) {
            if !sources.contains(known) {
                sources.push(known);
            }
        }
    }
    let client_certificates = config
        .server
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    if config.x509.enabled || client_certificates {
        sources.push("x509");
    }
    sources
}

/// Whether two configs sign and check JWT API keys with the same key.
fn same_jwt_key(a: &Config, b: &Config) -> bool {
    match (&a.tokens.jwt, &b.tokens.jwt) {
        (None, None) => true,
        (Some(a), Some(b)) => a.kid() == b.kid(),
        _ => false,
    }
}
