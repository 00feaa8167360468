//! Docker `COPY` inside the guest: files, directory contents, wildcards, symlinks kept
//! as symlinks, everything owned by the given user (root by default).
//!
//! Symlinks are never followed on the source side, not even the source path itself: a
//! build context must not be able to pull in files from outside it through a link.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::meta::{self, Owner};
use crate::proto::CopySpec;

/// What a copy or an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Files, directories and links written.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Copies `spec.src` to `spec.dest` with Docker `COPY` semantics.
pub fn copy(spec: &CopySpec) -> Result<CopyStats, String> {
    let src = absolute(&spec.src)?;
    let dest = absolute(&spec.dest)?;
    let sources = expand(src)?;
    let owner = Owner {
        uid: spec.uid.unwrap_or(0),
        gid: spec.gid.unwrap_or(0),
    };
    let into_dir = spec.dest.ends_with('/') || dest.is_dir() || sources.len() > 1;
    let mut copier = Copier {
        owner,
        mode: spec.mode,
        stats: CopyStats::default(),
    };
    for source in &sources {
        let meta = fs::symlink_metadata(source)
            .map_err(|e| format!("cannot copy {}: {e}", source.display()))?;
        if meta.is_dir() {
            refuse_copy_into_itself(source, dest)?;
            copier.dir_contents(source, dest)?;
        } else {
            let target = match (into_dir, source.file_name()) {
                (true, Some(name)) => dest.join(name),
                _ => dest.to_path_buf(),
            };
            if let Some(parent) = target.parent() {
                meta::create_dirs(parent, owner)?;
            }
            copier.entry(source, &target, &meta)?;
        }
    }
    Ok(copier.stats)
}

struct Copier {
    owner: Owner,
    mode: Option<u32>,
    stats: CopyStats,
}

impl Copier {
    /// Copies what is inside `src` into the directory `dest`, creating it.
    fn dir_contents(&mut self, src: &Path, dest: &Path) -> Result<(), String> {
        let created = !dest.exists();
        meta::create_dirs(dest, self.owner)?;
        let src_meta =
            fs::symlink_metadata(src).map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
        if created {
            self.finish(dest, &src_meta)?;
        }
        for (path, entry_meta) in sorted_entries(src)? {
            let name = path.file_name().unwrap_or_default();
            self.entry(&path, &dest.join(name), &entry_meta)?;
        }
        if created {
            set_mtime_from(dest, &src_meta)?;
        }
        Ok(())
    }

    /// Copies one file, symlink or directory tree from `src` to exactly `target`.
    fn entry(&mut self, src: &Path, target: &Path, src_meta: &fs::Metadata) -> Result<(), String> {
        let kind = src_meta.file_type();
        let existing = fs::symlink_metadata(target).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove(target)?;
                    make_dir(target)?;
                }
                None => make_dir(target)?,
            }
            self.finish(target, src_meta)?;
            for (path, entry_meta) in sorted_entries(src)? {
                let name = path.file_name().unwrap_or_default();
                self.entry(&path, &target.join(name), &entry_meta)?;
            }
            return set_mtime_from(target, src_meta);
        }
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(format!(
                "cannot copy {} to {}: a directory is in the way",
                src.display(),
                target.display()
            ));
        }
        if existing.is_some() {
            remove(target)?;
        }
        if kind.is_symlink() {
            let link = fs::read_link(src)
                .map_err(|e| format!("cannot read symlink {}: {e}", src.display()))?;
            std::os::unix::fs::symlink(&link, target)
                .map_err(|e| format!("cannot create symlink {}: {e}", target.display()))?;
        } else if kind.is_file() {
            self.stats.bytes += copy_file(src, target)?;
        } else {
            return Err(format!(
                "cannot copy {}: it is a {}; only files, directories and symlinks are copied",
                src.display(),
                kind_name(src_meta)
            ));
        }
        self.finish(target, src_meta)?;
        set_mtime_from(target, src_meta)
    }

    /// Gives `target` its owner and mode, and counts it.
    fn finish(&mut self, target: &Path, src_meta: &fs::Metadata) -> Result<(), String> {
        let mode = self.mode.unwrap_or(src_meta.mode());
        meta::apply(target, self.owner, Some(mode))
            .map_err(|e| format!("cannot set owner and mode of {}: {e}", target.display()))?;
        self.stats.entries += 1;
        Ok(())
    }
}

fn copy_file(src: &Path, target: &Path) -> Result<u64, String> {
    let mut input = File::open(src).map_err(|e| format!("cannot open {}: {e}", src.display()))?;
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    io::copy(&mut input, &mut output)
        .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), target.display()))
}

fn make_dir(path: &Path) -> Result<(), String> {
    fs::create_dir(path).map_err(|e| format!("cannot create directory {}: {e}", path.display()))
}

fn remove(path: &Path) -> Result<(), String> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    };
    result.map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

fn set_mtime_from(target: &Path, src_meta: &fs::Metadata) -> Result<(), String> {
    meta::set_mtime(target, src_meta.mtime(), src_meta.mtime_nsec())
        .map_err(|e| format!("cannot set the times of {}: {e}", target.display()))
}

/// The entries of a directory with their (not followed) metadata, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, String> {
    let read_error = |e: io::Error| format!("cannot list {}: {e}", dir.display());
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
        entries.push((path, meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

fn kind_name(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_fifo() {
        "named pipe"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "device node"
    } else {
        "special file"
    }
}

/// Refuses to copy a directory into a place inside itself, which would never end.
fn refuse_copy_into_itself(src: &Path, dest: &Path) -> Result<(), String> {
    let (Ok(src_real), Some(dest_real)) = (fs::canonicalize(src), canonical_prefix(dest)) else {
        return Ok(());
    };
    if dest_real.starts_with(&src_real) && dest_real != src_real {
        return Err(format!(
            "cannot copy {} into {}: the destination is inside the source",
            src.display(),
            dest.display()
        ));
    }
    Ok(())
}

/// `path` with its longest existing ancestor canonicalized.
fn canonical_prefix(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut cursor = path;
    loop {
        if let Ok(real) = fs::canonicalize(cursor) {
            return Some(rest.iter().rev().fold(real, |acc, name| acc.join(name)));
        }
        rest.push(cursor.file_name()?);
        cursor = cursor.parent()?;
    }
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("path {path:?} is not absolute"))
    }
}

/// The paths `src` names: itself, or the matches of a wildcard in its last component.
fn expand(src: &Path) -> Result<Vec<PathBuf>, String> {
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(pattern) = name.filter(|n| n.contains(['*', '?', '['])) else {
        return Ok(vec![src.to_path_buf()]);
    };
    let dir = src.parent().unwrap_or(Path::new("/"));
    let entries = fs::read_dir(dir)
        .map_err(|e| format!("cannot list {} for {pattern:?}: {e}", dir.display()))?;
    let mut matches: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| glob_match(pattern.as_bytes(), e.file_name().as_encoded_bytes()))
        .map(|e| e.path())
        .collect();
    if matches.is_empty() {
        return Err(format!(
            "no file matches the pattern {pattern:?} in {}",
            dir.display()
        ));
    }
    matches.sort();
    Ok(matches)
}

/// Whether `name` matches a shell wildcard pattern: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`
/// (or `[^x]`) and `\` escapes. As in Docker, `*` also matches a leading dot.
pub fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where to resume after the last `*`: pattern index after it, name index it covers up to.
    let mut resume: Option<(usize, usize)> = None;
    while n < name.len() {
        if pattern.get(p) == Some(&b'*') {
            resume = Some((p + 1, n));
            p += 1;
            continue;
        }
        if let Some(next) = match_one(pattern, p, name[n]) {
            p = next;
            n += 1;
            continue;
        }
        match resume {
            Some((after_star, covered)) => {
                p = after_star;
                n = covered + 1;
                resume = Some((after_star, covered + 1));
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// The pattern index after the element at `p` when that element matches `c`.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => match match_class(pattern, p, c) {
            Some((matched, next)) => matched.then_some(next),
            // No closing bracket: a literal `[`.
            None => (c == b'[').then_some(p + 1),
        },
        literal => (literal == c).then_some(p + 1),
    }
}

/// Matches `c` against the bracket expression at `p`; `None` when it is not closed.
fn match_class(pattern: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = p + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let mut lo = *pattern.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if lo == b'\\' {
            i += 1;
            lo = *pattern.get(i)?;
        }
        i += 1;
        let mut hi = lo;
        if pattern.get(i) == Some(&b'-') && pattern.get(i + 1).is_some_and(|&b| b != b']') {
            hi = pattern[i + 1];
            i += 2;
            if hi == b'\\' {
                hi = *pattern.get(i)?;
                i += 1;
            }
        }
        matched |= lo <= c && c <= hi;
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob_when_star_then_any_run_matches() {
        assert!(glob_match(b"*.py", b"app.py"));
        assert!(glob_match(b"*.py", b".hidden.py"));
        assert!(glob_match(b"a*b*c", b"aXXbYYbc"));
        assert!(!glob_match(b"*.py", b"app.pyc"));
    }

    #[test]
    fn glob_when_question_mark_then_exactly_one_byte() {
        assert!(glob_match(b"file?.txt", b"file1.txt"));
        assert!(!glob_match(b"file?.txt", b"file.txt"));
        assert!(!glob_match(b"file?.txt", b"file12.txt"));
    }

    #[test]
    fn glob_when_bracket_then_sets_ranges_and_negation() {
        assert!(glob_match(b"[abc].txt", b"b.txt"));
        assert!(glob_match(b"[a-c]1", b"c1"));
        assert!(!glob_match(b"[a-c]1", b"d1"));
        assert!(glob_match(b"[!a-c]1", b"d1"));
        assert!(glob_match(b"[^a]", b"b"));
        assert!(glob_match(b"[]]", b"]"));
    }

    #[test]
    fn glob_when_escaped_or_unclosed_then_literal() {
        assert!(glob_match(b"\\*", b"*"));
        assert!(!glob_match(b"\\*", b"a"));
        assert!(glob_match(b"[abc", b"[abc"));
    }
}
