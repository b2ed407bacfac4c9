//! Rewrite: what the upstream sees. Header work is split by purpose: credentials and spoofable
//! identity headers out, the upstream's own credential form and the verified identity in,
//! hop-by-hop headers out (both ways), forwarding headers set.

use http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Uri};

use crate::config::{Config, RouteConfig};
use crate::credential::{names_match, query_pairs, Source};

pub use crate::template::{Template, Unrenderable, Values};

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the de-facto ones), never forwarded.
/// Whether a header is hop-by-hop (RFC 9110 §7.6.1, and the old `Keep-Alive` and
/// `Proxy-Connection`); `Upgrade` is handled by the callers.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            // Reserved (RFC 9110 §7.6.1): it would clash with the `close` option.
            | "close"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
    )
}

/// Removes every header whose name `doomed` says, scanning the names once per removal.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|name| doomed(name)).cloned() {
        headers.remove(&name);
    }
}

/// Removes hop-by-hop headers, and the headers the `Connection` header names. For an upgrade
/// (`upgrade` is the protocol), `Connection: upgrade` and `Upgrade` are kept.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    // The options every `Connection` header carries (`keep-alive`, `close`, `upgrade`) name
    // headers that are removed below anyway: only other names are parsed (and, when there are
    // any, collected).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| {
            let n = n.as_bytes();
            !(n.eq_ignore_ascii_case(b"keep-alive")
                || n.eq_ignore_ascii_case(b"close")
                || n.eq_ignore_ascii_case(b"upgrade"))
        })
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| n != header::UPGRADE && !set_by_the_gate(n))
        .collect();
    for name in named {
        headers.remove(name);
    }
    remove_where(headers, |name| name == header::UPGRADE || hop_by_hop(name));
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

/// The header boundary every route shares (SPEC §9): what no client may send to any upstream,
/// whatever the route's `auth` mode.
pub struct Boundary {
    /// Removed from every request, beside [`always_removed`]: every credential source's
    /// header, every route's `upstream_auth` and identity headers (kept sources excepted), and
    /// `[server] strip_headers`.
    headers: Vec<HeaderName>,
    /// Bit `n` is set when a name in `headers` is `n` bytes long (63: longer), so that most of
    /// a request's headers are let through without comparing names.
    lengths: u64,
    /// Query and cookie credential sources removed from every request (kept ones excepted).
    parameters: Vec<Source>,
    /// Forward header names with `_`.
    allow_underscores: bool,
}

impl Boundary {
    /// The boundary of a config.
    pub fn new(config: &Config) -> Boundary {
        let mut headers: Vec<HeaderName> = Vec::new();
        let mut add = |name: &HeaderName| {
            if !headers.contains(name) {
                headers.push(name.clone());
            }
        };
        for source in &config.sources {
            if let Some(name) = source.header() {
                if !config.keep.contains(source) {
                    add(name);
                }
            }
        }
        for name in &config.server.strip_headers {
            add(name);
        }
        for route in &config.routes {
            for (name, _) in &route.identity_headers {
                add(name);
            }
            if let Some((name, _)) = &route.upstream_auth {
                add(name);
            }
        }
        let lengths = headers.iter().fold(0, |mask, name| mask | length_bit(name));
        Boundary {
            headers,
            lengths,
            parameters: config
                .sources
                .iter()
                .filter(|s| matches!(s, Source::Query(_) | Source::Cookie(_)))
                .filter(|s| !config.keep.contains(s))
                .cloned()
                .collect(),
            allow_underscores: config.server.allow_underscores_in_headers,
        }
    }

    /// Whether a client's header may be forwarded under this name: letters, digits and `-`
    /// only (and `_` when allowed), as nginx's `ignore_invalid_headers`. Frameworks fold `_`,
    /// `.` and other punctuation into `-` or `_` (`X_Auth_User` is read as `X-Auth-User`), so
    /// such a name could impersonate a header the gate removed.
    fn forwardable(&self, name: &HeaderName) -> bool {
        name.as_str()
            .bytes()
            .all(|b| NAME_BYTE[usize::from(b)] || (b == b'_' && self.allow_underscores))
    }

    /// The path and query the upstream gets for `uri` (normalised): credential parameters
    /// removed (kept sources excepted).
    pub fn forwarded_path_and_query(&self, uri: &Uri) -> HeaderValue {
        let mut uri = uri.clone();
        for source in &self.parameters {
            if let Source::Query(name) = source {
                strip_query_parameter(&mut uri, name);
            }
        }
        let text = uri.path_and_query().map_or("/", |p| p.as_str());
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("/"))
    }

    /// Removes everything a client may not send upstream: the boundary's headers, underscore
    /// names, and credential query parameters and cookies (other parameters and cookies kept).
    pub fn strip(&self, parts: &mut Parts) {
        // One pass over what the client sent (a handful of headers) rather than a hash lookup
        // for every name the boundary knows.
        remove_where(&mut parts.headers, |name| {
            !self.forwardable(name)
                || always_removed(name)
                || (self.lengths & length_bit(name) != 0 && self.headers.contains(name))
        });
        for source in &self.parameters {
            match source {
                Source::Query(name) => strip_query_parameter(&mut parts.uri, name),
                Source::Cookie(name) => strip_cookie(&mut parts.headers, name),
                _ => {}
            }
        }
    }
}

/// Letters, digits and `-`: what a forwarded header name may hold (see `forwardable`).
const NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric() || b == b'-' as usize;
        b += 1;
    }
    table
};

/// A header name's bit in [`Boundary::lengths`].
fn length_bit(name: &HeaderName) -> u64 {
    1 << name.as_str().len().min(63)
}

/// Removes every `name` parameter (compared after percent-decoding) from the query.
fn strip_query_parameter(uri: &mut Uri, name: &str) {
    let Some(query) = uri.query() else {
        return;
    };
    if !query_pairs(query).any(|(k, _)| names_match(k, name)) {
        return;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            !pair.is_empty() && !names_match(pair.split_once('=').map_or(*pair, |(k, _)| k), name)
        })
        .collect();
    let path = uri.path();
    let path_and_query = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    set_path_and_query(uri, &path_and_query);
}

/// Replaces the URI's path and query (a value that came from a valid URI).
pub fn set_path_and_query(uri: &mut Uri, path_and_query: &str) {
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    *uri = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
}

/// Removes every `name` cookie (compared after percent-decoding), keeping the others.
fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let lines = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
    };
    let is_named =
        |pair: &str| names_match(pair.split_once('=').map_or(pair, |(k, _)| k.trim()), name);
    if !lines().any(is_named) {
        return;
    }
    let kept: Vec<String> = lines()
        .filter(|pair| !is_named(pair))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::try_from(kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The `Sec-WebSocket-Accept` an upstream must answer for a client's `Sec-WebSocket-Key`
/// (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(context.finish())
}

/// Whether an upstream's `101` completes the upgrade the client asked for: the same protocol
/// and, for WebSocket, the right `Sec-WebSocket-Accept`. Anything else must not open a tunnel:
/// an upstream that says 101 without switching would read the client's next bytes as requests
/// the gate never saw.
pub fn upgrade_completes(
    asked: &HeaderValue,
    key: Option<&HeaderValue>,
    response: &HeaderMap,
) -> bool {
    let Some(answered) = response.get(header::UPGRADE) else {
        return false;
    };
    if !answered.as_bytes().eq_ignore_ascii_case(asked.as_bytes()) {
        return false;
    }
    if !asked.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return true;
    }
    match (key, response.get(header::SEC_WEBSOCKET_ACCEPT)) {
        (Some(key), Some(accept)) => {
            accept.as_bytes() == websocket_accept(key.as_bytes()).as_bytes()
        }
        _ => false,
    }
}

/// Removed from every request whatever the config (SPEC §9): forwarding headers only the gate
/// may set; the headers legacy apps and frameworks trust as the user's identity or address
/// (Apache `REMOTE_USER` setups, oauth2-proxy's, Grafana's, Jenkins'); the headers with which
/// IIS, Symfony, Laravel and others let a request name a different path or method than the one
/// the gate routed (`X-Original-URL: /api/secret` on an open route); and the ones that claim a
/// scheme; the forwarding headers the gate sets itself, and the forward-auth headers of
/// `[verify]`. Every `X-Auth-Request-*` goes too ([`AUTH_REQUEST_PREFIX`]).
fn always_removed(name: &HeaderName) -> bool {
    // One `match` on the name (by length, then bytes): no scan of a list per header.
    matches!(
        name.as_str(),
        "forwarded"
            | "x-real-ip"
            | "remote-user"
            | "x-remote-user"
            | "x-forwarded-user"
            | "x-forwarded-email"
            | "x-forwarded-groups"
            | "x-forwarded-preferred-username"
            | "x-forwarded-access-token"
            | "x-forwarded-prefix"
            | "x-forwarded-port"
            | "x-forwarded-server"
            | "true-client-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "client-ip"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
            | "x-forwarded-uri"
            | "x-forwarded-path"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-forwarded-scheme"
            | "x-forwarded-ssl"
            | "front-end-https"
            | "x-url-scheme"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-original-method"
            | "x-tokengate-uri"
            | "x-tokengate-verify"
    ) || name.as_str().starts_with(AUTH_REQUEST_PREFIX)
}

/// oauth2-proxy's `X-Auth-Request-User`, `-Email`, `-Groups`, `-Access-Token`, …: every header
/// with this prefix is removed.
const AUTH_REQUEST_PREFIX: &str = "x-auth-request-";

/// Headers the gate sets itself, which a client's `Connection` header may not name for removal
/// (they are set after hop-by-hop removal, or must survive it).
fn set_by_the_gate(name: &HeaderName) -> bool {
    name == header::HOST
        || matches!(
            name.as_str(),
            "x-request-id"
                | "traceparent"
                | "tracestate"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
        )
}

/// Everything the upstream request needs besides the original request.
pub struct Forwarding<'a> {
    /// The client's address, as a header value.
    pub client_ip: &'a HeaderValue,
    /// Whether the client spoke TLS to us.
    pub tls: bool,
    /// Placeholder values.
    pub values: Values<'a>,
    /// The route's `upstream_auth` value when it was rendered already (with the credential);
    /// `None`: rendered here from `values`.
    pub upstream_credential: Option<HeaderValue>,
    /// The upstream's `host:port`: `Host` when the client's is not kept (or there is none).
    pub upstream_host: &'a HeaderValue,
}

/// Turns the client's request head into the upstream's: strips what the boundary forbids
/// (credentials, identity headers of any route, underscore names) and hop-by-hop headers;
/// sets the upstream's credential form, the identity headers and `X-Forwarded-*`; points the
/// URI at the upstream. `upgrade` is the protocol the route lets this request upgrade to;
/// without it, any `Upgrade` the client asked for is dropped.
pub fn request(
    parts: &mut Parts,
    route: &RouteConfig,
    boundary: &Boundary,
    fwd: Forwarding<'_>,
    upgrade: Option<&HeaderValue>,
) -> Result<(), Unrenderable> {
    remove_hop_by_hop(&mut parts.headers, upgrade);
    boundary.strip(parts);

    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    let headers = &mut parts.headers;
    // Room for what is set below at once: one growth of the map, not one per insert.
    headers.reserve(route.identity_headers.len() + 4);
    if fwd.values.identity.is_some() {
        for (name, template) in &route.identity_headers {
            if let Some(value) = template.render_checked(&fwd.values)? {
                headers.insert(name.clone(), value);
            }
        }
    }
    if let Some((name, template)) = &route.upstream_auth {
        let value = match fwd.upstream_credential {
            Some(rendered) => Some(rendered),
            None => template.render_checked(&fwd.values)?,
        };
        if let Some(value) = value {
            headers.insert(name.clone(), value);
        }
    }

    // X-Forwarded-For appends, as nginx's $proxy_add_x_forwarded_for does.
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(vacant) => {
            // The common case: the client's address, made once per connection.
            vacant.insert(fwd.client_ip.clone());
        }
        header::Entry::Occupied(occupied) => {
            // Several incoming lines form one list (RFC 9110 §5.3): keep every one, in order.
            let mut xff = String::new();
            for line in occupied.iter() {
                if let Ok(text) = line.to_str() {
                    let text = text.trim();
                    if !text.is_empty() {
                        xff.push_str(text);
                        xff.push_str(", ");
                    }
                }
            }
            xff.push_str(fwd.client_ip.to_str().unwrap_or_default());
            if let Ok(v) = HeaderValue::try_from(xff) {
                let mut occupied = occupied;
                occupied.insert(v);
            }
        }
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
    let host = match original_host {
        Some(host) if route.preserve_host => host,
        _ => fwd.upstream_host.clone(),
    };
    headers.insert(header::HOST, host);

    // Origin-form: the upstream connection is chosen by the route, the request line carries
    // only the (normalised) path and query.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path_and_query);
    }
    // The pool speaks HTTP/1.1 to the upstream whatever the client spoke to us.
    parts.version = http::Version::HTTP_11;
    Ok(())
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn identity() -> Identity {
        Identity::of(
            crate::identity::principal("alice", "ops", None),
            crate::identity::ValidatedBy::Static,
        )
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
    fn the_usual_connection_options_still_take_their_headers_along() {
        for connection in [
            "keep-alive",
            "close",
            "Keep-Alive, Upgrade",
            " CLOSE ,x-hop",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(connection));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("close", HeaderValue::from_static("reserved"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut h, None);
            let mut left: Vec<_> = h.keys().map(|n| n.as_str()).collect();
            left.sort_unstable();
            let hop_named = connection.contains("x-hop");
            let want: &[&str] = if hop_named {
                &["x-kept"]
            } else {
                &["x-hop", "x-kept"]
            };
            assert_eq!(left, want, "Connection: {connection}");
        }
    }

    /// Two routes: `/api` (required, with an upstream credential form and identity headers)
    /// and `/public` (`auth = "none"`); sources in every dialect.
    const TWO_ROUTES: &str = r#"
[[route]]
path_prefix = "/api"
upstream = "http://127.0.0.1:1"
[route.upstream_auth]
header = "X-Legacy-Key"
value = "{token}"
[route.identity_headers]
"X-Auth-User" = "{subject}"
"X-Client-DN" = "{dn}"
[[route]]
path_prefix = "/public"
upstream = "http://127.0.0.1:1"
auth = "none"
"#;

    const ALL_SOURCES: &str = r#"
[credentials]
sources = ["bearer", "x-auth-token", "auth-token", "rucio", "header:X-Api-Key", "query:access_token", "cookie:session"]
"#;

    /// The two routes with `extra` tables (all sources when `extra` has no `[credentials]`).
    fn config(extra: &str) -> Config {
        let credentials = if extra.contains("[credentials]") {
            ""
        } else {
            ALL_SOURCES
        };
        Config::parse(
            std::path::Path::new("t.toml"),
            &format!("{extra}{credentials}{TWO_ROUTES}"),
        )
        .expect("test config")
    }

    fn forwarded(config: &Config, build: http::request::Builder) -> Parts {
        let (mut parts, _) = build.body(()).unwrap().into_parts();
        let route = config
            .routes
            .iter()
            .find(|r| r.path_prefix == "/public")
            .unwrap();
        let upstream_host = HeaderValue::from_static("127.0.0.1:1");
        let fwd = Forwarding {
            client_ip: &HeaderValue::from_static("127.0.0.1"),
            tls: false,
            values: Values::default(),
            upstream_credential: None,
            upstream_host: &upstream_host,
        };
        request(&mut parts, route, &Boundary::new(config), fwd, None).expect("renderable");
        parts
    }

    #[test]
    fn connection_cannot_name_the_gates_own_headers() {
        let parts = forwarded(
            &config(""),
            http::Request::builder()
                .uri("/public/x")
                .header(
                    header::CONNECTION,
                    "X-Request-Id, Host, traceparent, X-Forwarded-For, X-Forwarded-Host, x-hop",
                )
                .header(header::HOST, "good.example")
                .header("x-request-id", "req-1")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .header("x-hop", "dropped"),
        );
        let h = &parts.headers;
        assert_eq!(h.get("x-request-id").unwrap(), "req-1");
        assert!(h.contains_key("traceparent"));
        assert_eq!(h.get("x-forwarded-host").unwrap(), "good.example");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert!(h.contains_key(header::HOST));
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn identity_and_origin_headers_legacy_apps_trust_are_removed() {
        let mut build = http::Request::builder().uri("/public/x");
        // SPEC §9's list, as written there.
        for name in [
            "Forwarded",
            "X-Real-IP",
            "Remote-User",
            "X-Remote-User",
            "X-Forwarded-User",
            "X-Forwarded-Email",
            "X-Forwarded-Groups",
            "X-Forwarded-Preferred-Username",
            "X-Forwarded-Access-Token",
            "X-Forwarded-Prefix",
            "X-Forwarded-Port",
            "X-Forwarded-Server",
            "True-Client-IP",
            "X-Client-IP",
            "X-Cluster-Client-IP",
            "Client-IP",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-Original-URI",
            "X-Forwarded-Uri",
            "X-Forwarded-Path",
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
            "X-Forwarded-Scheme",
            "X-Forwarded-Ssl",
            "Front-End-Https",
            "X-Url-Scheme",
        ] {
            assert!(
                always_removed(&HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
            build = build.header(name, "mallory");
        }
        for name in [
            "X-Auth-Request-User",
            "X-Auth-Request-Groups",
            "X-Site-User",
        ] {
            build = build.header(name, "mallory");
        }
        let parts = forwarded(
            &config("[server]\nstrip_headers = [\"X-Site-User\"]\n"),
            build.header("x-benign", "kept"),
        );
        for (name, value) in &parts.headers {
            assert_ne!(value, "mallory", "{name} reached the upstream");
        }
        assert_eq!(parts.headers.get("x-benign").unwrap(), "kept");
        assert_eq!(parts.headers.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn an_identity_that_cannot_be_a_header_value_is_an_error_not_a_missing_header() {
        let crlf = Identity::of(
            crate::identity::principal("alice\r\nX-Admin: 1", "ops", None),
            crate::identity::ValidatedBy::Static,
        );
        let utf8 = Identity::of(
            crate::identity::principal("José", "ops", None),
            crate::identity::ValidatedBy::Static,
        );
        let values = |identity| Values {
            identity: Some(identity),
            ..Values::default()
        };
        for text in ["{subject}", "user {subject}"] {
            let template = Template::parse(text).unwrap();
            assert_eq!(
                template.render_checked(&values(&crlf)),
                Err(Unrenderable),
                "{text}"
            );
            let rendered = template.render_checked(&values(&utf8)).unwrap().unwrap();
            assert!(rendered.as_bytes().ends_with("José".as_bytes()), "{text}");
            assert_eq!(
                template.render_checked(&Values::default()),
                Ok(None),
                "{text}"
            );
        }
    }

    #[test]
    fn strips_query_and_cookie_only() {
        let parts = forwarded(
            &config(""),
            http::Request::builder()
                .uri("/a?x=1&access_token=t&y=2&access%5Ftoken=u")
                .header("cookie", "a=1; session=t; b=2")
                .header("x-auth-token", "t"),
        );
        assert_eq!(parts.uri.path_and_query().unwrap(), "/a?x=1&y=2");
        assert_eq!(parts.headers["cookie"], "a=1; b=2");
        assert!(!parts.headers.contains_key("x-auth-token"));
    }

    #[test]
    fn every_route_strips_every_routes_headers() {
        let parts = forwarded(
            &config(""),
            http::Request::builder()
                .uri("/public/x")
                .header("X-Auth-User", "admin")
                .header("X_Auth_User", "admin")
                .header("X-Legacy-Key", "forged")
                .header("X-Client-DN", "/CN=admin")
                .header("Forwarded", "for=1.2.3.4")
                .header("X-Real-IP", "1.2.3.4")
                .header("X-Original-URL", "/api/secret")
                .header("X.Auth.User", "admin")
                .header("X-Api-Key", "k")
                .header("X-Other", "kept"),
        );
        let mut names: Vec<&str> = parts.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["host", "x-forwarded-for", "x-forwarded-proto", "x-other"]
        );
    }

    #[test]
    fn kept_sources_and_allowed_underscores_pass() {
        let config = config(
            "[server]\nallow_underscores_in_headers = true\n\
             [credentials]\nsources = [\"cookie:session\", \"x-auth-token\"]\nkeep = [\"cookie:session\"]\n",
        );
        let parts = forwarded(
            &config,
            http::Request::builder()
                .uri("/public/x")
                .header("cookie", "session=s1; b=2")
                .header("X_Trace", "1")
                .header("x-auth-token", "t"),
        );
        assert_eq!(parts.headers["cookie"], "session=s1; b=2");
        assert_eq!(parts.headers["x_trace"], "1");
        assert!(!parts.headers.contains_key("x-auth-token"));
    }

    #[test]
    fn websocket_accept_of_rfc_6455() {
        // The example handshake of RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let asked = HeaderValue::from_static("websocket");
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let mut answer = HeaderMap::new();
        answer.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(!upgrade_completes(&asked, Some(&key), &answer), "no accept");
        answer.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        assert!(upgrade_completes(&asked, Some(&key), &answer));
        answer.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(
            !upgrade_completes(&asked, Some(&key), &answer),
            "other protocol"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Header names a hostile client would try: every credential and identity header in
        /// several spellings, underscore forms, and harmless ones.
        fn header_name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("authorization"),
                Just("x-auth-token"),
                Just("X-AUTH-TOKEN"),
                Just("auth-token"),
                Just("auth_token"),
                Just("x-rucio-auth-token"),
                Just("x-api-key"),
                Just("x_api_key"),
                Just("x-auth-user"),
                Just("X_Auth_User"),
                Just("x-legacy-key"),
                Just("x-client-dn"),
                Just("forwarded"),
                Just("x-real-ip"),
                Just("x-original-url"),
                Just("x.auth.user"),
                Just("x-auth-user."),
                Just("cookie"),
                Just("x-other"),
                Just("accept"),
            ]
            .prop_map(str::to_string)
        }

        fn query_key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("access_token"),
                Just("access%5Ftoken"),
                Just("access%5ftoken"),
                Just("%61ccess_token"),
                Just("access_toke%6E"),
                Just("x"),
                Just("page"),
            ]
            .prop_map(str::to_string)
        }

        proptest! {
            #[test]
            fn an_open_route_forwards_no_credential_or_identity(
                headers in prop::collection::vec((header_name(), "[a-z0-9=; ]{0,12}"), 0..10),
                query in prop::collection::vec((query_key(), "[a-z0-9]{0,4}"), 0..5),
                cookie_names in prop::collection::vec(prop_oneof![Just("session"), Just("s%65ssion"), Just("theme")], 0..4),
            ) {
                let config = config("");
                let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let cookies: Vec<String> = cookie_names.iter().map(|n| format!("{n}=v")).collect();
                let mut build = http::Request::builder().uri(format!("/public/x?{}", query.join("&")));
                for (name, value) in &headers {
                    build = build.header(name.as_str(), value.as_str());
                }
                if !cookies.is_empty() {
                    build = build.header("cookie", cookies.join("; "));
                }
                let parts = forwarded(&config, build);
                let boundary = Boundary::new(&config);
                for (name, value) in &parts.headers {
                    // The gate sets these itself after the boundary removed the client's.
                    let own = matches!(name.as_str(), "x-forwarded-proto" | "x-forwarded-host");
                    prop_assert!(!boundary.headers.contains(name), "{name} forwarded");
                    prop_assert!(!always_removed(name) || own, "{name} forwarded");
                    if name.as_str() == "x-forwarded-proto" {
                        prop_assert_eq!(value, "http");
                    }
                    prop_assert!(
                        name.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                        "{name} forwarded"
                    );
                }
                if let Some(q) = parts.uri.query() {
                    for (k, _) in query_pairs(q) {
                        prop_assert!(!names_match(k, "access_token"), "{q}");
                    }
                }
                for (k, _) in crate::credential::cookies(&parts.headers) {
                    prop_assert!(!names_match(k, "session"), "cookie {k} forwarded");
                }
                // What the extractor sees after the rewrite: nothing.
                let sources = config.sources.clone();
                prop_assert!(crate::credential::extract(&parts, &sources).map(|c| c.is_none()).unwrap_or(false));
            }
        }
    }
}
