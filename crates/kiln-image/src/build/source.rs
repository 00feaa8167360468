//! COPY/ADD sources as paths inside the unpacked build context (or, for `COPY --from`, inside
//! another stage's filesystem), never outside it.
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

/// `src` cleaned, split at its first wildcard component: the glob-free directory prefix
/// (what is resolved) and the pattern after it (`""` when there is none).
pub fn split_glob(src: &str) -> (String, String) {
    let clean = clean(src);
    let parts: Vec<&str> = clean.split('/').collect();
    let literal = parts
        .iter()
        .position(|p| p.contains(['*', '?', '[']))
        .unwrap_or(parts.len());
    (parts[..literal].join("/"), parts[literal..].join("/"))
}

/// A resolved directory and a pattern below it as one relative path.
pub fn join_pattern(dir: &str, pattern: &str) -> String {
    match (dir.is_empty(), pattern.is_empty()) {
        (_, true) => dir.to_string(),
        (true, false) => pattern.to_string(),
        (false, false) => format!("{dir}/{pattern}"),
    }
}

/// Resolves `src` inside `root`: the clean, link-free relative path it names (`""` for the
/// root), following symbolic links within the context only.
pub fn resolve(root: &Path, src: &str) -> Result<String, SourceError> {
    let mut walk = InRootWalk::new(src);
    while let Some(rel) = walk.next_lookup() {
        // `rel`'s parent holds only real directories, so this stat follows no link on the way.
        let path = root.join(&rel);
        let found = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).map_err(|e| SourceError::Io {
                    src: src.into(),
                    path: path.clone(),
                    cause: e.to_string(),
                })?;
                Found::Link(target.to_string_lossy().into_owned())
            }
            Ok(meta) if meta.is_dir() => Found::Dir,
            Ok(meta) => match special_kind(&meta) {
                Some(kind) => Found::Special(kind),
                None => Found::File,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                Found::Missing
            }
            Err(e) => {
                return Err(SourceError::Io {
                    src: src.into(),
                    path,
                    cause: e.to_string(),
                })
            }
        };
        walk.found(found)?;
    }
    Ok(walk.finish())
}

/// What one path component turned out to be, as [`InRootWalk`] needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing there.
    Missing,
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link, and where it points.
    Link(String),
    /// A device, fifo or socket.
    Special(&'static str),
}

/// The lookup of a path inside a root, one component at a time, with symbolic links
/// followed as if the root were `/` and `..` never climbing above it. The walk only decides;
/// its driver looks each component up where the root is (the host's unpacked context, or a
/// disk mounted in the build VM), so one set of rules serves both.
#[derive(Debug)]
pub struct InRootWalk {
    src: String,
    pending: VecDeque<String>,
    resolved: Vec<String>,
    current: Option<String>,
    hops: u32,
}

impl InRootWalk {
    /// A walk for `src` (cleaned lexically first).
    pub fn new(src: &str) -> InRootWalk {
        InRootWalk {
            src: src.to_string(),
            pending: clean(src).split('/').map(str::to_string).collect(),
            resolved: Vec::new(),
            current: None,
            hops: 0,
        }
    }

    /// The next path to look up, relative to the root (its parent is link-free), or `None`
    /// when the walk is over.
    pub fn next_lookup(&mut self) -> Option<String> {
        while let Some(part) = self.pending.pop_front() {
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    self.resolved.pop();
                    continue;
                }
                _ => {}
            }
            let mut rel = self.resolved.join("/");
            if !rel.is_empty() {
                rel.push('/');
            }
            rel.push_str(&part);
            self.current = Some(part);
            return Some(rel);
        }
        None
    }

    /// Takes what the last looked-up path is.
    pub fn found(&mut self, what: Found) -> Result<(), SourceError> {
        let part = self.current.take().unwrap_or_default();
        let more = self.pending.iter().any(|c| !c.is_empty() && c != ".");
        match what {
            Found::Missing => Err(self.not_found()),
            Found::Link(target) => {
                self.hops += 1;
                if self.hops > MAX_LINK_HOPS {
                    return Err(SourceError::Loops {
                        src: self.src.clone(),
                    });
                }
                if target.starts_with('/') {
                    self.resolved.clear();
                }
                for c in target.split('/').rev() {
                    self.pending.push_front(c.to_string());
                }
                Ok(())
            }
            Found::File | Found::Special(_) if more => Err(self.not_found()),
            Found::Special(kind) => Err(SourceError::Special {
                src: self.src.clone(),
                kind,
            }),
            Found::Dir | Found::File => {
                self.resolved.push(part);
                Ok(())
            }
        }
    }

    /// The clean, link-free path the walk ended on (`""` for the root).
    pub fn finish(self) -> String {
        self.resolved.join("/")
    }

    fn not_found(&self) -> SourceError {
        SourceError::NotFound {
            src: self.src.clone(),
            rel: clean(&self.src),
        }
    }
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

    /// Drives a walk with a made-up filesystem, as the build VM's agent drives it.
    fn walk(entries: &[(&str, Found)], src: &str) -> Result<String, SourceError> {
        let mut walk = InRootWalk::new(src);
        while let Some(rel) = walk.next_lookup() {
            let found = entries
                .iter()
                .find(|(path, _)| *path == rel)
                .map_or(Found::Missing, |(_, f)| f.clone());
            walk.found(found)?;
        }
        Ok(walk.finish())
    }

    #[test]
    fn walk_when_links_and_dot_dot_climb_then_they_stay_in_that_root() {
        let fs = [
            ("out", Found::Dir),
            ("out/etc", Found::Link("/etc".into())),
            ("out/up", Found::Link("../../../..".into())),
            ("etc", Found::Dir),
            ("etc/passwd", Found::File),
            ("app", Found::File),
        ];

        assert_eq!(walk(&fs, "/out/etc/passwd"), Ok("etc/passwd".into()));
        assert_eq!(walk(&fs, "../../out/up/app"), Ok("app".into()));
        assert!(matches!(
            walk(&fs, "out/etc/shadow"),
            Err(SourceError::NotFound { .. })
        ));
        assert!(matches!(
            walk(&fs, "app/x"),
            Err(SourceError::NotFound { .. })
        ));
    }

    #[test]
    fn split_glob_when_a_wildcard_then_the_literal_directory_and_the_pattern() {
        assert_eq!(
            split_glob("/out/../bin/*.so"),
            ("bin".to_string(), "*.so".to_string())
        );
        assert_eq!(split_glob("a/b"), ("a/b".to_string(), String::new()));
        assert_eq!(join_pattern("", "*.so"), "*.so");
        assert_eq!(join_pattern("bin", "*.so"), "bin/*.so");
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
