//! The Staunch test guest image, built from `guest/` by this crate's build
//! script, plus helpers to put it on disk and read its reports.

use std::path::{Path, PathBuf};

pub use staunch_guestproto as proto;

pub mod console;
pub mod disk;

/// The guest ELF (64-bit entry for Staunch, PVH note for QEMU).
pub static IMAGE: &[u8] = include_bytes!(env!("STAUNCH_GUEST_ELF"));

/// Write the image to `dir/staunch-testguest.elf` (if not already there, same
/// bytes) and return its path.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("staunch-testguest.elf");
    if std::fs::read(&path).ok().as_deref() != Some(IMAGE) {
        let tmp = dir.join(format!(".staunch-testguest.{}", std::process::id()));
        std::fs::write(&tmp, IMAGE)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// One `STAUNCH ...` report line, prefix removed; None for other lines.
pub fn report(line: &str) -> Option<&str> {
    line.trim_end_matches(['\r', '\n']).strip_prefix(proto::LINE_PREFIX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_elf_with_notes() {
        assert_eq!(&super::IMAGE[..4], b"\x7fELF");
        assert!(super::IMAGE.windows(8).any(|w| w == b"Staunch\0"));
    }
}
