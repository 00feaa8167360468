//! Caps the guest-written logs (serial console, app output): a guest printing forever must not
//! fill the host's disk. QEMU appends to them (`append=on`); kilnd checks their sizes four times
//! a second and, past the cap, keeps the last cap's worth in `<name>.1` and empties the file.
//! A log therefore holds at most twice the cap, plus what a guest writes in a quarter second.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The default cap per log file.
pub const DEFAULT_LOG_CAP: u64 = 8 << 20;
/// How often sizes are checked.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The cap: `KILN_VM_LOG_CAP` (bytes) or [`DEFAULT_LOG_CAP`].
pub fn log_cap() -> u64 {
    static CAP: OnceLock<u64> = OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("KILN_VM_LOG_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v >= 4096)
            .unwrap_or(DEFAULT_LOG_CAP)
    })
}

/// The task keeping `logs` under the cap; it ends when this is dropped.
#[derive(Debug)]
pub struct LogCap(tokio::task::JoinHandle<()>);

impl Drop for LogCap {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LogCap {
    /// Starts watching `logs`.
    pub fn start(logs: Vec<PathBuf>) -> LogCap {
        let cap = log_cap();
        LogCap(tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tick.tick().await;
                for log in &logs {
                    if let Err(e) = rotate_if_over(log, cap) {
                        tracing::debug!(log = %log.display(), error = %e, "cannot cap a VM log");
                    }
                }
            }
        }))
    }
}

/// Past `cap` bytes: the last `cap` bytes go to `<log>.1` (replacing it), `log` is emptied.
fn rotate_if_over(log: &Path, cap: u64) -> std::io::Result<()> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(log)?;
    file.seek(SeekFrom::Start(len - cap))?;
    let mut kept = Vec::with_capacity(cap as usize);
    file.by_ref().take(cap).read_to_end(&mut kept)?;
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    std::fs::write(&old, &kept)?;
    // QEMU appends (O_APPEND), so its next write lands at the new end.
    file.set_len(0)
}

/// Keeps a log across a suspend: the last `cap` bytes of `<log>.1` followed by `log` are
/// written to `to` (replacing it). Nothing there is no error.
pub fn carry(log: &Path, to: &Path, cap: u64) -> std::io::Result<()> {
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    let mut parts = Vec::new();
    for part in [Path::new(&old), log] {
        match std::fs::File::open(part) {
            Ok(f) => parts.push(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let total: u64 = parts
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    if parts.is_empty() || total == 0 {
        return Ok(());
    }
    let mut skip = total.saturating_sub(cap);
    let mut out = std::fs::File::create(to)?;
    for mut part in parts {
        let len = part.metadata()?.len();
        let from = skip.min(len);
        skip -= from;
        part.seek(SeekFrom::Start(from))?;
        std::io::copy(&mut part.by_ref().take(cap), &mut out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carry_when_both_parts_exceed_cap_then_last_cap_bytes_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("app.log");
        std::fs::write(dir.path().join("app.log.1"), b"0123456789").expect("old");
        std::fs::write(&log, b"abcdef").expect("new");
        let to = dir.path().join("carried");

        carry(&log, &to, 8).expect("carry");

        assert_eq!(std::fs::read(&to).expect("carried"), b"89abcdef");
    }

    #[test]
    fn rotate_when_over_cap_then_tail_kept_in_dot_one_and_log_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let text: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&log, &text).expect("log");

        rotate_if_over(&log, 4096).expect("rotate");

        let kept = std::fs::read(dir.path().join("console.log.1")).expect("rotated");
        assert_eq!(kept, text[10_000 - 4096..]);
        assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
    }

    #[test]
    fn rotate_when_under_cap_then_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("app.log");
        std::fs::write(&log, b"hello\n").expect("log");

        rotate_if_over(&log, 4096).expect("no rotation");

        assert_eq!(std::fs::read(&log).expect("log"), b"hello\n");
        assert!(!dir.path().join("app.log.1").exists());
    }
}
