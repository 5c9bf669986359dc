//! The data path: listeners, the per-connection flows, and what they share.
//!
//! ```text
//!  app ──:15001 (outbound capture)──┐                         ┌──:15008 (HBONE)── peer ztunnel
//!  app ──SOCKS5 (optional)──────────┼─ route ─ HBONE pool ────┤
//!                                   └─ passthrough (plain) ───┘
//!  peer ztunnel ──:15008──> authorize ──> app (local workload)
//!  plaintext peer ──:15006 (inbound capture)──> authorize ──> app
//! ```
//!
//! Every connection is authorized through [`authorize`] before a byte reaches the app, and is
//! accounted by one [`metrics::ConnectionResult`].

pub mod inbound;
pub mod inbound_plain;
pub mod metrics;
pub mod outbound;
pub mod route;
pub mod socks5;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_core::{
    Identity,
    policy::{self, Connection, Decision},
    workload::Workload,
};
use mesh_hbone::{H2Settings, Pool};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{config::Config, identity::SecretManager, state::StateStore};

/// Everything a listener needs, shared by all of them.
pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub state: StateStore,
    pub secrets: Arc<SecretManager>,
    pub pool: Pool,
    pub metrics: Arc<metrics::Metrics>,
    /// The DNS proxy's shared parts, when it is on (in-pod DNS capture or DNS_PROXY_ADDR).
    pub dns: Option<Arc<crate::dns::server::DnsShared>>,
    pub h2: H2Settings,
    /// Counts authorization calls: tests assert every connection went through the engine.
    pub authz_calls: AtomicU64,
}

impl std::fmt::Debug for ProxyInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyInputs").finish_non_exhaustive()
    }
}

impl ProxyInputs {
    /// Is `w` served by this ztunnel? With NODE_NAME set, only workloads on that node.
    pub fn is_local(&self, w: &Workload) -> bool {
        match &self.cfg.node_name {
            Some(n) => &w.node == n,
            None => true,
        }
    }

    /// The local workload owning `ip`, if any.
    pub fn local_workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let ip = canonical_ip(ip);
        self.state
            .read(|s| s.workload_by_ip("", ip))
            .filter(|w| self.is_local(w))
    }

    /// The single call into the policy engine for a connection to local workload `dst_w`.
    pub fn authorize(
        &self,
        dst_w: &Workload,
        src: SocketAddr,
        dst: SocketAddr,
        src_identity: Option<Identity>,
    ) -> Decision {
        self.authz_calls.fetch_add(1, Ordering::Relaxed);
        // The policies of the workload as it is *now*: a connection may have been accepted
        // long before a selector policy was attached to it (found by the netns lab). A
        // workload that left the configuration gets nothing (fail closed).
        let policies = self.state.read(|s| {
            s.workload_by_uid(&dst_w.uid)
                .map(|current| s.policies_for(&current))
        });
        let Some(policies) = policies else {
            return Decision {
                allowed: false,
                policy: None,
                rule: None,
                reason: "the destination workload is no longer in the configuration",
            };
        };
        let conn = Connection {
            src: SocketAddr::new(canonical_ip(src.ip()), src.port()),
            dst: SocketAddr::new(canonical_ip(dst.ip()), dst.port()),
            src_identity,
        };
        let d = policy::evaluate(policies.iter().map(|p| p.as_ref()), &conn);
        tracing::debug!(%conn, allowed = d.allowed, policy = ?d.policy, reason = d.reason, "authorization decision");
        d
    }
}

/// Errors of one proxied connection. Each is logged once and closes only that connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no original destination: {0} (is the connection really redirected by iptables?)")]
    OriginalDst(io::Error),
    #[error("source {0} is not a workload served by this ztunnel")]
    UnknownSource(IpAddr),
    #[error("destination {0} is not a workload served by this ztunnel")]
    UnknownDestination(SocketAddr),
    #[error("connection to {0} would loop back into ztunnel")]
    Loop(SocketAddr),
    #[error(transparent)]
    Route(#[from] route::RouteError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("HBONE: {0}")]
    Hbone(#[from] mesh_hbone::Error),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake from {peer}: {source}")]
    Handshake { peer: SocketAddr, source: io::Error },
}

/// IPv4-mapped IPv6 (from dual-stack listeners) back to IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Binds a listener in ztunnel's own network namespace.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(&DefaultSocketFactory, addr, false)
}

/// The original destination of a redirected connection (`SO_ORIGINAL_DST`).
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(s);
    let local = s.local_addr()?;
    let addr = if local.is_ipv4() || canonical_ip(local.ip()).is_ipv4() {
        sock.original_dst_v4().or_else(|_| sock.original_dst_v6())?
    } else {
        sock.original_dst_v6()?
    };
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))?;
    Ok(SocketAddr::new(canonical_ip(addr.ip()), addr.port()))
}

/// Which source address a connection ztunnel opens should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Whatever the kernel picks.
    Any,
    /// This address if it is local to the netns (the source workload's own IP in
    /// dedicated mode), else whatever the kernel picks.
    PreferLocal(IpAddr),
    /// This address even though it is foreign (IP_TRANSPARENT): the app sees the client.
    Transparent(IpAddr),
}

/// Creates the sockets of one proxy: in ztunnel's own network namespace (dedicated mode),
/// or inside a pod's (shared mode), so connections leave from the pod's own address.
pub trait SocketFactory: Send + Sync + 'static {
    /// A new non-blocking TCP socket.
    fn tcp_socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket>;
    /// A new non-blocking UDP socket (the DNS proxy's listener).
    fn udp_socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        new_udp_socket(domain)
    }
    /// Identifies the namespace, to keep pooled connections of different pods apart.
    fn scope(&self) -> u64;
}

/// Sockets in ztunnel's own network namespace.
#[derive(Debug, Default)]
pub struct DefaultSocketFactory;

impl SocketFactory for DefaultSocketFactory {
    fn tcp_socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        new_tcp_socket(domain)
    }

    fn scope(&self) -> u64 {
        0
    }
}

/// A non-blocking TCP socket in the calling thread's network namespace.
pub fn new_tcp_socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A non-blocking UDP socket in the calling thread's network namespace.
pub fn new_udp_socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Binds a listener through a socket factory (IPv6 wildcard falls back to IPv4).
pub fn bind_with(
    sf: &dyn SocketFactory,
    addr: SocketAddr,
    reuse_port: bool,
) -> io::Result<TcpListener> {
    let try_bind = |a: SocketAddr| -> io::Result<TcpListener> {
        let domain = if a.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = sf.tcp_socket(domain)?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.bind(&a.into())?;
        s.listen(1024)?;
        TcpListener::from_std(s.into())
    };
    match try_bind(addr) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            tracing::debug!(error = %e, %addr, "IPv6 wildcard unavailable, binding IPv4");
            try_bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                addr.port(),
            ))
        }
        r => r,
    }
}

/// Opens a TCP connection with ztunnel's mark and the requested source address.
pub async fn connect(
    sf: &dyn SocketFactory,
    dst: SocketAddr,
    mark: Option<u32>,
    source: Source,
) -> io::Result<TcpStream> {
    match source {
        Source::PreferLocal(ip) => match connect_from(sf, dst, mark, Some(ip), false).await {
            Err(e) if e.raw_os_error() == Some(99) => {
                connect_from(sf, dst, mark, None, false).await
            }
            r => r,
        },
        // A pod calling itself needs no spoofing.
        Source::Transparent(ip) if canonical_ip(ip) == canonical_ip(dst.ip()) => {
            connect_from(sf, dst, mark, None, false).await
        }
        Source::Transparent(ip) => connect_from(sf, dst, mark, Some(ip), true).await,
        Source::Any => connect_from(sf, dst, mark, None, false).await,
    }
}

async fn connect_from(
    sf: &dyn SocketFactory,
    dst: SocketAddr,
    mark: Option<u32>,
    src: Option<IpAddr>,
    transparent: bool,
) -> io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = sf.tcp_socket(domain)?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    if let Some(src) = src.map(canonical_ip)
        && src.is_ipv4() == dst.is_ipv4()
    {
        if transparent {
            if dst.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_ip_transparent_v6(true)?;
            }
        }
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    let std: std::net::TcpStream = s.into();
    let stream = TcpSocket::from_std_stream(std).connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
