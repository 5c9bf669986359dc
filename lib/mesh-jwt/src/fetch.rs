//! Remote JWKS: fetching over HTTP(S) and the shared cache that refreshes it.
//!
//! ```text
//!   authenticate ──► Remote::keys ──fresh?──► cached KeySet
//!                        │ stale or none (one fetch at a time per URI; waiters reuse it)
//!                        ▼
//!                    GET jwksUri  (or issuer/.well-known/openid-configuration → jwks_uri)
//!                        │ ok: replace keys      │ failed: keep the last good keys;
//!                        ▼                       ▼ none ever: "Jwks remote fetch is failed"
//! ```
//!
//! Invariants:
//! - keys are refreshed when older than `refresh_interval` (Istio's
//!   `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`, 20 minutes), on the first request that needs them;
//! - a failed fetch never drops keys that worked: they stay in use until a fetch succeeds,
//!   retried at most every `retry_interval`;
//! - while a refresh is under way, other requests use the stale keys instead of waiting;
//!   without any keys they wait for that one fetch and share its outcome;
//! - a URI never fetched successfully fails closed: its tokens are rejected;
//! - a document that is not a usable JWKS counts as a failed fetch;
//! - the [`JwksStore`] outlives one `Authenticator`, so a configuration change does not refetch.
//!
//! HTTPS uses rustls on aws-lc-rs with the system's roots (or the `tls` config of
//! [`crate::Options`]); no redirects are followed (Envoy follows none either).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

use crate::{
    error::Failure,
    jwks::{JwksError, KeySet},
};

/// Why a JWKS could not be fetched (logged; the request sees `Jwks remote fetch is failed`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not an absolute http(s) URI with a host")]
    BadUri(String),
    #[error(
        "connecting to {addr}: {source}; check that the JWKS server is reachable from the waypoint"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {host}: {source}; check the server certificate against the system roots")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("no TLS roots: {0}")]
    Roots(String),
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("{uri} answered {status}, want 200")]
    Status { uri: String, status: StatusCode },
    #[error("reading the body failed or it is over {0} bytes")]
    Body(usize),
    #[error("timed out after {0:?}; raise spec.jwtRules[].timeout if the server is slow")]
    Timeout(Duration),
    #[error("OpenID discovery document has no string jwks_uri")]
    Discovery,
    #[error("the document is not a usable JWKS: {0}")]
    Jwks(#[from] JwksError),
}

/// Where a rule's keys are fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// `jwksUri`.
    Jwks(Uri),
    /// No `jwksUri`: Istio's resolver reads `jwks_uri` from the issuer's OpenID discovery
    /// document, `<issuer>/.well-known/openid-configuration`.
    Discovery(Uri),
}

impl Source {
    fn key(&self) -> String {
        match self {
            Source::Jwks(u) => u.to_string(),
            Source::Discovery(u) => format!("discovery:{u}"),
        }
    }
}

/// Refresh and transport settings shared by every remote JWKS.
#[derive(Debug, Clone)]
pub(crate) struct FetchSettings {
    pub refresh_interval: Duration,
    pub retry_interval: Duration,
    pub max_bytes: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The process-wide cache of fetched JWKS, keyed by URI. Cloning is cheap and shares the
/// cache; give every `Authenticator` the same store.
#[derive(Debug, Clone, Default)]
pub struct JwksStore {
    entries: Arc<Mutex<HashMap<String, Arc<Remote>>>>,
}

impl JwksStore {
    pub(crate) fn get(&self, source: Source) -> Arc<Remote> {
        let mut m = match self.entries.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(source.key())
            .or_insert_with(|| Arc::new(Remote::new(source)))
            .clone()
    }

    /// What is cached, for config dumps: `(uri, usable keys, successful and attempted fetches)`.
    pub fn status(&self) -> Vec<JwksStatus> {
        let m = match self.entries.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut v: Vec<JwksStatus> = m
            .iter()
            .map(|(k, r)| {
                let s = r.read();
                JwksStatus {
                    uri: k.clone(),
                    keys: s.keys.as_ref().map_or(0, |k| k.len()),
                    age: s.fetched_at.map(|t| t.elapsed()),
                    fetch_attempts: r.attempts.load(Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| a.uri.cmp(&b.uri));
        v
    }
}

/// One cached JWKS, as [`JwksStore::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksStatus {
    pub uri: String,
    pub keys: usize,
    /// Time since the last successful fetch; `None` if never fetched.
    pub age: Option<Duration>,
    pub fetch_attempts: u64,
}

#[derive(Debug, Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    failed_at: Option<Instant>,
    generation: u64,
}

#[derive(Debug)]
pub(crate) struct Remote {
    source: Source,
    state: RwLock<State>,
    fetching: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
}

impl Remote {
    fn new(source: Source) -> Self {
        Remote {
            source,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Cached keys, or whatever cannot wait: `Ok` when usable now, `Err` when a fetch is due.
    fn cached(&self, s: &FetchSettings) -> Result<Result<Arc<KeySet>, Failure>, u64> {
        let st = self.read();
        if let (Some(k), Some(at)) = (&st.keys, st.fetched_at)
            && at.elapsed() < s.refresh_interval
        {
            return Ok(Ok(k.clone()));
        }
        if st.failed_at.is_some_and(|t| t.elapsed() < s.retry_interval) {
            return Ok(st.keys.clone().ok_or(Failure::JwksFetchFail));
        }
        Err(st.generation)
    }

    /// The keys to verify with, fetching them first when stale or missing.
    pub async fn keys(&self, s: &FetchSettings, timeout: Duration) -> Result<Arc<KeySet>, Failure> {
        let generation = match self.cached(s) {
            Ok(r) => return r,
            Err(g) => g,
        };
        // With stale keys, a request does not queue behind a refresh already under way.
        let _one_at_a_time = match self.fetching.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(k) = self.read().keys.clone() {
                    return Ok(k);
                }
                self.fetching.lock().await
            }
        };
        {
            // Someone else fetched (or failed) while we waited: use their outcome.
            let st = self.read();
            if st.generation != generation {
                return st.keys.clone().ok_or(Failure::JwksFetchFail);
            }
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(timeout, fetch(&self.source, s))
            .await
            .unwrap_or(Err(FetchError::Timeout(timeout)));
        let mut st = self.write();
        st.generation += 1;
        match result {
            Ok(keys) => {
                tracing::info!(uri = %self.source.key(), keys = keys.len(), "JWKS fetched");
                let keys = Arc::new(keys);
                st.keys = Some(keys.clone());
                st.fetched_at = Some(Instant::now());
                st.failed_at = None;
                Ok(keys)
            }
            Err(e) => {
                st.failed_at = Some(Instant::now());
                match &st.keys {
                    Some(k) => {
                        tracing::warn!(uri = %self.source.key(), error = %e, "JWKS refresh failed; keeping the last good keys");
                        Ok(k.clone())
                    }
                    None => {
                        tracing::warn!(uri = %self.source.key(), error = %e, "JWKS fetch failed; tokens of this issuer are rejected until it succeeds");
                        Err(Failure::JwksFetchFail)
                    }
                }
            }
        }
    }
}

async fn fetch(source: &Source, s: &FetchSettings) -> Result<KeySet, FetchError> {
    let jwks_uri = match source {
        Source::Jwks(u) => u.clone(),
        Source::Discovery(u) => {
            let doc = get(u, s).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&doc).map_err(|_| FetchError::Discovery)?;
            let uri = v
                .get("jwks_uri")
                .and_then(|u| u.as_str())
                .ok_or(FetchError::Discovery)?;
            uri.parse()
                .map_err(|_| FetchError::BadUri(uri.to_string()))?
        }
    };
    let body = get(&jwks_uri, s).await?;
    let text = std::str::from_utf8(&body).map_err(|_| JwksError::ParseError)?;
    Ok(KeySet::parse(text)?)
}

fn native_tls() -> Result<Arc<rustls::ClientConfig>, FetchError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no usable system root certificates ({} errors); install ca-certificates",
                    found.errors.len()
                ));
            }
            client_config(roots).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(FetchError::Roots)
}

/// A rustls client config on aws-lc-rs trusting `roots`, speaking HTTP/1.1.
pub fn client_config(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// `GET uri` over HTTP/1.1; the 200 body, at most `max_bytes`.
async fn get(uri: &Uri, s: &FetchSettings) -> Result<Bytes, FetchError> {
    let bad = || FetchError::BadUri(uri.to_string());
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().ok_or_else(bad)?.as_str().to_string();
    // An IPv6 literal is bracketed in the URI but not for connect or SNI.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|source| FetchError::Connect {
            addr: format!("{bare}:{port}"),
            source,
        })?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "mesh-waypoint")
        .body(Empty::<Bytes>::new())?;
    if https {
        let cfg = match &s.tls {
            Some(c) => c.clone(),
            None => native_tls()?,
        };
        let name = rustls_pki_types::ServerName::try_from(bare.to_string()).map_err(|_| bad())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|source| FetchError::Tls {
                host: bare.to_string(),
                source,
            })?;
        exchange(TokioIo::new(tls), req, uri, s.max_bytes).await
    } else {
        exchange(TokioIo::new(tcp), req, uri, s.max_bytes).await
    }
}

async fn exchange<IO>(
    io: IO,
    req: http::Request<Empty<Bytes>>,
    uri: &Uri,
    max_bytes: usize,
) -> Result<Bytes, FetchError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "JWKS connection ended with an error");
        }
    });
    let result = async {
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::Status {
                uri: uri.to_string(),
                status: resp.status(),
            });
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|_| FetchError::Body(max_bytes))?;
        Ok(body.to_bytes())
    }
    .await;
    driver.abort();
    result
}
