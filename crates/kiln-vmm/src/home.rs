//! The kiln data directory (`KILN_HOME`, default `~/.local/share/kiln`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// Makes `home` kiln's alone: creates it, narrows it and every directory under it to 0700, and
/// sets the process's umask to 077 so everything created later is 0700 or 0600 (secrets, the
/// database, snapshots, sockets). Confined QEMUs reach their files through their own root
/// (`crate::jail`), never through these directories.
pub fn make_private(home: &Path) -> std::io::Result<()> {
    // SAFETY: umask only replaces the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)?;
    narrow(home)
}

fn narrow(dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Not followed: a link may lead out of the data directory.
        if entry.file_type()?.is_dir() {
            narrow(&entry.path())?;
        }
    }
    Ok(())
}

/// The directories under `home` (itself included) that others can enter or list.
pub fn open_dirs(home: &Path) -> Vec<PathBuf> {
    let mut open = Vec::new();
    let mut stack = vec![home.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            if meta.permissions().mode() & 0o077 != 0 {
                open.push(dir.clone());
            }
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_private_when_dirs_are_open_then_all_become_0700() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let home = tmp.path().join("home");
        std::fs::create_dir_all(home.join("images/a/b")).expect("dirs");
        std::fs::create_dir_all(home.join("tls")).expect("dirs");
        for d in ["", "images", "images/a", "images/a/b", "tls"] {
            std::fs::set_permissions(home.join(d), std::fs::Permissions::from_mode(0o755))
                .expect("open it");
        }

        make_private(&home).expect("make private");
        std::fs::create_dir(home.join("later")).expect("a later dir");

        assert_eq!(open_dirs(&home), Vec::<PathBuf>::new());
    }
}
