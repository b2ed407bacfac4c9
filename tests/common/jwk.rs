//! An identity provider's RSA signing key for the JWT tests: made by openssl, its public JWK
//! written here, tokens signed with ring — none of it by the code under test.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, RsaKeyPair};
use serde_json::{json, Value};

/// Base64url without padding, as JOSE writes it.
pub fn b64url(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A 2048-bit RSA key.
pub struct RsaKey {
    pub pair: RsaKeyPair,
    /// The public JWK (`kty`, `n`, `e`), without `kid`.
    pub jwk: Value,
    /// The public key as PEM (SPKI).
    pub public_pem: String,
}

impl RsaKey {
    /// A new key, made by openssl in `dir` (files `NAME.pem`, `NAME.der`).
    pub fn generate(dir: &Path, name: &str) -> RsaKey {
        let pem = dir.join(format!("{name}.pem"));
        let der = dir.join(format!("{name}.der"));
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let p = pem.to_str().unwrap();
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p,
        ]);
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            p,
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ]);
        let public_pem = String::from_utf8(run(&["pkey", "-in", p, "-pubout"])).unwrap();
        let modulus = String::from_utf8(run(&["rsa", "-in", p, "-noout", "-modulus"])).unwrap();
        let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        RsaKey {
            pair: RsaKeyPair::from_pkcs8(&std::fs::read(der).unwrap()).unwrap(),
            jwk: json!({"kty": "RSA", "n": b64url(n), "e": "AQAB"}),
            public_pem,
        }
    }

    /// The public JWK with `kid`, for signing.
    pub fn jwk_with_kid(&self, kid: &str) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// A compact RS256 JWT of `claims`, its header naming `kid`.
    pub fn rs256(&self, kid: &str, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64url(header.to_string()),
            b64url(claims.to_string())
        );
        let mut out = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &sig::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut out,
            )
            .unwrap();
        format!("{input}.{}", b64url(out))
    }
}
