//! Live reload: SIGHUP, or a change to the config file or to a certificate, key or CA file it
//! names (cert-manager and Kubernetes Secrets rewrite them in place), builds a new gate and
//! swaps it in. Open connections and in-flight requests are untouched; new requests and new
//! handshakes use the new gate. A broken new config or certificate is logged, counted, and the
//! old gate keeps serving.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{Config, JwtKeySource, JwtValidatorConfig, ValidatorConfig};
use crate::proxy::SharedGate;

/// How often the watched files are looked at.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A file's identity for change detection: modification time and size (`metadata` follows
/// symlinks, so a Secret's `..data` swap is seen).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The config file and every file it names.
fn watched_files(path: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    if let Some(tls) = &config.server.tls {
        files.push(tls.cert.clone());
        files.push(tls.key.clone());
        files.extend(tls.client_ca.clone());
    }
    files.extend(config.routes.iter().filter_map(|r| r.upstream_ca.clone()));
    files.extend(config.validators.iter().filter_map(|v| match v {
        ValidatorConfig::Jwt(JwtValidatorConfig {
            keys: JwtKeySource::PublicKey { path, .. },
            ..
        }) => Some(path.clone()),
        _ => None,
    }));
    files
}

/// Reloads on SIGHUP and on file changes, forever.
///
/// The SIGHUP handler is installed when this is called, not when the returned future first
/// runs: until a handler exists, SIGHUP's default action kills the process, so a reload signal
/// sent just after startup must not find the gap of a not-yet-scheduled task.
pub fn watch(path: PathBuf, gate: SharedGate) -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reloading on file changes only");
            None
        }
    };
    async move {
        let mut files = watched_files(&path, &gate.load().config);
        let mut stamps: Vec<Stamp> = files.iter().map(|f| stamp(f)).collect();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        loop {
            let why = tokio::select! {
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => {
                    let now: Vec<Stamp> = files.iter().map(|f| stamp(f)).collect();
                    if now == stamps {
                        continue;
                    }
                    // A writer may still be mid-way: let the files settle for a moment.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "file change"
                }
            };
            reload(&path, &gate, why);
            files = watched_files(&path, &gate.load().config);
            stamps = files.iter().map(|f| stamp(f)).collect();
        }
    }
}

/// Settings read once at startup: a reload that changes them is applied except for these, and
/// says so rather than ignoring them silently.
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (&current.server, &next.server);
    let admin_listen = |c: &Config| c.admin.as_ref().map(|a| a.listen);
    [
        ("server.listen", a.listen != b.listen),
        (
            "server.max_header_bytes",
            a.max_header_bytes != b.max_header_bytes,
        ),
        (
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        (
            "server.max_connections",
            a.max_connections != b.max_connections,
        ),
        ("server.drain_timeout", a.drain_timeout != b.drain_timeout),
        ("admin.listen", admin_listen(current) != admin_listen(next)),
        (
            "verify.listen",
            current.verify.as_ref().map(|v| v.listen) != next.verify.as_ref().map(|v| v.listen),
        ),
        (
            "verify.tls",
            current.verify.as_ref().map(|v| &v.tls) != next.verify.as_ref().map(|v| &v.tls),
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Loads the config again and swaps in a new gate; on error keeps the old one.
pub fn reload(path: &Path, gate: &SharedGate, why: &str) {
    let current = gate.load_full();
    let result = crate::gate::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            if config.store != current.config.store {
                tracing::warn!("[store] changed: takes effect after a restart");
            }
            crate::gate::assemble(
                config,
                Arc::clone(&current.store),
                current.usage(),
                Some(&current),
            )
        });
    match result {
        Ok(next) => {
            for key in restart_only_changes(&current.config, &next.config) {
                tracing::warn!(key, "changed: takes effect after a restart");
            }
            gate.store(Arc::new(next));
            crate::telemetry::config_reload(true);
            tracing::info!(reason = why, "config reloaded");
        }
        Err(e) => {
            crate::telemetry::config_reload(false);
            tracing::error!(reason = why, error = %e, "config reload rejected; keeping the running config");
        }
    }
}
