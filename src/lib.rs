//! tokengate: an authenticating reverse-proxy sidecar.
//!
//! A request's life, one module per step: accept, limits and drain on per-core workers
//! ([`server`]) → TLS ([`tls`]) → normalise the path and route ([`path`]), then the chain in
//! [`proxy`]: extract the credential ([`credential`]) → validate ([`cache`], then [`validate`])
//! → rewrite ([`rewrite`]) → forward ([`upstream`]) → one access-log line ([`access_log`]).
//! Errors become responses in one place ([`error`]); token events are audited ([`audit`]).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod authorize;
pub mod cache;
pub mod client_addr;
pub mod clock;
pub mod config;
pub mod credential;
pub mod demo;
pub mod endpoints;
pub mod error;
pub mod gate;
pub mod identity;
pub mod jwt;
pub mod jwt_validator;
pub mod limits;
pub mod listener;
pub mod page;
pub mod path;
pub mod pki;
pub mod proxy;
pub mod reload;
pub mod response;
pub mod rewrite;
pub mod rucio;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod token;
pub mod trace;
pub mod upstream;
pub mod validate;
pub mod verify;
pub mod worker;
pub mod x509;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use config::Config;

/// Makes a panic (always a bug) cost only the task it happened in, logged by location: the
/// build unwinds (no `panic = "abort"`), so tokio ends that connection's task and the process
/// keeps serving everyone else (SPEC §9). The panic's message is never logged, since it may
/// hold the value that caused it (a credential).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(
            || "unknown".to_string(),
            |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
        );
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        if tracing::dispatcher::has_been_set() {
            tracing::error!(
                %location,
                thread,
                "panic (a bug): the task it happened in has ended; the process goes on (the \
                 panic's message is not logged: it may hold a credential)"
            );
        } else {
            eprintln!("tokengate: panic (a bug) at {location} on thread {thread}");
        }
    }));
}

/// Runs the proxy with a checked config until `shutdown` resolves, then drains. With
/// `config_path`, SIGHUP and changes to the config or its certificate files reload it.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let listener = listener::bind(config.server.listen).await?;
    run_on(listener, config, config_path, shutdown).await
}

/// [`run`] on a listener bound already (`server.listen` is then only informative).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let store = Arc::new(
        store::Store::open(&config.store)
            .await
            .map_err(|e| format!("token store: {e}"))?,
    );
    run_with_store(listener, config, config_path, store, shutdown).await
}

/// [`run_on`] with a store already open (the demo issues its token into it first).
pub async fn run_with_store(
    listener: tokio::net::TcpListener,
    config: Config,
    config_path: Option<PathBuf>,
    store: Arc<store::Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tls = config.server.tls.is_some();
    let routes: Vec<String> = config
        .routes
        .iter()
        .map(|r| format!("{} -> {}", r.path_prefix, r.upstream))
        .collect();
    let validators: Vec<&str> = config
        .validators
        .iter()
        .map(config::ValidatorConfig::kind)
        .collect();
    let metrics = telemetry::install();
    let admin_addr = config.admin.as_ref().map(|a| a.listen);
    let (usage, usage_marks) = tokio::sync::mpsc::channel(USAGE_QUEUE);
    let gate = gate::assemble(config, Arc::clone(&store), usage, None)?;
    let gate: proxy::SharedGate = Arc::new(ArcSwap::from_pointee(gate));
    let health = Arc::new(admin::Health::default());
    let mut background = Vec::new();
    if let Some(handle) = &metrics {
        background.push(tokio::spawn(telemetry::upkeep(handle.clone())));
    }
    if let Some(admin_addr) = admin_addr {
        let admin_listener = listener::bind(admin_addr).await?;
        let state = admin::AdminState {
            gate: Arc::clone(&gate),
            health: Arc::clone(&health),
            metrics,
        };
        background.push(tokio::spawn(admin::serve(admin_listener, state)));
        tracing::info!(listen = %admin_addr, "admin listener");
    }
    if let Some(verify) = gate.load().config.verify.clone() {
        let acceptor = match &verify.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(tls)?)),
            None => None,
        };
        let verify_listener = listener::bind(verify.listen).await?;
        background.push(tokio::spawn(verify::serve(
            verify_listener,
            Arc::clone(&gate),
            acceptor,
        )));
        tracing::info!(listen = %verify.listen, ingress = ?verify.ingress, "verify listener");
    }
    background.push(tokio::spawn(write_usage(Arc::clone(&store), usage_marks)));
    background.push(tokio::spawn(follow_revocations(
        Arc::clone(&store),
        Arc::clone(&gate),
    )));
    if let Some(path) = config_path {
        background.push(tokio::spawn(reload::watch(path, Arc::clone(&gate))));
    }
    tracing::info!(listen = %addr, tls, routes = ?routes, validators = ?validators, "tokengate listening");
    let result = server::serve(gate, listener, health, shutdown).await;
    for task in background {
        task.abort();
    }
    result
}

/// Last-use marks waiting to be written; beyond this, marks are dropped (they are advisory).
const USAGE_QUEUE: usize = 4096;

/// Writes `lastUsed` marks to the store, off the request path.
async fn write_usage(
    store: Arc<store::Store>,
    mut marks: tokio::sync::mpsc::Receiver<([u8; 32], i64)>,
) {
    while let Some((hash, at)) = marks.recv().await {
        if let Err(e) = store.touch(&hash, at).await {
            tracing::warn!(error = %e, "cannot record a token's last use");
        }
    }
}

/// Evicts tokens revoked elsewhere from the cache of the gate in force.
async fn follow_revocations(store: Arc<store::Store>, gate: proxy::SharedGate) {
    store
        .follow_revocations(move |revoked| {
            let gate = gate.load();
            match revoked {
                store::StoreEvent::One { hash, by_cli } => {
                    gate.cache().evict(&hash);
                    if by_cli {
                        telemetry::token_revoked();
                    }
                }
                store::StoreEvent::IssuedByCli(kind) => telemetry::token_issued(kind.as_str()),
                store::StoreEvent::Unknown => {
                    gate.cache()
                        .evict_where(|identity| identity.token_id.is_some());
                }
            }
        })
        .await;
}
