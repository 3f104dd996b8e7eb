//! Serving: HTTP/1.1 on a unix socket (mode 0600: the file system is the
//! access control, as for Cloud Hypervisor's and Firecracker's sockets)
//! and optionally on TCP with a bearer token. Floods are bounded: at most
//! [`MAX_CONNS`] connections (more are closed at once), [`MAX_INFLIGHT`]
//! requests in progress (more get 503 at once rather than queueing), a
//! request rate per connection (429 beyond it), 64 KiB bodies (413), and
//! 10 s to send a request's headers.

use crate::error::ApiError;
use axum::Router;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tower::ServiceExt;

pub const MAX_CONNS: usize = 256;
pub const MAX_INFLIGHT: usize = 64;
pub const MAX_BODY: usize = 64 * 1024;
/// Requests per second per connection, with a burst of [`BURST`].
pub const RATE: f64 = 2000.0;
pub const BURST: f64 = 200.0;

pub struct Limits {
    conns: Arc<Semaphore>,
    inflight: Arc<Semaphore>,
}

impl Limits {
    pub fn new() -> Arc<Limits> {
        Arc::new(Limits {
            conns: Arc::new(Semaphore::new(MAX_CONNS)),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        })
    }
}

/// A token bucket: one per connection.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * RATE).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Compare without an early exit, so the time taken says nothing of how
/// much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Serve one accepted connection.
pub fn connection<S>(stream: S, router: Router, limits: &Arc<Limits>, token: Option<Arc<String>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = limits.conns.clone().try_acquire_owned() else {
        // Over the connection limit: closed at once, the others go on.
        drop(stream);
        return;
    };
    let inflight = limits.inflight.clone();
    let bucket = Arc::new(Mutex::new(Bucket { tokens: BURST, at: Instant::now() }));
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (router, inflight, bucket, token) = (router.clone(), inflight.clone(), bucket.clone(), token.clone());
        async move {
            let deny = |e: ApiError| Ok::<_, std::convert::Infallible>(e.into_response());
            if let Some(t) = &token {
                let given = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                let given = given.strip_prefix("Bearer ").unwrap_or("");
                if !same(given.as_bytes(), t.as_bytes()) {
                    return deny(ApiError::new(
                        axum::http::StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "this listener needs Authorization: Bearer <token>",
                    ));
                }
            }
            if !bucket.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return deny(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    format!("more than {RATE} requests/s on one connection"),
                ));
            }
            let Ok(_slot) = inflight.try_acquire_owned() else {
                return deny(ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    format!("{MAX_INFLIGHT} requests in progress: try again"),
                ));
            };
            let r = router.oneshot(req.map(axum::body::Body::new)).await;
            Ok::<_, std::convert::Infallible>(r.unwrap_or_else(|e| match e {}))
        }
    });
    tokio::spawn(async move {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), svc);
        let _ = conn.await;
        drop(permit);
    });
}
