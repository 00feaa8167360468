//! `RUN --mount`: cache disks kept between builds on the host, build secrets, tmpfs; each
//! mounted for one step only and gone before the step's layer is frozen.
//!
//! A cache is an ext4 disk image at `<home>/cache/mounts/<owner>/<image>/<id>.ext4`, so it is
//! per principal and per image (caches never cross principals), attached to the build VM
//! as an extra disk and mounted at the step's target. It is never part of a layer: the
//! layer is the root disk, and the mount is gone before the layer is frozen. A secret is
//! written into the guest's tmpfs at `/dev/kiln/secrets/` and bind-mounted read-only at its
//! target; the file is removed after the step, and any directory or file kiln created on
//! the root disk to mount over is removed too, as BuildKit removes its mount stubs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kiln_agent::client::AgentClient;

use super::plan::{Stage, StepAction, StepMount};

/// Size of a new cache disk (sparse: only what is written takes host disk).
const CACHE_DISK_BYTES: u64 = 8 << 30;
/// Where secrets live in the guest for the length of one step (tmpfs).
const SECRETS_DIR: &str = "/dev/kiln/secrets";

/// Secrets given to one build, by id. Its `Debug` shows ids only, never a value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BuildSecrets(BTreeMap<String, Vec<u8>>);

impl BuildSecrets {
    /// Secrets from `(id, value)` pairs.
    pub fn new(secrets: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self(secrets.into_iter().collect())
    }

    /// The value of secret `id`.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(Vec::as_slice)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for BuildSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The cache disks one build attaches, in attachment order.
#[derive(Debug, Clone, Default)]
pub struct CacheDisks {
    /// `(cache id, host file)`.
    pub disks: Vec<(String, PathBuf)>,
}

impl CacheDisks {
    /// Opens (creating when missing) every cache the stage's RUN steps mount, under
    /// `root/<owner>/<image>/`.
    pub fn open(
        root: &Path,
        owner: &str,
        image: &str,
        stage: &Stage,
    ) -> Result<CacheDisks, String> {
        let dir = root.join(safe_name(owner)).join(safe_name(image));
        let mut disks: Vec<(String, PathBuf)> = Vec::new();
        for step in &stage.steps {
            let StepAction::Run { mounts, .. } = &step.action else {
                continue;
            };
            for mount in mounts {
                let StepMount::Cache {
                    id, mode, uid, gid, ..
                } = mount
                else {
                    continue;
                };
                if disks.iter().any(|(known, _)| known == id) {
                    continue;
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let file = dir.join(format!("{}.ext4", cache_file_stem(id)));
                if !file.exists() {
                    create_cache_disk(&file, *mode, *uid, *gid)?;
                }
                disks.push((id.clone(), file));
            }
        }
        Ok(CacheDisks { disks })
    }

    /// The guest device of cache `id`: disks follow the root (`vda`) and the context (`vdb`).
    pub fn device(&self, id: &str) -> Option<String> {
        extra_device(self.disks.iter().position(|(known, _)| known == id)?)
    }
}

/// The guest device of the `n`th disk attached after the root (`vda`) and the context
/// (`vdb`): cache disks first, then the filesystems `COPY --from` reads.
pub fn extra_device(n: usize) -> Option<String> {
    let letter = char::from(b'c'.checked_add(u8::try_from(n).ok()?)?);
    letter
        .is_ascii_lowercase()
        .then(|| format!("/dev/vd{letter}"))
}

/// A name as one path component, one-to-one (two principals or images never share a
/// directory): ASCII letters, digits, `-` and `.` (not first) are kept; every other byte,
/// `_` included, becomes `_XX` (its hex).
pub fn safe_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// A readable and unique file name for a cache id (ids may hold `/`).
fn cache_file_stem(id: &str) -> String {
    let digest = blake3::hash(id.as_bytes()).to_hex();
    let readable: String = safe_name(id).chars().take(40).collect();
    format!("{readable}-{}", &digest[..12])
}

fn create_cache_disk(file: &Path, mode: u32, uid: u32, gid: u32) -> Result<(), String> {
    let empty =
        tempfile::tempdir().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(empty.path(), std::fs::Permissions::from_mode(mode));
    }
    let partial = file.with_extension("ext4.partial");
    crate::disk::mkfs_ext4_owned(
        empty.path(),
        &partial,
        CACHE_DISK_BYTES,
        "kiln-cache",
        uid,
        gid,
    )
    .map_err(|e| format!("cannot create the cache disk {}: {e}", file.display()))?;
    std::fs::rename(&partial, file)
        .map_err(|e| format!("cannot create the cache disk {}: {e}", file.display()))
}

/// What one step mounted, to undo after it.
#[derive(Debug, Default)]
pub struct StepMounts {
    /// Mount points, in mounting order.
    mounted: Vec<String>,
    /// Files in the guest's tmpfs to remove (secrets).
    files: Vec<String>,
    /// Paths kiln created on the root disk to mount over, deepest last.
    stubs: Vec<String>,
    /// Environment variables for the step (secrets with `env=`).
    pub env: Vec<(String, String)>,
}

/// Mounts `mounts` for one step. On error, what was mounted is undone.
pub async fn mount(
    agent: &AgentClient,
    mounts: &[StepMount],
    caches: &CacheDisks,
    secrets: &BuildSecrets,
) -> Result<StepMounts, String> {
    let mut done = StepMounts::default();
    for (n, mount) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(agent, mount, n, caches, secrets, &mut done).await {
            let _ = unmount(agent, done).await;
            return Err(e);
        }
    }
    Ok(done)
}

async fn mount_one(
    agent: &AgentClient,
    mount: &StepMount,
    n: usize,
    caches: &CacheDisks,
    secrets: &BuildSecrets,
    done: &mut StepMounts,
) -> Result<(), String> {
    match mount {
        StepMount::Cache {
            target,
            id,
            read_only,
            ..
        } => {
            let device = caches
                .device(id)
                .ok_or_else(|| format!("cache {id:?} has no disk attached"))?;
            record_stubs(agent, target, done).await?;
            let options: &[&str] = if *read_only { &["ro"] } else { &[] };
            agent
                .mount(&device, target, "ext4", options)
                .await
                .map_err(|e| format!("cannot mount cache {id:?} at {target}: {e}"))?;
            done.mounted.push(target.clone());
        }
        StepMount::Tmpfs { target, size } => {
            record_stubs(agent, target, done).await?;
            let size = size.map(|s| format!("size={s}"));
            let options: Vec<&str> = size.iter().map(String::as_str).collect();
            agent
                .mount("tmpfs", target, "tmpfs", &options)
                .await
                .map_err(|e| format!("cannot mount a tmpfs at {target}: {e}"))?;
            done.mounted.push(target.clone());
        }
        StepMount::Secret {
            id,
            target,
            env,
            required,
            mode,
            uid,
            gid,
        } => {
            let Some(value) = secret_value(secrets, id, *required)? else {
                return Ok(());
            };
            if let Some(var) = env {
                let text = String::from_utf8(value.to_vec()).map_err(|_| {
                    format!("secret {id:?} is not UTF-8 text, so it cannot go in ${var}")
                })?;
                done.env.push((var.clone(), text));
            }
            let Some(target) = target else {
                return Ok(());
            };
            let file = format!("{SECRETS_DIR}/{n}");
            agent
                .write_file(&file, value, *mode, Some((*uid, *gid)))
                .await
                .map_err(|e| format!("cannot place secret {id:?}: {}", redact(&e.to_string())))?;
            done.files.push(file.clone());
            record_stubs(agent, target, done).await?;
            agent
                .mount(&file, target, "", &["bind"])
                .await
                .map_err(|e| format!("cannot mount secret {id:?} at {target}: {e}"))?;
            done.mounted.push(target.clone());
            agent
                .mount(&file, target, "", &["remount,bind,ro"])
                .await
                .map_err(|e| format!("cannot make secret {id:?} read-only: {e}"))?;
        }
    }
    Ok(())
}

/// The value of secret `id`; `None` when the build has none and the mount does not
/// require it (the step then runs without it, as under Docker).
fn secret_value<'a>(
    secrets: &'a BuildSecrets,
    id: &str,
    required: bool,
) -> Result<Option<&'a [u8]>, String> {
    match (secrets.get(id), required) {
        (Some(value), _) => Ok(Some(value)),
        (None, false) => Ok(None),
        (None, true) => Err(format!(
            "secret {id:?} is required but the build was given none: pass it with \
             `kiln build --secret id={id},src=FILE` (or env=VAR)"
        )),
    }
}

/// An agent error never carries a secret's bytes, but be sure nothing long passes.
fn redact(message: &str) -> String {
    message.chars().take(200).collect()
}

/// Records the parts of `target` that do not exist yet (kiln creates them to mount over,
/// and removes them afterwards).
async fn record_stubs(
    agent: &AgentClient,
    target: &str,
    done: &mut StepMounts,
) -> Result<(), String> {
    let mut path = String::new();
    let mut missing = false;
    for part in target.split('/').filter(|p| !p.is_empty()) {
        path.push('/');
        path.push_str(part);
        if !missing {
            missing = !agent
                .path_exists(&path)
                .await
                .map_err(|e| format!("cannot look at {path}: {e}"))?;
        }
        if missing && !done.stubs.contains(&path) {
            done.stubs.push(path.clone());
        }
    }
    Ok(())
}

/// Undoes [`mount`]: unmounts (last first), removes secret files and mount stubs.
pub async fn unmount(agent: &AgentClient, done: StepMounts) -> Result<(), String> {
    let mut first_error = None;
    for target in done.mounted.iter().rev() {
        if let Err(e) = agent.unmount(target).await {
            first_error.get_or_insert(format!("cannot unmount {target}: {e}"));
        }
    }
    for file in &done.files {
        if let Err(e) = agent.remove_path(file).await {
            first_error.get_or_insert(format!("cannot remove a secret's file: {e}"));
        }
    }
    // Deepest first; a directory the step wrote into stays (it is the step's now).
    let mut stubs = done.stubs;
    stubs.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for stub in stubs {
        let _ = agent.remove_path(&stub).await;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_secrets_debug_when_printed_then_ids_only() {
        let secrets = BuildSecrets::new([("token".to_string(), b"hunter2".to_vec())]);

        let printed = format!("{secrets:?}");

        assert_eq!(printed, "{\"token\"}");
    }

    #[test]
    fn secret_value_when_missing_then_error_if_required_else_skipped() {
        let secrets = BuildSecrets::new([("a".to_string(), b"1".to_vec())]);

        let err = secret_value(&secrets, "b", true).expect_err("required");

        assert_eq!(secret_value(&secrets, "a", true), Ok(Some(&b"1"[..])));
        assert_eq!(secret_value(&secrets, "b", false), Ok(None));
        assert!(
            err.contains("secret \"b\" is required") && err.contains("--secret id=b,src=FILE"),
            "{err}"
        );
    }

    #[test]
    fn cache_file_stem_when_ids_differ_only_by_slashes_then_distinct() {
        let a = cache_file_stem("/root/.cache");
        let b = cache_file_stem("_root_.cache");

        assert_ne!(a, b);
        assert!(a.starts_with("_2froot_2f.cache-"), "{a}");
    }

    #[test]
    fn safe_name_when_path_like_or_alike_then_one_distinct_component() {
        assert_eq!(safe_name("../alice"), "_2e._2falice");
        assert_eq!(safe_name(".."), "_2e.");
        assert_eq!(safe_name(""), "_");
        assert_ne!(safe_name("a+b"), safe_name("a_b"));
        assert_ne!(safe_name("a_2b"), safe_name("a+b"));
        assert_eq!(safe_name("alice.dev-1"), "alice.dev-1");
    }
}
