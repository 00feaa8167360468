//! Accelerator probe: is `/dev/kvm` real hardware virtualization, or an emulator that
//! would never finish booting a guest?
//!
//! The probe runs a tight real-mode loop in a one-vCPU VM, checks what it computed, and
//! times it: hardware runs 200 000 iterations in well under a millisecond, an emulating
//! `/dev/kvm` (such as the `kvm_pvm` module) takes hundreds. The verdict is cached per boot in
//! `<home>/host/accel.json`.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_api::Accel;
use serde::{Deserialize, Serialize};

use crate::assets::store::{write_atomic, DirLock};

/// Loop iterations the probe runs.
pub const PROBE_ITERATIONS: u32 = 200_000;

/// Above this the loop was emulated: use TCG.
pub const PROBE_THRESHOLD_MS: f64 = 50.0;

/// After this the probe is abandoned (its thread is left behind) and TCG is chosen.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest-physical address of the probe's code.
const CODE_ADDR: u64 = 0x1000;

/// Size of the probe VM's memory.
const MEM_SIZE: usize = 0x4000;

/// The cached verdict's file under `<home>`.
const CACHE_FILE: &str = "host/accel.json";

/// Where an [`AccelChoice`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSource {
    /// Measured just now.
    Probed,
    /// Measured earlier in this boot of the host.
    Cached,
    /// Forced by `KILN_ACCEL`.
    Env,
}

/// The accelerator kiln runs VMs with, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// Why it was chosen, in words for `kiln doctor`.
    pub reason: String,
    /// How long the probe loop took, when it ran to the end.
    pub probe_ms: Option<f64>,
    /// Where this choice came from.
    pub source: AccelSource,
}

/// The outcome of one probe of `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Whether KVM runs guests at hardware speed.
    pub usable: bool,
    /// What the probe found.
    pub reason: String,
    /// How long the probe loop took, when it ran to the end.
    pub probe_ms: Option<f64>,
}

/// Failures choosing the accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `KILN_ACCEL` holds something other than `kvm` or `tcg`.
    #[error("environment variable KILN_ACCEL is unusable: {detail}; unset it to probe")]
    BadEnv {
        /// What is wrong.
        detail: String,
    },
}

/// What `accel.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct CachedProbe {
    boot_id: String,
    result: ProbeResult,
    probed_unix: u64,
}

/// Chooses KVM or TCG: `KILN_ACCEL` if set, else this boot's cached probe, else a probe.
pub fn choose_accel(home: &Path) -> Result<AccelChoice, AccelError> {
    match std::env::var("KILN_ACCEL") {
        Ok(value) if !value.trim().is_empty() => {
            let accel: Accel = value
                .parse()
                .map_err(|detail| AccelError::BadEnv { detail })?;
            return Ok(AccelChoice {
                accel,
                reason: format!("KILN_ACCEL={accel} forces it"),
                probe_ms: None,
                source: AccelSource::Env,
            });
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => {}
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(AccelError::BadEnv {
                detail: "not valid UTF-8".into(),
            });
        }
    }
    let Some(boot) = boot_id() else {
        tracing::warn!("no boot id readable: probing without a cache");
        return Ok(choice(probe_kvm(), AccelSource::Probed));
    };
    let cache = home.join(CACHE_FILE);
    if let Some(result) = read_cache(&cache, &boot) {
        return Ok(choice(result, AccelSource::Cached));
    }
    // Parallel callers wait here rather than probe at once and slow each other down.
    let _lock = match cache.parent().map(DirLock::acquire) {
        Some(Ok(lock)) => Some(lock),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot lock the accelerator cache; probing anyway");
            None
        }
        None => None,
    };
    if let Some(result) = read_cache(&cache, &boot) {
        return Ok(choice(result, AccelSource::Cached));
    }
    let result = probe_kvm();
    let record = CachedProbe {
        boot_id: boot,
        result: result.clone(),
        probed_unix: unix_now(),
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(json) => {
            if let Err(e) = write_atomic(&cache, &json) {
                tracing::warn!(error = %e, "cannot cache the accelerator probe");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the accelerator probe"),
    }
    Ok(choice(result, AccelSource::Probed))
}

fn choice(result: ProbeResult, source: AccelSource) -> AccelChoice {
    AccelChoice {
        accel: if result.usable {
            Accel::Kvm
        } else {
            Accel::Tcg
        },
        reason: result.reason,
        probe_ms: result.probe_ms,
        source,
    }
}

fn read_cache(path: &Path, boot: &str) -> Option<ProbeResult> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<CachedProbe>(&bytes) {
        Ok(cached) if cached.boot_id == boot => Some(cached.result),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable accelerator cache");
            None
        }
    }
}

/// This boot of the host, from `/proc/sys/kernel/random/boot_id`.
pub(crate) fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Probes `/dev/kvm` now, without any cache (for `kiln doctor`).
pub fn probe_kvm() -> ProbeResult {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let hint = if pvm {
        " (the kvm_pvm module is loaded)"
    } else {
        ""
    };
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            // The receiver may be gone after a timeout; nothing is left to tell then.
            let _ = tx.send(run_probe_vm());
        });
    if let Err(e) = spawned {
        return tcg(
            format!("cannot start the KVM probe thread: {e}; using TCG"),
            None,
        );
    }
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Err(_) => tcg(
            format!(
                "the KVM probe did not finish {PROBE_ITERATIONS} loop iterations within {}s{hint}; \
                 using TCG",
                PROBE_TIMEOUT.as_secs()
            ),
            None,
        ),
        Ok(Err(e)) => tcg(format!("KVM is unusable: {e}{hint}; using TCG"), None),
        Ok(Ok(ms)) if ms > PROBE_THRESHOLD_MS => tcg(
            format!(
                "KVM took {ms:.1} ms for {PROBE_ITERATIONS} loop iterations, where hardware \
                 virtualization needs well under 1 ms: /dev/kvm emulates instructions{hint}; \
                 using TCG"
            ),
            Some(ms),
        ),
        Ok(Ok(ms)) => ProbeResult {
            usable: true,
            reason: format!(
                "KVM ran {PROBE_ITERATIONS} loop iterations in {ms:.3} ms: hardware virtualization"
            ),
            probe_ms: Some(ms),
        },
    }
}

fn tcg(reason: String, probe_ms: Option<f64>) -> ProbeResult {
    ProbeResult {
        usable: false,
        reason,
        probe_ms,
    }
}

/// Anonymous memory for the probe VM, unmapped on drop.
struct GuestMemory {
    addr: *mut libc::c_void,
    len: usize,
}

impl GuestMemory {
    fn new(len: usize) -> Result<GuestMemory, String> {
        // SAFETY: an anonymous private mapping with no address hint aliases nothing; the
        // result is checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestMemory { addr, len })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len,
            "probe code outside guest memory"
        );
        // SAFETY: the range was just checked to lie inside this live, writable mapping,
        // and `bytes` cannot overlap it (the mapping is private to this struct).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.cast::<u8>().add(offset),
                bytes.len(),
            );
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: addr/len came from a successful mmap and are unmapped exactly once; the
        // VM using the memory was dropped before this (declared after it in run_probe_vm).
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

/// The probe program in 16-bit real mode, with 32-bit operands and counter:
/// `xor edx, edx; mov ecx, N; l: inc edx; loop l (ECX); hlt`.
///
/// The `inc edx` is there to be checked afterwards: the `kvm_pvm` emulator runs a bare
/// `loop $` on CX alone (3392 of 200 000 iterations, in 2 ms), which a timing-only probe
/// mistakes for hardware speed.
fn probe_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0x31, 0xD2, 0x66, 0xB9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x42, 0x67, 0xE2, 0xFB, 0xF4]);
    code
}

/// Runs the probe loop in a fresh VM and returns its duration in milliseconds.
fn run_probe_vm() -> Result<f64, String> {
    let mut memory = GuestMemory::new(MEM_SIZE)?;
    memory.write(CODE_ADDR as usize, &probe_code(PROBE_ITERATIONS));
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: memory.addr as u64,
    };
    // SAFETY: the region is a live mapping of MEM_SIZE bytes that outlives `vm` (memory is
    // declared first, so it is dropped last).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS failed: {e}"))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::Hlt) => break,
            Ok(exit) => return Err(format!("the probe vCPU exited unexpectedly: {exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let regs = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
    let (edx, ecx) = (regs.rdx as u32, regs.rcx as u32);
    if edx != PROBE_ITERATIONS || ecx != 0 {
        return Err(format!(
            "the probe loop computed a wrong result in {ms:.1} ms (EDX={edx}, ECX={ecx}, \
             expected EDX={PROBE_ITERATIONS}, ECX=0): /dev/kvm does not execute guest code \
             faithfully"
        ));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_when_assembled_then_counts_loops_and_halts() {
        let code = probe_code(200_000);

        let expected = [
            0x66, 0x31, 0xD2, // xor edx, edx
            0x66, 0xB9, 0x40, 0x0D, 0x03, 0x00, // mov ecx, 200000
            0x66, 0x42, // inc edx
            0x67, 0xE2, 0xFB, // loop (ECX) back to inc edx
            0xF4, // hlt
        ];
        assert_eq!(code, expected);
    }

    #[test]
    fn cache_when_boot_id_differs_then_ignored() {
        let home = tempfile::tempdir().expect("home");
        let path = home.path().join("accel.json");
        let record = CachedProbe {
            boot_id: "old-boot".into(),
            result: tcg("old".into(), None),
            probed_unix: 0,
        };
        std::fs::write(&path, serde_json::to_vec(&record).expect("json")).expect("write");

        let (same, other) = (read_cache(&path, "old-boot"), read_cache(&path, "new-boot"));

        assert_eq!(same.map(|r| r.reason), Some("old".to_string()));
        assert_eq!(other, None);
    }

    #[test]
    fn probe_when_run_then_gives_a_verdict_with_reason() {
        let result = probe_kvm();

        assert!(!result.reason.is_empty());
        assert_eq!(
            result.usable,
            result.probe_ms.is_some_and(|ms| ms <= PROBE_THRESHOLD_MS)
        );
    }

    #[test]
    fn choose_when_probed_twice_then_second_is_cached() {
        let home = tempfile::tempdir().expect("home");
        let first = choose_accel(home.path()).expect("first");
        let second = choose_accel(home.path()).expect("second");

        assert_eq!(first.accel, second.accel);
        assert_ne!(second.source, AccelSource::Probed);
    }
}
