//! The `redis` backend: shared by replicas; expiry by Redis; revocations published so every
//! replica evicts its cache entry at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::AsyncCommands;
use futures_util::StreamExt;

use super::*;
use crate::config::Secret;

/// A Redis server shared by replicas. Keys: `{prefix}t:{hash}` (a hash of the record's fields),
/// `{prefix}i:{id}` (→ hash), `{prefix}u:{subject}` (set of ids); tokens with a lifetime expire
/// in Redis. Revocations are published on `{prefix}revocations`.
pub struct RedisStore {
    pub(super) client: ::redis::Client,
    pub(super) connection: RedisConnection,
    pub(super) prefix: String,
}

/// The Redis command connection: a `ConnectionManager`, replaced by a fresh one when a command
/// times out. The manager reconnects by itself when its connection drops, but not when the
/// connection goes silent (a dropped NAT or conntrack entry, a frozen peer): every command
/// would then time out for good.
#[derive(Clone)]
pub(super) struct RedisConnection(Arc<RedisConnectionInner>);

pub(super) struct RedisConnectionInner {
    pub(super) client: ::redis::Client,
    pub(super) config: ConnectionManagerConfig,
    pub(super) current: arc_swap::ArcSwap<ConnectionManager>,
}

impl RedisConnection {
    pub(super) fn new(
        client: ::redis::Client,
        config: ConnectionManagerConfig,
    ) -> ::redis::RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(RedisConnection(Arc::new(RedisConnectionInner {
            client,
            config,
            current: arc_swap::ArcSwap::from_pointee(manager),
        })))
    }

    /// After a timeout on `used`: a fresh manager (connecting on first use), unless another
    /// caller has replaced `used` already.
    pub(super) fn replace(&self, used: &Arc<ConnectionManager>) {
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
    pub(super) async fn run<T>(
        &self,
        call: impl AsyncFnOnce(&mut ConnectionManager) -> ::redis::RedisResult<T>,
    ) -> ::redis::RedisResult<T> {
        let used = self.0.current.load_full();
        let mut manager = (*used).clone();
        let result = call(&mut manager).await;
        if result.as_ref().is_err_and(::redis::RedisError::is_timeout) {
            self.replace(&used);
        }
        result
    }
}

impl ::redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        Box::pin(self.run(async |m| m.req_packed_command(cmd).await))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        Box::pin(self.run(async move |m| m.req_packed_commands(pipeline, offset, count).await))
    }

    fn get_db(&self) -> i64 {
        ::redis::aio::ConnectionLike::get_db(&**self.0.current.load())
    }
}

/// How long one Redis command may take before the store counts as unreachable.
pub(super) const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
pub(super) const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts to re-subscribe to revocations.
pub(super) const REDIS_RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(500);
/// How often each replica publishes a heartbeat on the revocation channel.
pub const REDIS_HEARTBEAT: Duration = Duration::from_secs(5);
/// A subscription that has delivered nothing (not even our own heartbeats) for this long is
/// dead, though its connection may look open (a silently dropped TCP connection, a Redis
/// failover that kept the socket): it is replaced, and the cache dropped as after any loss.
pub const REDIS_SUBSCRIPTION_SILENCE: Duration = Duration::from_secs(15);
/// The heartbeat message (not a token hash, so receivers pass it over).
pub(super) const REDIS_HEARTBEAT_MESSAGE: &str = "heartbeat";

/// GCRA in Redis, as `limits::Buckets` keeps it locally: the key holds the moment (µs, Redis's
/// clock) the bucket is full again, and expires then (a full bucket is no bucket). ARGV: the
/// interval and the tolerance (µs), 1 to take a token or -1 to give one back. Returns
/// `{1, 0}` (taken) or `{0, µs to wait}`. Lua numbers are doubles: µs since 1970 fit in 53 bits.
const BUCKET_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if full_at < now then full_at = now end
local later
if tonumber(ARGV[3]) < 0 then
  later = full_at - interval
else
  later = full_at + interval
  if later - now > tolerance then
    return {0, later - now - tolerance}
  end
end
if later <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%d', later), 'PX', math.ceil((later - now) / 1000))
end
return {1, 0}
";

impl RedisStore {
    pub(super) async fn open(url: &Secret, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = ::redis::Client::open(url.expose())
            .map_err(|e| StoreError(format!("redis url: {e}")))?;
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

    pub(super) fn token_key(&self, hash: &[u8; 32]) -> String {
        format!("{}t:{}", self.prefix, hex::encode(hash))
    }

    pub(super) fn id_key(&self, id: &str) -> String {
        format!("{}i:{id}", self.prefix)
    }

    pub(super) fn user_key(&self, subject: &str) -> String {
        format!("{}u:{subject}", self.prefix)
    }

    pub(super) fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// Where the CLI's revocations are announced a second time, to be counted.
    pub(super) fn cli_channel(&self) -> String {
        format!("{}revocations:cli", self.prefix)
    }

    /// Where the CLI announces the tokens it issues, to be counted.
    pub(super) fn cli_issued_channel(&self) -> String {
        format!("{}issued:cli", self.prefix)
    }

    /// Whether this replica is the first to count the CLI's event `what` (a revoked hash, an
    /// issued token's id).
    pub(super) async fn claim_count(&self, what: &str) -> bool {
        let mut c = self.connection.clone();
        let claimed: Result<Option<String>, _> = ::redis::cmd("SET")
            .arg(format!("{}counted:{what}", self.prefix))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(3600)
            .query_async(&mut c)
            .await;
        matches!(claimed, Ok(Some(_)))
    }

    pub(super) async fn insert(&self, r: &TokenRecord) -> Result<(), StoreError> {
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
        if let Some(scopes) = names_text(&r.scopes) {
            fields.push(("scopes", scopes));
        }
        if let Some(groups) = names_text(&r.groups) {
            fields.push(("groups", groups));
        }
        let mut pipe = ::redis::pipe();
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

    pub(super) async fn find(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let mut c = self.connection.clone();
        let fields: HashMap<String, String> = c.hgetall(self.token_key(hash)).await?;
        Ok(redis_record(*hash, &fields))
    }

    pub(super) async fn list(&self, subject: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
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

    pub(super) async fn hash_of(&self, id: &str) -> Result<Option<[u8; 32]>, StoreError> {
        let mut c = self.connection.clone();
        let hash: Option<String> = c.get(self.id_key(id)).await?;
        Ok(hash
            .and_then(|h| hex::decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()))
    }

    pub(super) async fn delete(&self, r: &TokenRecord) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        let mut pipe = ::redis::pipe();
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

    pub(super) async fn touch(&self, hash: &[u8; 32], at_ms: i64) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        // HSET only where the token still exists (a revoked token must not reappear).
        ::redis::Script::new("if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used', ARGV[1]) end return 0")
            .key(self.token_key(hash))
            .arg(at_ms)
            .invoke_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// `Store::bucket`: one script, so two replicas never both take the last token.
    pub(super) async fn bucket(
        &self,
        limit: &str,
        key: u128,
        interval: u64,
        tolerance: u64,
        take: bool,
    ) -> Result<Result<(), u64>, StoreError> {
        static SCRIPT: std::sync::OnceLock<::redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| ::redis::Script::new(BUCKET_SCRIPT));
        let mut c = self.connection.clone();
        let (allowed, wait): (i64, i64) = script
            .key(format!("{}l:{limit}:{key:032x}", self.prefix))
            .arg(interval)
            .arg(tolerance)
            .arg(if take { 1 } else { -1 })
            .invoke_async(&mut c)
            .await?;
        Ok(match allowed {
            1 => Ok(()),
            _ => Err(u64::try_from(wait).unwrap_or(0)),
        })
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.connection.clone();
        ::redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok(())
    }

    /// Subscribes to revocations and evicts each from the cache. After a lost subscription the
    /// messages sent meanwhile are unknown: every store-validated cache entry is dropped.
    pub(super) async fn follow_revocations(&self, evict: &(impl Fn(StoreEvent) + Send + Sync)) {
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
                Ok::<_, ::redis::RedisError>(pubsub)
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
                        let published = ::redis::cmd("PUBLISH")
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
pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(super) fn redis_record(hash: [u8; 32], f: &HashMap<String, String>) -> Option<TokenRecord> {
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
        // A record whose names cannot be read is no record (its token is refused), never
        // one with fewer scopes or groups than it was given.
        scopes: names_of(f.get("scopes").map(String::as_str)).ok()?,
        groups: names_of(f.get("groups").map(String::as_str)).ok()?,
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
