//! `staunch api`: the toolstack as a REST service (docs/api.md; the
//! contract is docs/api/openapi.json). It holds no state of its own: what
//! should run is the store's definitions (the supervisor reconciles them),
//! what runs is the supervisor's status, and every multi-step operation is
//! a journaled record in the store that any API process resumes after a
//! crash of the one that started it.

pub mod error;
mod events;
mod extract;
pub mod journal;
pub mod phases;
pub mod routes;
pub mod runner;
mod server;
pub mod store;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use server::{MAX_BODY, MAX_CONNS, MAX_INFLIGHT};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("host config: {0}")]
    Config(#[from] staunch_host::config::ConfigError),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0} is served by a live API already")]
    Taken(PathBuf),
    #[error("token file {0}: empty (a bearer token of at least 16 bytes is needed)")]
    Token(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |err| ServeError::Io { what, err }
}

pub struct Options {
    /// The host's configuration (`host.toml`): where the store, the events
    /// and each VM's files are.
    pub config: PathBuf,
    /// Default: `<run_dir>/api.sock`.
    pub socket: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
}

/// Bind `path` unless a live API answers there; a stale socket file (its
/// process died) is replaced.
fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::Taken(path.into()));
    }
    let _ = std::fs::remove_file(path);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(io(path.display().to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path.display().to_string()))?;
    l.set_nonblocking(true).map_err(io("socket"))?;
    Ok(l)
}

pub fn run(o: Options) -> Result<(), ServeError> {
    let t0 = Instant::now();
    let cfg = staunch_host::HostConfig::from_file(&o.config)?;
    let socket = o.socket.clone().unwrap_or_else(|| cfg.run_dir.join("api.sock"));
    let token = match &o.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f).map_err(io(f.display().to_string()))?.trim().to_string();
            if t.len() < 16 {
                return Err(ServeError::Token(f.clone()));
            }
            Some(Arc::new(t))
        }
        None => None,
    };
    let unix = bind_unix(&socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("api")
        .build()
        .map_err(io("runtime"))?;
    let store = store::Store::new(cfg.store_socket());
    let ctx = Arc::new(runner::Ctx::new(store, cfg));
    let router = routes::router(ctx.clone()).layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    rt.block_on(async move {
        let unix = tokio::net::UnixListener::from_std(unix).map_err(io("socket"))?;
        let tcp = match o.listen {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(io(a.to_string()))?),
            None => None,
        };
        let limits = server::Limits::new();
        ctx.emit(
            "api-started",
            serde_json::json!({"socket": socket, "listen": o.listen.map(|a| a.to_string()),
                               "ready_ms": t0.elapsed().as_secs_f64() * 1e3}),
        );
        staunch_host::notify::Notifier::from_env().send("READY=1");
        // Operations a dead API left behind: now, and every 2 s for those a
        // live one leaves when it dies while this one serves.
        let c = ctx.clone();
        tokio::spawn(async move {
            loop {
                let c2 = c.clone();
                let _ = tokio::task::spawn_blocking(move || runner::resume_all(&c2)).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("signal"))?;
        loop {
            tokio::select! {
                r = unix.accept() => match r {
                    Ok((s, _)) => server::connection(s, router.clone(), &limits, None),
                    // Out of descriptors and the like: the next accept may work.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                r = async { match &tcp { Some(l) => l.accept().await, None => std::future::pending().await } } => match r {
                    Ok((s, _)) => server::connection(s, router.clone(), &limits, token.clone()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = term.recv() => {
                    // Operations in progress stay in the store: the next API
                    // process carries them on.
                    ctx.emit("api-stopped", serde_json::json!({"why": "SIGTERM"}));
                    return Ok(());
                }
            }
        }
    })
}
