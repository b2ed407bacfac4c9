//! SPEC §2: the validation cache — one introspection per token per TTL, single flight for
//! concurrent misses, negative caching, expiry, the size bound, and fail-closed behaviour.

mod common;

use common::*;
use std::time::Duration;
use tokio::time::Instant;

fn config(port: u16, up: u16, cache: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio"]
[store]
backend = "memory"
[cache]
{cache}
{validator}
{route}"#,
        validator = introspect_validator(up, "5s"),
        route = catch_all_route(up, ""),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn introspection_once_per_token_and_subject_from_json_pointer() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        "ttl = \"1h\"\nnegative_ttl = \"1h\"",
    ));

    let resp = get(&gate.url("/d"), &[("X-Auth-Token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(resp.echoed("auth-token").as_deref(), Some(ALICE));
    // The credential was presented to the introspection endpoint as configured.
    let seen = up.last_whoami().await;
    assert_eq!(seen.header("auth-token").as_deref(), Some(ALICE));
    assert_eq!(up.whoami_calls(), 1);

    // Same token in every dialect: one cache entry (keyed by the credential, not the dialect).
    let bearer = format!("Bearer {ALICE}");
    for _ in 0..10 {
        for (name, value) in [
            ("Authorization", bearer.as_str()),
            ("X-Auth-Token", ALICE),
            ("auth-token", ALICE),
            ("X-Rucio-Auth-Token", ALICE),
        ] {
            let resp = get(&gate.url("/d"), &[(name, value)]).await;
            assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
        }
    }
    assert_eq!(
        up.whoami_calls(),
        1,
        "cache hits must not call the validator"
    );

    let resp = get(&gate.url("/d"), &[("X-Auth-Token", BOB)]).await;
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("bob"));
    assert_eq!(up.whoami_calls(), 2);
    // Each subject stays with its own token.
    let resp = get(&gate.url("/d"), &[("X-Auth-Token", ALICE)]).await;
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(up.whoami_calls(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_share_one_introspection() {
    let up = Upstream::start();
    up.set_whoami_delay(300);
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "ttl = \"1h\""));
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let url = gate.url(&format!("/sf/{i}"));
        tasks.spawn(async move {
            send_with(
                &client,
                build("GET", &url, &[("X-Auth-Token", ALICE)], full("")),
            )
            .await
        });
    }
    let mut ok = 0;
    while let Some(resp) = tasks.join_next().await {
        let resp = resp.expect("task");
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(
        up.whoami_calls(),
        1,
        "single flight: 200 concurrent misses, one validation"
    );
    assert_eq!(up.requests(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_for_a_bad_token_share_one_introspection() {
    let up = Upstream::start();
    up.set_whoami_delay(300);
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "negative_ttl = \"1h\""));
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        let url = gate.url("/sf");
        tasks.spawn(async move {
            send_with(
                &client,
                build("GET", &url, &[("X-Auth-Token", "bad-concurrent")], full("")),
            )
            .await
        });
    }
    while let Some(resp) = tasks.join_next().await {
        resp.expect("task").assert_error(401, "Invalid credentials");
    }
    assert_eq!(up.whoami_calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_validations_are_cached_for_negative_ttl() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        "ttl = \"1h\"\nnegative_ttl = \"1s\"",
    ));
    for _ in 0..20 {
        get(&gate.url("/n"), &[("auth-token", "nope")])
            .await
            .assert_error(401, "Invalid credentials");
    }
    assert_eq!(
        up.whoami_calls(),
        1,
        "negative cache: one call for 20 uses of a bad token"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    get(&gate.url("/n"), &[("auth-token", "nope")])
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(
        up.whoami_calls(),
        2,
        "negative entry must expire after negative_ttl"
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_expire_after_ttl() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        "ttl = \"1s\"\nnegative_ttl = \"1s\"",
    ));
    let resp = get(&gate.url("/t"), &[("auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    let resp = get(&gate.url("/t"), &[("auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.whoami_calls(), 1);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let resp = get(&gate.url("/t"), &[("auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        up.whoami_calls(),
        2,
        "the entry must be revalidated after ttl"
    );
    let resp = get(&gate.url("/t"), &[("auth-token", ALICE)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.whoami_calls(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_stopped_being_valid_is_rejected_after_ttl() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "ttl = \"1s\""));
    assert_eq!(
        get(&gate.url("/r"), &[("auth-token", ALICE)]).await.status,
        200
    );
    // The backend now rejects alice (revoked at the source).
    up.set_whoami_status(401);
    assert_eq!(
        get(&gate.url("/r"), &[("auth-token", ALICE)]).await.status,
        200,
        "within ttl the cached validation stands"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    get(&gate.url("/r"), &[("auth-token", ALICE)])
        .await
        .assert_error(401, "Invalid credentials");
}

/// Sends each token once; returns how many introspection calls that caused. Every four
/// tokens come from another loopback address, so that the failed-credential limit (10 per
/// address) does not answer for the cache.
async fn round(gate: &Gate, up: &Upstream, tokens: &[String], expect: u16) -> usize {
    let before = up.whoami_calls();
    for (i, token) in tokens.iter().enumerate() {
        let resp = send_with(
            &client_from(&format!("127.0.3.{}", i / 4 + 1)),
            build("GET", &gate.url("/m"), &[("auth-token", token)], full("")),
        )
        .await;
        assert_eq!(resp.status, expect, "{token}");
    }
    up.whoami_calls() - before
}

#[tokio::test(flavor = "multi_thread")]
async fn max_entries_bounds_the_cache() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        "ttl = \"1h\"\nnegative_ttl = \"1h\"\nmax_entries = 10",
    ));
    // Valid credentials: 40 distinct users, then the same 40 again. An unbounded cache would
    // answer the second round without a single call; with room for 10, most are re-validated.
    let good: Vec<String> = (0..40).map(|i| format!("legacy-secret-user{i}")).collect();
    assert_eq!(round(&gate, &up, &good, 200).await, 40);
    assert_eq!(round(&gate, &up, &good[39..], 200).await, 0, "just cached");
    let again = round(&gate, &up, &good, 200).await;
    assert!(
        again >= 30,
        "only {again} of 40 re-validated: the cache holds more than 10"
    );

    // Rejected credentials are bounded the same way.
    let bad: Vec<String> = (0..100).map(|i| format!("bad-token-{i}")).collect();
    assert_eq!(round(&gate, &up, &bad, 401).await, 100);
    let again = round(&gate, &up, &bad, 401).await;
    assert!(
        again >= 90,
        "only {again} of 100 re-validated: the cache holds more than 10"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_validation_survives_a_backend_outage_and_uncached_fails_closed() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "ttl = \"1h\""));
    assert_eq!(
        get(&gate.url("/o"), &[("auth-token", ALICE)]).await.status,
        200
    );
    up.set_whoami_status(500);
    let resp = get(&gate.url("/o"), &[("auth-token", ALICE)]).await;
    assert_eq!(
        resp.status, 200,
        "a cached user keeps working during an outage"
    );
    get(&gate.url("/o"), &[("auth-token", BOB)])
        .await
        .assert_error(503, "Authentication backend unavailable");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unknown_tokens_does_not_stall_a_cached_user() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, "ttl = \"1h\""));
    assert_eq!(
        get(&gate.url("/f"), &[("auth-token", ALICE)]).await.status,
        200
    );
    up.set_whoami_delay(1000);
    // From 15 addresses, 10 each: under the failed-credential limit, so all 150 are in flight.
    let clients: Vec<Client> = (1..=15)
        .map(|n| client_from(&format!("127.0.1.{n}")))
        .collect();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..150 {
        let client = clients[i % clients.len()].clone();
        let url = gate.url("/f");
        flood.spawn(async move {
            let token = format!("flood-{i}");
            send_with(
                &client,
                build("GET", &url, &[("auth-token", &token)], full("")),
            )
            .await
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let resp = get(&gate.url("/f"), &[("auth-token", ALICE)]).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 200);
    assert!(
        took < Duration::from_millis(500),
        "a cached request took {took:?} while slow validations (1 s each) were in flight"
    );
    while let Some(r) = flood.join_next().await {
        r.expect("task").assert_error(401, "Invalid credentials");
    }
}
