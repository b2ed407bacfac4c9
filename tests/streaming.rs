//! SPEC §2 "bodies streamed both ways, upgrades passed through": large uploads and downloads
//! arrive whole without being buffered, responses stream incrementally, and an
//! `Upgrade: websocket` connection carries bytes both ways.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const TOKEN: &str = "stream-token-c0ffee";
const MIB: u64 = 1024 * 1024;

fn config(port: u16, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
max_body_bytes = "0"
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
timeout = "60s"
[route.upstream_auth]
header = "x-upstream-key"
value = "{{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        validator = static_validator(&[(TOKEN, "alice", "ops")])
    )
}

/// Peak memory the gate may reach while moving hundreds of MiB: far below the body size.
const MAX_RSS: u64 = 160 * MIB;

#[tokio::test(flavor = "multi_thread")]
async fn a_256_mib_chunked_upload_arrives_whole_without_buffering() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let total = 256 * MIB;
    let expected = tokio::task::spawn_blocking(move || pattern_sha256(total));
    let resp = send(build(
        "PUT",
        &gate.url("/upload?name=big"),
        &[("auth-token", TOKEN)],
        PatternBody::new(total, false).boxed(),
    ))
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let json = resp.json();
    assert_eq!(json["body_len"], total);
    assert_eq!(json["body_error"], false);
    assert_eq!(json["body_sha256"], expected.await.unwrap());
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    let rss = peak_rss(gate.pid()).expect("VmHWM");
    assert!(
        rss < MAX_RSS,
        "the gate's peak memory was {} MiB for a 256 MiB upload: the body was buffered",
        rss / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_content_length_upload_arrives_whole() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let total = 48 * MIB + 12345;
    let resp = send(build(
        "POST",
        &gate.url("/upload"),
        &[("auth-token", TOKEN)],
        PatternBody::new(total, true).boxed(),
    ))
    .await;
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert_eq!(json["body_len"], total);
    assert_eq!(json["body_sha256"], pattern_sha256(total));
}

/// Streams a download, hashing it on the way; returns (content-length header, bytes, sha256).
async fn download(url: &str) -> (Option<String>, u64, String) {
    let resp = client()
        .request(build("GET", url, &[("auth-token", TOKEN)], full("")))
        .await
        .expect("download request");
    assert_eq!(resp.status(), 200);
    let length = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = resp.into_body();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("download frame").into_data() {
            n += data.len() as u64;
            ctx.update(&data);
        }
    }
    (length, n, hex::encode(ctx.finish()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_download_streams_back_whole() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let total = 192 * MIB;
    let (length, n, sha) = download(&gate.url(&format!("/download?bytes={total}"))).await;
    assert_eq!(
        length,
        Some(total.to_string()),
        "content-length passed through"
    );
    assert_eq!(n, total);
    assert_eq!(sha, pattern_sha256(total));

    let total = 64 * MIB + 7;
    let (_, n, sha) = download(&gate.url(&format!("/download?bytes={total}&chunked=1"))).await;
    assert_eq!(n, total);
    assert_eq!(sha, pattern_sha256(total));

    let rss = peak_rss(gate.pid()).expect("VmHWM");
    assert!(
        rss < MAX_RSS,
        "the gate's peak memory was {} MiB for a 192 MiB download: the body was buffered",
        rss / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_forwarded_as_they_arrive() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let started = Instant::now();
    let resp = client()
        .request(build(
            "GET",
            &gate.url("/drip?chunks=3&ms=800"),
            &[("auth-token", TOKEN)],
            full(""),
        ))
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            if !data.is_empty() {
                bytes += data.len();
                arrivals.push(started.elapsed());
            }
        }
    }
    let total = started.elapsed();
    assert_eq!(bytes, 3 * 1024);
    assert!(total >= Duration::from_millis(1500), "{total:?}");
    assert!(
        arrivals[0] < Duration::from_millis(600),
        "the first chunk arrived after {:?}: the response was buffered (all arrivals {arrivals:?})",
        arrivals[0]
    );
}

/// Reads an HTTP/1.1 response head (up to the blank line) from a raw stream.
async fn read_head(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut byte))
            .await
            .expect("response head timed out")
            .expect("read");
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&byte[..n]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_passes_through_both_ways() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&config(port, up.port));
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET /ws?room=1 HTTP/1.1\r\nHost: localhost\r\nX-Auth-Token: {TOKEN}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, leftover) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("x-upstream-upgraded: yes"), "{head}");
    assert!(leftover.is_empty());

    // The upstream saw an upgrade request with the rewritten credential.
    let seen = up.last().await;
    assert_eq!(seen.path, "/ws?room=1");
    assert_eq!(seen.header("upgrade").as_deref(), Some("websocket"));
    assert!(seen
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .contains("upgrade"));
    assert_eq!(seen.header("x-upstream-key").as_deref(), Some(TOKEN));
    assert_eq!(seen.header("x-auth-token"), None);
    assert_eq!(seen.header("x-auth-user").as_deref(), Some("alice"));

    // Bytes flow both ways, several round trips, binary included.
    for i in 0..5u8 {
        let msg: Vec<u8> = (0..=255u8)
            .map(|b| b ^ i)
            .chain(b"frame-end".iter().copied())
            .collect();
        stream.write_all(&msg).await.unwrap();
        let mut echoed = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echo timed out")
            .expect("echo");
        assert_eq!(echoed, msg);
    }
    // A large burst in one direction.
    let burst = vec![0x5au8; 4 * MIB as usize];
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&burst).await.unwrap();
        w
    });
    let mut got = vec![0u8; 4 * MIB as usize];
    tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut got))
        .await
        .expect("burst echo timed out")
        .expect("burst echo");
    assert!(got.iter().all(|b| *b == 0x5a));
    // Closing our side ends the tunnel: the echo closes too.
    let mut w = writer.await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest))
        .await
        .expect("tunnel did not close after the client closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_without_credentials_is_refused() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let request = "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                   Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    let out = raw(port, request.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(
        raw_status(&out),
        Some(401),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(up.requests(), 0);
    drop(gate);
}
