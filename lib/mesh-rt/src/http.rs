//! A minimal HTTP/1 server for the admin, metrics and readiness ports.
//!
//! Handlers are plain functions from request to response; bodies are small and buffered.
//! The server stops accepting when the drain starts.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::drain::DrainWatcher;

/// A buffered request: method, path, query and a body of at most 64 KiB.
#[derive(Debug)]
pub struct AdminRequest {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub body: Bytes,
}

/// A buffered response.
#[derive(Debug)]
pub struct AdminResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl AdminResponse {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        AdminResponse {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body.into()),
        }
    }

    pub fn json(body: impl Into<Bytes>) -> Self {
        AdminResponse {
            status: StatusCode::OK,
            content_type: "application/json",
            body: body.into(),
        }
    }

    pub fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// Routes a request. Async so handlers may consult shared state.
pub type Handler =
    Arc<dyn Fn(AdminRequest) -> Pin<Box<dyn Future<Output = AdminResponse> + Send>> + Send + Sync>;

const MAX_BODY: usize = 64 * 1024;

/// Serves `listener` until the drain starts.
pub async fn serve(listener: TcpListener, handler: Handler, drain: DrainWatcher) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handle(req, handler).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
    debug!(?addr, "http server stopped accepting");
}

async fn handle(req: Request<Incoming>, handler: Handler) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return to_response(AdminResponse::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body over 64 KiB\n",
            ));
        }
    };
    let r = handler(AdminRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body,
    })
    .await;
    to_response(r)
}

fn to_response(r: AdminResponse) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(r.body));
    *resp.status_mut() = r.status;
    if let Ok(v) = http::HeaderValue::from_str(r.content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}
