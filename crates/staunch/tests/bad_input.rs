//! Bad input gets a clear error and a non-zero exit, never a panic.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn fails_with(args: &[&str], env: Option<(&str, &str)>, needle: &str) {
    let mut c = staunch();
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let r = run(&mut c, None, T);
    assert_ne!(r.status, 0, "expected failure for {args:?}");
    assert!(!r.stderr.contains("panicked"), "panic for {args:?}: {}", r.stderr);
    assert!(r.stderr.contains(needle), "for {args:?} expected {needle:?} in:\n{}", r.stderr);
}

#[test]
fn missing_kvm_device() {
    let d = tmpdir("nokvm");
    let g = guest(&d);
    let g = g.to_str().unwrap();
    fails_with(
        &["vmm", "run", "--kernel", g],
        Some(("STAUNCH_KVM_DEVICE", "/nonexistent/kvm")),
        "cannot open /nonexistent/kvm",
    );
}

#[test]
fn kernel_not_a_kernel() {
    let d = tmpdir("notkernel");
    let k = d.join("kernel.txt");
    std::fs::write(&k, "just some text, definitely not a kernel").unwrap();
    fails_with(&["vmm", "run", "--kernel", k.to_str().unwrap()], None, "is not a kernel image");
    fails_with(&["vmm", "run", "--kernel", "/nonexistent/vmlinux"], None, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn missing_disk() {
    let d = tmpdir("nodisk");
    let g = guest(&d);
    fails_with(
        &["vmm", "run", "--kernel", g.to_str().unwrap(), "--disk", "/nonexistent/disk.img"],
        None,
        "disk /nonexistent/disk.img",
    );
}

#[test]
fn memory_too_small_for_image() {
    // The test guest, relinked (by patching its program header) to load at
    // 32 MiB, cannot fit in a 16 MiB guest.
    let d = tmpdir("small");
    let mut elf = staunch_testguest::IMAGE.to_vec();
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
    for i in 0..phnum {
        let ph = phoff + i * 56;
        if u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1 {
            for field in [16, 24] {
                elf[ph + field..ph + field + 8].copy_from_slice(&(32u64 << 20).to_le_bytes());
            }
        }
    }
    let k = d.join("high.elf");
    std::fs::write(&k, elf).unwrap();
    fails_with(
        &["vmm", "run", "--kernel", k.to_str().unwrap(), "--mem", "16"],
        None,
        "guest memory (16 MiB) is too small",
    );
}

#[test]
fn bad_options() {
    let d = tmpdir("opts");
    let g = guest(&d);
    let g = g.to_str().unwrap();
    fails_with(&["vmm", "run", "--kernel", g, "--vcpus", "0"], None, "--vcpus 0: must be between 1 and");
    fails_with(&["vmm", "run", "--kernel", g, "--mem", "1"], None, "--mem 1 MiB: must be between");
    fails_with(&["vmm", "run", "--kernel", g, "--disk", ",ro"], None, "invalid disk spec ',ro'");
    fails_with(&["vmm", "run", "--kernel", g, "--serial", "tcp:1"], None, "invalid serial spec 'tcp:1'");
    fails_with(&["vmm", "run", "--kernel", g, "--mem", "lots"], None, "invalid value 'lots'");
    fails_with(&["vmm", "run"], None, "no kernel given");
    fails_with(&["vmm", "run", "--kernel", g, "--net", "/run/n.sock"], None, "invalid net spec '/run/n.sock'");
    fails_with(
        &["vmm", "run", "--kernel", g, "--net", "vhost-user=/run/n.sock,mac=01:00:5e:00:00:01"],
        None,
        "invalid MAC address '01:00:5e:00:00:01'",
    );
    fails_with(&["net-peer", "--iface", "nonexistent0", "--echo"], None, "interface nonexistent0");
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "kernel = \"x\"\nmemory = 5\n").unwrap();
    fails_with(&["vmm", "run", "--config", cfg.to_str().unwrap()], None, "unknown field `memory`");
    fails_with(&["vmm", "run", "--config", "/nonexistent.toml"], None, "cannot read config file /nonexistent.toml");
}
