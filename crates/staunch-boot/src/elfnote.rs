//! A bounds-checked look at an ELF image before loading it: the highest
//! physical address it loads to and Staunch's boot note.

use std::io::{Read, Seek, SeekFrom};

#[derive(Debug, Clone, Default)]
pub struct ElfInfo {
    pub max_paddr: u64,
    pub smp_direct: bool,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const MAX_NOTES_BYTES: u64 = 64 * 1024;

fn u16le(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32le(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64le(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

pub fn scan_elf<F: Read + Seek>(f: &mut F) -> Result<ElfInfo, String> {
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).map_err(|e| format!("ELF header: {e}"))?;
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16le(&eh, 18) != 62 {
        return Err("ELF is not for x86-64".into());
    }
    let phoff = u64le(&eh, 32);
    let phentsize = u16le(&eh, 54) as u64;
    let phnum = u16le(&eh, 56) as u64;
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return Err("ELF program headers are malformed".into());
    }
    let mut info = ElfInfo::default();
    let mut notes = Vec::new();
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize)).map_err(|e| e.to_string())?;
        f.read_exact(&mut ph).map_err(|e| format!("ELF program header {i}: {e}"))?;
        let (ptype, offset, paddr, filesz, memsz) =
            (u32le(&ph, 0), u64le(&ph, 8), u64le(&ph, 24), u64le(&ph, 32), u64le(&ph, 40));
        match ptype {
            PT_LOAD => {
                let end = paddr.checked_add(memsz).ok_or("ELF segment overflows")?;
                info.max_paddr = info.max_paddr.max(end);
            }
            PT_NOTE if filesz <= MAX_NOTES_BYTES => notes.push((offset, filesz)),
            _ => {}
        }
    }
    for (offset, size) in notes {
        let mut buf = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        f.read_exact(&mut buf).map_err(|e| format!("ELF note: {e}"))?;
        info.smp_direct |= has_staunch_smp_note(&buf);
    }
    Ok(info)
}

fn has_staunch_smp_note(mut b: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while b.len() >= 12 {
        let (namesz, descsz, ntype) = (u32le(b, 0) as usize, u32le(b, 4) as usize, u32le(b, 8));
        let name_end = 12 + align4(namesz);
        let Some(end) = name_end.checked_add(align4(descsz)) else {
            return false;
        };
        if end > b.len() {
            return false;
        }
        if ntype == 1 && &b[12..12 + namesz] == b"Staunch\0" && descsz >= 4 && u32le(b, name_end) & 1 == 1 {
            return true;
        }
        b = &b[end..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_notes_do_not_panic() {
        let mut n = vec![8, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0];
        n.extend_from_slice(b"Staunch\0");
        n.extend_from_slice(&[1, 0, 0, 0]);
        assert!(has_staunch_smp_note(&n));
        for cut in 0..n.len() {
            assert!(!has_staunch_smp_note(&n[..cut]));
        }
        let mut huge = n.clone();
        huge[0] = 0xff;
        huge[3] = 0xff;
        assert!(!has_staunch_smp_note(&huge));
    }

    #[test]
    fn rejects_non_elf() {
        let mut c = std::io::Cursor::new(vec![0u8; 128]);
        assert!(scan_elf(&mut c).is_err());
    }
}
