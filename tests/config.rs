//! SPEC §3 and §8: the CLI (`check`, `serve`, `hash`, `--version`), config errors with
//! `PATH:LINE:COL`, exit status 2, and `${env:..}` / `${file:..}` secrets end to end.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// A config using every table and key the brief lists, with `${env:}` and `${file:}` secrets.
fn full_config(dir: &Path, pki: &Pki, port: u16, up: u16) -> String {
    let cert = write_file(dir, "server.pem", &pki.cert_pem);
    let key = write_file(dir, "server-key.pem", &pki.key_pkcs8_pem);
    let sha = write_file(
        dir,
        "token.sha256",
        &format!("{}\n", sha256_hex("full-token")),
    );
    format!(
        r#"# every section
[server]
listen = "127.0.0.1:{port}"
max_header_bytes = 16384
max_body_bytes = "0"
header_read_timeout = "10s"
max_connections = 10000
drain_timeout = "30s"

[server.tls]
cert = "{cert}"
key = "{key}"

[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio", "header:X-Api-Key", "query:api_key", "cookie:session"]

[cache]
ttl = "1h"
negative_ttl = "10s"
max_entries = 1000000

[store]
backend = "memory"

[[validator]]
type = "static"
[[validator.token]]
sha256 = "${{file:{sha}}}"
subject = "dev"
account = "dev"

[[validator]]
type = "introspect"
url = "http://127.0.0.1:{up}/whoami"
header = "auth-token"
value = "{{token}}"
subject = "json:/uid"
timeout = "2s"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
auth = "required"
preserve_host = true
timeout = "60s"
[route.upstream_auth]
header = "auth-token"
value = "${{env:TG_TEST_UPSTREAM_SECRET}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"X-Auth-Account" = "{{account}}"

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "optional"
"#,
        cert = cert.display(),
        key = key.display(),
        sha = sha.display(),
    )
}

/// Parses `PATH:LINE:COL: message` from stderr.
fn location(stderr: &str, path: &Path) -> (usize, usize, String) {
    let prefix = format!("{}:", path.display());
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}LINE:COL: message` line in stderr: {stderr:?}"));
    let rest = &line[prefix.len()..];
    let mut parts = rest.splitn(3, ':');
    let l = parts.next().and_then(|v| v.parse().ok());
    let c = parts.next().and_then(|v| v.parse().ok());
    let msg = parts.next().unwrap_or_default().trim().to_string();
    match (l, c) {
        (Some(l), Some(c)) if !msg.is_empty() => (l, c, msg),
        _ => panic!("malformed location line {line:?}"),
    }
}

fn check(path: &Path) -> std::process::Output {
    cli(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn check_accepts_a_full_config() {
    let dir = tempfile::tempdir().unwrap();
    let toml = full_config(dir.path(), &pki(), free_port(), free_port());
    let path = write_file(dir.path(), "tokengate.toml", &toml);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("TG_TEST_UPSTREAM_SECRET", "s3cr3t-upstream-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {}; stderr {stderr}",
        out.status
    );
    assert_eq!(stdout.trim(), "config ok");
    assert!(
        !stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"),
        "a secret was printed"
    );
}

#[test]
fn check_reads_the_config_path_from_tokengate_config() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"none\"\n",
        free_port()
    );
    let path = write_file(dir.path(), "env.toml", &toml);
    let out = Command::new(BIN)
        .arg("check")
        .env("TOKENGATE_CONFIG", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config ok");
}

/// Asserts that `check` (and `serve`) reject `toml` with exit 2 and `PATH:LINE:COL: message`
/// pointing at `line`; returns the message.
fn assert_rejected_at(toml: &str, line: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "bad.toml", toml);
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "check: stderr {stderr:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("config ok"),
        "check printed config ok for a bad config"
    );
    let (l, c, msg) = location(&stderr, &path);
    assert_eq!(l, line, "wrong line in {stderr:?}\nconfig:\n{toml}");
    assert!(c >= 1);
    msg
}

#[test]
fn unknown_keys_are_errors_with_their_location() {
    let port = free_port();
    let msg = assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_header_byte = 100\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        3,
    );
    assert!(
        msg.contains("max_header_byte"),
        "message should name the key: {msg}"
    );

    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"none\"\nretries = 3\n"
        ),
        8,
    );
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\nttl = \"1h\"\nsize = 5\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        5,
    );
}

#[test]
fn an_unknown_table_is_an_error() {
    let port = free_port();
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[frobnicate]\nx = 1\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        4,
    );
}

#[test]
fn bad_durations_are_errors_with_their_location() {
    let port = free_port();
    let msg = assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\nttl = \"soon\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        4,
    );
    assert!(!msg.is_empty());
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndrain_timeout = \"10 parsecs\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        3,
    );
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\ntimeout = \"-5s\"\n"
        ),
        6,
    );
}

#[test]
fn bad_values_are_errors_with_their_location() {
    let port = free_port();
    // Not TOML at all.
    assert_rejected_at(
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = = 3\n"),
        3,
    );
    // Wrong type.
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = \"many\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        3,
    );
    // An unknown dialect.
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[credentials]\nsources = [\"bearer\", \"carrier-pigeon\"]\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
        ),
        4,
    );
    // An unknown auth mode.
    assert_rejected_at(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"sometimes\"\n"
        ),
        6,
    );
}

/// `[limits]` and `[[route.rate_limit]]`: every bad value is named at its place.
#[test]
fn bad_limits_are_errors_with_their_location() {
    let port = free_port();
    let route = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n{extra}"
        )
    };
    // Line 6 onwards is `extra`.
    let cases: [(&str, usize, &str); 9] = [
        (
            "[[route.rate_limit]]\nper = \"user\"\nrate = \"1/1s\"\n",
            7,
            "per must be",
        ),
        (
            "[[route.rate_limit]]\nper = \"client\"\nrate = \"fast\"\n",
            8,
            "invalid rate",
        ),
        (
            "[[route.rate_limit]]\nper = \"client\"\nrate = \"0\"\n",
            8,
            "cannot be \"0\"",
        ),
        (
            "[[route.rate_limit]]\nper = \"client\"\nrate = \"5/0s\"\n",
            8,
            "more than 0",
        ),
        (
            "[[route.rate_limit]]\nper = \"client\"\nrate = \"1/1s\"\nburst = 0\n",
            9,
            "burst",
        ),
        (
            "[[route.rate_limit]]\nper = \"client\"\nrate = \"1/1s\"\nwindow = 3\n",
            9,
            "window",
        ),
        (
            "auth = \"none\"\n[[route.rate_limit]]\nper = \"subject\"\nrate = \"1/1s\"\n",
            8,
            "per = \"client\"",
        ),
        ("[limits]\nfailed_auth = \"twenty\"\n", 7, "invalid rate"),
        ("[limits]\nshared = true\n", 7, "backend = \"redis\""),
    ];
    for (extra, line, says) in cases {
        let message = assert_rejected_at(&route(extra), line);
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    // Good ones pass, "0" turns the failed-credential limit off.
    let dir = tempfile::tempdir().unwrap();
    let good = route(
        "[[route.rate_limit]]\nper = \"token\"\nrate = \"100/s\"\n[[route.rate_limit]]\nper = \"client\"\nrate = \"5/1m\"\nburst = 20\n\n[limits]\nfailed_auth = \"0\"\nmax_tracked = 500\n",
    );
    let out = check(&write_file(dir.path(), "good.toml", &good));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn max_body_bytes_accepts_strings_and_integers() {
    for value in ["\"0\"", "0", "1048576", "\"1048576\""] {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nmax_body_bytes = {value}\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nauth = \"none\"\n",
            free_port()
        );
        let path = write_file(dir.path(), "t.toml", &toml);
        let out = check(&path);
        assert!(
            out.status.success(),
            "max_body_bytes = {value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn serve_with_a_bad_config_exits_2_with_the_location() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nbogus_key = true\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"
    );
    let path = write_file(dir.path(), "bad.toml", &toml);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve with a bad config kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr {stderr:?}");
    let (line, _, msg) = location(&stderr, &path);
    assert_eq!(line, 3);
    assert!(msg.contains("bogus_key"), "{msg}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_missing_config_file_is_an_error() {
    let out = cli(&["check", "--config", "/nonexistent/tokengate.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokengate.toml"));
}

#[test]
fn hash_prints_lower_hex_sha256() {
    let out = cli(&["hash", "test"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
    );
    for token in ["legacy-secret-alice", "tg_ünïcode-and spaces", "a"] {
        let out = cli(&["hash", token]);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n", sha256_hex(token))
        );
    }
}

#[test]
fn version_is_printed() {
    let out = cli(&["--version"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_config_serves_with_env_and_file_secrets() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pki = pki();
    let toml = full_config(dir.path(), &pki, port, up.port);
    let ca = write_file(dir.path(), "ca.pem", &pki.ca_pem);
    let gate = Gate::start_in(
        dir,
        &toml,
        &[("TG_TEST_UPSTREAM_SECRET", "s3cr3t-upstream-value")],
    );

    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                "X-Api-Key: full-token",
                "--cacert",
            ])
            .arg(&ca)
            .arg(format!("https://127.0.0.1:{port}/api/items"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        json["headers"]["auth-token"], "s3cr3t-upstream-value",
        "${{env:}} upstream secret not rendered"
    );
    assert_eq!(
        json["headers"]["x-auth-user"], "dev",
        "the ${{file:}} sha256 (with the trailing newline `tokengate hash > file` writes) did not match"
    );
    assert_eq!(json["headers"]["x-forwarded-proto"], "https");
    assert!(!json["headers"].to_string().contains("full-token"));
    assert!(
        !gate.log().contains("s3cr3t-upstream-value"),
        "the secret was logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_secret_for_the_upstream_credential() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(dir.path(), "upstream.key", "file-secret-9d8c");
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[route.upstream_auth]
header = "X-Service-Key"
value = "${{file:{secret}}}"
"#,
        up = up.port,
        secret = secret.display(),
        validator = static_validator(&[("file-client-token", "carol", "c")]),
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    let resp = get(&gate.url("/s"), &[("X-Auth-Token", "file-client-token")]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.echoed("x-service-key").as_deref(),
        Some("file-secret-9d8c")
    );
    assert!(!resp.json()["headers"]
        .to_string()
        .contains("file-client-token"));
    assert!(!gate.log().contains("file-secret-9d8c"));
}
