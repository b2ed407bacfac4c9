//! Client certificates and grid proxy chains (SPEC §3 `[server.tls]` `client_ca`,
//! `client_auth`, `proxy_certificates`; §5 the identity of a proxy chain), over real TLS
//! handshakes: a tokio-rustls server built by `tokengate::tls::server_config` on 127.0.0.1
//! against a rustls client presenting the chain (TLS 1.2 and 1.3), and once against curl.
//! The outcome is read on the server side, where the verdict is made.

mod common;

use std::sync::{Arc, Mutex};

use common::pki::*;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SignatureScheme, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokengate::config::{Alpn, TlsConfig};
use tokengate::x509::{end_entity_dn, DnFormat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE_SLASH: &str = "/C=CH/O=Example/OU=Users/CN=Alice Smith";
const ALICE_RFC2253: &str = "CN=Alice Smith,OU=Users,O=Example,C=CH";

const TLS12: &SupportedProtocolVersion = &rustls::version::TLS12;
const TLS13: &SupportedProtocolVersion = &rustls::version::TLS13;
const VERSIONS: [&SupportedProtocolVersion; 2] = [TLS12, TLS13];

/// Root CA → intermediate CA → Alice; the server's certificate from the root; PEM files.
struct Grid {
    root: Cert,
    intermediate: Cert,
    alice: Cert,
    dir: TempDir,
}

fn alice_dn() -> Dn {
    Dn::of(&[
        ("C", "CH"),
        ("O", "Example"),
        ("OU", "Users"),
        ("CN", "Alice Smith"),
    ])
}

fn grid() -> Grid {
    let root = ca("Example Root CA", None);
    let intermediate = ca("Example Users CA", Some(&root));
    let alice = user(alice_dn(), &intermediate);
    let server = server(&root);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), root.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), server.key_pem()).unwrap();
    Grid {
        root,
        intermediate,
        alice,
        dir,
    }
}

impl Grid {
    /// The server's TLS config, through the code under test.
    fn server_config(
        &self,
        proxy_certificates: bool,
        client_auth_required: bool,
    ) -> Arc<ServerConfig> {
        tokengate::tls::server_config(&TlsConfig {
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server-key.pem"),
            client_ca: Some(self.dir.path().join("ca.pem")),
            client_auth_required,
            proxy_certificates,
            alpn: vec![Alpn::Http2, Alpn::Http1],
            at: Default::default(),
        })
        .expect("server config")
    }

    /// A handshake in which the client presents `certs` (leaf first, then the intermediate CA)
    /// and signs with the leaf's key; client certificates required.
    async fn present(
        &self,
        proxy_certificates: bool,
        certs: &[&Cert],
        version: &'static SupportedProtocolVersion,
    ) -> Outcome {
        handshake(
            self.server_config(proxy_certificates, true),
            Some((self.chain(certs), certs[0])),
            version,
            &self.root,
        )
        .await
    }

    /// `certs` (leaf first) followed by the intermediate CA, as a client sends them.
    fn chain(&self, certs: &[&Cert]) -> Vec<CertificateDer<'static>> {
        certs
            .iter()
            .chain([&&self.intermediate])
            .map(|c| c.der.clone())
            .collect()
    }
}

/// A client certificate resolver that records the CA hints the server sent.
#[derive(Debug)]
struct Presenting {
    key: Arc<CertifiedKey>,
    hints: Mutex<Vec<Vec<u8>>>,
}

impl ResolvesClientCert for Presenting {
    fn resolve(&self, hints: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        *self.hints.lock().unwrap() = hints.iter().map(|h| h.to_vec()).collect();
        Some(Arc::clone(&self.key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the server saw of one handshake: the peer's chain, or the handshake error.
struct Outcome {
    server: Result<Option<Vec<CertificateDer<'static>>>, String>,
    hints: Vec<Vec<u8>>,
}

impl Outcome {
    /// The verified chain's identity in both forms; panics if the handshake failed.
    fn dn(&self) -> (String, String) {
        let chain = self
            .server
            .as_ref()
            .expect("handshake accepted")
            .as_ref()
            .expect("a client certificate");
        (
            end_entity_dn(chain, DnFormat::Slash).expect("slash DN"),
            end_entity_dn(chain, DnFormat::Rfc2253).expect("RFC 2253 DN"),
        )
    }

    /// Asserts the handshake was accepted as Alice's, in both DN forms.
    fn assert_alice(&self, case: &str) {
        assert_eq!(
            self.dn(),
            (ALICE_SLASH.to_string(), ALICE_RFC2253.to_string()),
            "{case}"
        );
    }

    /// Asserts the server refused the handshake with an error mentioning `why`.
    fn assert_refused(&self, why: &str, case: &str) {
        match &self.server {
            Ok(_) => panic!("{case}: handshake accepted"),
            Err(e) => assert!(e.contains(why), "{case}: {e:?} does not mention {why:?}"),
        }
    }
}

/// One handshake: the client presents `chain` signed with `key` (none without), over `version`.
async fn handshake(
    config: Arc<ServerConfig>,
    client: Option<(Vec<CertificateDer<'static>>, &Cert)>,
    version: &'static SupportedProtocolVersion,
    root: &Cert,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = tokengate::tls::handshake(&acceptor, tcp).await?;
        Ok(stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect()))
    });

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let presenting = client.map(|(chain, signer)| {
        // Not `with_client_auth_cert`: it parses the leaf with webpki, which refuses the
        // critical ProxyCertInfo extension of RFC 3820 proxies.
        let key = provider
            .key_provider
            .load_private_key(signer.key_der())
            .unwrap();
        Arc::new(Presenting {
            key: Arc::new(CertifiedKey::new(chain, key)),
            hints: Mutex::new(Vec::new()),
        })
    });
    let config = match &presenting {
        Some(p) => builder.with_client_cert_resolver(Arc::clone(p) as Arc<dyn ResolvesClientCert>),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    // In TLS 1.3 the client finishes before the server has judged its certificate; hold the
    // connection open until the server is done.
    let client = connector.connect(name, tcp).await;
    let server = server.await.unwrap();
    drop(client);
    Outcome {
        server,
        hints: presenting
            .map(|p| p.hints.lock().unwrap().clone())
            .unwrap_or_default(),
    }
}

/// An RFC 3820 proxy of Alice's certificate.
fn rfc3820_proxy(signer: &Cert) -> Cert {
    issue(&rfc3820_spec(signer), Some(signer), None)
}

#[tokio::test]
async fn rfc3820_proxy_chain_is_accepted_as_its_end_entity() {
    let g = grid();
    let proxy = rfc3820_proxy(&g.alice);
    for version in VERSIONS {
        let out = g.present(true, &[&proxy, &g.alice], version).await;
        out.assert_alice(&format!("{version:?}"));
        // The chain is as presented: the proxy is the leaf, yet the identity is Alice's.
        assert_eq!(out.server.as_ref().unwrap().as_ref().unwrap()[0], proxy.der);
        // The CA hints name the trust anchor of client_ca.
        assert_eq!(out.hints, vec![g.root.dn.der()], "{version:?}");
    }
}

#[tokio::test]
async fn legacy_and_limited_proxies_are_accepted() {
    let g = grid();
    let legacy = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    let limited = issue(&legacy_spec(&g.alice, true), Some(&g.alice), None);
    let mut rfc_limited = rfc3820_spec(&g.alice);
    rfc_limited.proxy_cert_info = Some((proxy_cert_info(None, GLOBUS_LIMITED), true));
    let rfc_limited = issue(&rfc_limited, Some(&g.alice), None);
    for (case, proxy) in [
        ("CN=proxy", &legacy),
        ("CN=limited proxy", &limited),
        ("RFC 3820 limited", &rfc_limited),
    ] {
        for version in VERSIONS {
            let out = g.present(true, &[proxy, &g.alice], version).await;
            out.assert_alice(&format!("{case} {version:?}"));
        }
    }
}

#[tokio::test]
async fn proxies_of_proxies_are_accepted() {
    let g = grid();
    // RFC 3820: the first proxy allows one more below it (pathlen 1).
    let mut first = rfc3820_spec(&g.alice);
    first.proxy_cert_info = Some((proxy_cert_info(Some(1), INHERIT_ALL), true));
    let first = issue(&first, Some(&g.alice), None);
    let second = issue(&rfc3820_spec(&first), Some(&first), None);
    // Legacy: CN=proxy/CN=proxy.
    let legacy1 = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    let legacy2 = issue(&legacy_spec(&legacy1, false), Some(&legacy1), None);
    // A limited proxy may sign a limited one.
    let limited1 = issue(&legacy_spec(&g.alice, true), Some(&g.alice), None);
    let limited2 = issue(&legacy_spec(&limited1, true), Some(&limited1), None);
    for (case, leaf, middle) in [
        ("RFC 3820", &second, &first),
        ("legacy", &legacy2, &legacy1),
        ("limited", &limited2, &limited1),
    ] {
        for version in VERSIONS {
            let out = g.present(true, &[leaf, middle, &g.alice], version).await;
            assert_eq!(out.dn().0, ALICE_SLASH, "{case} {version:?}");
        }
    }
}

#[tokio::test]
async fn end_entity_certificates_work_with_and_without_proxy_support() {
    let g = grid();
    for proxies in [true, false] {
        for version in VERSIONS {
            let out = g.present(proxies, &[&g.alice], version).await;
            out.assert_alice(&format!("proxy_certificates = {proxies}, {version:?}"));
        }
    }
}

#[tokio::test]
async fn without_proxy_certificates_proxies_are_refused() {
    let g = grid();
    let rfc = rfc3820_proxy(&g.alice);
    let legacy = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    for (case, proxy, why) in [
        ("RFC 3820", &rfc, "UnsupportedCriticalExtension"),
        ("legacy", &legacy, "EndEntityUsedAsCa"),
    ] {
        for version in VERSIONS {
            g.present(false, &[proxy, &g.alice], version)
                .await
                .assert_refused(why, &format!("{case} {version:?}"));
        }
    }
}

#[tokio::test]
async fn broken_proxy_chains_are_refused() {
    let g = grid();
    let alice = &g.alice;
    let proxy = |spec: &Spec| issue(spec, Some(alice), None);
    let mut cases: Vec<(&str, Vec<CertificateDer<'static>>, Cert, &str)> = Vec::new();

    let stranger = rcgen::KeyPair::generate().unwrap();
    let forged = issue(&rfc3820_spec(alice), Some(alice), Some(&stranger));
    cases.push((
        "signed by a different key",
        g.chain(&[&forged, alice]),
        forged,
        "proxy certificate not signed by its issuer",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.subject = Dn::of(&[
        ("C", "CH"),
        ("O", "Other"),
        ("OU", "Users"),
        ("CN", "Alice Smith"),
    ])
    .plus_cn("1234");
    let wrong_subject = proxy(&spec);
    cases.push((
        "subject not the issuer's plus a CN",
        g.chain(&[&wrong_subject, alice]),
        wrong_subject,
        "proxy subject must be issuer subject plus one CN",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.subject = alice.dn.plus_cn("1234").plus_cn("5678");
    let extra_cn = proxy(&spec);
    cases.push((
        "two added CNs",
        g.chain(&[&extra_cn, alice]),
        extra_cn,
        "proxy subject must be issuer subject plus one CN",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.subject = alice.dn.clone().rdn("OU", "1234");
    let not_cn = proxy(&spec);
    cases.push((
        "added RDN is not a CN",
        g.chain(&[&not_cn, alice]),
        not_cn,
        "proxy subject must be issuer subject plus one CN",
    ));

    let mut spec = legacy_spec(alice, false);
    spec.subject = Dn::of(&[("CN", "Mallory"), ("CN", "proxy")]);
    let legacy_wrong_subject = proxy(&spec);
    cases.push((
        "legacy proxy of another subject",
        g.chain(&[&legacy_wrong_subject, alice]),
        legacy_wrong_subject,
        "proxy subject must be issuer subject plus one CN",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.issuer_name = Some(Dn::of(&[("CN", "Somebody Else")]));
    let wrong_issuer = proxy(&spec);
    cases.push((
        "issuer name not the signer's subject",
        g.chain(&[&wrong_issuer, alice]),
        wrong_issuer,
        "proxy issuer name is not its signer's subject",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.years = Some((2000, 2001));
    let expired = proxy(&spec);
    cases.push((
        "expired",
        g.chain(&[&expired, alice]),
        expired,
        "proxy certificate expired",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.years = Some((4000, 4001));
    let future = proxy(&spec);
    cases.push((
        "not yet valid",
        g.chain(&[&future, alice]),
        future,
        "proxy certificate not valid yet",
    ));

    let mut spec = Spec::new(alice_dn());
    spec.ca = true;
    spec.client_auth = true;
    spec.key_usages = signing_usages();
    let ca_user = issue(&spec, Some(&g.intermediate), None);
    let ca_user_proxy = issue(&rfc3820_spec(&ca_user), Some(&ca_user), None);
    cases.push((
        "end-entity with the CA flag",
        g.chain(&[&ca_user_proxy, &ca_user]),
        ca_user_proxy,
        "proxy signed by a CA certificate",
    ));

    let ca_proxy = issue(&rfc3820_spec(&g.intermediate), Some(&g.intermediate), None);
    cases.push((
        "proxy issued directly by a CA",
        g.chain(&[&ca_proxy]),
        ca_proxy,
        "proxy signed by a CA certificate",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.ca = true;
    let proxy_ca = proxy(&spec);
    cases.push((
        "proxy with the CA flag",
        g.chain(&[&proxy_ca, alice]),
        proxy_ca,
        "proxy certificate must not be a CA certificate",
    ));

    let other_root = ca("Other Root CA", None);
    let mallory = user(alice_dn(), &other_root);
    let mallory_proxy = rfc3820_proxy(&mallory);
    cases.push((
        "end-entity from an unknown CA",
        vec![mallory_proxy.der.clone(), mallory.der.clone()],
        mallory_proxy,
        "UnknownIssuer",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.proxy_cert_info = Some((proxy_cert_info(Some(0), INHERIT_ALL), true));
    let no_more = proxy(&spec);
    let below = issue(&rfc3820_spec(&no_more), Some(&no_more), None);
    cases.push((
        "path length 0 exceeded",
        g.chain(&[&below, &no_more, alice]),
        below,
        "proxy path length constraint exceeded",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.proxy_cert_info = Some((proxy_cert_info(Some(1), INHERIT_ALL), true));
    let one_more = proxy(&spec);
    let p2 = issue(&rfc3820_spec(&one_more), Some(&one_more), None);
    let p3 = issue(&rfc3820_spec(&p2), Some(&p2), None);
    cases.push((
        "path length 1 exceeded two levels down",
        g.chain(&[&p3, &p2, &one_more, alice]),
        p3,
        "proxy path length constraint exceeded",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.proxy_cert_info = Some((proxy_cert_info(None, INHERIT_ALL), false));
    let not_critical = proxy(&spec);
    cases.push((
        "ProxyCertInfo not critical",
        g.chain(&[&not_critical, alice]),
        not_critical,
        "ProxyCertInfo extension must be critical",
    ));

    let mut spec = rfc3820_spec(alice);
    spec.proxy_cert_info = Some((proxy_cert_info(None, INDEPENDENT), true));
    let independent = proxy(&spec);
    cases.push((
        "independent proxy",
        g.chain(&[&independent, alice]),
        independent,
        "proxy policy language not supported",
    ));

    let limited = proxy(&legacy_spec(alice, true));
    let full_below_limited = issue(&legacy_spec(&limited, false), Some(&limited), None);
    cases.push((
        "full proxy signed by a limited proxy",
        g.chain(&[&full_below_limited, &limited, alice]),
        full_below_limited,
        "a limited proxy can only sign limited proxies",
    ));

    let legacy = proxy(&legacy_spec(alice, false));
    let rfc_below_legacy = issue(&rfc3820_spec(&legacy), Some(&legacy), None);
    cases.push((
        "RFC 3820 proxy signed by a legacy proxy",
        g.chain(&[&rfc_below_legacy, &legacy, alice]),
        rfc_below_legacy,
        "a proxy chain must not mix RFC 3820 and legacy proxies",
    ));

    let lonely = rfc3820_proxy(alice);
    cases.push((
        "proxy without its end-entity",
        vec![lonely.der.clone()],
        lonely,
        "proxy chain holds no end-entity certificate",
    ));

    let mut spec = Spec::new(alice_dn());
    spec.client_auth = true;
    spec.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
    let no_signing = issue(&spec, Some(&g.intermediate), None);
    let no_signing_proxy = issue(&rfc3820_spec(&no_signing), Some(&no_signing), None);
    cases.push((
        "end-entity key usage without digitalSignature",
        g.chain(&[&no_signing_proxy, &no_signing]),
        no_signing_proxy,
        "proxy signer's key usage does not allow signatures",
    ));

    for (case, chain, signer, why) in &cases {
        for version in VERSIONS {
            handshake(
                g.server_config(true, true),
                Some((chain.clone(), signer)),
                version,
                &g.root,
            )
            .await
            .assert_refused(why, &format!("{case} {version:?}"));
        }
    }
}

#[tokio::test]
async fn handshake_must_be_signed_by_the_leaf_proxy_key() {
    let g = grid();
    let proxy = rfc3820_proxy(&g.alice);
    let legacy = issue(&legacy_spec(&g.alice, false), Some(&g.alice), None);
    for leaf in [&proxy, &legacy] {
        for version in VERSIONS {
            // The chain is valid, but the client signs with the end-entity's key: a holder of
            // a stolen proxy certificate without its key must not get in.
            handshake(
                g.server_config(true, true),
                Some((g.chain(&[leaf, &g.alice]), &g.alice)),
                version,
                &g.root,
            )
            .await
            .assert_refused("BadSignature", &format!("{version:?}"));
        }
    }
}

#[tokio::test]
async fn optional_client_auth_admits_clients_without_a_certificate() {
    let g = grid();
    for proxies in [true, false] {
        for version in VERSIONS {
            let case = format!("proxy_certificates = {proxies}, {version:?}");
            let out = handshake(g.server_config(proxies, false), None, version, &g.root).await;
            assert!(
                matches!(out.server, Ok(None)),
                "{case}: {:?}",
                out.server.err()
            );
            // A certificate is still verified when one is presented.
            let other_root = ca("Other Root CA", None);
            let mallory = user(alice_dn(), &other_root);
            handshake(
                g.server_config(proxies, false),
                Some((vec![mallory.der.clone()], &mallory)),
                version,
                &g.root,
            )
            .await
            .assert_refused("UnknownIssuer", &case);
        }
    }
}

#[tokio::test]
async fn required_client_auth_refuses_clients_without_a_certificate() {
    let g = grid();
    for proxies in [true, false] {
        for version in VERSIONS {
            handshake(g.server_config(proxies, true), None, version, &g.root)
                .await
                .assert_refused(
                    "peer sent no certificates",
                    &format!("proxy_certificates = {proxies}, {version:?}"),
                );
        }
    }
}

#[tokio::test]
async fn dn_forms_escape_and_order_as_specified() {
    let g = grid();
    let dn = Dn::default()
        .rdn("DC", "org")
        .rdn("DC", "example")
        .rdn("O", r#"Example, "Inc." <a;b>\"#)
        .rdn("OU", "R&D/Ops=1+2")
        .rdn("2.5.4.65", "#tag ")
        .typed(
            "L",
            BMP,
            "Zürich".encode_utf16().flat_map(u16::to_be_bytes).collect(),
        )
        .multi(&[("UID", "asmith"), ("CN", "Alice Smith")])
        .rdn("emailAddress", "alice@example.org");
    let odd = user(dn, &g.intermediate);
    let proxy = rfc3820_proxy(&odd);
    let out = handshake(
        g.server_config(true, true),
        Some((g.chain(&[&proxy, &odd]), &proxy)),
        TLS13,
        &g.root,
    )
    .await;
    let (slash, rfc2253) = out.dn();
    // Slash: certificate order, values as they are; the CN sorts before the UID in the
    // multi-valued RDN because its DER encoding is shorter.
    assert_eq!(
        slash,
        r#"/DC=org/DC=example/O=Example, "Inc." <a;b>\/OU=R&D/Ops=1+2/2.5.4.65=#tag /L=Zürich/CN=Alice Smith+UID=asmith/emailAddress=alice@example.org"#
    );
    // RFC 2253: reversed, RFC 4514 escaping.
    assert_eq!(
        rfc2253,
        r#"emailAddress=alice@example.org,CN=Alice Smith+UID=asmith,L=Zürich,2.5.4.65=\#tag\ ,OU=R&D/Ops=1\+2,O=Example\, \"Inc.\" \<a\;b\>\\,DC=example,DC=org"#
    );
}

#[test]
fn dn_of_unusual_values() {
    let g = grid();
    let dn = Dn::default()
        .rdn("CN", " lead")
        .typed("2.5.4.45", 0x02, vec![5])
        .rdn("CN", "tab\there")
        .typed("CN", 0x14, vec![b'M', 0xfc, b'n']);
    let odd = user(dn, &g.intermediate);
    let chain = vec![odd.der.clone()];
    assert_eq!(
        end_entity_dn(&chain, DnFormat::Slash).unwrap(),
        r"/CN= lead/2.5.4.45=#020105/CN=tab\x09here/CN=Mün"
    );
    assert_eq!(
        end_entity_dn(&chain, DnFormat::Rfc2253).unwrap(),
        r"CN=Mün,CN=tab\09here,2.5.4.45=#020105,CN=\ lead"
    );
    // Not an identity: a CA, a lone proxy, an empty subject.
    assert!(end_entity_dn(std::slice::from_ref(&g.intermediate.der), DnFormat::Slash).is_err());
    let proxy = rfc3820_proxy(&g.alice);
    assert!(end_entity_dn(std::slice::from_ref(&proxy.der), DnFormat::Slash).is_err());
    let empty = user(Dn::default(), &g.intermediate);
    assert!(end_entity_dn(std::slice::from_ref(&empty.der), DnFormat::Slash).is_err());
    assert!(end_entity_dn(&[], DnFormat::Slash).is_err());
}

/// A one-request HTTPS server on `server_config` answering the client's identity in both
/// forms, for curl.
async fn identity_server(config: Arc<ServerConfig>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Ok(mut stream) = tokengate::tls::handshake(&acceptor, tcp).await else {
            return;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let body = match (
            end_entity_dn(chain, DnFormat::Slash),
            end_entity_dn(chain, DnFormat::Rfc2253),
        ) {
            (Ok(slash), Ok(rfc2253)) => format!("{slash}\n{rfc2253}\n"),
            (Err(e), _) | (_, Err(e)) => format!("no identity: {e}\n"),
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_presents_a_proxy_chain() {
    let g = grid();
    let proxy = rfc3820_proxy(&g.alice);
    let dir = g.dir.path();
    // As voms-proxy-init writes it: the proxy, then the certificates that signed it.
    let chain_pem = [proxy.pem(), g.alice.pem(), g.intermediate.pem()].concat();
    std::fs::write(dir.join("proxy.pem"), chain_pem).unwrap();
    std::fs::write(dir.join("proxy-key.pem"), proxy.key_pem()).unwrap();
    for tls in [
        ["--tlsv1.2", "--tls-max", "1.2"],
        ["--tlsv1.3", "--tls-max", "1.3"],
    ] {
        let (port, server) = identity_server(g.server_config(true, true)).await;
        let args: Vec<String> = [
            "-sS",
            "--http1.1",
            "--max-time",
            "20",
            "--cacert",
            &dir.join("ca.pem").display().to_string(),
            "--cert",
            &dir.join("proxy.pem").display().to_string(),
            "--key",
            &dir.join("proxy-key.pem").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(tls.iter().map(|s| s.to_string()))
        .chain([format!("https://localhost:{port}/auth/x509_proxy")])
        .collect();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(&args)
                .output()
                .expect("curl is installed")
        })
        .await
        .unwrap();
        server.await.unwrap();
        assert!(
            output.status.success(),
            "curl {tls:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("{ALICE_SLASH}\n{ALICE_RFC2253}\n"),
            "curl {tls:?}"
        );
    }
}
