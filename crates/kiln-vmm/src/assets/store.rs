//! Crash- and race-safe publishing into the kiln data directory.
//!
//! Writers take an exclusive `flock` on a lock file in the target directory, build into a
//! staging path beside the result, and rename it into place: readers see either nothing or
//! a finished result, and a second writer that waited on the lock finds the result ready.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Prefix of staging entries; anything carrying it is unfinished work.
const STAGING_PREFIX: &str = ".tmp-";

/// Failures while locking, staging or publishing files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("cannot {action} {path} (check that the kiln data directory is writable)")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `flock` on a lock file failed.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
}

/// Wraps an IO error with the action and path it concerns.
pub fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// An exclusive lock on `<dir>/.lock`, released on drop.
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    /// Creates `dir` if needed and blocks until its lock is held.
    ///
    /// Staging leftovers of a crashed writer are removed: every writer holds this lock
    /// while it stages, so none can be in progress now.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| StoreError::Lock {
                path: path.clone(),
                source,
            })?;
        remove_stale_staging(dir);
        Ok(DirLock { _lock: lock })
    }
}

/// Returns what `find` sees in `dir`; else takes `dir`'s lock, looks again (a writer that
/// held the lock first may have finished the same work) and runs `build`, which stages
/// and publishes under the lock. `refresh` skips the looking and always builds.
pub fn find_or_build<T, E: From<StoreError>>(
    dir: &Path,
    refresh: bool,
    mut find: impl FnMut() -> Result<Option<T>, E>,
    build: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !refresh {
        if let Some(found) = find()? {
            return Ok(found);
        }
    }
    let _lock = DirLock::acquire(dir)?;
    if !refresh {
        if let Some(found) = find()? {
            return Ok(found);
        }
    }
    build()
}

fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove stale staging entry");
        }
    }
}

/// A unique path beside the final result; removed on drop unless published.
pub struct Staging {
    path: PathBuf,
    published: bool,
}

impl Staging {
    /// A fresh staging path in `dir` (nothing is created yet).
    pub fn path_in(dir: &Path) -> Staging {
        let mut bytes = [0u8; 8];
        // A clash is harmless (creation fails loudly), so a weak fallback is fine.
        if getrandom::fill(&mut bytes).is_err() {
            bytes = u64::from(std::process::id()).to_le_bytes();
        }
        let name = format!("{STAGING_PREFIX}{}", hex(&bytes));
        Staging {
            path: dir.join(name),
            published: false,
        }
    }

    /// A fresh staging directory in `dir`.
    pub fn dir_in(dir: &Path) -> Result<Staging, StoreError> {
        let staging = Staging::path_in(dir);
        fs::create_dir(&staging.path).map_err(io_err("create directory", &staging.path))?;
        Ok(staging)
    }

    /// The staging path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staged file or directory to `dest` atomically.
    pub fn publish(mut self, dest: &Path) -> Result<(), StoreError> {
        sync_path(&self.path)?;
        fs::rename(&self.path, dest).map_err(io_err("rename into place", dest))?;
        self.published = true;
        if let Some(parent) = dest.parent() {
            sync_path(parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let _ = if self.path.is_dir() {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
    }
}

/// fsyncs a file or directory so a rename never publishes data still in flight.
pub fn sync_path(path: &Path) -> Result<(), StoreError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

/// Writes `bytes` to `dest` atomically (staging file + rename) in `dest`'s directory.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let staging = Staging::path_in(dir);
    let mut file = File::create(staging.path()).map_err(io_err("create", staging.path()))?;
    file.write_all(bytes)
        .map_err(io_err("write", staging.path()))?;
    drop(file);
    staging.publish(dest)
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_when_dropped_unpublished_then_removed() {
        let home = tempfile::tempdir().expect("tempdir");
        let staging = Staging::dir_in(home.path()).expect("staging");
        let path = staging.path().to_path_buf();

        drop(staging);

        assert!(!path.exists());
    }

    #[test]
    fn lock_when_acquired_then_stale_staging_is_cleared() {
        let home = tempfile::tempdir().expect("tempdir");
        let stale = home.path().join(".tmp-deadbeef");
        fs::create_dir(&stale).expect("mkdir");

        let _lock = DirLock::acquire(home.path()).expect("lock");

        assert!(!stale.exists());
    }

    #[test]
    fn write_atomic_when_called_twice_then_last_content_wins() {
        let home = tempfile::tempdir().expect("tempdir");
        let dest = home.path().join("sub/x.json");

        write_atomic(&dest, b"one").expect("write one");
        write_atomic(&dest, b"two").expect("write two");

        assert_eq!(fs::read(&dest).expect("read"), b"two");
    }

    #[test]
    fn find_or_build_when_found_after_lock_then_build_skipped() {
        let home = tempfile::tempdir().expect("tempdir");
        let mut looks = 0;

        let found = find_or_build::<_, StoreError>(
            home.path(),
            false,
            || {
                looks += 1;
                Ok((looks == 2).then_some("finished by the lock holder"))
            },
            || Ok("built again"),
        )
        .expect("found");

        assert_eq!(found, "finished by the lock holder");
    }
}
