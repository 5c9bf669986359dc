//! Workload certificates: fetched on first use, cached per identity, renewed in the background
//! at half-life so an established connection never sees its certificate expire and a CA
//! outage has half a lifetime to heal.
//!
//! Sources implement [`CertProvider`]: the local CA ([`LocalCaProvider`], Istio's `cacerts`
//! layout shared by every ztunnel of a dev/test mesh) and Istio's CA over gRPC
//! ([`caclient::IstioCaProvider`], istiod or istiod-lite).

pub mod caclient;

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use mesh_core::Identity;
use mesh_tls::{TrustPolicy, WorkloadCert, ca::LocalCa};
use tracing::{info, warn};

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "reading CA file {path}: {reason} (LOCAL_CA_DIR must hold ca-key.pem, ca-cert.pem, root-cert.pem, cert-chain.pem)"
    )]
    CaFile { path: String, reason: String },
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue { identity: Identity, reason: String },
    #[error("building TLS configuration for {identity}: {reason}")]
    Tls { identity: Identity, reason: String },
}

/// Something that can produce a certificate for an identity.
pub trait CertProvider: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>>;
}

/// Issues certificates from a CA held locally.
pub struct LocalCaProvider {
    ca: LocalCa,
    ttl: Duration,
}

impl LocalCaProvider {
    /// Loads Istio's `cacerts` layout from `dir`.
    pub fn load(dir: &Path, ttl: Duration) -> Result<Self, IdentityError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| IdentityError::CaFile {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let (key, cert, chain, root) = (
            read("ca-key.pem")?,
            read("ca-cert.pem")?,
            read("cert-chain.pem")?,
            read("root-cert.pem")?,
        );
        let ca =
            LocalCa::from_pem(&key, &cert, &chain, &root).map_err(|e| IdentityError::CaFile {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(LocalCaProvider { ca, ttl })
    }

    pub fn from_ca(ca: LocalCa, ttl: Duration) -> Self {
        LocalCaProvider { ca, ttl }
    }
}

impl CertProvider for LocalCaProvider {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>> {
        Box::pin(async move {
            self.ca
                .issue(id, self.ttl)
                .map_err(|e| IdentityError::Issue {
                    identity: id.clone(),
                    reason: e.to_string(),
                })
        })
    }
}

struct Entry {
    cert: Mutex<Option<Arc<WorkloadCert>>>,
    server: Mutex<Option<(Arc<WorkloadCert>, Arc<rustls::ServerConfig>)>>,
    fetching: tokio::sync::Mutex<()>,
}

/// The per-identity certificate cache.
pub struct SecretManager {
    provider: Arc<dyn CertProvider>,
    trust: TrustPolicy,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManager").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SecretManager {
    pub fn new(provider: Arc<dyn CertProvider>, trust: TrustPolicy) -> Self {
        SecretManager {
            provider,
            trust,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn trust(&self) -> &TrustPolicy {
        &self.trust
    }

    fn entry(&self, id: &Identity) -> Arc<Entry> {
        lock(&self.entries)
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    cert: Mutex::new(None),
                    server: Mutex::new(None),
                    fetching: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// A valid certificate for `id`, fetching it if none is cached or it is due for renewal.
    /// If renewal fails while the old certificate is still valid, the old one is used.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let entry = self.entry(id);
        let fresh = |c: &Option<Arc<WorkloadCert>>| {
            c.as_ref()
                .filter(|c| SystemTime::now() < c.refresh_at())
                .cloned()
        };
        if let Some(c) = fresh(&lock(&entry.cert)) {
            return Ok(c);
        }
        let _one_at_a_time = entry.fetching.lock().await;
        if let Some(c) = fresh(&lock(&entry.cert)) {
            return Ok(c);
        }
        self.refresh(id, &entry).await
    }

    async fn refresh(
        &self,
        id: &Identity,
        entry: &Entry,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        match self.provider.fetch(id).await {
            Ok(c) => {
                let c = Arc::new(c);
                info!(identity = %id, expires_in_s = c.not_after.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0), "certificate issued");
                *lock(&entry.cert) = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                let old = lock(&entry.cert).clone();
                match old {
                    Some(c) if !c.is_expired_at(SystemTime::now()) => {
                        warn!(identity = %id, error = %e, "certificate renewal failed; using the current one until it expires");
                        Ok(c)
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// The TLS server configuration presenting `id`'s certificate; rebuilt after renewal.
    pub async fn server_config(
        &self,
        id: &Identity,
    ) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let cert = self.get(id).await?;
        let entry = self.entry(id);
        let mut slot = lock(&entry.server);
        if let Some((c, cfg)) = slot.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Ok(cfg.clone());
        }
        let cfg = Arc::new(
            mesh_tls::server_config(&cert, self.trust.clone()).map_err(|e| IdentityError::Tls {
                identity: id.clone(),
                reason: e.to_string(),
            })?,
        );
        *slot = Some((cert, cfg.clone()));
        Ok(cfg)
    }

    /// Certificates held, for the config dump (no key material).
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let mut out: Vec<serde_json::Value> = lock(&self.entries)
            .iter()
            .filter_map(|(id, e)| {
                lock(&e.cert).as_ref().map(|c| {
                    serde_json::json!({
                        "identity": id.to_string(),
                        "notBefore": secs(c.not_before),
                        "notAfter": secs(c.not_after),
                        "refreshAt": secs(c.refresh_at()),
                        "chainLength": c.chain.len(),
                        "roots": c.roots.len(),
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        out
    }

    /// Renews every cached certificate that reached its refresh time. Returns how many.
    pub async fn renew_due(&self) -> usize {
        let due: Vec<(Identity, Arc<Entry>)> = lock(&self.entries)
            .iter()
            .filter(|(_, e)| {
                lock(&e.cert)
                    .as_ref()
                    .is_some_and(|c| SystemTime::now() >= c.refresh_at())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (id, entry) in due {
            let _g = entry.fetching.lock().await;
            if self.refresh(&id, &entry).await.is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Runs [`renew_due`](Self::renew_due) every `every`.
    pub fn spawn_renewer(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.renew_due().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        ca: LocalCa,
        ttl: Duration,
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        stale: std::sync::atomic::AtomicBool,
    }

    impl CertProvider for Counting {
        fn fetch<'a>(
            &'a self,
            id: &'a Identity,
        ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>>
        {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.fail.load(Ordering::SeqCst) {
                    return Err(IdentityError::Issue {
                        identity: id.clone(),
                        reason: "CA down".into(),
                    });
                }
                if self.stale.load(Ordering::SeqCst) {
                    // Valid, but already past half-life: due for renewal.
                    let start = SystemTime::now() - self.ttl * 2;
                    return Ok(self.ca.issue_at(id, start, self.ttl * 3).unwrap());
                }
                Ok(self.ca.issue(id, self.ttl).unwrap())
            })
        }
    }

    #[tokio::test]
    async fn concurrent_gets_fetch_once_and_renewal_survives_ca_outage() {
        let p = Arc::new(Counting {
            ca: LocalCa::generate("cluster.local").unwrap(),
            ttl: Duration::from_secs(600),
            calls: AtomicUsize::new(0),
            fail: false.into(),
            stale: false.into(),
        });
        let m = Arc::new(SecretManager::new(
            p.clone(),
            TrustPolicy::new("cluster.local"),
        ));
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let (a, b) = tokio::join!(m.get(&id), m.get(&id));
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        assert_eq!(m.renew_due().await, 0, "fresh certificates are left alone");

        // A certificate past half-life is renewed in the background...
        p.stale.store(true, Ordering::SeqCst);
        let id2: Identity = "spiffe://cluster.local/ns/a/sa/c".parse().unwrap();
        m.get(&id2).await.unwrap();
        assert_eq!(m.renew_due().await, 1);
        assert_eq!(p.calls.load(Ordering::SeqCst), 3);
        // ...and during a CA outage the still-valid one keeps serving.
        p.fail.store(true, Ordering::SeqCst);
        assert!(m.get(&id2).await.is_ok());
        assert_eq!(p.calls.load(Ordering::SeqCst), 4);
        let cfg1 = m.server_config(&id).await.unwrap();
        let cfg2 = m.server_config(&id).await.unwrap();
        assert!(Arc::ptr_eq(&cfg1, &cfg2));
    }
}
