//! A loopback HTTP/1.1 server for JWKS and OpenID discovery documents that counts requests
//! and can be told to fail, to change its keys, or to be slow.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Default)]
struct State {
    docs: Mutex<HashMap<String, String>>,
    hits: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    /// 0 = answer 200 with the document.
    status: AtomicU16,
    delay_ms: AtomicU64,
}

#[derive(Clone)]
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(None).await
    }

    /// The same server behind TLS (HTTP/1.1 inside).
    pub async fn start_tls(cfg: Arc<rustls::ServerConfig>) -> Server {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(cfg))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(s.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Server {
            addr,
            state,
            task: Arc::new(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn serve(&self, path: &str, body: impl Into<String>) {
        self.state
            .docs
            .lock()
            .unwrap()
            .insert(path.to_string(), body.into());
    }

    /// Answer every request with `status` (0 restores normal answers).
    pub fn fail_with(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn hits(&self, path: &str) -> usize {
        *self.state.hits.lock().unwrap().get(path).unwrap_or(&0)
    }

    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }
}

async fn answer(
    s: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    s.total.fetch_add(1, Ordering::SeqCst);
    *s.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = s.status.load(Ordering::SeqCst);
    let doc = s.docs.lock().unwrap().get(&path).cloned();
    let resp = match (status, doc) {
        (0, Some(d)) => Response::new(Full::new(Bytes::from(d))),
        (0, None) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
        (code, _) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"failing")));
            *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
            r
        }
    };
    Ok(resp)
}
