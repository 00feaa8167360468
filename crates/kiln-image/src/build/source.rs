//! COPY/ADD sources as paths inside the unpacked build context, never outside it.
//!
//! As BuildKit does, a source is first cleaned lexically against the context root (`../x` is
//! `x`, `/etc/passwd` is `etc/passwd` in the context), then looked up one component at a time
//! with symbolic links followed as if the context root were `/`. Every path kiln stats, hashes
//! or hands to the build VM is therefore a real, link-free path inside the context: a source
//! can name nothing on the host.

use std::collections::VecDeque;
use std::fs::Metadata;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Most symbolic links followed while resolving one source (as Linux's `MAXSYMLINKS`).
const MAX_LINK_HOPS: u32 = 40;

/// Why a source cannot be copied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The cleaned path names nothing in the context.
    #[error("COPY source {src} is not in the build context (looked for {rel:?} in the context; or it is excluded by .dockerignore)")]
    NotFound {
        /// The source as written (after variable expansion).
        src: String,
        /// The path looked up inside the context.
        rel: String,
    },
    /// Links in the context loop or chain too deeply.
    #[error("COPY source {src}: the symbolic links in its path loop or nest more than {MAX_LINK_HOPS} deep")]
    Loops {
        /// The source as written.
        src: String,
    },
    /// A device, fifo or socket: the context carries only files, directories and links.
    #[error("COPY source {src} is a {kind}: only regular files, directories and symbolic links can be copied")]
    Special {
        /// The source as written.
        src: String,
        /// What it is.
        kind: &'static str,
    },
    /// The context could not be read.
    #[error("COPY source {src}: cannot read {path}: {cause}")]
    Io {
        /// The source as written.
        src: String,
        /// The path inside the context.
        path: PathBuf,
        /// Why.
        cause: String,
    },
}

impl SourceError {
    /// The same error, naming `src` as the source the Dockerfile wrote.
    pub fn for_source(mut self, written: &str) -> SourceError {
        match &mut self {
            SourceError::NotFound { src, .. }
            | SourceError::Loops { src }
            | SourceError::Special { src, .. }
            | SourceError::Io { src, .. } => *src = written.to_string(),
        }
        self
    }
}

/// `src` cleaned lexically against the context root: `.` and empty components dropped, `..`
/// never climbing above the root, a leading `/` meaning the root. `""` is the root itself.
pub fn clean(src: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in src.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// Resolves `src` inside `root`: the clean, link-free relative path it names (`""` for the
/// root), following symbolic links within the context only.
pub fn resolve(root: &Path, src: &str) -> Result<String, SourceError> {
    let mut pending: VecDeque<String> = clean(src).split('/').map(str::to_string).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        // `resolved` holds only real directories, so this stat follows no link on the way.
        let path = root.join(resolved.join("/")).join(&part);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(SourceError::NotFound {
                    src: src.into(),
                    rel: clean(src),
                })
            }
            Err(e) => {
                return Err(SourceError::Io {
                    src: src.into(),
                    path,
                    cause: e.to_string(),
                })
            }
        };
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(SourceError::Loops { src: src.into() });
            }
            let target = std::fs::read_link(&path).map_err(|e| SourceError::Io {
                src: src.into(),
                path: path.clone(),
                cause: e.to_string(),
            })?;
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                resolved.clear();
            }
            for c in target.split('/').rev() {
                pending.push_front(c.to_string());
            }
            continue;
        }
        if !meta.is_dir() && pending.iter().any(|c| !c.is_empty() && c != ".") {
            return Err(SourceError::NotFound {
                src: src.into(),
                rel: clean(src),
            });
        }
        if let Some(kind) = special_kind(&meta) {
            return Err(SourceError::Special {
                src: src.into(),
                kind,
            });
        }
        resolved.push(part);
    }
    Ok(resolved.join("/"))
}

/// What a device, fifo or socket is called, or `None` for a file, directory or link.
pub fn special_kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_block_device() {
        Some("block device")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_fifo() {
        Some("fifo")
    } else if t.is_socket() {
        Some("socket")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("app/lib")).expect("mkdir");
        fs::write(dir.path().join("x"), "in context").expect("write");
        fs::write(dir.path().join("app/lib/a.py"), "a").expect("write");
        dir
    }

    #[test]
    fn clean_when_parent_or_absolute_then_stays_under_the_root() {
        assert_eq!(clean("../x"), "x");
        assert_eq!(clean("../../../../dev/zero"), "dev/zero");
        assert_eq!(clean("/etc/hostname"), "etc/hostname");
        assert_eq!(clean("./app/../app//lib/"), "app/lib");
        assert_eq!(clean("."), "");
        assert_eq!(clean("/"), "");
    }

    #[test]
    fn resolve_when_source_climbs_out_then_the_context_file_is_copied() {
        let ctx = context();

        assert_eq!(resolve(ctx.path(), "../x"), Ok("x".into()));
        assert_eq!(
            resolve(ctx.path(), "/app/lib/../lib/a.py"),
            Ok("app/lib/a.py".into())
        );
        assert_eq!(resolve(ctx.path(), "."), Ok(String::new()));
    }

    #[test]
    fn resolve_when_host_path_then_not_found_without_touching_the_host() {
        let ctx = context();

        let hostname = resolve(ctx.path(), "/etc/hostname").expect_err("host path");
        let zero = resolve(ctx.path(), "../../../../dev/zero").expect_err("host device");

        assert_eq!(
            hostname,
            SourceError::NotFound {
                src: "/etc/hostname".into(),
                rel: "etc/hostname".into()
            }
        );
        assert!(
            zero.to_string().contains("\"dev/zero\" in the context"),
            "{zero}"
        );
    }

    #[test]
    fn resolve_when_links_point_outside_then_they_stay_inside_the_context() {
        let ctx = context();
        symlink("/etc", ctx.path().join("etc-link")).expect("link");
        symlink("../../../../..", ctx.path().join("app/up")).expect("link");
        symlink("lib/a.py", ctx.path().join("app/a")).expect("link");
        fs::create_dir_all(ctx.path().join("etc")).expect("mkdir");
        fs::write(ctx.path().join("etc/hostname"), "ctx").expect("write");

        assert_eq!(
            resolve(ctx.path(), "etc-link/hostname"),
            Ok("etc/hostname".into())
        );
        assert_eq!(resolve(ctx.path(), "app/up/x"), Ok("x".into()));
        assert_eq!(resolve(ctx.path(), "app/a"), Ok("app/lib/a.py".into()));
        assert!(matches!(
            resolve(ctx.path(), "etc-link/passwd"),
            Err(SourceError::NotFound { .. })
        ));
    }

    #[test]
    fn resolve_when_links_loop_then_refused() {
        let ctx = context();
        symlink("b", ctx.path().join("a")).expect("link");
        symlink("a", ctx.path().join("b")).expect("link");

        assert_eq!(
            resolve(ctx.path(), "a"),
            Err(SourceError::Loops { src: "a".into() })
        );
    }

    #[test]
    fn resolve_when_source_is_a_fifo_then_refused_as_special() {
        let ctx = context();
        let fifo = ctx.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");

        let err = resolve(ctx.path(), "pipe").expect_err("fifo");

        assert_eq!(
            err.to_string(),
            "COPY source pipe is a fifo: only regular files, directories and symbolic links can be copied"
        );
    }

    #[test]
    fn resolve_when_a_file_is_used_as_a_directory_then_not_found() {
        let ctx = context();

        assert!(matches!(
            resolve(ctx.path(), "x/y"),
            Err(SourceError::NotFound { .. })
        ));
    }
}
