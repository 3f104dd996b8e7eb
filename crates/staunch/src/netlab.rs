//! A network namespace with a Linux bridge and taps on it, built for one
//! run of a benchmark, campaign or demo and removed after it: the guests'
//! frames go through real host networking and stay inside it.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const BRIDGE: &str = "br0";

pub struct Lab {
    pub ns: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("ip(8) (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// Namespace `staunch-TAG-PID` with bridge [`BRIDGE`] and `taps`
    /// (persistent, with the virtio-net header) on it, all up.
    pub fn new(tag: &str, taps: &[&str]) -> Result<Lab> {
        let ns = format!("staunch-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let lab = Lab { ns };
        lab.exec(&["ip", "link", "set", "lo", "up"])?;
        lab.exec(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        lab.exec(&["ip", "link", "set", BRIDGE, "up"])?;
        for t in taps {
            lab.exec(&["ip", "tuntap", "add", "dev", t, "mode", "tap", "vnet_hdr"])?;
            lab.exec(&["ip", "link", "set", t, "master", BRIDGE])?;
            lab.exec(&["ip", "link", "set", t, "up"])?;
        }
        Ok(lab)
    }

    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["netns", "exec", &self.ns];
        a.extend(args);
        ip(&a)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `staunch net-peer --echo` on the bridge, its counts (JSON lines) to `out`.
    pub fn echo_peer(&self, out: &Path) -> Result<Child> {
        let mut c = self.command(&std::env::current_exe()?);
        c.args(["net-peer", "--echo", "--iface", BRIDGE]);
        Ok(c.stdin(Stdio::null()).stdout(std::fs::File::create(out)?).stderr(Stdio::null()).spawn()?)
    }

    /// Run the load generator on the bridge against the guest at `mac`.
    pub fn ping(&self, mac: &str, args: &[&str]) -> Result<crate::netload::Results> {
        let mut c = self.command(&std::env::current_exe()?);
        c.args(["net-peer", "--ping", "--iface", BRIDGE, "--to", mac]).args(args);
        let out = c.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("net-peer --ping: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("net-peer's results")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Stop an echo peer (SIGTERM) and read its final counts.
pub fn finish_peer(mut peer: Child, out: &Path) -> Result<serde_json::Value> {
    // SAFETY: kill(2) of our child (`ip netns exec` became the peer).
    unsafe { libc::kill(peer.id() as i32, libc::SIGTERM) };
    let _ = peer.wait();
    let text = std::fs::read_to_string(out)?;
    let last = text.lines().last().context("no counts from the peer")?;
    Ok(serde_json::from_str(last)?)
}
