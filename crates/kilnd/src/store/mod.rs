//! The metadata store: what kilnd remembers (images and their versions, MicroVMs, access
//! keys, accounts, the audit log, idempotency tokens), behind the [`Store`] trait.
//!
//! kilnd holds an `Arc<dyn Store>`; [`SqliteStore`] is the one backend today (one host,
//! one file). The trait is split by table family ([`ImageStore`], [`MicrovmStore`],
//! [`AccessStore`], [`AuditStore`], [`TokenStore`], [`QuotaStore`]) so that a PostgreSQL
//! store shared by several hosts is an addition, not a rewrite: rows and errors are plain
//! Rust types, and no backend type crosses the trait.
//!
//! **SQL dialect.** The queries kilnd runs keep to what SQLite (≥ 3.35) and PostgreSQL
//! both execute the same way, so a second backend can take them over as they are, with
//! `?N` placeholders rewritten to `$N`:
//! - upserts are `INSERT … ON CONFLICT [(cols)] DO NOTHING | DO UPDATE SET … = excluded.…`,
//!   never `INSERT OR IGNORE` / `INSERT OR REPLACE`;
//! - generated ids come back with `RETURNING`, never `last_insert_rowid()`;
//! - `COALESCE`, `CASE`, `CAST(… AS BIGINT)`, `COUNT`/`SUM`/`MAX` over one argument, `||`,
//!   `REPLACE`: no `IFNULL`, `instr`, `printf`, `GLOB`, two-argument `MAX`, date functions
//!   (times are epoch seconds computed in Rust), `rowid` or `typeof`;
//! - flags are compared explicitly (`?4 = 1`), never used bare as a condition;
//! - `LIMIT ?` takes a real bound (no `LIMIT -1`).
//!
//! Schema DDL and its versioning stay per backend: SQLite's migrations are numbered and
//! counted in `PRAGMA user_version`, and its older migrations (history that already ran on
//! users' databases) keep the SQLite types and `AUTOINCREMENT` they were written with. A
//! PostgreSQL store writes its own schema (`DOUBLE PRECISION` times, identity columns) and
//! records its version in a table.
//!
//! **Hosts.** Every store is opened for one kilnd host (its id, see [`host::HostId`]).
//! Rows tied to one machine's files and processes — MicroVMs (their directories, QEMU
//! processes and suspended sessions) and image versions (their build and snapshot
//! directories) — carry the host that owns them, stamped on insert. What picks up work
//! after a restart (MicroVM recovery, interrupted builds, the expiry of terminated MicroVMs
//! and their directories) takes only this host's rows; what callers see (lists, quotas,
//! usage) spans every host.
//!
//! Calls are synchronous. Each is one short statement or transaction, so async code calls
//! them inline rather than through the blocking pool; anything that walks files on behalf
//! of a store answer (the stored-bytes quota) runs on the blocking pool instead.

pub mod host;
mod sqlite;

use kiln_api::shapes::microvm::MicrovmState;

pub use sqlite::SqliteStore;

/// The metadata store of one kilnd host: every table family, and the host it acts for.
pub trait Store:
    ImageStore + MicrovmStore + AccessStore + AuditStore + TokenStore + QuotaStore + Send + Sync
{
    /// The id of the host this store acts for (stamped on the rows it inserts that are
    /// tied to this host's files and processes).
    fn host(&self) -> &str;

    /// The name and account an image key stands for, to show in the image ARN of a
    /// MicroVM launched by `launcher`. Once the image is deleted: the name its key
    /// starts with, in the launcher's account.
    fn image_identity(&self, key: &str, launcher: &str) -> Result<(String, String), StoreError> {
        if let Some(image) = self.image(key)? {
            return Ok((image.label, image.account));
        }
        let label = key.split_once('@').map_or(key, |(label, _)| label);
        Ok((
            label.to_string(),
            self.account_of(launcher)?.unwrap_or_default(),
        ))
    }
}

/// Images and their versions (one build each).
pub trait ImageStore {
    /// Inserts an image and its first version (on this host) in one transaction; false if
    /// its owner has an image of that name already (or the key is taken).
    fn create_image(&self, image: &ImageRow, version: &VersionRow) -> Result<bool, StoreError>;

    /// Allocates the next version number of `image` and inserts it (on this host); sets
    /// the image's state.
    fn add_version(
        &self,
        image: &str,
        image_state: &str,
        version: VersionRow,
    ) -> Result<VersionRow, StoreError>;

    /// One image by its store key.
    fn image(&self, key: &str) -> Result<Option<ImageRow>, StoreError>;

    /// The image named `label` in `account`.
    fn image_in(&self, account: &str, label: &str) -> Result<Option<ImageRow>, StoreError>;

    /// Images ordered by account, then name, at most `limit`; only those whose name
    /// contains `name_filter` (case-sensitive), and only `owner`'s, when given.
    fn images(
        &self,
        name_filter: Option<&str>,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ImageRow>, StoreError>;

    /// Sets an image's state.
    fn set_image_state(&self, name: &str, state: &str, now: f64) -> Result<(), StoreError>;

    /// Replaces an image's tags.
    fn set_tags(&self, name: &str, tags: &serde_json::Value) -> Result<(), StoreError>;

    /// Deletes an image and its versions.
    fn delete_image(&self, name: &str) -> Result<(), StoreError>;

    /// One version.
    fn version(&self, image: &str, version: i64) -> Result<Option<VersionRow>, StoreError>;

    /// Versions of an image, ascending, after version `after`, at most `limit`.
    fn versions(
        &self,
        image: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError>;

    /// This host's versions in `states`, across all images (to resume builds at start).
    fn host_versions(&self, states: &[&str]) -> Result<Vec<VersionRow>, StoreError>;

    /// Records a version's build progress.
    fn set_version_state(
        &self,
        image: &str,
        version: i64,
        state: &str,
        build_state: &str,
        reason: Option<&str>,
        now: f64,
    ) -> Result<(), StoreError>;

    /// Records a finished build's snapshot and sizes.
    fn set_version_snapshot(
        &self,
        image: &str,
        version: i64,
        dir: &str,
        memory_bytes: i64,
        disk_bytes: i64,
        code_bytes: i64,
    ) -> Result<(), StoreError>;

    /// Sets a version's ACTIVE/INACTIVE status.
    fn set_version_status(
        &self,
        image: &str,
        version: i64,
        status: &str,
        now: f64,
    ) -> Result<(), StoreError>;

    /// Deletes one version.
    fn delete_version(&self, image: &str, version: i64) -> Result<(), StoreError>;

    /// The highest version in `state` (and, if given, `status`).
    fn latest_version(
        &self,
        image: &str,
        state: &str,
        status: Option<&str>,
    ) -> Result<Option<i64>, StoreError>;
}

/// Idempotency tokens: the response each `clientToken` got.
pub trait TokenStore {
    /// The response stored for an idempotency token, with the hash of the request it
    /// answered.
    fn client_token(
        &self,
        token: &str,
        operation: &str,
    ) -> Result<Option<(String, String)>, StoreError>;

    /// Remembers the response to an idempotent request (replacing an earlier one).
    fn put_client_token(
        &self,
        token: &str,
        operation: &str,
        request_hash: &str,
        response: &str,
        now: f64,
    ) -> Result<(), StoreError>;

    /// Forgets the idempotency tokens recorded before `before`; how many there were.
    fn expire_client_tokens(&self, before: f64) -> Result<usize, StoreError>;

    /// Forgets an idempotency token, so a retry with it runs the request anew.
    fn forget_client_token(&self, token: &str, operation: &str) -> Result<(), StoreError>;
}

/// MicroVMs, their states and their usage.
pub trait MicrovmStore {
    /// Records a new MicroVM, on this host.
    fn insert_microvm(&self, m: &MicrovmRow) -> Result<(), StoreError>;

    /// One MicroVM.
    fn microvm(&self, id: &str) -> Result<Option<MicrovmRow>, StoreError>;

    /// MicroVMs of every host ordered by id, optionally of one image (and version), or
    /// in given states.
    fn microvms(
        &self,
        image: Option<&str>,
        version: Option<i64>,
        states: Option<&[MicrovmState]>,
    ) -> Result<Vec<MicrovmRow>, StoreError>;

    /// This host's MicroVMs in `states`, ordered by id (what a restart recovers).
    fn host_microvms(&self, states: &[MicrovmState]) -> Result<Vec<MicrovmRow>, StoreError>;

    /// How many MicroVMs the store holds in each state (terminated ones included).
    fn microvm_state_counts(&self) -> Result<std::collections::HashMap<String, i64>, StoreError>;

    /// Moves a MicroVM from state `from` to `to` (compare-and-swap: nothing changes, and
    /// the answer is false, when it is no longer in `from`), with its reason and, when it
    /// ends, the time it ended.
    fn transition_microvm(
        &self,
        id: &str,
        from: MicrovmState,
        to: MicrovmState,
        reason: Reason<'_>,
        terminated_at: Option<f64>,
    ) -> Result<bool, StoreError> {
        self.transition_microvm_at(id, from, to, reason, terminated_at, crate::now())
    }

    /// [`MicrovmStore::transition_microvm`] at time `now` (its usage is counted up to then).
    fn transition_microvm_at(
        &self,
        id: &str,
        from: MicrovmState,
        to: MicrovmState,
        reason: Reason<'_>,
        terminated_at: Option<f64>,
        now: f64,
    ) -> Result<bool, StoreError>;

    /// Forgets this host's MicroVMs TERMINATED before `before` (their directories are this
    /// host's to remove), their usage kept in their principals' retired totals; their ids.
    fn expire_terminated_microvms(&self, before: f64) -> Result<Vec<String>, StoreError>;

    /// Records the size on disk of a MicroVM's saved session (counted while SUSPENDED).
    fn set_microvm_snapshot_bytes(&self, id: &str, bytes: u64) -> Result<(), StoreError>;

    /// Records that a RUNNING MicroVM is granted `vcpus` from `now` on: its vCPU-seconds so
    /// far are counted at the grant it had. (Leaving RUNNING puts it back at its baseline.)
    fn set_microvm_vcpus(&self, id: &str, vcpus: u32, now: f64) -> Result<(), StoreError>;

    /// Records that a resident MicroVM holds `grown_mib` of memory beyond its baseline from
    /// `now` on: its GiB-seconds so far are counted at what it held. A suspended session
    /// keeps it (and comes back with it).
    fn set_microvm_memory(&self, id: &str, grown_mib: u64, now: f64) -> Result<(), StoreError>;

    /// The memory a MicroVM holds beyond its baseline, MiB (0 for none or no such MicroVM).
    fn microvm_grown_mib(&self, id: &str) -> Result<u64, StoreError>;

    /// The usage of `owner`'s MicroVMs (everyone's for `None`) up to `now`: each one the
    /// store remembers, and the totals of those that aged out, by principal.
    fn usage(&self, owner: Option<&str>, now: f64) -> Result<UsageReport, StoreError>;

    /// Replaces a MicroVM's forwards.
    fn set_microvm_forwards(
        &self,
        id: &str,
        forwards: &serde_json::Value,
    ) -> Result<(), StoreError>;
}

/// Access keys and the accounts of principals.
pub trait AccessStore {
    /// Records a new access key.
    fn insert_access_key(&self, k: &AccessKeyRow) -> Result<(), StoreError>;

    /// One access key, revoked or not.
    fn access_key(&self, id: &str) -> Result<Option<AccessKeyRow>, StoreError>;

    /// Every access key, oldest first.
    fn access_keys(&self) -> Result<Vec<AccessKeyRow>, StoreError>;

    /// Revokes a key (idempotent), unless it is the last active key of `protected`:
    /// checked and changed in one transaction, so two revocations at once cannot both pass.
    fn revoke_access_key(
        &self,
        id: &str,
        protected: &str,
        now: f64,
    ) -> Result<Revocation, StoreError>;

    /// The account of `principal`, if it has one yet.
    fn account_of(&self, principal: &str) -> Result<Option<String>, StoreError>;

    /// The account of `principal`, allocated now if it has none: the next number after
    /// the highest any principal but admin holds, skipping one that is taken (admin's
    /// configured account may be anything).
    fn ensure_account(&self, principal: &str, now: f64) -> Result<String, StoreError>;

    /// Gives `principal` the account `account` (admin's comes from `--account` at every
    /// start); refused when another principal holds it.
    fn set_account(&self, principal: &str, account: &str, now: f64) -> Result<(), AccountError>;
}

/// The audit log.
pub trait AuditStore {
    /// Appends an audit event; returns its id.
    fn insert_audit_event(&self, e: &AuditRow) -> Result<i64, StoreError>;

    /// Audit events in the order they happened (see [`AuditQuery`] for which).
    fn audit_events(&self, q: &AuditQuery<'_>) -> Result<Vec<AuditRow>, StoreError>;
}

/// What the quotas count.
pub trait QuotaStore {
    /// What `owner` holds: MicroVMs (and memory) not ending, images, versions, builds.
    fn owner_counts(&self, owner: &str) -> Result<OwnerCounts, StoreError>;

    /// How many versions `image` has.
    fn version_count(&self, image: &str) -> Result<u64, StoreError>;

    /// Names of `owner`'s images.
    fn owned_image_names(&self, owner: &str) -> Result<Vec<String>, StoreError>;

    /// Directories of `owner`'s MicroVMs on this host that are suspending or suspended
    /// (the ones whose files this host can measure).
    fn owned_suspended_dirs(&self, owner: &str) -> Result<Vec<String>, StoreError>;
}

/// The store key of a new image `label` in `account`. Keys are opaque: read an image's
/// name and account from its row, never from its key (older images are keyed by name).
pub fn image_key(label: &str, account: &str) -> String {
    format!("{label}@{account}")
}

/// The keys to try, in order, for a new image `label` in `account`: admin's images keep
/// the plain name (so `<home>/images/<name>/` stays where it always was), unless an older
/// image of another principal holds that key; everyone else's are [`image_key`].
pub fn image_keys(label: &str, account: &str, admin: bool) -> Vec<String> {
    let qualified = image_key(label, account);
    if admin {
        vec![label.to_string(), qualified]
    } else {
        vec![qualified]
    }
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (the backend's own error is the source).
    #[error("metadata store ({store}): {source}")]
    Database {
        /// Which store: the SQLite file, or the database's address.
        store: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database file's permissions could not be set.
    #[error("metadata store ({path}): cannot restrict it to its owner (mode 0600): {source}")]
    Permissions {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A JSON column could not be read.
    #[error("metadata store holds unreadable JSON in {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// One image row.
#[derive(Debug, Clone)]
pub struct ImageRow {
    /// The store's key of the image (see [`image_key`]): what its versions, its MicroVMs
    /// and its directory under `<home>/images` are filed under. Never shown to callers.
    pub key: String,
    /// Its name, unique within its owner's account.
    pub label: String,
    /// Its owner's account (read from the accounts table; ignored on insert).
    pub account: String,
    /// `MicrovmImageState` as stored.
    pub state: String,
    /// Creation time, epoch seconds.
    pub created_at: f64,
    /// Last update, epoch seconds.
    pub updated_at: Option<f64>,
    /// Tags as a JSON object.
    pub tags: serde_json::Value,
    /// The principal that created it.
    pub owner: String,
}

/// One image version row (one build).
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// Image name.
    pub image: String,
    /// Version number.
    pub version: i64,
    /// `MicrovmImageVersionState`.
    pub state: String,
    /// `ACTIVE` or `INACTIVE`.
    pub status: String,
    /// Why it failed, if it did.
    pub state_reason: Option<String>,
    /// The request that defines this version (JSON).
    pub spec: serde_json::Value,
    /// Creation time.
    pub created_at: f64,
    /// Last update.
    pub updated_at: Option<f64>,
    /// The build's id.
    pub build_id: String,
    /// `BuildState`.
    pub build_state: String,
    /// Snapshot directory once built.
    pub snapshot_dir: Option<String>,
    /// Memory snapshot bytes on disk.
    pub memory_bytes: Option<i64>,
    /// Disk snapshot bytes on disk.
    pub disk_bytes: Option<i64>,
    /// Build context bytes.
    pub code_bytes: Option<i64>,
}

/// What a state change does to a MicroVM's `stateReason`.
#[derive(Debug, Clone, Copy)]
pub enum Reason<'a> {
    /// Leaves it as it is.
    Keep,
    /// Removes it (the new state needs no explanation).
    Clear,
    /// Replaces it.
    Set(&'a str),
}

/// One MicroVM row.
#[derive(Debug, Clone)]
pub struct MicrovmRow {
    /// Its id (also its endpoint's first DNS label).
    pub id: String,
    /// Image name.
    pub image: String,
    /// Image version it was launched from.
    pub version: i64,
    /// Where it is in its life.
    pub state: MicrovmState,
    /// Why it is in that state, when that needs saying.
    pub state_reason: Option<String>,
    /// The RunMicrovm request (JSON).
    pub request: serde_json::Value,
    /// Launch time.
    pub started_at: f64,
    /// Termination time.
    pub terminated_at: Option<f64>,
    /// Maximum life in seconds.
    pub max_duration: i64,
    /// Guest memory.
    pub memory_mib: i64,
    /// Guest kernel version it runs.
    pub kernel: String,
    /// Its directory under the data directory.
    pub dir: String,
    /// Guest port → host port forwards (JSON object).
    pub forwards: serde_json::Value,
    /// The principal that launched it.
    pub owner: String,
}

/// What one MicroVM has used so far.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmUsage {
    /// Its id.
    #[serde(rename = "microvmId")]
    pub id: String,
    /// Whose it is.
    #[serde(rename = "principal")]
    pub owner: String,
    /// Its state now.
    pub state: String,
    /// Its baseline memory.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: i64,
    /// Its baseline vCPUs (a vCPU per 2 GiB of memory, at least one).
    pub baseline_vcpus: i64,
    /// The vCPUs it is granted now: its baseline, plus what it grew to under load while
    /// RUNNING.
    pub vcpus: i64,
    /// The memory it holds now, MiB: its baseline, plus what it grew to under load.
    #[serde(rename = "grantedMemoryMiB")]
    pub granted_memory_mib: i64,
    /// Seconds it held vCPUs and memory (launching, running, suspending, terminating).
    pub resident_seconds: f64,
    /// The vCPUs it was granted, integrated over its resident seconds.
    pub vcpu_seconds: f64,
    /// The memory it held (baseline and growth), GiB, integrated over its resident seconds.
    #[serde(rename = "memoryGiBSeconds")]
    pub memory_gib_seconds: f64,
    /// Seconds it spent SUSPENDED.
    pub suspended_seconds: f64,
    /// The size on disk of its saved session while SUSPENDED (0 otherwise).
    pub snapshot_bytes: u64,
}

/// What the MicroVMs of one principal that aged out of the store used, in total.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetiredUsage {
    /// Whose they were.
    #[serde(rename = "principal")]
    pub owner: String,
    /// How many.
    pub microvms: u64,
    /// vCPU-seconds.
    pub vcpu_seconds: f64,
    /// GiB-seconds of memory.
    #[serde(rename = "memoryGiBSeconds")]
    pub memory_gib_seconds: f64,
    /// Seconds suspended.
    pub suspended_seconds: f64,
}

/// [`MicrovmStore::usage`]'s answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageReport {
    /// Every MicroVM the store remembers.
    pub microvms: Vec<MicrovmUsage>,
    /// Those it forgot, summed by principal.
    pub retired: Vec<RetiredUsage>,
}

/// One access key: an id and secret for SigV4, and the principal it authenticates.
#[derive(Clone)]
pub struct AccessKeyRow {
    /// `AKIA` + 16 characters.
    pub id: String,
    /// The secret access key (40 characters).
    pub secret: String,
    /// Who signs with it.
    pub principal: String,
    /// Creation time.
    pub created_at: f64,
    /// When it was revoked; a revoked key authenticates nothing.
    pub revoked_at: Option<f64>,
}

impl std::fmt::Debug for AccessKeyRow {
    // The secret stays out of every log line and error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeyRow")
            .field("id", &self.id)
            .field("principal", &self.principal)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// What [`AccessStore::revoke_access_key`] did.
#[derive(Debug)]
pub enum Revocation {
    /// The key is now revoked (or already was).
    Revoked(AccessKeyRow),
    /// No such key.
    NotFound,
    /// The key is the protected principal's last active one; nothing changed.
    LastOfPrincipal(AccessKeyRow),
}

/// Why [`AccessStore::set_account`] refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another principal holds the account.
    #[error("account {account} belongs to principal {holder}")]
    Taken {
        /// The account asked for.
        account: String,
        /// Who holds it.
        holder: String,
    },
}

/// One audit event: who did what to what, with what result, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Its sequence number (assigned by the store; ignored on insert).
    pub id: i64,
    /// When, epoch seconds.
    pub time: f64,
    /// Who: the caller's principal, or `kilnd` for what kilnd did on its own.
    pub principal: String,
    /// The access key the call was signed with; none for kilnd's own actions.
    pub access_key_id: Option<String>,
    /// Whose event it is: the caller, or the owner of the MicroVM kilnd acted on.
    pub owner: String,
    /// The operation, e.g. `RunMicrovm`.
    pub operation: String,
    /// What it acted on: `image:version`, an image name, a MicroVM id or an access key id.
    pub target: Option<String>,
    /// `ok`, or the error type it failed with.
    pub result: String,
    /// Why kilnd acted on its own (idle, maximum duration…).
    pub reason: Option<String>,
}

/// Which audit events to read: at most `limit`, only `owner`'s when given. With a cursor
/// (`since` or `after`) the oldest matching events come first; without one, the newest.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery<'a> {
    /// Events at or after this time (epoch seconds).
    pub since: Option<f64>,
    /// Events after this id.
    pub after: Option<i64>,
    /// Only this principal's events.
    pub owner: Option<&'a str>,
    /// At most this many.
    pub limit: usize,
}

/// What one principal holds, as the quotas count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerCounts {
    /// MicroVMs pending, running, suspending or suspended.
    pub microvms: u64,
    /// Their guest memory, MiB.
    pub memory_mib: u64,
    /// Images.
    pub images: u64,
    /// Versions of the image that has most.
    pub most_versions: u64,
    /// Image versions pending or in progress.
    pub building: u64,
}
