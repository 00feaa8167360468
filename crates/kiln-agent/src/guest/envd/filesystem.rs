//! envd's `filesystem.Filesystem` service: entries, directories, moves, removal, and
//! watchers (a streamed `WatchDir` and the polled `CreateWatcher`/`GetWatcherEvents`).
//!
//! Watching polls the tree every [`POLL`] and reports the differences (create, write,
//! remove, chmod): it needs no kernel facility and its memory is bounded by
//! [`MAX_WATCHED`] entries and [`MAX_QUEUED`] undelivered events per watcher.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, Metadata};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::connect::{self, Code, RpcError};
use super::EnvdState;
use crate::guest::users::ResolvedUser;

/// How often a watcher looks at its tree.
pub const POLL: Duration = Duration::from_millis(250);
/// Most entries one watcher tracks.
pub const MAX_WATCHED: usize = 20_000;
/// Most undelivered events a polled watcher keeps (older ones are dropped).
pub const MAX_QUEUED: usize = 10_000;
/// Most entries one ListDir returns.
pub const MAX_LISTED: usize = 100_000;
/// Most polled watchers at once.
const MAX_WATCHERS: usize = 256;

/// The type enum's name for a file type.
fn type_name(meta: &Metadata) -> &'static str {
    if meta.is_dir() {
        "FILE_TYPE_DIRECTORY"
    } else if meta.file_type().is_symlink() {
        "FILE_TYPE_SYMLINK"
    } else {
        "FILE_TYPE_FILE"
    }
}

/// `EntryInfo` of `path` (symlinks described by what they point at, with their target).
pub fn entry_info(path: &Path) -> Result<Value, RpcError> {
    let what = path.display().to_string();
    let link = fs::symlink_metadata(path).map_err(|e| RpcError::io(&what, &e))?;
    let meta = if link.file_type().is_symlink() {
        fs::metadata(path).unwrap_or_else(|_| link.clone())
    } else {
        link.clone()
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let mut info = json!({
        "name": name,
        "type": type_name(&meta),
        "path": what,
        "size": meta.len().to_string(),
        "mode": meta.mode() & 0o7777,
        "permissions": permissions_string(&meta),
        "owner": user_name(meta.uid()),
        "group": group_name(meta.gid()),
        "modifiedTime": rfc3339(meta.mtime(), meta.mtime_nsec()),
    });
    if link.file_type().is_symlink() {
        info["isSymlink"] = json!(true);
        if let Ok(target) = fs::read_link(path) {
            info["symlinkTarget"] = json!(target.to_string_lossy());
        }
    }
    Ok(info)
}

fn permissions_string(meta: &Metadata) -> String {
    let mode = meta.permissions().mode();
    let kind = if meta.is_dir() {
        'd'
    } else if meta.file_type().is_symlink() {
        'L'
    } else {
        '-'
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn name_from(file: &str, id: u32) -> String {
    let text = fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _ = f.next()?;
            let n: u32 = f.next()?.parse().ok()?;
            (n == id).then(|| name.to_string())
        })
        .next()
        .unwrap_or_else(|| id.to_string())
}

fn user_name(uid: u32) -> String {
    name_from("/etc/passwd", uid)
}

fn group_name(gid: u32) -> String {
    name_from("/etc/group", gid)
}

/// RFC 3339 UTC time of a Unix timestamp.
pub fn rfc3339(secs: i64, nanos: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let nanos = nanos.clamp(0, 999_999_999);
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}")
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Makes `path` and the directories it needs owned by `user` (best effort: ownership is a
/// convenience, the content is what was asked for).
pub fn chown_to(path: &Path, user: &ResolvedUser) {
    let _ = std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid));
}

/// Creates the missing directories of `dir`, owned by `user`.
pub fn make_dirs(dir: &Path, user: &ResolvedUser) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    fs::create_dir_all(dir)?;
    for d in missing {
        chown_to(&d, user);
    }
    Ok(())
}

/// The filesystem service.
#[derive(Default)]
pub struct Filesystem {
    watchers: Mutex<HashMap<String, Arc<PolledWatcher>>>,
    next_id: AtomicU64,
}

impl Filesystem {
    fn path_of(
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<(PathBuf, ResolvedUser), RpcError> {
        let user = state.resolve_user(user)?;
        let path = connect::string(request, "path", "path")?;
        if path.is_empty() {
            return Err(RpcError::invalid("path is required"));
        }
        Ok((PathBuf::from(state.resolve_path(&path, &user)), user))
    }

    /// `Stat`.
    pub fn stat(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        let (path, _) = Self::path_of(state, request, user)?;
        Ok(json!({ "entry": entry_info(&path)? }))
    }

    /// `MakeDir`: already_exists when it does.
    pub fn make_dir(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        let (path, user) = Self::path_of(state, request, user)?;
        if let Ok(meta) = fs::symlink_metadata(&path) {
            let what = if meta.is_dir() { "directory" } else { "file" };
            return Err(RpcError::new(
                Code::AlreadyExists,
                format!("{what} {} already exists", path.display()),
            ));
        }
        make_dirs(&path, &user).map_err(|e| RpcError::io(&path.display().to_string(), &e))?;
        Ok(json!({ "entry": entry_info(&path)? }))
    }

    /// `Move`: creates the destination's parent directories.
    pub fn rename(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        let user = state.resolve_user(user)?;
        let source = connect::string(request, "source", "source")?;
        let destination = connect::string(request, "destination", "destination")?;
        if source.is_empty() || destination.is_empty() {
            return Err(RpcError::invalid("source and destination are required"));
        }
        let source = PathBuf::from(state.resolve_path(&source, &user));
        let destination = PathBuf::from(state.resolve_path(&destination, &user));
        fs::symlink_metadata(&source)
            .map_err(|e| RpcError::io(&source.display().to_string(), &e))?;
        if let Some(parent) = destination.parent() {
            make_dirs(parent, &user)
                .map_err(|e| RpcError::io(&parent.display().to_string(), &e))?;
        }
        fs::rename(&source, &destination).map_err(|e| {
            RpcError::io(
                &format!("moving {} to {}", source.display(), destination.display()),
                &e,
            )
        })?;
        Ok(json!({ "entry": entry_info(&destination)? }))
    }

    /// `ListDir` to `depth` levels (0 counts as 1).
    pub fn list_dir(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        let (path, _) = Self::path_of(state, request, user)?;
        let depth = connect::uint(request, "depth", "depth", 1 << 16)?
            .unwrap_or(1)
            .max(1);
        let meta =
            fs::metadata(&path).map_err(|e| RpcError::io(&path.display().to_string(), &e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        let mut entries = Vec::new();
        list_into(&path, depth, &mut entries)?;
        Ok(json!({ "entries": entries }))
    }

    /// `Remove`: files, links, and directories with what they hold.
    pub fn remove(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        let (path, _) = Self::path_of(state, request, user)?;
        let what = path.display().to_string();
        let meta = fs::symlink_metadata(&path).map_err(|e| RpcError::io(&what, &e))?;
        if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .map_err(|e| RpcError::io(&what, &e))?;
        Ok(json!({}))
    }

    /// Validates a watch request and takes its first snapshot.
    pub fn watch(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Watch, RpcError> {
        let (path, _) = Self::path_of(state, request, user)?;
        let recursive = connect::opt_bool(request, "recursive", "recursive")?.unwrap_or(false);
        let include_entry =
            connect::opt_bool(request, "includeEntry", "include_entry")?.unwrap_or(false);
        let meta =
            fs::metadata(&path).map_err(|e| RpcError::io(&path.display().to_string(), &e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        let snapshot = snapshot(&path, recursive);
        Ok(Watch {
            root: path,
            recursive,
            include_entry,
            last: snapshot,
        })
    }

    /// `CreateWatcher`.
    pub fn create_watcher(
        &self,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Value, RpcError> {
        if self.lock().len() >= MAX_WATCHERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("{MAX_WATCHERS} watchers exist; remove some first"),
            ));
        }
        let watch = self.watch(state, request, user)?;
        let id = format!("w{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let watcher = Arc::new(PolledWatcher {
            queue: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let polled = watcher.clone();
        std::thread::Builder::new()
            .name("envd-watcher".into())
            .spawn(move || {
                let mut watch = watch;
                while !polled.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                    let events = watch.poll();
                    if events.is_empty() {
                        continue;
                    }
                    let mut queue = polled.queue.lock().unwrap_or_else(|e| e.into_inner());
                    queue.extend(events);
                    let excess = queue.len().saturating_sub(MAX_QUEUED);
                    queue.drain(..excess);
                }
            })
            .map_err(|e| RpcError::new(Code::Internal, format!("cannot start a watcher: {e}")))?;
        self.lock().insert(id.clone(), watcher);
        Ok(json!({ "watcherId": id }))
    }

    /// `GetWatcherEvents`: the events since the last call.
    pub fn get_watcher_events(&self, request: &Value) -> Result<Value, RpcError> {
        let id = connect::string(request, "watcherId", "watcher_id")?;
        let watcher =
            self.lock().get(&id).cloned().ok_or_else(|| {
                RpcError::new(Code::NotFound, format!("watcher {id:?} not found"))
            })?;
        let events: Vec<Value> =
            std::mem::take(&mut *watcher.queue.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(json!({ "events": events }))
    }

    /// `RemoveWatcher`.
    pub fn remove_watcher(&self, request: &Value) -> Result<Value, RpcError> {
        let id = connect::string(request, "watcherId", "watcher_id")?;
        let watcher = self
            .lock()
            .remove(&id)
            .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher {id:?} not found")))?;
        watcher.stop.store(true, Ordering::Relaxed);
        Ok(json!({}))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PolledWatcher>>> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct PolledWatcher {
    queue: Mutex<Vec<Value>>,
    stop: AtomicBool,
}

fn list_into(dir: &Path, depth: u64, out: &mut Vec<Value>) -> Result<(), RpcError> {
    let what = dir.display().to_string();
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| RpcError::io(&what, &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    children.sort();
    for child in children {
        if out.len() >= MAX_LISTED {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("more than {MAX_LISTED} entries under {what}: list a smaller depth"),
            ));
        }
        let Ok(info) = entry_info(&child) else {
            continue; // removed while listing
        };
        out.push(info);
        let is_real_dir = fs::symlink_metadata(&child).is_ok_and(|m| m.is_dir());
        if depth > 1 && is_real_dir {
            let _ = list_into(&child, depth - 1, out);
        }
    }
    Ok(())
}

/// What a watcher compares: (modification time in ns, size, mode) per relative path.
type Snapshot = BTreeMap<PathBuf, (i128, u64, u32)>;

fn snapshot(root: &Path, recursive: bool) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if out.len() >= MAX_WATCHED {
                return out;
            }
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
            if let Ok(rel) = path.strip_prefix(root) {
                out.insert(rel.to_path_buf(), (mtime, meta.len(), meta.mode()));
            }
            if recursive && meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

/// One watched directory and what it looked like at the last poll.
pub struct Watch {
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    last: Snapshot,
}

impl Watch {
    /// The `FilesystemEvent`s since the last poll.
    pub fn poll(&mut self) -> Vec<Value> {
        let now = snapshot(&self.root, self.recursive);
        let mut events = Vec::new();
        for (path, (mtime, size, mode)) in &now {
            match self.last.get(path) {
                None => events.push(self.event(path, "EVENT_TYPE_CREATE")),
                Some((m, s, md)) => {
                    if m != mtime || s != size {
                        events.push(self.event(path, "EVENT_TYPE_WRITE"));
                    } else if md != mode {
                        events.push(self.event(path, "EVENT_TYPE_CHMOD"));
                    }
                }
            }
        }
        for path in self.last.keys() {
            if !now.contains_key(path) {
                events.push(self.event(path, "EVENT_TYPE_REMOVE"));
            }
        }
        self.last = now;
        events
    }

    fn event(&self, rel: &Path, kind: &str) -> Value {
        let mut event = json!({"name": rel.to_string_lossy(), "type": kind});
        if self.include_entry && kind != "EVENT_TYPE_REMOVE" {
            if let Ok(info) = entry_info(&self.root.join(rel)) {
                event["entry"] = info;
            }
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn watch_reports_create_write_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = Watch {
            root: dir.path().to_path_buf(),
            recursive: true,
            include_entry: false,
            last: snapshot(dir.path(), true),
        };
        fs::write(dir.path().join("a"), b"1").unwrap();
        let created = watch.poll();
        assert_eq!(
            created,
            vec![json!({"name": "a", "type": "EVENT_TYPE_CREATE"})]
        );
        fs::write(dir.path().join("a"), b"123").unwrap();
        assert_eq!(watch.poll()[0]["type"], "EVENT_TYPE_WRITE");
        fs::remove_file(dir.path().join("a")).unwrap();
        assert_eq!(watch.poll()[0]["type"], "EVENT_TYPE_REMOVE");
    }
}
