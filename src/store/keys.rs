//! Named random keys kept in the store, so that every replica sharing it, and the process after
//! a restart, use the same one (the token page's CSRF key). A key is made once, by whichever
//! process asks first; a concurrent second maker loses the race and reads the winner's.
//!
//! sqlite: table `keys (name, value)`; redis: the string `{prefix}key:{name}` (hex), set with
//! `NX`; memory: a map.

use ring::rand::{SecureRandom, SystemRandom};

use super::{RedisStore, SqliteStore, Store, StoreError};

const SQLITE_KEYS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
";

impl Store {
    /// The 256-bit key called `name`, made now if the store has none yet.
    pub async fn key(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let fresh = random_key()?;
        match self {
            Store::Memory(m) => Ok(*m.keys.entry(name.to_string()).or_insert(fresh)),
            Store::Sqlite(s) => s.key(name.to_string(), fresh).await,
            Store::Redis(r) => r.key(name, fresh).await,
        }
    }
}

fn random_key() -> Result<[u8; 32], StoreError> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| StoreError("the OS random number generator failed".to_string()))?;
    Ok(key)
}

fn key_of(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| StoreError("a stored key is not 32 bytes".into()))
}

impl SqliteStore {
    async fn key(&self, name: String, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let stored = self
            .with(move |c| {
                c.execute_batch(SQLITE_KEYS_SCHEMA)?;
                c.execute(
                    "INSERT OR IGNORE INTO keys (name, value) VALUES (?1, ?2)",
                    rusqlite::params![name, fresh.as_slice()],
                )?;
                c.query_row("SELECT value FROM keys WHERE name = ?1", [name], |row| {
                    row.get::<_, Vec<u8>>(0)
                })
            })
            .await?;
        key_of(&stored)
    }
}

impl RedisStore {
    async fn key(&self, name: &str, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let mut c = self.connection.clone();
        // SET NX then GET, atomically: the first writer's key, whoever that was.
        let stored: String = redis::Script::new(
            "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])",
        )
        .key(format!("{}key:{name}", self.prefix))
        .arg(hex::encode(fresh))
        .invoke_async(&mut c)
        .await?;
        let bytes = hex::decode(stored.trim())
            .map_err(|_| StoreError("a stored key is not hex".to_string()))?;
        key_of(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_made_once_and_kept() {
        let store = Store::Memory(super::super::MemoryStore::default());
        let first = store.key("page-csrf").await.unwrap();
        assert_eq!(store.key("page-csrf").await.unwrap(), first);
        assert_ne!(store.key("other").await.unwrap(), first);
    }

    #[tokio::test]
    async fn an_sqlite_key_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::StoreConfig::Sqlite {
            path: dir.path().join("t.db"),
        };
        let first = Store::open(&config).await.unwrap().key("k").await.unwrap();
        let again = Store::open(&config).await.unwrap().key("k").await.unwrap();
        assert_eq!(first, again);
    }
}
