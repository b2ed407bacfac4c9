//! The worked examples in `examples/*.toml`, one per seed API (Aircloak, Insight.io, Rucio,
//! Cloud SOAR), end to end: each passes the real binary's `tokengate check` with nothing but
//! the environment variables (and, for Rucio, the certificate files) it documents, and each is
//! served — the example as written, changed only where a test must (listen addresses → free
//! loopback ports, the upstream → the echo upstream of `tests/common`) — answering one request
//! in its API's dialect with a token got the way the example tells users to get one, and
//! refusing one without a credential. Plus the fresh-clone check: a `git clone` of the
//! committed HEAD runs `check` on `config.example.toml` and every example.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::pki::{self, Cert, Dn};
use common::*;

/// The four examples, one per seed API.
const EXAMPLES: [&str; 4] = ["aircloak", "insightio", "rucio", "cloudsoar"];

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_example(name: &str) -> String {
    let path = crate_dir().join("examples").join(format!("{name}.toml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `${env:NAME}` a config's values draw on (comments aside), each with a stand-in value
/// (long enough for an HMAC key), in order of appearance.
fn env_vars(toml: &str) -> Vec<(String, String)> {
    fn strings(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(table) => table.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let parsed: toml::Value = toml::from_str(toml).expect("the example is TOML");
    let mut values = Vec::new();
    strings(&parsed, &mut values);
    let mut vars: Vec<(String, String)> = Vec::new();
    for piece in values.iter().flat_map(|v| v.split("${env:").skip(1)) {
        let name = piece.split('}').next().unwrap_or_default().to_string();
        if !vars.iter().any(|(n, _)| *n == name) {
            let value = format!(
                "stand-in-{}-0123456789abcdef0123456789",
                name.to_lowercase()
            );
            vars.push((name, value));
        }
    }
    vars
}

/// `text` with `from` (which must occur exactly once) replaced by `to`, so a test breaks
/// loudly when the example it adapts changes.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "expected exactly one {from:?} in the example"
    );
    text.replacen(from, to, 1)
}

/// The example with its main listener on `port` and its upstream at `up`.
fn adapt(name: &str, port: u16, upstream: &str, up: u16) -> String {
    let toml = replace_once(
        &read_example(name),
        "listen = \"0.0.0.0:8443\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    replace_once(
        &toml,
        &format!("upstream = \"{upstream}\""),
        &format!("upstream = \"http://127.0.0.1:{up}\""),
    )
}

/// `tokengate ARGS` with exactly `env` as its environment.
fn run_clean(args: &[&str], config: &Path, env: &[(String, String)]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run tokengate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The files the examples name (`certs/server.pem`, `certs/server-key.pem`, and Rucio's
/// `certs/ca.pem`) in `dir`, from a fresh test CA; returns the CA to sign users with.
fn example_certs(dir: &Path) -> Cert {
    let root = pki::ca("Example Test Root CA", None);
    let server = pki::server(&root);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).expect("create certs/");
    write_file(&certs, "ca.pem", &root.pem());
    write_file(&certs, "server.pem", &server.pem());
    write_file(&certs, "server-key.pem", &server.key_pem());
    root
}

/// `check` on `config` (in a folder holding whatever the example names) passes with only its
/// documented environment, and fails with exit 2, naming the variable but never a value, with
/// any one of them missing.
fn assert_checks(name: &str, config: &Path) {
    let toml = std::fs::read_to_string(config).expect("read config");
    let env = env_vars(&toml);
    for (var, _) in &env {
        assert!(
            toml.lines()
                .take_while(|l| l.starts_with('#'))
                .any(|l| l.contains(var.as_str())),
            "{name}: the opening comment must document the environment variable {var}"
        );
    }
    let out = run_clean(&["check"], config, &env);
    assert!(
        out.status.success() && text(&out.stdout).trim() == "config ok",
        "{name}: check with {:?}: stdout {:?} stderr {:?}",
        env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        text(&out.stdout),
        text(&out.stderr)
    );
    for (i, (var, _)) in env.iter().enumerate() {
        let mut fewer = env.clone();
        fewer.remove(i);
        let out = run_clean(&["check"], config, &fewer);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{name} without {var}: {said}");
        assert!(said.contains(var.as_str()), "{name} without {var}: {said}");
        for (_, value) in &fewer {
            assert!(!said.contains(value.as_str()), "{name}: a secret printed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every example passes `check`
// ---------------------------------------------------------------------------------------------

#[test]
fn every_example_passes_check_with_only_its_documented_environment() {
    for name in EXAMPLES {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = read_example(name);
        assert!(
            toml.contains("\n[server.tls]\n"),
            "{name}: its seed's clients speak https, so the example ships with TLS on"
        );
        let config = write_file(dir.path(), &format!("{name}.toml"), &toml);
        example_certs(dir.path());
        assert_checks(name, &config);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Every example serves its dialect
// ---------------------------------------------------------------------------------------------

/// Aircloak: `auth-token` in, validated by asking the app (introspection, here the echo
/// upstream's `/whoami`), the same `auth-token` out, plus the subject (the token's hash prefix,
/// as the example says, since its endpoint does not name the user).
#[tokio::test(flavor = "multi_thread")]
async fn aircloak_example_passes_the_clients_auth_token_through() {
    let up = Upstream::start();
    let port = free_port();
    let toml = replace_once(
        &adapt("aircloak", port, "http://127.0.0.1:8080", up.port),
        "url = \"http://127.0.0.1:8080/api/data_sources\"",
        &format!("url = \"http://127.0.0.1:{}/whoami\"", up.port),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    example_certs(dir.path());
    let certs = dir.path().to_path_buf();
    let _gate = Gate::start_in(dir, &toml, &[]);

    let resp = curl_tls(
        &certs,
        port,
        "/api/queries",
        None,
        &[("auth-token", ALICE), ("x-auth-user", "mallory")],
    );
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(echoed(&resp, "auth-token").as_deref(), Some(ALICE));
    assert_eq!(
        echoed(&resp, "x-auth-user"),
        Some(sha256_hex(ALICE)[..16].to_string()),
        "the subject is the token's hash prefix, never the client's claim"
    );
    assert_eq!(up.whoami_calls(), 1, "asked the app once");
    let again = curl_tls(&certs, port, "/api/queries", None, &[("auth-token", ALICE)]);
    assert_eq!(again.status, 200);
    assert_eq!(up.whoami_calls(), 1, "then answered from the cache");

    assert_error(
        &curl_tls(&certs, port, "/api/queries", None, &[]),
        401,
        "Credentials required",
    );
    assert_error(
        &curl_tls(
            &certs,
            port,
            "/api/queries",
            None,
            &[("auth-token", "not-a-token")],
        ),
        401,
        "Invalid credentials",
    );
}

/// Insight.io: a token from the CLI (the same store the server uses) in `X-Auth-Token`; the
/// app gets the user and the gateway secret, never the token; `/api/getApiTokens` lists it.
#[tokio::test(flavor = "multi_thread")]
async fn insightio_example_serves_x_auth_token_and_the_insight_endpoints() {
    let up = Upstream::start();
    let port = free_port();
    let toml = adapt("insightio", port, "http://127.0.0.1:9000", up.port);
    let env = env_vars(&toml);
    let secret = env[0].1.clone();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    example_certs(dir.path());
    let certs = dir.path().to_path_buf();
    let gate = Gate::start_in(dir, &toml, &env_refs);

    let out = run_clean(
        &["token", "create", "--user", "alice", "--name", "laptop"],
        &gate.config_path,
        &env,
    );
    assert!(out.status.success(), "token create: {}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert!(token.starts_with("tg_"), "{token}");

    let resp = curl_tls(
        &certs,
        port,
        "/api/getUserRecentFiles",
        None,
        &[("X-Auth-Token", &token), ("X-Gateway-Secret", "forged")],
    );
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(echoed(&resp, "x-auth-user").as_deref(), Some("alice"));
    assert_eq!(echoed(&resp, "x-auth-account").as_deref(), Some("alice"));
    assert_eq!(echoed(&resp, "x-gateway-secret"), Some(secret));
    assert_eq!(
        echoed(&resp, "x-auth-token"),
        None,
        "the app never sees the token"
    );

    let listed = curl_tls(
        &certs,
        port,
        "/api/getApiTokens",
        None,
        &[("X-Auth-Token", &token)],
    );
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let rows = listed.json();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["uid"], "alice");
    assert!(
        !listed.body.contains(&token),
        "the list never holds the secret"
    );

    assert_error(
        &curl_tls(&certs, port, "/api/getUserRecentFiles", None, &[]),
        401,
        "Credentials required",
    );
}

/// Cloud SOAR: an administrator issues a JWT API key on the admin listener; the client sends it
/// as a bearer token; the API gets the service key and the user, never the client's key.
#[tokio::test(flavor = "multi_thread")]
async fn cloudsoar_example_serves_bearer_jwt_keys_issued_by_an_administrator() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let toml = replace_once(
        &adapt("cloudsoar", port, "http://127.0.0.1:8080", up.port),
        "listen = \"127.0.0.1:9901\"",
        &format!("listen = \"127.0.0.1:{admin}\""),
    );
    let env = env_vars(&toml);
    let value = |name: &str| -> String {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the example uses ${{env:{name}}}"))
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    example_certs(dir.path());
    let certs = dir.path().to_path_buf();
    let _gate = Gate::start_in(dir, &toml, &env_refs);
    wait_port(admin);

    let bearer = format!("Bearer {}", value("SOAR_ADMIN_TOKEN"));
    let created = post(
        &format!("http://127.0.0.1:{admin}/tokens"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        r#"{"user":"alice","name":"siem"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let key = created.json()["token"].as_str().expect("token").to_string();
    let id = created.json()["id"].as_str().expect("id").to_string();
    assert_eq!(key.split('.').count(), 3, "a JWT API key: {key}");

    let resp = curl_tls(
        &certs,
        port,
        "/api/sec/v1/incidents",
        None,
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("Accept", "application/json"),
        ],
    );
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(
        echoed(&resp, "authorization"),
        Some(format!("Bearer {}", value("SOAR_SERVICE_API_KEY"))),
        "the API gets the service key, not the user's"
    );
    assert_eq!(echoed(&resp, "x-auth-user").as_deref(), Some("alice"));
    assert_eq!(echoed(&resp, "x-token-id"), Some(id));

    assert_error(
        &curl_tls(&certs, port, "/api/sec/v1/incidents", None, &[]),
        401,
        "Credentials required",
    );
    assert_error(
        &curl_tls(
            &certs,
            port,
            "/api/sec/v1/incidents",
            None,
            &[("Authorization", &format!("Bearer {key}x"))],
        ),
        401,
        "Invalid credentials",
    );
}

/// The README's grid proxy recipe, run as written by `sh` in a folder where `tokengate pki`
/// made its certificates, against the Rucio example: the proxy is exchanged for a token whose
/// identity is the user's DN.
#[test]
fn the_readme_grid_proxy_recipe_gets_a_token_from_the_rucio_example() {
    for tool in ["curl", "openssl"] {
        if Command::new(tool).arg("--version").output().is_err() {
            missing_tool(tool, tool);
            return;
        }
    }
    let readme = std::fs::read_to_string(crate_dir().join("README.md")).expect("README.md");
    let recipe = readme
        .split("<!-- grid-proxy-recipe -->\n```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the README's grid proxy recipe");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Command::new(BIN)
        .args(["pki", "--dir"])
        .arg(dir.path().join("certs"))
        .output()
        .expect("run tokengate pki");
    assert!(pki.status.success(), "{}", text(&pki.stderr));
    let port = free_port();
    let toml = adapt("rucio", port, "http://127.0.0.1:8080", free_port());
    let here = dir.path().to_path_buf();
    let gate = Gate::start_in(dir, &toml, &[]);
    let script = recipe.replace(
        "https://localhost:8443",
        &format!("https://localhost:{port}"),
    );
    let out = Command::new("sh")
        .arg("-ec")
        .arg(&script)
        .current_dir(&here)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let reply = text(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\nstdout {reply}\nstderr {}\nlog {}",
        text(&out.stderr),
        gate.log()
    );
    let reply = CurlReply::parse(&reply);
    assert_eq!(reply.status, 200, "{reply:?}\n{}", gate.log());
    assert_eq!(reply.header("x-rucio-auth-account"), Some("alice"));
    assert!(reply.header("x-rucio-auth-token").is_some(), "{reply:?}");
    // The exchange's log line may follow the answer by a moment.
    let dn_logged = || {
        gate.log()
            .contains("\"dn\":\"/C=CH/O=Example/OU=Users/CN=Alice Smith\"")
    };
    for _ in 0..100 {
        if dn_logged() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        dn_logged(),
        "the identity is the user's DN, not the proxy's:\n{}",
        gate.log()
    );
}

/// The CLI on Cloud SOAR's store resolves only the secrets it uses: creating a key needs the
/// signing key, listing and revoking need none of the example's three; durations are printed as
/// a config writes them; `--help` says what "0" really does.
#[test]
fn the_token_cli_needs_only_the_secrets_it_uses() {
    let dir = tempfile::tempdir().expect("tempdir");
    example_certs(dir.path());
    let toml = read_example("cloudsoar");
    let config = write_file(dir.path(), "cloudsoar.toml", &toml);
    let all = env_vars(&toml);
    let signing: Vec<(String, String)> = all
        .iter()
        .filter(|(k, _)| k == "SOAR_JWT_KEY")
        .cloned()
        .collect();
    assert_eq!(signing.len(), 1, "the example signs with SOAR_JWT_KEY");
    assert!(all.len() > 1, "and names other secrets: {all:?}");

    let too_long = run_clean(
        &["token", "create", "--user", "alice", "--ttl", "400d"],
        &config,
        &signing,
    );
    assert_eq!(
        too_long.status.code(),
        Some(2),
        "{}",
        text(&too_long.stderr)
    );
    let said = text(&too_long.stderr);
    assert!(said.contains(r#"max_ttl = "365d""#), "{said}");
    assert!(!said.contains("month"), "{said}");

    let created = run_clean(&["token", "create", "--user", "alice"], &config, &signing);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let listed = run_clean(&["token", "list"], &config, &[]);
    assert!(
        listed.status.success(),
        "token list with no secret set: {}",
        text(&listed.stderr)
    );
    let listing = text(&listed.stdout);
    let id = listing
        .lines()
        .nth(1)
        .and_then(|row| row.split_whitespace().next())
        .unwrap_or_else(|| panic!("a row: {listing}"))
        .to_string();
    assert!(listing.contains("alice"), "{listing}");
    let revoked = run_clean(&["token", "revoke", &id], &config, &[]);
    assert!(
        revoked.status.success(),
        "token revoke with no secret set: {}",
        text(&revoked.stderr)
    );
    // Creating still needs its signing key, and says which.
    let unsigned = run_clean(&["token", "create", "--user", "bob"], &config, &[]);
    assert_eq!(unsigned.status.code(), Some(2));
    assert!(
        text(&unsigned.stderr).contains("SOAR_JWT_KEY"),
        "{}",
        text(&unsigned.stderr)
    );

    let help = Command::new(BIN)
        .args(["token", "create", "--help"])
        .output()
        .expect("run tokengate");
    let help = text(&help.stdout);
    assert!(help.contains("refused unless max_ttl"), "{help}");
}

/// `curl` over TLS to the gate at `localhost:port`, trusting `dir/certs/ca.pem`, presenting
/// `client` (cert, key) when given.
fn curl_tls(
    dir: &Path,
    port: u16,
    path: &str,
    client: Option<&(PathBuf, PathBuf)>,
    headers: &[(&str, &str)],
) -> CurlReply {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(dir.join("certs/ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    let out = cmd
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    CurlReply::parse(&text(&out.stdout))
}

/// What the echo upstream says it received in header `name`.
fn echoed(reply: &CurlReply, name: &str) -> Option<String> {
    reply.json()["headers"][name].as_str().map(str::to_string)
}

/// The Rucio example on a free port in a folder with its certificates, before it is started.
struct Rucio {
    up: Upstream,
    port: u16,
    toml: String,
    dir: tempfile::TempDir,
    root: Cert,
}

/// `None` (the test skips, or fails in strict mode) without curl.
fn rucio() -> Option<Rucio> {
    if Command::new("curl").arg("--version").output().is_err() {
        missing_tool("curl", "curl");
        return None;
    }
    let up = Upstream::start();
    let port = free_port();
    let toml = adapt("rucio", port, "http://127.0.0.1:8080", up.port);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = example_certs(dir.path());
    Some(Rucio {
        up,
        port,
        toml,
        dir,
        root,
    })
}

/// A user certificate with the DN the Rucio example maps, from `root`.
fn alice(root: &Cert) -> Cert {
    pki::user(
        Dn::of(&[
            ("C", "CH"),
            ("O", "Example"),
            ("OU", "Users"),
            ("CN", "Alice Smith"),
        ]),
        root,
    )
}

/// An error reply: its status and `{"error": message}`.
fn assert_error(reply: &CurlReply, status: u16, message: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.json()["error"], message, "{reply:?}");
}

/// Rucio: the stock client's certificate exchange at `/auth/x509` (a user certificate with the
/// example's DN, asking for its second account), then `X-Rucio-Auth-Token`; the server behind
/// gets the account and the DN, never the token.
#[tokio::test(flavor = "multi_thread")]
async fn rucio_example_exchanges_a_certificate_and_serves_x_rucio_auth_token() {
    let Some(Rucio {
        up: _up,
        port,
        toml,
        dir,
        root,
    }) = rucio()
    else {
        return;
    };
    let dn = "/C=CH/O=Example/OU=Users/CN=Alice Smith";
    assert!(
        toml.contains(&format!("dn = \"{dn}\"")),
        "the example maps {dn}"
    );
    let alice = alice(&root);
    let client = (
        write_file(dir.path(), "alice.pem", &alice.pem()),
        write_file(dir.path(), "alice-key.pem", &alice.key_pem()),
    );
    let certs = dir.path().to_path_buf();
    let gate = Gate::start_in(dir, &toml, &[]);

    let reply = curl_tls(
        &certs,
        port,
        "/auth/x509",
        Some(&client),
        &[("X-Rucio-Account", "ops"), ("X-Rucio-AppID", "test")],
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-rucio-auth-account"), Some("ops"));
    let token = reply
        .header("x-rucio-auth-token")
        .expect("a token")
        .to_string();

    let reply = curl_tls(
        &certs,
        port,
        "/rses/",
        None,
        &[
            ("X-Rucio-Auth-Token", &token),
            ("X-Client-DN", "/CN=forged"),
            ("X-Rucio-Account", "root"),
        ],
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-auth-account"], "ops");
    // The client's `X-Rucio-Account: root` is replaced by the verified account.
    assert_eq!(seen["x-rucio-account"], "ops", "{seen}");
    assert_eq!(seen["x-auth-user"], "ops");
    assert_eq!(seen["x-client-dn"], dn);
    assert!(seen.get("x-rucio-auth-token").is_none(), "{seen}");

    let validated = curl_tls(
        &certs,
        port,
        "/auth/validate",
        None,
        &[("X-Rucio-Auth-Token", &token)],
    );
    assert_eq!(validated.status, 200, "{validated:?}");
    assert_eq!(validated.json()["identity"], dn);

    let refused = curl_tls(&certs, port, "/rses/", None, &[]);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.json()["error"], "Credentials required");
    drop(gate);
}

/// The Rucio documentation's own commands (ESCAPE's "Rucio REST API with curl"), verbatim but
/// for the host and the certificate paths, run by `sh` with curl's default ALPN (it offers h2
/// first): the token is printed by `sed -n -e 's/^.*X-Rucio-Auth-Token: //p'`, which needs
/// HTTP/1.1 and the header name in Rucio's case; then the token lists RSEs.
const SEED_EXCHANGE: &str = r#"curl -i --key ~/.globus/userkey.pem --cert ~/.globus/usercert.pem -H "X-Rucio-Account: <myrucioaccount>" -X GET https://escape-rucio-auth.cern.ch/auth/x509 | sed -n -e 's/^.*X-Rucio-Auth-Token: //p'"#;
const SEED_USE: &str =
    r#"curl -X GET -H "X-Rucio-Auth-Token: $token" https://escape-rucio.cern.ch/rses/"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_rucio_seeds_curl_and_sed_line_prints_a_working_token() {
    let Some(Rucio {
        up: _up,
        port,
        toml,
        dir,
        root,
    }) = rucio()
    else {
        return;
    };
    let alice = alice(&root);
    let globus = dir.path().join(".globus");
    std::fs::create_dir_all(&globus).expect("mkdir .globus");
    write_file(&globus, "usercert.pem", &alice.pem());
    write_file(&globus, "userkey.pem", &alice.key_pem());
    let home = dir.path().to_path_buf();
    let _gate = Gate::start_in(dir, &toml, &[]);
    let host = format!("localhost:{port}");
    let exchange = SEED_EXCHANGE
        .replace("escape-rucio-auth.cern.ch", &host)
        .replace("<myrucioaccount>", "ops");
    let script = format!(
        "token=$({exchange} | tr -d '\\r')\n[ -n \"$token\" ] || exit 3\nprintf 'token=%s\\n' \"$token\"\n{}\n",
        SEED_USE.replace("escape-rucio.cern.ch", &host)
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("HOME", &home)
        // The test CA, as a user's system trust store would hold theirs.
        .env("CURL_CA_BUNDLE", home.join("certs/ca.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\nexit {:?}\nstdout {stdout}\nstderr {}",
        out.status.code(),
        text(&out.stderr)
    );
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .expect("the token line");
    assert!(token.len() > 20, "{token:?}");
    let listed: serde_json::Value =
        serde_json::from_str(stdout.split_once('\n').map_or("", |(_, rest)| rest))
            .unwrap_or_else(|e| panic!("the RSE listing is the upstream's JSON ({e}): {stdout}"));
    assert_eq!(listed["path"], "/rses/", "{listed}");
    assert_eq!(listed["headers"]["x-rucio-account"], "ops", "{listed}");
}

// ---------------------------------------------------------------------------------------------
// 3. A fresh clone needs nothing beside it
// ---------------------------------------------------------------------------------------------

fn git(args: &[&str], cwd: &Path) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

/// A `git clone` of the committed HEAD: `config.example.toml` passes `check` with an empty
/// environment and every example with only what it documents, so both are committed and need
/// nothing outside the repository; and no test reaches for tools beside the clone.
#[test]
fn a_fresh_clone_checks_its_example_configs_with_nothing_beside_it() {
    if Command::new("git").arg("--version").output().is_err() {
        missing_tool("git", "git");
        return;
    }
    let inside = git(&["rev-parse", "--is-inside-work-tree"], crate_dir());
    if text(&inside.stdout).trim() != "true" {
        println!("skipped: {} is not a git work tree", crate_dir().display());
        return;
    }
    let head = text(&git(&["rev-parse", "HEAD"], crate_dir()).stdout)
        .trim()
        .to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let clone = tmp.path().join("clone");
    let source = crate_dir().to_string_lossy().into_owned();
    let target = clone.to_string_lossy().into_owned();
    let out = git(
        &["clone", "--quiet", "--no-checkout", &source, &target],
        tmp.path(),
    );
    assert!(out.status.success(), "git clone: {}", text(&out.stderr));
    let out = git(&["checkout", "--quiet", "--detach", &head], &clone);
    assert!(out.status.success(), "git checkout: {}", text(&out.stderr));

    let out = run_clean(&["check"], &clone.join("config.example.toml"), &[]);
    assert!(
        out.status.success(),
        "config.example.toml in a fresh clone: {}",
        text(&out.stderr)
    );

    let examples = clone.join("examples");
    let mut committed: Vec<String> = std::fs::read_dir(&examples)
        .expect("examples/ is committed")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".toml").map(String::from))
        .collect();
    committed.sort();
    let mut expected: Vec<String> = EXAMPLES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(committed, expected, "the committed examples");
    // The examples' documented files: a server certificate and the (users') CA.
    example_certs(&examples);
    for name in EXAMPLES {
        assert_checks(name, &examples.join(format!("{name}.toml")));
    }

    // Tests use only what the repository and the machine's packages hold. (tests/helm.rs is
    // left out here: its chart renderer has a test of its own.) The needle is split so that
    // this file does not match itself.
    let needle = format!("../shared/{}", "tools");
    for entry in walk(&clone.join("tests")) {
        if entry.file_name().is_some_and(|n| n == "helm.rs") {
            continue;
        }
        let body = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(
            !body.contains(&needle),
            "{} reaches for {needle}",
            entry.display()
        );
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}
