//! X.509 client identities (SPEC §3 `[server.tls]`, §5): a client-certificate verifier that
//! also accepts grid proxy chains, and the distinguished name a verified chain stands for.
//!
//! # Proxy certificates
//!
//! A grid user signs short-lived *proxy certificates* with the key of their own (end-entity)
//! certificate, and may sign proxies of proxies. A client presents the chain leaf first, as
//! TLS sends it: `proxy … proxy, end-entity, intermediate CAs`. Two kinds are understood:
//!
//! - RFC 3820 proxies: a critical ProxyCertInfo extension (1.3.6.1.5.5.7.1.14) with the policy
//!   language `id-ppl-inheritAll` or Globus' limited-proxy language; the subject adds one CN,
//!   usually digits. `id-ppl-independent` and other languages are refused: such a proxy does
//!   not carry its issuer's rights, so it cannot stand for the issuer's identity.
//! - legacy Globus proxies: no extension; the subject adds `CN=proxy` or `CN=limited proxy`.
//!   So any certificate whose last RDN is one of these is treated as a proxy.
//!
//! [`ProxyChainVerifier`] splits the chain at the first certificate that is not a proxy: that
//! is the end-entity. The end-entity and the certificates after it are verified by rustls'
//! stock webpki verifier (trust anchors from `client_ca`, validity, the clientAuth extended
//! key usage). webpki cannot verify the proxies themselves: it refuses the critical
//! ProxyCertInfo extension and an end-entity certificate used as an issuer. So each proxy is
//! checked here as a grid server checks it: signed by its predecessor's key (with the same
//! signature algorithms as rustls, so no SHA-1), within its validity, subject = issuer's
//! subject plus exactly one single-valued CN RDN, issuer name = its signer's subject, no CA
//! flag on it nor on the end-entity, the signer's key usage (if any) allows signatures, no
//! unknown critical extension, ProxyCertInfo path length limits honoured, no mix of RFC 3820
//! and legacy proxies, and a limited proxy signs only limited proxies. At most
//! [`MAX_PROXIES`] proxies are followed.
//!
//! # TLS versions
//!
//! Proxy chains work over TLS 1.2 and TLS 1.3 alike: both carry an arbitrary certificate list
//! in the client's Certificate message, the chain checks above do not depend on the version,
//! and the client proves possession of the *leaf proxy's* key in CertificateVerify in both.
//! rustls' stock signature helpers parse the leaf with webpki, which refuses RFC 3820 proxies,
//! so the handshake signature is checked against the leaf's SubjectPublicKeyInfo instead:
//! TLS 1.3 through `rustls::crypto::verify_tls13_signature_with_raw_key` (which keeps TLS
//! 1.3's rules: no RSA PKCS#1 v1.5, ECDSA curve bound to the scheme), TLS 1.2 by trying the
//! scheme's algorithms as rustls does for certificates. A rustls *client* cannot load an RFC
//! 3820 proxy with `with_client_auth_cert` (its key check parses the leaf with webpki); it
//! needs `sign::CertifiedKey::new` and `sign::SingleCertAndKey`. OpenSSL clients (curl) send
//! proxy chains as they are.
//!
//! # Identity
//!
//! [`end_entity_dn`] gives the subject of the end-entity certificate of a verified chain,
//! never a proxy's: proxies' `CN=<digits>`, `CN=proxy`, `CN=limited proxy` are not part of
//! the identity. See [`DnFormat`] for the two string forms.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use asn1_rs::{
    oid, Any, BitString, BmpString, DerSequence, FromDer, OctetString, Oid, Tag, ToDer,
    UniversalString,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, PeerMisbehaved,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::{
    CertificateDer, SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer, UnixTime,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_X509_COMMON_NAME, OID_X509_EXT_ISSUER_ALT_NAME, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::x509::{
    AlgorithmIdentifier, AttributeTypeAndValue, RelativeDistinguishedName, SubjectPublicKeyInfo,
    X509Name,
};

/// The longest proxy chain followed (proxies only, not counting the end-entity). Real chains
/// hold one to three; the bound keeps a hostile chain from costing many signature checks.
pub const MAX_PROXIES: usize = 16;

/// The string form of a distinguished name.
///
/// Both forms use the short attribute names OpenSSL prints: `C`, `ST`, `L`, `O`, `OU`, `CN`,
/// `emailAddress`, `DC`, `UID`, `serialNumber`, `SN`, `GN`, `title`, `street`, `postalCode`;
/// any other attribute type is written as its dotted OID (`2.5.4.65=…`). A value that is not
/// a character string is written `#` + the hex of its DER encoding (RFC 4514 §2.4). The
/// attributes of a multi-valued RDN are joined with `+`, in the order the certificate holds
/// them (DER sorts them). Values are decoded to UTF-8 (UTF8String, PrintableString,
/// IA5String, NumericString, VisibleString as they are, BMPString and UniversalString
/// converted, TeletexString as Latin-1); non-ASCII characters are kept, not hex-escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnFormat {
    /// The form Rucio stores and OpenSSL's legacy one-line form prints:
    /// `/C=CH/O=Example/OU=Users/CN=Alice Smith`, RDNs in the certificate's order.
    ///
    /// Like OpenSSL and Rucio, values are not escaped: a `/`, `=` or `+` inside a value is
    /// written as it is, so the form is ambiguous for such values (`O=A/CN=B` as one value
    /// prints as two RDNs would). Only control characters are written `\xHH`, so that the
    /// string is safe in a log line or header. Unlike `X509_NAME_oneline`, a multi-valued
    /// RDN is joined with `+` (OpenSSL writes `/` before every attribute).
    #[default]
    Slash,
    /// RFC 2253 / RFC 4514, as `openssl -nameopt RFC2253` and Apache's `SSL_CLIENT_S_DN`
    /// print it: `CN=Alice Smith,OU=Users,O=Example,C=CH`, RDNs in reverse order.
    ///
    /// `,` `+` `"` `\` `<` `>` `;` are escaped with a backslash, as are a leading `#` or space
    /// and a trailing space; control characters are written `\HH`. `=` is not escaped (RFC
    /// 4514 does not require it; OpenSSL does not).
    Rfc2253,
}

/// The distinguished name of the end-entity certificate of a verified client chain, leaf
/// first, as `peer_certificates()` returns it: the first certificate that is not a proxy.
///
/// Call it only on a chain the TLS verifier accepted; it checks nothing but the structure.
/// Errors: an unparsable certificate, a chain of proxies only, an end-entity that is a CA
/// certificate (a chain no verifier here accepts), an empty subject.
pub fn end_entity_dn(chain: &[CertificateDer<'_>], format: DnFormat) -> Result<String, String> {
    let split = split_chain(chain.iter()).map_err(str::to_string)?;
    let end_entity = &split.end_entity;
    if is_ca(end_entity).map_err(str::to_string)? {
        return Err("the end-entity certificate is a CA certificate".to_string());
    }
    let subject = end_entity.subject();
    if subject.iter().next().is_none() {
        return Err("the end-entity certificate has an empty subject".to_string());
    }
    Ok(format_name(subject, format))
}

/// A rustls client-certificate verifier that accepts end-entity certificates, as rustls'
/// stock verifier does, and proxy chains signed by them (see the module docs).
#[derive(Debug)]
pub struct ProxyChainVerifier {
    /// The stock verifier, for the end-entity and the CA certificates after it.
    end_entity: Arc<dyn ClientCertVerifier>,
    /// Signature algorithms for proxy signatures and the handshake signature.
    algorithms: WebPkiSupportedAlgorithms,
    /// Refuse clients without a certificate.
    mandatory: bool,
}

impl ProxyChainVerifier {
    /// A verifier trusting `roots` (also sent as the CA hints), with `provider`'s signature
    /// algorithms; `mandatory`: refuse clients that present no certificate.
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
    ) -> Result<Self, String> {
        let algorithms = provider.signature_verification_algorithms;
        let stock = WebPkiClientVerifier::builder_with_provider(roots, provider);
        let stock = if mandatory {
            stock
        } else {
            stock.allow_unauthenticated()
        };
        let end_entity = stock
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))?;
        Ok(ProxyChainVerifier {
            end_entity,
            algorithms,
            mandatory,
        })
    }
}

impl ClientCertVerifier for ProxyChainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.end_entity.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let split = split_chain(std::iter::once(leaf).chain(intermediates)).map_err(refuse)?;
        let n = split.proxies.len();
        if n == 0 {
            return self.end_entity.verify_client_cert(leaf, intermediates, now);
        }
        // The proxies first, for a clear reason when a CA signed one; then the end-entity,
        // intermediates[n - 1], and what follows it, which leads to a trust anchor.
        check_proxies(&split, now, &self.algorithms).map_err(refuse)?;
        self.end_entity
            .verify_client_cert(&intermediates[n - 1], &intermediates[n..], now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let candidates = self
            .algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algorithms)| *algorithms)
            .ok_or(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
        let parsed = parse(cert).map_err(refuse)?;
        verify_with_spki(
            parsed.public_key(),
            candidates,
            None,
            message,
            dss.signature(),
        )
        .map_err(|reason| {
            tracing::warn!(reason, "TLS 1.2 client handshake signature refused");
            Error::InvalidCertificate(CertificateError::BadSignature)
        })?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let parsed = parse(cert).map_err(refuse)?;
        let spki = SubjectPublicKeyInfoDer::from(parsed.public_key().raw);
        rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a client certificate chain was refused; shown in the handshake error.
struct ChainRefused(&'static str);

impl fmt::Debug for ChainRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for ChainRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ChainRefused {}

/// The rustls error for a refused chain, logged with its reason (never certificate contents).
fn refuse(reason: &'static str) -> Error {
    tracing::warn!(reason, "client certificate chain refused");
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(ChainRefused(
        reason,
    )))))
}

// ---------------------------------------------------------------------------------------------
// Proxy chains

/// RFC 3820 or legacy Globus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Rfc3820,
    Legacy,
}

/// What makes a certificate a proxy.
#[derive(Debug, Clone, Copy)]
struct Proxy {
    style: Style,
    /// Signs only limited proxies (`CN=limited proxy`, or the Globus limited policy language).
    limited: bool,
    /// ProxyCertInfo's pCPathLenConstraint: how many proxies may follow this one.
    path_len: Option<u32>,
}

/// A chain, leaf first, split at its end-entity certificate.
struct Split<'a> {
    /// The proxies, leaf first, each with what makes it one.
    proxies: Vec<(X509Certificate<'a>, Proxy)>,
    /// The first certificate that is not a proxy.
    end_entity: X509Certificate<'a>,
}

/// Parses certificates up to the first one that is not a proxy.
fn split_chain<'a, 'b: 'a>(
    chain: impl Iterator<Item = &'a CertificateDer<'b>>,
) -> Result<Split<'a>, &'static str> {
    let mut proxies = Vec::new();
    for der in chain {
        let cert = parse(der)?;
        match proxy_kind(&cert)? {
            None => {
                return Ok(Split {
                    proxies,
                    end_entity: cert,
                })
            }
            Some(_) if proxies.len() == MAX_PROXIES => return Err("proxy chain too long"),
            Some(proxy) => proxies.push((cert, proxy)),
        }
    }
    if proxies.is_empty() {
        Err("no client certificate")
    } else {
        Err("proxy chain holds no end-entity certificate")
    }
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, &'static str> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        _ => Err("malformed certificate"),
    }
}

/// Whether `cert` is a proxy, and of what kind.
fn proxy_kind(cert: &X509Certificate<'_>) -> Result<Option<Proxy>, &'static str> {
    let mut info = cert
        .extensions()
        .iter()
        .filter(|e| e.oid.as_bytes() == OID_PROXY_CERT_INFO);
    if let Some(ext) = info.next() {
        if info.next().is_some() {
            return Err("duplicate ProxyCertInfo extension");
        }
        if !ext.critical {
            return Err("ProxyCertInfo extension must be critical");
        }
        let (path_len, language) =
            proxy_cert_info(ext.value).ok_or("malformed ProxyCertInfo extension")?;
        let limited = match language.as_bytes() {
            OID_PPL_INHERIT_ALL => false,
            OID_GLOBUS_LIMITED => true,
            _ => return Err("proxy policy language not supported (only inheritAll and limited)"),
        };
        return Ok(Some(Proxy {
            style: Style::Rfc3820,
            limited,
            path_len,
        }));
    }
    let legacy = match last_cn(cert.subject()).map(|cn| cn.attr_value().data) {
        Some(b"proxy") => Some(false),
        Some(b"limited proxy") => Some(true),
        _ => None,
    };
    Ok(legacy.map(|limited| Proxy {
        style: Style::Legacy,
        limited,
        path_len: None,
    }))
}

/// The ProxyCertInfo extension (RFC 3820 §3.8).
///
/// `ProxyCertInfo ::= SEQUENCE { pCPathLenConstraint INTEGER (0..MAX) OPTIONAL,
/// proxyPolicy ProxyPolicy }`
#[derive(Debug, PartialEq, DerSequence)]
struct ProxyCertInfo<'a> {
    #[optional]
    path_len: Option<u32>,
    policy: ProxyPolicy<'a>,
}

/// `ProxyPolicy ::= SEQUENCE { policyLanguage OBJECT IDENTIFIER, policy OCTET STRING OPTIONAL }`
#[derive(Debug, PartialEq, DerSequence)]
struct ProxyPolicy<'a> {
    language: Oid<'a>,
    #[optional]
    policy: Option<OctetString<'a>>,
}

/// (path length, policy language) of a ProxyCertInfo extension's value.
fn proxy_cert_info(value: &[u8]) -> Option<(Option<u32>, Oid<'_>)> {
    match ProxyCertInfo::from_der(value) {
        Ok(([], info)) => Some((info.path_len, info.policy.language)),
        _ => None,
    }
}

/// Checks every proxy of a split chain against its signer (the end-entity is webpki's).
fn check_proxies(
    split: &Split<'_>,
    now: UnixTime,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), &'static str> {
    if is_ca(&split.end_entity)? {
        return Err("proxy signed by a CA certificate, not by an end-entity certificate");
    }
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    // From the end-entity down to the leaf; `below` proxies follow proxies[below].
    for below in (0..split.proxies.len()).rev() {
        let (cert, proxy) = &split.proxies[below];
        let (signer, signer_proxy) = match split.proxies.get(below + 1) {
            Some((signer, signer_proxy)) => (signer, Some(signer_proxy)),
            None => (&split.end_entity, None),
        };
        if let Some(signer_proxy) = signer_proxy {
            if signer_proxy.style != proxy.style {
                return Err("a proxy chain must not mix RFC 3820 and legacy proxies");
            }
            if signer_proxy.limited && !proxy.limited {
                return Err("a limited proxy can only sign limited proxies");
            }
        }
        if proxy.path_len.is_some_and(|limit| below > limit as usize) {
            return Err("proxy path length constraint exceeded");
        }
        check_proxy(cert, signer, now, algorithms)?;
    }
    Ok(())
}

/// Checks one proxy against the certificate that signed it.
fn check_proxy(
    cert: &X509Certificate<'_>,
    signer: &X509Certificate<'_>,
    now: i64,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), &'static str> {
    if cert.issuer().as_raw() != signer.subject().as_raw() {
        return Err("proxy issuer name is not its signer's subject");
    }
    let subject = cert.subject();
    let signer_subject = signer.subject();
    let one_more_cn = subject.iter().count() == signer_subject.iter().count() + 1
        && subject
            .iter()
            .zip(signer_subject.iter())
            .all(|(a, b)| a == b)
        && last_cn(subject).is_some();
    if !one_more_cn {
        return Err("proxy subject must be issuer subject plus one CN");
    }
    let signature_algorithm =
        algorithm_id(&cert.signature_algorithm).ok_or("malformed proxy certificate")?;
    let signature = bits(&cert.signature_value).ok_or("malformed proxy certificate")?;
    verify_with_spki(
        signer.public_key(),
        algorithms.all,
        Some(&signature_algorithm),
        cert.tbs_certificate.as_ref(),
        signature,
    )
    .map_err(|_| "proxy certificate not signed by its issuer")?;
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err("proxy certificate not valid yet");
    }
    if now > validity.not_after.timestamp() {
        return Err("proxy certificate expired");
    }
    if is_ca(cert)? {
        return Err("proxy certificate must not be a CA certificate");
    }
    match signer.key_usage() {
        Ok(Some(usage)) if !usage.value.digital_signature() => {
            return Err("proxy signer's key usage does not allow signatures")
        }
        Ok(_) => {}
        Err(_) => return Err("malformed key usage extension"),
    }
    for ext in cert.extensions() {
        if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME || ext.oid == OID_X509_EXT_ISSUER_ALT_NAME {
            return Err("proxy certificate must not carry alternative names");
        }
        if ext.critical && !KNOWN_CRITICAL.contains(&ext.oid.as_bytes()) {
            return Err("proxy certificate has an unsupported critical extension");
        }
    }
    Ok(())
}

/// basicConstraints cA.
fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, &'static str> {
    match cert.basic_constraints() {
        Ok(constraints) => Ok(constraints.is_some_and(|c| c.value.ca)),
        Err(_) => Err("malformed basic constraints extension"),
    }
}

/// The last RDN of `name` if it is a single commonName attribute.
fn last_cn<'n, 'a>(name: &'n X509Name<'a>) -> Option<&'n AttributeTypeAndValue<'a>> {
    let mut attributes = name.iter().last()?.iter();
    match (attributes.next(), attributes.next()) {
        (Some(cn), None) if *cn.attr_type() == OID_X509_COMMON_NAME => Some(cn),
        _ => None,
    }
}

/// The DER contents of an AlgorithmIdentifier (OID, then parameters if any): the form
/// `SignatureVerificationAlgorithm`'s algorithm ids take.
fn algorithm_id(algorithm: &AlgorithmIdentifier<'_>) -> Option<Vec<u8>> {
    let mut id = algorithm.algorithm.to_der_vec().ok()?;
    if let Some(parameters) = &algorithm.parameters {
        id.extend(parameters.to_der_vec().ok()?);
    }
    Some(id)
}

/// The bits of a BIT STRING that holds whole bytes (keys and signatures).
fn bits<'b>(bits: &'b BitString<'_>) -> Option<&'b [u8]> {
    (bits.unused_bits == 0).then_some(bits.data.as_ref())
}

/// Verifies `signature` over `message` with a SubjectPublicKeyInfo's key, using the first of
/// `candidates` for that key's algorithm (and for `signature_algorithm`, the contents of a
/// certificate's AlgorithmIdentifier, when given) — webpki's matching rule.
fn verify_with_spki(
    spki: &SubjectPublicKeyInfo<'_>,
    candidates: &[&dyn SignatureVerificationAlgorithm],
    signature_algorithm: Option<&[u8]>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), &'static str> {
    let key_algorithm = algorithm_id(&spki.algorithm).ok_or("malformed public key")?;
    let key = bits(&spki.subject_public_key).ok_or("malformed public key")?;
    let algorithm = candidates
        .iter()
        .find(|a| {
            a.public_key_alg_id().as_ref() == key_algorithm.as_slice()
                && signature_algorithm.is_none_or(|s| a.signature_alg_id().as_ref() == s)
        })
        .ok_or("unsupported signature algorithm")?;
    algorithm
        .verify_signature(key, message, signature)
        .map_err(|_| "bad signature")
}

// ---------------------------------------------------------------------------------------------
// Names

fn format_name(name: &X509Name<'_>, format: DnFormat) -> String {
    let rdn = |rdn: &RelativeDistinguishedName<'_>| {
        rdn.iter()
            .map(|a| format_attribute(a, format))
            .collect::<Vec<_>>()
            .join("+")
    };
    match format {
        DnFormat::Slash => name.iter().map(|r| format!("/{}", rdn(r))).collect(),
        DnFormat::Rfc2253 => {
            let mut rdns: Vec<String> = name.iter().map(rdn).collect();
            rdns.reverse();
            rdns.join(",")
        }
    }
}

fn format_attribute(attribute: &AttributeTypeAndValue<'_>, format: DnFormat) -> String {
    let oid = attribute.attr_type();
    let name = ATTRIBUTE_NAMES
        .iter()
        .find(|(known, _)| known == oid)
        .map_or_else(
            || Cow::Owned(oid.to_id_string()),
            |(_, n)| Cow::Borrowed(*n),
        );
    let value = attribute.attr_value();
    let value = match decode_string(value) {
        Some(text) => escape(&text, format),
        None => match value.to_der_vec() {
            Ok(der) => format!("#{}", hex::encode_upper(der)),
            Err(_) => "#".to_string(),
        },
    };
    format!("{name}={value}")
}

/// A character-string value as text; `None` for other types and invalid encodings.
///
/// The ASCII string types are read as UTF-8 without checking their character sets (real
/// certificates put `@` and `_` in PrintableStrings); TeletexString is read as Latin-1.
fn decode_string(value: &Any<'_>) -> Option<String> {
    let bytes = value.data;
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => String::from_utf8(bytes.to_vec()).ok(),
        Tag::TeletexString => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString => BmpString::try_from(value).ok().map(|s| s.string()),
        Tag::UniversalString => UniversalString::try_from(value).ok().map(|s| s.string()),
        _ => None,
    }
}

fn escape(value: &str, format: DnFormat) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let control = c.is_control() && (c as u32) < 0x80;
        match format {
            DnFormat::Slash if control => out.push_str(&format!("\\x{:02X}", c as u32)),
            DnFormat::Slash => out.push(c),
            DnFormat::Rfc2253 if control => out.push_str(&format!("\\{:02X}", c as u32)),
            DnFormat::Rfc2253 => {
                let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                    || (i == 0 && matches!(c, '#' | ' '))
                    || (i == last && c == ' ');
                if special {
                    out.push('\\');
                }
                out.push(c);
            }
        }
    }
    out
}

/// id-pe-proxyCertInfo (RFC 3820).
const OID_PROXY_CERT_INFO: &[u8] = &oid!(raw 1.3.6.1.5.5.7.1.14);
/// id-ppl-inheritAll.
const OID_PPL_INHERIT_ALL: &[u8] = &oid!(raw 1.3.6.1.5.5.7.21.1);
/// Globus' limited-proxy policy language.
const OID_GLOBUS_LIMITED: &[u8] = &oid!(raw 1.3.6.1.4.1.3536.1.1.1.9);

/// Extensions a proxy may mark critical: ProxyCertInfo, basicConstraints, keyUsage,
/// extKeyUsage.
const KNOWN_CRITICAL: &[&[u8]] = &[
    OID_PROXY_CERT_INFO,
    &oid!(raw 2.5.29.19),
    &oid!(raw 2.5.29.15),
    &oid!(raw 2.5.29.37),
];

/// Attribute types with a short name, as OpenSSL prints them.
#[rustfmt::skip]
const ATTRIBUTE_NAMES: &[(Oid<'static>, &str)] = &[
    (oid!(2.5.4.6), "C"),
    (oid!(2.5.4.8), "ST"),
    (oid!(2.5.4.7), "L"),
    (oid!(2.5.4.10), "O"),
    (oid!(2.5.4.11), "OU"),
    (oid!(2.5.4.3), "CN"),
    (oid!(1.2.840.113549.1.9.1), "emailAddress"),
    (oid!(0.9.2342.19200300.100.1.25), "DC"),
    (oid!(0.9.2342.19200300.100.1.1), "UID"),
    (oid!(2.5.4.5), "serialNumber"),
    (oid!(2.5.4.4), "SN"),
    (oid!(2.5.4.42), "GN"),
    (oid!(2.5.4.12), "title"),
    (oid!(2.5.4.9), "street"),
    (oid!(2.5.4.17), "postalCode"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_rfc2253_specials() {
        let e = |s| escape(s, DnFormat::Rfc2253);
        assert_eq!(e("a,b+c\"d\\e<f>g;h"), r#"a\,b\+c\"d\\e\<f\>g\;h"#);
        assert_eq!(e("#lead"), r"\#lead");
        assert_eq!(e(" both "), r"\ both\ ");
        assert_eq!(e("mid#dle sp=ace/x"), "mid#dle sp=ace/x");
        assert_eq!(e("nul\0tab\t"), r"nul\00tab\09");
        assert_eq!(e("Jürg"), "Jürg");
        assert_eq!(e(" "), r"\ ");
    }

    #[test]
    fn slash_form_leaves_values_alone() {
        let e = |s| escape(s, DnFormat::Slash);
        assert_eq!(e("A/B=C+D,E"), "A/B=C+D,E");
        assert_eq!(e(" #x "), " #x ");
        assert_eq!(e("new\nline"), r"new\x0Aline");
    }

    #[test]
    fn proxy_cert_info_forms() {
        let inherit_all = oid!(1.3.6 .1 .5 .5 .7 .21 .1);
        // SEQUENCE { INTEGER 2, SEQUENCE { OID inheritAll } }
        let mut with_len = vec![0x30, 15, 0x02, 1, 2, 0x30, 10, 0x06, 8];
        with_len.extend_from_slice(OID_PPL_INHERIT_ALL);
        assert_eq!(
            proxy_cert_info(&with_len),
            Some((Some(2), inherit_all.clone()))
        );
        let mut without = vec![0x30, 12, 0x30, 10, 0x06, 8];
        without.extend_from_slice(OID_PPL_INHERIT_ALL);
        assert_eq!(proxy_cert_info(&without), Some((None, inherit_all.clone())));
        // With a policy OCTET STRING.
        let mut with_policy = vec![0x30, 15, 0x30, 13, 0x06, 8];
        with_policy.extend_from_slice(OID_PPL_INHERIT_ALL);
        with_policy.extend_from_slice(&[0x04, 1, b'x']);
        assert_eq!(proxy_cert_info(&with_policy), Some((None, inherit_all)));
        // A negative path length, a truncated value, trailing bytes: malformed.
        let mut negative = with_len.clone();
        negative[4] = 0xff;
        assert_eq!(proxy_cert_info(&negative), None);
        assert_eq!(proxy_cert_info(&with_len[..with_len.len() - 1]), None);
        let mut trailing = with_len.clone();
        trailing.push(0);
        assert_eq!(proxy_cert_info(&trailing), None);
    }
}
