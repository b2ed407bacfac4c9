//! Each worker thread's spare buffers for upstream exchanges: read buffers, request-head buffers
//! and header maps, reused instead of allocated and freed for every exchange. A few of each, as
//! a worker has several exchanges in flight; what is not kept is freed.
//!
//! Besides the allocator's work, reuse keeps memory compact: a buffer freed between a client
//! connection's long-lived ones is a hole glibc keeps (~3 KiB per idle client).

use std::cell::RefCell;
use std::thread::LocalKey;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

/// The most spares of one kind a thread keeps.
const KEPT: usize = 16;
/// The largest read buffer kept: a small response's (so that what stays resident after a
/// burst of large responses is small).
const READ_BYTES: usize = 8 * 1024;
/// The largest request-head buffer kept (a head with a small body; one that carried a larger
/// body inline is freed).
const HEAD_BYTES: usize = 4 * 1024;
/// The largest header map kept (fields it has room for).
const MAP_FIELDS: usize = 48;

thread_local! {
    /// Read buffers whose response has been read to its end; one is reused once nothing else
    /// holds its bytes (a body's last piece may still be on its way to the client).
    static READS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    /// Written request heads' buffers.
    static HEADS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    /// Written requests' header maps, emptied. hyper keeps a response's map, once written,
    /// for the next request it reads on that connection: a map that had room for an upstream
    /// request's fields goes round, so that the next request's fields need no larger map (no
    /// growth, no rehashing) and the response's no new one.
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

fn keep<T: 'static>(spares: &'static LocalKey<RefCell<Vec<T>>>, spare: T) {
    spares.with_borrow_mut(|list| {
        if list.len() < KEPT {
            list.push(spare);
        }
    });
}

/// An empty read buffer with room for `first` bytes: the oldest spare nothing holds any more,
/// else a new one.
pub(super) fn read_buffer(first: usize) -> BytesMut {
    READS
        .with_borrow_mut(|list| {
            let free = list.iter_mut().position(|spare| {
                spare.clear();
                spare.try_reclaim(first)
            })?;
            Some(list.remove(free))
        })
        .unwrap_or_default()
}

/// Keeps `read` (a response's buffer, read to its end) when it is at most [`READ_BYTES`].
pub(super) fn keep_read_buffer(read: BytesMut) {
    if read.capacity() <= READ_BYTES {
        keep(&READS, read);
    }
}

/// An empty buffer for a request head.
pub(super) fn head_buffer() -> BytesMut {
    match HEADS.with_borrow_mut(Vec::pop) {
        Some(mut spare) => {
            spare.clear();
            spare
        }
        None => BytesMut::with_capacity(1024),
    }
}

/// Keeps a written request head's buffer, when nothing else holds it.
pub(super) fn keep_head_buffer(head: Bytes) {
    if let Ok(buffer) = head.try_into_mut() {
        if buffer.capacity() <= HEAD_BYTES {
            keep(&HEADS, buffer);
        }
    }
}

/// An empty header map with room for `count` fields.
pub(super) fn header_map(count: usize) -> HeaderMap {
    match MAPS.with_borrow_mut(Vec::pop) {
        Some(mut spare) => {
            spare.reserve(count);
            spare
        }
        None => HeaderMap::with_capacity(count),
    }
}

/// Keeps a written request's header map, emptied.
pub(super) fn keep_header_map(mut map: HeaderMap) {
    if map.capacity() <= MAP_FIELDS {
        map.clear();
        keep(&MAPS, map);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_buffer_is_reused_only_once_nothing_holds_its_bytes() {
        let mut read = read_buffer(64);
        read.reserve(256);
        read.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nbody");
        let body = read.split_off(19).freeze();
        let at = read.as_ptr();
        keep_read_buffer(read);
        // The body is still held: a new buffer, the spare stays.
        let other = read_buffer(64);
        assert_ne!(other.as_ptr(), at);
        drop(body);
        let reused = read_buffer(64);
        assert_eq!(
            reused.as_ptr(),
            at,
            "the spare is reused once its bytes are free"
        );
        assert!(reused.is_empty());
        assert_eq!(READS.with_borrow(Vec::len), 0);
    }

    #[test]
    fn at_most_a_few_spares_are_kept_and_large_ones_never() {
        for _ in 0..KEPT + 5 {
            keep_header_map(HeaderMap::with_capacity(8));
        }
        assert_eq!(MAPS.with_borrow(Vec::len), KEPT);
        MAPS.with_borrow_mut(Vec::clear);
        keep_header_map(HeaderMap::with_capacity(MAP_FIELDS * 2));
        assert_eq!(MAPS.with_borrow(Vec::len), 0);
        keep_read_buffer(BytesMut::with_capacity(2 * READ_BYTES));
        assert_eq!(READS.with_borrow(Vec::len), 0);
    }

    #[test]
    fn a_kept_map_comes_back_empty_with_its_room() {
        let mut map = HeaderMap::with_capacity(12);
        map.insert("x-a", "1".parse().unwrap());
        let room = map.capacity();
        keep_header_map(map);
        let map = header_map(2);
        assert!(map.is_empty());
        assert_eq!(map.capacity(), room);
    }
}
