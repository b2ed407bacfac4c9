//! Scoped API tokens against the real binary: `[tokens] scopes` and `login_scopes`, the scopes
//! of a new token on every surface (the token API, Insight.io's `createApiToken?scopes=`, the
//! admin API, the CLI's `--scope`), refused when unknown or wider than the minting credential,
//! listed, kept by sqlite (also in a file made before tokens had scopes) and Redis, and read by
//! route rules: a read-only token may GET but not POST.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::{json, Value};

/// A login credential with no scope facts (a session, say), in group `dev`.
const LOGIN: &str = "static-login-1f3a";
/// A credential with scopes `read` and `openid` (`openid` is not a token scope).
const READER: &str = "static-reader-77b0";
/// A credential with scopes `read` and `write`, in group `ops`.
const WRITER: &str = "static-writer-c4d2";
const ADMIN_TOKEN: &str = "admin-secret-for-scopes";

/// `[tokens]` of most tests: three scopes, a login credential may give `read`.
const TOKENS: &str = "scopes = [\"read\", \"write\", \"admin\"]\nlogin_scopes = [\"read\"]\n";

fn sqlite_store(path: &Path) -> String {
    format!(
        "[store]\nbackend = \"sqlite\"\npath = \"{}\"\n",
        path.display()
    )
}

fn memory_store() -> String {
    "[store]\nbackend = \"memory\"\n".to_string()
}

/// A gate with the token API, Insight.io, the admin API, three static credentials and routes:
/// `/app` (GET/HEAD with `read`, anything with `write`), `/ops` (group `ops`), `/open` (any
/// valid credential); every route sends `{scopes}` and `{groups}` upstream.
fn config(port: u16, admin: u16, up: u16, store: &str, tokens: &str) -> String {
    let token = |secret: &str, subject: &str, extra: &str| {
        format!(
            "[[validator.token]]\nsha256 = \"{}\"\nsubject = \"{subject}\"\n{extra}\n",
            sha256_hex(secret)
        )
    };
    let route = |prefix: &str, rules: &str| {
        format!(
            "[[route]]\npath_prefix = \"{prefix}\"\nupstream = \"http://127.0.0.1:{up}\"\n\
             [route.identity_headers]\n\"X-Scopes\" = \"{{scopes}}\"\n\"X-Groups\" = \"{{groups}}\"\n\
             {rules}\n"
        )
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n\
         [endpoints]\ninsight = true\n\n\
         {store}\n[tokens]\n{tokens}\n\
         [[validator]]\ntype = \"static\"\n{}{}{}\n{}{}{}",
        token(LOGIN, "alice", "groups = [\"dev\"]"),
        token(READER, "bob", "scopes = [\"read\", \"openid\"]"),
        token(
            WRITER,
            "carol",
            "scopes = [\"read\", \"write\"]\ngroups = [\"ops\"]"
        ),
        route(
            "/app",
            "[[route.allow]]\nmethods = [\"GET\", \"HEAD\"]\nscopes = [\"read\"]\n\
             [[route.allow]]\nscopes = [\"write\"]"
        ),
        route("/ops", "[[route.allow]]\ngroups = [\"ops\"]"),
        route("/open", ""),
    )
}

/// A running gate and its upstream.
struct Setup {
    gate: Gate,
    admin: u16,
    _up: Upstream,
}

impl Setup {
    fn start(store: &str, tokens: &str) -> Setup {
        let up = Upstream::start();
        let admin = free_port();
        let gate = Gate::start(&config(free_port(), admin, up.port, store, tokens));
        wait_port(admin);
        Setup {
            gate,
            admin,
            _up: up,
        }
    }

    /// `POST /_tokengate/tokens` with `body`, as the holder of `credential`.
    async fn mint(&self, credential: &str, body: Value) -> Resp {
        post(
            &self.gate.url("/_tokengate/tokens"),
            &[
                ("authorization", &format!("Bearer {credential}")),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

    /// Mints and expects 201: (secret, scopes).
    async fn mint_ok(&self, credential: &str, body: Value) -> (String, Value) {
        let resp = self.mint(credential, body.clone()).await;
        assert_eq!(
            resp.status,
            201,
            "POST /tokens {body}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        let made = resp.json();
        (
            made["token"].as_str().unwrap().to_string(),
            made["scopes"].clone(),
        )
    }

    /// A request with an issued token, on the main listener.
    async fn call(&self, method: &str, path: &str, token: &str) -> Resp {
        send(build(
            method,
            &self.gate.url(path),
            &[("authorization", &format!("Bearer {token}"))],
            full(""),
        ))
        .await
    }

    /// A request to the admin token API.
    async fn admin(&self, method: &str, path: &str, body: Value) -> Resp {
        send(build(
            method,
            &format!("http://127.0.0.1:{}{path}", self.admin),
            &[
                ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
                ("content-type", "application/json"),
            ],
            full(body.to_string()),
        ))
        .await
    }

    /// The scopes of each of `credential`'s tokens, by id, from the token list.
    async fn listed(&self, credential: &str) -> Vec<(String, Value)> {
        let resp = get(
            &self.gate.url("/_tokengate/tokens"),
            &[("authorization", &format!("Bearer {credential}"))],
        )
        .await;
        assert_eq!(resp.status, 200);
        resp.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_str().unwrap().to_string(), t["scopes"].clone()))
            .collect()
    }
}

/// A 400 whose JSON error says `says`.
fn assert_refused(resp: &Resp, says: &str) {
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    let error = resp.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains(says), "{error:?} should say {says:?}");
}

/// A read-only token may read `/app` but not write it; a write token may do both.
async fn assert_read_only(setup: &Setup, token: &str) {
    let read = setup.call("GET", "/app/items", token).await;
    assert_eq!(read.status, 200, "GET with a read token");
    assert_eq!(read.echoed("x-scopes").as_deref(), Some("read"));
    setup
        .call("POST", "/app/items", token)
        .await
        .assert_error(403, "Forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_api_gives_the_minters_allowance_and_never_more() {
    let s = Setup::start(&memory_store(), TOKENS);
    // A login credential without scope facts: login_scopes by default, never wider.
    let (alice_read, scopes) = s.mint_ok(LOGIN, json!({"name": "default"})).await;
    assert_eq!(scopes, json!(["read"]));
    assert_refused(&s.mint(LOGIN, json!({"scopes": ["write"]})).await, "wider");
    assert_refused(
        &s.mint(LOGIN, json!({"scopes": ["delete"]})).await,
        "unknown scope",
    );
    let (_, none) = s.mint_ok(LOGIN, json!({"scopes": []})).await;
    assert_eq!(none, json!([]), "an empty list is a token with no scopes");
    // A credential with scopes: those of them that are token scopes (`openid` is not).
    let (_, scopes) = s.mint_ok(READER, json!({})).await;
    assert_eq!(scopes, json!(["read"]));
    assert_refused(&s.mint(READER, json!({"scopes": ["write"]})).await, "wider");
    assert_refused(
        &s.mint(READER, json!({"scopes": ["openid"]})).await,
        "unknown scope",
    );
    let (_, scopes) = s.mint_ok(WRITER, json!({})).await;
    assert_eq!(scopes, json!(["read", "write"]));
    let (carol_write, scopes) = s
        .mint_ok(WRITER, json!({"scopes": ["write", "write"]}))
        .await;
    assert_eq!(scopes, json!(["write"]), "each once");
    assert_refused(&s.mint(WRITER, json!({"scopes": ["admin"]})).await, "wider");
    // Not a list of names.
    assert_refused(&s.mint(WRITER, json!({"scopes": "read"})).await, "list");
    assert_refused(&s.mint(WRITER, json!({"scopes": [1]})).await, "list");

    // Listed with the token.
    let listed = s.listed(LOGIN).await;
    assert_eq!(
        listed.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
        [json!(["read"]), json!([])]
    );
    assert_eq!(s.listed(WRITER).await.len(), 2);

    // Route rules read them: read-only GETs, write POSTs.
    assert_read_only(&s, &alice_read).await;
    let write = s.call("POST", "/app/items", &carol_write).await;
    assert_eq!(write.status, 200, "POST with a write token");
    assert_eq!(write.echoed("x-scopes").as_deref(), Some("write"));
    // And the owner's groups at creation: carol's token is in `ops`, alice's in `dev`.
    let ops = s.call("GET", "/ops/x", &carol_write).await;
    assert_eq!(ops.status, 200);
    assert_eq!(ops.echoed("x-groups").as_deref(), Some("ops"));
    s.call("GET", "/ops/x", &alice_read)
        .await
        .assert_error(403, "Forbidden");
    let open = s.call("GET", "/open/x", &alice_read).await;
    assert_eq!(open.echoed("x-groups").as_deref(), Some("dev"));
}

#[tokio::test(flavor = "multi_thread")]
async fn insight_create_api_token_takes_scopes() {
    let s = Setup::start(&memory_store(), TOKENS);
    let create = |credential: &'static str, query: &'static str| {
        let url = s.gate.url(&format!("/api/createApiToken{query}"));
        async move { get(&url, &[("authorization", &format!("Bearer {credential}"))]).await }
    };
    let made = create(WRITER, "?scopes=read").await;
    assert_eq!(made.status, 200);
    let token = String::from_utf8_lossy(&made.body).to_string();
    assert_read_only(&s, &token).await;
    let made = create(WRITER, "?scopes=read,write").await;
    assert_eq!(made.status, 200);
    let made = create(WRITER, "").await;
    assert_eq!(made.status, 200, "no scopes= : the allowance");
    assert_refused(&create(WRITER, "?scopes=read,admin").await, "wider");
    assert_refused(&create(WRITER, "?scopes=bogus").await, "unknown scope");
    assert_refused(&create(LOGIN, "?scopes=write").await, "wider");
    let listed: Vec<Value> = s.listed(WRITER).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        listed,
        [
            json!(["read"]),
            json!(["read", "write"]),
            json!(["read", "write"])
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_and_the_cli_may_give_any_configured_scope() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let s = Setup::start(&sqlite_store(&db), TOKENS);

    // Admin API: any configured scope; none named: login_scopes; unknown: 400.
    let made = s
        .admin(
            "POST",
            "/tokens",
            json!({"user": "dave", "scopes": ["admin", "write"]}),
        )
        .await;
    assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
    assert_eq!(made.json()["scopes"], json!(["write", "admin"]));
    let dave_write = made.json()["token"].as_str().unwrap().to_string();
    let made = s.admin("POST", "/tokens", json!({"user": "dave"})).await;
    assert_eq!(made.json()["scopes"], json!(["read"]));
    assert_read_only(&s, made.json()["token"].as_str().unwrap()).await;
    assert_refused(
        &s.admin(
            "POST",
            "/tokens",
            json!({"user": "dave", "scopes": ["root"]}),
        )
        .await,
        "unknown scope",
    );
    assert_eq!(s.call("POST", "/app/x", &dave_write).await.status, 200);
    let listed = s.admin("GET", "/tokens?user=dave", json!({})).await.json();
    let scopes: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["scopes"])
        .collect();
    assert_eq!(scopes, [&json!(["write", "admin"]), &json!(["read"])]);

    // CLI: --scope (repeatable), --no-scopes, the default, and an unknown one (exit 2).
    let config = &s.gate.config_path;
    let cli = |args: &[&str]| token_cli(config, args);
    let out = cli(&["--user", "erin", "--scope", "write", "--scope", "read"]);
    assert!(out.status.success(), "{out:?}");
    let erin_rw = text(&out.stdout).trim().to_string();
    assert!(text(&out.stderr).contains("scopes read,write"), "{out:?}");
    assert_eq!(s.call("POST", "/app/x", &erin_rw).await.status, 200);
    let out = cli(&["--user", "erin"]);
    assert!(text(&out.stderr).contains("scopes read,"), "{out:?}");
    assert_read_only(&s, text(&out.stdout).trim()).await;
    let out = cli(&["--user", "erin", "--no-scopes"]);
    assert!(text(&out.stderr).contains("scopes none"), "{out:?}");
    let none = text(&out.stdout).trim().to_string();
    s.call("GET", "/app/x", &none)
        .await
        .assert_error(403, "Forbidden");
    assert_eq!(s.call("GET", "/open/x", &none).await.status, 200);
    let out = cli(&["--user", "erin", "--scope", "root"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("--scope: unknown scope \"root\""),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "no token printed");
    // `token list` shows them.
    let list = Command::new(BIN)
        .args(["token", "list", "--user", "erin", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let listed = text(&list.stdout);
    assert!(listed.contains("scopes"), "{listed}");
    assert!(listed.contains("read,write"), "{listed}");
    assert_eq!(
        listed.lines().count(),
        4,
        "a heading and three tokens: {listed}"
    );
}

/// `tokengate token create --config CONFIG ARGS`.
fn token_cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["token", "create", "--config"])
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tokengate token create")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The sqlite schema tokengate wrote before tokens had scopes.
const OLD_SCHEMA: &str = "
CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    dn TEXT,
    created INTEGER NOT NULL,
    expires INTEGER,
    last_used INTEGER
);
CREATE INDEX tokens_subject ON tokens(subject);
CREATE INDEX tokens_expires ON tokens(expires);
CREATE TABLE revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL,
    at INTEGER NOT NULL,
    origin TEXT
);
CREATE TABLE cli_issued (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keeps_scopes_and_opens_a_file_made_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    // A file of the previous schema, holding one token.
    let (old_token, _) = tokengate::token::generate().unwrap();
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(OLD_SCHEMA).unwrap();
        c.execute(
            "INSERT INTO tokens (hash, id, subject, account, name, kind, dn, created, expires, last_used) \
             VALUES (?1, 'oldtokenid000001', 'olga', 'olga', 'from before', 'api', NULL, ?2, NULL, NULL)",
            rusqlite::params![
                tokengate::validate::hash(&old_token).as_slice(),
                tokengate::store::now_ms()
            ],
        )
        .unwrap();
    }
    let s = Setup::start(&sqlite_store(&db), TOKENS);
    // The old token still works, with no scopes (and no groups): a scope rule refuses it.
    let open = s.call("GET", "/open/x", &old_token).await;
    assert_eq!(open.status, 200, "the old token works");
    assert_eq!(open.echoed("x-scopes"), None);
    s.call("GET", "/app/x", &old_token)
        .await
        .assert_error(403, "Forbidden");
    let listed = s.admin("GET", "/tokens?user=olga", json!({})).await.json();
    assert_eq!(listed[0]["id"], "oldtokenid000001");
    assert_eq!(listed[0]["scopes"], json!([]));

    // A new token's scopes and groups are stored in the new columns...
    let (carol_write, _) = s.mint_ok(WRITER, json!({"scopes": ["write"]})).await;
    let (alice_read, _) = s.mint_ok(LOGIN, json!({})).await;
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let row: (Option<String>, Option<String>) = c
            .query_row(
                "SELECT scopes, owner_groups FROM tokens WHERE subject = 'carol'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(row, (Some("[\"write\"]".into()), Some("[\"ops\"]".into())));
    }
    // ...and survive a restart (a new process, nothing cached).
    drop(s);
    let s = Setup::start(&sqlite_store(&db), TOKENS);
    assert_eq!(s.call("POST", "/app/x", &carol_write).await.status, 200);
    assert_eq!(
        s.call("GET", "/ops/x", &carol_write)
            .await
            .echoed("x-groups")
            .as_deref(),
        Some("ops")
    );
    assert_read_only(&s, &alice_read).await;
    assert_eq!(s.call("GET", "/open/x", &old_token).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_keeps_scopes_and_groups_in_the_record() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let prefix = unique_prefix("scopes");
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
        redis.url()
    );
    let s = Setup::start(&store, TOKENS);
    let (carol_write, _) = s.mint_ok(WRITER, json!({"scopes": ["write"]})).await;
    let (alice_read, _) = s.mint_ok(LOGIN, json!({})).await;
    let mut c = redis.connection();
    let key = |token: &str| {
        format!(
            "{prefix}t:{}",
            hex::encode(tokengate::validate::hash(token))
        )
    };
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key(&carol_write))
        .query(&mut c)
        .unwrap();
    assert_eq!(
        fields.get("scopes").map(String::as_str),
        Some("[\"write\"]")
    );
    assert_eq!(fields.get("groups").map(String::as_str), Some("[\"ops\"]"));

    // A record written before tokens had scopes (no such fields): valid, with none.
    let (old_token, _) = tokengate::token::generate().unwrap();
    let now = tokengate::store::now_ms().to_string();
    let old_fields: [(&str, &str); 5] = [
        ("id", "oldredistoken001"),
        ("subject", "olga"),
        ("account", "olga"),
        ("kind", "api"),
        ("created", &now),
    ];
    let _: () = redis::cmd("HSET")
        .arg(key(&old_token))
        .arg(&old_fields[..])
        .query(&mut c)
        .unwrap();
    assert_eq!(s.call("GET", "/open/x", &old_token).await.status, 200);
    s.call("GET", "/app/x", &old_token)
        .await
        .assert_error(403, "Forbidden");

    // Another replica (a new process on the same Redis) reads the same scopes.
    drop(s);
    let s = Setup::start(&store, TOKENS);
    assert_eq!(s.call("POST", "/app/x", &carol_write).await.status, 200);
    assert_read_only(&s, &alice_read).await;
    let listed = s.listed(WRITER).await;
    assert_eq!(listed[0].1, json!(["write"]));
}

#[test]
fn check_refuses_unknown_and_repeated_scopes_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    for (tokens, line, col, says) in [
        (
            "scopes = [\"read\"]\nlogin_scopes = [\"read\", \"write\"]\n",
            3,
            25,
            "not in [tokens] scopes",
        ),
        ("scopes = [\"read\", \"read\"]\n", 2, 19, "twice"),
        (
            "scopes = [\"read\"]\nlogin_scopes = [\"read\", \"read\"]\n",
            3,
            25,
            "twice",
        ),
        ("scopes = [\"read only\"]\n", 2, 11, "not a scope name"),
    ] {
        let toml = format!(
            "[tokens]\n{tokens}\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n"
        );
        let path = write_file(dir.path(), "bad.toml", &toml);
        let out = cli(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{toml}: {out:?}");
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        let place = format!("{}:{line}:{col}: ", path.display());
        assert!(
            said.contains(&place) && said.contains(says),
            "{toml}\n{said}"
        );
    }
}
