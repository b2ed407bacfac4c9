//! Header-name case toward HTTP/1.1 clients. hyper writes a response's names in the case an
//! extension of its own records, and makes that extension only when it parses a message; so
//! the names an upstream writes are learned once, by letting hyper parse a request carrying
//! them (in memory), and the extension is then shared by every response with those names.
//!
//! A pool's [`CaseBook`] knows a few sets of names (by fingerprint) and one extension for all
//! of them; a response with a new set is learned once (tens of microseconds), after which a
//! response costs a fingerprint comparison and the extension's clone.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Sets of names (fingerprints) a book learns at most; more are written as the book knows them.
const MAX_PRINTS: usize = 16;
/// Distinct names a book keeps at most.
const MAX_NAMES: usize = 96;
/// Values of one name a book keeps the case of (hyper pairs names and values in order).
const MAX_REPEATS: usize = 8;

/// The header-name case of one upstream's responses.
#[derive(Default)]
pub struct CaseBook {
    page: ArcSwapOption<Page>,
}

struct Page {
    prints: Vec<u64>,
    /// Names as the upstream wrote them, a name once per value it can carry.
    names: Vec<Bytes>,
    extensions: http::Extensions,
}

impl CaseBook {
    /// The extensions that make hyper write a response's names as the upstream did, when the
    /// names whose fingerprint is `print` are known (or the book is full); else [`Self::learn`].
    pub fn known(&self, print: u64) -> Option<http::Extensions> {
        let page = self.page.load();
        let page = page.as_deref()?;
        (page.prints.contains(&print) || page.prints.len() >= MAX_PRINTS)
            .then(|| page.extensions.clone())
    }

    /// Learns the names of `raw` (a head whose names' fingerprint is `print`), beside those
    /// known, and returns the extensions for all of them.
    pub async fn learn(&self, print: u64, raw: &Bytes) -> http::Extensions {
        let page = self.page.load();
        let mut names = page.as_deref().map(|p| p.names.clone()).unwrap_or_default();
        let mut prints = page
            .as_deref()
            .map(|p| p.prints.clone())
            .unwrap_or_default();
        drop(page);
        prints.push(print);
        let fresh = super::h1::raw_names(raw);
        let mut distinct = names
            .iter()
            .enumerate()
            .filter(|(i, n)| !names[..*i].iter().any(|m| m.eq_ignore_ascii_case(n)))
            .count();
        for name in &fresh {
            if skipped(name) {
                continue;
            }
            let have = names
                .iter()
                .filter(|n| n.eq_ignore_ascii_case(name))
                .count();
            if have == 0 {
                if distinct >= MAX_NAMES {
                    continue;
                }
                distinct += 1;
            }
            let want = fresh
                .iter()
                .filter(|n| n.eq_ignore_ascii_case(name))
                .count();
            let limit = if name.eq_ignore_ascii_case(b"content-length") {
                1
            } else {
                MAX_REPEATS
            };
            if have < want.min(limit) {
                names.push(name.clone());
            }
        }
        let refs: Vec<&[u8]> = names.iter().map(|n| n.as_ref()).collect();
        let extensions = case_extensions(&refs).await;
        let page = Page {
            prints,
            names,
            extensions,
        };
        let extensions = page.extensions.clone();
        self.page.store(Some(Arc::new(page)));
        extensions
    }
}

/// Names not learned: hop-by-hop ones (never forwarded) and those that would change how hyper
/// reads the learning request.
fn skipped(name: &[u8]) -> bool {
    [
        &b"transfer-encoding"[..],
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"host",
    ]
    .iter()
    .any(|s| name.eq_ignore_ascii_case(s))
}

/// Extensions that make hyper write `names` in their case (a name repeated once per value).
pub async fn case_extensions(names: &[&[u8]]) -> http::Extensions {
    let (mut client, server) = tokio::io::duplex(4096);
    let (sender, received) = tokio::sync::oneshot::channel();
    let sender = std::sync::Mutex::new(Some(sender));
    let service = service_fn(move |request: Request<Incoming>| {
        if let Some(sender) = sender.lock().ok().and_then(|mut s| s.take()) {
            let _ = sender.send(request.extensions().clone());
        }
        async { Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new())) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .max_headers(names.len() + 8)
        .serve_connection(TokioIo::new(server), service);
    let mut head = b"GET / HTTP/1.1\r\nHost: tokengate\r\n".to_vec();
    for name in names {
        head.extend_from_slice(name);
        // A value every name accepts (Content-Length too).
        head.extend_from_slice(b": 0\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let write = async {
        use tokio::io::AsyncWriteExt;
        let _ = client.write_all(&head).await;
        // Keep the client end open until the connection is done.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
    };
    let _ = tokio::join!(connection, write);
    received.await.unwrap_or_default()
}
