//! The one table of host tools: every program kiln, its scripts, tests and benches run on the
//! host, with the Debian package that provides it (`scripts/host-tools.tsv`, compiled in).
//!
//! `scripts/install-deps.sh` installs from the same file, `kiln doctor` lists it, and
//! [`crate::assets::tool`] names the package to install when a tool is missing.

use std::path::Path;
use std::sync::LazyLock;

/// The table's text, as `scripts/install-deps.sh` reads it.
pub const TABLE: &str = include_str!("../../../scripts/host-tools.tsv");

/// Every line of [`TABLE`].
pub static HOST_TOOLS: LazyLock<Vec<HostTool>> = LazyLock::new(|| parse(TABLE).unwrap_or_default());

/// Who needs a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NeededFor {
    /// kilnd, kiln or `make demo`.
    Runtime,
    /// Building kiln from source.
    Build,
    /// Only `make test`.
    Test,
    /// Only `make bench` (the baselines benchmarks compare against).
    Bench,
    /// Used when present, never installed.
    Optional,
}

impl NeededFor {
    /// The table's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            NeededFor::Runtime => "runtime",
            NeededFor::Build => "build",
            NeededFor::Test => "test",
            NeededFor::Bench => "bench",
            NeededFor::Optional => "optional",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostTool {
    /// A program on PATH, `lib:NAME` (pkg-config), `py:MODULE` (python3) or `file:PATH`.
    pub command: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Who needs it.
    pub needed_for: NeededFor,
    /// What kiln uses it for.
    pub why: &'static str,
}

/// How a line's presence is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence<'a> {
    /// A program looked up on PATH.
    Program(&'a str),
    /// A library `pkg-config --exists` finds.
    Library(&'a str),
    /// A module python3 imports.
    PythonModule(&'a str),
    /// A file that must exist.
    File(&'a str),
}

impl HostTool {
    /// What [`HostTool::is_present`] looks for.
    pub fn presence(&self) -> Presence<'static> {
        if let Some(lib) = self.command.strip_prefix("lib:") {
            Presence::Library(lib)
        } else if let Some(module) = self.command.strip_prefix("py:") {
            Presence::PythonModule(module)
        } else if let Some(path) = self.command.strip_prefix("file:") {
            Presence::File(path)
        } else {
            Presence::Program(self.command)
        }
    }

    /// Whether this host has it.
    pub fn is_present(&self) -> bool {
        match self.presence() {
            Presence::Program(p) => crate::qemu::process::which(p).is_some(),
            Presence::Library(lib) => std::process::Command::new("pkg-config")
                .args(["--exists", lib])
                .status()
                .is_ok_and(|s| s.success()),
            Presence::PythonModule(m) => std::process::Command::new("python3")
                .args(["-c", &format!("import {m}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            Presence::File(path) => Path::new(path).is_file(),
        }
    }

    /// `apt-get install <package> (or make deps)`.
    pub fn install_hint(&self) -> String {
        match self.needed_for {
            NeededFor::Optional => format!("apt-get install {}", self.package),
            NeededFor::Bench => format!("apt-get install {} (or `make bench`)", self.package),
            _ => format!("apt-get install {} (or `make deps`)", self.package),
        }
    }
}

/// The table's line for `command`.
pub fn lookup(command: &str) -> Option<&'static HostTool> {
    let name = match command.split_once(':') {
        Some(_) => command,
        None => Path::new(command)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(command),
    };
    HOST_TOOLS.iter().find(|t| t.command == name)
}

/// What to do when `command` is missing: the table's install hint, naming why kiln needs it.
pub fn install_hint(command: &str) -> String {
    match lookup(command) {
        Some(t) => format!("{} (needed: {})", t.install_hint(), t.why),
        None => format!("install the Debian package that provides `{command}`"),
    }
}

/// The lines this host lacks, optional ones included.
pub fn missing() -> Vec<&'static HostTool> {
    HOST_TOOLS.iter().filter(|t| !t.is_present()).collect()
}

/// Parses the table: `#` comments and blank lines skipped, four tab-separated columns.
pub fn parse(text: &'static str) -> Result<Vec<HostTool>, String> {
    let mut tools = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&'static str> = line.split('\t').collect();
        let [command, package, needed_for, why] = cols[..] else {
            return Err(format!(
                "host-tools.tsv line {}: {} columns, want 4 (command, package, needed-for, why) separated by tabs",
                n + 1,
                cols.len()
            ));
        };
        let needed_for = match needed_for {
            "runtime" => NeededFor::Runtime,
            "build" => NeededFor::Build,
            "test" => NeededFor::Test,
            "bench" => NeededFor::Bench,
            "optional" => NeededFor::Optional,
            other => {
                return Err(format!(
                    "host-tools.tsv line {}: needed-for {other:?} is not runtime, build, test, bench or optional",
                    n + 1
                ))
            }
        };
        if command.is_empty() || package.is_empty() || why.is_empty() {
            return Err(format!("host-tools.tsv line {}: an empty column", n + 1));
        }
        tools.push(HostTool {
            command,
            package,
            needed_for,
            why,
        });
    }
    Ok(tools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_when_parsed_then_every_line_is_well_formed_and_named_once() {
        let tools = parse(TABLE).expect("scripts/host-tools.tsv parses");
        let mut names: Vec<&str> = tools.iter().map(|t| t.command).collect();
        names.sort_unstable();
        names.dedup();

        assert_eq!(names.len(), tools.len(), "a command is listed twice");
        assert!(lookup("debootstrap").is_some());
    }

    #[test]
    fn parse_when_a_column_is_missing_then_error_names_the_line() {
        let err = parse("# c\nqemu-img\tqemu-utils\truntime\n").expect_err("3 columns");

        assert!(err.starts_with("host-tools.tsv line 2: 3 columns"), "{err}");
    }

    #[test]
    fn install_hint_when_debootstrap_then_names_the_package_and_make_deps() {
        let hint = install_hint("debootstrap");

        assert!(
            hint.starts_with("apt-get install debootstrap (or `make deps`)"),
            "{hint}"
        );
    }

    #[test]
    fn presence_when_prefixed_then_library_or_python_module() {
        let lib = lookup("lib:openssl").expect("listed");
        let py = lookup("py:ensurepip").expect("listed");
        let ca = lookup("file:/etc/ssl/certs/ca-certificates.crt").expect("listed");

        assert_eq!(lib.presence(), Presence::Library("openssl"));
        assert_eq!(py.presence(), Presence::PythonModule("ensurepip"));
        assert_eq!(
            ca.presence(),
            Presence::File("/etc/ssl/certs/ca-certificates.crt")
        );
    }
}
