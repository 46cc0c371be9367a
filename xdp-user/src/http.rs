//! The read-only HTTP listener: `/metrics` and `/healthz`, served by hyper
//! with a cap on connections, a header size limit and timeouts, so no
//! client, however many connections it opens or however slowly it writes,
//! can hold the daemon's descriptors or its controller. Connections are
//! always accepted: at the cap, the oldest one not in the middle of a
//! request makes room, so idle connections held open (by anyone) cannot
//! keep the monitor that fails a host over from `/healthz`.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::{api::Query, metrics::Format};

/// Connections held at once; a new one beyond it closes the oldest idle.
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

/// One connection being served: whether a request is being answered on
/// it now, and how to close it.
struct Held {
    busy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Make room for one more connection: forget finished ones, then, at the
/// cap, close the oldest that is not answering a request. False when every
/// held connection is mid-request.
fn make_room(held: &mut VecDeque<Held>) -> bool {
    held.retain(|h| !h.task.is_finished());
    if held.len() < MAX_CONNECTIONS {
        return true;
    }
    match held.iter().position(|h| !h.busy.load(Ordering::Relaxed)) {
        Some(i) => {
            if let Some(h) = held.remove(i) {
                h.task.abort();
            }
            true
        }
        None => false,
    }
}

/// Serve `/metrics` and `/healthz` until the runtime stops.
pub async fn serve(listener: TcpListener, queries: mpsc::Sender<Query>) {
    let mut held: VecDeque<Held> = VecDeque::with_capacity(MAX_CONNECTIONS);
    let mut last_error = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or similar): back off instead of
                // spinning on a listener that stays readable.
                let kind = e.to_string();
                if last_error.as_ref() != Some(&kind) {
                    warn!(error = %kind, "metrics listener cannot accept ({kind}); backing off");
                    last_error = Some(kind);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        last_error = None;
        if !make_room(&mut held) {
            // Every connection is being answered: this one closes now, and
            // its client retries.
            continue;
        }
        let queries = queries.clone();
        let busy = Arc::new(AtomicBool::new(false));
        let flag = busy.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (queries, flag) = (queries.clone(), flag.clone());
                async move {
                    flag.store(true, Ordering::Relaxed);
                    let response = handle(req, queries).await;
                    flag.store(false, Ordering::Relaxed);
                    response
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                debug!(error = %e, "metrics connection");
            }
        });
        held.push_back(Held { busy, task });
    }
}
