//! Structured events (recoveries, upgrades, failovers): one JSON object per
//! line, on stderr and appended to the component's events file if it has one.

use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

pub fn emit(file: Option<&Path>, kind: &str, mut fields: Value) {
    if let Value::Object(m) = &mut fields {
        m.insert("event".into(), json!(kind));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        m.insert("time_ms".into(), json!(now.as_millis() as u64));
        m.insert("pid".into(), json!(std::process::id()));
        // CLOCK_MONOTONIC, comparable across processes: a recovery's
        // timeline from the events of every component involved.
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        m.insert("mono_us".into(), json!(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000));
    }
    let line = fields.to_string();
    tracing::info!(target: "staunch::event", "{line}");
    eprintln!("staunch-event {line}");
    if let Some(p) = file
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p)
    {
        // One write of the whole line: processes sharing the file (a
        // backend and its spare) never interleave inside a line.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// The events in a file written by [`emit`] (a line that does not parse,
/// such as one being written, is left out).
pub fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}
