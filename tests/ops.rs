//! SPEC §7 (admin listener) and §8 (operations), end to end against the real binary: metrics
//! after real traffic, health and readiness (a real Redis that dies and comes back, a drain),
//! live reload of config and certificates under continuous load, rejected reloads, the demo,
//! and the log formats.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tokio::time::Instant;

const ADMIN_TOKEN: &str = "admin-secret-7f3c9e1d2b";
const STATIC_TOKEN: &str = "ops-static-token-51c2";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Polls `check` every 50 ms until it holds; panics with `what` after `within`. Returns how long
/// it took.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_port(port: u16) {
    eventually(
        &format!("port {port} listening"),
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}

async fn admin_get(admin: u16, path: &str) -> Resp {
    get(&format!("http://127.0.0.1:{admin}{path}"), &[]).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Sends a signal with `kill(1)`.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Replaces a file the way cert-manager and `kubectl cp` do: write a sibling, then rename over.
fn write_and_rename(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

/// Rewrites a file in place (same inode): truncate, then write.
fn write_in_place(path: &Path, contents: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open for rewrite");
    file.write_all(contents.as_bytes()).expect("rewrite");
}

/// The JSON objects among a log's lines.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

/// Log lines (JSON) whose `message` is `message`.
fn lines_with_message(log: &str, message: &str) -> Vec<Value> {
    json_lines(log)
        .into_iter()
        .filter(|v| v["message"] == message)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------------

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of `/metrics`, parsed as text format 0.0.4 (a malformed line fails the test).
struct Scrape {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.split_whitespace().collect();
                if words.first() == Some(&"TYPE") {
                    assert_eq!(words.len(), 3, "TYPE line {line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                        "TYPE line {line:?}"
                    );
                    types.insert(words[1].to_string(), words[2].to_string());
                }
                continue;
            }
            samples.push(parse_sample(line));
        }
        Scrape {
            types,
            samples,
            text: text.to_string(),
        }
    }

    /// The sample `name` with exactly `labels`, if present.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// Like [`Scrape::value`], but the sample must exist.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{}", self.text))
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Checks a histogram's shape for one label set (cumulative buckets, `+Inf` = count) and
    /// returns its count.
    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "TYPE of {name}"
        );
        let count = self.get(&format!("{name}_count"), labels);
        self.get(&format!("{name}_sum"), labels);
        let mut buckets: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                    && s.labels.len() == labels.len() + 1
            })
            .map(|s| {
                let le = s.labels.get("le").expect("bucket without le");
                (le.parse::<f64>().expect("le is a number"), s.value)
            })
            .collect();
        assert!(buckets.len() > 2, "{name}{labels:?} has no buckets");
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}{labels:?}: buckets are not cumulative: {buckets:?}"
        );
        let last = buckets.last().expect("buckets");
        assert!(last.0.is_infinite(), "{name}{labels:?} has no +Inf bucket");
        assert_eq!(last.1, count, "{name}{labels:?}: +Inf bucket != count");
        count
    }
}

fn parse_sample(line: &str) -> Sample {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len()
        && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
    {
        i += 1;
    }
    let name: String = chars[..i].iter().collect();
    assert!(
        !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name in {line:?}"
    );
    let mut labels = BTreeMap::new();
    if chars.get(i) == Some(&'{') {
        i += 1;
        loop {
            if chars.get(i) == Some(&'}') {
                i += 1;
                break;
            }
            let start = i;
            while i < chars.len() && chars[i] != '=' {
                i += 1;
            }
            let key: String = chars[start..i].iter().collect();
            assert!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {key:?} in {line:?}"
            );
            assert_eq!(chars.get(i + 1), Some(&'"'), "unquoted label in {line:?}");
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    Some('"') => break,
                    Some('\\') => {
                        value.push(match chars.get(i + 1) {
                            Some('n') => '\n',
                            Some(c) => *c,
                            None => panic!("dangling escape in {line:?}"),
                        });
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            i += 1;
            assert!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice in {line:?}"
            );
            if chars.get(i) == Some(&',') {
                i += 1;
            }
        }
    }
    let rest: String = chars[i..].iter().collect();
    let mut fields = rest.split_whitespace();
    let value: f64 = fields
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    if let Some(timestamp) = fields.next() {
        assert!(
            timestamp.parse::<i64>().is_ok(),
            "bad timestamp in {line:?}"
        );
    }
    assert!(fields.next().is_none(), "trailing text in {line:?}");
    Sample {
        name,
        labels,
        value,
    }
}

/// Scrapes the admin `/metrics`, checking the content type.
async fn scrape(admin: u16) -> Scrape {
    let resp = admin_get(admin, "/metrics").await;
    assert_eq!(resp.status, 200, "GET /metrics");
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content-type {content_type:?}"
    );
    Scrape::parse(std::str::from_utf8(&resp.body).expect("metrics are UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// TLS clients
// ---------------------------------------------------------------------------------------------

/// A client config that trusts every CA in `pkis`.
fn trusting(pkis: &[&Pki], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pki in pkis {
        roots.add(pki.ca_der.clone()).expect("add CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The DER of a PKI's server certificate.
fn server_der(pki: &Pki) -> Vec<u8> {
    CertificateDer::from_pem_slice(pki.cert_pem.as_bytes())
        .expect("server certificate PEM")
        .to_vec()
}

enum Sender {
    H1(http1::SendRequest<BoxBody<Bytes, Infallible>>),
    H2(http2::SendRequest<BoxBody<Bytes, Infallible>>),
}

/// One client TLS connection (HTTP/2 if ALPN chose it), kept open across requests.
struct Conn {
    sender: Sender,
    /// The server certificate this connection's handshake presented.
    cert: Vec<u8>,
}

impl Conn {
    async fn open(port: u16, config: Arc<rustls::ClientConfig>) -> Result<Conn, String> {
        let stream = tls_connect(port, config, "localhost")
            .await
            .map_err(|e| format!("TLS connect: {e}"))?;
        let session = stream.get_ref().1;
        let cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or("no server certificate")?;
        let h2 = session.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        let sender = if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| format!("http1 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(Conn { sender, cert })
    }

    /// GET `path` with `Authorization: Bearer token` (no header with `None`).
    async fn get(&mut self, path: &str, token: Option<&str>) -> Result<Resp, String> {
        let uri = match self.sender {
            Sender::H1(_) => path.to_string(),
            Sender::H2(_) => format!("https://localhost{path}"),
        };
        let mut builder = Request::builder().uri(uri);
        if matches!(self.sender, Sender::H1(_)) {
            builder = builder.header("host", "localhost");
        }
        if let Some(token) = token {
            builder = builder.header("authorization", bearer(token));
        }
        let request = builder.body(full(Bytes::new())).expect("request");
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| format!("connection: {e}"))?;
                s.send_request(request).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|e| format!("connection: {e}"))?;
                s.send_request(request).await
            }
        }
        .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// One request on a new TLS connection: the response and the certificate it was served with.
async fn tls_get(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    token: Option<&str>,
) -> (Resp, Vec<u8>) {
    let mut conn = Conn::open(port, Arc::clone(config))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let resp = conn
        .get(path, token)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    (resp, conn.cert)
}

/// A TLS gate's main listener, seen by a client with `config`; every call is a new connection.
#[derive(Clone, Copy)]
struct TlsTarget<'a> {
    port: u16,
    config: &'a Arc<rustls::ClientConfig>,
}

impl TlsTarget<'_> {
    /// The status of GET `path` with `token`.
    async fn status(self, path: &str, token: &str) -> u16 {
        tls_get(self.port, self.config, path, Some(token))
            .await
            .0
            .status
            .as_u16()
    }

    /// Waits until GET `path` with `token` answers `status`; how long that took.
    async fn until_status(self, what: &str, path: &str, token: &str, status: u16) -> Duration {
        eventually(what, Duration::from_secs(10), || async move {
            self.status(path, token).await == status
        })
        .await
    }

    /// Waits until new handshakes present the certificate `der`; how long that took.
    async fn until_cert(self, what: &str, token: &str, der: &[u8]) -> Duration {
        eventually(what, Duration::from_secs(10), || async move {
            tls_get(self.port, self.config, "/api/cert", Some(token))
                .await
                .1
                == der
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A `tokengate` process started with arbitrary arguments (the demo, `--log-format text`), its
/// standard output and error in a file. Killed on drop.
struct Proc {
    child: Child,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    async fn start(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)], port: u16) -> Proc {
        let log_path = dir.path().join("out.log");
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc {
            child: cmd.spawn().expect("spawn tokengate"),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = proc.child.try_wait().expect("try_wait") {
                panic!("tokengate {args:?} exited ({status}):\n{}", proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "tokengate {args:?} did not listen on {port}:\n{}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proc
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics
// ---------------------------------------------------------------------------------------------

fn metrics_config(port: u16, admin: u16, up: u16, dead: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"
token = "{ADMIN_TOKEN}"

[store]
backend = "memory"

{static_v}
{introspect_v}
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"

[[route]]
path_prefix = "/dead"
upstream = "http://127.0.0.1:{dead}"
"#,
        static_v = static_validator(&[(STATIC_TOKEN, "svc", "ops")]),
        introspect_v = introspect_validator(up, "2s"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_real_traffic_with_exact_labels() {
    let up = Upstream::start();
    let (port, admin, dead) = (free_port(), free_port(), free_port());
    let gate = Gate::start(&metrics_config(port, admin, up.port, dead));
    wait_port(admin).await;

    // Before any traffic: the families are described, the counters that other parts drive read
    // 0, and the cache is empty.
    let before = scrape(admin).await;
    assert_eq!(before.get("tokengate_cache_entries", &[]), 0.0);
    assert_eq!(before.get("tokengate_tokens_revoked_total", &[]), 0.0);
    // Features that are off have no series: no TLS, no jwt validator, no x509, no Insight.io.
    assert_eq!(
        before.value("tokengate_tls_handshake_errors_total", &[]),
        None
    );
    for absent in [
        "source=\"jwt\"",
        "source=\"x509\"",
        "tokengate:insight",
        "tokengate:auth/x509",
    ] {
        assert!(
            !before.text.contains(absent),
            "{absent} in:\n{}",
            before.text
        );
    }
    assert_eq!(auth_total_of(&before, "denied", "introspect"), 0.0);
    assert_eq!(auth_total_of(&before, "allowed", "static"), 0.0);
    // Which build, and the process's own figures.
    let build_info = before
        .series("tokengate_build_info")
        .next()
        .expect("tokengate_build_info");
    assert_eq!(build_info.value, 1.0);
    assert_eq!(build_info.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build_info.labels["commit"].is_empty());
    assert!(before.get("process_resident_memory_bytes", &[]) > 1e6);
    assert!(before.get("process_open_fds", &[]) >= 3.0);
    // Sub-second precision: a process this young has used well under a second of CPU, which
    // whole seconds would show as 0.
    let cpu = before.get("process_cpu_seconds_total", &[]);
    assert!(
        cpu > 0.0 && cpu < 600.0,
        "process_cpu_seconds_total = {cpu}"
    );
    let started = before.get("process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(started > now - 600.0 && started <= now + 1.0, "{started}");
    assert_eq!(
        before
            .types
            .get("tokengate_cache_entries")
            .map(String::as_str),
        Some("gauge")
    );

    let api = |path: &str| gate.url(&format!("/api/{path}"));

    // Static token: validated once, then from the cache.
    assert_eq!(status_of(&api("one"), Some(STATIC_TOKEN)).await, 200);
    assert_eq!(status_of(&api("two"), Some(STATIC_TOKEN)).await, 200);
    // Introspection: once, then the cache.
    assert_eq!(status_of(&api("three"), Some(ALICE)).await, 200);
    assert_eq!(status_of(&api("four"), Some(ALICE)).await, 200);
    assert_eq!(up.whoami_calls(), 1);
    // A wrong token: denied by the validators, then by the (negative) cache.
    assert_eq!(status_of(&api("five"), Some("wrong-token")).await, 401);
    assert_eq!(status_of(&api("six"), Some("wrong-token")).await, 401);
    assert_eq!(up.whoami_calls(), 2);
    // No credential.
    assert_eq!(status_of(&api("seven"), None).await, 401);
    // An upstream that refuses connections: 502 (the token comes from the cache).
    assert_eq!(
        status_of(&gate.url("/dead/x"), Some(STATIC_TOKEN)).await,
        502
    );

    // The introspection endpoint fails: fail closed, nothing cached.
    up.set_whoami_status(500);
    assert_eq!(
        status_of(&api("eight"), Some("legacy-secret-zed")).await,
        503
    );
    up.set_whoami_status(0);

    let m = scrape(admin).await;
    let requests = |route: &str, status: &str| {
        m.get(
            "tokengate_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(
        m.types.get("tokengate_requests_total").map(String::as_str),
        Some("counter")
    );
    assert_eq!(requests("/api", "200"), 4.0);
    assert_eq!(requests("/api", "401"), 3.0);
    assert_eq!(requests("/api", "503"), 1.0);
    assert_eq!(requests("/dead", "502"), 1.0);
    assert_eq!(
        m.value(
            "tokengate_requests_total",
            &[("route", "/dead"), ("status", "200")]
        ),
        None,
        "a status that never happened has no series"
    );
    // Every request has a duration; only forwarded ones (200s and the 502) an upstream duration.
    assert_eq!(
        m.histogram_count("tokengate_request_duration_seconds", &[("route", "/api")]),
        8.0
    );
    assert_eq!(
        m.histogram_count("tokengate_upstream_duration_seconds", &[("route", "/api")]),
        4.0
    );
    assert_eq!(
        m.histogram_count("tokengate_request_duration_seconds", &[("route", "/dead")]),
        1.0
    );
    assert_eq!(
        m.histogram_count("tokengate_upstream_duration_seconds", &[("route", "/dead")]),
        1.0
    );
    assert_eq!(auth_total_of(&m, "allowed", "static"), 1.0);
    assert_eq!(auth_total_of(&m, "allowed", "introspect"), 1.0);
    assert_eq!(auth_total_of(&m, "allowed", "cache"), 3.0);
    assert_eq!(auth_total_of(&m, "denied", "cache"), 1.0);
    // Denied by every validator: the last one asked (introspect) decided; the unreachable
    // introspection endpoint is the error's source; a missing credential: nobody decided.
    assert_eq!(auth_total_of(&m, "denied", "introspect"), 1.0);
    assert_eq!(auth_total_of(&m, "error", "introspect"), 1.0);
    assert_eq!(auth_total_of(&m, "missing", "none"), 1.0);
    for (result, source) in [("denied", "none"), ("error", "none")] {
        assert_eq!(auth_total_of(&m, result, source), 0.0, "{result} {source}");
    }
    // Label values stay within the SPEC §7 sets, plus `static` (the static validator, which
    // SPEC §7 does not list) and `none` (a missing credential: no validator decided).
    for sample in m.series("tokengate_auth_total") {
        let keys: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["result", "source"]);
        assert!(
            ["allowed", "denied", "missing", "error"].contains(&sample.labels["result"].as_str()),
            "{sample:?}"
        );
        assert!(
            [
                "cache",
                "store",
                "jwt",
                "introspect",
                "x509",
                "static",
                "none"
            ]
            .contains(&sample.labels["source"].as_str()),
            "{sample:?}"
        );
    }
    // Cached: the static token, alice, and the rejected token.
    assert_eq!(m.get("tokengate_cache_entries", &[]), 3.0);

    // Issue a token through the admin API, use it, revoke it.
    let admin_url = format!("http://127.0.0.1:{admin}/tokens");
    let created = post(
        &admin_url,
        &[
            ("authorization", &bearer(ADMIN_TOKEN)),
            ("content-type", "application/json"),
        ],
        r#"{"user":"carol","name":"metrics"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let issued = created.json()["token"].as_str().expect("token").to_string();
    let id = created.json()["id"].as_str().expect("id").to_string();
    assert_eq!(status_of(&api("issued"), Some(&issued)).await, 200);
    assert_eq!(status_of(&api("issued"), Some(&issued)).await, 200);
    let m = scrape(admin).await;
    assert_eq!(
        m.get("tokengate_tokens_issued_total", &[("kind", "api")]),
        1.0
    );
    assert_eq!(m.get("tokengate_tokens_revoked_total", &[]), 0.0);
    assert_eq!(auth_total_of(&m, "allowed", "store"), 1.0);
    assert_eq!(auth_total_of(&m, "allowed", "cache"), 4.0);
    assert_eq!(m.get("tokengate_cache_entries", &[]), 4.0);

    let revoked = send(build(
        "DELETE",
        &format!("{admin_url}/{id}"),
        &[("authorization", &bearer(ADMIN_TOKEN))],
        full(Bytes::new()),
    ))
    .await;
    assert_eq!(revoked.status, 204);
    let m = scrape(admin).await;
    assert_eq!(m.get("tokengate_tokens_revoked_total", &[]), 1.0);
    assert_eq!(
        m.get("tokengate_cache_entries", &[]),
        3.0,
        "the revoked token leaves the cache"
    );
    assert_eq!(status_of(&api("issued"), Some(&issued)).await, 401);
    let m = scrape(admin).await;
    assert_eq!(
        m.get(
            "tokengate_requests_total",
            &[("route", "/api"), ("status", "200")]
        ),
        6.0
    );
    assert_eq!(
        m.get(
            "tokengate_requests_total",
            &[("route", "/api"), ("status", "401")]
        ),
        4.0
    );
    // What no route matches, and tokengate's own endpoints, are counted under their own labels.
    assert_eq!(status_of(&gate.url("/nowhere"), None).await, 404);
    let own = gate.url("/_tokengate/tokens");
    assert_eq!(status_of(&own, Some(STATIC_TOKEN)).await, 200);
    assert_eq!(status_of(&own, None).await, 401);
    let m = scrape(admin).await;
    for (route, status) in [
        ("-", "404"),
        ("tokengate:tokens", "200"),
        ("tokengate:tokens", "401"),
    ] {
        assert_eq!(
            m.get(
                "tokengate_requests_total",
                &[("route", route), ("status", status)]
            ),
            1.0,
            "{route} {status}"
        );
    }
    drop(gate);
}

/// GET `url` with `Authorization: Bearer token` (none with `None`): the status.
async fn status_of(url: &str, token: Option<&str>) -> u16 {
    let header = token.map(bearer);
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("authorization", h.as_str()))
        .collect();
    get(url, &headers).await.status.as_u16()
}

fn auth_total_of(m: &Scrape, result: &str, source: &str) -> f64 {
    m.get(
        "tokengate_auth_total",
        &[("result", result), ("source", source)],
    )
}

fn tls_config_toml(
    port: u16,
    admin: u16,
    up: u16,
    tokens: &[(&str, &str, &str)],
    extra: &str,
) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
drain_timeout = "2s"
[server.tls]
cert = "cert.pem"
key = "key.pem"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "memory"

{static_v}
{introspect_v}
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
{extra}"#,
        static_v = static_validator(tokens),
        introspect_v = introspect_validator(up, "2s"),
    )
}

/// A TLS gate with `pki`'s certificate in `cert.pem` / `key.pem` next to its config.
fn start_tls_gate(pki: &Pki, toml: &str) -> Gate {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(dir.path(), "cert.pem", &pki.cert_pem);
    write_file(dir.path(), "key.pem", &pki.key_pkcs8_pem);
    Gate::start_in(dir, toml, &[("RUST_LOG", "info")])
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_tls_handshakes_are_counted() {
    let pki = pki();
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = start_tls_gate(
        &pki,
        &tls_config_toml(port, admin, up.port, &[(STATIC_TOKEN, "svc", "ops")], ""),
    );
    wait_port(admin).await;
    let handshake_errors = || async move {
        scrape(admin)
            .await
            .get("tokengate_tls_handshake_errors_total", &[])
    };
    // The harness's "is it listening" probe and these TCP connects close without a byte: TCP
    // health checks and port scans, not failed handshakes.
    for _ in 0..3 {
        drop(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = handshake_errors().await;
    assert_eq!(baseline, 0.0, "TCP probes counted as handshake errors");

    // Plain-text HTTP on the TLS port.
    raw(
        port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    eventually(
        "plain text counted",
        Duration::from_secs(5),
        || async move { handshake_errors().await == baseline + 1.0 },
    )
    .await;
    // A client that does not trust the certificate aborts the handshake.
    let distrusting = tls_client_config(None, &[b"http/1.1"]);
    assert!(tls_connect(port, distrusting, "localhost").await.is_err());
    eventually(
        "distrusting client counted",
        Duration::from_secs(5),
        || async move { handshake_errors().await == baseline + 2.0 },
    )
    .await;
    // A good handshake does not count.
    let (resp, _) = tls_get(
        port,
        &trusting(&[&pki], &[b"h2"]),
        "/api/x",
        Some(STATIC_TOKEN),
    )
    .await;
    assert_eq!(resp.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handshake_errors().await, baseline + 2.0);
    drop(gate);
}

// ---------------------------------------------------------------------------------------------
// 2. Health and readiness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_redis_store_down_and_back_up() {
    let Some(mut redis) = RedisServer::start_with_password("redis-pw-5e8a1c") else {
        return;
    };
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[store]
backend = "redis"
url = "${{env:TG_OPS_REDIS_URL}}"
{static_v}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
"#,
        up = up.port,
        static_v = static_validator(&[(STATIC_TOKEN, "svc", "ops")]),
    );
    let url = redis.url();
    let gate = Gate::start_with_env(
        &toml,
        &[("TG_OPS_REDIS_URL", url.as_str()), ("RUST_LOG", "info")],
    );
    wait_port(admin).await;

    let healthz = admin_get(admin, "/healthz").await;
    assert_eq!(healthz.status, 200);
    let ready = admin_get(admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(ready.json()["status"], "ready");

    redis.kill();
    let down = eventually(
        "readyz 503 after redis died",
        Duration::from_secs(5),
        || async move { admin_get(admin, "/readyz").await.status == 503 },
    )
    .await;
    let resp = admin_get(admin, "/readyz").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.json()["status"], "token store unreachable");
    assert_eq!(
        admin_get(admin, "/healthz").await.status,
        200,
        "the process is still alive"
    );

    redis.restart();
    let back = eventually(
        "readyz 200 after redis returned",
        Duration::from_secs(10),
        || async move { admin_get(admin, "/readyz").await.status == 200 },
    )
    .await;
    eprintln!("readyz: 503 {down:?} after redis died, 200 {back:?} after it returned");
    let log = gate.log();
    assert!(
        !log.contains("redis-pw-5e8a1c"),
        "the redis password reached the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_draining_and_the_slow_request_completes() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
drain_timeout = "10s"
[admin]
listen = "127.0.0.1:{admin}"
{static_v}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
"#,
        up = up.port,
        static_v = static_validator(&[(STATIC_TOKEN, "svc", "ops")]),
    );
    let mut gate = Gate::start(&toml);
    wait_port(admin).await;
    assert_eq!(admin_get(admin, "/readyz").await.status, 200);

    let url = gate.url("/slow?ms=2500");
    let slow =
        tokio::spawn(async move { get(&url, &[("authorization", &bearer(STATIC_TOKEN))]).await });
    let upstream = &up;
    eventually(
        "the slow request reached the upstream",
        Duration::from_secs(5),
        || async move { upstream.requests() == 1 },
    )
    .await;
    gate.sigterm();
    let resp = {
        let start = Instant::now();
        loop {
            let resp = admin_get(admin, "/readyz").await;
            if resp.status == 503 || start.elapsed() > Duration::from_secs(2) {
                break resp;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(resp.status, 503, "readyz while draining");
    assert_eq!(resp.json()["status"], "draining");
    assert!(!slow.is_finished(), "the drain should still be holding");
    assert_eq!(
        admin_get(admin, "/healthz").await.status,
        200,
        "healthz while draining"
    );

    let slow = slow.await.expect("slow request task");
    assert_eq!(slow.status, 200, "the in-flight request completes");
    let status = tokio::task::spawn_blocking(move || gate.wait_exit(Duration::from_secs(10)))
        .await
        .expect("wait task")
        .expect("the gate exits after the drain");
    assert!(status.success(), "exit status {status}");
}

// ---------------------------------------------------------------------------------------------
// 3. Live reload under load
// ---------------------------------------------------------------------------------------------

/// Tokens of the reload test. NEW and NEWER have the same length, so the SIGHUP step can swap
/// one for the other without changing the config file's size.
const STAY: &str = "stay-token-0a1b2c";
const OLD: &str = "old-token-9f8e7d";
const NEW: &str = "new-token-111111";
const NEWER: &str = "new-token-222222";

/// Counts of the client loop.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    handshakes: AtomicUsize,
    failures: tokio::sync::Mutex<Vec<String>>,
}

impl Load {
    async fn record(&self, what: &str, result: Result<Resp, String>, subject: &str) {
        let failure = match result {
            Ok(resp)
                if resp.status == 200 && resp.echoed("x-auth-user").as_deref() == Some(subject) =>
            {
                self.ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(resp) => format!(
                "{what}: status {} body {:?}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ),
            Err(e) => format!("{what}: {e}"),
        };
        self.failures.lock().await.push(failure);
    }
}

/// Even tasks use a static token, odd ones a token the introspection endpoint vouches for.
fn credential_of(task: usize) -> (&'static str, &'static str) {
    if task.is_multiple_of(2) {
        (STAY, "stay")
    } else {
        (ALICE, "alice")
    }
}

/// Requests on one kept-alive connection; reconnects (counting a failure) if it breaks.
async fn keep_alive_loop(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    load: Arc<Load>,
    task: usize,
) {
    let (token, subject) = credential_of(task);
    let mut conn = None;
    let mut i = 0;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        if conn.is_none() {
            match Conn::open(port, Arc::clone(&config)).await {
                Ok(c) => {
                    load.handshakes.fetch_add(1, Ordering::Relaxed);
                    conn = Some(c);
                }
                Err(e) => {
                    load.record("keep-alive connect", Err(e), subject).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connection");
        let path = format!("/api/keepalive/{task}/{i}");
        let result =
            match tokio::time::timeout(Duration::from_secs(10), c.get(&path, Some(token))).await {
                Ok(r) => r,
                Err(_) => Err("timed out".to_string()),
            };
        if result.is_err() {
            conn = None;
        }
        load.record(&path, result, subject).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Every request on a new connection (a new TLS handshake each time).
async fn new_connection_loop(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    load: Arc<Load>,
    task: usize,
) {
    let (token, subject) = credential_of(task);
    let mut i = 0;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let path = format!("/api/fresh/{task}/{i}");
        let attempt = async {
            let mut conn = Conn::open(port, Arc::clone(&config)).await?;
            load.handshakes.fetch_add(1, Ordering::Relaxed);
            conn.get(&path, Some(token)).await
        };
        let result = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(r) => r,
            Err(_) => Err("timed out".to_string()),
        };
        load.record(&path, result, subject).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn live_reload_of_config_and_certificates_under_load_drops_nothing() {
    let (pki_a, pki_b, pki_c) = (pki(), pki(), pki());
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let base_tokens = [(STAY, "stay", "ops"), (OLD, "old", "ops")];
    let gate = start_tls_gate(
        &pki_a,
        &tls_config_toml(port, admin, up.port, &base_tokens, ""),
    );
    wait_port(admin).await;
    let config_path = gate.config_path.clone();
    let cert_path = gate.dir.path().join("cert.pem");
    let key_path = gate.dir.path().join("key.pem");
    let trust_all = &trusting(&[&pki_a, &pki_b, &pki_c], &[b"h2", b"http/1.1"]);
    let (der_b, der_c) = (&server_der(&pki_b), &server_der(&pki_c));
    let gate_tls = TlsTarget {
        port,
        config: trust_all,
    };
    let h1_only = trusting(&[&pki_a, &pki_b, &pki_c], &[b"http/1.1"]);
    let h2_only = trusting(&[&pki_a, &pki_b, &pki_c], &[b"h2"]);

    // The client loop: keep-alive HTTP/1.1 and HTTP/2 connections, and new connections.
    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for task in 0..2 {
        tasks.push(tokio::spawn(keep_alive_loop(
            port,
            Arc::clone(&h1_only),
            Arc::clone(&load),
            task,
        )));
        tasks.push(tokio::spawn(keep_alive_loop(
            port,
            Arc::clone(&h2_only),
            Arc::clone(&load),
            task + 2,
        )));
        tasks.push(tokio::spawn(new_connection_loop(
            port,
            Arc::clone(trust_all),
            Arc::clone(&load),
            task,
        )));
    }
    // A connection opened now, with certificate A, must survive every reload below.
    let mut held = Conn::open(port, Arc::clone(&h1_only))
        .await
        .expect("held connection");
    assert_eq!(held.cert, server_der(&pki_a));
    let counts = &load;
    eventually(
        "the load is flowing",
        Duration::from_secs(10),
        || async move { counts.ok.load(Ordering::Relaxed) > 50 },
    )
    .await;
    let whoami_before = up.whoami_calls();
    assert_eq!(
        whoami_before, 1,
        "alice introspected once (single flight, then cached)"
    );

    // (a1) Only the routes change: a new route appears, the cache (and alice's entry) stays.
    assert_eq!(gate_tls.status("/v3/x", STAY).await, 404);
    let v3_route = format!(
        "[[route]]\npath_prefix = \"/v3\"\nupstream = \"http://127.0.0.1:{}\"\n[route.identity_headers]\n\"X-Auth-User\" = \"{{subject}}\"\n",
        up.port
    );
    write_in_place(
        &config_path,
        &tls_config_toml(port, admin, up.port, &base_tokens, &v3_route),
    );
    let routes_reload = gate_tls
        .until_status("the new route is served", "/v3/x", STAY, 200)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.whoami_calls(),
        whoami_before,
        "a reload that changed only routes must keep cached validations"
    );

    // (a2) A new static token replaces an old one (write, then rename over the config).
    let new_tokens = [(STAY, "stay", "ops"), (NEW, "fresh", "ops")];
    assert_eq!(gate_tls.status("/api/new", NEW).await, 401);
    write_and_rename(
        &config_path,
        &tls_config_toml(port, admin, up.port, &new_tokens, &v3_route),
    );
    let token_reload = gate_tls
        .until_status("the new token works", "/api/new", NEW, 200)
        .await;
    let (old, _) = tls_get(port, trust_all, "/api/old", Some(OLD)).await;
    old.assert_error(401, "Invalid credentials");

    // (b1) New certificate and key, written beside and renamed over (cert-manager style).
    write_and_rename(&key_path, &pki_b.key_pkcs8_pem);
    write_and_rename(&cert_path, &pki_b.cert_pem);
    let cert_rename = gate_tls
        .until_cert("handshakes present certificate B", STAY, der_b)
        .await;
    let resp = held
        .get("/api/held-after-b", Some(STAY))
        .await
        .expect("held connection after B");
    assert_eq!(resp.status, 200);

    // (b2) And rewritten in place (truncate + write).
    write_in_place(&key_path, &pki_c.key_pkcs8_pem);
    write_in_place(&cert_path, &pki_c.cert_pem);
    let cert_in_place = gate_tls
        .until_cert("handshakes present certificate C", STAY, der_c)
        .await;

    // (c) SIGHUP: a change the file watcher cannot see (same size, same mtime) is applied on the
    // signal alone.
    let newer_tokens = [(STAY, "stay", "ops"), (NEWER, "fresh", "ops")];
    let current = std::fs::read_to_string(&config_path).expect("read config");
    let next = tls_config_toml(port, admin, up.port, &newer_tokens, &v3_route);
    assert_eq!(current.len(), next.len());
    let mtime = std::fs::metadata(&config_path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let tmp = config_path.with_extension("tmp");
    std::fs::write(&tmp, &next).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    std::fs::rename(&tmp, &config_path).expect("rename");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        gate_tls.status("/api/new", NEW).await,
        200,
        "the unseen change must wait for SIGHUP"
    );
    signal(gate.pid(), "HUP");
    let sighup_reload = gate_tls
        .until_status("SIGHUP applied the config", "/api/newer", NEWER, 200)
        .await;
    assert_eq!(gate_tls.status("/api/new", NEW).await, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;

    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    let resp = held
        .get("/api/held-at-end", Some(STAY))
        .await
        .expect("held connection at the end");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("stay"));

    let failures = load.failures.lock().await;
    let ok = load.ok.load(Ordering::Relaxed);
    let m = scrape(admin).await;
    let reloads_ok = m.get("tokengate_config_reloads_total", &[("result", "ok")]);
    let reloads_error = m
        .value("tokengate_config_reloads_total", &[("result", "error")])
        .unwrap_or(0.0);
    eprintln!(
        "live reload under load: {ok} requests ok, {} failed, {} client handshakes; reloads ok {reloads_ok}, \
         error {reloads_error}; time to effect: routes {routes_reload:?}, tokens {token_reload:?}, \
         cert (rename) {cert_rename:?}, cert (in place) {cert_in_place:?}, SIGHUP {sighup_reload:?}",
        failures.len(),
        load.handshakes.load(Ordering::Relaxed),
    );
    assert!(
        failures.is_empty(),
        "failed requests during reloads: {failures:#?}"
    );
    assert!(ok > 200, "only {ok} requests went through");
    assert!(reloads_ok >= 5.0, "reloads ok: {reloads_ok}");
    let log = gate.log();
    assert!(
        lines_with_message(&log, "config reloaded")
            .iter()
            .any(|l| l["reason"] == "SIGHUP"),
        "no SIGHUP reload logged:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Rejected reloads
// ---------------------------------------------------------------------------------------------

const T1: &str = "first-token-aaaa";
const T2: &str = "second-token-bbb";
/// The log message of a rejected reload.
const REJECTED: &str = "config reload rejected; keeping the running config";

async fn reload_errors(admin: u16) -> f64 {
    scrape(admin)
        .await
        .get("tokengate_config_reloads_total", &[("result", "error")])
}

/// Waits until `n` reloads were rejected, and returns the last rejection's logged `error`.
async fn next_rejection(gate: &Gate, admin: u16, n: usize) -> String {
    eventually(
        &format!("rejected reload #{n} counted"),
        Duration::from_secs(10),
        || async move { reload_errors(admin).await >= n as f64 },
    )
    .await;
    let lines = lines_with_message(&gate.log(), REJECTED);
    assert!(
        lines.len() >= n,
        "rejected reload #{n} not logged:\n{}",
        gate.log()
    );
    lines[lines.len() - 1]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The running config still serves `token`, with certificate `cert`.
async fn serves(port: u16, client: &Arc<rustls::ClientConfig>, token: &str, cert: &[u8]) {
    let (resp, served) = tls_get(port, client, "/api/check", Some(token)).await;
    assert_eq!(resp.status, 200, "{token} after a rejected reload");
    assert!(served == cert, "a rejected reload changed the certificate");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_reload_keeps_the_running_config_and_a_fix_is_picked_up() {
    let (pki_a, pki_b, pki_c, pki_d) = (pki(), pki(), pki(), pki());
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = start_tls_gate(
        &pki_a,
        &tls_config_toml(port, admin, up.port, &[(T1, "one", "ops")], ""),
    );
    wait_port(admin).await;
    let config_path = gate.config_path.clone();
    let cert_path = gate.dir.path().join("cert.pem");
    let key_path = gate.dir.path().join("key.pem");
    let client = trusting(&[&pki_a, &pki_b, &pki_c, &pki_d], &[b"http/1.1"]);
    let client = &client;
    let gate_tls = TlsTarget {
        port,
        config: client,
    };
    let cert_a = server_der(&pki_a);
    // Both results are registered (at 0) before any reload, so alerts on them work from the
    // start.
    assert_eq!(reload_errors(admin).await, 0.0);
    let m = scrape(admin).await;
    assert_eq!(
        m.get("tokengate_config_reloads_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(
        m.types
            .get("tokengate_config_reloads_total")
            .map(String::as_str),
        Some("counter")
    );

    // A TOML syntax error.
    write_in_place(&config_path, "[server\nlisten = \"127.0.0.1:1\"\n");
    let error = next_rejection(&gate, admin, 1).await;
    let path = config_path.display().to_string();
    let at = error
        .strip_prefix(&format!("{path}:"))
        .unwrap_or_else(|| panic!("the error names the file: {error:?}"));
    let mut parts = at.splitn(3, ':');
    assert!(
        parts.next().is_some_and(|l| l.parse::<u32>().is_ok())
            && parts.next().is_some_and(|c| c.parse::<u32>().is_ok()),
        "PATH:LINE:COL: {error:?}"
    );
    serves(port, client, T1, &cert_a).await;

    // An unknown key.
    let good = tls_config_toml(port, admin, up.port, &[(T1, "one", "ops")], "");
    write_in_place(
        &config_path,
        &good.replace(
            "drain_timeout = \"2s\"\n",
            "drain_timeout = \"2s\"\nsurprise_key = true\n",
        ),
    );
    let error = next_rejection(&gate, admin, 2).await;
    assert!(error.contains("surprise_key"), "{error:?}");
    serves(port, client, T1, &cert_a).await;

    // The fix is picked up; a setting that only a restart applies is named in a warning.
    write_in_place(
        &config_path,
        &tls_config_toml(port, admin, up.port, &[(T2, "two", "ops")], "")
            .replace("drain_timeout = \"2s\"", "drain_timeout = \"3s\""),
    );
    gate_tls
        .until_status("the fixed config is served", "/api/fixed", T2, 200)
        .await;
    tls_get(port, client, "/api/t1", Some(T1))
        .await
        .0
        .assert_error(401, "Invalid credentials");
    let log = gate.log();
    assert!(
        lines_with_message(&log, "changed: takes effect after a restart")
            .iter()
            .any(|l| l["key"] == "server.drain_timeout" && l["level"] == "WARN"),
        "no restart-only warning:\n{log}"
    );

    // Garbage where the certificate should be.
    write_in_place(&cert_path, "this is not a certificate\n");
    let error = next_rejection(&gate, admin, 3).await;
    assert!(error.contains("cert.pem"), "{error:?}");
    serves(port, client, T2, &cert_a).await;

    // A certificate and a key that do not belong together.
    write_in_place(&cert_path, &pki_b.cert_pem);
    write_in_place(&key_path, &pki_c.key_pkcs8_pem);
    let error = next_rejection(&gate, admin, 4).await;
    assert!(error.contains("key.pem"), "{error:?}");
    serves(port, client, T2, &cert_a).await;

    // A matching pair is picked up.
    write_in_place(&key_path, &pki_d.key_pkcs8_pem);
    write_in_place(&cert_path, &pki_d.cert_pem);
    let cert_d = server_der(&pki_d);
    let cert_d = &cert_d;
    gate_tls
        .until_cert("certificate D is served", T2, cert_d)
        .await;
    let m = scrape(admin).await;
    assert!(m.get("tokengate_config_reloads_total", &[("result", "ok")]) >= 2.0);
    for line in lines_with_message(&gate.log(), REJECTED) {
        assert_eq!(line["level"], "ERROR", "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The demo
// ---------------------------------------------------------------------------------------------

/// Splits a printed shell command into words (single quotes only, as the demo prints).
fn shell_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in command.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quotes in {command:?}");
    if in_word {
        words.push(word);
    }
    words
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_on_port_0_prints_the_real_port_and_survives_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("out.log");
    let log = std::fs::File::create(&log_path).expect("create log");
    let child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .expect("spawn tokengate demo");
    let mut demo = Proc {
        child,
        log_path,
        _dir: dir,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let port: u16 = loop {
        let out = demo.log();
        if let Some(rest) = out.split("proxy on http://127.0.0.1:").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break digits.parse().expect("a port number");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no address printed:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(port, 0, "the printed port is the one the system chose");
    assert!(
        demo.log()
            .contains(&format!("curl -s http://127.0.0.1:{port}/hello")),
        "{}",
        demo.log()
    );
    let url = format!("http://127.0.0.1:{port}/hello");
    let mut resp = get(&url, &[("auth-token", "demo-token")]).await;
    for _ in 0..100 {
        if resp.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        resp = get(&url, &[("auth-token", "demo-token")]).await;
    }
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    // SIGHUP (no config file to reload) is logged, and the demo keeps serving.
    signal(demo.child.id(), "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        demo.child.try_wait().expect("try_wait").is_none(),
        "SIGHUP ended the demo"
    );
    assert_eq!(get(&url, &[("auth-token", "demo-token")]).await.status, 200);
    assert!(demo.log().contains("SIGHUP ignored"), "{}", demo.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_prints_commands_that_work() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let demo = Proc::start(
        tempfile::tempdir().expect("tempdir"),
        &["demo", "--listen", &listen],
        &[("RUST_LOG", "info")],
        port,
    )
    .await;
    let out = demo.log();
    let token = out
        .split("the demo token `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no demo token printed:\n{out}"))
        .to_string();
    assert_eq!(token, "demo-token");

    let commands: Vec<(Vec<String>, String)> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(|l| {
            let (command, comment) = l.split_once(" #").unwrap_or((l, ""));
            (shell_words(command), comment.trim().to_string())
        })
        .collect();
    assert!(commands.len() >= 8, "printed commands:\n{out}");
    let mut dialects = Vec::new();
    for (words, comment) in &commands {
        let url = words
            .iter()
            .find(|w| w.starts_with("http"))
            .unwrap_or_else(|| panic!("no URL in {words:?}"));
        assert!(url.starts_with(&format!("http://{listen}/")), "{url}");
        let headers: Vec<(String, String)> = words
            .windows(2)
            .filter(|w| w[0] == "-H")
            .map(|w| {
                let (name, value) = w[1].split_once(':').expect("Name: value");
                (name.trim().to_string(), value.trim().to_string())
            })
            .collect();
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let resp = get(url, &h).await;
        match comment.as_str() {
            "" | "spoof removed" => {
                assert_eq!(resp.status, 200, "{words:?}: {:?}", resp.body);
                // The credential arrives in the form the upstream wants, with the identity.
                assert_eq!(
                    resp.echoed("auth-token").as_deref(),
                    Some(token.as_str()),
                    "{words:?}"
                );
                assert_eq!(
                    resp.echoed("x-auth-user").as_deref(),
                    Some("demo"),
                    "{words:?}"
                );
                assert_eq!(
                    resp.echoed("x-auth-account").as_deref(),
                    Some("demo"),
                    "{words:?}"
                );
                for (name, _) in &headers {
                    if !name.eq_ignore_ascii_case("auth-token")
                        && !name.eq_ignore_ascii_case("x-auth-user")
                    {
                        assert_eq!(
                            resp.echoed(name),
                            None,
                            "{name} must not reach the upstream"
                        );
                    }
                }
                if comment.is_empty() {
                    dialects.push(headers[0].0.to_ascii_lowercase());
                }
            }
            "401 Credentials required" => resp.assert_error(401, "Credentials required"),
            "401 Invalid credentials" => resp.assert_error(401, "Invalid credentials"),
            "400" => resp.assert_error(400, "Conflicting credentials"),
            other => panic!("unexpected comment {other:?} on {words:?}"),
        }
        // The command as printed works in a shell with curl, too.
        let printed = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let curl = Command::new("sh")
            .arg("-c")
            .arg(format!("{printed} -o /dev/null -w '%{{http_code}}'"))
            .output()
            .expect("run curl");
        let code = String::from_utf8_lossy(&curl.stdout).to_string();
        assert_eq!(code, resp.status.as_str(), "curl {words:?}");
    }
    dialects.sort();
    assert_eq!(
        dialects,
        [
            "auth-token",
            "authorization",
            "x-auth-token",
            "x-rucio-auth-token"
        ],
        "every dialect of the example config is shown"
    );
    // A wrong bearer token.
    get(
        &format!("http://{listen}/hello"),
        &[("authorization", "Bearer not-the-demo-token")],
    )
    .await
    .assert_error(401, "Invalid credentials");
}

/// `demo --config` with a seed's example: test certificates from `tokengate pki` where the
/// example looks for them; the demo prints curl lines for the one dialect the example accepts
/// (Aircloak's `auth-token`), and its introspect validator is the echo upstream, which knows the
/// demo token. Every printed line, run by `sh` as printed, gets the status it says.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_with_an_example_config_prints_only_what_that_config_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/aircloak.toml"),
    )
    .expect("the example");
    std::fs::write(dir.path().join("aircloak.toml"), &example).expect("write the example");
    let pki = Command::new(BIN)
        .args(["pki", "--dir"])
        .arg(dir.path().join("certs"))
        .output()
        .expect("run tokengate pki");
    assert!(
        pki.status.success(),
        "{}",
        String::from_utf8_lossy(&pki.stderr)
    );
    // pki never overwrites a key.
    let again = Command::new(BIN)
        .args(["pki", "--dir"])
        .arg(dir.path().join("certs"))
        .output()
        .expect("run tokengate pki");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let demo = Proc::start(
        dir,
        &["demo", "--config", "aircloak.toml", "--listen", &listen],
        &[],
        port,
    )
    .await;
    let out = demo.log();
    assert!(out.contains(&format!("proxy on https://{listen}")), "{out}");
    let commands: Vec<(String, String)> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(|l| {
            let (command, comment) = l.split_once(" #").unwrap_or((l, ""));
            (command.trim().to_string(), comment.trim().to_string())
        })
        .collect();
    assert!(commands.len() >= 4, "{out}");
    for (command, comment) in &commands {
        for other in ["Authorization", "X-Auth-Token:", "X-Rucio-Auth-Token"] {
            assert!(
                !command.contains(other),
                "the example accepts auth-token only: {command}"
            );
        }
        let shell = Command::new("sh")
            .arg("-c")
            .arg(format!("{command} -i --max-time 10"))
            .current_dir(demo._dir.path())
            .output()
            .expect("run curl");
        assert!(
            shell.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&shell.stderr)
        );
        let reply = CurlReply::parse(&String::from_utf8_lossy(&shell.stdout));
        match comment.as_str() {
            "" | "spoof removed" => {
                assert_eq!(reply.status, 200, "{command}: {reply:?}");
                let seen = &reply.json()["headers"];
                assert_eq!(seen["auth-token"], "demo-token", "{command}: {seen}");
                assert_ne!(seen["x-auth-user"], "mallory", "{command}: {seen}");
            }
            "401 Credentials required" => {
                assert_eq!(reply.status, 401, "{command}");
                // No Bearer challenge: the example does not accept bearer tokens.
                assert_eq!(reply.header("www-authenticate"), None, "{reply:?}");
            }
            "401 Invalid credentials" => assert_eq!(reply.status, 401, "{command}"),
            other => panic!("unexpected comment {other:?} on {command}"),
        }
    }
    assert!(
        commands
            .iter()
            .any(|(c, _)| c.contains("-H 'auth-token: demo-token'")),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Logs
// ---------------------------------------------------------------------------------------------

fn plain_config(port: u16, up: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{static_v}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        static_v = static_validator(&[(STATIC_TOKEN, "svc", "ops")]),
    )
}

/// A plain-HTTP gate with `RUST_LOG=rust_log` that has answered one authenticated GET of
/// `path_and_query` with 200.
async fn plain_gate_after_one_request(rust_log: &str, path_and_query: &str) -> (Upstream, Gate) {
    let up = Upstream::start();
    let gate = Gate::start_with_env(
        &plain_config(free_port(), up.port),
        &[("RUST_LOG", rust_log)],
    );
    let resp = get(
        &gate.url(path_and_query),
        &[("authorization", &bearer(STATIC_TOKEN))],
    )
    .await;
    assert_eq!(resp.status, 200);
    (up, gate)
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_the_access_fields() {
    let (_up, gate) = plain_gate_after_one_request("info", "/json/check?secret=query").await;
    let lines = gate
        .wait_access_line("/json/check", Duration::from_secs(5))
        .await;
    assert_eq!(lines.len(), 1, "one access line per request");
    let line = &lines[0];
    assert_eq!(line["target"], "access");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/json/check", "never the query");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "/");
    assert_eq!(line["subject"], "svc");
    assert_eq!(line["source"], "bearer");
    assert!(
        line["timestamp"].as_str().is_some_and(|t| t.contains('T')),
        "{line}"
    );
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{line}"
    );
    assert!(
        line["upstream_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{line}"
    );
    let log = gate.log();
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object()),
            "not one JSON object: {l:?}"
        );
    }
    assert!(!log.contains(STATIC_TOKEN) && !log.contains("secret=query"));
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_are_for_humans() {
    let up = Upstream::start();
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_file(dir.path(), "tokengate.toml", &plain_config(port, up.port));
    let config = config.to_str().expect("utf-8 path").to_string();
    let gate = Proc::start(
        dir,
        &["serve", "--config", &config, "--log-format", "text"],
        &[("RUST_LOG", "info")],
        port,
    )
    .await;
    let resp = get(
        &format!("http://127.0.0.1:{port}/text/check"),
        &[("authorization", &bearer(STATIC_TOKEN))],
    )
    .await;
    assert_eq!(resp.status, 200);
    let g = &gate;
    eventually("the access line", Duration::from_secs(5), || async move {
        g.log().contains("/text/check")
    })
    .await;
    let log = gate.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in &lines {
        assert!(
            serde_json::from_str::<Value>(line).is_err(),
            "a JSON line in text mode: {line:?}"
        );
    }
    let startup = lines
        .iter()
        .find(|l| l.contains("tokengate listening"))
        .unwrap_or_else(|| panic!("no startup line:\n{log}"));
    assert!(
        startup.contains("INFO") && startup.contains(&format!("127.0.0.1:{port}")),
        "{startup}"
    );
    let access = lines
        .iter()
        .find(|l| l.contains("/text/check"))
        .expect("access line");
    assert!(
        access.contains("access") && access.contains("status=200") && access.contains("svc"),
        "{access}"
    );
    assert!(!log.contains(STATIC_TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_log_warn_suppresses_the_access_line() {
    let (_up, gate) = plain_gate_after_one_request("warn", "/quiet").await;
    // An error-level line written after the request proves the log is flowing: had the access
    // line been written, it would be there before it.
    write_in_place(&gate.config_path, "[server\n");
    let g = &gate;
    eventually(
        "the rejected reload is logged",
        Duration::from_secs(10),
        || async move { g.log().contains("config reload rejected") },
    )
    .await;
    let log = gate.log();
    assert!(
        gate.access_lines().is_empty(),
        "access line despite RUST_LOG=warn:\n{log}"
    );
    assert!(
        !log.contains("/quiet") && !log.contains("tokengate listening"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_lines_name_listeners_routes_and_validators_but_no_secret() {
    let Some(redis) = RedisServer::start_with_password("redis-pw-startup-93ab") else {
        return;
    };
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
token = "${{env:TG_OPS_ADMIN_TOKEN}}"
[store]
backend = "redis"
url = "${{env:TG_OPS_REDIS_URL}}"
{static_v}
{introspect_v}
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
"#,
        up = up.port,
        static_v = static_validator(&[(STATIC_TOKEN, "svc", "ops")]),
        introspect_v = introspect_validator(up.port, "2s"),
    );
    let url = redis.url();
    let gate = Gate::start_with_env(
        &toml,
        &[
            ("TG_OPS_REDIS_URL", url.as_str()),
            ("TG_OPS_ADMIN_TOKEN", ADMIN_TOKEN),
            ("RUST_LOG", "debug"),
        ],
    );
    wait_port(admin).await;
    // Traffic that handles every secret: the static token, the admin token (right and wrong),
    // a token issued into redis and used.
    assert_eq!(
        get(
            &gate.url("/api/x"),
            &[("authorization", &bearer(STATIC_TOKEN))]
        )
        .await
        .status,
        200
    );
    let tokens = format!("http://127.0.0.1:{admin}/tokens");
    assert_eq!(
        get(&tokens, &[("authorization", "Bearer nope")])
            .await
            .status,
        401
    );
    let created = post(
        &tokens,
        &[("authorization", &bearer(ADMIN_TOKEN))],
        r#"{"user":"dave"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let issued = created.json()["token"].as_str().expect("token").to_string();
    assert_eq!(
        get(&gate.url("/api/y"), &[("authorization", &bearer(&issued))])
            .await
            .status,
        200
    );
    gate.wait_access_line("/api/y", Duration::from_secs(5))
        .await;

    let log = gate.log();
    let listening = lines_with_message(&log, "tokengate listening");
    let listening = listening
        .first()
        .unwrap_or_else(|| panic!("no startup line:\n{log}"));
    assert_eq!(listening["listen"], format!("127.0.0.1:{port}"));
    let routes = listening["routes"].to_string();
    assert!(
        routes.contains(&format!("/api -> http://127.0.0.1:{}", up.port)),
        "{routes}"
    );
    let validators = listening["validators"].to_string();
    assert!(
        validators.contains("static") && validators.contains("introspect"),
        "{validators}"
    );
    let admin_line = lines_with_message(&log, "admin listener");
    assert_eq!(
        admin_line.first().map(|l| l["listen"].clone()),
        Some(Value::from(format!("127.0.0.1:{admin}"))),
        "{log}"
    );
    for secret in [STATIC_TOKEN, ADMIN_TOKEN, "redis-pw-startup-93ab", &issued] {
        assert!(!log.contains(secret), "{secret:?} reached the log:\n{log}");
    }
}

/// `tokengate_tokens_issued_total` and `tokengate_tokens_revoked_total` count every surface: a
/// token issued or revoked with the CLI reaches the server through the store's feed and is
/// counted there, once.
#[tokio::test(flavor = "multi_thread")]
async fn cli_issuance_and_revocation_are_counted_by_the_server() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("tokens.db");
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "sqlite"
path = "{db}"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
"#,
        db = db.display(),
        up = up.port,
    );
    let gate = Gate::start_in(dir, &toml, &[]);
    wait_port(admin).await;
    let config = gate.config_path.to_str().unwrap().to_string();
    let (token, id) = cli_create_token(&gate.config_path, "dave");
    // The CLI's issuance is counted by the server too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while scrape(admin)
        .await
        .value("tokengate_tokens_issued_total", &[("kind", "api")])
        != Some(1.0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CLI's token was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status_of(&gate.url("/api/x"), Some(&token)).await,
        200,
        "the CLI's token works"
    );
    assert_eq!(
        scrape(admin)
            .await
            .get("tokengate_tokens_revoked_total", &[]),
        0.0
    );

    let revoked = cli(&["token", "revoke", "--config", &config, &id]);
    assert!(revoked.status.success(), "{revoked:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let m = scrape(admin).await;
        if m.get("tokengate_tokens_revoked_total", &[]) == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CLI's revocation was not counted:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(&gate.url("/api/x"), Some(&token)).await, 401);
    // Counted once, not again on later polls.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        scrape(admin)
            .await
            .get("tokengate_tokens_revoked_total", &[]),
        1.0
    );
}

/// With Redis, every replica hears the CLI's issuance and revocation; exactly one counts each.
#[tokio::test(flavor = "multi_thread")]
async fn cli_events_are_counted_by_one_redis_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let up = Upstream::start();
    let replica = |port: u16, admin: u16| {
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "redis"
url = "{url}"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{up}"
"#,
            url = redis.url(),
            up = up.port,
        )
    };
    let (a_port, a_admin, b_port, b_admin) = (free_port(), free_port(), free_port(), free_port());
    let a = Gate::start(&replica(a_port, a_admin));
    let b = Gate::start(&replica(b_port, b_admin));
    wait_port(a_admin).await;
    wait_port(b_admin).await;
    // Both replicas are subscribed once they have seen their own heartbeat; give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = a.config_path.to_str().unwrap().to_string();
    let (token, id) = cli_create_token(&a.config_path, "erin");
    let issued = || async {
        let count = |m: Scrape| {
            m.value("tokengate_tokens_issued_total", &[("kind", "api")])
                .unwrap_or(0.0)
        };
        count(scrape(a_admin).await) + count(scrape(b_admin).await)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while issued().await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "issuance not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(&b.url("/api/x"), Some(&token)).await, 200);
    let revoked = cli(&["token", "revoke", "--config", &config, &id]);
    assert!(revoked.status.success(), "{revoked:?}");
    let total = || async {
        scrape(a_admin)
            .await
            .get("tokengate_tokens_revoked_total", &[])
            + scrape(b_admin)
                .await
                .get("tokengate_tokens_revoked_total", &[])
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while total().await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(total().await, 1.0, "counted by exactly one replica");
    assert_eq!(
        issued().await,
        1.0,
        "issuance counted by exactly one replica"
    );
    assert_eq!(status_of(&b.url("/api/x"), Some(&token)).await, 401);
}

// ---------------------------------------------------------------------------------------------
// The real client address behind trusted proxies
// ---------------------------------------------------------------------------------------------

/// `curl` from local address `from` (any 127.x address reaches a 127.0.0.1 listener) with
/// `headers`; the status.
fn curl_from(from: &str, url: &str, headers: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .args(["--interface", from]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `[server] trusted_proxies`: behind a trusted proxy the log's `client` is the first address
/// outside the trusted networks, read right to left, so a forged left-most entry changes
/// nothing; an untrusted peer's `X-Forwarded-For` is not read.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_address_is_read_behind_trusted_proxies_only() {
    let up = Upstream::start();
    let port = free_port();
    let toml = plain_config(port, up.port).replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.2\", \"10.0.0.0/8\"]\n",
        1,
    );
    let gate = Gate::start(&toml);
    let token = format!("auth-token: {STATIC_TOKEN}");
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    // Through a trusted proxy (127.0.0.2) and a trusted hop (10.1.1.1) of its own; the client
    // forged 6.6.6.6 in front.
    let xff = "X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.1.1.1";
    assert_eq!(
        curl_from("127.0.0.2", &url("/trusted"), &[&token, xff]),
        "200"
    );
    // The same header from an untrusted address is not believed.
    assert_eq!(
        curl_from("127.0.0.3", &url("/untrusted"), &[&token, xff]),
        "200"
    );
    // A trusted proxy without the header: the proxy is the client.
    assert_eq!(curl_from("127.0.0.2", &url("/bare"), &[&token]), "200");
    let lines = gate.wait_access_line("/bare", Duration::from_secs(5)).await;
    assert!(!lines.is_empty(), "{}", gate.log());
    let client_of = |path: &str| {
        gate.access_lines()
            .into_iter()
            .find(|l| l["path"] == path)
            .map(|l| l["client"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no line for {path}:\n{}", gate.log()))
    };
    assert_eq!(client_of("/trusted"), "203.0.113.9");
    assert_eq!(client_of("/untrusted"), "127.0.0.3");
    assert_eq!(client_of("/bare"), "127.0.0.2");

    // A bad network is a check error at its place.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write_file(
        dir.path(),
        "bad.toml",
        &plain_config(port, up.port).replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
            1,
        ),
    );
    let out = cli(&["check", "--config", &bad.to_string_lossy()]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("bad.toml:2:") && said.contains("trusted_proxies"),
        "{said}"
    );
}
