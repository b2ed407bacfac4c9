//! The token store: where the tokens tokengate issues live (SPEC §6). Only SHA-256 hashes of
//! tokens are stored. Three backends behind one type: `memory` (tests, demos), `sqlite`
//! (embedded default; survives `kill -9`), `redis` (shared by replicas; expiry by Redis;
//! revocations published so every replica evicts its cache entry at once).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::config::{Secret, StoreConfig};

mod identities;
mod keys;

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
}

impl TokenRecord {
    /// Whether the token is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }
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

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
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

/// In-process store.
#[derive(Default)]
pub struct MemoryStore {
    tokens: DashMap<[u8; 32], TokenRecord>,
    ids: DashMap<String, [u8; 32]>,
    /// x509 DN → accounts (see `identities`).
    identities: DashMap<String, Vec<String>>,
    /// Named random keys (see `keys`).
    keys: DashMap<String, [u8; 32]>,
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// An SQLite file, WAL mode. One connection per process, used from blocking threads.
pub struct SqliteStore {
    connection: Arc<Mutex<rusqlite::Connection>>,
    path: PathBuf,
}

/// How often a server looks for revocations made by other processes on the same file.
const SQLITE_REVOCATION_POLL: Duration = Duration::from_millis(250);
/// How long revocation log entries are kept for pollers.
const SQLITE_REVOCATION_RETENTION_MS: i64 = 24 * 3600 * 1000;

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    dn TEXT,
    created INTEGER NOT NULL,
    expires INTEGER,
    last_used INTEGER
);
CREATE INDEX IF NOT EXISTS tokens_subject ON tokens(subject);
CREATE INDEX IF NOT EXISTS tokens_expires ON tokens(expires);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cli_issued (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// Files made before revocations said who made them gain the column (older readers ignore it).
const SQLITE_ORIGIN_COLUMN: &str = "ALTER TABLE revocations ADD COLUMN origin TEXT";

const SQLITE_COLUMNS: &str =
    "hash, id, subject, account, name, kind, dn, created, expires, last_used";

fn sqlite_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let hash: Vec<u8> = row.get(0)?;
    let kind: String = row.get(5)?;
    Ok(TokenRecord {
        hash: <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0; 32]),
        id: row.get(1)?,
        subject: row.get(2)?,
        account: row.get(3)?,
        name: row.get(4)?,
        kind: Kind::parse(&kind),
        dn: row.get(6)?,
        created_ms: row.get(7)?,
        expires_ms: row.get(8)?,
        last_used_ms: row.get(9)?,
    })
}

impl SqliteStore {
    async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        let shown = path.clone();
        let connection =
            tokio::task::spawn_blocking(move || -> Result<rusqlite::Connection, StoreError> {
                let c = rusqlite::Connection::open(&path)?;
                // Concurrent writers (several processes, the CLI) wait for each other instead of
                // failing; WAL keeps readers off the writers' backs; NORMAL sync survives a process
                // kill (only an OS crash can lose the last transaction).
                c.busy_timeout(Duration::from_secs(5))?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c.execute_batch(SQLITE_SCHEMA)?;
                if c.prepare("SELECT origin FROM revocations LIMIT 0").is_err() {
                    c.execute_batch(SQLITE_ORIGIN_COLUMN)?;
                }
                Ok(c)
            })
            .await
            .map_err(|e| StoreError(format!("sqlite open: {e}")))?
            .map_err(|e| StoreError(format!("{}: {}", shown.display(), e.0)))?;
        Ok(SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
            path: shown,
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut c = connection
                .lock()
                .map_err(|_| StoreError("sqlite connection poisoned".into()))?;
            f(&mut c).map_err(StoreError::from)
        })
        .await
        .map_err(|e| StoreError(format!("sqlite task: {e}")))?
    }

    async fn insert(&self, r: TokenRecord) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM tokens WHERE expires IS NOT NULL AND expires <= ?1",
                [now_ms()],
            )?;
            if is_cli() {
                // For the servers on this file to count (tokengate_tokens_issued_total).
                let now = now_ms();
                tx.execute(
                    "INSERT INTO cli_issued (kind, at) VALUES (?1, ?2)",
                    rusqlite::params![r.kind.as_str(), now],
                )?;
                tx.execute(
                    "DELETE FROM cli_issued WHERE at < ?1",
                    [now - SQLITE_REVOCATION_RETENTION_MS],
                )?;
            }
            tx.execute(
                &format!("INSERT INTO tokens ({SQLITE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                rusqlite::params![
                    r.hash.as_slice(),
                    r.id,
                    r.subject,
                    r.account,
                    r.name,
                    r.kind.as_str(),
                    r.dn,
                    r.created_ms,
                    r.expires_ms,
                    r.last_used_ms
                ],
            )?;
            tx.commit()
        })
        .await
    }

    async fn find(&self, hash: [u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {SQLITE_COLUMNS} FROM tokens WHERE hash = ?1"
            ))?;
            let mut rows = statement.query_map([hash.as_slice()], sqlite_record)?;
            rows.next().transpose()
        })
        .await
    }

    async fn list(&self, subject: Option<String>) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {SQLITE_COLUMNS} FROM tokens WHERE ?1 IS NULL OR subject = ?1"
            ))?;
            let rows = statement.query_map([subject], sqlite_record)?;
            rows.collect()
        })
        .await
    }

    async fn hash_of(&self, id: String) -> Result<Option<[u8; 32]>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached("SELECT hash FROM tokens WHERE id = ?1")?;
            let mut rows = statement.query_map([id], |row| row.get::<_, Vec<u8>>(0))?;
            Ok(rows
                .next()
                .transpose()?
                .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()))
        })
        .await
    }

    /// Deletes the token and logs the revocation for other processes, in one transaction.
    async fn delete(&self, record: TokenRecord) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let now = now_ms();
            tx.execute(
                "DELETE FROM tokens WHERE hash = ?1",
                [record.hash.as_slice()],
            )?;
            tx.execute(
                "INSERT INTO revocations (hash, at, origin) VALUES (?1, ?2, ?3)",
                rusqlite::params![record.hash.as_slice(), now, is_cli().then_some("cli")],
            )?;
            tx.execute(
                "DELETE FROM revocations WHERE at < ?1",
                [now - SQLITE_REVOCATION_RETENTION_MS],
            )?;
            tx.commit()
        })
        .await
    }

    async fn touch(&self, hash: [u8; 32], at_ms: i64) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "UPDATE tokens SET last_used = ?1 WHERE hash = ?2",
                rusqlite::params![at_ms, hash.as_slice()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn follow_revocations(&self, evict: &(impl Fn(StoreEvent) + Send + Sync)) {
        let mut last: i64 = match self
            .with(|c| {
                c.query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |row| {
                    row.get(0)
                })
            })
            .await
        {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot read the revocation log");
                0
            }
        };
        let mut last_issued: i64 = self
            .with(|c| {
                c.query_row("SELECT COALESCE(MAX(seq), 0) FROM cli_issued", [], |row| {
                    row.get(0)
                })
            })
            .await
            .unwrap_or(0);
        let mut tick = tokio::time::interval(SQLITE_REVOCATION_POLL);
        loop {
            tick.tick().await;
            let since = last_issued;
            let issued = self
                .with(move |c| {
                    let mut statement = c.prepare_cached(
                        "SELECT seq, kind FROM cli_issued WHERE seq > ?1 ORDER BY seq",
                    )?;
                    let rows = statement.query_map([since], |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await;
            if let Ok(rows) = issued {
                for (seq, kind) in rows {
                    evict(StoreEvent::IssuedByCli(Kind::parse(&kind)));
                    last_issued = seq;
                }
            }
            let since = last;
            let revoked = self
                .with(move |c| {
                    let mut statement = c.prepare_cached(
                        "SELECT seq, hash, origin IS 'cli' FROM revocations WHERE seq > ?1 ORDER BY seq",
                    )?;
                    let rows = statement.query_map([since], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, Vec<u8>>(1)?,
                            row.get::<_, bool>(2)?,
                        ))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await;
            match revoked {
                Ok(rows) => {
                    for (seq, hash, by_cli) in rows {
                        if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                            evict(StoreEvent::One { hash, by_cli });
                        }
                        last = seq;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "revocation poll failed"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A Redis server shared by replicas. Keys: `{prefix}t:{hash}` (a hash of the record's fields),
/// `{prefix}i:{id}` (→ hash), `{prefix}u:{subject}` (set of ids); tokens with a lifetime expire
/// in Redis. Revocations are published on `{prefix}revocations`.
pub struct RedisStore {
    client: redis::Client,
    connection: RedisConnection,
    prefix: String,
}

/// The Redis command connection: a `ConnectionManager`, replaced by a fresh one when a command
/// times out. The manager reconnects by itself when its connection drops, but not when the
/// connection goes silent (a dropped NAT or conntrack entry, a frozen peer): every command
/// would then time out for good.
#[derive(Clone)]
struct RedisConnection(Arc<RedisConnectionInner>);

struct RedisConnectionInner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: arc_swap::ArcSwap<ConnectionManager>,
}

impl RedisConnection {
    fn new(client: redis::Client, config: ConnectionManagerConfig) -> redis::RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(RedisConnection(Arc::new(RedisConnectionInner {
            client,
            config,
            current: arc_swap::ArcSwap::from_pointee(manager),
        })))
    }

    /// After a timeout on `used`: a fresh manager (connecting on first use), unless another
    /// caller has replaced `used` already.
    fn replace(&self, used: &Arc<ConnectionManager>) {
        let inner = &self.0;
        let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(inner.client.clone(), inner.config.clone())
        else {
            return;
        };
        let previous = inner.current.compare_and_swap(used, Arc::new(fresh));
        if Arc::ptr_eq(&*previous, used) {
            tracing::warn!("redis command timed out; the connection is replaced");
        }
    }

    /// Runs `call` on the current manager; a timeout replaces it.
    async fn run<T>(
        &self,
        call: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let used = self.0.current.load_full();
        let mut manager = (*used).clone();
        let result = call(&mut manager).await;
        if result.as_ref().is_err_and(redis::RedisError::is_timeout) {
            self.replace(&used);
        }
        result
    }
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(self.run(async |m| m.req_packed_command(cmd).await))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(self.run(async move |m| m.req_packed_commands(pipeline, offset, count).await))
    }

    fn get_db(&self) -> i64 {
        redis::aio::ConnectionLike::get_db(&**self.0.current.load())
    }
}

/// How long one Redis command may take before the store counts as unreachable.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts to re-subscribe to revocations.
const REDIS_RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(500);
/// How often each replica publishes a heartbeat on the revocation channel.
pub const REDIS_HEARTBEAT: Duration = Duration::from_secs(5);
/// A subscription that has delivered nothing (not even our own heartbeats) for this long is
/// dead, though its connection may look open (a silently dropped TCP connection, a Redis
/// failover that kept the socket): it is replaced, and the cache dropped as after any loss.
pub const REDIS_SUBSCRIPTION_SILENCE: Duration = Duration::from_secs(15);
/// The heartbeat message (not a token hash, so receivers pass it over).
const REDIS_HEARTBEAT_MESSAGE: &str = "heartbeat";

impl RedisStore {
    async fn open(url: &Secret, prefix: &str) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url.expose()).map_err(|e| StoreError(format!("redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        // Connect lazily: a Redis that is down when tokengate starts is an outage like any
        // other (requests that need the store get 503, `/readyz` says not ready, and both
        // recover when Redis answers), not a reason to refuse to start.
        let connection = RedisConnection::new(client.clone(), config)?;
        let store = RedisStore {
            client,
            connection,
            prefix: prefix.to_string(),
        };
        if let Err(e) = store.ping().await {
            tracing::warn!(error = %e, "redis token store unreachable; retrying on demand");
        }
        Ok(store)
    }

    fn token_key(&self, hash: &[u8; 32]) -> String {
        format!("{}t:{}", self.prefix, hex::encode(hash))
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}i:{id}", self.prefix)
    }

    fn user_key(&self, subject: &str) -> String {
        format!("{}u:{subject}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// Where the CLI's revocations are announced a second time, to be counted.
    fn cli_channel(&self) -> String {
        format!("{}revocations:cli", self.prefix)
    }

    /// Where the CLI announces the tokens it issues, to be counted.
    fn cli_issued_channel(&self) -> String {
        format!("{}issued:cli", self.prefix)
    }

    /// Whether this replica is the first to count the CLI's event `what` (a revoked hash, an
    /// issued token's id).
    async fn claim_count(&self, what: &str) -> bool {
        let mut c = self.connection.clone();
        let claimed: Result<Option<String>, _> = redis::cmd("SET")
            .arg(format!("{}counted:{what}", self.prefix))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(3600)
            .query_async(&mut c)
            .await;
        matches!(claimed, Ok(Some(_)))
    }

    async fn insert(&self, r: &TokenRecord) -> Result<(), StoreError> {
        let token_key = self.token_key(&r.hash);
        let id_key = self.id_key(&r.id);
        let mut fields: Vec<(&str, String)> = vec![
            ("id", r.id.clone()),
            ("subject", r.subject.clone()),
            ("account", r.account.clone()),
            ("name", r.name.clone()),
            ("kind", r.kind.as_str().to_string()),
            ("created", r.created_ms.to_string()),
        ];
        if let Some(dn) = &r.dn {
            fields.push(("dn", dn.clone()));
        }
        if let Some(e) = r.expires_ms {
            fields.push(("expires", e.to_string()));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(&token_key, &fields)
            .ignore()
            .set(&id_key, hex::encode(r.hash))
            .ignore()
            .sadd(self.user_key(&r.subject), &r.id)
            .ignore();
        if let Some(e) = r.expires_ms {
            pipe.cmd("PEXPIREAT").arg(&token_key).arg(e).ignore();
            pipe.cmd("PEXPIREAT").arg(&id_key).arg(e).ignore();
        }
        if is_cli() {
            pipe.publish(
                self.cli_issued_channel(),
                format!("{} {}", r.id, r.kind.as_str()),
            )
            .ignore();
        }
        let mut c = self.connection.clone();
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    async fn find(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let mut c = self.connection.clone();
        let fields: HashMap<String, String> = c.hgetall(self.token_key(hash)).await?;
        Ok(redis_record(*hash, &fields))
    }

    async fn list(&self, subject: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        let mut c = self.connection.clone();
        let ids: Vec<String> = match subject {
            Some(s) => c.smembers(self.user_key(s)).await?,
            None => {
                // Every token: walk the id keys (SCAN, not KEYS, so Redis is never blocked).
                let mut ids = Vec::new();
                let mut iter = c
                    .scan_match::<_, String>(format!("{}i:*", glob_escape(&self.prefix)))
                    .await?;
                let skip = self.prefix.len() + 2;
                while let Some(key) = iter.next().await {
                    ids.push(key?.get(skip..).unwrap_or_default().to_string());
                }
                // SCAN may return a key more than once.
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            match self.hash_of(&id).await? {
                Some(hash) => {
                    if let Some(r) = self.find(&hash).await? {
                        records.push(r);
                    }
                }
                // Expired in Redis: drop it from the user's set too.
                None => {
                    if let Some(s) = subject {
                        let _: () = c.srem(self.user_key(s), &id).await?;
                    }
                }
            }
        }
        Ok(records)
    }

    async fn hash_of(&self, id: &str) -> Result<Option<[u8; 32]>, StoreError> {
        let mut c = self.connection.clone();
        let hash: Option<String> = c.get(self.id_key(id)).await?;
        Ok(hash
            .and_then(|h| hex::decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()))
    }

    async fn delete(&self, r: &TokenRecord) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.token_key(&r.hash))
            .ignore()
            .del(self.id_key(&r.id))
            .ignore()
            .srem(self.user_key(&r.subject), &r.id)
            .ignore()
            .publish(self.channel(), hex::encode(r.hash))
            .ignore();
        if is_cli() {
            // A second channel, so replicas of older versions still read the first unchanged.
            pipe.publish(self.cli_channel(), hex::encode(r.hash))
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    async fn touch(&self, hash: &[u8; 32], at_ms: i64) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        // HSET only where the token still exists (a revoked token must not reappear).
        redis::Script::new("if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used', ARGV[1]) end return 0")
            .key(self.token_key(hash))
            .arg(at_ms)
            .invoke_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok(())
    }

    /// Subscribes to revocations and evicts each from the cache. After a lost subscription the
    /// messages sent meanwhile are unknown: every store-validated cache entry is dropped.
    async fn follow_revocations(&self, evict: &(impl Fn(StoreEvent) + Send + Sync)) {
        let channel = self.channel();
        let cli_channel = self.cli_channel();
        let cli_issued_channel = self.cli_issued_channel();
        let mut connected_before = false;
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                pubsub.subscribe(&cli_channel).await?;
                pubsub.subscribe(&cli_issued_channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = match tokio::time::timeout(REDIS_CONNECT_TIMEOUT * 2, subscribed).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "revocation subscription failed; retrying");
                    tokio::time::sleep(REDIS_RESUBSCRIBE_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!("revocation subscription timed out; retrying");
                    continue;
                }
            };
            if connected_before {
                evict(StoreEvent::Unknown);
                tracing::info!(
                    "revocation subscription restored; store-validated cache entries dropped"
                );
            }
            connected_before = true;
            let mut messages = pubsub.into_on_message();
            let mut heartbeat = tokio::time::interval(REDIS_HEARTBEAT);
            let mut last_heard = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else {
                            tracing::warn!("revocation subscription lost; resubscribing");
                            break;
                        };
                        last_heard = tokio::time::Instant::now();
                        let Ok(payload) = message.get_payload::<String>() else {
                            continue;
                        };
                        if message.get_channel_name() == cli_issued_channel {
                            if let Some((id, kind)) = payload.trim().split_once(' ') {
                                if self.claim_count(&format!("issued:{id}")).await {
                                    evict(StoreEvent::IssuedByCli(Kind::parse(kind)));
                                }
                            }
                            continue;
                        }
                        let Some(hash) = hex::decode(payload.trim())
                            .ok()
                            .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
                        else {
                            continue;
                        };
                        if message.get_channel_name() == cli_channel {
                            // Evicted by the first message; here only counted, once.
                            if self.claim_count(payload.trim()).await {
                                evict(StoreEvent::One { hash, by_cli: true });
                            }
                        } else {
                            evict(StoreEvent::One { hash, by_cli: false });
                        }
                    }
                    _ = heartbeat.tick() => {
                        if last_heard.elapsed() >= REDIS_SUBSCRIPTION_SILENCE {
                            tracing::warn!(
                                silent_for = ?last_heard.elapsed(),
                                "revocation subscription silent (own heartbeats not received); \
                                 resubscribing"
                            );
                            break;
                        }
                        // Through the command connection: received back, it proves that the
                        // subscription delivers.
                        let mut c = self.connection.clone();
                        let published = redis::cmd("PUBLISH")
                            .arg(&channel)
                            .arg(REDIS_HEARTBEAT_MESSAGE)
                            .query_async::<i64>(&mut c)
                            .await;
                        if let Err(e) = published {
                            tracing::debug!(error = %e, "revocation heartbeat not published");
                        }
                    }
                }
            }
            tokio::time::sleep(REDIS_RESUBSCRIBE_PAUSE).await;
        }
    }
}

/// `text` as a literal in a Redis glob pattern (`MATCH`): `*`, `?`, `[`, `]` and `\` escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn redis_record(hash: [u8; 32], f: &HashMap<String, String>) -> Option<TokenRecord> {
    let number = |name: &str| f.get(name).and_then(|v| v.parse::<i64>().ok());
    Some(TokenRecord {
        hash,
        id: f.get("id")?.clone(),
        subject: f.get("subject")?.clone(),
        account: f.get("account")?.clone(),
        name: f.get("name").cloned().unwrap_or_default(),
        kind: Kind::parse(f.get("kind")?),
        dn: f.get("dn").cloned(),
        created_ms: number("created")?,
        expires_ms: number("expires"),
        last_used_ms: number("last_used"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escape_makes_a_prefix_literal() {
        assert_eq!(glob_escape("tokengate:"), "tokengate:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
