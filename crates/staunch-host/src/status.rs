//! Reading `host-status.json`, the supervisor's view of the host as it
//! last wrote it (see `reconcile.rs` for the writer): for `staunch host
//! status`, the host campaign and the tests.

use serde_json::Value;
use std::path::Path;

/// The status file's content, or `Null` if it is missing or being replaced.
pub fn read(path: &Path) -> Value {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
}

/// One component's entry (`Null` if the supervisor runs no such component).
pub fn component(status: &Value, id: &str) -> Value {
    status["components"].as_array().into_iter().flatten().find(|c| c["id"] == id).cloned().unwrap_or(Value::Null)
}

/// How long ago the status was written.
pub fn age_ms(status: &Value) -> u64 {
    let t = status["time_ms"].as_u64().unwrap_or(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    now.saturating_sub(t)
}
