//! The components of a host, how each is started, and the record of each
//! that survives the supervisor (so that a new supervisor adopts instead of
//! restarting).

use crate::config::HostConfig;
use crate::def::{NicDef, VmDef};
use crate::probe::{Probe, Target};
use crate::proc::Identity;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Kind {
    /// The config store; `standby` follows the primary. `slot` names its
    /// data directory (a and b alternate as standbys are promoted).
    Store {
        standby: bool,
        slot: String,
    },
    Blk {
        vm: String,
        index: usize,
    },
    Net {
        vm: String,
        index: usize,
    },
    Vmm {
        vm: String,
    },
}

impl Kind {
    pub fn vm(&self) -> Option<&str> {
        match self {
            Kind::Store { .. } => None,
            Kind::Blk { vm, .. } | Kind::Net { vm, .. } | Kind::Vmm { vm } => Some(vm),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Store { standby: false, .. } => "store",
            Kind::Store { standby: true, .. } => "store-standby",
            Kind::Blk { .. } => "blk",
            Kind::Net { .. } => "net",
            Kind::Vmm { .. } => "vmm",
        }
    }
}

pub fn id_of(kind: &Kind) -> String {
    match kind {
        Kind::Store { standby: false, .. } => "store".into(),
        Kind::Store { standby: true, .. } => "store-standby".into(),
        Kind::Blk { vm, index } => format!("vm/{vm}/blk{index}"),
        Kind::Net { vm, index } => format!("vm/{vm}/net{index}"),
        Kind::Vmm { vm } => format!("vm/{vm}/vmm"),
    }
}

/// What outlives the supervisor (host-state.json, versioned).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    /// The process started: leader of the component's session and group.
    pub leader: Identity,
    /// The process that answered its heartbeat last (a spare or a successor
    /// that took over), if not the leader.
    pub serving: Option<Identity>,
    pub restarts: u64,
    /// VMMs: the times the supervisor booted the guest.
    pub boots: u64,
    /// VMMs: the definition the running guest was started with.
    pub def: Option<VmDef>,
    /// The binary the serving process runs, and the rolling upgrade
    /// generation it belongs to (0: none asked for yet).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    #[serde(default)]
    pub generation: u64,
}

impl Record {
    /// Every process of the component: its group (spares and successors
    /// stay in the leader's group), and the serving process if it is still
    /// the one recorded.
    pub fn kill(&self) {
        crate::proc::kill_group(self.leader);
        if let Some(s) = self.serving.filter(|s| crate::proc::open(*s).is_some()) {
            crate::proc::signal(s.pid, libc::SIGKILL);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    /// A process died; its own spare or successor may still take over.
    Recovering,
    Hung,
    Backoff,
}

pub struct Component {
    pub rec: Record,
    /// Watched processes: a readable pidfd is a death.
    pub fds: Vec<(Identity, OwnedFd)>,
    pub probe: Option<Arc<Probe>>,
    pub health: Health,
    pub since: Instant,
    /// Wall-clock ms of the last start (0: adopted), to tell this run's
    /// exit events from older ones.
    pub started_ms: u64,
    /// When the last watched process died (Recovering).
    pub died: Option<Instant>,
    /// When the hang was declared and acted on.
    pub hung: Option<Instant>,
    /// Restart times within the budget's interval.
    pub budget: VecDeque<Instant>,
    /// Backoff: until when, and the delay that got us there.
    pub backoff: Option<(Instant, Duration)>,
    pub last_event: String,
    /// A planned renewal (rejuvenation, upgrade) is replacing its process:
    /// the old one's exit is expected, not a death.
    pub renewing: bool,
    /// Standbys: when last looked at, and since when seen stopped.
    pub looked: Option<Instant>,
    pub stopped_since: Option<Instant>,
}

impl Component {
    pub fn id(&self) -> String {
        id_of(&self.rec.kind)
    }
    /// Every process of the component, also those only its pidfds know.
    pub fn kill(&self) {
        self.rec.kill();
        for (i, _) in &self.fds {
            crate::proc::signal(i.pid, libc::SIGKILL);
        }
    }

    pub fn serving_pid(&self) -> u32 {
        self.rec.serving.map_or(self.rec.leader.pid, |s| s.pid)
    }
}

/// Where a VM's files are.
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(cfg: &HostConfig, vm: &str) -> VmPaths {
        VmPaths { dir: cfg.vm_dir(vm) }
    }
    pub fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn vmm_events(&self) -> PathBuf {
        self.dir.join("vmm-events.jsonl")
    }
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    pub fn backend(&self, kind: &str, i: usize, what: &str) -> PathBuf {
        self.dir.join(format!("{kind}{i}{what}"))
    }
}

/// The command that starts a component, its log file and its heartbeat.
pub fn command(
    cfg: &HostConfig,
    bin: &std::path::Path,
    kind: &Kind,
    def: Option<&VmDef>,
) -> (Command, PathBuf, Option<Target>) {
    let run = &cfg.run_dir;
    match kind {
        Kind::Store { standby, slot } => {
            let mut c = Command::new(bin);
            c.arg("store").arg("--socket").arg(cfg.store_socket()).arg("--data").arg(run.join("store").join(slot));
            c.arg("--events").arg(run.join("store-events.jsonl"));
            if *standby {
                c.arg("--standby");
            }
            let target = (!standby).then(|| Target::Store(cfg.store_socket()));
            (c, run.join(format!("store-{slot}.log")), target)
        }
        Kind::Blk { vm, index } => {
            let p = VmPaths::new(cfg, vm);
            let d = &def.expect("a backend has its VM's definition").disk[*index];
            let mut c = Command::new(bin);
            let disk = format!("{}{}", d.path.display(), if d.readonly { ",ro" } else { "" });
            c.args(["blk", "--disk", &disk]);
            backend_args(&mut c, &p, "blk", *index);
            (c, p.backend("blk", *index, ".log"), Some(Target::Backend(p.backend("blk", *index, ".ctl"))))
        }
        Kind::Net { vm, index } => {
            let p = VmPaths::new(cfg, vm);
            let n: &NicDef = &def.expect("a backend has its VM's definition").nic[*index];
            let mut c = match &n.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(bin);
                    c
                }
                None => Command::new(bin),
            };
            c.args(["net", "--tap", &n.tap]);
            backend_args(&mut c, &p, "net", *index);
            (c, p.backend("net", *index, ".log"), Some(Target::Backend(p.backend("net", *index, ".ctl"))))
        }
        Kind::Vmm { vm } => {
            let p = VmPaths::new(cfg, vm);
            let d = def.expect("a VMM has its definition");
            let mut c = Command::new(bin);
            if let Some(from) = &d.restore {
                // The snapshot holds the VM's configuration (these same
                // paths: it was saved by this VM's VMM).
                c.args(["vmm", "restore", "--from"]).arg(from);
                return (c, p.dir.join("vmm.log"), Some(Target::Vmm(p.api())));
            }
            c.args(["vmm", "run", "--kernel"]).arg(&d.kernel);
            c.args(["--cmdline", &d.cmdline, "--mem", &d.memory.to_string(), "--vcpus", &d.vcpus.to_string()]);
            c.arg("--api-socket").arg(p.api()).arg("--events").arg(p.vmm_events());
            c.arg("--serial").arg(format!("file:{}", p.serial().display()));
            for i in 0..d.disk.len() {
                c.arg("--disk").arg(format!("vhost-user={}", p.backend("blk", i, ".sock").display()));
            }
            for (i, n) in d.nic.iter().enumerate() {
                let mac = n.mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default();
                c.arg("--net").arg(format!("vhost-user={}{mac}", p.backend("net", i, ".sock").display()));
            }
            (c, p.dir.join("vmm.log"), Some(Target::Vmm(p.api())))
        }
    }
}

fn backend_args(c: &mut Command, p: &VmPaths, kind: &str, i: usize) {
    c.arg("--socket").arg(p.backend(kind, i, ".sock"));
    c.arg("--events").arg(p.backend(kind, i, "-events.jsonl"));
    c.arg("--control").arg(p.backend(kind, i, ".ctl"));
}
