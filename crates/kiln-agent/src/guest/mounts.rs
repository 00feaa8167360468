//! Mount and Unmount requests: the image builder mounts the build-context disk this way.

use std::fs;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts `source` on `target` (created when missing) with mount(8)-style `options`.
pub fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    options: &[String],
) -> Result<(), String> {
    let fail = |why: String| format!("cannot mount {source} on {target}: {why}");
    if !Path::new(target).is_absolute() {
        return Err(fail("the target is not an absolute path".into()));
    }
    let (flags, data) = parse_options(options);
    if source.starts_with('/') && fs::symlink_metadata(source).is_err() {
        return Err(fail(format!("{source} does not exist")));
    }
    let bind = flags.contains(MsFlags::MS_BIND);
    if bind && Path::new(source).is_file() {
        if !Path::new(target).exists() {
            if let Some(parent) = Path::new(target).parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
            }
            fs::write(target, b"")
                .map_err(|e| fail(format!("cannot create the target file: {e}")))?;
        }
    } else {
        fs::create_dir_all(target)
            .map_err(|e| fail(format!("cannot create the target directory: {e}")))?;
    }
    let fstype = (!bind && !fstype.is_empty()).then_some(fstype);
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(source), target, fstype, flags, data).map_err(|errno| {
        let hint = match errno {
            Errno::ENODEV => format!(
                " (the kernel does not know file system type {:?})",
                fstype.unwrap_or("")
            ),
            Errno::EBUSY => " (already mounted, or the device is in use)".into(),
            Errno::EINVAL => " (wrong file system type, bad options, or a bad superblock)".into(),
            Errno::ENOTBLK => " (the source is not a block device)".into(),
            Errno::EPERM => " (mounting needs root)".into(),
            _ => String::new(),
        };
        fail(format!("{errno}{hint}"))
    })
}

/// Unmounts `target`.
pub fn unmount(target: &str) -> Result<(), String> {
    umount2(target, MntFlags::empty()).map_err(|errno| {
        let hint = match errno {
            Errno::EINVAL => " (it is not a mount point)",
            Errno::EBUSY => " (a process still uses it)",
            Errno::ENOENT => " (it does not exist)",
            _ => "",
        };
        format!("cannot unmount {target}: {errno}{hint}")
    })
}

/// Splits options into mount flags and the comma-joined rest for the file system.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options.iter().flat_map(|o| o.split(',')) {
        match option {
            "" | "defaults" | "rw" | "suid" | "dev" | "exec" | "async" => {}
            "ro" => flags |= MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "remount" => flags |= MsFlags::MS_REMOUNT,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_when_mixed_then_flags_and_data_split() {
        let options = vec![
            "ro,noexec".to_string(),
            "size=10m".into(),
            "mode=0755".into(),
        ];

        let (flags, data) = parse_options(&options);

        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC);
        assert_eq!(data, "size=10m,mode=0755");
    }
}
