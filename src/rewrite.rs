//! Rewrite: what the upstream sees. Header work is split by purpose: credentials and spoofable
//! identity headers out, the upstream's own credential form and the verified identity in,
//! hop-by-hop headers out (both ways), forwarding headers set.

use std::net::IpAddr;

use http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Uri};

use crate::config::RouteConfig;
use crate::credential::{cookies, query_pairs, Source};
use crate::validate::Identity;

/// A header value with placeholders: `{token}`, `{subject}`, `{account}`, `{dn}`, `{token_id}`,
/// `{source}`. Parsed once at config load.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Token,
    Subject,
    Account,
    Dn,
    TokenId,
    Source,
}

impl std::fmt::Debug for Template {
    // A template may hold a fixed service secret: show its shape only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for piece in &self.pieces {
            f.write_str(match piece {
                Piece::Literal(_) => "[literal]",
                Piece::Token => "{token}",
                Piece::Subject => "{subject}",
                Piece::Account => "{account}",
                Piece::Dn => "{dn}",
                Piece::TokenId => "{token_id}",
                Piece::Source => "{source}",
            })?;
        }
        Ok(())
    }
}

/// What placeholders are filled from.
#[derive(Clone, Copy, Default)]
pub struct Values<'a> {
    /// The client's credential.
    pub token: Option<&'a str>,
    /// The verified identity.
    pub identity: Option<&'a Identity>,
    /// Where the credential came from.
    pub source: Option<&'a str>,
    /// The DN of a verified client certificate on the connection, used for `{dn}` when the
    /// identity has none of its own.
    pub client_dn: Option<&'a str>,
}

impl Template {
    /// Parses a template; an unknown `{placeholder}` is an error.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else {
                break;
            };
            let name = &rest[start + 1..start + len];
            let piece = match name {
                "token" => Piece::Token,
                "subject" => Piece::Subject,
                "account" => Piece::Account,
                "dn" => Piece::Dn,
                "token_id" => Piece::TokenId,
                "source" => Piece::Source,
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{name}}}: expected {{token}}, {{subject}}, \
                         {{account}}, {{dn}}, {{token_id}} or {{source}}"
                    ))
                }
            };
            if start > 0 {
                pieces.push(Piece::Literal(rest[..start].to_string()));
            }
            pieces.push(piece);
            rest = &rest[start + len + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_string()));
        }
        let template = Template { pieces };
        // A literal that cannot be a header value is a config error, not a per-request one.
        if let Some(Piece::Literal(l)) = template
            .pieces
            .iter()
            .find(|p| matches!(p, Piece::Literal(l) if HeaderValue::from_str(l).is_err()))
        {
            return Err(format!(
                "{:?} cannot be part of a header value",
                l.escape_debug().to_string()
            ));
        }
        Ok(template)
    }

    /// Whether the template uses the client's credential.
    pub fn uses_token(&self) -> bool {
        self.pieces.contains(&Piece::Token)
    }

    /// The rendered header value; `None` when a placeholder has no value here or the result is
    /// empty (the header is then not set).
    pub fn render(&self, values: &Values<'_>) -> Option<HeaderValue> {
        fn value_of<'v>(piece: &'v Piece, values: &Values<'v>) -> Option<&'v str> {
            let identity = values.identity;
            match piece {
                Piece::Literal(l) => Some(l.as_str()),
                Piece::Token => values.token,
                Piece::Subject => identity.map(|i| i.subject.as_str()),
                Piece::Account => identity.map(|i| i.account.as_str()),
                Piece::Dn => identity.and_then(|i| i.dn.as_deref()).or(values.client_dn),
                Piece::TokenId => identity.and_then(|i| i.token_id.as_deref()),
                Piece::Source => values.source,
            }
        }
        let value = if let [piece] = self.pieces.as_slice() {
            HeaderValue::from_str(value_of(piece, values)?).ok()?
        } else {
            let mut text = String::with_capacity(64);
            for piece in &self.pieces {
                text.push_str(value_of(piece, values)?);
            }
            HeaderValue::try_from(text).ok()?
        };
        (!value.is_empty()).then_some(value)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the de-facto ones), never forwarded.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and the headers the `Connection` header names. For an upgrade
/// (`upgrade` is the protocol), `Connection: upgrade` and `Upgrade` are kept.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| n != header::UPGRADE)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
}

/// The protocol an upgrade request asks for (`Connection: upgrade` + `Upgrade: X`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<&HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE)
    } else {
        None
    }
}

/// Removes every configured credential source from the request: headers, the query parameter
/// and the cookie (other parameters and cookies are kept).
pub fn strip_credentials(parts: &mut Parts, sources: &[Source]) {
    for source in sources {
        match source {
            Source::Query(name) => {
                let Some(query) = parts.uri.query() else {
                    continue;
                };
                if !query_pairs(query).any(|(k, _)| k == name) {
                    continue;
                }
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        !pair.is_empty() && pair.split_once('=').map_or(*pair, |(k, _)| k) != name
                    })
                    .collect();
                let path = parts.uri.path();
                let path_and_query = if kept.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{}", kept.join("&"))
                };
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.path_and_query = path_and_query.parse().ok();
                parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
            }
            Source::Cookie(name) => {
                if !cookies(&parts.headers).any(|(k, _)| k == name) {
                    continue;
                }
                let kept: Vec<String> = parts
                    .headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .map(str::trim)
                    .filter(|pair| {
                        !pair.is_empty()
                            && pair.split_once('=').map_or(*pair, |(k, _)| k.trim()) != name
                    })
                    .map(str::to_string)
                    .collect();
                parts.headers.remove(header::COOKIE);
                if !kept.is_empty() {
                    if let Ok(v) = HeaderValue::try_from(kept.join("; ")) {
                        parts.headers.insert(header::COOKIE, v);
                    }
                }
            }
            _ => {
                if let Some(name) = source.header() {
                    parts.headers.remove(name);
                }
            }
        }
    }
}

/// Everything the upstream request needs besides the original request.
pub struct Forwarding<'a> {
    /// The client's address.
    pub client_ip: IpAddr,
    /// Whether the client spoke TLS to us.
    pub tls: bool,
    /// Placeholder values.
    pub values: Values<'a>,
}

/// Turns the client's request head into the upstream's: strips credentials, spoofable identity
/// headers and hop-by-hop headers; sets the upstream's credential form, the identity headers and
/// `X-Forwarded-*`; points the URI at the upstream.
pub fn request(parts: &mut Parts, route: &RouteConfig, sources: &[Source], fwd: &Forwarding<'_>) {
    let upgrade = upgrade_protocol(&parts.headers).cloned();
    remove_hop_by_hop(&mut parts.headers, upgrade.as_ref());
    strip_credentials(parts, sources);

    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    let headers = &mut parts.headers;
    for (name, template) in &route.identity_headers {
        headers.remove(name);
        if fwd.values.identity.is_some() {
            if let Some(value) = template.render(&fwd.values) {
                headers.insert(name.clone(), value);
            }
        }
    }
    if let Some((name, template)) = &route.upstream_auth {
        headers.remove(name);
        if let Some(value) = template.render(&fwd.values) {
            headers.insert(name.clone(), value);
        }
    }

    // X-Forwarded-For appends, as nginx's $proxy_add_x_forwarded_for does.
    let client_ip = fwd.client_ip.to_string();
    // Several incoming lines form one list (RFC 9110 §5.3): keep every one, in order.
    let mut xff = String::new();
    for line in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(text) = line.to_str() {
            let text = text.trim();
            if !text.is_empty() {
                xff.push_str(text);
                xff.push_str(", ");
            }
        }
    }
    xff.push_str(&client_ip);
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if fwd.tls { "https" } else { "http" }),
    );
    match &original_host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    if route.preserve_host {
        if let Some(host) = original_host {
            headers.insert(header::HOST, host);
        }
    } else {
        // The client sets Host from the URI's authority.
        headers.remove(header::HOST);
    }

    let mut uri = route.upstream.clone().into_parts();
    uri.path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
    // The pooled client speaks HTTP/1.1 to the upstream whatever the client spoke to us.
    parts.version = http::Version::HTTP_11;
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            subject: "alice".into(),
            account: "ops".into(),
            dn: None,
            token_id: None,
            validator: "static",
            expires: None,
            usage: None,
        }
    }

    #[test]
    fn templates() {
        let id = identity();
        let values = Values {
            token: Some("t1"),
            identity: Some(&id),
            source: Some("bearer"),
            client_dn: None,
        };
        let render = |t: &str| Template::parse(t).unwrap().render(&values);
        assert_eq!(render("{token}").unwrap(), "t1");
        assert_eq!(render("Bearer {token}").unwrap(), "Bearer t1");
        assert_eq!(
            render("{subject}@{account} via {source}").unwrap(),
            "alice@ops via bearer"
        );
        assert_eq!(render("fixed-secret").unwrap(), "fixed-secret");
        assert!(render("{dn}").is_none(), "no dn: header not set");
        let with_cert = Values {
            client_dn: Some("/CN=Client"),
            ..Values::default()
        };
        let dn = Template::parse("{dn}").unwrap();
        assert_eq!(dn.render(&with_cert).unwrap(), "/CN=Client");
        assert!(Template::parse("{nope}").is_err());
        assert_eq!(
            format!("{:?}", Template::parse("key {token}").unwrap()),
            "[literal]{token}"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn strips_query_and_cookie_only() {
        let req = http::Request::builder()
            .uri("/a?x=1&access_token=t&y=2")
            .header("cookie", "a=1; session=t; b=2")
            .header("x-auth-token", "t")
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        let sources = vec![
            Source::XAuthToken,
            Source::parse("query:access_token").unwrap(),
            Source::parse("cookie:session").unwrap(),
        ];
        strip_credentials(&mut parts, &sources);
        assert_eq!(parts.uri, "/a?x=1&y=2");
        assert_eq!(parts.headers["cookie"], "a=1; b=2");
        assert!(!parts.headers.contains_key("x-auth-token"));
    }
}
