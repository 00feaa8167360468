//! Host tools (`apt-get`, `dpkg-deb`, `mke2fs`, …) run to completion, their failures
//! turned into errors that say what to install or what the tool said.

use std::process::{Command, Output};

/// Failures while running a host tool.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("`{tool}` is not installed: install {install}")]
    Missing {
        /// The tool's name.
        tool: &'static str,
        /// What to install.
        install: &'static str,
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

/// Runs `cmd` (the program `tool`, installed with `install`) and returns its output
/// whatever its exit status; only "not installed" and "cannot start" are errors.
pub fn run(
    tool: &'static str,
    install: &'static str,
    cmd: &mut Command,
) -> Result<Output, ToolError> {
    cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ToolError::Missing { tool, install },
        _ => ToolError::Spawn { tool, source },
    })
}

/// Like [`run`], and a non-zero exit becomes [`ToolError::Failed`] carrying its stderr.
pub fn run_ok(
    tool: &'static str,
    install: &'static str,
    cmd: &mut Command,
) -> Result<Output, ToolError> {
    let out = run(tool, install, cmd)?;
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
    fn run_when_tool_absent_then_missing_says_what_to_install() {
        let err = run(
            "kiln-no-such-tool",
            "nothing",
            &mut Command::new("kiln-no-such-tool"),
        )
        .expect_err("absent");

        assert!(matches!(err, ToolError::Missing { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "`kiln-no-such-tool` is not installed: install nothing"
        );
    }

    #[test]
    fn run_ok_when_exit_non_zero_then_failed_with_stderr() {
        let err = run_ok(
            "sh",
            "dash",
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
        )
        .expect_err("fails");

        assert!(
            matches!(&err, ToolError::Failed { detail, .. } if detail == "broken"),
            "{err}"
        );
    }
}
