//! The kiln data directory (`KILN_HOME`, default `~/.local/share/kiln`).

use std::path::PathBuf;

/// Resolves the data directory: `KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else
/// `~/.local/share/kiln`.
pub fn kiln_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KILN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/kiln")
}
