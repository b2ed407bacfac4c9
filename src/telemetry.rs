//! Metrics (SPEC §7), through the `metrics` facade and the Prometheus exporter.
//!
//! The request path records through handles registered ahead of time (per route, per status on
//! first use), so a request costs a few atomic adds: no label allocation, no registry lookup.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_process::Collector;

/// Request-duration buckets (seconds): sidecar latencies are sub-millisecond to seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    process().describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// The `process_*` metrics (resident memory, open fds, CPU seconds, start time, …).
fn process() -> &'static Collector {
    static PROCESS: OnceLock<Collector> = OnceLock::new();
    PROCESS.get_or_init(Collector::default)
}

/// Reads the process's figures from `/proc` (on each scrape, so they are current).
pub fn collect_process() {
    process().collect();
}

/// The series of features a config turns on, registered so they read 0 rather than being
/// absent; a feature that is off has none.
pub fn register(config: &crate::config::Config) {
    counter!("tokengate_tokens_revoked_total").absolute(0);
    for ok in [true, false] {
        reload_counter(ok).absolute(0);
    }
    if config.server.tls.is_some() {
        counter!("tokengate_tls_handshake_errors_total").absolute(0);
    }
}

/// Folds histogram samples periodically (the exporter leaves this to its user).
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        "tokengate_requests_total",
        "Requests answered, by route and status."
    );
    describe_histogram!(
        "tokengate_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request head to response head, by route."
    );
    describe_histogram!(
        "tokengate_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time the upstream took to send its response head, by route."
    );
    describe_counter!(
        "tokengate_auth_total",
        "Authentication decisions, by result (allowed, denied, missing, error) and source."
    );
    describe_gauge!(
        "tokengate_cache_entries",
        "Entries in the validation cache."
    );
    describe_counter!("tokengate_tokens_issued_total", "Tokens issued, by kind.");
    describe_counter!(
        "tokengate_forbidden_total",
        "Requests answered 403 by a route's rules, by route."
    );
    describe_counter!(
        "tokengate_limited_total",
        "Requests answered 429, by route and limit (failed_auth, subject, token, client)."
    );
    describe_gauge!(
        "tokengate_limits_shared",
        "1 for where the rate-limit buckets are kept now: state=\"redis\" (shared) or \"local\" (Redis unreachable)."
    );
    describe_counter!("tokengate_tokens_revoked_total", "Tokens revoked.");
    describe_counter!(
        "tokengate_tls_handshake_errors_total",
        "TLS handshakes that failed (bad or untrusted client certificate, protocol errors, timeouts)."
    );
    describe_counter!(
        "tokengate_config_reloads_total",
        "Config reloads, by result (ok, error)."
    );
    describe_gauge!(
        "tokengate_build_info",
        "Always 1; the labels say which build is running."
    );
    gauge!(
        "tokengate_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("TOKENGATE_COMMIT"),
    )
    .set(1.0);
}

/// The metrics of one route.
pub struct RouteMetrics {
    route: Arc<str>,
    /// `tokengate_requests_total{route,status}`, registered on a status's first use.
    requests: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    upstream: Histogram,
    /// `tokengate_limited_total{route,limit}`, one per limit of [`LIMITS`].
    limited: [OnceLock<Counter>; LIMITS.len()],
    /// `tokengate_forbidden_total{route}`.
    forbidden: OnceLock<Counter>,
}

/// The `limit` labels of `tokengate_limited_total`.
pub const LIMITS: [&str; 4] = ["failed_auth", "subject", "token", "client"];

/// Status codes 100..=599 have a slot each.
const STATUS_SLOTS: usize = 500;

impl RouteMetrics {
    /// Registers the route's metrics.
    pub fn new(route: &str) -> RouteMetrics {
        let label = route.to_string();
        RouteMetrics {
            route: Arc::from(route),
            requests: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            duration: histogram!("tokengate_request_duration_seconds", "route" => label.clone()),
            upstream: histogram!("tokengate_upstream_duration_seconds", "route" => label),
            limited: Default::default(),
            forbidden: OnceLock::new(),
        }
    }

    /// The route's `tokengate_forbidden_total` (registered, at 0, on first use).
    pub fn forbidden(&self) -> &Counter {
        self.forbidden.get_or_init(
            || counter!("tokengate_forbidden_total", "route" => self.route.to_string()),
        )
    }

    /// The route's `tokengate_limited_total` for `limit` (registered, at 0, on first use).
    pub fn limited(&self, limit: &str) -> Option<&Counter> {
        let slot = LIMITS.iter().position(|l| *l == limit)?;
        Some(self.limited[slot].get_or_init(|| {
            counter!("tokengate_limited_total", "route" => self.route.to_string(), "limit" => LIMITS[slot])
        }))
    }

    /// Records one answered request.
    pub fn request(&self, status: u16, duration: Duration, upstream: Option<Duration>) {
        let slot = usize::from(status).wrapping_sub(100);
        if let Some(cell) = self.requests.get(slot) {
            cell.get_or_init(|| {
                counter!("tokengate_requests_total", "route" => self.route.to_string(), "status" => status.to_string())
            })
            .increment(1);
        }
        self.duration.record(duration.as_secs_f64());
        if let Some(upstream) = upstream {
            self.upstream.record(upstream.as_secs_f64());
        }
    }
}

/// An authentication decision (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// A valid credential.
    Allowed,
    /// An invalid, expired or revoked credential.
    Denied,
    /// No credential where one was required.
    Missing,
    /// A backend could not be reached.
    Error,
}

impl AuthResult {
    /// The `result` label.
    pub fn label(self) -> &'static str {
        match self {
            AuthResult::Allowed => "allowed",
            AuthResult::Denied => "denied",
            AuthResult::Missing => "missing",
            AuthResult::Error => "error",
        }
    }
}

/// Who decided (`source` label): the cache, or the validator that answered.
pub const AUTH_SOURCES: [&str; 7] = [
    "cache",
    "store",
    "static",
    "jwt",
    "introspect",
    "x509",
    "none",
];

/// `tokengate_auth_total{result,source}`: every result of the sources the config has is
/// registered up front (reads 0); any other combination on its first use.
pub struct AuthMetrics {
    counters: [[OnceLock<Counter>; AUTH_SOURCES.len()]; 4],
}

const RESULTS: [AuthResult; 4] = [
    AuthResult::Allowed,
    AuthResult::Denied,
    AuthResult::Missing,
    AuthResult::Error,
];

impl AuthMetrics {
    /// Registers every result of the sources in `enabled` (labels of `AUTH_SOURCES`).
    pub fn new(enabled: &[&str]) -> AuthMetrics {
        let metrics = AuthMetrics {
            counters: [(); 4].map(|_| [(); AUTH_SOURCES.len()].map(|_| OnceLock::new())),
        };
        for result in RESULTS {
            for source in enabled {
                metrics.counter(result, source);
            }
        }
        metrics
    }

    fn counter(&self, result: AuthResult, source: &str) -> &Counter {
        let column = AUTH_SOURCES
            .iter()
            .position(|s| *s == source)
            .unwrap_or(AUTH_SOURCES.len() - 1);
        self.counters[result as usize][column].get_or_init(|| {
            counter!("tokengate_auth_total", "result" => result.label(), "source" => AUTH_SOURCES[column])
        })
    }

    /// Counts one decision; an unknown source counts as `none`.
    pub fn record(&self, result: AuthResult, source: &str) {
        self.counter(result, source).increment(1);
    }
}

/// Sets `tokengate_cache_entries`.
pub fn cache_entries(entries: usize) {
    gauge!("tokengate_cache_entries").set(entries as f64);
}

/// Counts an issued token of `kind` (`api`, `x509`) on every surface: the servers' own, and the
/// CLI's as the store's feed reports them.
pub fn token_issued(kind: &'static str) {
    counter!("tokengate_tokens_issued_total", "kind" => kind).increment(1);
}

/// Counts a revoked token (on every surface: the servers' own revocations, and the CLI's as
/// the store's revocation feed reports them).
pub fn token_revoked() {
    counter!("tokengate_tokens_revoked_total").increment(1);
}

/// Counts a failed TLS handshake.
pub fn tls_handshake_error() {
    counter!("tokengate_tls_handshake_errors_total").increment(1);
}

/// Counts a config reload.
pub fn config_reload(ok: bool) {
    reload_counter(ok).increment(1);
}

fn reload_counter(ok: bool) -> Counter {
    counter!("tokengate_config_reloads_total", "result" => if ok { "ok" } else { "error" })
}
