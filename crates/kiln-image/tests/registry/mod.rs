//! A registry of the test's own on loopback (Debian's `docker-registry` with a config the
//! test writes, storage in a tempdir, optional htpasswd basic auth) and a small pusher for
//! images the tests make: tar layers (gzip, zstd or plain), configs, manifests, indexes.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// A running registry; killed on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    child: Child,
    _dir: tempfile::TempDir,
    auth: Option<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// bcrypt via the host's python3 (crypt with libxcrypt), as htpasswd wants.
fn bcrypt(password: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("python3");
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        hash.starts_with("$2"),
        "no bcrypt hash: {hash} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hash
}

impl Registry {
    /// Starts a registry, with basic auth when `auth` is given.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(password))).expect("htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).expect("log"))
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            host,
            child,
            _dir: dir,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }

    /// Where the registry stores a blob's bytes (tests tamper with them there).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self._dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Stops it (the test then sees it unreachable).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    fn reference(&self, repo: &str, tag: &str) -> Reference {
        format!("{}/{repo}:{tag}", self.host)
            .parse()
            .expect("reference")
    }

    /// Pushes a blob; returns its descriptor JSON.
    pub async fn push_blob(
        &self,
        repo: &str,
        media_type: &str,
        data: Vec<u8>,
    ) -> serde_json::Value {
        let (client, auth) = self.client();
        let r = self.reference(repo, "x");
        client
            .auth(&r, &auth, oci_client::RegistryOperation::Push)
            .await
            .expect("auth");
        let digest = kiln_image::oci::sha256_digest(&data);
        let size = data.len();
        client
            .push_blob(&r, data, &digest)
            .await
            .expect("push blob");
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
    }

    /// Pushes a manifest document under `tag`; returns its digest and size.
    pub async fn push_manifest(
        &self,
        repo: &str,
        tag: &str,
        body: &serde_json::Value,
    ) -> (String, usize) {
        let (client, auth) = self.client();
        let r = self.reference(repo, tag);
        client
            .auth(&r, &auth, oci_client::RegistryOperation::Push)
            .await
            .expect("auth");
        let bytes = serde_json::to_vec(body).expect("json");
        let media = body["mediaType"].as_str().expect("mediaType").to_string();
        let digest = kiln_image::oci::sha256_digest(&bytes);
        let size = bytes.len();
        client
            .push_manifest_raw(
                &r,
                bytes,
                reqwest::header::HeaderValue::from_str(&media).expect("header"),
            )
            .await
            .expect("push manifest");
        (digest, size)
    }

    /// Pushes an image of `layers` (each a tar) with `config` (the `config` object of the
    /// image config) as `repo:tag`; returns the manifest digest and size.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
        codec: Codec,
        arch: &str,
    ) -> (String, usize) {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            diff_ids.push(kiln_image::oci::sha256_digest(tar));
            let (media, data) = match codec {
                Codec::Gzip => {
                    let mut enc =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    enc.write_all(tar).expect("gzip");
                    (
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                        enc.finish().expect("gzip"),
                    )
                }
                Codec::DockerGzip => {
                    let mut enc =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    enc.write_all(tar).expect("gzip");
                    (
                        "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        enc.finish().expect("gzip"),
                    )
                }
                Codec::Zstd => (
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                    ruzstd::encoding::compress_to_vec(
                        &tar[..],
                        ruzstd::encoding::CompressionLevel::Fastest,
                    ),
                ),
            };
            descs.push(self.push_blob(repo, media, data).await);
        }
        let docker = codec == Codec::DockerGzip;
        let cfg = serde_json::json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        });
        let cfg_media = if docker {
            "application/vnd.docker.container.image.v1+json"
        } else {
            "application/vnd.oci.image.config.v1+json"
        };
        let cfg_desc = self
            .push_blob(repo, cfg_media, serde_json::to_vec(&cfg).expect("json"))
            .await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": if docker { "application/vnd.docker.distribution.manifest.v2+json" } else { "application/vnd.oci.image.manifest.v1+json" },
            "config": cfg_desc,
            "layers": descs,
        });
        self.push_manifest(repo, tag, &manifest).await
    }

    /// Pushes an index of `(digest, size, os, arch)` entries as `repo:tag`.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(String, usize, &str, &str)],
    ) -> (String, usize) {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(d, s, os, arch)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d, "size": s, "platform": {"os": os, "architecture": arch}
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.push_manifest(repo, tag, &index).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How the pusher compresses layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// OCI tar+gzip.
    Gzip,
    /// Docker v2 manifest with Docker's gzip layer type.
    DockerGzip,
    /// OCI tar+zstd.
    Zstd,
}

/// Entry kinds for [`tar_of`].
pub enum Entry<'a> {
    /// A directory.
    Dir(&'a str, u32),
    /// A file with content and mode.
    File(&'a str, &'a [u8], u32),
    /// A symbolic link and its target.
    Symlink(&'a str, &'a str),
    /// A hard link and its target.
    HardLink(&'a str, &'a str),
}

/// A tar layer of `entries` (names written raw, as a hostile layer may).
pub fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data): (&str, &[u8]) = match e {
            Entry::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (p, b"")
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, data)
            }
            Entry::Symlink(p, t) | Entry::HardLink(p, t) => {
                h.set_entry_type(if matches!(e, Entry::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).expect("link");
                continue;
            }
        };
        h.set_size(data.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A file's content on an ext4 disk, read with debugfs (None when absent).
pub fn disk_file(disk: &std::path::Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .expect("debugfs");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The directory that gets each test's registry cache.
pub fn cache_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("cache");
    let path = dir.path().join("registry");
    (dir, path)
}
