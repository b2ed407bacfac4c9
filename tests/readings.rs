//! SPEC §9 "One route under every reading", and the rest of issue 18's walk-arounds, against
//! real upstreams that read paths their own way: nginx (decodes `%2f` before routing) and a
//! WSGI app that reads paths as IIS and Tomcat do (decoded twice, case-folded, `;…` dropped,
//! trailing dots and spaces dropped, slashes merged). A request without a credential must never
//! reach a handler of the protected route, whatever path it sends, directly or through nginx
//! `auth_request`. Also: `Connection` naming the gate's headers, HTTP/2 `host` ≠ `:authority`,
//! an identity with CR/LF, a query credential with non-ASCII bytes, and a panic that costs one
//! connection only.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A login credential (static validator): alice, account ops.
const TOKEN: &str = "readings-login-token-7d2e";

/// `/` open and `/api` protected, both to `up`, alike in how they forward.
fn open_and_protected(port: u16, up: u16, extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{extra}

[credentials]
sources = ["x-auth-token", "query:access_token"]

[store]
backend = "memory"

{validators}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
auth = "required"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        validators = static_validator(&[(TOKEN, "alice", "ops")]),
    )
}

/// nginx as the upstream: `protected:` under its `/api/` location (matched on the decoded
/// `$uri`), `public:` elsewhere.
fn nginx_upstream() -> Option<ChildServer> {
    start_nginx(|port| {
        format!(
            r#"server {{
        listen 127.0.0.1:{port};
        location /api/ {{ return 200 "protected:$uri"; }}
        location = /api {{ return 200 "protected:$uri"; }}
        location / {{ return 200 "public:$uri"; }}
    }}"#
        )
    })
}

/// A WSGI app (Python's `wsgiref`, which decodes `PATH_INFO` once, `%2f` included) that reads
/// the path again as IIS and Tomcat would: decoded a second time, `\` as `/`, `;…` dropped
/// from every segment, trailing dots and spaces dropped, case folded, empty segments merged,
/// dot segments resolved (never above `/`). `protected:` when that reading lies under `/api`.
fn lenient_app() -> Option<ChildServer> {
    const APP: &str = r#"
import sys, urllib.parse
from wsgiref.simple_server import make_server, WSGIRequestHandler
class Quiet(WSGIRequestHandler):
    def log_message(self, *args): pass
def reading(path):
    path = urllib.parse.unquote(path, 'latin-1').replace('\\', '/')
    out = []
    for seg in path.split('/'):
        seg = seg.split(';', 1)[0]
        seg = seg.rstrip(' ') if seg.rstrip(' ') in ('.', '..') else seg.rstrip('. ')
        seg = seg.lower()
        if seg in ('', '.'):
            continue
        if seg == '..':
            if out: out.pop()
            continue
        out.append(seg)
    return '/' + '/'.join(out)
def app(environ, start_response):
    read = reading(environ.get('PATH_INFO', ''))
    kind = 'protected' if read == '/api' or read.startswith('/api/') else 'public'
    user = environ.get('HTTP_X_AUTH_USER') or '-'
    query = environ.get('QUERY_STRING', '')
    body = ('%s:%s:%s%s' % (kind, read, user, '?' + query if query else '')).encode('latin-1', 'replace')
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
    return [body]
make_server('127.0.0.1', int(sys.argv[1]), app, handler_class=Quiet).serve_forever()
"#;
    python_app("the lenient WSGI app", APP)
}

/// One HTTP/1.1 request over raw TCP (the path exactly as given): status and body.
async fn fetch(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let reply = raw(port, request.as_bytes(), Duration::from_secs(10)).await;
    let status = raw_status(&reply).unwrap_or(0);
    let text = String::from_utf8_lossy(&reply);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    (status, body)
}

/// Issue 18, items 1, 3 and 10: each walk-around, refused without a credential and served to
/// the protected handler with one.
const WALK_AROUNDS: [&str; 11] = [
    "/api%2fsecret",
    "/api%2Fsecret",
    "/%2fapi/secret",
    "/API/secret",
    "/Api/secret",
    "/;/api/secret",
    "/api;x/secret",
    "/api./secret",
    "/api%20/secret",
    "/x/%252e%252e/api/secret",
    "/api%252fsecret",
];

#[tokio::test(flavor = "multi_thread")]
async fn nginx_never_serves_api_to_an_encoded_slash_without_a_credential() {
    let Some(nginx) = nginx_upstream() else {
        return missing_tool("nginx", "nginx-light");
    };
    let port = free_port();
    let _gate = Gate::start(&open_and_protected(port, nginx.port, ""));
    for path in ["/api%2fsecret", "/api%2Fsecret", "/%2fapi/secret"] {
        // What nginx makes of it when asked directly: its /api/ location.
        let (_, direct) = fetch(nginx.port, path, &[]).await;
        assert!(direct.starts_with("protected:"), "{path}: {direct}");
        let (status, body) = fetch(port, path, &[]).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, body) = fetch(port, path, &[("X-Auth-Token", TOKEN)]).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "protected:/api/secret"),
            "{path}"
        );
    }
    // Rucio-style `%2F` inside one route's segment still passes as sent.
    let (status, body) = fetch(port, "/api/dids/scope/a%2Fb", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "protected:/api/dids/scope/a/b")
    );
    let (status, body) = fetch(port, "/public/a%2Fb", &[]).await;
    assert_eq!((status, body.as_str()), (200, "public:/public/a/b"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lenient_upstream_never_serves_api_by_case_params_or_trailing_dots() {
    let Some(app) = lenient_app() else {
        return missing_tool("python3", "python3");
    };
    let port = free_port();
    let _gate = Gate::start(&open_and_protected(port, app.port, ""));
    for path in WALK_AROUNDS {
        let (_, direct) = fetch(app.port, path, &[]).await;
        assert!(
            direct.starts_with("protected:"),
            "{path}: the app reads {direct}"
        );
        let (status, body) = fetch(port, path, &[]).await;
        assert!(
            matches!(status, 400 | 401) && !body.starts_with("protected:"),
            "{path}: {status} {body}"
        );
        let (status, body) = fetch(port, path, &[("X-Auth-Token", TOKEN)]).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            body.starts_with("protected:") && body.ends_with(":alice"),
            "{path}: {body}"
        );
    }
    // Public paths stay public: nothing to refuse.
    for path in ["/", "/public/x", "/apix", "/Public/Report.PDF", "/a;b/c"] {
        let (status, body) = fetch(port, path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.starts_with("public:"), "{path}: {body}");
    }
}

/// A small deterministic generator (xorshift), so that a failure names a reproducible path.
struct Paths(u64);

impl Paths {
    /// The alphabet of issue 18, plus whole words of it, so that paths often spell `api`.
    const PIECES: [&'static str; 30] = [
        "/", "/", ".", ";", "%", "2", "f", "F", "5", "c", "C", "e", "E", "a", "p", "i", "A", "P",
        "I", "%20", "api", "api", "/api", "/API", "Api", "%2f", "%2F", "%2e", "%25", "..",
    ];

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn path(&mut self) -> String {
        let len = 1 + self.next() % 10;
        let mut path = String::from("/");
        for _ in 0..len {
            path.push_str(Self::PIECES[(self.next() % Self::PIECES.len() as u64) as usize]);
        }
        path
    }
}

/// What a run of random paths came to.
#[derive(Default, Debug)]
struct Tally {
    paths: usize,
    /// Paths the app reads as protected when asked directly.
    protected: usize,
    /// Paths the app reads as public that the gate (or the ingress) refused anyway.
    public_refused: usize,
    public: usize,
}

/// Sends `count` random paths without a credential to `front` (the gate, or nginx asking the
/// gate) and directly to the app; none may reach the protected handler through `front`.
async fn random_paths(front: u16, app: u16, count: usize, seed: u64) -> Tally {
    let mut paths = Paths(seed);
    let mut tally = Tally::default();
    for _ in 0..count {
        let path = paths.path();
        let (status, body) = fetch(front, &path, &[]).await;
        assert!(
            !body.starts_with("protected:"),
            "seed {seed}: {path:?} reached the protected handler without a credential: {body}"
        );
        let (_, direct) = fetch(app, &path, &[]).await;
        tally.paths += 1;
        if direct.starts_with("protected:") {
            tally.protected += 1;
            assert_ne!(status, 200, "seed {seed}: {path:?}: {body}");
        } else if direct.starts_with("public:") {
            tally.public += 1;
            if status != 200 {
                tally.public_refused += 1;
            }
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread")]
async fn random_paths_never_reach_a_protected_handler_without_a_credential() {
    let Some(app) = lenient_app() else {
        return missing_tool("python3", "python3");
    };
    let port = free_port();
    let _gate = Gate::start(&open_and_protected(port, app.port, ""));
    let tally = random_paths(port, app.port, 5000, 0x5eed_1811).await;
    eprintln!(
        "direct to the gate: {tally:?}; false refusals {:.1} % of public paths",
        100.0 * tally.public_refused as f64 / tally.public.max(1) as f64
    );
    assert!(
        tally.protected >= 250,
        "too few protected paths tried: {tally:?}"
    );
    assert!(
        tally.public >= 1000,
        "too few public paths tried: {tally:?}"
    );
}

/// nginx in front of the app, asking the gate's decision listener, and forwarding the URI the
/// gate decided on (`X-Tokengate-Uri`), as the README's config does.
fn ingress(vport: u16, app: u16) -> Option<ChildServer> {
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
            auth_request_set $tg_uri $upstream_http_x_tokengate_uri;
            proxy_set_header X-Auth-User $tg_user;
            proxy_set_header X-Auth-Token "";
            proxy_pass http://127.0.0.1:{app}$tg_uri;
        }}
    }}"#
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn random_paths_through_nginx_auth_request_never_reach_a_protected_handler() {
    let Some(app) = lenient_app() else {
        return missing_tool("python3", "python3");
    };
    let vport = free_port();
    let port = free_port();
    let verify = format!("[verify]\nlisten = \"127.0.0.1:{vport}\"\ningress = \"nginx\"\n");
    let _gate = Gate::start(
        &open_and_protected(port, app.port, "")
            .replace("[credentials]", &format!("{verify}\n[credentials]")),
    );
    let Some(nginx) = ingress(vport, app.port) else {
        return missing_tool("nginx", "nginx-light");
    };
    wait_port(vport);

    // The walk-arounds, refused; with a credential, served as decided.
    for path in WALK_AROUNDS {
        let (status, body) = fetch(nginx.port, path, &[]).await;
        assert!(
            status != 200 && !body.starts_with("protected:"),
            "{path}: {status} {body}"
        );
    }
    let (status, body) = fetch(nginx.port, "/api%2fsecret", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "protected:/api/secret:alice")
    );

    // A query credential is decided on, and never reaches the app: nginx forwards the URI the
    // gate answered, without it.
    let (status, body) = fetch(
        nginx.port,
        &format!("/api/echo?x=1&access_token={TOKEN}"),
        &[],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "protected:/api/echo:alice?x=1"),
        "the app must get the decided URI, without the query credential"
    );
    let tally = random_paths(nginx.port, app.port, 5000, 0x1a9_5eed).await;
    eprintln!(
        "through nginx auth_request: {tally:?}; false refusals {:.1} % of public paths",
        100.0 * tally.public_refused as f64 / tally.public.max(1) as f64
    );
    assert!(
        tally.protected >= 250,
        "too few protected paths tried: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_answers_carry_the_uri_to_forward_without_query_credentials() {
    let up = Upstream::start();
    let vport = free_port();
    let port = free_port();
    let verify = format!("[verify]\nlisten = \"127.0.0.1:{vport}\"\ningress = \"nginx\"\n");
    let _gate = Gate::start(
        &open_and_protected(port, up.port, "")
            .replace("[credentials]", &format!("{verify}\n[credentials]")),
    );
    wait_port(vport);
    let ask = |uri: &'static str| async move {
        get(
            &format!("http://127.0.0.1:{vport}/"),
            &[("X-Original-URI", uri), ("X-Original-Method", "GET")],
        )
        .await
    };
    let ok = ask("/api//files/./a%2Fb?x=1&access_token=readings-login-token-7d2e&y=2").await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("x-tokengate-uri").as_deref(),
        Some("/api/files/a%2Fb?x=1&y=2")
    );
    assert_eq!(ok.header("x-auth-user").as_deref(), Some("alice"));
    let open = ask("/public/%7Ex").await;
    assert_eq!(open.status, 200);
    assert_eq!(
        open.header("x-tokengate-uri").as_deref(),
        Some("/public/~x")
    );
    assert_eq!(ask("/api%2fsecret").await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_cannot_remove_the_gates_own_headers() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&open_and_protected(port, up.port, ""));
    for named in [
        "X-Request-Id",
        "Host",
        "X-Forwarded-Host, X-Forwarded-For, traceparent",
    ] {
        let resp = get(
            &format!("http://127.0.0.1:{port}/public/x"),
            &[("Connection", named), ("X-Request-Id", "req-from-client-1")],
        )
        .await;
        assert_eq!(resp.status, 200, "{named}");
        let seen = up.last().await;
        assert_eq!(
            seen.header("x-request-id").as_deref(),
            Some("req-from-client-1"),
            "Connection: {named}"
        );
        assert_eq!(
            seen.header("x-forwarded-host").as_deref(),
            Some(format!("127.0.0.1:{port}").as_str()),
            "Connection: {named}"
        );
        assert_eq!(
            seen.header("x-forwarded-for").as_deref(),
            Some("127.0.0.1"),
            "Connection: {named}"
        );
        assert!(seen.header("host").is_some(), "Connection: {named}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_headers_legacy_apps_trust_never_pass() {
    let up = Upstream::start();
    let port = free_port();
    let toml = open_and_protected(port, up.port, "strip_headers = [\"X-Site-Role\"]");
    let _gate = Gate::start(&toml);
    let spoofed = [
        "Remote-User",
        "X-Remote-User",
        "X-Forwarded-User",
        "X-Forwarded-Email",
        "X-Forwarded-Groups",
        "X-Forwarded-Preferred-Username",
        "X-Forwarded-Access-Token",
        "X-Auth-Request-User",
        "X-Auth-Request-Email",
        "X-Forwarded-Prefix",
        "X-Forwarded-Port",
        "True-Client-IP",
        "X-Client-IP",
        "Client-IP",
        "X-Forwarded-Uri",
        "X-HTTP-Method-Override",
        "X-Forwarded-Scheme",
        "X-Forwarded-Proto",
        "X-Site-Role",
    ];
    let mut headers: Vec<(&str, &str)> = spoofed.iter().map(|h| (*h, "mallory")).collect();
    headers.push(("X-Benign", "kept"));
    for path in ["/public/x", "/api/x"] {
        let mut with = headers.clone();
        if path.starts_with("/api") {
            with.push(("X-Auth-Token", TOKEN));
        }
        let resp = get(&format!("http://127.0.0.1:{port}{path}"), &with).await;
        assert_eq!(resp.status, 200, "{path}");
        let seen = up.last().await;
        for name in spoofed {
            assert_ne!(
                seen.header(name).as_deref(),
                Some("mallory"),
                "{path}: the client's {name} reached the upstream"
            );
        }
        assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(seen.header("x-benign").as_deref(), Some("kept"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_host_must_name_the_authority() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&open_and_protected(port, up.port, ""));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for (host, want) in [
        ("evil.example", 400),
        ("good.example", 200),
        ("GOOD.example", 200),
    ] {
        let request = http::Request::get("http://good.example/public/x")
            .header("host", host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(request).await.expect("h2 request");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        assert_eq!(status, want, "host {host} beside :authority good.example");
    }
    let seen = up.last().await;
    assert_ne!(
        seen.header("x-forwarded-host").as_deref(),
        Some("evil.example")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_with_cr_lf_is_refused_never_forwarded_without_identity() {
    let up = Upstream::start();
    let port = free_port();
    // The static validator's subject holds CR/LF (TOML escapes), as an IdP's `sub` could.
    let toml = open_and_protected(port, up.port, "")
        .replace("subject = \"alice\"", "subject = \"alice\\r\\nX-Admin: 1\"");
    let gate = Gate::start(&toml);
    for path in ["/api/x", "/public/x"] {
        let resp = get(
            &format!("http://127.0.0.1:{port}{path}"),
            &[("X-Auth-Token", TOKEN)],
        )
        .await;
        if path == "/api/x" {
            resp.assert_error(401, "Invalid credentials");
        } else {
            // An open route validates nothing, and forwards no identity.
            assert_eq!(resp.status, 200);
            assert_eq!(up.last().await.header("x-auth-user"), None);
        }
    }
    assert_eq!(up.requests(), 1, "only the open route reached the upstream");
    assert!(
        gate.log().contains("identity_not_a_header_value"),
        "the refusal's reason is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_credential_with_non_ascii_bytes_is_refused_and_the_process_lives() {
    let up = Upstream::start();
    let port = free_port();
    let mut gate = Gate::start(&open_and_protected(port, up.port, ""));
    let crash = format!("/api/x?access_token=tg_{}%C3%A9BBBBB", "A".repeat(42));
    let (status, body) = fetch(port, &crash, &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = fetch(port, &crash.replace("/api/", "/public/"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(gate.is_running());
    let (status, _) = fetch(port, "/api/x", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(status, 200);
    assert!(
        !gate.log().contains("AAAAAAAAAA"),
        "a credential was logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_costs_one_connection_never_the_process() {
    let up = Upstream::start();
    let port = free_port();
    let mut gate = Gate::start_with_env(
        &open_and_protected(port, up.port, ""),
        &[("TOKENGATE_TEST_PANIC_PATH", "/public/boom")],
    );
    // A keep-alive connection stays open beside the one that panics.
    let client = client();
    let before = send_with(
        &client,
        build(
            "GET",
            &format!("http://127.0.0.1:{port}/public/a"),
            &[],
            full(""),
        ),
    )
    .await;
    assert_eq!(before.status, 200);
    for _ in 0..3 {
        let (status, _) = fetch(port, "/public/boom-secret-value-9f1", &[]).await;
        assert_eq!(
            status, 0,
            "the panicking connection is closed without an answer"
        );
    }
    assert!(gate.is_running(), "the process survived");
    let after = send_with(
        &client,
        build(
            "GET",
            &format!("http://127.0.0.1:{port}/public/b"),
            &[],
            full(""),
        ),
    )
    .await;
    assert_eq!(after.status, 200);
    let (status, _) = fetch(port, "/api/x", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(status, 200);
    let log = gate.log();
    assert!(
        log.contains("src/proxy.rs"),
        "the location is logged: {log}"
    );
    assert!(
        !log.contains("boom-secret-value"),
        "the payload was logged: {log}"
    );
}
