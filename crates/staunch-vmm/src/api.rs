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
use std::sync::mpsc::{Sender, sync_channel};
use std::time::Duration;

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

/// Bind `path` and serve it in the background. A predecessor's socket at
/// `path` is replaced atomically (bind beside it, rename over it), so
/// clients never find the path missing across an upgrade or a recovery.
pub fn serve(path: &Path, tx: Sender<VmEvent>) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, path)?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let tx = tx.clone();
            let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || connection(conn, tx));
        }
    })?;
    Ok(())
}

fn connection(conn: UnixStream, tx: Sender<VmEvent>) {
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
        let resp = match serde_json::from_str::<ApiRequest>(line.trim()) {
            Err(e) => ApiResponse::err(format!("bad request: {e}")),
            Ok(req) => {
                let (rtx, rrx) = sync_channel(1);
                let (wtx, wrx) = sync_channel(1);
                written = Some(wtx);
                if tx.send(VmEvent::Api(req, rtx, wrx)).is_err() {
                    ApiResponse::err("VM is shutting down")
                } else {
                    rrx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| ApiResponse::err("VM did not answer"))
                }
            }
        };
        let sent = writeln!(out, "{}", json!(resp));
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
}
