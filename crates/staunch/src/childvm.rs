//! A VMM run as a child process (`staunch vmm run`) with a control socket,
//! an events file and its serial log in a file: how the demo, the campaign
//! and the recovery benchmarks drive a VM that may re-execute itself.

use anyhow::Result;
use serde_json::Value;
use staunch_vmm::api::{request_within, ApiRequest, ApiResponse};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildVm {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub events: PathBuf,
    pub disk: PathBuf,
    /// The vhost-user backend the campaign and demo fault: `staunch blk`
    /// serving the disk, or `staunch net` (set by whoever started it).
    pub blk: Option<crate::childbackend::ChildBackend>,
}

pub struct Spec<'a> {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub cmdline: &'a str,
    pub disk_mib: u64,
    pub env: &'a [(&'a str, &'a str)],
    /// Serve the disk from a `staunch blk` backend instead of the VMM.
    pub backend: bool,
    /// More options for `vmm run` (`--net ...`).
    pub args: &'a [String],
}

impl ChildVm {
    /// Start in a fresh `dir` and wait for the guest's first report line.
    pub fn start(dir: &Path, spec: &Spec) -> Result<ChildVm> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let kernel = crate::guestrun::test_guest()?;
        let (sock, log, events, disk) =
            (dir.join("api.sock"), dir.join("serial.log"), dir.join("events.jsonl"), dir.join("disk.img"));
        // The very image that runs now, even if its file was replaced.
        let mut c = Command::new("/proc/self/exe");
        c.args(["vmm", "run", "--vcpus", &spec.vcpus.to_string(), "--mem", &spec.mem_mib.to_string(), "--kernel"]);
        c.arg(&kernel).arg("--api-socket").arg(&sock).arg("--events").arg(&events);
        c.arg("--serial").arg(format!("file:{}", log.display())).arg("--cmdline").arg(spec.cmdline);
        let mut blk = None;
        if spec.disk_mib > 0 {
            std::fs::write(&disk, vec![0u8; (spec.disk_mib << 20) as usize])?;
            if spec.backend {
                let b = crate::childbackend::ChildBackend::start(dir, &disk)?;
                c.arg("--disk").arg(format!("vhost-user={}", b.sock.display()));
                blk = Some(b);
            } else {
                c.arg("--disk").arg(&disk);
            }
        }
        c.args(spec.args);
        c.env_remove("STAUNCH_FAILPOINTS");
        for (k, v) in spec.env {
            c.env(k, v);
        }
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn()?;
        let vm = ChildVm { child, dir: dir.to_path_buf(), sock, log, events, disk, blk };
        if !vm.progress("STAUNCH ", 0, 1, Duration::from_secs(30)) {
            anyhow::bail!("the VM did not start reporting");
        }
        Ok(vm)
    }

    /// Complete serial lines so far (the last one may still be printing).
    pub fn lines(&self) -> Vec<String> {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = &t[..t.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().map(|l| l.trim_end().to_string()).collect()
    }

    pub fn reports(&self, prefix: &str) -> Vec<String> {
        self.lines().into_iter().filter(|l| l.starts_with(prefix)).collect()
    }

    /// Wait for `more` lines starting with `prefix` beyond `from`.
    pub fn progress(&self, prefix: &str, from: usize, more: usize, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.reports(prefix).len() >= from + more {
                return true;
            }
            if !self.alive() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Not exited. (Not /proc/<pid>/stat: while a non-leader thread execs,
    /// the old leader shows as a zombie for a moment.)
    pub fn alive(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only peeks at our child's state; the
        // siginfo is a local we own.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r =
                libc::waitid(libc::P_PID, self.child.id(), &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
            r == 0 && info.si_pid() == 0
        }
    }

    pub fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.events)
    }

    /// Wait for an event of `kind` after the first `seen` events.
    pub fn wait_event(&self, kind: &str, seen: usize, within: Duration) -> Option<Value> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(e) = self.events().into_iter().skip(seen).find(|e| e["event"] == kind) {
                return Some(e);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    pub fn request(&self, req: &ApiRequest) -> Result<ApiResponse> {
        Ok(request_within(&self.sock, req, Duration::from_secs(3))?)
    }

    /// Arm a failpoint, then send one more request (which `api.request`
    /// failpoints fire on).
    pub fn arm(&self, spec: &str) -> Result<()> {
        // The fault may take the VMM into its re-exec before it answers.
        if let Ok(r) = self.request(&ApiRequest::Failpoint { spec: spec.into() }) {
            anyhow::ensure!(r.ok, "arming {spec}: {:?}", r.error);
        }
        let _ = self.request(&ApiRequest::Status {});
        Ok(())
    }

    /// The process that runs the VM now: after a handover (upgrade, or a
    /// crash taken over by the spare) it is a successor, not our child.
    pub fn vmm_pid(&self) -> u32 {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if let Some(pid) = self.request(&ApiRequest::Status {}).ok().and_then(|r| r.data["pid"].as_u64()) {
                return pid as u32;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child.id()
    }

    /// The VMM's long-lived threads (a control connection's thread may be
    /// gone before a signal reaches it), and its pid.
    pub fn thread_ids(&self) -> (u32, Vec<i32>) {
        let pid = self.vmm_pid();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|tid: &i32| {
                        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                            .map(|c| c.trim() != "api-conn")
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .map(|t| (pid, t))
            .unwrap_or((pid, Vec::new()))
    }

    /// Wait for the VMM to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// The VMM and, after an upgrade, the successor its first process keeps.
    pub fn kill(&mut self) {
        staunch_vmm::handover::kill_family(self.child.id());
        let _ = self.child.wait();
        if let Some(b) = self.blk.as_mut() {
            b.kill();
        }
    }
}

impl Drop for ChildVm {
    /// A VMM outlives its launcher by design; tools that start one for a
    /// while must not leave it behind.
    fn drop(&mut self) {
        self.kill();
    }
}
