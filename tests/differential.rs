//! The upstream client's response parser against hyper's client, on the same bytes: responses
//! assembled from well-formed and hostile pieces (framing headers that conflict, codings,
//! chunk sizes, obs-fold, bare CR, short bodies), split at random points. A loopback server
//! replays each, piece by piece, to hyper's HTTP/1 client; `upstream::h1::frame_response` reads
//! the same pieces. Wherever ours accepts a response, hyper must read the same status and body:
//! ours may refuse what hyper accepts (it is stricter on purpose), never the other way round.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokengate::upstream::h1::frame_response;

const STATUS_LINES: &[&str] = &[
    "HTTP/1.1 200 OK",
    "HTTP/1.0 200 OK",
    "HTTP/1.1 201 Created",
    "HTTP/1.1 204 No Content",
    "HTTP/1.1 304 Not Modified",
    "HTTP/1.1 404 Not Found",
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
    "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK",
    "HTTP/1.1 200",
    "HTTP/1.1 2OO OK",
];

const HEADERS: &[&str] = &[
    "Content-Length: 5",
    "Content-Length: 11",
    "Content-Length: 0",
    "Content-Length: 5, 5",
    "Content-Length: 5, 6",
    "Content-Length: +5",
    "Content-Length: -1",
    "Content-Length: 5x",
    "content-length:5",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: CHUNKED",
    "Transfer-Encoding: gzip",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Connection: close",
    "Connection: keep-alive",
    "X-App: Value",
    "Set-Cookie: a=1",
    " folded continuation",
    "X-Bad: a\rb",
    "X Bad: space in name",
    "X-Empty:",
];

const BODIES: &[&str] = &[
    "",
    "hello",
    "hello world",
    "hel",
    "5\r\nhello\r\n0\r\n\r\n",
    "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "5\r\nhello\r\n0\r\nTrailer: v\r\n\r\n",
    "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
    "5 \r\nhello\r\n0\r\n\r\n",
    "5\nhello\r\n0\r\n\r\n",
    "5\r\nhelloXX0\r\n\r\n",
    "fffffffffffffffff\r\nx\r\n",
    "zz\r\nhello\r\n0\r\n\r\n",
    "5\r\nhel",
    "0\r\n\r\n",
];

/// One response: status line, headers, body, split at the given fractions of its length.
fn response() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>)> {
    (
        any::<bool>(),
        0..STATUS_LINES.len(),
        proptest::collection::vec(0..HEADERS.len(), 0..4),
        0..BODIES.len(),
        proptest::collection::vec(any::<usize>(), 0..4),
    )
        .prop_map(|(head, status, headers, body, cuts)| {
            let mut bytes = STATUS_LINES[status].as_bytes().to_vec();
            bytes.extend_from_slice(b"\r\n");
            for h in headers {
                bytes.extend_from_slice(HEADERS[h].as_bytes());
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(BODIES[body].as_bytes());
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            (head, bytes, cuts)
        })
}

fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts {
        out.push(&bytes[at..cut]);
        at = cut;
    }
    out.push(&bytes[at..]);
    out
}

/// What hyper's client reads when a server sends `pieces` (one write each, then closes).
async fn hyper_reads(method: Method, pieces: Vec<Vec<u8>>) -> Result<(u16, Vec<u8>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut byte).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&byte[..n]),
            }
        }
        for piece in pieces {
            if socket.write_all(&piece).await.is_err() {
                return;
            }
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = socket.shutdown().await;
    });
    let read = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri("/")
            .header("host", "upstream")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes().to_vec()))
    };
    let verdict = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    server.abort();
    verdict
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn where_ours_accepts_a_response_hyper_reads_the_same((head, bytes, cuts) in response()) {
        let method = if head { Method::HEAD } else { Method::GET };
        let split = pieces(&bytes, &cuts);
        let ours = frame_response(&method, &split);
        // Ours does not depend on how the bytes were read.
        prop_assert_eq!(&ours, &frame_response(&method, &[&bytes]));
        if let Ok((status, body, _)) = ours {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let owned = split.iter().map(|p| p.to_vec()).collect();
            let theirs = runtime.block_on(hyper_reads(method, owned));
            prop_assert_eq!(
                theirs,
                Ok((status, body)),
                "ours accepted {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
}

/// The generator reaches both verdicts (so the property above is not vacuous): a fair share
/// of what it makes is accepted, a fair share refused.
#[test]
fn the_generated_responses_include_accepted_and_refused_ones() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = response();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..1000 {
        let (head, bytes, cuts) = strategy.new_tree(&mut runner).unwrap().current();
        let method = if head { Method::HEAD } else { Method::GET };
        match frame_response(&method, &pieces(&bytes, &cuts)) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        accepted >= 150 && refused >= 150,
        "accepted {accepted}, refused {refused}"
    );
}
