//! `tokengate::token::is_ours` and `well_formed` on any string (they must be total: the
//! credential can be any percent-decoded UTF-8), and a differential check: a `tg_` token built
//! here from the input with a correct checksum is well formed, and one changed byte is not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::token::{is_ours, well_formed, LEN, PREFIX};

const BODY_LEN: usize = 43;
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
    let prefixed = format!("{PREFIX}{text}");
    check(&prefixed);

    // A well-formed token from the first 43 bytes, the rest naming a change to make.
    if data.len() < BODY_LEN {
        return;
    }
    let mut token = String::from(PREFIX);
    token.extend(
        data[..BODY_LEN]
            .iter()
            .map(|b| ALPHABET[usize::from(b % 64)] as char),
    );
    let checksum = base62(crc32fast::hash(token.as_bytes()));
    token.push_str(&checksum);
    assert!(
        well_formed(&token),
        "a token with a good checksum is refused"
    );
    if let [at, replacement @ ..] = &data[BODY_LEN..] {
        let at = usize::from(*at) % LEN;
        let replacement = String::from_utf8_lossy(replacement);
        let Some(c) = replacement.chars().next() else {
            return;
        };
        let mut changed = token[..at].to_string();
        changed.push(c);
        changed.push_str(&token[at + 1..]);
        if changed != token {
            check(&changed);
            // One byte of the payload changed: CRC-32 sees every burst of up to 32 bits, and
            // six base62 digits hold any u32, so the checksum differs; one of the checksum
            // changed: it no longer fits; of the prefix: not ours; non-ASCII: wrong length.
            assert!(!well_formed(&changed), "{at}: a changed token is accepted");
        }
    }
});

fn check(s: &str) {
    let ours = is_ours(s);
    assert_eq!(ours, s.starts_with(PREFIX));
    if well_formed(s) {
        assert!(ours && s.len() == LEN && s.is_ascii(), "{s:?}");
    }
}

fn base62(mut n: u32) -> String {
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits.to_vec()).unwrap()
}
