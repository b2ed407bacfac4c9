//! JWT API keys (`[tokens] format = "jwt"`, Cloud SOAR style `Authorization: Bearer <JWT>`).
//!
//! The `jsonwebtoken` crate encodes, decodes and checks the claims; the signatures are made
//! and checked by `ring`, the crypto library rustls already uses here, through a small
//! [`CryptoProvider`] (so no second crypto library is linked). Algorithms: `EdDSA` (Ed25519),
//! `ES256` (P-256), chosen by the PKCS#8 PEM key in `jwt_key`, or `HS256` when `jwt_key` is a
//! plain secret of at least 32 bytes.
//!
//! A key is recognised as ours by its header's `kid` (a fingerprint of the signing key); its
//! signature and expiry are checked before the store is asked, and the store is then asked
//! whether its `jti` (the token id) was revoked, by the SHA-256 of the whole JWT, as for every
//! issued token.

use std::collections::HashSet;
use std::fmt;
use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{self as sig, KeyPair};
use serde::{Deserialize, Serialize};
use signature::{Error as SigError, Signer, Verifier};

/// The `iss` of every JWT API key.
pub const ISSUER: &str = "tokengate";

/// The claims of a JWT API key.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// `tokengate`.
    pub iss: String,
    /// The owner.
    pub sub: String,
    /// The account it acts as.
    pub account: String,
    /// The token id: revoking it revokes the key.
    pub jti: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch; absent = until revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// The signing key of JWT API keys, and what checks them.
pub struct JwtKey {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    kid: String,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("JwtKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// Reads `jwt_key`: a PKCS#8 PEM Ed25519 or P-256 private key, or an HMAC secret of at
    /// least 32 bytes.
    pub fn from_config(text: &str) -> Result<JwtKey, String> {
        install_provider();
        let trimmed = text.trim();
        let (algorithm, encoding, decoding, public) = if trimmed.starts_with("-----BEGIN") {
            let pem = trimmed.as_bytes();
            if let Ok(encoding) = EncodingKey::from_ed_pem(pem) {
                let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(encoding.as_bytes())
                    .map_err(|e| format!("jwt_key is not a usable Ed25519 key: {e}"))?;
                let public = pair.public_key().as_ref().to_vec();
                let decoding = DecodingKey::from_ed_der(&public);
                (Algorithm::EdDSA, encoding, decoding, public)
            } else if let Ok(encoding) = EncodingKey::from_ec_pem(pem) {
                let pair = sig::EcdsaKeyPair::from_pkcs8(
                    &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    encoding.as_bytes(),
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|e| format!("jwt_key is not a P-256 (ES256) PKCS#8 key: {e}"))?;
                let public = pair.public_key().as_ref().to_vec();
                let decoding = DecodingKey::from_ec_der(&public);
                (Algorithm::ES256, encoding, decoding, public)
            } else {
                return Err(
                    "jwt_key must be an Ed25519 or P-256 private key in PKCS#8 PEM \
                     (openssl genpkey -algorithm ed25519), or an HMAC secret"
                        .to_string(),
                );
            }
        } else {
            if trimmed.len() < 32 {
                return Err("an HS256 jwt_key secret needs at least 32 bytes".to_string());
            }
            let secret = trimmed.as_bytes();
            (
                Algorithm::HS256,
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
                secret.to_vec(),
            )
        };
        // The kid names the key without revealing it: a digest of the public key (or of the
        // secret, domain-separated, for HS256).
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tokengate-jwt-kid\0");
        ctx.update(&public);
        let kid = format!("tg-{}", hex::encode(&ctx.finish().as_ref()[..6]));
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims = HashSet::from(["jti".to_string()]);
        validation.validate_exp = true;
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        Ok(JwtKey {
            algorithm,
            encoding,
            decoding,
            validation,
            kid,
        })
    }

    /// The algorithm (`EdDSA`, `ES256` or `HS256`).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The key's fingerprint, carried as the JWT header's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` into a compact JWT.
    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| format!("cannot sign the JWT: {e}"))
    }

    /// Whether `token` claims to be one of ours: a compact JWT whose header names our key.
    /// Cheap enough for a cache miss; does not check the signature.
    pub fn recognises(&self, token: &str) -> bool {
        token.starts_with("eyJ")
            && token.bytes().filter(|b| *b == b'.').count() == 2
            && jsonwebtoken::decode_header(token)
                .is_ok_and(|h| h.kid.as_deref() == Some(self.kid.as_str()))
    }

    /// The claims of `token` when its signature, algorithm, issuer and expiry are good, and its
    /// header names no critical extension (see [`names_critical_extensions`]).
    pub fn verify(&self, token: &str) -> Option<Claims> {
        if names_critical_extensions(token) {
            return None;
        }
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// Whether a compact JWS's protected header has a `crit` member (RFC 7515 §4.1.11), or cannot
/// be read as a JSON object at all: such a token must be refused.
///
/// `crit` lists header extensions the recipient must understand, and tokengate implements
/// none; an empty list is forbidden by the RFC, and a value that is not a list is malformed,
/// so any `crit` at all means "invalid". `jsonwebtoken` parses `crit` but does not enforce it,
/// and its `Option<Vec<String>>` reads `"crit":null` as absent, so the header is read here as
/// a plain JSON object (a duplicate member, which JSON allows, counts as present). The header
/// is found as `jsonwebtoken` finds it: the part before the second-to-last `.`.
pub fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine;
    let Some((header, _)) = token
        .rsplit_once('.')
        .and_then(|(message, _)| message.rsplit_once('.'))
    else {
        return true;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return true;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&json)
        .map_or(true, |header| header.contains_key("crit"))
}

// ---------------------------------------------------------------------------------------------
// The ring-backed crypto provider for jsonwebtoken.

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes the ring provider jsonwebtoken's default, once per process.
pub(crate) fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only if another provider was installed first; then that one is used.
        let _ = PROVIDER.install_default();
    });
}

fn new_signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    let signer: Box<dyn JwtSigner> = match algorithm {
        Algorithm::HS256 => Box::new(Hs256(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.as_bytes(),
        ))),
        Algorithm::ES256 => Box::new(Es256Signer(
            sig::EcdsaKeyPair::from_pkcs8(
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                key.as_bytes(),
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        )),
        Algorithm::EdDSA => Box::new(Ed25519Signer(
            sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.as_bytes())
                .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        )),
        _ => return Err(JwtError::from(ErrorKind::InvalidAlgorithm)),
    };
    Ok(signer)
}

fn new_verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    use jsonwebtoken::DecodingKeyKind;
    let hmac = |alg| -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
        Ok(Box::new(Hmac(
            *algorithm,
            ring::hmac::Key::new(alg, key.try_get_as_bytes()?),
        )))
    };
    let ring: &'static dyn sig::VerificationAlgorithm = match algorithm {
        Algorithm::HS256 => return hmac(ring::hmac::HMAC_SHA256),
        Algorithm::HS384 => return hmac(ring::hmac::HMAC_SHA384),
        Algorithm::HS512 => return hmac(ring::hmac::HMAC_SHA512),
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        rsa => rsa_params(*rsa).ok_or(ErrorKind::InvalidAlgorithm)?,
    };
    let key = match key.kind() {
        // ring reads an RSA key from its PKCS#1 DER, or from (n, e).
        DecodingKeyKind::SecretOrDer(der) => KeyBytes::Der(der.clone()),
        DecodingKeyKind::RsaModulusExponent { n, e } => KeyBytes::Rsa {
            n: n.clone(),
            e: e.clone(),
        },
    };
    Ok(Box::new(PublicKey {
        algorithm: *algorithm,
        ring,
        key,
    }))
}

/// ring's parameters for an RSA algorithm (keys of 2048 to 8192 bits).
fn rsa_params(algorithm: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match algorithm {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// HMAC (HS256, HS384, HS512).
struct Hmac(Algorithm, ring::hmac::Key);

impl Verifier<Vec<u8>> for Hmac {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SigError> {
        // Constant-time comparison inside ring.
        ring::hmac::verify(&self.1, msg, signature).map_err(|_| SigError::new())
    }
}

impl JwtVerifier for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.0
    }
}

struct Hs256(ring::hmac::Key);

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SigError> {
        Ok(ring::hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

struct Es256Signer(sig::EcdsaKeyPair);

impl Signer<Vec<u8>> for Es256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SigError> {
        self.0
            .sign(&ring::rand::SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SigError::new())
    }
}

impl JwtSigner for Es256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

struct Ed25519Signer(sig::Ed25519KeyPair);

impl Signer<Vec<u8>> for Ed25519Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SigError> {
        Ok(self.0.sign(msg).as_ref().to_vec())
    }
}

impl JwtSigner for Ed25519Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

/// A public key as ring takes it.
enum KeyBytes {
    /// An EC point, an Ed25519 key, or an RSA key's PKCS#1 DER.
    Der(Vec<u8>),
    /// An RSA key's modulus and exponent (from a JWK).
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

struct PublicKey {
    algorithm: Algorithm,
    ring: &'static dyn sig::VerificationAlgorithm,
    key: KeyBytes,
}

impl Verifier<Vec<u8>> for PublicKey {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SigError> {
        let verified = match &self.key {
            KeyBytes::Der(der) => {
                sig::UnparsedPublicKey::new(self.ring, der).verify(msg, signature)
            }
            // Only RSA algorithms reach here with (n, e): a JWK's key type fixes the family,
            // and jsonwebtoken refuses a header algorithm of another family.
            KeyBytes::Rsa { n, e } => match rsa_params(self.algorithm) {
                Some(params) => sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature),
                None => return Err(SigError::new()),
            },
        };
        verified.map_err(|_| SigError::new())
    }
}

impl JwtVerifier for PublicKey {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: Option<i64>) -> Claims {
        Claims {
            iss: ISSUER.to_string(),
            sub: "alice".to_string(),
            account: "ops".to_string(),
            jti: "abc".to_string(),
            iat: 1_700_000_000,
            exp,
        }
    }

    fn keys_with(secret: &str) -> Vec<JwtKey> {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        vec![
            JwtKey::from_config(&ed.serialize_pem()).unwrap(),
            JwtKey::from_config(&ec.serialize_pem()).unwrap(),
            JwtKey::from_config(secret).unwrap(),
        ]
    }

    fn keys() -> Vec<JwtKey> {
        keys_with("a-secret-of-at-least-thirty-two-bytes!")
    }

    #[test]
    fn each_algorithm_signs_and_verifies_and_refuses_tampering() {
        let far = 4_000_000_000;
        for key in keys() {
            let jwt = key.sign(&claims(Some(far))).unwrap();
            assert!(key.recognises(&jwt), "{:?}", key.algorithm());
            let got = key.verify(&jwt).expect("own signature verifies");
            assert_eq!((got.sub.as_str(), got.jti.as_str()), ("alice", "abc"));
            // Change one character of the payload: the signature no longer fits.
            let (head, rest) = jwt.split_once('.').unwrap();
            let (payload, signature) = rest.split_once('.').unwrap();
            let forged = serde_json::to_vec(&claims(Some(far)))
                .map(|mut v| {
                    v.splice(0..0, b" ".iter().copied());
                    v
                })
                .unwrap();
            use base64::Engine;
            let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged);
            assert_ne!(forged, payload);
            assert!(key
                .verify(&format!("{head}.{forged}.{signature}"))
                .is_none());
            // Expired.
            let old = key.sign(&claims(Some(1_000))).unwrap();
            assert!(key.verify(&old).is_none(), "{:?}", key.algorithm());
            // Without exp: valid until revoked.
            assert!(key.verify(&key.sign(&claims(None)).unwrap()).is_some());
        }
    }

    #[test]
    fn another_key_is_not_recognised_nor_accepted() {
        let a = keys();
        let b = keys_with("another-secret-of-at-least-thirty-two-bytes");
        for (a, b) in a.iter().zip(&b) {
            let jwt = a.sign(&claims(None)).unwrap();
            assert!(!b.recognises(&jwt));
            assert!(b.verify(&jwt).is_none());
        }
        assert!(!a[0].recognises("eyJhbGciOiJub25lIn0.e30."));
        assert!(!a[0].recognises("not a jwt"));
    }

    #[test]
    fn alg_none_and_algorithm_swaps_are_refused() {
        let key = &keys()[0];
        let jwt = key.sign(&claims(None)).unwrap();
        let (_, rest) = jwt.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = b64.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid));
        assert!(key.verify(&format!("{none}.{payload}.")).is_none());
        let hs = b64.encode(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, key.kid));
        assert!(key.verify(&format!("{hs}.{payload}.AAAA")).is_none());
    }

    /// A compact JWS with `header_json` as its protected header, signed by `key` as
    /// jsonwebtoken signs (so only the header differs from [`JwtKey::sign`]'s).
    fn signed_with_header(key: &JwtKey, header_json: &str, claims: &Claims) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!(
            "{}.{}",
            b64.encode(header_json),
            b64.encode(serde_json::to_vec(claims).unwrap())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.algorithm).unwrap();
        format!("{message}.{signature}")
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let far = 4_000_000_000;
        for key in keys() {
            let alg = format!("{:?}", key.algorithm);
            let kid = key.kid.clone();
            // The same header without crit is a good token: only crit makes the difference.
            let plain = signed_with_header(
                &key,
                &format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#),
                &claims(Some(far)),
            );
            assert!(key.recognises(&plain));
            assert!(key.verify(&plain).is_some(), "{alg}: plain header");
            for crit in [
                r#""crit":["x-unknown"],"x-unknown":true"#,
                r#""crit":["exp"]"#,
                r#""crit":["b64"],"b64":true"#,
                r#""crit":[]"#,
                r#""crit":null"#,
                r#""crit":"x-unknown""#,
                r#""cr\u0069t":["x-unknown"]"#,
                r#""crit":["x"],"crit":null"#,
            ] {
                let header = format!(r#"{{"alg":"{alg}","kid":"{kid}",{crit}}}"#);
                let token = signed_with_header(&key, &header, &claims(Some(far)));
                assert!(names_critical_extensions(&token), "{alg}: {crit}");
                assert!(key.verify(&token).is_none(), "{alg}: {crit}");
            }
            // And through jsonwebtoken's own encoder, with its Header type.
            let mut header = Header::new(key.algorithm);
            header.kid = Some(kid.clone());
            header.crit = Some(vec!["x-unknown".to_string()]);
            let token = jsonwebtoken::encode(&header, &claims(Some(far)), &key.encoding).unwrap();
            assert!(
                key.recognises(&token),
                "still names our key: denied, not passed on"
            );
            assert!(key.verify(&token).is_none(), "{alg}: encoded with crit");
            header.crit = None;
            let token = jsonwebtoken::encode(&header, &claims(Some(far)), &key.encoding).unwrap();
            assert!(key.verify(&token).is_some(), "{alg}: encoded without crit");
        }
    }

    #[test]
    fn unreadable_headers_count_as_critical() {
        for token in [
            "",
            "abc",
            "a.b",
            "!!!.e30.x",
            "W10.e30.x",
            "bnVsbA.e30.x",
            "e30",
        ] {
            assert!(names_critical_extensions(token), "{token:?}");
        }
        // `{}` and `{"alg":"HS256"}`: readable, no crit.
        assert!(!names_critical_extensions("e30.e30.x"));
        assert!(!names_critical_extensions("eyJhbGciOiJIUzI1NiJ9.e30.x"));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert!(JwtKey::from_config("short")
            .unwrap_err()
            .contains("32 bytes"));
        let rsa_like = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";
        assert!(JwtKey::from_config(rsa_like)
            .unwrap_err()
            .contains("PKCS#8"));
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(JwtKey::from_config(&p384.serialize_pem()).is_err());
    }
}
