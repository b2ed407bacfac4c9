//! The credential dialects: `Source::parse`, `bearer_token`, `query_pairs`, `names_match`,
//! `cookies`, and `extract` over a request made from the input, followed by the `tg_`
//! checks the proxy makes on what `extract` found (`token::is_ours` / `well_formed`).
//!
//! Input, split at `\n`: line 1, credential sources separated by `,` (`bearer`,
//! `query:access_token`, ...; the defaults when empty); line 2, the request's query string;
//! the other lines, headers `name: value` (raw bytes, so values need not be UTF-8).

#![no_main]

use http::header::{HeaderName, HeaderValue};
use http::Request;
use libfuzzer_sys::fuzz_target;
use tokengate::credential::{
    bearer_token, cookies, extract, names_match, query_pairs, Credential, Source,
};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let sources_line = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let query = String::from_utf8_lossy(lines.next().unwrap_or_default());

    let mut sources: Vec<Source> = sources_line
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|s| Source::parse(s).ok())
        .inspect(|s| {
            let _ = (s.label(), s.header());
        })
        .collect();
    if sources.is_empty() {
        sources = Source::defaults();
    }
    let names: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Query(n) | Source::Cookie(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();

    for (key, value) in query_pairs(&query) {
        assert!(!key.contains('&') && !value.contains('&'));
        if !key.contains(['%', '+']) {
            assert!(names_match(key, key));
        }
        for name in &names {
            let _ = names_match(key, name);
        }
    }

    let mut request = Request::builder();
    let uri = format!("/p?{query}");
    if http::Uri::try_from(uri.as_str()).is_ok() {
        request = request.uri(uri);
    }
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if let Ok(text) = value.to_str() {
            if let Some(token) = bearer_token(text) {
                assert!(!token.is_empty() && text.contains(token));
                assert_eq!(token, token.trim_ascii());
            }
        }
        headers.append(name, value);
    }
    for (key, value) in cookies(&headers) {
        assert!(!key.contains(';') && !value.contains(';'));
        for name in &names {
            let _ = names_match(key, name);
        }
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    parts.headers = headers;
    if let Ok(Some(Credential { token, source })) = extract(&parts, &sources) {
        assert!(
            !token.is_empty(),
            "an empty credential from {}",
            source.label()
        );
        assert!(sources.contains(source));
        // What `proxy::identify` does next with it.
        let _ = tokengate::token::is_ours(&token) && !tokengate::token::well_formed(&token);
    }
});
