//! The layer cache: one qcow2 file per filesystem-changing Dockerfile step, named by a key
//! that covers the base, every earlier step, the build state the step sees (env, user,
//! workdir, shell) and, for COPY and ADD, the bytes of the files copied.
//!
//! A layer is usable once its `.done` marker exists; a build that fails mid-step deletes
//! the partial layer. Layers chain: each one's backing file is the previous layer (or the
//! base disk), so an unchanged prefix of a Dockerfile costs nothing on a rebuild.

use std::path::{Path, PathBuf};

/// The cache directory and its naming rules.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    /// A cache rooted at `dir` (created when missing).
    pub fn open(dir: &Path) -> std::io::Result<LayerCache> {
        std::fs::create_dir_all(dir)?;
        Ok(LayerCache {
            dir: dir.to_owned(),
        })
    }

    /// The layer file for `key`.
    pub fn layer(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.qcow2"))
    }

    /// Whether the layer for `key` is complete.
    pub fn is_done(&self, key: &str) -> bool {
        self.dir.join(format!("{key}.done")).exists() && self.layer(key).exists()
    }

    /// Marks the layer for `key` complete.
    pub fn mark_done(&self, key: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join(format!("{key}.done")), b"")
    }

    /// Removes an incomplete layer.
    pub fn discard(&self, key: &str) {
        let _ = std::fs::remove_file(self.layer(key));
        let _ = std::fs::remove_file(self.dir.join(format!("{key}.done")));
    }
}

/// A running cache key: BLAKE3 over everything that determines a layer's contents.
#[derive(Debug, Clone)]
pub struct KeyChain(blake3::Hasher);

impl KeyChain {
    /// Starts a chain from the base image's identity.
    pub fn new(base_identity: &str) -> KeyChain {
        let mut h = blake3::Hasher::new();
        h.update(b"kiln-layer-v1\0");
        h.update(base_identity.as_bytes());
        KeyChain(h)
    }

    /// Folds in one more piece of state.
    pub fn feed(&mut self, part: &[u8]) {
        self.0.update(&(part.len() as u64).to_le_bytes());
        self.0.update(part);
    }

    /// The key for the state so far.
    pub fn key(&self) -> String {
        self.0.finalize().to_hex()[..32].to_string()
    }
}

/// Hashes a file or directory tree of the build context (names, modes, contents, link
/// targets), for COPY and ADD cache keys.
pub fn hash_tree(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    hash_into(path, Path::new(""), &mut h)?;
    Ok(h.finalize().to_hex().to_string())
}

fn hash_into(path: &Path, rel: &Path, h: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    h.update(rel.as_os_str().as_encoded_bytes());
    h.update(&meta.permissions().mode().to_le_bytes());
    if meta.file_type().is_symlink() {
        h.update(b"L");
        h.update(std::fs::read_link(path)?.as_os_str().as_encoded_bytes());
    } else if meta.is_dir() {
        h.update(b"D");
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            hash_into(&e.path(), &rel.join(e.file_name()), h)?;
        }
    } else if let Some(kind) = super::source::special_kind(&meta) {
        // Opening a fifo would block and a device would read forever.
        return Err(std::io::Error::other(format!(
            "{} is a {kind}: only regular files, directories and symbolic links can be copied",
            rel.display()
        )));
    } else {
        h.update(b"F");
        let mut f = std::fs::File::open(path)?;
        h.update(&meta.len().to_le_bytes());
        std::io::copy(&mut f, h)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_when_same_inputs_then_same_key_and_different_inputs_differ() {
        let mut a = KeyChain::new("busybox 1");
        let mut b = KeyChain::new("busybox 1");
        let mut c = KeyChain::new("busybox 2");
        for k in [&mut a, &mut b, &mut c] {
            k.feed(b"RUN echo hi");
        }

        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
    }

    #[test]
    fn hash_tree_when_a_file_changes_then_hash_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("app.py"), b"print(1)").expect("write");
        let before = hash_tree(dir.path()).expect("hash");
        std::fs::write(dir.path().join("app.py"), b"print(2)").expect("write");
        let after = hash_tree(dir.path()).expect("hash");

        assert_ne!(before, after);
    }

    #[test]
    fn hash_tree_when_a_fifo_is_inside_then_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::unistd::mkfifo(
            &dir.path().join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");

        let err = hash_tree(dir.path()).expect_err("fifo");

        assert_eq!(
            err.to_string(),
            "pipe is a fifo: only regular files, directories and symbolic links can be copied"
        );
    }
}
