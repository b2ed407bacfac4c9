//! `[[validator]] type = "jwt"`: JWTs an outside identity provider signed, checked against a
//! JWKS served by a real HTTP server in the test (or a PEM public key, or an HMAC secret).
//! The tokens are signed here with ring and keys made by rcgen and openssl, not by the code
//! under test.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::jwk::b64url as b64;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use serde_json::{json, Value};

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "legacy-api";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// Keys and signing

/// A signing key of the identity provider.
enum Key {
    Rsa(sig::RsaKeyPair, Value),
    Ec(sig::EcdsaKeyPair),
    Ed(sig::Ed25519KeyPair),
    Hmac(Vec<u8>),
}

impl Key {
    /// A 2048-bit RSA key made by openssl, with its public PEM.
    fn rsa(dir: &std::path::Path, name: &str) -> (Key, String) {
        let key = jwk::RsaKey::generate(dir, name);
        (Key::Rsa(key.pair, key.jwk), key.public_pem)
    }

    fn p256() -> Key {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Key::Ec(
            sig::EcdsaKeyPair::from_pkcs8(
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                &k.serialize_der(),
                &SystemRandom::new(),
            )
            .unwrap(),
        )
    }

    fn ed25519() -> Key {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Key::Ed(sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&k.serialize_der()).unwrap())
    }

    /// The public JWK, with `kid` (and `alg` when given).
    fn jwk(&self, kid: &str) -> Value {
        let mut jwk = match self {
            Key::Rsa(_, jwk) => jwk.clone(),
            Key::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            Key::Ed(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
            Key::Hmac(_) => panic!("no public JWK for a secret"),
        };
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// A compact JWT with header `alg` (and `kid`), signed with this key by `alg`'s rule.
    fn sign(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let rng = SystemRandom::new();
        let signature = match (self, alg) {
            (Key::Rsa(pair, _), "RS256" | "PS256") => {
                let padding: &dyn sig::RsaEncoding = if alg == "RS256" {
                    &sig::RSA_PKCS1_SHA256
                } else {
                    &sig::RSA_PSS_SHA256
                };
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, input.as_bytes(), &mut out)
                    .unwrap();
                out
            }
            (Key::Ec(pair), "ES256") => {
                pair.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec()
            }
            (Key::Ed(pair), "EdDSA") => pair.sign(input.as_bytes()).as_ref().to_vec(),
            (Key::Hmac(secret), "HS256") => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
            (Key::Hmac(secret), "HS384") => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA384, secret);
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
            (_, "none") => Vec::new(),
            _ => panic!("cannot sign {alg} with this key"),
        };
        format!("{input}.{}", b64(signature))
    }
}

/// Good claims for `sub`, valid for an hour; `jti` makes each token distinct.
fn claims(sub: &str) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now(),
        "exp": now() + 3600,
        "jti": format!("t{}", N.fetch_add(1, Ordering::SeqCst)),
    })
}

// ---------------------------------------------------------------------------------------------
// The identity provider's JWKS endpoint

struct Idp {
    port: u16,
    jwks: Arc<Mutex<Value>>,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
}

impl Idp {
    async fn start(keys: Vec<Value>) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let idp = Idp {
            port,
            jwks: Arc::new(Mutex::new(json!({ "keys": keys }))),
            status: Arc::new(AtomicU16::new(200)),
            hits: Arc::new(AtomicUsize::new(0)),
        };
        let (jwks, status, hits) = (idp.jwks.clone(), idp.status.clone(), idp.hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (jwks, status, hits) = (jwks.clone(), status.clone(), hits.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (jwks, status, hits) = (jwks.clone(), status.clone(), hits.clone());
                        async move {
                            assert_eq!(req.uri().path(), "/.well-known/jwks.json");
                            hits.fetch_add(1, Ordering::SeqCst);
                            let body = jwks.lock().unwrap().to_string();
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status.load(Ordering::SeqCst))
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        idp
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn publish(&self, keys: Vec<Value>) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }
}

// ---------------------------------------------------------------------------------------------
// The gate

fn config(port: u16, admin: u16, up: u16, validator: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin}"

[cache]
negative_ttl = "1s"

[[validator]]
type = "jwt"
{validator}

{static_validator}

{route}"#,
        static_validator = static_validator(&[("plain-static-token", "carol", "ops")]),
        route = catch_all_route(up, ""),
    )
}

fn jwks_validator(idp: &Idp) -> String {
    format!(
        "issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_url = \"{}\"\n",
        idp.url()
    )
}

async fn bearer(gate: &Gate, token: &str) -> Resp {
    get(
        &gate.url("/api/data"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_tokens_are_accepted_in_every_dialect_and_keys_fetched_once() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, _) = Key::rsa(dir.path(), "rsa");
    let (ec, ed) = (Key::p256(), Key::ed25519());
    let idp = Idp::start(vec![rsa.jwk("rsa-1"), ec.jwk("ec-1"), ed.jwk("ed-1")]).await;
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = Gate::start(&config(port, admin, up.port, &jwks_validator(&idp)));
    assert_eq!(idp.hits(), 0, "the JWKS is fetched when first needed");

    let token = rsa.sign("RS256", Some("rsa-1"), &claims("alice"));
    for (header, prefix) in DIALECTS {
        let value = format!("{prefix}{token}");
        let resp = get(&gate.url("/api/data"), &[(header, &value)]).await;
        assert_eq!(resp.status, 200, "{header}: {:?}", resp.body);
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("alice"));
        assert_eq!(resp.echoed("x-auth-account").as_deref(), Some("alice"));
        assert_eq!(resp.echoed("auth-token").as_deref(), Some(token.as_str()));
        assert_eq!(resp.echoed("authorization"), None, "{header}");
    }
    // Other algorithms and keys of the same set, with no further fetch.
    for (key, alg, kid, who) in [
        (&rsa, "PS256", "rsa-1", "bob"),
        (&ec, "ES256", "ec-1", "carol"),
        (&ed, "EdDSA", "ed-1", "dave"),
    ] {
        let resp = bearer(&gate, &key.sign(alg, Some(kid), &claims(who))).await;
        assert_eq!(resp.status, 200, "{alg}: {:?}", resp.body);
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some(who), "{alg}");
    }
    // A token without kid is checked against every key of its algorithm.
    let resp = bearer(&gate, &ec.sign("ES256", None, &claims("erin"))).await;
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("erin"));
    assert_eq!(idp.hits(), 1, "one JWKS fetch for all of these");

    // A credential that is not a JWT goes to the next validator, without a JWKS fetch.
    let resp = bearer(&gate, "plain-static-token").await;
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("carol"));
    assert_eq!(idp.hits(), 1);
    // One validation per distinct JWT (5); the repeats of the first were cache hits.
    assert_eq!(auth_total(admin, "allowed", "jwt").await, 5.0);
    assert!(auth_total(admin, "allowed", "cache").await >= 3.0);
    let log = gate.log();
    assert!(!log.contains(&token), "a JWT was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jwts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, _) = Key::rsa(dir.path(), "rsa");
    let (ec, other_ec) = (Key::p256(), Key::p256());
    let idp = Idp::start(vec![rsa.jwk("rsa-1"), ec.jwk("ec-1")]).await;
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = Gate::start(&config(port, admin, up.port, &jwks_validator(&idp)));

    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims("mallory");
        edit(&mut c);
        c
    };
    let good = ec.sign("ES256", Some("ec-1"), &claims("alice"));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forged_payload = b64(with(&|c| c["sub"] = json!("admin")).to_string());
    // The RSA public key (its JWK modulus) used as an HMAC secret: the classic alg swap.
    let Key::Rsa(_, rsa_jwk) = &rsa else {
        unreachable!()
    };
    let confusion = Key::Hmac(rsa_jwk["n"].as_str().unwrap().as_bytes().to_vec());
    let signed = |edit: &dyn Fn(&mut Value)| ec.sign("ES256", Some("ec-1"), &with(edit));
    let without = |claim: &str| {
        signed(&|c| {
            c.as_object_mut().unwrap().remove(claim);
        })
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired beyond the leeway",
            signed(&|c| c["exp"] = json!(now() - 120)),
        ),
        ("not valid yet", signed(&|c| c["nbf"] = json!(now() + 600))),
        ("no exp", without("exp")),
        (
            "wrong issuer",
            signed(&|c| c["iss"] = json!("https://evil.example")),
        ),
        ("no issuer", without("iss")),
        ("wrong audience", signed(&|c| c["aud"] = json!("other-api"))),
        ("no audience", without("aud")),
        ("no subject", without("sub")),
        ("empty subject", signed(&|c| c["sub"] = json!(""))),
        (
            "tampered payload",
            format!("{head}.{forged_payload}.{signature}"),
        ),
        (
            "another key, same kid",
            other_ec.sign("ES256", Some("ec-1"), &claims("mallory")),
        ),
        (
            "alg none",
            ec.sign("none", Some("ec-1"), &claims("mallory")),
        ),
        (
            "HS256 with the RSA public key as secret",
            confusion.sign("HS256", Some("rsa-1"), &claims("mallory")),
        ),
        (
            "RSA key under an EC kid",
            rsa.sign("RS256", Some("ec-1"), &claims("mallory")),
        ),
        ("truncated signature", good[..good.len() - 5].to_string()),
        (
            "garbage header",
            format!("eyJub3Rqc29u.{}.{}", b64("{}"), b64("x")),
        ),
    ];
    for (case, token) in &cases {
        let resp = bearer(&gate, token).await;
        assert_eq!(resp.status, 401, "{case}: {:?}", resp.body);
        resp.assert_error(401, "Invalid credentials");
    }
    assert_eq!(up.requests(), 0, "nothing reached the upstream");
    // The good token still works, and its audience may be one of a list.
    assert_eq!(bearer(&gate, &good).await.status, 200);
    let listed = ec.sign(
        "ES256",
        Some("ec-1"),
        &with(&|c| c["aud"] = json!(["x", AUDIENCE])),
    );
    assert_eq!(bearer(&gate, &listed).await.status, 200);
    // Within the 60 s clock-skew leeway, a just-expired token is still accepted.
    let skewed = ec.sign(
        "ES256",
        Some("ec-1"),
        &with(&|c| c["exp"] = json!(now() - 20)),
    );
    assert_eq!(bearer(&gate, &skewed).await.status, 200);
    assert!(auth_total(admin, "denied", "jwt").await >= cases.len() as f64);
    // Unknown kids (and kids used with another key type's algorithm) refetch the JWKS at
    // most once per 10 s: all of the above took one fetch.
    for kid in ["unknown-1", "unknown-2"] {
        bearer(&gate, &ec.sign("ES256", Some(kid), &claims("x")))
            .await
            .assert_error(401, "Invalid credentials");
    }
    assert_eq!(idp.hits(), 1, "refetches are rate-limited");
    // Still serving.
    assert_eq!(
        bearer(&gate, &ec.sign("ES256", Some("ec-1"), &claims("z")))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_header_extension_is_refused_before_any_key_fetch() {
    // RFC 7515 §4.1.11: the gate implements no `crit` extension, so a token naming one (or
    // an empty list, which the RFC forbids) is invalid however well it is signed.
    let ec = Key::p256();
    let idp = Idp::start(vec![ec.jwk("ec-1")]).await;
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = Gate::start(&config(port, admin, up.port, &jwks_validator(&idp)));
    let Key::Ec(pair) = &ec else { unreachable!() };
    let signed = |header: Value| {
        let input = format!(
            "{}.{}",
            b64(header.to_string()),
            b64(claims("mallory").to_string())
        );
        let signature = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", b64(signature.as_ref()))
    };
    let header = |crit: Option<Value>| {
        let mut h = json!({"alg": "ES256", "typ": "JWT", "kid": "ec-1"});
        if let Some(crit) = crit {
            h["crit"] = crit;
            h["x-unknown"] = json!(true);
        }
        h
    };
    bearer(&gate, &signed(header(Some(json!(["x-unknown"])))))
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(
        idp.hits(),
        0,
        "no JWKS fetch for a token refused by its header"
    );
    // The same header without crit, same key: accepted.
    let resp = bearer(&gate, &signed(header(None))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(idp.hits(), 1);
    // With the key known now, still refused; so is an empty list.
    for crit in [json!(["x-unknown"]), json!(["exp"]), json!([])] {
        bearer(&gate, &signed(header(Some(crit.clone()))))
            .await
            .assert_error(401, "Invalid credentials");
    }
    assert_eq!(
        up.requests(),
        1,
        "only the token without crit reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_fails_closed_and_rotation_is_picked_up() {
    let (old, new) = (Key::p256(), Key::ed25519());
    let idp = Idp::start(vec![old.jwk("old")]).await;
    idp.status.store(500, Ordering::SeqCst);
    let up = Upstream::start();
    let (port, admin) = (free_port(), free_port());
    let gate = Gate::start(&config(port, admin, up.port, &jwks_validator(&idp)));

    // The identity provider is down and nothing is known: 503, not 401, and not cached.
    let token = old.sign("ES256", Some("old"), &claims("alice"));
    bearer(&gate, &token)
        .await
        .assert_error(503, "Authentication backend unavailable");
    assert_eq!(idp.hits(), 1);
    assert!(auth_total(admin, "error", "jwt").await >= 1.0);
    // Static tokens keep working meanwhile.
    assert_eq!(bearer(&gate, "plain-static-token").await.status, 200);

    // Back up: after the refetch interval the same token is accepted.
    idp.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let resp = bearer(&gate, &token).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(idp.hits(), 2);

    // Key rotation: the provider now signs with a new key and has dropped the old one.
    idp.publish(vec![new.jwk("new")]);
    // Right after a fetch, an unknown kid is refused without another fetch...
    bearer(&gate, &new.sign("EdDSA", Some("new"), &claims("bob")))
        .await
        .assert_error(401, "Invalid credentials");
    assert_eq!(idp.hits(), 2);
    // ...and once the interval has passed, the new kid triggers a refetch and is accepted.
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let resp = bearer(&gate, &new.sign("EdDSA", Some("new"), &claims("bob"))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("bob"));
    assert_eq!(idp.hits(), 3);
    // A new token under the dropped key is refused now.
    bearer(&gate, &old.sign("ES256", Some("old"), &claims("carol")))
        .await
        .assert_error(401, "Invalid credentials");
    // The cached verdict of the token seen before rotation still stands (cache.ttl).
    assert_eq!(bearer(&gate, &token).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_file_and_secret_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, public_pem) = Key::rsa(dir.path(), "rsa");
    let up = Upstream::start();

    // public_key: a PEM file, relative to the config file.
    let gate_dir = tempfile::tempdir().unwrap();
    write_file(gate_dir.path(), "idp.pub.pem", &public_pem);
    let (port, admin) = (free_port(), free_port());
    let toml = config(
        port,
        admin,
        up.port,
        &format!("issuer = \"{ISSUER}\"\npublic_key = \"idp.pub.pem\"\nsubject_claim = \"email\""),
    );
    let gate = Gate::start_in(gate_dir, &toml, &[]);
    let mut c = claims("alice");
    c["email"] = json!("alice@example.org");
    let resp = bearer(&gate, &rsa.sign("RS256", None, &c)).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(
        resp.echoed("x-auth-user").as_deref(),
        Some("alice@example.org")
    );
    // Without the configured subject claim: refused.
    bearer(&gate, &rsa.sign("RS256", None, &claims("alice")))
        .await
        .assert_error(401, "Invalid credentials");
    // Another key type is not accepted by an RSA key.
    bearer(&gate, &Key::p256().sign("ES256", None, &c))
        .await
        .assert_error(401, "Invalid credentials");
    drop(gate);

    // secret: HMAC.
    let secret = "an-hmac-secret-of-at-least-32-bytes!!";
    let (port, admin) = (free_port(), free_port());
    let toml = config(
        port,
        admin,
        up.port,
        "audience = \"legacy-api\"\nsecret = \"${env:IDP_SECRET}\"",
    );
    let gate = Gate::start_with_env(&toml, &[("IDP_SECRET", secret)]);
    let hmac = Key::Hmac(secret.as_bytes().to_vec());
    for alg in ["HS256", "HS384"] {
        let resp = bearer(&gate, &hmac.sign(alg, None, &claims("svc"))).await;
        assert_eq!(resp.status, 200, "{alg}: {:?}", resp.body);
        assert_eq!(resp.echoed("x-auth-user").as_deref(), Some("svc"));
    }
    let wrong = Key::Hmac(b"another-secret-of-at-least-32-bytes!!".to_vec());
    bearer(&gate, &wrong.sign("HS256", None, &claims("svc")))
        .await
        .assert_error(401, "Invalid credentials");
    assert!(!gate.log().contains(secret), "the secret was logged");
}

#[test]
fn bad_jwt_validator_configs_are_errors_with_a_position() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "not-a-key.pem",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    );
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    write_file(dir.path(), "p384.pem", &ed.public_key_pem());
    let cases = [
        (
            "jwks_url = \"http://a/\"\nsecret = \"0123456789012345678901234567890123\"",
            "exactly one of jwks_url, public_key, secret",
        ),
        (
            "audience = \"x\"",
            "exactly one of jwks_url, public_key, secret",
        ),
        (
            "issuer = \"x\"",
            "issuer must be an absolute http:// or https:// URL",
        ),
        (
            "jwks_url = \"http://a/\"\nclient_id = \"x\"",
            "client_id applies to oauth2_introspection validators, not jwt",
        ),
        (
            "jwks_url = \"ftp://idp/keys\"",
            "jwks_url must be an absolute http:// or https:// URL",
        ),
        ("secret = \"short\"", "at least 32 bytes"),
        ("public_key = \"missing.pem\"", "cannot read public_key"),
        (
            "public_key = \"not-a-key.pem\"",
            "public_key must be a PEM public key",
        ),
        (
            "jwks_url = \"http://a/\"\nissuer = \"\"",
            "issuer must not be empty",
        ),
        (
            "jwks_url = \"http://a/\"\nclaims = \"sub\"",
            "unknown field",
        ),
    ];
    for (body, message) in cases {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[validator]]\ntype = \"jwt\"\n{body}\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n"
        );
        assert_check_refuses(dir.path(), &toml, message);
    }
    // Plain http to another host is accepted, with a warning once it runs.
    let up = Upstream::start();
    let gate = Gate::start(&config(
        free_port(),
        free_port(),
        up.port,
        "jwks_url = \"http://idp.invalid/.well-known/jwks.json\"",
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gate
        .log()
        .contains("jwks_url is plain http to another host")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning:\n{}",
            gate.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(gate);
    // A P-384 public key is fine.
    let toml = "[server]\nlisten = \"127.0.0.1:1\"\n[[validator]]\ntype = \"jwt\"\npublic_key = \"p384.pem\"\n[[route]]\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:2\"\n";
    let path = write_file(dir.path(), "good.toml", toml);
    let out = cli(&["check", "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config ok");
}
