//! Bodies: every body tokengate sends, as one enum rather than a boxed trait object, so that a
//! request costs no allocation for its bodies — tokengate's own (complete, in memory), the
//! client's streamed upstream, and the upstream's streamed back.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Limited;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{ClientBody, PooledBody};
use crate::error::BoxError;

/// The body of every request tokengate sends upstream and every response it sends.
pub enum Body {
    /// Complete, in memory (`None` once sent).
    Full(Option<Bytes>),
    /// The client's request body on its way upstream.
    Client(ClientBody),
    /// The same, capped at `max_body_bytes`.
    Limited(Limited<ClientBody>),
    /// The upstream's response body on its way to the client.
    Upstream(PooledBody),
    /// The same, counted for its access-log line, written when it ends.
    Logged(Logged),
}

impl Body {
    /// Whether this is an upstream's response body, on its way to the client.
    pub fn is_proxied(&self) -> bool {
        matches!(self, Body::Upstream(_) | Body::Logged(_))
    }
}

/// An upstream response body whose access-log line waits for its end (or for the client to go
/// away), to say how many body bytes were sent.
pub struct Logged {
    body: PooledBody,
    sent: u64,
    line: Option<crate::access_log::Pending>,
}

impl Logged {
    /// `body`, with `line` written when it ends.
    pub fn new(body: PooledBody, line: crate::access_log::Pending) -> Logged {
        Logged {
            body,
            sent: 0,
            line: Some(line),
        }
    }

    fn finish(&mut self) {
        if let Some(line) = self.line.take() {
            line.finish(self.sent);
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Full(Some(bytes.into()))
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Body::Client(body) => Pin::new(body).poll_frame(cx),
            Body::Limited(body) => Pin::new(body).poll_frame(cx),
            Body::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Body::Logged(logged) => {
                let polled = Pin::new(&mut logged.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            logged.sent += data.len() as u64;
                        }
                    }
                    Poll::Ready(_) => logged.finish(),
                    Poll::Pending => {}
                }
                polled.map_err(BoxError::from)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Body::Client(body) => body.is_end_stream(),
            Body::Limited(body) => body.is_end_stream(),
            Body::Upstream(body) => body.is_end_stream(),
            Body::Logged(logged) => logged.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Client(body) => body.size_hint(),
            Body::Limited(body) => body.size_hint(),
            Body::Upstream(body) => body.size_hint(),
            Body::Logged(logged) => logged.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_bodies_are_one_frame_with_an_exact_size() {
        let body = full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let empty = full(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.collect().await.unwrap().to_bytes(), "");
    }
}
