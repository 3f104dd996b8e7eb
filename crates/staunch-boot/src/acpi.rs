//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) so a stock Linux finds every
//! vCPU and the devices without any command-line hints, as QEMU's microvm
//! and Firecracker describe them. Hardware-reduced ACPI: no PM blocks, no SCI.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"STANCH";
/// Where firmware would leave the RSDP: Linux scans 0xE0000..0xFFFFF for it.
pub const RSDP_ADDR: u64 = 0xe0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const FADT_HW_REDUCED: u32 = 1 << 20;

/// What the tables describe.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    pub vcpus: u8,
    /// (base, size, GSI) of each virtio-mmio window.
    pub virtio_mmio: Vec<(u64, u64, u32)>,
    /// (port, GSI) of each 16550.
    pub serial: Vec<(u16, u32)>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(d: &Devices) -> Sdt {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"STNCDSDT", 1);
    for (i, (port, gsi)) in d.serial.iter().enumerate() {
        let (io, irq) = (aml::IO::new(*port, *port, 1, 8), aml::Interrupt::new(true, true, false, false, *gsi));
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let (hid, uid) = (aml::EISAName::new("PNP0501"), i as u32);
        let names = [
            aml::Name::new("_HID".into(), &hid),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let dev = aml::Device::new(
            format!("_SB_.COM{}", i + 1).as_str().into(),
            names.iter().map(|n| n as &dyn Aml).collect(),
        );
        sdt.append_slice(&bytes(&dev));
    }
    for (i, (base, size, gsi)) in d.virtio_mmio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, *base as u32, *size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, *gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        let names = [
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let dev =
            aml::Device::new(format!("_SB_.V{i:03X}").as_str().into(), names.iter().map(|n| n as &dyn Aml).collect());
        sdt.append_slice(&bytes(&dev));
    }
    sdt
}

/// Build the tables and write them at [`RSDP_ADDR`]; returns the bytes used.
pub fn write(mem: &GuestMemoryMmap, d: &Devices) -> Result<u64, String> {
    let mut at = RSDP_ADDR + 0x100;
    let mut place = |blob: Vec<u8>| -> Result<u64, String> {
        let addr = at;
        mem.write_slice(&blob, GuestAddress(addr)).map_err(|e| e.to_string())?;
        at = (at + blob.len() as u64 + 15) & !15;
        Ok(addr)
    };
    let dsdt = place(dsdt(d).as_slice().to_vec())?;
    let mut fadt = FADTBuilder::new(OEM_ID, *b"STNCFACP", 1).dsdt_64(dsdt);
    fadt.flags = FADT_HW_REDUCED.into();
    let fadt = place(bytes(&fadt.finalize()))?;
    let mut madt = MADT::new(OEM_ID, *b"STNCMADT", 1, LocalInterruptController::Address(LAPIC_ADDR));
    for i in 0..d.vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = place(bytes(&madt))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"STNCXSDT", 1);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt);
    mem.write_slice(&bytes(&rsdp), GuestAddress(RSDP_ADDR)).map_err(|e| e.to_string())?;
    Ok(at - RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_link() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let d = Devices { vcpus: 2, virtio_mmio: vec![(0xd000_0000, 0x1000, 5)], serial: vec![(0x3f8, 4)] };
        write(&mem, &d).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert_eq!(sum(&t), 0, "checksum of {}", String::from_utf8_lossy(&t[..4]));
            t
        };
        let x = table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        let entries: Vec<u64> = x[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let madt = table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // Two local APICs (type 0) and one I/O APIC (type 1).
        let types: Vec<u8> = {
            let mut v = Vec::new();
            let mut i = 44;
            while i < madt.len() {
                v.push(madt[i]);
                i += madt[i + 1] as usize;
            }
            v
        };
        assert_eq!(types, vec![0, 0, 1]);
        let fadt = table(entries[0]);
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(dsdt);
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
    }
}
