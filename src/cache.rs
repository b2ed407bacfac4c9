//! The validation cache: keyed by the SHA-256 of the credential, bounded, with single flight.
//!
//! A hit is one sharded read lock and an `Arc` clone: no store or network work, no global lock.
//! A miss claims the slot with a `Pending` marker so concurrent requests for the same credential
//! wait on one validation, which runs in its own task (a client that hangs up does not cancel
//! it for the others).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::identity::{BackendError, Identity};
use crate::validate::{lifetime, Failure, Verdict};

/// What waiters receive: the verdict, or why there is none (not cached).
type Outcome = Result<Verdict, Failure>;

/// One entry: 16 bytes beside its 32-byte key (a million entries are a lot of buckets).
enum Slot {
    Ready {
        verdict: Verdict,
        expires: Tick,
    },
    /// Boxed: waiting is rare and short, and the box keeps every entry small.
    Pending(Box<watch::Receiver<Option<Outcome>>>),
}

/// Time as the cache keeps it: 100 ms steps since the cache was made, so an entry's expiry
/// takes 4 bytes (13 years of range). Expiries are rounded down: an entry may end up to a step
/// early, never late.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(u32);

const TICK_MS: u128 = 100;

/// The validation cache (SPEC §2).
pub struct Cache {
    map: DashMap<[u8; 32], Slot>,
    epoch: Instant,
    /// Where validations run: the control runtime the cache was made on, so that store round
    /// trips and signature checks never stall a worker's other connections.
    control: Option<tokio::runtime::Handle>,
    ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
}

/// Where a verdict came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// Served from the cache.
    Cache,
    /// Validated now (by this request or one it waited on).
    Validated,
}

impl Cache {
    /// An empty cache.
    pub fn new(config: &CacheConfig) -> Arc<Cache> {
        Arc::new(Cache {
            map: DashMap::new(),
            epoch: Instant::now(),
            control: tokio::runtime::Handle::try_current().ok(),
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            max_entries: config.max_entries,
        })
    }

    /// The cached verdict for `key`, if there is a live one.
    pub fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        match self.map.get(key).as_deref() {
            Some(Slot::Ready { verdict, expires }) if *expires > self.now() => {
                Some(verdict.clone())
            }
            _ => None,
        }
    }

    /// The verdict for `key`: cached, or from `validate` (called at most once for concurrent
    /// misses of the same key). Backend errors are not cached.
    pub async fn get_or_validate<F, Fut>(
        self: &Arc<Self>,
        key: [u8; 32],
        validate: F,
    ) -> (Outcome, Provenance)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let mut validate = Some(validate);
        loop {
            let now = self.now();
            let waiting = match self.map.get(&key).as_deref() {
                Some(Slot::Ready { verdict, expires }) if *expires > now => {
                    return (Ok(verdict.clone()), Provenance::Cache)
                }
                Some(Slot::Pending(rx)) => Some((**rx).clone()),
                _ => None,
            };
            let mut rx = match waiting {
                Some(rx) => rx,
                None => {
                    let Some((tx, rx)) = self.claim(key, now) else {
                        continue; // another request claimed it between our two looks
                    };
                    let Some(validate) = validate.take() else {
                        // Our validation already ran and vanished (see below): give up.
                        self.map.remove(&key);
                        let gone = BackendError("validation did not complete".into());
                        return (Err(gone.into()), Provenance::Validated);
                    };
                    self.spawn_validation(key, tx, validate());
                    rx
                }
            };
            if let Ok(outcome) = rx.wait_for(Option::is_some).await {
                let outcome = outcome.clone().expect("waited for Some");
                return (outcome, Provenance::Validated);
            }
            // The validation task ended without an answer (it panicked, or the runtime is
            // shutting down): clear its marker so nobody waits on it again, then retry.
            self.map.remove_if(
                &key,
                |_, slot| matches!(slot, Slot::Pending(r) if r.same_channel(&rx)),
            );
        }
    }

    /// Puts a `Pending` marker in a vacant or expired slot; `None` if another request got there
    /// first (then the caller waits on theirs).
    #[allow(clippy::type_complexity)]
    fn claim(
        &self,
        key: [u8; 32],
        now: Tick,
    ) -> Option<(
        watch::Sender<Option<Outcome>>,
        watch::Receiver<Option<Outcome>>,
    )> {
        if self.map.len() >= self.max_entries {
            self.make_room(now);
        }
        let (tx, rx) = watch::channel(None);
        match self.map.entry(key) {
            Entry::Vacant(v) => {
                v.insert(Slot::Pending(Box::new(rx.clone())));
            }
            Entry::Occupied(mut o) => match o.get() {
                Slot::Ready { expires, .. } if *expires <= now => {
                    o.insert(Slot::Pending(Box::new(rx.clone())));
                }
                _ => return None,
            },
        }
        Some((tx, rx))
    }

    fn spawn_validation<Fut>(
        self: &Arc<Self>,
        key: [u8; 32],
        tx: watch::Sender<Option<Outcome>>,
        validation: Fut,
    ) where
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let cache = Arc::clone(self);
        let task = async move {
            let outcome = validation.await;
            cache.finish(key, &outcome);
            let _ = tx.send(Some(outcome));
        };
        match &self.control {
            Some(control) => drop(control.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    fn finish(&self, key: [u8; 32], outcome: &Outcome) {
        match outcome {
            Ok(verdict) => {
                let life = lifetime(verdict, self.ttl, self.negative_ttl);
                if life.is_zero() {
                    self.map.remove(&key);
                } else {
                    let expires = self.after(life);
                    self.map.insert(
                        key,
                        Slot::Ready {
                            verdict: verdict.clone(),
                            expires,
                        },
                    );
                }
            }
            Err(_) => {
                self.map.remove(&key);
            }
        }
    }

    /// Drops expired entries; if the cache is still full, evicts an eighth of it (negative
    /// verdicts first) so a flood of random credentials costs amortised O(1) per insert.
    fn make_room(&self, now: Tick) {
        self.purge_expired_at(now);
        if self.map.len() < self.max_entries {
            return;
        }
        let mut budget = (self.max_entries / 8).max(1);
        self.map.retain(|_, slot| {
            if budget > 0
                && matches!(
                    slot,
                    Slot::Ready {
                        verdict: Verdict::Denied,
                        ..
                    }
                )
            {
                budget -= 1;
                return false;
            }
            true
        });
        self.map.retain(|_, slot| {
            if budget > 0 && matches!(slot, Slot::Ready { .. }) {
                budget -= 1;
                return false;
            }
            true
        });
    }

    /// Drops expired entries (run periodically, off the request path).
    pub fn purge_expired(&self) {
        self.purge_expired_at(self.now());
    }

    fn now(&self) -> Tick {
        self.tick_at(self.epoch.elapsed())
    }

    /// The tick `life` from now.
    fn after(&self, life: Duration) -> Tick {
        self.tick_at(self.epoch.elapsed().saturating_add(life))
    }

    fn tick_at(&self, since_epoch: Duration) -> Tick {
        Tick(u32::try_from(since_epoch.as_millis() / TICK_MS).unwrap_or(u32::MAX))
    }

    fn purge_expired_at(&self, now: Tick) {
        self.map
            .retain(|_, slot| !matches!(slot, Slot::Ready { expires, .. } if *expires <= now));
    }

    /// Forgets a credential (revocation).
    pub fn evict(&self, key: &[u8; 32]) {
        self.map.remove(key);
    }

    /// Forgets every valid entry whose identity matches (e.g. all store-validated ones after a
    /// lost revocation feed); returns how many.
    pub fn evict_where(&self, matches: impl Fn(&Identity) -> bool) -> usize {
        let mut dropped = 0;
        self.map.retain(|_, slot| match slot {
            Slot::Ready {
                verdict: Verdict::Allowed(identity),
                ..
            } if matches(identity) => {
                dropped += 1;
                false
            }
            _ => true,
        });
        dropped
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
