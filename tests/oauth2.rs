//! `[[validator]] type = "oauth2_introspection"` (RFC 7662) against a stand-in authorization
//! server written here (it decodes HTTP Basic and the form body as a real one would), and a
//! `jwt` validator with only `issuer`, whose keys come by OIDC discovery from a stand-in
//! provider. Everything runs against the real binary.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use common::jwk::RsaKey;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const CLIENT_ID: &str = "tokengate gw";
/// With characters RFC 6749 §2.3.1's form-encoding changes.
const CLIENT_SECRET: &str = "s3cr:t/+=%";
const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "legacy-api";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A handler of the stand-in servers: (method, path, headers, body) → (status, body).
type Handler = dyn Fn(&hyper::http::request::Parts, &[u8]) -> (u16, String) + Send + Sync;

/// An HTTP/1 server on a free port that answers every request with `handler`; requests whose
/// path is `/slow…` are answered after 1.5 s.
async fn serve(handler: Arc<Handler>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        let body = body.unwrap_or_default();
                        let (status, text) = handler(&parts, &body);
                        if status == 299 {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(if status == 299 { 200 } else { status })
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// `application/x-www-form-urlencoded` decoding, as a server does it.
fn form_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .expect("UTF-8")
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// The stand-in authorization server

/// What the stand-in answers for a token.
#[derive(Clone)]
enum Answer {
    /// 200 with this JSON.
    Json(Value),
    /// This status and body.
    Raw(u16, &'static str),
    /// 200 with `{"active": true, ...}` after 1.5 s.
    Slow,
}

struct AuthServer {
    port: u16,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    /// Calls that reached the introspection logic (good client credentials).
    calls: Arc<AtomicUsize>,
    /// Calls refused for bad client credentials.
    refused: Arc<AtomicUsize>,
    /// What was wrong with a request, if anything (method, content type, form).
    problems: Arc<Mutex<Vec<String>>>,
}

impl AuthServer {
    async fn start() -> AuthServer {
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let problems: Arc<Mutex<Vec<String>>> = Arc::default();
        let (a, c, r, p) = (
            answers.clone(),
            calls.clone(),
            refused.clone(),
            problems.clone(),
        );
        let handler = move |parts: &hyper::http::request::Parts, body: &[u8]| {
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let mut wrong = Vec::new();
            if parts.method != hyper::Method::POST || parts.uri.path() != "/oauth2/introspect" {
                wrong.push(format!("{} {}", parts.method, parts.uri));
            }
            if header("content-type") != "application/x-www-form-urlencoded" {
                wrong.push(format!("content-type {:?}", header("content-type")));
            }
            if !header("accept").contains("application/json") {
                wrong.push(format!("accept {:?}", header("accept")));
            }
            // HTTP Basic, each part form-decoded (RFC 6749 §2.3.1).
            let client = header("authorization")
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|pair| {
                    let (id, secret) = pair.split_once(':')?;
                    Some((form_decode(id), form_decode(secret)))
                });
            if client != Some((CLIENT_ID.to_string(), CLIENT_SECRET.to_string())) {
                r.fetch_add(1, Ordering::SeqCst);
                return (401, r#"{"error":"invalid_client"}"#.to_string());
            }
            let text = String::from_utf8_lossy(body);
            let fields: HashMap<String, String> = text
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (form_decode(k), form_decode(v)))
                .collect();
            if fields.get("token_type_hint").map(String::as_str) != Some("access_token") {
                wrong.push(format!("form {text:?}"));
            }
            if !wrong.is_empty() {
                p.lock().unwrap().extend(wrong);
                return (400, r#"{"error":"invalid_request"}"#.to_string());
            }
            let Some(token) = fields.get("token") else {
                p.lock().unwrap().push(format!("no token in {text:?}"));
                return (400, r#"{"error":"invalid_request"}"#.to_string());
            };
            c.fetch_add(1, Ordering::SeqCst);
            match a.lock().unwrap().get(token).cloned() {
                None => (200, r#"{"active":false}"#.to_string()),
                Some(Answer::Json(v)) => (200, v.to_string()),
                Some(Answer::Raw(status, body)) => (status, body.to_string()),
                Some(Answer::Slow) => (299, good("slow").to_string()),
            }
        };
        let port = serve(Arc::new(handler)).await;
        AuthServer {
            port,
            answers,
            calls,
            refused,
            problems,
        }
    }

    fn answer(&self, token: &str, answer: Answer) {
        self.answers
            .lock()
            .unwrap()
            .insert(token.to_string(), answer);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn assert_requests_were_right(&self) {
        let problems = self.problems.lock().unwrap();
        assert!(
            problems.is_empty(),
            "bad introspection requests: {problems:?}"
        );
    }
}

/// An active answer for `sub`, valid for an hour, with the configured issuer and audience.
fn good(sub: &str) -> Value {
    json!({
        "active": true,
        "sub": sub,
        "iss": ISSUER,
        "aud": ["other-api", AUDIENCE],
        "exp": now() + 3600,
        "client_id": "app",
        "token_type": "Bearer",
    })
}

fn with(sub: &str, edit: impl FnOnce(&mut Value)) -> Answer {
    let mut v = good(sub);
    edit(&mut v);
    Answer::Json(v)
}

// ---------------------------------------------------------------------------------------------
// The gate

/// A gate with a static token (`plain-static-token`), then the `oauth2_introspection`
/// validator at `auth`; `/reports` only for the `read` scope, and every other path for any
/// valid credential, with `X-Groups` / `X-Scopes` identity headers.
fn config(port: u16, admin: u16, auth: u16, up: u16, limits: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[cache]
ttl = "1h"
negative_ttl = "2s"

[limits]
{limits}

{static_validator}

[[validator]]
type = "oauth2_introspection"
url = "http://127.0.0.1:{auth}/oauth2/introspect"
client_id = "{CLIENT_ID}"
client_secret = "${{env:INTROSPECTION_SECRET}}"
audience = "{AUDIENCE}"
issuer = "{ISSUER}"
groups_claim = "realm_access.roles"
timeout = "500ms"

[[route]]
path_prefix = "/reports"
upstream = "http://127.0.0.1:{up}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
[[route.allow]]
scopes = ["read"]

{route}"#,
        static_validator = static_validator(&[("plain-static-token", "carol", "ops")]),
        route = catch_all_route(
            up,
            "\"X-Groups\" = \"{groups}\"\n\"X-Scopes\" = \"{scopes}\"\n\"X-Client\" = \"{claim:client_id}\"",
        ),
    )
}

fn start_gate(auth: u16, up: u16, limits: &str, secret: &str) -> (Gate, u16) {
    let (port, admin) = (free_port(), free_port());
    let gate = Gate::start_with_env(
        &config(port, admin, auth, up, limits),
        &[("INTROSPECTION_SECRET", secret)],
    );
    (gate, admin)
}

async fn bearer(gate: &Gate, path: &str, token: &str) -> Resp {
    get(
        &gate.url(path),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// oauth2_introspection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_tokens_pass_with_their_scopes_and_groups() {
    let auth = AuthServer::start().await;
    let up = Upstream::start();
    let (gate, admin) = start_gate(auth.port, up.port, "failed_auth = \"0\"", CLIENT_SECRET);
    // A credential with characters the form encoding must carry.
    let alice = "at.alice+/=~x";
    auth.answer(
        alice,
        with("alice", |v| {
            v["scope"] = json!("read profile");
            v["realm_access"] = json!({"roles": ["ops", "dev"]});
        }),
    );
    auth.answer("at.bob", with("bob", |v| v["scope"] = json!("write")));

    let resp = bearer(&gate, "/api/data", alice).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("x-auth-account").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("x-groups").as_deref(), Some("ops,dev"));
    assert_eq!(resp.echoed("x-scopes").as_deref(), Some("read,profile"));
    assert_eq!(resp.echoed("x-client").as_deref(), Some("app"));
    assert_eq!(resp.echoed("auth-token").as_deref(), Some(alice));
    auth.assert_requests_were_right();
    assert_eq!(auth.calls(), 1);

    // Route rules read the scopes: `read` may see /reports, `write` alone may not.
    let resp = bearer(&gate, "/reports/q1", alice).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    bearer(&gate, "/reports/q1", "at.bob")
        .await
        .assert_error(403, "Forbidden");
    let resp = bearer(&gate, "/api/data", "at.bob").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-groups"), None, "no groups: no header");
    // Each credential was asked about once; the rest were cache hits.
    assert_eq!(auth.calls(), 2);

    // `username` names the subject when `sub` is absent.
    auth.answer(
        "at.svc",
        with("x", |v| {
            v.as_object_mut().unwrap().remove("sub");
            v["username"] = json!("svc-reports");
        }),
    );
    let resp = bearer(&gate, "/api/data", "at.svc").await;
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("svc-reports"));

    // Static tokens are not sent to the authorization server.
    let calls = auth.calls();
    assert_eq!(
        bearer(&gate, "/api/data", "plain-static-token")
            .await
            .status,
        200
    );
    assert_eq!(auth.calls(), calls);
    assert_eq!(auth_total(admin, "allowed", "introspect").await, 3.0);
    auth.assert_requests_were_right();
    let log = gate.log();
    assert!(!log.contains(alice), "a credential was logged");
    assert!(!log.contains(CLIENT_SECRET), "the client secret was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_vouch_for_nobody_are_invalid_and_remembered() {
    let auth = AuthServer::start().await;
    let up = Upstream::start();
    let (gate, admin) = start_gate(auth.port, up.port, "failed_auth = \"0\"", CLIENT_SECRET);
    let cases = [
        (
            "inactive",
            Answer::Json(json!({"active": false, "sub": "x"})),
        ),
        ("no active", with("x", |v| v["active"] = json!(null))),
        ("expired", with("x", |v| v["exp"] = json!(now() - 5))),
        (
            "not yet valid",
            with("x", |v| v["nbf"] = json!(now() + 600)),
        ),
        (
            "another issuer",
            with("x", |v| v["iss"] = json!("https://evil.example")),
        ),
        (
            "another audience",
            with("x", |v| v["aud"] = json!("other-api")),
        ),
        (
            "no audience",
            with("x", |v| {
                v.as_object_mut().unwrap().remove("aud");
            }),
        ),
        (
            "no subject",
            with("x", |v| {
                v.as_object_mut().unwrap().remove("sub");
            }),
        ),
    ];
    for (case, answer) in &cases {
        auth.answer(case, answer.clone());
        bearer(&gate, "/api/data", case)
            .await
            .assert_error(401, "Invalid credentials");
    }
    // An unknown token: the stand-in says `{"active": false}`.
    bearer(&gate, "/api/data", "never-issued")
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(auth.calls(), cases.len() + 1);
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
    // Invalid answers are cached for negative_ttl: asking again costs no call.
    bearer(&gate, "/api/data", "inactive")
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(auth.calls(), cases.len() + 1);
    assert!(auth_total(admin, "denied", "introspect").await >= cases.len() as f64);
    auth.assert_requests_were_right();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_ends_the_cache_entry() {
    let auth = AuthServer::start().await;
    let up = Upstream::start();
    let (gate, _) = start_gate(auth.port, up.port, "failed_auth = \"0\"", CLIENT_SECRET);
    // Valid for 2 more seconds, while the cache's ttl is an hour.
    auth.answer("short", with("alice", |v| v["exp"] = json!(now() + 2)));
    assert_eq!(bearer(&gate, "/api/data", "short").await.status, 200);
    assert_eq!(bearer(&gate, "/api/data", "short").await.status, 200);
    assert_eq!(auth.calls(), 1, "the second was a cache hit");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // The entry ended at `exp`: the server is asked again, and its `exp` has passed.
    bearer(&gate, "/api/data", "short")
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(auth.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_gives_no_answer_fails_closed() {
    let auth = AuthServer::start().await;
    let up = Upstream::start();
    let (gate, admin) = start_gate(auth.port, up.port, "failed_auth = \"0\"", CLIENT_SECRET);
    auth.answer("html", Answer::Raw(200, "<html>login</html>"));
    auth.answer("array", Answer::Raw(200, "[true]"));
    auth.answer("error", Answer::Raw(500, r#"{"error":"server_error"}"#));
    auth.answer("gone", Answer::Raw(404, r#"{"active":true,"sub":"x"}"#));
    auth.answer("slow", Answer::Slow);
    for token in ["html", "array", "error", "gone", "slow"] {
        bearer(&gate, "/api/data", token)
            .await
            .assert_error(503, "Authentication backend unavailable");
    }
    // Not cached: each is asked again.
    let calls = auth.calls();
    bearer(&gate, "/api/data", "html")
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert_eq!(auth.calls(), calls + 1);
    assert!(auth_total(admin, "error", "introspect").await >= 6.0);
    // A static token still works.
    assert_eq!(
        bearer(&gate, "/api/data", "plain-static-token")
            .await
            .status,
        200
    );
    drop(gate);

    // Wrong client credentials: the server answers 401 to tokengate, which is not the
    // client's fault: 503.
    auth.answer("at.alice", Answer::Json(good("alice")));
    let (gate, _) = start_gate(auth.port, up.port, "failed_auth = \"0\"", "wrong-secret");
    bearer(&gate, "/api/data", "at.alice")
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert_eq!(auth.refused.load(Ordering::SeqCst), 1);
    assert!(!gate.log().contains("wrong-secret"));
    drop(gate);

    // Nobody listening.
    let closed = free_port();
    let (gate, _) = start_gate(closed, up.port, "failed_auth = \"0\"", CLIENT_SECRET);
    bearer(&gate, "/api/data", "at.alice")
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert_eq!(
        up.requests(),
        1,
        "only the static token reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_credentials_stop_calls_to_the_authorization_server() {
    let auth = AuthServer::start().await;
    let up = Upstream::start();
    let (gate, _) = start_gate(
        auth.port,
        up.port,
        "failed_auth = \"2/1m\"\nfailed_auth_burst = 2",
        CLIENT_SECRET,
    );
    for token in ["guess-1", "guess-2"] {
        bearer(&gate, "/api/data", token)
            .await
            .assert_error(401, "Invalid credentials");
    }
    let resp = bearer(&gate, "/api/data", "guess-3").await;
    assert_eq!(resp.status, 429, "{:?}", resp.body);
    assert!(resp.header("retry-after").is_some());
    assert_eq!(auth.calls(), 2, "no call for the throttled client");
    // Checked locally, a static token is never throttled.
    assert_eq!(
        bearer(&gate, "/api/data", "plain-static-token")
            .await
            .status,
        200
    );
}

#[test]
fn bad_oauth2_introspection_configs_are_errors_with_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let validator = "type = \"oauth2_introspection\"\nurl = \"https://idp.example/introspect\"";
    let cases = [
        (
            "type = \"oauth2_introspection\"\nclient_id = \"a\"\nclient_secret = \"b\"",
            "needs url",
        ),
        (
            "type = \"oauth2_introspection\"\nurl = \"ftp://idp/introspect\"",
            "url must be an absolute http:// or https:// URL",
        ),
        (
            &format!("{validator}\nclient_id = \"tokengate\""),
            "client_id needs client_secret",
        ),
        (
            &format!("{validator}\nclient_secret = \"s3cret\""),
            "client_secret needs client_id",
        ),
        (
            &format!("{validator}\nclient_id = \"\"\nclient_secret = \"s3cret\""),
            "client_id must not be empty",
        ),
        (
            &format!("{validator}\nclient_id = \"a\"\nclient_secret = \"${{env:TG_NOT_SET_HERE}}\""),
            "TG_NOT_SET_HERE",
        ),
        (
            &format!("{validator}\naudience = []"),
            "audience must be a non-empty string or list",
        ),
        (
            &format!("{validator}\nheader = \"x-token\""),
            "header applies to introspect validators, not oauth2_introspection",
        ),
        (
            &format!("{validator}\njwks_url = \"https://idp.example/keys\""),
            "jwks_url applies to jwt validators, not oauth2_introspection",
        ),
        (
            &format!("{validator}\nmax_concurrent = 0"),
            "must be a positive number",
        ),
        (
            "type = \"static\"\nmax_concurrent = 8\n[[validator.token]]\nsha256 = \"00\"\nsubject = \"a\"",
            "max_concurrent applies to introspect and oauth2_introspection validators, not static",
        ),
        (
            "type = \"introspect\"\nurl = \"http://a/\"\nclient_secret = \"x\"",
            "client_secret applies to oauth2_introspection validators, not introspect",
        ),
        (
            "type = \"oauth2\"",
            "\"oauth2_introspection\"",
        ),
    ];
    for (body, message) in cases {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[validator]]\n{body}\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n"
        );
        assert_check_refuses(dir.path(), &toml, message);
    }
    // The secret is never printed, also in an error about the table it is in.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[[validator]]\n{validator}\nclient_id = \"a\"\n\
         client_secret = \"literal-s3cret\"\ntimeout = \"soon\"\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n"
    );
    let path = write_file(dir.path(), "secret.toml", &toml);
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("literal-s3cret"), "{said}");
    // A good one, and a jwt validator with only an issuer: `check` fetches nothing.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[[validator]]\n{validator}\nclient_id = \"a\"\n\
         client_secret = \"${{env:INTROSPECTION_SECRET}}\"\naudience = [\"x\", \"y\"]\n\
         issuer = \"https://idp.example\"\nsubject_claim = \"uid\"\ngroups_claim = \"a.b\"\n\
         timeout = \"1s\"\nmax_concurrent = 8\n\
         [[validator]]\ntype = \"jwt\"\nissuer = \"https://idp.invalid/realms/ops/\"\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n"
    );
    let path = write_file(dir.path(), "good.toml", &toml);
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .env("INTROSPECTION_SECRET", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config ok");
}

// ---------------------------------------------------------------------------------------------
// OIDC discovery

/// A stand-in OpenID provider: its discovery document at
/// `/realms/ops/.well-known/openid-configuration`, and JWKS documents at the paths it names.
struct Provider {
    port: u16,
    document: Arc<Mutex<Value>>,
    /// Path → JWKS; other paths answer 404.
    jwks: Arc<Mutex<HashMap<String, Value>>>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

const DISCOVERY_PATH: &str = "/realms/ops/.well-known/openid-configuration";

impl Provider {
    async fn start() -> Provider {
        let document: Arc<Mutex<Value>> = Arc::default();
        let jwks: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let discovery_hits = Arc::new(AtomicUsize::new(0));
        let jwks_hits = Arc::new(AtomicUsize::new(0));
        let (d, j, dh, jh) = (
            document.clone(),
            jwks.clone(),
            discovery_hits.clone(),
            jwks_hits.clone(),
        );
        let port = serve(Arc::new(
            move |parts: &hyper::http::request::Parts, _: &[u8]| {
                let path = parts.uri.path();
                if path == DISCOVERY_PATH {
                    dh.fetch_add(1, Ordering::SeqCst);
                    return (200, d.lock().unwrap().to_string());
                }
                jh.fetch_add(1, Ordering::SeqCst);
                match j.lock().unwrap().get(path) {
                    Some(keys) => (200, keys.to_string()),
                    None => (404, "{}".to_string()),
                }
            },
        ))
        .await;
        let provider = Provider {
            port,
            document,
            jwks,
            discovery_hits,
            jwks_hits,
        };
        provider.name(&provider.issuer(), "/keys");
        provider
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}/realms/ops", self.port)
    }

    /// The discovery document says `issuer` and that the keys are at `jwks_path`.
    fn name(&self, issuer: &str, jwks_path: &str) {
        *self.document.lock().unwrap() = json!({
            "issuer": issuer,
            "jwks_uri": format!("http://127.0.0.1:{}{jwks_path}", self.port),
            "id_token_signing_alg_values_supported": ["RS256"],
        });
    }

    /// Serves `keys` at `path` (none: 404).
    fn publish(&self, path: &str, keys: Option<Vec<Value>>) {
        let mut jwks = self.jwks.lock().unwrap();
        match keys {
            Some(keys) => jwks.insert(path.to_string(), json!({ "keys": keys })),
            None => jwks.remove(path),
        };
    }

    fn hits(&self) -> (usize, usize) {
        (
            self.discovery_hits.load(Ordering::SeqCst),
            self.jwks_hits.load(Ordering::SeqCst),
        )
    }
}

fn discovery_gate(issuer: &str, up: u16) -> Gate {
    Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[cache]
negative_ttl = "1s"

[[validator]]
type = "jwt"
issuer = "{issuer}"
audience = "{AUDIENCE}"
groups_claim = "realm_access.roles"

{static_validator}

{route}"#,
        port = free_port(),
        static_validator = static_validator(&[("plain-static-token", "carol", "ops")]),
        route = catch_all_route(up, "\"X-Groups\" = \"{groups}\""),
    ))
}

fn claims(issuer: &str, sub: &str) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": sub,
        "exp": now() + 3600,
        "realm_access": {"roles": ["ops"]},
        "jti": format!("t{}", N.fetch_add(1, Ordering::SeqCst)),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_found_by_oidc_discovery_are_used_and_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2, k3) = (
        RsaKey::generate(dir.path(), "k1"),
        RsaKey::generate(dir.path(), "k2"),
        RsaKey::generate(dir.path(), "k3"),
    );
    let provider = Provider::start().await;
    provider.publish("/keys", Some(vec![k1.jwk_with_kid("k1")]));
    let issuer = provider.issuer();
    let up = Upstream::start();
    let gate = discovery_gate(&issuer, up.port);
    assert_eq!(
        provider.hits(),
        (0, 0),
        "nothing is fetched before it is needed"
    );

    let resp = bearer(&gate, "/api", &k1.rs256("k1", &claims(&issuer, "alice"))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("x-groups").as_deref(), Some("ops"));
    assert_eq!(provider.hits(), (1, 1));
    // The issuer is still checked on tokens.
    bearer(
        &gate,
        "/api",
        &k1.rs256("k1", &claims("https://evil.example", "mallory")),
    )
    .await
    .assert_error(401, "Invalid credentials");

    // Rotation: a new kid refetches the key set from where discovery said (after the 10 s
    // refetch interval), without reading the document again.
    provider.publish("/keys", Some(vec![k2.jwk_with_kid("k2")]));
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let resp = bearer(&gate, "/api", &k2.rs256("k2", &claims(&issuer, "bob"))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(provider.hits(), (1, 2));

    // The provider moves its keys: the old place answers 404, so the document is read again
    // and the keys fetched from the new place.
    provider.publish("/keys", None);
    provider.publish("/keys/v2", Some(vec![k3.jwk_with_kid("k3")]));
    provider.name(&issuer, "/keys/v2");
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let resp = bearer(&gate, "/api", &k3.rs256("k3", &claims(&issuer, "carl"))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("carl"));
    assert_eq!(provider.hits(), (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_that_names_another_issuer_or_fails_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let key = RsaKey::generate(dir.path(), "k1");
    let provider = Provider::start().await;
    provider.publish("/keys", Some(vec![key.jwk_with_kid("k1")]));
    let issuer = provider.issuer();
    // The document names another issuer: its keys are not used for this one.
    provider.name("https://evil.example", "/keys");
    let up = Upstream::start();
    let mut gate = discovery_gate(&issuer, up.port);
    let token = key.rs256("k1", &claims(&issuer, "alice"));
    bearer(&gate, "/api", &token)
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert_eq!(provider.hits(), (1, 0), "no key set fetched");
    // Other validators keep working, and so does the gate.
    assert_eq!(
        bearer(&gate, "/api", "plain-static-token").await.status,
        200
    );
    assert!(gate.is_running());
    // Fixed (the issuer it names now matches): after the refetch interval, accepted.
    provider.name(&issuer, "/keys");
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let resp = bearer(&gate, "/api", &token).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    drop(gate);

    // Nobody serves the document.
    let gone = format!("http://127.0.0.1:{}/realms/ops", free_port());
    let mut gate = discovery_gate(&gone, up.port);
    bearer(&gate, "/api", &key.rs256("k1", &claims(&gone, "alice")))
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert!(gate.is_running());
    assert!(
        gate.log().contains("OIDC discovery document"),
        "{}",
        gate.log()
    );
}
