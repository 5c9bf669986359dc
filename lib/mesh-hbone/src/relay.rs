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

use std::{future::poll_fn, io, net::Shutdown};

use bytes::{Bytes, BytesMut};
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

/// Relays until both directions are done or either fails.
pub async fn relay(
    tcp: &TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> (RelayStats, io::Result<()>) {
    let mut stats = RelayStats::default();
    let res = tokio::try_join!(
        tcp_to_tunnel(tcp, &mut send, &mut stats.tcp_to_tunnel),
        tunnel_to_tcp(tcp, &mut recv, &mut stats.tunnel_to_tcp),
    );
    if res.is_err() {
        // Tell the peer the stream is dead rather than leaving it half open.
        send.send_reset(h2::Reason::CANCEL);
    }
    (stats, res.map(|_| ()))
}

async fn tcp_to_tunnel(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    count: &mut u64,
) -> io::Result<()> {
    let mut size = MIN_READ;
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        *count += n as u64;
        if n == size && size < MAX_READ {
            size *= 2;
        } else if n < size / 4 && size > MIN_READ {
            size /= 2;
        }
        let mut chunk = buf.freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_io(e)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    ));
                }
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn tunnel_to_tcp(tcp: &TcpStream, recv: &mut RecvStream, count: &mut u64) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let len = data.len();
        write_all(tcp, &data).await?;
        *count += len as u64;
        // Credit goes back only once the socket took the bytes: backpressure.
        let _ = recv.flow_control().release_capacity(len);
    }
    // END_STREAM: the peer finished sending; pass the half-close on.
    match socket2::SockRef::from(tcp).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes all of `data` to a socket shared with a concurrent reader.
pub async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
