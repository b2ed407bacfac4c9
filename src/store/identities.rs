//! The x509 identity mapping kept in the store (`tokengate identity add|list|remove`), so every
//! replica sharing the store maps a certificate DN to the same accounts. It adds to the
//! `[[x509.identity]]` entries of the config; the first account of a DN is its default.
//!
//! sqlite: table `x509_identities (dn, account, position)`; redis: a list `{prefix}x509:{dn}`
//! of accounts in order plus the set `{prefix}x509:dns`; memory: a map.

use super::{RedisStore, SqliteStore, Store, StoreError};

const SQLITE_IDENTITY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS x509_identities (
    dn TEXT NOT NULL,
    account TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (dn, account)
);
";

impl Store {
    /// The accounts the store maps `dn` to, the default first.
    pub async fn identity_accounts(&self, dn: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.identities.get(dn).map(|a| a.clone()).unwrap_or_default()),
            Store::Sqlite(s) => s.identity_accounts(dn.to_string()).await,
            Store::Redis(r) => r.identity_accounts(dn).await,
        }
    }

    /// Maps `dn` to `account` (appended, or first with `default`). Adding a pair that exists
    /// only moves it when `default` is set.
    pub async fn add_identity(
        &self,
        dn: &str,
        account: &str,
        default: bool,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                let mut accounts = m.identities.entry(dn.to_string()).or_default();
                place(&mut accounts, account, default);
                Ok(())
            }
            Store::Sqlite(s) => {
                s.add_identity(dn.to_string(), account.to_string(), default)
                    .await
            }
            Store::Redis(r) => r.add_identity(dn, account, default).await,
        }
    }

    /// Removes `account` from `dn` (every account of it when `None`); whether anything went.
    pub async fn remove_identity(
        &self,
        dn: &str,
        account: Option<&str>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(match account {
                None => m.identities.remove(dn).is_some(),
                Some(a) => {
                    let removed = m.identities.get_mut(dn).is_some_and(|mut accounts| {
                        let before = accounts.len();
                        accounts.retain(|x| x != a);
                        accounts.len() != before
                    });
                    m.identities
                        .remove_if(dn, |_, accounts| accounts.is_empty());
                    removed
                }
            }),
            Store::Sqlite(s) => {
                s.remove_identity(dn.to_string(), account.map(str::to_string))
                    .await
            }
            Store::Redis(r) => r.remove_identity(dn, account).await,
        }
    }

    /// Every stored mapping, by DN.
    pub async fn list_identities(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut all = match self {
            Store::Memory(m) => m
                .identities
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect(),
            Store::Sqlite(s) => s.list_identities().await?,
            Store::Redis(r) => r.list_identities().await?,
        };
        all.sort();
        Ok(all)
    }
}

/// Puts `account` into `accounts`: first when `default`, else last unless already there.
fn place(accounts: &mut Vec<String>, account: &str, default: bool) {
    let present = accounts.iter().any(|a| a == account);
    if default {
        accounts.retain(|a| a != account);
        accounts.insert(0, account.to_string());
    } else if !present {
        accounts.push(account.to_string());
    }
}

impl SqliteStore {
    async fn identity_accounts(&self, dn: String) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            c.execute_batch(SQLITE_IDENTITY_SCHEMA)?;
            let mut statement = c.prepare_cached(
                "SELECT account FROM x509_identities WHERE dn = ?1 ORDER BY position, account",
            )?;
            let rows = statement.query_map([dn], |row| row.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn add_identity(
        &self,
        dn: String,
        account: String,
        default: bool,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute_batch(SQLITE_IDENTITY_SCHEMA)?;
            // One transaction: concurrent writers (the CLI, another replica) see all or nothing.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut accounts: Vec<String> = {
                let mut statement = tx.prepare(
                    "SELECT account FROM x509_identities WHERE dn = ?1 ORDER BY position, account",
                )?;
                let rows = statement.query_map([&dn], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            place(&mut accounts, &account, default);
            tx.execute("DELETE FROM x509_identities WHERE dn = ?1", [&dn])?;
            for (position, a) in accounts.iter().enumerate() {
                tx.execute(
                    "INSERT INTO x509_identities (dn, account, position) VALUES (?1, ?2, ?3)",
                    rusqlite::params![dn, a, position as i64],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn remove_identity(
        &self,
        dn: String,
        account: Option<String>,
    ) -> Result<bool, StoreError> {
        self.with(move |c| {
            c.execute_batch(SQLITE_IDENTITY_SCHEMA)?;
            let removed = match account {
                None => c.execute("DELETE FROM x509_identities WHERE dn = ?1", [dn])?,
                Some(a) => c.execute(
                    "DELETE FROM x509_identities WHERE dn = ?1 AND account = ?2",
                    [dn, a],
                )?,
            };
            Ok(removed > 0)
        })
        .await
    }

    async fn list_identities(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.with(move |c| {
            c.execute_batch(SQLITE_IDENTITY_SCHEMA)?;
            let mut statement = c.prepare_cached(
                "SELECT dn, account FROM x509_identities ORDER BY dn, position, account",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut all: Vec<(String, Vec<String>)> = Vec::new();
            for row in rows {
                let (dn, account) = row?;
                match all.last_mut() {
                    Some((last, accounts)) if *last == dn => accounts.push(account),
                    _ => all.push((dn, vec![account])),
                }
            }
            Ok(all)
        })
        .await
    }
}

impl RedisStore {
    fn identity_key(&self, dn: &str) -> String {
        format!("{}x509:{dn}", self.prefix)
    }

    fn identities_key(&self) -> String {
        format!("{}x509:dns", self.prefix)
    }

    async fn identity_accounts(&self, dn: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.connection.clone();
        let accounts: Vec<String> = redis::cmd("LRANGE")
            .arg(self.identity_key(dn))
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await?;
        Ok(accounts)
    }

    async fn add_identity(&self, dn: &str, account: &str, default: bool) -> Result<(), StoreError> {
        // A script, so two writers cannot interleave the remove and the push.
        let script = redis::Script::new(
            "local present = redis.call('LPOS', KEYS[1], ARGV[1]) \
             if ARGV[2] == '1' then \
               redis.call('LREM', KEYS[1], 0, ARGV[1]) redis.call('LPUSH', KEYS[1], ARGV[1]) \
             elseif not present then redis.call('RPUSH', KEYS[1], ARGV[1]) end \
             redis.call('SADD', KEYS[2], ARGV[3]) return 0",
        );
        let mut c = self.connection.clone();
        script
            .key(self.identity_key(dn))
            .key(self.identities_key())
            .arg(account)
            .arg(if default { "1" } else { "0" })
            .arg(dn)
            .invoke_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn remove_identity(&self, dn: &str, account: Option<&str>) -> Result<bool, StoreError> {
        let script = redis::Script::new(
            "local n = 0 \
             if ARGV[1] == '' then n = redis.call('DEL', KEYS[1]) \
             else n = redis.call('LREM', KEYS[1], 0, ARGV[1]) end \
             if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end \
             return n",
        );
        let mut c = self.connection.clone();
        let removed: i64 = script
            .key(self.identity_key(dn))
            .key(self.identities_key())
            .arg(account.unwrap_or(""))
            .arg(dn)
            .invoke_async(&mut c)
            .await?;
        Ok(removed > 0)
    }

    async fn list_identities(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut c = self.connection.clone();
        let dns: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.identities_key())
            .query_async(&mut c)
            .await?;
        let mut all = Vec::with_capacity(dns.len());
        for dn in dns {
            let accounts = self.identity_accounts(&dn).await?;
            if !accounts.is_empty() {
                all.push((dn, accounts));
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn placing_keeps_order_and_moves_the_default_first() {
        let mut a = vec![];
        place(&mut a, "alice", false);
        place(&mut a, "ops", false);
        place(&mut a, "alice", false);
        assert_eq!(a, ["alice", "ops"]);
        place(&mut a, "ops", true);
        assert_eq!(a, ["ops", "alice"]);
        place(&mut a, "new", true);
        assert_eq!(a, ["new", "ops", "alice"]);
    }
}
