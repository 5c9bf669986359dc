//! SOCKS5 (RFC 1928) entry to the outbound path, for hosts without capture and for tests.
//!
//! Only what the mesh needs: no authentication (method 0x00), the CONNECT command, IPv4 and
//! IPv6 addresses (no hostnames: ztunnel does not resolve names). The source workload is the
//! client's address, exactly as with capture. Off unless SOCKS5_ADDR is set.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use mesh_rt::drain::DrainWatcher;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{Instrument, debug, info, info_span};

use super::ProxyInputs;

/// Why a SOCKS5 request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("client offers no supported auth method (need 0x00 no-auth)")]
    NoAuthMethod,
    #[error("unsupported command {0} (only CONNECT)")]
    Command(u8),
    #[error("unsupported address type {0} (only IPv4 and IPv6; hostnames are not resolved)")]
    AddressType(u8),
}

/// Reply codes (RFC 1928 §6).
pub const REP_OK: u8 = 0x00;
/// Denied by authorization.
pub const REP_NOT_ALLOWED: u8 = 0x02;
pub const REP_REFUSED: u8 = 0x05;
const REP_CMD_NOT_SUPPORTED: u8 = 0x07;
const REP_ATYP_NOT_SUPPORTED: u8 = 0x08;

pub async fn serve(pi: Arc<ProxyInputs>, listener: TcpListener, drain: DrainWatcher) {
    info!(address = ?listener.local_addr().ok(), component = "socks5", "listener established");
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
            () = drain.signaled() => break,
        };
        let pi = pi.clone();
        let hold = drain.clone();
        tokio::spawn(
            async move {
                let _hold = hold;
                let mut tcp = tcp;
                match handshake(&mut tcp).await {
                    Ok(dst) => {
                        let sf: Arc<dyn super::SocketFactory> =
                            Arc::new(super::DefaultSocketFactory);
                        super::outbound::proxy(
                            &pi,
                            tcp,
                            peer,
                            dst,
                            super::outbound::Entry::Socks5,
                            sf,
                        )
                        .await
                    }
                    Err(e) => debug!(error = %e, "socks5 handshake failed"),
                }
            }
            .instrument(info_span!("socks5", src = %peer)),
        );
    }
}

/// Runs the SOCKS5 greeting and request; returns the requested destination.
async fn handshake(s: &mut TcpStream) -> std::io::Result<SocketAddr> {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await?;
    if hdr[0] != 5 {
        return Err(std::io::Error::other(Socks5Error::Version(hdr[0])));
    }
    let mut methods = vec![0u8; hdr[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(std::io::Error::other(Socks5Error::NoAuthMethod));
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(std::io::Error::other(Socks5Error::Version(req[0])));
    }
    if req[1] != 1 {
        reply(s, REP_CMD_NOT_SUPPORTED).await?;
        return Err(std::io::Error::other(Socks5Error::Command(req[1])));
    }
    let ip = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        t => {
            reply(s, REP_ATYP_NOT_SUPPORTED).await?;
            return Err(std::io::Error::other(Socks5Error::AddressType(t)));
        }
    };
    let port = s.read_u16().await?;
    // The reply is sent by the outbound path once the upstream is open (or refused).
    Ok(SocketAddr::new(ip, port))
}

/// Sends a reply with an unspecified bound address.
pub async fn reply(s: &mut TcpStream, code: u8) -> std::io::Result<()> {
    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
