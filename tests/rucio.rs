//! The Rucio token exchange end to end (SPEC §5, `[x509]`): the real binary with TLS and client
//! certificates, driven by stock curl presenting end-entity certificates and proxy chains
//! generated here; the exchanged token then used in every dialect against a real upstream.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::pki::*;
use common::*;
use serde_json::Value;

const ALICE_SLASH: &str = "/C=CH/O=Example/OU=Users/CN=Alice Smith";
const ALICE_RFC2253: &str = "CN=Alice Smith,OU=Users,O=Example,C=CH";
const BOB_SLASH: &str = "/C=CH/O=Example/OU=Users/CN=Bob Jones";

/// The CA, the users' certificates and chains, and the server's files, in one directory.
struct Grid {
    dir: tempfile::TempDir,
    root: Cert,
    alice: Cert,
    bob: Cert,
}

fn dn(name: &str) -> Dn {
    Dn::of(&[("C", "CH"), ("O", "Example"), ("OU", "Users"), ("CN", name)])
}

fn grid() -> Grid {
    let root = ca("Example Root CA", None);
    let alice = user(dn("Alice Smith"), &root);
    let bob = user(dn("Bob Jones"), &root);
    let server = server(&root);
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "ca.pem", &root.pem());
    write_file(dir.path(), "server.pem", &server.pem());
    write_file(dir.path(), "server-key.pem", &server.key_pem());
    Grid {
        dir,
        root,
        alice,
        bob,
    }
}

impl Grid {
    /// Writes a client chain (leaf first) and the leaf's key; returns (cert file, key file).
    fn client(&self, name: &str, chain: &[&Cert]) -> (PathBuf, PathBuf) {
        let pem: String = chain.iter().map(|c| c.pem()).collect();
        let cert = write_file(self.dir.path(), &format!("{name}.pem"), &pem);
        let key = write_file(
            self.dir.path(),
            &format!("{name}-key.pem"),
            &chain[0].key_pem(),
        );
        (cert, key)
    }

    fn config(&self, port: u16, up: u16, store: &str, x509_extra: &str) -> String {
        let d = self.dir.path().display();
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[server.tls]
cert = "{d}/server.pem"
key = "{d}/server-key.pem"
client_ca = "{d}/ca.pem"
client_auth = "optional"
proxy_certificates = true

{store}

[x509]
enabled = true
{x509_extra}

{validator}

{route}"#,
            validator = static_validator(&[(ALICE, "static-alice", "static")]),
            route = catch_all_route(up, "\"X-Client-DN\" = \"{dn}\""),
        )
    }
}

const ALICE_IDENTITY: &str = r#"[[x509.identity]]
dn = "/C=CH/O=Example/OU=Users/CN=Alice Smith"
accounts = ["alice", "ops"]"#;

type Reply = CurlReply;

/// The Rucio failure shape.
trait RucioReply {
    /// 401, ExceptionClass + ExceptionMessage headers and JSON.
    fn assert_cannot_authenticate(&self, status: u16, message_part: &str);
}

impl RucioReply for Reply {
    fn assert_cannot_authenticate(&self, status: u16, message_part: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("exceptionclass"), Some("CannotAuthenticate"));
        let message = self.header("exceptionmessage").expect("ExceptionMessage");
        assert!(message.len() <= 125 && !message.contains('\n'), "{message}");
        assert!(
            message.contains(message_part),
            "{message:?} lacks {message_part:?}"
        );
        let body = self.json();
        assert_eq!(body["ExceptionClass"], "CannotAuthenticate");
        assert_eq!(body["ExceptionMessage"], message);
        assert!(self.header("x-rucio-auth-token").is_none());
    }
}

/// `curl https://localhost:PORT{path}` trusting the grid CA, presenting `client` when given.
fn curl(
    grid: &Grid,
    port: u16,
    path: &str,
    client: Option<&(PathBuf, PathBuf)>,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(grid.dir.path().join("ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(format!("https://localhost:{port}{path}"));
    let out = cmd.output().expect("run curl");
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(CurlReply::parse(&String::from_utf8_lossy(&out.stdout)))
}

fn ok(reply: Result<Reply, String>) -> Reply {
    reply.unwrap_or_else(|e| panic!("{e}"))
}

/// Exchanges the client's certificate for a token; checks the success shape; returns the
/// token and its expiry.
fn exchange(
    grid: &Grid,
    port: u16,
    path: &str,
    client: &(PathBuf, PathBuf),
    account: Option<&str>,
    expect_account: &str,
) -> (String, SystemTime) {
    let mut headers = vec![("X-Rucio-AppID", "test"), ("X-Rucio-VO", "def")];
    if let Some(a) = account {
        headers.push(("X-Rucio-Account", a));
    }
    let r = ok(curl(grid, port, path, Some(client), &headers));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");
    assert_eq!(r.header("x-rucio-auth-account"), Some(expect_account));
    assert_eq!(r.header("cache-control"), Some("no-cache, no-store"));
    let token = r.header("x-rucio-auth-token").expect("token").to_string();
    assert!(token.starts_with("tg_") && token.len() == 52, "{token}");
    let expires = r.header("x-rucio-auth-token-expires").expect("expiry");
    // `%a, %d %b %Y %H:%M:%S UTC`
    assert!(
        expires.ends_with(" UTC") && expires.len() == 29,
        "{expires}"
    );
    let at = httpdate::parse_http_date(&expires.replace(" UTC", " GMT")).expect("date form");
    (token, at)
}

/// The token works in every dialect (without a client certificate) and the upstream gets the
/// token, the account and the DN.
fn assert_token_works(grid: &Grid, port: u16, token: &str, account: &str, dn: &str) {
    for (header, prefix) in DIALECTS {
        let value = format!("{prefix}{token}");
        let r = ok(curl(grid, port, "/data/x", None, &[(header, &value)]));
        assert_eq!(r.status, 200, "{header}: {r:?}");
        let seen = &r.json()["headers"];
        assert_eq!(seen["auth-token"], token, "{header}");
        assert_eq!(seen["x-auth-user"], account);
        assert_eq!(seen["x-auth-account"], account);
        assert_eq!(seen["x-client-dn"], dn);
    }
}

fn start(grid: &Grid, up: &Upstream, store: &str, x509_extra: &str) -> Gate {
    let port = free_port();
    let toml = grid.config(port, up.port, store, x509_extra);
    Gate::start_in(tempfile::tempdir().unwrap(), &toml, &[])
}

#[test]
fn end_entity_and_proxy_chains_get_tokens_that_work_in_every_dialect() {
    let g = grid();
    let up = Upstream::start();
    let gate = start(
        &g,
        &up,
        "[store]\nbackend = \"memory\"",
        &format!("token_ttl = \"1h\"\n{ALICE_IDENTITY}"),
    );
    let rfc3820 = issue(&rfc3820_spec(&g.alice), Some(&g.alice), None);
    let legacy = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    let limited = issue(&legacy_spec(&g.alice, true), Some(&g.alice), None);
    let proxy_of_proxy = issue(&rfc3820_spec(&rfc3820), Some(&rfc3820), None);
    let chains = [
        ("ee", vec![&g.alice]),
        ("rfc3820", vec![&rfc3820, &g.alice]),
        ("legacy", vec![&legacy, &g.alice]),
        ("limited", vec![&limited, &g.alice]),
        ("pop", vec![&proxy_of_proxy, &rfc3820, &g.alice]),
    ];
    for (i, (name, chain)) in chains.iter().enumerate() {
        let client = g.client(name, chain);
        let path = if i % 2 == 0 {
            "/auth/x509"
        } else {
            "/auth/x509_proxy"
        };
        let before = SystemTime::now();
        let (token, expires) = exchange(&g, gate.port, path, &client, None, "alice");
        // The expiry header says token_ttl (1h) from now, to the second.
        let ttl = expires.duration_since(before).unwrap_or_default();
        assert!(
            ttl > Duration::from_secs(3590) && ttl <= Duration::from_secs(3601),
            "{name}: {ttl:?}"
        );
        assert_token_works(&g, gate.port, &token, "alice", ALICE_SLASH);
        // /auth/validate says who it is.
        let v = ok(curl(
            &g,
            gate.port,
            "/auth/validate",
            None,
            &[("X-Rucio-Auth-Token", &token)],
        ));
        assert_eq!(v.status, 200, "{v:?}");
        let body = v.json();
        assert_eq!(body["account"], "alice");
        assert_eq!(body["identity"], ALICE_SLASH);
        let lifetime = body["lifetime"].as_str().expect("lifetime");
        let lifetime = humantime::parse_rfc3339(lifetime).expect("RFC 3339");
        let apart = lifetime
            .duration_since(expires)
            .or_else(|_| expires.duration_since(lifetime))
            .unwrap();
        assert!(apart <= Duration::from_secs(1), "{name}: {apart:?}");
    }
    assert!(!gate.log().contains("tg_"), "a token reached the log");
}

#[test]
fn accounts_certificates_and_tokens_that_do_not_fit_are_refused() {
    let g = grid();
    let up = Upstream::start();
    let gate = start(
        &g,
        &up,
        "[store]\nbackend = \"memory\"",
        &format!("token_ttl = \"1h\"\n{ALICE_IDENTITY}"),
    );
    let alice = g.client("alice", &[&g.alice]);
    // Another allowed account on request; a not-allowed one is refused.
    let (token, _) = exchange(&g, gate.port, "/auth/x509", &alice, Some("ops"), "ops");
    assert_token_works(&g, gate.port, &token, "ops", ALICE_SLASH);
    ok(curl(
        &g,
        gate.port,
        "/auth/x509",
        Some(&alice),
        &[("X-Rucio-Account", "root")],
    ))
    .assert_cannot_authenticate(401, "account root");
    // No certificate.
    ok(curl(&g, gate.port, "/auth/x509", None, &[]))
        .assert_cannot_authenticate(401, "no verified client certificate");
    // A verified certificate whose DN is not mapped.
    let bob = g.client("bob", &[&g.bob]);
    ok(curl(&g, gate.port, "/auth/x509_proxy", Some(&bob), &[]))
        .assert_cannot_authenticate(401, "not mapped");
    // Broken chains fail the handshake; the server keeps serving.
    let stranger_ca = ca("Stranger CA", None);
    let stranger = user(dn("Alice Smith"), &stranger_ca);
    let other_key = rcgen::KeyPair::generate().unwrap();
    let forged = issue(&rfc3820_spec(&g.alice), Some(&g.alice), Some(&other_key));
    let mut extra_cn = rfc3820_spec(&g.alice);
    extra_cn.subject = g.alice.dn.plus_cn("1").plus_cn("2");
    let extra_cn = issue(&extra_cn, Some(&g.alice), None);
    let mut expired = rfc3820_spec(&g.alice);
    expired.years = Some((2000, 2001));
    let expired = issue(&expired, Some(&g.alice), None);
    let by_ca = issue(&rfc3820_spec(&g.root), Some(&g.root), None);
    for (name, chain) in [
        ("stranger", vec![&stranger]),
        ("forged", vec![&forged, &g.alice]),
        ("extra-cn", vec![&extra_cn, &g.alice]),
        ("expired", vec![&expired, &g.alice]),
        ("by-ca", vec![&by_ca]),
    ] {
        let client = g.client(name, &chain);
        let result = curl(&g, gate.port, "/auth/x509", Some(&client), &[]);
        assert!(result.is_err(), "{name} was accepted: {result:?}");
    }
    // Still serving, and the failures were logged.
    let (token, _) = exchange(&g, gate.port, "/auth/x509", &alice, None, "alice");
    assert_token_works(&g, gate.port, &token, "alice", ALICE_SLASH);
    assert!(
        gate.log().contains("TLS handshake failed"),
        "{}",
        gate.log()
    );
    // /auth/validate: no token → 400, a bad one → 401, in the Rucio shape.
    ok(curl(&g, gate.port, "/auth/validate", None, &[]))
        .assert_cannot_authenticate(400, "no token");
    // The last character changed (to one it is not: an `x` left as `x` would be the token).
    let last = if token.ends_with('x') { 'y' } else { 'x' };
    let bogus = format!("{}{last}", &token[..token.len() - 1]);
    ok(curl(
        &g,
        gate.port,
        "/auth/validate",
        None,
        &[("X-Rucio-Auth-Token", &bogus)],
    ))
    .assert_cannot_authenticate(401, "invalid");
    // A token presented with a client certificate: {dn} comes from the certificate.
    let r = ok(curl(
        &g,
        gate.port,
        "/data",
        Some(&alice),
        &[("X-Auth-Token", ALICE)],
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-client-dn"], ALICE_SLASH);
    assert_eq!(r.json()["headers"]["x-auth-user"], "static-alice");
    // Without the certificate, no DN header (and a client-sent one is stripped).
    let r = ok(curl(
        &g,
        gate.port,
        "/data",
        None,
        &[("X-Auth-Token", ALICE), ("X-Client-DN", "/CN=forged")],
    ));
    assert_eq!(r.json()["headers"]["x-client-dn"], Value::Null);
}

#[test]
fn an_exchanged_token_expires_after_token_ttl_even_when_cached() {
    let g = grid();
    let up = Upstream::start();
    let gate = start(
        &g,
        &up,
        "[store]\nbackend = \"memory\"",
        &format!("token_ttl = \"2s\"\n{ALICE_IDENTITY}"),
    );
    let alice = g.client("alice", &[&g.alice]);
    let (token, expires) = exchange(&g, gate.port, "/auth/x509", &alice, None, "alice");
    assert_token_works(&g, gate.port, &token, "alice", ALICE_SLASH);
    std::thread::sleep(Duration::from_millis(2600));
    assert!(SystemTime::now() > expires);
    for (header, prefix) in DIALECTS {
        let value = format!("{prefix}{token}");
        let r = ok(curl(&g, gate.port, "/data", None, &[(header, &value)]));
        assert_eq!(r.status, 401, "{header}: {r:?}");
        assert_eq!(r.json()["error"], "Invalid credentials");
    }
}

fn run(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn identities_managed_with_the_cli_are_shared_through_the_store() {
    let g = grid();
    let up = Upstream::start();
    let db = g.dir.path().join("tokens.db");
    let store = format!("[store]\nbackend = \"sqlite\"\npath = \"{}\"", db.display());
    let gate = start(
        &g,
        &up,
        &store,
        &format!("token_ttl = \"1h\"\n{ALICE_IDENTITY}"),
    );
    let config = gate.config_path.to_str().unwrap().to_string();
    let bob = g.client("bob", &[&g.bob]);
    ok(curl(&g, gate.port, "/auth/x509", Some(&bob), &[]))
        .assert_cannot_authenticate(401, "not mapped");

    // Mapped through the CLI (another process): the running server sees it at once.
    let add = |account: &str, default: bool| {
        let mut args = vec!["identity", "add", "--config", &config, "--dn", BOB_SLASH];
        args.extend(["--account", account]);
        if default {
            args.push("--default");
        }
        let (ok, out) = run(&args, g.dir.path());
        assert!(ok, "{out}");
    };
    add("bob", false);
    add("analysis", false);
    let (token, _) = exchange(&g, gate.port, "/auth/x509", &bob, None, "bob");
    assert_token_works(&g, gate.port, &token, "bob", BOB_SLASH);
    exchange(
        &g,
        gate.port,
        "/auth/x509",
        &bob,
        Some("analysis"),
        "analysis",
    );
    add("analysis", true);
    exchange(&g, gate.port, "/auth/x509", &bob, None, "analysis");
    // Config entries and stored ones are listed.
    let (ok_list, listing) = run(&["identity", "list", "--config", &config], g.dir.path());
    assert!(ok_list, "{listing}");
    assert!(
        listing.contains(&format!("{BOB_SLASH}\tanalysis,bob")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{ALICE_SLASH}\talice,ops\t(config)")),
        "{listing}"
    );
    // Removing one account, then the DN.
    let remove = |account: Option<&str>| {
        let mut args = vec!["identity", "remove", "--config", &config, "--dn", BOB_SLASH];
        if let Some(a) = account {
            args.extend(["--account", a]);
        }
        run(&args, g.dir.path())
    };
    assert!(remove(Some("analysis")).0);
    exchange(&g, gate.port, "/auth/x509", &bob, None, "bob");
    assert!(remove(None).0);
    assert!(!remove(None).0, "removing twice reports nothing removed");
    ok(curl(&g, gate.port, "/auth/x509", Some(&bob), &[]))
        .assert_cannot_authenticate(401, "not mapped");
    // The token issued earlier stays valid until it expires or is revoked.
    assert_token_works(&g, gate.port, &token, "bob", BOB_SLASH);
    // It is listed as an x509 token.
    let (_, tokens) = run(&["token", "list", "--config", &config], g.dir.path());
    assert!(tokens.contains("x509"), "{tokens}");
}

#[test]
fn rfc2253_dn_format_maps_and_forwards_apache_style_dns() {
    let g = grid();
    let up = Upstream::start();
    let extra = format!(
        "dn_format = \"rfc2253\"\n[[x509.identity]]\ndn = \"{ALICE_RFC2253}\"\naccounts = [\"alice\"]"
    );
    let gate = start(&g, &up, "[store]\nbackend = \"memory\"", &extra);
    let proxy = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    let client = g.client("proxy", &[&proxy, &g.alice]);
    let (token, _) = exchange(&g, gate.port, "/auth/x509_proxy", &client, None, "alice");
    assert_token_works(&g, gate.port, &token, "alice", ALICE_RFC2253);
}

#[test]
fn x509_without_client_ca_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "x.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\n[x509]\nenabled = true\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n",
    );
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.toml:3:"), "{err}");
    assert!(err.contains("client_ca"), "{err}");
}
