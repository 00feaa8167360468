//! A filesystem operation that failed on a path, as an error that names both.

use std::path::{Path, PathBuf};

/// A filesystem operation failed on a path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}")]
pub struct IoError {
    /// What was being done.
    pub action: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// Maps an IO error on `path` to an [`IoError`]; with `?`, to any error that wraps one.
pub fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError {
        action,
        path,
        source,
    }
}
