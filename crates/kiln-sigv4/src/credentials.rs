//! Which access key signs kiln's requests: the AWS CLI's rules, plus kilnd's own file.
//!
//! Order: with an explicit `--profile`, that profile from the credentials files; else
//! `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`; else the profile `AWS_PROFILE` names
//! (default `default`) from the files. The files, first match wins:
//! `AWS_SHARED_CREDENTIALS_FILE`, `$KILN_HOME/credentials` (kilnd writes it on its first
//! start), `~/.aws/credentials`.

use std::path::{Path, PathBuf};

/// An access key pair (and session token, for temporary credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id, e.g. `AKIA…`.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
    /// Where they came from, for messages.
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Where to look for credentials; [`CredentialSources::from_env`] reads the process's.
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    /// `--profile`, when given on the command line.
    pub explicit_profile: Option<String>,
    /// `AWS_PROFILE`.
    pub env_profile: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub env_access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub env_secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub env_session_token: Option<String>,
    /// Credentials files in the order they are searched.
    pub files: Vec<PathBuf>,
    /// The file kilnd writes on its first start (`$KILN_HOME/credentials`).
    pub kilnd_file: Option<PathBuf>,
}

/// No credentials were found; the message lists every place searched.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoCredentials(String);

/// A credentials file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsFileError {
    /// The file could not be read.
    #[error("cannot read credentials file {path}: {source} (fix its permissions, or point AWS_SHARED_CREDENTIALS_FILE elsewhere)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile exists but lacks a key.
    #[error("profile [{profile}] in {path} has no {missing}: add `{missing} = …` to it")]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// The profile.
        profile: String,
        /// The missing key's name.
        missing: &'static str,
    },
}

impl CredentialSources {
    /// The sources this process sees: `--profile`, the environment, `home`'s file.
    pub fn from_env(explicit_profile: Option<String>, kiln_home: &Path) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut files = Vec::new();
        if let Some(f) = var("AWS_SHARED_CREDENTIALS_FILE") {
            files.push(PathBuf::from(f));
        }
        let kilnd_file = kiln_home.join("credentials");
        files.push(kilnd_file.clone());
        if let Some(home) = var("HOME") {
            files.push(Path::new(&home).join(".aws").join("credentials"));
        }
        CredentialSources {
            explicit_profile,
            env_profile: var("AWS_PROFILE"),
            env_access_key_id: var("AWS_ACCESS_KEY_ID"),
            env_secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            env_session_token: var("AWS_SESSION_TOKEN"),
            files,
            kilnd_file: Some(kilnd_file),
        }
    }

    /// The credentials to sign with.
    pub fn resolve(&self) -> anyhow::Result<Credentials> {
        if self.explicit_profile.is_none() {
            if let (Some(id), Some(secret)) = (&self.env_access_key_id, &self.env_secret_access_key)
            {
                return Ok(Credentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: self.env_session_token.clone(),
                    source: "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
                });
            }
        }
        let profile = self
            .explicit_profile
            .as_deref()
            .or(self.env_profile.as_deref())
            .unwrap_or("default");
        for path in &self.files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(CredentialsFileError::Read {
                        path: path.clone(),
                        source,
                    }
                    .into())
                }
            };
            if let Some(found) = profile_in(&text, profile, path)? {
                return Ok(found);
            }
        }
        Err(self.not_found(profile).into())
    }

    fn not_found(&self, profile: &str) -> NoCredentials {
        let mut places = Vec::new();
        if self.explicit_profile.is_none() {
            places.push("  AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (not set)".to_string());
        }
        for f in &self.files {
            let state = if f.exists() {
                format!("no [{profile}] profile")
            } else {
                "missing".to_string()
            };
            places.push(format!(
                "  profile [{profile}] in {} ({state})",
                f.display()
            ));
        }
        let kiln_file = self
            .kilnd_file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "$KILN_HOME/credentials".into());
        NoCredentials(format!(
            "no credentials to sign requests to kilnd; looked for:\n{}\n\
             kilnd creates {kiln_file} on its first start: start kilnd with the same KILN_HOME \
             (or pass --home), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            places.join("\n")
        ))
    }
}

/// The credentials of `[profile]` in the text of a shared-credentials file, if it has
/// that profile.
fn profile_in(text: &str, profile: &str, path: &Path) -> anyhow::Result<Option<Credentials>> {
    let mut in_profile = false;
    let mut seen = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            seen |= in_profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    if !seen {
        return Ok(None);
    }
    let incomplete = |missing| CredentialsFileError::Incomplete {
        path: path.to_path_buf(),
        profile: profile.to_string(),
        missing,
    };
    let access_key_id = id.ok_or_else(|| incomplete("aws_access_key_id"))?;
    let secret_access_key = secret.ok_or_else(|| incomplete("aws_secret_access_key"))?;
    Ok(Some(Credentials {
        access_key_id,
        secret_access_key,
        session_token: token,
        source: format!("profile [{profile}] in {}", path.display()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# kilnd\n[default]\naws_access_key_id = AKIDKILN\naws_secret_access_key = s3cret\n\n[alice]\naws_access_key_id=AKIDALICE\naws_secret_access_key=alice/key\naws_session_token = tok\n";

    fn sources(dir: &Path, files: &[(&str, &str)]) -> CredentialSources {
        let mut paths = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write");
            paths.push(p);
        }
        CredentialSources {
            files: paths,
            ..Default::default()
        }
    }

    #[test]
    fn resolve_when_only_kiln_file_then_default_profile() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sources(dir.path(), &[("credentials", FILE)]);

        let c = s.resolve().expect("found");

        assert_eq!(c.access_key_id, "AKIDKILN");
        assert_eq!(c.secret_access_key, "s3cret");
        assert!(c.source.contains("[default]"), "{}", c.source);
    }

    #[test]
    fn resolve_when_env_keys_and_no_explicit_profile_then_env_wins() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = sources(dir.path(), &[("credentials", FILE)]);
        s.env_access_key_id = Some("AKIDENV".into());
        s.env_secret_access_key = Some("env".into());
        s.env_profile = Some("alice".into());

        let c = s.resolve().expect("found");

        assert_eq!(c.access_key_id, "AKIDENV");
    }

    #[test]
    fn resolve_when_explicit_profile_then_env_keys_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = sources(dir.path(), &[("credentials", FILE)]);
        s.env_access_key_id = Some("AKIDENV".into());
        s.env_secret_access_key = Some("env".into());
        s.explicit_profile = Some("alice".into());

        let c = s.resolve().expect("found");

        assert_eq!(c.access_key_id, "AKIDALICE");
        assert_eq!(c.session_token.as_deref(), Some("tok"));
    }

    #[test]
    fn resolve_when_first_file_lacks_profile_then_next_file_is_used() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = sources(
            dir.path(),
            &[
                ("shared", "[other]\naws_access_key_id=x\n"),
                ("credentials", FILE),
            ],
        );
        s.env_profile = Some("alice".into());

        let c = s.resolve().expect("found");

        assert_eq!(c.access_key_id, "AKIDALICE");
    }

    #[test]
    fn resolve_when_nothing_then_message_lists_places_and_kilnd_file() {
        let dir = tempfile::tempdir().expect("dir");
        let s = CredentialSources {
            files: vec![dir.path().join("credentials")],
            ..Default::default()
        };

        let err = s.resolve().expect_err("none").to_string();

        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        assert!(
            err.contains(&format!(
                "{} (missing)",
                dir.path().join("credentials").display()
            )),
            "{err}"
        );
        assert!(err.contains("kilnd creates"), "{err}");
    }

    #[test]
    fn resolve_when_profile_lacks_secret_then_says_which_key() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sources(
            dir.path(),
            &[("credentials", "[default]\naws_access_key_id=x\n")],
        );

        let err = s.resolve().expect_err("incomplete").to_string();

        assert!(err.contains("has no aws_secret_access_key"), "{err}");
    }
}
