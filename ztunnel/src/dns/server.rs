//! The DNS proxy's sockets: UDP and TCP on one address (`127.0.0.1:15053` inside each
//! captured pod, or `DNS_PROXY_ADDR` in dedicated mode), answers from [`super::Resolver`],
//! everything else forwarded to the upstream resolvers of ztunnel's resolv.conf.
//!
//! - Messages are parsed and built with hickory-proto; a query that does not parse gets
//!   FORMERR (if at least its header can be read) and nothing else is affected.
//! - Forwarding sends the client's query bytes unchanged to each upstream in turn
//!   ([`FORWARD_TIMEOUT`] each) from ztunnel's own namespace, with ztunnel's packet mark, so
//!   the capture rules do not send it back here; the upstream's reply is relayed as is. No
//!   upstream answering → SERVFAIL.
//! - UDP answers larger than the client's payload size (512, or its EDNS size) are sent
//!   truncated (TC), so the client retries over TCP.
//! - At most [`MAX_IN_FLIGHT`] queries per server are handled at once; more are dropped, as
//!   a loaded resolver would (the client retries).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use mesh_rt::drain::DrainWatcher;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family as MetricFamily},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use super::{Answer, Family, Resolver, TTL_SECS};
use crate::{
    proxy::{self, SocketFactory},
    state::StateStore,
};

/// Per upstream, per forwarded query.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client connection idle this long is closed (Istio: 5 s).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_IN_FLIGHT: usize = 1024;

/// Labels of the DNS metrics (a subset of Istio ztunnel's).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub request_query_type: String,
    pub request_protocol: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
}

/// `istio_dns_requests_total`, `istio_dns_upstream_requests_total`,
/// `istio_dns_upstream_failures_total`.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    pub requests: MetricFamily<DnsLabels, Counter>,
    pub upstream_requests: MetricFamily<DnsLabels, Counter>,
    pub upstream_failures: MetricFamily<DnsLabels, Counter>,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = DnsMetrics::default();
        let r = registry.sub_registry_with_prefix("istio");
        r.register(
            "dns_requests",
            "Total number of DNS requests",
            m.requests.clone(),
        );
        r.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to an upstream resolver",
            m.upstream_requests.clone(),
        );
        r.register(
            "dns_upstream_failures",
            "Total number of forwarded DNS requests no upstream resolver answered",
            m.upstream_failures.clone(),
        );
        Arc::new(m)
    }
}

/// Who is asking: the pod whose namespace the server runs in, or whoever the source IP is.
#[derive(Debug, Clone)]
pub enum Client {
    /// In-pod mode: the pod as the node agent named it over ZDS.
    Pod { namespace: String, name: String },
    /// Dedicated mode: look the source IP up in the state.
    BySourceIp,
}

/// The asking workload as far as DNS cares.
struct Asker {
    namespace: String,
    workload: String,
}

/// What all DNS servers of one ztunnel share.
#[derive(Debug)]
pub struct DnsShared {
    pub resolver: Resolver,
    pub state: StateStore,
    pub upstreams: Vec<SocketAddr>,
    pub metrics: Arc<DnsMetrics>,
    /// SO_MARK of forwarded queries (skips the capture rules).
    pub mark: Option<u32>,
}

impl DnsShared {
    /// From ztunnel's resolv.conf. A file without a nameserver is logged, not fatal: mesh
    /// names are still answered and everything else gets SERVFAIL.
    pub fn new(cfg: &crate::config::Config, state: StateStore, metrics: Arc<DnsMetrics>) -> Self {
        let (upstreams, search) = match super::resolvconf::ResolvConf::load(&cfg.dns_resolv_conf) {
            Ok(rc) => (rc.nameservers, rc.search),
            Err(e) => {
                warn!(error = %e, "DNS proxy has no upstream resolver");
                (Vec::new(), Vec::new())
            }
        };
        DnsShared {
            resolver: Resolver::new(&cfg.cluster_domain, search),
            state,
            upstreams,
            metrics,
            mark: cfg.packet_mark,
        }
    }
}

/// One server's view: the shared parts and who its clients are.
#[derive(Debug, Clone)]
pub struct Handler {
    pub shared: Arc<DnsShared>,
    pub client: Client,
}

impl std::ops::Deref for Handler {
    type Target = DnsShared;
    fn deref(&self) -> &DnsShared {
        &self.shared
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl Handler {
    /// One query in wire format → the reply in wire format (`None`: send nothing).
    async fn handle(&self, query: &[u8], src: SocketAddr, transport: Transport) -> Option<Vec<u8>> {
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                debug!(%src, error = %e, "malformed DNS query");
                return formerr(query);
            }
        };
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let client = match &self.client {
            Client::Pod { namespace, name } => Some(Asker {
                namespace: namespace.clone(),
                workload: name.clone(),
            }),
            Client::BySourceIp => self
                .state
                .read(|s| s.workload_by_ip("", proxy::canonical_ip(src.ip())))
                .map(|w| Asker {
                    namespace: w.namespace.clone(),
                    workload: w.workload_name.clone(),
                }),
        };
        let client = client.as_ref();
        let q = req.queries.first().cloned();
        let qtype = q.as_ref().map(|q| q.query_type());
        let l = labels(qtype, transport, client);
        self.metrics.requests.get_or_create(&l).inc();
        let family = match qtype {
            Some(RecordType::A) => Some(Family::V4),
            Some(RecordType::AAAA) => Some(Family::V6),
            _ => None,
        };
        let answer = match (&q, family, req.metadata.op_code, req.queries.len()) {
            (Some(q), Some(family), OpCode::Query, 1) => self.state.read(|s| {
                self.resolver.resolve(
                    s,
                    client.map(|c| c.namespace.as_str()),
                    &q.name().to_ascii(),
                    family,
                )
            }),
            _ => Answer::Forward,
        };
        match (answer, q) {
            (Answer::Local { cname, addrs }, Some(q)) => {
                debug!(%src, name = %q.name(), ?cname, ?addrs, "DNS answered from the mesh");
                let resp = local_response(&req, &q, cname.as_deref(), &addrs);
                encode(resp, &req, transport)
            }
            _ => {
                self.metrics.upstream_requests.get_or_create(&l).inc();
                match self.forward(query, transport).await {
                    Ok(reply) => Some(reply),
                    Err(e) => {
                        self.metrics.upstream_failures.get_or_create(&l).inc();
                        warn!(%src, error = %e, "DNS forwarding failed; answering SERVFAIL");
                        let mut resp = Message::error_msg(
                            req.metadata.id,
                            req.metadata.op_code,
                            ResponseCode::ServFail,
                        );
                        resp.metadata.recursion_desired = req.metadata.recursion_desired;
                        resp.queries = req.queries.clone();
                        encode(resp, &req, transport)
                    }
                }
            }
        }
    }

    /// Sends the query to each upstream in turn until one answers.
    async fn forward(&self, query: &[u8], transport: Transport) -> io::Result<Vec<u8>> {
        let mut last = io::Error::other("no upstream resolver configured");
        for &up in &self.upstreams {
            let attempt: BoxIo<'_> = match transport {
                Transport::Udp => Box::pin(forward_udp(up, query, self.mark)),
                Transport::Tcp => Box::pin(forward_tcp(up, query, self.mark)),
            };
            match tokio::time::timeout(FORWARD_TIMEOUT, attempt).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => last = io::Error::new(e.kind(), format!("upstream {up}: {e}")),
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("upstream {up}: no answer within {FORWARD_TIMEOUT:?}"),
                    )
                }
            }
        }
        Err(last)
    }
}

type BoxIo<'a> = std::pin::Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + Send + 'a>>;

async fn forward_udp(up: SocketAddr, query: &[u8], mark: Option<u32>) -> io::Result<Vec<u8>> {
    {
        let domain = if up.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        s.set_nonblocking(true)?;
        if let Some(m) = mark.filter(|&m| m != 0) {
            s.set_mark(m)?;
        }
        let local: SocketAddr = if up.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        s.bind(&local.into())?;
        let sock = UdpSocket::from_std(s.into())?;
        sock.connect(up).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await?;
            // Only the reply to this query (same id); anything else on the socket is noise.
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }
}

async fn forward_tcp(up: SocketAddr, query: &[u8], mark: Option<u32>) -> io::Result<Vec<u8>> {
    let mut s = proxy::connect(
        &proxy::DefaultSocketFactory,
        up,
        mark.filter(|&m| m != 0),
        proxy::Source::Any,
    )
    .await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(query).await?;
    let n = s.read_u16().await? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

fn labels(qtype: Option<RecordType>, transport: Transport, client: Option<&Asker>) -> DnsLabels {
    DnsLabels {
        request_query_type: qtype.map(|t| t.to_string()).unwrap_or_default(),
        request_protocol: transport.as_str().to_owned(),
        source_workload: client.map(|c| c.workload.clone()).unwrap_or_default(),
        source_workload_namespace: client.map(|c| c.namespace.clone()).unwrap_or_default(),
    }
}

fn local_response(req: &Message, q: &Query, cname: Option<&str>, addrs: &[IpAddr]) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.add_query(q.clone());
    let mut owner = q.name().clone();
    if let Some(target) = cname.and_then(|c| Name::from_ascii(format!("{c}.")).ok()) {
        resp.add_answer(Record::from_rdata(
            owner.clone(),
            TTL_SECS,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    for ip in addrs {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        resp.add_answer(Record::from_rdata(owner.clone(), TTL_SECS, rdata));
    }
    resp
}

/// Serializes a response; over UDP, truncates it to what the client accepts.
fn encode(mut resp: Message, req: &Message, transport: Transport) -> Option<Vec<u8>> {
    if let Some(edns) = &req.edns {
        let mut e = Edns::new();
        e.set_max_payload(edns.max_payload().max(512));
        resp.set_edns(e);
    }
    let bytes = match resp.to_vec() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "could not encode a DNS response");
            return None;
        }
    };
    let limit = req.edns.as_ref().map_or(512, |e| e.max_payload().max(512)) as usize;
    if transport == Transport::Udp && bytes.len() > limit {
        return resp.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// FORMERR for a query whose header is readable; nothing otherwise.
fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// One DNS server: a UDP socket and a TCP listener on the same address.
#[derive(Debug)]
pub struct DnsServer {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    handler: Arc<Handler>,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` through `sf` (in a pod's namespace in in-pod mode).
    /// With `reuse_port`, a new ztunnel can bind the same address while the old one drains.
    pub fn bind(
        sf: &dyn SocketFactory,
        addr: SocketAddr,
        reuse_port: bool,
        handler: Handler,
    ) -> io::Result<Self> {
        let tcp = proxy::bind_with(sf, addr, reuse_port)?;
        let addr = tcp.local_addr()?;
        let domain = if addr.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let u = sf.udp_socket(domain)?;
        if reuse_port {
            u.set_reuse_port(true)?;
        }
        u.bind(&addr.into())?;
        let udp = Arc::new(UdpSocket::from_std(u.into())?);
        Ok(DnsServer {
            udp,
            tcp,
            handler: Arc::new(handler),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until drained.
    pub async fn run(self, drain: DrainWatcher) {
        let addr = self.local_addr().ok();
        info!(?addr, upstreams = ?self.handler.upstreams, "DNS proxy listening (udp, tcp)");
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let udp = serve_udp(self.udp.clone(), self.handler.clone(), limit.clone());
        let tcp = serve_tcp(self.tcp, self.handler.clone(), limit);
        tokio::select! {
            () = udp => {}
            () = tcp => {}
            () = drain.signaled() => {}
        }
        debug!(?addr, "DNS proxy stopped");
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, handler: Arc<Handler>, limit: Arc<Semaphore>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux: keep serving.
                debug!(error = %e, "DNS UDP receive error");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%src, "DNS proxy busy: query dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, handler) = (sock.clone(), handler.clone());
        tokio::spawn(async move {
            if let Some(reply) = handler.handle(&query, src, Transport::Udp).await
                && let Err(e) = sock.send_to(&reply, src).await
            {
                debug!(%src, error = %e, "DNS UDP send failed");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>, limit: Arc<Semaphore>) {
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handler, limit) = (handler.clone(), limit.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_tcp_conn(stream, src, &handler, &limit).await {
                debug!(%src, error = %e, "DNS TCP connection ended");
            }
        });
    }
}

/// Length-prefixed queries, answered in order, until idle or closed.
async fn serve_tcp_conn(
    mut s: TcpStream,
    src: SocketAddr,
    handler: &Handler,
    limit: &Semaphore,
) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, s.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE_TIMEOUT, s.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query body not received"))??;
        let _permit = limit
            .acquire()
            .await
            .map_err(|_| io::Error::other("DNS proxy closed"))?;
        let Some(reply) = handler.handle(&query, src, Transport::Tcp).await else {
            continue;
        };
        let n = u16::try_from(reply.len()).map_err(|_| io::Error::other("reply too long"))?;
        s.write_all(&n.to_be_bytes()).await?;
        s.write_all(&reply).await?;
    }
}
