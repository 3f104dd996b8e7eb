//! Entry points, descriptor tables, paging and the drop to ring 3.
//!
//! Two ways in: Staunch enters `_start64` in long mode (rdi = cpu index,
//! rsi = Linux zero page); QEMU enters `_start32` through the PVH note
//! (32-bit flat, paging off, ebx = hvm_start_info). Both end in `kmain`.

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};

pub const MAX_CPUS: usize = 8;
const KSTACK: usize = 16 * 1024;
const USTACK: usize = 64 * 1024;

pub const BOOT_PVH: u64 = 1;

#[repr(C, align(4096))]
pub struct Pages<const N: usize>(pub [[u64; 512]; N]);

// PML4, PDPT and four page directories of 2 MiB pages: identity map of 4 GiB.
#[no_mangle]
static mut PML4: Pages<1> = Pages([[0; 512]; 1]);
#[no_mangle]
static mut PDPT: Pages<1> = Pages([[0; 512]; 1]);
#[no_mangle]
static mut PDS: Pages<4> = Pages([[0; 512]; 4]);

#[repr(C, align(16))]
struct Stacks<const N: usize>([u8; N]);
#[no_mangle]
static mut KSTACKS: Stacks<{ KSTACK * MAX_CPUS }> = Stacks([0; KSTACK * MAX_CPUS]);
static mut USTACKS: Stacks<{ USTACK * MAX_CPUS }> = Stacks([0; USTACK * MAX_CPUS]);

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Tss {
    _r0: u32,
    rsp0: u64,
    _rsp12: [u64; 2],
    _r1: u64,
    _ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}
const TSS0: Tss = Tss { _r0: 0, rsp0: 0, _rsp12: [0; 2], _r1: 0, _ist: [0; 7], _r2: 0, _r3: 0, iomap: 104 };
static mut TSS: [Tss; MAX_CPUS] = [TSS0; MAX_CPUS];
static mut GDT: [[u64; 8]; MAX_CPUS] = [[0; 8]; MAX_CPUS];
static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];

pub const KCS: u64 = 0x08;
pub const UDS: u64 = 0x18 | 3;
pub const UCS: u64 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

// Notes: PVH entry for QEMU; a Staunch note that asks the VMM to start every
// vCPU at the 64-bit entry (rdi = index), so no real-mode SIPI trampoline.
global_asm!(
    ".section .note.Xen, \"a\"",
    ".p2align 2",
    ".long 4, 4, 18",
    ".asciz \"Xen\"",
    ".p2align 2",
    ".long _start32",
    ".section .note.staunch, \"a\"",
    ".p2align 2",
    ".long 8, 4, 1",
    ".asciz \"Staunch\"",
    ".p2align 2",
    ".long 1",
    ".section .data.bootgdt, \"aw\"",
    ".p2align 4",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "boot_gdt_ptr:",
    ".word 23",
    ".long boot_gdt",
    ".section .text.boot, \"ax\"",
    ".code32",
    ".global _start32",
    "_start32:",
    "cli",
    "mov esi, ebx",
    "mov esp, offset KSTACKS",
    "add esp, {kstack}",
    // 2048 2 MiB pages, P|RW|US|PS
    "mov edi, offset PDS",
    "xor ecx, ecx",
    "2:",
    "mov eax, ecx",
    "shl eax, 21",
    "or eax, 0x87",
    "mov [edi + ecx*8], eax",
    "mov dword ptr [edi + ecx*8 + 4], 0",
    "inc ecx",
    "cmp ecx, 2048",
    "jne 2b",
    "mov edi, offset PDPT",
    "mov eax, offset PDS",
    "or eax, 7",
    "mov [edi], eax",
    "add eax, 4096",
    "mov [edi + 8], eax",
    "add eax, 4096",
    "mov [edi + 16], eax",
    "add eax, 4096",
    "mov [edi + 24], eax",
    "mov edi, offset PML4",
    "mov eax, offset PDPT",
    "or eax, 7",
    "mov [edi], eax",
    "mov eax, offset PML4",
    "mov cr3, eax",
    "mov eax, cr4",
    "or eax, 0x620",
    "mov cr4, eax",
    "mov ecx, 0xC0000080",
    "rdmsr",
    "or eax, 0x100",
    "wrmsr",
    "mov eax, cr0",
    "and eax, 0xfffffffb",
    "or eax, 0x80000003",
    "mov cr0, eax",
    "lgdt [boot_gdt_ptr]",
    "push 0x08",
    "mov eax, offset pvh_long_mode",
    "push eax",
    "retf",
    ".code64",
    "pvh_long_mode:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor edi, edi",
    "mov esi, esi",
    "mov edx, 1",
    "jmp 4f",
    ".global _start64",
    "_start64:",
    "cli",
    "xor edx, edx",
    "4:",
    // SSE on: the compiler may use it for copies.
    "mov rax, cr0",
    "and rax, -5",
    "or rax, 2",
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, 0x600",
    "mov cr4, rax",
    "mov rax, rdi",
    "inc rax",
    "imul rax, rax, {kstack}",
    "lea rsp, [rip + KSTACKS]",
    "add rsp, rax",
    "xor ebp, ebp",
    "call {kmain}",
    "5: hlt",
    "jmp 5b",
    // Exception stubs, 16 bytes apart.
    ".p2align 4",
    ".global isr_table",
    "isr_table:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".p2align 4",
    "push \\n",
    "jmp isr_common",
    ".endr",
    // #GP: maybe a port access from ring 3 where the hypervisor ignores IOPL
    // (KVM-PVM does): emulate it here and return past the instruction.
    ".p2align 4",
    ".global gp_entry",
    "gp_entry:",
    "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rdi, rsp",
    "sub rsp, 8",
    "call {gp}",
    "add rsp, 8",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
    "add rsp, 8",
    "iretq",
    "isr_common:",
    "pop rdi",
    "mov rsi, rsp",
    "and rsp, -16",
    "call {fault}",
    "6: hlt",
    "jmp 6b",
    kstack = const KSTACK,
    kmain = sym crate::kmain,
    fault = sym crate::fault,
    gp = sym gp_handler,
);

/// Registers as `gp_entry` saved them, then the CPU's exception frame.
#[repr(C)]
pub struct GpFrame {
    r15_to_r8: [u64; 8],
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" fn gp_handler(f: &mut GpFrame) {
    // SAFETY: rip points into this identity-mapped image.
    let at = |i: u64| unsafe { core::ptr::read_volatile((f.rip + i) as *const u8) };
    let mut len = 0;
    let mut wide16 = false;
    if at(0) == 0x66 {
        wide16 = true;
        len = 1;
    }
    let op = at(len);
    len += 1;
    let port = match op {
        0xe4..=0xe7 => {
            len += 1;
            at(len - 1) as u16
        }
        0xec..=0xef => f.rdx as u16,
        _ => {
            crate::fault_frame(13, f.err, f.rip, f.cs);
        }
    };
    let size = if op & 1 == 0 {
        1
    } else if wide16 {
        2
    } else {
        4
    };
    let is_in = matches!(op, 0xe4 | 0xe5 | 0xec | 0xed);
    // SAFETY: ring-0 port access on behalf of the ring-3 workload.
    unsafe {
        match (is_in, size) {
            (true, 1) => {
                let v: u8;
                asm!("in al, dx", in("dx") port, out("al") v);
                f.rax = (f.rax & !0xff) | v as u64;
            }
            (true, 2) => {
                let v: u16;
                asm!("in ax, dx", in("dx") port, out("ax") v);
                f.rax = (f.rax & !0xffff) | v as u64;
            }
            (true, _) => {
                let v: u32;
                asm!("in eax, dx", in("dx") port, out("eax") v);
                f.rax = v as u64;
            }
            (false, 1) => asm!("out dx, al", in("dx") port, in("al") f.rax as u8),
            (false, 2) => asm!("out dx, ax", in("dx") port, in("ax") f.rax as u16),
            (false, _) => asm!("out dx, eax", in("dx") port, in("eax") f.rax as u32),
        }
    }
    f.rip += len;
}

extern "C" {
    static isr_table: u8;
    static gp_entry: u8;
}

/// Identity map 4 GiB with user-accessible 2 MiB pages (the workloads run in
/// ring 3 and touch device MMIO directly).
pub fn setup_paging() {
    // SAFETY: runs on the boot CPU before any other CPU uses these tables.
    unsafe {
        let pds = &mut *addr_of_mut!(PDS);
        for (i, e) in pds.0.iter_mut().flatten().enumerate() {
            *e = ((i as u64) << 21) | 0x87;
        }
        let pdpt = &mut *addr_of_mut!(PDPT);
        for i in 0..4 {
            pdpt.0[0][i] = (addr_of!(PDS.0[i]) as u64) | 7;
        }
        (*addr_of_mut!(PML4)).0[0][0] = addr_of!(PDPT) as u64 | 7;
    }
    load_paging();
}

pub fn load_paging() {
    // SAFETY: the tables identity map everything this image touches.
    unsafe { asm!("mov cr3, {}", in(reg) addr_of!(PML4) as u64, options(nostack)) };
}

/// Load this CPU's GDT, TSS and the shared IDT.
pub fn setup_cpu(cpu: usize) {
    // SAFETY: each CPU writes only its own GDT/TSS slot; the IDT is written
    // by the boot CPU before the others are released and is then read-only.
    unsafe {
        let tss = addr_of_mut!(TSS[cpu]);
        (*tss).rsp0 = addr_of!(KSTACKS) as u64 + ((cpu + 1) * KSTACK) as u64;
        let base = tss as u64;
        let limit = 103u64;
        let g = &mut *addr_of_mut!(GDT[cpu]);
        g[0] = 0;
        g[1] = 0x00af_9a00_0000_ffff; // kernel code 64
        g[2] = 0x00cf_9200_0000_ffff; // kernel data
        g[3] = 0x00cf_f200_0000_ffff; // user data
        g[4] = 0x00af_fa00_0000_ffff; // user code 64
        g[5] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        g[6] = base >> 32;
        if cpu == 0 {
            let isr = addr_of!(isr_table) as u64;
            let idt = &mut *addr_of_mut!(IDT);
            for (v, e) in idt.iter_mut().enumerate() {
                let off = if v == 13 { addr_of!(gp_entry) as u64 } else { isr + 16 * v as u64 };
                e[0] = (off & 0xffff) | (KCS << 16) | (0x8eu64 << 40) | (((off >> 16) & 0xffff) << 48);
                e[1] = off >> 32;
            }
        }
        let gdtr: [u16; 5] = desc_ptr(addr_of!(GDT[cpu]) as u64, 8 * 8 - 1);
        let idtr: [u16; 5] = desc_ptr(addr_of!(IDT) as u64, 32 * 16 - 1);
        asm!(
            "lgdt [{g}]",
            "lidt [{i}]",
            "push 0x08",
            "lea rax, [rip + 2f]",
            "push rax",
            "retfq",
            "2:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "ltr {t:x}",
            g = in(reg) gdtr.as_ptr(),
            i = in(reg) idtr.as_ptr(),
            t = in(reg) TSS_SEL,
            out("rax") _,
        );
    }
}

fn desc_ptr(base: u64, limit: u16) -> [u16; 5] {
    [limit, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16]
}

/// Top of this CPU's user stack, aligned as if a call had just pushed.
pub fn user_stack(cpu: usize) -> u64 {
    addr_of!(USTACKS) as u64 + ((cpu + 1) * USTACK) as u64 - 8
}

/// Drop to ring 3 at `entry(arg)` with IOPL 3 (port I/O allowed), IF clear.
pub fn enter_user(entry: extern "C" fn(u64) -> !, stack: u64, arg: u64) -> ! {
    // SAFETY: builds an iretq frame for the flat user segments set up in
    // `setup_cpu`; never returns.
    unsafe {
        asm!(
            "mov ds, {uds:x}",
            "mov es, {uds:x}",
            "push {uds}",
            "push {stack}",
            "push 0x3002",
            "push {ucs}",
            "push {entry}",
            "iretq",
            uds = in(reg) UDS,
            ucs = in(reg) UCS,
            stack = in(reg) stack,
            entry = in(reg) entry as usize as u64,
            in("rdi") arg,
            options(noreturn),
        )
    }
}
