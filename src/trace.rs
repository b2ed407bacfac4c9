//! Request ids and W3C trace context: what ties one request's lines together across the client,
//! tokengate and the upstream.
//!
//! - `X-Request-Id`: the client's, when it is short and plain (at most 128 characters of
//!   `A-Z a-z 0-9 - _ . : / + = @`), else a new random one (32 hex digits). Forwarded upstream,
//!   returned to the client, written to the access log.
//! - `traceparent` (W3C Trace Context): when the client sent a valid one, the upstream gets the
//!   same trace id and flags with a new parent id (tokengate's hop is a span of its own), and
//!   `tracestate` passes unchanged; an invalid `traceparent` is dropped with its `tracestate`.
//!   Without one no trace is started: that is for a span exporter (OTLP) to decide, later.
//!
//! Ids come from a per-thread generator seeded from the operating system: unique, not secret.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue};

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest client request id kept.
pub const MAX_REQUEST_ID: usize = 128;

/// What this request is called in logs and on both sides of the gate.
pub struct Context {
    /// `X-Request-Id`.
    pub request_id: HeaderValue,
    /// The `traceparent` sent upstream, when the client is part of a trace.
    pub traceparent: Option<HeaderValue>,
}

impl Context {
    /// Reads the client's ids from `headers` and puts the ones to forward in their place.
    pub fn take(headers: &mut HeaderMap) -> Context {
        // One look-up for reading and replacing.
        let request_id = match headers.entry(&X_REQUEST_ID) {
            Entry::Occupied(mut sent) => {
                let mut values = sent.iter();
                let kept = values
                    .next()
                    .filter(|v| plain_request_id(v.as_bytes()))
                    .cloned();
                // One `X-Request-Id` only: a second could be read by the upstream instead.
                let more = values.next().is_some();
                let replace = kept.is_none() || more;
                let id = kept.unwrap_or_else(|| hex_id(random_u128()));
                if replace {
                    sent.insert(id.clone());
                }
                id
            }
            Entry::Vacant(none) => none.insert(hex_id(random_u128())).clone(),
        };
        let traceparent = match headers.get(&TRACEPARENT) {
            None => None,
            Some(v) => match child_of(v.as_bytes()) {
                Some(child) if headers.get_all(&TRACEPARENT).iter().nth(1).is_none() => {
                    headers.insert(TRACEPARENT.clone(), child.clone());
                    Some(child)
                }
                _ => {
                    headers.remove(&TRACEPARENT);
                    headers.remove(&TRACESTATE);
                    None
                }
            },
        };
        Context {
            request_id,
            traceparent,
        }
    }

    /// The trace id (32 hex digits), when the request is part of a trace.
    pub fn trace_id(&self) -> Option<&str> {
        let v = self.traceparent.as_ref()?;
        std::str::from_utf8(v.as_bytes().get(3..35)?).ok()
    }
}

/// Whether a client's request id is kept: short, non-empty, no spaces, quotes or controls.
fn plain_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=' | b'@')
        })
}

/// The `traceparent` for our hop: the client's trace id and flags with a new parent id, or
/// `None` when the client's value is not a valid W3C `traceparent`.
fn child_of(parent: &[u8]) -> Option<HeaderValue> {
    // version "-" trace-id(32) "-" parent-id(16) "-" flags(2); later versions may append
    // "-" fields, version 00 may not; version ff is invalid.
    if parent.len() < 55 || parent[2] != b'-' || parent[35] != b'-' || parent[52] != b'-' {
        return None;
    }
    let (version, trace_id, parent_id, flags) = (
        &parent[0..2],
        &parent[3..35],
        &parent[36..52],
        &parent[53..55],
    );
    let lower_hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let all_zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    if !lower_hex(version)
        || version == b"ff"
        || !lower_hex(trace_id)
        || !lower_hex(parent_id)
        || !lower_hex(flags)
        || all_zero(trace_id)
        || all_zero(parent_id)
        || (version == b"00" && parent.len() != 55)
        || (parent.len() > 55 && parent[55] != b'-')
    {
        return None;
    }
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(trace_id);
    out[35] = b'-';
    let span = loop {
        let span = random_u128() as u64;
        if span != 0 {
            break span;
        }
    };
    hex_into(&mut out[36..52], &span.to_be_bytes());
    out[52] = b'-';
    // Only the sampled bit is defined for version 00.
    let sampled = hex_nibble(flags[1]) & 1;
    out[53] = b'0';
    out[54] = b'0' + sampled;
    HeaderValue::from_bytes(&out).ok()
}

fn hex_nibble(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    }
}

/// 32 lowercase hex digits, cut from a per-thread arena (no allocation per id).
fn hex_id(n: u128) -> HeaderValue {
    ARENA.with(|arena| {
        let mut arena = arena.borrow_mut();
        if arena.capacity() - arena.len() < 32 {
            *arena = BytesMut::with_capacity(ARENA_BYTES);
        }
        let start = arena.len();
        arena.resize(start + 32, 0);
        hex_into(&mut arena[start..], &n.to_be_bytes());
        let id = arena.split_to(start + 32).split_off(start).freeze();
        HeaderValue::from_maybe_shared(id).unwrap_or_else(|_| HeaderValue::from_static("0"))
    })
}

/// How many bytes of ids one arena allocation holds (128 ids).
const ARENA_BYTES: usize = 4096;

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

thread_local! {
    /// wyrand state, seeded from the operating system on first use.
    static STATE: Cell<u64> = Cell::new(seed());
    /// Where generated ids are written.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No OS randomness (never seen on Linux): the clock, which still differs per thread.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64;
    }
    u64::from_le_bytes(bytes)
}

/// 128 random bits (wyrand, twice).
fn random_u128() -> u128 {
    STATE.with(|state| {
        let next = || {
            let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
            state.set(s);
            let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
            ((t >> 64) as u64) ^ (t as u64)
        };
        (u128::from(next()) << 64) | u128::from(next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_plain_client_request_id_is_kept() {
        let mut h = headers(&[("x-request-id", "abc-123_x.y:z/w+v=u@t")]);
        let c = Context::take(&mut h);
        assert_eq!(c.request_id, "abc-123_x.y:z/w+v=u@t");
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
    }

    #[test]
    fn odd_or_long_request_ids_are_replaced() {
        let long = "a".repeat(MAX_REQUEST_ID + 1);
        for bad in ["", "a b", "a\"b", "<script>", long.as_str()] {
            let mut h = headers(&[("x-request-id", bad)]);
            let c = Context::take(&mut h);
            let id = c.request_id.to_str().unwrap();
            assert_eq!(id.len(), 32, "{bad:?} → {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(h.get("x-request-id").unwrap(), &c.request_id);
        }
        let exactly = "a".repeat(MAX_REQUEST_ID);
        let mut h = headers(&[("x-request-id", &exactly)]);
        assert_eq!(Context::take(&mut h).request_id, exactly.as_str());
    }

    #[test]
    fn a_missing_request_id_is_generated_and_unique() {
        let ids: std::collections::HashSet<_> = (0..10_000)
            .map(|_| Context::take(&mut HeaderMap::new()).request_id)
            .collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn two_request_ids_become_one() {
        let mut h = headers(&[("x-request-id", "first"), ("x-request-id", "second")]);
        let c = Context::take(&mut h);
        assert_eq!(c.request_id, "first");
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_gets_a_new_span_for_our_hop() {
        let mut h = headers(&[("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")]);
        let c = Context::take(&mut h);
        assert_eq!(c.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let sent = h.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(sent.len(), 55);
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01"), "{sent}");
        assert_ne!(&sent[36..52], "00f067aa0ba902b7");
        assert_eq!(h.get("tracestate").unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn future_versions_are_read_as_version_00() {
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-ever";
        let mut h = headers(&[("traceparent", future)]);
        let c = Context::take(&mut h);
        assert_eq!(c.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let sent = h.get("traceparent").unwrap().to_str().unwrap();
        assert!(sent.starts_with("00-") && sent.ends_with("-01"), "{sent}");
    }

    #[test]
    fn invalid_traceparents_are_dropped_with_their_tracestate() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            let mut h = headers(&[("traceparent", bad), ("tracestate", "a=b")]);
            let c = Context::take(&mut h);
            assert_eq!(c.trace_id(), None, "{bad}");
            assert!(
                h.get("traceparent").is_none() && h.get("tracestate").is_none(),
                "{bad}"
            );
        }
        let mut two = headers(&[("traceparent", PARENT), ("traceparent", PARENT)]);
        assert_eq!(Context::take(&mut two).trace_id(), None);
    }

    #[test]
    fn without_a_traceparent_no_trace_is_started() {
        let mut h = headers(&[("tracestate", "a=b")]);
        let c = Context::take(&mut h);
        assert_eq!(c.trace_id(), None);
        assert!(h.get("traceparent").is_none());
    }
}
