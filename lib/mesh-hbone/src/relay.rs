//! Moving bytes between a TCP socket and an HTTP/2 stream.
//!
//! Hot path. Choices, each for a measured reason (see `docs/hbone.md`):
//! - no buffer is held while a direction is idle: a read buffer is allocated only once the
//!   socket is readable, then frozen and handed to h2 without a copy, so an idle tunnel costs
//!   no buffer memory;
//! - the read size adapts: it starts small and doubles (up to 256 KiB) while reads fill it,
//!   so bulk transfers make few large TLS records and chatty ones stay small;
//! - received DATA is written straight from h2's buffer, and its flow-control credit is
//!   released only after the socket took it (backpressure end to end).
//!
//! Half-close is preserved: TCP EOF becomes END_STREAM, END_STREAM becomes a write shutdown.

use std::{
    future::poll_fn,
    io,
    net::Shutdown,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Bytes moved by one relay, reported even when it ended in an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Read from the TCP socket and sent into the tunnel.
    pub tcp_to_tunnel: u64,
    /// Received from the tunnel and written to the TCP socket.
    pub tunnel_to_tcp: u64,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Relays until both directions are done or either fails. The stream halves are borrowed,
/// so a caller's state that owns them is not moved (and stored twice) into this future.
pub async fn relay(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
) -> (RelayStats, io::Result<()>) {
    let mut r = Relay {
        tcp,
        send,
        recv,
        up: Up::Read(MIN_READ),
        down: Down::Recv,
        stats: RelayStats::default(),
    };
    let res = poll_fn(|cx| r.poll(cx)).await;
    if res.is_err() {
        // Tell the peer the stream is dead rather than leaving it half open.
        r.send.send_reset(h2::Reason::CANCEL);
    }
    (r.stats, res)
}

/// Both directions of one relay as a single hand-polled state machine. An idle relay is
/// this struct and nothing else (no nested futures, no join): it is what every idle proxied
/// connection holds for its whole life, so its size is memory per connection.
struct Relay<'a> {
    tcp: &'a TcpStream,
    send: &'a mut SendStream<Bytes>,
    recv: &'a mut RecvStream,
    up: Up,
    down: Down,
    stats: RelayStats,
}

/// TCP → tunnel.
enum Up {
    /// Waiting for the socket; the next read size.
    Read(usize),
    /// A chunk read but not yet handed to h2 (waiting for stream capacity).
    Send(Bytes, usize),
    Done,
}

/// Tunnel → TCP.
enum Down {
    Recv,
    /// DATA being written to the socket; its full length, released as credit once written.
    Write(Bytes, usize),
    Done,
}

impl Relay<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let up = self.poll_up(cx)?;
        let down = self.poll_down(cx)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Ready once TCP EOF has been passed on as END_STREAM.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.up {
                Up::Done => return Poll::Ready(Ok(())),
                Up::Read(size) => {
                    let size = *size;
                    ready!(self.tcp.poll_read_ready(cx))?;
                    // Allocated only now that the socket is readable: an idle direction
                    // holds no buffer.
                    let mut buf = BytesMut::with_capacity(size);
                    let n = match self.tcp.try_read_buf(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if n == 0 {
                        self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
                        self.up = Up::Done;
                        continue;
                    }
                    self.stats.tcp_to_tunnel += n as u64;
                    let next = if n == size && size < MAX_READ {
                        size * 2
                    } else if n < size / 4 && size > MIN_READ {
                        size / 2
                    } else {
                        size
                    };
                    self.send.reserve_capacity(n);
                    self.up = Up::Send(buf.freeze(), next);
                }
                Up::Send(chunk, next) => {
                    let cap = match ready!(self.send.poll_capacity(cx)) {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                        None => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "tunnel stream closed",
                            )));
                        }
                    };
                    if cap == 0 {
                        continue;
                    }
                    let part = chunk.split_to(cap.min(chunk.len()));
                    self.send.send_data(part, false).map_err(h2_io)?;
                    if chunk.is_empty() {
                        self.up = Up::Read(*next);
                    } else {
                        self.send.reserve_capacity(chunk.len());
                    }
                }
            }
        }
    }

    /// Ready once END_STREAM has been passed on as a write shutdown.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.down {
                Down::Done => return Poll::Ready(Ok(())),
                Down::Recv => match ready!(self.recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        let len = data.len();
                        self.down = Down::Write(data, len);
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => {
                        // END_STREAM: the peer finished sending; pass the half-close on.
                        match socket2::SockRef::from(self.tcp).shutdown(Shutdown::Write) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                        self.down = Down::Done;
                    }
                },
                Down::Write(data, len) => {
                    while !data.is_empty() {
                        ready!(self.tcp.poll_write_ready(cx))?;
                        match self.tcp.try_write(data) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => data.advance(n),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    let len = *len;
                    self.stats.tunnel_to_tcp += len as u64;
                    // Credit goes back only once the socket took the bytes: backpressure.
                    let _ = self.recv.flow_control().release_capacity(len);
                    self.down = Down::Recv;
                }
            }
        }
    }
}
