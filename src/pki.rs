//! `tokengate pki`: a private CA, a server certificate and a client certificate for trying TLS
//! and the x509 token exchange locally. Version 3 certificates with the extensions TLS stacks
//! check (basic constraints, key usage, the right extended key usage, subject alternative
//! names), ECDSA P-256 keys. For tests and trials, not for production.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::string::PrintableString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The client certificate's subject when none is given: the DN `examples/rucio.toml` maps.
pub const DEFAULT_CLIENT_DN: &str = "/C=CH/O=Example/OU=Users/CN=Alice Smith";

/// What `tokengate pki` makes.
pub struct Request<'a> {
    /// The folder the files are written to (created if missing).
    pub dir: &'a Path,
    /// Names (DNS or IP) the server certificate is valid for, besides localhost, 127.0.0.1
    /// and ::1.
    pub hosts: &'a [String],
    /// The client certificate's subject, in slash form (`/C=CH/O=Example/CN=Alice`).
    pub client_dn: &'a str,
    /// Validity in days.
    pub days: u32,
}

/// The files written, in order.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// Makes the CA and both certificates and writes them; refuses to overwrite any file.
pub fn make(request: &Request<'_>) -> Result<Vec<PathBuf>, String> {
    let client_dn = parse_dn(request.client_dn)?;
    let paths: Vec<PathBuf> = FILES.iter().map(|f| request.dir.join(f)).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(format!(
            "{} exists: pki never overwrites keys; choose another --dir or remove the files",
            existing.display()
        ));
    }
    std::fs::create_dir_all(request.dir)
        .map_err(|e| format!("cannot create {}: {e}", request.dir.display()))?;
    let failed = |e: rcgen::Error| format!("cannot make a certificate: {e}");
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(request.days.max(1)));
    };

    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tokengate pki");
        dn.push(DnType::CommonName, "tokengate test CA");
        dn
    };
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate().map_err(failed)?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(request.hosts.iter().cloned());
    let mut server = CertificateParams::default();
    server.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names[3..].first().map_or("localhost", |h| h),
        );
        dn
    };
    server.subject_alt_names =
        names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name.as_str().try_into().map(SanType::DnsName).map_err(|_| {
                    format!("--host {name:?} is neither a DNS name nor an IP address")
                }),
            })
            .collect::<Result<_, _>>()?;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_cert = server.signed_by(&server_key, &issuer).map_err(failed)?;

    let client_key = KeyPair::generate().map_err(failed)?;
    let mut client = CertificateParams::default();
    client.distinguished_name = client_dn;
    // Grid tools sign proxies with the user certificate's key: digitalSignature, as theirs.
    client.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let client_cert = client.signed_by(&client_key, &issuer).map_err(failed)?;

    let contents = [
        (ca_cert.pem(), false),
        (ca_key.serialize_pem(), true),
        (server_cert.pem(), false),
        (server_key.serialize_pem(), true),
        (client_cert.pem(), false),
        (client_key.serialize_pem(), true),
    ];
    for (path, (text, secret)) in paths.iter().zip(contents) {
        write_new(path, &text, secret)?;
    }
    Ok(paths)
}

/// Creates `path` (never replacing a file); keys readable by the owner only.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `/C=CH/O=Example/OU=Users/CN=Alice Smith`: each of C, ST, L, O, OU, CN at most once.
fn parse_dn(text: &str) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!(
            "--client-dn {text:?}: expected the slash form, e.g. \"{DEFAULT_CLIENT_DN}\""
        ));
    };
    let mut seen = Vec::new();
    for part in rest.split('/') {
        let (name, value) = part
            .split_once('=')
            .filter(|(_, v)| !v.is_empty())
            .ok_or_else(|| format!("--client-dn: {part:?} is not NAME=value"))?;
        let kind = match name {
            "C" => DnType::CountryName,
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "CN" => DnType::CommonName,
            other => {
                return Err(format!(
                    "--client-dn: attribute {other:?}: one of C, ST, L, O, OU, CN"
                ))
            }
        };
        if seen.contains(&name) {
            return Err(format!("--client-dn: {name} appears twice"));
        }
        seen.push(name);
        if kind == DnType::CountryName {
            // PrintableString, as RFC 5280 has it and as OpenSSL writes it: a proxy made with
            // `openssl req -subj` then extends this subject byte for byte.
            let printable = PrintableString::try_from(value)
                .map_err(|_| format!("--client-dn: C={value:?} is not a printable string"))?;
            dn.push(kind, DnValue::PrintableString(printable));
        } else {
            dn.push(kind, value);
        }
    }
    if !seen.contains(&"CN") {
        return Err("--client-dn needs a CN".to_string());
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slash_dns_parse_and_bad_ones_are_named() {
        assert!(parse_dn(DEFAULT_CLIENT_DN).is_ok());
        for (bad, says) in [
            ("CN=x", "slash form"),
            ("/CN=x/CN=y", "twice"),
            ("/O=x", "needs a CN"),
            ("/DC=x/CN=y", "one of"),
            ("/CN=", "NAME=value"),
        ] {
            let error = parse_dn(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
