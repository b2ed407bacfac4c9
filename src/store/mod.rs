//! The token store: where the tokens tokengate issues live (SPEC §6). Only SHA-256 hashes of
//! tokens are stored. Three backends behind one type: `memory` (tests, demos), `sqlite`
//! (embedded default; survives `kill -9`), `redis` (shared by replicas; expiry by Redis;
//! revocations published so every replica evicts its cache entry at once).

use std::sync::Arc;

use crate::config::StoreConfig;

mod identities;
mod keys;
mod memory;
mod redis;
mod sqlite;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// What kind of token a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An API token a user created.
    Api,
    /// A token issued for a client certificate.
    X509,
}

impl Kind {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Api => "api",
            Kind::X509 => "x509",
        }
    }

    fn parse(text: &str) -> Kind {
        if text == "x509" {
            Kind::X509
        } else {
            Kind::Api
        }
    }
}

/// One issued token, as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id, shown in lists and used to revoke.
    pub id: String,
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Who it belongs to.
    pub subject: String,
    /// The account it acts as.
    pub account: String,
    /// A label its owner chose.
    pub name: String,
    /// API or x509.
    pub kind: Kind,
    /// The certificate DN (x509 tokens).
    pub dn: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Expiry, ms since the epoch; `None` = until revoked.
    pub expires_ms: Option<i64>,
    /// Last use, ms since the epoch (written at most once a minute).
    pub last_used_ms: Option<i64>,
    /// Its scopes, fixed at creation (route rules read them).
    pub scopes: Vec<String>,
    /// Its owner's groups as they were at creation (route rules read them).
    pub groups: Vec<String>,
}

impl TokenRecord {
    /// Whether the token is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }
}

/// Scopes or groups as the sqlite and Redis stores keep them: a JSON array of strings, or
/// nothing for none (so records made before tokens had scopes read as having none).
fn names_text(names: &[String]) -> Option<String> {
    (!names.is_empty()).then(|| serde_json::Value::from(names.to_vec()).to_string())
}

/// The inverse of [`names_text`]; an error for a value it cannot have written.
fn names_of(text: Option<&str>) -> Result<Vec<String>, serde_json::Error> {
    text.map_or(Ok(Vec::new()), serde_json::from_str)
}

/// The store could not be reached or failed.
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError(format!("redis: {e}"))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(format!("sqlite: {e}"))
    }
}

pub use crate::clock::now_ms;

/// The token store.
pub enum Store {
    /// In this process only.
    Memory(MemoryStore),
    /// An SQLite file.
    Sqlite(SqliteStore),
    /// A Redis server shared by replicas.
    Redis(RedisStore),
}

impl Store {
    /// Opens (and for sqlite creates) the configured store.
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Memory => Ok(Store::Memory(MemoryStore::default())),
            StoreConfig::Sqlite { path } => SqliteStore::open(path).await.map(Store::Sqlite),
            StoreConfig::Redis { url, prefix } => {
                RedisStore::open(url, prefix).await.map(Store::Redis)
            }
        }
    }

    /// Adds a token, and drops the tokens that have expired (Redis expires them itself), so
    /// short-lived tokens (x509 exchanges, `--ttl`) do not pile up.
    pub async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                let now = now_ms();
                m.tokens.retain(|_, r| !r.expired(now));
                m.ids.retain(|_, hash| m.tokens.contains_key(hash));
                m.ids.insert(record.id.clone(), record.hash);
                m.tokens.insert(record.hash, record.clone());
                Ok(())
            }
            Store::Sqlite(s) => s.insert(record.clone()).await,
            Store::Redis(r) => r.insert(record).await,
        }
    }

    /// The live (not expired, not revoked) token with this hash.
    pub async fn find(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let now = now_ms();
        let found = match self {
            Store::Memory(m) => m.tokens.get(hash).map(|r| r.clone()),
            Store::Sqlite(s) => s.find(*hash).await?,
            Store::Redis(r) => r.find(hash).await?,
        };
        Ok(found.filter(|r| !r.expired(now)))
    }

    /// Live tokens, of one subject or all, oldest first.
    pub async fn list(&self, subject: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        let now = now_ms();
        let mut records = match self {
            Store::Memory(m) => m
                .tokens
                .iter()
                .filter(|r| subject.is_none_or(|s| r.subject == s))
                .map(|r| r.clone())
                .collect(),
            Store::Sqlite(s) => s.list(subject.map(str::to_string)).await?,
            Store::Redis(r) => r.list(subject).await?,
        };
        records.retain(|r| !r.expired(now));
        records.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(records)
    }

    /// Revokes the token with this id (only if it belongs to `owner`, when given); returns it.
    /// Replicas learn of it (sqlite: the revocation log they poll; redis: a published message).
    pub async fn revoke(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let hash = match self {
            Store::Memory(m) => m.ids.get(id).map(|h| *h),
            Store::Sqlite(s) => s.hash_of(id.to_string()).await?,
            Store::Redis(r) => r.hash_of(id).await?,
        };
        let Some(hash) = hash else {
            return Ok(None);
        };
        self.revoke_hash(&hash, owner).await
    }

    /// Revokes the token with this hash (only if it belongs to `owner`, when given).
    pub async fn revoke_hash(
        &self,
        hash: &[u8; 32],
        owner: Option<&str>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let Some(record) = self.find_any(hash).await? else {
            return Ok(None);
        };
        if owner.is_some_and(|o| o != record.subject) {
            return Ok(None);
        }
        match self {
            Store::Memory(m) => {
                m.tokens.remove(hash);
                m.ids.remove(&record.id);
            }
            Store::Sqlite(s) => s.delete(record.clone()).await?,
            Store::Redis(r) => r.delete(&record).await?,
        }
        crate::telemetry::token_revoked();
        Ok(Some(record))
    }

    /// A record even if expired (revoking an expired token still removes it).
    async fn find_any(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.tokens.get(hash).map(|r| r.clone())),
            Store::Sqlite(s) => s.find(*hash).await,
            Store::Redis(r) => r.find(hash).await,
        }
    }

    /// Records a token's last use.
    pub async fn touch(&self, hash: &[u8; 32], at_ms: i64) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                if let Some(mut r) = m.tokens.get_mut(hash) {
                    r.last_used_ms = Some(at_ms);
                }
                Ok(())
            }
            Store::Sqlite(s) => s.touch(*hash, at_ms).await,
            Store::Redis(r) => r.touch(hash, at_ms).await,
        }
    }

    /// One step of a shared token bucket (`[limits] shared`, GCRA as `limits` keeps it): take a
    /// token (`take`) or give one back, atomically in Redis, on Redis's clock. `Ok(Err(µs))`:
    /// refused, the bucket has a token again in that long. `(interval, tolerance)` in µs. Only
    /// the Redis store keeps buckets.
    pub async fn bucket(
        &self,
        limit: &str,
        key: u128,
        (interval, tolerance): (u64, u64),
        take: bool,
    ) -> Result<Result<(), u64>, StoreError> {
        match self {
            Store::Redis(r) => r.bucket(limit, key, interval, tolerance, take).await,
            _ => Err(StoreError("shared limits need the redis store".into())),
        }
    }

    /// Whether the store answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Sqlite(s) => s.ping().await,
            Store::Redis(r) => r.ping().await,
        }
    }

    /// The backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Sqlite(_) => "sqlite",
            Store::Redis(_) => "redis",
        }
    }

    /// Follows revocations made elsewhere (another process, the CLI) and tells `evict`, until
    /// the task is dropped. Memory stores have no elsewhere.
    pub async fn follow_revocations(self: Arc<Self>, evict: impl Fn(StoreEvent) + Send + Sync) {
        match &*self {
            Store::Memory(_) => std::future::pending().await,
            Store::Sqlite(s) => s.follow_revocations(&evict).await,
            Store::Redis(r) => r.follow_revocations(&evict).await,
        }
    }
}

/// Whether this process is the CLI: its revocations are marked so that the servers following
/// the store count them (`tokengate_tokens_revoked_total` counts every surface; a server counts
/// its own revocations when it makes them).
static CLI: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this process as the CLI (see `StoreEvent::One`'s `by_cli`).
pub fn mark_cli() {
    CLI.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn is_cli() -> bool {
    CLI.load(std::sync::atomic::Ordering::Relaxed)
}

/// What the store's feed reports: revocations made elsewhere, and the CLI's tokens.
#[derive(Debug, Clone, Copy)]
pub enum StoreEvent {
    /// This token hash was revoked.
    One {
        /// The token's hash.
        hash: [u8; 32],
        /// By the CLI, whose revocation a server counts (for Redis, the one replica that
        /// claims it first).
        by_cli: bool,
    },
    /// Revocations may have been missed: forget every store-validated entry.
    Unknown,
    /// The CLI issued a token of this kind (counted by the server; for Redis, by the one
    /// replica that claims it first).
    IssuedByCli(Kind),
}
