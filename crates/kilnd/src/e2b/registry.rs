//! The E2B sandboxes kilnd runs: what E2B's API says about each (template, metadata, end of
//! life, auto-pause, access token) beside the kiln MicroVM that is the sandbox. One JSON file
//! per sandbox under `<home>/e2b/sandboxes/`, so a restart keeps them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::endpoint::proxy::sandbox::SandboxAccess;

/// One sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// E2B's id: the MicroVM id without `mvm-` (lower-case hex, safe in a host label).
    pub id: String,
    /// The MicroVM.
    pub microvm_id: String,
    /// The principal that created it.
    pub owner: String,
    /// The template as the client named it.
    pub template_id: String,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// When it was created (epoch seconds).
    pub started_at: f64,
    /// When its timeout ends it (epoch seconds).
    pub end_at: f64,
    /// Whether the timeout pauses it instead of killing it.
    pub auto_pause: bool,
    /// The token that opens its ports (envd's `X-Access-Token`).
    pub access_token: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
}

/// Every sandbox, in memory and on disk.
pub struct Registry {
    dir: PathBuf,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

impl Registry {
    /// Loads the sandboxes recorded under `dir` (created if missing).
    pub fn open(dir: PathBuf) -> std::io::Result<Registry> {
        std::fs::create_dir_all(&dir)?;
        let mut sandboxes = HashMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<Sandbox>(&b)) {
                Ok(Ok(s)) => {
                    sandboxes.insert(s.id.clone(), s);
                }
                _ => {
                    tracing::warn!(file = %path.display(), "e2b: ignoring an unreadable sandbox record")
                }
            }
        }
        Ok(Registry {
            dir,
            sandboxes: Mutex::new(sandboxes),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or rewrites) a sandbox.
    pub fn put(&self, sandbox: Sandbox) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", sandbox.id));
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&sandbox).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)?;
        self.lock().insert(sandbox.id.clone(), sandbox);
        Ok(())
    }

    /// Forgets a sandbox.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
    }

    /// One sandbox.
    pub fn get(&self, id: &str) -> Option<Sandbox> {
        self.lock().get(id).cloned()
    }

    /// Every sandbox.
    pub fn all(&self) -> Vec<Sandbox> {
        self.lock().values().cloned().collect()
    }

    /// Changes a sandbox in place and writes it; `None` when it is gone.
    pub fn update(&self, id: &str, change: impl FnOnce(&mut Sandbox)) -> Option<Sandbox> {
        let mut sandbox = self.get(id)?;
        change(&mut sandbox);
        if let Err(e) = self.put(sandbox.clone()) {
            tracing::warn!(sandbox = id, error = %e, "e2b: cannot write a sandbox record");
        }
        Some(sandbox)
    }
}

impl SandboxAccess for Registry {
    fn open(&self, sandbox_id: &str, token: &str) -> Option<String> {
        let sandboxes = self.lock();
        let sandbox = sandboxes.get(sandbox_id)?;
        super::keys::constant_time_eq(sandbox.access_token.as_bytes(), token.as_bytes())
            .then(|| sandbox.microvm_id.clone())
    }
}
