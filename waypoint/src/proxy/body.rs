//! Bodies inside the waypoint: the request body (buffered for replay, or streamed), a byte
//! counter for request bodies, and [`Finish`], the response body that writes the request's
//! log line and metrics (and hands its span to the exporter) exactly once — at the end of the
//! body or when it is dropped.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::{
    metrics::{Metrics, Record},
    upstream::{Body, BoxError},
};

use super::full;

/// A request body that is either buffered (replayable for retries and mirrors) or streamed.
pub(super) enum ReqBody {
    Buffered(Bytes),
    Streaming(Option<Body>),
}

impl ReqBody {
    pub(super) fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Buffered(b) => Some(full(b.clone())),
            ReqBody::Streaming(s) => s.take(),
        }
    }
    pub(super) fn replayable(&self) -> bool {
        matches!(self, ReqBody::Buffered(_))
    }
}

/// Counts request body bytes as hyper pulls them.
pub(super) struct CountIn<B> {
    pub(super) inner: B,
    pub(super) n: Arc<AtomicU64>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for CountIn<B>
where
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.n.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r.map(|o| o.map(|r| r.map_err(Into::into)))
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body: counts bytes, reads `grpc-status` from trailers, and records the
/// request (log line + metrics) once, at the end of the body or when it is dropped.
pub(super) struct Finish {
    pub(super) inner: Body,
    pub(super) record: Option<Record>,
    pub(super) started: Instant,
    pub(super) bytes_in: Arc<AtomicU64>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) down: Arc<super::Downstream>,
}

impl Finish {
    fn done(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            r.request_bytes = self.bytes_in.load(Ordering::Relaxed);
            r.finish(&self.metrics, &self.down.labels);
            crate::trace::finish(r);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.done();
    }
}

impl hyper::body::Body for Finish {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    if let Some(rec) = self.record.as_mut() {
                        rec.response_bytes += n;
                    }
                } else if let Some(t) = f.trailers_ref()
                    && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                    && let Some(rec) = self.record.as_mut()
                {
                    rec.labels.grpc_response_status = s.to_string();
                }
            }
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(rec) = self.record.as_mut() {
                    rec.labels.response_flags = "UPE";
                }
                self.done();
            }
            Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
