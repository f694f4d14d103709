//! Body wrappers on the request path: a request body that stops at the
//! service's size limit, and a guest response body that ends in an error
//! (not a clean end) when the guest fails mid-response.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::oneshot;
use wasmtime_wasi_http::Error as HttpError;

use crate::base::respond::Body;

/// A request body that fails once more than `limit` bytes arrive, and
/// records that it did so the host can answer 413.
pub(crate) struct LimitedBody {
    inner: Body,
    limit: u64,
    seen: u64,
    exceeded: Arc<AtomicBool>,
}

impl LimitedBody {
    /// Wraps `inner`; `exceeded` is set when the limit is passed.
    pub(crate) fn new(inner: Body, limit: u64, exceeded: Arc<AtomicBool>) -> LimitedBody {
        LimitedBody {
            inner,
            limit,
            seen: 0,
            exceeded,
        }
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let len = data.map_or(0, |d| d.len() as u64);
            self.seen += len;
            if self.seen > self.limit {
                self.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(HttpError::HttpRequestBodySize(Some(self.seen)))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The reason a guest failed, sent to its response body before the guest's
/// store (and with it the body's sender) is dropped.
pub(crate) type FailureNote = oneshot::Receiver<String>;

/// A guest's response body that ends in an error — so the client sees a
/// truncated response, not a complete one — if the guest failed mid-body.
pub(crate) struct GuestBody {
    inner: Body,
    failure: FailureNote,
    /// Whether the guest's body has ended.
    inner_done: bool,
    /// Whether the server has had a chance to flush what came before the
    /// error (see `poll_frame`).
    yielded_before_error: bool,
    /// What must live as long as the body (request slots, for one).
    _held: Option<Box<dyn Send>>,
}

impl GuestBody {
    pub(crate) fn new(inner: Body, failure: FailureNote) -> GuestBody {
        GuestBody {
            inner,
            failure,
            inner_done: false,
            yielded_before_error: false,
            _held: None,
        }
    }

    /// Keeps `held` until the body is dropped.
    pub(crate) fn holding(mut self, held: Box<dyn Send>) -> GuestBody {
        self._held = Some(held);
        self
    }
}

impl HttpBody for GuestBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if !self.inner_done {
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                None => self.inner_done = true,
                frame => return Poll::Ready(frame),
            }
        }
        if !self.yielded_before_error && !self.failure.is_empty() {
            // hyper drops the bytes it has buffered but not yet written when
            // the body fails in the same poll, so a guest failing right after
            // starting its response would show the client no response at
            // all. Pending once lets hyper flush the status and the partial
            // body first.
            self.yielded_before_error = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.failure.try_recv() {
            Ok(reason) => Poll::Ready(Some(Err(HttpError::InternalError(Some(reason))))),
            Err(_) => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::base::respond;

    #[tokio::test]
    async fn limited_body_passes_small_bodies_and_stops_large_ones() {
        let flag = Arc::new(AtomicBool::new(false));
        let small = LimitedBody::new(respond::full("hello"), 5, flag.clone());
        assert_eq!(small.collect().await.unwrap().to_bytes(), "hello");
        assert!(!flag.load(Ordering::Relaxed));

        let large = LimitedBody::new(respond::full("hello!"), 5, flag.clone());
        assert!(large.collect().await.is_err());
        assert!(flag.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn guest_body_reports_a_failure_at_its_end() {
        let (tx, rx) = oneshot::channel();
        tx.send("trapped".to_string()).unwrap();
        let body = GuestBody::new(respond::full("partial"), rx);
        assert!(body.collect().await.is_err());

        let (tx, rx) = oneshot::channel::<String>();
        drop(tx);
        let body = GuestBody::new(respond::full("whole"), rx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
    }
}
