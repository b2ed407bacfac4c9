//! `tokengate::upstream::h1::frame_response`, the upstream client's response parser and body
//! decoder, on any bytes an upstream could send: it never panics, a body is never longer than
//! the bytes sent, and the verdict (status, body, reusable, or the error) does not depend on
//! how the bytes were split into reads.

#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use tokengate::upstream::h1::frame_response;

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let method = if control & 1 == 1 {
        Method::HEAD
    } else {
        Method::GET
    };
    let whole = frame_response(&method, &[bytes]);
    if let Ok((_, body, _)) = &whole {
        assert!(body.len() <= bytes.len(), "a body longer than the input");
    }
    // The same bytes in reads of 1 to 32 bytes, sizes taken from the control byte.
    let step = usize::from(control >> 3) + 1;
    let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
    let split = frame_response(&method, &pieces);
    assert_eq!(whole, split, "the verdict depends on how the bytes were read ({step}-byte reads)");
    let single: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(whole, frame_response(&method, &single), "1-byte reads");
});
