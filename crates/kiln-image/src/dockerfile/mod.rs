//! Dockerfiles: the parser (Docker's syntax, any number of stages) and variable expansion.
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

pub use expand::{expand, expand_vars};
pub use instructions::{is_http, Port};

/// Whether a RUN's shell line is nothing but one here-document marker (`<<EOF`, `<<-"EOF"`):
/// then BuildKit runs the document itself as the script.
pub fn is_only_heredoc(line: &str, escape: char) -> bool {
    match parser::words(line, escape).as_slice() {
        [word] => parser::heredoc_marker(word, escape).is_some(),
        _ => false,
    }
}

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
    /// `FROM [--platform=…] image [AS name]`: starts a stage.
    From {
        /// The image or an earlier stage's name (raw word: may use ARGs declared before
        /// the first FROM).
        image: String,
        /// The stage name after `AS`, lowercased (checked: a letter, then letters, digits,
        /// `-`, `_`, `.`).
        alias: Option<String>,
        /// `--platform=…` (raw word, like the image).
        platform: Option<String>,
    },
    /// `RUN`: a command for the shell, or an exec-form argument list, with its flags.
    Run(RunSpec),
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD`: local sources (archives unpacked) and `http(s)://` URLs.
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

/// A here-document: the lines after an instruction up to its delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter (quotes removed); a COPY names the file after it when the
    /// destination is a directory.
    pub name: String,
    /// The lines, each ending in a newline (leading tabs already gone for `<<-`).
    pub content: String,
    /// Whether the delimiter was unquoted: COPY then expands variables in the content.
    pub expand: bool,
    /// Whether it was opened with `<<-`.
    pub strip_tabs: bool,
}

/// What `RUN` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// The command. A shell-form command that opens here-documents keeps its markers.
    pub command: Command,
    /// The here-documents the command's line opens, in order.
    pub heredocs: Vec<Heredoc>,
    /// `--mount=…` flags, in order.
    pub mounts: Vec<RunMount>,
    /// `--network=…`.
    pub network: RunNetwork,
}

impl RunSpec {
    /// A plain RUN of `command` (no flags, no here-documents).
    pub fn plain(command: Command) -> Self {
        Self {
            command,
            heredocs: Vec::new(),
            mounts: Vec::new(),
            network: RunNetwork::Default,
        }
    }
}

/// `RUN --network=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunNetwork {
    /// The build's network (its egress policy).
    #[default]
    Default,
    /// No network at all: only a loopback device.
    None,
}

/// One `RUN --mount=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunMount {
    /// `type=cache`: a directory kept between builds, never in the image.
    Cache(CacheMount),
    /// `type=secret`: a secret given to the build, for this step only.
    Secret(SecretMount),
    /// `type=tmpfs`: an empty tmpfs for this step only.
    Tmpfs {
        /// Where (raw word).
        target: String,
        /// Size limit in bytes, if given.
        size: Option<u64>,
    },
}

/// `RUN --mount=type=cache,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    /// Where the cache appears (raw word).
    pub target: String,
    /// The cache's id (raw word); the target when not given.
    pub id: Option<String>,
    /// `sharing=shared|private|locked` as written (kiln runs one build at a time, so all
    /// three behave alike).
    pub sharing: String,
    /// Permission bits of the cache's root directory (default 0755).
    pub mode: u32,
    /// Owner of the cache's root directory (default 0).
    pub uid: u32,
    /// Group of the cache's root directory (default 0).
    pub gid: u32,
    /// `ro`: mounted read-only.
    pub read_only: bool,
}

/// `RUN --mount=type=secret,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    /// The secret's id (raw word); the target's file name when not given.
    pub id: String,
    /// Where the file appears (raw word): `/run/secrets/<id>` when neither a target nor
    /// `env` is given.
    pub target: Option<String>,
    /// An environment variable that holds the secret during the step.
    pub env: Option<String>,
    /// Whether a missing secret fails the build (default false: the step runs without it).
    pub required: bool,
    /// Permission bits of the file (default 0400).
    pub mode: u32,
    /// Owner of the file (default 0).
    pub uid: u32,
    /// Group of the file (default 0).
    pub gid: u32,
}

/// Sources and destination of a COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// `COPY --from=…`: a stage name or index, or an image (raw word); the sources are
    /// then paths in that stage's or image's filesystem.
    pub from: Option<String>,
    /// Paths in the build context (raw words), and for ADD `http(s)://` URLs.
    pub sources: Vec<String>,
    /// Inline files given as here-documents (`COPY <<EOF /dest`), in order.
    pub heredocs: Vec<Heredoc>,
    /// `ADD --checksum=sha256:<hex>` (raw word).
    pub checksum: Option<String>,
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

/// Parses one ONBUILD trigger of a base image (`RUN make`, `COPY . /app`) as the instruction
/// it names; FROM, ONBUILD and MAINTAINER cannot be triggers (as in Docker).
pub fn parse_trigger(text: &str, line: usize) -> Result<Instruction, ParseError> {
    let source = parser::split(text).map_err(|e| ParseError::new(line, e.message))?;
    let mut lines = source.lines.into_iter();
    let (Some(logical), None) = (lines.next(), lines.next()) else {
        return Err(ParseError::new(
            line,
            format!("the base image's ONBUILD trigger {text:?} is not one instruction"),
        ));
    };
    let kind = instructions::parse_instruction(&logical, source.escape).map_err(|e| {
        ParseError::new(
            line,
            format!("the base image's ONBUILD {text:?}: {}", e.message),
        )
    })?;
    if matches!(
        kind,
        InstructionKind::From { .. } | InstructionKind::Maintainer(_)
    ) {
        return Err(ParseError::new(
            line,
            format!(
                "the base image's ONBUILD {text:?}: {} cannot be a trigger",
                logical.keyword
            ),
        ));
    }
    Ok(Instruction {
        line,
        text: format!("ONBUILD {}", logical.text),
        kind,
    })
}

/// Parses a Dockerfile's text: ARGs, then one or more stages, each starting at a FROM.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let source = parser::split(text)?;
    let mut instructions = Vec::with_capacity(source.lines.len());
    let mut froms = 0;
    for logical in source.lines {
        let kind = instructions::parse_instruction(&logical, source.escape)?;
        if matches!(kind, InstructionKind::From { .. }) {
            froms += 1;
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

    fn run(command: Command) -> InstructionKind {
        InstructionKind::Run(RunSpec::plain(command))
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
                    alias: Some(s("app")),
                    platform: Some(s("linux/amd64")),
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
                    from: None,
                    sources: vec![s("requirements.txt"), s("run.sh")],
                    dest: s("./"),
                    heredocs: vec![],
                    checksum: None,
                    chown: Some(s("app:app")),
                    chmod: Some(s("755")),
                }),
                InstructionKind::Add(CopySpec {
                    from: None,
                    sources: vec![s("vendor.tar")],
                    heredocs: vec![],
                    checksum: None,
                    dest: s("/opt/"),
                    chown: None,
                    chmod: None,
                }),
                run(Command::Shell(s(
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
            run(Command::Shell(s("dir C:\\   /w")))
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

        assert_eq!(kinds[1], run(Command::Shell(s("a   b"))));
    }

    #[test]
    fn parse_when_lowercase_names_then_accepted() {
        let kinds = kinds("from x\nrun echo hi\nCmd [\"sh\"]\n");

        assert_eq!(kinds[1], run(Command::Shell(s("echo hi"))));
        assert_eq!(kinds[2], InstructionKind::Cmd(Command::Exec(vec![s("sh")])));
    }

    #[test]
    fn parse_when_exec_form_is_invalid_json_then_shell_form() {
        let kinds = kinds("FROM x\nCMD [python3, app.py]\nRUN [\"a\", 'b']\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Cmd(Command::Shell(s("[python3, app.py]")))
        );
        assert_eq!(kinds[2], run(Command::Shell(s("[\"a\", 'b']"))));
    }

    #[test]
    fn parse_when_exec_form_run_then_argv() {
        let kinds = kinds("FROM x\nRUN [\"/bin/sh\", \"-c\", \"echo hi\"]\n");

        assert_eq!(
            kinds[1],
            run(Command::Exec(vec![s("/bin/sh"), s("-c"), s("echo hi")]))
        );
    }

    #[test]
    fn parse_when_copy_exec_form_then_sources_and_dest() {
        let kinds = kinds("FROM x\nCOPY [\"a b.txt\", \"/dst/\"]\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Copy(CopySpec {
                from: None,
                sources: vec![s("a b.txt")],
                heredocs: vec![],
                checksum: None,
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
    fn parse_when_two_froms_then_two_stages_with_lowercased_names() {
        let kinds = kinds("FROM --platform=$BUILDPLATFORM a AS Build\nRUN make\nFROM b\n");

        assert_eq!(
            kinds[0],
            InstructionKind::From {
                image: s("a"),
                alias: Some(s("build")),
                platform: Some(s("$BUILDPLATFORM")),
            }
        );
        assert_eq!(
            kinds[2],
            InstructionKind::From {
                image: s("b"),
                alias: None,
                platform: None,
            }
        );
    }

    #[test]
    fn parse_when_stage_name_is_not_a_name_then_error() {
        let err = error("FROM a AS 1st\n");

        assert_eq!(err.line, 1);
        assert!(err.message.contains("starts with a letter"), "{err}");
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
    fn parse_when_copy_from_then_recorded_with_its_flags() {
        let kinds = kinds("FROM x\nCOPY --from=build --chmod=755 /out/a /out/b /app/\n");

        assert_eq!(
            kinds[1],
            InstructionKind::Copy(CopySpec {
                from: Some(s("build")),
                sources: vec![s("/out/a"), s("/out/b")],
                heredocs: vec![],
                checksum: None,
                dest: s("/app/"),
                chown: None,
                chmod: Some(s("755")),
            })
        );
    }

    #[test]
    fn parse_when_add_from_then_unknown_flag() {
        let err = error("FROM x\nADD --from=build /out /app\n");

        assert!(err.message.contains("unknown flag: from"), "{err}");
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

    fn run_spec(text: &str) -> RunSpec {
        match kinds(text).pop() {
            Some(InstructionKind::Run(spec)) => spec,
            other => panic!("not RUN: {other:?}"),
        }
    }

    fn copy(text: &str) -> CopySpec {
        match kinds(text).pop() {
            Some(InstructionKind::Copy(spec) | InstructionKind::Add(spec)) => spec,
            other => panic!("not COPY/ADD: {other:?}"),
        }
    }

    fn doc(name: &str, content: &str, expand: bool, strip_tabs: bool) -> Heredoc {
        Heredoc {
            name: s(name),
            content: s(content),
            expand,
            strip_tabs,
        }
    }

    // Continuations, as Docker's parser treats them.

    #[test]
    fn parse_when_a_line_holds_only_the_escape_then_the_instruction_continues() {
        let kinds = kinds("FROM x\nRUN a \\\n\\\n  b\nRUN c\n");

        assert_eq!(kinds[1], run(Command::Shell(s("a   b"))));
        assert_eq!(kinds[2], run(Command::Shell(s("c"))));
    }

    #[test]
    fn parse_when_blanks_follow_the_escape_then_still_a_continuation() {
        let kinds = kinds("FROM x\nRUN a \\ \t \n  b\n");

        assert_eq!(kinds[1], run(Command::Shell(s("a   b"))));
    }

    #[test]
    fn parse_when_indented_comment_inside_a_continuation_then_dropped() {
        let kinds = kinds("FROM x\nRUN a \\\n    # not a command \\\n  b\n");

        assert_eq!(kinds[1], run(Command::Shell(s("a   b"))));
    }

    #[test]
    fn parse_when_the_escape_ends_the_file_then_the_instruction_ends() {
        let kinds = kinds("FROM x\nRUN a \\");

        assert_eq!(kinds[1], run(Command::Shell(s("a"))));
    }

    #[test]
    fn parse_when_escape_ends_the_file_after_empty_lines_then_the_instruction_ends() {
        let kinds = kinds("FROM x\nRUN a \\\n\n\n");

        assert_eq!(kinds[1], run(Command::Shell(s("a"))));
    }

    #[test]
    fn parse_when_backtick_escape_then_backslash_at_end_is_literal() {
        let kinds = kinds("# escape=`\nFROM x\nRUN dir c:\\\nRUN b `\n`\n  c\n");

        assert_eq!(kinds[1], run(Command::Shell(s("dir c:\\"))));
        assert_eq!(kinds[2], run(Command::Shell(s("b   c"))));
    }

    #[test]
    fn parse_when_syntax_directive_then_ignored() {
        let file = parse("# syntax=docker/dockerfile:1.7\n# escape=`\nFROM x\n").expect("valid");

        assert_eq!(file.escape, '`');
        assert_eq!(file.instructions.len(), 1);
    }

    #[test]
    fn parse_when_crlf_line_ends_then_continuations_work() {
        let kinds = kinds("FROM x\r\nRUN a \\\r\n  b\r\n");

        assert_eq!(kinds[1], run(Command::Shell(s("a   b"))));
    }

    // Here-documents.

    #[test]
    fn parse_when_run_heredoc_then_body_kept_and_next_instruction_follows() {
        let file =
            parse("FROM x\nRUN <<EOF\necho one\n  echo two\nEOF\nCMD [\"sh\"]\n").expect("valid");

        let kinds: Vec<_> = file.instructions.iter().map(|i| i.kind.clone()).collect();
        assert_eq!(
            kinds[1],
            InstructionKind::Run(RunSpec {
                command: Command::Shell(s("<<EOF")),
                heredocs: vec![doc("EOF", "echo one\n  echo two\n", true, false)],
                mounts: vec![],
                network: RunNetwork::Default,
            })
        );
        assert_eq!(file.instructions[2].line, 6);
    }

    #[test]
    fn parse_when_dash_heredoc_then_leading_tabs_stripped() {
        let spec = run_spec("FROM x\nRUN <<-EOT\n\t\techo hi\n\t  keep\n\tEOT\n");

        assert_eq!(spec.heredocs, [doc("EOT", "echo hi\n  keep\n", true, true)]);
    }

    #[test]
    fn parse_when_quoted_delimiters_then_no_expansion() {
        let spec = run_spec("FROM x\nRUN cat <<\"A\" <<'B'\n$x\nA\n$y\nB\n");

        assert_eq!(
            spec.heredocs,
            [
                doc("A", "$x\n", false, false),
                doc("B", "$y\n", false, false)
            ]
        );
    }

    #[test]
    fn parse_when_heredoc_is_a_commands_stdin_then_the_command_keeps_the_marker() {
        let spec = run_spec("FROM x\nRUN python3 <<EOF > /out\nprint(1)\nEOF\n");

        assert_eq!(spec.command, Command::Shell(s("python3 <<EOF > /out")));
        assert_eq!(spec.heredocs, [doc("EOF", "print(1)\n", true, false)]);
    }

    #[test]
    fn parse_when_heredoc_has_no_delimiter_then_error() {
        let err = error("FROM x\nRUN <<EOF\necho\n");

        assert_eq!(err.line, 2);
        assert!(err.message.contains("<<EOF is not terminated"), "{err}");
    }

    #[test]
    fn parse_when_shift_inside_a_word_or_quotes_then_not_a_heredoc() {
        let spec = run_spec("FROM x\nRUN echo $((1<<2)) \"<<no\" a<<b\n");

        assert!(spec.heredocs.is_empty());
    }

    #[test]
    fn parse_when_copy_heredoc_then_inline_file() {
        let spec = copy("FROM x\nCOPY <<EOF /etc/x\nhello $NAME\nEOF\n");

        assert_eq!(spec.sources, Vec::<String>::new());
        assert_eq!(spec.heredocs, [doc("EOF", "hello $NAME\n", true, false)]);
        assert_eq!(spec.dest, "/etc/x");
    }

    #[test]
    fn parse_when_copy_two_heredocs_then_two_inline_files_in_order() {
        let spec = copy("FROM x\nCOPY --chmod=755 <<a <<'b' /dir/\none\na\ntwo\nb\n");

        assert_eq!(
            spec.heredocs,
            [
                doc("a", "one\n", true, false),
                doc("b", "two\n", false, false)
            ]
        );
        assert_eq!(spec.chmod, Some(s("755")));
    }

    // RUN flags.

    #[test]
    fn parse_when_cache_mount_then_fields_and_defaults() {
        let spec = run_spec(
            "FROM x\nRUN --mount=type=cache,target=/root/.cache/pip,id=pip,sharing=locked,mode=0700,uid=1000,gid=100 pip install x\n",
        );

        assert_eq!(
            spec.mounts,
            [RunMount::Cache(CacheMount {
                target: s("/root/.cache/pip"),
                id: Some(s("pip")),
                sharing: s("locked"),
                mode: 0o700,
                uid: 1000,
                gid: 100,
                read_only: false,
            })]
        );
        assert_eq!(spec.command, Command::Shell(s("pip install x")));
    }

    #[test]
    fn parse_when_cache_mount_has_only_a_target_then_defaults() {
        let spec = run_spec("FROM x\nRUN --mount=type=cache,dst=/c true\n");

        assert_eq!(
            spec.mounts,
            [RunMount::Cache(CacheMount {
                target: s("/c"),
                id: None,
                sharing: s("shared"),
                mode: 0o755,
                uid: 0,
                gid: 0,
                read_only: false,
            })]
        );
    }

    #[test]
    fn parse_when_secret_mount_then_default_target_under_run_secrets() {
        let spec =
            run_spec("FROM x\nRUN --mount=type=secret,id=token,required cat /run/secrets/token\n");

        assert_eq!(
            spec.mounts,
            [RunMount::Secret(SecretMount {
                id: s("token"),
                target: Some(s("/run/secrets/token")),
                env: None,
                required: true,
                mode: 0o400,
                uid: 0,
                gid: 0,
            })]
        );
    }

    #[test]
    fn parse_when_secret_mount_with_env_only_then_no_file() {
        let spec = run_spec(
            "FROM x\nRUN --mount=type=secret,id=aws,env=AWS_KEY,required=false,mode=0440 true\n",
        );

        assert_eq!(
            spec.mounts,
            [RunMount::Secret(SecretMount {
                id: s("aws"),
                target: None,
                env: Some(s("AWS_KEY")),
                required: false,
                mode: 0o440,
                uid: 0,
                gid: 0,
            })]
        );
    }

    #[test]
    fn parse_when_secret_mount_names_only_a_target_then_id_is_its_file_name() {
        let spec = run_spec("FROM x\nRUN --mount=type=secret,target=/etc/npmrc true\n");

        let RunMount::Secret(secret) = &spec.mounts[0] else {
            panic!("not a secret: {:?}", spec.mounts);
        };
        assert_eq!(
            (secret.id.as_str(), secret.target.as_deref()),
            ("npmrc", Some("/etc/npmrc"))
        );
    }

    #[test]
    fn parse_when_several_mounts_and_network_none_then_all_kept() {
        let spec = run_spec(
            "FROM x\nRUN --network=none --mount=type=tmpfs,target=/t,size=64m --mount=type=cache,target=/c make\n",
        );

        assert_eq!(spec.network, RunNetwork::None);
        assert_eq!(
            spec.mounts[0],
            RunMount::Tmpfs {
                target: s("/t"),
                size: Some(64 << 20)
            }
        );
        assert!(matches!(spec.mounts[1], RunMount::Cache(_)));
    }

    #[test]
    fn parse_when_network_host_then_refused_clearly() {
        let err = error("FROM x\nRUN --network=host curl x\n");

        assert!(
            err.message.contains("--network=host is not allowed"),
            "{err}"
        );
    }

    #[test]
    fn parse_when_bind_mount_or_default_type_then_refused_clearly() {
        let bind = error("FROM x\nRUN --mount=type=bind,source=a,target=/a true\n");
        let untyped = error("FROM x\nRUN --mount=target=/a true\n");

        assert!(
            bind.message.contains("type=bind is not supported"),
            "{bind}"
        );
        assert!(
            untyped.message.contains("type=bind is not supported"),
            "{untyped}"
        );
    }

    #[test]
    fn parse_when_mount_has_an_unknown_key_then_refused_naming_it() {
        let err = error("FROM x\nRUN --mount=type=cache,target=/c,colour=red true\n");

        assert!(err.message.contains("unexpected key 'colour'"), "{err}");
    }

    #[test]
    fn parse_when_unknown_flag_then_dockers_wording() {
        let run = error("FROM x\nRUN --foo=1 true\n");
        let copy = error("FROM x\nCOPY --checksum=sha256:00 a b\n");

        assert!(run.message.starts_with("unknown flag: foo"), "{run}");
        assert!(copy.message.starts_with("unknown flag: checksum"), "{copy}");
    }

    // ADD from URLs.

    #[test]
    fn parse_when_add_url_with_checksum_then_kept() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        let spec = copy(&format!(
            "FROM x\nADD --checksum={sum} --chmod=644 --chown=1:1 https://example.com/a.tgz /tmp/\n"
        ));

        assert_eq!(spec.sources, [s("https://example.com/a.tgz")]);
        assert_eq!(spec.checksum, Some(sum));
        assert_eq!(spec.chown, Some(s("1:1")));
    }

    #[test]
    fn parse_when_add_checksum_is_malformed_or_on_a_local_file_then_error() {
        let bad = error("FROM x\nADD --checksum=md5:abc http://h/a /a\n");
        let local = error(&format!(
            "FROM x\nADD --checksum=sha256:{} a.txt /a\n",
            "0".repeat(64)
        ));

        assert!(bad.message.contains("sha256:<64 hex digits>"), "{bad}");
        assert!(local.message.contains("http(s) URLs only"), "{local}");
    }

    #[test]
    fn parse_when_add_git_url_then_refused() {
        let err = error("FROM x\nADD git@github.com:a/b.git /src\n");

        assert!(
            err.message.contains("Git repository is not supported"),
            "{err}"
        );
    }
}
