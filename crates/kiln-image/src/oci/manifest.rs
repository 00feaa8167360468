//! The manifest and config shapes kiln reads (OCI and Docker v2 alike), and picking
//! linux/amd64 out of a multi-platform index.

use serde::Deserialize;

/// OCI image index / Docker manifest list.
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// OCI image manifest / Docker v2 schema 2 manifest.
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries).
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Foreign layers' download URLs (refused).
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, …).
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// Variant (`v8`, …).
    #[serde(default)]
    pub variant: Option<String>,
}

/// An index or a manifest, told apart by `mediaType` or by which fields it has.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnyManifest {
    /// 2 for every format kiln reads.
    pub schema_version: u32,
    /// Media type, when the document says it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Index entries.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// The config blob.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layers, lowest first.
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

impl AnyManifest {
    /// Whether this is an index.
    pub fn is_index(&self) -> bool {
        match &self.media_type {
            Some(t) => INDEX_TYPES.contains(&t.as_str()),
            None => self.manifests.is_some() && self.layers.is_none(),
        }
    }
}

/// Picks the linux/amd64 manifest of an index; the error names every platform it has.
pub fn pick_linux_amd64(entries: &[Descriptor]) -> Result<&Descriptor, String> {
    let found = entries.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    found.ok_or_else(|| {
        let mut have: Vec<String> = entries
            .iter()
            .filter_map(|d| d.platform.as_ref())
            // Attestation manifests carry unknown/unknown: not a platform to offer.
            .filter(|p| p.os != "unknown")
            .map(|p| match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            })
            .collect();
        have.dedup();
        format!(
            "the image has no linux/amd64 variant, which kiln's VMs run; it has {}",
            if have.is_empty() {
                "none that names a platform".to_string()
            } else {
                have.join(", ")
            }
        )
    })
}

/// The image config (`application/vnd.oci.image.config.v1+json`, Docker's too).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// How containers run.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// Uncompressed layer digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    /// `sha256:` of each layer's uncompressed tar.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The config's `config`: what seeds a build's state (Docker's field names).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `NAME=value`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user[:group]`.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `{"8080/tcp": {}}`.
    #[serde(default)]
    pub exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    /// Docker's health check.
    #[serde(default)]
    pub healthcheck: Option<HealthConfig>,
    /// Stop signal.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// ONBUILD triggers, each an instruction line.
    #[serde(default)]
    pub on_build: Option<Vec<String>>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Docker's `Healthcheck`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(default)]
    pub test: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: MANIFEST_TYPES[0].into(),
            digest: digest.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: variant.map(Into::into),
            }),
            urls: None,
        }
    }

    #[test]
    fn pick_when_amd64_among_others_then_it() {
        let entries = [
            entry("linux", "arm64", Some("v8"), "sha256:a"),
            entry("linux", "amd64", None, "sha256:b"),
            entry("unknown", "unknown", None, "sha256:c"),
        ];

        let picked = pick_linux_amd64(&entries).expect("amd64");

        assert_eq!(picked.digest, "sha256:b");
    }

    #[test]
    fn pick_when_no_amd64_then_error_lists_platforms_without_attestations() {
        let entries = [
            entry("linux", "arm64", Some("v8"), "sha256:a"),
            entry("linux", "arm", Some("v7"), "sha256:b"),
            entry("unknown", "unknown", None, "sha256:c"),
        ];

        let err = pick_linux_amd64(&entries).expect_err("none");

        assert_eq!(
            err,
            "the image has no linux/amd64 variant, which kiln's VMs run; it has linux/arm64/v8, linux/arm/v7"
        );
    }

    #[test]
    fn any_manifest_when_docker_list_or_untyped_index_then_index() {
        let list: AnyManifest = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#,
        )
        .expect("list");
        let untyped: AnyManifest =
            serde_json::from_str(r#"{"schemaVersion":2,"manifests":[]}"#).expect("index");
        let image: AnyManifest = serde_json::from_str(
            r#"{"schemaVersion":2,"config":{"digest":"sha256:a","size":1},"layers":[]}"#,
        )
        .expect("image");

        assert!(list.is_index() && untyped.is_index() && !image.is_index());
    }

    #[test]
    fn run_config_when_docker_fields_then_read() {
        let c: ImageConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/x"],"Cmd":["python3"],
            "ExposedPorts":{"8080/tcp":{}},"Healthcheck":{"Test":["CMD-SHELL","true"]},
            "OnBuild":["RUN echo hi"],"StopSignal":"SIGINT","WorkingDir":"/app","User":"app"},
            "rootfs":{"type":"layers","diff_ids":["sha256:a"]}}"#,
        )
        .expect("config");
        let run = c.config.expect("config");

        assert_eq!(run.on_build, Some(vec!["RUN echo hi".to_string()]));
        assert_eq!(run.working_dir.as_deref(), Some("/app"));
        assert_eq!(
            run.healthcheck.and_then(|h| h.test).map(|t| t.len()),
            Some(2)
        );
        assert_eq!(c.rootfs.map(|r| r.diff_ids.len()), Some(1));
    }
}
