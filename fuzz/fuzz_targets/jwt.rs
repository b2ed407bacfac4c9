//! JWTs: the gate's own JWT API keys (`jwt::JwtKey::recognises` / `verify`, HS256 and EdDSA
//! keys made once) and the `jwt` validator (`jwt_validator::JwtValidator::validate` with a
//! fixed public key, so no network), on any string. Nothing may panic; a token that verifies
//! names no critical header extension and carries the gate's issuer; seed tokens signed with
//! the fixed keys (`examples/seeds.rs`) take the fuzzer past the signature check.

#![no_main]

#[path = "keys.rs"]
mod keys;

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokengate::config::{JwtKeySource, JwtValidatorConfig};
use tokengate::jwt::{names_critical_extensions, JwtKey, ISSUER};
use tokengate::jwt_validator::{looks_like_jwt, JwtValidator};

struct Keys {
    gate: [JwtKey; 2],
    validator: JwtValidator,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let config = JwtValidatorConfig {
            issuer: Some(keys::ISSUER.to_string()),
            audience: None,
            keys: JwtKeySource::PublicKey {
                path: PathBuf::from("fuzz.pub.pem"),
                pem: keys::ED25519_PUBLIC.to_string(),
            },
            subject_claim: "sub".to_string(),
            timeout: Duration::from_secs(1),
        };
        let client = tokengate::upstream::client(None).expect("HTTP client");
        Keys {
            gate: [
                JwtKey::from_config(keys::HMAC_SECRET).expect("HS256 key"),
                JwtKey::from_config(keys::ED25519_PRIVATE).expect("EdDSA key"),
            ],
            validator: JwtValidator::new(&config, &client),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let keys = keys();
    let critical = names_critical_extensions(token);
    for key in &keys.gate {
        let _ = key.recognises(token);
        if let Some(claims) = key.verify(token) {
            assert!(!critical, "a token with crit verified");
            assert_eq!(claims.iss, ISSUER);
        }
    }
    // With fixed keys the validator never waits: one poll decides.
    let validate = std::pin::pin!(keys.validator.validate(token));
    match validate.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(Some(_))) => {
            assert!(
                looks_like_jwt(token) && !critical,
                "a token with crit validated"
            );
        }
        Poll::Ready(Ok(None)) => {}
        Poll::Ready(Err(e)) => panic!("fixed keys cannot be unavailable: {}", e.0),
        Poll::Pending => panic!("validation with fixed keys is pending"),
    }
});
