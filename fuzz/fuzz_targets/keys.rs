//! Fixed keys for the `jwt` target and its seed corpus (made for fuzzing only; they protect
//! nothing), so that seed tokens signed by `examples/seeds.rs` verify in the target.

#![allow(dead_code)]

/// `[tokens] jwt_key` as an HMAC secret (HS256).
pub const HMAC_SECRET: &str = "fuzzing-only-secret-of-at-least-32-bytes";

/// `[tokens] jwt_key` as an Ed25519 PKCS#8 key (EdDSA); also the jwt validator's key.
pub const ED25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIPQ4KHBH+PQvIBgKvNWdMefC1I+l8asXrv7feGl2QpOz
-----END PRIVATE KEY-----
";

/// The public half of [`ED25519_PRIVATE`], as a jwt validator's `public_key`.
pub const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAs3yJD/LER1POycxQYeTvOmJSBZ1r5gMs+q+dxnjir0s=
-----END PUBLIC KEY-----
";

/// The jwt validator's `issuer`: the gate's own, so one seed token reaches both checks.
pub const ISSUER: &str = "tokengate";

/// The fixed clock of the `x509` target (2025-06-15), inside the seed certificates' validity.
pub const X509_NOW_SECS: u64 = 1_750_000_000;
