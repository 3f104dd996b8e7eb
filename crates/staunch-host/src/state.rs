//! The supervisor's own state on disk (`host-state.json`): which processes
//! it started, so that a new supervisor adopts them. Written atomically
//! (temporary file, fsync, rename) on every change; versioned.

use crate::component::Record;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub version: u32,
    /// The supervisor that wrote it.
    pub supervisor: Option<crate::proc::Identity>,
    /// The data directory of the store primary (its log is the newest).
    pub store_slot: String,
    pub components: Vec<Record>,
    /// The binary new processes start from, the rolling upgrade generation
    /// accepted (with its binary) and one halted at a failure.
    #[serde(default)]
    pub binary: Option<std::path::PathBuf>,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub binary_generation: Option<std::path::PathBuf>,
    #[serde(default)]
    pub halted: Option<u64>,
    /// The binary before the accepted generation (a halt goes back to it).
    #[serde(default)]
    pub prev_binary: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: not a host state file: {msg}")]
    Bad { path: String, msg: String },
    #[error("{path}: version {found}, this supervisor reads {VERSION}")]
    Version { path: String, found: u32 },
}

pub fn load(path: &Path) -> Result<Option<HostState>, StateError> {
    let p = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(StateError::Io { path: p, err }),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StateError::Bad { path: p.clone(), msg: e.to_string() })?;
    let found = v["version"].as_u64().unwrap_or(0) as u32;
    if found != VERSION {
        return Err(StateError::Version { path: p, found });
    }
    serde_json::from_value(v).map(Some).map_err(|e| StateError::Bad { path: p, msg: e.to_string() })
}

/// Replace `path` with `bytes` so that a crash leaves the old or the new
/// content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

pub fn save(path: &Path, s: &HostState) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes, true)
}
