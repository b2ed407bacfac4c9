//! `tokengate::path::normalize` on any string: it never panics, and what it returns is a
//! normal path (starts with `/`, no `//`, no dot segment, no NUL or `\`) that normalises to
//! itself; and every `Reading` of that normal path either refuses it or gives a path that
//! starts with `/`, has no empty segment, and holds no dot segment.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::path::{normalize, Reading};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
    // Most paths start with `/`; so that the fuzzer need not find that out first.
    let mut slashed = String::with_capacity(text.len() + 1);
    slashed.push('/');
    slashed.push_str(&text);
    check(&slashed);
});

fn check(path: &str) {
    let Ok(once) = normalize(path) else {
        return;
    };
    assert!(once.starts_with('/'), "{path:?} -> {once:?}: no leading /");
    assert!(!once.contains("//"), "{path:?} -> {once:?}: empty segment");
    assert!(
        !once.bytes().any(|b| b == 0 || b == b'\\'),
        "{path:?} -> {once:?}: NUL or backslash"
    );
    for segment in once[1..].split('/') {
        let name = segment.split(';').next().unwrap_or_default();
        assert!(
            name != "." && name != "..",
            "{path:?} -> {once:?}: dot segment left"
        );
    }
    match normalize(&once) {
        Ok(twice) => assert_eq!(twice, once, "{path:?}: not idempotent"),
        Err(_) => panic!("{path:?} -> {once:?}: the normal form is refused"),
    }
    for reading in Reading::ALL {
        let Ok(read) = reading.read(&once) else {
            continue;
        };
        assert!(read.starts_with('/'), "{reading:?} {once:?} -> {read:?}");
        assert!(!read.contains("//"), "{reading:?} {once:?} -> {read:?}");
        if read.len() > 1 && *read != *once {
            for segment in read[1..].trim_end_matches('/').split('/') {
                assert!(
                    segment != "." && segment != "..",
                    "{reading:?} {once:?} -> {read:?}: dot segment left"
                );
            }
        }
    }
}
