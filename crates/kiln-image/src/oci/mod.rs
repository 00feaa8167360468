//! `FROM <registry image>`: pulls an image with the distribution protocol (`oci-client`:
//! anonymous bearer tokens, basic auth, digest-verified blobs), picks linux/amd64 from an
//! index, keeps every blob in a content-addressed cache of the principal's own, and turns
//! the layers into a read-only ext4 base disk (cached by manifest digest) with
//! [`extract`]'s confined extractor.
//!
//! Layout under the principal's cache directory: `blobs/sha256/<hex>` (manifests, configs,
//! layers), `refs/<blake3 of the reference>.json` (what a tag resolved to last, for drift
//! and offline builds), `bases/<manifest hex>/{disk.ext4,manifest.json}`.

pub mod extract;
pub mod manifest;
pub mod reference;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use kiln_vmm::assets::store::{DirLock, Staging};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::base::BaseImage;
pub use manifest::RunConfig;
use manifest::{AnyManifest, Descriptor, ImageConfigFile, INDEX_TYPES, MANIFEST_TYPES};
pub use reference::Mirror;

/// Where and how registry images are pulled.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Mirrors, tried before the registry they mirror (then the registry itself).
    pub mirrors: Vec<Mirror>,
    /// Registries spoken to over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// A Docker `config.json` with credentials (`auths`); `None`: `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json` when present.
    pub credentials: Option<PathBuf>,
    /// The principal's cache directory (blobs, refs, base disks); empty: the build picks
    /// `<home>/cache/registry/<owner>`.
    pub cache_dir: PathBuf,
    /// Most bytes of blobs kept; the least recently used go first after a pull (0: 20 GiB).
    pub cache_max_bytes: u64,
}

/// A pulled image, its layers in the blob cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference as written in FROM.
    pub from: String,
    /// The full reference (`docker.io/library/python:3.12-slim`).
    pub reference: String,
    /// The digest of the linux/amd64 image manifest.
    pub digest: String,
    /// The digest of the index the tag named, when it named one.
    pub index_digest: Option<String>,
    /// The image's run config.
    pub config: RunConfig,
    /// Layer blobs, lowest first: digest and media type.
    pub layers: Vec<(String, String)>,
    /// Uncompressed digests of the layers, as the config lists them.
    pub diff_ids: Vec<String>,
    /// Where the manifest came from (registry, mirror, or the cache when offline).
    pub source: String,
    /// What the same reference resolved to at the previous pull, when that differs.
    pub previous_digest: Option<String>,
}

/// What `refs/<key>.json` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefRecord {
    reference: String,
    digest: String,
    index_digest: Option<String>,
    resolved_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    digest_string(&sha2::Sha256::digest(bytes))
}

fn digest_string(raw: &[u8]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in raw {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn hex_of(digest: &str) -> Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("digest {digest} is not sha256:<64 hex digits>"))
}

/// The principal's content-addressed blob store.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// The cache rooted at `dir`.
    pub fn new(dir: &Path) -> BlobCache {
        BlobCache {
            dir: dir.to_path_buf(),
        }
    }

    /// The file of blob `digest` (which may not exist yet).
    pub fn blob(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn has(&self, digest: &str) -> bool {
        self.blob(digest).is_ok_and(|p| {
            let present = p.is_file();
            if present {
                // Touched on use: the collector removes the least recently used.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&p)
                    .and_then(|f| f.set_modified(SystemTime::now()));
            }
            present
        })
    }

    fn put_verified(&self, digest: &str, bytes: &[u8]) -> Result<(), String> {
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(format!("content has digest {actual}, not {digest}"));
        }
        let path = self.blob(digest)?;
        kiln_vmm::assets::store::write_atomic(&path, bytes).map_err(|e| e.to_string())
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.dir.join("refs").join(format!(
            "{}.json",
            &blake3::hash(reference.as_bytes()).to_hex()[..32]
        ))
    }

    fn read_ref(&self, reference: &str) -> Option<RefRecord> {
        let bytes = std::fs::read(self.ref_path(reference)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_ref(&self, rec: &RefRecord) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(rec).map_err(|e| e.to_string())?;
        kiln_vmm::assets::store::write_atomic(&self.ref_path(&rec.reference), &json)
            .map_err(|e| e.to_string())
    }

    /// Removes the least recently used blobs until at most `max_bytes` remain; returns the
    /// bytes freed. Base disks made from them stay (builds' layers are chained on them).
    pub fn collect_garbage(&self, max_bytes: u64) -> u64 {
        let dir = self.dir.join("blobs/sha256");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file()
                    .then(|| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        let mut freed = 0;
        for (_, len, path) in blobs {
            if total <= max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                freed += len;
            }
        }
        freed
    }
}

/// Credentials from a Docker `config.json` (`auths.<registry>.auth` = base64 `user:pass`,
/// or `username` + `password`).
pub fn credentials_for(config: &[u8], registry: &str) -> Result<Option<(String, String)>, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: File =
        serde_json::from_slice(config).map_err(|e| format!("not a Docker config.json: {e}"))?;
    let hub = registry == "docker.io" || registry == "index.docker.io";
    let entry = file.auths.iter().find_map(|(key, e)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        let matches = host == registry
            || (hub
                && matches!(
                    host,
                    "index.docker.io" | "docker.io" | "registry-1.docker.io"
                ));
        matches.then_some(e)
    });
    let Some(e) = entry else { return Ok(None) };
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Some((u.clone(), p.clone())));
    }
    let Some(auth) = &e.auth else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("auths.{registry}.auth is not base64"))?;
    let text =
        String::from_utf8(decoded).map_err(|_| format!("auths.{registry}.auth is not UTF-8"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| format!("auths.{registry}.auth is not base64 of user:password"))?;
    Ok(Some((u.to_string(), p.to_string())))
}

/// One place to pull from: the registry itself or a mirror of it.
struct Endpoint {
    reference: Reference,
    client: Client,
    auth: RegistryAuth,
    label: String,
}

fn endpoints(r: &Reference, opts: &RegistryOptions) -> Result<Vec<Endpoint>, String> {
    let creds_file = opts.credentials.clone().or_else(|| {
        let p = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?
            .join("config.json");
        p.is_file().then_some(p)
    });
    let creds = match &creds_file {
        Some(p) => Some(
            std::fs::read(p).map_err(|e| format!("registry credentials {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let auth_for = |registry: &str| -> Result<RegistryAuth, String> {
        let Some(bytes) = &creds else {
            return Ok(RegistryAuth::Anonymous);
        };
        let found = credentials_for(bytes, registry).map_err(|e| {
            format!(
                "registry credentials {}: {e}",
                creds_file.as_deref().unwrap_or(Path::new("")).display()
            )
        })?;
        Ok(found.map_or(RegistryAuth::Anonymous, |(u, p)| RegistryAuth::Basic(u, p)))
    };
    let client_for = |host: &str, plain: bool| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let plain =
            plain || reference::is_loopback(host) || opts.insecure.iter().any(|h| h == host);
        Client::new(ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![host.to_string()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..ClientConfig::default()
        })
    };
    let mut out = Vec::new();
    for m in opts.mirrors.iter().filter(|m| m.registry == r.registry()) {
        let mut mr = r.clone();
        mr.set_mirror_registry(m.host.clone());
        out.push(Endpoint {
            client: client_for(&m.host, m.plain_http),
            auth: auth_for(&m.host)?,
            label: format!("mirror {}", m.host),
            reference: mr,
        });
    }
    out.push(Endpoint {
        client: client_for(r.resolve_registry(), false),
        auth: auth_for(r.registry())?,
        label: format!("registry {}", r.registry()),
        reference: r.clone(),
    });
    Ok(out)
}

/// Caps what a registry may stream for one blob at its descriptor's size.
struct Capped<W> {
    inner: W,
    left: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Capped<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(std::io::Error::other(
                "the registry sent more bytes than the descriptor's size",
            )));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.left -= n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Most bytes a manifest or config may have (the registry's answer is held in memory).
const MAX_DOCUMENT: u64 = 4 << 20;

async fn fetch_manifest(ep: &Endpoint, r: &Reference) -> Result<(Vec<u8>, String), String> {
    let accept: Vec<&str> = INDEX_TYPES
        .iter()
        .chain(MANIFEST_TYPES.iter())
        .copied()
        .collect();
    let (bytes, digest) = ep
        .client
        .pull_manifest_raw(r, &ep.auth, &accept)
        .await
        .map_err(|e| format!("{}: {e}", ep.label))?;
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(format!("{}: the manifest is larger than 4 MiB", ep.label));
    }
    // oci-client checked the body against the digest asked for, or the header's.
    let actual = sha256_digest(&bytes);
    if let Some(want) = r.digest() {
        if want != actual {
            return Err(format!(
                "{}: manifest digest {actual}, not {want}",
                ep.label
            ));
        }
    }
    let _ = digest;
    Ok((bytes.to_vec(), actual))
}

async fn fetch_blob(
    ep: &Endpoint,
    cache: &BlobCache,
    d: &Descriptor,
    log: &(dyn Fn(String) + Sync),
) -> Result<PathBuf, String> {
    let path = cache.blob(&d.digest)?;
    if cache.has(&d.digest) {
        return Ok(path);
    }
    if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(format!(
            "layer {} is a foreign layer (downloaded from {:?}, not the registry); kiln does not fetch those",
            d.digest, d.urls
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let staging = Staging::path_in(dir);
    let file = tokio::fs::File::create(staging.path())
        .await
        .map_err(|e| format!("creating {}: {e}", staging.path().display()))?;
    let out = Capped {
        inner: file,
        left: d.size,
    };
    let desc = oci_client::manifest::OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        ..Default::default()
    };
    log(format!(
        "    pulling {} ({:.1} MiB) from {}",
        &d.digest[..19.min(d.digest.len())],
        d.size as f64 / (1 << 20) as f64,
        ep.label
    ));
    ep.client
        .pull_blob(&ep.reference, &desc, out)
        .await
        .map_err(|e| format!("{}: blob {}: {e}", ep.label, d.digest))?;
    staging.publish(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

async fn fetch_document(
    ep: &Endpoint,
    cache: &BlobCache,
    d: &Descriptor,
) -> Result<Vec<u8>, String> {
    if d.size > MAX_DOCUMENT {
        return Err(format!("config {} is larger than 4 MiB", d.digest));
    }
    if let Ok(bytes) = std::fs::read(cache.blob(&d.digest)?) {
        return Ok(bytes);
    }
    let path = fetch_blob(ep, cache, d, &|_| {}).await?;
    std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// Resolves `from` to its linux/amd64 manifest, fetching every blob the cache lacks.
/// Registry unreachable: a reference by digest whose blobs are cached, or a tag resolved
/// before (the log says so), is served from the cache.
pub async fn pull(
    from: &str,
    opts: &RegistryOptions,
    log: &(dyn Fn(String) + Sync),
) -> Result<PulledImage, String> {
    let r = reference::parse(from)?;
    let whole = r.whole();
    let cache = BlobCache::new(&opts.cache_dir);
    let previous = cache.read_ref(&whole);
    let eps = endpoints(&r, opts)?;
    let mut failures = Vec::new();
    for ep in &eps {
        match pull_from(ep, &r, &cache, log).await {
            Ok(mut image) => {
                image.from = from.to_string();
                image.previous_digest = previous
                    .as_ref()
                    .map(|p| p.digest.clone())
                    .filter(|d| *d != image.digest);
                cache.write_ref(&RefRecord {
                    reference: whole.clone(),
                    digest: image.digest.clone(),
                    index_digest: image.index_digest.clone(),
                    resolved_unix: now_unix(),
                })?;
                let max = if opts.cache_max_bytes == 0 {
                    20 << 30
                } else {
                    opts.cache_max_bytes
                };
                let freed = cache.collect_garbage(max);
                if freed > 0 {
                    log(format!("    registry cache: freed {} MiB", freed >> 20));
                }
                return Ok(image);
            }
            Err(PullFailure::Fatal(e)) => return Err(format!("FROM {from}: {e}")),
            Err(PullFailure::Unreachable(e)) => failures.push(e),
        }
    }
    // Offline: the cache may hold it.
    let cached = match (r.digest(), &previous) {
        (Some(d), _) => Some((d.to_string(), None)),
        (None, Some(p)) => Some((p.digest.clone(), p.index_digest.clone())),
        _ => None,
    };
    if let Some((digest, index_digest)) = cached {
        if let Ok(bytes) = std::fs::read(cache.blob(&digest)?) {
            let mut image = from_manifest_cached(&cache, &bytes, &digest)?;
            image.from = from.to_string();
            image.reference = whole;
            image.index_digest = index_digest;
            image.source = format!("the cache (registry unreachable: {})", failures.join("; "));
            return Ok(image);
        }
    }
    let all = failures.join("; ");
    let hint = if all.contains("Not authorized")
        || all.contains("401")
        || all.contains("uthenticat")
    {
        format!(
            "the registry wants credentials: give kilnd --registry-credentials a Docker config.json with auths for {}",
            r.registry()
        )
    } else {
        format!(
            "configure a mirror with kilnd --registry-mirror {}=URL, or check the network",
            r.registry()
        )
    };
    Err(format!("FROM {from}: cannot pull {whole}: {all} ({hint})"))
}

enum PullFailure {
    /// The endpoint could not serve it: try the next one, or the cache.
    Unreachable(String),
    /// The image itself is wrong (no amd64, bad digest, bad layer type): stop.
    Fatal(String),
}

async fn pull_from(
    ep: &Endpoint,
    r: &Reference,
    cache: &BlobCache,
    log: &(dyn Fn(String) + Sync),
) -> Result<PulledImage, PullFailure> {
    use PullFailure::{Fatal, Unreachable};
    let (bytes, digest) = fetch_manifest(ep, &ep.reference)
        .await
        .map_err(Unreachable)?;
    let top: AnyManifest = serde_json::from_slice(&bytes)
        .map_err(|e| Fatal(format!("the registry's manifest is not valid JSON: {e}")))?;
    if top.schema_version != 2 {
        return Err(Fatal(format!(
            "manifest schema version {} is not supported (only 2: OCI and Docker v2)",
            top.schema_version
        )));
    }
    let (bytes, digest, index_digest) = if top.is_index() {
        cache.put_verified(&digest, &bytes).map_err(Fatal)?;
        let entries = top.manifests.unwrap_or_default();
        let picked = manifest::pick_linux_amd64(&entries).map_err(Fatal)?;
        let by_digest = ep.reference.clone_with_digest(picked.digest.clone());
        let (b, d) = fetch_manifest(ep, &by_digest).await.map_err(Unreachable)?;
        if d != picked.digest {
            return Err(Fatal(format!("manifest digest {d}, not {}", picked.digest)));
        }
        (b, d, Some(digest))
    } else {
        (bytes, digest, None)
    };
    cache.put_verified(&digest, &bytes).map_err(Fatal)?;
    let m: AnyManifest = serde_json::from_slice(&bytes)
        .map_err(|e| Fatal(format!("manifest {digest} is not valid JSON: {e}")))?;
    if m.is_index() {
        return Err(Fatal(format!("{digest} is an index inside an index")));
    }
    let config_d = m
        .config
        .clone()
        .ok_or_else(|| Fatal(format!("manifest {digest} has no config")))?;
    let config = fetch_document(ep, cache, &config_d)
        .await
        .map_err(Unreachable)?;
    let layers = m.layers.clone().unwrap_or_default();
    for l in &layers {
        layer_codec(&l.media_type).map_err(Fatal)?;
        fetch_blob(ep, cache, l, log).await.map_err(Unreachable)?;
    }
    let mut image = image_of(&digest, &config, &layers).map_err(Fatal)?;
    image.reference = r.whole();
    image.index_digest = index_digest;
    image.source = ep.label.clone();
    Ok(image)
}

fn from_manifest_cached(
    cache: &BlobCache,
    bytes: &[u8],
    digest: &str,
) -> Result<PulledImage, String> {
    let m: AnyManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("cached manifest {digest}: {e}"))?;
    let config_d = m
        .config
        .ok_or_else(|| format!("cached manifest {digest} has no config"))?;
    let config = std::fs::read(cache.blob(&config_d.digest)?)
        .map_err(|e| format!("cached config {}: {e}", config_d.digest))?;
    let layers = m.layers.unwrap_or_default();
    for l in &layers {
        if !cache.has(&l.digest) {
            return Err(format!("layer {} is not in the cache", l.digest));
        }
    }
    image_of(digest, &config, &layers)
}

fn image_of(digest: &str, config: &[u8], layers: &[Descriptor]) -> Result<PulledImage, String> {
    let cfg: ImageConfigFile = serde_json::from_slice(config)
        .map_err(|e| format!("the image config is not valid JSON: {e}"))?;
    if (!cfg.os.is_empty() && cfg.os != "linux")
        || (!cfg.architecture.is_empty() && cfg.architecture != "amd64")
    {
        return Err(format!(
            "the image is {}/{}; kiln's VMs run linux/amd64",
            cfg.os, cfg.architecture
        ));
    }
    let diff_ids = cfg.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
        return Err(format!(
            "the config lists {} layers, the manifest {}",
            diff_ids.len(),
            layers.len()
        ));
    }
    Ok(PulledImage {
        from: String::new(),
        reference: String::new(),
        digest: digest.to_string(),
        index_digest: None,
        config: cfg.config.unwrap_or_default(),
        layers: layers
            .iter()
            .map(|l| (l.digest.clone(), l.media_type.clone()))
            .collect(),
        diff_ids,
        source: String::new(),
        previous_digest: None,
    })
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Plain tar.
    Tar,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// The compression a layer media type names.
pub fn layer_codec(media_type: &str) -> Result<Codec, String> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Codec::Tar),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => Ok(Codec::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Codec::Zstd),
        other => Err(format!(
            "layer media type {other:?} is not a filesystem layer kiln can apply (tar, tar+gzip, tar+zstd)"
        )),
    }
}

/// Hashes what passes through, to check a layer's uncompressed digest (its diff id).
struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Size of the sparse disk for an unpacked tree of `bytes`.
fn disk_size_for(bytes: u64) -> u64 {
    let want = (bytes * 2 + (512 << 20)).max(2 << 30);
    want.div_ceil(1 << 20) * (1 << 20)
}

/// What a pulled base's `manifest.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct BaseManifest {
    name: String,
    version: String,
    disk: String,
    size_bytes: u64,
    built_unix: u64,
    image: PulledImage,
}

/// The base disk for a pulled image, made once per manifest digest (under the cache's
/// lock) by applying its layers in a staging root and `mkfs.ext4 -d`.
pub fn ensure_base_disk(
    image: &PulledImage,
    opts: &RegistryOptions,
    log: &(dyn Fn(String) + Sync),
) -> Result<BaseImage, String> {
    let hex = hex_of(&image.digest)?;
    let bases = opts.cache_dir.join("bases");
    let dest = bases.join(hex);
    let found = |dest: &Path| -> Option<BaseImage> {
        let bytes = std::fs::read(dest.join("manifest.json")).ok()?;
        let m: BaseManifest = serde_json::from_slice(&bytes).ok()?;
        Some(BaseImage {
            name: m.name,
            version: m.version,
            disk: dest.join(m.disk),
            size_bytes: m.size_bytes,
        })
    };
    if let Some(b) = found(&dest) {
        return Ok(b);
    }
    let _lock = DirLock::acquire(&bases).map_err(|e| e.to_string())?;
    if let Some(b) = found(&dest) {
        return Ok(b);
    }
    let started = std::time::Instant::now();
    let cache = BlobCache::new(&opts.cache_dir);
    let stage = Staging::dir_in(&bases).map_err(|e| e.to_string())?;
    let rootfs = stage.path().join("rootfs");
    std::fs::create_dir(&rootfs).map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
    let root =
        extract::Root::open(&rootfs).map_err(|e| format!("opening {}: {e}", rootfs.display()))?;
    let limits = extract::ExtractLimits::default();
    let mut totals = extract::ExtractTotals::default();
    for (i, (digest, media_type)) in image.layers.iter().enumerate() {
        let path = cache.blob(digest)?;
        let file =
            std::fs::File::open(&path).map_err(|e| format!("layer {digest}: {e} (pull again)"))?;
        let raw: Box<dyn Read> = match layer_codec(media_type)? {
            Codec::Tar => Box::new(std::io::BufReader::new(file)),
            Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                file,
            ))),
            Codec::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
                    .map_err(|e| format!("layer {digest}: not zstd: {e}"))?,
            ),
        };
        let mut reader = Hashing {
            inner: raw,
            hash: sha2::Sha256::new(),
        };
        extract::apply_layer(&root, &mut reader, &limits, &mut totals)
            .map_err(|e| format!("layer {} ({digest}): {e}", i + 1))?;
        // Drain what tar left after its end marker so the whole stream is hashed.
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| format!("layer {digest}: {e}"))?;
        if let Some(want) = image.diff_ids.get(i) {
            let got = digest_string(&reader.hash.finalize());
            if &got != want {
                return Err(format!(
                    "layer {} ({digest}) unpacks to {got}, but the config says {want}",
                    i + 1
                ));
            }
        }
    }
    // What kiln-init mounts over and Docker always provides.
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = rootfs.join(dir);
        if std::fs::symlink_metadata(&p).is_err() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir(&p).map_err(|e| format!("creating /{dir}: {e}"))?;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        }
    }
    let out = stage.path().join("out");
    std::fs::create_dir(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let size = disk_size_for(totals.bytes);
    let disk = out.join("disk.ext4");
    crate::disk::mkfs_ext4_from_dir(&rootfs, &disk, size, "kiln-oci").map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| format!("chmod {}: {e}", disk.display()))?;
    }
    let manifest = BaseManifest {
        name: image.reference.clone(),
        version: image.digest.clone(),
        disk: "disk.ext4".into(),
        size_bytes: size,
        built_unix: now_unix(),
        image: image.clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(out.join("manifest.json"), json).map_err(|e| e.to_string())?;
    drop(root);
    let out_stage = Staging::path_in(&bases);
    std::fs::rename(&out, out_stage.path()).map_err(|e| e.to_string())?;
    out_stage.publish(&dest).map_err(|e| e.to_string())?;
    log(format!(
        "    base disk for {} made in {:.1} s ({} files, {} MiB)",
        image.reference,
        started.elapsed().as_secs_f64(),
        totals.entries,
        totals.bytes >> 20
    ));
    found(&dest).ok_or_else(|| format!("{} vanished after it was made", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_for_when_hub_key_or_plain_fields_then_found() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let cfg = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
            "127.0.0.1:5000":{{"username":"u","password":"p"}}}}}}"#
        );

        let hub = credentials_for(cfg.as_bytes(), "docker.io").expect("read");
        let local = credentials_for(cfg.as_bytes(), "127.0.0.1:5000").expect("read");
        let none = credentials_for(cfg.as_bytes(), "ghcr.io").expect("read");

        assert_eq!(hub, Some(("bob".into(), "s3cret".into())));
        assert_eq!(local, Some(("u".into(), "p".into())));
        assert_eq!(none, None);
    }

    #[test]
    fn collect_garbage_when_over_budget_then_oldest_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::new(dir.path());
        let old = sha256_digest(b"old");
        let new = sha256_digest(b"new!");
        cache.put_verified(&old, b"old").expect("put");
        let f = std::fs::File::options()
            .append(true)
            .open(cache.blob(&old).expect("path"))
            .expect("open");
        f.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1))
            .expect("age");
        cache.put_verified(&new, b"new!").expect("put");

        let freed = cache.collect_garbage(4);

        assert_eq!(freed, 3);
        assert!(!cache.blob(&old).expect("path").exists());
        assert!(cache.blob(&new).expect("path").exists());
    }

    #[test]
    fn put_verified_when_content_differs_then_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::new(dir.path());
        let d = sha256_digest(b"a");

        let err = cache.put_verified(&d, b"b").expect_err("mismatch");

        assert!(err.contains("not sha256:"), "{err}");
    }
}
