//! The real client address behind trusted proxies (`[server] trusted_proxies`): the socket's
//! peer, and the `X-Forwarded-For` entries it and the proxies before it appended, read right to
//! left; the first address outside the trusted networks is the client. A client can prepend
//! whatever it likes to `X-Forwarded-For`, but every trusted proxy appends the address it saw,
//! so a forged left-most entry changes nothing. A leaf: data and pure functions.

use std::net::IpAddr;

use http::HeaderValue;
use ipnet::IpNet;

/// The networks whose `X-Forwarded-For` is believed; empty: the client is the socket's peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// `10.0.0.0/8`, `fd00::/8`, or a single address (`192.0.2.7`, a /32 or /128).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(network) = text.parse::<IpNet>() {
        // `10.1.2.3/8` means 10.0.0.0/8; say it as the network.
        return Ok(network.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is neither a network (10.0.0.0/8) nor an address"))
}

impl TrustedProxies {
    /// The networks given.
    pub fn new(networks: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(networks)
    }

    /// Whether any proxy is trusted (else every client is its socket's peer).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client behind `peer`, from the `X-Forwarded-For` values in the order they arrived:
    /// right to left, trusted hops skipped; the first untrusted address is the client. All
    /// trusted: the left-most address read. An entry that is not an address ends the walk
    /// (nothing left of it can be believed): the last trusted hop is the client.
    pub fn client<'h>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'h HeaderValue>,
    ) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for value in forwarded_for.rev() {
            let Ok(text) = value.to_str() else {
                return client;
            };
            for entry in text.rsplit(',') {
                let Some(ip) = parse_entry(entry) else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`, `192.0.2.1:4711`,
/// `[2001:db8::1]:4711`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        return inside.parse::<IpAddr>().ok().map(canonical);
    }
    let (host, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// An IPv4 address written as IPv6 (`::ffff:192.0.2.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|n| parse_network(n).unwrap()).collect())
    }

    fn client(trusted: &TrustedProxies, peer: &str, xff: &[&str]) -> String {
        let values: Vec<HeaderValue> = xff
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        trusted
            .client(peer.parse().unwrap(), values.iter())
            .to_string()
    }

    #[test]
    fn the_first_untrusted_address_from_the_right_is_the_client() {
        let t = proxies(&["10.0.0.0/8", "192.0.2.7"]);
        // No trusted proxy: the peer, whatever the header says.
        assert_eq!(
            client(&TrustedProxies::default(), "10.1.1.1", &["203.0.113.9"]),
            "10.1.1.1"
        );
        // An untrusted peer's header is not read.
        assert_eq!(client(&t, "198.51.100.1", &["203.0.113.9"]), "198.51.100.1");
        // Through one trusted proxy.
        assert_eq!(client(&t, "10.1.1.1", &["203.0.113.9"]), "203.0.113.9");
        // A forged left-most entry changes nothing.
        assert_eq!(
            client(&t, "10.1.1.1", &["6.6.6.6, 203.0.113.9"]),
            "203.0.113.9"
        );
        assert_eq!(
            client(&t, "10.1.1.1", &["6.6.6.6", "203.0.113.9"]),
            "203.0.113.9"
        );
        // Two trusted hops.
        assert_eq!(
            client(&t, "10.1.1.1", &["203.0.113.9, 192.0.2.7"]),
            "203.0.113.9"
        );
        // Every hop trusted: the left-most.
        assert_eq!(client(&t, "10.1.1.1", &["10.2.2.2, 10.3.3.3"]), "10.2.2.2");
        // No header: the trusted peer itself.
        assert_eq!(client(&t, "10.1.1.1", &[]), "10.1.1.1");
        // Garbage ends the walk at the last trusted hop.
        assert_eq!(
            client(&t, "10.1.1.1", &["203.0.113.9, nonsense"]),
            "10.1.1.1"
        );
        assert_eq!(client(&t, "10.1.1.1", &["nonsense, 10.4.4.4"]), "10.4.4.4");
        // Ports, brackets, mapped IPv4.
        assert_eq!(client(&t, "10.1.1.1", &["203.0.113.9:4711"]), "203.0.113.9");
        assert_eq!(
            client(&t, "10.1.1.1", &["[2001:db8::1]:4711"]),
            "2001:db8::1"
        );
        assert_eq!(
            client(&t, "::ffff:10.1.1.1", &["::ffff:203.0.113.9"]),
            "203.0.113.9"
        );
    }

    proptest::proptest! {
        /// Whatever a client writes into X-Forwarded-For (any bytes a header may hold): no
        /// panic, and an untrusted peer's header is never believed.
        #[test]
        fn any_forwarded_for_is_read_without_panic(raw in proptest::collection::vec(
            proptest::collection::vec(0x20u8..0x7f, 0..64), 0..4)
        ) {
            let t = proxies(&["10.0.0.0/8", "::1"]);
            let values: Vec<HeaderValue> = raw
                .iter()
                .filter_map(|v| HeaderValue::from_bytes(v).ok())
                .collect();
            let _ = t.client("10.9.9.9".parse().unwrap(), values.iter());
            let untrusted: IpAddr = "198.51.100.1".parse().unwrap();
            proptest::prop_assert_eq!(t.client(untrusted, values.iter()), untrusted);
        }
    }

    #[test]
    fn networks_parse_or_say_why() {
        assert_eq!(
            parse_network("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_network("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(parse_network("::1").unwrap().to_string(), "::1/128");
        assert!(parse_network("10.0.0.0/33")
            .unwrap_err()
            .contains("neither"));
        assert!(parse_network("proxy.local").is_err());
    }
}
