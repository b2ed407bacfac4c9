//! Writes the seed corpora under `fuzz/seeds/<target>/` and the `x509` target's root CA
//! (`fuzz/seeds/x509-root-ca.der`, compiled into that target): real certificate chains made
//! with rcgen (the grid PKI of the integration tests, `tests/common/pki.rs`), JWTs signed with
//! the fixed keys of `fuzz_targets/keys.rs`, and a few realistic paths, tokens and requests.
//!
//! `cd fuzz && cargo run --example seeds` (the root CA is made afresh each time: rebuild the
//! `x509` target after running it, and keep its seeds with it).

#[allow(dead_code)]
#[path = "../../tests/common/pki.rs"]
mod pki;

#[path = "../fuzz_targets/keys.rs"]
mod keys;

use std::path::{Path, PathBuf};

use base64::Engine;
use pki::*;
use tokengate::jwt::{Claims, JwtKey};

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    if std::env::args().any(|a| a == "--check") {
        check(&seeds);
        return;
    }
    x509(&seeds);
    jwt(&seeds.join("jwt"));
    paths(&seeds.join("path"));
    tokens(&seeds.join("token"));
    credentials(&seeds.join("credential"));
    println!("seeds written under {}", seeds.display());
}

fn dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).expect("seed directory");
    path.to_path_buf()
}

fn write(dir: &Path, name: &str, data: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), data).expect("seed file");
}

/// A chain in the `x509` target's input format: count (bit 7: RFC 2253), then 2-byte big-endian
/// length + DER for each certificate.
fn chain_input(certs: &[&Cert], rfc2253: bool) -> Vec<u8> {
    let mut out = vec![certs.len() as u8 | if rfc2253 { 0x80 } else { 0 }];
    for cert in certs {
        let der = cert.der.as_ref();
        out.extend_from_slice(&u16::try_from(der.len()).unwrap().to_be_bytes());
        out.extend_from_slice(der);
    }
    out
}

fn x509(seeds: &Path) {
    let root = ca("Example Root CA", None);
    let intermediate = ca("Example Users CA", Some(&root));
    let alice = user(
        Dn::of(&[
            ("C", "CH"),
            ("O", "Example"),
            ("OU", "Users"),
            ("CN", "Alice Smith"),
        ]),
        &intermediate,
    );
    let odd = user(
        Dn::default()
            .rdn("DC", "org")
            .rdn("O", r#"Example, "Inc." <a;b>\"#)
            .typed(
                "L",
                BMP,
                "Zürich".encode_utf16().flat_map(u16::to_be_bytes).collect(),
            )
            .typed("CN", 0x14, vec![b'M', 0xfc, b'n'])
            .typed("2.5.4.45", 0x02, vec![5])
            .multi(&[("UID", "asmith"), ("CN", "Alice Smith")])
            .rdn("emailAddress", "alice@example.org"),
        &intermediate,
    );
    let rfc = issue(&rfc3820_spec(&alice), Some(&alice), None);
    let mut first = rfc3820_spec(&alice);
    first.proxy_cert_info = Some((proxy_cert_info(Some(1), INHERIT_ALL), true));
    let first = issue(&first, Some(&alice), None);
    let second = issue(&rfc3820_spec(&first), Some(&first), None);
    let mut limited = rfc3820_spec(&alice);
    limited.proxy_cert_info = Some((proxy_cert_info(None, GLOBUS_LIMITED), true));
    let limited = issue(&limited, Some(&alice), None);
    let mut independent = rfc3820_spec(&alice);
    independent.proxy_cert_info = Some((proxy_cert_info(None, INDEPENDENT), true));
    let independent = issue(&independent, Some(&alice), None);
    let legacy = issue(&legacy_spec(&alice, false), Some(&alice), None);
    let legacy2 = issue(&legacy_spec(&legacy, false), Some(&legacy), None);
    let legacy_limited = issue(&legacy_spec(&alice, true), Some(&alice), None);
    let stranger = rcgen::KeyPair::generate().unwrap();
    let forged = issue(&rfc3820_spec(&alice), Some(&alice), Some(&stranger));
    let odd_proxy = issue(&rfc3820_spec(&odd), Some(&odd), None);

    write(seeds, "x509-root-ca.der", root.der.as_ref());
    let out = dir(&seeds.join("x509"));
    let i = &intermediate;
    for (name, certs) in [
        ("user", vec![&alice, i]),
        ("user-alone", vec![&alice]),
        ("odd-names", vec![&odd, i]),
        ("rfc3820", vec![&rfc, &alice, i]),
        ("rfc3820-of-rfc3820", vec![&second, &first, &alice, i]),
        ("rfc3820-limited", vec![&limited, &alice, i]),
        ("rfc3820-independent", vec![&independent, &alice, i]),
        ("legacy", vec![&legacy, &alice, i]),
        ("legacy-of-legacy", vec![&legacy2, &legacy, &alice, i]),
        ("legacy-limited", vec![&legacy_limited, &alice, i]),
        ("mixed", vec![&legacy, &rfc, &alice, i]),
        ("forged", vec![&forged, &alice, i]),
        ("odd-proxy", vec![&odd_proxy, &odd, i]),
        ("proxy-alone", vec![&rfc]),
        ("ca-as-leaf", vec![i, &root]),
    ] {
        write(&out, name, chain_input(&certs, false));
        write(&out, &format!("{name}-rfc2253"), chain_input(&certs, true));
    }
}

fn jwt(out: &Path) {
    let out = dir(out);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = |exp| Claims {
        iss: keys::ISSUER.to_string(),
        sub: "alice".to_string(),
        account: "ops".to_string(),
        jti: "0123456789abcdef".to_string(),
        iat: 1_700_000_000,
        exp,
    };
    for (name, pem) in [
        ("hs256", keys::HMAC_SECRET),
        ("eddsa", keys::ED25519_PRIVATE),
    ] {
        let key = JwtKey::from_config(pem).unwrap();
        let kid = key.kid().to_string();
        let alg = format!("{:?}", key.algorithm());
        let good = key.sign(&claims(Some(4_000_000_000))).unwrap();
        write(&out, &format!("{name}-good"), &good);
        write(
            &out,
            &format!("{name}-no-exp"),
            key.sign(&claims(None)).unwrap(),
        );
        write(
            &out,
            &format!("{name}-expired"),
            key.sign(&claims(Some(1_000))).unwrap(),
        );
        let (_, rest) = good.split_once('.').unwrap();
        let (payload, signature) = rest.split_once('.').unwrap();
        for (variant, header) in [
            (
                "crit",
                format!(r#"{{"alg":"{alg}","kid":"{kid}","crit":["x-unknown"]}}"#),
            ),
            (
                "crit-empty",
                format!(r#"{{"alg":"{alg}","kid":"{kid}","crit":[]}}"#),
            ),
            (
                "crit-null",
                format!(r#"{{"alg":"{alg}","kid":"{kid}","crit":null}}"#),
            ),
            ("alg-none", format!(r#"{{"alg":"none","kid":"{kid}"}}"#)),
            ("alg-swap", format!(r#"{{"alg":"HS512","kid":"{kid}"}}"#)),
            ("no-kid", format!(r#"{{"alg":"{alg}"}}"#)),
        ] {
            let token = format!("{}.{payload}.{signature}", b64.encode(header));
            write(&out, &format!("{name}-{variant}"), token);
        }
    }
    // An HS256 token with crit and a good signature (by hand: JwtKey never writes crit).
    let header = b64.encode(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#);
    let payload = b64.encode(serde_json_claims());
    let message = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, keys::HMAC_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, message.as_bytes());
    write(
        &out,
        "hs256-crit-signed",
        format!("{message}.{}", b64.encode(tag)),
    );
    write(&out, "garbage", "eyJub3Rqc29u.e30.x");
    write(&out, "not-a-jwt", "tg_abc.def");
}

fn serde_json_claims() -> String {
    format!(
        r#"{{"iss":"{}","sub":"alice","account":"ops","jti":"x","iat":1700000000,"exp":4000000000}}"#,
        keys::ISSUER
    )
}

fn paths(out: &Path) {
    let out = dir(out);
    for (i, path) in [
        "/api/v1/data",
        "/api//x/./y/../z/",
        "/a/%2e%2e/b",
        "/a/..;x/b",
        "/did/scope%2Fname",
        "/x/%41%7e%5F",
        "/a/b%2f..%2fc",
        "/a%3b/..%3bx",
        "/caf%C3%A9/ü/",
        "/.well-known/x",
        "/a/b/../../..",
        "relative/path",
    ]
    .iter()
    .enumerate()
    {
        write(&out, &format!("p{i}"), path);
    }
}

fn tokens(out: &Path) {
    let out = dir(out);
    let (token, _) = tokengate::token::generate().unwrap();
    write(&out, "generated", &token);
    write(
        &out,
        "crash-non-ascii",
        format!("tg_{}éBBBBB", "A".repeat(42)),
    );
    write(&out, "short", "tg_short");
    write(&out, "jwt-like", "eyJhbGciOiJIUzI1NiJ9.e30.x");
    // The differential input: 43 body bytes, a position, a replacement character.
    let mut diff: Vec<u8> = (0..43u8).collect();
    diff.push(10);
    diff.extend_from_slice("é".as_bytes());
    write(&out, "differential", diff);
}

fn credentials(out: &Path) {
    let out = dir(out);
    for (name, input) in [
        ("bearer", "bearer\n\nauthorization: Bearer tg_abc\n"),
        (
            "all",
            "bearer,x-auth-token,auth-token,rucio,header:X-Api-Key,query:access_token,cookie:session\n\
             a=1&access_token=t1\nx-auth-token: t1\ncookie: a=b; session=t1\n",
        ),
        ("query-crash", "query:access_token\naccess_token=tg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%C3%A9BBBBB\n"),
        ("encoded-names", "query:access_token,cookie:session\naccess%5Ftoken=t%31&a+b=c\ncookie: s%65ssion=\"t1\"\n"),
        ("conflict", "\n\nx-auth-token: t1\nauth-token: t2\n"),
        ("rucio", "rucio\n\nx-rucio-auth-token: root-abc-123\n"),
        ("bad-sources", "header:,header:bad header,nonsense,query:,cookie:\n\n"),
    ] {
        write(&out, name, input);
    }
    let mut obs_text = b"x-auth-token\n\nx-auth-token: caf".to_vec();
    obs_text.push(0xe9);
    write(&out, "obs-text", obs_text);
}

/// `--check`: the seed corpora as written do what they are for (the good chains verify
/// against the written root at the `x509` target's clock, the good JWTs verify), so the
/// fuzzer starts past the signature checks.
fn check(seeds: &Path) {
    use rustls::server::danger::ClientCertVerifier;
    use rustls_pki_types::{CertificateDer, UnixTime};
    let root = std::fs::read(seeds.join("x509-root-ca.der")).expect("root CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(root)).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        tokengate::x509::ProxyChainVerifier::new(std::sync::Arc::new(roots), provider, true)
            .unwrap();
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(keys::X509_NOW_SECS));
    for (name, good) in [
        ("user", true),
        ("odd-names", true),
        ("rfc3820", true),
        ("rfc3820-of-rfc3820", true),
        ("rfc3820-limited", true),
        ("legacy", true),
        ("legacy-of-legacy", true),
        ("legacy-limited", true),
        ("odd-proxy", true),
        ("rfc3820-independent", false),
        ("mixed", false),
        ("forged", false),
        ("proxy-alone", false),
        ("ca-as-leaf", false),
        ("user-alone", false),
    ] {
        let data = std::fs::read(seeds.join("x509").join(name)).unwrap();
        let mut rest = &data[1..];
        let mut chain = Vec::new();
        for _ in 0..data[0] & 7 {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            chain.push(CertificateDer::from(&rest[2..2 + len]));
            rest = &rest[2 + len..];
        }
        let verified = verifier.verify_client_cert(&chain[0], &chain[1..], now);
        assert_eq!(verified.is_ok(), good, "x509 seed {name}: {verified:?}");
        let dn = tokengate::x509::end_entity_dn(&chain, tokengate::x509::DnFormat::Slash);
        println!("x509 {name}: verified {}, dn {dn:?}", verified.is_ok());
    }
    let gate = [
        JwtKey::from_config(keys::HMAC_SECRET).unwrap(),
        JwtKey::from_config(keys::ED25519_PRIVATE).unwrap(),
    ];
    for name in ["hs256-good", "hs256-no-exp", "eddsa-good", "eddsa-no-exp"] {
        let token = std::fs::read_to_string(seeds.join("jwt").join(name)).unwrap();
        assert!(
            gate.iter().any(|k| k.verify(&token).is_some()),
            "jwt seed {name}"
        );
        println!("jwt {name}: verifies");
    }
}
