//! A benchmark is measured on an idle machine (docs/DESIGN "Evidence": no
//! other guest of ours running, peers included). Before a benchmark starts,
//! [`Machine::check`] looks for every other process of the project (VMMs and
//! their spares, successors and keepers, config stores, QEMU,
//! qemu-storage-daemon, etcd) and refuses to start while one runs, unless
//! told to measure anyway: then every table says MEASURED ON A BUSY MACHINE.
//! Between the phases of a benchmark, [`Machine::settle`] ends whatever the
//! benchmark itself left behind, so no VM of one kind runs while the other
//! is measured, and looks again for newcomers.

use anyhow::{bail, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One process, as /proc shows it.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub argv: Vec<String>,
    zombie: bool,
}

impl Proc {
    fn command_line(&self) -> String {
        let s = if self.argv.is_empty() { format!("[{}]", self.comm) } else { self.argv.join(" ") };
        if s.chars().count() > 160 {
            format!("{}...", s.chars().take(160).collect::<String>())
        } else {
            s
        }
    }
}

fn read_proc(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may itself hold spaces or parentheses.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 2..)?.split(' ');
    let state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut argv: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if argv.last().is_some_and(|a| a.is_empty()) {
        argv.pop();
    }
    Some(Proc { pid, ppid, comm, argv, zombie: state == "Z" || state == "X" })
}

/// Every process on the machine.
pub fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter_map(read_proc).collect()
}

/// What `p` is, if it belongs to the project or is one of its peers. A
/// Staunch process that re-executed itself through /proc/self/exe (a spare,
/// a successor, a keeper) is named `exe`, its command line `/proc/self/exe
/// vmm ...`; the kernel cuts names to 15 characters (`qemu-system-x86`).
pub fn kind(comm: &str, argv: &[String]) -> Option<&'static str> {
    let arg0 = argv.first().map(String::as_str).unwrap_or("");
    let base = arg0.rsplit('/').next().unwrap_or("");
    let staunch = base == "staunch" || comm == "staunch" || arg0 == "/proc/self/exe" || comm == "exe";
    if staunch {
        match argv.get(1).map(String::as_str) {
            Some("vmm") => return Some("Staunch VMM (or its spare, successor or keeper)"),
            Some("store") => return Some("Staunch config store"),
            Some("blk") => return Some("Staunch blk backend (or its spare)"),
            Some("bench") => return Some("another Staunch benchmark"),
            Some("demo") => return Some("Staunch demo"),
            Some("campaign") => return Some("Staunch fault campaign"),
            _ => {}
        }
    }
    if base.starts_with("qemu-system-") || comm.starts_with("qemu-system-") {
        return Some("QEMU");
    }
    if base == "qemu-storage-daemon" || comm == "qemu-storage-da" {
        return Some("qemu-storage-daemon");
    }
    if base == "etcd" || comm == "etcd" {
        return Some("etcd");
    }
    None
}

/// `root` and every process below it, parents before children.
fn family(all: &[Proc], root: i32) -> Vec<i32> {
    let mut kids: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in all {
        kids.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(k) = kids.get(&out[i]) {
            out.extend(k.iter().copied().filter(|c| *c != root));
        }
        i += 1;
    }
    out
}

/// Live processes of the project that are neither this process nor below it.
pub fn others(all: &[Proc]) -> Vec<(Proc, &'static str)> {
    let ours: BTreeSet<i32> = family(all, std::process::id() as i32).into_iter().collect();
    all.iter()
        .filter(|p| !p.zombie && !ours.contains(&p.pid))
        .filter_map(|p| kind(&p.comm, &p.argv).map(|k| (p.clone(), k)))
        .collect()
}

/// A readable list of `found`, grouped into families (a process whose
/// parent is also listed belongs to its parent's family), each with the
/// command that stops exactly that family by its pids.
pub fn describe(all: &[Proc], found: &[(Proc, &'static str)]) -> String {
    let listed: BTreeSet<i32> = found.iter().map(|(p, _)| p.pid).collect();
    let by_pid: HashMap<i32, &Proc> = all.iter().map(|p| (p.pid, p)).collect();
    let mut roots = BTreeSet::new();
    for (p, _) in found {
        let mut r = p;
        while let Some(parent) = by_pid.get(&r.ppid).filter(|q| listed.contains(&q.pid)) {
            r = parent;
        }
        roots.insert(r.pid);
    }
    let mut s = String::new();
    for root in roots {
        let fam = family(all, root);
        let Some(top) = by_pid.get(&root) else { continue };
        let started_by = match by_pid.get(&top.ppid) {
            Some(q) if q.pid == 1 => {
                format!("orphaned (its parent is pid 1, {}): nothing will end it on its own", q.comm)
            }
            Some(q) => format!("started by pid {} ({})", q.pid, q.command_line()),
            None => format!("parent pid {}", top.ppid),
        };
        s.push_str(&format!("  family of pid {root}, {started_by}:\n"));
        for pid in &fam {
            let Some(p) = by_pid.get(pid).filter(|p| !p.zombie) else { continue };
            let what = found.iter().find(|(q, _)| q.pid == *pid).map(|(_, k)| *k).unwrap_or("below it");
            s.push_str(&format!("    pid {:>7}  [{what}]  {}\n", p.pid, p.command_line()));
        }
        let order: Vec<String> = fam.iter().rev().map(|p| p.to_string()).collect();
        s.push_str(&format!("    stop it: kill -KILL {}\n", order.join(" ")));
    }
    s
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn load_average() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let f: Vec<&str> = l.split_whitespace().take(3).collect();
    if f.len() == 3 {
        format!("{} {} {}", f[0], f[1], f[2])
    } else {
        "unknown".into()
    }
}

/// The machine a benchmark runs on, as checked when it started.
pub struct Machine {
    load: String,
    cpus: usize,
    /// Why the results are not from an idle machine (empty: they are).
    busy: Mutex<Vec<String>>,
    /// Foreign pids already reported.
    known: Mutex<BTreeSet<i32>>,
}

impl Machine {
    /// Refuse to benchmark beside other processes of the project, unless
    /// `allow_busy` (then warn, and every table will say so).
    pub fn check(allow_busy: bool) -> Result<Machine> {
        // Orphans of our own children (a successor whose VMM ended) are
        // re-parented to us: they stay ours, to find and to end.
        // SAFETY: prctl(2) with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let load = load_average();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let all = scan();
        let found = others(&all);
        let m = Machine {
            load,
            cpus,
            busy: Mutex::new(Vec::new()),
            known: Mutex::new(found.iter().map(|(p, _)| p.pid).collect()),
        };
        eprintln!("machine: load average {} (1, 5, 15 min) at start, {} CPUs", m.load, m.cpus);
        if !found.is_empty() {
            let list = describe(&all, &found);
            if !allow_busy {
                bail!(
                    "the machine is not idle: {} other process(es) of the project or of its peers are running, and a benchmark beside them measures them too.\n{list}Stop each family by its pids as shown (never by name: other people's runs share this machine), or wait until the run that started them ends. To measure anyway, pass --allow-busy: every table will then say MEASURED ON A BUSY MACHINE.",
                    found.len()
                );
            }
            eprintln!();
            eprintln!(
                "!!! WARNING: MEASURING ON A BUSY MACHINE (--allow-busy): these processes run beside the benchmark:"
            );
            eprint!("{list}");
            eprintln!("!!! Every table will say MEASURED ON A BUSY MACHINE; the numbers are not comparable.");
            eprintln!();
            let pids: Vec<String> = found.iter().map(|(p, _)| p.pid.to_string()).collect();
            m.note_busy(format!("--allow-busy, running at start: pids {}", pids.join(" ")));
        }
        Ok(m)
    }

    fn note_busy(&self, why: String) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).push(why);
    }

    pub fn is_busy(&self) -> bool {
        !self.busy.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// End everything this benchmark started that still runs (so the next
    /// phase runs alone), then look for newcomers of the project: one that
    /// appeared during the run marks the results busy. Call it between
    /// phases only, when the benchmark holds no child it means to keep.
    pub fn settle(&self) -> Result<()> {
        let me = std::process::id() as i32;
        let t = Instant::now();
        loop {
            let all = scan();
            let live: Vec<i32> = family(&all, me)
                .into_iter()
                .filter(|p| *p != me)
                .filter(|p| all.iter().any(|q| q.pid == *p && !q.zombie))
                .collect();
            // Reap what we killed (only processes with no owner left in
            // this program are ever our children here).
            for p in all.iter().filter(|p| p.ppid == me && p.zombie) {
                // SAFETY: waitpid(2) of one of our own children, no memory passed.
                unsafe { libc::waitpid(p.pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
            if live.is_empty() {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("processes started by this benchmark do not end: pids {live:?}");
            }
            for p in live.iter().rev() {
                // SAFETY: kill(2) of a process below this one.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let all = scan();
        let found = others(&all);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let new: Vec<(Proc, &'static str)> = found.into_iter().filter(|(p, _)| !known.contains(&p.pid)).collect();
        if !new.is_empty() {
            eprintln!();
            eprintln!("!!! WARNING: other processes of the project started during the benchmark; the results are from a BUSY MACHINE:");
            eprint!("{}", describe(&all, &new));
            eprintln!();
            let pids: Vec<String> = new.iter().map(|(p, _)| p.pid.to_string()).collect();
            known.extend(new.iter().map(|(p, _)| p.pid));
            drop(known);
            self.note_busy(format!("started during the run: pids {}", pids.join(" ")));
        }
        Ok(())
    }

    /// The first header cell of a table: `what`, marked when busy.
    pub fn head(&self, what: &str) -> String {
        if self.is_busy() {
            format!("MEASURED ON A BUSY MACHINE: {what}")
        } else {
            what.to_string()
        }
    }

    /// Print before a table: the busy warning, if any.
    pub fn banner(&self) {
        let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.is_empty() {
            println!("**MEASURED ON A BUSY MACHINE** ({}): other processes of the project ran beside this benchmark; these numbers are not comparable.", busy.join("; "));
            println!();
        }
    }

    /// Print after a table: what the machine was doing when the run began.
    pub fn footer(&self) {
        println!(
            "machine: load average {} (1, 5, 15 min) when the benchmark started, {} CPUs; {}",
            self.load,
            self.cpus,
            if self.is_busy() {
                "MEASURED ON A BUSY MACHINE (see above)"
            } else {
                "no other process of the project or of its peers was running"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn knows_the_project_and_its_peers() {
        assert!(kind("staunch", &argv("target/debug/staunch vmm run --kernel k")).is_some());
        assert!(kind("exe", &argv("/proc/self/exe vmm keep")).is_some());
        assert!(kind("exe", &argv("/proc/self/exe vmm standby --handover-fd 7")).is_some());
        assert!(kind("staunch", &argv("/usr/bin/staunch store --socket s")).is_some());
        assert!(kind("qemu-system-x86", &argv("/x/usr/bin/qemu-system-x86_64 -accel kvm")).is_some());
        assert!(kind("qemu-storage-da", &argv("qemu-storage-daemon --blockdev x")).is_some());
        assert!(kind("etcd", &argv("/x/etcd --data-dir d")).is_some());
        // Not ours: a control client, runc's re-exec, a shell naming us.
        assert!(kind("staunch", &argv("staunch vm --socket s status")).is_none());
        assert!(kind("exe", &argv("/proc/self/exe init")).is_none());
        assert!(kind("bash", &argv("bash -c staunch vmm run")).is_none());
        assert!(kind("kworker/0:1", &[]).is_none());
    }

    #[test]
    fn this_process_and_its_children_are_not_others() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let all = scan();
        let me = std::process::id() as i32;
        let fam = family(&all, me);
        assert!(fam.contains(&(child.id() as i32)), "{fam:?}");
        assert!(others(&all).iter().all(|(p, _)| p.pid != me && p.pid != child.id() as i32));
        let _ = child.kill();
        let _ = child.wait();
    }
}
