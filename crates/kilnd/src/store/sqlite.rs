//! The SQLite backend of the [`Store`]: one file in WAL mode, numbered schema migrations
//! counted in `PRAGMA user_version` (both SQLite-only, and so kept here).
//!
//! One connection behind a mutex: kilnd's writes are few and short, and SQLite serialises
//! writers anyway. Callers on the async runtime hold the lock only for the duration of one
//! statement batch.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use kiln_api::shapes::microvm::MicrovmState;
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    AccessKeyRow, AccessStore, AccountError, AuditQuery, AuditRow, AuditStore, ImageRow,
    ImageStore, MicrovmRow, MicrovmStore, MicrovmUsage, OwnerCounts, QuotaStore, Reason,
    RetiredUsage, Revocation, Store, StoreError, TokenStore, UsageReport, VersionRow,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: images, their versions (one build each), and idempotency tokens.
    "CREATE TABLE images (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL,
        tags TEXT NOT NULL DEFAULT '{}',
        next_version INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE image_versions (
        image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        state_reason TEXT,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL,
        build_id TEXT NOT NULL,
        build_state TEXT NOT NULL,
        snapshot_dir TEXT,
        memory_bytes INTEGER,
        disk_bytes INTEGER,
        code_bytes INTEGER,
        PRIMARY KEY (image, version)
    );
    CREATE TABLE client_tokens (
        token TEXT NOT NULL,
        operation TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (token, operation)
    );",
    // 2: MicroVMs.
    "CREATE TABLE microvms (
        id TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        state_reason TEXT,
        request TEXT NOT NULL,
        started_at REAL NOT NULL,
        terminated_at REAL,
        max_duration INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        kernel TEXT NOT NULL,
        dir TEXT NOT NULL,
        forwards TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX microvms_by_image ON microvms (image, version);",
    // 3: access keys (SigV4 secrets kilnd must read back to recompute signatures) and the
    // principal owning each image and MicroVM; what existed before belongs to admin.
    "CREATE TABLE access_keys (
        id TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        principal TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX access_keys_by_principal ON access_keys (principal);
    ALTER TABLE images ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE microvms ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin';",
    // 4: the audit log: every mutating call and every action kilnd takes on its own. `owner`
    // is whose event it is (the caller, or the owner of the MicroVM kilnd acted on).
    "CREATE TABLE audit_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        principal TEXT NOT NULL,
        access_key_id TEXT,
        owner TEXT NOT NULL,
        operation TEXT NOT NULL,
        target TEXT,
        result TEXT NOT NULL,
        reason TEXT
    );
    CREATE INDEX audit_events_by_time ON audit_events (time);
    CREATE INDEX audit_events_by_owner ON audit_events (owner, id);",
    // 5: accounts. Every principal has its own 12-digit account; admin's is kiln's
    // configured one (`--account`, `000000000000` by default; kilnd sets it at start), the
    // others are numbered 000000000001, 000000000002… in order of first appearance. An
    // image's name is unique within its owner's account: `label` is the name callers see,
    // `name` stays the store's key (and the directory under `<home>/images`), so rows and
    // files from before keep theirs; see `image_keys` for the keys of new images.
    "CREATE TABLE accounts (
        principal TEXT PRIMARY KEY,
        account TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    INSERT INTO accounts (principal, account, created_at) VALUES ('admin', '000000000000', 0);
    INSERT INTO accounts (principal, account, created_at)
        SELECT p, printf('%012d', ROW_NUMBER() OVER (ORDER BY first, p)), first FROM (
            SELECT p, MIN(t) AS first FROM (
                SELECT principal AS p, created_at AS t FROM access_keys
                UNION ALL SELECT owner, created_at FROM images
                UNION ALL SELECT owner, started_at FROM microvms
            ) WHERE p != 'admin' GROUP BY p
        );
    ALTER TABLE images ADD COLUMN label TEXT NOT NULL DEFAULT '';
    UPDATE images SET label = name;
    CREATE UNIQUE INDEX images_by_owner_label ON images (owner, label);",
    // 6: usage. Each MicroVM adds up its time resident (holding vCPUs and memory) and
    // suspended, closed at every state change; `state_since` is when its state began.
    // MicroVMs that age out leave their usage to their principal's `retired_usage`.
    "ALTER TABLE microvms ADD COLUMN state_since REAL NOT NULL DEFAULT 0;
    ALTER TABLE microvms ADD COLUMN resident_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE microvms ADD COLUMN suspended_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE microvms ADD COLUMN snapshot_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE microvms SET state_since = COALESCE(terminated_at, started_at);
    CREATE TABLE retired_usage (
        owner TEXT PRIMARY KEY,
        microvms INTEGER NOT NULL,
        vcpu_seconds REAL NOT NULL,
        memory_gib_seconds REAL NOT NULL,
        suspended_seconds REAL NOT NULL
    );",
    // 7: the host each row tied to one machine's files and processes belongs to: a
    // MicroVM (its directory, QEMU and suspended session) and an image version (its build
    // and snapshot directories). Rows from before go to the host that migrates them
    // (`HOST_MIGRATION`).
    "ALTER TABLE microvms ADD COLUMN host TEXT NOT NULL DEFAULT '';
    ALTER TABLE image_versions ADD COLUMN host TEXT NOT NULL DEFAULT '';
    CREATE INDEX microvms_by_host ON microvms (host, state);
    CREATE INDEX image_versions_by_host ON image_versions (host, state);",
    // 8: vCPU growth. `vcpus` is what a MicroVM is granted now (its baseline unless it grew
    // while RUNNING), `vcpu_seconds` what it was granted over time, closed at every state
    // change and grant change; rows from before had their baseline all along.
    "ALTER TABLE microvms ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE microvms ADD COLUMN vcpu_seconds REAL NOT NULL DEFAULT 0;
    UPDATE microvms SET vcpus = (CASE WHEN memory_mib >= 4096 THEN memory_mib / 2048 ELSE 1 END),
        vcpu_seconds = resident_seconds * (CASE WHEN memory_mib >= 4096 THEN memory_mib / 2048 ELSE 1 END);",
    // 9: memory growth. `grown_mib` is the memory a MicroVM holds beyond its baseline (plugged
    // while RUNNING; a suspended session keeps it), `memory_gib_seconds` what it held over
    // time, closed at every state change and grant change; rows from before had their
    // baseline all along.
    "ALTER TABLE microvms ADD COLUMN grown_mib INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE microvms ADD COLUMN memory_gib_seconds REAL NOT NULL DEFAULT 0;
    UPDATE microvms SET memory_gib_seconds = resident_seconds * memory_mib / 1024.0;",
];

/// The migration that added `host` columns (its number): the rows that existed before get
/// the id of the host that runs it, in the same transaction.
const HOST_MIGRATION: usize = 7;

/// The tables [`HOST_MIGRATION`] gave a `host` column.
const HOST_TABLES: &[&str] = &["microvms", "image_versions"];

/// The metadata store of one host, in one SQLite file.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: String,
    host: String,
}

impl SqliteStore {
    /// Opens (creating) the database at `path` for host `host` (see [`super::host`]) and
    /// runs pending migrations. The file holds access key secrets, so it (and its WAL
    /// files) is readable by its owner only.
    pub fn open(path: &Path, host: &str) -> Result<SqliteStore, StoreError> {
        let p = path.display().to_string();
        owner_only(path).map_err(|source| StoreError::Permissions {
            path: p.clone(),
            source,
        })?;
        let err = |source| database_error(&p, source);
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
        )
        .map_err(err)?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            path: p,
            host: host.to_string(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| database_error(&self.path, source)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let done: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err())?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
            let tx = conn.transaction().map_err(self.err())?;
            tx.execute_batch(sql).map_err(self.err())?;
            if i + 1 == HOST_MIGRATION {
                for table in HOST_TABLES {
                    tx.execute(&format!("UPDATE {table} SET host = ?1"), [&self.host])
                        .map_err(self.err())?;
                }
            }
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(self.err())?;
            tx.commit().map_err(self.err())?;
            tracing::info!(migration = i + 1, "applied schema migration");
        }
        Ok(())
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        self.lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err())
    }
}

fn database_error(path: &str, source: rusqlite::Error) -> StoreError {
    StoreError::Database {
        store: path.to_string(),
        source: Box::new(source),
    }
}

impl Store for SqliteStore {
    fn host(&self) -> &str {
        &self.host
    }
}

impl ImageStore for SqliteStore {
    /// Inserts an image and its first version in one transaction; false if its owner has
    /// an image of that name already (or the key is taken).
    fn create_image(&self, image: &ImageRow, version: &VersionRow) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let inserted = tx
            .execute(
                "INSERT INTO images (name, state, created_at, updated_at, tags, next_version, owner, label)
                 VALUES (?1, ?2, ?3, ?4, ?5, 2, ?6, ?7) ON CONFLICT DO NOTHING",
                params![image.key, image.state, image.created_at, image.updated_at, image.tags.to_string(), image.owner, image.label],
            )
            .map_err(self.err())?;
        if inserted == 0 {
            return Ok(false);
        }
        insert_version(&tx, version, &self.host).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(true)
    }

    /// Allocates the next version number of `image` and inserts it; sets the image's state.
    fn add_version(
        &self,
        image: &str,
        image_state: &str,
        mut version: VersionRow,
    ) -> Result<VersionRow, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let next: i64 = tx
            .query_row(
                "SELECT next_version FROM images WHERE name = ?1",
                [image],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        version.version = next;
        tx.execute(
            "UPDATE images SET next_version = ?2, state = ?3, updated_at = ?4 WHERE name = ?1",
            params![image, next + 1, image_state, version.created_at],
        )
        .map_err(self.err())?;
        insert_version(&tx, &version, &self.host).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(version)
    }

    /// One image by its store key.
    fn image(&self, key: &str) -> Result<Option<ImageRow>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} WHERE i.name = ?1"),
                [key],
                image_row,
            )
            .optional()
            .map_err(self.err())
    }

    /// The image named `label` in `account`.
    fn image_in(&self, account: &str, label: &str) -> Result<Option<ImageRow>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} WHERE a.account = ?1 AND i.label = ?2"),
                [account, label],
                image_row,
            )
            .optional()
            .map_err(self.err())
    }

    /// Images ordered by account, then name, at most `limit`; only `owner`'s when given.
    fn images(
        &self,
        name_filter: Option<&str>,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ImageRow>, StoreError> {
        // Containment without `instr` (SQLite) or `strpos` (PostgreSQL): the name changes
        // when the filter is taken out of it. Every name contains the empty filter.
        let contains = name_filter.filter(|f| !f.is_empty());
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {IMAGE_COLUMNS}
                 WHERE (?1 IS NULL OR REPLACE(i.label, ?1, '') <> i.label)
                 AND (?2 IS NULL OR i.owner = ?2)
                 ORDER BY a.account, i.label LIMIT ?3"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![contains, owner, limit as i64], image_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Sets an image's state.
    fn set_image_state(&self, name: &str, state: &str, now: f64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE images SET state = ?2, updated_at = ?3 WHERE name = ?1",
                params![name, state, now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Replaces an image's tags.
    fn set_tags(&self, name: &str, tags: &serde_json::Value) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE images SET tags = ?2 WHERE name = ?1",
                params![name, tags.to_string()],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Deletes an image and its versions.
    fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM images WHERE name = ?1", [name])
            .map(drop)
            .map_err(self.err())
    }

    /// One version.
    fn version(&self, image: &str, version: i64) -> Result<Option<VersionRow>, StoreError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                &format!("SELECT {VERSION_COLUMNS} FROM image_versions WHERE image = ?1 AND version = ?2"),
                params![image, version],
                version_row,
            )
            .optional()
            .map_err(self.err())?;
        Ok(row)
    }

    /// Versions of an image, ascending, after version `after`, at most `limit`.
    fn versions(
        &self,
        image: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {VERSION_COLUMNS} FROM image_versions WHERE image = ?1 AND version > ?2
                 ORDER BY version LIMIT ?3"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![image, after, limit as i64], version_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn host_versions(&self, states: &[&str]) -> Result<Vec<VersionRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {VERSION_COLUMNS} FROM image_versions WHERE host = ?1 AND state IN ({})
                 ORDER BY image, version",
                placeholders(2, states.len())
            ))
            .map_err(self.err())?;
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&self.host];
        values.extend(states.iter().map(|s| s as &dyn rusqlite::ToSql));
        let rows = stmt
            .query_map(values.as_slice(), version_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Records a version's build progress.
    fn set_version_state(
        &self,
        image: &str,
        version: i64,
        state: &str,
        build_state: &str,
        reason: Option<&str>,
        now: f64,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE image_versions SET state = ?3, build_state = ?4, state_reason = ?5, updated_at = ?6
                 WHERE image = ?1 AND version = ?2",
                params![image, version, state, build_state, reason, now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Records a finished build's snapshot and sizes.
    fn set_version_snapshot(
        &self,
        image: &str,
        version: i64,
        dir: &str,
        memory_bytes: i64,
        disk_bytes: i64,
        code_bytes: i64,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE image_versions SET snapshot_dir = ?3, memory_bytes = ?4, disk_bytes = ?5, code_bytes = ?6
                 WHERE image = ?1 AND version = ?2",
                params![image, version, dir, memory_bytes, disk_bytes, code_bytes],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Sets a version's ACTIVE/INACTIVE status.
    fn set_version_status(
        &self,
        image: &str,
        version: i64,
        status: &str,
        now: f64,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE image_versions SET status = ?3, updated_at = ?4 WHERE image = ?1 AND version = ?2",
                params![image, version, status, now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Deletes one version.
    fn delete_version(&self, image: &str, version: i64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM image_versions WHERE image = ?1 AND version = ?2",
                params![image, version],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// The highest version in `state` (and, if given, `status`).
    fn latest_version(
        &self,
        image: &str,
        state: &str,
        status: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        self.lock()
            .query_row(
                "SELECT MAX(version) FROM image_versions WHERE image = ?1 AND state = ?2
                 AND (?3 IS NULL OR status = ?3)",
                params![image, state, status],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map_err(self.err())
    }
}

impl TokenStore for SqliteStore {
    /// The response stored for an idempotency token, with the hash of the request it answered.
    fn client_token(
        &self,
        token: &str,
        operation: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        self.lock()
            .query_row(
                "SELECT request_hash, response FROM client_tokens WHERE token = ?1 AND operation = ?2",
                params![token, operation],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())
    }

    /// Remembers the response to an idempotent request.
    fn put_client_token(
        &self,
        token: &str,
        operation: &str,
        request_hash: &str,
        response: &str,
        now: f64,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO client_tokens (token, operation, request_hash, response, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (token, operation) DO UPDATE SET request_hash = excluded.request_hash,
                   response = excluded.response, created_at = excluded.created_at",
                params![token, operation, request_hash, response, now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Forgets the idempotency tokens recorded before `before`; how many there were.
    fn expire_client_tokens(&self, before: f64) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM client_tokens WHERE created_at < ?1",
                params![before],
            )
            .map_err(self.err())
    }

    /// Forgets an idempotency token, so a retry with it runs the request anew.
    fn forget_client_token(&self, token: &str, operation: &str) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM client_tokens WHERE token = ?1 AND operation = ?2",
                params![token, operation],
            )
            .map(drop)
            .map_err(self.err())
    }
}

/// The states in which a MicroVM holds its vCPUs and memory on the host.
const RESIDENT_STATES: &str = "('PENDING', 'RUNNING', 'SUSPENDING', 'TERMINATING')";

/// A MicroVM's vCPUs in SQL (portable: no two-argument MAX), as its image's app VM was sized (see
/// `kiln_image::build::vcpus_for`): one per 2 GiB of memory, at least one.
const VCPUS: &str = "(CASE WHEN memory_mib >= 4096 THEN memory_mib / 2048 ELSE 1 END)";

/// The memory in GiB a MicroVM holds while resident, in SQL: its baseline and its growth.
const MEMORY_GIB: &str = "((memory_mib + grown_mib) / 1024.0)";

/// [`VCPUS`] of the MicroVM an insert records (its memory is parameter 10).
const BASELINE_OF_NEW: &str = "(CASE WHEN ?10 >= 4096 THEN ?10 / 2048 ELSE 1 END)";

/// The resident seconds a row has not counted yet at time `at` (an SQL parameter): its time
/// in a resident state since `state_since`.
fn open_resident(at: &str) -> String {
    format!(
        "(CASE WHEN state IN {RESIDENT_STATES} AND {at} > state_since THEN {at} - state_since ELSE 0 END)"
    )
}

/// SQL assignments that count a row's uncounted resident time at `at` (an SQL parameter)
/// into its resident seconds, vCPU-seconds (at its grant) and GiB-seconds (at what it holds),
/// each followed by a comma; the statement must also move `state_since`.
fn close_account(at: &str) -> String {
    let open = open_resident(at);
    format!(
        "resident_seconds = resident_seconds + {open},
         vcpu_seconds = vcpu_seconds + {open} * vcpus,
         memory_gib_seconds = memory_gib_seconds + {open} * {MEMORY_GIB},"
    )
}

const MICROVM_COLUMNS: &str =
    "id, image, version, state, state_reason, request, started_at, terminated_at,
    max_duration, memory_mib, kernel, dir, forwards, owner";

fn microvm_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MicrovmRow> {
    Ok(MicrovmRow {
        id: r.get(0)?,
        image: r.get(1)?,
        version: r.get(2)?,
        state: {
            let s: String = r.get(3)?;
            MicrovmState::from_wire(&s).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    3,
                    rusqlite::types::Type::Text,
                    format!("unknown MicroVM state {s:?}").into(),
                )
            })?
        },
        state_reason: r.get(4)?,
        request: json_column(r.get(5)?),
        started_at: r.get(6)?,
        terminated_at: r.get(7)?,
        max_duration: r.get(8)?,
        memory_mib: r.get(9)?,
        kernel: r.get(10)?,
        dir: r.get(11)?,
        forwards: json_column(r.get(12)?),
        owner: r.get(13)?,
    })
}

impl MicrovmStore for SqliteStore {
    /// Records a new MicroVM.
    fn insert_microvm(&self, m: &MicrovmRow) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!("INSERT INTO microvms ({MICROVM_COLUMNS}, state_since, host, vcpus) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?7, ?15, {BASELINE_OF_NEW})"),
                params![
                    m.id, m.image, m.version, m.state.as_str(), m.state_reason, m.request.to_string(), m.started_at,
                    m.terminated_at, m.max_duration, m.memory_mib, m.kernel, m.dir, m.forwards.to_string(),
                    m.owner, self.host
                ],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// One MicroVM.
    fn microvm(&self, id: &str) -> Result<Option<MicrovmRow>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {MICROVM_COLUMNS} FROM microvms WHERE id = ?1"),
                [id],
                microvm_row,
            )
            .optional()
            .map_err(self.err())
    }

    /// MicroVMs ordered by id, optionally of one image (and version), or in given states.
    fn microvms(
        &self,
        image: Option<&str>,
        version: Option<i64>,
        states: Option<&[MicrovmState]>,
    ) -> Result<Vec<MicrovmRow>, StoreError> {
        let conn = self.lock();
        let state_filter = states
            .map(|s| {
                format!(
                    "AND state IN ({})",
                    s.iter()
                        .map(|x| format!("'{}'", x.as_str()))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .unwrap_or_default();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {MICROVM_COLUMNS} FROM microvms WHERE (?1 IS NULL OR image = ?1)
                 AND (?2 IS NULL OR version = ?2) {state_filter} ORDER BY id"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![image, version], microvm_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn host_microvms(&self, states: &[MicrovmState]) -> Result<Vec<MicrovmRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {MICROVM_COLUMNS} FROM microvms WHERE host = ?1 AND state IN ({})
                 ORDER BY id",
                placeholders(2, states.len())
            ))
            .map_err(self.err())?;
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&self.host];
        values.extend(names.iter().map(|s| s as &dyn rusqlite::ToSql));
        let rows = stmt
            .query_map(values.as_slice(), microvm_row)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// How many MicroVMs the store holds in each state (terminated ones included).
    fn microvm_state_counts(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT state, COUNT(*) FROM microvms GROUP BY state")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn transition_microvm_at(
        &self,
        id: &str,
        from: MicrovmState,
        to: MicrovmState,
        reason: Reason<'_>,
        terminated_at: Option<f64>,
        now: f64,
    ) -> Result<bool, StoreError> {
        let (keep, text) = match reason {
            Reason::Keep => (1, None),
            Reason::Clear => (0, None),
            Reason::Set(r) => (0, Some(r)),
        };
        // The time in the state it leaves goes to its usage (SQLite reads the old row on
        // the right of every `=`); a saved session's size counts only while SUSPENDED.
        self.lock()
            .execute(
                &format!(
                    "UPDATE microvms SET state = ?3,
                   state_reason = CASE WHEN ?4 = 1 THEN state_reason ELSE ?5 END,
                   terminated_at = COALESCE(?6, terminated_at),
                   {close}
                   vcpus = CASE WHEN ?3 = 'RUNNING' THEN vcpus ELSE {VCPUS} END,
                   suspended_seconds = suspended_seconds
                     + CASE WHEN state = 'SUSPENDED' AND ?7 > state_since THEN ?7 - state_since ELSE 0 END,
                   snapshot_bytes = CASE WHEN ?3 = 'SUSPENDED' THEN snapshot_bytes ELSE 0 END,
                   state_since = ?7
                 WHERE id = ?1 AND state = ?2",
                    close = close_account("?7")
                ),
                params![
                    id,
                    from.as_str(),
                    to.as_str(),
                    keep,
                    text,
                    terminated_at,
                    now
                ],
            )
            .map(|n| n == 1)
            .map_err(self.err())
    }

    /// Forgets the MicroVMs TERMINATED before `before`, their usage kept in their
    /// principals' retired totals; their ids.
    fn expire_terminated_microvms(&self, before: f64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        tx.execute(
            "INSERT INTO retired_usage
               (owner, microvms, vcpu_seconds, memory_gib_seconds, suspended_seconds)
             SELECT owner, COUNT(*), SUM(vcpu_seconds),
                    SUM(memory_gib_seconds), SUM(suspended_seconds)
               FROM microvms WHERE state = 'TERMINATED' AND terminated_at < ?1 AND host = ?2
               GROUP BY owner
             ON CONFLICT (owner) DO UPDATE SET
               microvms = retired_usage.microvms + excluded.microvms,
               vcpu_seconds = retired_usage.vcpu_seconds + excluded.vcpu_seconds,
               memory_gib_seconds = retired_usage.memory_gib_seconds + excluded.memory_gib_seconds,
               suspended_seconds = retired_usage.suspended_seconds + excluded.suspended_seconds",
            params![before, self.host],
        )
        .map_err(self.err())?;
        let ids = {
            let mut stmt = tx
                .prepare(
                    "DELETE FROM microvms WHERE state = 'TERMINATED' AND terminated_at < ?1
                     AND host = ?2 RETURNING id",
                )
                .map_err(self.err())?;
            let rows = stmt
                .query_map(params![before, self.host], |r| r.get(0))
                .map_err(self.err())?;
            rows.collect::<Result<Vec<String>, _>>()
                .map_err(self.err())?
        };
        tx.commit().map_err(self.err())?;
        Ok(ids)
    }

    /// Records the size on disk of a MicroVM's saved session (counted while SUSPENDED).
    fn set_microvm_snapshot_bytes(&self, id: &str, bytes: u64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE microvms SET snapshot_bytes = ?2 WHERE id = ?1 AND state = 'SUSPENDED'",
                params![id, i64::try_from(bytes).unwrap_or(i64::MAX)],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Closes a resident MicroVM's account at the memory it held and counts `grown_mib`
    /// beyond its baseline from `now` on (a suspended session keeps what it held).
    fn set_microvm_memory(&self, id: &str, grown_mib: u64, now: f64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "UPDATE microvms SET
                   {close}
                   grown_mib = ?2,
                   state_since = MAX(state_since, ?3)
                 WHERE id = ?1 AND state IN {RESIDENT_STATES}",
                    close = close_account("?3")
                ),
                params![id, i64::try_from(grown_mib).unwrap_or(i64::MAX), now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// The memory a MicroVM holds beyond its baseline, MiB (0 for none).
    fn microvm_grown_mib(&self, id: &str) -> Result<u64, StoreError> {
        let grown: Option<i64> = self
            .lock()
            .query_row(
                "SELECT grown_mib FROM microvms WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        Ok(grown.unwrap_or(0).max(0) as u64)
    }

    /// Closes a RUNNING MicroVM's account at its old grant and counts `vcpus` from `now` on
    /// (`state_since` moves: it marks where the uncounted time starts).
    fn set_microvm_vcpus(&self, id: &str, vcpus: u32, now: f64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "UPDATE microvms SET
                   {close}
                   vcpus = ?2,
                   state_since = MAX(state_since, ?3)
                 WHERE id = ?1 AND state = 'RUNNING'",
                    close = close_account("?3")
                ),
                params![id, vcpus, now],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// The usage of `owner`'s MicroVMs (everyone's for `None`) up to `now`: each one the
    /// store remembers, and the totals of those that aged out, by principal.
    fn usage(&self, owner: Option<&str>, now: f64) -> Result<UsageReport, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, owner, state, memory_mib, vcpus,
                   resident_seconds + {open},
                   suspended_seconds
                     + CASE WHEN state = 'SUSPENDED' AND ?2 > state_since THEN ?2 - state_since ELSE 0 END,
                   snapshot_bytes, vcpu_seconds + {open} * vcpus, {VCPUS},
                   memory_gib_seconds + {open} * {MEMORY_GIB}, grown_mib
                 FROM microvms WHERE ?1 IS NULL OR owner = ?1 ORDER BY started_at, id",
                open = open_resident("?2")
            ))
            .map_err(self.err())?;
        let microvms = stmt
            .query_map(params![owner, now], |r| {
                let memory_mib: i64 = r.get(3)?;
                let vcpus: i64 = r.get(4)?;
                Ok(MicrovmUsage {
                    id: r.get(0)?,
                    owner: r.get(1)?,
                    state: r.get(2)?,
                    memory_mib,
                    baseline_vcpus: r.get(9)?,
                    vcpus,
                    granted_memory_mib: memory_mib + r.get::<_, i64>(11)?.max(0),
                    resident_seconds: r.get(5)?,
                    vcpu_seconds: r.get(8)?,
                    memory_gib_seconds: r.get(10)?,
                    suspended_seconds: r.get(6)?,
                    snapshot_bytes: r.get::<_, i64>(7)?.max(0) as u64,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut stmt = conn
            .prepare(
                "SELECT owner, microvms, vcpu_seconds, memory_gib_seconds, suspended_seconds
                 FROM retired_usage WHERE ?1 IS NULL OR owner = ?1 ORDER BY owner",
            )
            .map_err(self.err())?;
        let retired = stmt
            .query_map(params![owner], |r| {
                Ok(RetiredUsage {
                    owner: r.get(0)?,
                    microvms: r.get::<_, i64>(1)?.max(0) as u64,
                    vcpu_seconds: r.get(2)?,
                    memory_gib_seconds: r.get(3)?,
                    suspended_seconds: r.get(4)?,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(UsageReport { microvms, retired })
    }

    /// Replaces a MicroVM's forwards.
    fn set_microvm_forwards(
        &self,
        id: &str,
        forwards: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE microvms SET forwards = ?2 WHERE id = ?1",
                params![id, forwards.to_string()],
            )
            .map(drop)
            .map_err(self.err())
    }
}

const ACCESS_KEY_COLUMNS: &str = "id, secret, principal, created_at, revoked_at";

fn access_key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccessKeyRow> {
    Ok(AccessKeyRow {
        id: r.get(0)?,
        secret: r.get(1)?,
        principal: r.get(2)?,
        created_at: r.get(3)?,
        revoked_at: r.get(4)?,
    })
}

impl AccessStore for SqliteStore {
    /// Records a new access key.
    fn insert_access_key(&self, k: &AccessKeyRow) -> Result<(), StoreError> {
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO access_keys ({ACCESS_KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                params![k.id, k.secret, k.principal, k.created_at, k.revoked_at],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// One access key, revoked or not.
    fn access_key(&self, id: &str) -> Result<Option<AccessKeyRow>, StoreError> {
        self.lock()
            .query_row(
                &format!("SELECT {ACCESS_KEY_COLUMNS} FROM access_keys WHERE id = ?1"),
                [id],
                access_key_row,
            )
            .optional()
            .map_err(self.err())
    }

    /// Every access key, oldest first.
    fn access_keys(&self) -> Result<Vec<AccessKeyRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ACCESS_KEY_COLUMNS} FROM access_keys ORDER BY created_at, id"
            ))
            .map_err(self.err())?;
        let rows = stmt.query_map([], access_key_row).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Revokes a key (idempotent), unless it is the last active key of `protected`: checked
    /// and changed in one transaction, so two revocations at once cannot both pass.
    fn revoke_access_key(
        &self,
        id: &str,
        protected: &str,
        now: f64,
    ) -> Result<Revocation, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let Some(mut key) = tx
            .query_row(
                &format!("SELECT {ACCESS_KEY_COLUMNS} FROM access_keys WHERE id = ?1"),
                [id],
                access_key_row,
            )
            .optional()
            .map_err(self.err())?
        else {
            return Ok(Revocation::NotFound);
        };
        if key.revoked_at.is_some() {
            return Ok(Revocation::Revoked(key));
        }
        if key.principal == protected {
            let active: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM access_keys WHERE principal = ?1 AND revoked_at IS NULL",
                    [protected],
                    |r| r.get(0),
                )
                .map_err(self.err())?;
            if active <= 1 {
                return Ok(Revocation::LastOfPrincipal(key));
            }
        }
        tx.execute(
            "UPDATE access_keys SET revoked_at = ?2 WHERE id = ?1",
            params![id, now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        key.revoked_at = Some(now);
        Ok(Revocation::Revoked(key))
    }

    /// The account of `principal`, if it has one yet.
    fn account_of(&self, principal: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .query_row(
                "SELECT account FROM accounts WHERE principal = ?1",
                [principal],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    /// The account of `principal`, allocated now if it has none: the next number after
    /// the highest any principal but admin holds, skipping one that is taken (admin's
    /// configured account may be anything).
    fn ensure_account(&self, principal: &str, now: f64) -> Result<String, StoreError> {
        if let Some(account) = self.account_of(principal)? {
            return Ok(account);
        }
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        if let Some(account) = tx
            .query_row(
                "SELECT account FROM accounts WHERE principal = ?1",
                [principal],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(self.err())?
        {
            return Ok(account);
        }
        let mut next: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(CAST(account AS BIGINT)), 0) + 1 FROM accounts WHERE principal != ?1",
                [crate::auth::keys::ADMIN],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        let account = loop {
            let candidate = format!("{next:012}");
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM accounts WHERE account = ?1)",
                    [&candidate],
                    |r| r.get(0),
                )
                .map_err(self.err())?;
            if !taken {
                break candidate;
            }
            next += 1;
        };
        tx.execute(
            "INSERT INTO accounts (principal, account, created_at) VALUES (?1, ?2, ?3)",
            params![principal, account, now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(account)
    }

    /// Gives `principal` the account `account` (admin's comes from `--account` at every
    /// start); refused when another principal holds it.
    fn set_account(&self, principal: &str, account: &str, now: f64) -> Result<(), AccountError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let holder: Option<String> = tx
            .query_row(
                "SELECT principal FROM accounts WHERE account = ?1",
                [account],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        match holder {
            Some(holder) if holder == principal => return Ok(()),
            Some(holder) => {
                return Err(AccountError::Taken {
                    account: account.to_string(),
                    holder,
                })
            }
            None => {}
        }
        tx.execute(
            "INSERT INTO accounts (principal, account, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (principal) DO UPDATE SET account = excluded.account",
            params![principal, account, now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(())
    }
}

const AUDIT_COLUMNS: &str =
    "id, time, principal, access_key_id, owner, operation, target, result, reason";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        time: r.get(1)?,
        principal: r.get(2)?,
        access_key_id: r.get(3)?,
        owner: r.get(4)?,
        operation: r.get(5)?,
        target: r.get(6)?,
        result: r.get(7)?,
        reason: r.get(8)?,
    })
}

impl AuditStore for SqliteStore {
    /// Appends an audit event; returns its id.
    fn insert_audit_event(&self, e: &AuditRow) -> Result<i64, StoreError> {
        self.lock()
            .query_row(
            "INSERT INTO audit_events (time, principal, access_key_id, owner, operation, target, result, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            params![
                e.time,
                e.principal,
                e.access_key_id,
                e.owner,
                e.operation,
                e.target,
                e.result,
                e.reason
            ],
            |r| r.get(0),
        )
        .map_err(self.err())
    }

    /// Audit events in the order they happened (see [`AuditQuery`] for which).
    fn audit_events(&self, q: &AuditQuery<'_>) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.lock();
        let newest = q.since.is_none() && q.after.is_none();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_events
                 WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR id > ?2)
                 AND (?3 IS NULL OR owner = ?3)
                 ORDER BY id {} LIMIT ?4",
                if newest { "DESC" } else { "ASC" }
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(
                params![q.since, q.after, q.owner, q.limit as i64],
                audit_row,
            )
            .map_err(self.err())?;
        let mut events: Vec<AuditRow> = rows.collect::<Result<_, _>>().map_err(self.err())?;
        if newest {
            events.reverse();
        }
        Ok(events)
    }
}

/// Creates `path` readable by its owner only, or takes group and other access away from
/// an existing database and its WAL files (SQLite gives new WAL files the database's mode).
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::metadata(&file) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const VERSION_COLUMNS: &str =
    "image, version, state, status, state_reason, spec, created_at, updated_at,
    build_id, build_state, snapshot_dir, memory_bytes, disk_bytes, code_bytes";

fn insert_version(
    tx: &rusqlite::Transaction<'_>,
    v: &VersionRow,
    host: &str,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO image_versions (image, version, state, status, state_reason, spec, created_at,
            updated_at, build_id, build_state, snapshot_dir, memory_bytes, disk_bytes, code_bytes, host)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            v.image,
            v.version,
            v.state,
            v.status,
            v.state_reason,
            v.spec.to_string(),
            v.created_at,
            v.updated_at,
            v.build_id,
            v.build_state,
            v.snapshot_dir,
            v.memory_bytes,
            v.disk_bytes,
            v.code_bytes,
            host
        ],
    )
}

/// `?first, ?first+1, …`: `n` numbered placeholders for an `IN (…)` list (`NULL` when
/// empty, which matches nothing).
fn placeholders(first: usize, n: usize) -> String {
    if n == 0 {
        return "NULL".to_string();
    }
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_column(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// An image with its owner's account: `SELECT {IMAGE_COLUMNS} WHERE …`.
const IMAGE_COLUMNS: &str =
    "i.name, i.state, i.created_at, i.updated_at, i.tags, i.owner, i.label, COALESCE(a.account, '')
     FROM images i LEFT JOIN accounts a ON a.principal = i.owner";

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        key: r.get(0)?,
        state: r.get(1)?,
        created_at: r.get(2)?,
        updated_at: r.get(3)?,
        tags: json_column(r.get(4)?),
        owner: r.get(5)?,
        label: r.get(6)?,
        account: r.get(7)?,
    })
}

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        image: r.get(0)?,
        version: r.get(1)?,
        state: r.get(2)?,
        status: r.get(3)?,
        state_reason: r.get(4)?,
        spec: json_column(r.get(5)?),
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        build_id: r.get(8)?,
        build_state: r.get(9)?,
        snapshot_dir: r.get(10)?,
        memory_bytes: r.get(11)?,
        disk_bytes: r.get(12)?,
        code_bytes: r.get(13)?,
    })
}

/// MicroVM states that hold a quota slot: every state before TERMINATING.
const HOLDING_STATES: &str = "('PENDING', 'RUNNING', 'SUSPENDING', 'SUSPENDED')";

impl QuotaStore for SqliteStore {
    /// What `owner` holds: MicroVMs (and memory) not ending, images, versions, builds.
    fn owner_counts(&self, owner: &str) -> Result<OwnerCounts, StoreError> {
        let conn = self.lock();
        let count = |sql: &str| -> Result<u64, StoreError> {
            conn.query_row(sql, [owner], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(self.err())
        };
        Ok(OwnerCounts {
            microvms: count(&format!(
                "SELECT COUNT(*) FROM microvms WHERE owner = ?1 AND state IN {HOLDING_STATES}"
            ))?,
            // Baseline and growth: a session keeps what it grew to while suspended.
            memory_mib: count(&format!(
                "SELECT COALESCE(SUM(memory_mib + COALESCE(grown_mib, 0)), 0) FROM microvms
                 WHERE owner = ?1 AND state IN {HOLDING_STATES}"
            ))?,
            images: count("SELECT COUNT(*) FROM images WHERE owner = ?1")?,
            most_versions: count(
                "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM image_versions v
                 JOIN images i ON v.image = i.name WHERE i.owner = ?1 GROUP BY v.image)",
            )?,
            building: count(
                "SELECT COUNT(*) FROM image_versions v JOIN images i ON v.image = i.name
                 WHERE i.owner = ?1 AND v.state IN ('PENDING', 'IN_PROGRESS')",
            )?,
        })
    }

    /// How many versions `image` has.
    fn version_count(&self, image: &str) -> Result<u64, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM image_versions WHERE image = ?1",
                [image],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(self.err())
    }

    /// Names of `owner`'s images.
    fn owned_image_names(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT name FROM images WHERE owner = ?1 ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt.query_map([owner], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Directories of `owner`'s MicroVMs that are suspending or suspended.
    fn owned_suspended_dirs(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT dir FROM microvms WHERE owner = ?1 AND host = ?2
                 AND state IN ('SUSPENDING', 'SUSPENDED')",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([owner, &self.host], |r| r.get(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{image_key, image_keys};

    /// The host the tests' stores act for.
    pub(super) const HOST: &str = "host-a";

    fn version(image: &str) -> VersionRow {
        VersionRow {
            image: image.into(),
            version: 1,
            state: "PENDING".into(),
            status: "ACTIVE".into(),
            state_reason: None,
            spec: serde_json::json!({"codeArtifact": {"uri": "file:///a.zip"}}),
            created_at: 1.0,
            updated_at: None,
            build_id: "b1".into(),
            build_state: "PENDING".into(),
            snapshot_dir: None,
            memory_bytes: None,
            disk_bytes: None,
            code_bytes: None,
        }
    }

    fn image(name: &str) -> ImageRow {
        ImageRow {
            key: name.into(),
            label: name.into(),
            account: String::new(),
            state: "CREATING".into(),
            created_at: 1.0,
            updated_at: None,
            tags: serde_json::json!({}),
            owner: "admin".into(),
        }
    }

    fn microvm(id: &str, owner: &str, state: &str, memory_mib: i64) -> MicrovmRow {
        MicrovmRow {
            id: id.into(),
            image: "app".into(),
            version: 1,
            state: MicrovmState::from_wire(state).expect("state"),
            state_reason: None,
            request: serde_json::json!({}),
            started_at: 1.0,
            terminated_at: None,
            max_duration: 60,
            memory_mib,
            kernel: "k".into(),
            dir: format!("/nonexistent/{id}"),
            forwards: serde_json::json!({}),
            owner: owner.into(),
        }
    }

    #[test]
    fn owner_counts_when_mixed_states_and_owners_then_counts_only_what_the_owner_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        let alices = ImageRow {
            owner: "alice".into(),
            ..image("app")
        };
        store
            .create_image(&alices, &version("app"))
            .expect("create");
        store
            .add_version("app", "UPDATING", version("app"))
            .expect("v2");
        store
            .create_image(&image("other"), &version("other"))
            .expect("create");
        for (id, owner, state) in [
            ("m1", "alice", "RUNNING"),
            ("m2", "alice", "RUNNING"),
            ("m3", "alice", "PENDING"),
            ("m4", "alice", "TERMINATED"),
            ("m5", "alice", "TERMINATING"),
            ("m6", "bob", "RUNNING"),
        ] {
            store
                .insert_microvm(&microvm(id, owner, state, 256))
                .expect("insert");
        }
        // Grown: the running one by 128 MiB, the suspended one kept 64; the ended one's
        // growth no longer counts.
        for (id, grown) in [("m1", 128), ("m2", 64), ("m4", 512)] {
            store.set_microvm_memory(id, grown, 1.0).expect("grown");
        }
        store
            .transition_microvm(
                "m2",
                MicrovmState::Running,
                MicrovmState::Suspended,
                Reason::Keep,
                None,
            )
            .expect("suspended");

        let counts = store.owner_counts("alice").expect("counts");

        assert_eq!(
            counts,
            OwnerCounts {
                microvms: 3,
                memory_mib: 768 + 128 + 64,
                images: 1,
                most_versions: 2,
                building: 2,
            }
        );
        assert_eq!(store.version_count("app").expect("versions"), 2);
        assert_eq!(
            store.owned_suspended_dirs("alice").expect("dirs"),
            vec!["/nonexistent/m2".to_string()]
        );
        assert_eq!(
            store.owner_counts("carol").expect("none"),
            OwnerCounts::default()
        );
    }

    #[test]
    fn open_when_reopened_then_migrations_run_once_and_data_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("kiln.db");
        let store = SqliteStore::open(&db, HOST).expect("open");
        store
            .create_image(&image("app"), &version("app"))
            .expect("create");
        drop(store);

        let again = SqliteStore::open(&db, HOST).expect("reopen");

        assert_eq!(again.schema_version().expect("version"), MIGRATIONS.len());
        assert_eq!(
            again.image("app").expect("get").expect("row").state,
            "CREATING"
        );
    }

    #[test]
    fn add_version_when_called_twice_then_numbers_increase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        store
            .create_image(&image("app"), &version("app"))
            .expect("create");

        let v2 = store
            .add_version("app", "UPDATING", version("app"))
            .expect("v2");
        let v3 = store
            .add_version("app", "UPDATING", version("app"))
            .expect("v3");

        assert_eq!((v2.version, v3.version), (2, 3));
        assert_eq!(store.versions("app", 0, 10).expect("list").len(), 3);
    }

    #[test]
    fn open_when_schema_2_holds_images_then_they_belong_to_admin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&db).expect("sqlite");
            conn.execute_batch(&MIGRATIONS[..2].join(";"))
                .expect("schema 2");
            conn.execute_batch(
                "INSERT INTO images (name, state, created_at) VALUES ('old', 'CREATED', 1);
                 PRAGMA user_version = 2;",
            )
            .expect("old row");
        }

        let store = SqliteStore::open(&db, HOST).expect("migrate");

        assert_eq!(
            store.image("old").expect("get").expect("row").owner,
            "admin"
        );
        assert_eq!(
            store.images(None, Some("alice"), 10).expect("list").len(),
            0
        );
    }

    #[test]
    fn open_when_new_then_the_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("kiln.db");

        let _store = SqliteStore::open(&db, HOST).expect("open");

        for file in ["kiln.db", "kiln.db-wal", "kiln.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .expect(file)
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
        }
    }

    #[test]
    fn create_image_when_name_taken_then_false() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        store
            .create_image(&image("app"), &version("app"))
            .expect("create");

        let again = store
            .create_image(&image("app"), &version("app"))
            .expect("create again");

        assert!(!again);
    }

    fn owned(label: &str, owner: &str, account: &str) -> ImageRow {
        ImageRow {
            key: image_key(label, account),
            owner: owner.into(),
            ..image(label)
        }
    }

    #[test]
    fn create_image_when_two_accounts_use_one_name_then_each_has_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        let alice = store.ensure_account("alice", 1.0).expect("alice");
        let bob = store.ensure_account("bob", 1.0).expect("bob");
        let a = owned("app", "alice", &alice);
        let b = owned("app", "bob", &bob);

        let created = (
            store.create_image(&a, &version(&a.key)).expect("alice's"),
            store.create_image(&b, &version(&b.key)).expect("bob's"),
            store
                .create_image(&owned("app", "alice", "x"), &version("app@x"))
                .expect("alice's again"),
        );

        assert_eq!(created, (true, true, false));
        assert_eq!(
            (alice.as_str(), bob.as_str()),
            ("000000000001", "000000000002")
        );
        let found = store
            .image_in(&bob, "app")
            .expect("get")
            .expect("bob's app");
        assert_eq!(
            (found.key.as_str(), found.owner.as_str()),
            (b.key.as_str(), "bob")
        );
        assert_eq!(found.account, bob);
        assert!(store
            .image_in("000000000000", "app")
            .expect("get")
            .is_none());
        assert_eq!(
            store.images(None, Some("alice"), 10).expect("list").len(),
            1
        );
        assert_eq!(store.images(Some("ap"), None, 10).expect("list").len(), 2);
    }

    #[test]
    fn ensure_account_when_admin_holds_the_next_number_then_it_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        store
            .set_account("admin", "000000000001", 1.0)
            .expect("admin");

        let alice = store.ensure_account("alice", 1.0).expect("alice");
        let again = store.ensure_account("alice", 2.0).expect("alice again");
        let taken = store
            .set_account("admin", &alice, 3.0)
            .expect_err("alice's");

        assert_eq!(
            (alice.as_str(), again.as_str()),
            ("000000000002", "000000000002")
        );
        assert!(matches!(taken, AccountError::Taken { holder, .. } if holder == "alice"));
        assert_eq!(
            store.account_of("admin").expect("admin").as_deref(),
            Some("000000000001")
        );
    }

    #[test]
    fn open_when_schema_4_holds_principals_then_each_gets_an_account_and_keeps_its_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&db).expect("sqlite");
            conn.execute_batch(&MIGRATIONS[..4].join(";"))
                .expect("schema 4");
            conn.execute_batch(
                "INSERT INTO access_keys VALUES ('AKIA1', 's', 'bob', 5, NULL);
                 INSERT INTO images (name, state, created_at, owner) VALUES ('old', 'CREATED', 1, 'admin');
                 INSERT INTO images (name, state, created_at, owner) VALUES ('web', 'CREATED', 2, 'alice');
                 PRAGMA user_version = 4;",
            )
            .expect("old rows");
        }

        let store = SqliteStore::open(&db, HOST).expect("migrate");

        let web = store.image("web").expect("get").expect("alice's web");
        assert_eq!(
            (web.label.as_str(), web.account.as_str()),
            ("web", "000000000001")
        );
        let old = store
            .image_in("000000000000", "old")
            .expect("get")
            .expect("admin's old");
        assert_eq!(old.key, "old");
        assert_eq!(
            store.account_of("bob").expect("bob").as_deref(),
            Some("000000000002")
        );
        assert_eq!(
            store.ensure_account("carol", 9.0).expect("carol"),
            "000000000003"
        );
    }

    #[test]
    fn image_keys_when_an_older_image_of_another_principal_holds_the_name_then_admin_qualifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        let alice = store.ensure_account("alice", 1.0).expect("alice");
        let older = ImageRow {
            owner: "alice".into(),
            ..image("app")
        };
        store
            .create_image(&older, &version("app"))
            .expect("alice's");

        let keys = image_keys("app", "000000000000", true);
        let plain = owned("app", "admin", "000000000000");
        let tried: Vec<bool> = keys
            .iter()
            .map(|key| {
                let row = ImageRow {
                    key: key.clone(),
                    ..plain.clone()
                };
                store.create_image(&row, &version(key)).expect("create")
            })
            .collect();

        assert_eq!(
            keys,
            vec!["app".to_string(), "app@000000000000".to_string()]
        );
        assert_eq!(tried, vec![false, true]);
        assert_eq!(
            image_keys("app", &alice, false),
            vec![format!("app@{alice}")]
        );
        let admins = store
            .image_in("000000000000", "app")
            .expect("get")
            .expect("admin's");
        assert_eq!(admins.key, "app@000000000000");
    }
}

#[cfg(test)]
mod host_tests {
    use super::tests::HOST;
    use super::*;

    fn microvm(id: &str, state: MicrovmState) -> MicrovmRow {
        MicrovmRow {
            id: id.into(),
            image: "web".into(),
            version: 1,
            state,
            state_reason: None,
            request: serde_json::json!({}),
            started_at: 1.0,
            terminated_at: (state == MicrovmState::Terminated).then_some(2.0),
            max_duration: 60,
            memory_mib: 512,
            kernel: "6.1".into(),
            dir: format!("microvms/{id}"),
            forwards: serde_json::json!({}),
            owner: "admin".into(),
        }
    }

    fn version(image: &str) -> VersionRow {
        VersionRow {
            image: image.into(),
            version: 1,
            state: "IN_PROGRESS".into(),
            status: "ACTIVE".into(),
            state_reason: None,
            spec: serde_json::json!({}),
            created_at: 1.0,
            updated_at: None,
            build_id: "b".into(),
            build_state: "BUILDING".into(),
            snapshot_dir: None,
            memory_bytes: None,
            disk_bytes: None,
            code_bytes: None,
        }
    }

    fn image(key: &str) -> ImageRow {
        ImageRow {
            key: key.into(),
            label: key.into(),
            account: String::new(),
            state: "CREATING".into(),
            created_at: 1.0,
            updated_at: None,
            tags: serde_json::json!({}),
            owner: "admin".into(),
        }
    }

    #[test]
    fn recovery_when_two_hosts_share_a_store_then_each_finds_only_its_own_work() {
        use MicrovmState as S;
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("kiln.db");
        let a = SqliteStore::open(&db, HOST).expect("host a");
        let b = SqliteStore::open(&db, "host-b").expect("host b");
        a.insert_microvm(&microvm("mvm-a", S::Running))
            .expect("a's");
        a.insert_microvm(&microvm("mvm-a-ended", S::Terminated))
            .expect("a's ended");
        b.insert_microvm(&microvm("mvm-b", S::Suspended))
            .expect("b's");
        b.insert_microvm(&microvm("mvm-b-ended", S::Terminated))
            .expect("b's ended");
        a.create_image(&image("web"), &version("web"))
            .expect("a's build");
        b.create_image(&image("api"), &version("api"))
            .expect("b's build");

        let recovered = a
            .host_microvms(&[S::Pending, S::Running, S::Suspended])
            .expect("recover");
        let builds = a.host_versions(&["IN_PROGRESS"]).expect("builds");
        let expired = a.expire_terminated_microvms(f64::MAX).expect("expire");
        let listed = a.microvms(None, None, None).expect("list");

        let ids: Vec<&str> = recovered.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, vec!["mvm-a"]);
        let images: Vec<&str> = builds.iter().map(|v| v.image.as_str()).collect();
        assert_eq!(images, vec!["web"]);
        assert_eq!(expired, vec!["mvm-a-ended".to_string()]);
        let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, vec!["mvm-a", "mvm-b", "mvm-b-ended"]);
        assert_eq!(
            b.owned_suspended_dirs("admin").expect("b's dirs"),
            vec!["microvms/mvm-b".to_string()]
        );
        assert!(a.owned_suspended_dirs("admin").expect("a's").is_empty());
    }

    #[test]
    fn open_when_schema_6_holds_microvms_then_they_belong_to_the_migrating_host() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&db).expect("sqlite");
            conn.execute_batch(&MIGRATIONS[..6].join(";"))
                .expect("schema 6");
            conn.execute_batch(
                "INSERT INTO microvms (id, image, version, state, request, started_at,
                   max_duration, memory_mib, kernel, dir)
                 VALUES ('mvm-old', 'web', 1, 'SUSPENDED', '{}', 1, 60, 512, 'k', 'd');
                 PRAGMA user_version = 6;",
            )
            .expect("old row");
        }

        let store = SqliteStore::open(&db, HOST).expect("migrate");
        let other = SqliteStore::open(&db, "host-b").expect("another host");

        let mine = store
            .host_microvms(&[MicrovmState::Suspended])
            .expect("mine");
        let theirs = other
            .host_microvms(&[MicrovmState::Suspended])
            .expect("theirs");
        assert_eq!(mine.len(), 1);
        assert!(theirs.is_empty());
        assert_eq!(store.schema_version().expect("version"), MIGRATIONS.len());
    }
}

#[cfg(test)]
mod expiry_tests {
    use super::tests::HOST;
    use super::*;

    fn microvm(id: &str, state: &str, terminated_at: Option<f64>) -> MicrovmRow {
        MicrovmRow {
            id: id.into(),
            image: "web".into(),
            version: 1,
            state: MicrovmState::from_wire(state).expect("state"),
            state_reason: None,
            request: serde_json::json!({}),
            started_at: 1.0,
            terminated_at,
            max_duration: 28_800,
            memory_mib: 512,
            kernel: "6.1".into(),
            dir: format!("microvms/{id}"),
            forwards: serde_json::json!({}),
            owner: "admin".into(),
        }
    }

    #[test]
    fn expire_when_terminated_or_recorded_before_the_cutoff_then_only_those_go() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        store
            .insert_microvm(&microvm("mvm-old", "TERMINATED", Some(100.0)))
            .expect("old");
        store
            .insert_microvm(&microvm("mvm-recent", "TERMINATED", Some(900.0)))
            .expect("recent");
        store
            .insert_microvm(&microvm("mvm-running", "RUNNING", None))
            .expect("running");
        store
            .put_client_token("t-old", "RunMicrovm", "h", "{}", 100.0)
            .expect("old token");
        store
            .put_client_token("t-new", "RunMicrovm", "h", "{}", 900.0)
            .expect("new token");

        store
            .put_client_token("t-new", "RunMicrovm", "h2", "{\"again\":1}", 900.0)
            .expect("replaced token");

        let gone = store.expire_terminated_microvms(500.0).expect("expire");
        let tokens_gone = store.expire_client_tokens(500.0).expect("expire tokens");

        assert_eq!(gone, vec!["mvm-old".to_string()]);
        let left: Vec<String> = store
            .microvms(None, None, None)
            .expect("list")
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(
            left,
            vec!["mvm-recent".to_string(), "mvm-running".to_string()]
        );
        assert_eq!(tokens_gone, 1);
        assert!(store
            .client_token("t-old", "RunMicrovm")
            .expect("get")
            .is_none());
        assert_eq!(
            store.client_token("t-new", "RunMicrovm").expect("get"),
            Some(("h2".to_string(), "{\"again\":1}".to_string()))
        );
    }

    /// A store holding one PENDING MicroVM `id` of `memory_mib`, started at 1000.
    fn store_with_pending(id: &str, memory_mib: i64) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(&dir.path().join("kiln.db"), HOST).expect("open");
        let mut vm = microvm(id, "PENDING", None);
        vm.memory_mib = memory_mib;
        vm.started_at = 1000.0;
        store.insert_microvm(&vm).expect("insert");
        (dir, store)
    }

    /// Moves MicroVM `id` from `from` to `to` at `at`, which must succeed.
    fn step(store: &SqliteStore, id: &str, from: MicrovmState, to: MicrovmState, at: f64) {
        assert!(store
            .transition_microvm_at(id, from, to, Reason::Keep, None, at)
            .expect("transition"));
    }

    #[test]
    fn usage_when_a_running_microvm_grows_and_shrinks_then_vcpu_seconds_follow_the_grant() {
        use MicrovmState as S;
        let (_dir, store) = store_with_pending("mvm-g", 512);
        step(&store, "mvm-g", S::Pending, S::Running, 1000.0);

        store.set_microvm_vcpus("mvm-g", 3, 1010.0).expect("grow");
        let grown = store.usage(None, 1020.0).expect("usage");
        store.set_microvm_vcpus("mvm-g", 2, 1020.0).expect("shrink");
        store
            .transition_microvm_at(
                "mvm-g",
                S::Running,
                S::Suspending,
                Reason::Keep,
                None,
                1030.0,
            )
            .expect("suspending");
        let suspending = store.usage(None, 1040.0).expect("usage");
        let refused = store.set_microvm_vcpus("mvm-g", 4, 1040.0);
        let after = store.usage(None, 1040.0).expect("usage");

        let u = &grown.microvms[0];
        assert_eq!((u.baseline_vcpus, u.vcpus), (1, 3));
        assert_eq!((u.resident_seconds, u.vcpu_seconds), (20.0, 10.0 + 30.0));
        let u = &suspending.microvms[0];
        assert_eq!(u.vcpus, 1, "leaving RUNNING puts it back at its baseline");
        assert_eq!(
            (u.resident_seconds, u.vcpu_seconds),
            (40.0, 10.0 + 30.0 + 20.0 + 10.0)
        );
        assert!(refused.is_ok());
        assert_eq!(after.microvms[0].vcpus, 1, "only a RUNNING MicroVM grows");
    }

    #[test]
    fn usage_when_a_microvm_grows_memory_then_gib_seconds_follow_it_and_a_session_keeps_it() {
        use MicrovmState as S;
        let (_dir, store) = store_with_pending("mvm-m", 1024);
        let step = |from, to, at| step(&store, "mvm-m", from, to, at);
        step(S::Pending, S::Running, 1000.0);

        store
            .set_microvm_memory("mvm-m", 1024, 1010.0)
            .expect("grow");
        let grown = store.usage(None, 1020.0).expect("usage");
        step(S::Running, S::Suspending, 1020.0);
        step(S::Suspending, S::Suspended, 1030.0);
        let ignored = store.set_microvm_memory("mvm-m", 3072, 1040.0);
        let suspended = store.usage(None, 1050.0).expect("usage");
        let kept = store.microvm_grown_mib("mvm-m").expect("grown");
        step(S::Suspended, S::Running, 1050.0);
        store
            .set_microvm_memory("mvm-m", 0, 1060.0)
            .expect("shrink");
        let shrunk = store.usage(None, 1070.0).expect("usage");
        let unknown = store.microvm_grown_mib("mvm-nobody").expect("grown");

        let u = &grown.microvms[0];
        assert_eq!((u.memory_mib, u.granted_memory_mib), (1024, 2048));
        assert_eq!(u.memory_gib_seconds, 10.0 * 1.0 + 10.0 * 2.0);
        assert!(ignored.is_ok());
        let u = &suspended.microvms[0];
        assert_eq!(
            u.granted_memory_mib, 2048,
            "a suspended session keeps its growth"
        );
        assert_eq!(u.memory_gib_seconds, 10.0 + 20.0 + 10.0 * 2.0);
        assert_eq!(
            u.suspended_seconds, 20.0,
            "nothing moved the suspended clock"
        );
        assert_eq!(kept, 1024);
        let u = &shrunk.microvms[0];
        assert_eq!(u.granted_memory_mib, 1024);
        assert_eq!(u.memory_gib_seconds, 50.0 + 10.0 * 2.0 + 10.0 * 1.0);
        assert_eq!(unknown, 0);
    }

    #[test]
    fn usage_when_a_microvm_runs_suspends_and_ages_out_then_each_second_counts_once() {
        use MicrovmState as S;
        let (_dir, store) = store_with_pending("mvm-a", 4096);
        let step = |from, to, at| step(&store, "mvm-a", from, to, at);
        step(S::Pending, S::Running, 1010.0);
        step(S::Running, S::Suspending, 1040.0);
        step(S::Suspending, S::Suspended, 1045.0);
        store
            .set_microvm_snapshot_bytes("mvm-a", 7 << 20)
            .expect("bytes");

        let suspended = store.usage(Some("admin"), 1065.0).expect("usage");
        let nobody = store.usage(Some("bob"), 1065.0).expect("usage");
        step(S::Suspended, S::Terminating, 1070.0);
        assert!(store
            .transition_microvm_at(
                "mvm-a",
                S::Terminating,
                S::Terminated,
                Reason::Keep,
                Some(1071.0),
                1071.0
            )
            .expect("terminated"));
        let ended = store.usage(None, 5000.0).expect("usage");
        store.expire_terminated_microvms(f64::MAX).expect("expire");
        let retired = store.usage(None, 5000.0).expect("usage");

        let u = &suspended.microvms[0];
        assert_eq!((u.vcpus, u.resident_seconds), (2, 45.0));
        assert_eq!((u.vcpu_seconds, u.memory_gib_seconds), (90.0, 180.0));
        assert_eq!((u.suspended_seconds, u.snapshot_bytes), (20.0, 7 << 20));
        assert!(nobody.microvms.is_empty() && nobody.retired.is_empty());
        let u = &ended.microvms[0];
        assert_eq!(
            (u.resident_seconds, u.suspended_seconds, u.snapshot_bytes),
            (46.0, 25.0, 0)
        );
        assert!(retired.microvms.is_empty());
        assert_eq!(
            retired.retired,
            vec![RetiredUsage {
                owner: "admin".into(),
                microvms: 1,
                vcpu_seconds: 92.0,
                memory_gib_seconds: 184.0,
                suspended_seconds: 25.0,
            }]
        );
    }
}
