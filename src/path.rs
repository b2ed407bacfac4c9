//! Path normalisation and route matching (SPEC §9): the path a route is chosen by is the path
//! the upstream receives, whatever the upstream's own parser would make of the raw one.
//!
//! Order: repeated `/` merged → percent-encoded unreserved characters decoded → dot segments
//! removed (RFC 3986 §5.2.4), a segment judged by its text before any `;`. Refused: climbing
//! above `/`, NUL, a raw `\`, malformed `%`, and a dot segment that `%2f` / `%5c` would reveal
//! to an upstream that decodes them. `%2f` is otherwise kept as sent (Rucio DID names).

use std::borrow::Cow;

/// Why a path cannot be forwarded (always answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath;

/// The normalised form of `path`; borrowed when it is already normal (the common case).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') {
        return Err(BadPath);
    }
    if plainly_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slowly(path)
}

/// `normalize` for a path that starts with `/`, whatever it holds.
fn normalize_slowly(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let decoded = decode_unreserved(path)?;
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut changed = matches!(decoded, Cow::Owned(_));
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        trailing_slash = false;
        match dot_kind(segment) {
            Some(Dot::Current) => {
                changed = true;
                trailing_slash = true;
            }
            Some(Dot::Parent) => {
                changed = true;
                kept.pop().ok_or(BadPath)?;
                trailing_slash = true;
            }
            None if segment.is_empty() => {
                // `//` merged; a final empty segment is the trailing slash.
                if i == last {
                    trailing_slash = true;
                } else {
                    changed = true;
                }
            }
            None => {
                if hides_dot_segment(segment) {
                    return Err(BadPath);
                }
                kept.push(segment);
            }
        }
    }
    if !changed {
        return Ok(decoded);
    }
    Ok(Cow::Owned(joined(&kept, trailing_slash, decoded.len())))
}

/// `/` + the segments joined by `/`, with a final `/` when `trailing_slash` or there are none.
fn joined(kept: &[&str], trailing_slash: bool, capacity: usize) -> String {
    let mut out = String::with_capacity(capacity);
    for segment in kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

/// The common path, already normal, found in one pass: no escape (`%`), no backslash or NUL,
/// no empty segment but the last, and no segment that begins with a dot (every dot segment,
/// `.`, `..` or `..;x`, does).
fn plainly_normal(path: &[u8]) -> bool {
    let mut previous = 0;
    for &b in path {
        match (previous, b) {
            (_, b'%' | b'\\' | 0) | (b'/', b'/' | b'.') => return false,
            _ => previous = b,
        }
    }
    true
}

/// Whether `path` (normalised) lies under `prefix`, matching whole segments, each path segment
/// by its text before `;`: `/api` covers `/api`, `/api/x` and `/api;v=1/x`, not `/apix`.
pub fn under(path: &str, prefix: &str) -> bool {
    under_read(path, prefix, false)
}

/// A segment without its `;` parameters.
fn params_off(segment: &str) -> &str {
    segment.split_once(';').map_or(segment, |(name, _)| name)
}

#[derive(Debug, PartialEq, Eq)]
enum Dot {
    Current,
    Parent,
}

fn dot_kind(segment: &str) -> Option<Dot> {
    match params_off(segment) {
        "." => Some(Dot::Current),
        ".." => Some(Dot::Parent),
        _ => None,
    }
}

/// Whether a segment would hold a dot segment if `%2f` / `%5c` were read as separators.
fn hides_dot_segment(segment: &str) -> bool {
    if !segment.contains('%') {
        return false;
    }
    let mut rest = segment;
    loop {
        let next = find_encoded_separator(rest);
        let piece = &rest[..next.unwrap_or(rest.len())];
        // An upstream that decodes before it splits off parameters reads `%3b` as `;`.
        let before_params = find_encoded(piece, b'3', b'b').map_or(piece, |at| &piece[..at]);
        if dot_kind(piece).is_some() || dot_kind(before_params).is_some() {
            return true;
        }
        match next {
            Some(at) => rest = &rest[at + 3..],
            None => return false,
        }
    }
}

fn find_encoded_separator(text: &str) -> Option<usize> {
    match (
        find_encoded(text, b'2', b'f'),
        find_encoded(text, b'5', b'c'),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Where `%` + `hi` + `lo` (either case) first appears in `text`.
fn find_encoded(text: &str, hi: u8, lo: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(2)).find(|&i| {
        bytes[i] == b'%' && bytes[i + 1] == hi && bytes[i + 2].to_ascii_lowercase() == lo
    })
}

/// Decodes `%XX` of unreserved characters (ALPHA, DIGIT, `-`, `.`, `_`, `~`); other escapes
/// are kept as sent. NUL (raw or `%00`), a raw `\` and malformed escapes are refused.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let bytes = path.as_bytes();
    if bytes.iter().any(|&b| b == b'\\' || b == 0) {
        return Err(BadPath);
    }
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut decoded_any = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            let run = bytes[i..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..run]);
            i = run;
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(BadPath);
        };
        let byte = (hi * 16 + lo) as u8;
        if byte == 0 {
            return Err(BadPath);
        }
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
            decoded_any = true;
        } else {
            out.push_str(&path[i..i + 3]);
        }
        i += 3;
    }
    Ok(if decoded_any {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(path)
    })
}

/// One of the ways an upstream may read a normalised path (SPEC §9, "One route under every
/// reading"). The gate picks a route under each, so that no reading reaches a route the gate
/// did not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// `%2f` and `%5c` read as `/` (nginx `$uri`, WSGI).
    SlashDecoded,
    /// Every segment compared case-insensitively (IIS, many frameworks).
    Folded,
    /// `;…` removed from every segment, empty segments merged (Tomcat, Spring).
    ParamsDropped,
    /// Trailing `.`, space and `%20` removed from every segment (IIS).
    TrailingDropped,
    /// Percent-decoded twice (`%252e` → `.`), `\` read as `/` (the double-decode class).
    TwiceDecoded,
    /// All of the above at once.
    All,
}

impl Reading {
    /// Every reading but the path as it is.
    pub const ALL: [Reading; 6] = [
        Reading::SlashDecoded,
        Reading::Folded,
        Reading::ParamsDropped,
        Reading::TrailingDropped,
        Reading::TwiceDecoded,
        Reading::All,
    ];

    /// Whether this reading compares paths case-insensitively.
    pub fn folds(self) -> bool {
        matches!(self, Reading::Folded | Reading::All)
    }

    /// Whether this reading can read `normal` differently from the path as it is (apart from
    /// case, which [`Reading::folds`] says).
    fn rewrites(self, normal: &str) -> bool {
        let has = |b: u8| normal.as_bytes().contains(&b);
        match self {
            Reading::SlashDecoded => find_encoded_separator(normal).is_some(),
            Reading::Folded => false,
            Reading::ParamsDropped => has(b';'),
            Reading::TrailingDropped => has(b'.') || has(b' ') || has(b'%'),
            Reading::TwiceDecoded => has(b'%'),
            Reading::All => has(b'%') || has(b';') || has(b'.') || has(b' '),
        }
    }

    /// `normal` (a normalised path) as this reading sees it: dot segments it reveals resolved,
    /// empty segments merged. Refused: a reading that climbs above `/` or holds NUL.
    pub fn read(self, normal: &str) -> Result<Cow<'_, str>, BadPath> {
        if !self.rewrites(normal) {
            return Ok(Cow::Borrowed(normal));
        }
        let text: Cow<'_, str> = match self {
            Reading::SlashDecoded => Cow::Owned(encoded_separators_as_slashes(normal)),
            Reading::TwiceDecoded | Reading::All => {
                let once = percent_encoding::percent_decode_str(normal).decode_utf8_lossy();
                let twice = percent_encoding::percent_decode_str(&once)
                    .decode_utf8_lossy()
                    .into_owned();
                Cow::Owned(twice)
            }
            _ => Cow::Borrowed(normal),
        };
        if text.contains('\0') {
            return Err(BadPath);
        }
        let decoded = matches!(self, Reading::TwiceDecoded | Reading::All);
        let drop_params = matches!(self, Reading::ParamsDropped | Reading::All);
        let drop_trailing = matches!(self, Reading::TrailingDropped | Reading::All);
        let body = text.strip_prefix('/').unwrap_or(&text);
        let mut kept: Vec<&str> = Vec::new();
        let mut trailing_slash = false;
        let separators: &[char] = if decoded { &['/', '\\'] } else { &['/'] };
        for segment in body.split(separators) {
            let mut segment = segment;
            if drop_params {
                segment = params_off(segment);
            }
            if drop_trailing {
                segment = trailing_dropped(segment);
            }
            trailing_slash = true;
            match dot_kind(segment) {
                Some(Dot::Current) => {}
                Some(Dot::Parent) => {
                    kept.pop().ok_or(BadPath)?;
                }
                None if segment.is_empty() => {}
                None => {
                    trailing_slash = false;
                    kept.push(segment);
                }
            }
        }
        Ok(Cow::Owned(joined(&kept, trailing_slash, text.len())))
    }
}

/// Whether `normal` (a normalised path) may read differently under some [`Reading`]; `false`
/// for the common path (no `%`, `;`, `.`, space or upper-case letter), which needs no other
/// reading unless a route's prefix has upper-case letters.
pub fn has_other_readings(normal: &str) -> bool {
    normal
        .bytes()
        .any(|b| matches!(b, b'%' | b';' | b'.' | b' ' | b'A'..=b'Z'))
}

/// `%2f` and `%5c` (either case) replaced by `/`.
fn encoded_separators_as_slashes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_encoded_separator(rest) {
        out.push_str(&rest[..at]);
        out.push('/');
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

/// A segment without trailing dots, spaces and `%20`, as IIS reads it; `..` followed by
/// spaces is still `..`.
fn trailing_dropped(segment: &str) -> &str {
    match trailing_off(segment, false) {
        dots @ ("." | "..") => dots,
        _ => trailing_off(segment, true),
    }
}

/// `segment` without trailing spaces and `%20` (and dots, when `dots`).
fn trailing_off(segment: &str, dots: bool) -> &str {
    let mut rest = segment;
    loop {
        if let Some(shorter) = rest.strip_suffix(' ') {
            rest = shorter;
        } else if let Some(shorter) = rest.strip_suffix("%20") {
            rest = shorter;
        } else if let Some(shorter) = rest.strip_suffix('.').filter(|_| dots) {
            rest = shorter;
        } else {
            return rest;
        }
    }
}

/// [`under`], each segment compared case-insensitively when `fold`.
pub fn under_read(path: &str, prefix: &str, fold: bool) -> bool {
    // `/` (a catch-all route) has no segment to match.
    if prefix.bytes().all(|b| b == b'/') {
        return true;
    }
    let mut path_segments = path.split('/').skip(1);
    prefix
        .split('/')
        .skip(1)
        .filter(|s| !s.is_empty())
        .all(|want| {
            path_segments.next().is_some_and(|got| {
                let got = params_off(got);
                if fold {
                    got.eq_ignore_ascii_case(want)
                } else {
                    got == want
                }
            })
        })
}

/// Whether a `path_prefix` (or the gate's own prefix) can be matched under every reading alike:
/// normalised, with no `%`, `;`, and no segment that ends in `.` (each reading would change the
/// prefix itself).
pub fn reads_alike(prefix: &str) -> bool {
    !prefix.contains(['%', ';', ' ', '\\'])
        && prefix.split('/').all(|segment| !segment.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(path: &str) -> Result<String, BadPath> {
        normalize(path).map(Cow::into_owned)
    }

    #[test]
    fn the_quick_check_passes_only_normal_paths() {
        // Every path of up to six characters from an alphabet of the troublemakers.
        let alphabet = ['/', '.', 'a', '%', ';', '2', 'f', '\\'];
        let mut paths = vec![String::from("/")];
        let mut checked = 0;
        for _ in 0..6 {
            let mut longer = Vec::new();
            for path in &paths {
                for c in alphabet {
                    let mut next = path.clone();
                    next.push(c);
                    if plainly_normal(next.as_bytes()) {
                        checked += 1;
                        assert!(
                            matches!(normalize_slowly(&next), Ok(Cow::Borrowed(p)) if p == next),
                            "{next:?}: {:?}",
                            normalize_slowly(&next)
                        );
                    }
                    longer.push(next);
                }
            }
            paths = longer;
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn examples() {
        let ok = [
            ("/", "/"),
            ("/api/x", "/api/x"),
            ("//api///x", "/api/x"),
            ("/api/x/", "/api/x/"),
            ("/public/../api/secret", "/api/secret"),
            ("/public/%2e%2e/api/secret", "/api/secret"),
            ("/public/%2E%2E/api/secret", "/api/secret"),
            ("/public/..;x/api/secret", "/api/secret"),
            ("/public/.%2e/api", "/api"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/%7euser/%41", "/~user/A"),
            (
                "/api/dids/scope/name%2Fwith%2Fslashes",
                "/api/dids/scope/name%2Fwith%2Fslashes",
            ),
            ("/api;v=1/x", "/api;v=1/x"),
            ("/a/%20b", "/a/%20b"),
            ("/a/%252e%252e/b", "/a/%252e%252e/b"),
            ("/a/...", "/a/..."),
            ("/a/x%3By/b", "/a/x%3By/b"),
        ];
        for (input, want) in ok {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            "/..",
            "/../x",
            "/a/../..",
            "/%2e%2e",
            "/a/..%2f..%2f..%2fetc",
            "/public/..%2fapi/x",
            "/public/%2f../api",
            "/public/%2F..",
            "/public/..%5capi",
            "/public/%5C..%5Capi",
            "/public/..%3Bx/api",
            "/public/..%3bx%2fapi",
            "/a/.%3b/b",
            "/a\\b",
            "/a%00b",
            "/a%zz",
            "/a%2",
            "*",
            "",
        ];
        for input in bad {
            assert_eq!(norm(input), Err(BadPath), "{input}");
        }
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for path in ["/", "/api/x", "/api/x/", "/a/name%2Fx", "/api;v=1/x"] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(_))), "{path}");
        }
    }

    #[test]
    fn whole_segment_prefixes() {
        assert!(under("/api", "/api"));
        assert!(under("/api/", "/api"));
        assert!(under("/api/x", "/api"));
        assert!(under("/api;x/secret", "/api"));
        assert!(under("/api/x", "/api/"));
        assert!(under("/anything", "/"));
        assert!(under("/api/v2/x", "/api/v2"));
        assert!(!under("/apix", "/api"));
        assert!(!under("/api", "/api/v2"));
        assert!(!under("/ap", "/api"));
        assert!(!under("/api/v20", "/api/v2"));
    }

    #[test]
    fn readings_examples() {
        let read = |r: Reading, p: &str| r.read(p).map(Cow::into_owned);
        let ok = [
            (Reading::SlashDecoded, "/api%2fsecret", "/api/secret"),
            (Reading::SlashDecoded, "/%2Fapi/secret", "/api/secret"),
            (Reading::SlashDecoded, "/a%5cb", "/a/b"),
            (Reading::ParamsDropped, "/;/api/secret", "/api/secret"),
            (Reading::ParamsDropped, "/api;jsessionid=1/x", "/api/x"),
            (Reading::TrailingDropped, "/api./secret", "/api/secret"),
            (Reading::TrailingDropped, "/api%20/secret", "/api/secret"),
            (Reading::TrailingDropped, "/api.%20./secret", "/api/secret"),
            (Reading::TrailingDropped, "/a/..%20/b", "/b"),
            (Reading::TwiceDecoded, "/a/%252e%252e/b", "/b"),
            (Reading::TwiceDecoded, "/a/%252fb", "/a/b"),
            (Reading::TwiceDecoded, "/a%5cb", "/a/b"),
            (Reading::All, "/API%252f;x/SECRET.", "/API/SECRET"),
            (Reading::All, "/x/..%253b/api", "/api"),
            (Reading::Folded, "/API/x", "/API/x"),
            (Reading::SlashDecoded, "/plain/path", "/plain/path"),
        ];
        for (reading, input, want) in ok {
            assert_eq!(
                read(reading, input).as_deref(),
                Ok(want),
                "{reading:?} {input}"
            );
        }
        let bad = [
            (Reading::TwiceDecoded, "/%252e%252e/x"),
            (Reading::TwiceDecoded, "/a/%2500"),
            (Reading::TrailingDropped, "/..%20/x"),
            (Reading::All, "/a/%252e%252e/%252e%252e"),
        ];
        for (reading, input) in bad {
            assert_eq!(read(reading, input), Err(BadPath), "{reading:?} {input}");
        }
        assert!(!has_other_readings("/api/v1/files"));
        for path in ["/API", "/a.b", "/a;b", "/a%2fb"] {
            assert!(has_other_readings(path), "{path}");
        }
        assert!(under_read("/API/x", "/api", true));
        assert!(!under_read("/API/x", "/api", false));
        assert!(under_read("/api/x", "/Api", true));
        assert!(reads_alike("/api/v1.2/x"));
        for prefix in ["/a%2fb", "/a;b", "/api.", "/a b"] {
            assert!(!reads_alike(prefix), "{prefix}");
        }
    }

    /// Paths made of segments an attacker would use.
    fn hostile_path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just(".%2e".to_string()),
            Just("..;x".to_string()),
            Just(";".to_string()),
            Just("".to_string()),
            Just("%2f".to_string()),
            Just("..%2f".to_string()),
            Just("%5c..".to_string()),
            Just("..%3Bx".to_string()),
            Just(".%3b".to_string()),
            Just("%41".to_string()),
            Just("%25".to_string()),
            Just("api".to_string()),
            Just("public".to_string()),
            "[a-z;=%0-9A-F.]{0,6}",
        ];
        prop::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #[test]
        fn normalised_paths_have_no_dot_segments_and_never_climb(path in hostile_path()) {
            if let Ok(normal) = normalize(&path) {
                prop_assert!(normal.starts_with('/'));
                prop_assert!(!normal.contains("//"), "{normal}");
                for segment in normal.split('/').skip(1) {
                    prop_assert!(dot_kind(segment).is_none(), "{path} -> {normal}");
                    prop_assert!(!hides_dot_segment(segment), "{path} -> {normal}");
                }
                // Normalising is idempotent, so routing the forwarded path again picks the
                // same route.
                let again = normalize(&normal).expect("a normal path stays valid");
                prop_assert_eq!(&again, &normal);
                for prefix in ["/", "/api", "/public", "/api/x"] {
                    prop_assert_eq!(under(&again, prefix), under(&normal, prefix));
                }
            }
        }

        #[test]
        fn percent_decoding_never_reveals_a_dot_segment(path in hostile_path()) {
            if let Ok(normal) = normalize(&path) {
                // What an upstream that decodes everything would see.
                let fully = percent_encoding::percent_decode_str(&normal).decode_utf8_lossy();
                for segment in fully.split(['/', '\\']).skip(1) {
                    prop_assert!(dot_kind(segment).is_none(), "{path} -> {normal} -> {fully}");
                }
            }
        }
    }
}
