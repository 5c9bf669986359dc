//! Byte-stream views of HBONE streams, so hyper can speak HTTP inside a CONNECT tunnel.
//!
//! [`H2Io`] turns the two halves of an HTTP/2 CONNECT stream (ours as a server, or a pooled
//! [`mesh_hbone::Tunnel`] as a client) into `AsyncRead + AsyncWrite`. Invariants:
//! - received DATA is handed out from h2's own buffer and its flow-control credit is released
//!   only when hyper has read it (backpressure end to end);
//! - a write waits for stream capacity; `shutdown` sends END_STREAM (TCP half-close);
//! - END_STREAM from the peer reads as EOF.
//!
//! [`Rewind`] replays bytes read ahead while detecting the protocol.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// One CONNECT stream as a byte pipe. `keep` holds whatever must live as long as the stream
/// (the pool's stream accounting on the client side).
pub struct H2Io {
    halves: Option<(SendStream<Bytes>, RecvStream)>,
    buf: Bytes,
    eof: bool,
    /// END_STREAM sent: our side is done writing.
    shut: bool,
    keep: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Io").finish_non_exhaustive()
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, keep: Box<dyn Send + Sync>) -> Self {
        H2Io {
            halves: Some((send, recv)),
            buf: Bytes::new(),
            eof: false,
            shut: false,
            keep: Some(keep),
        }
    }

    /// Reads the next chunk (for protocol detection); `None` at END_STREAM.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(std::mem::take(&mut self.buf)));
        }
        let Some((_, recv)) = self.halves.as_mut() else {
            return Err(gone());
        };
        match recv.data().await {
            None => {
                self.eof = true;
                Ok(None)
            }
            Some(Err(e)) => Err(h2_io(e)),
            Some(Ok(d)) => {
                let _ = recv.flow_control().release_capacity(d.len());
                Ok(Some(d))
            }
        }
    }
}

/// How long a stream we finished writing waits for the peer's END_STREAM once its reader is
/// gone, so queued DATA (a final error response, say) is flushed instead of discarded by a
/// reset.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for H2Io {
    fn drop(&mut self) {
        let Some((mut send, mut recv)) = self.halves.take() else {
            return;
        };
        if self.eof {
            return;
        }
        if !self.shut {
            // Dropped mid-stream: cancel, never leave it half open.
            send.send_reset(h2::Reason::CANCEL);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let keep = self.keep.take();
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                while let Some(Ok(d)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(d.len());
                }
            })
            .await;
            drop((send, keep));
        });
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some((_, recv)) = this.halves.as_mut() else {
                return Poll::Ready(Err(gone()));
            };
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                let _ = recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(recv.poll_data(cx)) {
                None => {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(d)) => this.buf = d,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some((send, _)) = this.halves.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        send.reserve_capacity(data.len());
        loop {
            match ready!(send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(gone())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(data.len());
                    send.send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((send, _)) = this.halves.as_mut()
            && !this.shut
        {
            // An error means the stream already ended or was reset: nothing more to say.
            let _ = send.send_data(Bytes::new(), true);
            this.shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// An I/O that first yields `prefix`, then reads from `inner`.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the first bytes of a stream say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Not HTTP (or not decidable from these bytes).
    Opaque,
    /// More bytes are needed.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a stream by its first bytes: the HTTP/2 preface, or an HTTP/1 request line
/// (`TOKEN SP ...`) with a method token of at most 20 characters.
pub fn detect(head: &[u8]) -> Detected {
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    for (i, &b) in head.iter().enumerate() {
        if b == b' ' {
            return if i > 0 {
                Detected::Http1
            } else {
                Detected::Opaque
            };
        }
        let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if !tchar || i >= 20 {
            return Detected::Opaque;
        }
    }
    Detected::NeedMore
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case(b"GET / HTTP/1.1\r\n" => Detected::Http1 ; "get")]
    #[test_case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" => Detected::Http2 ; "h2 preface")]
    #[test_case(b"PRI * HT" => Detected::NeedMore ; "partial preface")]
    #[test_case(b"\x16\x03\x01" => Detected::Opaque ; "tls client hello")]
    #[test_case(b"GE" => Detected::NeedMore ; "partial method")]
    #[test_case(b" GET" => Detected::Opaque ; "leading space")]
    #[test_case(b"SSH-2.0-OpenSSH\r\n" => Detected::Opaque ; "ssh banner")]
    fn detection(b: &[u8]) -> Detected {
        detect(b)
    }
}
