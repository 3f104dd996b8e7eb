//! A stock Debian cloud kernel (fetched by scripts/assets.sh) boots under
//! `staunch vmm run` and its banner arrives through Staunch's serial port.
//! On KVM-PVM hosts guest kernel code is emulated, so the kernel gets no
//! further than its early boot; the banner is what is checked.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn kernel() -> PathBuf {
    let p = std::env::var_os("STAUNCH_LINUX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/linux/vmlinuz"));
    // The ELF vmlinux sits beside the bzImage (extracted by the asset script).
    let elf = p.with_file_name("vmlinux");
    assert!(elf.exists(), "{} is missing: run scripts/assets.sh linux (scripts/test.sh does)", elf.display());
    elf
}

/// Start `staunch vmm run` with `args` and stream its serial lines.
fn boot(args: &mut std::process::Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child =
        args.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn staunch");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Lines until one contains `needle` (returned) or `within` runs out.
fn until(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
    seen: &mut Vec<String>,
) -> Option<String> {
    let start = Instant::now();
    loop {
        match rx.recv_timeout(within.saturating_sub(start.elapsed())) {
            Ok(l) if l.contains(needle) => return Some(l),
            Ok(l) => seen.push(l),
            Err(_) => return None,
        }
    }
}

#[test]
fn kvm_linux_banner_on_serial() {
    require_kvm();
    let k = kernel();
    let dir = tmpdir("linux");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (mut child, rx) = boot(
        staunch()
            .args(["vmm", "run", "--mem", "512", "--vcpus", "2", "--kernel"])
            .arg(&k)
            .arg("--disk")
            .arg(&disk)
            .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1"]),
    );
    let mut seen = Vec::new();
    let banner = until(&rx, "Linux version", Duration::from_secs(120), &mut seen);
    let cmdline = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    // ACPI: the tables are found and the MADT announces both vCPUs.
    let mut acpi = Vec::new();
    let smp = until(&rx, "smpboot: Allowing", Duration::from_secs(180), &mut acpi);
    let _ = child.kill();
    let _ = child.wait();
    let banner = banner.unwrap_or_else(|| panic!("no Linux banner within 120 s; serial so far: {seen:?}"));
    assert!(banner.contains("cloud-amd64"), "{banner}");
    assert!(cmdline.contains("Command line: console=ttyS0"), "{cmdline}");
    assert!(cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"), "{cmdline}");
    for table in ["ACPI: RSDP", "ACPI: XSDT", "ACPI: FACP", "ACPI: DSDT", "ACPI: APIC"] {
        assert!(acpi.iter().any(|l| l.contains(table)), "no {table} in {acpi:?}");
    }
    let smp = smp.unwrap_or_else(|| panic!("no smpboot line; serial: {acpi:?}"));
    assert!(smp.contains("Allowing 2 CPUs"), "{smp}");
}

/// The same kernel as Debian ships it, a bzImage: Staunch enters its 64-bit
/// entry and the decompressor runs (for minutes where ring 0 is emulated).
#[test]
fn kvm_linux_bzimage_banner_on_serial() {
    require_kvm();
    let bz = kernel().with_file_name("vmlinuz");
    let (mut child, rx) = boot(
        staunch()
            .args(["vmm", "run", "--mem", "512", "--kernel"])
            .arg(&bz)
            .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1"]),
    );
    let banner = until(&rx, "Linux version", Duration::from_secs(600), &mut Vec::new());
    let _ = child.kill();
    let _ = child.wait();
    let banner = banner.expect("no Linux banner from the bzImage within 600 s");
    assert!(banner.contains("6.1.0-47-cloud-amd64"), "{banner}");
}
