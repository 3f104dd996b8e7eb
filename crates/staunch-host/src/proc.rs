//! Processes the supervisor watches: pidfds (a death is a readable fd, no
//! polling), identities that a recycled pid cannot fake (pid plus start
//! time), and components started detached so that nothing of theirs
//! depends on the supervisor staying alive.

use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A process as the supervisor knows it: its pid and its start time (clock
/// ticks since boot, /proc/PID/stat field 22), which differ for any later
/// process that gets the same pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub pid: u32,
    pub start: u64,
}

pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How long process `pid` has run (its start time against the system's
/// uptime, both in clock ticks since boot).
pub fn age(pid: u32) -> Option<std::time::Duration> {
    let start = start_time(pid)?;
    let up: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(std::time::Duration::from_secs_f64((up - start as f64 / hz).max(0.0)))
}

/// Stopped by a signal (SIGSTOP, SIGTSTP) or a tracer: it cannot answer
/// until continued.
pub fn stopped(pid: u32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next());
    matches!(state, Some("T" | "t"))
}

pub fn identity(pid: u32) -> Option<Identity> {
    Some(Identity { pid, start: start_time(pid)? })
}

/// A pidfd on `id`, only if the process with that pid is still the same
/// one (checked after the pidfd is open, so it cannot change under us).
pub fn open(id: Identity) -> Option<OwnedFd> {
    let fd = pidfd_open(id.pid).ok()?;
    (start_time(id.pid) == Some(id.start) && alive(&fd)).then_some(fd)
}

/// SIGKILL the process a pidfd refers to (nothing if it is gone: a pidfd
/// never reaches another process).
pub fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) with a pidfd we own and no siginfo.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0) };
}

pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd is readable once its process has exited.
pub fn alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Start `cmd` detached: its own session and process group (a signal to
/// the supervisor's group or terminal does not reach it), no death signal
/// tied to the supervisor, stdio to `log`.
pub fn spawn(mut cmd: Command, log: &std::path::Path) -> std::io::Result<Identity> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // The child is reaped by `reap`, with every other child.
    drop(child);
    for _ in 0..100 {
        if let Some(id) = identity(pid) {
            return Ok(id);
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Err(std::io::Error::other(format!("process {pid} vanished at start")))
}

/// Reap every exited child (ours, and orphans we inherit as subreaper).
pub fn reap() {
    // SAFETY: waitpid(2) with WNOHANG on any child; status unused.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// Orphaned descendants of components (a backend's spare whose parent
/// died) are reparented to us rather than to init, and reaped by `reap`.
pub fn become_subreaper() {
    // SAFETY: prctl(2) with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// Pid 0 (never started) and 1 are never signalled: kill(0) and killpg(0)
/// mean "our own group".
fn real(pid: u32) -> bool {
    pid > 1 && pid != std::process::id()
}

pub fn signal(pid: u32, sig: i32) {
    if !real(pid) {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Every process of a component: it was started as its own session and
/// group leader, and its spares and successors stay in that group, also
/// after the leader died. Linux does not give a pid to a new process while
/// a group of that id lives, so a leader's pid held by a process with
/// another start time means the group is gone: nothing to kill.
pub fn kill_group(leader: Identity) {
    if !real(leader.pid) || start_time(leader.pid).is_some_and(|s| s != leader.start) {
        return;
    }
    // SAFETY: killpg(2) has no memory-safety preconditions.
    unsafe { libc::killpg(leader.pid as i32, libc::SIGKILL) };
}

/// The pids of a process group that are alive, from /proc.
pub fn group_alive(leader: u32) -> bool {
    let Ok(d) = std::fs::read_dir("/proc") else { return false };
    d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).any(|pid| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(i) = s.rfind(')') else { return false };
        let f: Vec<&str> = s[i + 1..].split_whitespace().collect();
        // state (3), ppid (4), pgrp (5); zombies do not count.
        f.len() > 3 && f[0] != "Z" && f[2].parse::<u32>().ok() == Some(leader)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_detects_death_and_refuses_other_start_times() {
        let dir = std::env::temp_dir().join(format!("staunch-host-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Command::new("sleep");
        c.arg("30");
        let id = spawn(c, &dir.join("log")).unwrap();
        let fd = open(id).expect("a live process opens");
        assert!(alive(&fd));
        assert!(open(Identity { start: id.start + 1, ..id }).is_none(), "another start time is another process");
        kill_group(id);
        let t = std::time::Instant::now();
        while alive(&fd) {
            assert!(t.elapsed().as_secs() < 5);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        reap();
        assert!(open(id).is_none());
        assert!(!group_alive(id.pid));
        let _ = std::fs::remove_dir_all(dir);
    }
}
