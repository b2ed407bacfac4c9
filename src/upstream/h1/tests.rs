use super::*;

fn get(pieces: &[&[u8]]) -> Result<(u16, Vec<u8>, bool), Error> {
    frame_response(&Method::GET, pieces)
}

#[test]
fn content_length_chunked_and_close_delimited_bodies() {
    let r = get(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"]).unwrap();
    assert_eq!(r, (200, b"hello".to_vec(), true));
    let r = get(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhel",
        b"lo\r\n0\r\nX-T: 1\r\n\r\n",
    ])
    .unwrap();
    assert_eq!(r, (200, b"hello".to_vec(), true));
    let r = get(&[b"HTTP/1.1 200 OK\r\n\r\nuntil", b" close"]).unwrap();
    assert_eq!(r, (200, b"until close".to_vec(), false));
    let r = get(&[b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"]).unwrap();
    assert_eq!(
        r,
        (200, b"ok".to_vec(), false),
        "HTTP/1.0 without keep-alive closes"
    );
}

#[test]
fn bodiless_responses_and_interim_ones() {
    let head = frame_response(
        &Method::HEAD,
        &[b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
    );
    assert_eq!(head.unwrap(), (200, vec![], true));
    assert_eq!(
        get(&[b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"]).unwrap(),
        (304, vec![], true)
    );
    assert_eq!(
        get(&[b"HTTP/1.1 204 No Content\r\n\r\n"]).unwrap(),
        (204, vec![], true)
    );
    // A 204 that declares a body: the connection is not reused.
    assert!(
        !get(&[b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"])
            .unwrap()
            .2
    );
    let r = get(&[
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
    ]);
    assert_eq!(r.unwrap(), (201, b"x".to_vec(), true));
}

#[test]
fn ambiguous_framing_is_refused() {
    let cases: &[(&[u8], Error)] = &[
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            Error::LengthAndChunked,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            Error::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Error::UnsupportedCoding,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Error::UnsupportedCoding,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            Error::UnsupportedCoding,
        ),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Error::UnsupportedCoding,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFF\r\n",
            Error::BadChunk,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            Error::BadChunk,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            Error::BadChunk,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n",
            Error::BadChunk,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
            Error::BadTrailers,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            Error::Truncated,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            Error::Truncated,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Le", Error::ClosedBeforeHead),
    ];
    for (bytes, expected) in cases {
        assert_eq!(
            get(&[bytes]),
            Err(*expected),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn malformed_heads_are_refused() {
    for bytes in [
        &b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ] {
        assert!(
            matches!(get(&[bytes]), Err(Error::Malformed(_))),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    let many = format!(
        "HTTP/1.1 200 OK\r\n{}\r\n",
        "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
    );
    assert_eq!(get(&[many.as_bytes()]), Err(Error::TooManyHeaders));
    let big = format!(
        "HTTP/1.1 200 OK\r\nX-A: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES)
    );
    assert_eq!(get(&[big.as_bytes()]), Err(Error::HeadTooLarge));
}

#[test]
fn bytes_after_a_response_make_it_unreusable() {
    let r = get(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n"]).unwrap();
    assert_eq!(r, (200, b"x".to_vec(), false));
}

#[test]
fn request_heads_carry_their_framing_once() {
    let (mut parts, ()) = http::Request::post("/a?b=1")
        .header("x-auth-token", "t")
        .header("content-length", "3")
        .header("transfer-encoding", "chunked")
        .body(())
        .unwrap()
        .into_parts();
    let mut out = BytesMut::new();
    encode_request(&parts, RequestBody::Length(3), true, &mut out);
    assert_eq!(
        &out[..],
        &b"POST /a?b=1 HTTP/1.1\r\nX-Auth-Token: t\r\nContent-Length: 3\r\n\r\n"[..]
    );
    parts.headers.remove("content-length");
    out.clear();
    encode_request(&parts, RequestBody::Chunked, false, &mut out);
    assert_eq!(
        &out[..],
        &b"POST /a?b=1 HTTP/1.1\r\nx-auth-token: t\r\nTransfer-Encoding: chunked\r\n\r\n"[..]
    );
    let mut line = [0; 18];
    assert_eq!(chunk_header(0x1a2b, &mut line), b"1a2b\r\n");
    assert_eq!(chunk_header(0, &mut line), b"0\r\n");
}

#[test]
fn title_case_raises_the_first_letter_and_each_after_a_dash() {
    let mut parts = http::Request::get("/")
        .header("x-auth-user", "a")
        .header("te", "b")
        .header("x--y", "c")
        .header("-x", "d")
        .header("9-lives", "e")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let mut out = BytesMut::new();
    encode_request(&parts, RequestBody::None, true, &mut out);
    assert_eq!(
        &out[..],
        &b"GET / HTTP/1.1\r\nX-Auth-User: a\r\nTe: b\r\nX--Y: c\r\n-X: d\r\n9-Lives: e\r\n\r\n"[..]
    );
    parts.headers.clear();
    out.clear();
    encode_request(&parts, RequestBody::None, true, &mut out);
    assert_eq!(&out[..], &b"GET / HTTP/1.1\r\n\r\n"[..]);
}
