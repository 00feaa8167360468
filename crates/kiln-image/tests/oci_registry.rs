//! `FROM <registry image>` against a registry the test starts on loopback: pulls by tag and
//! digest, multi-arch indexes, Docker v2 and OCI manifests, gzip and zstd layers, whiteouts,
//! a hostile layer, basic auth, mirrors, offline builds from the cache, and drift.
//! No VM: the base disk is read back with debugfs.

mod registry;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_image::oci::{self, RegistryOptions};
use registry::{disk_file, tar_of, Codec, Entry, Registry};
use serde_json::json;

fn opts(cache: &Path) -> RegistryOptions {
    RegistryOptions {
        cache_dir: cache.to_path_buf(),
        // No credentials file of the host's user leaks into a test.
        credentials: Some(cache.with_file_name("no-such-config.json")).filter(|_| false),
        ..RegistryOptions::default()
    }
}

fn quiet(_: String) {}

async fn simple_image(reg: &Registry, repo: &str, tag: &str, text: &str) -> (String, usize) {
    let layer = tar_of(&[
        Entry::Dir("etc/", 0o755),
        Entry::File("etc/hello", text.as_bytes(), 0o644),
    ]);
    reg.push_image(
        repo,
        tag,
        &[layer],
        json!({"Cmd": ["/bin/sh"]}),
        Codec::Gzip,
        "amd64",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_by_tag_and_by_digest_then_same_image_and_disk_has_its_files() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let (digest, _) = simple_image(&reg, "team/app", "1", "hi\n").await;

    let by_tag = oci::pull(&format!("{}/team/app:1", reg.host), &opts(&cache), &quiet)
        .await
        .expect("pull by tag");
    let by_digest = oci::pull(
        &format!("{}/team/app@{digest}", reg.host),
        &opts(&cache),
        &quiet,
    )
    .await
    .expect("pull by digest");
    let base = oci::ensure_base_disk(&by_tag, &opts(&cache), &quiet).expect("base disk");

    assert_eq!(by_tag.digest, digest);
    assert_eq!(by_digest.digest, digest);
    assert_eq!(by_tag.config.cmd, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(disk_file(&base.disk, "/etc/hello").as_deref(), Some("hi\n"));
    assert_eq!(base.version, digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_multi_arch_index_then_amd64_picked_else_platforms_listed() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let (amd, amd_size) = simple_image(&reg, "multi", "amd", "amd64\n").await;
    let arm_layer = tar_of(&[Entry::File("arch", b"arm64\n", 0o644)]);
    let (arm, arm_size) = reg
        .push_image(
            "multi",
            "arm",
            &[arm_layer],
            json!({}),
            Codec::Gzip,
            "arm64",
        )
        .await;
    let (index, _) = reg
        .push_index(
            "multi",
            "both",
            &[
                (arm.clone(), arm_size, "linux", "arm64"),
                (amd.clone(), amd_size, "linux", "amd64"),
            ],
        )
        .await;
    reg.push_index("multi", "armonly", &[(arm, arm_size, "linux", "arm64")])
        .await;

    let pulled = oci::pull(&format!("{}/multi:both", reg.host), &opts(&cache), &quiet)
        .await
        .expect("pull");
    let err = oci::pull(
        &format!("{}/multi:armonly", reg.host),
        &opts(&cache),
        &quiet,
    )
    .await
    .expect_err("no amd64");

    assert_eq!(pulled.digest, amd);
    assert_eq!(pulled.index_digest, Some(index));
    assert!(
        err.contains("no linux/amd64 variant") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_later_layers_white_out_then_the_files_are_absent_zstd_and_docker_too() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let lower = tar_of(&[
        Entry::Dir("app/", 0o755),
        Entry::File("app/deleted", b"x", 0o644),
        Entry::File("app/kept", b"k", 0o644),
        Entry::Dir("opt/", 0o755),
        Entry::File("opt/old", b"o", 0o644),
    ]);
    let upper = tar_of(&[
        Entry::File("app/.wh.deleted", b"", 0o644),
        Entry::Dir("opt/", 0o755),
        Entry::File("opt/.wh..wh..opq", b"", 0o644),
        Entry::File("opt/new", b"n", 0o644),
    ]);
    let mut bases = Vec::new();
    for (tag, codec) in [("zstd", Codec::Zstd), ("docker", Codec::DockerGzip)] {
        reg.push_image(
            "wh",
            tag,
            &[lower.clone(), upper.clone()],
            json!({}),
            codec,
            "amd64",
        )
        .await;
        let pulled = oci::pull(&format!("{}/wh:{tag}", reg.host), &opts(&cache), &quiet)
            .await
            .expect("pull");
        bases.push(oci::ensure_base_disk(&pulled, &opts(&cache), &quiet).expect("disk"));
    }

    for base in &bases {
        assert_eq!(disk_file(&base.disk, "/app/deleted"), None);
        assert_eq!(disk_file(&base.disk, "/app/kept").as_deref(), Some("k"));
        assert_eq!(disk_file(&base.disk, "/opt/old"), None);
        assert_eq!(disk_file(&base.disk, "/opt/new").as_deref(), Some("n"));
        assert_eq!(disk_file(&base.disk, "/app/.wh.deleted"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_layer_is_hostile_then_nothing_outside_its_root_is_written_or_linked() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let host = tempfile::tempdir().expect("host dir");
    let victim = host.path().join("victim");
    std::fs::write(&victim, "host secret").expect("victim");
    let host_dir = host.path().display().to_string();
    let through_root = format!("{}/planted-through-root", host_dir.trim_start_matches('/'));
    let first = tar_of(&[
        // A link to the host's `/`, then a file "through" it into a host directory.
        Entry::Symlink("rootlink", "/"),
        Entry::File(&format!("rootlink/{through_root}"), b"pwned", 0o644),
        // A link straight at a host directory, then a file through it.
        Entry::Symlink("hostdir", &host_dir),
        Entry::File("hostdir/planted-through-link", b"pwned", 0o644),
    ]);
    let second = tar_of(&[
        // A hard link to a host file: must not link (or read) the host's file.
        Entry::HardLink("stolen", &victim.display().to_string()),
    ]);
    reg.push_image(
        "evil",
        "1",
        &[first, second],
        json!({}),
        Codec::Gzip,
        "amd64",
    )
    .await;

    let pulled = oci::pull(&format!("{}/evil:1", reg.host), &opts(&cache), &quiet)
        .await
        .expect("pull");
    let made = oci::ensure_base_disk(&pulled, &opts(&cache), &quiet);

    assert!(!host.path().join("planted-through-root").exists());
    assert!(!host.path().join("planted-through-link").exists());
    assert_eq!(
        std::fs::read_to_string(&victim).ok().as_deref(),
        Some("host secret")
    );
    assert_eq!(std::fs::metadata(&victim).expect("victim").nlink(), 1);
    let err = made.expect_err("the hard link names nothing inside the image");
    assert!(err.contains("hard-linking /stolen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_registry_needs_basic_auth_then_refused_without_and_pulled_with_credentials() {
    let reg = Registry::start(Some(("kiln", "s3cret")));
    let (_keep, cache) = registry::cache_dir();
    simple_image(&reg, "private/app", "1", "private\n").await;
    let creds = cache.with_file_name("config.json");
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "kiln:s3cret");
    std::fs::write(
        &creds,
        json!({"auths": {reg.host.clone(): {"auth": auth}}}).to_string(),
    )
    .expect("config.json");
    let from = format!("{}/private/app:1", reg.host);

    let anonymous = oci::pull(&from, &opts(&cache), &quiet).await;
    let with = oci::pull(
        &from,
        &RegistryOptions {
            credentials: Some(creds),
            ..opts(&cache)
        },
        &quiet,
    )
    .await;

    let err = anonymous.expect_err("anonymous");
    assert!(
        err.contains("Not authorized") && err.contains("--registry-credentials"),
        "{err}"
    );
    assert!(with.is_ok(), "{with:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_mirror_configured_then_hub_names_come_from_it_and_offline_from_the_cache() {
    let mut reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    // What Docker Hub calls `python:3.12-slim` lives in a mirror as library/python.
    let (digest, _) = simple_image(&reg, "library/python", "3.12-slim", "py\n").await;
    let mirrored = RegistryOptions {
        mirrors: vec![format!("docker.io=http://{}", reg.host)
            .parse()
            .expect("mirror")],
        ..opts(&cache)
    };

    let pulled = oci::pull("python:3.12-slim", &mirrored, &quiet)
        .await
        .expect("via mirror");
    reg.stop();
    let offline = oci::pull("python:3.12-slim", &mirrored, &quiet)
        .await
        .expect("offline from the cache");

    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.reference, "docker.io/library/python:3.12-slim");
    assert!(pulled.source.contains("mirror"), "{}", pulled.source);
    assert_eq!(offline.digest, digest);
    assert!(offline.source.contains("cache"), "{}", offline.source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_tag_moves_then_the_previous_digest_is_reported() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let (first, _) = simple_image(&reg, "moving", "latest", "one\n").await;
    oci::pull(&format!("{}/moving", reg.host), &opts(&cache), &quiet)
        .await
        .expect("first pull");
    let (second, _) = simple_image(&reg, "moving", "latest", "two\n").await;

    let again = oci::pull(&format!("{}/moving", reg.host), &opts(&cache), &quiet)
        .await
        .expect("second pull");

    assert_eq!(again.digest, second);
    assert_eq!(again.previous_digest, Some(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_when_a_blob_is_tampered_in_the_registry_then_refused_and_not_cached() {
    let reg = Registry::start(None);
    let (_keep, cache) = registry::cache_dir();
    let layer = tar_of(&[Entry::File("f", b"original", 0o644)]);
    let desc = reg
        .push_blob(
            "tamper",
            "application/vnd.oci.image.layer.v1.tar",
            layer.clone(),
        )
        .await;
    let digest = desc["digest"].as_str().expect("digest").to_string();
    let cfg = reg
        .push_blob(
            "tamper",
            "application/vnd.oci.image.config.v1+json",
            serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux"})).expect("json"),
        )
        .await;
    reg.push_manifest(
        "tamper",
        "1",
        &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [desc]}),
    )
    .await;
    // Same length, other bytes: only the digest check can tell.
    let mut evil = layer.clone();
    let at = evil
        .windows(8)
        .position(|w| w == b"original")
        .expect("content");
    evil[at..at + 8].copy_from_slice(b"tampered");
    std::fs::write(reg.blob_file(&digest), &evil).expect("tamper");

    let result = oci::pull(&format!("{}/tamper:1", reg.host), &opts(&cache), &quiet).await;

    let err = result.expect_err("tampered");
    assert!(err.contains(&digest), "{err}");
    assert!(!oci::BlobCache::new(&cache)
        .blob(&digest)
        .expect("path")
        .exists());
}
