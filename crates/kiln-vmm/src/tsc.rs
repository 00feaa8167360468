//! Host TSC frequency.
//!
//! Under TCG the microvm guest hangs at TSC calibration unless its command line carries
//! `tsc_early_khz=<host TSC kHz>`. The frequency is measured by counting TSC ticks against
//! `CLOCK_MONOTONIC_RAW`, and cached per boot in `<home>/host/tsc.json`.

use std::path::Path;
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};
use serde::{Deserialize, Serialize};

use crate::accel::{boot_id, unix_now};
use crate::assets::store::{write_atomic, DirLock};

/// How many intervals are measured; the median wins.
const SAMPLES: usize = 5;

/// Length of one measured interval (all together about 100 ms).
const INTERVAL: Duration = Duration::from_millis(20);

/// The cached measurement's file under `<home>`.
const CACHE_FILE: &str = "host/tsc.json";

/// Frequencies outside this range (kHz) are not a TSC.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

/// Failures finding the host TSC frequency.
#[derive(Debug, thiserror::Error)]
pub enum TscError {
    /// `KILN_TSC_KHZ` is not a positive integer.
    #[error("environment variable KILN_TSC_KHZ is unusable ({value:?}): give the host TSC frequency in kHz, e.g. 2445000, or unset it to measure")]
    BadEnv {
        /// The value found.
        value: String,
    },
    /// The monotonic raw clock could not be read.
    #[error("cannot read CLOCK_MONOTONIC_RAW to measure the TSC")]
    Clock(#[source] nix::Error),
    /// The measurement is not believable.
    #[error("measured TSC frequency {khz} kHz is implausible ({detail}): set KILN_TSC_KHZ to the host TSC frequency in kHz")]
    Implausible {
        /// What was measured.
        khz: u64,
        /// Why it is not believed.
        detail: String,
    },
    /// This is not an x86-64 host.
    #[error(
        "the TSC exists only on x86-64 hosts: set KILN_TSC_KHZ if the guest needs tsc_early_khz"
    )]
    Unsupported,
}

/// What `tsc.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct CachedTsc {
    boot_id: String,
    tsc_khz: u64,
    measured_unix: u64,
}

/// The host TSC frequency in kHz: `KILN_TSC_KHZ` if set, else this boot's cached
/// measurement, else a fresh one (about 100 ms).
pub fn host_tsc_khz(home: &Path) -> Result<u64, TscError> {
    if let Some(value) = std::env::var_os("KILN_TSC_KHZ").filter(|v| !v.is_empty()) {
        let value = value.to_string_lossy().into_owned();
        return match value.trim().parse::<u64>() {
            Ok(khz) if khz > 0 => Ok(khz),
            _ => Err(TscError::BadEnv { value }),
        };
    }
    let Some(boot) = boot_id() else {
        tracing::warn!("no boot id readable: measuring the TSC without a cache");
        return measure_tsc_khz();
    };
    let cache = home.join(CACHE_FILE);
    if let Some(khz) = read_cache(&cache, &boot) {
        return Ok(khz);
    }
    let _lock = match cache.parent().map(DirLock::acquire) {
        Some(Ok(lock)) => Some(lock),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot lock the TSC cache; measuring anyway");
            None
        }
        None => None,
    };
    if let Some(khz) = read_cache(&cache, &boot) {
        return Ok(khz);
    }
    let khz = measure_tsc_khz()?;
    let record = CachedTsc {
        boot_id: boot,
        tsc_khz: khz,
        measured_unix: unix_now(),
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(json) => {
            if let Err(e) = write_atomic(&cache, &json) {
                tracing::warn!(error = %e, "cannot cache the TSC frequency");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the TSC frequency"),
    }
    Ok(khz)
}

fn read_cache(path: &Path, boot: &str) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<CachedTsc>(&bytes) {
        Ok(cached) if cached.boot_id == boot && PLAUSIBLE_KHZ.contains(&cached.tsc_khz) => {
            Some(cached.tsc_khz)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable TSC cache");
            None
        }
    }
}

/// Measures the TSC frequency now (median of a few ~20 ms intervals), uncached.
pub fn measure_tsc_khz() -> Result<u64, TscError> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (ns0, tsc0) = paired_reading()?;
        std::thread::sleep(INTERVAL);
        let (ns1, tsc1) = paired_reading()?;
        let elapsed_ns = ns1.saturating_sub(ns0).max(1);
        // ticks per millisecond = kHz
        samples.push(tsc1.saturating_sub(tsc0) as f64 * 1e6 / elapsed_ns as f64);
    }
    samples.sort_by(f64::total_cmp);
    let khz = samples[SAMPLES / 2].round() as u64;
    check_plausible(khz, cpuinfo_mhz())?;
    Ok(khz)
}

/// Compares a measurement with the range of real TSCs and, loosely, with `cpu MHz`
/// (which frequency scaling moves, so only a gross mismatch counts).
fn check_plausible(khz: u64, cpu_mhz: Option<f64>) -> Result<(), TscError> {
    if !PLAUSIBLE_KHZ.contains(&khz) {
        return Err(TscError::Implausible {
            khz,
            detail: "outside 100 MHz..10 GHz".into(),
        });
    }
    if let Some(mhz) = cpu_mhz {
        let ratio = khz as f64 / (mhz * 1000.0);
        if !(0.2..=5.0).contains(&ratio) {
            return Err(TscError::Implausible {
                khz,
                detail: format!("/proc/cpuinfo says cpu MHz {mhz}"),
            });
        }
    }
    Ok(())
}

/// The first `cpu MHz` in `/proc/cpuinfo`.
fn cpuinfo_mhz() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .filter(|line| line.starts_with("cpu MHz"))
        .find_map(|line| line.split(':').nth(1)?.trim().parse().ok())
}

/// A (CLOCK_MONOTONIC_RAW ns, TSC) pair read as close together as this thread manages:
/// of three tries, the one with the fewest TSC ticks around the clock read.
fn paired_reading() -> Result<(u64, u64), TscError> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..3 {
        let before = rdtsc()?;
        let now = clock_gettime(ClockId::CLOCK_MONOTONIC_RAW).map_err(TscError::Clock)?;
        let after = rdtsc()?;
        let ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        let width = after.saturating_sub(before);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, ns, before + width / 2));
        }
    }
    Ok(best.map(|(_, ns, tsc)| (ns, tsc)).unwrap_or_default())
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> Result<u64, TscError> {
    // SAFETY: RDTSC is available on every x86-64 CPU and only reads the time-stamp counter.
    Ok(unsafe { core::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn rdtsc() -> Result<u64, TscError> {
    Err(TscError::Unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_when_run_then_plausible() {
        let khz = measure_tsc_khz().expect("measure");

        assert!(PLAUSIBLE_KHZ.contains(&khz), "{khz}");
    }

    #[test]
    fn plausible_when_far_from_cpu_mhz_then_error() {
        let err = check_plausible(2_445_000, Some(100.0)).expect_err("mismatch");

        assert!(err.to_string().contains("cpu MHz"), "{err}");
    }

    #[test]
    fn host_tsc_when_called_twice_then_cached_value_is_stable() {
        let home = tempfile::tempdir().expect("home");

        let first = host_tsc_khz(home.path()).expect("first");
        let second = host_tsc_khz(home.path()).expect("second");

        assert_eq!(first, second);
    }
}
