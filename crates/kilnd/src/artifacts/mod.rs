//! Which code artifacts a principal may name. kilnd reads artifacts with its own rights (the
//! host's files, its S3 credentials), so every `codeArtifact.uri` is checked against the
//! caller first — otherwise kilnd would be a confused deputy reading for anyone:
//!
//! - `file://` is the admin's only, and only below a configured `--artifact-root` (none by
//!   default); the path is canonicalised first, so `..` and symlinks cannot lead out.
//! - `s3://` in the embedded store: the bucket's owner (and the admin), checked by the store.
//! - `s3://` in an external store (`--artifact-s3-endpoint`): the principal a bucket is
//!   granted to with `--artifact-s3-bucket BUCKET=PRINCIPAL`, and the admin; an ungranted
//!   bucket is the admin's only.

pub mod remote;
pub mod s3;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::auth::keys::ADMIN;

/// A bucket of the external store and the principal that may name it
/// (`--artifact-s3-bucket BUCKET=PRINCIPAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketGrant {
    /// The bucket.
    pub bucket: String,
    /// The principal that may name objects in it.
    pub principal: String,
}

impl FromStr for BucketGrant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((bucket, principal)) if !bucket.is_empty() && !principal.is_empty() => {
                Ok(BucketGrant {
                    bucket: bucket.to_string(),
                    principal: principal.to_string(),
                })
            }
            _ => Err(format!(
                "{s}: write BUCKET=PRINCIPAL, e.g. team-a-apps=alice"
            )),
        }
    }
}

/// Why an artifact may not be named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactRefusal {
    /// A `file://` artifact from a principal other than the admin.
    #[error("codeArtifact.uri {uri}: only principal {ADMIN} may name files on the kiln host; upload the zip to your bucket in kiln's S3 store (`aws s3 cp app.zip s3://BUCKET/app.zip --endpoint-url <kilnd>`, then uri=s3://BUCKET/app.zip), or let `kiln build` upload it")]
    FileNotAdmin { uri: String },
    /// `file://` while kilnd has no artifact roots.
    #[error("codeArtifact.uri {uri}: this kilnd reads no files from its host (it has no --artifact-root); upload the zip with `aws s3 cp app.zip s3://BUCKET/app.zip --endpoint-url <kilnd>` and use uri=s3://BUCKET/app.zip, or use `kiln build`, which uploads it")]
    NoRoots { uri: String },
    /// `file://` with a relative path, or not a `file:///…` URI at all.
    #[error("codeArtifact.uri {uri}: the path must be absolute (file:///…)")]
    NotAbsolute { uri: String },
    /// The file does not exist (or cannot be resolved).
    #[error("codeArtifact.uri {uri}: no such file on the kiln host")]
    NoFile { uri: String },
    /// The file, with links resolved, lies outside every root.
    #[error("codeArtifact.uri {uri}: {real} is outside the directories this kilnd reads artifacts from ({roots}); links are followed before the check")]
    OutsideRoots {
        uri: String,
        real: String,
        roots: String,
    },
    /// An external-store bucket not granted to the caller.
    #[error("codeArtifact.uri {uri}: bucket {bucket} of the external artifact store is not granted to principal {principal} (kilnd --artifact-s3-bucket {bucket}={principal})")]
    BucketNotGranted {
        uri: String,
        bucket: String,
        principal: String,
    },
}

/// The artifact rules of one kilnd.
#[derive(Debug, Clone, Default)]
pub struct ArtifactPolicy {
    roots: Vec<PathBuf>,
    grants: Vec<BucketGrant>,
}

impl ArtifactPolicy {
    /// Rules with these `file://` roots and external-store bucket grants.
    pub fn new(roots: Vec<PathBuf>, grants: Vec<BucketGrant>) -> ArtifactPolicy {
        ArtifactPolicy { roots, grants }
    }

    /// The file `uri` (`file:///…`) names, with links resolved, if `principal` may read it.
    pub fn file(&self, principal: &str, uri: &str) -> Result<PathBuf, ArtifactRefusal> {
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        if principal != ADMIN {
            return Err(ArtifactRefusal::FileNotAdmin { uri: uri.into() });
        }
        if self.roots.is_empty() {
            return Err(ArtifactRefusal::NoRoots { uri: uri.into() });
        }
        if !Path::new(path).is_absolute() {
            return Err(ArtifactRefusal::NotAbsolute { uri: uri.into() });
        }
        let real = Path::new(path)
            .canonicalize()
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| ArtifactRefusal::NoFile { uri: uri.into() })?;
        let inside = self
            .roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .any(|root| real.starts_with(root));
        if !inside {
            let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            return Err(ArtifactRefusal::OutsideRoots {
                uri: uri.into(),
                real: real.display().to_string(),
                roots: roots.join(", "),
            });
        }
        Ok(real)
    }

    /// Whether `principal` may name `uri` (`s3://bucket/…`) in the external store.
    pub fn external(&self, principal: &str, uri: &str) -> Result<(), ArtifactRefusal> {
        let bucket = bucket_of(uri);
        let granted = principal == ADMIN
            || self
                .grants
                .iter()
                .any(|g| g.bucket == bucket && g.principal == principal);
        if granted {
            Ok(())
        } else {
            Err(ArtifactRefusal::BucketNotGranted {
                uri: uri.into(),
                bucket: bucket.into(),
                principal: principal.into(),
            })
        }
    }
}

/// The bucket of `s3://bucket/key` (empty when there is none).
pub fn bucket_of(uri: &str) -> &str {
    let rest = uri.strip_prefix("s3://").unwrap_or(uri);
    rest.split('/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Roots {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn roots() -> Roots {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).expect("root");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(root.join("app.zip"), b"zip").expect("zip");
        std::fs::write(outside.join("secret.zip"), b"secret").expect("secret");
        Roots {
            _dir: dir,
            root,
            outside,
        }
    }

    fn uri(p: &Path) -> String {
        format!("file://{}", p.display())
    }

    #[test]
    fn file_when_admin_inside_a_root_then_its_real_path() {
        let r = roots();
        let policy = ArtifactPolicy::new(vec![r.root.clone()], vec![]);

        let got = policy.file(ADMIN, &uri(&r.root.join("app.zip")));

        assert_eq!(
            got,
            Ok(r.root.join("app.zip").canonicalize().expect("real"))
        );
    }

    #[test]
    fn file_when_not_admin_then_refused_saying_to_upload() {
        let r = roots();
        let policy = ArtifactPolicy::new(vec![r.root.clone()], vec![]);

        let got = policy
            .file("alice", &uri(&r.root.join("app.zip")))
            .expect_err("refused");

        assert!(matches!(got, ArtifactRefusal::FileNotAdmin { .. }));
        assert!(got.to_string().contains("aws s3 cp"), "{got}");
    }

    #[test]
    fn file_when_no_roots_then_refused_saying_to_upload() {
        let r = roots();
        let policy = ArtifactPolicy::default();

        let got = policy
            .file(ADMIN, &uri(&r.root.join("app.zip")))
            .expect_err("refused");

        assert!(matches!(got, ArtifactRefusal::NoRoots { .. }));
        assert!(got.to_string().contains("kiln build"), "{got}");
    }

    #[test]
    fn file_when_dotdot_or_symlink_lead_out_then_refused_naming_the_roots() {
        let r = roots();
        let policy = ArtifactPolicy::new(vec![r.root.clone()], vec![]);
        std::os::unix::fs::symlink(r.outside.join("secret.zip"), r.root.join("link.zip"))
            .expect("symlink");

        let dotdot = policy.file(ADMIN, &format!("{}/../outside/secret.zip", uri(&r.root)));
        let link = policy.file(ADMIN, &uri(&r.root.join("link.zip")));

        for got in [dotdot, link] {
            let e = got.expect_err("refused");
            assert!(matches!(e, ArtifactRefusal::OutsideRoots { .. }), "{e}");
            assert!(e.to_string().contains(&r.root.display().to_string()), "{e}");
        }
    }

    #[test]
    fn file_when_relative_or_missing_then_refused() {
        let r = roots();
        let policy = ArtifactPolicy::new(vec![r.root.clone()], vec![]);

        let relative = policy.file(ADMIN, "file://app.zip");
        let missing = policy.file(ADMIN, &uri(&r.root.join("nope.zip")));

        assert!(matches!(relative, Err(ArtifactRefusal::NotAbsolute { .. })));
        assert!(matches!(missing, Err(ArtifactRefusal::NoFile { .. })));
    }

    #[test]
    fn external_when_bucket_granted_to_another_then_refused_and_admin_reaches_all() {
        let grant: BucketGrant = "team-a=alice".parse().expect("grant");
        let policy = ArtifactPolicy::new(vec![], vec![grant]);

        assert_eq!(policy.external("alice", "s3://team-a/app.zip"), Ok(()));
        assert!(policy.external("bob", "s3://team-a/app.zip").is_err());
        assert!(policy.external("alice", "s3://other/app.zip").is_err());
        assert_eq!(policy.external(ADMIN, "s3://other/app.zip"), Ok(()));
        assert!("nobucket".parse::<BucketGrant>().is_err());
    }
}
