//! This kilnd host's id: what the store stamps on rows tied to this machine's files and
//! processes, so that a store shared by several hosts lets each pick up only its own work.
//!
//! Generated once and kept in `<home>/host-id` (16 lower-case hex characters), so it
//! survives restarts and upgrades; `kilnd --host-id` names it instead (and is written to
//! that file when there is none yet, so a later start without the flag keeps it).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file under the data directory that keeps the host id.
pub const FILE: &str = "host-id";

/// Why the host id cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    /// The id (from the flag or the file) is not one.
    #[error(
        "host id {id:?} (from {from}) is not valid: use 1 to 64 letters, digits, '.', '_' or '-'"
    )]
    Invalid {
        /// The id read.
        id: String,
        /// Where it came from.
        from: String,
    },
    /// The file could not be read or written.
    #[error("host id file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No randomness for a new id.
    #[error("cannot generate a host id: {0}")]
    Random(getrandom::Error),
}

/// A kilnd host's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostId(String);

impl HostId {
    /// The id `given` (`--host-id`), else the one kept under `home`, else a new one kept
    /// there from now on.
    pub fn resolve(home: &Path, given: Option<&str>) -> Result<HostId, HostIdError> {
        let path = home.join(FILE);
        let io = |source| HostIdError::Io {
            path: path.clone(),
            source,
        };
        let kept = match std::fs::read_to_string(&path) {
            Ok(text) => Some(HostId::parse(text.trim(), &path.display().to_string())?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let id = match (given, kept) {
            (Some(given), kept) => {
                let id = HostId::parse(given, "--host-id")?;
                if kept.is_none() {
                    keep(&path, &id).map_err(io)?;
                }
                id
            }
            (None, Some(kept)) => kept,
            (None, None) => {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes).map_err(HostIdError::Random)?;
                let id = HostId(bytes.iter().map(|b| format!("{b:02x}")).collect());
                keep(&path, &id).map_err(io)?;
                id
            }
        };
        Ok(id)
    }

    fn parse(id: &str, from: &str) -> Result<HostId, HostIdError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if valid {
            Ok(HostId(id.to_string()))
        } else {
            Err(HostIdError::Invalid {
                id: id.to_string(),
                from: from.to_string(),
            })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes the id under a temporary name (0600, as every file of kilnd's) and renames it
/// into place, so a crash never leaves a half-written id.
fn keep(path: &Path, id: &HostId) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(format!("{id}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_when_no_file_then_a_new_id_is_kept_for_the_next_start() {
        let home = tempfile::tempdir().expect("home");

        let first = HostId::resolve(home.path(), None).expect("first");
        let again = HostId::resolve(home.path(), None).expect("again");

        assert_eq!(first, again);
        assert_eq!(first.as_str().len(), 16);
    }

    #[test]
    fn resolve_when_flag_given_then_it_wins_and_is_kept_only_when_none_was() {
        let home = tempfile::tempdir().expect("home");

        let flagged = HostId::resolve(home.path(), Some("rack1-a")).expect("flag");
        let later = HostId::resolve(home.path(), None).expect("later");
        let other = HostId::resolve(home.path(), Some("rack1-b")).expect("other flag");
        let after = HostId::resolve(home.path(), None).expect("after");

        assert_eq!(flagged.as_str(), "rack1-a");
        assert_eq!(later.as_str(), "rack1-a");
        assert_eq!(other.as_str(), "rack1-b");
        assert_eq!(after.as_str(), "rack1-a");
    }

    #[test]
    fn resolve_when_flag_has_a_slash_then_invalid() {
        let home = tempfile::tempdir().expect("home");

        let refused = HostId::resolve(home.path(), Some("a/b")).expect_err("invalid");

        assert!(matches!(refused, HostIdError::Invalid { .. }));
    }
}
