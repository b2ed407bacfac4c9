//! The release binary gives memory back after a burst: RSS returns to at most 1.2× its
//! pre-burst value within 2 minutes of the burst ending (a sidecar under a pod memory limit).
//!
//! A burst is the issue's: 10,000 HTTP/2 requests on 100 connections with 100 streams each
//! (`h2load -n 10000 -c 100 -m 100`), then 2,000 idle HTTP/1.1 keep-alive clients that each
//! had one answer, held open a few seconds and closed. Two bursts, so that a ratchet (each
//! burst keeping a little more) shows too.
//!
//! `#[ignore]`d: it needs the release binary (a debug build's heap is another one) and takes
//! about a minute with an allocator that returns memory (4½ minutes at most, when it fails):
//! `cargo build --release && TOKENGATE_TEST_BIN=target/release/tokengate \
//!  cargo test --test rss_after_burst -- --ignored --nocapture`.
//! Every load goes to 127.0.0.1, is bounded in count and time, and stops by itself.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TOKEN: &str = "rss-burst-token-4b1d";
/// The burst's HTTP/2 part.
const H2_CONNECTIONS: usize = 100;
const H2_STREAMS: usize = 100;
/// The burst's idle keep-alive part.
const IDLE_CLIENTS: usize = 2000;
/// How long the idle clients stay open before they close.
const HOLD: Duration = Duration::from_secs(5);
/// The bound: RSS at most this times the pre-burst value, within `WITHIN` of the burst's end.
const RATIO: f64 = 1.2;
const WITHIN: Duration = Duration::from_secs(120);
const BURSTS: usize = 2;
/// Descriptors the test and the gate need (idle clients + HTTP/2 + the upstream pool).
const NEED_FDS: u64 = 2 * IDLE_CLIENTS as u64 + 2048;

type H2Sender = SendRequest<BoxBody<Bytes, Infallible>>;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Raises this process's soft limit on open files to `need` (inherited by the gate, which
/// is started after). The hard limit bounds it; `prlimit` (util-linux) does it without libc.
fn raise_nofile(need: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    let soft = numbers.next().unwrap_or(0);
    let hard = numbers.next().unwrap_or(u64::MAX);
    if soft >= need {
        return;
    }
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard} (raise it: ulimit -Hn)"
    );
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={hard}:{hard}"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(
        status.success(),
        "prlimit could not raise the open-file limit"
    );
}

/// One HTTP/1.1 keep-alive connection that has had one answer (any status), or `None`.
async fn answered_once(port: u16) -> Option<TcpStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET /idle HTTP/1.1\r\nHost: gate\r\nauth-token: {TOKEN}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return head.starts_with("http/1.1 200").then_some(tcp);
            }
        }
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn h2_connect(port: u16) -> Option<H2Sender> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// 100 × 100 concurrent HTTP/2 requests; the number that got any answer (200, or 503 past the
/// route's `max_inflight`: the gate's own heap grows with both).
async fn h2_burst(gate: &Gate) -> usize {
    let mut requests = Vec::with_capacity(H2_CONNECTIONS * H2_STREAMS);
    for _ in 0..H2_CONNECTIONS {
        let Some(sender) = h2_connect(gate.port).await else {
            continue;
        };
        for _ in 0..H2_STREAMS {
            let mut sender = sender.clone();
            let req = build(
                "GET",
                &gate.url("/route/"),
                &[("auth-token", TOKEN)],
                full(""),
            );
            requests.push(tokio::spawn(async move {
                let answer = async {
                    let resp = sender.send_request(req).await.ok()?;
                    let status = resp.status().as_u16();
                    resp.into_body().collect().await.ok()?;
                    Some(status)
                };
                tokio::time::timeout(Duration::from_secs(30), answer)
                    .await
                    .ok()
                    .flatten()
            }));
        }
    }
    let mut answered = 0;
    for r in requests {
        if matches!(r.await, Ok(Some(200 | 503))) {
            answered += 1;
        }
    }
    answered
}

/// Waits (at most `WITHIN`) for RSS to fall to `bound`; the samples (seconds, MiB).
async fn wait_for_rss(pid: u32, bound: u64) -> (bool, Vec<(u64, f64)>) {
    let ended = Instant::now();
    let mut samples = Vec::new();
    loop {
        let now = rss(pid).expect("VmRSS");
        samples.push((ended.elapsed().as_secs(), mib(now)));
        if now <= bound {
            return (true, samples);
        }
        if ended.elapsed() >= WITHIN {
            return (false, samples);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn rss_returns_within_two_minutes_of_a_burst() {
    assert!(
        std::env::var_os("TOKENGATE_TEST_BIN").is_some(),
        "run with TOKENGATE_TEST_BIN=target/release/tokengate (see the module's doc)"
    );
    raise_nofile(NEED_FDS);
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"
max_connections = 10000

[store]
backend = "memory"

{validator}
{route}"#,
        validator = static_validator(&[(TOKEN, "alice", "ops")]),
        route = catch_all_route(up.port, ""),
    ));
    let pid = gate.pid();
    // A sidecar that has served both protocols: the cache entry, the upstream pool, the log
    // writer, and the HTTP/2 code's pages (else the burst's first use of them, ~0.25 MiB of
    // the binary, would count as memory not given back).
    for _ in 0..20 {
        assert!(
            answered_once(port).await.is_some(),
            "warm-up request failed"
        );
    }
    let mut warm = h2_connect(port)
        .await
        .expect("an HTTP/2 warm-up connection");
    let req = build(
        "GET",
        &gate.url("/route/"),
        &[("auth-token", TOKEN)],
        full(""),
    );
    let warmed = tokio::time::timeout(Duration::from_secs(10), warm.send_request(req)).await;
    assert!(
        matches!(warmed, Ok(Ok(ref r)) if r.status() == 200),
        "HTTP/2 warm-up request failed"
    );
    drop(warm);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pre = rss(pid).expect("VmRSS");
    let bound = (pre as f64 * RATIO) as u64;

    for burst in 1..=BURSTS {
        let started = Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(60), h2_burst(&gate))
            .await
            .expect("the HTTP/2 burst took over 60 s");
        let after_h2 = rss(pid).expect("VmRSS");
        let idle = tokio::time::timeout(Duration::from_secs(60), async {
            let mut open = Vec::with_capacity(IDLE_CLIENTS);
            for _ in 0..IDLE_CLIENTS {
                if let Some(tcp) = answered_once(port).await {
                    open.push(tcp);
                }
            }
            open
        })
        .await
        .expect("opening the idle clients took over 60 s");
        let opened = idle.len();
        tokio::time::sleep(HOLD).await;
        let while_open = rss(pid).expect("VmRSS");
        drop(idle);
        println!(
            "burst {burst}: {answered}/{} HTTP/2 answers, {opened}/{IDLE_CLIENTS} idle clients \
             in {:?}; RSS pre {:.1} MiB, after HTTP/2 {:.1}, idle clients open {:.1}",
            H2_CONNECTIONS * H2_STREAMS,
            started.elapsed(),
            mib(pre),
            mib(after_h2),
            mib(while_open)
        );
        assert!(
            answered >= H2_CONNECTIONS * H2_STREAMS * 9 / 10,
            "only {answered} HTTP/2 requests answered"
        );
        assert_eq!(opened, IDLE_CLIENTS, "not every idle client got its answer");
        // The burst must have been one: else the bound below proves nothing.
        assert!(
            while_open > pre * 2,
            "the burst did not grow RSS ({:.1} → {:.1} MiB)",
            mib(pre),
            mib(while_open)
        );
        let (back, samples) = wait_for_rss(pid, bound).await;
        println!("burst {burst}: after the clients closed (s, MiB): {samples:?}");
        assert!(
            back,
            "burst {burst}: RSS still {:.1} MiB {WITHIN:?} after the burst, over {RATIO} × \
             {:.1} MiB pre-burst; samples (s, MiB): {samples:?}",
            samples.last().map_or(0.0, |s| s.1),
            mib(pre)
        );
    }
    assert!(gate_is_serving(port).await, "the gate stopped serving");
}

async fn gate_is_serving(port: u16) -> bool {
    tokio::time::timeout(Duration::from_secs(5), answered_once(port))
        .await
        .ok()
        .flatten()
        .is_some()
}
