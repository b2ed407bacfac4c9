//! `tokengate demo`: the example config against a local echo upstream, so a newcomer sees the
//! rewrite happen with nothing else running.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::{json_response, Body};

/// The example config, built into the binary so the demo runs from any folder.
pub const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");
/// The token whose hash the example config holds.
pub const DEMO_TOKEN: &str = "demo-token";

/// The example config (or `config_path`'s), with `listen` overridden when given and every
/// route pointed at the echo upstream the demo starts.
pub async fn run(
    config_path: Option<&Path>,
    listen: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut config = match config_path {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::parse(Path::new("config.example.toml"), EXAMPLE_CONFIG)
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
    tokio::spawn(serve_echo(echo));

    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // Bound here so that `--listen 127.0.0.1:0` prints the port the system chose.
    let listener = crate::server::bind(config.server.listen).await?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let base = format!("{scheme}://{listen}");
    println!(
        "tokengate demo: proxy on {base}, echo upstream on {echo_addr} (it answers with the \
         headers it received)\n\nTry, with the demo token `{DEMO_TOKEN}`:\n\
         \x20 curl -s {base}/hello -H 'Authorization: Bearer {DEMO_TOKEN}'\n\
         \x20 curl -s {base}/hello -H 'X-Auth-Token: {DEMO_TOKEN}'\n\
         \x20 curl -s {base}/hello -H 'auth-token: {DEMO_TOKEN}'\n\
         \x20 curl -s {base}/hello -H 'X-Rucio-Auth-Token: {DEMO_TOKEN}'\n\
         \x20 curl -s {base}/hello -H 'auth-token: {DEMO_TOKEN}' -H 'X-Auth-User: mallory'   # spoof removed\n\
         \x20 curl -si {base}/hello                                        # 401 Credentials required\n\
         \x20 curl -si {base}/hello -H 'auth-token: wrong'                 # 401 Invalid credentials\n\
         \x20 curl -si {base}/hello -H 'auth-token: {DEMO_TOKEN}' -H 'X-Auth-Token: other'   # 400\n\
         \nStop with Ctrl-C.\n"
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
    crate::run_on(listener, config, None, shutdown).await
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
