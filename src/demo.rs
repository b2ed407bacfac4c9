//! `tokengate demo`: the example config against a local echo upstream, so a newcomer sees the
//! rewrite happen with nothing else running.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{StoreConfig, ValidatorConfig};
use crate::credential::Source;
use crate::response::json_response;
use crate::upstream::Body;

/// The example config, built into the binary so the demo runs from any folder.
pub const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");
/// The token whose hash the example config holds.
pub const DEMO_TOKEN: &str = "demo-token";

/// The path of the echo upstream that answers as an introspection endpoint.
const VALIDATE_PATH: &str = "/_demo/validate";

/// The example config (or `config_path`'s), with `listen` overridden when given, every route
/// and every introspect validator pointed at the echo upstream the demo starts, and the store
/// in memory (the demo writes no file and needs no Redis).
pub async fn run(
    config_path: Option<&Path>,
    listen: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut config = match config_path {
        Some(path) => crate::gate::load(path).map_err(|e| {
            let hint = if e.message.contains("certificate") || e.message.contains("private key") {
                "\n(test certificates for it: `tokengate pki --dir DIR`, DIR where the config \
                 looks for them)"
            } else {
                ""
            };
            format!("{e}{hint}")
        })?,
        None => crate::gate::parse(Path::new("config.example.toml"), EXAMPLE_CONFIG)
            .map_err(|e| e.to_string())?,
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let echo_addr = echo.local_addr().map_err(|e| e.to_string())?;
    let echo_uri: Uri = format!("http://{echo_addr}")
        .parse()
        .map_err(|e| format!("echo upstream address: {e}"))?;
    for route in &mut config.routes {
        route.upstream = echo_uri.clone();
    }
    let mut introspected = false;
    for validator in &mut config.validators {
        if let ValidatorConfig::Introspect(introspect) = validator {
            introspect.url = format!("http://{echo_addr}{VALIDATE_PATH}")
                .parse()
                .map_err(|e| format!("echo upstream address: {e}"))?;
            introspected = true;
        }
    }
    config.store = StoreConfig::Memory;
    let store = Arc::new(
        crate::store::Store::open(&config.store)
            .await
            .map_err(|e| format!("token store: {e}"))?,
    );
    let demo_hash = crate::identity::hash(DEMO_TOKEN);
    let static_demo = config.validators.iter().any(|v| match v {
        ValidatorConfig::Static(tokens) => tokens.iter().any(|t| t.sha256 == demo_hash),
        _ => false,
    });
    // Without a validator that knows the demo token, a token is issued for the demo.
    let token = if static_demo || introspected {
        DEMO_TOKEN.to_string()
    } else {
        let what = crate::token::Issue {
            subject: "demo",
            account: None,
            name: "demo",
            ttl: None,
            kind: crate::store::Kind::Api,
            dn: None,
            format: None,
            scopes: None,
            minter: crate::token::Minter::Operator,
        };
        let (token, _) = crate::token::issue(&store, &config.tokens, what)
            .await
            .map_err(|e| format!("cannot issue a demo token: {e}"))?;
        token
    };
    tokio::spawn(serve_echo(echo));

    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // Bound here so that `--listen 127.0.0.1:0` prints the port the system chose.
    let listener = crate::listener::bind(config.server.listen).await?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let base = format!("{scheme}://{listen}");
    let curl = match &config.server.tls {
        // The demo's certificate is not one the system trusts.
        Some(tls) => format!("curl --cacert {}", ca_hint(&tls.cert)),
        None => "curl".to_string(),
    };
    println!(
        "tokengate demo: proxy on {base}, echo upstream on {echo_addr} (it answers with the \
         headers it received{}); tokens in memory only\n\n{}",
        if introspected {
            ", and as the introspection endpoint: it knows the demo token"
        } else {
            ""
        },
        tries(&config.sources, &curl, &base, &token)
    );
    // The demo has no config file to reload: SIGHUP is logged instead of ending the process
    // (its default action).
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: the demo has no config file to reload");
            }
        });
    }
    crate::run_with_store(listener, config, None, store, shutdown).await
}

/// Where the CA that signed the server certificate probably is: `ca.pem` beside it (as
/// `tokengate pki` writes them).
fn ca_hint(cert: &Path) -> String {
    cert.parent()
        .map_or_else(|| PathBuf::from("ca.pem"), |dir| dir.join("ca.pem"))
        .display()
        .to_string()
}

/// The curl commands to try: one per dialect the config accepts, then the refusals.
fn tries(sources: &[Source], curl: &str, base: &str, token: &str) -> String {
    let sends = |source: &Source, value: &str| -> Option<String> {
        Some(match source {
            Source::Bearer => format!("-H 'Authorization: Bearer {value}'"),
            Source::XAuthToken => format!("-H 'X-Auth-Token: {value}'"),
            Source::AuthToken => format!("-H 'auth-token: {value}'"),
            Source::Rucio => format!("-H 'X-Rucio-Auth-Token: {value}'"),
            Source::Header(name) => format!("-H '{name}: {value}'"),
            Source::Query(name) => return Some(format!("'{base}/hello?{name}={value}'")),
            Source::Cookie(name) => format!("-H 'Cookie: {name}={value}'"),
        })
    };
    let line = |source: &Source, value: &str| -> String {
        let sent = sends(source, value).unwrap_or_default();
        if sent.starts_with('\'') {
            format!("  {curl} -s {sent}")
        } else {
            format!("  {curl} -s {base}/hello {sent}")
        }
    };
    let mut out = format!("Try, with the demo token `{token}`:\n");
    for source in sources {
        out.push_str(&line(source, token));
        out.push('\n');
    }
    if let Some(first) = sources.first() {
        out.push_str(&format!(
            "{} -H 'X-Auth-User: mallory'   # spoof removed\n",
            line(first, token)
        ));
        out.push_str(&format!(
            "  {curl} -si {base}/hello   # 401 Credentials required\n"
        ));
        out.push_str(&format!(
            "{}   # 401 Invalid credentials\n",
            line(first, "wrong").replacen(" -s ", " -si ", 1)
        ));
        let headers: Vec<&Source> = sources
            .iter()
            .filter(|s| !matches!(s, Source::Query(_) | Source::Cookie(_)))
            .collect();
        if let [a, b, ..] = headers[..] {
            out.push_str(&format!(
                "  {curl} -si {base}/hello {} {}   # 400\n",
                sends(a, token).unwrap_or_default(),
                sends(b, "other").unwrap_or_default()
            ));
        }
    }
    out.push_str("\nStop with Ctrl-C.\n");
    out
}

/// Answers every request with `{"method","path","headers"}` as it arrived.
async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| async move {
                Ok::<_, Infallible>(echo(request).await)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn echo(request: Request<Incoming>) -> Response<Body> {
    if request.uri().path() == VALIDATE_PATH {
        return validate(&request);
    }
    let (parts, body) = request.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            )
        })
        .collect();
    let document = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "body_len": body_len,
    });
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    json_response(http::StatusCode::OK, Bytes::from(text))
}

/// The introspection endpoint of the demo: yes to a request that carries the demo token in any
/// header (whatever header and form the validator uses), with the fields validators read the
/// subject from; no to anything else.
fn validate(request: &Request<Incoming>) -> Response<Body> {
    let knows = request.headers().values().any(|v| {
        v.as_bytes()
            .windows(DEMO_TOKEN.len())
            .any(|w| w == DEMO_TOKEN.as_bytes())
    });
    if knows {
        json_response(
            http::StatusCode::OK,
            Bytes::from_static(
                br#"{"active":true,"uid":"demo","sub":"demo","username":"demo","account":"demo"}"#,
            ),
        )
    } else {
        json_response(
            http::StatusCode::UNAUTHORIZED,
            Bytes::from_static(br#"{"error":"unknown token"}"#),
        )
    }
}
