//! Debian's kernel under QEMU (TCG) with the project's busybox initramfs
//! (scripts/initramfs.sh), for the real-Linux end-to-end tests of the
//! vhost-user backends.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cache of scripts/qemu.sh, assets.sh and initramfs.sh.
pub fn cache() -> PathBuf {
    std::env::var_os("STAUNCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache"))
}

pub struct Assets {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The assets (scripts/test.sh fetches and builds them): a missing one
/// fails the test, as in tests/linux.rs; it is never passed by skipping.
pub fn assets() -> Assets {
    let c = cache();
    let a = Assets {
        qemu: c.join("qemu/root/usr/bin/qemu-system-x86_64"),
        kernel: std::env::var_os("STAUNCH_LINUX_KERNEL").map(PathBuf::from).unwrap_or(c.join("linux/vmlinuz")),
        initramfs: c.join("initramfs/initramfs.cpio.gz"),
    };
    let missing: Vec<_> = [&a.qemu, &a.kernel, &a.initramfs].into_iter().filter(|p| !p.exists()).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: run scripts/qemu.sh, scripts/assets.sh and scripts/initramfs.sh (scripts/test.sh does)"
    );
    a
}

/// QEMU, its console in a file. On a backend disconnect (an upgrade, or a
/// death the spare could not cover) its stderr says "Failed to set msg
/// fds." and "vhost VQ 0 ring restore failed": it cannot ask the dead
/// backend for the ring's state and takes it from the used index; then it
/// reconnects (reconnect-ms).
pub struct Qemu {
    pub child: Child,
    log: PathBuf,
    stderr: PathBuf,
}

impl Qemu {
    /// Debian's kernel and the initramfs under TCG on q35, `cpus` vCPUs, 512 MiB of
    /// shared memfd memory (vhost-user needs it), `append` after the
    /// console parameters, `devices` (the vhost-user frontends) added.
    pub fn start(dir: &Path, a: &Assets, cpus: u8, append: &str, devices: &[&str]) -> Qemu {
        let (log, stderr) = (dir.join("console.log"), dir.join("qemu.stderr"));
        let root = a.qemu.parent().unwrap().parent().unwrap();
        let libs = [root.join("lib/x86_64-linux-gnu"), root.parent().unwrap().join("lib/x86_64-linux-gnu")];
        let mut c = Command::new(&a.qemu);
        c.env("LD_LIBRARY_PATH", std::env::join_paths(libs).unwrap());
        c.arg("-L").arg(root.join("share/qemu")).arg("-L").arg(root.join("share/seabios"));
        c.args(["-accel", "tcg", "-M", "q35", "-m", "512", "-smp"]).arg(cpus.to_string());
        c.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem"]);
        c.arg("-kernel").arg(&a.kernel).arg("-initrd").arg(&a.initramfs);
        c.arg("-append").arg(format!("console=ttyS0 quiet panic=-1 {append}"));
        c.args(devices);
        c.arg("-serial").arg(format!("file:{}", log.display()));
        c.args(["-display", "none", "-nodefaults", "-no-user-config", "-no-reboot"]);
        let err = std::fs::File::create(&stderr).unwrap();
        let child = c.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
        Qemu { child, log, stderr }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for(&mut self, what: &str, within: Duration, f: impl Fn(&str) -> bool) {
        let t = Instant::now();
        while !f(&self.log()) {
            let gone = self.child.try_wait().unwrap();
            let late = t.elapsed() > within;
            if gone.is_some() || late {
                let why = if late { format!("timed out after {within:?}") } else { format!("QEMU ended: {gone:?}") };
                let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                panic!("waiting for {what}: {why}\nconsole:\n{}\nQEMU's stderr:\n{err}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
