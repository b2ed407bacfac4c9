//! TLS termination (SPEC §3 `[server.tls]`): PKCS#8 and SEC1 keys, ALPN h2 + http/1.1, HTTP/2
//! clients proxied to an HTTP/1.1 upstream with the same header rewrite, and resilience against
//! bad handshakes.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "tls-token-31f0";

/// Starts a TLS gate whose key is written in the given PEM form.
fn tls_gate(pki: &Pki, key_pem: &str, up: u16) -> Gate {
    tls_gate_with(pki, key_pem, up, "")
}

/// A TLS gate with more `[server.tls]` lines.
fn tls_gate_with(pki: &Pki, key_pem: &str, up: u16, tls_extra: &str) -> Gate {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_file(dir.path(), "server.pem", &pki.cert_pem);
    let key = write_file(dir.path(), "server-key.pem", key_pem);
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[server.tls]
cert = "{cert}"
key = "{key}"
{tls_extra}

{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
preserve_host = true
[route.upstream_auth]
header = "auth-token"
value = "{{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        cert = cert.display(),
        key = key.display(),
        validator = static_validator(&[(TOKEN, "alice", "ops")]),
    );
    Gate::start_in(dir, &toml, &[])
}

fn https(port: u16, path: &str) -> String {
    format!("https://localhost:{port}{path}")
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_pkcs8_key_and_http1() {
    let pki = pki();
    assert!(pki.key_pkcs8_pem.contains("BEGIN PRIVATE KEY"));
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);

    let config = tls_client_config(Some(&pki.ca_der), &[b"http/1.1"]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let resp = tls_request(
        stream,
        build(
            "GET",
            "/secure/path?q=1",
            &[
                ("Host", "localhost"),
                ("X-Auth-Token", TOKEN),
                ("X-Auth-User", "mallory"),
            ],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.version, hyper::Version::HTTP_11);
    assert_eq!(resp.echoed("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("auth-token").as_deref(), Some(TOKEN));
    assert_eq!(resp.echoed("x-auth-token"), None);
    assert_eq!(resp.echoed_path(), "/secure/path?q=1");

    // A client offering no ALPN at all also gets HTTP/1.1.
    let config = tls_client_config(Some(&pki.ca_der), &[]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("TLS handshake");
    let resp = tls_request(
        stream,
        build(
            "GET",
            "/x",
            &[("Host", "localhost"), ("X-Auth-Token", TOKEN)],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200);

    // Missing credential over TLS: the same SPEC error.
    let config = tls_client_config(Some(&pki.ca_der), &[b"http/1.1"]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("TLS handshake");
    tls_request(
        stream,
        build("GET", "/x", &[("Host", "localhost")], full("")),
    )
    .await
    .assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_sec1_ec_key() {
    let pki = pki();
    assert!(pki.key_sec1_pem.contains("BEGIN EC PRIVATE KEY"));
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_sec1_pem, up.port);
    let config = tls_client_config(Some(&pki.ca_der), &[b"h2", b"http/1.1"]);
    let stream = tls_connect(gate.port, config, "127.0.0.1")
        .await
        .expect("TLS handshake with a SEC1 key");
    let resp = tls_request(
        stream,
        build(
            "GET",
            &https(gate.port, "/sec1"),
            &[("auth-token", TOKEN)],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_client_is_proxied_to_an_http1_upstream_with_rewritten_headers() {
    let pki = pki();
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);
    let config = tls_client_config(Some(&pki.ca_der), &[b"h2", b"http/1.1"]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("TLS handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the gate must offer h2 in ALPN"
    );
    let bearer = format!("Bearer {TOKEN}");
    let resp = tls_request(
        stream,
        build(
            "POST",
            &https(gate.port, "/h2/path?z=26"),
            &[
                ("Authorization", &bearer),
                ("X-Auth-User", "mallory"),
                ("Content-Type", "text/plain"),
            ],
            full("hello over h2"),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.version, hyper::Version::HTTP_2);
    let json = resp.json();
    assert_eq!(
        json["version"], "HTTP/1.1",
        "the upstream must be spoken to in HTTP/1.1"
    );
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/h2/path?z=26");
    assert_eq!(json["body_len"], 13);
    assert_eq!(resp.echoed("auth-token").as_deref(), Some(TOKEN));
    assert_eq!(resp.echoed("authorization"), None);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(resp.echoed("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    let authority = format!("localhost:{}", gate.port);
    assert_eq!(
        resp.echoed("x-forwarded-host").as_deref(),
        Some(authority.as_str())
    );
    assert_eq!(
        resp.echoed("host").as_deref(),
        Some(authority.as_str()),
        "preserve_host: the :authority becomes the upstream Host"
    );
    assert_eq!(up.last().await.version, hyper::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_multiplexed_streams_each_get_their_own_identity() {
    let pki = pki();
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_file(dir.path(), "server.pem", &pki.cert_pem);
    let key = write_file(dir.path(), "server-key.pem", &pki.key_pkcs8_pem);
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[server.tls]
cert = "{cert}"
key = "{key}"
{validator}
{route}"#,
        cert = cert.display(),
        key = key.display(),
        route = catch_all_route(up.port, ""),
        validator = static_validator(&[("tok-a-1", "user-a", "a"), ("tok-b-2", "user-b", "b")]),
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    let config = tls_client_config(Some(&pki.ca_der), &[b"h2"]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("TLS handshake");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut sender = sender.clone();
        let (token, user) = if i % 2 == 0 {
            ("tok-a-1", "user-a")
        } else {
            ("tok-b-2", "user-b")
        };
        let req = build(
            "GET",
            &https(port, &format!("/slow?ms=200&i={i}")),
            &[("X-Auth-Token", token)],
            full(""),
        );
        tasks.spawn(async move {
            let resp = sender.send_request(req).await.expect("h2 request");
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .expect("body")
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
            (i, user, token, status, json)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (i, user, token, status, json) = r.expect("task");
        assert_eq!(status, 200);
        assert_eq!(json["headers"]["x-auth-user"], user, "stream {i}");
        assert_eq!(json["headers"]["auth-token"], token, "stream {i}");
        assert_eq!(json["path"], format!("/slow?ms=200&i={i}"));
    }
    assert_eq!(up.requests(), 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_negotiates_h2_and_http11() {
    let pki = pki();
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);
    let ca = write_file(gate.dir.path(), "ca.pem", &pki.ca_pem);
    let port = gate.port;
    let url = https(port, "/curl");
    let header = format!("X-Rucio-Auth-Token: {TOKEN}");
    let run = |version_flag: &'static str| {
        let ca = ca.clone();
        let url = url.clone();
        let header = header.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "20", version_flag, "--cacert"])
                .arg(&ca)
                .arg("--resolve")
                .arg(format!("localhost:{port}:127.0.0.1"))
                .args(["-H", &header, "-w", "\n%{http_version}", &url])
                .output()
                .expect("run curl")
        })
    };
    for (flag, expected) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = run(flag).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, version) = text.rsplit_once('\n').expect("version line");
        assert_eq!(version, expected, "curl {flag}");
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["headers"]["auth-token"], TOKEN);
        assert_eq!(json["headers"]["x-forwarded-proto"], "https");
        assert_eq!(json["version"], "HTTP/1.1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_handshakes_do_not_stop_the_server() {
    let pki = pki();
    let up = Upstream::start();
    let mut gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);

    // A client that does not trust the server's CA aborts the handshake.
    let untrusted = tls_client_config(None, &[b"h2", b"http/1.1"]);
    assert!(tls_connect(gate.port, untrusted, "localhost")
        .await
        .is_err());
    // A client that trusts a different CA.
    let other = common::pki();
    let wrong_ca = tls_client_config(Some(&other.ca_der), &[b"http/1.1"]);
    assert!(tls_connect(gate.port, wrong_ca, "localhost").await.is_err());
    // Plain HTTP sent to the TLS port.
    let out = raw(
        gate.port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_ne!(raw_status(&out), Some(200));
    // Garbage, and a connection that opens and says nothing before closing.
    let _ = raw(
        gate.port,
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3],
        Duration::from_secs(2),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gate.port))
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    drop(s);

    assert!(gate.is_running(), "the gate died; log:\n{}", gate.log());
    assert_serves_tls(&gate, &pki, b"http/1.1").await;
}

/// A trusted client offering `alpn` gets its request through.
async fn assert_serves_tls(gate: &Gate, pki: &Pki, alpn: &[u8]) {
    let trusted = tls_client_config(Some(&pki.ca_der), &[alpn]);
    let stream = tls_connect(gate.port, trusted, "localhost")
        .await
        .expect("handshake");
    let resp = tls_request(
        stream,
        build(
            "GET",
            "/after",
            &[("Host", "localhost"), ("auth-token", TOKEN)],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_tls_handshake_does_not_block_other_clients() {
    let pki = pki();
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);
    // Ten connections that never send a ClientHello.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", gate.port))
                .await
                .unwrap(),
        );
    }
    let trusted = tls_client_config(Some(&pki.ca_der), &[b"h2"]);
    let handshake = tokio::time::timeout(
        Duration::from_secs(3),
        tls_connect(gate.port, trusted, "localhost"),
    )
    .await
    .expect("a handshake was blocked behind idle connections")
    .expect("handshake");
    let resp = tls_request(
        handshake,
        build(
            "GET",
            &https(gate.port, "/x"),
            &[("auth-token", TOKEN)],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
    drop(idle);
}

// ---------------------------------------------------------------------------------------------
// The wrong protocol for the port, ALPN, header case
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_the_tls_port_gets_a_plain_400_that_says_so() {
    let pki = pki();
    let up = Upstream::start();
    let gate = tls_gate(&pki, &pki.key_pkcs8_pem, up.port);
    for _ in 0..3 {
        let out = raw(
            gate.port,
            b"GET /x HTTP/1.1\r\nHost: localhost\r\nauth-token: t\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(raw_status(&out), Some(400), "{text:?}");
        assert!(
            text.contains(r#"{"error":"Plain HTTP request sent to the HTTPS (TLS) port"}"#),
            "{text:?}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{text:?}");
    }
    // curl as a user would mistype it.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{}/", gate.port))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = gate.log();
    assert_eq!(
        log.matches("plain HTTP request on the TLS port").count(),
        1,
        "logged once for this client:\n{log}"
    );
    // The TLS port still serves TLS.
    assert_serves_tls(&gate, &pki, b"h2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_on_the_plain_port_is_logged_once_per_client() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{}\n{}",
        static_validator(&[(TOKEN, "alice", "ops")]),
        catch_all_route(up.port, "")
    ));
    let pki = pki();
    for _ in 0..3 {
        let config = tls_client_config(Some(&pki.ca_der), &[b"http/1.1"]);
        assert!(tls_connect(gate.port, config, "localhost").await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = gate.log();
    assert_eq!(
        log.matches("TLS handshake on the plain-HTTP port").count(),
        1,
        "logged once for this client:\n{log}"
    );
    let resp = get(&gate.url("/after"), &[("auth-token", TOKEN)]).await;
    assert_eq!(resp.status, 200, "plain HTTP still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn alpn_offers_what_the_config_says() {
    let pki = pki();
    let up = Upstream::start();
    let gate = tls_gate_with(&pki, &pki.key_pkcs8_pem, up.port, r#"alpn = ["http/1.1"]"#);
    // A client that prefers h2 gets HTTP/1.1.
    let config = tls_client_config(Some(&pki.ca_der), &[b"h2", b"http/1.1"]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let resp = tls_request(
        stream,
        build(
            "GET",
            "/a",
            &[("Host", "localhost"), ("auth-token", TOKEN)],
            full(""),
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.version, hyper::Version::HTTP_11);
    // HTTP/2 without ALPN (prior knowledge) is not served either.
    let config = tls_client_config(Some(&pki.ca_der), &[]);
    let stream = tls_connect(gate.port, config, "localhost")
        .await
        .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("the client side of the h2 handshake");
    tokio::spawn(conn);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(build("GET", "/a", &[("auth-token", TOKEN)], full(""))),
    )
    .await
    .expect("an answer in time");
    assert!(
        refused.is_err(),
        "HTTP/2 served on an http/1.1-only listener"
    );
    // Only h2 and http/1.1, each once.
    for bad in [r#"alpn = ["h3"]"#, r#"alpn = []"#, r#"alpn = ["h2", "h2"]"#] {
        let dir = tempfile::tempdir().unwrap();
        let cert = write_file(dir.path(), "server.pem", &pki.cert_pem);
        let key = write_file(dir.path(), "server-key.pem", &pki.key_pkcs8_pem);
        let config = write_file(
            dir.path(),
            "tokengate.toml",
            &format!(
                "[server]\nlisten = \"127.0.0.1:1\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{bad}\n{}\n{}",
                cert.display(),
                key.display(),
                static_validator(&[(TOKEN, "alice", "ops")]),
                catch_all_route(1, "")
            ),
        );
        let out = cli(&["check", "--config", &config.to_string_lossy()]);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{bad}: {said}");
        assert!(said.contains("tokengate.toml:6:"), "{bad}: {said}");
        assert!(said.contains("alpn"), "{bad}: {said}");
    }
}

/// An upstream that writes header names in its own case, as legacy servers do.
async fn mixed_case_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    let reply = b"HTTP/1.1 200 OK\r\nx-lower-case: a\r\nX-MiXeD-CaSe: b\r\nETAG: \"1\"\r\nContent-Length: 2\r\n\r\nok";
                    if tcp.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_header_names_keep_the_upstreams_case_and_ours_are_conventional() {
    let up = mixed_case_upstream().await;
    let port = free_port();
    let gate = Gate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{}\n{}",
        static_validator(&[(TOKEN, "alice", "ops")]),
        catch_all_route(up, "")
            + &format!(
                "[[route]]\npath_prefix = \"/lower\"\nupstream = \"http://127.0.0.1:{up}\"\n\
                 preserve_header_case = false\n"
            )
    ));
    let proxied = raw(
        gate.port,
        format!("GET /p HTTP/1.1\r\nHost: x\r\nauth-token: {TOKEN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let proxied = String::from_utf8_lossy(&proxied).into_owned();
    assert_eq!(raw_status(proxied.as_bytes()), Some(200), "{proxied}");
    for name in [
        "\r\nx-lower-case: a\r\n",
        "\r\nX-MiXeD-CaSe: b\r\n",
        "\r\nETAG: ",
    ] {
        assert!(proxied.contains(name), "{name:?} in {proxied}");
    }
    // What tokengate adds to a proxied response is in lower case (no per-response title-casing).
    assert!(proxied.contains("\r\nx-request-id: "), "{proxied}");
    // A route that does not preserve the case: every name in lower case.
    let lower = raw(
        gate.port,
        format!(
            "GET /lower HTTP/1.1\r\nHost: x\r\nauth-token: {TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let lower = String::from_utf8_lossy(&lower).into_owned();
    assert_eq!(raw_status(lower.as_bytes()), Some(200), "{lower}");
    for name in [
        "\r\nx-lower-case: a\r\n",
        "\r\nx-mixed-case: b\r\n",
        "\r\netag: ",
    ] {
        assert!(lower.contains(name), "{name:?} in {lower}");
    }
    let own = raw(
        gate.port,
        b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let own = String::from_utf8_lossy(&own).into_owned();
    assert_eq!(raw_status(own.as_bytes()), Some(401), "{own}");
    for name in [
        "\r\nWWW-Authenticate: Bearer",
        "\r\nContent-Type: application/json",
        "\r\nContent-Length: ",
        "\r\nX-Request-Id: ",
        "\r\nDate: ",
    ] {
        assert!(own.contains(name), "{name:?} in {own}");
    }
    // Every name of an own answer: none left in lower case.
    let head = own.split("\r\n\r\n").next().unwrap_or_default();
    for line in head.lines().skip(1) {
        assert!(
            line.starts_with(|c: char| c.is_ascii_uppercase()),
            "{line:?} in {own}"
        );
    }
}
