//! SPEC §1–§2: every credential dialect is accepted, validated and rewritten into the upstream's
//! form; credentials and spoofable identity headers are stripped; routing, auth modes,
//! forwarding headers and hop-by-hop handling.

mod common;

use common::*;
use std::time::Duration;

const TOKEN: &str = "dev-token-9a1c";
const OTHER: &str = "dev-token-bob-77";

/// A gate with one static token (alice/ops), an upstream credential header distinct from every
/// client dialect, and identity headers.
fn config(port: u16, up: u16, sources: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[credentials]
sources = {sources}

[store]
backend = "memory"

{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "required"
preserve_host = true
[route.upstream_auth]
header = "x-upstream-credential"
value = "Token {{token}}"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"X-Auth-Account" = "{{account}}"
"X-Client-DN" = "{{dn}}"
"#,
        validator = static_validator(&[(TOKEN, "alice", "ops"), (OTHER, "bob", "bobs")])
    )
}

const CLIENT_FORMS: [&str; 5] = [
    "authorization",
    "x-auth-token",
    "auth-token",
    "x-rucio-auth-token",
    "x-api-key",
];

/// Asserts the echoed request carries the rewritten credential and identity and none of the
/// client's credential forms or spoofed identity headers.
fn assert_rewritten(resp: &Resp, token: &str, subject: &str, account: &str) {
    assert_eq!(
        resp.status,
        200,
        "body: {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(
        resp.echoed("x-upstream-credential").as_deref(),
        Some(format!("Token {token}").as_str())
    );
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some(subject));
    assert_eq!(resp.echoed("x-auth-account").as_deref(), Some(account));
    for h in CLIENT_FORMS {
        assert_eq!(
            resp.echoed(h),
            None,
            "client credential header {h} was forwarded"
        );
    }
    let headers = resp.json()["headers"].to_string();
    assert_eq!(
        headers.matches(token).count(),
        1,
        "the token may appear only in the upstream credential header: {headers}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn builtin_dialects_are_rewritten_to_the_upstream_form() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "auth-token", "rucio"]"#,
    ));
    let bearer = format!("Bearer {TOKEN}");
    let cases: [(&str, &str); 4] = [
        ("Authorization", &bearer),
        ("X-Auth-Token", TOKEN),
        ("auth-token", TOKEN),
        ("X-Rucio-Auth-Token", TOKEN),
    ];
    for (name, value) in cases {
        let resp = get(
            &gate.url("/api/v1/items?x=1&y=%2F"),
            &[
                (name, value),
                ("X-Auth-User", "mallory"),
                ("X-Auth-Account", "root"),
                ("X-Client-DN", "/CN=forged"),
            ],
        )
        .await;
        assert_rewritten(&resp, TOKEN, "alice", "ops");
        assert_eq!(resp.echoed_path(), "/api/v1/items?x=1&y=%2F", "{name}");
        assert_eq!(
            resp.echoed("x-client-dn"),
            None,
            "{name}: an identity header rendering empty ({{dn}} without a client certificate) \
             must not be sent, and the forged copy must be gone"
        );
    }
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn default_sources_are_the_four_builtin_dialects() {
    let up = Upstream::start();
    let port = free_port();
    let toml = config(port, up.port, "[]").replace("[credentials]\nsources = []\n", "");
    assert!(!toml.contains("[credentials]"));
    let gate = Gate::start(&toml);
    for (name, prefix) in DIALECTS {
        let value = format!("{prefix}{TOKEN}");
        let resp = get(&gate.url("/d"), &[(name, &value)]).await;
        assert_rewritten(&resp, TOKEN, "alice", "ops");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn header_names_and_bearer_scheme_are_case_insensitive() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["bearer", "x-auth-token"]"#));
    let resp = get(&gate.url("/c"), &[("X-AUTH-TOKEN", TOKEN)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    let lower = format!("bearer {TOKEN}");
    let resp = get(&gate.url("/c"), &[("authorization", &lower)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_header_dialect() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["header:X-Api-Key"]"#));
    let resp = get(&gate.url("/h"), &[("x-api-key", TOKEN)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    // A dialect that is not configured is not a credential at all.
    let resp = get(&gate.url("/h"), &[("X-Auth-Token", TOKEN)]).await;
    resp.assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_configured_sources_count() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["rucio"]"#));
    let bearer = format!("Bearer {TOKEN}");
    let resp = get(&gate.url("/o"), &[("Authorization", &bearer)]).await;
    resp.assert_error(401, "Credentials required");
    let resp = get(&gate.url("/o"), &[("X-Rucio-Auth-Token", TOKEN)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    assert_eq!(up.requests(), 1);
}

/// A credential in a known dialect the config does not accept is not looked at, but the log
/// says so (`"ignored"`), and the 401 challenges with `Bearer` only where bearer is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_known_dialect_the_config_does_not_accept_is_named_in_the_log() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["auth-token"]"#));
    let bearer = format!("Bearer {TOKEN}");
    let resp = get(&gate.url("/ignored/bearer"), &[("Authorization", &bearer)]).await;
    resp.assert_error(401, "Credentials required");
    assert_eq!(
        resp.header("www-authenticate"),
        None,
        "auth-token only: no Bearer challenge"
    );
    get(
        &gate.url("/ignored/rucio"),
        &[("X-Rucio-Auth-Token", TOKEN)],
    )
    .await
    .assert_error(401, "Credentials required");
    // Basic is not a bearer credential: nothing to name.
    get(
        &gate.url("/ignored/basic"),
        &[("Authorization", "Basic YTpi")],
    )
    .await
    .assert_error(401, "Credentials required");
    let ok = get(&gate.url("/ignored/ok"), &[("auth-token", TOKEN)]).await;
    assert_eq!(ok.status, 200);
    let line = |path: &str| -> serde_json::Value {
        gate.access_lines()
            .into_iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no access line for {path}:\n{}", gate.log()))
    };
    for _ in 0..100 {
        if gate.access_lines().len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(line("/ignored/bearer")["ignored"], "bearer");
    assert_eq!(line("/ignored/bearer")["auth"], "missing");
    assert_eq!(line("/ignored/rucio")["ignored"], "rucio");
    assert!(line("/ignored/basic").get("ignored").is_none());
    assert!(line("/ignored/ok").get("ignored").is_none());
    assert!(
        !gate.log().contains(TOKEN),
        "the ignored credential is not logged"
    );

    // With bearer among the sources, the challenge is there.
    let port = free_port();
    let with_bearer = Gate::start(&config(port, up.port, r#"["bearer", "auth-token"]"#));
    let resp = get(&with_bearer.url("/x"), &[]).await;
    resp.assert_error(401, "Credentials required");
    assert_eq!(
        resp.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"tokengate\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn query_dialect_removes_only_that_parameter() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["query:api_key"]"#));

    let resp = get(
        &gate.url(&format!("/q/items?a=1&api_key={TOKEN}&b=two")),
        &[],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    assert_eq!(resp.echoed_path(), "/q/items?a=1&b=two");

    let resp = get(&gate.url(&format!("/q/only?api_key={TOKEN}")), &[]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    let path = resp.echoed_path();
    assert!(
        path == "/q/only" || path == "/q/only?",
        "forwarded path {path:?}"
    );

    let resp = get(&gate.url(&format!("/q/first?api_key={TOKEN}&z=9")), &[]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    assert_eq!(resp.echoed_path(), "/q/first?z=9");

    // A parameter whose name merely contains the credential's name is not touched.
    let resp = get(
        &gate.url(&format!("/q/x?my_api_key=keep&api_key={TOKEN}")),
        &[],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    assert_eq!(resp.echoed_path(), "/q/x?my_api_key=keep");

    let resp = get(&gate.url("/q/none?a=1"), &[]).await;
    resp.assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_credential_is_percent_decoded() {
    let up = Upstream::start();
    let port = free_port();
    let token = "tok/with:odd@chars";
    let toml = config(port, up.port, r#"["query:api_key"]"#).replace(
        &static_validator(&[(TOKEN, "alice", "ops"), (OTHER, "bob", "bobs")]),
        &static_validator(&[(token, "odd", "oddacct")]),
    );
    let gate = Gate::start(&toml);
    let resp = get(&gate.url("/q?api_key=tok%2Fwith%3Aodd%40chars&keep=1"), &[]).await;
    assert_rewritten(&resp, token, "odd", "oddacct");
    assert_eq!(resp.echoed_path(), "/q?keep=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn cookie_dialect_removes_only_that_cookie() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["cookie:session"]"#));

    let cookie = format!("theme=dark; session={TOKEN}; lang=en");
    let resp = get(&gate.url("/k"), &[("Cookie", &cookie)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    let forwarded = resp.echoed("cookie").expect("other cookies must be kept");
    assert!(
        !forwarded.contains("session"),
        "cookie forwarded: {forwarded}"
    );
    let mut kept: Vec<&str> = forwarded
        .split([';', '|'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    kept.sort();
    assert_eq!(kept, ["lang=en", "theme=dark"]);

    // The credential as the only cookie: no session cookie reaches the upstream.
    let only = format!("session={TOKEN}");
    let resp = get(&gate.url("/k"), &[("Cookie", &only)]).await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    let forwarded = resp.echoed("cookie").unwrap_or_default();
    assert!(
        !forwarded.contains("session"),
        "cookie forwarded: {forwarded}"
    );

    // A cookie whose name merely ends with the credential's name is not the credential.
    let resp = get(&gate.url("/k"), &[("Cookie", "xsession=abc")]).await;
    resp.assert_error(401, "Credentials required");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_credential_counts_as_absent() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "auth-token", "rucio"]"#,
    ));
    // Stock clients send empty token headers next to the real one: not a conflict.
    let resp = get(
        &gate.url("/e"),
        &[("X-Auth-Token", ""), ("X-Rucio-Auth-Token", TOKEN)],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");

    // Only empty values: no credential at all.
    let resp = get(&gate.url("/e"), &[("X-Auth-Token", ""), ("auth-token", "")]).await;
    resp.assert_error(401, "Credentials required");
    assert_eq!(
        resp.header("www-authenticate").as_deref(),
        Some(r#"Bearer realm="tokengate""#)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn same_credential_in_two_sources_is_accepted_and_both_stripped() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "auth-token", "rucio", "query:api_key", "cookie:session"]"#,
    ));
    let bearer = format!("Bearer {TOKEN}");
    let cookie = format!("session={TOKEN}");
    let resp = get(
        &gate.url(&format!("/s?api_key={TOKEN}&v=1")),
        &[
            ("Authorization", &bearer),
            ("X-Auth-Token", TOKEN),
            ("auth-token", TOKEN),
            ("X-Rucio-Auth-Token", TOKEN),
            ("Cookie", &cookie),
        ],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
    assert_eq!(resp.echoed_path(), "/s?v=1");
    assert!(!resp.echoed("cookie").unwrap_or_default().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_different_credentials_conflict_and_never_reach_the_upstream() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "auth-token", "rucio", "query:api_key", "cookie:session"]"#,
    ));
    let bearer_other = format!("Bearer {OTHER}");
    let cookie_other = format!("session={OTHER}");
    let query_other = format!("/c?api_key={OTHER}");
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            "/c".into(),
            vec![("auth-token", TOKEN), ("X-Auth-Token", OTHER)],
        ),
        (
            "/c".into(),
            vec![
                ("X-Rucio-Auth-Token", TOKEN),
                ("Authorization", &bearer_other),
            ],
        ),
        // Both valid, for different users: still never guessed.
        (query_other.clone(), vec![("X-Auth-Token", TOKEN)]),
        // One valid, one garbage.
        (
            "/c".into(),
            vec![("auth-token", TOKEN), ("X-Auth-Token", "garbage")],
        ),
    ];
    for (path, headers) in cases {
        let resp = get(&gate.url(&path), &headers).await;
        resp.assert_error(400, "Conflicting credentials");
    }
    assert_eq!(
        up.requests(),
        0,
        "a conflicting request reached the upstream"
    );
    // A header outranks a cookie (SPEC §1): a browser with a session cookie may still call
    // the API with a token; the cookie is not forwarded.
    let resp = get(
        &gate.url("/c"),
        &[("auth-token", TOKEN), ("Cookie", &cookie_other)],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    assert!(!resp.echoed("cookie").unwrap_or_default().contains(OTHER));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_auth_placeholders_are_rendered() {
    let up = Upstream::start();
    let port = free_port();
    let toml = config(port, up.port, r#"["rucio", "x-auth-token"]"#).replace(
        "value = \"Token {token}\"",
        "value = \"{subject}|{account}|{source}|{token}\"",
    );
    let gate = Gate::start(&toml);
    let resp = get(&gate.url("/p"), &[("X-Rucio-Auth-Token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.echoed("x-upstream-credential").as_deref(),
        Some(format!("alice|ops|rucio|{TOKEN}").as_str())
    );
    let resp = get(&gate.url("/p"), &[("X-Auth-Token", OTHER)]).await;
    assert_eq!(
        resp.echoed("x-upstream-credential").as_deref(),
        Some(format!("bob|bobs|x-auth-token|{OTHER}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_upstream_auth_no_credential_is_forwarded() {
    let up = Upstream::start();
    let port = free_port();
    let toml = config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "auth-token", "rucio"]"#,
    )
    .replace(
        "[route.upstream_auth]\nheader = \"x-upstream-credential\"\nvalue = \"Token {token}\"\n",
        "",
    );
    assert!(!toml.contains("upstream_auth"));
    let gate = Gate::start(&toml);
    for (name, prefix) in DIALECTS {
        let value = format!("{prefix}{TOKEN}");
        let resp = get(&gate.url("/n"), &[(name, &value)]).await;
        assert_eq!(resp.status, 200);
        let json = resp.json();
        assert!(
            !json["headers"].to_string().contains(TOKEN),
            "{name}: the credential reached the upstream: {}",
            json["headers"]
        );
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn longest_path_prefix_wins_regardless_of_order() {
    let root = Upstream::start();
    let api = Upstream::start();
    let v2 = Upstream::start();
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{root}"
[route.identity_headers]
"X-Route" = "root"

[[route]]
path_prefix = "/api/v2"
upstream = "http://127.0.0.1:{v2}"
auth = "none"
[route.identity_headers]
"X-Route" = "v2"

[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:{api}"
[route.identity_headers]
"X-Route" = "api"
"#,
        root = root.port,
        api = api.port,
        v2 = v2.port,
        validator = static_validator(&[(TOKEN, "alice", "ops")]),
    );
    let gate = Gate::start(&toml);
    let auth = [("X-Auth-Token", TOKEN)];

    let resp = get(&gate.url("/api/v2/things?q=1"), &[]).await;
    assert_eq!(resp.status, 200, "the /api/v2 route needs no credential");
    assert_eq!(resp.echoed_path(), "/api/v2/things?q=1");
    let resp = get(&gate.url("/api/v1/things"), &auth).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-route").as_deref(), Some("api"));
    let resp = get(&gate.url("/api"), &auth).await;
    assert_eq!(resp.echoed("x-route").as_deref(), Some("api"));
    let resp = get(&gate.url("/other"), &auth).await;
    assert_eq!(resp.echoed("x-route").as_deref(), Some("root"));
    // The /api route still requires a credential (it is not the /api/v2 route).
    get(&gate.url("/api/v1/things"), &[])
        .await
        .assert_error(401, "Credentials required");

    assert_eq!(v2.requests(), 1);
    assert_eq!(api.requests(), 2);
    assert_eq!(root.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn optional_auth_forwards_anonymous_requests_without_identity() {
    let up = Upstream::start();
    let port = free_port();
    let toml = config(port, up.port, r#"["x-auth-token"]"#)
        .replace("auth = \"required\"", "auth = \"optional\"");
    let gate = Gate::start(&toml);

    let resp = get(
        &gate.url("/opt"),
        &[("X-Auth-User", "mallory"), ("X-Auth-Account", "root")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.echoed("x-auth-user"),
        None,
        "spoofed identity forwarded"
    );
    assert_eq!(
        resp.echoed("x-auth-account"),
        None,
        "spoofed identity forwarded"
    );
    assert_eq!(resp.echoed("x-upstream-credential"), None);

    let resp = get(
        &gate.url("/opt"),
        &[("X-Auth-Token", TOKEN), ("X-Auth-User", "mallory")],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");

    let resp = get(&gate.url("/opt"), &[("X-Auth-Token", "not-a-valid-token")]).await;
    resp.assert_error(401, "Invalid credentials");
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_none_skips_validation_but_still_strips_credentials() {
    let up = Upstream::start();
    let port = free_port();
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio", "query:api_key"]
{validator}
[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[route.identity_headers]
"X-Auth-User" = "{{subject}}"
"#,
        up = up.port,
        validator = introspect_validator(up.port, "2s"),
    );
    let gate = Gate::start(&toml);
    let resp = get(&gate.url("/free"), &[]).await;
    assert_eq!(resp.status, 200);

    let resp = get(
        &gate.url("/free?api_key=anything-at-all&x=1"),
        &[
            ("X-Auth-Token", "anything-at-all"),
            ("X-Auth-User", "mallory"),
        ],
    )
    .await;
    assert_eq!(
        resp.status, 200,
        "auth = none must not reject an unknown credential"
    );
    assert_eq!(resp.echoed("x-auth-token"), None);
    assert_eq!(resp.echoed("x-auth-user"), None);
    assert_eq!(resp.echoed_path(), "/free?x=1");
    let resp = get(
        &gate.url("/free"),
        &[("Authorization", "Bearer another-one")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("authorization"), None);
    assert_eq!(up.whoami_calls(), 0, "auth = none called the validator");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_are_set() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["x-auth-token"]"#));

    let resp = get(
        &gate.url("/f"),
        &[("X-Auth-Token", TOKEN), ("Host", "api.example.com:8443")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(resp.echoed("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        resp.echoed("x-forwarded-host").as_deref(),
        Some("api.example.com:8443")
    );
    assert_eq!(
        resp.echoed("host").as_deref(),
        Some("api.example.com:8443"),
        "preserve_host = true"
    );

    let resp = get(
        &gate.url("/f"),
        &[
            ("X-Auth-Token", TOKEN),
            ("X-Forwarded-For", "10.1.2.3, 10.4.5.6"),
        ],
    )
    .await;
    assert_eq!(
        resp.echoed("x-forwarded-for").as_deref(),
        Some("10.1.2.3, 10.4.5.6, 127.0.0.1")
    );
    // A client cannot claim to have come over TLS.
    let resp = get(
        &gate.url("/f"),
        &[("X-Auth-Token", TOKEN), ("X-Forwarded-Proto", "https")],
    )
    .await;
    assert_eq!(resp.echoed("x-forwarded-proto").as_deref(), Some("http"));
}

#[tokio::test(flavor = "multi_thread")]
async fn preserve_host_false_sends_the_upstream_authority() {
    let up = Upstream::start();
    let port = free_port();
    let toml = config(port, up.port, r#"["x-auth-token"]"#)
        .replace("preserve_host = true", "preserve_host = false");
    let gate = Gate::start(&toml);
    let resp = get(
        &gate.url("/f"),
        &[("X-Auth-Token", TOKEN), ("Host", "api.example.com")],
    )
    .await;
    assert_eq!(
        resp.echoed("host").as_deref(),
        Some(format!("127.0.0.1:{}", up.port).as_str())
    );
    assert_eq!(
        resp.echoed("x-forwarded-host").as_deref(),
        Some("api.example.com")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_request_headers_are_removed() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["x-auth-token"]"#));
    // Raw bytes so the client library cannot tidy the headers up first.
    let request = format!(
        "POST /hop HTTP/1.1\r\nHost: h\r\nX-Auth-Token: {TOKEN}\r\n\
         Connection: keep-alive, X-Custom-Hop, close\r\nX-Custom-Hop: secret\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Foo\r\n\
         Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         X-End-To-End: kept\r\nContent-Length: 5\r\n\r\nhello"
    );
    let response = raw(port, request.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(
        raw_status(&response),
        Some(200),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let seen = up.last().await;
    for h in [
        "x-custom-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert_eq!(
            seen.header(h),
            None,
            "hop-by-hop header {h} reached the upstream"
        );
    }
    let conn = seen
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(!conn.contains("x-custom-hop"), "connection: {conn}");
    assert_eq!(seen.header("x-end-to-end").as_deref(), Some("kept"));
    assert_eq!(seen.method, "POST");
    drop(gate);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_response_headers_are_removed() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["x-auth-token"]"#));
    let resp = get(&gate.url("/hop-response"), &[("X-Auth-Token", TOKEN)]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-end-to-end").as_deref(), Some("kept"));
    for h in ["x-resp-hop", "keep-alive", "proxy-connection"] {
        assert_eq!(
            resp.header(h),
            None,
            "hop-by-hop response header {h} reached the client"
        );
    }
    let conn = resp.header("connection").unwrap_or_default();
    assert!(!conn.contains("x-resp-hop"), "connection: {conn}");
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_and_bodies_pass_through() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["x-auth-token"]"#));
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let body = format!("{{\"method\":\"{method}\"}}");
        let resp = send(build(
            method,
            &gate.url("/m"),
            &[
                ("X-Auth-Token", TOKEN),
                ("Content-Type", "application/json"),
            ],
            full(body.clone()),
        ))
        .await;
        assert_eq!(resp.status, 200);
        let json = resp.json();
        assert_eq!(json["method"], method);
        assert_eq!(json["body_len"], body.len());
        assert_eq!(json["body_sha256"], sha256_hex(&body));
        assert_eq!(
            resp.echoed("content-type").as_deref(),
            Some("application/json")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_credentials_in_one_source_conflict_unless_equal() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(
        port,
        up.port,
        r#"["bearer", "x-auth-token", "query:api_key", "cookie:session"]"#,
    ));
    // The same header twice with different values.
    get(
        &gate.url("/r"),
        &[("X-Auth-Token", TOKEN), ("X-Auth-Token", OTHER)],
    )
    .await
    .assert_error(400, "Conflicting credentials");
    let (a, b) = (format!("Bearer {TOKEN}"), format!("Bearer {OTHER}"));
    get(
        &gate.url("/r"),
        &[("Authorization", &a), ("Authorization", &b)],
    )
    .await
    .assert_error(400, "Conflicting credentials");
    // The same query parameter twice.
    get(
        &gate.url(&format!("/r?api_key={TOKEN}&api_key={OTHER}")),
        &[],
    )
    .await
    .assert_error(400, "Conflicting credentials");
    // The same cookie twice (in one header, and split over two Cookie headers as HTTP/2 does).
    let both = format!("session={TOKEN}; session={OTHER}");
    get(&gate.url("/r"), &[("Cookie", &both)])
        .await
        .assert_error(400, "Conflicting credentials");
    let (c1, c2) = (format!("session={TOKEN}"), format!("session={OTHER}"));
    get(&gate.url("/r"), &[("Cookie", &c1), ("Cookie", &c2)])
        .await
        .assert_error(400, "Conflicting credentials");
    assert_eq!(up.requests(), 0);
    // Repeated but equal: one credential.
    let resp = get(
        &gate.url("/r"),
        &[("X-Auth-Token", TOKEN), ("X-Auth-Token", TOKEN)],
    )
    .await;
    assert_rewritten(&resp, TOKEN, "alice", "ops");
}

#[tokio::test(flavor = "multi_thread")]
async fn x_forwarded_for_keeps_every_incoming_line() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&config(port, up.port, r#"["x-auth-token"]"#));
    // Two X-Forwarded-For lines are one list (RFC 9110 §5.3); the client's address is appended.
    let resp = get(
        &gate.url("/xff"),
        &[
            ("X-Auth-Token", TOKEN),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    // Several lines are equivalent to one comma-joined line.
    let xff = up
        .last()
        .await
        .header("x-forwarded-for")
        .unwrap_or_default();
    assert_eq!(xff.replace(" | ", ", "), "10.0.0.1, 10.0.0.2, 127.0.0.1");
}

/// A percent-decoded query credential that no header could carry (a control character, a
/// non-ASCII byte) is an invalid credential (401), never "backend unavailable" (503) because
/// it cannot be presented to an introspection endpoint; the endpoint is not asked.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_credential_a_header_cannot_carry_is_invalid_not_unavailable() {
    let up = Upstream::start();
    let port = free_port();
    let gate = Gate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[credentials]\nsources = [\"query:api_key\"]\n{}\n{}",
        introspect_validator(up.port, "2s"),
        catch_all_route(up.port, "")
    ));
    for bad in [
        "legacy-secret-alice%0A",
        "legacy-secret-%00alice",
        "legacy-secret-al%C3%A9",
    ] {
        get(&gate.url(&format!("/x?api_key={bad}")), &[])
            .await
            .assert_error(401, "Invalid credentials");
    }
    assert_eq!(
        up.whoami_calls(),
        0,
        "the introspection endpoint was not asked"
    );
    let ok = get(&gate.url("/x?api_key=legacy-secret-alice"), &[]).await;
    assert_eq!(ok.status, 200);
}
