//! Abuse control (SPEC §11): token buckets per client address, subject or credential, for the
//! failed-credential limit (`[limits] failed_auth`) and the routes' `[[route.rate_limit]]`s.
//!
//! A bucket is kept as one number, its *theoretical arrival time* (GCRA, the token bucket's
//! exact twin): the moment it will be full again. Taking a token moves it one interval later;
//! a request that would move it more than the burst past now is refused, and told how long
//! until it would not be. A full bucket is the same as no bucket, so buckets that have refilled
//! are dropped without losing anything: that is how memory stays under `max_tracked`.
//!
//! The buckets are sharded maps (no global lock); a check is one shard lock and a clock read.
//! With `[limits] shared`, each check is one atomic script in the Redis store instead, so every
//! replica counts into the same bucket; while Redis cannot be reached, each replica falls back
//! to its own buckets and says so (log, `tokengate_limits_shared{state}`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::{BucketConfig, Config, LimitKind, LimitsConfig, RouteConfig};
use crate::error::Refusal;
use crate::store::Store;

/// Every limit of a gate: the failed-credential one and each route's.
pub struct Limits {
    /// `[limits] failed_auth`, per client.
    pub(crate) failed_auth: Option<Arc<Limiter>>,
    /// Every route's, by route prefix, in config order.
    routes: Vec<(String, Vec<Arc<Limiter>>)>,
    /// Whether Redis holds the buckets (`[limits] shared`).
    shared: Option<Arc<SharedState>>,
}

impl Limits {
    /// The limits of `config`; those of `before` (the previous gate's, for the same `[limits]`)
    /// whose settings are unchanged are kept, buckets and all.
    pub fn new(config: &Config, store: &Arc<Store>, before: Option<&Limits>) -> Limits {
        let shared = config
            .limits
            .shared
            .then(|| match before.and_then(|b| b.shared.as_ref()) {
                Some(state) => Arc::clone(state),
                None => SharedState::new(Arc::clone(store)),
            });
        let make = |kind, bucket, name: String| {
            Arc::new(Limiter::new(
                kind,
                bucket,
                &config.limits,
                shared.as_ref().map(|s| (s, name)),
            ))
        };
        let failed_auth = match before.and_then(|b| b.failed_auth.as_ref()) {
            Some(kept) => Some(Arc::clone(kept)),
            None => config
                .limits
                .failed_auth
                .map(|bucket| make(LimitKind::FailedAuth, bucket, "failed_auth".into())),
        };
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let kept = before
                    .and_then(|b| b.routes.iter().find(|(p, _)| *p == route.path_prefix))
                    .map(|(_, l)| l.as_slice())
                    .unwrap_or_default();
                let limiters = route
                    .rate_limits
                    .iter()
                    .enumerate()
                    .map(|(i, limit)| match kept.get(i) {
                        Some(k) if k.kind() == limit.per && k.config() == limit.bucket => {
                            Arc::clone(k)
                        }
                        _ => make(
                            limit.per,
                            limit.bucket,
                            format!("route:{}:{i}", route.path_prefix),
                        ),
                    })
                    .collect();
                (route.path_prefix.clone(), limiters)
            })
            .collect();
        Limits {
            failed_auth,
            routes,
            shared,
        }
    }

    /// A route's limiters.
    pub fn route(&self, route: &RouteConfig) -> Vec<Arc<Limiter>> {
        self.routes
            .iter()
            .find(|(p, _)| *p == route.path_prefix)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    }

    /// Drops every bucket that has refilled (periodically, off the request path).
    pub fn purge(&self) {
        let routes = self.routes.iter().flat_map(|(_, l)| l);
        for limiter in self.failed_auth.iter().chain(routes) {
            limiter.purge();
        }
    }
}

/// One limit: a bucket per key, all alike.
pub struct Limiter {
    kind: LimitKind,
    config: BucketConfig,
    /// Time between two tokens, in microseconds.
    interval: u64,
    /// How far past now a bucket's arrival time may be: `burst` intervals.
    tolerance: u64,
    buckets: Buckets,
    /// The Redis buckets, with `[limits] shared`.
    shared: Option<Shared>,
}

/// A key's bucket: a client address (IPv6 per /64), or 128 bits of a subject's or credential's
/// SHA-256 ([`crate::identity::key_of`]).
pub type Key = u128;

/// The bucket key of a client address: IPv4 as its IPv4-mapped IPv6 form, IPv6 per /64 (one
/// host has a /64 to pick addresses from).
pub fn client_key(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6) & !u128::from(u64::MAX),
        },
    }
}

impl Limiter {
    /// A limit of `kind`, its buckets local (`shared: None`) or in Redis; `name` tells its
    /// buckets apart in Redis from other limits' (the same on every replica).
    pub fn new(
        kind: LimitKind,
        config: BucketConfig,
        limits: &LimitsConfig,
        shared: Option<(&Arc<SharedState>, String)>,
    ) -> Limiter {
        let period = u64::try_from(config.period.as_micros()).unwrap_or(u64::MAX);
        let interval = (period / u64::from(config.count.max(1))).max(1);
        Limiter {
            kind,
            config,
            interval,
            tolerance: interval.saturating_mul(u64::from(config.burst.max(1))),
            buckets: Buckets::new(limits.max_tracked),
            shared: shared.map(|(state, name)| Shared {
                state: Arc::clone(state),
                name,
            }),
        }
    }

    /// What this limit counts.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// The bucket settings (a reload keeps the buckets of an unchanged limit).
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Takes a token from `key`'s bucket, or says how long until there is one.
    pub async fn take(&self, key: Key) -> Result<(), Refusal> {
        match &self.shared {
            None => self.take_local(key),
            // Boxed: the Redis round trip's state stays out of every request's future.
            Some(shared) => Box::pin(shared.step(self, key, true)).await,
        }
    }

    /// Gives back a token taken for a validation that succeeded.
    pub async fn refund(&self, key: Key) {
        match &self.shared {
            None => self.buckets.refund(key, self.now(), self.interval),
            Some(shared) => {
                let _ = Box::pin(shared.step(self, key, false)).await;
            }
        }
    }

    /// The refusal a take would get now, without taking (this process's buckets; `None` with
    /// shared buckets, whose state is in Redis).
    pub fn empty(&self, key: Key) -> Option<Refusal> {
        if self.shared.is_some() {
            return None;
        }
        let now = self.now();
        let full_at = *self.buckets.map.get(&key)?;
        gcra_step(full_at, now, self.interval, self.tolerance)
            .err()
            .map(|wait| self.refusal(wait))
    }

    /// [`Limiter::take`] on this process's buckets.
    fn take_local(&self, key: Key) -> Result<(), Refusal> {
        let now = self.now();
        self.buckets
            .take(key, now, self.interval, self.tolerance)
            .map_err(|wait| self.refusal(wait))
    }

    fn refusal(&self, wait_us: u64) -> Refusal {
        let seconds = |us: u64| u32::try_from(us.div_ceil(1_000_000).max(1)).unwrap_or(u32::MAX);
        Refusal {
            limit: self.kind.label(),
            retry_after: seconds(wait_us),
            quota: self.config.count,
            window: seconds(u64::try_from(self.config.period.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    /// Microseconds on this process's clock (tokio's, so tests can pause it).
    fn now(&self) -> u64 {
        u64::try_from(self.buckets.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Drops the buckets that have refilled (they say nothing a missing bucket would not).
    pub fn purge(&self) {
        self.buckets.purge(self.now());
    }

    /// Buckets held now.
    pub fn tracked(&self) -> usize {
        self.buckets.tracked.load(Ordering::Relaxed)
    }
}

/// One GCRA step of a bucket full again at `full_at`, at `now`: the new full moment one
/// `interval` later, or `Err(µs to wait)` when that would lie more than `tolerance` past now.
fn gcra_step(full_at: u64, now: u64, interval: u64, tolerance: u64) -> Result<u64, u64> {
    let next = full_at.max(now).saturating_add(interval);
    match next - now {
        ahead if ahead > tolerance => Err(ahead - tolerance),
        _ => Ok(next),
    }
}

/// The buckets of one limit: key → the moment the bucket is full again (µs since `epoch`).
struct Buckets {
    map: DashMap<Key, u64>,
    epoch: Instant,
    /// `map`'s size, kept beside it (`DashMap::len` locks every shard).
    tracked: AtomicUsize,
    max_tracked: usize,
    /// One caller makes room at a time; the others carry on (the bound is then exceeded by
    /// at most the requests in flight).
    sweeping: AtomicBool,
}

impl Buckets {
    fn new(max_tracked: usize) -> Buckets {
        Buckets {
            map: DashMap::new(),
            epoch: Instant::now(),
            tracked: AtomicUsize::new(0),
            max_tracked,
            sweeping: AtomicBool::new(false),
        }
    }

    /// GCRA: the bucket's next full moment moves one interval on, unless that would put it
    /// more than `tolerance` past now; then `Err(µs to wait)`.
    fn take(&self, key: Key, now: u64, interval: u64, tolerance: u64) -> Result<(), u64> {
        let step = |full_at: u64| gcra_step(full_at, now, interval, tolerance);
        if let Some(mut full_at) = self.map.get_mut(&key) {
            *full_at = step(*full_at)?;
            return Ok(());
        }
        // A new key starts with a full bucket.
        if self.tracked.load(Ordering::Relaxed) >= self.max_tracked {
            self.make_room(now);
        }
        let mut inserted = false;
        let result = match self.map.entry(key) {
            dashmap::Entry::Occupied(mut o) => step(*o.get()).map(|next| *o.get_mut() = next),
            dashmap::Entry::Vacant(v) => step(now).map(|next| {
                v.insert(next);
                inserted = true;
            }),
        };
        if inserted {
            self.tracked.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn refund(&self, key: Key, now: u64, interval: u64) {
        if let Some(mut full_at) = self.map.get_mut(&key) {
            *full_at = full_at.saturating_sub(interval).max(now);
        }
    }

    /// At `max_tracked`: drops every bucket that has refilled (the least recently used ones,
    /// losing nothing); if all are still in use, the eighth closest to full (they lose the
    /// least), so a flood of new keys costs amortised O(1) each and never shares a bucket.
    fn make_room(&self, now: u64) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        self.purge(now);
        if self.tracked.load(Ordering::Relaxed) >= self.max_tracked {
            let mut ahead: Vec<u64> = self.map.iter().map(|e| *e.value()).collect();
            let budget = (self.max_tracked / 8).max(1).min(ahead.len());
            if budget > 0 {
                let (_, threshold, _) = ahead.select_nth_unstable(budget - 1);
                let threshold = *threshold;
                let mut left = budget;
                self.retain(|full_at| {
                    if left > 0 && full_at <= threshold {
                        left -= 1;
                        return false;
                    }
                    true
                });
            }
        }
        self.sweeping.store(false, Ordering::Release);
    }

    fn purge(&self, now: u64) {
        self.retain(|full_at| full_at > now);
    }

    fn retain(&self, mut keep: impl FnMut(u64) -> bool) {
        let mut dropped = 0;
        self.map.retain(|_, full_at| {
            let kept = keep(*full_at);
            dropped += usize::from(!kept);
            kept
        });
        self.tracked.fetch_sub(dropped, Ordering::Relaxed);
    }
}

/// Whether the Redis buckets are in use, for every limit of the process.
pub struct SharedState {
    store: Arc<Store>,
    /// Set while Redis cannot be reached: the local buckets answer.
    local: AtomicBool,
    /// When (ms on the wall clock) to try Redis again while local.
    retry_at_ms: AtomicU64,
}

/// How long a bucket step in Redis may take before the local buckets answer.
const SHARED_TIMEOUT: Duration = Duration::from_millis(250);
/// How long the local buckets answer after Redis failed, before Redis is tried again.
const SHARED_RETRY: Duration = Duration::from_secs(1);

impl SharedState {
    /// Buckets in `store` (Redis); the gauge says they are in use.
    pub fn new(store: Arc<Store>) -> Arc<SharedState> {
        shared_gauge(false);
        Arc::new(SharedState {
            store,
            local: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
        })
    }

    fn fall_back(&self, error: &str) {
        let retry = crate::clock::now_ms() + SHARED_RETRY.as_millis() as i64;
        self.retry_at_ms
            .store(u64::try_from(retry).unwrap_or(0), Ordering::Relaxed);
        if !self.local.swap(true, Ordering::Relaxed) {
            tracing::warn!(error, "shared rate limits unavailable (redis): each replica counts on its own until it answers");
            shared_gauge(true);
        }
    }

    fn recovered(&self) {
        if self.local.swap(false, Ordering::Relaxed) {
            tracing::info!("shared rate limits back in redis");
            shared_gauge(false);
        }
    }
}

fn shared_gauge(local: bool) {
    let value = |on: bool| if on { 1.0 } else { 0.0 };
    metrics::gauge!("tokengate_limits_shared", "state" => "redis").set(value(!local));
    metrics::gauge!("tokengate_limits_shared", "state" => "local").set(value(local));
}

struct Shared {
    state: Arc<SharedState>,
    name: String,
}

impl Shared {
    /// Takes (`take`) or gives back a token in Redis; the local buckets while it is away.
    async fn step(&self, limiter: &Limiter, key: Key, take: bool) -> Result<(), Refusal> {
        let state = &self.state;
        let away = state.local.load(Ordering::Relaxed)
            && u64::try_from(crate::clock::now_ms()).unwrap_or(0)
                < state.retry_at_ms.load(Ordering::Relaxed);
        if !away {
            let call =
                state
                    .store
                    .bucket(&self.name, key, (limiter.interval, limiter.tolerance), take);
            match tokio::time::timeout(SHARED_TIMEOUT, call).await {
                Ok(Ok(answer)) => {
                    state.recovered();
                    return answer.map_err(|wait| limiter.refusal(wait));
                }
                Ok(Err(e)) => state.fall_back(&e.0),
                Err(_) => state.fall_back("timed out"),
            }
        }
        if take {
            limiter.take_local(key)
        } else {
            limiter.buckets.refund(key, limiter.now(), limiter.interval);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(count: u32, period: Duration, burst: u32, max_tracked: usize) -> Limiter {
        let limits = LimitsConfig {
            max_tracked,
            ..LimitsConfig::default()
        };
        let config = BucketConfig {
            count,
            period,
            burst,
        };
        Limiter::new(LimitKind::Client, config, &limits, None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = limiter(2, Duration::from_secs(1), 3, 10);
        for _ in 0..3 {
            l.take(7).await.unwrap();
        }
        let refusal = l.take(7).await.unwrap_err();
        assert_eq!(refusal.retry_after, 1);
        assert_eq!((refusal.quota, refusal.window), (2, 1));
        // Another key has its own bucket.
        l.take(8).await.unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        l.take(7).await.unwrap();
        assert!(l.take(7).await.is_err());
        tokio::time::advance(Duration::from_millis(1500)).await;
        for _ in 0..3 {
            l.take(7).await.unwrap();
        }
        assert!(l.take(7).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_the_token_back() {
        let l = limiter(1, Duration::from_secs(60), 2, 10);
        l.take(1).await.unwrap();
        l.take(1).await.unwrap();
        let refusal = l.take(1).await.unwrap_err();
        assert_eq!(refusal.retry_after, 60);
        l.refund(1).await;
        l.take(1).await.unwrap();
        assert!(l.take(1).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_refilled_buckets_go_first() {
        let l = limiter(1, Duration::from_secs(10), 1, 64);
        // An active client: its bucket is empty.
        l.take(u128::MAX).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        for key in 0..1000u128 {
            l.take(key).await.unwrap();
            assert!(l.tracked() <= 64, "{} buckets", l.tracked());
        }
        // The newest buckets are kept, still counting.
        assert!(l.take(999).await.is_err());
        tokio::time::advance(Duration::from_secs(11)).await;
        l.take(999).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        l.purge();
        assert_eq!(l.tracked(), 0, "all refilled");
    }

    #[test]
    fn clients_are_keyed_per_address_and_ipv6_per_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_ne!(client_key(ip("127.0.0.2")), client_key(ip("127.0.0.3")));
        assert_eq!(
            client_key(ip("127.0.0.2")),
            client_key(ip("::ffff:127.0.0.2"))
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
    }
}
