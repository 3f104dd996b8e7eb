//! Where the project's cache lives and the test guest image in it.

use anyhow::Result;
use std::path::PathBuf;

/// `$STAUNCH_CACHE`, else the checkout's `.cache` when run from
/// `target/<profile>/`, else a directory under the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("STAUNCH_CACHE") {
        return PathBuf::from(p);
    }
    let checkout = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent()?.parent().map(|r| r.join(".cache")))
        .filter(|c| c.is_dir());
    checkout.unwrap_or_else(|| std::env::temp_dir().join("staunch-cache"))
}

pub fn test_guest() -> Result<PathBuf> {
    Ok(staunch_testguest::install(&cache_dir())?)
}
