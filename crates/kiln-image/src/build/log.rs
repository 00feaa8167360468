//! The build log: one file per image version, timestamped lines, readable while it grows.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Appends timestamped lines to a build's log file.
#[derive(Debug)]
pub struct BuildLog {
    path: PathBuf,
    file: Mutex<File>,
    start: Instant,
}

impl BuildLog {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path) -> std::io::Result<BuildLog> {
        Ok(BuildLog {
            path: path.to_owned(),
            file: Mutex::new(File::create(path)?),
            start: Instant::now(),
        })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line of kiln's own narration.
    pub fn line(&self, message: impl std::fmt::Display) {
        self.write(&format!("{} {message}\n", self.stamp()));
    }

    /// Writes a step header, e.g. `==> step 3/7 (line 5): RUN make`.
    pub fn step(&self, index: usize, total: usize, line: usize, text: &str) {
        self.write(&format!(
            "{} ==> step {index}/{total} (Dockerfile line {line}): {text}\n",
            self.stamp()
        ));
    }

    /// Writes command output, each line indented under the step that produced it.
    pub fn output(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let mut out = String::with_capacity(text.len() + 16);
        for line in text.split_inclusive('\n') {
            out.push_str("    | ");
            out.push_str(line);
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        self.write(&out);
    }

    fn stamp(&self) -> String {
        format!("[{:>8.3}s]", self.start.elapsed().as_secs_f64())
    }

    fn write(&self, text: &str) {
        let mut f = match self.file.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.flush()) {
            tracing::warn!(log = %self.path.display(), error = %e, "cannot write the build log");
        }
    }
}
