//! The build log: one file per image version, timestamped lines, readable while it grows.
//! Command output is what the guest controls, so it is capped ([`OUTPUT_CAP`]): a `RUN` that
//! prints forever fills the log up to the cap, then is counted, not written; kiln's own lines
//! (steps, results) are always written and say how much was left out.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// How many bytes of command output one build log holds.
pub const OUTPUT_CAP: u64 = 32 << 20;

/// Appends timestamped lines to a build's log file.
#[derive(Debug)]
pub struct BuildLog {
    path: PathBuf,
    file: Mutex<LogFile>,
    start: Instant,
    cap: u64,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    /// Command output written so far.
    output: u64,
    /// Command output left out since the last line of kiln's own.
    elided: u64,
}

impl BuildLog {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path) -> std::io::Result<BuildLog> {
        BuildLog::with_cap(path, OUTPUT_CAP)
    }

    /// Creates (truncates) the log at `path`, holding at most `cap` bytes of command output.
    pub fn with_cap(path: &Path, cap: u64) -> std::io::Result<BuildLog> {
        Ok(BuildLog {
            path: path.to_owned(),
            file: Mutex::new(LogFile {
                file: File::create(path)?,
                output: 0,
                elided: 0,
            }),
            start: Instant::now(),
            cap,
        })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line of kiln's own narration.
    pub fn line(&self, message: impl std::fmt::Display) {
        self.write(&format!("{} {message}\n", self.stamp()), false);
    }

    /// Writes a step header, e.g. `==> step 3/7 (line 5): RUN make`.
    pub fn step(&self, index: usize, total: usize, line: usize, text: &str) {
        self.write(
            &format!(
                "{} ==> step {index}/{total} (Dockerfile line {line}): {text}\n",
                self.stamp()
            ),
            false,
        );
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
        self.write(&out, true);
    }

    fn stamp(&self) -> String {
        format!("[{:>8.3}s]", self.start.elapsed().as_secs_f64())
    }

    fn write(&self, text: &str, is_output: bool) {
        let mut log = match self.file.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        let len = text.len() as u64;
        let mut text = std::borrow::Cow::Borrowed(text);
        if is_output {
            if log.output.saturating_add(len) > self.cap {
                log.elided = log.elided.saturating_add(len);
                return;
            }
            log.output += len;
        } else if log.elided > 0 {
            let elided = std::mem::take(&mut log.elided);
            text = format!(
                "{} ... {elided} bytes of output not logged: the log holds {} MiB of command output\n{text}",
                self.stamp(),
                self.cap >> 20
            )
            .into();
        }
        let file = &mut log.file;
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            tracing::warn!(log = %self.path.display(), error = %e, "cannot write the build log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_when_past_the_cap_then_counted_and_the_next_line_says_how_much() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("build.log");
        let log = BuildLog::with_cap(&path, 100).expect("create");

        log.step(1, 1, 1, "RUN yes");
        for _ in 0..50 {
            log.output(b"y\ny\n");
        }
        log.line("step failed");

        let text = std::fs::read_to_string(&path).expect("read");
        let kept = text.lines().filter(|l| l.starts_with("    | ")).count();
        assert!(
            kept > 0 && kept * 7 <= 100,
            "{kept} output lines kept:\n{text}"
        );
        assert!(text.contains("bytes of output not logged"), "{text}");
        assert!(text.trim_end().ends_with("step failed"), "{text}");
    }
}
