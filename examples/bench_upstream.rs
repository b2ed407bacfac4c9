//! Minimal, fast HTTP/1.1 upstream for `bench/run`.
//!
//! `bench_upstream PORT` listens on 127.0.0.1:PORT and answers every request
//! with `200 OK`, `Content-Length: 3`, body `ok\n`, keeping connections alive.
//! It does as little work as possible so that the benchmark measures the proxy
//! in front of it, not the upstream.
//!
//! One exception, for the benchmark's sanity check only: `GET /__headers`
//! answers with the request headers it received, one `name: value` per line,
//! so `bench/run` can verify that the proxy rewrote the credential and set the
//! identity headers before it measures anything.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

const BODY: &[u8] = b"ok\n";

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/__headers" {
        return Ok(echo_headers(&req));
    }
    // The request body (if any) is dropped unread; hyper drains it before
    // reusing the connection.
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

fn echo_headers(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut out = String::new();
    for (name, value) in req.headers() {
        out.push_str(name.as_str());
        out.push_str(": ");
        out.push_str(&String::from_utf8_lossy(value.as_bytes()));
        out.push('\n');
    }
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: bench_upstream PORT");
            std::process::exit(2);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(addr).await?;
    eprintln!("bench_upstream listening on http://{addr}");

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // e.g. EMFILE under a connection storm: keep serving.
                eprintln!("accept error: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service_fn(handle));
            // Errors here are clients going away mid-request; not interesting.
            let _ = conn.await;
        });
    }
}
