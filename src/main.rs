//! The `tokengate` command.

// One `unsafe` call, allowed where it is: `trim` (glibc's `malloc_trim`). The library is
// `forbid(unsafe_code)`.
#![deny(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokengate::config::Config;

/// Authenticating reverse-proxy sidecar.
#[derive(Parser)]
#[command(name = "tokengate", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// Listen here instead of `[server] listen` (kept across reloads).
        #[arg(long, env = "TOKENGATE_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Check a config file: prints `config ok`, or `PATH:LINE:COL: message` and exits 2.
    Check {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
    },
    /// Start a local echo upstream and the proxy with the example config, and print curl
    /// commands to try.
    Demo {
        /// Another config instead of the built-in example (its routes point at the echo upstream).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen here instead of the config's address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Make a private CA, a server certificate and a client certificate for trying TLS and the
    /// x509 token exchange locally (never overwrites a file).
    Pki {
        /// The folder to write ca.pem, server.pem, client.pem and their keys to.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Another name (DNS or IP) for the server certificate, besides localhost, 127.0.0.1
        /// and ::1; repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The client certificate's subject, in slash form.
        #[arg(long, default_value = tokengate::pki::DEFAULT_CLIENT_DN)]
        client_dn: String,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Create, list and revoke issued tokens in the configured store.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Map certificate DNs to accounts for the x509 token exchange, in the configured store
    /// (shared by every replica; adds to `[[x509.identity]]`).
    Identity {
        #[command(subcommand)]
        action: IdentityAction,
    },
    /// Print the SHA-256 of a token, for `[[validator.token]] sha256`. Reads the token from
    /// standard input when none is given (keeps it out of shell history).
    Hash {
        /// The token.
        token: Option<String>,
    },
}

/// The format of a new token, on the command line.
#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Opaque,
    Jwt,
}

#[derive(Subcommand)]
enum IdentityAction {
    /// Allow a DN to use an account (the first account of a DN is its default).
    Add {
        /// The config file (its [store] and [x509]).
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// The DN, in the config's x509.dn_format (e.g. "/C=CH/O=Example/CN=Alice Smith").
        #[arg(long)]
        dn: String,
        /// The account.
        #[arg(long)]
        account: String,
        /// Make it the DN's default account.
        #[arg(long)]
        default: bool,
    },
    /// List the DN → accounts mapping (config entries marked "config").
    List {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
    },
    /// Remove an account from a DN, or the DN altogether.
    Remove {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// The DN.
        #[arg(long)]
        dn: String,
        /// Only this account (default: every stored account of the DN).
        #[arg(long)]
        account: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create an API token; prints it once.
    Create {
        /// The config file (its [store] and [tokens]).
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// The owner (subject).
        #[arg(long)]
        user: String,
        /// The account (default: the user).
        #[arg(long)]
        account: Option<String>,
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. "30d", at most [tokens] max_ttl (default: [tokens] default_ttl). "0"
        /// = until revoked, refused unless max_ttl = "0".
        #[arg(long)]
        ttl: Option<String>,
        /// `opaque` (tg_...) or `jwt` (needs [tokens] jwt_key); default: [tokens] format.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// A scope the token has, one of [tokens] scopes; repeat for more (default: [tokens]
        /// login_scopes).
        #[arg(long = "scope", value_name = "NAME")]
        scopes: Vec<String>,
        /// A token with no scopes (instead of [tokens] login_scopes).
        #[arg(long, conflicts_with = "scopes")]
        no_scopes: bool,
    },
    /// List tokens (never their secrets).
    List {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id; running servers drop it within a second.
    Revoke {
        /// The config file.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: PathBuf,
        /// The token id (from `token list`).
        id: String,
    },
}

fn main() -> ExitCode {
    tokengate::install_panic_hook();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(checked) => {
                for warning in tokengate::gate::warnings(&checked) {
                    eprintln!("warning: {warning}");
                }
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Token { action } => {
            init_cli_logging(cli.log_format);
            token_command(action)
        }
        Command::Identity { action } => identity_command(action),
        Command::Hash { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut t = String::new();
                    if let Err(e) = std::io::stdin().read_to_string(&mut t) {
                        eprintln!("cannot read the token from standard input: {e}");
                        return ExitCode::from(2);
                    }
                    t.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            if token.is_empty() {
                eprintln!("tokengate hash: the token is empty (give it as an argument or on standard input)");
                return ExitCode::from(2);
            }
            println!("{}", hex::encode(tokengate::identity::hash(&token)));
            ExitCode::SUCCESS
        }
        Command::Pki {
            dir,
            hosts,
            client_dn,
            days,
        } => {
            let request = tokengate::pki::Request {
                dir: &dir,
                hosts: &hosts,
                client_dn: &client_dn,
                days,
            };
            match tokengate::pki::make(&request) {
                Ok(paths) => {
                    for path in paths {
                        println!("wrote {}", path.display());
                    }
                    println!(
                        "client certificate subject: {client_dn}; server names: localhost, \
                         127.0.0.1, ::1{}",
                        hosts.iter().map(|h| format!(", {h}")).collect::<String>()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tokengate pki: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo { config, listen } => {
            let _log = init_logging(cli.log_format);
            let runtime = match runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(tokengate::demo::run(
                config.as_deref(),
                listen,
                shutdown_signal(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokengate demo: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve {
            config: path,
            listen,
        } => {
            if let Some(addr) = listen {
                tokengate::config::override_listen(addr);
            }
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _log = init_logging(cli.log_format);
            serve(config, path)
        }
    }
}

/// Loads a config; on error prints `PATH:LINE:COL: message` and gives exit status 2.
fn load(path: &Path) -> Result<Config, ExitCode> {
    tokengate::gate::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// The control runtime: admin listener, reload, store subscriptions, validations on cache
/// misses. Requests are served by the workers' own runtimes (`server`).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("tokengate-control")
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn serve(config: Config, path: PathBuf) -> ExitCode {
    // Before the runtime's threads start (they draw their malloc arenas at their first
    // allocation).
    trim::start(tokengate::worker::count(&config.server));
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(tokengate::run(config, Some(path), shutdown_signal())) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serve");
            eprintln!("tokengate: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

/// Threads of the control runtime.
const CONTROL_THREADS: usize = 2;

/// The log filter without `RUST_LOG`: info, but rustls' own warnings about clients' protocol
/// quirks (an IP address as SNI, as wrk and some probes send) off: handshake failures are
/// logged by tokengate itself, once, with the reason.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

/// Logs go to standard output through a background writer, so a slow log reader never blocks
/// a request. `RUST_LOG` filters.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    tokengate::access_log::init(match format {
        LogFormat::Json => tokengate::access_log::Format::Json,
        LogFormat::Text => tokengate::access_log::Format::Text,
    });
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    install_logging(format, writer);
    guard
}

/// The CLI's log lines (audit lines of `token create|revoke`, warnings) go to standard error,
/// written at once: standard output carries only what the command prints (the new token).
fn init_cli_logging(format: LogFormat) {
    install_logging(format, std::io::stderr);
}

/// One JSON (or text) line per event to `writer`; `RUST_LOG` filters.
fn install_logging<W>(format: LogFormat, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

/// Loads the config at `path`, opens its store, and runs `f` on them; a store error is
/// reported and gives a failure status. The memory store exists only inside a server:
/// `memory_hint` says what to do instead.
fn with_store<F, Fut>(path: &Path, issuing: bool, memory_hint: &str, f: F) -> ExitCode
where
    F: FnOnce(tokengate::config::StoreParts, tokengate::store::Store) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, tokengate::store::StoreError>>,
{
    // Only the tables the store commands use are checked (and their secrets resolved).
    let config = match tokengate::config::StoreParts::load(path, issuing) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if config.store == tokengate::config::StoreConfig::Memory {
        eprintln!("the memory store lives inside one server process: {memory_hint}");
        return ExitCode::from(2);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    // Revocations made here are counted by the servers that follow the store.
    tokengate::store::mark_cli();
    runtime.block_on(async {
        let store = match tokengate::store::Store::open(&config.store).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("token store: {e}");
                return ExitCode::FAILURE;
            }
        };
        match f(config, store).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("token store: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `tokengate identity ...`: the DN → accounts mapping in the store the config names.
fn identity_command(action: IdentityAction) -> ExitCode {
    let path = match &action {
        IdentityAction::Add { config, .. }
        | IdentityAction::List { config }
        | IdentityAction::Remove { config, .. } => config.clone(),
    };
    with_store(
        &path,
        false,
        "use [[x509.identity]] in the config instead",
        |config, store| async move {
            let result = match action {
                IdentityAction::Add {
                    dn,
                    account,
                    default,
                    ..
                } => {
                    if dn.trim().is_empty() || account.trim().is_empty() {
                        eprintln!("--dn and --account must not be empty");
                        return Ok(ExitCode::from(2));
                    }
                    store
                        .add_identity(dn.trim(), account.trim(), default)
                        .await
                        .map(|()| println!("{} may use account {}", dn.trim(), account.trim()))
                }
                IdentityAction::List { .. } => store.list_identities().await.map(|stored| {
                    for (dn, accounts) in &config.x509.identities {
                        println!("{dn}\t{}\t(config)", accounts.join(","));
                    }
                    for (dn, accounts) in stored {
                        println!("{dn}\t{}", accounts.join(","));
                    }
                }),
                IdentityAction::Remove { dn, account, .. } => {
                    match store.remove_identity(&dn, account.as_deref()).await {
                        Ok(true) => {
                            println!("removed");
                            Ok(())
                        }
                        Ok(false) => {
                            eprintln!(
                            "no such stored mapping (entries in the config file are edited there)"
                        );
                            return Ok(ExitCode::FAILURE);
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            result.map(|()| ExitCode::SUCCESS)
        },
    )
}

/// `tokengate token ...`: works on the store the config names.
fn token_command(action: TokenAction) -> ExitCode {
    let path = match &action {
        TokenAction::Create { config, .. }
        | TokenAction::List { config, .. }
        | TokenAction::Revoke { config, .. } => config.clone(),
    };
    let issuing = matches!(action, TokenAction::Create { .. });
    with_store(
        &path,
        issuing,
        "use the admin API (POST /tokens) instead",
        |config, store| async move {
            let result = match action {
                TokenAction::Create {
                    user,
                    account,
                    name,
                    ttl,
                    format,
                    scopes,
                    no_scopes,
                    ..
                } => {
                    let ttl = match ttl
                        .as_deref()
                        .map(tokengate::config::parse_duration)
                        .transpose()
                    {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("--ttl: {e}");
                            return Ok(ExitCode::from(2));
                        }
                    };
                    let what = tokengate::token::Issue {
                        subject: &user,
                        account: account.as_deref(),
                        name: &name,
                        ttl,
                        kind: tokengate::store::Kind::Api,
                        dn: None,
                        format: format.map(|f| match f {
                            FormatArg::Opaque => tokengate::config::TokenFormat::Opaque,
                            FormatArg::Jwt => tokengate::config::TokenFormat::Jwt,
                        }),
                        scopes: (no_scopes || !scopes.is_empty()).then_some(scopes.as_slice()),
                        minter: tokengate::token::Minter::Operator,
                    };
                    match tokengate::token::issue(&store, &config.tokens, what).await {
                        Err(tokengate::token::IssueError::Lifetime(e)) => {
                            eprintln!("--ttl: {e}");
                            return Ok(ExitCode::from(2));
                        }
                        Err(tokengate::token::IssueError::Scope(e)) => {
                            eprintln!("--scope: {e}");
                            return Ok(ExitCode::from(2));
                        }
                        Err(tokengate::token::IssueError::Store(e)) => Err(e),
                        Ok((token, record)) => {
                            tokengate::audit::record(
                                tokengate::audit::Event::Created,
                                &record,
                                tokengate::audit::Actor::Cli,
                                None,
                            );
                            eprintln!(
                            "created token {} for {} (account {}), scopes {}, expires {}; it is shown once:",
                            record.id,
                            record.subject,
                            record.account,
                            if record.scopes.is_empty() {
                                "none".to_string()
                            } else {
                                record.scopes.join(",")
                            },
                            record
                                .expires_ms
                                .map_or("never".to_string(), tokengate::clock::rfc3339)
                        );
                            println!("{token}");
                            Ok(())
                        }
                    }
                }
                TokenAction::List { user, .. } => {
                    store.list(user.as_deref()).await.map(|records| {
                        println!(
                            "{:<18} {:<16} {:<16} {:<5} {:<20} {:<20} {:<20} {:<16} name",
                            "id",
                            "user",
                            "account",
                            "kind",
                            "created",
                            "expires",
                            "last used",
                            "scopes"
                        );
                        for r in records {
                            let time = |ms: Option<i64>| {
                                ms.map_or("-".to_string(), tokengate::clock::rfc3339)
                            };
                            println!(
                                "{:<18} {:<16} {:<16} {:<5} {:<20} {:<20} {:<20} {:<16} {}",
                                r.id,
                                r.subject,
                                r.account,
                                r.kind.as_str(),
                                time(Some(r.created_ms)),
                                time(r.expires_ms),
                                time(r.last_used_ms),
                                if r.scopes.is_empty() {
                                    "-".to_string()
                                } else {
                                    r.scopes.join(",")
                                },
                                r.name
                            );
                        }
                    })
                }
                TokenAction::Revoke { id, .. } => match store.revoke(&id, None).await {
                    Ok(Some(r)) => {
                        tokengate::audit::record(
                            tokengate::audit::Event::Revoked,
                            &r,
                            tokengate::audit::Actor::Cli,
                            None,
                        );
                        println!("revoked {} ({})", r.id, r.subject);
                        Ok(())
                    }
                    Ok(None) => {
                        eprintln!("no token with id {id}");
                        return Ok(ExitCode::FAILURE);
                    }
                    Err(e) => Err(e),
                },
            };
            result.map(|()| ExitCode::SUCCESS)
        },
    )
}

/// glibc keeps the pages a burst of connections made it take (its high-water mark); every
/// `INTERVAL` this hands the free ones back to the kernel, so that RSS falls back to within
/// 1.2× of its pre-burst value within 2 minutes (tests/rss_after_burst.rs; the candidates
/// measured are in bench/README.md: jemalloc and mimalloc did not meet the bound at the
/// same cost). One thread, asleep but for a few microseconds every 10 s.
///
/// And one malloc arena per worker (glibc's default is 8 per core): a connection's buffers
/// then come from its worker's arena, not from whichever of a dozen arenas a thread drew,
/// which `tests/floods.rs` measured at 23.8–24.1 KiB per idle keep-alive client with glibc's
/// default, 22.2–22.6 KiB with an arena per worker.
/// Allocations and frees on one thread are served by glibc's per-thread cache without taking
/// the arena's lock. `MALLOC_ARENA_MAX` in the environment is respected.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod trim {
    use std::time::Duration;

    const INTERVAL: Duration = Duration::from_secs(10);

    /// Before any thread but the main one is started: `arenas` malloc arenas at most.
    pub fn start(arenas: usize) {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            let arenas = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
            #[allow(unsafe_code)]
            // SAFETY: sets one of glibc's malloc parameters; called before other threads run.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, arenas);
            }
        }
        let spawned = std::thread::Builder::new()
            .name("tokengate-trim".into())
            .spawn(|| loop {
                std::thread::sleep(INTERVAL);
                #[allow(unsafe_code)]
                // SAFETY: takes only a size and touches no memory of ours: glibc returns the
                // free pages of its arenas to the kernel, under its own arena locks.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory-trim thread");
        }
    }
}

/// Other C libraries (musl): nothing to trim this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod trim {
    pub fn start(_arenas: usize) {}
}
