//! Pause and resume a running VM from another thread.

use staunch_kvm::{StopReason, VcpuState};
use staunch_vmm::{RunningVm, SerialConfig, VmConfig};
use std::time::{Duration, Instant};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ticks(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().matches("STAUNCH counter=").count()
}

#[test]
fn kvm_pause_stops_progress_and_resume_continues() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "needs /dev/kvm (scripts/test.sh skips kvm_ tests without it)");
    let dir = std::env::temp_dir().join(format!("staunch-pause-{}", std::process::id()));
    let g = staunch_testguest::install(&dir).unwrap();
    let log = dir.join("serial.log");
    let mut cfg = VmConfig::new(&g);
    cfg.vcpus = 2;
    cfg.cmdline = "staunch.work=counter staunch.chunk=256K".into();
    cfg.serial = SerialConfig::File(log.clone());
    let vm = RunningVm::start(&cfg).unwrap();
    wait_for("two ticks", || ticks(&log) >= 2);
    // How long the guest takes for two ticks on this machine, now: the
    // window below is sized by the guest's own pace, not by a constant.
    let n = ticks(&log);
    let t = Instant::now();
    wait_for("two more ticks", || ticks(&log) >= n + 2);
    let two_ticks = t.elapsed();
    vm.pause();
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Paused), "{:?}", vm.vcpu_states());
    let frozen = ticks(&log);
    // Twice as long as the guest just needed for two ticks: a running guest
    // would have printed about four.
    std::thread::sleep(two_ticks * 2);
    assert_eq!(ticks(&log), frozen, "guest made progress while paused");
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Paused), "{:?}", vm.vcpu_states());
    vm.resume();
    wait_for("progress after resume", || ticks(&log) >= frozen + 2);
    let exit = vm.stop();
    assert_eq!(exit.reason, StopReason::Requested);
    let text = std::fs::read_to_string(&log).unwrap();
    // The VM was stopped mid-line: judge complete lines only.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let values: Vec<u64> = complete
        .lines()
        .filter_map(|l| staunch_testguest::proto::field(l.trim_end(), "counter"))
        .map(|v| v.parse().unwrap())
        .collect();
    // The counter continued from where it stopped: each tick exactly one
    // chunk (256K) on from the one before, across the pause.
    assert!(values.len() > frozen, "{values:?}");
    assert!(values.windows(2).all(|w| w[1] == w[0] + (256 << 10)), "counter skipped or went back: {values:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
