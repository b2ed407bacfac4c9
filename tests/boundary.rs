//! SPEC §9 "Security boundaries": whatever the client sends, and whatever the upstream's own
//! parser makes of it, the upstream receives exactly what the gate authorised.
//!
//! Paths (normalised before routing, tricks refused; nginx as a path-normalising upstream),
//! headers (no client copy of any credential or identity header on any route), upgrades (only
//! the route's protocols, a careless upstream's 101 never opens a tunnel), minting (only a login
//! credential mints, lifetimes capped everywhere), audit lines, secrets in config, and request
//! framing. Every request that must not pass is sent over raw TCP where a client library might
//! tidy it up first.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::pki::{ca, server, user, Dn};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A login credential (static validator): alice, account ops.
const TOKEN: &str = "boundary-login-token-4c1f";
/// Another login credential: bob, account bobs.
const OTHER: &str = "boundary-login-token-bob-93";
/// The admin listener's bearer token.
const ADMIN_TOKEN: &str = "boundary-admin-secret-71d0";

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 on a socket
// ---------------------------------------------------------------------------------------------

/// One response read off a raw socket.
#[derive(Debug)]
struct RawReply {
    status: u16,
    /// The response head, as sent.
    head: String,
    body: Vec<u8>,
}

impl RawReply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?} {:?}", self.text()))
    }

    /// A response header's value (the first); names are case-insensitive.
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The path + query the echo upstream reports.
    fn echoed_path(&self) -> String {
        self.json()["path"].as_str().unwrap_or_default().to_string()
    }

    /// One of tokengate's own JSON error responses (SPEC §4).
    fn assert_error(&self, status: u16, message: &str, case: &str) {
        assert_eq!(self.status, status, "{case}: {:?}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "{case}: content-type {ct:?}"
        );
        assert_eq!(self.json(), json!({ "error": message }), "{case}");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body; `None` while incomplete. Returns the body and the bytes used.
fn dechunk(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let line_end = i + find(&data[i..], b"\r\n")?;
        let size_text = std::str::from_utf8(&data[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            loop {
                let end = i + find(&data[i..], b"\r\n")?;
                let blank = end == i;
                i = end + 2;
                if blank {
                    return Some((out, i));
                }
            }
        }
        if data.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&data[i..i + size]);
        i += size + 2;
    }
}

/// The first response in `data`, when complete (`eof`: the peer closed, so a body without a
/// length ends here).
fn parse_reply(data: &[u8], eof: bool) -> Option<RawReply> {
    let head_end = find(data, b"\r\n\r\n")? + 4;
    let status = raw_status(data)?;
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut reply = RawReply {
        status,
        head,
        body: Vec::new(),
    };
    let rest = &data[head_end..];
    if status < 200 || status == 204 || status == 304 {
        return Some(reply);
    }
    if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        reply.body = dechunk(rest)?.0;
        return Some(reply);
    }
    if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        reply.body = rest[..len].to_vec();
        return Some(reply);
    }
    eof.then(|| {
        reply.body = rest.to_vec();
        reply
    })
}

/// Reads one complete response (10 s at most).
async fn read_reply(stream: &mut TcpStream) -> RawReply {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(reply) = parse_reply(&data, false) {
            return reply;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "no complete response within 10 s: {:?}",
                String::from_utf8_lossy(&data)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return parse_reply(&data, true).unwrap_or_else(|| {
                    panic!(
                        "connection closed before a complete response: {:?}",
                        String::from_utf8_lossy(&data)
                    )
                })
            }
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends raw bytes on a new connection and reads one response.
async fn send_raw(port: u16, request: &[u8]) -> RawReply {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gate");
    stream.write_all(request).await.expect("write request");
    read_reply(&mut stream).await
}

/// `GET target` exactly as written (no client-side normalisation), with extra headers.
async fn get_raw(port: u16, target: &str, headers: &[(&str, &str)]) -> RawReply {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: gate.test\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    send_raw(port, request.as_bytes()).await
}

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

/// The static validator every test uses: TOKEN is alice/ops, OTHER is bob/bobs.
fn validators() -> String {
    static_validator(&[(TOKEN, "alice", "ops"), (OTHER, "bob", "bobs")])
}

/// A route to `up` whose upstream expects `X-Upstream-Credential: Token {token}` and
/// `X-Auth-User`; `extra` goes right after `upstream`.
fn route(prefix: &str, up: u16, extra: &str) -> String {
    format!(
        r#"[[route]]
path_prefix = "{prefix}"
upstream = "http://127.0.0.1:{up}"
{extra}
[route.upstream_auth]
header = "X-Upstream-Credential"
value = "Token {{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#
    )
}

/// `[server]`, then `tables` (any of `[credentials]`, `[tokens]`, `[endpoints]`, `[admin]`), a
/// memory store, the validators, then `routes`.
fn gate_config(port: u16, server_extra: &str, tables: &str, routes: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{server_extra}

{tables}

[store]
backend = "memory"

{validators}
{routes}"#,
        validators = validators()
    )
}

/// `/public` without authentication and `/api` with it, each to its own upstream.
fn public_and_api(port: u16, public: u16, api: u16) -> String {
    gate_config(
        port,
        "",
        "",
        &format!(
            "{}\n{}",
            route("/public", public, "auth = \"none\""),
            route("/api", api, "")
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// Refused: paths that climb above `/` (plain or percent-encoded dots, `..;x`), NUL, a raw
/// backslash, and dot segments hidden behind `%2f` / `%5c`. Nothing reaches an upstream.
#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_are_400_before_any_upstream() {
    let public = Upstream::start();
    let api = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&public_and_api(port, public.port, api.port));
    let targets = [
        // climbing above the root
        "/..",
        "/../etc/passwd",
        "/api/../../etc/passwd",
        "/public/../../api/secret",
        "/%2e%2e/api/secret",
        "/api/%2E%2E/%2e%2e/x",
        "/..;x/api/secret",
        // NUL
        "/api/%00",
        "/api/secret%00.json",
        // a raw backslash
        "/api\\secret",
        "/public\\..\\api\\secret",
        // dot segments behind encoded separators
        "/public/..%2fapi/secret",
        "/public/..%2Fapi/secret",
        "/public/%2f../api/secret",
        "/public/..%5capi/secret",
        "/public/..%5Capi/secret",
        "/public/%5c../api/secret",
        "/public/%2e%2e%2fapi/secret",
        "/public/x%2f..%2f..%2fapi/secret",
        // a dot segment behind an encoded `;`
        "/public/..%3Bx/api/secret",
        "/public/.%2e%5capi/secret",
    ];
    for target in targets {
        let reply = get_raw(port, target, &[("X-Auth-Token", TOKEN)]).await;
        reply.assert_error(400, "Bad request", target);
        let anonymous = get_raw(port, target, &[]).await;
        anonymous.assert_error(400, "Bad request", target);
    }
    assert_eq!(public.requests(), 0, "a refused path reached /public");
    assert_eq!(api.requests(), 0, "a refused path reached /api");
}

/// Refused: routing on one spelling of a path while the upstream resolves another. `//`,
/// `%2e`, `%61`, `.` and `..` (also `..;x`) are resolved before the route is chosen, and the
/// normalised path is what the upstream gets.
#[tokio::test(flavor = "multi_thread")]
async fn path_is_normalised_before_routing_and_forwarding() {
    let public = Upstream::start();
    let api = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&public_and_api(port, public.port, api.port));
    // (sent, forwarded, whether it belongs to /api)
    let cases = [
        ("//api//secret", "/api/secret", true),
        ("/public/../api/secret", "/api/secret", true),
        ("/public/%2e%2e/api/secret", "/api/secret", true),
        ("/public/%2E%2E/api/secret", "/api/secret", true),
        ("/public/.%2e/api/secret", "/api/secret", true),
        ("/public//..//api/secret", "/api/secret", true),
        ("/public/..;x/api/secret", "/api/secret", true),
        ("/public/./%2e/../api/secret", "/api/secret", true),
        ("/%61pi/secret", "/api/secret", true),
        ("/api/x/..", "/api/", true),
        ("/public/./a/./b", "/public/a/b", false),
        ("/public/%7ejohn/%41bc", "/public/~john/Abc", false),
        ("/public/a/../b?q=%2e%2e/x", "/public/b?q=%2e%2e/x", false),
        ("/public/a/b/..;x/c", "/public/a/c", false),
    ];
    for (sent, forwarded, protected) in cases {
        let anonymous = get_raw(port, sent, &[]).await;
        if protected {
            anonymous.assert_error(401, "Credentials required", sent);
            let reply = get_raw(port, sent, &[("X-Auth-Token", TOKEN)]).await;
            assert_eq!(reply.status, 200, "{sent}: {}", reply.text());
            assert_eq!(api.last().await.path, forwarded, "{sent}");
            assert_eq!(reply.echoed_path(), forwarded, "{sent}");
        } else {
            assert_eq!(anonymous.status, 200, "{sent}: {}", anonymous.text());
            assert_eq!(public.last().await.path, forwarded, "{sent}");
        }
    }
    let protected = cases.iter().filter(|c| c.2).count();
    assert_eq!(
        api.requests(),
        protected,
        "only authenticated requests reach /api"
    );
}

/// Refused: a prefix that matches half a segment. `/api` covers `/api`, `/api/…` and
/// `/api;x/…`, never `/apix`, which is "No route" — or the `/` route when there is one.
#[tokio::test(flavor = "multi_thread")]
async fn routes_match_whole_segments() {
    let api = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&gate_config(port, "", "", &route("/api", api.port, "")));
    let auth = [("X-Auth-Token", TOKEN)];
    for target in ["/apix", "/apix/secret", "/api-v2/secret", "/apisecret"] {
        get_raw(port, target, &auth)
            .await
            .assert_error(404, "No route", target);
    }
    assert_eq!(api.requests(), 0, "a half-segment match reached /api");
    for target in ["/api;x/secret", "/api;jsessionid=1", "/api", "/api/"] {
        get_raw(port, target, &[])
            .await
            .assert_error(401, "Credentials required", target);
        let reply = get_raw(port, target, &auth).await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        assert_eq!(reply.echoed_path(), target, "{target}");
    }

    // With a `/` route, a half-segment match goes there, never to /api.
    let root = Upstream::start();
    let api = Upstream::start();
    let port = free_port();
    let routes = format!(
        "{}\n{}",
        route("/", root.port, "auth = \"none\""),
        route("/api", api.port, "")
    );
    let _gate = Gate::start(&gate_config(port, "", "", &routes));
    let reply = get_raw(port, "/apix/secret", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.echoed_path(), "/apix/secret");
    assert_eq!(root.requests(), 1);
    get_raw(port, "/api;x/secret", &[]).await.assert_error(
        401,
        "Credentials required",
        "/api;x/secret",
    );
    assert_eq!(api.requests(), 0);
    assert_eq!(root.requests(), 1, "/api;x/… went to the / route");
}

/// Refused: "fixing" an encoded `/` inside a segment. `%2F` stays encoded and reaches the
/// upstream byte for byte (the stock Rucio client encodes `/` inside DID names).
#[tokio::test(flavor = "multi_thread")]
async fn encoded_slash_inside_a_segment_is_forwarded_as_sent() {
    let api = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&gate_config(port, "", "", &route("/api", api.port, "")));
    for target in [
        "/api/dids/scope/name%2Fwith%2Fslashes",
        "/api/dids/scope/name%2fwith%2fslashes",
        "/api/dids/scope/name%2Fwith%2Fslashes/meta?long=1&x=a%2Fb",
    ] {
        let reply = get_raw(port, target, &[("X-Auth-Token", TOKEN)]).await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        assert_eq!(api.last().await.path, target);
    }
}

/// Refused: two `Host` headers (which one would the upstream believe?).
#[tokio::test(flavor = "multi_thread")]
async fn duplicate_host_is_400() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&gate_config(port, "", "", &route("/", up.port, "")));
    let request = format!(
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nX-Auth-Token: {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    );
    send_raw(port, request.as_bytes())
        .await
        .assert_error(400, "Bad request", "two Host headers");
    assert_eq!(up.requests(), 0);
    // One Host is fine.
    let request = format!(
        "GET /x HTTP/1.1\r\nHost: a.example\r\nX-Auth-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(send_raw(port, request.as_bytes()).await.status, 200);
}

/// Refused: a malformed chunked body is the client's fault (400), not the upstream's (502).
#[tokio::test(flavor = "multi_thread")]
async fn malformed_chunked_body_is_400_not_502() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&gate_config(port, "", "", &route("/", up.port, "")));
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: h\r\nX-Auth-Token: {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    send_raw(port, request.as_bytes())
        .await
        .assert_error(400, "Bad request", "chunk size zz");
}

// ---------------------------------------------------------------------------------------------
// Paths against nginx, an upstream that normalises paths itself
// ---------------------------------------------------------------------------------------------

/// An nginx answering `api:$uri` under `/api/` and `public:$uri` under `/public/`, in the
/// foreground, its files in a temporary directory.
struct Nginx;

impl Nginx {
    /// `None` when nginx is not installed.
    fn start() -> Option<ChildServer> {
        start_nginx(|port| {
            format!(
                r#"server {{
        listen 127.0.0.1:{port};
        location /api/ {{ return 200 "api:$uri\n"; }}
        location /public/ {{ return 200 "public:$uri\n"; }}
    }}"#
            )
        })
    }
}

/// Refused: reaching nginx's `/api/` without a credential by a path that the gate routes to
/// `/public` but nginx resolves to `/api/…` (`..`, `%2e%2e`, `..;x`, encoded separators,
/// backslashes). The answer is a 400, a 401, or a `public:` body — never `api:`.
#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_never_reach_nginx_api_without_a_credential() {
    let Some(nginx) = Nginx::start() else {
        missing_tool("nginx", "nginx-light");
        return;
    };
    let port = free_port();
    let _gate = Gate::start(&public_and_api(port, nginx.port, nginx.port));

    // The wiring works: /public is open, /api needs a credential.
    let reply = get_raw(port, "/public/hello", &[]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "public:/public/hello\n")
    );
    let reply = get_raw(port, "/api/secret", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "api:/api/secret\n")
    );
    let reply = get_raw(port, "/public/../api/secret", &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "api:/api/secret\n")
    );

    // (path, the status SPEC §9 gives it without a credential)
    let tricks = [
        ("/api/secret", 401),
        ("/public/../api/secret", 401),
        ("/public/%2e%2e/api/secret", 401),
        ("/public/%2E%2E/api/secret", 401),
        ("/public/.%2e/api/secret", 401),
        ("/public/..;x/api/secret", 401),
        ("/public//..//api/secret", 401),
        ("//public/../api/secret", 401),
        ("/public/..%2fapi/secret", 400),
        ("/public/..%2Fapi/secret", 400),
        ("/public/%2f../api/secret", 400),
        ("/public/%2e%2e%2fapi/secret", 400),
        ("/public/..%5capi/secret", 400),
        ("/public/..%3Bx/../api/secret", 400),
        ("/public/..\\api/secret", 400),
        ("/public\\..\\api\\secret", 400),
        ("/public/%00/../api/secret", 400),
        ("/public/../../api/secret", 400),
        ("/public/%252e%252e/api/secret", 401),
        ("/public/api/../secret", 200),
    ];
    for (trick, status) in tricks {
        let reply = get_raw(port, trick, &[]).await;
        let body = reply.text();
        assert!(
            !body.starts_with("api:"),
            "{trick}: nginx served /api without a credential: {body:?}"
        );
        assert_eq!(reply.status, status, "{trick}: {body:?}");
        if status == 200 {
            assert!(body.starts_with("public:/public/"), "{trick}: {body:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

/// Headers a client may try to smuggle: every route's identity and upstream-credential
/// headers, underscore and dotted spellings, the client-address headers, and the headers with
/// which frameworks let a request name another path.
const SPOOFED: [(&str, &str); 16] = [
    ("X-Auth-User", "mallory"),
    ("X.Auth.User", "mallory"),
    ("X-Original-URL", "/req/mallory"),
    ("X-Rewrite-URL", "/req/mallory"),
    ("X-Original-URI", "/req/mallory"),
    ("X-Opt-User", "mallory"),
    ("X-None-Dn", "/CN=mallory"),
    ("X-Upstream-Credential", "Token mallory"),
    ("X-Opt-Credential", "mallory"),
    ("X_Auth_User", "mallory"),
    ("X-Auth_User", "mallory"),
    ("X_Opt_User", "mallory"),
    ("X_Custom", "mallory"),
    ("Forwarded", "for=6.6.6.6;host=evil.example"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-Benign", "kept"),
];

/// Credential headers of every configured source (with junk values).
const CREDENTIAL_HEADERS: [(&str, &str); 5] = [
    ("Authorization", "Bearer mallory"),
    ("X-Auth-Token", "mallory"),
    ("auth-token", "mallory"),
    ("X-Rucio-Auth-Token", "mallory"),
    ("X-Api-Key", "mallory"),
];

/// Three routes (required, optional, none), each with its own identity and upstream
/// credential headers, all to `up`.
fn three_routes(port: u16, up: u16, server_extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{server_extra}

[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio", "header:X-Api-Key"]

[store]
backend = "memory"

{validators}
[[route]]
path_prefix = "/req"
upstream = "http://127.0.0.1:{up}"
auth = "required"
[route.upstream_auth]
header = "X-Upstream-Credential"
value = "Token {{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"

[[route]]
path_prefix = "/opt"
upstream = "http://127.0.0.1:{up}"
auth = "optional"
[route.upstream_auth]
header = "X-Opt-Credential"
value = "{{token}}"
[route.identity_headers]
"X-Opt-User" = "{{subject}}"

[[route]]
path_prefix = "/none"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[route.identity_headers]
"X-None-Dn" = "{{dn}}"
"#,
        validators = validators()
    )
}

/// Asserts no client-supplied credential, identity, underscore or address header reached the
/// upstream, while an ordinary header did and `X-Forwarded-For` was appended to.
fn assert_boundary_held(seen: &Recorded, except: &[&str], case: &str) {
    for (name, _) in SPOOFED.iter().chain(CREDENTIAL_HEADERS.iter()) {
        let lower = name.to_ascii_lowercase();
        if except.contains(&lower.as_str())
            || matches!(lower.as_str(), "forwarded" | "x-real-ip" | "x-benign")
        {
            continue;
        }
        assert_eq!(
            seen.header(name),
            None,
            "{case}: the client's {name} reached the upstream"
        );
    }
    for (name, value) in &seen.headers {
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{case}: header {name} with '_' or other punctuation reached the upstream"
        );
        assert!(
            !value.contains("mallory") && !value.contains("6.6.6.6"),
            "{case}: spoofed value reached the upstream in {name}: {value}"
        );
    }
    assert_eq!(seen.header("x-benign").as_deref(), Some("kept"), "{case}");
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("10.9.9.9, 127.0.0.1"),
        "{case}"
    );
}

/// A real WSGI upstream (Python's `wsgiref`), which folds `-` and `_` in header names into one
/// CGI variable: `X_Auth_User` and `X-Auth-User` both become `HTTP_X_AUTH_USER`. It answers
/// with that variable.
struct Wsgi;

impl Wsgi {
    /// `None` when python3 is not installed.
    fn start() -> Option<ChildServer> {
        const APP: &str = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
class Quiet(WSGIRequestHandler):
    def log_message(self, *args): pass
def app(environ, start_response):
    body = json.dumps({"user": environ.get("HTTP_X_AUTH_USER")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
make_server("127.0.0.1", int(sys.argv[1]), app, handler_class=Quiet).serve_forever()
"#;
        python_app("the WSGI server", APP)
    }
}

/// Refused: `X_Auth_User: admin`, which a WSGI/PHP/Rails upstream reads as `X-Auth-User`
/// (CVE-2025-64484 class), on an open route and beside the gate's own `X-Auth-User`.
#[tokio::test(flavor = "multi_thread")]
async fn a_wsgi_upstream_never_sees_an_underscore_identity() {
    let Some(wsgi) = Wsgi::start() else {
        missing_tool("python3", "python3");
        return;
    };
    let port = free_port();
    let _gate = Gate::start(&public_and_api(port, wsgi.port, wsgi.port));
    let user_seen = |resp: &Resp| resp.json()["user"].clone();

    let resp = get(&gate_url(port, "/public/x"), &[("X_Auth_User", "admin")]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(user_seen(&resp), Value::Null, "open route");

    let resp = get(
        &gate_url(port, "/api/x"),
        &[("X-Auth-Token", TOKEN), ("X_Auth_User", "admin")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(user_seen(&resp), "alice", "only the gate's identity");
}

/// Refused: sending an identity or credential header through a route that does not set it
/// (`auth = "none"`, `auth = "optional"` without a credential), a `_` spelling that frameworks
/// read as `-`, and spoofed `Forwarded` / `X-Real-IP`.
#[tokio::test(flavor = "multi_thread")]
async fn no_client_identity_or_credential_header_reaches_any_route() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&three_routes(port, up.port, ""));
    let xff = ("X-Forwarded-For", "10.9.9.9");

    // auth = "none": even the credential headers are removed.
    let mut headers: Vec<(&str, &str)> = SPOOFED.to_vec();
    headers.extend(CREDENTIAL_HEADERS);
    headers.push(xff);
    let resp = get(&gate_url(port, "/none/x"), &headers).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_boundary_held(&up.last().await, &[], "auth = none");

    // auth = "optional", anonymous.
    let mut headers: Vec<(&str, &str)> = SPOOFED.to_vec();
    headers.push(xff);
    let resp = get(&gate_url(port, "/opt/x"), &headers).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_boundary_held(&up.last().await, &[], "auth = optional, anonymous");

    // auth = "optional" with a credential: only its own headers, set by the gate.
    headers.push(("X-Auth-Token", TOKEN));
    let resp = get(&gate_url(port, "/opt/x"), &headers).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    let seen = up.last().await;
    assert_boundary_held(
        &seen,
        &["x-opt-user", "x-opt-credential"],
        "auth = optional",
    );
    assert_eq!(seen.header("x-opt-user").as_deref(), Some("alice"));
    assert_eq!(seen.header("x-opt-credential").as_deref(), Some(TOKEN));

    // auth = "required".
    let resp = get(&gate_url(port, "/req/x"), &headers).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    let seen = up.last().await;
    assert_boundary_held(
        &seen,
        &["x-auth-user", "x-upstream-credential"],
        "auth = required",
    );
    assert_eq!(seen.header("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        seen.header("x-upstream-credential"),
        Some(format!("Token {TOKEN}"))
    );
}

fn gate_url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

/// The opt-in: with `allow_underscores_in_headers = true` an ordinary `_` header passes (so
/// the default's removal is the boundary, not an accident of the client library).
#[tokio::test(flavor = "multi_thread")]
async fn underscore_headers_pass_only_when_allowed() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&three_routes(
        port,
        up.port,
        "allow_underscores_in_headers = true",
    ));
    let resp = get(
        &gate_url(port, "/none/x"),
        &[("X_Custom", "legacy"), ("X-Auth-User", "mallory")],
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = up.last().await;
    assert_eq!(seen.header("x_custom").as_deref(), Some("legacy"));
    assert_eq!(seen.header("x-auth-user"), None);
}

/// Refused: hiding a query or cookie credential's name behind percent-encoding, so that the
/// gate does not see it (or does not strip it) while the upstream decodes it.
#[tokio::test(flavor = "multi_thread")]
async fn encoded_query_and_cookie_credential_names_are_recognised_and_removed() {
    let up = Upstream::start();
    let port = free_port();
    let tables = "[credentials]\nsources = [\"query:access_token\", \"cookie:session\"]\n";
    let routes = format!(
        "{}\n{}",
        route("/q", up.port, ""),
        route("/free", up.port, "auth = \"none\"")
    );
    let _gate = Gate::start(&gate_config(port, "", tables, &routes));

    for target in [
        format!("/q/items?access%5Ftoken={TOKEN}&x=1"),
        format!("/q/items?x=1&%61ccess_token={TOKEN}"),
        format!("/q/items?access%5ftoken={TOKEN}&x=1"),
    ] {
        let resp = get(&gate_url(port, &target), &[]).await;
        assert_eq!(resp.status, 200, "{target}: {:?}", resp.body);
        assert_eq!(
            resp.echoed("x-upstream-credential"),
            Some(format!("Token {TOKEN}")),
            "{target}"
        );
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
        assert_eq!(resp.echoed_path(), "/q/items?x=1", "{target}");
    }

    let cookie = format!("theme=dark; sessi%6Fn={TOKEN}");
    let resp = get(&gate_url(port, "/q/c"), &[("Cookie", &cookie)]).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    let forwarded = resp.echoed("cookie").unwrap_or_default();
    assert!(!forwarded.contains(TOKEN), "cookie forwarded: {forwarded}");

    // On a route without authentication the encoded credential is removed all the same.
    let resp = get(
        &gate_url(port, "/free/x?access%5Ftoken=junk-value&y=2"),
        &[],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed_path(), "/free/x?y=2");
}

/// Refused: turning a stale browser session into a 400 or, worse, into the session's identity.
/// A header or query credential outranks a cookie one; two headers still conflict.
#[tokio::test(flavor = "multi_thread")]
async fn header_and_query_credentials_outrank_a_cookie() {
    let up = Upstream::start();
    let port = free_port();
    let tables =
        "[credentials]\nsources = [\"x-auth-token\", \"query:api_key\", \"cookie:session\"]\n";
    let _gate = Gate::start(&gate_config(port, "", tables, &route("/", up.port, "")));
    let bob_cookie = format!("session={OTHER}");

    let resp = get(
        &gate_url(port, "/h"),
        &[("X-Auth-Token", TOKEN), ("Cookie", &bob_cookie)],
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        resp.echoed("x-upstream-credential"),
        Some(format!("Token {TOKEN}"))
    );
    assert!(!resp.echoed("cookie").unwrap_or_default().contains(OTHER));

    let resp = get(
        &gate_url(port, &format!("/q?api_key={TOKEN}")),
        &[("Cookie", &bob_cookie)],
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));

    // A stale (invalid) session cookie does not spoil a valid header credential.
    let resp = get(
        &gate_url(port, "/h"),
        &[("X-Auth-Token", TOKEN), ("Cookie", "session=expired-junk")],
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));

    // Header against query is not ranked: still a conflict.
    get(
        &gate_url(port, &format!("/q?api_key={OTHER}")),
        &[("X-Auth-Token", TOKEN)],
    )
    .await
    .assert_error(400, "Conflicting credentials");
}

/// The opt-out of stripping: a `[credentials] keep` source (the legacy app's own session
/// cookie) reaches the upstream unchanged, next to the upstream credential form.
#[tokio::test(flavor = "multi_thread")]
async fn kept_session_cookie_reaches_the_upstream_unchanged() {
    let up = Upstream::start();
    let port = free_port();
    let tables = "[credentials]\nsources = [\"cookie:session\", \"x-auth-token\"]\nkeep = [\"cookie:session\"]\n";
    let _gate = Gate::start(&gate_config(port, "", tables, &route("/", up.port, "")));
    let cookie = format!("theme=dark; session={TOKEN}");
    let resp = get(&gate_url(port, "/app"), &[("Cookie", &cookie)]).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        resp.echoed("x-upstream-credential"),
        Some(format!("Token {TOKEN}"))
    );
    let forwarded = resp.echoed("cookie").expect("cookies forwarded");
    let mut cookies: Vec<&str> = forwarded
        .split([';', '|'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    cookies.sort();
    assert_eq!(
        cookies,
        ["session=".to_string() + TOKEN, "theme=dark".into()]
    );
    // The header source is not kept.
    let resp = get(&gate_url(port, "/app"), &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(resp.echoed("x-auth-token"), None);
}

// ---------------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------------

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A WebSocket upgrade request to `/chat` with the login credential.
fn websocket_request() -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: gate.test\r\nX-Auth-Token: {TOKEN}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\n\r\n"
    )
}

/// How the careless upstream answers an upgrade request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// 101 without `Sec-WebSocket-Accept`.
    NoAccept,
    /// 101 with an accept value for some other key.
    WrongAccept,
    /// 101 naming another protocol (with the right accept).
    OtherProtocol,
    /// A correct WebSocket 101; then echoes what it receives.
    Correct,
}

/// What the careless upstream saw.
#[derive(Default)]
struct Seen {
    heads: Vec<String>,
    /// Every byte received after a request head.
    after: Vec<u8>,
    /// Connections that ended (EOF or error).
    closed: usize,
}

/// A raw TCP "upstream" that answers every request with a 101 and then takes whatever comes.
struct Careless {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Careless {
    async fn start(answer: Answer) -> Careless {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local_addr").port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(careless_connection(stream, answer, Arc::clone(&shared)));
            }
        });
        Careless { port, seen }
    }

    async fn after(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().await.after).into_owned()
    }
}

async fn careless_connection(mut stream: TcpStream, answer: Answer, seen: Arc<Mutex<Seen>>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&data, b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                seen.lock().await.closed += 1;
                return;
            }
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let accept = websocket_accept(key.as_bytes());
    let response = match answer {
        Answer::NoAccept => {
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                .to_string()
        }
        Answer::WrongAccept => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            websocket_accept(b"c29tZSBvdGhlciBrZXkgISE=")
        ),
        Answer::OtherProtocol => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: not-websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
        Answer::Correct => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
    };
    {
        let mut s = seen.lock().await;
        s.heads.push(head);
        s.after.extend_from_slice(&data[head_end..]);
    }
    if stream.write_all(response.as_bytes()).await.is_err() {
        seen.lock().await.closed += 1;
        return;
    }
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                seen.lock().await.closed += 1;
                return;
            }
            Ok(n) => {
                seen.lock().await.after.extend_from_slice(&buf[..n]);
                if matches!(answer, Answer::Correct) && stream.write_all(&buf[..n]).await.is_err() {
                    seen.lock().await.closed += 1;
                    return;
                }
            }
        }
    }
}

/// Refused: request smuggling through a 101 the upstream sends without a valid WebSocket
/// handshake (no accept, a wrong one, another protocol). The client gets 502, both connections
/// close, and the request pipelined behind the upgrade never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn careless_101_does_not_open_a_tunnel() {
    for answer in [Answer::NoAccept, Answer::WrongAccept, Answer::OtherProtocol] {
        let careless = Careless::start(answer).await;
        let port = free_port();
        let _gate = Gate::start(&gate_config(port, "", "", &route("/", careless.port, "")));

        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let smuggled = "GET /api/secret HTTP/1.1\r\nHost: x\r\nX-Auth-User: admin\r\n\r\n";
        let both = format!("{}{smuggled}", websocket_request());
        stream.write_all(both.as_bytes()).await.unwrap();
        let (out, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&out);
        assert_eq!(raw_status(&out), Some(502), "{answer:?}: {text}");
        assert!(
            closed,
            "{answer:?}: the client connection stayed open: {text}"
        );

        // Give anything that leaked time to arrive, then look.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = careless.seen.lock().await;
        assert_eq!(
            seen.heads.len(),
            1,
            "{answer:?}: one upgrade request upstream"
        );
        assert!(
            seen.heads[0]
                .to_ascii_lowercase()
                .contains("upgrade: websocket"),
            "{answer:?}: the upgrade request was not forwarded: {}",
            seen.heads[0]
        );
        let after = String::from_utf8_lossy(&seen.after);
        assert!(
            !after.contains("X-Auth-User") && !after.contains("/api/secret"),
            "{answer:?}: smuggled bytes reached the upstream: {after:?}"
        );
        drop(seen);
        let deadline = Instant::now() + Duration::from_secs(3);
        while careless.seen.lock().await.closed == 0 {
            assert!(
                Instant::now() < deadline,
                "{answer:?}: the upstream connection was left open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The boundary does not break WebSocket: a correct 101 still tunnels bytes both ways.
#[tokio::test(flavor = "multi_thread")]
async fn correct_websocket_101_still_tunnels() {
    assert_eq!(
        websocket_accept(WS_KEY.as_bytes()),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "RFC 6455 §1.3 example"
    );
    let careless = Careless::start(Answer::Correct).await;
    let port = free_port();
    let _gate = Gate::start(&gate_config(port, "", "", &route("/", careless.port, "")));
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(websocket_request().as_bytes())
        .await
        .unwrap();
    let reply = read_reply(&mut stream).await;
    assert_eq!(reply.status, 101, "{reply:?}");
    assert_eq!(
        reply.header("sec-websocket-accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    stream.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
        .await
        .expect("echo within 5 s")
        .expect("read echo");
    assert_eq!(&echoed, b"ping through the tunnel");
    assert_eq!(careless.after().await, "ping through the tunnel");
}

/// Refused: `h2c` upgrades (never passed), and any protocol not in the route's `upgrades`.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_routes_upgrade_protocols_reach_the_upstream() {
    let up = Upstream::start();
    let port = free_port();
    let routes = format!(
        "{}\n{}",
        route("/", up.port, ""),
        route("/plain", up.port, "upgrades = []")
    );
    let _gate = Gate::start(&gate_config(port, "", "", &routes));

    let h2c = format!(
        "GET /h2c HTTP/1.1\r\nHost: gate.test\r\nX-Auth-Token: {TOKEN}\r\n\
         Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let reply = send_raw(port, h2c.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.last().await;
    assert_eq!(seen.header("upgrade"), None, "h2c reached the upstream");
    assert_eq!(seen.header("http2-settings"), None);

    let ws = websocket_request().replace("GET /chat", "GET /plain/chat");
    let reply = send_raw(port, ws.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.last().await;
    assert_eq!(seen.path, "/plain/chat");
    assert_eq!(
        seen.header("upgrade"),
        None,
        "a websocket upgrade passed a route with upgrades = []"
    );
    let connection = seen.header("connection").unwrap_or_default();
    assert!(
        !connection.to_ascii_lowercase().contains("upgrade"),
        "connection: {connection}"
    );
}

// ---------------------------------------------------------------------------------------------
// Minting and lifetimes
// ---------------------------------------------------------------------------------------------

/// `[endpoints] insight = true`, an admin listener, and `[tokens]` `tokens`, one route to `up`.
fn mint_config(port: u16, admin: u16, up: u16, tokens: &str, endpoints: &str) -> String {
    gate_config(
        port,
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n\
             [endpoints]\ninsight = true\n{endpoints}\n\n[tokens]\n{tokens}\n"
        ),
        &route("/", up, ""),
    )
}

/// `POST /_tokengate/tokens` with a JSON body, authenticated by header `(name, value)`.
async fn mint(port: u16, header: (&str, &str), body: &str) -> Resp {
    post(
        &gate_url(port, "/_tokengate/tokens"),
        &[header, ("Content-Type", "application/json")],
        body.to_string(),
    )
    .await
}

/// Mints with the login credential; (secret, id).
async fn mint_ok(port: u16, body: &str) -> (String, String) {
    let resp = mint(port, ("X-Auth-Token", TOKEN), body).await;
    assert_eq!(
        resp.status,
        201,
        "POST /_tokengate/tokens {body}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    let json = resp.json();
    (
        json["token"].as_str().expect("token").to_string(),
        json["id"].as_str().expect("id").to_string(),
    )
}

/// A request to the admin listener with the admin token.
async fn admin(admin_port: u16, method: &str, path: &str, body: &str) -> Resp {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    send(build(
        method,
        &format!("http://127.0.0.1:{admin_port}{path}"),
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        full(body.to_string()),
    ))
    .await
}

/// Asserts `expires` (RFC 3339) is about `days` from now.
fn assert_expires_in(json: &Value, days: u64, case: &str) {
    let expires = json["expires"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no expiry in {json}"));
    let at = humantime::parse_rfc3339_weak(expires).expect("RFC 3339 expiry");
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    let want = days * 86_400;
    assert!(
        left.abs_diff(want) < 600,
        "{case}: expires {expires}, {left} s from now, want {days} d"
    );
}

/// Whether an error message names the cap.
fn names_cap(message: &str, cap: &str) -> bool {
    message.contains("max_ttl") || message.contains(cap)
}

/// Asserts a 400 whose message names the cap.
fn assert_over_cap(resp: &Resp, cap: &str, case: &str) {
    assert_eq!(
        resp.status,
        400,
        "{case}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    let message = resp.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        names_cap(&message, cap),
        "{case}: the error does not name the cap {cap}: {message:?}"
    );
}

/// Refused: turning a leaked API token into a new one that outlives its revocation. A token
/// tokengate issued cannot mint, in any dialect, on either surface, whatever the body says.
#[tokio::test(flavor = "multi_thread")]
async fn issued_api_tokens_cannot_mint() {
    let up = Upstream::start();
    let port = free_port();
    let _gate = Gate::start(&mint_config(port, free_port(), up.port, "", ""));
    let (api_token, _) = mint_ok(port, r#"{"name":"ci"}"#).await;
    // It is a working credential (so the 403 below is about minting, not validity).
    let resp = get(&gate_url(port, "/data"), &[("X-Auth-Token", &api_token)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));

    let insight = get(
        &gate_url(port, "/api/createApiToken"),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(
        insight.status, 200,
        "a login credential mints on Insight.io"
    );
    let insight_token = String::from_utf8_lossy(&insight.body).trim().to_string();
    assert!(insight_token.starts_with("tg_"), "{insight_token}");

    for issued in [&api_token, &insight_token] {
        for (header, prefix) in DIALECTS {
            let value = format!("{prefix}{issued}");
            for body in [r#"{"name":"x"}"#, "{}", r#"{"ttl":"9999d"}"#, "not json"] {
                mint(port, (header, &value), body)
                    .await
                    .assert_error(403, "Tokens cannot mint tokens");
            }
            get(&gate_url(port, "/api/createApiToken"), &[(header, &value)])
                .await
                .assert_error(403, "Tokens cannot mint tokens");
        }
    }
    // Nothing was minted by the refused calls.
    let list = get(
        &gate_url(port, "/_tokengate/tokens"),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(list.status, 200);
    assert_eq!(
        list.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        list.json()
    );
}

/// Every issued token's lifetime is capped by `max_ttl`: a larger ttl (or "0", for ever) is a
/// 400 naming the cap; no ttl gives min(default_ttl, max_ttl); `max_ttl = "0"` lifts the cap.
#[tokio::test(flavor = "multi_thread")]
async fn token_lifetimes_are_capped_on_the_main_listener() {
    let up = Upstream::start();

    // The defaults: 90 d default, 365 d cap.
    let port = free_port();
    let _defaults = Gate::start(&mint_config(port, free_port(), up.port, "", ""));
    let resp = mint(port, ("X-Auth-Token", TOKEN), "{}").await;
    assert_expires_in(&resp.json(), 90, "default ttl");
    for ttl in ["0", "366d", "400d"] {
        let body = format!(r#"{{"ttl":"{ttl}"}}"#);
        let resp = mint(port, ("X-Auth-Token", TOKEN), &body).await;
        assert_over_cap(&resp, "365d", &format!("ttl {ttl} with the default cap"));
    }
    let resp = mint(port, ("X-Auth-Token", TOKEN), r#"{"ttl":"365d"}"#).await;
    assert_eq!(resp.status, 201);
    assert_expires_in(&resp.json(), 365, "ttl at the cap");

    // default_ttl above max_ttl: the cap wins.
    let port = free_port();
    let _capped = Gate::start(&mint_config(
        port,
        free_port(),
        up.port,
        "default_ttl = \"90d\"\nmax_ttl = \"30d\"",
        "",
    ));
    let resp = mint(port, ("X-Auth-Token", TOKEN), r#"{"name":"n"}"#).await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    assert_expires_in(&resp.json(), 30, "no ttl under a 30d cap");
    for ttl in ["31d", "0"] {
        let body = format!(r#"{{"ttl":"{ttl}"}}"#);
        let resp = mint(port, ("X-Auth-Token", TOKEN), &body).await;
        assert_over_cap(&resp, "30d", &format!("ttl {ttl} over a 30d cap"));
    }
    let resp = mint(port, ("X-Auth-Token", TOKEN), r#"{"ttl":"7d"}"#).await;
    assert_eq!(resp.status, 201);
    assert_expires_in(&resp.json(), 7, "ttl under the cap");

    // max_ttl = "0": no cap, and ttl "0" means until revoked.
    let port = free_port();
    let _uncapped = Gate::start(&mint_config(
        port,
        free_port(),
        up.port,
        "max_ttl = \"0\"",
        "",
    ));
    let resp = mint(port, ("X-Auth-Token", TOKEN), r#"{"ttl":"0"}"#).await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["expires"], Value::Null);
    let resp = mint(port, ("X-Auth-Token", TOKEN), r#"{"ttl":"5000d"}"#).await;
    assert_eq!(resp.status, 201);
}

/// The cap holds on the admin API too.
#[tokio::test(flavor = "multi_thread")]
async fn token_lifetimes_are_capped_on_the_admin_api() {
    let up = Upstream::start();
    let (port, admin_port) = (free_port(), free_port());
    let _gate = Gate::start(&mint_config(
        port,
        admin_port,
        up.port,
        "default_ttl = \"90d\"\nmax_ttl = \"30d\"",
        "",
    ));
    wait_port(admin_port);
    for ttl in ["31d", "0"] {
        let body = format!(r#"{{"user":"bob","ttl":"{ttl}"}}"#);
        let resp = admin(admin_port, "POST", "/tokens", &body).await;
        assert_over_cap(&resp, "30d", &format!("admin ttl {ttl}"));
    }
    let resp = admin(admin_port, "POST", "/tokens", r#"{"user":"bob"}"#).await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    assert_expires_in(&resp.json(), 30, "admin, no ttl");
}

/// Runs the binary with extra environment, killed after `limit`: (exit code, stdout, stderr).
fn run_bin(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tokengate");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("tokengate output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config for the CLI: a sqlite store in `dir`, `tokens` as the `[tokens]` table.
fn cli_config(dir: &Path, tokens: &str) -> PathBuf {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\n\n[store]\nbackend = \"sqlite\"\npath = \"{}\"\n\n\
         [tokens]\n{tokens}\n\n{}\n{}",
        free_port(),
        dir.join("tokens.db").display(),
        validators(),
        route("/", free_port(), "")
    );
    write_file(dir, "tokengate.toml", &toml)
}

/// The cap holds on the CLI: `token create --ttl` over it fails, naming it, and prints no
/// token.
#[test]
fn token_lifetimes_are_capped_on_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path(), "");
    let config = config.to_str().unwrap();
    for ttl in ["400d", "0"] {
        let (code, stdout, stderr) = run_bin(
            &[
                "token", "create", "--config", config, "--user", "u", "--ttl", ttl,
            ],
            &[],
            Duration::from_secs(30),
        );
        assert!(
            code.is_some_and(|c| c != 0),
            "--ttl {ttl}: exit {code:?}; {stdout} {stderr}"
        );
        assert!(names_cap(&stderr, "365d"), "--ttl {ttl}: {stderr:?}");
        assert!(!stdout.contains("tg_"), "--ttl {ttl}: a token was printed");
    }
    let (code, stdout, stderr) = run_bin(
        &[
            "token", "create", "--config", config, "--user", "u", "--ttl", "30d",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.trim().starts_with("tg_"), "{stdout}");
}

/// `[endpoints] self_service = false` turns minting on the main listener off (404) while
/// listing and revoking one's own tokens stay.
#[tokio::test(flavor = "multi_thread")]
async fn self_service_off_leaves_only_list_and_revoke() {
    let up = Upstream::start();
    let (port, admin_port) = (free_port(), free_port());
    let _gate = Gate::start(&mint_config(
        port,
        admin_port,
        up.port,
        "",
        "self_service = false",
    ));
    wait_port(admin_port);
    let resp = mint(port, ("X-Auth-Token", TOKEN), "{}").await;
    assert_eq!(resp.status, 404, "{}", String::from_utf8_lossy(&resp.body));
    let resp = get(
        &gate_url(port, "/api/createApiToken"),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(resp.status, 404, "{}", String::from_utf8_lossy(&resp.body));

    let created = admin(admin_port, "POST", "/tokens", r#"{"user":"alice"}"#).await;
    assert_eq!(created.status, 201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let secret = created.json()["token"].as_str().unwrap().to_string();

    let list = get(
        &gate_url(port, "/_tokengate/tokens"),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(list.status, 200);
    assert!(list.json().to_string().contains(&id), "{}", list.json());
    let resp = delete(
        &gate_url(port, &format!("/_tokengate/tokens/{id}")),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(resp.status, 204);
    get(&gate_url(port, "/data"), &[("X-Auth-Token", &secret)])
        .await
        .assert_error(401, "Invalid credentials");
}

/// Refused: a cross-site form minting with a browser's session cookie. A cookie-authenticated
/// `POST /_tokengate/tokens` needs `Content-Type: application/json` (415) and, when it sends
/// `Origin`, the gate's own origin (403). Header-authenticated calls are not affected.
#[tokio::test(flavor = "multi_thread")]
async fn cookie_authenticated_minting_needs_json_and_same_origin() {
    let up = Upstream::start();
    let port = free_port();
    let tables = "[credentials]\nsources = [\"cookie:session\", \"x-auth-token\"]\n";
    let _gate = Gate::start(&gate_config(port, "", tables, &route("/", up.port, "")));
    let url = gate_url(port, "/_tokengate/tokens");
    let cookie = format!("session={TOKEN}");
    let same_origin = format!("http://127.0.0.1:{port}");
    let other_scheme = format!("https://127.0.0.1:{port}");
    let call = |headers: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(&url, &headers, "{}").await
        }
    };
    let json = ("Content-Type", "application/json".to_string());

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let mut headers = vec![("Cookie", cookie.clone())];
        if let Some(ct) = content_type {
            headers.push(("Content-Type", ct.to_string()));
        }
        call(headers).await.assert_error(415, "JSON body required");
    }
    for origin in ["http://evil.example", "null", other_scheme.as_str()] {
        let resp = call(vec![
            ("Cookie", cookie.clone()),
            json.clone(),
            ("Origin", origin.to_string()),
        ])
        .await;
        assert_eq!(resp.status, 403, "Origin {origin}");
    }

    let mut minted = 0;
    for headers in [
        vec![("Cookie", cookie.clone()), json.clone()],
        vec![
            ("Cookie", cookie.clone()),
            json.clone(),
            ("Origin", same_origin.clone()),
        ],
        vec![
            ("Cookie", cookie.clone()),
            (
                "Content-Type",
                "application/json; charset=utf-8".to_string(),
            ),
        ],
        // Header-authenticated: neither Content-Type nor Origin matter.
        vec![
            ("X-Auth-Token", TOKEN.to_string()),
            ("Origin", "http://evil.example".to_string()),
        ],
    ] {
        let case = format!("{headers:?}");
        let resp = call(headers).await;
        assert_eq!(
            resp.status,
            201,
            "{case}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        minted += 1;
    }
    let list = get(&url, &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(
        list.json().as_array().map(Vec::len),
        Some(minted),
        "a refused call minted a token: {}",
        list.json()
    );
}

// ---------------------------------------------------------------------------------------------
// x509 tokens (TLS, curl)
// ---------------------------------------------------------------------------------------------

/// `curl https://localhost:PORT{path}` trusting `dir/ca.pem`, with a client certificate
/// (`dir/alice.pem`) when `cert`, and `extra` arguments.
fn curl(dir: &Path, port: u16, path: &str, cert: bool, extra: &[&str]) -> CurlReply {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(dir.join("ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
    if cert {
        cmd.arg("--cert")
            .arg(dir.join("alice.pem"))
            .arg("--key")
            .arg(dir.join("alice-key.pem"));
    }
    cmd.args(extra)
        .arg(format!("https://localhost:{port}{path}"));
    CurlReply::run(&mut cmd)
}

/// Refused: minting with an x509-kind token (from `/auth/x509`), on either surface. The
/// certificate itself is a login credential and may mint; the exchange is audited.
#[tokio::test(flavor = "multi_thread")]
async fn x509_tokens_cannot_mint() {
    let root = ca("Boundary Root CA", None);
    let alice = user(
        Dn::of(&[
            ("C", "CH"),
            ("O", "Example"),
            ("OU", "Users"),
            ("CN", "Alice Smith"),
        ]),
        &root,
    );
    let server_cert = server(&root);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    write_file(&d, "ca.pem", &root.pem());
    write_file(&d, "server.pem", &server_cert.pem());
    write_file(&d, "server-key.pem", &server_cert.key_pem());
    write_file(&d, "alice.pem", &alice.pem());
    write_file(&d, "alice-key.pem", &alice.key_pem());
    let up = Upstream::start();
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[server.tls]
cert = "{dd}/server.pem"
key = "{dd}/server-key.pem"
client_ca = "{dd}/ca.pem"
client_auth = "optional"

[endpoints]
insight = true

[store]
backend = "memory"

[x509]
enabled = true
token_ttl = "1h"
[[x509.identity]]
dn = "/C=CH/O=Example/OU=Users/CN=Alice Smith"
accounts = ["alice"]

{validators}
{route}"#,
        dd = d.display(),
        validators = validators(),
        route = route("/", up.port, ""),
    );
    let gate = Gate::start_in(tempfile::tempdir().unwrap(), &toml, &[]);

    let exchanged = curl(&d, port, "/auth/x509", true, &[]);
    assert_eq!(exchanged.status, 200, "{exchanged:?}");
    let token = exchanged
        .header("x-rucio-auth-token")
        .expect("X-Rucio-Auth-Token")
        .to_string();
    // A working credential.
    let rucio = format!("X-Rucio-Auth-Token: {token}");
    let reply = curl(&d, port, "/data", false, &["-H", &rucio]);
    assert_eq!(reply.status, 200, "{reply:?}");

    for (header, prefix) in DIALECTS {
        let h = format!("{header}: {prefix}{token}");
        let reply = curl(
            &d,
            port,
            "/_tokengate/tokens",
            false,
            &[
                "-X",
                "POST",
                "-H",
                &h,
                "-H",
                "Content-Type: application/json",
                "--data",
                "{}",
            ],
        );
        assert_eq!(reply.status, 403, "{header}: {reply:?}");
        assert!(
            reply.body.contains("Tokens cannot mint tokens"),
            "{reply:?}"
        );
        let reply = curl(&d, port, "/api/createApiToken", false, &["-H", &h]);
        assert_eq!(reply.status, 403, "{header}: {reply:?}");
        assert!(
            reply.body.contains("Tokens cannot mint tokens"),
            "{reply:?}"
        );
    }

    // The verified certificate is a login credential.
    let reply = curl(&d, port, "/api/createApiToken", true, &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.trim().starts_with("tg_"), "{reply:?}");

    let line = wait_audit(&gate, "token_exchanged", None).await;
    assert_eq!(line["kind"], "x509", "{line}");
    assert_eq!(line["account"], "alice", "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert!(
        line["token_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
    assert!(
        !gate.log().contains(&token),
        "the exchanged token reached the log"
    );
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

/// JSON lines of `text` with `"event": event` (and `"token_id": id` when given).
fn audit_lines(text: &str, event: &str, id: Option<&str>) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v["event"] == event && id.is_none_or(|id| v["token_id"] == id))
        .collect()
}

/// Waits (3 s at most) for exactly one audit line of `event` (for `id`) in the gate's log.
async fn wait_audit(gate: &Gate, event: &str, id: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let lines = audit_lines(&gate.log(), event, id);
        if !lines.is_empty() {
            assert_eq!(lines.len(), 1, "{event} {id:?}: {lines:?}");
            return lines[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {event} audit line for {id:?}; log:\n{}",
            gate.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts an audit line's who and what.
fn assert_audit(line: &Value, kind: &str, subject: &str, actor: &str, client: bool) {
    assert_eq!(line["kind"], kind, "{line}");
    assert_eq!(line["subject"], subject, "{line}");
    assert_eq!(line["actor"], actor, "{line}");
    if client {
        assert_eq!(line["client"], "127.0.0.1", "{line}");
    }
}

/// Refused: creating or revoking a token without a trace, on any surface (main listener,
/// Insight.io, admin API, CLI); and the secret never in a log line or on the CLI's stderr.
#[tokio::test(flavor = "multi_thread")]
async fn token_lifecycle_is_audited_on_every_surface() {
    let up = Upstream::start();
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let toml = mint_config(port, admin_port, up.port, "", "").replace(
        "[store]\nbackend = \"memory\"",
        &format!("[store]\nbackend = \"sqlite\"\npath = \"{}\"", db.display()),
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    wait_port(admin_port);
    let mut secrets = Vec::new();

    // Main listener: create and revoke.
    let (secret, id) = mint_ok(port, r#"{"name":"audited"}"#).await;
    secrets.push(secret);
    let line = wait_audit(&gate, "token_created", Some(&id)).await;
    assert_audit(&line, "api", "alice", "subject:alice", true);
    assert_eq!(line["account"], "ops", "{line}");
    let resp = delete(
        &gate_url(port, &format!("/_tokengate/tokens/{id}")),
        &[("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_eq!(resp.status, 204);
    let line = wait_audit(&gate, "token_revoked", Some(&id)).await;
    assert_audit(&line, "api", "alice", "subject:alice", true);

    // Insight.io: create, then revoke by presenting it.
    let resp = get(
        &gate_url(port, "/api/createApiToken"),
        &[("X-Auth-Token", OTHER)],
    )
    .await;
    assert_eq!(resp.status, 200);
    let insight = String::from_utf8_lossy(&resp.body).trim().to_string();
    secrets.push(insight.clone());
    let listed = get(
        &gate_url(port, "/api/getApiTokens"),
        &[("X-Auth-Token", OTHER)],
    )
    .await;
    let insight_id = listed.json()[0]["apiToken"]
        .as_str()
        .expect("apiToken id")
        .to_string();
    let line = wait_audit(&gate, "token_created", Some(&insight_id)).await;
    assert_audit(&line, "api", "bob", "subject:bob", true);
    let resp = get(
        &gate_url(port, "/api/revokeApiToken"),
        &[("X-Auth-Token", &insight)],
    )
    .await;
    assert_eq!(resp.status, 200);
    wait_audit(&gate, "token_revoked", Some(&insight_id)).await;

    // Admin API: create and revoke.
    let resp = admin(admin_port, "POST", "/tokens", r#"{"user":"carol"}"#).await;
    assert_eq!(resp.status, 201);
    let admin_id = resp.json()["id"].as_str().unwrap().to_string();
    secrets.push(resp.json()["token"].as_str().unwrap().to_string());
    let line = wait_audit(&gate, "token_created", Some(&admin_id)).await;
    assert_audit(&line, "api", "carol", "admin", true);
    let resp = admin(admin_port, "DELETE", &format!("/tokens/{admin_id}"), "").await;
    assert_eq!(resp.status, 204);
    let line = wait_audit(&gate, "token_revoked", Some(&admin_id)).await;
    assert_audit(&line, "api", "carol", "admin", true);

    // CLI: the audit line on standard error, the token alone on standard output.
    let config = gate.config_path.to_str().unwrap().to_string();
    let (code, stdout, stderr) = run_bin(
        &["token", "create", "--config", &config, "--user", "dave"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let cli_secret = stdout.trim().to_string();
    assert!(cli_secret.starts_with("tg_"), "{stdout}");
    assert!(
        !stderr.contains(&cli_secret),
        "the CLI logged the secret: {stderr}"
    );
    let created = audit_lines(&stderr, "token_created", None);
    assert_eq!(created.len(), 1, "{stderr}");
    assert_audit(&created[0], "api", "dave", "cli", false);
    let cli_id = created[0]["token_id"]
        .as_str()
        .expect("token_id")
        .to_string();
    secrets.push(cli_secret);
    let (code, _, stderr) = run_bin(
        &["token", "revoke", "--config", &config, &cli_id],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let revoked = audit_lines(&stderr, "token_revoked", Some(&cli_id));
    assert_eq!(revoked.len(), 1, "{stderr}");
    assert_audit(&revoked[0], "api", "dave", "cli", false);

    let log = gate.log();
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a token secret reached the log"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config and CLI
// ---------------------------------------------------------------------------------------------

/// `tokengate check` on `toml` (written to a temporary file): (exit code, path, output).
fn check(toml: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "tokengate.toml", toml);
    let path = path.to_str().unwrap().to_string();
    let (code, stdout, stderr) =
        run_bin(&["check", "--config", &path], env, Duration::from_secs(20));
    (code, path, format!("{stdout}{stderr}"))
}

/// Refused by `check` (exit 2, `PATH:LINE:COL: message` at the offending line): `h2c` in a
/// route's `upgrades`, a `header:` source with `_` unless underscores are allowed, and a
/// `keep` entry that is not a source.
#[test]
fn check_refuses_boundary_breaking_configs() {
    let up = free_port();
    let base = |server_extra: &str, credentials: &str, route_extra: &str| {
        gate_config(
            free_port(),
            server_extra,
            &format!("[credentials]\n{credentials}\n"),
            &route("/", up, route_extra),
        )
    };
    let refused = [
        (
            base("", "sources = [\"x-auth-token\"]", "upgrades = [\"h2c\"]"),
            "upgrades",
        ),
        (
            base(
                "",
                "sources = [\"x-auth-token\"]",
                "upgrades = [\"websocket\", \"h2c\"]",
            ),
            "upgrades",
        ),
        (base("", "sources = [\"header:X_Api_Key\"]", ""), "sources"),
        (
            base(
                "",
                "sources = [\"x-auth-token\"]\nkeep = [\"cookie:session\"]",
                "",
            ),
            "keep",
        ),
    ];
    for (toml, key) in refused {
        let (code, path, output) = check(&toml, &[]);
        assert_eq!(code, Some(2), "{key}: {output}");
        let line = toml
            .lines()
            .position(|l| l.trim_start().starts_with(key))
            .expect("offending line")
            + 1;
        let prefix = format!("{path}:{line}:");
        let found = output.lines().find(|l| l.starts_with(&prefix));
        let rest = found
            .and_then(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{key}: no {prefix}COL: message in {output:?}"));
        let (col, message) = rest.split_once(": ").expect("COL: message");
        assert!(col.parse::<u32>().is_ok(), "{key}: column {col:?}");
        assert!(!message.trim().is_empty(), "{key}: empty message");
    }

    let accepted = [
        base(
            "allow_underscores_in_headers = true",
            "sources = [\"header:X_Api_Key\"]",
            "",
        ),
        base("", "sources = [\"x-auth-token\"]", "upgrades = []"),
        base(
            "",
            "sources = [\"x-auth-token\"]",
            "upgrades = [\"websocket\"]",
        ),
        base(
            "",
            "sources = [\"cookie:session\", \"x-auth-token\"]\nkeep = [\"cookie:session\"]",
            "",
        ),
    ];
    for toml in accepted {
        let (code, _, output) = check(&toml, &[]);
        assert_eq!(code, Some(0), "{output}\n{toml}");
        assert_eq!(output.trim(), "config ok");
    }
}

/// Refused: printing a `${env:…}` secret — resolved inside a longer value or not — in `check`
/// output, in a config error, or in the serve log.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_config_are_never_printed() {
    const KEY: &str = "sk-live-7f3a9c1e5d";
    let up = Upstream::start();
    let port = free_port();
    let toml = gate_config(port, "", "", &route("/", up.port, "")).replace(
        "value = \"Token {token}\"",
        "value = \"ApiKey ${env:UPSTREAM_KEY}\"",
    );
    let env = [("UPSTREAM_KEY", KEY)];
    let (code, _, output) = check(&toml, &env);
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains(KEY), "check printed the secret: {output}");

    let gate = Gate::start_with_env(&toml, &env);
    let resp = get(&gate_url(port, "/x"), &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.echoed("x-upstream-credential"),
        Some(format!("ApiKey {KEY}")),
        "the substitution inside a longer value is resolved"
    );
    get(&gate_url(port, "/x"), &[("X-Auth-Token", "wrong")])
        .await
        .assert_error(401, "Invalid credentials");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!gate.log().contains(KEY), "the serve log has the secret");

    // Values that make the config invalid: (config, env, the secret part, must be invalid)
    let base = gate_config(free_port(), "", "", &route("/", up.port, ""));
    let cases = [
        (
            base.replace(
                "[store]\nbackend = \"memory\"",
                "[store]\nbackend = \"redis\"\nurl = \"${env:REDIS_URL}\"",
            ),
            ("REDIS_URL", "http://user:hunter2-redis-pw@cache:6379"),
            "hunter2-redis-pw",
            true,
        ),
        (
            base.replace(
                "[store]",
                "[tokens]\nformat = \"jwt\"\njwt_key = \"${env:JWT_KEY}\"\n\n[store]",
            ),
            ("JWT_KEY", "-----BEGIN NONSENSE----- jwt-s3cr3t-material"),
            "jwt-s3cr3t-material",
            true,
        ),
        (
            base.replace(
                "value = \"Token {token}\"",
                "value = \"${env:UPSTREAM_KEY}\"",
            ),
            ("UPSTREAM_KEY", "abc{leaky-s3cr3t}"),
            "leaky-s3cr3t",
            false,
        ),
        (
            base.replace(
                "value = \"Token {token}\"",
                "value = \"ApiKey ${env:UPSTREAM_KEY}\"",
            ),
            ("UPSTREAM_KEY", "line\nbreak-s3cr3t"),
            "break-s3cr3t",
            false,
        ),
    ];
    for (toml, var, secret, invalid) in cases {
        let (code, _, output) = check(&toml, &[var]);
        if invalid {
            assert_eq!(code, Some(2), "{}: {output}", var.0);
        }
        assert!(
            !output.contains(secret),
            "{}: check printed the secret: {output}",
            var.0
        );
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "tokengate.toml", &toml);
        let (code, stdout, stderr) = run_bin(
            &["serve", "--config", path.to_str().unwrap()],
            &[var],
            Duration::from_secs(3),
        );
        if invalid {
            assert_eq!(code, Some(2), "{}: serve {stdout}{stderr}", var.0);
        }
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{}: serve printed the secret: {stdout}{stderr}",
            var.0
        );
    }
}

/// Refused: `tokengate hash` hashing nothing (an empty standard input is a mistake, not the
/// empty token).
#[test]
fn hash_with_empty_stdin_is_refused() {
    let out = cli(&["hash"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!out.stderr.is_empty(), "no message: {out:?}");
    let empty_sha = sha256_hex("");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&empty_sha),
        "printed the hash of the empty string"
    );
}
