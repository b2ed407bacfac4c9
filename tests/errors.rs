//! SPEC §4: the responses tokengate makes itself — exact status, `Content-Type`, body — and
//! that the upstream is not bothered when the gate answers.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const TOKEN: &str = "errors-token-5e2d";

fn static_config(port: u16, up: u16, server_extra: &str, route_extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{server_extra}
[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio"]
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
{route_extra}
[route.upstream_auth]
header = "auth-token"
value = "{{token}}"
"#,
        validator = static_validator(&[(TOKEN, "alice", "ops")])
    )
}

fn introspect_config(port: u16, introspect_port: u16, up: u16, timeout: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[cache]
ttl = "1h"
negative_ttl = "1h"
{validator}
{route}"#,
        validator = introspect_validator(introspect_port, timeout),
        route = catch_all_route(up, ""),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_credentials_is_401_with_challenge() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "", ""));
    for method in ["GET", "POST", "DELETE"] {
        let resp = send(build(method, &gate.url("/x"), &[], full("body"))).await;
        resp.assert_error(401, "Credentials required");
        assert_eq!(
            resp.header("www-authenticate").as_deref(),
            Some(r#"Bearer realm="tokengate""#)
        );
    }
    // "Bearer" with nothing after it is no credential either.
    let resp = get(&gate.url("/x"), &[("Authorization", "Bearer ")]).await;
    resp.assert_error(401, "Credentials required");
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_credentials_is_401() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "", ""));
    for (name, value) in [
        ("auth-token", "wrong"),
        ("X-Auth-Token", "errors-token-5e2"),
        ("Authorization", "Bearer errors-token-5e2dX"),
        ("X-Rucio-Auth-Token", "ERRORS-TOKEN-5E2D"),
    ] {
        let resp = get(&gate.url("/x"), &[(name, value)]).await;
        resp.assert_error(401, "Invalid credentials");
    }
    assert_eq!(up.requests(), 0);
    // The right token still works after all the failures.
    let resp = get(&gate.url("/x"), &[("auth-token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_credentials_is_400() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "", ""));
    let resp = get(
        &gate.url("/x"),
        &[("auth-token", TOKEN), ("X-Auth-Token", "other")],
    )
    .await;
    resp.assert_error(400, "Conflicting credentials");
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn introspect_refused_is_503_and_not_cached() {
    let up = Upstream::start();
    let dead = free_port();
    let port = free_port();
    let gate = Gate::start(&introspect_config(port, dead, up.port, "2s"));
    for _ in 0..3 {
        let resp = get(&gate.url("/x"), &[("auth-token", ALICE)]).await;
        resp.assert_error(503, "Authentication backend unavailable");
    }
    assert_eq!(
        up.requests(),
        0,
        "fail closed: nothing may reach the upstream"
    );

    // The backend comes back: the same token now works (the failure was not cached as invalid).
    let backend = Upstream::start_on(dead);
    let resp = get(&gate.url("/x"), &[("auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(backend.whoami_calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn introspect_5xx_is_503_and_not_cached() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&introspect_config(port, up.port, up.port, "2s"));
    for status in [500, 502, 503] {
        up.set_whoami_status(status);
        let resp = get(&gate.url("/x"), &[("X-Auth-Token", ALICE)]).await;
        resp.assert_error(503, "Authentication backend unavailable");
    }
    let failures = up.whoami_calls();
    assert_eq!(
        failures, 3,
        "each backend failure must be retried, not cached"
    );
    up.set_whoami_status(0);
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(up.whoami_calls(), failures + 1);
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn introspect_401_and_403_mean_invalid_not_unavailable() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&introspect_config(port, up.port, up.port, "2s"));
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", "unknown-token-1")]).await;
    resp.assert_error(401, "Invalid credentials");
    up.set_whoami_status(403);
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", "unknown-token-2")]).await;
    resp.assert_error(401, "Invalid credentials");
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn introspect_timeout_is_503() {
    let up = Upstream::start();
    up.set_whoami_delay(5000);
    let port = free_port();
    let gate = Gate::start(&introspect_config(port, up.port, up.port, "300ms"));
    let started = Instant::now();
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", ALICE)]).await;
    let took = started.elapsed();
    resp.assert_error(503, "Authentication backend unavailable");
    assert!(
        took < Duration::from_secs(3),
        "the validator timeout was not applied: {took:?}"
    );
    // A timeout is not cached: with a fast backend the token validates.
    up.set_whoami_delay(0);
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", ALICE)]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_refused_is_502() {
    let dead = free_port();
    let port = free_port();
    let gate = Gate::start(&static_config(port, dead, "", ""));
    let resp = get(&gate.url("/x"), &[("auth-token", TOKEN)]).await;
    resp.assert_error(502, "Upstream unavailable");
    // Authentication comes first: an anonymous request is a 401 even with the upstream down.
    get(&gate.url("/x"), &[])
        .await
        .assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_is_502() {
    // An "upstream" that accepts and immediately closes every connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    let port = free_port();
    let gate = Gate::start(&static_config(port, up_port, "", ""));
    let resp = get(&gate.url("/x"), &[("auth-token", TOKEN)]).await;
    resp.assert_error(502, "Upstream unavailable");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_slower_than_route_timeout_is_504() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "", "timeout = \"500ms\""));
    let started = Instant::now();
    let resp = get(&gate.url("/slow?ms=5000"), &[("auth-token", TOKEN)]).await;
    let took = started.elapsed();
    resp.assert_error(504, "Upstream timeout");
    assert!(
        took >= Duration::from_millis(400),
        "timed out too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "route timeout not applied: {took:?}"
    );
    // Within the timeout the same route works.
    let resp = get(&gate.url("/slow?ms=50"), &[("auth-token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_head_over_max_header_bytes_is_431() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(
        port,
        up.port,
        "max_header_bytes = 16384",
        "",
    ));
    let big = "a".repeat(40_000);
    let resp = get(&gate.url("/x"), &[("auth-token", TOKEN), ("X-Big", &big)]).await;
    assert_eq!(resp.status, 431);
    // Many medium headers adding up past the limit count too.
    let medium = "b".repeat(1000);
    let names: Vec<String> = (0..30).map(|i| format!("X-Part-{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), medium.as_str()))
        .collect();
    headers.push(("auth-token", TOKEN));
    let resp = get(&gate.url("/x"), &headers).await;
    assert_eq!(resp.status, 431);
    // A head under the limit passes untouched.
    let ok = "c".repeat(8000);
    let resp = get(&gate.url("/x"), &[("auth-token", TOKEN), ("X-Ok", &ok)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-ok").as_deref(), Some(ok.as_str()));
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_over_max_body_bytes_with_content_length_is_413() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "max_body_bytes = 1024", ""));
    let resp = post(&gate.url("/u"), &[("auth-token", TOKEN)], vec![b'x'; 4096]).await;
    resp.assert_error(413, "Request body too large");
    assert_eq!(
        up.requests(),
        0,
        "an oversized declared body must not be forwarded"
    );

    let resp = post(&gate.url("/u"), &[("auth-token", TOKEN)], vec![b'x'; 1024]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["body_len"], 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_body_over_max_body_bytes_is_413() {
    let up = Upstream::start();
    let port = free_port();
    // The string form of the limit.
    let _gate = Gate::start(&static_config(
        port,
        up.port,
        "max_body_bytes = \"1024\"",
        "",
    ));

    let chunk = "y".repeat(512);
    let mut request = format!(
        "POST /u HTTP/1.1\r\nHost: h\r\nauth-token: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    );
    for _ in 0..8 {
        request.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    request.push_str("0\r\n\r\n");
    let response = raw(port, request.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(
        raw_status(&response),
        Some(413),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(
        text.contains(r#"{"error":"request body too large"}"#),
        "{text}"
    );

    // A chunked body within the limit goes through.
    let mut request = format!(
        "POST /u HTTP/1.1\r\nHost: h\r\nauth-token: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    );
    request.push_str(&format!("200\r\n{chunk}\r\n200\r\n{chunk}\r\n0\r\n\r\n"));
    let response = raw(port, request.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(
        raw_status(&response),
        Some(200),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert!(String::from_utf8_lossy(&response).contains("\"body_len\":1024"));
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_body_over_max_body_bytes_is_413_for_a_hyper_client() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "max_body_bytes = 65536", ""));
    let resp = send(build(
        "PUT",
        &gate.url("/u"),
        &[("auth-token", TOKEN)],
        http_body_util::BodyExt::boxed(PatternBody::new(1024 * 1024, false)),
    ))
    .await;
    resp.assert_error(413, "Request body too large");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_do_not_break_the_connection_for_the_next_request() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&static_config(port, up.port, "", ""));
    // Three requests on one keep-alive connection: 401, 401, 200.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let reqs = format!(
        "GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
         GET /b HTTP/1.1\r\nHost: h\r\nauth-token: nope\r\n\r\n\
         GET /c HTTP/1.1\r\nHost: h\r\nauth-token: {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(reqs.as_bytes()).await.unwrap();
    let (out, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        closed,
        "connection not closed after Connection: close: {text}"
    );
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["401", "401", "200"], "{text}");
    assert_eq!(up.requests(), 1);
    drop(gate);
}
