//! The embedded S3-compatible artifact store: `aws s3 mb`, `aws s3 cp app.zip s3://bucket/…`
//! against kilnd's own API address, then `--code-artifact uri=s3://bucket/app.zip`.
//!
//! The S3 protocol (routing, XML, SigV4 for S3, streaming bodies) is the `s3s` crate's; objects
//! live as plain files under `<home>/s3/objects/<bucket>/<key>` through `s3s-fs`. kiln adds
//! what a shared host needs: requests are signed with kiln's own access keys, and a bucket
//! belongs to the principal that made it — others get `AccessDenied`, as on AWS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{Credentials, S3Auth, SecretKey};
use s3s::dto::*;
use s3s::path::S3Path;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

/// Who holds an access key: what the store needs to verify a signature and find the owner.
pub trait Keyring: Send + Sync + 'static {
    /// The secret and principal of an active (not revoked) access key.
    fn lookup(&self, access_key_id: &str) -> Option<(String, String)>;
}

/// Decides whether a principal may store more bytes (the stored-bytes quota).
pub trait StorageBudget: Send + Sync + 'static {
    /// `Ok` when `principal` may store `bytes` more; the refusal's words otherwise.
    fn admit(&self, principal: &str, bytes: u64) -> Result<(), String>;
}

/// The principal that may act on every bucket.
pub const ADMIN: &str = "admin";

/// Errors of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum S3StoreError {
    /// The store's directory cannot be used.
    #[error("the S3 store at {path} cannot be opened: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `s3://` URI that is not `s3://bucket/key`.
    #[error("codeArtifact.uri {0} is not of the form s3://bucket/key")]
    BadUri(String),
    /// The bucket does not exist or belongs to someone else (the same answer for both).
    #[error("codeArtifact.uri {uri}: no bucket {bucket} of yours in kiln's S3 store; create it with `aws s3 mb s3://{bucket} --endpoint-url <kilnd>`")]
    NoBucket { uri: String, bucket: String },
    /// The object does not exist.
    #[error("codeArtifact.uri {0}: no such object in kiln's S3 store; upload it with `aws s3 cp app.zip {0} --endpoint-url <kilnd>`")]
    NoObject(String),
    /// kilnd could not write an object of its own.
    #[error("writing to kiln's S3 store: {0}")]
    Io(String),
}

/// Bucket owners, kept beside the objects in `owners.json`.
#[derive(Debug)]
struct Owners {
    path: PathBuf,
    map: Mutex<BTreeMap<String, String>>,
}

impl Owners {
    fn open(path: PathBuf) -> Result<Owners, std::io::Error> {
        let map = match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Owners {
            path,
            map: Mutex::new(map),
        })
    }

    fn owner(&self, bucket: &str) -> Option<String> {
        self.lock().get(bucket).cloned()
    }

    fn set(&self, bucket: &str, principal: &str) -> Result<(), std::io::Error> {
        let mut map = self.lock();
        map.insert(bucket.to_string(), principal.to_string());
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&*map).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The embedded S3 store.
pub struct S3Store {
    objects: PathBuf,
    owners: Arc<Owners>,
    service: S3Service,
    budget: Arc<std::sync::OnceLock<Arc<dyn StorageBudget>>>,
}

impl S3Store {
    /// Opens (creating if needed) the store under `dir`, verifying requests with `keys`.
    pub fn open(dir: &Path, keys: Arc<dyn Keyring>) -> Result<S3Store, S3StoreError> {
        let open = |path: &Path, source| S3StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).map_err(|e| open(&objects, e))?;
        let owners = Arc::new(Owners::open(dir.join("owners.json")).map_err(|e| open(dir, e))?);
        let fs = s3s_fs::FileSystem::new(&objects)
            .map_err(|e| open(&objects, std::io::Error::other(format!("{e:?}"))))?;
        let mut builder = S3ServiceBuilder::new(OwnedBuckets {
            fs,
            keys: keys.clone(),
            owners: owners.clone(),
        });
        builder.set_auth(KeyAuth(keys.clone()));
        let budget = Arc::new(std::sync::OnceLock::new());
        builder.set_access(BucketAccess {
            keys,
            owners: owners.clone(),
            objects: objects.clone(),
            budget: budget.clone(),
        });
        Ok(S3Store {
            objects,
            owners,
            service: builder.build(),
            budget,
        })
    }

    /// Uploads (PutObject, UploadPart) must fit `budget` from now on; set once.
    pub fn set_budget(&self, budget: Arc<dyn StorageBudget>) {
        let _ = self.budget.set(budget);
    }

    /// The directories of the buckets `principal` owns (for the stored-bytes quota).
    pub fn bucket_dirs_of(&self, principal: &str) -> Vec<PathBuf> {
        self.owners
            .lock()
            .iter()
            .filter(|(_, owner)| owner.as_str() == principal)
            .map(|(bucket, _)| self.objects.join(bucket))
            .collect()
    }

    /// Whether a request is meant for S3: its SigV4 credential scope names the `s3` service.
    pub fn is_s3_request(headers: &HeaderMap, query: Option<&str>) -> bool {
        let scope_is_s3 = |credential: &str| credential.split('/').nth(3) == Some("s3");
        let in_header = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("Credential=").nth(1))
            .is_some_and(scope_is_s3);
        let in_query = query.is_some_and(|q| {
            q.split('&')
                .filter_map(|kv| kv.strip_prefix("X-Amz-Credential="))
                .any(|c| scope_is_s3(&c.replace("%2F", "/").replace("%2f", "/")))
        });
        in_header || in_query
    }

    /// Serves one S3 request.
    pub async fn serve(&self, req: Request<Body>) -> Response {
        let req = req.map(s3s::Body::http_body_unsync);
        match self.service.call(req).await {
            Ok(resp) => resp.map(Body::new),
            Err(e) => {
                tracing::warn!(error = ?e, "S3 request failed");
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "the S3 store failed; see kilnd's log",
                )
                    .into_response()
            }
        }
    }

    /// Whether `bucket` is one of this store's.
    pub fn has_bucket(&self, bucket: &str) -> bool {
        valid_bucket(bucket) && self.objects.join(bucket).is_dir()
    }

    /// Stores `bytes` as `s3://bucket/key` on kilnd's own behalf for `principal`, creating the
    /// bucket as theirs when it does not exist (E2B's `base` template source, `e2b/template.rs`);
    /// refuses a bucket someone else owns.
    pub fn put_for(
        &self,
        principal: &str,
        bucket: &str,
        key: &str,
        bytes: &[u8],
    ) -> Result<String, S3StoreError> {
        let uri = format!("s3://{bucket}/{key}");
        if !valid_bucket(bucket) || !valid_key(key) {
            return Err(S3StoreError::BadUri(uri));
        }
        match self.owners.owner(bucket) {
            Some(owner) if owner != principal => {
                return Err(S3StoreError::NoBucket {
                    uri,
                    bucket: bucket.to_string(),
                })
            }
            Some(_) => {}
            None => self
                .owners
                .set(bucket, principal)
                .map_err(|e| S3StoreError::Io(e.to_string()))?,
        }
        let path = self.objects.join(bucket).join(key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| S3StoreError::Io(e.to_string()))?;
        }
        std::fs::write(&path, bytes).map_err(|e| S3StoreError::Io(e.to_string()))?;
        Ok(uri)
    }

    /// The file holding `s3://bucket/key` for `principal` (who must own the bucket).
    pub fn object_path(&self, uri: &str, principal: &str) -> Result<PathBuf, S3StoreError> {
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| S3StoreError::BadUri(uri.to_string()))?;
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| valid_bucket(b) && valid_key(k))
            .ok_or_else(|| S3StoreError::BadUri(uri.to_string()))?;
        let owned = self.owners.owner(bucket).as_deref() == Some(principal) || principal == ADMIN;
        let dir = self.objects.join(bucket);
        if !owned || !dir.is_dir() {
            return Err(S3StoreError::NoBucket {
                uri: uri.to_string(),
                bucket: bucket.to_string(),
            });
        }
        let path = dir.join(key);
        if !path.is_file() {
            return Err(S3StoreError::NoObject(uri.to_string()));
        }
        Ok(path)
    }
}

/// S3's bucket naming rules (3–63 lower-case letters, digits, dots, hyphens).
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.starts_with(['.', '-'])
        && !b.ends_with(['.', '-'])
}

/// A key that names a file below its bucket: no empty, `.` or `..` segments.
fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 1024 && k.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Secrets come from kiln's access keys.
struct KeyAuth(Arc<dyn Keyring>);

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.lookup(access_key) {
            Some((secret, _)) => Ok(SecretKey::from(secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "the access key is not one of kiln's (or it was revoked): list keys with `kiln keys list`"
            )),
        }
    }
}

/// Every request is signed; a bucket is its creator's (and the admin's). The request path's
/// bucket is checked for every operation; operations that name a second bucket elsewhere
/// (the copy source of CopyObject and UploadPartCopy) are checked for it too.
struct BucketAccess {
    keys: Arc<dyn Keyring>,
    owners: Arc<Owners>,
    objects: PathBuf,
    budget: Arc<std::sync::OnceLock<Arc<dyn StorageBudget>>>,
}

impl BucketAccess {
    /// The principal behind a request's access key.
    fn principal(&self, creds: Option<&Credentials>) -> S3Result<String> {
        let Some(creds) = creds else {
            return Err(s3_error!(
                AccessDenied,
                "kiln's S3 store needs signed requests: use the credentials kilnd wrote to <home>/credentials"
            ));
        };
        match self.keys.lookup(&creds.access_key) {
            Some((_, principal)) => Ok(principal),
            None => Err(s3_error!(InvalidAccessKeyId)),
        }
    }

    /// Whether `principal` may act on `bucket` (a missing bucket is left to the store,
    /// which answers NoSuchBucket).
    fn may_use(&self, principal: &str, bucket: &str) -> S3Result<()> {
        let exists = self.objects.join(bucket).is_dir();
        // A bucket without a recorded owner predates ownership: the admin's.
        let owner = self
            .owners
            .owner(bucket)
            .unwrap_or_else(|| ADMIN.to_string());
        if !exists || owner == principal || principal == ADMIN {
            return Ok(());
        }
        Err(s3_error!(
            AccessDenied,
            "bucket {bucket} belongs to another principal"
        ))
    }

    /// Whether an upload of `bytes` (as declared) fits the caller's stored-bytes quota.
    /// Asked on the blocking pool: the budget measures what the principal stores by walking
    /// its directories.
    async fn may_store(&self, creds: Option<&Credentials>, bytes: Option<i64>) -> S3Result<()> {
        let Some(budget) = self.budget.get().cloned() else {
            return Ok(());
        };
        let principal = self.principal(creds)?;
        let bytes = bytes.map(|b| b.max(0) as u64).unwrap_or(0);
        kiln_vmm::blocking(move || budget.admit(&principal, bytes))
            .await
            .map_err(|why| s3_error!(AccessDenied, "{why}"))
    }

    /// The copy source's bucket, which must be the caller's too.
    fn may_copy_from(&self, creds: Option<&Credentials>, source: &CopySource) -> S3Result<()> {
        let principal = self.principal(creds)?;
        match source {
            CopySource::Bucket { bucket, .. } => self.may_use(&principal, bucket),
            _ => Err(s3_error!(
                NotImplemented,
                "kiln's S3 store copies only from bucket/key sources"
            )),
        }
    }
}

#[async_trait::async_trait]
impl S3Access for BucketAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let principal = self.principal(cx.credentials())?;
        let bucket = match cx.s3_path() {
            S3Path::Root => return Ok(()),
            S3Path::Bucket { bucket } | S3Path::Object { bucket, .. } => bucket.to_string(),
        };
        if cx.s3_op().name() == "CreateBucket" {
            let exists = self.objects.join(&bucket).is_dir();
            let owner = self.owners.owner(&bucket);
            if exists && owner.as_deref().is_some_and(|o| o != principal) {
                return Err(s3_error!(BucketAlreadyExists));
            }
            if !exists {
                self.owners.set(&bucket, &principal).map_err(|e| {
                    tracing::warn!(error = %e, "cannot record a bucket's owner");
                    s3_error!(InternalError, "cannot record the bucket's owner")
                })?;
            }
            return Ok(());
        }
        self.may_use(&principal, &bucket)
    }

    async fn copy_object(&self, req: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        self.may_copy_from(req.credentials.as_ref(), &req.input.copy_source)?;
        self.may_store(req.credentials.as_ref(), None).await
    }

    async fn upload_part_copy(&self, req: &mut S3Request<UploadPartCopyInput>) -> S3Result<()> {
        self.may_copy_from(req.credentials.as_ref(), &req.input.copy_source)?;
        self.may_store(req.credentials.as_ref(), None).await
    }

    async fn put_object(&self, req: &mut S3Request<PutObjectInput>) -> S3Result<()> {
        self.may_store(req.credentials.as_ref(), req.input.content_length)
            .await
    }

    async fn upload_part(&self, req: &mut S3Request<UploadPartInput>) -> S3Result<()> {
        self.may_store(req.credentials.as_ref(), req.input.content_length)
            .await
    }
}

/// The operations kiln's store serves: `s3s-fs`'s, with ListBuckets narrowed to the
/// caller's own buckets (every bucket for the admin). Each generated method forwards to
/// the file system; the access checks above have already run.
macro_rules! owned_buckets {
    ($($op:ident: $input:ident => $output:ident;)*) => {
        #[async_trait::async_trait]
        impl S3 for OwnedBuckets {
            $(
                async fn $op(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.fs.$op(req).await
                }
            )*

            async fn list_buckets(
                &self,
                req: S3Request<ListBucketsInput>,
            ) -> S3Result<S3Response<ListBucketsOutput>> {
                let principal = req
                    .credentials
                    .as_ref()
                    .and_then(|c| self.keys.lookup(&c.access_key))
                    .map(|(_, p)| p)
                    .ok_or_else(|| s3_error!(AccessDenied))?;
                let mut resp = self.fs.list_buckets(req).await?;
                if principal != ADMIN {
                    if let Some(buckets) = resp.output.buckets.as_mut() {
                        buckets.retain(|b| {
                            b.name.as_deref().is_some_and(|name| {
                                self.owners.owner(name).as_deref() == Some(principal.as_str())
                            })
                        });
                    }
                }
                Ok(resp)
            }
        }
    };
}

/// The file system store behind kiln's S3 API, knowing whose each bucket is.
struct OwnedBuckets {
    fs: s3s_fs::FileSystem,
    keys: Arc<dyn Keyring>,
    owners: Arc<Owners>,
}

owned_buckets! {
    create_bucket: CreateBucketInput => CreateBucketOutput;
    copy_object: CopyObjectInput => CopyObjectOutput;
    delete_bucket: DeleteBucketInput => DeleteBucketOutput;
    delete_object: DeleteObjectInput => DeleteObjectOutput;
    delete_objects: DeleteObjectsInput => DeleteObjectsOutput;
    get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput;
    get_object: GetObjectInput => GetObjectOutput;
    head_bucket: HeadBucketInput => HeadBucketOutput;
    head_object: HeadObjectInput => HeadObjectOutput;
    list_objects: ListObjectsInput => ListObjectsOutput;
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output;
    put_object: PutObjectInput => PutObjectOutput;
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput;
    upload_part: UploadPartInput => UploadPartOutput;
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput;
    list_parts: ListPartsInput => ListPartsOutput;
    complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput;
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneKey;
    impl Keyring for OneKey {
        fn lookup(&self, id: &str) -> Option<(String, String)> {
            (id == "AKIATEST").then(|| ("secret".to_string(), "alice".to_string()))
        }
    }

    #[test]
    fn is_s3_request_when_scope_names_s3_then_true_else_false() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIA/20261128/local/s3/aws4_request, SignedHeaders=host, Signature=00"
                .parse()
                .expect("header"),
        );
        let mut other = HeaderMap::new();
        other.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIA/20261128/local/lambda-microvms/aws4_request, SignedHeaders=host, Signature=00"
                .parse()
                .expect("header"),
        );

        assert!(S3Store::is_s3_request(&h, None));
        assert!(!S3Store::is_s3_request(&other, None));
        assert!(!S3Store::is_s3_request(&HeaderMap::new(), None));
        assert!(S3Store::is_s3_request(
            &HeaderMap::new(),
            Some("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261128%2Flocal%2Fs3%2Faws4_request")
        ));
    }

    #[test]
    fn object_path_when_uri_is_hostile_or_foreign_then_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let store = S3Store::open(dir.path(), Arc::new(OneKey)).expect("open");
        std::fs::create_dir_all(dir.path().join("objects/apps")).expect("bucket");
        std::fs::write(dir.path().join("objects/apps/app.zip"), b"zip").expect("object");
        std::fs::create_dir_all(dir.path().join("objects/theirs")).expect("bucket");
        std::fs::write(dir.path().join("objects/theirs/app.zip"), b"zip").expect("object");
        store.owners.set("apps", "alice").expect("owner");
        store.owners.set("theirs", "bob").expect("owner");

        let ok = store.object_path("s3://apps/app.zip", "alice");
        let traversal = store.object_path("s3://apps/../theirs/app.zip", "alice");
        let foreign = store.object_path("s3://theirs/app.zip", "alice");
        let by_admin = store.object_path("s3://theirs/app.zip", ADMIN);
        let missing = store.object_path("s3://apps/nope.zip", "alice");
        let no_key = store.object_path("s3://apps", "alice");

        assert_eq!(
            ok.expect("own object"),
            dir.path().join("objects/apps/app.zip")
        );
        assert!(matches!(traversal, Err(S3StoreError::BadUri(_))));
        assert!(matches!(foreign, Err(S3StoreError::NoBucket { .. })));
        assert!(by_admin.is_ok());
        assert!(matches!(missing, Err(S3StoreError::NoObject(_))));
        assert!(matches!(no_key, Err(S3StoreError::BadUri(_))));
    }
}
