//! X.509 client chains: `x509::end_entity_dn` (both forms) and the proxy-chain verifier
//! (`x509::ProxyChainVerifier::verify_client_cert`, trusting the seed corpus' root CA, at a
//! fixed time) on a chain of DER blobs split from the input.
//!
//! Input: byte 0, the number of certificates (mod 8; bit 7 chooses the DN form); then each
//! certificate as a 2-byte big-endian length and its DER (cut short where the input ends).
//! `examples/seeds.rs` writes real chains in this form (CA, user, RFC 3820 and legacy proxies).

#![no_main]

#[path = "keys.rs"]
mod keys;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustls::server::danger::ClientCertVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokengate::x509::{end_entity_dn, DnFormat, ProxyChainVerifier};

/// The root CA of the seed chains (written by `examples/seeds.rs`).
const ROOT: &[u8] = include_bytes!("../seeds/x509-root-ca.der");

fn verifier() -> &'static ProxyChainVerifier {
    static VERIFIER: OnceLock<ProxyChainVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ROOT))
            .expect("the seed root CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ProxyChainVerifier::new(Arc::new(roots), provider, true).expect("verifier")
    })
}

/// The certificates of an input, in the format above.
pub fn split(data: &[u8]) -> (Vec<CertificateDer<'_>>, DnFormat) {
    let Some((&head, mut rest)) = data.split_first() else {
        return (Vec::new(), DnFormat::Slash);
    };
    let format = if head & 0x80 != 0 {
        DnFormat::Rfc2253
    } else {
        DnFormat::Slash
    };
    let mut chain = Vec::new();
    for _ in 0..head & 7 {
        let len = match rest {
            [hi, lo, tail @ ..] => {
                rest = tail;
                usize::from(u16::from_be_bytes([*hi, *lo]))
            }
            _ => break,
        };
        let (der, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        chain.push(CertificateDer::from(der));
    }
    (chain, format)
}

fuzz_target!(|data: &[u8]| {
    let (chain, format) = split(data);
    let dn = end_entity_dn(&chain, format);
    if let Ok(dn) = &dn {
        assert!(!dn.is_empty());
        assert!(
            !dn.bytes().any(|b| b.is_ascii_control()),
            "a control character in a DN: {dn:?}"
        );
    }
    let Some((leaf, intermediates)) = chain.split_first() else {
        return;
    };
    let now = UnixTime::since_unix_epoch(Duration::from_secs(keys::X509_NOW_SECS));
    if verifier()
        .verify_client_cert(leaf, intermediates, now)
        .is_ok()
    {
        // A verified chain stands for an end-entity with a DN.
        assert!(dn.is_ok(), "a verified chain without an identity: {dn:?}");
    }
});
