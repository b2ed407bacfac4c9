//! Issued tokens and their stores (SPEC §3 `[store]` `[tokens]` `[endpoints]` `[admin]`, §5, §6),
//! end to end: the real binary, real configs on loopback, a real upstream, a real SQLite file and
//! real Redis servers (a private `redis-server` on a free port per test, killed when the test
//! ends; skipped with one line when `redis-server` is not installed).
//!
//! Every token goes through its whole life on every surface that issues tokens (the CLI, the
//! admin API, the caller's own API on the main listener, the Insight.io endpoints): created,
//! used in all four header dialects (the upstream sees the route's form and the identity),
//! listed (id, never the secret), revoked, refused.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::time::Instant;

const ADMIN_TOKEN: &str = "admin-secret-3f9c1a7e";
/// Static tokens of two users, to call the APIs with.
const ALICE: &str = "static-alice-5d1e0b";
const BOB: &str = "static-bob-88c2f4";

/// The four dialects of SPEC §1 and how each carries a token.
fn sqlite_store(path: &Path) -> String {
    format!(
        "[store]\nbackend = \"sqlite\"\npath = \"{}\"\n",
        path.display()
    )
}

fn redis_store(url: &str, prefix: &str) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n")
}

/// A gate with an admin listener, the token endpoints, the Insight.io endpoints, a static
/// validator for ALICE and BOB, and one route whose upstream expects `X-Legacy-Auth: tok=TOKEN`
/// and identity headers.
fn config(port: u16, admin_port: u16, up: u16, store: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[endpoints]
tokens_prefix = "/_tokengate"
insight = true

{store}
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[route.upstream_auth]
header = "X-Legacy-Auth"
value = "tok={{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"X-Auth-Account" = "{{account}}"
"X-Token-Id" = "{{token_id}}"
"#,
        validator = static_validator(&[(ALICE, "alice", "alice-acct"), (BOB, "bob", "bob-acct")])
    )
}

/// A running gate and what it talks to.
struct Setup {
    gate: Gate,
    admin_port: u16,
    _up: Upstream,
}

impl Setup {
    fn start(store: &str) -> Setup {
        let up = Upstream::start();
        let admin_port = free_port();
        let gate = Gate::start(&config(free_port(), admin_port, up.port, store));
        wait_port(admin_port);
        Setup {
            gate,
            admin_port,
            _up: up,
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// A request to the admin listener with the admin token.
    async fn admin(&self, method: &str, path: &str, body: &str) -> Resp {
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        send(build(
            method,
            &self.admin_url(path),
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            full(body.to_string()),
        ))
        .await
    }

    /// Creates a token through the admin API: (token, id).
    async fn admin_create(&self, body: &str) -> (String, String) {
        let resp = self.admin("POST", "/tokens", body).await;
        assert_eq!(
            resp.status,
            201,
            "admin POST /tokens {body}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        let json = resp.json();
        let token = json["token"].as_str().expect("token").to_string();
        let id = json["id"].as_str().expect("id").to_string();
        assert_token_shape(&token);
        (token, id)
    }

    /// A request to the main listener as `caller` (a token in `X-Auth-Token`).
    async fn call(&self, method: &str, path: &str, caller: &str, body: &str) -> Resp {
        send(build(
            method,
            &self.gate.url(path),
            &[
                ("x-auth-token", caller),
                ("content-type", "application/json"),
            ],
            full(body.to_string()),
        ))
        .await
    }

    /// `tokengate_cache_entries` from the admin `/metrics`.
    async fn cache_entries(&self) -> f64 {
        let resp = get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(resp.status, 200, "/metrics");
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("tokengate_cache_entries "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no tokengate_cache_entries in /metrics:\n{text}"))
    }

    async fn readyz(&self) -> u16 {
        get(&self.admin_url("/readyz"), &[]).await.status.as_u16()
    }
}

/// `tg_` + 43 base64url characters + a 6-character base62 checksum (SPEC §5).
fn assert_token_shape(token: &str) {
    assert_eq!(token.len(), 52, "token length: {token:?}");
    assert!(token.starts_with("tg_"), "token prefix: {token:?}");
    assert!(
        token[3..46]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "token body alphabet: {token:?}"
    );
    assert!(
        token[46..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "token checksum alphabet: {token:?}"
    );
}

/// Uses `token` in every dialect and checks what the upstream received: the route's credential
/// form, the identity, and none of the client's credential headers. Returns the token id the
/// identity headers carried.
async fn assert_works(gate: &Gate, token: &str, subject: &str, account: &str) -> String {
    let mut ids = Vec::new();
    for (dialect, prefix) in DIALECTS {
        let value = format!("{prefix}{token}");
        let resp = get(&gate.url("/api/data"), &[(dialect, &value)]).await;
        assert_eq!(
            resp.status,
            200,
            "{dialect}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            resp.echoed("x-legacy-auth"),
            Some(format!("tok={token}")),
            "{dialect}: the upstream gets the route's form"
        );
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some(subject));
        assert_eq!(resp.echoed("x-auth-account").as_deref(), Some(account));
        for (incoming, _) in DIALECTS {
            assert_eq!(
                resp.echoed(incoming),
                None,
                "{dialect}: the client's {incoming} must not reach the upstream"
            );
        }
        ids.push(resp.echoed("x-token-id").expect("X-Token-Id"));
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "token ids: {ids:?}");
    ids.pop().expect("an id")
}

/// Every dialect gets 401 `{"error":"Invalid credentials"}`.
async fn assert_refused(gate: &Gate, token: &str) {
    for (dialect, prefix) in DIALECTS {
        let value = format!("{prefix}{token}");
        get(&gate.url("/api/data"), &[(dialect, &value)])
            .await
            .assert_error(401, "Invalid credentials");
    }
}

/// Polls with `token` until the gate refuses it; how long that took. Panics after `within`.
async fn wait_refused(gate: &Gate, token: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let resp = get(&gate.url("/api/poll"), &[("x-auth-token", token)]).await;
        if resp.status == 401 {
            resp.assert_error(401, "Invalid credentials");
            return start.elapsed();
        }
        assert_eq!(resp.status, 200, "while waiting for the revocation");
        assert!(
            start.elapsed() < within,
            "the revoked token still works after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Uses `token` on `path` (a path no other request of the test uses) twice; the second use
/// must come from the cache, so a later refusal proves an eviction, not a fresh store lookup.
async fn use_twice_cached(gate: &Gate, token: &str, path: &str) {
    for _ in 0..2 {
        let resp = get(&gate.url(path), &[("x-auth-token", token)]).await;
        assert_eq!(resp.status, 200, "{path}");
    }
    // The access log is written by a background writer: wait for both lines.
    let deadline = Instant::now() + Duration::from_secs(3);
    let lines = loop {
        let lines: Vec<Value> = gate
            .access_lines()
            .into_iter()
            .filter(|l| l["path"] == path)
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Workers write their lines in batches of their own: order them by time.
    let mut lines = lines;
    lines.sort_by(|a, b| a["timestamp"].as_str().cmp(&b["timestamp"].as_str()));
    assert_eq!(lines.len(), 2, "two access lines for {path}: {lines:?}");
    assert_eq!(
        lines[1]["validator"], "cache",
        "the second use of {path} should have been served from the cache: {}",
        lines[1]
    );
}

/// `tokengate token ARGS --config CONFIG`.
fn token_cli(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("token").args(args).arg("--config").arg(config);
    cmd.stdin(Stdio::null())
        .output()
        .expect("run tokengate token")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `token create` must succeed and print the token, once, alone on standard output.
fn cli_create(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["create"];
    all.extend_from_slice(args);
    let out = token_cli(config, &all);
    assert!(
        out.status.success(),
        "token create {args:?}: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the token alone: {stdout:?}");
    let token = lines[0].trim().to_string();
    assert_token_shape(&token);
    assert!(
        !text(&out.stderr).contains(&token),
        "the token is printed once"
    );
    token
}

fn ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// 1. The lifecycle through each surface
// ---------------------------------------------------------------------------------------------

/// CLI: create → four dialects → list → revoke → refused (the running server learns of the
/// revocation from the shared store and evicts its cache entry within a second).
async fn cli_lifecycle(setup: &Setup) {
    let config = &setup.gate.config_path;
    let token = cli_create(
        config,
        &["--user", "carol", "--account", "ops", "--name", "laptop"],
    );
    let id = assert_works(&setup.gate, &token, "carol", "ops").await;
    use_twice_cached(&setup.gate, &token, "/cli/cached").await;

    let out = token_cli(config, &["list"]);
    assert!(out.status.success(), "token list: {}", text(&out.stderr));
    let listed = text(&out.stdout);
    let row = listed
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("token list shows the id {id}:\n{listed}"));
    assert!(row.contains("carol") && row.contains("ops") && row.contains("laptop"));
    assert!(
        !listed.contains(&token),
        "token list never shows the secret"
    );
    assert!(!listed.contains(&token[3..46]), "not even its random part");
    let mine = text(&token_cli(config, &["list", "--user", "carol"]).stdout);
    assert!(mine.contains(&id), "token list --user carol: {mine}");
    let others = text(&token_cli(config, &["list", "--user", "nobody"]).stdout);
    assert!(!others.contains(&id), "token list --user nobody: {others}");

    let out = token_cli(config, &["revoke", &id]);
    assert!(out.status.success(), "token revoke: {}", text(&out.stderr));
    let latency = wait_refused(&setup.gate, &token, Duration::from_secs(1)).await;
    println!(
        "CLI revocation ({}) reached the running server in {latency:?}",
        setup.gate.config_path.display()
    );
    assert_refused(&setup.gate, &token).await;
    let listed = text(&token_cli(config, &["list"]).stdout);
    assert!(!listed.contains(&id), "a revoked token is not listed");
    let again = token_cli(config, &["revoke", &id]);
    assert!(!again.status.success(), "revoking an unknown id fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_lifecycle_on_the_sqlite_file_the_server_uses() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::start(&sqlite_store(&dir.path().join("tokens.db")));
    cli_lifecycle(&setup).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_lifecycle_on_the_redis_the_server_uses() {
    // Glob characters in the prefix must not confuse `token list` (it SCANs the id keys).
    let prefix = format!("{}[a]?*:", unique_prefix("cli"));
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let setup = Setup::start(&redis_store(&redis.url(), &prefix));
    cli_lifecycle(&setup).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_lifecycle_and_admin_token_required() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::start(&sqlite_store(&dir.path().join("tokens.db")));

    // Without the admin token, with a user's token, with a wrong one: 401, nothing created.
    let (alice_issued, _) = setup
        .admin_create(r#"{"user":"alice","name":"for the 401 checks"}"#)
        .await;
    let body = r#"{"user":"mallory"}"#;
    for authorization in [
        None,
        Some(format!("Bearer {ALICE}")),
        Some(format!("Bearer {alice_issued}")),
        Some("Bearer admin-secret-wrong".to_string()),
        Some(ADMIN_TOKEN.to_string()),
    ] {
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        for (method, path) in [("POST", "/tokens"), ("GET", "/tokens")] {
            let resp = send(build(
                method,
                &setup.admin_url(path),
                &headers,
                full(body.to_string()),
            ))
            .await;
            assert_eq!(resp.status, 401, "{method} {path} with {authorization:?}");
            assert!(resp.json()["error"].is_string(), "a JSON error body");
        }
        // The user's own token is no admin token either for X-Auth-Token.
        let resp = send(build(
            "POST",
            &setup.admin_url("/tokens"),
            &[("x-auth-token", ALICE)],
            full(body.to_string()),
        ))
        .await;
        assert_eq!(resp.status, 401);
    }
    let all = setup.admin("GET", "/tokens", "").await;
    assert_eq!(all.status, 200);
    assert!(
        !text(&all.body).contains("mallory"),
        "refused requests created nothing: {}",
        text(&all.body)
    );

    // Create for any user, use, list, revoke.
    let (token, id) = setup
        .admin_create(r#"{"user":"dave","name":"deploy","ttl":"1h"}"#)
        .await;
    assert_eq!(assert_works(&setup.gate, &token, "dave", "dave").await, id);
    use_twice_cached(&setup.gate, &token, "/admin/cached").await;

    for path in ["/tokens", "/tokens?user=dave"] {
        let list = setup.admin("GET", path, "").await;
        assert_eq!(list.status, 200);
        assert!(!text(&list.body).contains(&token), "never the secret");
        let entry = list
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .find(|t| t["id"] == id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("GET {path} lists {id}: {}", text(&list.body)));
        assert_eq!(entry["subject"], "dave");
        assert_eq!(entry["name"], "deploy");
        assert!(entry["expires"].is_string(), "ttl 1h: an expiry {entry}");
        assert!(entry.get("token").is_none(), "{entry}");
    }
    let bobs = setup.admin("GET", "/tokens?user=bob", "").await;
    assert!(!text(&bobs.body).contains(&id), "?user= filters");

    let resp = setup.admin("DELETE", &format!("/tokens/{id}"), "").await;
    assert_eq!(resp.status, 204, "{}", text(&resp.body));
    // The revoking process evicts its own cache entry at once.
    assert_refused(&setup.gate, &token).await;
    let resp = setup.admin("DELETE", &format!("/tokens/{id}"), "").await;
    assert_eq!(resp.status, 404, "already revoked");
    let list = setup.admin("GET", "/tokens?user=dave", "").await;
    assert!(!text(&list.body).contains(&id), "revoked: not listed");
}

#[tokio::test(flavor = "multi_thread")]
async fn main_listener_api_manages_only_the_callers_own_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::start(&sqlite_store(&dir.path().join("tokens.db")));

    // No credential: 401, as on any route that requires one.
    let resp = post(&setup.gate.url("/_tokengate/tokens"), &[], "{}").await;
    resp.assert_error(401, "Credentials required");

    let resp = setup
        .call(
            "POST",
            "/_tokengate/tokens",
            ALICE,
            r#"{"name":"ci","ttl":"1h"}"#,
        )
        .await;
    assert_eq!(resp.status, 201, "{}", text(&resp.body));
    assert_eq!(
        resp.header("cache-control").as_deref(),
        Some("no-cache, no-store")
    );
    let created = resp.json();
    for key in ["id", "token", "created", "expires"] {
        assert!(created[key].is_string(), "{key} in {created}");
    }
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_token_shape(&token);
    assert_eq!(
        assert_works(&setup.gate, &token, "alice", "alice-acct").await,
        id
    );

    // A user cannot mint tokens for someone else.
    let resp = setup
        .call("POST", "/_tokengate/tokens", ALICE, r#"{"user":"bob"}"#)
        .await;
    assert_eq!(resp.status, 400, "{}", text(&resp.body));

    // Listing: the caller's own, never a secret; the issued token may list too.
    for caller in [ALICE, token.as_str()] {
        let list = setup.call("GET", "/_tokengate/tokens", caller, "").await;
        assert_eq!(list.status, 200);
        assert!(!text(&list.body).contains(&token), "never the secret");
        let ids: Vec<Value> = list
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|t| t["id"].clone())
            .collect();
        assert_eq!(ids, [Value::from(id.as_str())], "alice's tokens");
    }
    let bobs = setup.call("GET", "/_tokengate/tokens", BOB, "").await;
    assert_eq!(bobs.status, 200);
    assert_eq!(
        bobs.json(),
        Value::Array(vec![]),
        "bob sees none of alice's"
    );

    // Bob cannot revoke alice's token; it keeps working.
    let resp = setup
        .call("DELETE", &format!("/_tokengate/tokens/{id}"), BOB, "")
        .await;
    assert_eq!(resp.status, 404, "{}", text(&resp.body));
    assert_works(&setup.gate, &token, "alice", "alice-acct").await;

    // Alice can.
    let resp = setup
        .call("DELETE", &format!("/_tokengate/tokens/{id}"), ALICE, "")
        .await;
    assert_eq!(resp.status, 204, "{}", text(&resp.body));
    assert_refused(&setup.gate, &token).await;
    let list = setup.call("GET", "/_tokengate/tokens", ALICE, "").await;
    assert_eq!(list.json(), Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread")]
async fn insight_endpoints_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::start(&sqlite_store(&dir.path().join("tokens.db")));

    let before = ms_now();
    let resp = setup.call("GET", "/api/createApiToken", ALICE, "").await;
    assert_eq!(resp.status, 200, "{}", text(&resp.body));
    let token = text(&resp.body);
    assert_token_shape(&token);
    let after = ms_now();
    let id = assert_works(&setup.gate, &token, "alice", "alice-acct").await;

    // Exactly [{"uid","apiToken","created","lastUsed"}], apiToken = the id, times in ms.
    let list = setup.call("GET", "/api/getApiTokens", ALICE, "").await;
    assert_eq!(list.status, 200);
    assert!(!text(&list.body).contains(&token), "never the secret");
    let entries = list.json();
    let entries = entries.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entries[0].as_object().expect("an object");
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["apiToken", "created", "lastUsed", "uid"]);
    assert_eq!(entry["uid"], "alice");
    assert_eq!(entry["apiToken"], id.as_str());
    let created = entry["created"].as_i64().expect("created in ms");
    assert!(
        (before..=after).contains(&created),
        "created {created} in [{before}, {after}]"
    );
    assert!(
        entry["lastUsed"].is_i64() || entry["lastUsed"].is_null(),
        "{entry:?}"
    );
    let bobs = setup.call("GET", "/api/getApiTokens", BOB, "").await;
    assert_eq!(bobs.json(), Value::Array(vec![]), "bob sees none");

    // Revoke the presented token: 200, then it is refused.
    let resp = get(
        &setup.gate.url("/api/revokeApiToken"),
        &[("x-auth-token", &token)],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", text(&resp.body));
    assert_refused(&setup.gate, &token).await;
    let list = setup.call("GET", "/api/getApiTokens", ALICE, "").await;
    assert_eq!(list.json(), Value::Array(vec![]));

    // Always 200 (no oracle): already revoked, garbage, a malformed tg_ string.
    let malformed = format!("{}x", &token[..51]);
    for presented in [token.as_str(), "garbage-not-a-token", malformed.as_str()] {
        let resp = get(
            &setup.gate.url("/api/revokeApiToken"),
            &[("x-auth-token", presented)],
        )
        .await;
        assert_eq!(
            resp.status,
            200,
            "revokeApiToken with {presented:?}: {}",
            text(&resp.body)
        );
    }
    // And the revocations of nonsense changed nothing for the static tokens.
    assert_eq!(
        setup
            .call("GET", "/api/getApiTokens", ALICE, "")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_create_requests_are_400_with_a_message_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::start(&sqlite_store(&dir.path().join("tokens.db")));
    let bad = [
        ("{\"name\":", "malformed JSON"),
        ("not json at all", "not JSON"),
        ("[]", "not an object"),
        (r#"{"name":"x","colour":"red"}"#, "unknown field"),
        (r#"{"nmae":"x"}"#, "misspelt field"),
        (r#"{"ttl":"forever"}"#, "ttl not a duration"),
        (r#"{"ttl":"10 parsecs"}"#, "ttl bad unit"),
        (r#"{"ttl":-5}"#, "negative ttl"),
        (r#"{"ttl":1.5}"#, "fractional ttl"),
        (r#"{"ttl":true}"#, "ttl of the wrong type"),
        (r#"{"name":42}"#, "name of the wrong type"),
    ];
    for (body, why) in bad {
        let resp = setup.call("POST", "/_tokengate/tokens", ALICE, body).await;
        assert_bad_request(&resp, body, why);
        let admin_body = match serde_json::from_str::<Value>(body) {
            Ok(Value::Object(mut map)) => {
                map.insert("user".into(), "alice".into());
                Value::Object(map).to_string()
            }
            _ => body.to_string(),
        };
        let resp = setup.admin("POST", "/tokens", &admin_body).await;
        assert_bad_request(&resp, &admin_body, why);
    }
    let resp = setup.admin("POST", "/tokens", r#"{"name":"x"}"#).await;
    assert_bad_request(&resp, r#"{"name":"x"}"#, "admin create without user");

    let mine = setup.call("GET", "/_tokengate/tokens", ALICE, "").await;
    assert_eq!(mine.json(), Value::Array(vec![]), "nothing was created");
    let all = setup.admin("GET", "/tokens", "").await;
    assert_eq!(all.json(), Value::Array(vec![]), "nothing was created");
    let cli = text(&token_cli(&setup.gate.config_path, &["list"]).stdout);
    assert_eq!(cli.lines().count(), 1, "only the header line: {cli}");
}

fn assert_bad_request(resp: &Resp, body: &str, why: &str) {
    assert_eq!(resp.status, 400, "{why}: {body} → {:?}", text(&resp.body));
    let message = resp.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.len() > 8 && message != "Bad request",
        "{why}: a readable message, got {message:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. SQLite: durability and concurrent writers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_token_survives_kill_9_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir.path().join("tokens.db"));
    let up = Upstream::start();
    let setup = Setup::start(&store);

    let resp = setup
        .call("POST", "/_tokengate/tokens", ALICE, r#"{"name":"durable"}"#)
        .await;
    assert_eq!(resp.status, 201, "{}", text(&resp.body));
    let kept = resp.json()["token"].as_str().unwrap().to_string();
    let (gone, gone_id) = setup.admin_create(r#"{"user":"alice"}"#).await;
    let resp = setup
        .admin("DELETE", &format!("/tokens/{gone_id}"), "")
        .await;
    assert_eq!(resp.status, 204);
    // SIGKILL at once, right after the 201/204 (dropping the gate: Child::kill, SIGKILL on
    // Unix), so nothing gets a chance to flush on the way out.
    drop(setup);

    let admin_port = free_port();
    let gate = Gate::start(&config(free_port(), admin_port, up.port, &store));
    wait_port(admin_port);
    assert_works(&gate, &kept, "alice", "alice-acct").await;
    assert_refused(&gate, &gone).await;
}

#[test]
fn sqlite_drops_expired_tokens_when_it_stores_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let config = write_file(
        dir.path(),
        "tokengate.toml",
        &config(free_port(), free_port(), free_port(), &sqlite_store(&db)),
    );
    let rows = || -> i64 {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
            .unwrap()
    };
    cli_create(&config, &["--user", "alice", "--ttl", "1s"]);
    cli_create(&config, &["--user", "alice", "--name", "long-lived"]);
    assert_eq!(rows(), 2);
    std::thread::sleep(Duration::from_millis(1100));
    // The expired row is gone once another token is stored; the unexpiring one stays.
    cli_create(&config, &["--user", "bob", "--ttl", "1h"]);
    assert_eq!(rows(), 2, "the expired token was not purged");
    let out = token_cli(&config, &["list"]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains("long-lived") && listed.contains("bob"),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_concurrent_writers_server_and_cli_processes() {
    const CLI_RUNS: usize = 8;
    const API_CREATES: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let setup = std::sync::Arc::new(Setup::start(&sqlite_store(&dir.path().join("tokens.db"))));
    let config = setup.gate.config_path.clone();

    // The CLI processes and the server write the same file at the same time.
    let children: Vec<_> = (0..CLI_RUNS)
        .map(|i| {
            Command::new(BIN)
                .args(["token", "create", "--user", &format!("cli{i}")])
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn tokengate token create")
        })
        .collect();
    let mut api = tokio::task::JoinSet::new();
    for i in 0..API_CREATES {
        let setup = std::sync::Arc::clone(&setup);
        api.spawn(async move {
            let body = format!(r#"{{"user":"api{i}"}}"#);
            (format!("api{i}"), setup.admin_create(&body).await.0)
        });
    }
    let mut tokens: Vec<(String, String)> = Vec::new();
    while let Some(joined) = api.join_next().await {
        tokens.push(joined.expect("API create task"));
    }
    for (i, child) in children.into_iter().enumerate() {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .expect("wait for token create");
        assert!(
            out.status.success(),
            "token create #{i}: {}",
            text(&out.stderr)
        );
        let token = text(&out.stdout).trim().to_string();
        assert_token_shape(&token);
        tokens.push((format!("cli{i}"), token));
    }
    assert_eq!(tokens.len(), CLI_RUNS + API_CREATES);

    let mut ids = Vec::new();
    for (user, token) in &tokens {
        let resp = get(
            &setup.gate.url("/api/data"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(resp.status, 200, "{user}'s token");
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some(user.as_str()));
        ids.push(resp.echoed("x-token-id").expect("token id"));
    }
    let listed = text(&token_cli(&config, &["list"]).stdout);
    assert_eq!(
        listed.lines().count(),
        1 + CLI_RUNS + API_CREATES,
        "a header and one row per token:\n{listed}"
    );
    for id in &ids {
        assert!(listed.contains(id.as_str()), "{id} listed:\n{listed}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Redis: two replicas, expiry
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn redis_revocation_reaches_the_other_replica_within_a_second() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&redis.url(), "tg:");
    let one = Setup::start(&store);
    let two = Setup::start(&store);

    // Created on one, valid on both (shared store), cached on both.
    let (token, id) = one.admin_create(r#"{"user":"frank"}"#).await;
    assert_eq!(assert_works(&one.gate, &token, "frank", "frank").await, id);
    assert_eq!(assert_works(&two.gate, &token, "frank", "frank").await, id);
    use_twice_cached(&one.gate, &token, "/replica/one").await;
    use_twice_cached(&two.gate, &token, "/replica/two").await;
    // Listed by the other replica too.
    let listed = two.admin("GET", "/tokens?user=frank", "").await;
    assert!(text(&listed.body).contains(&id));

    let sent = Instant::now();
    let resp = one.admin("DELETE", &format!("/tokens/{id}"), "").await;
    assert_eq!(resp.status, 204);
    let answered = sent.elapsed();
    let latency = wait_refused(&two.gate, &token, Duration::from_secs(1)).await;
    println!(
        "redis revocation: DELETE answered in {answered:?}; the other replica refused the token {latency:?} later"
    );
    assert!(latency < Duration::from_secs(1));
    get(&one.gate.url("/api/data"), &[("x-auth-token", &token)])
        .await
        .assert_error(401, "Invalid credentials");
}

/// A TCP relay to a Redis server that can silently stop relaying the connections it holds
/// (no FIN, no RST: what a dropped NAT entry or a vanished peer looks like), while connections
/// made afterwards are relayed normally.
struct Relay {
    port: u16,
    accepted: Arc<AtomicUsize>,
    cut_below: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(redis_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            accepted: Arc::new(AtomicUsize::new(0)),
            cut_below: Arc::new(AtomicUsize::new(0)),
        };
        let (accepted, cut_below) = (relay.accepted.clone(), relay.cut_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (client_r, client_w) = client.into_split();
                let (server_r, server_w) = server.into_split();
                tokio::spawn(pipe(client_r, server_w, n, cut_below.clone()));
                tokio::spawn(pipe(server_r, client_w, n, cut_below.clone()));
            }
        });
        relay
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// From now on, bytes on the connections made so far are swallowed.
    fn black_hole_existing(&self) {
        self.cut_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: usize,
    cut_below: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buf).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if n < cut_below.load(Ordering::SeqCst) {
            continue; // swallowed, the connection stays open
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_silently_dead_subscription_is_replaced_and_the_revocation_still_wins() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let prefix = "tg:";
    let relay = Relay::start(redis.port).await;
    let behind_relay = Setup::start(&redis_store(&relay.url(), prefix));
    let direct = Setup::start(&redis_store(&redis.url(), prefix));

    let (token, id) = direct.admin_create(r#"{"user":"gina"}"#).await;
    assert_works(&behind_relay.gate, &token, "gina", "gina").await;
    use_twice_cached(&behind_relay.gate, &token, "/silent/cached").await;

    // The replica's Redis connections go silent; the revocation message never reaches it.
    relay.black_hole_existing();
    let resp = direct.admin("DELETE", &format!("/tokens/{id}"), "").await;
    assert_eq!(resp.status, 204);
    // Its own heartbeats stop coming back: within the silence limit plus a heartbeat (15 + 5 s)
    // it resubscribes on a new connection and drops the store-validated cache entries; the
    // token is then checked against the store again (503 while the old command connection
    // times out, then 401).
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    loop {
        let resp = get(
            &behind_relay.gate.url("/api/poll"),
            &[("x-auth-token", &token)],
        )
        .await;
        match resp.status.as_u16() {
            401 => break,
            200 | 503 => {}
            other => panic!("unexpected {other}: {:?}", resp.body),
        }
        assert!(
            start.elapsed() < limit,
            "the revoked token still works {limit:?} after its connections went silent:\n{}",
            behind_relay.gate.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "silent subscription: revoked token refused after {:?}",
        start.elapsed()
    );
    assert!(
        behind_relay
            .gate
            .log()
            .contains("revocation subscription silent"),
        "{}",
        behind_relay.gate.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_token_with_ttl_has_a_redis_expiry_and_is_refused_once_expired() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = "tg:";
    let setup = Setup::start(&redis_store(&server.url(), prefix));
    let mut redis = server.connection();

    let (token, id) = setup.admin_create(r#"{"user":"gina","ttl":"3s"}"#).await;
    let created = Instant::now();
    let (defaulted, _) = setup.admin_create(r#"{"user":"gina"}"#).await;
    let pttl = |redis: &mut redis::Connection, key: String| -> i64 {
        redis::cmd("PTTL").arg(&key).query(redis).expect("PTTL")
    };
    let key = format!("{prefix}t:{}", sha256_hex(&token));
    let ms = pttl(&mut redis, key.clone());
    println!("PTTL {key} = {ms} ms");
    assert!(
        (1..=3000).contains(&ms),
        "a token with ttl 3s expires in Redis: PTTL {ms}"
    );
    let id_ms = pttl(&mut redis, format!("{prefix}i:{id}"));
    assert!((1..=3000).contains(&id_ms), "its id key too: PTTL {id_ms}");
    let default = pttl(&mut redis, format!("{prefix}t:{}", sha256_hex(&defaulted)));
    let ninety_days: i64 = 90 * 86_400_000;
    assert!(
        (ninety_days - 60_000..=ninety_days).contains(&default),
        "a token without ttl expires after default_ttl, 90 days (PTTL {default})"
    );

    assert_works(&setup.gate, &token, "gina", "gina").await;
    assert!(
        created.elapsed() < Duration::from_millis(2500),
        "the machine is too slow for this test"
    );
    tokio::time::sleep(Duration::from_millis(3100).saturating_sub(created.elapsed())).await;
    assert_refused(&setup.gate, &token).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut redis).unwrap();
    assert_eq!(exists, 0, "Redis dropped the expired token");
    assert_works(&setup.gate, &defaulted, "gina", "gina").await;
}

// ---------------------------------------------------------------------------------------------
// 4. Redis down: fail closed, then recovery without a restart of tokengate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_fails_closed_and_recovers_without_restart() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let prefix = "tg:";
    let setup = Setup::start(&redis_store(&redis.url(), prefix));
    let channel = format!("{prefix}revocations");
    let subscribers = |redis: &RedisServer| -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query(&mut redis.connection())
            .expect("PUBSUB NUMSUB");
        n
    };

    let (a, a_id) = setup.admin_create(r#"{"user":"hank"}"#).await;
    let (b, _) = setup.admin_create(r#"{"user":"hank"}"#).await;
    use_twice_cached(&setup.gate, &a, "/down/a-before").await;
    assert_eq!(setup.readyz().await, 200);
    assert_eq!(subscribers(&redis), 1, "the gate follows revocations");

    redis.kill();
    // A is cached: it still works. B must be looked up: 503, fail closed.
    let resp = get(&setup.gate.url("/down/a"), &[("x-auth-token", &a)]).await;
    assert_eq!(resp.status, 200, "a cached token survives a store outage");
    for _ in 0..2 {
        get(&setup.gate.url("/down/b"), &[("x-auth-token", &b)])
            .await
            .assert_error(503, "Authentication backend unavailable");
    }
    assert_eq!(setup.readyz().await, 503, "/readyz while the store is down");
    // The admin API says so too, instead of pretending.
    assert_eq!(setup.admin("GET", "/tokens", "").await.status, 503);

    redis.restart();
    let restarted = Instant::now();
    let recovered = loop {
        let resp = get(&setup.gate.url("/down/b-after"), &[("x-auth-token", &b)]).await;
        if resp.status == 200 {
            break restarted.elapsed();
        }
        resp.assert_error(503, "Authentication backend unavailable");
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "token B still refused 5 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ready = loop {
        if setup.readyz().await == 200 {
            break restarted.elapsed();
        }
        assert!(restarted.elapsed() < Duration::from_secs(5), "/readyz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let resubscribed = loop {
        if subscribers(&redis) >= 1 {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "the revocation subscription was not restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "redis restart: token B works after {recovered:?}, /readyz 200 after {ready:?}, resubscribed after {resubscribed:?}"
    );
    // A new token works too.
    let (c, _) = setup.admin_create(r#"{"user":"hank"}"#).await;
    assert_works(&setup.gate, &c, "hank", "hank").await;

    // Revocations made elsewhere (the CLI, another process) reach this gate again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    use_twice_cached(&setup.gate, &a, "/down/a-after").await;
    let out = token_cli(&setup.gate.config_path, &["revoke", &a_id]);
    assert!(out.status.success(), "token revoke: {}", text(&out.stderr));
    let latency = wait_refused(&setup.gate, &a, Duration::from_secs(1)).await;
    println!("after the restart, a CLI revocation reached the gate in {latency:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_at_startup_serves_and_recovers() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    redis.kill();
    let setup = Setup::start(&redis_store(&redis.url(), "tg:"));
    // Credentials that do not need the store still work; issued tokens fail closed.
    let resp = get(&setup.gate.url("/api/data"), &[("x-auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200, "a static token while Redis is down");
    let (well_formed, _) = {
        // A well-formed token from another store: only this store could vouch for it.
        let other = RedisServer::start().expect("redis-server was there a moment ago");
        let elsewhere = Setup::start(&redis_store(&other.url(), "tg:"));
        elsewhere.admin_create(r#"{"user":"jill"}"#).await
    };
    get(
        &setup.gate.url("/api/data"),
        &[("x-auth-token", &well_formed)],
    )
    .await
    .assert_error(503, "Authentication backend unavailable");
    assert_eq!(setup.readyz().await, 503);

    redis.restart();
    let restarted = Instant::now();
    while setup.readyz().await != 200 {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "/readyz still 503 5 s after Redis came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "Redis down at startup: ready {:?} after it came up",
        restarted.elapsed()
    );
    let (token, _) = setup.admin_create(r#"{"user":"jill"}"#).await;
    assert_works(&setup.gate, &token, "jill", "jill").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Malformed tokens never reach the store or the cache
// ---------------------------------------------------------------------------------------------

/// `INFO commandstats` as command → calls.
fn command_calls(redis: &RedisServer) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Commands that are not token lookups or writes (connection upkeep, our own probes).
/// Commands that are not token lookups: connection upkeep, and `publish` (the revocation
/// channel's heartbeat, every 5 s).
fn housekeeping(command: &str) -> bool {
    [
        "ping",
        "info",
        "config",
        "client",
        "hello",
        "subscribe",
        "select",
        "command",
        "pubsub",
        "publish",
    ]
    .iter()
    .any(|h| command == *h || command.starts_with(&format!("{h}|")))
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("randomness");
    bytes
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect()
}

const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const BASE62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Sends every credential in `X-Auth-Token` (8 at a time); each must get 401.
async fn all_refused(gate: &Gate, credentials: Vec<String>) {
    let client = client();
    let url = gate.url("/api/data");
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in credentials.chunks(credentials.len().div_ceil(8)) {
        let chunk = chunk.to_vec();
        let client = client.clone();
        let url = url.clone();
        tasks.spawn(async move {
            for credential in chunk {
                let req = build("GET", &url, &[("x-auth-token", &credential)], full(""));
                send_with(&client, req)
                    .await
                    .assert_error(401, "Invalid credentials");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("request task");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_tokens_never_reach_the_store_or_the_cache() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let setup = Setup::start(&redis_store(&redis.url(), "tg:"));

    // Well-formed tokens the store does not know: created, then revoked.
    let mut unknown = Vec::new();
    for _ in 0..20 {
        let (token, id) = setup.admin_create(r#"{"user":"ivy"}"#).await;
        assert_eq!(
            setup
                .admin("DELETE", &format!("/tokens/{id}"), "")
                .await
                .status,
            204
        );
        unknown.push(token);
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut redis.connection())
        .expect("CONFIG RESETSTAT");
    let cache_before = setup.cache_entries().await;

    // 1000 `tg_` strings with bad checksums: right length and alphabet with a random checksum,
    // wrong lengths, and real tokens with one character changed.
    let mut malformed: Vec<String> = (0..700)
        .map(|_| {
            format!(
                "tg_{}{}",
                random_string(BASE64URL, 43),
                random_string(BASE62, 6)
            )
        })
        .collect();
    malformed.extend((0..200).map(|i| format!("tg_{}", random_string(BASE64URL, 10 + i % 80))));
    malformed.extend((0..100).map(|i| {
        let real = &unknown[i % unknown.len()];
        let at = 3 + (i * 7) % 49;
        let swapped = if real.as_bytes()[at] == b'A' {
            "B"
        } else {
            "A"
        };
        format!("{}{swapped}{}", &real[..at], &real[at + 1..])
    }));
    assert_eq!(malformed.len(), 1000);
    all_refused(&setup.gate, malformed).await;

    let calls = command_calls(&redis);
    let lookups: Vec<(&String, &u64)> = calls.iter().filter(|(c, _)| !housekeeping(c)).collect();
    assert!(
        lookups.is_empty(),
        "malformed tg_ tokens reached the store: {lookups:?}"
    );
    assert_eq!(
        setup.cache_entries().await,
        cache_before,
        "malformed tg_ tokens must not enter the cache"
    );

    // 1000 random strings no validator knows (not ours, so not the store's business either).
    let random: Vec<String> = (0..1000)
        .map(|i| format!("k{}", random_string(BASE62, 8 + i % 56)))
        .collect();
    all_refused(&setup.gate, random).await;
    let calls = command_calls(&redis);
    let lookups: Vec<(&String, &u64)> = calls.iter().filter(|(c, _)| !housekeeping(c)).collect();
    assert!(
        lookups.is_empty(),
        "random non-tg strings reached the store: {lookups:?}"
    );
    let cache_mid = setup.cache_entries().await;

    // The control: well-formed unknown tokens DO reach the store (and the negative cache).
    all_refused(&setup.gate, unknown.clone()).await;
    let calls = command_calls(&redis);
    let lookups: u64 = calls
        .iter()
        .filter(|(c, _)| !housekeeping(c))
        .map(|(_, n)| n)
        .sum();
    println!(
        "store commands for {} well-formed unknown tokens: {calls:?}",
        unknown.len()
    );
    assert!(
        lookups >= unknown.len() as u64,
        "well-formed tokens must be looked up in the store: {calls:?}"
    );
    let cache_after = setup.cache_entries().await;
    assert!(
        cache_after >= cache_mid + unknown.len() as f64,
        "well-formed unknown tokens are cached as denied: {cache_mid} → {cache_after}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. lastUsed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn last_used_is_recorded_once_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let setup = Setup::start(&sqlite_store(&db));
    let resp = setup.call("GET", "/api/createApiToken", ALICE, "").await;
    assert_eq!(resp.status, 200);
    let token = text(&resp.body);

    let entry = |list: Value| -> Value { list.as_array().expect("a list")[0].clone() };
    let first = entry(
        setup
            .call("GET", "/api/getApiTokens", ALICE, "")
            .await
            .json(),
    );
    let used_at = ms_now();
    assert!(
        first["lastUsed"].as_i64().is_none_or(|ms| ms < used_at),
        "never used yet: {first}"
    );
    let resp = get(&setup.gate.url("/api/data"), &[("auth-token", &token)]).await;
    assert_eq!(resp.status, 200);
    let start = Instant::now();
    let last_used = loop {
        let e = entry(
            setup
                .call("GET", "/api/getApiTokens", ALICE, "")
                .await
                .json(),
        );
        if let Some(ms) = e["lastUsed"].as_i64().filter(|ms| *ms >= used_at) {
            break ms;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "lastUsed not written 3 s after a use: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("lastUsed written {:?} after the use", start.elapsed());
    assert!(
        (used_at..=ms_now()).contains(&last_used),
        "lastUsed {last_used} is the time of the use ({used_at})"
    );
    let stored = |db: &Path| -> Option<i64> {
        rusqlite::Connection::open(db)
            .expect("open the store")
            .query_row("SELECT last_used FROM tokens", [], |row| row.get(0))
            .expect("the token row")
    };
    assert_eq!(stored(&db), Some(last_used), "the sqlite row");

    // More uses within the minute do not rewrite it.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let resp = get(
            &setup.gate.url(&format!("/api/again/{i}")),
            &[("x-auth-token", &token)],
        )
        .await;
        assert_eq!(resp.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = entry(
        setup
            .call("GET", "/api/getApiTokens", ALICE, "")
            .await
            .json(),
    );
    assert_eq!(later["lastUsed"].as_i64(), Some(last_used), "{later}");
    assert_eq!(stored(&db), Some(last_used), "the sqlite row is unchanged");
}
