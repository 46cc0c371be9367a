//! The read-only HTTP listener: `/metrics` and `/healthz`, served by hyper
//! with a cap on connections, a header size limit and timeouts, so no
//! client, however many connections it opens or however slowly it writes,
//! can hold the daemon's descriptors or its controller.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, Semaphore},
};
use tracing::{debug, warn};

use crate::{api::Query, metrics::Format};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Any connection is closed after this, keep-alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Largest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn ask<T>(
    queries: &mpsc::Sender<Query>,
    make: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    queries.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn handle(
    req: Request<Incoming>,
    queries: mpsc::Sender<Query>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let format = Format::from_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            match ask(&queries, |tx| Query::Metrics(format, tx)).await {
                Some(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(format.content_type()),
                    );
                    r
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            }
        }
        "/healthz" => match ask(&queries, Query::Healthz).await {
            Some((true, body)) => text(StatusCode::OK, body),
            Some((false, body)) => text(StatusCode::SERVICE_UNAVAILABLE, body),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "try /metrics or /healthz\n"),
    })
}

/// Serve `/metrics` and `/healthz` until the runtime stops.
pub async fn serve(listener: TcpListener, queries: mpsc::Sender<Query>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_error = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or similar): back off instead of
                // spinning on a listener that stays readable.
                let kind = e.to_string();
                if last_error.as_ref() != Some(&kind) {
                    warn!(error = %kind, "metrics listener cannot accept; backing off");
                    last_error = Some(kind);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        last_error = None;
        let queries = queries.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| handle(req, queries.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                debug!(error = %e, "metrics connection");
            }
        });
    }
}
