//! JWT API keys (`[tokens] format = "jwt"`, Cloud SOAR style): issued through the admin API
//! and the CLI, used in every dialect, refused when tampered with, signed by another key,
//! expired or revoked.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-jwt-tests";

fn config(port: u16, admin: u16, up: u16, key_line: &str, store: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"
token = "{ADMIN}"

{store}

[tokens]
format = "jwt"
{key_line}

{route}"#,
        route = catch_all_route(up, "\"X-Token-Id\" = \"{token_id}\""),
    )
}

/// A gate with a JWT key written to `jwt.pem` (or an HMAC secret inline).
fn start(up: &Upstream, key: &str, store: &str) -> (Gate, u16) {
    let dir = tempfile::tempdir().unwrap();
    let key_line = if key.starts_with("-----BEGIN") {
        write_file(dir.path(), "jwt.pem", key);
        "jwt_key = \"${file:jwt.pem}\"".to_string()
    } else {
        format!("jwt_key = \"{key}\"")
    };
    let (port, admin) = (free_port(), free_port());
    let toml = config(port, admin, up.port, &key_line, store);
    // ${file:..} is relative to the process's working directory: the gate runs in `dir`.
    let toml = toml.replace(
        "${file:jwt.pem}",
        &format!("${{file:{}}}", dir.path().join("jwt.pem").display()),
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    wait_port(admin);
    (gate, admin)
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn create(admin: u16, body: Value) -> Value {
    let resp = post(
        &format!("http://127.0.0.1:{admin}/tokens"),
        &[
            ("Authorization", &format!("Bearer {ADMIN}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(
        resp.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    resp.json()
}

fn claims_of(jwt: &str) -> (Value, Value) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = jwt.split('.');
    let header = b64.decode(parts.next().unwrap()).unwrap();
    let payload = b64.decode(parts.next().unwrap()).unwrap();
    assert!(
        parts.next().is_some() && parts.next().is_none(),
        "three parts"
    );
    (
        serde_json::from_slice(&header).unwrap(),
        serde_json::from_slice(&payload).unwrap(),
    )
}

async fn assert_works_in_every_dialect(gate: &Gate, jwt: &str, id: &str) {
    for (header, prefix) in DIALECTS {
        let value = format!("{prefix}{jwt}");
        let resp = get(&gate.url("/api/thing"), &[(header, &value)]).await;
        assert_eq!(resp.status, 200, "{header}: {:?}", resp.body);
        assert_eq!(resp.echoed("auth-token").as_deref(), Some(jwt), "{header}");
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
        assert_eq!(resp.echoed("x-auth-account").as_deref(), Some("ops"));
        assert_eq!(resp.echoed("x-token-id").as_deref(), Some(id));
        if header != "auth-token" {
            assert_eq!(resp.echoed(header), None, "{header} was not stripped");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_keys_work_everywhere_and_revocation_stops_them() {
    let up = Upstream::start();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (gate, admin) = start(&up, &key.serialize_pem(), "[store]\nbackend = \"memory\"");
    let made = create(
        admin,
        json!({"user": "alice", "account": "ops", "name": "soar"}),
    )
    .await;
    let jwt = made["token"].as_str().unwrap();
    let id = made["id"].as_str().unwrap();
    let (header, claims) = claims_of(jwt);
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().unwrap().starts_with("tg-"));
    assert_eq!(claims["jti"], id);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["account"], "ops");
    assert_eq!(claims["iss"], "tokengate");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        90 * 86_400,
        "no ttl: the default lifetime, 90 days"
    );

    assert_works_in_every_dialect(&gate, jwt, id).await;

    // The list shows the id, never the JWT.
    let list = get(
        &format!("http://127.0.0.1:{admin}/tokens"),
        &[("Authorization", &format!("Bearer {ADMIN}"))],
    )
    .await;
    assert_eq!(list.status, 200);
    assert!(!String::from_utf8_lossy(&list.body).contains(jwt));
    assert!(list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == id));

    // Revoked: refused at once, although its signature is still good and it was cached.
    let resp = reqwest_delete(admin, id).await;
    assert_eq!(resp, 204);
    get(&gate.url("/x"), &[("X-Auth-Token", jwt)])
        .await
        .assert_error(401, "Invalid credentials");
    assert!(!gate.log().contains(jwt), "a JWT reached the log");
}

async fn reqwest_delete(admin: u16, id: &str) -> u16 {
    let req = build(
        "DELETE",
        &format!("http://127.0.0.1:{admin}/tokens/{id}"),
        &[("Authorization", &format!("Bearer {ADMIN}"))],
        full(""),
    );
    send(req).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_foreign_and_alg_none_keys_are_refused() {
    let up = Upstream::start();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (gate, admin) = start(&up, &key.serialize_pem(), "[store]\nbackend = \"memory\"");
    let made = create(admin, json!({"user": "alice", "account": "ops"})).await;
    let jwt = made["token"].as_str().unwrap().to_string();
    assert_eq!(claims_of(&jwt).0["alg"], "ES256");
    assert_works_in_every_dialect(&gate, &jwt, made["id"].as_str().unwrap()).await;

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = jwt.split('.').collect();
    let (header, mut claims) = claims_of(&jwt);
    // Another subject under the same signature.
    claims["sub"] = json!("mallory");
    let forged_payload = b64.encode(claims.to_string());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    // A changed signature.
    let mut sig = b64.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig));
    // alg none with our kid.
    let none_header = b64.encode(json!({"alg": "none", "kid": header["kid"]}).to_string());
    let none = format!("{none_header}.{}.", parts[1]);
    // Signed by a different key of the same type.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other_key = tokengate::jwt::JwtKey::from_config(&other.serialize_pem()).unwrap();
    let foreign = other_key
        .sign(&tokengate::jwt::Claims {
            iss: "tokengate".into(),
            sub: "alice".into(),
            account: "ops".into(),
            jti: made["id"].as_str().unwrap().into(),
            iat: 0,
            exp: None,
        })
        .unwrap();
    for bad in [&forged, &bad_sig, &none, &foreign] {
        get(
            &gate.url("/x"),
            &[("Authorization", &format!("Bearer {bad}"))],
        )
        .await
        .assert_error(401, "Invalid credentials");
    }
    // The good one still works.
    let resp = get(&gate.url("/x"), &[("X-Auth-Token", &jwt)]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_key_is_refused_even_when_cached() {
    let up = Upstream::start();
    let secret = "hs256-secret-that-is-long-enough-for-the-test";
    let (gate, admin) = start(&up, secret, "[store]\nbackend = \"memory\"");
    let made = create(admin, json!({"user": "alice", "account": "ops", "ttl": 2})).await;
    let jwt = made["token"].as_str().unwrap();
    let (header, claims) = claims_of(jwt);
    assert_eq!(header["alg"], "HS256");
    let exp = claims["exp"].as_i64().expect("a ttl sets exp");
    assert!((exp - claims["iat"].as_i64().unwrap() - 2).abs() <= 1);
    let ok = get(&gate.url("/x"), &[("X-Auth-Token", jwt)]).await;
    assert_eq!(ok.status, 200);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    get(&gate.url("/x"), &[("X-Auth-Token", jwt)])
        .await
        .assert_error(401, "Invalid credentials");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_issues_jwt_keys_into_the_sqlite_store_the_server_reads() {
    let up = Upstream::start();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (gate, _admin) = start(&up, &key.serialize_pem(), "[store]\nbackend = \"sqlite\"");
    let config = gate.config_path.to_str().unwrap().to_string();
    let out = std::process::Command::new(BIN)
        .args(["token", "create", "--config", &config, "--user", "alice"])
        .args(["--account", "ops", "--format", "jwt", "--ttl", "1h"])
        .current_dir(gate.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let claims = claims_of(&jwt).1;
    assert_works_in_every_dialect(&gate, &jwt, claims["jti"].as_str().unwrap()).await;
    // Revoke through the CLI: the running server drops it.
    let out = std::process::Command::new(BIN)
        .args(["token", "revoke", "--config", &config])
        .arg(claims["jti"].as_str().unwrap())
        .current_dir(gate.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let resp = get(&gate.url("/x"), &[("X-Auth-Token", &jwt)]).await;
        if resp.status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revoked JWT still accepted after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_bad_jwt_key_is_a_config_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "t.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\n[tokens]\nformat = \"jwt\"\njwt_key = \"short\"\n",
    );
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("t.toml:5:"), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    let path = write_file(
        dir.path(),
        "u.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\n[tokens]\nformat = \"jwt\"\n",
    );
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs jwt_key"));
}
