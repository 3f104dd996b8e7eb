//! vCPU setup and the vCPU thread's state machine.
//!
//! States: Created -> Running <-> Paused -> Stopped. Another thread asks for
//! a transition by setting `requested` and kicking the vCPU out of KVM_RUN
//! (immediate_exit in the shared kvm_run page, then a signal in case the
//! thread is already inside the guest).

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_run, kvm_segment, Msrs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use staunch_boot::{CpuBootState, Segment};
use std::sync::atomic::{compiler_fence, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what} failed: {err}")]
    Setup { index: u8, what: &'static str, err: kvm_ioctls::Error },
    #[error("vCPU {0}: cannot install the kick signal handler: {1}")]
    Signal(u8, String),
}

/// Why a vCPU (and with it the VM) stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit code to the power port.
    PowerOff(u8),
    /// The guest asked for a reset (i8042 or KVM system event).
    Reset,
    /// Triple fault.
    TripleFault,
    /// The VMM asked this vCPU to stop.
    Requested,
    /// The VMM stops the VM to boot it again from scratch.
    ColdReboot,
    /// KVM reported something the VMM cannot continue from.
    Error(String),
    /// The VM now runs in a successor process (this pid); this process's
    /// copy is paused for good.
    HandedOver(u32),
}

/// Decoded exits, answered by the VMM's device buses.
pub trait ExitHandler: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<StopReason>;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<StopReason>;
    /// A fault was contained on the vCPU thread (rung 1: microreset).
    fn contained(&self, _component: &'static str, _fault: String, _latency: std::time::Duration) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Created,
    Running,
    Paused,
    Stopped,
}

const REQ_RUN: u8 = 0;
const REQ_PAUSE: u8 = 1;
const REQ_STOP: u8 = 2;

type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Shared between a vCPU thread and whoever controls it.
pub struct VcpuControl {
    pub index: u8,
    jobs: Mutex<Vec<Job>>,
    requested: AtomicU8,
    state: Mutex<VcpuState>,
    changed: Condvar,
    run_page: AtomicPtr<kvm_run>,
    thread: AtomicU64,
    /// Exits handled so far: a progress counter for watchdogs and benchmarks.
    pub exits: AtomicU64,
    /// Panics contained in this vCPU's loop.
    pub microresets: AtomicU64,
    /// Set while the vCPU thread is serving an exit (the watchdog's view).
    pub busy: std::sync::atomic::AtomicBool,
    /// The kernel thread id, for signals from a watchdog or crash path.
    pub tid: std::sync::atomic::AtomicI32,
    /// KVM_RUN calls so far (counted before each call) and the last whose
    /// exit was fully served: the crash path tells from them, and from the
    /// exit KVM left in the run page, whether an exit is outstanding.
    runs: AtomicU64,
    served: AtomicU64,
    /// Where the thread is between two guest entries (see `Phase`).
    phase: AtomicU8,
    /// A park signal came while entering KVM_RUN; the thread parks as soon
    /// as the call returns.
    park_requested: std::sync::atomic::AtomicBool,
    /// A write exit the crash path found outstanding (set in the handler).
    pending: Mutex<Option<PendingWrite>>,
}

/// The vCPU thread's phase, for the crash path. `Entering` is the one
/// moment it cannot read: KVM_RUN may or may not have returned a new exit
/// yet, so a park there is deferred to right after the call returns.
const PHASE_SERVED: u8 = 0;
const PHASE_ENTERING: u8 = 1;
const PHASE_SERVING: u8 = 2;

/// What [`park_current_thread`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Not a vCPU thread: the caller parks it itself.
    NotVcpu,
    /// The thread was entering KVM_RUN: return from the signal handler; it
    /// parks when the call returns (which it does at once).
    Deferred,
}

/// A guest write (port I/O `out` or MMIO store) whose exit a crash caught
/// before its handler had finished. The crash path completes the exit in
/// KVM, so the guest is past the instruction on every KVM flavour (some
/// report the instruction pointer at the instruction until the exit
/// completes, some past it), and the successor replays the write to the
/// device. `stamp` names the exit: a device with side effects outside the
/// VM (the UART's console) records the stamp of what it did, and skips a
/// replay of something it already did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingWrite {
    pub vcpu: u8,
    pub stamp: u64,
    pub mmio: bool,
    pub addr: u64,
    pub len: u8,
    pub data: [u8; 8],
}

/// The stamp of exit number `run` of vCPU `index`: 56 bits (a device may
/// keep a byte beside it in a u64), never 0 (runs count from 1).
fn stamp(index: u8, run: u64) -> u64 {
    ((index as u64) << 48) | (run & ((1 << 48) - 1))
}

thread_local! {
    static STAMP: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The stamp of the exit this thread is serving (0 outside a vCPU thread).
pub fn current_stamp() -> u64 {
    STAMP.with(|s| s.get())
}

fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.to_string());
    });
    res
}

impl VcpuControl {
    pub fn new(index: u8) -> Arc<Self> {
        Self::continuing(index, 0)
    }

    /// A vCPU whose exits continue the count of a predecessor's: stamps are
    /// unique across every process that ran this VM, so a device never takes
    /// a new exit for one it already served before a crash.
    pub fn continuing(index: u8, runs: u64) -> Arc<Self> {
        Arc::new(VcpuControl {
            index,
            jobs: Mutex::new(Vec::new()),
            requested: AtomicU8::new(REQ_RUN),
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            run_page: AtomicPtr::new(std::ptr::null_mut()),
            thread: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            microresets: AtomicU64::new(0),
            busy: std::sync::atomic::AtomicBool::new(false),
            tid: std::sync::atomic::AtomicI32::new(0),
            runs: AtomicU64::new(runs),
            served: AtomicU64::new(runs),
            phase: AtomicU8::new(PHASE_SERVED),
            park_requested: std::sync::atomic::AtomicBool::new(false),
            pending: Mutex::new(None),
        })
    }

    /// The write exit a crash caught on this vCPU before its handler was
    /// done, if any (completed in KVM by the crash path, not by a device).
    pub fn pending_write(&self) -> Option<PendingWrite> {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// KVM_RUN calls so far, to be continued by a successor.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Acquire)
    }

    // The phase, `runs` and `served` are written by the vCPU thread alone
    // and read by the crash path on that same thread (a signal handler) or,
    // once the thread is parked, by the rescuer (which synchronizes through
    // the job queue). So plain release stores and compiler fences keep the
    // order the handler needs, without a locked instruction per exit.

    /// A KVM_RUN is about to be made.
    fn enter(&self) {
        self.phase.store(PHASE_ENTERING, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
    }

    /// KVM_RUN returned: its exit (if any) is served under a new stamp. A
    /// park deferred while entering happens here, where the state is clear.
    fn returned(&self) {
        compiler_fence(Ordering::SeqCst);
        let n = self.runs.load(Ordering::Relaxed) + 1;
        self.runs.store(n, Ordering::Release);
        STAMP.with(|s| s.set(stamp(self.index, n)));
        compiler_fence(Ordering::SeqCst);
        self.phase.store(PHASE_SERVING, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        if self.park_requested.load(Ordering::Acquire) {
            park_current_thread();
        }
    }

    fn exit_served(&self) {
        compiler_fence(Ordering::SeqCst);
        self.served.store(self.runs.load(Ordering::Relaxed), Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        self.phase.store(PHASE_SERVED, Ordering::Release);
    }

    pub fn state(&self) -> VcpuState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: VcpuState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.changed.notify_all();
    }

    fn kick(&self) {
        let p = self.run_page.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: the kvm_run page stays mapped while the vCPU fd lives;
            // the pointer is cleared before the thread drops the fd. A byte
            // store is what KVM expects from another thread here.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: t is the vCPU thread's id; a pthread_t stays valid until the
            // thread is joined, and the VMM joins only after its last kick.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }

    /// Like [`pause`](Self::pause) but gives up after `timeout` (a vCPU
    /// stuck in a handler never pauses by itself). True if it paused.
    pub fn pause_timeout(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        self.requested.store(REQ_PAUSE, Ordering::SeqCst);
        self.kick();
        loop {
            match self.state() {
                VcpuState::Paused | VcpuState::Stopped => return true,
                _ if std::time::Instant::now() > deadline => return false,
                _ => {
                    self.kick();
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }

    /// Ask the vCPU to pause and wait until it has left the guest.
    pub fn pause(&self) {
        self.requested.store(REQ_PAUSE, Ordering::SeqCst);
        self.kick();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while *s == VcpuState::Running || *s == VcpuState::Created {
            let (g, _) =
                self.changed.wait_timeout(s, std::time::Duration::from_millis(5)).unwrap_or_else(|p| p.into_inner());
            s = g;
            if *s == VcpuState::Running {
                drop(s);
                self.kick();
                s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    pub fn resume(&self) {
        self.requested.store(REQ_RUN, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn stop(&self) {
        self.requested.store(REQ_STOP, Ordering::SeqCst);
        self.changed.notify_all();
        self.kick();
    }

    /// Run `f` on the vCPU thread with its fd, while the vCPU is paused (the
    /// only time its state is stable). Returns None if the vCPU is not paused
    /// or stops before running the job.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static) -> Option<R> {
        if self.state() != VcpuState::Paused {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(move |fd| {
            let _ = tx.send(f(fd));
        }));
        self.changed.notify_all();
        rx.recv().ok()
    }

    fn take_jobs(&self) -> Vec<Job> {
        std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn wait_while_paused(&self, fd: &mut VcpuFd) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = VcpuState::Paused;
        self.changed.notify_all();
        loop {
            drop(s);
            for job in self.take_jobs() {
                job(fd);
            }
            s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if self.requested.load(Ordering::SeqCst) != REQ_PAUSE {
                break;
            }
            if self.jobs.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
        drop(s);
        // Jobs queued as the pause ended still get an answer (a None).
        drop(self.take_jobs());
    }
}

fn seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: 0,
        unusable: (!s.present) as u8,
        padding: 0,
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Put a vCPU in long mode at the boot entry (BSP, or an AP of an image that
/// asked for direct SMP start), or leave an AP waiting for INIT/SIPI.
pub fn configure(fd: &VcpuFd, index: u8, boot: &CpuBootState, start_now: bool) -> Result<(), VcpuError> {
    let err = |what| move |err| VcpuError::Setup { index, what, err };
    // LAPIC: LINT0 as ExtINT (the PIC), LINT1 as NMI, as a PC wires them.
    let mut lapic = fd.get_lapic().map_err(err("get LAPIC"))?;
    let reg = |l: &kvm_bindings::kvm_lapic_state, off: usize| {
        u32::from_le_bytes([l.regs[off] as u8, l.regs[off + 1] as u8, l.regs[off + 2] as u8, l.regs[off + 3] as u8])
    };
    let set = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as libc::c_char;
        }
    };
    const LINT0: usize = 0x350;
    const LINT1: usize = 0x360;
    let v = reg(&lapic, LINT0);
    set(&mut lapic, LINT0, (v & !0x700) | 0x700);
    let v = reg(&lapic, LINT1);
    set(&mut lapic, LINT1, (v & !0x700) | 0x400);
    fd.set_lapic(&lapic).map_err(err("set LAPIC"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let list: Vec<_> = entries
        .iter()
        .map(|(i, d)| kvm_bindings::kvm_msr_entry { index: *i, data: *d, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| VcpuError::Setup {
        index,
        what: "build MSR list",
        err: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    fd.set_msrs(&msrs).map_err(err("set MSRs"))?;

    if !start_now {
        return Ok(());
    }
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(err("set FPU"))?;
    let regs = kvm_regs {
        rip: boot.rip,
        rsp: boot.rsp,
        rbp: boot.rsp,
        rsi: boot.rsi,
        rdi: boot.rdi,
        rflags: boot.rflags,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err("set registers"))?;
    let mut sregs = fd.get_sregs().map_err(err("get special registers"))?;
    sregs.cs = seg(&boot.code);
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = seg(&boot.data);
    }
    sregs.tr = seg(&boot.tss);
    sregs.gdt.base = boot.gdt.0;
    sregs.gdt.limit = boot.gdt.1;
    sregs.idt.base = boot.idt.0;
    sregs.idt.limit = boot.idt.1;
    sregs.cr0 = boot.cr0;
    sregs.cr3 = boot.cr3;
    sregs.cr4 = boot.cr4;
    sregs.efer = boot.efer;
    fd.set_sregs(&sregs).map_err(err("set special registers"))?;
    if index != 0 {
        fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(err("set MP state"))?;
    }
    Ok(())
}

/// The vCPU thread body: runs until the guest powers off, resets, faults, or
/// the VMM asks it to stop. Returns why.
pub fn run(mut fd: VcpuFd, ctl: &VcpuControl, handler: &dyn ExitHandler) -> StopReason {
    if let Err(e) = install_kick_handler() {
        return StopReason::Error(format!("vCPU {}: kick handler: {e}", ctl.index));
    }
    ctl.run_page.store(fd.get_kvm_run() as *mut kvm_run, Ordering::Release);
    // SAFETY: pthread_self and gettid have no preconditions.
    ctl.thread.store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
    // SAFETY: as above.
    ctl.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    PARK.with(|p| p.set((ctl as *const VcpuControl, &mut fd as *mut VcpuFd)));
    big_signal_stack();
    // Whether Running was announced since the last pause: the state lock is
    // taken on transitions only, not on every exit.
    let mut announced = false;
    let reason = loop {
        match ctl.requested.load(Ordering::SeqCst) {
            REQ_STOP => break StopReason::Requested,
            REQ_PAUSE => {
                // Let KVM finish the instruction whose I/O we just served
                // (an `in` result, an MMIO read) without entering the guest,
                // so the saved state is at an instruction boundary.
                let mut stop = None;
                for _ in 0..64 {
                    fd.set_kvm_immediate_exit(1);
                    ctl.enter();
                    let r = fd.run();
                    ctl.returned();
                    match r {
                        Ok(exit) => {
                            stop = dispatch(exit, handler);
                            ctl.exit_served();
                        }
                        Err(_) => {
                            ctl.exit_served();
                            break;
                        }
                    }
                    if stop.is_some() {
                        break;
                    }
                }
                fd.set_kvm_immediate_exit(0);
                if let Some(r) = stop {
                    break r;
                }
                ctl.wait_while_paused(&mut fd);
                announced = false;
                continue;
            }
            _ => {}
        }
        if !announced {
            ctl.set_state(VcpuState::Running);
            announced = true;
        }
        // Between two guest entries no exit is in flight: a panic here is
        // contained and the loop simply goes on (nothing to reset). The
        // thread counts as busy (watched for hangs) until it enters the guest.
        ctl.busy.store(true, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let region = staunch_fault::ContainedRegion::enter();
        let caught = if staunch_fault::recovery_enabled() {
            std::panic::catch_unwind(|| staunch_fault::hit(&staunch_fault::VCPU_LOOP))
        } else {
            Ok(staunch_fault::hit(&staunch_fault::VCPU_LOOP))
        };
        drop(region);
        let fault = match caught {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(p) => Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        };
        if let Some(f) = fault {
            ctl.microresets.fetch_add(1, Ordering::Relaxed);
            handler.contained("vcpu-loop", f, t.elapsed());
        }
        ctl.busy.store(false, Ordering::Relaxed);
        ctl.enter();
        let r = fd.run();
        ctl.returned();
        let exit = match r {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctl.exit_served();
                fd.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => break StopReason::Error(format!("KVM_RUN: {e}")),
        };
        ctl.exits.fetch_add(1, Ordering::Relaxed);
        ctl.busy.store(true, Ordering::Relaxed);
        let stop = dispatch(exit, handler);
        ctl.exit_served();
        ctl.busy.store(false, Ordering::Relaxed);
        if let Some(r) = stop {
            if let StopReason::Error(msg) = r {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                break StopReason::Error(format!("{msg} at rip {rip:#x}"));
            }
            break r;
        }
    };
    PARK.with(|p| p.set((std::ptr::null(), std::ptr::null_mut())));
    ctl.run_page.store(std::ptr::null_mut(), Ordering::Release);
    ctl.thread.store(0, Ordering::Release);
    ctl.set_state(VcpuState::Stopped);
    reason
}

/// Give this thread a signal stack large enough for the crash path to save
/// its vCPU from inside a fatal-signal handler (a stack overflow included).
pub fn big_signal_stack() {
    const SIZE: usize = 512 * 1024;
    // SAFETY: a fresh anonymous mapping handed to sigaltstack; it is never
    // unmapped (the thread may need it until the process is replaced).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return;
        }
        let st = libc::stack_t { ss_sp: p, ss_flags: 0, ss_size: SIZE };
        libc::sigaltstack(&st, std::ptr::null_mut());
    }
}

thread_local! {
    /// This thread's vCPU while it runs one, for the crash path.
    static PARK: std::cell::Cell<(*const VcpuControl, *mut VcpuFd)> =
        const { std::cell::Cell::new((std::ptr::null(), std::ptr::null_mut())) };
}

/// Called from a fatal-signal (or park-signal) handler: if this thread runs
/// a vCPU, it becomes Paused and serves jobs (state saves) for its vCPU until
/// the process is replaced by exec; never returns then. Returns false on a
/// thread that runs no vCPU.
pub fn park_current_thread() -> Park {
    let (ctl, fd) = PARK.with(|p| p.get());
    if ctl.is_null() || fd.is_null() {
        return Park::NotVcpu;
    }
    // SAFETY: set by `run` on this thread; see below.
    let ctl_ref = unsafe { &*ctl };
    if ctl_ref.phase.load(Ordering::SeqCst) == PHASE_ENTERING && !ctl_ref.park_requested.swap(true, Ordering::SeqCst) {
        // Make the KVM_RUN about to be made (or being made) return at once.
        let p = ctl_ref.run_page.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: the run page stays mapped while the vCPU fd lives.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
        return Park::Deferred;
    }
    // SAFETY: both pointers were set by `run` on this thread and point into
    // its frame, which the signal interrupted and which never resumes: the
    // thread parks here until exec replaces the process.
    let (ctl, fd) = unsafe { (&*ctl, &mut *fd) };
    settle_outstanding_exit(ctl, fd);
    ctl.busy.store(false, Ordering::Relaxed);
    ctl.set_state(VcpuState::Paused);
    loop {
        for job in ctl.take_jobs() {
            job(fd);
        }
        let s = ctl.state.lock().unwrap_or_else(|p| p.into_inner());
        if ctl.jobs.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            let _ = ctl.changed.wait_timeout(s, std::time::Duration::from_millis(50));
        }
    }
}

/// The crash path, on the vCPU's own thread: an exit KVM returned and that
/// no later KVM_RUN completed is outstanding, whatever this thread was doing
/// when the signal came (KVM writes the exit into the run page before the
/// ioctl returns, so there is no window where it is unknown). A write is
/// completed in KVM now and, unless its handler had finished, noted for the
/// successor to replay; a read is completed only if its handler had filled
/// the data (otherwise the guest runs the instruction again where KVM keeps
/// the instruction pointer at it; see docs/recovery.md for the rest).
fn settle_outstanding_exit(ctl: &VcpuControl, fd: &mut VcpuFd) {
    let (runs, served) = (ctl.runs.load(Ordering::Acquire), ctl.served.load(Ordering::Acquire));
    let run = fd.get_kvm_run();
    let (write, read) = match run.exit_reason {
        kvm_bindings::KVM_EXIT_IO => {
            // SAFETY: exit_reason says the union holds the io member.
            let io = unsafe { run.__bindgen_anon_1.io };
            let len = (io.size as usize * io.count as usize).min(8);
            let mut data = [0u8; 8];
            // SAFETY: KVM put `size * count` bytes at `data_offset` inside
            // the mapped run area; we read at most 8 of them.
            unsafe {
                let src = (run as *const kvm_run as *const u8).add(io.data_offset as usize);
                std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), len);
            }
            let w = io.direction == kvm_bindings::KVM_EXIT_IO_OUT as u8;
            let pw = PendingWrite {
                vcpu: ctl.index,
                stamp: stamp(ctl.index, runs),
                mmio: false,
                addr: io.port as u64,
                len: len as u8,
                data,
            };
            (w.then_some(pw), !w)
        }
        kvm_bindings::KVM_EXIT_MMIO => {
            // SAFETY: exit_reason says the union holds the mmio member.
            let m = unsafe { run.__bindgen_anon_1.mmio };
            let len = (m.len as usize).min(8) as u8;
            let pw = PendingWrite {
                vcpu: ctl.index,
                stamp: stamp(ctl.index, runs),
                mmio: true,
                addr: m.phys_addr,
                len,
                data: m.data,
            };
            ((m.is_write != 0).then_some(pw), m.is_write == 0)
        }
        _ => (None, false),
    };
    let done = served == runs;
    if write.is_some() || (read && done) {
        fd.set_kvm_immediate_exit(1);
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
    }
    if !done && write.is_some() {
        *ctl.pending.lock().unwrap_or_else(|p| p.into_inner()) = write;
    }
}

/// Serve one exit; Some(reason) if the VM must stop.
fn dispatch(exit: VcpuExit<'_>, handler: &dyn ExitHandler) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            handler.pio_read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => handler.pio_write(port, data),
        VcpuExit::MmioRead(addr, data) => {
            handler.mmio_read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => handler.mmio_write(addr, data),
        VcpuExit::Hlt | VcpuExit::Intr => None,
        VcpuExit::Shutdown => Some(StopReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff(0),
            k => StopReason::Error(format!("system event {k}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => {
            Some(StopReason::Error(format!("entry failed: reason {reason:#x} on cpu {cpu}")))
        }
        VcpuExit::InternalError => Some(StopReason::Error("KVM internal error (emulation failure)".into())),
        other => Some(StopReason::Error(format!("unhandled exit {other:?}"))),
    }
}
