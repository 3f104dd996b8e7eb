//! The VMM's control socket: one JSON object per line each way.
//! `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"status"}`,
//! `{"cmd":"upgrade","binary":"/path/to/staunch"}`,
//! `{"cmd":"failpoint","spec":"mmio.write=panic"}`.
//! Requests reach the VMM's main loop through a channel; bad input gets an
//! error reply and the connection stays usable.

use crate::vm::VmEvent;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a VMM that is about to stop waits for its last reply to be
/// written. The connection thread writes as soon as it has the answer, so
/// this only runs out when the thread itself is stuck.
const REPLY_WRITTEN_WITHIN: Duration = Duration::from_secs(10);

/// Where the answer to one request goes, and word back once the connection
/// thread has written it to the socket (or failed to).
pub struct Reply {
    tx: SyncSender<ApiResponse>,
    written: Receiver<()>,
}

impl Reply {
    /// Answer; the connection thread writes it in its own time.
    pub fn send(&self, resp: ApiResponse) {
        let _ = self.tx.send(resp);
    }

    /// Answer and wait until the reply is on the socket: for the last reply
    /// of a process (snapshot, upgrade, any stop), which would otherwise race
    /// the process's exit and reach the client truncated or not at all.
    pub fn send_and_wait(&self, resp: ApiResponse) {
        if self.tx.send(resp).is_ok() && self.written.recv_timeout(REPLY_WRITTEN_WITHIN).is_err() {
            tracing::warn!("a control-socket reply was not written within {REPLY_WRITTEN_WITHIN:?}");
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ApiRequest {
    // Struct variants, so unknown fields are refused for every command.
    Pause {},
    Resume {},
    Status {},
    Upgrade {
        #[serde(default)]
        binary: Option<PathBuf>,
    },
    /// Cold reboot: a new VM from the kernel; the guest's state is lost.
    Reboot {},
    /// Save the VM (state and memory) to a file and stop it.
    Snapshot {
        path: PathBuf,
    },
    /// Arm failpoints: `name=action[*count]`, comma separated.
    Failpoint {
        spec: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiResponse {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl ApiResponse {
    pub fn ok(data: Value) -> Self {
        ApiResponse { ok: true, error: None, data }
    }
    pub fn err(e: impl Into<String>) -> Self {
        ApiResponse { ok: false, error: Some(e.into()), data: Value::Null }
    }
}

const MAX_LINE: usize = 64 * 1024;

/// One control socket's server, shared by its connection threads.
#[derive(Default)]
struct ServerState {
    /// Set when the VM leaves this process: requests get this error at
    /// once instead of waiting for a VM that will not answer.
    closed: Mutex<Option<String>>,
    /// Replies being written right now.
    writing: AtomicUsize,
}

/// The handle of a running control socket.
pub struct Server(Arc<ServerState>);

impl Server {
    /// The VM is leaving this process (handed over, stopped): answer every
    /// later request with `why`, and wait (briefly) for replies being
    /// written, so none is cut off by the process's exit.
    pub fn close(&self, why: &str) {
        *self.0.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
        let t = std::time::Instant::now();
        while self.0.writing.load(Ordering::Acquire) > 0 && t.elapsed() < REPLY_WRITTEN_WITHIN {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Bind `path` and serve it in the background. A predecessor's socket at
/// `path` is replaced atomically (bind beside it, rename over it), so
/// clients never find the path missing across an upgrade or a recovery.
pub fn serve(path: &Path, tx: Sender<VmEvent>) -> std::io::Result<Server> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, path)?;
    let state = Arc::new(ServerState::default());
    let st = state.clone();
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let (tx, st) = (tx.clone(), st.clone());
            let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || connection(conn, tx, &st));
        }
    })?;
    Ok(Server(state))
}

fn connection(conn: UnixStream, tx: Sender<VmEvent>, st: &ServerState) {
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= MAX_LINE {
            let _ = writeln!(out, "{}", json!(ApiResponse::err("request too long")));
            return;
        }
        if let Err(e) = staunch_fault::hit(&staunch_fault::API_REQUEST) {
            let _ = writeln!(out, "{}", json!(ApiResponse::err(e.to_string())));
            continue;
        }
        let mut written = None;
        let closed = st.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let resp = match serde_json::from_str::<ApiRequest>(line.trim()) {
            Err(e) => ApiResponse::err(format!("bad request: {e}")),
            Ok(_) if closed.is_some() => ApiResponse::err(closed.unwrap_or_default()),
            Ok(req) => {
                let (rtx, rrx) = sync_channel(1);
                let (wtx, wrx) = sync_channel(1);
                written = Some(wtx);
                if tx.send(VmEvent::Api(req, Reply { tx: rtx, written: wrx })).is_err() {
                    ApiResponse::err("VM is shutting down")
                } else {
                    rrx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| ApiResponse::err("VM did not answer"))
                }
            }
        };
        // A slow connection thread (api.reply=slow) is what a loaded host
        // makes of it: the VMM must still wait for this write before it leaves.
        st.writing.fetch_add(1, Ordering::AcqRel);
        let _ = staunch_fault::hit(&staunch_fault::API_REPLY);
        let sent = writeln!(out, "{}", json!(resp));
        st.writing.fetch_sub(1, Ordering::AcqRel);
        if let Some(w) = written.take() {
            let _ = w.try_send(());
        }
        if sent.is_err() {
            return;
        }
    }
}

/// Send one request and read the reply (for the CLI and tests).
pub fn request(path: &Path, req: &ApiRequest) -> std::io::Result<ApiResponse> {
    request_within(path, req, Duration::from_secs(60))
}

/// [`request`] with a deadline for the reply.
pub fn request_within(path: &Path, req: &ApiRequest, timeout: Duration) -> std::io::Result<ApiResponse> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{}", json!(req))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if !line.ends_with('\n') {
        // A reply is one whole line: anything else means the VMM went away
        // mid-reply, which is a bug to report, not JSON to guess at.
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the VMM closed the connection before its reply was complete ({} bytes read)", line.len()),
        ));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_requests() {
        assert_eq!(serde_json::from_str::<ApiRequest>(r#"{"cmd":"pause"}"#).unwrap(), ApiRequest::Pause {});
        assert_eq!(
            serde_json::from_str::<ApiRequest>(r#"{"cmd":"upgrade","binary":"/b"}"#).unwrap(),
            ApiRequest::Upgrade { binary: Some("/b".into()) }
        );
        assert!(serde_json::from_str::<ApiRequest>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<ApiRequest>(r#"{"cmd":"pause","x":1}"#).is_err());
        assert!(serde_json::from_str::<ApiRequest>("not json").is_err());
    }

    /// A server that leaves mid-reply is reported as such, not as bad JSON.
    #[test]
    fn truncated_reply_is_an_error() {
        let dir = std::env::temp_dir().join(format!("staunch-api-trunc-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(c.try_clone().unwrap()).read_line(&mut line).unwrap();
            c.write_all(br#"{"ok":true,"data":{"by"#).unwrap();
        });
        let e = request(&path, &ApiRequest::Status {}).unwrap_err();
        t.join().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("before its reply was complete"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
