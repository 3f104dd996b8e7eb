//! `staunch blk` and `staunch net`: the vhost-user backends, each in its
//! own restartable process (a spare that keeps the connection, an upgrade
//! in place, a watchdog), sharing their command line's common part.

use anyhow::{Context, Result};
use clap::Args;
use staunch_vmm::DiskConfig;
use std::path::PathBuf;

/// What every backend takes: where it listens, reports and is controlled,
/// and the hidden flags its spares and upgrades are started with.
#[derive(Args)]
pub struct BackendArgs {
    /// Unix socket to listen on for the frontend.
    #[arg(long)]
    socket: PathBuf,
    /// Where to append structured events (JSON lines).
    #[arg(long)]
    events: Option<PathBuf>,
    /// Keep a spare process ready to take over if this one dies.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    spare: String,
    /// A control socket: `ping`, `failpoint SPEC` (one line each).
    #[arg(long)]
    control: Option<PathBuf>,
    /// A queue worker busy this long is hung: the process ends and its
    /// spare takes over.
    #[arg(long, default_value_t = 3000)]
    hang_ms: u64,
    /// A listening socket inherited across exec (upgrade, spare).
    #[arg(long, hide = true)]
    listen_fd: Option<i32>,
    /// Serve only once this process has died (a spare).
    #[arg(long, hide = true)]
    spare_of: Option<u32>,
    /// The spare's end of its serving process's handoff channel.
    #[arg(long, hide = true)]
    handoff_fd: Option<i32>,
}

#[derive(Args)]
pub struct BlkArgs {
    #[command(flatten)]
    common: BackendArgs,
    /// The disk image: `FILE` or `FILE,ro`.
    #[arg(long)]
    disk: String,
    /// Virtqueues to offer (a frontend may use fewer).
    #[arg(long, default_value_t = 1)]
    queues: u16,
}

#[derive(Args)]
pub struct NetArgs {
    #[command(flatten)]
    common: BackendArgs,
    /// The tap device to attach to (created if it does not exist; an
    /// existing persistent tap keeps its addresses across restarts).
    #[arg(long)]
    tap: String,
    /// The tap, inherited across exec (spare, upgrade): one process holds it.
    #[arg(long, hide = true)]
    tap_fd: Option<i32>,
}

/// Serve `device` as `command`, `args` being the device's own flags (the
/// common ones are added), for the rest of the process's life.
fn serve(
    c: BackendArgs,
    command: &'static str,
    mut args: Vec<String>,
    device: std::sync::Arc<dyn staunch_vhost::backend::Device>,
) -> Result<i32> {
    args.extend(["--socket".into(), c.socket.display().to_string()]);
    if let Some(e) = &c.events {
        args.extend(["--events".into(), e.display().to_string()]);
    }
    args.extend(["--spare".into(), c.spare.clone(), "--hang-ms".into(), c.hang_ms.to_string()]);
    if let Some(ctl) = &c.control {
        args.extend(["--control".into(), ctl.display().to_string()]);
    }
    let role = staunch_vhost::process::Role {
        listen_fd: c.listen_fd,
        spare_of: c.spare_of,
        handoff_fd: c.handoff_fd,
        spare: c.spare == "on",
        args,
        command,
        control: c.control.clone(),
        hang_limit: std::time::Duration::from_millis(c.hang_ms.max(100)),
    };
    let opts = staunch_vhost::backend::Options { events: c.events, ..Default::default() };
    match staunch_vhost::process::run(&c.socket, device, opts, role)? {}
}

fn arm(c: &BackendArgs) -> Result<()> {
    staunch_fault::from_env().context("STAUNCH_FAILPOINTS")?;
    staunch_vmm::events::report_failpoints(c.events.clone());
    Ok(())
}

pub fn blk(a: BlkArgs) -> Result<i32> {
    let disk = DiskConfig::parse(&a.disk)?;
    arm(&a.common)?;
    let dev = staunch_vhost::blk::BlkDevice::open(&disk.path, disk.read_only, a.queues)?;
    let args = vec!["--disk".into(), a.disk.clone(), "--queues".into(), a.queues.to_string()];
    serve(a.common, "blk", args, std::sync::Arc::new(dev))
}

pub fn net(a: NetArgs) -> Result<i32> {
    use staunch_vhost::net;
    arm(&a.common)?;
    let dev = match a.tap_fd {
        // SAFETY: our predecessor passed its tap across exec and named it.
        Some(fd) => unsafe { net::NetDevice::inherited(fd) },
        None => net::NetDevice::new(net::open_tap(&a.tap)?),
    };
    use staunch_vhost::backend::Device;
    let fd = dev.inherited_fds()[0];
    let args = vec!["--tap".into(), a.tap.clone(), "--tap-fd".into(), fd.to_string()];
    serve(a.common, "net", args, std::sync::Arc::new(dev))
}
