//! Authorization against the real binary: `[[route.deny]]` / `[[route.allow]]` rules on every
//! key, deny over allow, rules evaluated on cached identities (a reload applies at once),
//! identity facts into headers (`{groups}`, `{scopes}`, `{claim:NAME}`), CORS preflight, and
//! the 403's log line and metric.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::json;

const JWT_SECRET: &str = "a-test-secret-for-hs256-of-32-bytes-or-more";

/// Static tokens: ann (group readers, scope read), olga (group ops, scopes read write), and
/// an account-ed one, dave (account "shared").
fn statics() -> String {
    let token = |token: &str, subject: &str, account: &str, groups: &str, scopes: &str| {
        format!(
            "[[validator.token]]\nsha256 = \"{}\"\nsubject = \"{subject}\"\naccount = \"{account}\"\ngroups = {groups}\nscopes = {scopes}\n",
            sha256_hex(token)
        )
    };
    format!(
        "[[validator]]\ntype = \"static\"\n{}{}{}",
        token("ann-token", "ann", "ann", r#"["readers"]"#, r#"["read"]"#),
        token(
            "olga-token",
            "olga",
            "olga",
            r#"["ops"]"#,
            r#"["read", "write"]"#
        ),
        token("dave-token", "dave", "shared", "[]", "[]"),
    )
}

/// An HS256 JWT of `claims`, signed with [`JWT_SECRET`].
fn jwt(claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64(tag.as_ref()))
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

/// A gate with the static tokens, a JWT validator (HS256, groups in `realm_access.roles`), an
/// admin listener, and `routes`.
fn gate(port: u16, admin: u16, routes: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "memory"

[cache]
ttl = "1h"

{statics}
[[validator]]
type = "jwt"
secret = "{JWT_SECRET}"
groups_claim = "realm_access.roles"

{routes}"#,
        statics = statics(),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The first access line that `wanted` picks, waiting up to 3 s (lines are written within a
/// second).
async fn line_where(g: &Gate, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(line) = g.access_lines().into_iter().find(|l| wanted(l)) {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no such access line in:\n{:?}",
            g.access_lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(url: &str, method: &str, token: Option<&str>) -> u16 {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    send(build(method, url, &headers, full(Bytes::new())))
        .await
        .status
        .as_u16()
}

/// The README's read-only example: GET/HEAD need `read`, anything else `write`; `/admin` only
/// for the `ops` group; a deny for one subject beats every allow.
#[tokio::test(flavor = "multi_thread")]
async fn scopes_methods_groups_paths_and_deny_over_allow() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let routes = format!(
        r#"[[route]]
path_prefix = "/admin"
upstream = "http://127.0.0.1:{up}"
[[route.allow]]
groups = ["ops"]

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[[route.deny]]
subjects = ["mallory"]
[[route.deny]]
accounts = ["shared"]
methods = ["DELETE"]
[[route.allow]]
methods = ["GET", "HEAD"]
scopes = ["read"]
[[route.allow]]
scopes = ["write"]
[[route.allow]]
paths = ["/public"]
"#,
        up = up.port
    );
    let g = Gate::start(&gate(port, admin, &routes));
    let url = |p: &str| g.url(p);
    assert_eq!(status(&url("/files"), "GET", Some("ann-token")).await, 200);
    assert_eq!(status(&url("/files"), "HEAD", Some("ann-token")).await, 200);
    let refused = send(build(
        "POST",
        &url("/files"),
        &[("authorization", &bearer("ann-token"))],
        full(Bytes::new()),
    ))
    .await;
    refused.assert_error(403, "Forbidden");
    assert_eq!(
        status(&url("/files"), "POST", Some("olga-token")).await,
        200
    );
    // Methods compare case-insensitively: a lower-case method is no way around a rule.
    assert_eq!(status(&url("/files"), "post", Some("ann-token")).await, 403);
    // /admin: only the ops group.
    assert_eq!(
        status(&url("/admin/users"), "GET", Some("ann-token")).await,
        403
    );
    assert_eq!(
        status(&url("/admin/users"), "GET", Some("olga-token")).await,
        200
    );
    // A path rule: dave has no scopes, but /public is allowed to any valid credential.
    assert_eq!(
        status(&url("/public/a"), "GET", Some("dave-token")).await,
        200
    );
    assert_eq!(status(&url("/files"), "GET", Some("dave-token")).await, 403);
    // Deny over allow: the shared account may not DELETE, even on /public.
    assert_eq!(
        status(&url("/public/a"), "DELETE", Some("dave-token")).await,
        403
    );
    // A JWT subject denied by name, whatever its scopes.
    let mallory = jwt(json!({"sub": "mallory", "scope": "read write", "exp": exp()}));
    assert_eq!(status(&url("/files"), "GET", Some(&mallory)).await, 403);
    let carol = jwt(json!({"sub": "carol", "scope": "read", "exp": exp()}));
    assert_eq!(status(&url("/files"), "GET", Some(&carol)).await, 200);
    assert_eq!(status(&url("/files"), "PUT", Some(&carol)).await, 403);
    // The log says which rule; the metric counts the 403s.
    line_where(&g, |l| {
        l["status"] == 403 && l["rule"] == "deny[0]" && l["subject"] == "mallory"
    })
    .await;
    line_where(&g, |l| {
        l["status"] == 403 && l["rule"] == "no allow" && l["subject"] == "ann"
    })
    .await;
    let metrics = get(&format!("http://127.0.0.1:{admin}/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains("tokengate_forbidden_total{route=\"/\"} 6"),
        "{}",
        text.lines()
            .filter(|l| l.contains("forbidden"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(text.contains("tokengate_forbidden_total{route=\"/admin\"} 1"));
    // Nothing refused reached the upstream.
    assert!(up.requests() <= 8, "{} upstream requests", up.requests());
}

/// A path rule cannot be walked around with another reading of the path: a deny on /secret
/// holds for `%2f`, case, `;` and trailing-dot forms of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_denied_path_holds_under_every_reading() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let routes = format!(
        r#"[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[[route.deny]]
paths = ["/app/secret"]
"#,
        up = up.port
    );
    let g = Gate::start(&gate(port, admin, &routes));
    assert_eq!(
        status(&g.url("/app/open"), "GET", Some("olga-token")).await,
        200
    );
    for path in [
        "/app/secret",
        "/app/secret/x",
        "/app/SECRET/x",
        "/app/secret;v=1/x",
        "/app/secret./x",
        "/app%2fsecret/x",
        "/app/%73ecret/x",
    ] {
        let s = status(&g.url(path), "GET", Some("olga-token")).await;
        assert!(s == 403 || s == 400, "{path}: {s}");
    }
}

/// `clients` (also on `auth = "none"` routes), `sources` and `claims` (dotted, arrays by
/// containment), with the facts in identity headers; a client's copy of those headers is
/// removed.
#[tokio::test(flavor = "multi_thread")]
async fn clients_sources_and_claims_and_facts_in_headers() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let routes = format!(
        r#"[[route]]
path_prefix = "/open"
upstream = "http://127.0.0.1:{up}"
auth = "none"
[[route.deny]]
clients = ["127.0.0.66/32"]

[[route]]
path_prefix = "/bearer-only"
upstream = "http://127.0.0.1:{up}"
[[route.allow]]
sources = ["bearer"]

[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
[route.identity_headers]
"X-Groups" = "{{groups}}"
"X-Scopes" = "{{scopes}}"
"X-Tenant" = "{{claim:org.tenant}}"
[[route.allow]]
claims = {{ "realm_access.roles" = ["editor", "admin"], "org.tenant" = 7 }}
"#,
        up = up.port
    );
    let g = Gate::start(&gate(port, admin, &routes));
    assert_eq!(
        get_from("127.0.0.65", &g.url("/open/x"), &[]).await.status,
        200
    );
    get_from("127.0.0.66", &g.url("/open/x"), &[])
        .await
        .assert_error(403, "Forbidden");

    let ok = get(
        &g.url("/bearer-only/x"),
        &[("authorization", "Bearer ann-token")],
    )
    .await;
    assert_eq!(ok.status, 200);
    let other = get(&g.url("/bearer-only/x"), &[("x-auth-token", "ann-token")]).await;
    assert_eq!(
        other.status, 403,
        "the x-auth-token dialect is not allowed here"
    );

    let editor = jwt(json!({
        "sub": "eve", "exp": exp(), "scope": "read write",
        "realm_access": {"roles": ["viewer", "editor"]},
        "org": {"tenant": 7},
    }));
    let resp = get(
        &g.url("/x"),
        &[
            ("authorization", &bearer(&editor)),
            ("x-groups", "forged"),
            ("x-tenant", "forged"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("x-groups").as_deref(), Some("viewer,editor"));
    assert_eq!(resp.echoed("x-scopes").as_deref(), Some("read,write"));
    assert_eq!(resp.echoed("x-tenant").as_deref(), Some("7"));
    let other_tenant = jwt(json!({
        "sub": "eve", "exp": exp(),
        "realm_access": {"roles": ["editor"]}, "org": {"tenant": 8},
    }));
    assert_eq!(status(&g.url("/x"), "GET", Some(&other_tenant)).await, 403);
    let viewer = jwt(json!({
        "sub": "vic", "exp": exp(),
        "realm_access": {"roles": ["viewer"]}, "org": {"tenant": 7},
    }));
    assert_eq!(status(&g.url("/x"), "GET", Some(&viewer)).await, 403);
    // A static token without the claims: refused, and its forged headers never arrive.
    let resp = get(
        &g.url("/x"),
        &[("authorization", "Bearer olga-token"), ("x-tenant", "7")],
    )
    .await;
    assert_eq!(resp.status, 403);
}

/// Rules are evaluated on every request against the cached identity: a reload that adds a
/// deny applies at once to a credential that is already cached.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_new_rules_to_cached_credentials() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let route = |rules: &str| {
        format!(
            "[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:{}\"\n{rules}",
            up.port
        )
    };
    let g = Gate::start(&gate(port, admin, &route("")));
    let carol = jwt(json!({"sub": "carol", "exp": exp()}));
    assert_eq!(status(&g.url("/x"), "GET", Some(&carol)).await, 200);
    assert_eq!(
        status(&g.url("/x"), "GET", Some(&carol)).await,
        200,
        "cached"
    );
    std::fs::write(
        &g.config_path,
        gate(
            port,
            admin,
            &route("[[route.deny]]\nsubjects = [\"carol\"]\n"),
        ),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&g.url("/x"), "GET", Some(&carol)).await;
        if s == 403 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {s} after the reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = line_where(&g, |l| l["status"] == 403).await;
    assert_eq!(
        refused["validator"], "cache",
        "the credential was still cached: {refused}"
    );
    assert_eq!(status(&g.url("/x"), "GET", Some("ann-token")).await, 200);
}

/// `preflight = "pass"`: a CORS preflight reaches the upstream without a credential (one it
/// carries is still removed); with a body it is refused; every other request is authenticated.
#[tokio::test(flavor = "multi_thread")]
async fn a_cors_preflight_passes_and_nothing_else_does() {
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let routes = format!(
        r#"[[route]]
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
preflight = "pass"
[[route.allow]]
scopes = ["write"]
"#,
        up = up.port
    );
    let g = Gate::start(&gate(port, admin, &routes));
    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "PUT"),
    ];
    let resp = send(build(
        "OPTIONS",
        &g.url("/files"),
        &preflight,
        full(Bytes::new()),
    ))
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.last().await.method, "OPTIONS");
    // A credential on a preflight is still removed.
    let mut with_token = preflight.to_vec();
    with_token.push(("authorization", "Bearer ann-token"));
    let resp = send(build(
        "OPTIONS",
        &g.url("/files"),
        &with_token,
        full(Bytes::new()),
    ))
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed("authorization"), None);
    // A preflight has no body.
    let resp = send(build("OPTIONS", &g.url("/files"), &preflight, full("x"))).await;
    resp.assert_error(400, "Bad request");
    // OPTIONS without the preflight headers, and everything else: authenticated as usual.
    assert_eq!(status(&g.url("/files"), "OPTIONS", None).await, 401);
    assert_eq!(status(&g.url("/files"), "PUT", None).await, 401);
    assert_eq!(
        status(&g.url("/files"), "PUT", Some("ann-token")).await,
        403
    );
    assert_eq!(
        status(&g.url("/files"), "PUT", Some("olga-token")).await,
        200
    );
}

/// `check` refuses rules that cannot work, at their place.
#[test]
fn check_refuses_rules_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "auth = \"none\"\n[[route.allow]]\ngroups = [\"ops\"]\n",
            "auth = \"none\"",
        ),
        (
            "[[route.deny]]\nmethods = [\"GE T\"]\n",
            "not an HTTP method",
        ),
        ("[[route.deny]]\nverbs = [\"GET\"]\n", "verbs"),
        ("[[route.allow]]\nscopes = []\n", "matches nothing"),
        ("[[route.allow]]\nclients = [\"10.0.0.0/33\"]\n", "clients"),
        (
            "[[route.allow]]\nsources = [\"pigeon\"]\n",
            "unknown credential source",
        ),
        (
            "[[route.allow]]\npaths = [\"/a/../b\"]\n",
            "normalised path",
        ),
        (
            "[[route.allow]]\nclaims = { \"a..b\" = \"x\" }\n",
            "claim path",
        ),
        (
            "[[route.allow]]\nclaims = { \"a\" = { b = 1 } }\n",
            "a claim's value",
        ),
        ("preflight = \"sometimes\"\n", "preflight must be"),
    ];
    for (extra, says) in cases {
        let toml =
            format!("[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n{extra}");
        assert_check_refuses(dir.path(), &toml, says);
    }
}
