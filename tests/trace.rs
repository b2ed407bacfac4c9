//! Request ids, W3C trace context and the access-log fields that carry them, end to end: the
//! real binary between a real client and the echo upstream.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "trace-static-token-7d1e";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(port: u16, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{static_v}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
"#,
        static_v = static_validator(&[(TOKEN, "svc", "ops")]),
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn one_line(gate: &Gate, path: &str) -> Value {
    let lines = gate.wait_access_line(path, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 1, "one access line for {path}: {lines:?}");
    lines.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_is_made_forwarded_returned_and_logged() {
    let up = Upstream::start();
    let gate = Gate::start(&config(free_port(), up.port));
    let resp = get(&gate.url("/made"), &[("authorization", &bearer())]).await;
    assert_eq!(resp.status, 200);
    let returned = resp.header("x-request-id").expect("x-request-id returned");
    assert_eq!(returned.len(), 32, "{returned}");
    assert!(
        returned.bytes().all(|b| b.is_ascii_hexdigit()),
        "{returned}"
    );
    assert_eq!(
        resp.echoed("x-request-id").as_deref(),
        Some(returned.as_str())
    );
    let line = one_line(&gate, "/made").await;
    assert_eq!(line["request_id"], returned.as_str());
    assert_eq!(
        line["trace_id"],
        Value::Null,
        "no trace without traceparent"
    );
    assert!(up.last().await.header("traceparent").is_none());

    // Every request gets its own.
    let again = get(&gate.url("/made-again"), &[("authorization", &bearer())]).await;
    assert_ne!(again.header("x-request-id"), Some(returned));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_client_request_id_is_kept_and_an_odd_one_replaced() {
    let up = Upstream::start();
    let gate = Gate::start(&config(free_port(), up.port));
    let resp = get(
        &gate.url("/kept"),
        &[("authorization", &bearer()), ("x-request-id", "job-42:a/b")],
    )
    .await;
    assert_eq!(resp.header("x-request-id").as_deref(), Some("job-42:a/b"));
    assert_eq!(resp.echoed("x-request-id").as_deref(), Some("job-42:a/b"));
    assert_eq!(one_line(&gate, "/kept").await["request_id"], "job-42:a/b");

    // Quotes, spaces or 129 characters: not trusted into logs and upstream headers.
    for odd in ["a \"b\"", &"x".repeat(129)] {
        let resp = get(
            &gate.url("/odd"),
            &[("authorization", &bearer()), ("x-request-id", odd)],
        )
        .await;
        let id = resp.header("x-request-id").unwrap();
        assert_eq!(id.len(), 32, "{odd:?} replaced: {id}");
        assert_eq!(resp.echoed("x-request-id"), Some(id));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn own_responses_carry_the_request_id_too() {
    let up = Upstream::start();
    let gate = Gate::start(&config(free_port(), up.port));
    let resp = get(&gate.url("/no-credential"), &[("x-request-id", "r-401")]).await;
    resp.assert_error(401, "Credentials required");
    assert_eq!(resp.header("x-request-id").as_deref(), Some("r-401"));
    let line = one_line(&gate, "/no-credential").await;
    assert_eq!(line["request_id"], "r-401");
    assert_eq!(line["bytes_sent"], resp.body.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_continues_the_trace_with_a_new_span() {
    let up = Upstream::start();
    let gate = Gate::start(&config(free_port(), up.port));
    let resp = get(
        &gate.url("/traced"),
        &[
            ("authorization", &bearer()),
            ("traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let sent = resp.echoed("traceparent").expect("traceparent forwarded");
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent.ends_with("-01"),
        "{sent}"
    );
    assert_eq!(sent.len(), 55);
    assert_ne!(&sent[36..52], "00f067aa0ba902b7", "our hop is a new span");
    assert_eq!(
        resp.echoed("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    let line = one_line(&gate, "/traced").await;
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    // An invalid traceparent is not passed on, nor its tracestate.
    let bad = get(
        &gate.url("/bad-trace"),
        &[
            ("authorization", &bearer()),
            ("traceparent", "00-XYZ-00f067aa0ba902b7-01"),
            ("tracestate", "a=b"),
        ],
    )
    .await;
    assert_eq!(bad.status, 200);
    assert_eq!(bad.echoed("traceparent"), None);
    assert_eq!(bad.echoed("tracestate"), None);
    assert_eq!(one_line(&gate, "/bad-trace").await["trace_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_has_host_protocol_user_agent_token_id_and_bytes_sent() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let toml = format!(
        "{}\n[store]\nbackend = \"sqlite\"\npath = \"{}\"\n[endpoints]\n",
        config(port, up.port),
        dir.path().join("tokens.db").display()
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    let (token, id) = cli_create_token(&gate.config_path, "alice");

    // A streamed, chunked body of 300 000 bytes: bytes_sent counts what was sent.
    let resp = get(
        &gate.url("/download?bytes=300000&chunked=1"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("user-agent", "trace-test/1.0 \"quoted\""),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 300_000);
    let line = one_line(&gate, "/download").await;
    assert_eq!(line["bytes_sent"], 300_000);
    assert_eq!(line["user_agent"], "trace-test/1.0 \"quoted\"");
    assert_eq!(line["host"], format!("127.0.0.1:{port}"));
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["subject"], "alice");
    assert_eq!(line["token_id"], id.as_str());
    assert!(!gate.log().contains(&token), "the token is never logged");

    // The static token is not an issued token: no token id.
    let resp = get(&gate.url("/static"), &[("authorization", &bearer())]).await;
    assert_eq!(resp.status, 200);
    let line = one_line(&gate, "/static").await;
    assert_eq!(line["token_id"], Value::Null);
    assert_eq!(line["bytes_sent"], resp.body.len() as u64);
    assert_eq!(line["user_agent"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_requests_log_their_authority_and_protocol() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port));
    let out = std::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-o", "/dev/null", "-H"])
        .arg(format!("authorization: {}", bearer()))
        .arg(gate.url("/h2-check"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let line = one_line(&gate, "/h2-check").await;
    assert_eq!(line["protocol"], "HTTP/2.0");
    assert_eq!(line["host"], format!("127.0.0.1:{port}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_listen_overrides_the_config_address() {
    let up = Upstream::start();
    let in_file = free_port();
    let wanted = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "tokengate.toml", &config(in_file, up.port));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["serve", "--config", path.to_str().unwrap(), "--listen"])
        .arg(format!("127.0.0.1:{wanted}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn tokengate");
    let _kill = KillOnDrop(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", wanted)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "not listening on --listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = get(
        &format!("http://127.0.0.1:{wanted}/listen"),
        &[("authorization", &bearer())],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", in_file)).is_err(),
        "the file's address is not bound"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
