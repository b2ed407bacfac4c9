//! Abuse control against the real binary (SPEC §11): the failed-credential limit per client
//! address, round-robin validator slots, `[[route.rate_limit]]`s with their headers, memory
//! bounded by `max_tracked`, and buckets shared by two replicas through a real `redis-server`.
//! Clients are told apart by the loopback address they connect from (127.0.0.2, 127.0.0.3, …
//! all reach a 127.0.0.1 listener).

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// An introspection endpoint that takes `delay` per call, keeps working on a call after its
/// caller hung up (as a real one does), and counts its calls and the most in flight at once.
/// `legacy-secret-NAME` is valid (uid NAME); anything else gets 401.
struct CountingValidator {
    port: u16,
    calls: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl CountingValidator {
    async fn start(delay: Duration) -> CountingValidator {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (c, m) = (Arc::clone(&calls), Arc::clone(&most));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (c, m, f) = (Arc::clone(&c), Arc::clone(&m), Arc::clone(&in_flight));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                        let (c, m, f) = (Arc::clone(&c), Arc::clone(&m), Arc::clone(&f));
                        let user = request
                            .headers()
                            .get("auth-token")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("legacy-secret-"))
                            .map(str::to_string);
                        let work = tokio::spawn(async move {
                            c.fetch_add(1, Ordering::SeqCst);
                            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            f.fetch_sub(1, Ordering::SeqCst);
                        });
                        async move {
                            let _ = work.await;
                            let (status, body) = match user {
                                Some(u) => (200, format!(r#"{{"uid":"{u}"}}"#)),
                                None => (401, String::from("{}")),
                            };
                            let mut response =
                                hyper::Response::new(http_body_util::Full::new(Bytes::from(body)));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        CountingValidator { port, calls, most }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A gate in front of `up` whose one validator is `validator` (plus `extra` config).
fn gate_with(validator: &CountingValidator, up: u16, validator_extra: &str, extra: &str) -> Gate {
    let port = free_port();
    Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[store]
backend = "memory"

{extra}

{introspect}{validator_extra}
{route}"#,
        introspect = introspect_validator(validator.port, "3s"),
        route = catch_all_route(up, ""),
    ))
}

fn random_token(i: usize) -> String {
    format!("random-{}-{i}", std::process::id())
}

/// The issue's flood: 600 random credentials, 128 at a time, from one address, against a
/// validator with `max_concurrent = 8` that takes 200 ms. With the default failed-credential
/// limit (20 a minute, burst 10) the validator sees about the burst, never more than 8 at once,
/// the flood gets 429 with `Retry-After`, and a new legitimate user from another address gets
/// 200 during it. (Before the limit, the same flood reached the validator 453 times and kept
/// 4 of 5 new users out.)
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_random_credentials_is_throttled_and_a_new_user_gets_in() {
    let validator = CountingValidator::start(Duration::from_millis(200)).await;
    let up = Upstream::start();
    let gate = gate_with(&validator, up.port, "max_concurrent = 8\n", "");
    let url = gate.url("/x");
    let flood = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = client_from("127.0.0.2");
            let mut statuses = Vec::new();
            for wave in 0..600 / 120 {
                let mut wave_requests = Vec::new();
                for i in 0..120 {
                    let (client, url) = (client.clone(), url.clone());
                    let token = random_token(wave * 1000 + i);
                    wave_requests.push(tokio::spawn(async move {
                        let request =
                            build("GET", &url, &[("auth-token", &token)], full(Bytes::new()));
                        let resp = send_with(&client, request).await;
                        (resp.status.as_u16(), resp.header("retry-after"))
                    }));
                }
                for r in wave_requests {
                    statuses.push(r.await.unwrap());
                }
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let newcomer = get_from("127.0.0.3", &url, &[("auth-token", "legacy-secret-carol")]).await;
    let waited = started.elapsed();
    let statuses = flood.await.unwrap();
    let limited = statuses.iter().filter(|(s, _)| *s == 429).count();
    let refused = statuses.iter().filter(|(s, _)| *s == 401).count();
    println!(
        "flood: {limited} × 429, {refused} × 401; validator calls {}, at most {} at once; newcomer {} in {waited:?}",
        validator.calls(),
        validator.most.load(Ordering::SeqCst),
        newcomer.status
    );
    assert_eq!(newcomer.status, 200, "a new user from another address");
    assert_eq!(newcomer.echoed("x-auth-user").as_deref(), Some("carol"));
    assert!(validator.most.load(Ordering::SeqCst) <= 8);
    // The burst (10), plus what refilled at 20 a minute while the test ran, plus the newcomer.
    assert!(
        validator.calls() <= 14,
        "{} calls reached the validator",
        validator.calls()
    );
    assert_eq!(limited + refused, 600, "every flood request got 401 or 429");
    assert!(limited >= 580, "{limited} of 600 were throttled");
    for (status, retry) in &statuses {
        if *status == 429 {
            let seconds: u64 = retry
                .as_deref()
                .unwrap_or("none")
                .parse()
                .expect("Retry-After");
            assert!((1..=60).contains(&seconds), "Retry-After: {seconds}");
        }
    }
    let lines = gate.access_lines();
    assert!(lines
        .iter()
        .any(|l| l["status"] == 429 && l["limit"] == "failed_auth" && l["client"] == "127.0.0.2"));
}

/// The failed-credential limit counts invalid credentials that needed a remote validator, and
/// nothing else: no credential, a cached valid one, a static token and valid new ones are never
/// throttled (a success gives its token back); a throttled client's new credential is not
/// sent to the validator; another address has its own bucket.
#[tokio::test(flavor = "multi_thread")]
async fn only_invalid_credentials_count_and_only_remote_calls_are_held_back() {
    let validator = CountingValidator::start(Duration::from_millis(10)).await;
    let up = Upstream::start();
    // The static validator first: its tokens are checked locally, before any remote call.
    let statics = static_validator(&[("static-dev-token", "dev", "dev")]);
    let gate = gate_with(
        &validator,
        up.port,
        "",
        &format!("[limits]\nfailed_auth = \"3/1h\"\nfailed_auth_burst = 3\n\n{statics}"),
    );
    let url = gate.url("/x");
    let me = "127.0.0.4";
    // Valid new credentials, more than the burst: each success gives its token back.
    for i in 0..6 {
        let token = format!("legacy-secret-user{i}");
        let resp = get_from(me, &url, &[("auth-token", &token)]).await;
        assert_eq!(resp.status, 200, "valid credential {i}");
    }
    // Three invalid ones use the bucket up; the fourth is refused without a call.
    for i in 0..3 {
        let resp = get_from(me, &url, &[("auth-token", &random_token(i))]).await;
        assert_eq!(resp.status, 401, "invalid credential {i}");
    }
    let calls = validator.calls();
    let resp = get_from(me, &url, &[("auth-token", &random_token(3))]).await;
    resp.assert_error(429, "Too many requests");
    assert!(resp.header("retry-after").is_some());
    assert_eq!(
        resp.header("ratelimit-policy").as_deref(),
        Some("\"failed_auth\";q=3;w=3600")
    );
    // A valid credential not yet cached needs the validator: held back too, not sent.
    let resp = get_from(me, &url, &[("auth-token", "legacy-secret-newbie")]).await;
    assert_eq!(resp.status, 429);
    assert_eq!(validator.calls(), calls, "no call for a throttled client");
    // Never throttled: no credential, a cached valid credential, a static token.
    let resp = get_from(me, &url, &[]).await;
    assert_eq!(resp.status, 401);
    let resp = get_from(me, &url, &[("auth-token", "legacy-secret-user0")]).await;
    assert_eq!(resp.status, 200, "cached");
    let resp = get_from(me, &url, &[("auth-token", "static-dev-token")]).await;
    assert_eq!(resp.status, 200, "static");
    // Another address has a full bucket.
    let resp = get_from("127.0.0.5", &url, &[("auth-token", &random_token(9))]).await;
    assert_eq!(resp.status, 401);
}

/// Concurrent invalid credentials from one address: a validation in progress counts as failed
/// until it succeeds, so 60 at once cannot all slip through to the validator before the first
/// one fails.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_concurrent_credentials_cannot_slip_past_the_limit() {
    let validator = CountingValidator::start(Duration::from_millis(500)).await;
    let up = Upstream::start();
    let gate = gate_with(&validator, up.port, "max_concurrent = 64\n", "");
    let url = gate.url("/x");
    let client = client_from("127.0.0.6");
    let mut requests = Vec::new();
    for i in 0..60 {
        let (client, url) = (client.clone(), url.clone());
        requests.push(tokio::spawn(async move {
            let token = random_token(100 + i);
            let request = build("GET", &url, &[("auth-token", &token)], full(Bytes::new()));
            send_with(&client, request).await.status.as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!("{limited} of 60 got 429; {} calls", validator.calls());
    assert!(validator.calls() <= 10, "{} calls", validator.calls());
    assert!(limited >= 50, "{statuses:?}");
}

/// One client's flood must not make others wait: with the failed-credential limit off and one
/// validator slot, 20 slow calls queued by one address do not stand before another address's
/// new credential, which gets the next free slot (first come, first served would make it wait
/// 20 × 300 ms, past its 3 s bound: 503).
#[tokio::test(flavor = "multi_thread")]
async fn validator_slots_go_round_robin_by_client_address() {
    let validator = CountingValidator::start(Duration::from_millis(300)).await;
    let up = Upstream::start();
    let gate = gate_with(
        &validator,
        up.port,
        "max_concurrent = 1\n",
        "[limits]\nfailed_auth = \"0\"\n",
    );
    let url = gate.url("/x");
    let client = client_from("127.0.0.7");
    let mut flood = Vec::new();
    for i in 0..20 {
        let (client, url) = (client.clone(), url.clone());
        flood.push(tokio::spawn(async move {
            let token = random_token(200 + i);
            let request = build("GET", &url, &[("auth-token", &token)], full(Bytes::new()));
            send_with(&client, request).await.status.as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let resp = get_from("127.0.0.8", &url, &[("auth-token", "legacy-secret-dave")]).await;
    let waited = started.elapsed();
    println!("the other address waited {waited:?}");
    assert_eq!(resp.status, 200);
    assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
    for r in flood {
        let status = r.await.unwrap();
        assert!(status == 401 || status == 503, "{status}");
    }
    assert_eq!(validator.most.load(Ordering::SeqCst), 1);
}

fn rate_limited_gate(up: u16, admin: u16, limits: &str) -> Gate {
    let port = free_port();
    let statics = static_validator(&[
        ("alice-one", "alice", "alice"),
        ("alice-two", "alice", "alice"),
        ("bob-one", "bob", "bob"),
    ]);
    Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "memory"

{statics}
{route}{limits}

[[route]]
path_prefix = "/open"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[[route.rate_limit]]
per = "client"
rate = "2/1m"
"#,
        route = catch_all_route(up, ""),
    ))
}

/// The value of one series in a `/metrics` scrape (0 when absent).
async fn metric(admin: u16, name_and_labels: &str) -> f64 {
    let resp = get(&format!("http://127.0.0.1:{admin}/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&resp.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `per = "subject"`: every credential of one subject draws on one bucket; another subject has
/// its own; 429 with `Retry-After` and the draft's `RateLimit-Policy` / `RateLimit`; the bucket
/// refills at its rate; the log line and `tokengate_limited_total` name the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_per_subject_limit_counts_every_credential_of_the_subject_and_refills() {
    let up = Upstream::start();
    let admin = free_port();
    let gate = rate_limited_gate(
        up.port,
        admin,
        "[[route.rate_limit]]\nper = \"subject\"\nrate = \"2/1s\"\nburst = 3\n",
    );
    let url = gate.url("/x");
    for token in ["alice-one", "alice-two", "alice-one"] {
        assert_eq!(get(&url, &[("auth-token", token)]).await.status, 200);
    }
    let resp = get(&url, &[("auth-token", "alice-two")]).await;
    resp.assert_error(429, "Too many requests");
    assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        resp.header("ratelimit-policy").as_deref(),
        Some("\"subject\";q=2;w=1")
    );
    assert_eq!(
        resp.header("ratelimit").as_deref(),
        Some("\"subject\";r=0;t=1")
    );
    assert_eq!(get(&url, &[("auth-token", "bob-one")]).await.status, 200);
    // 2 a second: one token back after 500 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&url, &[("auth-token", "alice-one")]).await.status, 200);
    assert_eq!(get(&url, &[("auth-token", "alice-one")]).await.status, 429);
    let wanted = |l: &serde_json::Value| {
        l["status"] == 429 && l["limit"] == "subject" && l["subject"] == "alice"
    };
    let line = gate
        .wait_access_line_where("/", Duration::from_secs(3), wanted)
        .await;
    assert!(line.iter().any(wanted), "{line:?}");
    let counted = metric(
        admin,
        "tokengate_limited_total{route=\"/\",limit=\"subject\"}",
    )
    .await;
    assert_eq!(counted, 2.0);
}

/// `per = "token"` counts each credential apart; `per = "client"` counts before the credential
/// is looked at (a client over it gets 429 even without one), on `auth = "none"` routes too,
/// per address. Several limits on a route all apply.
#[tokio::test(flavor = "multi_thread")]
async fn per_token_and_per_client_limits_apply_together() {
    let up = Upstream::start();
    let admin = free_port();
    let gate = rate_limited_gate(
        up.port,
        admin,
        "[[route.rate_limit]]\nper = \"token\"\nrate = \"1/1m\"\n\
         [[route.rate_limit]]\nper = \"client\"\nrate = \"3/1m\"\n",
    );
    let url = gate.url("/x");
    let me = "127.0.0.9";
    assert_eq!(
        get_from(me, &url, &[("auth-token", "alice-one")])
            .await
            .status,
        200
    );
    let resp = get_from(me, &url, &[("auth-token", "alice-one")]).await;
    assert_eq!(resp.status, 429, "the token's bucket");
    assert_eq!(
        resp.header("ratelimit-policy").as_deref(),
        Some("\"token\";q=1;w=60")
    );
    assert_eq!(
        get_from(me, &url, &[("auth-token", "alice-two")])
            .await
            .status,
        200
    );
    // The client's third request used its last token; the fourth, even without a credential,
    // is refused before the credential is looked at.
    let resp = get_from(me, &url, &[]).await;
    assert_eq!(resp.status, 429, "the client's bucket");
    assert_eq!(
        resp.header("ratelimit-policy").as_deref(),
        Some("\"client\";q=3;w=60")
    );
    assert_eq!(get_from("127.0.0.10", &url, &[]).await.status, 401);
    // auth = "none": two a minute per address.
    let open = gate.url("/open/y");
    for _ in 0..2 {
        assert_eq!(get_from("127.0.0.11", &open, &[]).await.status, 200);
    }
    assert_eq!(get_from("127.0.0.11", &open, &[]).await.status, 429);
    assert_eq!(get_from("127.0.0.12", &open, &[]).await.status, 200);
    assert_eq!(
        metric(
            admin,
            "tokengate_limited_total{route=\"/open\",limit=\"client\"}"
        )
        .await,
        1.0
    );
}

/// A config whose route has a per-client limit behind a trusted proxy (127.0.0.1), keeping at
/// most `max_tracked` buckets.
fn tracked_gate(max_tracked: usize) -> Gate {
    let port = free_port();
    Gate::start(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"
trusted_proxies = ["127.0.0.1"]

[store]
backend = "memory"

[limits]
max_tracked = {max_tracked}

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:9"
[[route.rate_limit]]
per = "client"
rate = "1/1h"
"#
    ))
}

/// Sends `count` requests, each from another client address (as a trusted proxy names it in
/// `X-Forwarded-For`), pipelined on `connections` keep-alive connections; returns the statuses
/// seen (a request without a credential on an authenticated route: 401 once per client, since
/// the per-client limit lets each address through once).
async fn flood_of_addresses(port: u16, start: u32, count: u32, connections: u32) -> usize {
    let mut tasks = Vec::new();
    let per = count / connections;
    for c in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut answered = 0;
            let mut buffer = vec![0u8; 256 * 1024];
            let first = start + c * per;
            let batch = 200;
            let mut sent = 0;
            while sent < per {
                let n = batch.min(per - sent);
                let mut requests = Vec::with_capacity(n as usize * 80);
                for i in 0..n {
                    let ip = flood_address(first + sent + i);
                    requests.extend_from_slice(
                        format!("GET /x HTTP/1.1\r\nhost: t\r\nx-forwarded-for: {ip}\r\n\r\n")
                            .as_bytes(),
                    );
                }
                tcp.write_all(&requests).await.unwrap();
                sent += n;
                // Every answer is a JSON error: the batch is in when it has n heads and the
                // last body has ended.
                let mut pending = Vec::new();
                loop {
                    let read = tcp.read(&mut buffer).await.unwrap();
                    assert!(read > 0, "the gate closed the connection");
                    pending.extend_from_slice(&buffer[..read]);
                    let heads = pending.windows(9).filter(|w| *w == b"HTTP/1.1 ").count();
                    if heads as u32 >= n && pending.ends_with(b"}") {
                        answered += heads;
                        break;
                    }
                }
            }
            answered
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// The `n`th address of a flood: 10.0.0.0 onwards.
fn flood_address(n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a00_0000 + n)
}

/// `max_tracked` bounds the buckets: a flood of a million distinct client addresses (through a
/// trusted proxy) grows RSS by less than `max_tracked` × 100 B + 10 MiB. Unbounded, a million
/// buckets take ~40 MB. Ignored in a plain `cargo test`: against a debug build the million
/// requests take over two minutes; `.ci/run` runs it against the release binary
/// (`TOKENGATE_TEST_BIN=target/release/tokengate cargo test --test limits -- --ignored`).
/// The bound itself is also a unit test of `limits` (`memory_is_bounded…`).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn a_million_client_addresses_do_not_outgrow_max_tracked() {
    let max_tracked = 10_000;
    let gate = tracked_gate(max_tracked);
    // Warm up (allocator arenas, the connection's buffers), then measure.
    flood_of_addresses(gate.port, 0, 40_000, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss(gate.pid()).expect("rss");
    let started = Instant::now();
    let count = 1_000_000;
    let answered = flood_of_addresses(gate.port, 100_000, count, 2).await;
    let after = rss(gate.pid()).expect("rss");
    let growth = after.saturating_sub(before);
    println!(
        "{answered} requests from as many addresses in {:?}: RSS {before} → {after} (+{growth} B)",
        started.elapsed()
    );
    assert_eq!(answered, count as usize);
    assert!(
        growth < (max_tracked as u64) * 100 + 10 * 1024 * 1024,
        "RSS grew by {growth} B"
    );
    // The limit still holds for an address seen recently.
    let last = flood_address(100_000 + count - 1);
    let request = format!(
        "GET /x HTTP/1.1\r\nhost: t\r\nx-forwarded-for: {last}\r\nconnection: close\r\n\r\n"
    );
    let status = raw_status(&raw(gate.port, request.as_bytes(), Duration::from_secs(5)).await);
    assert_eq!(
        status,
        Some(429),
        "the last address's bucket is still counting"
    );
}

/// Two replicas with `[limits] shared = true` count into one bucket in Redis (a real
/// `redis-server`); when Redis dies each falls back to its own buckets and keeps serving
/// (`tokengate_limits_shared{state="local"}` = 1), and they share again once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_buckets_in_redis_and_fall_back_while_it_is_gone() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let up = Upstream::start();
    let prefix = unique_prefix("limits");
    let replica = |port: u16, admin: u16| {
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "redis"
url = "{url}"
prefix = "{prefix}"

[limits]
shared = true

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[[route.rate_limit]]
per = "client"
rate = "4/1h"
"#,
            url = redis.url(),
            up = up.port,
        )
    };
    let (admin_a, admin_b) = (free_port(), free_port());
    let a = Gate::start(&replica(free_port(), admin_a));
    let b = Gate::start(&replica(free_port(), admin_b));
    let me = "127.0.0.13";
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gate = if i % 2 == 0 { &a } else { &b };
        statuses.push(get_from(me, &gate.url("/x"), &[]).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "one bucket for both"
    );
    assert_eq!(
        metric(admin_a, "tokengate_limits_shared{state=\"redis\"}").await,
        1.0
    );

    redis.kill();
    // Each replica counts on its own: the API keeps serving, within the limit.
    let other = "127.0.0.14";
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get_from(other, &a.url("/x"), &[]).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429],
        "local buckets while Redis is away"
    );
    assert_eq!(
        metric(admin_a, "tokengate_limits_shared{state=\"local\"}").await,
        1.0
    );
    assert!(
        a.log().contains("shared rate limits unavailable"),
        "{}",
        a.log()
    );

    redis.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Back in Redis: the first client's bucket (kept by Redis) still refuses it on both.
    assert_eq!(get_from(me, &b.url("/x"), &[]).await.status, 429);
    assert_eq!(get_from(me, &a.url("/x"), &[]).await.status, 429);
    assert_eq!(
        metric(admin_a, "tokengate_limits_shared{state=\"redis\"}").await,
        1.0
    );
    assert_eq!(
        metric(admin_a, "tokengate_limits_shared{state=\"local\"}").await,
        0.0
    );
}
