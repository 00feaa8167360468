//! Host tools (`apt-get`, `dpkg-deb`, `mke2fs`, …) run to completion, their failures
//! turned into errors that say what to install (from [`crate::host_tools`]) or what the
//! tool said.

use std::process::{Command, Output};

/// Failures while running a host tool.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("{tool} is not installed: {install}")]
    Missing {
        /// The tool's name.
        tool: &'static str,
        /// What to install, from the host tools table.
        install: String,
    },
    /// The tool could not be started.
    #[error("cannot run `{tool}`")]
    Spawn {
        /// The tool's name.
        tool: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran but exited non-zero.
    #[error("`{command}` failed: {detail}")]
    Failed {
        /// The command line, shortened.
        command: String,
        /// What it wrote to stderr.
        detail: String,
    },
}

/// Runs `cmd` (the program `tool`, a line of the host tools table) and returns its output
/// whatever its exit status; only "not installed" and "cannot start" are errors.
pub fn run(tool: &'static str, cmd: &mut Command) -> Result<Output, ToolError> {
    cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ToolError::Missing {
            tool,
            install: crate::host_tools::install_hint(tool),
        },
        _ => ToolError::Spawn { tool, source },
    })
}

/// Like [`run`], and a non-zero exit becomes [`ToolError::Failed`] carrying its stderr.
pub fn run_ok(tool: &'static str, cmd: &mut Command) -> Result<Output, ToolError> {
    let out = run(tool, cmd)?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            command: format!("{cmd:?}"),
            detail: stderr_of(&out),
        });
    }
    Ok(out)
}

/// A tool's stderr, trimmed, for an error message.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_when_tool_absent_then_missing_names_the_package_from_the_table() {
        let mut cmd = Command::new("debootstrap");
        cmd.env("PATH", "/nonexistent");

        let err = run("debootstrap", &mut cmd).expect_err("absent");

        assert!(
            err.to_string().starts_with(
                "debootstrap is not installed: apt-get install debootstrap (or `make deps`)"
            ),
            "{err}"
        );
    }

    #[test]
    fn run_ok_when_exit_non_zero_then_failed_with_stderr() {
        let err = run_ok(
            "sh",
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
        )
        .expect_err("fails");

        assert!(
            matches!(&err, ToolError::Failed { detail, .. } if detail == "broken"),
            "{err}"
        );
    }
}
