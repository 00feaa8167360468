//! The Debian 12 base: `debootstrap --variant=minbase` of bookworm from the host's apt
//! mirror, made fit to clone (no host resolv.conf or hosts, empty machine-id, no package
//! cache), in a 4 GiB sparse ext4 disk at `<home>/bases/debian-12/<version>/disk.ext4`
//! where `<version>` is the Debian point release and the build date (`12.11-20261128`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_vmm::assets::store::io_err;
use kiln_vmm::assets::tool::{run_ok, ToolError};
use serde::Serialize;

use super::{ensure_base, BaseBuild, BaseKind};
use super::{BaseError, BaseImage};

/// The base's name.
pub const NAME: &str = "debian-12";

/// The Debian suite it is bootstrapped from.
pub const SUITE: &str = "bookworm";

/// Packages added to minbase: TLS trust for apt and pip, and `ip`, `udhcpc`, `wget` applets.
pub const INCLUDE: &str = "ca-certificates,busybox";

/// Size of the base disk (sparse: only the ~190 MiB written take space).
pub const DISK_SIZE: u64 = 4 << 30;

/// Where the host's apt sources are read from.
pub const HOST_APT_DIR: &str = "/etc/apt";

const KIND: BaseKind = BaseKind {
    name: NAME,
    disk_size: DISK_SIZE,
    label: "kiln-debian-12",
};

/// What `manifest.json` records besides what every base's does.
#[derive(Debug, Serialize)]
struct Details {
    suite: &'static str,
    mirror: String,
    rootfs_bytes: u64,
}

/// Ensures the Debian 12 base exists under `home`, building it (about 40 s and the
/// network to the host's Debian mirror) if none was built before; offline afterwards.
///
/// `extra_ca_bundle` (PEM) is trusted by debootstrap's downloads, for an https mirror
/// behind a TLS-intercepting proxy; it is not baked into the base.
pub fn ensure(home: &Path, extra_ca_bundle: Option<&Path>) -> Result<BaseImage, BaseError> {
    ensure_base(home, &KIND, false, |base| build(base, extra_ca_bundle))
}

/// Builds a fresh Debian 12 base (today's packages) even if one exists.
pub fn refresh(home: &Path, extra_ca_bundle: Option<&Path>) -> Result<BaseImage, BaseError> {
    ensure_base(home, &KIND, true, |base| build(base, extra_ca_bundle))
}

/// Bootstraps, tidies and publishes the base.
fn build(base: BaseBuild, extra_ca_bundle: Option<&Path>) -> Result<BaseImage, BaseError> {
    let mirror = host_mirror(Path::new(HOST_APT_DIR))?;
    let security = host_uri(Path::new(HOST_APT_DIR), &format!("{SUITE}-security"))?;
    let work = base.work();
    let rootfs = work.join("rootfs");
    tracing::info!(%mirror, "bootstrapping Debian {SUITE} (about 40 s)");
    debootstrap(&rootfs, &mirror, work, extra_ca_bundle)?;
    tidy_rootfs(&rootfs, &mirror, security.as_deref())?;
    let rootfs_bytes = tree_bytes(&rootfs)?;
    let point_release = fs::read_to_string(rootfs.join("etc/debian_version"))
        .map_err(io_err("read", &rootfs.join("etc/debian_version")))?;
    let version = format!("{}-{}", point_release.trim(), today());
    if let Some(existing) = base.existing(&version)? {
        return Ok(existing);
    }
    tracing::info!(%version, rootfs_mib = rootfs_bytes >> 20, "Debian rootfs staged");
    let details = Details {
        suite: SUITE,
        mirror,
        rootfs_bytes,
    };
    base.publish(&version, &rootfs, details)
}

/// Runs debootstrap into `rootfs`; with a CA bundle, its wget trusts that bundle.
fn debootstrap(
    rootfs: &Path,
    mirror: &str,
    work: &Path,
    extra_ca_bundle: Option<&Path>,
) -> Result<(), BaseError> {
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={INCLUDE}"))
        .arg(SUITE)
        .arg(rootfs)
        .arg(mirror);
    if let Some(bundle) = extra_ca_bundle {
        let wgetrc = work.join("wgetrc");
        let text = format!("ca_certificate = {}\n", bundle.display());
        fs::write(&wgetrc, text).map_err(io_err("write", &wgetrc))?;
        cmd.env("WGETRC", &wgetrc);
    }
    match run_ok("debootstrap", &mut cmd) {
        Ok(_) => Ok(()),
        Err(ToolError::Failed { command, detail }) => {
            // debootstrap's own log says which package or download failed.
            let log =
                fs::read_to_string(rootfs.join("debootstrap/debootstrap.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(ToolError::Failed {
                command,
                detail: format!("{detail}\n{}", tail.join("\n")).trim().to_string(),
            }
            .into())
        }
        Err(other) => Err(other.into()),
    }
}

/// Makes the bootstrapped tree fit to clone: apt tidy, no host identity left behind.
fn tidy_rootfs(rootfs: &Path, mirror: &str, security: Option<&str>) -> Result<(), BaseError> {
    run_ok(
        "chroot",
        Command::new("chroot")
            .arg(rootfs)
            .args(["apt-get", "clean"]),
    )?;
    // Like Debian's container images: no package lists (a Dockerfile runs apt-get update).
    let lists = rootfs.join("var/lib/apt/lists");
    for entry in fs::read_dir(&lists)
        .map_err(io_err("list", &lists))?
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_file()) && entry.file_name() != "lock" {
            fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
        }
    }
    let mut sources = format!("deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n");
    if let Some(security) = security {
        sources.push_str(&format!("deb {security} {SUITE}-security main\n"));
    }
    let files = [
        (
            "etc/apt/apt.conf.d/99kiln",
            "Acquire::Languages \"none\";\n".to_string(),
        ),
        ("etc/apt/sources.list", sources),
        // QEMU user networking's DNS; debootstrap copied the host's.
        ("etc/resolv.conf", "nameserver 10.0.2.3\n".into()),
        ("etc/hostname", "kiln\n".into()),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n".into(),
        ),
        // Empty, so every VM made from the base gets its own id on first boot.
        ("etc/machine-id", String::new()),
    ];
    for (name, content) in files {
        let path = rootfs.join(name);
        // Replace rather than write through: the host's file may have been a link.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e).into()),
        }
        fs::write(&path, content).map_err(io_err("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &path))?;
    }
    let dbus_id = rootfs.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok() {
        fs::remove_file(&dbus_id).map_err(io_err("remove", &dbus_id))?;
    }
    Ok(())
}

/// Bytes of regular files under `dir` (links not followed).
fn tree_bytes(dir: &Path) -> Result<u64, BaseError> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(io_err("stat", &entry.path()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// Today's UTC date as `YYYYMMDD`.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The first `deb` URI for bookworm `main` in the apt sources under `apt_dir`
/// (`sources.list`, then `sources.list.d/*.list` and `*.sources` in name order).
pub fn host_mirror(apt_dir: &Path) -> Result<String, BaseError> {
    host_uri(apt_dir, SUITE)?.ok_or_else(|| BaseError::NoMirror {
        suite: SUITE,
        apt_dir: apt_dir.into(),
    })
}

/// The first `deb` URI serving `suite` with `main` in the apt sources under `apt_dir`.
fn host_uri(apt_dir: &Path, suite: &str) -> Result<Option<String>, BaseError> {
    let mut files = vec![apt_dir.join("sources.list")];
    let parts = apt_dir.join("sources.list.d");
    if let Ok(entries) = fs::read_dir(&parts) {
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "list" || ext == "sources")
            })
            .collect();
        names.sort();
        files.extend(names);
    }
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read", &file)(e).into()),
        };
        let found = if file.extension().is_some_and(|ext| ext == "sources") {
            deb822_uri(&text, suite)
        } else {
            one_line_uri(&text, suite)
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Schemes debootstrap can fetch from.
fn usable(uri: &str) -> bool {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// From `deb [options] URI suite component…` lines.
fn one_line_uri(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default().trim();
        let rest = line.strip_prefix("deb")?;
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            rest = rest.split_once(']')?.1;
        }
        let mut fields = rest.split_whitespace();
        let uri = fields.next()?;
        let line_suite = fields.next()?;
        let main = fields.any(|c| c == "main");
        (line_suite == suite && main && usable(uri)).then(|| uri.to_string())
    })
}

/// From deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`).
fn deb822_uri(text: &str, suite: &str) -> Option<String> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            stanzas.push(Vec::new());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let stanza = stanzas.last_mut()?;
        if line.starts_with(char::is_whitespace) {
            if let Some((_, value)) = stanza.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            stanza.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    stanzas.iter().find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
                .unwrap_or_default()
        };
        let has = |name: &str, want: &str| field(name).split_whitespace().any(|v| v == want);
        let enabled = !field("enabled").eq_ignore_ascii_case("no");
        if !(enabled && has("types", "deb") && has("suites", suite) && has("components", "main")) {
            return None;
        }
        field("uris")
            .split_whitespace()
            .find(|uri| usable(uri))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::OnceLock;

    use super::*;
    use crate::disk::debugfs;

    /// The data directory the tests share (as kiln-vmm's tests): `KILN_HOME`, else
    /// `target/kiln-test-home`, so the base is built once and reused by later runs.
    fn test_home() -> PathBuf {
        std::env::var_os("KILN_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-test-home")
            })
    }

    /// The base, built at most once per test run.
    fn base() -> &'static BaseImage {
        static BASE: OnceLock<BaseImage> = OnceLock::new();
        BASE.get_or_init(|| ensure(&test_home(), None).expect("Debian base (needs debootstrap)"))
    }

    fn apt_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("apt dir");
        fs::create_dir(dir.path().join("sources.list.d")).expect("mkdir");
        for (name, text) in files {
            fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn ensure_when_built_then_disk_is_a_clean_debian() {
        let base = base();

        assert_eq!(base.name, "debian-12");
        assert!(base.version.starts_with("12."), "{}", base.version);
        assert_eq!(debugfs(&base.disk, "cat /etc/hostname"), "kiln\n");
        assert_eq!(
            debugfs(&base.disk, "cat /etc/resolv.conf"),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(debugfs(&base.disk, "cat /etc/machine-id"), "");
        assert!(debugfs(&base.disk, "cat /etc/apt/apt.conf.d/99kiln")
            .contains("Acquire::Languages \"none\";"));
        assert!(debugfs(&base.disk, "stat /usr/bin/busybox").contains("Type: regular"));
        assert!(
            debugfs(&base.disk, "stat /etc/ssl/certs/ca-certificates.crt")
                .contains("Type: regular")
        );
        assert!(!debugfs(&base.disk, "ls /var/cache/apt/archives").contains(".deb"));
        let meta = fs::metadata(&base.disk).expect("stat disk");
        assert_eq!((meta.len(), meta.mode() & 0o777), (4 << 30, 0o444));
        assert!(meta.blocks() * 512 < 1 << 30, "disk is not sparse");
    }

    #[test]
    fn ensure_when_called_again_then_reuses_the_base() {
        let first = base();

        let again = ensure(&test_home(), None).expect("second call");

        assert_eq!(&again, first);
    }

    #[test]
    fn host_mirror_when_deb822_sources_then_first_bookworm_main_uri() {
        let apt = apt_dir(&[(
            "sources.list.d/debian.sources",
            "# comment\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\
             Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main contrib\n\n\
             Types: deb\nURIs: http://security.example/debian-security\n\
             Suites: bookworm-security\nComponents: main\n",
        )]);

        let mirror = host_mirror(apt.path()).expect("mirror");
        let security = host_uri(apt.path(), "bookworm-security").expect("read");

        assert_eq!(mirror, "http://mirror.example/debian");
        assert_eq!(
            security.as_deref(),
            Some("http://security.example/debian-security")
        );
    }

    #[test]
    fn host_mirror_when_one_line_list_then_options_and_other_suites_skipped() {
        let apt = apt_dir(&[
            (
                "sources.list",
                "# deb http://old.example/debian bookworm main\n\
                 deb http://other.example/debian bullseye main\n\
                 deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm main\n",
            ),
            (
                "sources.list.d/zz.list",
                "deb http://later.example/debian bookworm main\n",
            ),
        ]);

        let mirror = host_mirror(apt.path()).expect("mirror");

        assert_eq!(mirror, "https://mirror.example/debian");
    }

    #[test]
    fn host_mirror_when_disabled_or_missing_then_no_mirror_error() {
        let apt = apt_dir(&[(
            "sources.list.d/debian.sources",
            "Enabled: no\nTypes: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\
             Components: main\n",
        )]);

        let err = host_mirror(apt.path()).expect_err("no mirror");

        assert!(matches!(err, BaseError::NoMirror { .. }), "{err}");
        assert!(err.to_string().contains("bookworm"), "{err}");
    }

    #[test]
    fn civil_from_days_when_known_dates_then_matches() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
