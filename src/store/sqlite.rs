//! The `sqlite` backend: an SQLite file in WAL mode, the embedded default; survives `kill -9`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// An SQLite file, WAL mode. One connection per process, used from blocking threads.
pub struct SqliteStore {
    pub(super) connection: Arc<Mutex<rusqlite::Connection>>,
    pub(super) path: PathBuf,
}

/// How often a server looks for revocations made by other processes on the same file.
pub(super) const SQLITE_REVOCATION_POLL: Duration = Duration::from_millis(250);
/// How long revocation log entries are kept for pollers.
pub(super) const SQLITE_REVOCATION_RETENTION_MS: i64 = 24 * 3600 * 1000;

pub(super) const SQLITE_SCHEMA: &str = "
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
pub(super) const SQLITE_ORIGIN_COLUMN: &str = "ALTER TABLE revocations ADD COLUMN origin TEXT";

/// Files made before tokens had scopes gain these columns (JSON arrays; NULL = none, so their
/// tokens have no scopes and no groups). Older readers name their columns and ignore them.
pub(super) const SQLITE_SCOPES_COLUMNS: &str =
    "ALTER TABLE tokens ADD COLUMN scopes TEXT; ALTER TABLE tokens ADD COLUMN owner_groups TEXT;";

pub(super) const SQLITE_COLUMNS: &str =
    "hash, id, subject, account, name, kind, dn, created, expires, last_used, scopes, owner_groups";

pub(super) fn sqlite_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
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
        scopes: sqlite_names(row, 10)?,
        groups: sqlite_names(row, 11)?,
    })
}

/// A scopes or groups column (a record that cannot be read is an error, never one with fewer
/// names than it was given).
fn sqlite_names(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Vec<String>> {
    let text: Option<String> = row.get(column)?;
    names_of(text.as_deref()).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Adds the scopes columns to a file made before them, once: in a write transaction, so that
/// two processes opening the same old file do not both add them.
fn migrate_scopes(c: &mut rusqlite::Connection) -> rusqlite::Result<()> {
    let has = |c: &rusqlite::Connection| {
        c.prepare("SELECT scopes, owner_groups FROM tokens LIMIT 0")
            .is_ok()
    };
    if has(c) {
        return Ok(());
    }
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !has(&tx) {
        tx.execute_batch(SQLITE_SCOPES_COLUMNS)?;
    }
    tx.commit()
}

impl SqliteStore {
    pub(super) async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        let shown = path.clone();
        let connection =
            tokio::task::spawn_blocking(move || -> Result<rusqlite::Connection, StoreError> {
                let mut c = rusqlite::Connection::open(&path)?;
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
                migrate_scopes(&mut c)?;
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
    pub(super) async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
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

    pub(super) async fn insert(&self, r: TokenRecord) -> Result<(), StoreError> {
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
                &format!("INSERT INTO tokens ({SQLITE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
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
                    r.last_used_ms,
                    names_text(&r.scopes),
                    names_text(&r.groups)
                ],
            )?;
            tx.commit()
        })
        .await
    }

    pub(super) async fn find(&self, hash: [u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {SQLITE_COLUMNS} FROM tokens WHERE hash = ?1"
            ))?;
            let mut rows = statement.query_map([hash.as_slice()], sqlite_record)?;
            rows.next().transpose()
        })
        .await
    }

    pub(super) async fn list(
        &self,
        subject: Option<String>,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {SQLITE_COLUMNS} FROM tokens WHERE ?1 IS NULL OR subject = ?1"
            ))?;
            let rows = statement.query_map([subject], sqlite_record)?;
            rows.collect()
        })
        .await
    }

    pub(super) async fn hash_of(&self, id: String) -> Result<Option<[u8; 32]>, StoreError> {
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
    pub(super) async fn delete(&self, record: TokenRecord) -> Result<(), StoreError> {
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

    pub(super) async fn touch(&self, hash: [u8; 32], at_ms: i64) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "UPDATE tokens SET last_used = ?1 WHERE hash = ?2",
                rusqlite::params![at_ms, hash.as_slice()],
            )
            .map(|_| ())
        })
        .await
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    pub(super) async fn follow_revocations(&self, evict: &(impl Fn(StoreEvent) + Send + Sync)) {
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
