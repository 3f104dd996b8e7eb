//! A test guest on the network: Staunch's VMM with a virtio-net device
//! served by `staunch net` on a tap on a lab's bridge, its `net-ping`
//! answered and counted by `staunch net-peer --echo`. How the net campaign
//! and the demo run one, and how they end it: the host tells the guest to
//! stop, the guest drains and reports, and its counts are checked against
//! the host's.

use crate::childbackend::ChildBackend;
use crate::childvm::{ChildVm, Spec};
use crate::netlab::Lab;
use anyhow::Result;
use staunch_testguest::proto;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

pub const REPORT: &str = "STAUNCH net sent=";
pub const MAC: &str = "52:54:00:00:00:42";
pub const TAP: &str = "stap0";
/// Frames in flight (`staunch.qd`): at most this many lost to one fault.
pub const WINDOW: u64 = 8;

/// The guest (its backend as the VM's `blk`, which the shared injector
/// drives) and the host's peer.
pub struct NetVm {
    pub vm: ChildVm,
    peer: Child,
    peer_out: PathBuf,
}

fn num(line: &str, key: &str) -> u64 {
    proto::field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl NetVm {
    /// Start the peer, the backend (with a spare) and the VM in a fresh `dir`.
    pub fn start(lab: &Lab, dir: &Path, cmdline: &str) -> Result<NetVm> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let peer_out = dir.join("peer.jsonl");
        let peer = lab.echo_peer(&peer_out)?;
        let backend = ChildBackend::start_net(dir, &lab.ns, TAP, true)?;
        let args = vec!["--net".to_string(), format!("vhost-user={},mac={MAC}", backend.sock.display())];
        let spec = Spec { vcpus: 1, mem_mib: 256, cmdline, disk_mib: 0, env: &[], backend: false, args: &args };
        let mut vm = ChildVm::start(&dir.join("vm"), &spec)?;
        vm.blk = Some(backend);
        Ok(NetVm { vm, peer, peer_out })
    }

    /// Tell the guest to stop (stop frames from the peer), wait for its
    /// final report, and check its counts against the host's: every frame
    /// sent arrived, every reply the guest did not get it counted lost (at
    /// most `may_lose`), nothing broken. The final line and the host's
    /// counts, or what disagrees.
    pub fn finish(mut self, may_lose: u64) -> Result<(String, serde_json::Value), String> {
        // SAFETY: kill(2) of our child, the peer: SIGUSR1 makes it send stops.
        unsafe { libc::kill(self.peer.id() as i32, libc::SIGUSR1) };
        let exited = self.vm.wait_exit(Duration::from_secs(20));
        let host = crate::netlab::finish_peer(self.peer, &self.peer_out).map_err(|e| e.to_string())?;
        let lines = self.vm.lines();
        self.vm.kill();
        let Some(last) = lines.iter().rfind(|l| l.starts_with(REPORT) && l.contains("final=1")).cloned() else {
            return Err(format!("no final report from the guest (exit {exited:?})"));
        };
        let g = |k| num(&last, k);
        let h = |k: &str| host[k].as_u64().unwrap_or(u64::MAX);
        let mut problems = Vec::new();
        if h("unique") != g("sent") {
            problems.push(format!("the guest sent {} frames, the host got {}", g("sent"), h("unique")));
        }
        if g("replies") + g("lost") != g("sent") {
            problems.push(format!("replies {} + lost {} != sent {}", g("replies"), g("lost"), g("sent")));
        }
        let missing = h("replies").saturating_sub(g("replies") + g("dup"));
        if missing < g("lost") || missing > may_lose {
            problems
                .push(format!("{missing} replies missing, the guest counted {} lost (at most {may_lose})", g("lost")));
        }
        if h("corrupt") + g("corrupt") + g("reordered") + g("bad_used") > 0 {
            problems.push(format!("broken frames: guest {last}, host {host}"));
        }
        if problems.is_empty() {
            let _ = std::fs::remove_dir_all(self.peer_out.parent().unwrap_or(&self.vm.dir));
            Ok((last, host))
        } else {
            Err(problems.join("; "))
        }
    }
}
