//! The HBONE server side: one HTTP/2 connection in, CONNECT streams out to a handler.
//!
//! The connection task validates every request head (CONNECT, `IP:port` authority) and
//! answers bad ones itself (405/400), so a handler only ever sees a well-formed destination.
//! Each valid stream runs in its own task; one failing stream never affects the others.
//! When `shutdown` fires, the server sends GOAWAY and keeps serving the streams in flight.

use std::{future::Future, net::SocketAddr};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::{Error, H2Settings, header};

/// A validated CONNECT request waiting for the handler's verdict.
pub struct Incoming {
    /// The destination the client asked for (`:authority`).
    pub dst: SocketAddr,
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Refuses the stream with `status` (e.g. 401 denied by policy, 503 upstream down).
    pub fn reject(mut self, status: StatusCode) {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        if let Err(e) = self.respond.send_response(resp, true) {
            debug!(error = %e, "could not send rejection; client went away");
        }
    }

    /// Accepts the stream (200) and returns both halves for relaying.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok((send, self.recv))
    }
}

/// Serves one HTTP/2 connection (already TLS-terminated) until the peer closes it or, after
/// `shutdown` resolves, until the streams in flight finish.
pub async fn serve_connection<IO, H, Fut>(
    io: IO,
    settings: &H2Settings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.initial_stream_window)
        .initial_connection_window_size(settings.initial_connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::pin!(shutdown);
    let keepalive = crate::keepalive::watch(
        conn.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut keepalive => return Ok(()),
            () = &mut shutdown, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let (req, mut respond) = match next {
            None => return Ok(()),
            Some(Ok(r)) => r,
            Some(Err(e)) if e.is_go_away() || e.is_io() => {
                debug!(error = %e, "hbone connection closed");
                return Ok(());
            }
            Some(Err(e)) => return Err(e.into()),
        };
        let dst = match header::validate(&req) {
            Ok(dst) => dst,
            Err(e) => {
                warn!(error = %e, "rejecting malformed CONNECT");
                let mut resp = Response::new(());
                *resp.status_mut() = e.status();
                let _ = respond.send_response(resp, true);
                continue;
            }
        };
        let (parts, recv) = req.into_parts();
        tokio::spawn(handler(Incoming {
            dst,
            headers: parts.headers,
            respond,
            recv,
        }));
    }
}
