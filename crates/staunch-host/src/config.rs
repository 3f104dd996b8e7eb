//! `host.toml`: where a host keeps its state and how its supervisor judges
//! and restarts components. Unknown keys are refused by name.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("host config {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("host config {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("host config {path}: {key}: {msg}")]
    Invalid { path: String, key: &'static str, msg: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Sockets, logs, the store's data and the supervisor's own state.
    pub run_dir: PathBuf,
    /// The `staunch` binary components are started from (default: the
    /// supervisor's own).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub restart: RestartSection,
    #[serde(default)]
    pub rejuvenate: RejuvenateSection,
}

/// Proactive rejuvenation (RootHammer): a component whose serving process
/// has run for its kind's period is renewed: a VMM by a warm upgrade, a
/// backend by an upgrade through its spare, the store by a failover to its
/// standby (the standby by a fresh one). One at a time on the host, at
/// least `spacing_ms` apart, never while a recovery is in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejuvenateSection {
    /// "off" or a period: "24h", "90m", "30s", "500ms".
    #[serde(default = "off")]
    pub vmm: String,
    #[serde(default = "off")]
    pub backend: String,
    #[serde(default = "off")]
    pub store: String,
    #[serde(default = "d_spacing")]
    pub spacing_ms: u64,
    /// A renewal not done in this long failed (and a rolling upgrade halts).
    #[serde(default = "d_renew_timeout")]
    pub timeout_ms: u64,
}

impl RejuvenateSection {
    /// The period for a kind of component ("vmm", "backend", "store").
    pub fn period(&self, kind: &str) -> Option<Duration> {
        let v = match kind {
            "vmm" => &self.vmm,
            "backend" => &self.backend,
            _ => &self.store,
        };
        parse_period(v).ok().flatten()
    }
}

/// "off" (None) or a number with a unit: ms, s, m, h, d.
pub fn parse_period(v: &str) -> Result<Option<Duration>, String> {
    let v = v.trim();
    if v == "off" {
        return Ok(None);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("'{v}' is not \"off\" or a period such as \"24h\""))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{v}': the unit must be ms, s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("'{v}': a period must be above 0 (or \"off\")"));
    }
    Ok(Some(Duration::from_millis(n.saturating_mul(ms))))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Keep a hot standby of the store (takes over in milliseconds).
    #[serde(default = "yes")]
    pub standby: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// A component that has not answered its heartbeat for this long is hung.
    #[serde(default = "d_hang")]
    pub hang_ms: u64,
    /// How often each component is asked.
    #[serde(default = "d_beat")]
    pub heartbeat_ms: u64,
    /// A silent component that is not stopped (it runs, or waits for a
    /// CPU on a loaded host) is hung only after this long; a stopped one
    /// (SIGSTOP) after `hang_ms`.
    #[serde(default = "d_confirm")]
    pub hang_confirm_ms: u64,
    /// A backend that answers but whose current request has not completed
    /// for this long makes no progress: hung. Longer than a hang (a flush
    /// to a slow disk may take a second), shorter than the backend's own
    /// watchdog (3 s), which is the last resort when no supervisor runs.
    #[serde(default = "d_stall")]
    pub stall_ms: u64,
    /// A component that has not answered once this long after its start
    /// failed to start.
    #[serde(default = "d_start")]
    pub start_timeout_ms: u64,
    /// After a process of a component died, how long its own recovery
    /// (a spare, a successor) may take before the supervisor steps in.
    #[serde(default = "d_grace")]
    pub grace_ms: u64,
    /// The periodic reconciliation pass (watches trigger one at once).
    #[serde(default = "d_reconcile")]
    pub reconcile_ms: u64,
}

/// Restart budgets (Erlang/OTP's intensity and period, systemd's
/// StartLimitBurst): at most `burst` restarts of a component within
/// `interval_s`; then it waits in backoff, doubling from `backoff_ms` up to
/// `backoff_max_ms`, and the VM's state says so.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    #[serde(default = "d_burst")]
    pub burst: u32,
    #[serde(default = "d_interval")]
    pub interval_s: u64,
    #[serde(default = "d_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "d_backoff_max")]
    pub backoff_max_ms: u64,
}

fn off() -> String {
    "off".into()
}
fn d_spacing() -> u64 {
    5000
}
fn d_renew_timeout() -> u64 {
    30_000
}
fn yes() -> bool {
    true
}
fn d_hang() -> u64 {
    100
}
fn d_beat() -> u64 {
    20
}
fn d_confirm() -> u64 {
    300
}
fn d_stall() -> u64 {
    2000
}
fn d_start() -> u64 {
    30_000
}
fn d_grace() -> u64 {
    1000
}
fn d_reconcile() -> u64 {
    1000
}
fn d_burst() -> u32 {
    5
}
fn d_interval() -> u64 {
    60
}
fn d_backoff() -> u64 {
    1000
}
fn d_backoff_max() -> u64 {
    60_000
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { standby: true }
    }
}
impl Default for RejuvenateSection {
    fn default() -> Self {
        RejuvenateSection {
            vmm: off(),
            backend: off(),
            store: off(),
            spacing_ms: d_spacing(),
            timeout_ms: d_renew_timeout(),
        }
    }
}
impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            hang_ms: d_hang(),
            heartbeat_ms: d_beat(),
            hang_confirm_ms: d_confirm(),
            stall_ms: d_stall(),
            start_timeout_ms: d_start(),
            grace_ms: d_grace(),
            reconcile_ms: d_reconcile(),
        }
    }
}
impl Default for RestartSection {
    fn default() -> Self {
        RestartSection {
            burst: d_burst(),
            interval_s: d_interval(),
            backoff_ms: d_backoff(),
            backoff_max_ms: d_backoff_max(),
        }
    }
}

impl HostConfig {
    pub fn from_file(path: &Path) -> Result<HostConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: p.clone(), err })?;
        let cfg: HostConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: p.clone(), msg: e.message().to_string() })?;
        cfg.validate(&p)?;
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |key, msg: &str| Err(ConfigError::Invalid { path: path.into(), key, msg: msg.into() });
        if !self.run_dir.is_absolute() {
            return bad("run_dir", "must be an absolute path");
        }
        let h = &self.health;
        if h.hang_ms == 0 || h.heartbeat_ms == 0 || h.heartbeat_ms >= h.hang_ms {
            return bad("health.heartbeat_ms", "must be above 0 and below health.hang_ms");
        }
        if self.restart.burst == 0 {
            return bad("restart.burst", "must be at least 1");
        }
        if self.restart.backoff_ms == 0 || self.restart.backoff_max_ms < self.restart.backoff_ms {
            return bad("restart.backoff_max_ms", "must be at least restart.backoff_ms, which must be above 0");
        }
        let r = &self.rejuvenate;
        for (key, v) in [("rejuvenate.vmm", &r.vmm), ("rejuvenate.backend", &r.backend), ("rejuvenate.store", &r.store)]
        {
            if let Err(e) = parse_period(v) {
                return bad(key, &e);
            }
        }
        if r.timeout_ms == 0 {
            return bad("rejuvenate.timeout_ms", "must be above 0");
        }
        if let Some(b) = &self.binary
            && !b.is_file()
        {
            return bad("binary", &format!("{} is not a file", b.display()));
        }
        Ok(())
    }

    pub fn store_socket(&self) -> PathBuf {
        self.run_dir.join("store.sock")
    }
    pub fn events(&self) -> PathBuf {
        self.run_dir.join("events.jsonl")
    }
    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("host-state.json")
    }
    pub fn status_file(&self) -> PathBuf {
        self.run_dir.join("host-status.json")
    }
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join("vm").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<HostConfig, ConfigError> {
        let cfg: HostConfig =
            toml::from_str(t).map_err(|e| ConfigError::Parse { path: "t".into(), msg: e.message().into() })?;
        cfg.validate("t").map(|()| cfg)
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("run_dir = \"/x\"").unwrap();
        assert_eq!((c.health.hang_ms, c.restart.burst, c.store.standby), (100, 5, true));
        let e = parse("run_dir = \"/x\"\nhang = 3").unwrap_err().to_string();
        assert!(e.contains("unknown field `hang`"), "{e}");
        let e = parse("run_dir = \"/x\"\n[health]\nhang_ms = 10\nheartbeat_ms = 20").unwrap_err().to_string();
        assert!(e.contains("health.heartbeat_ms"), "{e}");
        assert!(parse("run_dir = \"x\"").unwrap_err().to_string().contains("run_dir"));
        assert!(parse("").unwrap_err().to_string().contains("run_dir"));
        let e = parse("run_dir = \"/x\"\n[rejuvenate]\nvmm = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("rejuvenate.vmm"), "{e}");
        let e = parse("run_dir = \"/x\"\n[rejuvenate]\nstore = \"0s\"").unwrap_err().to_string();
        assert!(e.contains("rejuvenate.store"), "{e}");
        let c = parse("run_dir = \"/x\"\n[rejuvenate]\nvmm = \"24h\"\nbackend = \"90s\"").unwrap();
        assert_eq!(c.rejuvenate.period("vmm"), Some(Duration::from_secs(86_400)));
        assert_eq!(c.rejuvenate.period("backend"), Some(Duration::from_secs(90)));
        assert_eq!(c.rejuvenate.period("store"), None);
    }
}
