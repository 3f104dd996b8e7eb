//! `staunch`: one binary, one subcommand per component.

// A faster allocator: the config store decodes 100k-node snapshots at start-up.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod availability;
mod backends;
mod bench;
mod bench_blk;
mod bench_host;
mod bench_io;
mod bench_net;
mod bench_recovery;
mod bench_store;
mod bench_tail;
mod campaign;
mod childbackend;
mod childvm;
mod demo;
mod demo_net;
mod guestrun;
mod hostcli;
mod idle;
mod netlab;
mod netload;
mod netpeer;
mod netvm;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use staunch_kvm::StopReason;
use staunch_vmm::{DiskConfig, NetConfig, RunningVm, SerialConfig, VmConfig};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "staunch",
    version,
    about = "A KVM VMM whose every part can crash, hang or be upgraded while its guests keep running"
)]
struct Cli {
    /// Log as JSON lines (for supervisors and log pipelines).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The per-VM monitor process.
    Vmm {
        #[command(subcommand)]
        cmd: VmmCmd,
    },
    /// Boot the test guest with a disk, show it working, shut it down.
    Demo(demo::DemoArgs),
    /// Fault-injection campaign: random real faults, judged by the guest.
    Campaign(campaign::CampaignArgs),
    /// The config store: XenStore's protocol on a unix socket, durable.
    Store(StoreArgs),
    /// Benchmarks, side by side with QEMU where it is installed.
    Bench(bench::BenchArgs),
    /// Define, start, stop and list the host's VMs (through the config
    /// store), or control one VM through its control socket (--socket).
    Vm {
        /// The VM's control socket (`vmm run --api-socket`), for pause,
        /// resume, status, upgrade, reboot, snapshot, failpoint.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The host's config store, for define, start, stop, undefine,
        /// list, show (default: $STAUNCH_STORE, else /run/staunch/store.sock).
        #[arg(long)]
        store: Option<PathBuf>,
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// The host supervisor: runs the config store, and every VM's backends
    /// and VMM as the store's definitions say, and keeps them running.
    Host(hostcli::HostArgs),
    /// The toolstack's REST API on a unix socket (docs/api.md): VMs, their
    /// actions, host components, rolling upgrades, events, metrics.
    Api(ApiArgs),
    /// A vhost-user-blk backend: serves a disk file to a VMM (Staunch's or
    /// QEMU's) from its own restartable process.
    Blk(backends::BlkArgs),
    /// A vhost-user-net backend: moves a VM's frames to and from a tap
    /// device, from its own restartable process.
    Net(backends::NetArgs),
    /// The host's end of the test guest's numbered frames on an interface
    /// (AF_PACKET): answers them and counts what arrived.
    NetPeer(netpeer::NetPeerArgs),
    /// Write the built-in test guest image to a file.
    Testguest {
        /// Directory to write `staunch-testguest.elf` into.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum VmmCmd {
    /// Run one VM in this process until the guest powers off or resets.
    Run(Box<RunArgs>),
    /// Restore a VM saved with `staunch vm snapshot` and run it.
    Restore {
        /// The snapshot file.
        #[arg(long)]
        from: PathBuf,
    },
    /// Rebuild a VM from a preserved record (used by upgrade and recovery;
    /// not for direct use).
    Resume {
        /// The inherited memfd holding the record.
        #[arg(long)]
        preserved_fd: i32,
        /// Where to report a record that cannot be used.
        #[arg(long)]
        events: Option<PathBuf>,
    },
    /// Standby successor of a warm upgrade (started by the running VMM; not
    /// for direct use).
    #[command(hide = true)]
    Standby {
        /// The inherited handover socket.
        #[arg(long)]
        handover_fd: i32,
    },
    /// What the VM's first process becomes once its VM runs in a successor:
    /// waits for it and exits with its status (not for direct use).
    #[command(hide = true)]
    Keep,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Show the VM's state.
    Status,
    /// Warm upgrade: re-execute the VMM (optionally a different binary)
    /// around the running guest's memory.
    Upgrade {
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Cold reboot: discard the guest's state and boot it again from its
    /// kernel, in the same VMM process.
    Reboot,
    /// Save the VM's state and memory to a file and stop it.
    Snapshot {
        #[arg(long)]
        path: PathBuf,
    },
    /// Arm failpoints in the running VMM: `name=action[*count],...`
    /// (actions: panic, error, hang, corrupt, segv, abort, stack-overflow).
    Failpoint { spec: String },
    #[command(flatten)]
    Host(hostcli::StoreVerb),
}

#[derive(Args)]
struct ApiArgs {
    /// The host's configuration (the supervisor's host.toml).
    #[arg(long, default_value = "/etc/staunch/host.toml")]
    config: PathBuf,
    /// Unix socket to serve (default: <run_dir>/api.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address (needs --token-file).
    #[arg(long, requires = "token_file")]
    listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token TCP clients must send.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct StoreArgs {
    /// Unix socket to serve (XenStore clients: XENSTORED_PATH=<this>).
    #[arg(long)]
    socket: PathBuf,
    /// Directory for the log and snapshot (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Nodes an unprivileged domain may own.
    #[arg(long, default_value_t = 1000)]
    quota_nodes: usize,
    /// Largest value an unprivileged domain may write, in bytes.
    #[arg(long, default_value_t = 2048)]
    quota_value: usize,
    /// Watches per connection.
    #[arg(long, default_value_t = 128)]
    quota_watches: usize,
    /// Open transactions per connection.
    #[arg(long, default_value_t = 10)]
    quota_transactions: usize,
    /// Compact the log into a snapshot past this many bytes.
    #[arg(long, default_value_t = 8 << 20)]
    compact_bytes: u64,
    /// Run as the hot standby of the store serving --socket (its own copy
    /// in --data); take the socket over when that store dies.
    #[arg(long)]
    standby: bool,
    /// Also append structured events to this file.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Scrub (verify memory, disk and standby, repair) every this many
    /// seconds; 0: only on demand.
    #[arg(long, default_value_t = 60)]
    scrub_secs: u64,
    /// Connections served at once; more are closed.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

fn store(a: StoreArgs) -> Result<i32> {
    let cfg = staunch_store::Config {
        socket: a.socket,
        data: a.data,
        quotas: staunch_store::Quotas {
            nodes_per_domain: a.quota_nodes,
            value_bytes: a.quota_value,
            watches_per_conn: a.quota_watches,
            transactions_per_conn: a.quota_transactions,
        },
        compact_bytes: a.compact_bytes,
        events: a.events,
        scrub_every: (a.scrub_secs > 0).then(|| std::time::Duration::from_secs(a.scrub_secs)),
        max_connections: a.max_connections,
    };
    staunch_fault::from_env()?;
    let s = if a.standby { staunch_store::standby(&cfg)? } else { staunch_store::start(&cfg)? };
    eprintln!(
        "staunch store: serving {} ({} nodes, {} log records replayed, ready in {:.1} ms)",
        cfg.socket.display(),
        s.nodes,
        s.replayed,
        s.open_ms
    );
    staunch_store::emit(
        cfg.events.as_deref(),
        "store-serving",
        serde_json::json!({"socket": cfg.socket, "nodes": s.nodes, "replayed": s.replayed, "open_ms": s.open_ms}),
    );
    loop {
        std::thread::park();
    }
}

#[derive(Args)]
struct RunArgs {
    /// TOML (.toml) or JSON config file; command-line options override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: ELF with a 64-bit entry (or PVH note), or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// PATH[,ro]; repeat for more disks.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// vhost-user=SOCKET[,mac=MAC]: a virtio-net device served by a
    /// vhost-user-net backend (`staunch net`); repeat for more.
    #[arg(long = "net")]
    nets: Vec<String>,
    /// stdio | null | file:PATH | unix:PATH
    #[arg(long)]
    serial: Option<String>,
    /// Control socket (JSON lines; see `staunch vm`).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Append structured events (JSON lines) to this file.
    #[arg(long)]
    events: Option<PathBuf>,
    /// A handler busy this long (ms) counts as hung and escalates to crash
    /// re-exec (default 100).
    #[arg(long)]
    hang_ms: Option<u64>,
    /// Do not keep a prepared successor process ready (saves one idle
    /// process per VM; crash recovery then rebuilds the VM in the pause).
    #[arg(long)]
    no_spare: bool,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig> {
        let mut cfg = match &self.config {
            Some(p) => VmConfig::from_file(p)?,
            None => VmConfig::new(PathBuf::new()),
        };
        if let Some(k) = self.kernel {
            cfg.kernel = k;
        }
        if self.initrd.is_some() {
            cfg.initrd = self.initrd;
        }
        if let Some(c) = self.cmdline {
            cfg.cmdline = c;
        }
        if let Some(m) = self.mem {
            cfg.mem_mib = m;
        }
        if let Some(v) = self.vcpus {
            cfg.vcpus = v;
        }
        for d in &self.disks {
            cfg.disks.push(DiskConfig::parse(d)?);
        }
        for n in &self.nets {
            cfg.nets.push(NetConfig::parse(n)?);
        }
        if let Some(s) = &self.serial {
            cfg.serial = SerialConfig::parse(s)?;
        }
        if self.api_socket.is_some() {
            cfg.api_socket = self.api_socket;
        }
        if self.events.is_some() {
            cfg.events = self.events;
        }
        if self.no_spare {
            cfg.spare = false;
        }
        if self.hang_ms.is_some() {
            cfg.hang_ms = self.hang_ms;
        }
        if let Ok(dev) = std::env::var("STAUNCH_KVM_DEVICE") {
            cfg.kvm_device = dev;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STAUNCH_LOG").unwrap_or_else(|_| "warn".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn vmm_run(args: RunArgs) -> Result<i32> {
    let cfg = args.into_config()?;
    serve(RunningVm::start(&cfg)?)
}

fn vmm_resume(fd: i32, events_file: Option<PathBuf>) -> Result<i32> {
    use std::os::fd::FromRawFd;
    // The predecessor's teardown helper (a CLONE_VM child) exits on its own
    // shortly; reap it so it does not linger as a zombie.
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: waitpid on our own children, non-blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) } > 0 {}
    });
    // SAFETY: the predecessor image passed this inherited memfd's number.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let bytes = staunch_vmm::record::read_fd(&mut f)?;
    drop(f);
    let rec = match staunch_vmm::record::decode(&bytes) {
        Ok(r) => r,
        Err(e) => {
            staunch_vmm::events::emit(
                events_file.as_deref(),
                "recovery-failed",
                serde_json::json!({"error": e.to_string(), "outcome": "guest-lost"}),
            );
            return Err(e.into());
        }
    };
    let events = rec.config.events.clone();
    match RunningVm::restore(rec, None) {
        Ok(vm) => serve(vm),
        Err(e) => {
            staunch_vmm::events::emit(
                events.as_deref(),
                "recovery-failed",
                serde_json::json!({"error": e.to_string(), "outcome": "guest-lost"}),
            );
            Err(e.into())
        }
    }
}

fn vm_control(socket: &std::path::Path, cmd: VmCmd) -> Result<i32> {
    use staunch_vmm::api::{request, ApiRequest};
    let req = match &cmd {
        VmCmd::Pause => ApiRequest::Pause {},
        VmCmd::Resume => ApiRequest::Resume {},
        VmCmd::Status => ApiRequest::Status {},
        VmCmd::Upgrade { binary } => ApiRequest::Upgrade { binary: binary.clone() },
        VmCmd::Failpoint { spec } => ApiRequest::Failpoint { spec: spec.clone() },
        VmCmd::Reboot => ApiRequest::Reboot {},
        VmCmd::Snapshot { path } => ApiRequest::Snapshot { path: std::path::absolute(path)? },
        VmCmd::Host(_) => unreachable!("served by the store"),
    };
    let before =
        request(socket, &ApiRequest::Status {}).with_context(|| format!("control socket {}", socket.display()))?;
    let resp = request(socket, &req)?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_default());
    }
    if let VmCmd::Upgrade { .. } = cmd {
        // The VMM re-executes; wait for the new generation to answer.
        let old = before.data["generation"].as_u64().unwrap_or(0);
        let failures = before.data["upgrade_failures"].as_u64().unwrap_or(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(s) = request(socket, &ApiRequest::Status {}) {
                if s.data["generation"].as_u64().unwrap_or(0) > old {
                    println!("{}", serde_json::json!(s.data));
                    return Ok(0);
                }
                if s.data["upgrade_failures"].as_u64().unwrap_or(0) > failures {
                    anyhow::bail!(
                        "upgrade failed, the VM continues on the old VMM: {}",
                        s.data["last_upgrade_error"].as_str().unwrap_or("?")
                    );
                }
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("the VMM did not come back after the upgrade");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    println!("{}", serde_json::json!(resp.data));
    Ok(0)
}

fn serve(mut vm: RunningVm) -> Result<i32> {
    let mut events;
    let exit = loop {
        let cfg = vm.config().clone();
        events = cfg.events.clone();
        let exit = vm.wait(None);
        if let StopReason::HandedOver(pid) = exit.reason {
            staunch_vmm::handover::leave(pid);
        }
        if exit.reason != StopReason::ColdReboot {
            break exit;
        }
        let t = std::time::Instant::now();
        vm = RunningVm::reboot(&cfg)?;
        staunch_vmm::events::emit(
            cfg.events.as_deref(),
            "cold-reboot",
            serde_json::json!({"rebuild_ms": t.elapsed().as_secs_f64() * 1e3, "outcome": "guest state discarded"}),
        );
    };
    // Why this VM ended, for whoever supervises it (a death without this
    // event was uncatchable: SIGKILL, OOM).
    let reason = match exit.reason {
        StopReason::PowerOff(_) => "poweroff",
        StopReason::Reset => "reset",
        StopReason::Requested => "requested",
        _ => "error",
    };
    staunch_vmm::events::emit(
        events.as_deref(),
        "vm-exit",
        serde_json::json!({"reason": reason, "detail": format!("{:?}", exit.reason)}),
    );
    let first = exit.first_output.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3)).unwrap_or_else(|| "never".into());
    let summary =
        format!("first serial output after {first}, ran {:.2} s, {} exits", exit.runtime.as_secs_f64(), exit.exits);
    match exit.reason {
        StopReason::PowerOff(code) => {
            eprintln!("staunch: guest powered off with exit code {code}; {summary}");
            Ok(0)
        }
        StopReason::Reset => {
            eprintln!("staunch: guest requested a reset; {summary}");
            Ok(0)
        }
        StopReason::Requested => {
            eprintln!("staunch: VM stopped on request (saved, or stopped over the control socket); {summary}");
            Ok(0)
        }
        other => {
            eprintln!("staunch: VM stopped: {other:?}; {summary}");
            Ok(1)
        }
    }
}

/// An image exec'd from a signal handler starts with that handler's mask
/// (everything blocked), and signals still pending for the old image (a vCPU
/// kick, a park request) would now find their default action: terminate.
/// Discard those, then unblock before any thread inherits the mask.
fn unblock_all_signals() {
    // SAFETY: signal(2) to SIG_IGN drops pending instances of our own
    // real-time signals; the VMM installs its handlers later. Then
    // sigemptyset + pthread_sigmask on a local set.
    unsafe {
        for s in [libc::SIGRTMIN(), libc::SIGRTMIN() + 1] {
            libc::signal(s, libc::SIG_IGN);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn main() {
    unblock_all_signals();
    let cli = Cli::parse();
    init_logging(cli.log_json);
    if let Err(e) = staunch_fault::from_env() {
        eprintln!("staunch: error: STAUNCH_FAILPOINTS: {e}");
        std::process::exit(2);
    }
    let res = match cli.cmd {
        Cmd::Vmm { cmd: VmmCmd::Run(a) } => vmm_run(*a),
        Cmd::Vmm { cmd: VmmCmd::Resume { preserved_fd, events } } => vmm_resume(preserved_fd, events),
        Cmd::Vmm { cmd: VmmCmd::Standby { handover_fd } } => {
            // SAFETY: our predecessor passed this inherited socket's number.
            let link = unsafe { staunch_vmm::handover::Link::from_fd(handover_fd) };
            match RunningVm::standby(&link) {
                Ok(vm) => serve(vm),
                // A successor that never took the VM over is not the VM: its
                // exit must not become the VM's status at the keeper (a spare
                // aborted as the guest powers off would otherwise report its
                // own "closed link" as the VM's exit).
                Err(e) => {
                    if !matches!(&e, staunch_vmm::VmmError::Handover(staunch_vmm::handover::HandoverError::Closed)) {
                        eprintln!("staunch: standby successor: {e}");
                    }
                    Ok(staunch_vmm::handover::HANDED_OVER_EXIT)
                }
            }
        }
        Cmd::Vmm { cmd: VmmCmd::Keep } => Ok(staunch_vmm::handover::keep()),
        Cmd::Vm { store, cmd: VmCmd::Host(verb), .. } => {
            let store = store.or_else(|| std::env::var_os("STAUNCH_STORE").map(PathBuf::from));
            hostcli::vm_store(&store.unwrap_or_else(|| "/run/staunch/store.sock".into()), verb)
        }
        Cmd::Vm { socket: Some(socket), cmd, .. } => vm_control(&socket, cmd),
        Cmd::Vm { socket: None, .. } => Err(anyhow::anyhow!("this verb needs the VM's control socket: --socket PATH")),
        Cmd::Host(a) => hostcli::host(a),
        Cmd::Vmm { cmd: VmmCmd::Restore { from } } => {
            RunningVm::restore_snapshot(&from).map_err(anyhow::Error::from).and_then(serve)
        }
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Campaign(a) => campaign::run(a),
        Cmd::Store(a) => store(a),
        Cmd::Api(a) => staunch_api::run(staunch_api::Options {
            config: a.config,
            socket: a.socket,
            listen: a.listen,
            token_file: a.token_file,
        })
        .map(|()| 0)
        .map_err(anyhow::Error::from),
        Cmd::Blk(a) => backends::blk(a),
        Cmd::Net(a) => backends::net(a),
        Cmd::NetPeer(a) => netpeer::run(a).map(|()| 0),
        Cmd::Testguest { dir } => staunch_testguest::install(&dir)
            .with_context(|| format!("writing the test guest to {}", dir.display()))
            .map(|p| {
                println!("{}", p.display());
                0
            }),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("staunch: error: {e:#}");
            std::process::exit(1);
        }
    }
}
