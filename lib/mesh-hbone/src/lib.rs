//! HBONE: TCP carried as HTTP/2 `CONNECT` streams inside mutual TLS 1.3, port 15008.
//!
//! This crate owns the tunnel itself, shared by ztunnel and the waypoint:
//! - [`client`] — opens CONNECT streams over pooled HTTP/2 connections, one pool entry per
//!   (source identity, destination identity, destination address);
//! - [`server`] — accepts HTTP/2 connections, validates each CONNECT, hands it to the caller;
//! - [`relay`] — moves bytes between a TCP socket and an HTTP/2 stream without extra copies;
//! - [`buffered`] — the socket under TLS, with a read buffer held only while it has bytes.
//!
//! The wire format and its sources in Istio are written down in `docs/hbone.md`.

pub mod buffered;
pub mod client;
pub mod header;
pub mod keepalive;
pub mod relay;
pub mod server;

use std::time::Duration;

pub use buffered::{BufferedTcp, TLS_READ_BUFFER, buffered};
pub use client::{Pool, PoolKey, Tunnel};
pub use relay::{RelayStats, relay};
pub use server::{Incoming, serve_connection};

/// HTTP/2 tuning for HBONE connections. Windows are large because a tunnel is a bulk byte
/// pipe across a fast network; a small window caps throughput at window/RTT.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub initial_stream_window: u32,
    pub initial_connection_window: u32,
    pub max_frame_size: u32,
    /// Streams a server admits per connection (clients open another connection past this).
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Errors of the tunnel layer, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "connect to {addr} failed: {source} (is port 15008 reachable, or is a NetworkPolicy blocking HBONE?)"
    )]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?} (is port 15008 reachable?)")]
    ConnectTimeout {
        addr: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("peer did not negotiate ALPN h2")]
    Alpn,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT to {authority} refused with HTTP {status}")]
    Refused {
        authority: String,
        status: http::StatusCode,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] mesh_tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
