//! SPEC §3 `[server]` limits and §8 operations: graceful drain on SIGTERM, the slowloris guard,
//! the access log (and that credentials never reach it), and survival of bad input.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const TOKEN: &str = "life-token-4b1d";

fn config(port: u16, up: u16, server_extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{server_extra}
{validator}
{route}"#,
        validator = static_validator(&[(TOKEN, "alice", "ops")]),
        route = catch_all_route(up, ""),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let up = Upstream::start();
    let port = free_port();
    let mut gate = Gate::start(&config(port, up.port, "drain_timeout = \"10s\""));
    // Warm up so the in-flight request below is surely in the upstream when SIGTERM lands.
    assert_eq!(
        get(&gate.url("/warm"), &[("auth-token", TOKEN)])
            .await
            .status,
        200
    );

    let url = gate.url("/slow?ms=1500");
    let in_flight = tokio::spawn(async move {
        let resp = get(&url, &[("auth-token", TOKEN)]).await;
        (resp, Instant::now())
    });
    // Wait until the upstream has the slow request.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.requests() < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    gate.sigterm();

    // New connections are refused soon (well before the in-flight request finishes).
    let mut refused_at = None;
    while signalled.elapsed() < Duration::from_millis(1200) {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            refused_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused_at =
        refused_at.expect("the listener still accepted connections 1.2 s after SIGTERM");

    let (resp, finished_at) = in_flight.await.unwrap();
    assert_eq!(resp.status, 200, "the in-flight request must complete");
    assert_eq!(resp.echoed_path(), "/slow?ms=1500");
    assert!(
        refused_at < finished_at,
        "the listener closed only after the drain"
    );

    let status = tokio::task::spawn_blocking(move || {
        let status = gate.wait_exit(Duration::from_secs(10));
        (status, gate)
    })
    .await
    .unwrap();
    let (status, gate) = status;
    let status = status.expect("the gate did not exit within drain_timeout");
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        gate.log()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_timeout_bounds_the_wait_for_stuck_requests() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "drain_timeout = \"1s\""));
    let url = gate.url("/slow?ms=30000");
    let stuck = tokio::spawn(async move {
        client()
            .request(build("GET", &url, &[("auth-token", TOKEN)], full("")))
            .await
            .map(|r| r.status())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.requests() < 1 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    gate.sigterm();
    let mut gate = gate;
    let (exited, _gate) = tokio::task::spawn_blocking(move || {
        let status = gate.wait_exit(Duration::from_secs(8));
        (status, gate)
    })
    .await
    .unwrap();
    assert!(exited.is_some(), "the gate ignored drain_timeout = 1s");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} with drain_timeout = 1s"
    );
    assert!(
        took >= Duration::from_millis(700),
        "exit after {took:?}: no drain at all"
    );
    // The stuck request was cut off rather than answered by the upstream.
    let result = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the stuck client was left hanging")
        .unwrap();
    assert!(!matches!(result, Ok(s) if s == 200));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_gate_exits_promptly_on_sigterm() {
    let up = Upstream::start();
    let port = free_port();
    let mut gate = Gate::start(&config(port, up.port, "drain_timeout = \"30s\""));
    assert_eq!(
        get(&gate.url("/x"), &[("auth-token", TOKEN)]).await.status,
        200
    );
    let signalled = Instant::now();
    gate.sigterm();
    let status = gate
        .wait_exit(Duration::from_secs(5))
        .expect("no exit within 5 s");
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_head_is_closed_after_header_read_timeout() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "header_read_timeout = \"1s\""));
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /slowloris HTTP/1.1\r\nHost: x\r\nX-Partial: aaa")
        .await
        .unwrap();
    let started = Instant::now();
    let (out, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(closed, "the connection was still open after 5 s");
    assert!(
        took >= Duration::from_millis(500),
        "closed after {took:?}, before the timeout"
    );
    if let Some(status) = raw_status(&out) {
        assert_eq!(status, 408, "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(up.requests(), 0);

    // A client trickling bytes slower than the timeout allows is cut off too.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /trickle HTTP/1.1\r\nHost: x\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if started.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    if !cut {
        let (_, closed) = read_until_close(&mut stream, Duration::from_millis(500)).await;
        cut = closed;
    }
    assert!(cut, "a trickling request head was not cut off");
    assert!(started.elapsed() < Duration::from_secs(6));

    // Normal clients are unaffected.
    assert_eq!(
        get(&gate.url("/ok"), &[("auth-token", TOKEN)]).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_does_not_stop_the_server() {
    let up = Upstream::start();
    let port = free_port();
    let mut gate = Gate::start(&config(port, up.port, "header_read_timeout = \"2s\""));
    let garbage: Vec<Vec<u8>> = vec![
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect(),
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad\x01Name: v\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Val: a\x00b\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"\r\n\r\n\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
            .to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n"
            .to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000)).into_bytes(),
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let out = raw(port, bytes, Duration::from_secs(4)).await;
        if let Some(status) = raw_status(&out) {
            assert!(
                (400..500).contains(&status) || status == 505,
                "garbage #{i} got {status}: {}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    // A connection reset in the middle of a request.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = stream;
    stream
        .write_all(format!("POST /x HTTP/1.1\r\nHost: x\r\nauth-token: {TOKEN}\r\nContent-Length: 100000\r\n\r\npartial").as_bytes())
        .await
        .unwrap();
    stream.set_zero_linger().unwrap();
    drop(stream);

    assert!(gate.is_running(), "the gate died; log:\n{}", gate.log());
    let resp = get(&gate.url("/after"), &[("auth-token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed_path(), "/after");
}

fn logged_config(port: u16, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio", "header:X-Api-Key", "query:api_key", "cookie:session"]
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[route.upstream_auth]
header = "x-upstream-key"
value = "{{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        validator = static_validator(&[
            ("tok-bearer-5d01a9", "subject-logged-7q", "acct"),
            ("tok-xauth-77c2e3", "subject-logged-7q", "acct"),
            ("tok-authtok-1e8f44", "subject-logged-7q", "acct"),
            ("tok-rucio-0b9d12", "subject-logged-7q", "acct"),
            ("tok-custom-a6f0c7", "subject-logged-7q", "acct"),
            ("tok-query-3c5e88", "subject-logged-7q", "acct"),
            ("tok-cookie-9e2b61", "subject-logged-7q", "acct"),
        ])
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_appear_in_the_log_but_subjects_do() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&logged_config(port, up.port));
    let good = [
        (
            "/log/bearer",
            "Authorization",
            "Bearer tok-bearer-5d01a9",
            "tok-bearer-5d01a9",
        ),
        (
            "/log/xauth",
            "X-Auth-Token",
            "tok-xauth-77c2e3",
            "tok-xauth-77c2e3",
        ),
        (
            "/log/authtok",
            "auth-token",
            "tok-authtok-1e8f44",
            "tok-authtok-1e8f44",
        ),
        (
            "/log/rucio",
            "X-Rucio-Auth-Token",
            "tok-rucio-0b9d12",
            "tok-rucio-0b9d12",
        ),
        (
            "/log/custom",
            "X-Api-Key",
            "tok-custom-a6f0c7",
            "tok-custom-a6f0c7",
        ),
        (
            "/log/cookie",
            "Cookie",
            "theme=x; session=tok-cookie-9e2b61",
            "tok-cookie-9e2b61",
        ),
    ];
    let mut secrets = Vec::new();
    for (path, name, value, token) in good {
        let resp = get(&gate.url(path), &[(name, value)]).await;
        assert_eq!(resp.status, 200, "{path}");
        secrets.push(token.to_string());
    }
    let resp = get(&gate.url("/log/query?api_key=tok-query-3c5e88&page=2"), &[]).await;
    assert_eq!(resp.status, 200);
    secrets.push("tok-query-3c5e88".into());
    // Rejected credentials must not be logged either.
    let bad = [
        ("Authorization", "Bearer bad-bearer-ee01"),
        ("X-Auth-Token", "bad-xauth-ee02"),
        ("auth-token", "bad-authtok-ee03"),
        ("X-Rucio-Auth-Token", "bad-rucio-ee04"),
        ("X-Api-Key", "bad-custom-ee05"),
        ("Cookie", "session=bad-cookie-ee06"),
    ];
    for (name, value) in bad {
        get(&gate.url("/log/bad"), &[(name, value)])
            .await
            .assert_error(401, "Invalid credentials");
        secrets.push(value.rsplit(['=', ' ']).next().unwrap().to_string());
    }
    get(&gate.url("/log/badq?api_key=bad-query-ee07"), &[])
        .await
        .assert_error(401, "Invalid credentials");
    secrets.push("bad-query-ee07".into());
    // Conflicts carry two credentials.
    get(
        &gate.url("/log/conflict?api_key=bad-conflict-ee08"),
        &[("X-Auth-Token", "tok-xauth-77c2e3")],
    )
    .await
    .assert_error(400, "Conflicting credentials");
    secrets.push("bad-conflict-ee08".into());

    let lines = gate
        .wait_access_line("/log/conflict", Duration::from_secs(3))
        .await;
    assert!(
        !lines.is_empty(),
        "no access-log line for the last request; log:\n{}",
        gate.log()
    );
    let log = gate.log();
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "credential {secret} appears in the log:\n{log}"
        );
    }
    assert!(
        log.contains("subject-logged-7q"),
        "the subject is not logged:\n{log}"
    );
    let query_line = gate
        .wait_access_line("/log/query", Duration::from_secs(3))
        .await
        .into_iter()
        .next()
        .expect("an access line for the query request");
    assert_eq!(query_line["status"], 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_access_log_line_per_request_with_the_fields() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, ""));
    let resp = post(&gate.url("/acc/ok?x=1"), &[("auth-token", TOKEN)], "hi").await;
    assert_eq!(resp.status, 200);
    get(&gate.url("/acc/anon"), &[])
        .await
        .assert_error(401, "Credentials required");
    get(&gate.url("/acc/bad"), &[("auth-token", "nope")])
        .await
        .assert_error(401, "Invalid credentials");

    // Workers hand their lines to the writer once a second, each in its own batch: wait for
    // every line this test reads.
    for path in ["/acc/ok", "/acc/anon", "/acc/bad"] {
        let _ = gate.wait_access_line(path, Duration::from_secs(3)).await;
    }
    let lines = gate.access_lines();
    let for_path = |p: &str| -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["path"].as_str().is_some_and(|lp| lp.starts_with(p)))
            .cloned()
            .collect()
    };
    let ok = for_path("/acc/ok");
    assert_eq!(
        ok.len(),
        1,
        "exactly one line per request; log:\n{}",
        gate.log()
    );
    let ok = &ok[0];
    for field in [
        "method",
        "path",
        "status",
        "route",
        "subject",
        "source",
        "duration_ms",
    ] {
        assert!(ok.get(field).is_some(), "access line lacks {field}: {ok}");
    }
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["subject"], "alice");
    assert!(ok["duration_ms"].is_number(), "{ok}");

    let anon = for_path("/acc/anon");
    assert_eq!(anon.len(), 1, "{}", gate.log());
    assert_eq!(anon[0]["status"], 401);
    assert_eq!(anon[0]["method"], "GET");
    assert_ne!(anon[0]["subject"], "alice");

    let bad = for_path("/acc/bad");
    assert_eq!(bad.len(), 1, "{}", gate.log());
    assert_eq!(bad[0]["status"], 401);
    for line in [ok, &anon[0], &bad[0]] {
        assert!(
            line.get("time").is_some() || line.get("timestamp").is_some(),
            "no time: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_keep_alive_requests_on_one_connection() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, ""));
    let client = client();
    for i in 0..200 {
        let resp = send_with(
            &client,
            build(
                "GET",
                &gate.url(&format!("/ka/{i}")),
                &[("auth-token", TOKEN)],
                full(""),
            ),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.echoed_path(), format!("/ka/{i}"));
    }
    assert_eq!(up.requests(), 200);
}
