//! A grid PKI for the X.509 tests: a root CA, an intermediate CA, users, RFC 3820 and legacy
//! Globus proxies, and broken variants of each, all generated here.
//!
//! rcgen builds each certificate (key, validity, extensions, ProxyCertInfo as a custom
//! extension); its `DistinguishedName` holds each attribute type once, in one RDN each, so it
//! can express neither a proxy subject (`…/CN=Alice Smith/CN=1234`: two CNs) nor a
//! multi-valued RDN. So the issuer and subject names are written here as DER ([`Dn`]), put in
//! place of rcgen's, and the TBSCertificate is signed again with the issuer's key (ECDSA
//! P-256 throughout, so rcgen's signatureAlgorithm stays right).

use rcgen::{
    CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SigningKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// Value string types (ASN.1 universal tags).
pub const UTF8: u8 = 0x0c;
pub const PRINTABLE: u8 = 0x13;
pub const IA5: u8 = 0x16;
pub const BMP: u8 = 0x1e;

/// 1.3.6.1.5.5.7.1.14, id-pe-proxyCertInfo.
pub const PROXY_CERT_INFO: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 14];
/// id-ppl-inheritAll.
pub const INHERIT_ALL: &str = "1.3.6.1.5.5.7.21.1";
/// id-ppl-independent.
pub const INDEPENDENT: &str = "1.3.6.1.5.5.7.21.2";
/// Globus' limited-proxy policy language.
pub const GLOBUS_LIMITED: &str = "1.3.6.1.4.1.3536.1.1.1.9";

/// A distinguished name: RDNs in order, each a set of attributes.
#[derive(Clone, Debug, Default)]
pub struct Dn(Vec<Vec<Attribute>>);

/// (attribute type OID contents, value string tag, value contents).
type Attribute = (Vec<u8>, u8, Vec<u8>);

impl Dn {
    /// `/C=CH/O=Example/OU=Users/CN=Alice Smith` from `[("C","CH"), …]`.
    pub fn of(pairs: &[(&str, &str)]) -> Dn {
        pairs
            .iter()
            .fold(Dn::default(), |dn, (name, value)| dn.rdn(name, value))
    }

    /// Adds a single-valued RDN; `name` is a short name or a dotted OID. The string type is
    /// OpenSSL's choice: PrintableString for C, IA5String for emailAddress and DC, else UTF-8.
    pub fn rdn(self, name: &str, value: &str) -> Dn {
        self.multi(&[(name, value)])
    }

    /// Adds a multi-valued RDN.
    pub fn multi(mut self, pairs: &[(&str, &str)]) -> Dn {
        let set = pairs
            .iter()
            .map(|(name, value)| {
                let tag = match *name {
                    "C" => PRINTABLE,
                    "emailAddress" | "DC" => IA5,
                    _ => UTF8,
                };
                (attribute_oid(name), tag, value.as_bytes().to_vec())
            })
            .collect();
        self.0.push(set);
        self
    }

    /// Adds a single-valued RDN with a value of string type `tag`, given as raw contents.
    pub fn typed(mut self, name: &str, tag: u8, contents: Vec<u8>) -> Dn {
        self.0.push(vec![(attribute_oid(name), tag, contents)]);
        self
    }

    /// This name plus `CN=value`: a proxy's subject.
    pub fn plus_cn(&self, value: &str) -> Dn {
        self.clone().rdn("CN", value)
    }

    /// The Name's DER encoding. The attributes of a multi-valued RDN are sorted by their
    /// encoding, as DER requires of a SET OF.
    pub fn der(&self) -> Vec<u8> {
        let rdns: Vec<u8> = self
            .0
            .iter()
            .flat_map(|set| {
                let mut attributes: Vec<Vec<u8>> = set
                    .iter()
                    .map(|(oid, tag, value)| {
                        tlv(SEQUENCE, &[tlv(0x06, oid), tlv(*tag, value)].concat())
                    })
                    .collect();
                attributes.sort();
                tlv(SET, &attributes.concat())
            })
            .collect();
        tlv(SEQUENCE, &rdns)
    }
}

/// OID contents for a short name or a dotted OID.
fn attribute_oid(name: &str) -> Vec<u8> {
    let dotted = match name {
        "C" => "2.5.4.6",
        "ST" => "2.5.4.8",
        "L" => "2.5.4.7",
        "O" => "2.5.4.10",
        "OU" => "2.5.4.11",
        "CN" => "2.5.4.3",
        "emailAddress" => "1.2.840.113549.1.9.1",
        "DC" => "0.9.2342.19200300.100.1.25",
        "UID" => "0.9.2342.19200300.100.1.1",
        other => other,
    };
    oid_contents(dotted)
}

/// The DER contents of a dotted OID.
pub fn oid_contents(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted
        .split('.')
        .map(|a| a.parse().expect("dotted OID"))
        .collect();
    let mut out = Vec::new();
    for arc in std::iter::once(arcs[0] * 40 + arcs[1]).chain(arcs[2..].iter().copied()) {
        let mut groups = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.extend(groups.iter().rev());
    }
    out
}

/// A DER element.
pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// (tag, contents, rest) of the first element of `input`.
fn der_next(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = match input[1] {
        n if n < 0x80 => (usize::from(n), 2),
        n => {
            let count = usize::from(n & 0x7f);
            let len = input[2..2 + count]
                .iter()
                .fold(0usize, |l, b| (l << 8) | usize::from(*b));
            (len, 2 + count)
        }
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// The elements of a constructed element's contents, each whole.
fn der_items(mut contents: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    while !contents.is_empty() {
        let (_, _, rest) = der_next(contents);
        items.push(contents[..contents.len() - rest.len()].to_vec());
        contents = rest;
    }
    items
}

/// A ProxyCertInfo extension value: path length limit and policy language.
pub fn proxy_cert_info(path_len: Option<u8>, language: &str) -> Vec<u8> {
    let policy = tlv(SEQUENCE, &tlv(0x06, &oid_contents(language)));
    let len = path_len.map(|n| tlv(0x02, &[n])).unwrap_or_default();
    tlv(SEQUENCE, &[len, policy].concat())
}

/// A certificate with its key and subject.
pub struct Cert {
    pub der: CertificateDer<'static>,
    pub key: KeyPair,
    pub dn: Dn,
}

impl Cert {
    pub fn pem(&self) -> String {
        let b64 = base64_lines(self.der.as_ref());
        format!("-----BEGIN CERTIFICATE-----\n{b64}-----END CERTIFICATE-----\n")
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    b64.as_bytes()
        .chunks(64)
        .map(|line| format!("{}\n", String::from_utf8_lossy(line)))
        .collect()
}

/// What to put in a certificate.
#[derive(Clone)]
pub struct Spec {
    pub subject: Dn,
    /// Issuer name; default: the signer's subject.
    pub issuer_name: Option<Dn>,
    pub ca: bool,
    pub client_auth: bool,
    pub server_name: Option<String>,
    pub key_usages: Vec<KeyUsagePurpose>,
    /// ProxyCertInfo value and criticality.
    pub proxy_cert_info: Option<(Vec<u8>, bool)>,
    /// Validity in whole years (from, to); default: 1975 to 4096, rcgen's.
    pub years: Option<(i32, i32)>,
}

impl Spec {
    pub fn new(subject: Dn) -> Spec {
        Spec {
            subject,
            issuer_name: None,
            ca: false,
            client_auth: false,
            server_name: None,
            key_usages: Vec::new(),
            proxy_cert_info: None,
            years: None,
        }
    }
}

/// Issues a certificate for a fresh key, signed by `signer`'s key (self-signed without one),
/// or by `wrong_key` instead when given.
pub fn issue(spec: &Spec, signer: Option<&Cert>, wrong_key: Option<&KeyPair>) -> Cert {
    let key = KeyPair::generate().expect("P-256 key");
    let mut params = CertificateParams::new(spec.server_name.iter().cloned().collect::<Vec<_>>())
        .expect("params");
    if let Some((from, to)) = spec.years {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    if spec.ca {
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    if spec.client_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.key_usages = spec.key_usages.clone();
    if let Some((value, critical)) = &spec.proxy_cert_info {
        let mut ext = CustomExtension::from_oid_content(PROXY_CERT_INFO, value.clone());
        ext.set_criticality(*critical);
        params.custom_extensions.push(ext);
    }
    let template = params.self_signed(&key).expect("rcgen certificate");

    // Certificate ::= SEQUENCE { tbs, signatureAlgorithm, signature }
    let (_, cert, _) = der_next(template.der());
    let parts = der_items(cert);
    let (_, tbs, _) = der_next(&parts[0]);
    let mut fields = der_items(tbs);
    // TBSCertificate: [0] version, serial, signature, issuer, validity, subject, spki, [3] exts
    let issuer_name = match (&spec.issuer_name, signer) {
        (Some(name), _) => name.clone(),
        (None, Some(signer)) => signer.dn.clone(),
        (None, None) => spec.subject.clone(),
    };
    fields[3] = issuer_name.der();
    fields[5] = spec.subject.der();
    let tbs = tlv(SEQUENCE, &fields.concat());
    let signing_key = wrong_key.or(signer.map(|s| &s.key)).unwrap_or(&key);
    let signature = signing_key.sign(&tbs).expect("sign");
    let signature = tlv(0x03, &[&[0u8][..], &signature].concat());
    let der = tlv(SEQUENCE, &[tbs, parts[1].clone(), signature].concat());
    Cert {
        der: CertificateDer::from(der),
        key,
        dn: spec.subject.clone(),
    }
}

/// Key usages grid tools put in user certificates and proxies.
pub fn signing_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ]
}

/// A CA (root when `signer` is `None`).
pub fn ca(name: &str, signer: Option<&Cert>) -> Cert {
    let mut spec = Spec::new(Dn::of(&[("C", "CH"), ("O", "Example"), ("CN", name)]));
    spec.ca = true;
    spec.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    issue(&spec, signer, None)
}

/// A user (end-entity) certificate with the clientAuth extended key usage.
pub fn user(dn: Dn, signer: &Cert) -> Cert {
    let mut spec = Spec::new(dn);
    spec.client_auth = true;
    spec.key_usages = signing_usages();
    issue(&spec, Some(signer), None)
}

/// The spec of an RFC 3820 proxy of `signer` (`CN=<digits>`, inheritAll, no path limit).
pub fn rfc3820_spec(signer: &Cert) -> Spec {
    let mut spec = Spec::new(signer.dn.plus_cn("1234567890"));
    spec.key_usages = signing_usages();
    spec.proxy_cert_info = Some((proxy_cert_info(None, INHERIT_ALL), true));
    spec
}

/// The spec of a legacy Globus proxy of `signer` (`CN=proxy` or `CN=limited proxy`).
pub fn legacy_spec(signer: &Cert, limited: bool) -> Spec {
    let cn = if limited { "limited proxy" } else { "proxy" };
    let mut spec = Spec::new(signer.dn.plus_cn(cn));
    spec.key_usages = signing_usages();
    spec
}

/// A TLS server certificate for `localhost`.
pub fn server(signer: &Cert) -> Cert {
    let mut spec = Spec::new(Dn::of(&[("CN", "localhost")]));
    spec.server_name = Some("localhost".to_string());
    issue(&spec, Some(signer), None)
}
