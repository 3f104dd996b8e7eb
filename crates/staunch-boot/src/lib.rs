//! Guest boot: memory layout, kernel loading (ELF or bzImage), zero page with
//! e820 and command line, and the long-mode CPU state every vCPU starts in.
//!
//! Nothing here knows about KVM: the VMM turns [`CpuBootState`] into registers.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{self, KernelLoader, bzimage::BzImage, elf::Elf};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub mod acpi;
mod elfnote;
pub use elfnote::{ElfInfo, scan_elf};

/// Guest physical layout (the conventional PC one, as Firecracker and QEMU's
/// microvm use, so a Linux kernel finds what it expects).
pub mod layout {
    pub const GDT: u64 = 0x500;
    pub const IDT: u64 = 0x520;
    pub const ZERO_PAGE: u64 = 0x7000;
    pub const BOOT_STACK: u64 = 0x8ff0;
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    pub const CMDLINE: u64 = 0x20000;
    pub const CMDLINE_MAX: usize = 4096;
    pub const EBDA: u64 = 0x9fc00;
    pub const HIMEM: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO hole; RAM above it moves past 4 GiB.
    pub const MMIO_HOLE: u64 = 0xc000_0000;
    pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
    /// Where virtio-mmio devices go, one 4 KiB window each.
    pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
    pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
    /// First IRQ line given to virtio-mmio devices.
    pub const VIRTIO_IRQ_BASE: u32 = 5;
    pub const MIB: u64 = 1 << 20;
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {err}")]
    KernelIo { path: String, err: std::io::Error },
    #[error("cannot read initrd {path}: {err}")]
    InitrdIo { path: String, err: std::io::Error },
    #[error("{path} is not a kernel image: expected an ELF executable or a bzImage")]
    NotKernel { path: String },
    #[error("{0}")]
    BadElf(String),
    #[error("guest memory ({mem_mib} MiB) is too small: {what} needs up to {need_mib} MiB")]
    TooSmall { mem_mib: u64, what: &'static str, need_mib: u64 },
    #[error("kernel load failed: {0}")]
    Load(#[from] loader::Error),
    #[error("command line: {0}")]
    Cmdline(String),
    #[error("writing boot structures to guest memory: {0}")]
    Memory(String),
}

type Result<T> = std::result::Result<T, BootError>;

/// The RAM ranges for a guest of `mem_bytes`: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(layout::MMIO_HOLE);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((layout::MMIO_HOLE_END, mem_bytes - low));
    }
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// What the VMM needs after loading.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub format: KernelFormat,
    pub entry: u64,
    /// The image asked (ELF note "Staunch", type 1) for every vCPU to start at
    /// the 64-bit entry with rdi = its index, instead of waiting for INIT/SIPI.
    pub smp_direct: bool,
}

/// Sniff the format from the magic numbers.
pub fn detect(path: &Path) -> Result<KernelFormat> {
    let kio = |err| BootError::KernelIo { path: path.display().to_string(), err };
    let mut f = File::open(path).map_err(kio)?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut f, &mut head).map_err(kio)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotKernel { path: path.display().to_string() })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Load kernel, initrd and command line, write the zero page and CPU tables.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    devices: &acpi::Devices,
) -> Result<BootInfo> {
    let format = detect(kernel)?;
    let kpath = kernel.display().to_string();
    let kio = |err| BootError::KernelIo { path: kpath.clone(), err };
    let mut f = File::open(kernel).map_err(kio)?;
    let low_end = mem_bytes.min(layout::MMIO_HOLE);
    let mem_mib = mem_bytes / layout::MIB;
    let too_small = |what, need: u64| BootError::TooSmall { mem_mib, what, need_mib: need.div_ceil(layout::MIB) };

    let (entry, smp_direct, hdr) = match format {
        KernelFormat::Elf => {
            let info = scan_elf(&mut f).map_err(BootError::BadElf)?;
            if info.max_paddr > low_end {
                return Err(too_small("the kernel image", info.max_paddr));
            }
            f.seek(SeekFrom::Start(0)).map_err(kio)?;
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM)))?;
            (r.kernel_load.raw_value(), info.smp_direct, None)
        }
        KernelFormat::BzImage => {
            let size = f.metadata().map_err(kio)?.len();
            if layout::HIMEM + size > low_end {
                return Err(too_small("the kernel image", layout::HIMEM + size));
            }
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM)))?;
            // The 64-bit entry of a bzImage sits 0x200 past the protected-mode code.
            (r.kernel_load.raw_value() + 0x200, false, r.setup_header)
        }
    };

    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    }
    let h: &mut setup_header = &mut params.hdr;
    h.type_of_loader = 0xff;
    h.boot_flag = 0xaa55;
    h.header = 0x5372_6448;
    h.kernel_alignment = 0x0100_0000;
    h.cmd_line_ptr = layout::CMDLINE as u32;
    h.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(p) = initrd {
        let iio = |err| BootError::InitrdIo { path: p.display().to_string(), err };
        let data = std::fs::read(p).map_err(iio)?;
        let max = if h.initrd_addr_max != 0 { (h.initrd_addr_max as u64 + 1).min(low_end) } else { low_end };
        let size = data.len() as u64;
        let addr = max.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= layout::HIMEM + 0x100_0000);
        let Some(addr) = addr else {
            return Err(too_small("the kernel and initrd", size + layout::HIMEM + 0x100_0000));
        };
        mem.write_slice(&data, GuestAddress(addr)).map_err(|e| BootError::Memory(e.to_string()))?;
        h.ramdisk_image = addr as u32;
        h.ramdisk_size = size as u32;
    }

    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes is longer than the {} allowed",
            cmdline.len(),
            layout::CMDLINE_MAX - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE)).map_err(|e| BootError::Memory(e.to_string()))?;

    let mut e820 = vec![(0u64, layout::EBDA, 1u32), (layout::HIMEM, low_end - layout::HIMEM, 1)];
    for (start, len) in ram_ranges(mem_bytes).into_iter().skip(1) {
        e820.push((start, len, 1));
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = e820.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::Memory(e.to_string()))?;
    write_cpu_tables(mem)?;
    acpi::write(mem, devices).map_err(BootError::Memory)?;
    Ok(BootInfo { format, entry, smp_direct })
}

// GDT entries: null, code64, data, TSS placeholder (KVM wants a valid TR).
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];

/// GDT, empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
fn write_cpu_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let merr = |e: vm_memory::GuestMemoryError| BootError::Memory(e.to_string());
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::GDT + 8 * i as u64)).map_err(merr)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT)).map_err(merr)?;
    mem.write_obj(layout::PDPT | 3, GuestAddress(layout::PML4)).map_err(merr)?;
    mem.write_obj(layout::PD | 3, GuestAddress(layout::PDPT)).map_err(merr)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PD + 8 * i)).map_err(merr)?;
    }
    Ok(())
}

/// A segment as the CPU caches it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
}

fn seg_from_gdt(index: u16, entry: u64) -> Segment {
    Segment {
        selector: index * 8,
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g: (entry >> 55) & 1 == 1,
    }
}

/// Long-mode state a vCPU starts in: paging on, flat segments, interrupts off.
#[derive(Debug, Clone)]
pub struct CpuBootState {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
}

pub fn cpu_boot_state(entry: u64, cpu_index: u64) -> CpuBootState {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    CpuBootState {
        rip: entry,
        rsp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        rdi: cpu_index,
        rflags: 2,
        cr0: CR0_PE | CR0_ET | CR0_PG,
        cr3: layout::PML4,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        code: seg_from_gdt(1, GDT[1]),
        data: seg_from_gdt(2, GDT[2]),
        tss: seg_from_gdt(3, GDT[3]),
        gdt: (layout::GDT, (GDT.len() * 8 - 1) as u16),
        idt: (layout::IDT, 7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn segments_decode() {
        let s = cpu_boot_state(0x100000, 0);
        assert!(s.code.l && s.code.present && s.code.type_ == 0xb);
        assert_eq!(s.data.limit, 0xfffff);
        assert_eq!(s.code.selector, 8);
    }
}
