//! Dockerfiles: the parser (single-stage, Docker's syntax) and variable expansion.
//!
//! [`parse`] turns the text into [`Instruction`]s, each keeping its 1-based line and its
//! logical text (continuations joined) for logs and cache keys. Arguments that Docker
//! expands at build time (ENV, ARG, WORKDIR, COPY, ADD, USER, EXPOSE, LABEL, FROM,
//! STOPSIGNAL) are kept as *raw words*, quotes included, exactly as written: the builder
//! passes each through [`expand`], which substitutes variables and removes quotes and
//! escapes as Docker's shell-word processing does. RUN, CMD, ENTRYPOINT and HEALTHCHECK
//! commands are never expanded by kiln (the shell does it in the VM).

mod expand;
mod instructions;
mod parser;

use std::time::Duration;

pub use expand::expand;
pub use instructions::Port;

/// A parse failure, with the 1-based line it is on (0 when no line applies, as in
/// [`expand`] called outside a Dockerfile).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line.
    pub line: usize,
    /// What is wrong, and what to do.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\` unless a `# escape=` directive chose `` ` ``).
    pub escape: char,
    /// The instructions, in order.
    pub instructions: Vec<Instruction>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// The 1-based line the instruction starts on.
    pub line: usize,
    /// The logical line as written (continuations joined, comment lines dropped).
    pub text: String,
    /// What it says.
    pub kind: InstructionKind,
}

/// What an instruction says. Strings documented as *raw words* still need [`expand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// `FROM [--platform=…] image [AS name]`; `--platform` is accepted and ignored.
    From {
        /// The image (raw word: may use ARGs declared before FROM).
        image: String,
        /// The stage name after `AS`.
        alias: Option<String>,
    },
    /// `RUN`: a command for the shell, or an exec-form argument list.
    Run(Command),
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD` (local sources only).
    Add(CopySpec),
    /// `ENV`: names and values (values are raw words).
    Env(Vec<(String, String)>),
    /// `ARG`: names and optional defaults (defaults are raw words).
    Arg(Vec<ArgDecl>),
    /// `WORKDIR` (raw word).
    Workdir(String),
    /// `USER user[:group]` (raw words).
    User {
        /// The user name or uid.
        user: String,
        /// The group name or gid.
        group: Option<String>,
    },
    /// `EXPOSE`: raw port words (`8080`, `8080/tcp`, `53/udp`); [`Port::parse`] them after
    /// expansion (words without `$` were checked already).
    Expose(Vec<String>),
    /// `CMD`.
    Cmd(Command),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `LABEL`: keys and values (raw words).
    Label(Vec<(String, String)>),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL`: the shell for shell-form commands.
    Shell(Vec<String>),
    /// `STOPSIGNAL` (raw word: a name like `SIGTERM` or a number).
    StopSignal(String),
    /// `VOLUME`: accepted and ignored by kiln (an image's disk is already persistent).
    Volume(Vec<String>),
    /// `MAINTAINER`: accepted and ignored (deprecated by Docker; use a LABEL).
    Maintainer(String),
}

/// A command in shell form or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: run with the `SHELL` (default `/bin/sh -c`).
    Shell(String),
    /// Exec form: the JSON array's strings, run directly.
    Exec(Vec<String>),
}

/// Sources and destination of a COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Paths in the build context (raw words).
    pub sources: Vec<String>,
    /// The destination in the image (raw word).
    pub dest: String,
    /// `--chown=user[:group]` (raw word).
    pub chown: Option<String>,
    /// `--chmod=` (octal, raw word).
    pub chmod: Option<String>,
}

/// One name declared by `ARG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name.
    pub name: String,
    /// The default (raw word), if any.
    pub default: Option<String>,
}

/// What `HEALTHCHECK` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any inherited check.
    None,
    /// `HEALTHCHECK [options] CMD …`.
    Check {
        /// The probe.
        test: Command,
        /// Time between probes (default 30 s).
        interval: Duration,
        /// Time a probe may take (default 30 s).
        timeout: Duration,
        /// Grace period after start during which failures do not count (default 0).
        start_period: Duration,
        /// Consecutive failures that make the app unhealthy (default 3).
        retries: u32,
    },
}

/// Parses a Dockerfile's text (single-stage: one FROM).
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let source = parser::split(text)?;
    let mut instructions = Vec::with_capacity(source.lines.len());
    let mut froms = 0;
    for logical in source.lines {
        let kind = instructions::parse_instruction(&logical, source.escape)?;
        if matches!(kind, InstructionKind::From { .. }) {
            froms += 1;
            if froms > 1 {
                return Err(ParseError::new(
                    logical.line,
                    "a second FROM: multi-stage builds are not supported yet; use one FROM",
                ));
            }
        } else if froms == 0 && !matches!(kind, InstructionKind::Arg(_)) {
            return Err(ParseError::new(
                logical.line,
                format!(
                    "{} before FROM: only ARG may come before FROM",
                    logical.keyword.to_uppercase()
                ),
            ));
        }
        instructions.push(Instruction {
            line: logical.line,
            text: logical.text,
            kind,
        });
    }
    if froms == 0 {
        return Err(ParseError::new(
            0,
            "no FROM instruction: start the Dockerfile with FROM (e.g. `FROM debian-12`)",
        ));
    }
    Ok(Dockerfile {
        escape: source.escape,
        instructions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<InstructionKind> {
        parse(text)
            .expect("valid Dockerfile")
            .instructions
            .into_iter()
            .map(|i| i.kind)
            .collect()
    }

    fn error(text: &str) -> ParseError {
        parse(text).expect_err("invalid Dockerfile")
    }

    fn s(text: &str) -> String {
        text.to_string()
    }

    const FULL: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=debian-12
FROM --platform=linux/amd64 ${BASE} AS app
LABEL org.example.team="web platform" version=1
ENV PORT=8080 GREETING="hello world"
ENV LEGACY value with spaces
ARG PIP_INDEX
WORKDIR /srv/app
COPY --chown=app:app --chmod=755 requirements.txt run.sh ./
ADD vendor.tar /opt/
RUN apt-get update \
    # a comment inside the continuation
    && apt-get install -y python3

USER app:app
EXPOSE 8080 53/udp
HEALTHCHECK --interval=1m30s --timeout=5s --start-period=10s --retries=5 CMD curl -f http://localhost:8080/ || exit 1
SHELL ["/bin/bash", "-c"]
STOPSIGNAL SIGINT
VOLUME ["/data"]
MAINTAINER someone
ENTRYPOINT ["python3", "-m", "app"]
CMD --port $PORT
"#;

    #[test]
    fn parse_when_most_instructions_then_each_kind_and_line() {
        let file = parse(FULL).expect("valid Dockerfile");

        let lines: Vec<usize> = file.instructions.iter().map(|i| i.line).collect();
        assert_eq!(
            lines,
            [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21, 22, 23]
        );
        let kinds: Vec<_> = file.instructions.into_iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [
                InstructionKind::Arg(vec![ArgDecl {
                    name: s("BASE"),
                    default: Some(s("debian-12"))
                }]),
                InstructionKind::From {
                    image: s("${BASE}"),
                    alias: Some(s("app"))
                },
                InstructionKind::Label(vec![
                    (s("org.example.team"), s("\"web platform\"")),
                    (s("version"), s("1"))
                ]),
                InstructionKind::Env(vec![
                    (s("PORT"), s("8080")),
                    (s("GREETING"), s("\"hello world\""))
                ]),
                InstructionKind::Env(vec![(s("LEGACY"), s("value with spaces"))]),
                InstructionKind::Arg(vec![ArgDecl {
                    name: s("PIP_INDEX"),
                    default: None
                }]),
                InstructionKind::Workdir(s("/srv/app")),
                InstructionKind::Copy(CopySpec {
                    sources: vec![s("requirements.txt"), s("run.sh")],
                    dest: s("./"),
                    chown: Some(s("app:app")),
                    chmod: Some(s("755")),
                }),
                InstructionKind::Add(CopySpec {
                    sources: vec![s("vendor.tar")],
                    dest: s("/opt/"),
                    chown: None,
                    chmod: None,
                }),
                InstructionKind::Run(Command::Shell(s(
                    "apt-get update     && apt-get install -y python3"
                ))),
                InstructionKind::User {
                    user: s("app"),
                    group: Some(s("app"))
                },
                InstructionKind::Expose(vec![s("8080"), s("53/udp")]),
                InstructionKind::Healthcheck(Healthcheck::Check {
                    test: Command::Shell(s("curl -f http://localhost:8080/ || exit 1")),
                    interval: Duration::from_secs(90),
                    timeout: Duration::from_secs(5),
                    start_period: Duration::from_secs(10),
                    retries: 5,
                }),
                InstructionKind::Shell(vec![s("/bin/bash"), s("-c")]),
                InstructionKind::StopSignal(s("SIGINT")),
                InstructionKind::Volume(vec![s("/data")]),
                InstructionKind::Maintainer(s("someone")),
                InstructionKind::Entrypoint(Command::Exec(vec![s("python3"), s("-m"), s("app")])),
                InstructionKind::Cmd(Command::Shell(s("--port $PORT"))),
            ]
        );
    }

    #[test]
    fn parse_when_continued_then_text_is_the_joined_logical_line() {
        let file = parse("FROM x\nRUN a \\\n  b\n").expect("valid");

        assert_eq!(file.instructions[1].text, "RUN a   b");
        assert_eq!(file.instructions[1].line, 2);
    }

    #[test]
    fn parse_when_escape_directive_backtick_then_backtick_continues_lines() {
        let file = parse("# escape=`\nFROM x\nRUN dir C:\\ `\n  /w\n").expect("valid");

        assert_eq!(file.escape, '`');
        assert_eq!(
            file.instructions[1].kind,
            InstructionKind::Run(Command::Shell(s("dir C:\\   /w")))
        );
    }

    #[test]
    fn parse_when_directive_after_comment_then_it_is_a_comment() {
        let file = parse("# hello\n# escape=`\nFROM x\n").expect("valid");

        assert_eq!(file.escape, '\\');
    }

    #[test]
    fn parse_when_bad_escape_directive_then_error() {
        let err = error("# escape=x\nFROM x\n");

        assert_eq!(err.line, 1);
        assert!(err.message.contains("escape"), "{err}");
    }

    #[test]
    fn parse_when_empty_continuation_lines_then_skipped() {
        let kinds = kinds("FROM x\nRUN a \\\n\n   \n  b\n");

        assert_eq!(kinds[1], InstructionKind::Run(Command::Shell(s("a   b"))));
    }

    #[test]
    fn parse_when_lowercase_names_then_accepted() {
        let kinds = kinds("from x\nrun echo hi\nCmd [\"sh\"]\n");

        assert_eq!(kinds[1], InstructionKind::Run(Command::Shell(s("echo hi"))));
        assert_eq!(kinds[2], InstructionKind::Cmd(Command::Exec(vec![s("sh")])));
    }

    #[test]
    fn parse_when_exec_form_is_invalid_json_then_shell_form() {
        let kinds = kinds("FROM x\nCMD [python3, app.py]\nRUN [\"a\", 'b']\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Cmd(Command::Shell(s("[python3, app.py]")))
        );
        assert_eq!(
            kinds[2],
            InstructionKind::Run(Command::Shell(s("[\"a\", 'b']")))
        );
    }

    #[test]
    fn parse_when_exec_form_run_then_argv() {
        let kinds = kinds("FROM x\nRUN [\"/bin/sh\", \"-c\", \"echo hi\"]\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Run(Command::Exec(vec![s("/bin/sh"), s("-c"), s("echo hi")]))
        );
    }

    #[test]
    fn parse_when_copy_exec_form_then_sources_and_dest() {
        let kinds = kinds("FROM x\nCOPY [\"a b.txt\", \"/dst/\"]\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Copy(CopySpec {
                sources: vec![s("a b.txt")],
                dest: s("/dst/"),
                chown: None,
                chmod: None
            })
        );
    }

    #[test]
    fn parse_when_unknown_instruction_then_error_names_it_and_line() {
        let err = error("FROM x\n\nCOPPY a b\n");

        assert_eq!(err.line, 3);
        assert!(err.message.contains("unknown instruction `COPPY`"), "{err}");
    }

    #[test]
    fn parse_when_two_froms_then_multi_stage_error() {
        let err = error("FROM a AS build\nRUN make\nFROM b\n");

        assert_eq!(err.line, 3);
        assert!(err.message.contains("multi-stage"), "{err}");
    }

    #[test]
    fn parse_when_no_from_then_error() {
        let err = error("# nothing\n");

        assert!(err.message.contains("no FROM"), "{err}");
    }

    #[test]
    fn parse_when_instruction_before_from_then_error() {
        let err = error("RUN echo\nFROM x\n");

        assert_eq!(err.line, 1);
        assert!(err.message.contains("before FROM"), "{err}");
    }

    #[test]
    fn parse_when_run_mount_then_not_supported() {
        let err = error("FROM x\nRUN --mount=type=cache,target=/root/.cache pip install x\n");

        assert!(
            err.message.contains("RUN --mount is not supported"),
            "{err}"
        );
    }

    #[test]
    fn parse_when_copy_from_then_multi_stage_error() {
        let err = error("FROM x\nCOPY --from=build /out /app\n");

        assert!(
            err.message
                .contains("multi-stage builds are not supported yet"),
            "{err}"
        );
    }

    #[test]
    fn parse_when_add_url_then_error_says_use_run() {
        let err = error("FROM x\nADD https://example.com/a.tgz /tmp/\n");

        assert!(
            err.message
                .contains("ADD from URLs is not supported: download in a RUN step"),
            "{err}"
        );
    }

    #[test]
    fn parse_when_onbuild_then_not_supported() {
        let err = error("FROM x\nONBUILD RUN make\n");

        assert!(err.message.contains("ONBUILD is not supported"), "{err}");
    }

    #[test]
    fn parse_when_healthcheck_none_or_defaults_then_recorded() {
        let kinds = kinds("FROM x\nHEALTHCHECK NONE\nHEALTHCHECK CMD [\"/bin/check\"]\n");

        assert_eq!(kinds[1], InstructionKind::Healthcheck(Healthcheck::None));
        assert_eq!(
            kinds[2],
            InstructionKind::Healthcheck(Healthcheck::Check {
                test: Command::Exec(vec![s("/bin/check")]),
                interval: Duration::from_secs(30),
                timeout: Duration::from_secs(30),
                start_period: Duration::ZERO,
                retries: 3,
            })
        );
    }

    #[test]
    fn parse_when_healthcheck_bad_duration_then_error() {
        let err = error("FROM x\nHEALTHCHECK --interval=30 CMD true\n");

        assert!(err.message.contains("--interval=30"), "{err}");
    }

    #[test]
    fn parse_when_bad_port_then_error() {
        let err = error("FROM x\nEXPOSE 80/sctp\n");

        assert!(err.message.contains("sctp"), "{err}");
    }

    #[test]
    fn parse_when_stopsignal_number_then_kept() {
        let kinds = kinds("FROM x\nSTOPSIGNAL 9\n");

        assert_eq!(kinds[1], InstructionKind::StopSignal(s("9")));
    }

    #[test]
    fn parse_when_env_without_value_then_error() {
        let err = error("FROM x\nENV LONELY\n");

        assert!(err.message.contains("give a value"), "{err}");
    }

    #[test]
    fn parse_when_env_words_expanded_then_quotes_removed() {
        let kinds = kinds("FROM x\nENV A=1 B=\"v 2\" C='$A'\n");
        let InstructionKind::Env(pairs) = &kinds[1] else {
            panic!("not ENV: {:?}", kinds[1]);
        };

        let values: Vec<String> = pairs
            .iter()
            .map(|(_, v)| expand(v, &|_| Some(s("x")), '\\').expect("expands"))
            .collect();

        assert_eq!(values, ["1", "v 2", "$A"]);
    }
}
