//! The HBONE client side: a pool of mTLS HTTP/2 connections carrying CONNECT streams.
//!
//! Invariants:
//! - a connection is shared only by tunnels with the same [`PoolKey`]: the same source
//!   identity (the certificate we present), the same destination identity (what we verified)
//!   and the same destination address, opened by the same socket factory (`scope`, e.g. a
//!   pod's network namespace) — so a stream never rides a connection authenticated for
//!   someone else;
//! - per key, connections are opened one at a time (callers queue behind the handshake and
//!   then share its result), and a connection takes at most `max_streams_per_conn` streams
//!   before the next one is opened;
//! - a connection whose driver ended is never handed out again; one idle past
//!   `idle_timeout` is closed by the reaper; with `idle_timeout` zero (Istio's
//!   `POOL_UNUSED_RELEASE_TIMEOUT=0`) a connection that has no stream left is released at
//!   once and never reused, so every tunnel that finds no busy connection does its own
//!   handshake; one whose peer stops answering PINGs is closed by the keepalive;
//! - a stream refused before the peer processed it (GOAWAY racing our checkout, or
//!   REFUSED_STREAM) is retried once on a fresh connection, so a peer's graceful restart
//!   is invisible to callers;
//! - a connection never carries more streams than the peer's SETTINGS allow.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Request, StatusCode};
use mesh_core::Identity;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info_span};

use crate::{Error, H2Settings};

/// Opens the TCP socket under a tunnel (e.g. inside a pod's netns, with a mark).
pub type ConnectFn = dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
    + Send
    + Sync;

/// Plain `TcpStream::connect` with TCP_NODELAY, for tests and dedicated mode.
pub fn default_connector() -> Arc<ConnectFn> {
    Arc::new(|addr| {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}

/// What a pooled connection is authenticated for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst_identity: Identity,
    /// The tunnel endpoint: destination IP and its HBONE port.
    pub dst: SocketAddr,
    /// Which socket factory opened the connection (0 = the process's own netns).
    pub scope: u64,
}

/// Pool settings.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub h2: H2Settings,
    pub connect_timeout: Duration,
    pub max_streams_per_conn: usize,
    /// How long the most recently used idle connection of a key is kept for reuse.
    pub idle_timeout: Duration,
    /// How long any *other* idle connection of the same key is kept (capped by
    /// `idle_timeout`). A burst that needed many connections at once (10,000 streams are 100
    /// connections) would otherwise pin each one's TLS and HTTP/2 state for `idle_timeout`;
    /// one warm connection per key is enough to serve the next stream without a handshake.
    pub surplus_idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            h2: H2Settings::default(),
            connect_timeout: Duration::from_secs(10),
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            surplus_idle_timeout: Duration::from_secs(5),
        }
    }
}

struct Conn {
    sender: SendRequest<Bytes>,
    shared: Arc<ConnShared>,
}

struct ConnShared {
    streams: AtomicUsize,
    closed: AtomicBool,
    /// Milliseconds since the pool's epoch at which the last stream ended.
    idle_since_ms: AtomicU64,
}

type Slot = Arc<tokio::sync::Mutex<Vec<Conn>>>;

struct Inner {
    settings: PoolSettings,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    epoch: Instant,
    opened: AtomicU64,
}

/// A pool of HBONE connections. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// One open CONNECT stream. Dropping it ends the stream (RST if not finished).
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _guard: StreamGuard,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Splits into the two stream halves, keeping the pool accounting alive via `keep`.
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, impl Send) {
        (self.send, self.recv, self._guard)
    }
}

/// True when an error proves the peer never processed the stream, so sending it again
/// elsewhere cannot duplicate anything.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away()
        || e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_io() && !e.is_remote())
}

struct StreamGuard {
    shared: Arc<ConnShared>,
    pool: Arc<Inner>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let now = self.pool.epoch.elapsed().as_millis() as u64;
        self.shared.idle_since_ms.store(now, Ordering::Relaxed);
        self.shared.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Self {
        Pool {
            inner: Arc::new(Inner {
                settings,
                slots: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// HTTP/2 connections opened since the pool was created (for tests and metrics).
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Opens a CONNECT stream to `req`'s authority over a pooled connection for `key`.
    ///
    /// `tls` builds the client config (our certificate, the expected server identity); it is
    /// called only when a new connection is needed.
    pub async fn connect(
        &self,
        key: PoolKey,
        tls: impl FnOnce() -> Result<rustls::ClientConfig, mesh_tls::TlsError>,
        connector: &ConnectFn,
        req: Request<()>,
    ) -> Result<Tunnel, Error> {
        let authority = req.uri().to_string();
        // Retried only after the peer provably never saw the stream on a *reused*
        // connection (GOAWAY, REFUSED_STREAM, a dead socket): then the TLS builder came back
        // unused and the next attempt may open a fresh connection with it. A failure on a
        // connection just opened is final.
        let mut make = tls;
        loop {
            let (sender, shared, unused) = self.checkout(&key, make, connector).await?;
            let guard = StreamGuard {
                shared: shared.clone(),
                pool: self.inner.clone(),
            };
            let attempt = async {
                let mut sender = sender.ready().await?;
                let mut r = Request::new(());
                *r.method_mut() = req.method().clone();
                *r.uri_mut() = req.uri().clone();
                *r.headers_mut() = req.headers().clone();
                let (resp, send) = sender.send_request(r, false)?;
                Ok::<_, h2::Error>((resp.await?, send))
            };
            match attempt.await {
                Ok((resp, send)) => {
                    if resp.status() != StatusCode::OK {
                        return Err(Error::Refused {
                            authority,
                            status: resp.status(),
                        });
                    }
                    return Ok(Tunnel {
                        send,
                        recv: resp.into_body(),
                        _guard: guard,
                    });
                }
                Err(e) => match unused {
                    Some(tls) if unprocessed(&e) => {
                        debug!(error = %e, dst = %key.dst, "stream not processed by the peer; retrying on a new connection");
                        shared.closed.store(true, Ordering::Release);
                        make = tls;
                    }
                    _ => return Err(e.into()),
                },
            }
        }
    }

    /// Finds a connection with room for one more stream, or opens one with `tls` (which is
    /// returned when not used). Counts the stream.
    async fn checkout<F>(
        &self,
        key: &PoolKey,
        tls: F,
        connector: &ConnectFn,
    ) -> Result<(SendRequest<Bytes>, Arc<ConnShared>, Option<F>), Error>
    where
        F: FnOnce() -> Result<rustls::ClientConfig, mesh_tls::TlsError>,
    {
        let slot = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut conns = slot.lock().await;
        let reuse_idle = !self.inner.settings.idle_timeout.is_zero();
        // Streams are only ever added under this lock, so a connection seen here with none
        // cannot gain one behind our back: dropping our handle lets h2 close it.
        conns.retain(|c| {
            !c.shared.closed.load(Ordering::Acquire)
                && (reuse_idle || c.shared.streams.load(Ordering::Acquire) > 0)
        });
        let max = self.inner.settings.max_streams_per_conn;
        for c in conns.iter() {
            // The peer's SETTINGS_MAX_CONCURRENT_STREAMS caps what we configured.
            let cap = max.min(c.sender.current_max_send_streams().max(1));
            if c.shared.streams.load(Ordering::Acquire) < cap {
                c.shared.streams.fetch_add(1, Ordering::AcqRel);
                return Ok((c.sender.clone(), c.shared.clone(), Some(tls)));
            }
        }
        let conn = self.open(key, tls()?, connector).await?;
        conn.shared.streams.fetch_add(1, Ordering::AcqRel);
        let out = (conn.sender.clone(), conn.shared.clone(), None);
        conns.push(conn);
        Ok(out)
    }

    async fn open(
        &self,
        key: &PoolKey,
        tls: rustls::ClientConfig,
        connector: &ConnectFn,
    ) -> Result<Conn, Error> {
        let s = &self.inner.settings;
        let addr = key.dst;
        let tcp = match tokio::time::timeout(s.connect_timeout, connector(addr)).await {
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    addr,
                    timeout: s.connect_timeout,
                });
            }
            Ok(Err(source)) => return Err(Error::Connect { addr, source }),
            Ok(Ok(t)) => t,
        };
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(Arc::new(tls))
            .connect(name, crate::buffered(tcp))
            .await
            .map_err(|source| Error::Tls { addr, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(mesh_tls::ALPN_H2) {
            return Err(Error::Alpn);
        }
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(s.h2.initial_stream_window)
            .initial_connection_window_size(s.h2.initial_connection_window)
            .max_frame_size(s.h2.max_frame_size)
            .max_header_list_size(s.h2.max_header_list_size)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await?;
        let shared = Arc::new(ConnShared {
            streams: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.inner.epoch.elapsed().as_millis() as u64),
        });
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let driver_shared = shared.clone();
        let span =
            info_span!("hbone_conn", dst = %addr, src = %key.src, dst_id = %key.dst_identity);
        let pings = connection.ping_pong();
        let (interval, timeout) = (s.h2.keepalive_interval, s.h2.keepalive_timeout);
        tokio::spawn(
            async move {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            debug!(error = %e, "hbone connection ended with error");
                        }
                    }
                    () = crate::keepalive::watch(pings, interval, timeout) => {}
                }
                driver_shared.closed.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        Ok(Conn { sender, shared })
    }

    /// Closes connections that carried no stream for `idle_timeout`, and idle connections
    /// beyond the most recently used one of their key after `surplus_idle_timeout`. Run
    /// periodically.
    pub async fn reap_idle(&self) -> usize {
        let s = &self.inner.settings;
        let idle = s.idle_timeout.as_millis() as u64;
        let surplus = s.surplus_idle_timeout.min(s.idle_timeout).as_millis() as u64;
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        let slots: Vec<(PoolKey, Slot)> = {
            let s = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            s.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut closed = 0;
        for (key, slot) in slots {
            let mut conns = slot.lock().await;
            let before = conns.len();
            // The idle connection kept longest: the one whose last stream ended last.
            let warm = conns
                .iter()
                .filter(|c| c.shared.streams.load(Ordering::Acquire) == 0)
                .map(|c| c.shared.idle_since_ms.load(Ordering::Relaxed))
                .max();
            let mut kept_warm = false;
            // Streams are only added under the slot lock we hold, so a connection counted
            // idle here stays idle until it is dropped.
            conns.retain(|c| {
                if c.shared.closed.load(Ordering::Acquire) {
                    return false;
                }
                if c.shared.streams.load(Ordering::Acquire) > 0 {
                    return true;
                }
                let since = c.shared.idle_since_ms.load(Ordering::Relaxed);
                let limit = if !kept_warm && Some(since) == warm {
                    kept_warm = true;
                    idle
                } else {
                    surplus
                };
                now.saturating_sub(since) < limit
            });
            closed += before - conns.len();
            if conns.is_empty() {
                drop(conns);
                let mut s = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(cur) = s.get(&key)
                    && Arc::ptr_eq(cur, &slot)
                    && Arc::strong_count(&slot) <= 2
                {
                    s.remove(&key);
                }
            }
        }
        closed
    }

    /// Runs [`reap_idle`](Self::reap_idle) every `every` until the pool is dropped elsewhere.
    pub fn spawn_reaper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let n = Pool { inner }.reap_idle().await;
                if n > 0 {
                    debug!(closed = n, "closed idle hbone connections");
                }
            }
        })
    }
}
