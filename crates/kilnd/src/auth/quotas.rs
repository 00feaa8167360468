//! Per-principal quotas: what one principal may hold at once (MicroVMs and their memory,
//! images, versions per image, stored bytes, builds in flight) and how long a build may
//! run. Defaults come from kilnd's flags; `--quota-overrides FILE` gives principals their
//! own limits.
//!
//! Usage is counted from the store and the disk at the moment of the check, never kept
//! on the side, so it cannot drift. A check and the insert it admits run under one lock
//! (the caller holds the [`Admission`] until its row is recorded): of two calls racing for
//! the last unit, exactly one gets it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_api::ApiError;
use serde::{Deserialize, Serialize};

use crate::api::wire::internal;
use crate::artifacts::s3::{S3Store, StorageBudget};
use crate::auth::throttle::SERVICE_CODE;
use crate::store::Store;

/// One principal's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// MicroVMs launching, running or suspended at once.
    pub microvms: u64,
    /// Guest memory of those MicroVMs together, MiB.
    pub memory_mib: u64,
    /// Images.
    pub images: u64,
    /// Versions of one image.
    pub versions_per_image: u64,
    /// Bytes of image snapshots, suspended sessions and S3 objects.
    pub stored_bytes: u64,
    /// Builds pending or in progress.
    pub concurrent_builds: u64,
    /// Longest one build may run, seconds.
    pub build_seconds: u64,
}

impl Default for Limits {
    /// AWS's numbers where AWS publishes one (images 100, versions 50, builds 5).
    fn default() -> Self {
        Limits {
            microvms: 20,
            memory_mib: 20 * 1024,
            images: 100,
            versions_per_image: 50,
            stored_bytes: 100 << 30,
            concurrent_builds: 5,
            build_seconds: 3600,
        }
    }
}

/// A principal's own limits in the overrides file; what it leaves out is the default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitOverrides {
    microvms: Option<u64>,
    memory_mib: Option<u64>,
    images: Option<u64>,
    versions_per_image: Option<u64>,
    stored_bytes: Option<u64>,
    concurrent_builds: Option<u64>,
    build_seconds: Option<u64>,
}

impl LimitOverrides {
    fn over(&self, d: Limits) -> Limits {
        Limits {
            microvms: self.microvms.unwrap_or(d.microvms),
            memory_mib: self.memory_mib.unwrap_or(d.memory_mib),
            images: self.images.unwrap_or(d.images),
            versions_per_image: self.versions_per_image.unwrap_or(d.versions_per_image),
            stored_bytes: self.stored_bytes.unwrap_or(d.stored_bytes),
            concurrent_builds: self.concurrent_builds.unwrap_or(d.concurrent_builds),
            build_seconds: self.build_seconds.unwrap_or(d.build_seconds),
        }
    }
}

/// Reads `--quota-overrides`: `{"<principal>": {"microvms": 2, "storedBytes": 1048576}}`.
pub fn read_overrides(path: &Path) -> anyhow::Result<HashMap<String, LimitOverrides>> {
    let text = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("reading --quota-overrides {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| {
        anyhow::anyhow!(
            "--quota-overrides {}: {e} (expected {{\"<principal>\": {{\"microvms\": 2, \"memoryMib\": 1024, \
             \"images\": 10, \"versionsPerImage\": 5, \"storedBytes\": 1073741824, \
             \"concurrentBuilds\": 1, \"buildSeconds\": 600}}}})",
            path.display()
        )
    })
}

/// The quotas, each with its code (the `quotaCode` of the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// MicroVMs launching, running or suspended.
    Microvms,
    /// Their guest memory.
    MemoryMib,
    /// Images.
    Images,
    /// Versions of one image.
    VersionsPerImage,
    /// Stored bytes.
    StoredBytes,
    /// Builds in flight.
    ConcurrentBuilds,
    /// One build's duration.
    BuildSeconds,
}

impl Quota {
    /// Every quota, in the order they are listed.
    pub const ALL: [Quota; 7] = [
        Quota::Microvms,
        Quota::MemoryMib,
        Quota::Images,
        Quota::VersionsPerImage,
        Quota::StoredBytes,
        Quota::ConcurrentBuilds,
        Quota::BuildSeconds,
    ];

    /// The `quotaCode` errors and the listing name it by.
    pub fn code(self) -> &'static str {
        match self {
            Quota::Microvms => "MicrovmsPerPrincipal",
            Quota::MemoryMib => "MicrovmMemoryMiBPerPrincipal",
            Quota::Images => "ImagesPerPrincipal",
            Quota::VersionsPerImage => "VersionsPerImage",
            Quota::StoredBytes => "StoredBytesPerPrincipal",
            Quota::ConcurrentBuilds => "ConcurrentBuildsPerPrincipal",
            Quota::BuildSeconds => "BuildDurationSeconds",
        }
    }

    /// What it limits, in words.
    pub fn description(self) -> &'static str {
        match self {
            Quota::Microvms => "MicroVMs pending, running or suspended",
            Quota::MemoryMib => "memory (MiB) of MicroVMs pending, running or suspended",
            Quota::Images => "images",
            Quota::VersionsPerImage => "versions of one image (used: the image with most)",
            Quota::StoredBytes => "bytes stored: image snapshots, suspended MicroVMs, S3 objects",
            Quota::ConcurrentBuilds => "image builds pending or in progress",
            Quota::BuildSeconds => "seconds one build may run",
        }
    }

    /// Its limit in `limits`.
    pub fn limit(self, limits: &Limits) -> u64 {
        match self {
            Quota::Microvms => limits.microvms,
            Quota::MemoryMib => limits.memory_mib,
            Quota::Images => limits.images,
            Quota::VersionsPerImage => limits.versions_per_image,
            Quota::StoredBytes => limits.stored_bytes,
            Quota::ConcurrentBuilds => limits.concurrent_builds,
            Quota::BuildSeconds => limits.build_seconds,
        }
    }

    /// The flag that sets its default.
    fn flag(self) -> &'static str {
        match self {
            Quota::Microvms => "--quota-microvms",
            Quota::MemoryMib => "--quota-memory-mib",
            Quota::Images => "--quota-images",
            Quota::VersionsPerImage => "--quota-versions-per-image",
            Quota::StoredBytes => "--quota-stored-mib",
            Quota::ConcurrentBuilds => "--quota-concurrent-builds",
            Quota::BuildSeconds => "--quota-build-seconds",
        }
    }
}

/// What one principal holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// MicroVMs pending, running or suspended.
    pub microvms: u64,
    /// Their guest memory, MiB: baselines and what they grew to.
    pub memory_mib: u64,
    /// Images.
    pub images: u64,
    /// Versions of the image that has most.
    pub most_versions: u64,
    /// Stored bytes.
    pub stored_bytes: u64,
    /// Builds pending or in progress.
    pub building: u64,
}

impl Usage {
    /// The amount of `quota` used (`None` for build duration, a per-build limit).
    pub fn of(&self, quota: Quota) -> Option<u64> {
        match quota {
            Quota::Microvms => Some(self.microvms),
            Quota::MemoryMib => Some(self.memory_mib),
            Quota::Images => Some(self.images),
            Quota::VersionsPerImage => Some(self.most_versions),
            Quota::StoredBytes => Some(self.stored_bytes),
            Quota::ConcurrentBuilds => Some(self.building),
            Quota::BuildSeconds => None,
        }
    }
}

/// Whether `used + asked` stays within `limit`; else the error naming the quota.
pub fn fits(
    quota: Quota,
    used: u64,
    asked: u64,
    limit: u64,
    resource: (&str, &str),
) -> Result<(), ApiError> {
    if used.checked_add(asked).is_some_and(|total| total <= limit) {
        return Ok(());
    }
    let (resource_type, resource_id) = resource;
    let what = match quota {
        Quota::MemoryMib => format!("{used} MiB in use, {asked} MiB more asked"),
        Quota::StoredBytes => format!("{used} bytes stored"),
        _ => format!("{used} in use"),
    };
    Err(ApiError::ServiceQuotaExceeded {
        message: format!(
            "Service quota exceeded: {} ({}) is {limit} for this principal; {what}. \
             Free some (terminate MicroVMs, delete images, versions or objects) or ask the \
             operator to raise it ({} or --quota-overrides)",
            quota.code(),
            quota.description(),
            quota.flag()
        ),
        resource_id: Some(resource_id.to_string()),
        resource_type: Some(resource_type.to_string()),
        service_code: Some(SERVICE_CODE.to_string()),
        quota_code: Some(quota.code().to_string()),
    })
}

/// Held while a check's admitted row is recorded: no other admission runs meanwhile.
pub struct Admission<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

/// The quotas of every principal, and what each uses.
pub struct Quotas {
    defaults: Limits,
    overrides: HashMap<String, LimitOverrides>,
    store: Arc<dyn Store>,
    home: PathBuf,
    s3: Arc<S3Store>,
    admission: Mutex<()>,
}

impl Quotas {
    /// Quotas with `defaults`, `overrides` per principal, counted from `store`, the data
    /// directory `home` and `s3`.
    pub fn new(
        defaults: Limits,
        overrides: HashMap<String, LimitOverrides>,
        store: Arc<dyn Store>,
        home: PathBuf,
        s3: Arc<S3Store>,
    ) -> Quotas {
        Quotas {
            defaults,
            overrides,
            store,
            home,
            s3,
            admission: Mutex::new(()),
        }
    }

    /// The limits of `principal`.
    pub fn limits(&self, principal: &str) -> Limits {
        match self.overrides.get(principal) {
            Some(o) => o.over(self.defaults),
            None => self.defaults,
        }
    }

    /// Takes the admission lock: hold it from a check until the admitted row is recorded.
    pub fn admission(&self) -> Admission<'_> {
        Admission(self.admission.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What `principal` holds now.
    pub fn usage(&self, principal: &str) -> Result<Usage, ApiError> {
        let counts = self.store.owner_counts(principal).map_err(internal)?;
        Ok(Usage {
            microvms: counts.microvms,
            memory_mib: counts.memory_mib,
            images: counts.images,
            most_versions: counts.most_versions,
            stored_bytes: self.stored_bytes(principal)?,
            building: counts.building,
        })
    }

    /// Bytes on disk `principal` holds: its image versions, its suspended MicroVMs, its
    /// S3 objects (allocated blocks, so sparse snapshots count what they take).
    pub fn stored_bytes(&self, principal: &str) -> Result<u64, ApiError> {
        let mut dirs: Vec<PathBuf> = self
            .store
            .owned_image_names(principal)
            .map_err(internal)?
            .into_iter()
            .map(|name| self.home.join("images").join(name))
            .collect();
        dirs.extend(
            self.store
                .owned_suspended_dirs(principal)
                .map_err(internal)?
                .into_iter()
                .map(|dir| PathBuf::from(dir).join("suspended")),
        );
        dirs.extend(self.s3.bucket_dirs_of(principal));
        Ok(dirs.iter().map(|d| allocated_bytes(d)).sum())
    }

    /// Admits a MicroVM of `memory_mib` for `principal` (call under [`Quotas::admission`]
    /// or another lock that also covers recording the MicroVM).
    pub fn admit_microvm(&self, principal: &str, memory_mib: u64) -> Result<(), ApiError> {
        let limits = self.limits(principal);
        let counts = self.store.owner_counts(principal).map_err(internal)?;
        let resource = ("Microvm", principal);
        fits(
            Quota::Microvms,
            counts.microvms,
            1,
            limits.microvms,
            resource,
        )?;
        fits(
            Quota::MemoryMib,
            counts.memory_mib,
            memory_mib,
            limits.memory_mib,
            resource,
        )
    }

    /// Admits `extra` MiB of memory growth for a MicroVM of `principal` (call under the lock
    /// RunMicrovm admits under, held until the grant is recorded): `--quota-memory-mib` counts
    /// what MicroVMs grew to as well as their baselines.
    pub fn admit_memory_growth(&self, principal: &str, extra: u64) -> Result<(), ApiError> {
        let limit = self.limits(principal).memory_mib;
        let counts = self.store.owner_counts(principal).map_err(internal)?;
        fits(
            Quota::MemoryMib,
            counts.memory_mib,
            extra,
            limit,
            ("Microvm", principal),
        )
    }

    /// Admits a new image (and its first build) for `principal`; hold the answer until
    /// the image is recorded.
    /// `stored` is [`Quotas::stored_bytes`] of `principal`, read before (off the async
    /// runtime: it walks directories).
    pub fn admit_image(
        &self,
        principal: &str,
        name: &str,
        stored: u64,
    ) -> Result<Admission<'_>, ApiError> {
        let admission = self.admission();
        let limits = self.limits(principal);
        let counts = self.store.owner_counts(principal).map_err(internal)?;
        let resource = ("MicrovmImage", name);
        fits(Quota::Images, counts.images, 1, limits.images, resource)?;
        self.admit_build(&limits, counts.building, stored, resource)?;
        Ok(admission)
    }

    /// [`Quotas::stored_bytes`] on the blocking pool.
    pub async fn stored_bytes_of(self: &Arc<Self>, principal: &str) -> Result<u64, ApiError> {
        let (quotas, principal) = (self.clone(), principal.to_string());
        kiln_vmm::blocking(move || quotas.stored_bytes(&principal)).await
    }

    /// Admits a new version (and its build) of `image` for `principal`; hold the answer
    /// until the version is recorded.
    /// `key` is the image's store key, `name` what its owner calls it.
    /// `stored` as for [`Quotas::admit_image`].
    pub fn admit_version(
        &self,
        principal: &str,
        key: &str,
        name: &str,
        stored: u64,
    ) -> Result<Admission<'_>, ApiError> {
        let admission = self.admission();
        let limits = self.limits(principal);
        let counts = self.store.owner_counts(principal).map_err(internal)?;
        let versions = self.store.version_count(key).map_err(internal)?;
        let resource = ("MicrovmImage", name);
        fits(
            Quota::VersionsPerImage,
            versions,
            1,
            limits.versions_per_image,
            resource,
        )?;
        self.admit_build(&limits, counts.building, stored, resource)?;
        Ok(admission)
    }

    fn admit_build(
        &self,
        limits: &Limits,
        building: u64,
        stored: u64,
        resource: (&str, &str),
    ) -> Result<(), ApiError> {
        fits(
            Quota::ConcurrentBuilds,
            building,
            1,
            limits.concurrent_builds,
            resource,
        )?;
        // A build adds bytes of a size unknown yet: it starts while any room is left.
        if stored >= limits.stored_bytes {
            return fits(Quota::StoredBytes, stored, 1, limits.stored_bytes, resource);
        }
        Ok(())
    }

    /// Whether `principal` may store `bytes` more in S3; the refusal's words otherwise.
    pub fn admit_upload(&self, principal: &str, bytes: u64) -> Result<(), String> {
        let limit = self.limits(principal).stored_bytes;
        let stored = self
            .stored_bytes(principal)
            .map_err(|e| e.message().to_string())?;
        fits(
            Quota::StoredBytes,
            stored,
            bytes,
            limit,
            ("Object", principal),
        )
        .map_err(|e| e.message().to_string())
    }

    /// `GET /kiln/v1/quotas`: each quota's limit and what `principal` uses of it.
    pub fn report(&self, principal: &str) -> Result<serde_json::Value, ApiError> {
        let limits = self.limits(principal);
        let usage = self.usage(principal)?;
        let quotas: Vec<serde_json::Value> = Quota::ALL
            .iter()
            .map(|q| {
                serde_json::json!({
                    "quotaCode": q.code(),
                    "description": q.description(),
                    "limit": q.limit(&limits),
                    "used": usage.of(*q),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "principal": principal,
            "serviceCode": SERVICE_CODE,
            "quotas": quotas,
        }))
    }
}

/// The stored-bytes quota as the S3 store asks it before an upload; holds the quotas
/// weakly, since they hold the store.
pub struct UploadBudget(pub std::sync::Weak<Quotas>);

impl StorageBudget for UploadBudget {
    fn admit(&self, principal: &str, bytes: u64) -> Result<(), String> {
        match self.0.upgrade() {
            Some(quotas) => quotas.admit_upload(principal, bytes),
            None => Ok(()),
        }
    }
}

/// Allocated bytes of every file under `dir` (0 when it does not exist); symlinks are not
/// followed.
pub fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries.flatten().map(|e| allocated_bytes(&e.path())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_when_within_limit_then_ok_and_at_limit_then_refused() {
        assert!(fits(Quota::Microvms, 1, 1, 2, ("Microvm", "alice")).is_ok());

        let err = fits(Quota::Microvms, 2, 1, 2, ("Microvm", "alice")).expect_err("full");

        assert_eq!(err.status(), 402);
        assert_eq!(err.error_type(), "ServiceQuotaExceededException");
        let body = err.body();
        assert_eq!(body["quotaCode"], "MicrovmsPerPrincipal");
        assert_eq!(body["serviceCode"], "lambda-microvms");
        assert_eq!(body["resourceType"], "Microvm");
        assert!(
            err.message().contains("MicrovmsPerPrincipal") && err.message().contains("is 2"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn fits_when_memory_would_overflow_then_names_both_amounts() {
        let err =
            fits(Quota::MemoryMib, 256, 256, 300, ("Microvm", "alice")).expect_err("too much");

        assert!(
            err.message().contains("256 MiB in use, 256 MiB more asked"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn fits_when_huge_numbers_then_no_overflow() {
        assert!(fits(Quota::StoredBytes, u64::MAX, 1, u64::MAX, ("Object", "a")).is_err());
    }

    #[test]
    fn overrides_when_partial_then_rest_from_defaults() {
        let o: LimitOverrides =
            serde_json::from_str(r#"{"microvms": 2, "buildSeconds": 5}"#).expect("json");

        let limits = o.over(Limits::default());

        assert_eq!(limits.microvms, 2);
        assert_eq!(limits.build_seconds, 5);
        assert_eq!(limits.images, 100);
        assert_eq!(limits.versions_per_image, 50);
        assert_eq!(limits.concurrent_builds, 5);
    }

    #[test]
    fn overrides_when_unknown_field_then_refused() {
        let parsed = serde_json::from_str::<LimitOverrides>(r#"{"microvm": 2}"#);

        assert!(parsed.is_err());
    }

    #[test]
    fn usage_of_when_build_duration_then_none() {
        let usage = Usage {
            building: 3,
            ..Usage::default()
        };

        assert_eq!(usage.of(Quota::ConcurrentBuilds), Some(3));
        assert_eq!(usage.of(Quota::BuildSeconds), None);
    }

    #[test]
    fn allocated_bytes_when_tree_then_sums_files_and_missing_is_zero() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/one"), vec![1u8; 10_000]).expect("write");
        std::fs::write(dir.path().join("a/b/two"), vec![2u8; 10_000]).expect("write");

        let bytes = allocated_bytes(dir.path());

        assert!(bytes >= 20_000, "{bytes}");
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
    }
}
