//! Forward-auth decisions (`[verify]`, SPEC §5): a real nginx with `auth_request` in front of the
//! echo upstream, asking the real binary; and the Traefik and Envoy header shapes as direct
//! requests to the decision listener.

mod common;

use common::*;

const TOKEN: &str = "verify-static-token-31c7";
const OTHER: &str = "verify-other-token-88aa";
const VERIFY_TOKEN: &str = "ingress-verify-secret-5f0e2b";

/// A gate with a decision listener on `vport` in `ingress` mode (`extra`: more `[verify]`
/// keys), a `/public` route without auth and an `/api` route whose upstream gets the
/// credential as `auth-token` and the identity as `X-Auth-User`.
fn config(port: u16, vport: u16, ingress: &str, extra: &str, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[verify]
listen = "{listen}"
ingress = "{ingress}"
{extra}

{static_v}
[[route]]
path_prefix = "/public"
upstream = "http://127.0.0.1:{up}"
auth = "none"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
[route.upstream_auth]
header = "auth-token"
value = "legacy {{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"X-Auth-Account" = "{{account}}"
"#,
        listen = if extra.contains("token") {
            format!("0.0.0.0:{vport}")
        } else {
            format!("127.0.0.1:{vport}")
        },
        static_v = static_validator(&[(TOKEN, "alice", "ops"), (OTHER, "bob", "dev")]),
    )
}

/// nginx in front of `up`, asking tokengate's decision listener on `vport` (the README's config).
fn nginx(vport: u16, up: u16) -> Option<ChildServer> {
    start_nginx(|port| {
        format!(
            r#"server {{
        listen 127.0.0.1:{port};
        location = /_tokengate_verify {{
            internal;
            proxy_pass http://127.0.0.1:{vport};
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
        location / {{
            auth_request /_tokengate_verify;
            auth_request_set $tg_user $upstream_http_x_auth_user;
            auth_request_set $tg_account $upstream_http_x_auth_account;
            auth_request_set $tg_credential $upstream_http_auth_token;
            auth_request_set $tg_uri $upstream_http_x_tokengate_uri;
            proxy_set_header X-Auth-User $tg_user;
            proxy_set_header X-Auth-Account $tg_account;
            proxy_set_header auth-token $tg_credential;
            proxy_set_header Authorization "";
            proxy_set_header X-Auth-Token "";
            proxy_set_header X-Rucio-Auth-Token "";
            proxy_pass http://127.0.0.1:{up}$tg_uri;
        }}
    }}"#
        )
    })
}

/// The echo upstream, a gate deciding in `nginx` mode, and nginx asking it; `None` without
/// nginx.
async fn behind_nginx() -> Option<(Upstream, Gate, ChildServer)> {
    let up = Upstream::start();
    let vport = free_port();
    let gate = Gate::start(&config(free_port(), vport, "nginx", "", up.port));
    let nginx = nginx(vport, up.port)?;
    ask(vport, "/", &[]).await;
    Some((up, gate, nginx))
}

/// `curl -i --path-as-is` through nginx.
fn curl(port: u16, path: &str, headers: &[(&str, &str)]) -> CurlReply {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-i", "--path-as-is", "--max-time", "10"]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    CurlReply::run(cmd.arg(format!("http://127.0.0.1:{port}{path}")))
}

fn echoed(reply: &CurlReply, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not the echo upstream ({e}): {reply:?}"));
    v["headers"][name].as_str().map(String::from)
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_auth_request_lets_valid_tokens_through_with_the_upstream_form() {
    let Some((up, _gate, nginx)) = behind_nginx().await else {
        return missing_tool("nginx", "nginx-light");
    };

    // A valid token: the upstream sees the identity and its own credential form, not the
    // client's header, and not the client's copy of the identity headers.
    let ok = curl(
        nginx.port,
        "/api/files?x=1",
        &[("X-Auth-Token", TOKEN), ("X-Auth-User", "mallory")],
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(echoed(&ok, "x-auth-user").as_deref(), Some("alice"));
    assert_eq!(echoed(&ok, "x-auth-account").as_deref(), Some("ops"));
    assert_eq!(
        echoed(&ok, "auth-token").as_deref(),
        Some(format!("legacy {TOKEN}").as_str())
    );
    assert_eq!(echoed(&ok, "x-auth-token"), None);

    // Other dialects, through the same decision.
    let bearer = curl(
        nginx.port,
        "/api/x",
        &[("Authorization", &format!("Bearer {OTHER}"))],
    );
    assert_eq!(bearer.status, 200, "{bearer:?}");
    assert_eq!(echoed(&bearer, "x-auth-user").as_deref(), Some("bob"));
    assert_eq!(echoed(&bearer, "authorization"), None);

    // Missing or invalid: 401 at nginx, the upstream never asked.
    let before = up.requests();
    assert_eq!(curl(nginx.port, "/api/x", &[]).status, 401);
    assert_eq!(
        curl(nginx.port, "/api/x", &[("X-Auth-Token", "not-a-token")]).status,
        401
    );
    // Two different credentials: 403 (nginx turns a 400 into a 500).
    assert_eq!(
        curl(
            nginx.port,
            "/api/x",
            &[
                ("X-Auth-Token", TOKEN),
                ("Authorization", &format!("Bearer {OTHER}"))
            ]
        )
        .status,
        403
    );
    assert_eq!(
        up.requests(),
        before,
        "nothing unauthenticated reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_open_routes_pass_without_identity_and_path_tricks_still_need_a_credential() {
    let Some((up, _gate, nginx)) = behind_nginx().await else {
        return missing_tool("nginx", "nginx-light");
    };
    let open = curl(nginx.port, "/public/readme", &[("X-Auth-User", "mallory")]);
    assert_eq!(open.status, 200, "{open:?}");
    assert_eq!(
        echoed(&open, "x-auth-user"),
        None,
        "the client's identity header never reaches the upstream"
    );

    // Routed by the normalised path, as the upstream will resolve it.
    let before = up.requests();
    for trick in [
        "/public/../api/secret",
        "/public/%2e%2e/api/secret",
        "/public/%2E%2E/api/secret",
        "/public/./../api/secret",
        "//public/../api/secret",
    ] {
        let reply = curl(nginx.port, trick, &[]);
        assert!(
            matches!(reply.status, 400 | 401 | 403),
            "{trick}: {reply:?}"
        );
    }
    assert_eq!(up.requests(), before, "no trick reached the upstream");
    // The same trick with a credential passes, as /api.
    let with = curl(
        nginx.port,
        "/public/../api/secret",
        &[("X-Auth-Token", TOKEN)],
    );
    assert_eq!(with.status, 200, "{with:?}");
    assert_eq!(echoed(&with, "x-auth-user").as_deref(), Some("alice"));
}

/// A direct question to the decision listener (once it listens: the gate binds it after its
/// main listener).
async fn ask(vport: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", vport)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "verify listener not up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    get(&format!("http://127.0.0.1:{vport}{path}"), headers).await
}

#[tokio::test(flavor = "multi_thread")]
async fn traefik_forward_auth_shape() {
    let up = Upstream::start();
    let vport = free_port();
    let _gate = Gate::start(&config(free_port(), vport, "traefik", "", up.port));
    let ok = ask(
        vport,
        "/",
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example"),
            ("x-forwarded-uri", "/api/files?limit=5"),
            ("x-auth-token", TOKEN),
        ],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        ok.header("auth-token").as_deref(),
        Some(format!("legacy {TOKEN}").as_str())
    );
    assert!(ok.header("x-request-id").is_some());

    // Only Traefik's headers name the request: nginx's are ignored, so a client cannot steer
    // the decision with them.
    let spoofed = ask(
        vport,
        "/",
        &[
            ("x-forwarded-uri", "/api/files"),
            ("x-original-uri", "/public/x"),
        ],
    )
    .await;
    spoofed.assert_error(401, "Credentials required");
    let unnamed = ask(vport, "/public/x", &[("x-original-uri", "/public/x")]).await;
    unnamed.assert_error(400, "Bad request");
    let open = ask(vport, "/", &[("x-forwarded-uri", "/public/x")]).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.header("x-auth-user"), None);
    // A path that climbs above the root is refused, as on the proxy.
    let climbing = ask(vport, "/", &[("x-forwarded-uri", "/public/../../etc")]).await;
    climbing.assert_error(400, "Bad request");
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_ext_authz_shape() {
    let up = Upstream::start();
    let vport = free_port();
    let _gate = Gate::start(&config(free_port(), vport, "envoy", "", up.port));
    let ok = ask(
        vport,
        "/api/files",
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(ok.header("x-auth-account").as_deref(), Some("ops"));
    let missing = ask(vport, "/api/files", &[]).await;
    missing.assert_error(401, "Credentials required");
    assert!(missing.header("www-authenticate").is_some());
    ask(vport, "/api/files", &[("x-auth-token", "bad")])
        .await
        .assert_error(401, "Invalid credentials");
    ask(
        vport,
        "/api/files",
        &[("x-auth-token", TOKEN), ("auth-token", OTHER)],
    )
    .await
    .assert_error(400, "Conflicting credentials");
    ask(vport, "/nowhere", &[("x-auth-token", TOKEN)])
        .await
        .assert_error(404, "No route");
    // Dot segments are resolved before routing.
    ask(vport, "/public/%2e%2e/api/files", &[])
        .await
        .assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_validator_fails_closed_with_503() {
    let up = Upstream::start();
    let (port, vport, dead) = (free_port(), free_port(), free_port());
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[verify]
listen = "127.0.0.1:{vport}"
ingress = "envoy"
{introspect}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
"#,
        introspect = introspect_validator(dead, "1s"),
        up = up.port,
    );
    let _gate = Gate::start(&toml);
    ask(vport, "/x", &[("auth-token", "legacy-secret-alice")])
        .await
        .assert_error(503, "Authentication backend unavailable");
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_the_ingress_must_present_the_verify_token() {
    let up = Upstream::start();
    let (port, vport) = (free_port(), free_port());
    // `check` refuses a decision listener beyond loopback without a token.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = config(port, vport, "envoy", "", up.port)
        .replace(&format!("127.0.0.1:{vport}"), &format!("0.0.0.0:{vport}"));
    let path = write_file(dir.path(), "bad.toml", &bad);
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("set token"), "{said}");

    let extra = format!("token = \"{VERIFY_TOKEN}\"");
    let _gate = Gate::start(&config(port, vport, "envoy", &extra, up.port));
    // Without the verify token: refused whatever the client's credential.
    let refused = ask(vport, "/api/x", &[("x-auth-token", TOKEN)]).await;
    refused.assert_error(401, "Verify token required");
    assert_eq!(refused.header("x-auth-user"), None);
    // With it in Authorization: the client's credential comes from another header.
    let ok = ask(
        vport,
        "/api/x",
        &[
            ("authorization", &format!("Bearer {VERIFY_TOKEN}")),
            ("x-auth-token", TOKEN),
        ],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-auth-user").as_deref(), Some("alice"));
    // The verify token is never taken for the client's credential.
    ask(
        vport,
        "/api/x",
        &[("authorization", &format!("Bearer {VERIFY_TOKEN}"))],
    )
    .await
    .assert_error(401, "Credentials required");
    // With it in X-Tokengate-Verify, a client's bearer token is read as usual.
    let bearer = ask(
        vport,
        "/api/x",
        &[
            ("x-tokengate-verify", VERIFY_TOKEN),
            ("authorization", &format!("Bearer {OTHER}")),
        ],
    )
    .await;
    assert_eq!(bearer.status, 200);
    assert_eq!(bearer.header("x-auth-user").as_deref(), Some("bob"));
}

/// Off loopback without a token: TLS with client certificates identifies the ingress, and a
/// client without a certificate is not answered at all.
#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_client_certificates_identify_the_ingress() {
    use common::pki::{ca, server, user, Dn};
    let root = ca("Ingress Root CA", None);
    let ingress = user(Dn::of(&[("O", "Example"), ("CN", "ingress")]), &root);
    let tls = server(&root);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_file(d, "ca.pem", &root.pem());
    write_file(d, "server.pem", &tls.pem());
    write_file(d, "server-key.pem", &tls.key_pem());
    write_file(d, "ingress.pem", &ingress.pem());
    write_file(d, "ingress-key.pem", &ingress.key_pem());
    let up = Upstream::start();
    let (port, vport) = (free_port(), free_port());
    let tls_table = format!(
        "[verify.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server-key.pem\"\n",
        d = d.display()
    );
    let open = config(port, vport, "envoy", "", up.port)
        .replace(&format!("127.0.0.1:{vport}"), &format!("0.0.0.0:{vport}"));
    // TLS alone does not say who asks: refused.
    let without_ca = write_file(
        d,
        "without-ca.toml",
        &open.replace(
            "ingress = \"envoy\"\n",
            &format!("ingress = \"envoy\"\n{tls_table}"),
        ),
    );
    assert!(std::fs::read_to_string(&without_ca)
        .unwrap()
        .contains("[verify.tls]"));
    let out = cli(&["check", "--config", without_ca.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("client_ca"));

    let with_ca = open.replace(
        "ingress = \"envoy\"\n",
        &format!(
            "ingress = \"envoy\"\n{tls_table}client_ca = \"{}/ca.pem\"\n",
            d.display()
        ),
    );
    let _gate = Gate::start(&with_ca);
    let curl = |with_certificate: bool| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-i", "--max-time", "10", "--cacert"])
            .arg(d.join("ca.pem"))
            .args(["--resolve", &format!("localhost:{vport}:127.0.0.1")])
            .args(["-H", &format!("x-auth-token: {TOKEN}")]);
        if with_certificate {
            cmd.arg("--cert")
                .arg(d.join("ingress.pem"))
                .arg("--key")
                .arg(d.join("ingress-key.pem"));
        }
        cmd.arg(format!("https://localhost:{vport}/api/x"));
        cmd
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", vport)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "verify listener not up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = CurlReply::run(&mut curl(true));
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(
        ok.headers
            .iter()
            .any(|(k, v)| k == "x-auth-user" && v == "alice"),
        "{ok:?}"
    );
    let refused = curl(false).output().expect("curl");
    assert!(
        !String::from_utf8_lossy(&refused.stdout).contains("x-auth-user"),
        "answered without a client certificate: {refused:?}"
    );
    assert!(!refused.status.success(), "{refused:?}");
}

/// A decision connection is recycled after 5 × `idle_timeout`, even an HTTP/2 one that keeps
/// answering pings: it cannot hold one of the listener's slots for ever. Its last request is
/// answered first.
#[tokio::test(flavor = "multi_thread")]
async fn decision_connections_are_recycled() {
    use http_body_util::{BodyExt, Empty};
    let up = Upstream::start();
    let (port, vport) = (free_port(), free_port());
    let toml = config(port, vport, "envoy", "", up.port).replace(
        &format!("listen = \"127.0.0.1:{port}\"\n"),
        &format!("listen = \"127.0.0.1:{port}\"\nidle_timeout = \"1s\"\n"),
    );
    let _gate = Gate::start(&toml);
    ask(vport, "/", &[]).await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", vport))
        .await
        .expect("connect");
    let (mut send, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_millis(300))
            .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let started = std::time::Instant::now();
    let driven = tokio::spawn(connection);
    let request = http::Request::get(format!("http://127.0.0.1:{vport}/public/x"))
        .body(Empty::new())
        .unwrap();
    let answer = send.send_request(request).await.expect("a decision");
    assert_eq!(answer.status(), 200);
    let _ = answer.into_body().collect().await;
    // Quiet from here on, except for pings (the client answers the server's and sends its own).
    let closed = tokio::time::timeout(std::time::Duration::from_secs(15), driven).await;
    let lived = started.elapsed();
    assert!(closed.is_ok(), "the connection was never closed");
    assert!(
        lived >= std::time::Duration::from_secs(4),
        "closed after {lived:?}: too early (5 x 1 s)"
    );
}

/// A trusted ingress's `X-Real-IP` (or `X-Forwarded-For`) names the client in the decision's
/// access-log line; an untrusted one's does not; and `check` warns about a `[verify]` without
/// `trusted_proxies`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_ingress_names_the_client_and_check_warns_without_one() {
    let up = Upstream::start();
    let (port, vport) = (free_port(), free_port());
    let trusting = config(port, vport, "traefik", "", up.port).replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        1,
    );
    let gate = Gate::start(&trusting);
    assert_eq!(
        decided_client(&gate, vport, "/api/trusted").await,
        "203.0.113.9"
    );

    // Without trusted_proxies the ingress is the client, and check says so.
    let (port, vport) = (free_port(), free_port());
    let plain = config(port, vport, "traefik", "", up.port);
    let untrusting = Gate::start(&plain);
    assert_eq!(
        decided_client(&untrusting, vport, "/api/untrusted").await,
        "127.0.0.1"
    );
    let out = cli(&[
        "check",
        "--config",
        &untrusting.config_path.to_string_lossy(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("warning: [verify] is set but [server] trusted_proxies is empty"),
        "{said}"
    );
    let out = cli(&["check", "--config", &gate.config_path.to_string_lossy()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// The access log's `client` of a Traefik-shaped decision for `uri` whose ingress says the
/// client is 203.0.113.9 (`X-Real-IP`).
async fn decided_client(gate: &Gate, vport: u16, uri: &str) -> String {
    let decided = ask(
        vport,
        "/",
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", uri),
            ("x-real-ip", "203.0.113.9"),
            ("x-auth-token", TOKEN),
        ],
    )
    .await;
    assert_eq!(decided.status, 200);
    let lines = gate
        .wait_access_line(uri, std::time::Duration::from_secs(5))
        .await;
    assert!(!lines.is_empty(), "{}", gate.log());
    lines[0]["client"].as_str().unwrap_or_default().to_string()
}

/// Decisions apply the route's rate limits: a subject over its limit is refused with Traefik's
/// 429 and `Retry-After`; for nginx's `auth_request` (which passes on only 401 and 403) with
/// 403.
#[tokio::test(flavor = "multi_thread")]
async fn decisions_apply_the_routes_rate_limits() {
    let up = Upstream::start();
    for (ingress, uri_header, over) in [
        ("traefik", "x-forwarded-uri", 429),
        ("nginx", "x-original-uri", 403),
    ] {
        let vport = free_port();
        let _gate = Gate::start(&format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[verify]
listen = "127.0.0.1:{vport}"
ingress = "{ingress}"

{static_v}
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
[[route.rate_limit]]
per = "subject"
rate = "2/1h"
"#,
            port = free_port(),
            up = up.port,
            static_v = static_validator(&[(TOKEN, "alice", "ops"), (OTHER, "bob", "dev")]),
        ));
        let question = |token: &'static str| {
            [
                ("x-forwarded-method", "GET"),
                ("x-original-method", "GET"),
                (uri_header, "/api/files"),
                ("x-auth-token", token),
            ]
        };
        for _ in 0..2 {
            assert_eq!(
                ask(vport, "/", &question(TOKEN)).await.status,
                200,
                "{ingress}"
            );
        }
        let refused = ask(vport, "/", &question(TOKEN)).await;
        assert_eq!(refused.status, over, "{ingress}");
        if over == 429 {
            assert_eq!(refused.header("retry-after").as_deref(), Some("1800"));
        }
        assert_eq!(ask(vport, "/", &question(OTHER)).await.status, 200, "bob");
    }
}

/// nginx `auth_request` with route rules: what the rules forbid stops at nginx with 403 (the
/// upstream never sees it), with the method nginx names (not the decision request's own GET);
/// what they allow goes through.
#[tokio::test(flavor = "multi_thread")]
async fn nginx_auth_request_stops_what_the_rules_forbid() {
    let up = Upstream::start();
    let vport = free_port();
    let token = |token: &str, subject: &str, scopes: &str| {
        format!(
            "[[validator.token]]\nsha256 = \"{}\"\nsubject = \"{subject}\"\nscopes = {scopes}\n",
            sha256_hex(token)
        )
    };
    let _gate = Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[verify]
listen = "127.0.0.1:{vport}"
ingress = "nginx"

[[validator]]
type = "static"
{reader}{writer}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[[route.allow]]
methods = ["GET", "HEAD"]
scopes = ["read"]
[[route.allow]]
scopes = ["write"]
"#,
        port = free_port(),
        up = up.port,
        reader = token(TOKEN, "alice", r#"["read"]"#),
        writer = token(OTHER, "bob", r#"["read", "write"]"#),
    ));
    let Some(nginx) = nginx(vport, up.port) else {
        return;
    };
    ask(vport, "/", &[]).await;
    let through = curl(nginx.port, "/files", &[("X-Auth-Token", TOKEN)]);
    assert_eq!(through.status, 200, "{through:?}");
    let before = up.requests();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "10", "-X", "DELETE", "-H"])
        .arg(format!("X-Auth-Token: {TOKEN}"))
        .arg(format!("http://127.0.0.1:{}/files", nginx.port));
    let refused = CurlReply::run(&mut cmd);
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        up.requests(),
        before,
        "a forbidden request reached the upstream"
    );
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "10", "-X", "DELETE", "-H"])
        .arg(format!("X-Auth-Token: {OTHER}"))
        .arg(format!("http://127.0.0.1:{}/files", nginx.port));
    assert_eq!(CurlReply::run(&mut cmd).status, 200);
}
