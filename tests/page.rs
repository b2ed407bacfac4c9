//! The token page for browsers (SPEC §5): the real binary, signed in with a session cookie that
//! a static validator checks. Most of the contract (headers, CSRF, Origin, sign-in redirect,
//! escaping, `max_ttl`, the issued-token rule, replicas agreeing on the CSRF key) is checked
//! over plain HTTP; one test drives the page in headless Chromium through WebDriver
//! (`chromium` + `chromium-driver`), and takes the README's screenshot.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// Alice's and Bob's session cookies (what the legacy app would set).
const ALICE_SESSION: &str = "alice-session-cookie-value";
const BOB_SESSION: &str = "bob-session-cookie-value";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A gate with the page on, the session cookie (and bearer tokens) as sources, and `extra`
/// appended to `[endpoints]` (e.g. `login_url`), `store` as the `[store]` table.
fn config(port: u16, extra: &str, store: &str, tokens: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[endpoints]
page = true
{extra}

[credentials]
sources = ["bearer", "cookie:session"]
keep = ["cookie:session"]

{store}

[tokens]
{tokens}

{validator}

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:9"
"#,
        validator = static_validator(&[
            (ALICE_SESSION, "alice", "alice"),
            (BOB_SESSION, "bob", "bob")
        ]),
    )
}

fn memory() -> &'static str {
    "[store]\nbackend = \"memory\""
}

/// A running gate with the page.
fn start(extra: &str) -> Gate {
    Gate::start(&config(free_port(), extra, memory(), ""))
}

fn cookie(session: &str) -> String {
    format!("session={session}")
}

/// What the page says, parsed just enough: the CSRF token, the new secret, the token rows.
struct Page {
    status: u16,
    body: String,
    /// The whole response (for its headers), when it came through the hyper client.
    resp: Option<Resp>,
}

impl Page {
    fn of(resp: Resp) -> Page {
        Page {
            status: resp.status.as_u16(),
            body: String::from_utf8_lossy(&resp.body).into_owned(),
            resp: Some(resp),
        }
    }

    fn of_curl(reply: &CurlReply) -> Page {
        Page {
            status: reply.status,
            body: reply.body.clone(),
            resp: None,
        }
    }

    fn headers(&self) -> &Resp {
        self.resp.as_ref().expect("a hyper response")
    }

    /// The value of the first `<input ... name="NAME" value="...">` or `id="NAME"`.
    fn input(&self, attr: &str) -> Option<String> {
        let at = self.body.find(attr)?;
        let tag_start = self.body[..at].rfind('<')?;
        let tag_end = at + self.body[at..].find('>')?;
        let tag = &self.body[tag_start..tag_end];
        let value = tag.split(" value=\"").nth(1)?;
        Some(value[..value.find('"')?].to_string())
    }

    fn csrf(&self) -> String {
        self.input("name=\"csrf\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body))
    }

    fn new_token(&self) -> Option<String> {
        self.input("id=\"new-token\"")
    }

    /// The `data-id` of every token row.
    fn rows(&self) -> Vec<String> {
        self.body
            .split("<tr data-id=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next().map(str::to_string))
            .collect()
    }
}

async fn get_page(gate: &Gate, session: &str) -> Page {
    Page::of(get(&gate.url("/_tokengate/"), &[("cookie", &cookie(session))]).await)
}

/// A form POST as a browser on the gate's origin sends it.
async fn post_form(gate: &Gate, path: &str, session: &str, fields: &[(&str, &str)]) -> Page {
    let origin = format!("http://127.0.0.1:{}", gate.port);
    post_form_with(
        gate,
        path,
        &[
            ("cookie", &cookie(session)),
            ("origin", &origin),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        fields,
    )
    .await
}

async fn post_form_with(
    gate: &Gate,
    path: &str,
    headers: &[(&str, &str)],
    fields: &[(&str, &str)],
) -> Page {
    Page::of(post(&gate.url(path), headers, form_body(fields)).await)
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn assert_page_headers(resp: &Resp) {
    assert_eq!(resp.header("content-security-policy").as_deref(), Some(CSP));
    assert_eq!(resp.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        resp.header("referrer-policy").as_deref(),
        Some("same-origin")
    );
    assert_eq!(
        resp.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
}

/// The caller's tokens through the JSON API, with a bearer token.
async fn api_status(gate: &Gate, secret: &str) -> u16 {
    get(
        &gate.url("/_tokengate/tokens"),
        &[("authorization", &format!("Bearer {secret}"))],
    )
    .await
    .status
    .as_u16()
}

/// The audit lines, once there are `count` of them (5 s at most).
async fn audit_lines(gate: &Gate, count: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<Value> = gate
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "audit")
            .collect();
        if lines.len() >= count || std::time::Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn page_lists_creates_and_revokes_with_the_security_headers() {
    let gate = start("");
    let page = get_page(&gate, ALICE_SESSION).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page
        .headers()
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert_page_headers(page.headers());
    assert!(page.body.contains("<form id=\"create\""));
    assert!(page.body.contains("<table id=\"tokens\""));
    assert!(page.rows().is_empty());
    // No inline script or style: the policy would block them.
    assert!(!page.body.contains("<script>") && !page.body.contains("style="));

    // Create: 200, the page again with the secret once, in a read-only field.
    let csrf = page.csrf();
    let created = post_form(
        &gate,
        "/_tokengate/",
        ALICE_SESSION,
        &[("csrf", &csrf), ("name", "ci deploy"), ("ttl", "30d")],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_page_headers(created.headers());
    let secret = created.new_token().expect("#new-token on the page");
    assert!(secret.starts_with("tg_"), "{secret}");
    assert!(created.body.contains("readonly"));
    let rows = created.rows();
    assert_eq!(rows.len(), 1);
    assert!(created.body.contains("ci deploy"));
    // The token is real, 30 days long, and the page shows it to its owner only.
    assert_eq!(api_status(&gate, &secret).await, 200);
    let listed = get(
        &gate.url("/_tokengate/tokens"),
        &[("authorization", &format!("Bearer {secret}"))],
    )
    .await
    .json();
    assert_eq!(listed[0]["id"], json!(rows[0]));
    assert_eq!(listed[0]["name"], json!("ci deploy"));
    let created_at = humantime::parse_rfc3339(listed[0]["created"].as_str().unwrap()).unwrap();
    let expires_at = humantime::parse_rfc3339(listed[0]["expires"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires_at.duration_since(created_at).unwrap(),
        Duration::from_secs(30 * 24 * 3600)
    );
    // Shown once: the next GET lists it without the secret.
    let again = get_page(&gate, ALICE_SESSION).await;
    assert_eq!(again.rows(), rows);
    assert!(again.new_token().is_none());
    assert!(!again.body.contains(&secret));
    assert!(get_page(&gate, BOB_SESSION).await.rows().is_empty());

    // Bob cannot revoke Alice's token, even with his own valid form.
    let bob_csrf = get_page(&gate, BOB_SESSION).await.csrf();
    let refused = post_form(
        &gate,
        "/_tokengate/revoke",
        BOB_SESSION,
        &[("csrf", &bob_csrf), ("id", &rows[0])],
    )
    .await;
    assert_eq!(refused.status, 404, "{}", refused.body);
    assert_eq!(api_status(&gate, &secret).await, 200);

    // Revoke: gone from the page, and the secret stops working.
    let revoked = post_form(
        &gate,
        "/_tokengate/revoke",
        ALICE_SESSION,
        &[("csrf", &csrf), ("id", &rows[0])],
    )
    .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert!(revoked.rows().is_empty());
    assert!(revoked.body.contains("revoked"));
    assert_eq!(api_status(&gate, &secret).await, 401);

    // Audit lines name the page's caller as the actor; no secret or cookie in any log line.
    let audit = audit_lines(&gate, 2).await;
    let log = gate.log();
    assert!(audit
        .iter()
        .any(|v| v["event"] == "token_created" && v["actor"] == "subject:alice"));
    assert!(
        audit
            .iter()
            .any(|v| v["event"] == "token_revoked" && v["token_id"] == json!(rows[0])),
        "{audit:?}"
    );
    assert!(!log.contains(&secret), "secret in the log");
    assert!(!log.contains(ALICE_SESSION), "session cookie in the log");
    assert!(!log.contains(&csrf), "CSRF token in the log");
    // Access lines are written in batches: wait for them.
    let lines = gate
        .wait_access_line("/_tokengate/revoke", Duration::from_secs(5))
        .await;
    assert!(
        lines
            .iter()
            .any(|l| l["route"] == "tokengate:page" && l["subject"] == "alice"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_apps_session_cookie_through_introspect_signs_in_and_is_kept_for_the_app() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[endpoints]
page = true
[credentials]
sources = ["bearer", "cookie:session"]
keep = ["cookie:session"]
[store]
backend = "memory"
{validator}
{route}"#,
        validator = introspect_validator(up.port, "2s"),
        route = catch_all_route(up.port, ""),
    ));
    // The app's own session (its /whoami answers uid "alice" for it) opens the page.
    let page = get_page(&gate, ALICE).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Signed in as <strong>alice</strong>"));
    let created = post_form(&gate, "/_tokengate/", ALICE, &[("csrf", &page.csrf())]).await;
    let secret = created.new_token().expect("a new token");
    // The same browser still reaches the app with its cookie, which the app needs.
    let resp = get(&gate.url("/app"), &[("cookie", &cookie(ALICE))]).await;
    assert_eq!(resp.status.as_u16(), 200);
    let seen = up.last().await;
    assert_eq!(
        seen.header("cookie").as_deref(),
        Some(cookie(ALICE).as_str())
    );
    assert_eq!(seen.header("x-auth-user").as_deref(), Some("alice"));
    // And the new token acts as alice on the app.
    let resp = get(
        &gate.url("/app"),
        &[("authorization", &format!("Bearer {secret}"))],
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200);
    assert_eq!(
        up.last().await.header("x-auth-user").as_deref(),
        Some("alice")
    );
}

/// Request headers, or form fields: (name, value).
type Headers<'a> = Vec<(&'a str, &'a str)>;
type Fields<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test(flavor = "multi_thread")]
async fn every_post_needs_the_csrf_token_and_a_same_origin() {
    let gate = start("");
    let csrf = get_page(&gate, ALICE_SESSION).await.csrf();
    let bob_csrf = get_page(&gate, BOB_SESSION).await.csrf();
    assert_ne!(csrf, bob_csrf, "the token is bound to the credential");
    let origin = format!("http://127.0.0.1:{}", gate.port);
    let alice = cookie(ALICE_SESSION);
    let form = ("content-type", "application/x-www-form-urlencoded");
    let cases: [(&str, Headers, Fields); 6] = [
        (
            "no CSRF field",
            vec![("cookie", &alice), ("origin", &origin), form],
            vec![("name", "x")],
        ),
        (
            "a wrong CSRF token",
            vec![("cookie", &alice), ("origin", &origin), form],
            vec![("csrf", "AAAA"), ("name", "x")],
        ),
        (
            "another user's CSRF token",
            vec![("cookie", &alice), ("origin", &origin), form],
            vec![("csrf", &bob_csrf), ("name", "x")],
        ),
        (
            "no Origin",
            vec![("cookie", &alice), form],
            vec![("csrf", &csrf), ("name", "x")],
        ),
        (
            "another Origin",
            vec![("cookie", &alice), ("origin", "http://evil.example"), form],
            vec![("csrf", &csrf), ("name", "x")],
        ),
        (
            "Sec-Fetch-Site: cross-site",
            vec![
                ("cookie", &alice),
                ("origin", &origin),
                ("sec-fetch-site", "cross-site"),
                form,
            ],
            vec![("csrf", &csrf), ("name", "x")],
        ),
    ];
    for (what, headers, fields) in &cases {
        for path in ["/_tokengate/", "/_tokengate/revoke"] {
            let page = post_form_with(&gate, path, headers, fields).await;
            assert_eq!(page.status, 403, "{what} on {path}: {}", page.body);
            assert_page_headers(page.headers());
            assert!(page.new_token().is_none());
        }
    }
    // Nothing was created by any of them.
    assert!(get_page(&gate, ALICE_SESSION).await.rows().is_empty());
    // A POST that is not a form.
    let page = post_form_with(
        &gate,
        "/_tokengate/",
        &[
            ("cookie", &alice),
            ("origin", &origin),
            ("content-type", "text/plain"),
        ],
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(page.status, 415);
    // And the same request, done right, works.
    let page = post_form(&gate, "/_tokengate/", ALICE_SESSION, &[("csrf", &csrf)]).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.new_token().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_api_refuses_cross_site_forms_with_the_cookie() {
    let gate = start("");
    let url = gate.url("/_tokengate/tokens");
    let alice = cookie(ALICE_SESSION);
    // What a form on another site can send: text/plain, with the browser's cookie.
    let body = "{\"name\":\"stolen\"}";
    let cross = post(
        &url,
        &[
            ("cookie", &alice),
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ],
        body,
    )
    .await;
    cross.assert_error(403, "Cross-origin request refused");
    let no_origin = post(
        &url,
        &[("cookie", &alice), ("content-type", "text/plain")],
        body,
    )
    .await;
    no_origin.assert_error(415, "JSON body required");
    assert!(get_page(&gate, ALICE_SESSION).await.rows().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn names_are_escaped_and_lifetimes_stay_within_max_ttl() {
    let gate = Gate::start(&config(free_port(), "", memory(), "max_ttl = \"60d\""));
    let page = get_page(&gate, ALICE_SESSION).await;
    // The form offers nothing over the cap.
    assert!(page.body.contains("<option value=\"30d\""));
    assert!(page.body.contains("<option value=\"60d\" selected>"));
    assert!(!page.body.contains("<option value=\"90d\""));
    let csrf = page.csrf();
    let name = "<script>alert(1)</script>\"'&";
    let created = post_form(
        &gate,
        "/_tokengate/",
        ALICE_SESSION,
        &[("csrf", &csrf), ("name", name), ("ttl", "7d")],
    )
    .await;
    assert_eq!(created.status, 200);
    assert!(!created.body.contains("<script>alert"), "{}", created.body);
    assert!(created
        .body
        .contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
    // A lifetime over the cap (a hand-made form): 400 naming the cap, the form kept.
    let over = post_form(
        &gate,
        "/_tokengate/",
        ALICE_SESSION,
        &[("csrf", &csrf), ("name", "too long"), ("ttl", "90d")],
    )
    .await;
    assert_eq!(over.status, 400, "{}", over.body);
    assert!(over.body.contains("max_ttl"), "{}", over.body);
    assert!(over.body.contains("value=\"too long\""));
    assert!(over.new_token().is_none());
    assert_eq!(over.rows().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_issued_token_cannot_use_the_pages_forms() {
    let gate = start("");
    let csrf = get_page(&gate, ALICE_SESSION).await.csrf();
    let page = post_form(&gate, "/_tokengate/", ALICE_SESSION, &[("csrf", &csrf)]).await;
    let secret = page.new_token().unwrap();
    let id = page.rows()[0].clone();
    // Signed in with the issued token itself: it sees the page, but cannot create or revoke,
    // even with the form the page gave it.
    let bearer = format!("Bearer {secret}");
    let origin = format!("http://127.0.0.1:{}", gate.port);
    let seen = Page::of(get(&gate.url("/_tokengate/"), &[("authorization", &bearer)]).await);
    assert_eq!(seen.status, 200);
    let its_csrf = seen.csrf();
    for (path, fields) in [
        ("/_tokengate/", vec![("csrf", its_csrf.as_str())]),
        (
            "/_tokengate/revoke",
            vec![("csrf", its_csrf.as_str()), ("id", id.as_str())],
        ),
    ] {
        let refused = post_form_with(
            &gate,
            path,
            &[
                ("authorization", &bearer),
                ("origin", &origin),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            &fields,
        )
        .await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
        assert!(refused.body.contains("Tokens cannot mint tokens"));
    }
    assert_eq!(get_page(&gate, ALICE_SESSION).await.rows(), [id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_credential_a_401_page_or_the_login_redirect() {
    let gate = start("");
    for headers in [vec![], vec![("cookie", "session=not-a-session")]] {
        let resp = get(&gate.url("/_tokengate/"), &headers).await;
        assert_eq!(resp.status.as_u16(), 401);
        assert!(resp
            .header("content-type")
            .unwrap()
            .starts_with("text/html"));
        assert_page_headers(&resp);
        assert!(String::from_utf8_lossy(&resp.body).contains("Sign in required"));
    }
    // The assets need no credential.
    let css = get(&gate.url("/_tokengate/page.css"), &[]).await;
    assert_eq!(css.status.as_u16(), 200);
    assert!(css.header("content-type").unwrap().starts_with("text/css"));
    let js = get(&gate.url("/_tokengate/page.js"), &[]).await;
    assert!(js
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    drop(gate);

    let gate = start("login_url = \"https://app.example/login?from=tokens\"");
    for (method, path, headers) in [
        ("GET", "/_tokengate/", vec![]),
        ("GET", "/_tokengate", vec![("cookie", "session=expired")]),
        // The query is never carried along: rd is a path.
        ("GET", "/_tokengate/?rd=https://evil.example", vec![]),
        ("POST", "/_tokengate/revoke", vec![]),
    ] {
        let resp = send(build(method, &gate.url(path), &headers, full(""))).await;
        assert_eq!(resp.status.as_u16(), 302, "{method} {path}");
        let back = if method == "GET" {
            path.split('?').next().unwrap()
        } else {
            "/_tokengate/"
        };
        assert_eq!(
            resp.header("location").as_deref(),
            Some(format!("https://app.example/login?from=tokens&rd={back}").as_str()),
            "{method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_is_off_unless_configured() {
    let port = free_port();
    let toml = config(port, "", memory(), "").replace("page = true", "page = false");
    let gate = Gate::start(&toml);
    for path in ["/_tokengate/", "/_tokengate/page.css", "/_tokengate/revoke"] {
        let resp = get(&gate.url(path), &[("cookie", &cookie(ALICE_SESSION))]).await;
        resp.assert_error(404, "No route");
    }
    // A bad login_url is refused by check.
    let dir = tempfile::tempdir().unwrap();
    for bad in ["//evil.example/login", "javascript:alert(1)", "login"] {
        let path = write_file(
            dir.path(),
            "bad.toml",
            &config(port, &format!("login_url = \"{bad}\""), memory(), ""),
        );
        let out = cli(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("login_url"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_and_restarts_agree_on_the_csrf_token() {
    // sqlite: two processes on one file, then a restart.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let store = format!("[store]\nbackend = \"sqlite\"\npath = \"{}\"", db.display());
    let csrf_of = |gate: &Gate| {
        let gate_url = gate.url("/_tokengate/");
        async move { Page::of(get(&gate_url, &[("cookie", &cookie(ALICE_SESSION))]).await).csrf() }
    };
    let one = Gate::start(&config(free_port(), "", &store, ""));
    let two = Gate::start(&config(free_port(), "", &store, ""));
    let first = csrf_of(&one).await;
    assert_eq!(csrf_of(&two).await, first);
    // A form from one replica is accepted by the other.
    let page = post_form(&two, "/_tokengate/", ALICE_SESSION, &[("csrf", &first)]).await;
    assert_eq!(page.status, 200);
    drop(one);
    drop(two);
    let restarted = Gate::start(&config(free_port(), "", &store, ""));
    assert_eq!(csrf_of(&restarted).await, first);

    // redis: two replicas sharing one.
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"page:\"",
        redis.url()
    );
    let one = Gate::start(&config(free_port(), "", &store, ""));
    let two = Gate::start(&config(free_port(), "", &store, ""));
    let shared = csrf_of(&one).await;
    assert_eq!(csrf_of(&two).await, shared);
    assert_ne!(shared, first, "a different store, a different key");
}

// ---------------------------------------------------------------------------------------------
// In a real browser
// ---------------------------------------------------------------------------------------------

/// A path to `name` on `PATH`.
fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// chromedriver on a free port, or `None` (with the skip line) when Chromium is missing.
fn chromedriver() -> Option<(ChildServer, std::path::PathBuf)> {
    let (Some(driver), Some(browser)) = (on_path("chromedriver"), on_path("chromium")) else {
        missing_tool("chromium and chromedriver", "chromium chromium-driver");
        return None;
    };
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("chromedriver.log");
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    Some((
        ChildServer::listening("chromedriver", port, child, Some(dir), Some(log)),
        browser,
    ))
}

async fn browser(driver: &ChildServer, chromium: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_string(),
        json!({
            "binary": chromium,
            // --no-sandbox: CI runs as root.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1100,1000",
                     "--hide-scrollbars", "--force-device-scale-factor=1"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Another origin on the same machine (a different port): a page whose form posts
/// `text/plain` JSON to the gate's token API, as a cross-site attacker would.
fn attacker_site(gate_port: u16) -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = format!(
        "<!doctype html><title>evil</title>\
         <form id=\"steal\" method=\"post\" enctype=\"text/plain\" \
         action=\"http://127.0.0.1:{gate_port}/_tokengate/tokens\">\
         <input name='{{\"name\":\"stolen\",\"x\":\"' value='\"}}'>\
         <button id=\"go\" type=\"submit\">Win a prize</button></form>"
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    port
}

async fn text_of(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn create_in_browser(client: &Client, name: &str, ttl: &str) -> String {
    let previous = match client.find(Locator::Css("#new-token")).await {
        Ok(field) => field.prop("value").await.ok().flatten(),
        Err(_) => None,
    };
    let form = client.find(Locator::Css("form#create")).await.unwrap();
    let field = form.find(Locator::Css("input[name=name]")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(name).await.unwrap();
    form.find(Locator::Css("select[name=ttl]"))
        .await
        .unwrap()
        .select_by_value(ttl)
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The page is replaced by the POST's answer: wait for a secret other than the one shown.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let secret = loop {
        if let Ok(field) = client.find(Locator::Css("#new-token")).await {
            if let Ok(Some(value)) = field.prop("value").await {
                if Some(&value) != previous.as_ref() && !value.is_empty() {
                    break value;
                }
            }
        }
        assert!(std::time::Instant::now() < deadline, "no new #new-token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(secret.starts_with("tg_"), "{secret:?}");
    secret
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_in_a_real_browser() {
    let Some((driver, chromium)) = chromedriver() else {
        return;
    };
    let gate = start("");
    let client = browser(&driver, &chromium).await;
    let result = browse(&client, &gate).await;
    let _ = client.close().await;
    result.unwrap();
    let log = gate.log();
    assert!(!log.contains("tg_"), "a secret in the log");
    assert!(
        !log.contains(ALICE_SESSION),
        "the session cookie in the log"
    );
}

/// Signs in at `page` (open in the browser) with `session` as the app's cookie, and reloads it.
/// (WebDriver's add-cookie refuses an IP address as the domain; the page's own
/// document.cookie is how the legacy app's login would leave it.)
async fn sign_in_in_browser(
    client: &Client,
    page: &str,
    session: &str,
) -> Result<(), fantoccini::error::CmdError> {
    client
        .execute(
            "document.cookie = arguments[0] + '; path=/'",
            vec![json!(cookie(session))],
        )
        .await?;
    client.goto(page).await?;
    assert_eq!(client.title().await?, "API tokens");
    Ok(())
}

async fn browse(client: &Client, gate: &Gate) -> Result<(), fantoccini::error::CmdError> {
    let page = gate.url("/_tokengate/");
    // Not signed in: the 401 page.
    client.goto(&page).await?;
    assert_eq!(client.title().await?, "Sign in required");
    // Sign in: the legacy app's session cookie.
    sign_in_in_browser(client, &page, ALICE_SESSION).await?;
    assert!(text_of(client, ".who").await.contains("alice"));
    // The stylesheet applied (CSP allows it): the primary button is blue.
    let button = client
        .find(Locator::Css("form#create button[type=submit]"))
        .await?;
    assert_eq!(
        button.css_value("background-color").await?,
        "rgba(36, 84, 197, 1)"
    );

    // Create two tokens through the form.
    let first = create_in_browser(client, "CI deploy", "30d").await;
    // Used once, so that its "last used" shows on the next render.
    assert_eq!(api_status(gate, &first).await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = create_in_browser(client, "Laptop CLI", "90d").await;
    assert_ne!(first, second);
    let rows = client
        .find_all(Locator::Css("table#tokens tr[data-id]"))
        .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(api_status(gate, &second).await, 200);
    // The README's screenshot: a couple of tokens and a new secret.
    let png = client.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if let Some(path) = std::env::var_os("TOKENGATE_PAGE_SCREENSHOT") {
        std::fs::write(path, &png).expect("write the screenshot");
    }
    // The script ran (same origin, allowed by the CSP): the copy button is shown and works.
    let copy = client.find(Locator::Css("#copy")).await?;
    assert!(copy.is_displayed().await?);
    copy.click().await?;
    // The clipboard answers asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let copied = loop {
        let text = copy.text().await?;
        if text != "Copy" || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(copied == "Copied" || copied == "Press Ctrl+C", "{copied:?}");
    // Keyboard: the name field, the lifetime and the button are reachable with Tab, in order.
    client.find(Locator::Css("#name")).await?.click().await?;
    client.active_element().await?.send_keys("\u{E004}").await?;
    assert_eq!(
        client.active_element().await?.attr("id").await?.as_deref(),
        Some("ttl")
    );
    // Readable on a phone: each token row becomes a card of label/value lines.
    client.set_window_size(390, 844).await?;
    let cell = client
        .find(Locator::Css("table#tokens tr[data-id] td"))
        .await?;
    assert_eq!(cell.css_value("display").await?, "flex");
    let page_width: f64 = client
        .execute("return document.documentElement.scrollWidth", vec![])
        .await?
        .as_f64()
        .unwrap_or(f64::MAX);
    assert!(
        page_width <= 390.0,
        "no sideways scrolling on a phone: {page_width}"
    );
    client.set_window_size(1100, 1000).await?;

    // Revoke the first through its row's button: the row is gone, the secret 401s.
    let first_id = text_of(client, "table#tokens tr[data-id] td[data-label=Id]").await;
    client
        .find(Locator::Css(&format!(
            "tr[data-id=\"{first_id}\"] button.revoke"
        )))
        .await?
        .click()
        .await?;
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(".notice.done"))
        .await?;
    assert!(client
        .find_all(Locator::Css(&format!("tr[data-id=\"{first_id}\"]")))
        .await?
        .is_empty());
    assert_eq!(
        client
            .find_all(Locator::Css("table#tokens tr[data-id]"))
            .await?
            .len(),
        1
    );
    assert_eq!(api_status(gate, &first).await, 401);
    assert_eq!(api_status(gate, &second).await, 200);

    // A name that is markup stays text: no script runs, no element is made.
    create_in_browser(
        client,
        "<img src=x onerror=alert(1)><script>alert(2)</script>",
        "1d",
    )
    .await;
    assert!(client.get_alert_text().await.is_err(), "an alert opened");
    assert!(client
        .find_all(Locator::Css("table#tokens img"))
        .await?
        .is_empty());
    assert!(client.source().await?.contains("&lt;script&gt;alert(2)"));

    // Another origin's form, posting text/plain JSON to the token API with Alice's cookie.
    let evil = attacker_site(gate.port);
    client.goto(&format!("http://127.0.0.1:{evil}/")).await?;
    client.find(Locator::Css("#go")).await?.click().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.current_url().await?.path() != "/_tokengate/tokens" {
        assert!(
            std::time::Instant::now() < deadline,
            "the form did not post"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = client.source().await?;
    assert!(
        answer.contains("Cross-origin request refused") || answer.contains("JSON body required"),
        "{answer}"
    );
    client.goto(&page).await?;
    assert_eq!(
        client
            .find_all(Locator::Css("table#tokens tr[data-id]"))
            .await?
            .len(),
        2,
        "the cross-site form created nothing"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Signed in with a client certificate
// ---------------------------------------------------------------------------------------------

/// `curl -i https://localhost:PORT{path}` trusting `dir/ca.pem`, presenting `dir/alice.pem`
/// when `cert`, with `form` as an urlencoded POST body when given.
fn curl_tls(
    dir: &Path,
    port: u16,
    path: &str,
    cert: bool,
    headers: &[(&str, &str)],
    form: Option<&[(&str, &str)]>,
) -> CurlReply {
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
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(fields) = form {
        cmd.arg("--data-raw").arg(form_body(fields));
    }
    cmd.arg(format!("https://localhost:{port}{path}"));
    CurlReply::run(&mut cmd)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_signs_in_too() {
    use common::pki::{ca, server, user, Dn};
    if on_path("curl").is_none() {
        missing_tool("curl", "curl");
        return;
    }
    let root = ca("Example Root CA", None);
    let alice = user(
        Dn::of(&[("C", "CH"), ("O", "Example"), ("CN", "Alice Smith")]),
        &root,
    );
    let tls = server(&root);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(d, "ca.pem", &root.pem());
    write_file(d, "server.pem", &tls.pem());
    write_file(d, "server-key.pem", &tls.key_pem());
    write_file(d, "alice.pem", &alice.pem());
    write_file(d, "alice-key.pem", &alice.key_pem());
    let port = free_port();
    let _gate = Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[server.tls]
cert = "{d}/server.pem"
key = "{d}/server-key.pem"
client_ca = "{d}/ca.pem"
[endpoints]
page = true
[store]
backend = "memory"
[x509]
enabled = true
[[x509.identity]]
dn = "/C=CH/O=Example/CN=Alice Smith"
accounts = ["alice"]
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:9"
"#,
        d = d.display()
    ));
    assert_eq!(
        curl_tls(d, port, "/_tokengate/", false, &[], None).status,
        401
    );
    let page = curl_tls(d, port, "/_tokengate/", true, &[], None);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("/C=CH/O=Example/CN=Alice Smith"));
    let csrf = Page::of_curl(&page).csrf();
    let origin = format!("https://localhost:{port}");
    // The scheme is part of the origin.
    let plain = format!("http://localhost:{port}");
    let fields = [("csrf", csrf.as_str()), ("name", "from my certificate")];
    let refused = curl_tls(
        d,
        port,
        "/_tokengate/",
        true,
        &[("origin", &plain)],
        Some(&fields),
    );
    assert_eq!(refused.status, 403);
    let created = curl_tls(
        d,
        port,
        "/_tokengate/",
        true,
        &[("origin", &origin)],
        Some(&fields),
    );
    assert_eq!(created.status, 200, "{}", created.body);
    let secret = Page::of_curl(&created).new_token().expect("#new-token");
    // The token acts as the certificate's account, without the certificate.
    let listed = curl_tls(
        d,
        port,
        "/_tokengate/tokens",
        false,
        &[("authorization", &format!("Bearer {secret}"))],
        None,
    );
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()[0]["account"], "alice");
    assert_eq!(listed.json()[0]["name"], "from my certificate");
}

// ---------------------------------------------------------------------------------------------
// Scopes: a checkbox per `[tokens] scopes`
// ---------------------------------------------------------------------------------------------

/// Carol's session cookie: a credential with a scope of its own (`read`).
const CAROL_SESSION: &str = "carol-session-cookie-value";

/// `[tokens]` with three scopes, of which a login credential may give two; and a static
/// validator (before Alice's and Bob's) that knows Carol's cookie, with scope `read`.
fn scoped_tokens() -> String {
    format!(
        "scopes = [\"read\", \"write\", \"admin\"]\nlogin_scopes = [\"read\", \"write\"]\n\n\
         [[validator]]\ntype = \"static\"\n[[validator.token]]\nsha256 = \"{}\"\n\
         subject = \"carol\"\nscopes = [\"read\"]\n",
        sha256_hex(CAROL_SESSION)
    )
}

/// The scopes of the caller's token named `name`, from the JSON API (with the new `secret`).
async fn scopes_of(gate: &Gate, secret: &str, name: &str) -> Value {
    let listed = get(
        &gate.url("/_tokengate/tokens"),
        &[("authorization", &format!("Bearer {secret}"))],
    )
    .await
    .json();
    let token = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no token {name:?} in {listed}"));
    token["scopes"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_create_form_has_a_checkbox_per_scope_within_the_callers_allowance() {
    let gate = Gate::start(&config(free_port(), "", memory(), &scoped_tokens()));
    let page = get_page(&gate, ALICE_SESSION).await;
    assert_eq!(page.status, 200, "{}", page.body);
    // Alice signs in without scope facts: login_scopes are hers to give, checked.
    let checkbox = |value: &str| {
        let at = page
            .body
            .find(&format!("name=\"scope\" value=\"{value}\""))
            .unwrap_or_else(|| panic!("no checkbox for {value}: {}", page.body));
        let end = at + page.body[at..].find('>').unwrap();
        page.body[at..end].to_string()
    };
    assert!(checkbox("read").contains("checked"));
    assert!(checkbox("write").contains("checked"));
    let admin = checkbox("admin");
    assert!(
        admin.contains("disabled") && !admin.contains("checked"),
        "{admin}"
    );
    assert!(page.body.contains("name=\"scopes-chosen\""));
    let csrf = page.csrf();
    let create = |fields: Vec<(&'static str, &'static str)>| {
        let csrf = csrf.clone();
        let gate = &gate;
        async move {
            let mut all = vec![("csrf", csrf.as_str()), ("ttl", "7d")];
            all.extend(fields);
            post_form(gate, "/_tokengate/", ALICE_SESSION, &all).await
        }
    };

    // One checked: that scope.
    let made = create(vec![
        ("name", "one"),
        ("scopes-chosen", "1"),
        ("scope", "read"),
    ])
    .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let secret = made.new_token().expect("a new token");
    assert_eq!(scopes_of(&gate, &secret, "one").await, json!(["read"]));
    assert!(made
        .body
        .contains("<td data-label=\"Scopes\" class=\"scopes\">read</td>"));
    // None checked: no scopes.
    let made = create(vec![("name", "none"), ("scopes-chosen", "1")]).await;
    let secret = made.new_token().expect("a new token");
    assert_eq!(scopes_of(&gate, &secret, "none").await, json!([]));
    // A form without the checkboxes: the allowance.
    let made = create(vec![("name", "old form")]).await;
    let secret = made.new_token().expect("a new token");
    assert_eq!(
        scopes_of(&gate, &secret, "old form").await,
        json!(["read", "write"])
    );
    // A hand-made form asking for more, or for a scope that does not exist: 400, the reason.
    for (scope, says) in [("admin", "wider"), ("delete", "unknown scope")] {
        let refused = create(vec![("scopes-chosen", "1"), ("scope", scope)]).await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert!(refused.body.contains(says), "{}", refused.body);
        assert!(refused.new_token().is_none());
    }

    // Carol's credential has `read`: that is all her tokens may have.
    let page = get_page(&gate, CAROL_SESSION).await;
    assert!(page.body.contains("name=\"scope\" value=\"read\" checked>"));
    assert!(page
        .body
        .contains("name=\"scope\" value=\"write\" disabled>"));
    let refused = post_form(
        &gate,
        "/_tokengate/",
        CAROL_SESSION,
        &[
            ("csrf", &page.csrf()),
            ("scopes-chosen", "1"),
            ("scope", "write"),
        ],
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.body);

    // Without `[tokens] scopes`, no checkboxes and no Scopes column.
    let plain = start("");
    let page = get_page(&plain, ALICE_SESSION).await;
    assert!(!page.body.contains("name=\"scope\""), "{}", page.body);
    assert!(!page.body.contains(">Scopes<"), "{}", page.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn scope_checkboxes_in_a_real_browser() {
    let Some((driver, chromium)) = chromedriver() else {
        return;
    };
    let gate = Gate::start(&config(free_port(), "", memory(), &scoped_tokens()));
    let client = browser(&driver, &chromium).await;
    let result = choose_scopes(&client, &gate).await;
    let _ = client.close().await;
    result.unwrap();
}

async fn choose_scopes(client: &Client, gate: &Gate) -> Result<(), fantoccini::error::CmdError> {
    let page = gate.url("/_tokengate/");
    client.goto(&page).await?;
    sign_in_in_browser(client, &page, ALICE_SESSION).await?;
    let scope = |value: &str| format!("form#create input[name=scope][value={value}]");
    let checked = |css: String| async move {
        let element = client.find(Locator::Css(&css)).await?;
        Ok::<_, fantoccini::error::CmdError>(
            element.prop("checked").await?.as_deref() == Some("true"),
        )
    };
    // The allowance is checked; a scope beyond it cannot be.
    assert!(checked(scope("read")).await?);
    assert!(checked(scope("write")).await?);
    let admin = client.find(Locator::Css(&scope("admin"))).await?;
    assert!(!admin.is_enabled().await?);
    // Clicking its label unchecks `write`: a read-only token.
    client
        .find(Locator::Css("form#create label[for=scope-1]"))
        .await?
        .click()
        .await?;
    assert!(!checked(scope("write")).await?);
    let secret = create_in_browser(client, "read only", "7d").await;
    assert_eq!(scopes_of(gate, &secret, "read only").await, json!(["read"]));
    assert_eq!(
        text_of(client, "table#tokens tr[data-id] td[data-label=Scopes]").await,
        "read"
    );
    // The new form starts from the allowance again.
    assert!(checked(scope("write")).await?);
    Ok(())
}
