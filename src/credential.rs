//! Dialects: where a client puts its credential, and how to find exactly one in a request.
//!
//! Pure functions over request parts, so every dialect is unit-tested without a socket.

use std::borrow::Cow;

use http::{header, request::Parts, HeaderMap, HeaderName};
use percent_encoding::percent_decode_str;

use crate::error::ProxyError;

/// One configured credential source (SPEC §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `X-Auth-Token: <token>` (Insight.io).
    XAuthToken,
    /// `auth-token: <token>` (Aircloak).
    AuthToken,
    /// `X-Rucio-Auth-Token: <token>` (Rucio).
    Rucio,
    /// Any other header.
    Header(HeaderName),
    /// A query parameter, removed before forwarding.
    Query(String),
    /// A cookie, removed before forwarding.
    Cookie(String),
}

/// `X-Auth-Token`.
pub static X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");
/// `auth-token`.
pub static AUTH_TOKEN: HeaderName = HeaderName::from_static("auth-token");
/// `X-Rucio-Auth-Token`.
pub static X_RUCIO_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-rucio-auth-token");

impl Source {
    /// The SPEC's default: `["bearer", "x-auth-token", "auth-token", "rucio"]`.
    pub fn defaults() -> Vec<Source> {
        vec![
            Source::Bearer,
            Source::XAuthToken,
            Source::AuthToken,
            Source::Rucio,
        ]
    }

    /// Parses a `[credentials] sources` entry.
    pub fn parse(text: &str) -> Result<Source, String> {
        let named = |rest: &str, what: &str| {
            if rest.is_empty() {
                Err(format!("{what}: needs a name, e.g. \"{what}:token\""))
            } else {
                Ok(rest.to_string())
            }
        };
        match text {
            "bearer" => Ok(Source::Bearer),
            "x-auth-token" => Ok(Source::XAuthToken),
            "auth-token" => Ok(Source::AuthToken),
            "rucio" => Ok(Source::Rucio),
            _ => {
                if let Some(rest) = text.strip_prefix("header:") {
                    let name = named(rest, "header")?;
                    HeaderName::from_bytes(name.as_bytes())
                        .map(Source::Header)
                        .map_err(|_| format!("invalid header name {name:?}"))
                } else if let Some(rest) = text.strip_prefix("query:") {
                    named(rest, "query").map(Source::Query)
                } else if let Some(rest) = text.strip_prefix("cookie:") {
                    named(rest, "cookie").map(Source::Cookie)
                } else {
                    Err(format!(
                        "unknown credential source {text:?}: expected bearer, x-auth-token, \
                         auth-token, rucio, header:NAME, query:NAME or cookie:NAME"
                    ))
                }
            }
        }
    }

    /// The name used in logs and metrics (`{source}` placeholder).
    pub fn label(&self) -> &str {
        match self {
            Source::Bearer => "bearer",
            Source::XAuthToken => "x-auth-token",
            Source::AuthToken => "auth-token",
            Source::Rucio => "rucio",
            Source::Header(name) => name.as_str(),
            Source::Query(name) | Source::Cookie(name) => name,
        }
    }

    /// The header this source reads, if it is a header source.
    pub fn header(&self) -> Option<&HeaderName> {
        match self {
            Source::Bearer => Some(&header::AUTHORIZATION),
            Source::XAuthToken => Some(&X_AUTH_TOKEN),
            Source::AuthToken => Some(&AUTH_TOKEN),
            Source::Rucio => Some(&X_RUCIO_AUTH_TOKEN),
            Source::Header(name) => Some(name),
            Source::Query(_) | Source::Cookie(_) => None,
        }
    }
}

/// Without a credential in the configured sources: the first of the four known dialects the
/// request used anyway (`bearer` for an `Authorization: Bearer` header), so that the log can say
/// why a credential the client did send was not looked at.
pub fn ignored(headers: &HeaderMap, sources: &[Source]) -> Option<&'static str> {
    let known = [
        (Source::Bearer, "bearer"),
        (Source::XAuthToken, "x-auth-token"),
        (Source::AuthToken, "auth-token"),
        (Source::Rucio, "rucio"),
    ];
    known.into_iter().find_map(|(source, label)| {
        let value = headers.get(source.header()?)?;
        let used = match source {
            Source::Bearer => value
                .as_bytes()
                .get(..7)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer ")),
            _ => !value.is_empty(),
        };
        (used && !sources.contains(&source)).then_some(label)
    })
}

/// The one credential a request carries, and where it was found.
#[derive(Debug)]
pub struct Credential<'p, 's> {
    /// The raw token; never logged.
    pub token: Cow<'p, str>,
    /// Where it came from.
    pub source: &'s Source,
}

/// Finds the request's credential in the configured sources.
///
/// `Ok(None)` when there is none (empty values count as absent); `ConflictingCredentials` when
/// two different values are present (the same value in several places is one credential);
/// `InvalidCredentials` for a value that cannot be a token (not visible ASCII). A header or
/// query credential outranks a cookie: a browser with a session cookie may still call the API
/// with a token.
pub fn extract<'p, 's>(
    parts: &'p Parts,
    sources: &'s [Source],
) -> Result<Option<Credential<'p, 's>>, ProxyError> {
    let present = headers_present(&parts.headers, sources);
    let sources = sources.iter().enumerate();
    let explicit = sources
        .clone()
        .filter(|(_, s)| !matches!(s, Source::Cookie(_)));
    if let Some(found) = extract_from(parts, explicit, present)? {
        return Ok(Some(found));
    }
    extract_from(
        parts,
        sources.filter(|(_, s)| matches!(s, Source::Cookie(_))),
        present,
    )
}

/// At most this many header names are compared with every header source; a request with more
/// is looked up by name, once per source.
const SCAN_HEADERS: usize = 16;

/// Which header sources the request may carry: bit `i` for `sources[i]` (a source past the
/// 64th is always looked up, see [`may_carry`]). A request has few headers, so comparing their
/// names with the sources costs less than a hashed look-up per configured dialect, and most
/// sources are then not looked up at all.
fn headers_present(headers: &HeaderMap, sources: &[Source]) -> u64 {
    if headers.keys_len() > SCAN_HEADERS {
        return u64::MAX;
    }
    let mut present = 0u64;
    for name in headers.keys() {
        for (i, source) in sources.iter().enumerate().take(64) {
            if source.header() == Some(name) {
                present |= 1 << i;
            }
        }
    }
    present
}

/// Whether bit `i` of `present` (see [`headers_present`]) is set.
fn may_carry(present: u64, i: usize) -> bool {
    i >= 64 || present & (1 << i) != 0
}

fn extract_from<'p, 's>(
    parts: &'p Parts,
    sources: impl Iterator<Item = (usize, &'s Source)>,
    present: u64,
) -> Result<Option<Credential<'p, 's>>, ProxyError> {
    let mut found: Option<Credential<'p, 's>> = None;
    let mut offer = |token: Cow<'p, str>, source: &'s Source| -> Result<(), ProxyError> {
        match &found {
            None => found = Some(Credential { token, source }),
            Some(existing) if existing.token == token => {}
            Some(_) => return Err(ProxyError::ConflictingCredentials),
        }
        Ok(())
    };
    for (i, source) in sources {
        match source {
            Source::Bearer => {
                if !may_carry(present, i) {
                    continue;
                }
                for value in parts.headers.get_all(header::AUTHORIZATION) {
                    let text = value.to_str().map_err(|_| ProxyError::InvalidCredentials)?;
                    if let Some(token) = bearer_token(text) {
                        offer(Cow::Borrowed(token), source)?;
                    }
                }
            }
            Source::Query(name) => {
                if let Some(query) = parts.uri.query() {
                    for (key, value) in query_pairs(query) {
                        if names_match(key, name) && !value.is_empty() {
                            let token = percent_decode_str(value)
                                .decode_utf8()
                                .map_err(|_| ProxyError::InvalidCredentials)?;
                            // What no header could carry is no token (as for header sources):
                            // it could not be presented to a validator either.
                            if !token
                                .bytes()
                                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
                            {
                                return Err(ProxyError::InvalidCredentials);
                            }
                            offer(token, source)?;
                        }
                    }
                }
            }
            Source::Cookie(name) => {
                for (key, value) in cookies(&parts.headers) {
                    if names_match(key, name) && !value.is_empty() {
                        offer(Cow::Borrowed(value), source)?;
                    }
                }
            }
            _ => {
                if !may_carry(present, i) {
                    continue;
                }
                let name = source.header().expect("header source");
                for value in parts.headers.get_all(name) {
                    let token = value
                        .to_str()
                        .map_err(|_| ProxyError::InvalidCredentials)?
                        .trim();
                    if !token.is_empty() {
                        offer(Cow::Borrowed(token), source)?;
                    }
                }
            }
        }
    }
    Ok(found)
}

/// The token of an `Authorization: Bearer <token>` value; `None` for other schemes or an
/// empty token. The scheme is case-insensitive (RFC 7235).
pub fn bearer_token(value: &str) -> Option<&str> {
    // A header value is visible ASCII, spaces and tabs: ASCII trimming is enough.
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(BEARER.len())?;
    if !scheme.eq_ignore_ascii_case(BEARER) || !rest.starts_with(' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

const BEARER: &str = "bearer";

/// Whether a raw (percent-encoded) query or cookie name is `name`: compared after decoding, as
/// the upstream's framework will decode it (`access%5Ftoken` is `access_token`).
pub fn names_match(raw: &str, name: &str) -> bool {
    if !raw.contains(['%', '+']) {
        return raw == name;
    }
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced).eq(name.bytes())
}

/// `key=value` pairs of a query string, undecoded.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// `name=value` pairs of every `Cookie` header.
pub fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.trim(), value.trim().trim_matches('"')))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(build: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        build(Request::builder()).body(()).unwrap().into_parts().0
    }

    fn all_sources() -> Vec<Source> {
        let mut s = Source::defaults();
        s.push(Source::parse("header:X-Api-Key").unwrap());
        s.push(Source::parse("query:access_token").unwrap());
        s.push(Source::parse("cookie:session").unwrap());
        s
    }

    fn token_of(p: &Parts) -> Result<Option<(String, String)>, ProxyError> {
        let sources = all_sources();
        extract(p, &sources)
            .map(|c| c.map(|c| (c.token.into_owned(), c.source.label().to_string())))
    }

    #[test]
    fn bearer_scheme_exactly() {
        for (value, token) in [
            ("Bearer t1", Some("t1")),
            ("bEaReR   t1 ", Some("t1")),
            ("  Bearer t1", Some("t1")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearer\tt1", None),
            ("Bearert1", None),
            ("Bearerx t1", None),
            ("Basic dTpw", None),
            ("Bear t1", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn every_dialect() {
        let cases: Vec<(Parts, &str)> = vec![
            (parts(|b| b.header("Authorization", "Bearer t1")), "bearer"),
            (
                parts(|b| b.header("authorization", "bearer   t1 ")),
                "bearer",
            ),
            (parts(|b| b.header("X-Auth-Token", "t1")), "x-auth-token"),
            (parts(|b| b.header("AUTH-TOKEN", "t1")), "auth-token"),
            (parts(|b| b.header("X-Rucio-Auth-Token", "t1")), "rucio"),
            (parts(|b| b.header("x-api-key", "t1")), "x-api-key"),
            (parts(|b| b.uri("/p?a=1&access_token=t1")), "access_token"),
            (parts(|b| b.uri("/p?access_token=t%31")), "access_token"),
            (parts(|b| b.header("Cookie", "a=b; session=t1")), "session"),
        ];
        for (p, label) in cases {
            assert_eq!(
                token_of(&p).unwrap(),
                Some(("t1".to_string(), label.to_string())),
                "{:?}",
                p.headers
            );
        }
    }

    #[test]
    fn empty_and_foreign_values_are_absent() {
        for p in [
            parts(|b| b.header("X-Auth-Token", "")),
            parts(|b| b.header("auth-token", "   ")),
            parts(|b| b.header("Authorization", "Bearer ")),
            parts(|b| b.header("Authorization", "Basic dXNlcjpwYXNz")),
            parts(|b| b.uri("/p?access_token=")),
            parts(|b| b.header("Cookie", "session=")),
        ] {
            assert_eq!(token_of(&p).unwrap(), None, "{:?}", p);
        }
    }

    #[test]
    fn same_token_twice_is_one_credential() {
        let p = parts(|b| {
            b.header("X-Auth-Token", "t1")
                .header("Authorization", "Bearer t1")
        });
        assert_eq!(token_of(&p).unwrap().unwrap().0, "t1");
    }

    #[test]
    fn two_different_tokens_conflict() {
        for p in [
            parts(|b| b.header("X-Auth-Token", "t1").header("auth-token", "t2")),
            parts(|b| b.header("auth-token", "t1").header("auth-token", "t2")),
            parts(|b| b.header("auth-token", "t1").uri("/?access_token=t2")),
        ] {
            assert_eq!(token_of(&p), Err(ProxyError::ConflictingCredentials));
        }
    }

    #[test]
    fn many_headers_are_looked_up_by_name() {
        // Beyond SCAN_HEADERS names the sources are looked up one by one: same answers.
        let padded = |build: fn(http::request::Builder) -> http::request::Builder| {
            parts(|b| {
                let mut b = build(b);
                for i in 0..SCAN_HEADERS + 4 {
                    b = b.header(format!("x-filler-{i}"), "x");
                }
                b
            })
        };
        let p = padded(|b| b.header("X-Rucio-Auth-Token", "t1"));
        assert!(p.headers.keys_len() > SCAN_HEADERS);
        assert_eq!(
            token_of(&p).unwrap(),
            Some(("t1".to_string(), "rucio".to_string()))
        );
        let p = padded(|b| {
            b.header("Authorization", "Bearer t1")
                .header("x-api-key", "t2")
        });
        assert_eq!(token_of(&p), Err(ProxyError::ConflictingCredentials));
        assert_eq!(token_of(&padded(|b| b)).unwrap(), None);
        // And below it, a source the scan saw is read, one it did not see is not invented.
        let p = parts(|b| b.header("x-api-key", "t2").header("Host", "h"));
        assert_eq!(
            token_of(&p).unwrap(),
            Some(("t2".to_string(), "x-api-key".to_string()))
        );
    }

    #[test]
    fn encoded_names_are_the_same_source() {
        for p in [
            parts(|b| b.uri("/p?access%5Ftoken=t1")),
            parts(|b| b.uri("/p?%61ccess_token=t1")),
            parts(|b| b.header("Cookie", "s%65ssion=t1")),
        ] {
            assert_eq!(token_of(&p).unwrap().unwrap().0, "t1", "{p:?}");
        }
        assert!(!names_match("access%5Ftokens", "access_token"));
        assert!(names_match("a+b", "a b"));
    }

    #[test]
    fn a_header_outranks_a_cookie() {
        let p = parts(|b| {
            b.header("Cookie", "session=browser")
                .header("X-Auth-Token", "t1")
        });
        assert_eq!(
            token_of(&p).unwrap(),
            Some(("t1".to_string(), "x-auth-token".to_string()))
        );
        let two_cookies = parts(|b| b.header("Cookie", "session=a; session=b"));
        assert_eq!(
            token_of(&two_cookies),
            Err(ProxyError::ConflictingCredentials)
        );
    }

    #[test]
    fn source_parsing() {
        assert!(Source::parse("header:").is_err());
        assert!(Source::parse("nonsense").is_err());
        assert!(Source::parse("header:bad header").is_err());
        assert_eq!(Source::parse("rucio").unwrap(), Source::Rucio);
    }
}
