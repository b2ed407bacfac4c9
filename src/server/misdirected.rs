//! Connections that speak the wrong protocol for the port: plain HTTP to the TLS listener gets
//! a plain-HTTP 400 that says so (nginx's 497), TLS to a plain listener is closed; each is
//! logged once per client address, so a misconfigured client is seen without flooding the log.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The most request-head bytes read before the 400 is written.
const HEAD_LIMIT: usize = 16 * 1024;
/// How long the rest of the request may keep arriving after the 400, so that closing the
/// socket does not reset it before the client has read the answer.
const LINGER: Duration = Duration::from_millis(500);
/// Client addresses remembered as already logged; past this, the memory starts again.
const REMEMBERED: usize = 4096;

/// The first byte of a TLS handshake record.
pub(super) const TLS_HANDSHAKE: u8 = 0x16;

/// The plain-HTTP answer on the TLS port.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: application/json\r\n\
Content-Length: 59\r\n\
Connection: close\r\n\
\r\n\
{\"error\":\"Plain HTTP request sent to the HTTPS (TLS) port\"}";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Mistake {
    PlainHttpOnTls,
    TlsOnPlain,
}

/// Whether this is the first time `client` made `mistake` (within the last `REMEMBERED`).
fn first_time(client: IpAddr, mistake: Mistake) -> bool {
    static SEEN: Mutex<Option<HashSet<(IpAddr, Mistake)>>> = Mutex::new(None);
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() >= REMEMBERED {
        seen.clear();
    }
    seen.insert((client, mistake))
}

/// A request that began with an HTTP method on the TLS port: read its head (within
/// `deadline`), answer 400 in plain HTTP, close.
pub(super) async fn plain_http_on_tls(mut tcp: TcpStream, client: IpAddr, deadline: Instant) {
    if first_time(client, Mistake::PlainHttpOnTls) {
        tracing::info!(%client, "plain HTTP request on the TLS port (answered 400): the client should use https://");
    }
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut chunk = [0u8; 2048];
        while head.len() < HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout_at(deadline, read_head).await, Ok(true)) {
        return;
    }
    let answer = async {
        tcp.write_all(PLAIN_HTTP_ANSWER).await?;
        tcp.shutdown().await
    };
    if !matches!(tokio::time::timeout_at(deadline, answer).await, Ok(Ok(()))) {
        return;
    }
    // What else the client sends (a body) is read and dropped for a moment.
    let linger = async {
        let mut sink = [0u8; 2048];
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// A TLS handshake on the plain-HTTP port: logged once per client, then closed.
pub(super) fn tls_on_plain(client: IpAddr) {
    if first_time(client, Mistake::TlsOnPlain) {
        tracing::info!(%client, "TLS handshake on the plain-HTTP port (closed): the client should use http://, or configure [server.tls]");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.parse().ok())
            .expect("a Content-Length");
        assert_eq!(length, body.len());
        serde_json::from_str::<serde_json::Value>(body).expect("a JSON body");
    }

    #[test]
    fn a_mistake_is_logged_once_per_client() {
        let client: IpAddr = "192.0.2.77".parse().expect("address");
        assert!(first_time(client, Mistake::TlsOnPlain));
        assert!(!first_time(client, Mistake::TlsOnPlain));
        assert!(first_time(client, Mistake::PlainHttpOnTls));
    }
}
