//! Short-lived encrypted MicroVM tokens: compact JWE (`alg: dir`, `enc: A256GCM`), the
//! format family of AWS's `X-aws-proxy-auth` header.
//!
//! The claims travel encrypted, so a token says nothing to whoever holds it and cannot be
//! altered without failing the GCM tag. Keys live in `<home>/keys/tokens.json` (0600),
//! newest first; the JWE header's `kid` names the key. [`TokenKeys::rotate`] adds a key
//! for new tokens and keeps the older ones for as long as tokens issued under them can
//! still be valid; kilnd calls [`TokenKeys::rotate_if_due`] on a schedule
//! (`--token-key-rotation-secs`, a day by default).
//!
//! A token names the access key that asked for it (`akid`); given [`Minters`], verifying
//! refuses a token whose key has been revoked since.
//!
//! josekit does the JWE. It folds every decryption failure into one error, so
//! [`TokenKeys::verify`] checks the framing, header and key itself first: whatever josekit
//! rejects after that is a token that failed its integrity check.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use josekit::jwe::{Dir, JweHeader};
use kiln_api::shapes::microvm::PortSpecification;
use serde::{Deserialize, Serialize};

/// The longest lifetime a token may be given, in minutes (AWS's limit too).
pub const MAX_TOKEN_MINUTES: i32 = 60;

/// The JWE `alg` kiln issues and accepts.
const ALG: &str = "dir";
/// The JWE `enc` kiln issues and accepts.
const ENC: &str = "A256GCM";
/// Bytes in an A256GCM key.
const KEY_LEN: usize = 32;
/// Bytes in a GCM IV and tag.
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Tokens longer than this are refused before any decoding; real ones are a few hundred
/// bytes, so this only bounds the work an attacker can ask for.
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// A retired key is kept until every token issued under it has expired, plus this margin
/// for clock adjustments.
const RETENTION_MARGIN_SECS: i64 = 5 * 60;
/// Version of the key file's format.
const KEY_FILE_VERSION: u32 = 1;

/// Why a token could not be issued, verified or used, or the keys could not be loaded.
///
/// The messages of the verification variants are safe to show to a client: they never
/// carry key material or the token's contents.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is not a compact JWE kiln could have issued.
    #[error("the auth token is malformed ({0}): send the value exactly as CreateMicrovmAuthToken returned it")]
    Malformed(&'static str),
    /// The header names an algorithm kiln does not use.
    #[error("the auth token uses an unsupported algorithm: kiln accepts only alg \"dir\" with enc \"A256GCM\"; request a new token")]
    Unsupported,
    /// No key with the header's `kid`: another kiln issued it, or its key was retired.
    #[error("the auth token was issued under a key this endpoint does not know (another kiln, or a retired key): request a new token")]
    UnknownKey,
    /// The GCM tag did not verify: the token was altered or not issued with this key.
    #[error("the auth token failed its integrity check (altered or not issued by this kiln): request a new token")]
    Forged,
    /// The access key that asked for the token has been revoked since.
    #[error("the access key that requested this auth token has been revoked: request a new token with an active key")]
    Revoked,
    /// The token's `exp` has passed.
    #[error("the auth token expired at {exp} (unix seconds): request a new token")]
    Expired {
        /// When it expired.
        exp: i64,
    },
    /// The token is for a different MicroVM than the one addressed.
    #[error("the auth token was issued for another MicroVM, not {requested}: request a token for this MicroVM")]
    OtherMicrovm {
        /// The MicroVM the request addressed.
        requested: String,
    },
    /// The token's allowed ports do not include the requested one.
    #[error(
        "the auth token does not open port {port}: request a token whose allowedPorts include it"
    )]
    PortNotAllowed {
        /// The guest port the request addressed.
        port: u16,
    },
    /// A proxy token used for a shell, or the other way round.
    #[error("this is a {actual} token but the request needs a {needed} token: request one with {}", needed.operation())]
    WrongKind {
        /// The kind the request needs.
        needed: TokenKind,
        /// The kind the token carries.
        actual: TokenKind,
    },
    /// A lifetime outside 1–60 minutes was asked for.
    #[error("expirationInMinutes must be between 1 and {MAX_TOKEN_MINUTES}, got {minutes}")]
    LifetimeOutOfRange {
        /// The lifetime asked for.
        minutes: i32,
    },
    /// The key file or its directory could not be read or written.
    #[error("{action} {path}: {source} (check that the kiln data directory is writable by kilnd)")]
    KeyFile {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file exists but is not what kiln writes.
    #[error("the token key file {path} is damaged ({reason}): move it aside and restart kilnd; tokens issued before then stop working")]
    KeyFileCorrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The operating system's random source failed.
    #[error("reading random bytes from the operating system failed: {0}")]
    Random(getrandom::Error),
    /// josekit refused to encrypt (a kiln bug: the key and header are kiln's own).
    #[error("encrypting an auth token failed: {0}")]
    Encrypt(#[source] josekit::JoseError),
}

/// What a token opens: an app's ports through the endpoint, or a shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// `CreateMicrovmAuthToken`: HTTP(S) to the allowed ports.
    Proxy,
    /// `CreateMicrovmShellAuthToken`: an interactive shell.
    Shell,
}

impl TokenKind {
    /// The API operation that issues this kind of token.
    pub fn operation(self) -> &'static str {
        match self {
            TokenKind::Proxy => "CreateMicrovmAuthToken",
            TokenKind::Shell => "CreateMicrovmShellAuthToken",
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Proxy => "proxy",
            TokenKind::Shell => "shell",
        })
    }
}

/// The claims inside a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The MicroVM id the token opens.
    pub mvm: String,
    /// The guest ports it opens (empty for shell tokens).
    pub ports: Vec<PortSpecification>,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issue time, unix seconds.
    pub iat: i64,
    /// Proxy or shell.
    pub kind: TokenKind,
    /// A random id, unique per token.
    pub jti: String,
    /// The access key that asked for the token; tokens from before kiln recorded it have
    /// none (they expire within [`MAX_TOKEN_MINUTES`] of an upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub akid: Option<String>,
}

impl TokenClaims {
    /// Claims for a new token issued now, valid for `minutes` (1–60), with a fresh `jti`.
    pub fn new(
        kind: TokenKind,
        microvm_id: &str,
        ports: Vec<PortSpecification>,
        minutes: i32,
    ) -> Result<TokenClaims, TokenError> {
        let exp = expiry_from_minutes(minutes)?;
        Ok(TokenClaims {
            mvm: microvm_id.to_string(),
            ports,
            exp,
            iat: now_unix(),
            kind,
            jti: URL_SAFE_NO_PAD.encode(random_bytes::<16>()?),
            akid: None,
        })
    }

    /// The same claims, naming `access_key_id` as the key that asked for them.
    pub fn minted_by(mut self, access_key_id: &str) -> TokenClaims {
        self.akid = Some(access_key_id.to_string());
        self
    }

    /// Whether this token lets a request of `kind` reach `port` on `microvm_id`. The port
    /// is checked for proxy tokens only: a shell token opens no port.
    pub fn permits(&self, microvm_id: &str, port: u16, kind: TokenKind) -> Result<(), TokenError> {
        if self.kind != kind {
            return Err(TokenError::WrongKind {
                needed: kind,
                actual: self.kind,
            });
        }
        if self.mvm != microvm_id {
            return Err(TokenError::OtherMicrovm {
                requested: microvm_id.to_string(),
            });
        }
        if kind == TokenKind::Proxy && !self.ports.iter().any(|p| p.allows(port)) {
            return Err(TokenError::PortNotAllowed { port });
        }
        Ok(())
    }
}

/// The expiry (unix seconds) of a token issued now for `minutes`, which must be 1–60.
pub fn expiry_from_minutes(minutes: i32) -> Result<i64, TokenError> {
    if !(1..=MAX_TOKEN_MINUTES).contains(&minutes) {
        return Err(TokenError::LifetimeOutOfRange { minutes });
    }
    Ok(now_unix() + i64::from(minutes) * 60)
}

/// One token key.
#[derive(Clone)]
struct TokenKey {
    kid: String,
    secret: [u8; KEY_LEN],
    /// Unix seconds.
    created: i64,
}

impl TokenKey {
    fn generate(now: i64) -> Result<TokenKey, TokenError> {
        Ok(TokenKey {
            kid: URL_SAFE_NO_PAD.encode(random_bytes::<9>()?),
            secret: random_bytes::<KEY_LEN>()?,
            created: now,
        })
    }
}

/// The key file as stored.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    /// Newest first.
    keys: Vec<KeyRecord>,
}

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    kid: String,
    /// Standard base64 of the 32 key bytes.
    secret: String,
    created: i64,
}

/// Which access keys are still active: asked on every request a token carries.
pub trait Minters: Send + Sync {
    /// Whether `access_key_id` exists and is not revoked.
    fn is_active(&self, access_key_id: &str) -> bool;
}

/// The endpoint's token keys: issues and verifies tokens. Safe to share between threads.
pub struct TokenKeys {
    path: PathBuf,
    /// Newest first; never empty.
    keys: RwLock<Vec<TokenKey>>,
    /// Checks a token's minting access key; without it, any key is taken as active.
    minters: Option<Arc<dyn Minters>>,
    /// Tokens already decrypted and found whole: the BLAKE3 of the token's text → the `kid`
    /// it was sealed under and its claims. The endpoint sees the same token on every request
    /// of a session, and decrypting it (josekit over OpenSSL) cost more than the rest of the
    /// proxy's work; expiry, revocation and the key still being held are checked on every
    /// use. Only tokens that passed every check get in, and at most [`VERIFIED_CACHE`].
    /// Shared, not copied: a hit costs no allocation.
    verified: RwLock<HashMap<[u8; 32], Arc<Verified>>>,
}

/// A token that decrypted whole under one of the keys: still to be checked on each use
/// ([`TokenKeys::recheck`]) for expiry, revocation and its key being held.
#[derive(Debug)]
pub struct Verified {
    kid: String,
    /// What it says.
    pub claims: TokenClaims,
}

/// How many decrypted tokens [`TokenKeys`] remembers; it forgets them all when full.
const VERIFIED_CACHE: usize = 4096;

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<String> = self.read().iter().map(|k| k.kid.clone()).collect();
        f.debug_struct("TokenKeys")
            .field("path", &self.path)
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Loads `<home>/keys/tokens.json`, creating it with one new key on first start.
    pub fn load_or_create(home: &Path) -> Result<TokenKeys, TokenError> {
        let dir = home.join("keys");
        make_private_dir(&dir)?;
        let path = dir.join("tokens.json");
        let keys = match std::fs::read(&path) {
            Ok(bytes) => {
                tighten_mode(&path, 0o600)?;
                parse_key_file(&path, &bytes)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = vec![TokenKey::generate(now_unix())?];
                persist(&path, &keys)?;
                keys
            }
            Err(source) => {
                return Err(TokenError::KeyFile {
                    action: "reading the token keys",
                    path,
                    source,
                })
            }
        };
        Ok(TokenKeys {
            path,
            keys: RwLock::new(keys),
            minters: None,
            verified: RwLock::new(HashMap::new()),
        })
    }

    /// The same keys, refusing tokens whose minting access key `minters` says is revoked.
    pub fn with_minters(mut self, minters: Arc<dyn Minters>) -> TokenKeys {
        self.minters = Some(minters);
        self
    }

    /// The `kid` new tokens are issued under.
    pub fn current_kid(&self) -> String {
        self.read()[0].kid.clone()
    }

    /// Adds a new key for new tokens and persists the set. Keys whose tokens have all
    /// expired (retired more than 60 minutes plus a margin ago) are dropped. Returns the
    /// new `kid`.
    pub fn rotate(&self) -> Result<String, TokenError> {
        self.rotate_at(now_unix())
    }

    /// When (unix seconds) the newest key is `period_secs` old and due for rotation.
    pub fn next_rotation(&self, period_secs: u64) -> i64 {
        let period = i64::try_from(period_secs).unwrap_or(i64::MAX);
        self.read()[0].created.saturating_add(period)
    }

    /// Rotates when the newest key is at least `period_secs` old (it was created then, by
    /// this kilnd or an earlier one: the schedule survives restarts). Returns the new
    /// `kid`, or `None` when it was not due.
    pub fn rotate_if_due(&self, period_secs: u64) -> Result<Option<String>, TokenError> {
        self.rotate_if_due_at(period_secs, now_unix())
    }

    fn rotate_if_due_at(&self, period_secs: u64, now: i64) -> Result<Option<String>, TokenError> {
        if now < self.next_rotation(period_secs) {
            return Ok(None);
        }
        self.rotate_at(now).map(Some)
    }

    fn rotate_at(&self, now: i64) -> Result<String, TokenError> {
        let new = TokenKey::generate(now)?;
        let kid = new.kid.clone();
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let retention = i64::from(MAX_TOKEN_MINUTES) * 60 + RETENTION_MARGIN_SECS;
        let mut next = Vec::with_capacity(keys.len() + 1);
        next.push(new);
        // A key stops issuing when the next newer one is created; its last tokens expire
        // at most `retention` later. The newest key is retired by this very rotation.
        let mut retired_at = now;
        for key in keys.iter() {
            if now - retired_at <= retention {
                next.push(key.clone());
            }
            retired_at = key.created;
        }
        // Persist first so memory never holds keys the file lacks.
        persist(&self.path, &next)?;
        *keys = next;
        Ok(kid)
    }

    /// Encrypts `claims` into a compact JWE under the newest key.
    pub fn issue(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        let payload = serde_json::to_vec(claims)
            .map_err(|e| TokenError::Encrypt(josekit::JoseError::InvalidJson(e.into())))?;
        let (kid, encrypter) = {
            let keys = self.read();
            let key = &keys[0];
            let encrypter = Dir
                .encrypter_from_bytes(key.secret)
                .map_err(TokenError::Encrypt)?;
            (key.kid.clone(), encrypter)
        };
        let mut header = JweHeader::new();
        header.set_content_encryption(ENC);
        header.set_key_id(kid);
        josekit::jwe::serialize_compact(&payload, &header, &encrypter).map_err(TokenError::Encrypt)
    }

    /// Decrypts and checks `token` as of `now_unix`: framing, algorithm, key, integrity and
    /// expiry. What the token permits is [`TokenClaims::permits`]'s job.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Arc<Verified>, TokenError> {
        let digest = *blake3::hash(token.as_bytes()).as_bytes();
        let known = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            .cloned();
        if let Some(known) = known {
            self.recheck(&known, now_unix)?;
            return Ok(known);
        }
        let kid = check_framing(token)?;
        let decrypter = {
            let keys = self.read();
            let key = keys
                .iter()
                .find(|k| k.kid == kid)
                .ok_or(TokenError::UnknownKey)?;
            Dir.decrypter_from_bytes(key.secret)
                .map_err(|_| TokenError::UnknownKey)?
        };
        // The framing is sound, so anything josekit rejects now is the GCM tag.
        let (payload, _) =
            josekit::jwe::deserialize_compact(token, &decrypter).map_err(|_| TokenError::Forged)?;
        let claims: TokenClaims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("claims are not kiln's"))?;
        let verified = Arc::new(Verified { kid, claims });
        self.recheck(&verified, now_unix)?;
        let mut cache = self.verified.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(digest, verified.clone());
        Ok(verified)
    }

    /// Checks a token verified before, as of `now_unix`: its key is still held, it has not
    /// expired, and the access key that minted it was not revoked.
    pub fn recheck(&self, verified: &Verified, now_unix: i64) -> Result<(), TokenError> {
        if !self.read().iter().any(|k| k.kid == verified.kid) {
            return Err(TokenError::UnknownKey);
        }
        let claims = &verified.claims;
        if claims.exp <= now_unix {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        if let (Some(akid), Some(minters)) = (&claims.akid, &self.minters) {
            if !minters.is_active(akid) {
                return Err(TokenError::Revoked);
            }
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<TokenKey>> {
        // The lock guards plain data that is replaced whole, so a poisoned lock still
        // holds a consistent set.
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The JWE header fields kiln looks at.
#[derive(Deserialize)]
struct Header {
    alg: String,
    enc: String,
    kid: Option<String>,
    zip: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

/// Checks everything about `token` that needs no key and returns its `kid`.
fn check_framing(token: &str) -> Result<String, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, key, iv, ciphertext, tag] = parts[..] else {
        return Err(TokenError::Malformed("not five dot-separated parts"));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|_| TokenError::Malformed("header is not a JWE header"))?;
    if header.alg != ALG || header.enc != ENC || header.zip.is_some() || header.crit.is_some() {
        return Err(TokenError::Unsupported);
    }
    if !key.is_empty() {
        return Err(TokenError::Malformed(
            "a dir token carries no encrypted key",
        ));
    }
    let iv = decode_part(iv, "IV is not base64url")?;
    decode_part(ciphertext, "ciphertext is not base64url")?;
    let tag = decode_part(tag, "tag is not base64url")?;
    if iv.len() != IV_LEN || tag.len() != TAG_LEN {
        return Err(TokenError::Malformed("IV or tag has the wrong length"));
    }
    header.kid.ok_or(TokenError::Malformed("header has no kid"))
}

fn decode_part(part: &str, problem: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(problem))
}

fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<Vec<TokenKey>, TokenError> {
    let corrupt = |reason: String| TokenError::KeyFileCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file: KeyFile =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not kiln's JSON: {e}")))?;
    if file.version != KEY_FILE_VERSION {
        return Err(corrupt(format!(
            "format version {} is not {KEY_FILE_VERSION}",
            file.version
        )));
    }
    let mut keys = Vec::with_capacity(file.keys.len());
    for record in file.keys {
        let secret: [u8; KEY_LEN] = STANDARD
            .decode(&record.secret)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt(format!("key {} is not 32 bytes of base64", record.kid)))?;
        keys.push(TokenKey {
            kid: record.kid,
            secret,
            created: record.created,
        });
    }
    if keys.is_empty() {
        return Err(corrupt("it holds no key".to_string()));
    }
    Ok(keys)
}

fn persist(path: &Path, keys: &[TokenKey]) -> Result<(), TokenError> {
    let file = KeyFile {
        version: KEY_FILE_VERSION,
        keys: keys
            .iter()
            .map(|k| KeyRecord {
                kid: k.kid.clone(),
                secret: STANDARD.encode(k.secret),
                created: k.created,
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| TokenError::KeyFileCorrupt {
        path: path.to_path_buf(),
        reason: format!("encoding failed: {e}"),
    })?;
    write_file_atomically(path, &json, 0o600).map_err(|source| TokenError::KeyFile {
        action: "writing the token keys to",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file created with `mode` and renamed
/// over it, so readers see the old file or the new one and never a partial one. Shared
/// with the endpoint's TLS files.
pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // An earlier temporary file may have had another mode.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` with mode 0700, or tightens an existing one to it.
fn make_private_dir(dir: &Path) -> Result<(), TokenError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TokenError::KeyFile {
            action: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
    tighten_mode(dir, 0o700)
}

/// Removes permission bits beyond `mode` from an existing file or directory.
fn tighten_mode(path: &Path, mode: u32) -> Result<(), TokenError> {
    let err = |source| TokenError::KeyFile {
        action: "restricting the permissions of",
        path: path.to_path_buf(),
        source,
    };
    let current = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o777;
    if current & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))
            .map_err(err)?;
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(TokenError::Random)?;
    Ok(bytes)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::shapes::microvm::PortRange;

    const NOW: i64 = 1_800_000_000;

    fn keys() -> (tempfile::TempDir, TokenKeys) {
        let home = tempfile::tempdir().expect("temp dir");
        let keys = TokenKeys::load_or_create(home.path()).expect("keys");
        (home, keys)
    }

    fn claims(kind: TokenKind, ports: Vec<PortSpecification>) -> TokenClaims {
        TokenClaims {
            mvm: "mvm-0123456789abcdef".to_string(),
            ports,
            exp: NOW + 600,
            iat: NOW,
            kind,
            jti: "jti-1".to_string(),
            akid: None,
        }
    }

    fn proxy_claims() -> TokenClaims {
        claims(TokenKind::Proxy, vec![PortSpecification::Port(8080)])
    }

    /// Decodes part `index` of `token`, flips one bit of its first byte, re-encodes it.
    fn flip_bit(token: &str, index: usize) -> String {
        let part = token.split('.').nth(index).expect("a part");
        let mut bytes = URL_SAFE_NO_PAD.decode(part).expect("base64url part");
        bytes[0] ^= 0x01;
        with_part(token, index, &URL_SAFE_NO_PAD.encode(bytes))
    }

    fn header_of(token: &str) -> serde_json::Value {
        let header = URL_SAFE_NO_PAD
            .decode(token.split('.').next().expect("header"))
            .expect("base64url");
        serde_json::from_slice(&header).expect("json")
    }

    fn with_part(token: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    fn with_header(token: &str, header: &str) -> String {
        with_part(token, 0, &URL_SAFE_NO_PAD.encode(header))
    }

    #[test]
    fn verify_when_token_was_just_issued_then_returns_its_claims() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let claims = keys.verify(&token, NOW).expect("verify");

        assert_eq!(claims.claims, proxy_claims());
    }

    #[test]
    fn issue_when_called_then_header_is_dir_a256gcm_with_current_kid() {
        let (_home, keys) = keys();

        let token = keys.issue(&proxy_claims()).expect("issue");

        let header = header_of(&token);
        assert_eq!(header["alg"], "dir");
        assert_eq!(header["enc"], "A256GCM");
        assert_eq!(header["kid"], keys.current_kid().as_str());
        assert_eq!(token.split('.').nth(1), Some(""));
    }

    #[test]
    fn issue_when_called_then_claims_are_not_readable_in_the_token() {
        let (_home, keys) = keys();

        let token = keys.issue(&proxy_claims()).expect("issue");

        assert!(!token.contains("mvm-0123456789abcdef"));
        let ciphertext = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(3).expect("ciphertext"))
            .expect("base64url");
        assert!(!String::from_utf8_lossy(&ciphertext).contains("mvm-"));
    }

    #[test]
    fn verify_when_ciphertext_is_tampered_then_forged() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&flip_bit(&token, 3), NOW);

        assert!(matches!(result, Err(TokenError::Forged)), "{result:?}");
    }

    #[test]
    fn verify_when_tag_is_tampered_then_forged() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&flip_bit(&token, 4), NOW);

        assert!(matches!(result, Err(TokenError::Forged)), "{result:?}");
    }

    #[test]
    fn verify_when_iv_is_tampered_then_forged() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&flip_bit(&token, 2), NOW);

        assert!(matches!(result, Err(TokenError::Forged)), "{result:?}");
    }

    #[test]
    fn verify_when_header_is_rewritten_then_forged() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");
        let header = format!(
            r#"{{"enc":"A256GCM","alg":"dir","kid":"{}"}}"#,
            keys.current_kid()
        );

        let result = keys.verify(&with_header(&token, &header), NOW);

        assert!(matches!(result, Err(TokenError::Forged)), "{result:?}");
    }

    #[test]
    fn verify_when_not_five_parts_then_malformed() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");
        let four = token.rsplit_once('.').expect("a dot").0;

        let result = keys.verify(four, NOW);

        assert!(
            matches!(result, Err(TokenError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn verify_when_a_part_is_not_base64url_then_malformed() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&with_part(&token, 2, "not*base64"), NOW);

        assert!(
            matches!(result, Err(TokenError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn verify_when_header_is_not_json_then_malformed() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&with_header(&token, "not json"), NOW);

        assert!(
            matches!(result, Err(TokenError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn verify_when_alg_or_enc_differ_then_unsupported() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");
        let kid = keys.current_kid();
        let other_alg = format!(r#"{{"alg":"A256KW","enc":"A256GCM","kid":"{kid}"}}"#);
        let other_enc = format!(r#"{{"alg":"dir","enc":"A128CBC-HS256","kid":"{kid}"}}"#);

        let results = [
            keys.verify(&with_header(&token, &other_alg), NOW),
            keys.verify(&with_header(&token, &other_enc), NOW),
        ];

        for result in results {
            assert!(matches!(result, Err(TokenError::Unsupported)), "{result:?}");
        }
    }

    #[test]
    fn verify_when_kid_is_unknown_then_unknown_key() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");
        let header = r#"{"alg":"dir","enc":"A256GCM","kid":"nobody"}"#;

        let result = keys.verify(&with_header(&token, header), NOW);

        assert!(matches!(result, Err(TokenError::UnknownKey)), "{result:?}");
    }

    #[test]
    fn verify_when_expired_then_expired() {
        let (_home, keys) = keys();
        let token = keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&token, NOW + 600);

        assert!(
            matches!(result, Err(TokenError::Expired { exp }) if exp == NOW + 600),
            "{result:?}"
        );
    }

    /// Revokes whatever it is told to, when it is told to.
    struct RevokeLater(std::sync::Mutex<Option<&'static str>>);

    impl Minters for RevokeLater {
        fn is_active(&self, access_key_id: &str) -> bool {
            *self.0.lock().expect("lock") != Some(access_key_id)
        }
    }

    #[test]
    fn verify_when_a_remembered_token_expires_or_its_key_is_revoked_then_refused() {
        let home = tempfile::tempdir().expect("temp dir");
        let minters = Arc::new(RevokeLater(std::sync::Mutex::new(None)));
        let keys = TokenKeys::load_or_create(home.path())
            .expect("keys")
            .with_minters(minters.clone());
        let token = keys
            .issue(&proxy_claims().minted_by("AKIABOB"))
            .expect("issue");

        let first = keys.verify(&token, NOW);
        let again = keys.verify(&token, NOW + 1);
        let expired = keys.verify(&token, NOW + 600);
        *minters.0.lock().expect("lock") = Some("AKIABOB");
        let revoked = keys.verify(&token, NOW + 2);
        let forged = keys.verify(&flip_bit(&token, 3), NOW + 2);

        assert!(first.is_ok() && again.is_ok(), "{first:?} {again:?}");
        assert!(
            matches!(expired, Err(TokenError::Expired { .. })),
            "{expired:?}"
        );
        assert!(matches!(revoked, Err(TokenError::Revoked)), "{revoked:?}");
        assert!(matches!(forged, Err(TokenError::Forged)), "{forged:?}");
    }

    #[test]
    fn verify_when_token_comes_from_another_home_then_unknown_key() {
        let (_home, keys) = keys();
        let (_other_home, other_keys) = super::tests::keys();
        let token = other_keys.issue(&proxy_claims()).expect("issue");

        let result = keys.verify(&token, NOW);

        assert!(matches!(result, Err(TokenError::UnknownKey)), "{result:?}");
    }

    #[test]
    fn verify_when_another_home_key_reuses_our_kid_then_forged() {
        let (_home, keys) = keys();
        let (_other_home, other_keys) = super::tests::keys();
        let token = other_keys.issue(&proxy_claims()).expect("issue");
        let header = format!(
            r#"{{"alg":"dir","enc":"A256GCM","kid":"{}"}}"#,
            keys.current_kid()
        );

        let result = keys.verify(&with_header(&token, &header), NOW);

        assert!(matches!(result, Err(TokenError::Forged)), "{result:?}");
    }

    #[test]
    fn permits_when_microvm_differs_then_other_microvm() {
        let claims = proxy_claims();

        let result = claims.permits("mvm-other", 8080, TokenKind::Proxy);

        assert!(
            matches!(result, Err(TokenError::OtherMicrovm { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn permits_when_port_is_outside_the_range_then_port_not_allowed() {
        let range = PortSpecification::Range(PortRange {
            start_port: 8000,
            end_port: 8100,
        });
        let claims = claims(TokenKind::Proxy, vec![range]);

        let inside = claims.permits(&claims.mvm, 8100, TokenKind::Proxy);
        let outside = claims.permits(&claims.mvm, 8101, TokenKind::Proxy);

        assert!(inside.is_ok(), "{inside:?}");
        assert!(
            matches!(outside, Err(TokenError::PortNotAllowed { port: 8101 })),
            "{outside:?}"
        );
    }

    #[test]
    fn permits_when_all_ports_then_any_port_is_allowed() {
        let all: PortSpecification = serde_json::from_str(r#"{"allPorts":{}}"#).expect("json");
        let claims = claims(TokenKind::Proxy, vec![all]);

        let results = [1, 8080, 65535].map(|p| claims.permits(&claims.mvm, p, TokenKind::Proxy));

        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    #[test]
    fn permits_when_kind_differs_then_wrong_kind() {
        let claims = claims(TokenKind::Shell, vec![]);

        let result = claims.permits(&claims.mvm, 8080, TokenKind::Proxy);

        assert!(
            matches!(result, Err(TokenError::WrongKind { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn claims_when_encoded_then_use_the_api_port_shapes() {
        let claims = claims(
            TokenKind::Proxy,
            vec![
                PortSpecification::Port(8080),
                serde_json::from_str(r#"{"allPorts":{}}"#).expect("json"),
            ],
        );

        let json = serde_json::to_value(&claims).expect("json");

        assert_eq!(
            json["ports"],
            serde_json::json!([{"port": 8080}, {"allPorts": {}}])
        );
        assert_eq!(json["kind"], "proxy");
    }

    #[test]
    fn rotate_when_called_then_old_tokens_stay_valid_and_new_ones_use_the_new_kid() {
        let (_home, keys) = keys();
        let old_kid = keys.current_kid();
        let old_token = keys.issue(&proxy_claims()).expect("issue");

        let new_kid = keys.rotate().expect("rotate");
        let new_token = keys.issue(&proxy_claims()).expect("issue");

        assert_ne!(new_kid, old_kid);
        assert_eq!(keys.current_kid(), new_kid);
        assert!(keys.verify(&old_token, NOW).is_ok());
        assert!(keys.verify(&new_token, NOW).is_ok());
        assert_eq!(header_of(&old_token)["kid"], old_kid.as_str());
        assert_eq!(header_of(&new_token)["kid"], new_kid.as_str());
    }

    #[test]
    fn rotate_when_a_key_was_retired_over_an_hour_ago_then_it_is_dropped() {
        let (_home, keys) = keys();
        let first_token = keys.issue(&proxy_claims()).expect("issue");
        let start = now_unix();
        keys.rotate_at(start).expect("rotate");

        keys.rotate_at(start + 30 * 60).expect("rotate");
        let kept = keys.verify(&first_token, NOW);
        keys.rotate_at(start + 66 * 60).expect("rotate");
        let dropped = keys.verify(&first_token, NOW);

        assert!(kept.is_ok(), "{kept:?}");
        assert!(
            matches!(dropped, Err(TokenError::UnknownKey)),
            "{dropped:?}"
        );
        assert_eq!(keys.read().len(), 3);
    }

    #[test]
    fn rotate_if_due_when_the_newest_key_is_a_period_old_then_rotates_once() {
        let (_home, keys) = keys();
        let created = keys.read()[0].created;
        let first = keys.current_kid();

        let early = keys.rotate_if_due_at(3600, created + 3599).expect("early");
        let due = keys.rotate_if_due_at(3600, created + 3600).expect("due");
        let again = keys.rotate_if_due_at(3600, created + 3601).expect("again");

        assert_eq!(early, None);
        assert_eq!(due.as_deref(), Some(keys.current_kid().as_str()));
        assert_ne!(keys.current_kid(), first);
        assert_eq!(again, None);
        assert_eq!(keys.next_rotation(3600), created + 7200);
    }

    struct Revoked(&'static str);

    impl Minters for Revoked {
        fn is_active(&self, access_key_id: &str) -> bool {
            access_key_id != self.0
        }
    }

    #[test]
    fn verify_when_the_minting_key_is_revoked_then_revoked() {
        let home = tempfile::tempdir().expect("temp dir");
        let keys = TokenKeys::load_or_create(home.path())
            .expect("keys")
            .with_minters(Arc::new(Revoked("AKIABOB")));
        let bobs = keys
            .issue(&proxy_claims().minted_by("AKIABOB"))
            .expect("issue");
        let alices = keys
            .issue(&proxy_claims().minted_by("AKIAALICE"))
            .expect("issue");
        let unnamed = keys.issue(&proxy_claims()).expect("issue");

        let results = [bobs, alices, unnamed].map(|t| keys.verify(&t, NOW));

        assert!(
            matches!(results[0], Err(TokenError::Revoked)),
            "{:?}",
            results[0]
        );
        assert_eq!(
            results[1]
                .as_ref()
                .ok()
                .and_then(|c| c.claims.akid.as_deref()),
            Some("AKIAALICE")
        );
        assert!(results[2].is_ok());
    }

    #[test]
    fn load_or_create_when_reloaded_then_rotated_keys_persist() {
        let (home, keys) = keys();
        keys.rotate().expect("rotate");
        let token = keys.issue(&proxy_claims()).expect("issue");

        let reloaded = TokenKeys::load_or_create(home.path()).expect("reload");

        assert_eq!(reloaded.current_kid(), keys.current_kid());
        assert!(reloaded.verify(&token, NOW).is_ok());
    }

    #[test]
    fn load_or_create_when_first_started_then_key_file_is_0600_in_a_0700_dir() {
        let (home, keys) = keys();
        keys.rotate().expect("rotate");

        let file = std::fs::metadata(home.path().join("keys/tokens.json")).expect("file");
        let dir = std::fs::metadata(home.path().join("keys")).expect("dir");

        assert_eq!(file.permissions().mode() & 0o777, 0o600);
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn load_or_create_when_file_is_damaged_then_says_which_file() {
        let home = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(home.path().join("keys")).expect("dir");
        std::fs::write(home.path().join("keys/tokens.json"), b"{}").expect("write");

        let err = TokenKeys::load_or_create(home.path()).expect_err("damaged");

        assert!(err.to_string().contains("tokens.json"), "{err}");
    }

    #[test]
    fn debug_when_printed_then_shows_no_secret() {
        let (home, keys) = keys();
        let file = std::fs::read_to_string(home.path().join("keys/tokens.json")).expect("read");
        let secret = file
            .split("\"secret\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("a secret");

        let debug = format!("{keys:?}");

        assert!(!debug.contains(secret), "{debug}");
    }

    #[test]
    fn expiry_from_minutes_when_outside_1_to_60_then_lifetime_out_of_range() {
        let results = [0, 61, -5].map(expiry_from_minutes);

        for result in results {
            assert!(
                matches!(result, Err(TokenError::LifetimeOutOfRange { .. })),
                "{result:?}"
            );
        }
        let hour = expiry_from_minutes(60).expect("60 minutes") - now_unix();
        assert!((3599..=3600).contains(&hour), "{hour}");
    }
}
