//! Who is calling: access keys that kilnd issues, the principals they name, and the check
//! of a request's SigV4 signature against them.
//!
//! A principal is a name (`admin`, `alice`); every image and MicroVM belongs to the
//! principal that created it. `admin` sees and manages everything, and alone manages keys.
//! Each principal has its own 12-digit account (admin's is `--account`, `000000000000` by
//! default; the others are allocated with their first key): image names are unique within
//! an account, and ARNs carry the owner's account.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::ApiError;
use serde_json::{json, Value};

use crate::api::wire::internal;
use crate::auth::sigv4::{Signature, SignedRequest};
use crate::now;
use crate::store::{AccessKeyRow, Revocation, Store, StoreError};

/// The principal that sees everything and manages keys; kilnd creates its first key.
pub const ADMIN: &str = "admin";

/// The caller of a request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Whose resources it may see and act on.
    pub principal: String,
    /// The principal's account: what a bare image name is looked up in, and what the ARNs
    /// of what it creates carry.
    pub account: String,
    /// The access key it signed with.
    pub access_key_id: String,
}

impl Caller {
    /// Whether the caller is the administrator.
    pub fn is_admin(&self) -> bool {
        self.principal == ADMIN
    }

    /// Whether the caller may see and act on what `owner` owns: its own, or anything for
    /// admin. Whatever it may not see answers as if it did not exist.
    pub fn can_access(&self, owner: &str) -> bool {
        self.is_admin() || self.principal == owner
    }

    /// The owner to restrict a listing to: `None` (everything) for admin.
    pub fn owner_filter(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.principal.as_str())
    }
}

/// Errors setting up the first access key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The credentials file could not be written.
    #[error("writing the admin credentials to {path}: {source} (check that kilnd may write its data directory)")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No randomness for a new key.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// A key just created, the only time its secret is shown.
#[derive(Clone)]
pub struct NewKey {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// Its principal.
    pub principal: String,
    /// The principal's account.
    pub account: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("access_key_id", &self.access_key_id)
            .field("principal", &self.principal)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// kilnd's access keys, kept in the store.
pub struct AccessKeys {
    store: Arc<dyn Store>,
    /// Whether a key is active, as last read, and when: the endpoint asks for every
    /// request a token carries. Revoking through [`AccessKeys::revoke`] forgets the entry
    /// at once; [`ACTIVE_CACHE_FOR`] bounds how stale any other answer may be.
    active: Mutex<HashMap<String, (Instant, bool)>>,
}

/// How long a key's active-or-not answer is reused by the endpoint's token checks.
const ACTIVE_CACHE_FOR: Duration = Duration::from_secs(5);

/// Where kilnd writes the first admin key: `<home>/credentials`.
pub fn credentials_path(home: &Path) -> PathBuf {
    home.join("credentials")
}

impl AccessKeys {
    /// The keys in `store`.
    pub fn new(store: Arc<dyn Store>) -> AccessKeys {
        AccessKeys {
            store,
            active: Mutex::new(HashMap::new()),
        }
    }

    /// On the first start (no key at all) creates a key for `admin` and writes it to
    /// `<home>/credentials` (AWS shared-credentials format, profile `default`, mode 0600).
    /// Returns the new key's id, or `None` when keys existed already.
    pub fn bootstrap(&self, home: &Path) -> Result<Option<String>, AuthError> {
        if !self.store.access_keys()?.is_empty() {
            return Ok(None);
        }
        let key = self.create_row(ADMIN)?;
        let path = credentials_path(home);
        write_credentials(&path, &key).map_err(|source| AuthError::Credentials {
            path: path.clone(),
            source,
        })?;
        tracing::info!(access_key_id = %key.id, principal = ADMIN, credentials = %path.display(), "created the first access key");
        Ok(Some(key.id))
    }

    fn create_row(&self, principal: &str) -> Result<AccessKeyRow, AuthError> {
        self.store.ensure_account(principal, now())?;
        let key = AccessKeyRow {
            id: format!("AKIA{}", random_chars(16, ID_ALPHABET)?),
            secret: random_chars(40, SECRET_ALPHABET)?,
            principal: principal.to_string(),
            created_at: now(),
            revoked_at: None,
        };
        self.store.insert_access_key(&key)?;
        Ok(key)
    }

    /// Checks the signature of `req` against the key it names: the caller, or the error
    /// AWS sends in the same case.
    pub fn authenticate(&self, req: &SignedRequest<'_>) -> Result<Caller, ApiError> {
        let signature = Signature::read(req)?;
        let key_id = &signature.scope.access_key_id;
        let key = self
            .store
            .access_key(key_id)
            .map_err(internal)?
            .filter(|k| k.revoked_at.is_none())
            .ok_or(crate::auth::sigv4::SigV4Error::UnknownKey)?;
        signature.verify(req, &key.secret, std::time::SystemTime::now())?;
        let account = self
            .store
            .ensure_account(&key.principal, now())
            .map_err(internal)?;
        Ok(Caller {
            principal: key.principal,
            account,
            access_key_id: key.id,
        })
    }

    /// Who signed a request whose body is streamed (not read before the check), and the
    /// body's SHA-256 that the signature covers: the receiver must compare it with what
    /// arrived before keeping anything.
    pub fn authenticate_streamed(
        &self,
        req: &SignedRequest<'_>,
    ) -> Result<(Caller, String), ApiError> {
        let signature = Signature::read(req)?;
        let key_id = &signature.scope.access_key_id;
        let key = self
            .store
            .access_key(key_id)
            .map_err(internal)?
            .filter(|k| k.revoked_at.is_none())
            .ok_or(crate::auth::sigv4::SigV4Error::UnknownKey)?;
        let claimed = signature.verify_streamed(req, &key.secret, std::time::SystemTime::now())?;
        let account = self
            .store
            .ensure_account(&key.principal, now())
            .map_err(internal)?;
        Ok((
            Caller {
                principal: key.principal,
                account,
                access_key_id: key.id,
            },
            claimed,
        ))
    }

    /// `POST /kiln/v1/keys` (admin only): a new key for a principal; the response is the
    /// only place its secret appears.
    pub fn create(&self, caller: &Caller, body: &[u8]) -> Result<NewKey, ApiError> {
        require_admin(caller, "create access keys")?;
        let request: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::validation(format!(
                "the body must be JSON like {{\"principal\": \"alice\"}}: {e}"
            ))
        })?;
        let principal = request["principal"].as_str().ok_or_else(|| {
            ApiError::validation("the body must name a principal: {\"principal\": \"alice\"}")
        })?;
        check_principal(principal)?;
        if principal == crate::observe::audit::KILND {
            return Err(ApiError::validation(format!(
                "principal '{principal}' is reserved: the audit log names kilnd's own actions so; pick another name"
            )));
        }
        let key = self.create_row(principal).map_err(|e| match e {
            AuthError::Store(e) => internal(e),
            other => ApiError::internal(other.to_string()),
        })?;
        let account = self
            .store
            .account_of(principal)
            .map_err(internal)?
            .unwrap_or_default();
        tracing::info!(access_key_id = %key.id, principal, %account, by = %caller.principal, "access key created");
        Ok(NewKey {
            access_key_id: key.id,
            secret_access_key: key.secret,
            principal: key.principal,
            account,
        })
    }

    /// `GET /kiln/v1/keys` (admin only): every key without its secret.
    pub fn list(&self, caller: &Caller) -> Result<Value, ApiError> {
        require_admin(caller, "list access keys")?;
        let keys = self.store.access_keys().map_err(internal)?;
        let mut listed = Vec::with_capacity(keys.len());
        for k in &keys {
            let mut v = key_json(k);
            v["account"] = json!(self.store.account_of(&k.principal).map_err(internal)?);
            listed.push(v);
        }
        Ok(json!({ "keys": listed }))
    }

    /// `DELETE /kiln/v1/keys/{id}` (admin only): revokes a key (idempotent); the last
    /// active admin key stays, so kiln never locks its administrator out.
    pub fn revoke(&self, caller: &Caller, id: &str) -> Result<Value, ApiError> {
        require_admin(caller, "revoke access keys")?;
        let revocation = self
            .store
            .revoke_access_key(id, ADMIN, now())
            .map_err(internal)?;
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        match revocation {
            Revocation::Revoked(key) => {
                tracing::info!(access_key_id = %key.id, principal = %key.principal, by = %caller.principal, "access key revoked");
                Ok(key_json(&key))
            }
            Revocation::NotFound => Err(ApiError::not_found("AccessKey", id)),
            Revocation::LastOfPrincipal(key) => Err(ApiError::conflict(
                "AccessKey",
                &key.id,
                format!(
                    "{} is the last active key of principal {ADMIN}; create another admin key first (POST /kiln/v1/keys {{\"principal\": \"{ADMIN}\"}}), then revoke this one",
                    key.id
                ),
            )),
        }
    }
}

/// A key as the keys API shows it: never the secret.
fn key_json(k: &AccessKeyRow) -> Value {
    json!({
        "accessKeyId": k.id,
        "principal": k.principal,
        "createdAt": k.created_at,
        "revoked": k.revoked_at.is_some(),
        "revokedAt": k.revoked_at,
    })
}

fn require_admin(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::access_denied(format!(
            "only principal {ADMIN} may {what}; {} signed this request (access key {})",
            caller.principal, caller.access_key_id
        )))
    }
}

/// Principal names: 1 to 64 of letters, digits and `+=,.@_-` (as IAM user names).
fn check_principal(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(format!(
            "principal '{name}' is not a valid name: use 1 to 64 letters, digits or +=,.@_-"
        )))
    }
}

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `n` characters drawn uniformly from `alphabet` (rejection sampling: no modulo bias).
fn random_chars(n: usize, alphabet: &[u8]) -> Result<String, AuthError> {
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(AuthError::Random)?;
        for &b in buf.iter().filter(|&&b| usize::from(b) < limit) {
            if out.len() == n {
                break;
            }
            out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
        }
    }
    Ok(out)
}

/// Writes the key as an AWS shared-credentials file: a new file created with mode 0600,
/// renamed over `path` so the secret is never readable by others, even for a moment.
fn write_credentials(path: &Path, key: &AccessKeyRow) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    write!(
        f,
        "# kiln access key of principal {}, created by kilnd on its first start.\n\
         # Use it with AWS_SHARED_CREDENTIALS_FILE={} (or copy the profile to ~/.aws/credentials).\n\
         [default]\n\
         aws_access_key_id = {}\n\
         aws_secret_access_key = {}\n",
        key.principal,
        path.display(),
        key.id,
        key.secret
    )?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl crate::endpoint::tokens::Minters for AccessKeys {
    fn is_active(&self, access_key_id: &str) -> bool {
        let mut cache = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, active)) = cache.get(access_key_id) {
            if at.elapsed() < ACTIVE_CACHE_FOR {
                return *active;
            }
        }
        let active = match self.store.access_key(access_key_id) {
            Ok(key) => key.is_some_and(|k| k.revoked_at.is_none()),
            Err(e) => {
                // Not cached: the next request asks the store again.
                tracing::warn!(error = %e, "cannot read access keys; refusing the token");
                return false;
            }
        };
        if cache.len() > 10_000 {
            cache.retain(|_, (at, _)| at.elapsed() < ACTIVE_CACHE_FOR);
        }
        cache.insert(access_key_id.to_string(), (Instant::now(), active));
        active
    }
}

impl crate::artifacts::s3::Keyring for AccessKeys {
    fn lookup(&self, access_key_id: &str) -> Option<(String, String)> {
        match self.store.access_key(access_key_id) {
            Ok(Some(k)) if k.revoked_at.is_none() => Some((k.secret, k.principal)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read access keys");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (tempfile::TempDir, AccessKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            crate::store::SqliteStore::open(&dir.path().join("kiln.db"), "host-a").expect("store");
        (dir, AccessKeys::new(Arc::new(store)))
    }

    fn admin() -> Caller {
        Caller {
            principal: ADMIN.into(),
            account: "000000000000".into(),
            access_key_id: "AKIAADMIN".into(),
        }
    }

    #[test]
    fn bootstrap_when_first_start_then_credentials_file_is_0600_with_default_profile() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, keys) = keys();

        let first = keys.bootstrap(dir.path()).expect("bootstrap");
        let second = keys.bootstrap(dir.path()).expect("bootstrap again");

        let path = credentials_path(dir.path());
        let text = std::fs::read_to_string(&path).expect("credentials");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        let id = first.expect("a key on the first start");
        assert_eq!(second, None);
        assert_eq!(mode, 0o600);
        assert!(text.contains("[default]\naws_access_key_id = "), "{text}");
        assert!(text.contains(&format!("aws_access_key_id = {id}\n")));
        assert!(id.starts_with("AKIA") && id.len() == 20, "{id}");
        assert!(id[4..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    }

    #[test]
    fn revoke_when_last_admin_key_then_refused_and_another_admin_key_unblocks_it() {
        let (dir, keys) = keys();
        let first = keys.bootstrap(dir.path()).expect("bootstrap").expect("key");

        let refused = keys.revoke(&admin(), &first).expect_err("last admin key");
        keys.create(&admin(), br#"{"principal": "admin"}"#)
            .expect("second admin key");
        let revoked = keys.revoke(&admin(), &first).expect("revoke");
        let again = keys.revoke(&admin(), &first).expect("idempotent");

        assert_eq!(refused.error_type(), "ConflictException");
        assert!(refused.message().contains("create another admin key"));
        assert_eq!(revoked["revoked"], true);
        assert_eq!(again["revokedAt"], revoked["revokedAt"]);
    }

    #[test]
    fn is_active_when_key_revoked_then_false_at_once() {
        use crate::endpoint::tokens::Minters;
        let (_dir, keys) = keys();
        let bob = keys
            .create(&admin(), br#"{"principal": "bob"}"#)
            .expect("create");

        let before = keys.is_active(&bob.access_key_id);
        keys.revoke(&admin(), &bob.access_key_id).expect("revoke");
        let after = keys.is_active(&bob.access_key_id);

        assert!(before);
        assert!(!after);
        assert!(!keys.is_active("AKIANOSUCHKEY"));
        assert_eq!(bob.account, "000000000001");
    }

    #[test]
    fn keys_api_when_caller_is_not_admin_then_access_denied_and_list_hides_secrets() {
        let (_dir, keys) = keys();
        let alice = keys
            .create(&admin(), br#"{"principal": "alice"}"#)
            .expect("create");
        let as_alice = Caller {
            principal: "alice".into(),
            account: alice.account.clone(),
            access_key_id: alice.access_key_id.clone(),
        };

        let denied = keys
            .create(&as_alice, br#"{"principal": "alice"}"#)
            .expect_err("alice is no admin");
        let bad_name = keys
            .create(&admin(), br#"{"principal": "a b"}"#)
            .expect_err("bad name");
        let listed = keys.list(&admin()).expect("list").to_string();

        assert_eq!(denied.error_type(), "AccessDeniedException");
        assert_eq!(bad_name.error_type(), "ValidationException");
        assert_eq!(alice.secret_access_key.len(), 40);
        assert!(listed.contains(&alice.access_key_id), "{listed}");
        assert!(!listed.contains(&alice.secret_access_key));
    }
}
