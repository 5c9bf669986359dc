//! Keeps one set of proxies per enrolled pod, driven by the ZDS session.
//!
//! - `Add` starts the pod's listeners (15001, 15006, 15008, and DNS on localhost:15053 when
//!   DNS capture is on) inside its netns — or does nothing
//!   if the same netns is already served; a different netns for the same uid replaces it.
//! - `Keep` (snapshot only) marks a pod as still present without a netns.
//! - `Del` drains that pod's proxies.
//! - `SnapshotSent` drains every pod the snapshot did not name, and makes ztunnel ready.
//!
//! Readiness: not ready until the first snapshot is complete and every Add succeeded.
//! The connection is re-established with backoff (10 ms doubling to 15 s) if it drops;
//! running proxies keep serving meanwhile and are reconciled by the next snapshot.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_rt::{
    drain::{self, DrainTrigger, DrainWatcher},
    readiness::{BlockReady, Ready},
};
use tracing::{Instrument, info, info_span, warn};

use super::{
    Error,
    netns::{InpodNetns, NetnsSocketFactory},
    zds::{Connection, Request},
};
use crate::{
    dns::server::{Client, DnsServer, Handler},
    proxy::{self, ProxyInputs, SocketFactory},
};

/// The in-pod DNS proxy port (the CNI's DNS capture target).
pub const DNS_PORT: u16 = 15053;

struct PodProxy {
    netns_id: (u64, u64),
    drain: DrainTrigger,
}

/// Runs the in-pod proxies of this node.
pub struct WorkloadManager {
    pi: Arc<ProxyInputs>,
    uds: PathBuf,
    home: Arc<OwnedFd>,
    ready: Ready,
    pods: HashMap<String, PodProxy>,
    /// UIDs named by the snapshot in progress; `None` once it is complete.
    snapshot: Option<HashSet<String>>,
    block: Option<BlockReady>,
}

impl std::fmt::Debug for WorkloadManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadManager")
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

impl WorkloadManager {
    pub fn new(pi: Arc<ProxyInputs>, uds: PathBuf, ready: Ready) -> Result<Self, Error> {
        let home = Arc::new(super::netns::own_netns()?);
        let block = Some(ready.register("zds snapshot"));
        Ok(WorkloadManager {
            pi,
            uds,
            home,
            ready,
            pods: HashMap::new(),
            snapshot: Some(HashSet::new()),
            block,
        })
    }

    /// Connects, serves the session, reconnects; returns when the process drains.
    pub async fn run(mut self, drain: DrainWatcher) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let conn = tokio::select! {
                c = Connection::connect(&self.uds) => c,
                () = drain.signaled() => break,
            };
            match conn {
                Ok(conn) => {
                    info!(path = %self.uds.display(), "connected to the node agent");
                    backoff = Duration::from_millis(10);
                    self.snapshot = Some(HashSet::new());
                    if self.block.is_none() {
                        self.block = Some(self.ready.register("zds snapshot"));
                    }
                    let ended = tokio::select! {
                        r = self.session(&conn) => r,
                        () = drain.signaled() => break,
                    };
                    match ended {
                        Ok(()) => warn!("node agent closed the ZDS connection; reconnecting"),
                        Err(e) => warn!(error = %e, "ZDS session failed; reconnecting"),
                    }
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "cannot reach the node agent"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = drain.signaled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
        let deadline = self.pi.cfg.drain_deadline;
        let drains: Vec<_> = self
            .pods
            .drain()
            .map(|(_, p)| p.drain.drain(deadline))
            .collect();
        for d in drains {
            d.await;
        }
    }

    async fn session(&mut self, conn: &Connection) -> Result<(), Error> {
        while let Some(req) = conn.next().await? {
            let answer = match req {
                Err(bad) => {
                    warn!(error = %bad.0, "malformed ZDS request");
                    Some(bad.0)
                }
                Ok(req) => self.handle(req).err(),
            };
            conn.ack(answer).await?;
        }
        Ok(())
    }

    fn handle(&mut self, req: Request) -> Result<(), String> {
        match req {
            Request::Add {
                uid,
                name,
                namespace,
                service_account,
                netns,
            } => {
                if let Some(s) = self.snapshot.as_mut() {
                    s.insert(uid.clone());
                }
                let netns = InpodNetns::new(netns, self.home.clone()).map_err(|e| e.to_string())?;
                if self
                    .pods
                    .get(&uid)
                    .is_some_and(|p| p.netns_id == netns.id())
                {
                    return Ok(());
                }
                let pod = self.start(&uid, &namespace, &name, netns).map_err(|e| {
                    warn!(%uid, pod = %format!("{namespace}/{name}"), sa = %service_account, error = %e, "could not start the pod's proxies");
                    format!("starting proxies for {namespace}/{name}: {e}")
                })?;
                info!(%uid, pod = %format!("{namespace}/{name}"), "pod enrolled");
                if let Some(old) = self.pods.insert(uid, pod) {
                    tokio::spawn(old.drain.drain(self.pi.cfg.drain_deadline));
                }
                Ok(())
            }
            Request::Keep { uid } => match self.snapshot.as_mut() {
                Some(s) => {
                    s.insert(uid);
                    Ok(())
                }
                None => Err("KeepWorkload is only valid before SnapshotSent".into()),
            },
            Request::Del { uid } => {
                if let Some(s) = self.snapshot.as_mut() {
                    s.remove(&uid);
                }
                if let Some(p) = self.pods.remove(&uid) {
                    info!(%uid, "pod removed; draining its proxies");
                    tokio::spawn(p.drain.drain(self.pi.cfg.drain_deadline));
                }
                Ok(())
            }
            Request::SnapshotSent => {
                let Some(named) = self.snapshot.take() else {
                    return Err("SnapshotSent received twice".into());
                };
                let stale: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|uid| !named.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    if let Some(p) = self.pods.remove(&uid) {
                        info!(%uid, "pod not in snapshot; draining its proxies");
                        tokio::spawn(p.drain.drain(self.pi.cfg.drain_deadline));
                    }
                }
                self.block = None;
                info!(pods = self.pods.len(), "ZDS snapshot applied");
                Ok(())
            }
        }
    }

    /// Binds the pod's listeners in its netns and starts serving them.
    fn start(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        netns: InpodNetns,
    ) -> std::io::Result<PodProxy> {
        let pod = format!("{namespace}/{name}");
        let netns_id = netns.id();
        let sf = NetnsSocketFactory {
            netns: Arc::new(netns),
            mark: self.pi.cfg.packet_mark,
        };
        let cfg = &self.pi.cfg;
        // SO_REUSEPORT lets a new ztunnel bind the same ports while the old one drains.
        let outbound = proxy::bind_with(&sf, cfg.outbound_addr, true)?;
        let plain = proxy::bind_with(&sf, cfg.inbound_plaintext_addr, true)?;
        let hbone = proxy::bind_with(&sf, cfg.inbound_addr, true)?;
        // DNS capture sends UDP/TCP 53 to localhost:15053 in the pod. IPv4 must bind; ::1
        // is optional (a pod without IPv6 has none).
        let mut dns_servers = Vec::new();
        if let Some(shared) = &self.pi.dns {
            for (addr, required) in [
                (SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)), true),
                (SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PORT)), false),
            ] {
                let handler = Handler {
                    shared: shared.clone(),
                    client: Client::Pod {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                    },
                };
                match DnsServer::bind(&sf, addr, true, handler) {
                    Ok(s) => dns_servers.push(s),
                    Err(e) if required => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("binding the DNS proxy on {addr} in the pod: {e}"),
                        ));
                    }
                    Err(e) => tracing::debug!(%addr, error = %e, "no IPv6 DNS proxy in this pod"),
                }
            }
        }
        let (trigger, watcher) = drain::new();
        let sf: Arc<dyn SocketFactory> = Arc::new(sf);
        let span = info_span!("pod", %uid, %pod);
        let pi = self.pi.clone();
        for d in dns_servers {
            tokio::spawn(d.run(watcher.clone()).instrument(span.clone()));
        }
        tokio::spawn(
            proxy::outbound::serve(pi.clone(), outbound, watcher.clone(), sf.clone())
                .instrument(span.clone()),
        );
        tokio::spawn(
            proxy::inbound_plain::serve(pi.clone(), plain, watcher.clone(), sf.clone())
                .instrument(span.clone()),
        );
        tokio::spawn(proxy::inbound::serve(pi, hbone, watcher, sf).instrument(span));
        Ok(PodProxy {
            netns_id,
            drain: trigger,
        })
    }
}
