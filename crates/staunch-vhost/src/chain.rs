//! Walking a descriptor chain the guest wrote: every field is hostile. A
//! chain is refused if an index is out of range, if it is longer than the
//! queue (a loop), or if it asks for an indirect table (never offered).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {0} out of a queue of {1}")]
    Index(u16, u16),
    #[error("chain longer than the queue (a loop)")]
    Loop,
    #[error("indirect descriptor, not negotiated")]
    Indirect,
    #[error("descriptor table unreadable at {0:#x}")]
    Memory(u64),
}

/// The descriptors of the chain starting at `head`.
pub fn walk(mem: &GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Result<Vec<Descriptor>, ChainError> {
    let mut out = Vec::new();
    let mut i = head;
    loop {
        if i >= size {
            return Err(ChainError::Index(i, size));
        }
        if out.len() >= size as usize {
            return Err(ChainError::Loop);
        }
        let at = table.0 + 16 * i as u64;
        let raw: [u8; 16] = mem.read_obj(GuestAddress(at)).map_err(|_| ChainError::Memory(at))?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        out.push(Descriptor::new(addr, len, flags, next));
        if flags & F_NEXT == 0 {
            return Ok(out);
        }
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(descs: &[(u64, u32, u16, u16)]) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for (i, d) in descs.iter().enumerate() {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&d.0.to_le_bytes());
            b[8..12].copy_from_slice(&d.1.to_le_bytes());
            b[12..14].copy_from_slice(&d.2.to_le_bytes());
            b[14..16].copy_from_slice(&d.3.to_le_bytes());
            m.write_slice(&b, GuestAddress(16 * i as u64)).unwrap();
        }
        m
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = table(&[(0x1000, 16, F_NEXT, 1), (0x2000, 1, 2, 0)]);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0).unwrap().len(), 2);
        assert_eq!(walk(&m, GuestAddress(0), 4, 9).err(), Some(ChainError::Index(9, 4)));
        let m = table(&[(0x1000, 16, F_NEXT, 1), (0x2000, 1, F_NEXT, 0)]);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0).err(), Some(ChainError::Loop));
        let m = table(&[(0x1000, 16, F_NEXT, 7)]);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0).err(), Some(ChainError::Index(7, 4)));
        let m = table(&[(0x1000, 16, F_INDIRECT, 0)]);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0).err(), Some(ChainError::Indirect));
        assert!(matches!(walk(&m, GuestAddress(0xfff8), 4, 0), Err(ChainError::Memory(_))));
    }
}
