//! From a parsed Dockerfile to a plan: each step with the build state it sees (env, args,
//! workdir, user, shell), what it does, and — for steps that change the filesystem — its
//! layer cache key. Computed on the host before any VM starts, so bad input fails fast.

use std::path::Path;

use super::cache::{hash_tree, KeyChain};
use super::source;
use super::{BuildError, BuildSpec, ImageConfig};
use crate::base::BaseImage;
use crate::context::BuildContext;
use crate::dockerfile::{
    self, Command, Healthcheck, Heredoc, InstructionKind, Port, RunMount, RunNetwork, RunSpec,
};
use crate::oci::{PulledImage, RunConfig};

/// PATH when the Dockerfile sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The build state a step sees.
#[derive(Debug, Clone)]
pub struct StepState {
    /// ENV so far, in order of first definition.
    pub env: Vec<(String, String)>,
    /// ARG values so far.
    pub args: Vec<(String, String)>,
    /// Environment variables from the API (override ENV).
    pub api_env: Vec<(String, String)>,
    /// WORKDIR.
    pub workdir: String,
    /// USER as written (`name[:group]`), empty for root.
    pub user: String,
    /// SHELL.
    pub shell: Vec<String>,
}

impl StepState {
    fn lookup(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .chain(self.args.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn set(list: &mut Vec<(String, String)>, k: &str, v: String) {
        match list.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v,
            None => list.push((k.to_string(), v)),
        }
    }

    /// The environment of the app and of HEALTHCHECK: PATH, ENV, the API's variables.
    pub fn app_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        for (k, v) in self.env.iter().chain(self.api_env.iter()) {
            Self::set(&mut env, k, v.clone());
        }
        env
    }

    /// The environment of a RUN step: as the app's, plus ARG values.
    pub fn run_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        for (k, v) in self
            .args
            .iter()
            .chain(self.env.iter())
            .chain(self.api_env.iter())
        {
            Self::set(&mut env, k, v.clone());
        }
        env
    }

    fn key_material(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{}|{}|{:?}",
            self.env, self.args, self.api_env, self.workdir, self.user, self.shell
        )
    }
}

/// A command as the Dockerfile wrote it.
#[derive(Debug, Clone)]
pub enum AppCommand {
    /// Exec form.
    Exec(Vec<String>),
    /// Shell form, run through SHELL.
    Shell(String),
}

/// What a step does in the build VM.
#[derive(Debug, Clone)]
pub enum StepAction {
    /// Nothing on disk (ENV, ARG, USER, EXPOSE, CMD, ...).
    Metadata,
    /// `mkdir -p` (WORKDIR).
    Mkdir(String),
    /// Run a command.
    Run {
        /// The argv.
        argv: Vec<String>,
        /// A here-document script to write first (to [`SCRIPT_PATH`]), read by `argv`.
        script: Option<String>,
        /// Mounts for this step only.
        mounts: Vec<StepMount>,
        /// `--network=none`: the step runs without network.
        no_network: bool,
    },
    /// COPY or ADD from the build context.
    Copy {
        /// Source paths relative to the context root.
        sources: Vec<String>,
        /// Absolute destination in the guest.
        dest: String,
        /// `--chown` spec.
        chown: Option<String>,
        /// `--chmod` mode.
        chmod: Option<u32>,
        /// ADD: unpack local archives.
        unpack: bool,
        /// Inline files (COPY here-documents): name and content.
        inline: Vec<(String, Vec<u8>)>,
        /// ADD: `http(s)://` URLs to download inside the build VM.
        urls: Vec<String>,
        /// ADD `--checksum`: the expected SHA-256 of every download (hex).
        sha256: Option<String>,
    },
}

/// Where, in the build VM, a RUN here-document script with a `#!` line is written
/// (tmpfs, never in a layer); its interpreter reads it from there.
pub const SCRIPT_PATH: &str = "/dev/kiln/run-script";

/// A mount for one RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepMount {
    /// A cache directory kept between builds.
    Cache {
        /// Absolute target in the guest.
        target: String,
        /// The cache's id (the target when not given).
        id: String,
        /// Root directory mode when the cache is created.
        mode: u32,
        /// Root directory owner when the cache is created.
        uid: u32,
        /// Root directory group when the cache is created.
        gid: u32,
        /// Mounted read-only.
        read_only: bool,
    },
    /// A build secret.
    Secret {
        /// The secret's id.
        id: String,
        /// Absolute target of the file, if any.
        target: Option<String>,
        /// Environment variable to hold it, if any.
        env: Option<String>,
        /// Fail when the build was given no such secret.
        required: bool,
        /// File mode.
        mode: u32,
        /// File owner.
        uid: u32,
        /// File group.
        gid: u32,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Absolute target.
        target: String,
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

impl StepMount {
    /// Where it appears in the guest, if as a path.
    pub fn target(&self) -> Option<&str> {
        match self {
            StepMount::Cache { target, .. } | StepMount::Tmpfs { target, .. } => Some(target),
            StepMount::Secret { target, .. } => target.as_deref(),
        }
    }
}

/// The argv (and script, if any) of a RUN: BuildKit's rules for here-documents. A line that
/// is only `<<EOF` runs the document as the shell's script (or, when it starts with `#!`,
/// with that interpreter); any other line goes to the shell with the documents after it,
/// so the shell feeds them to the commands as stdin.
fn run_argv(spec: &RunSpec, shell: &[String], escape: char) -> (Vec<String>, Option<String>) {
    let line = match &spec.command {
        Command::Exec(argv) => return (argv.clone(), None),
        Command::Shell(line) => line,
    };
    if spec.heredocs.is_empty() {
        return (shell.iter().cloned().chain([line.clone()]).collect(), None);
    }
    let only_marker = crate::dockerfile::is_only_heredoc(line, escape);
    if let ([doc], true) = (spec.heredocs.as_slice(), only_marker) {
        if let Some(interpreter) = doc.content.strip_prefix("#!") {
            let first = interpreter.lines().next().unwrap_or_default().trim();
            let (program, arg) = first
                .split_once(char::is_whitespace)
                .map_or((first, ""), |(p, a)| (p, a.trim()));
            let mut argv = vec![program.to_string()];
            if !arg.is_empty() {
                argv.push(arg.to_string());
            }
            argv.push(SCRIPT_PATH.to_string());
            return (argv, Some(doc.content.clone()));
        }
        return (
            shell.iter().cloned().chain([doc.content.clone()]).collect(),
            None,
        );
    }
    let mut script = line.clone();
    script.push('\n');
    for doc in &spec.heredocs {
        script.push_str(&heredoc_as_written(doc));
    }
    (shell.iter().cloned().chain([script]).collect(), None)
}

/// A here-document's body and delimiter line, as the shell reads them.
fn heredoc_as_written(doc: &Heredoc) -> String {
    format!("{}{}\n", doc.content, doc.name)
}

/// One step of the plan.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// 0-based position among all steps (FROM included).
    pub index: usize,
    /// Dockerfile line.
    pub line: usize,
    /// The instruction as written.
    pub text: String,
    /// Layer cache key, for steps that change the filesystem.
    pub key: Option<String>,
    /// What it does.
    pub action: StepAction,
    /// The state it runs in.
    pub state: StepState,
}

/// The whole build, planned.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The base image (FROM).
    pub base: BaseImage,
    /// The registry image the base was made from, when FROM named one.
    pub pulled: Option<PulledImage>,
    /// Every instruction.
    pub steps: Vec<PlannedStep>,
    /// The HEALTHCHECK command, if any.
    pub healthcheck: Option<Vec<String>>,
    /// State after the last step.
    pub last: StepState,
    entrypoint: Option<AppCommand>,
    cmd: Option<AppCommand>,
    exposed: Vec<u16>,
    labels: Vec<(String, String)>,
    stop_signal: String,
}

fn err(line: usize, message: impl Into<String>) -> BuildError {
    BuildError::Dockerfile {
        line,
        message: message.into(),
    }
}

/// Whether an ADD source is a local archive to unpack.
pub fn is_archive(src: &str) -> bool {
    let s = src.to_ascii_lowercase();
    [
        ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz",
    ]
    .iter()
    .any(|ext| s.ends_with(ext))
}

fn join(dir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else if dir.ends_with('/') {
        format!("{dir}{path}")
    } else {
        format!("{dir}/{path}")
    }
}

/// A COPY/ADD source as the clean, link-free path inside the context it names (`""` for the
/// root) and the path whose content decides the step's cache key; a glob keeps its pattern
/// after its longest glob-free directory prefix, which is what is hashed.
fn context_source(root: &Path, src: &str) -> Result<(String, String), String> {
    let clean = source::clean(src);
    let parts: Vec<&str> = clean.split('/').collect();
    let literal = parts
        .iter()
        .position(|p| p.contains(['*', '?', '[']))
        .unwrap_or(parts.len());
    let dir = source::resolve(root, &parts[..literal].join("/"))
        .map_err(|e| e.for_source(src).to_string())?;
    let pattern = parts[literal..].join("/");
    let rel = match (dir.is_empty(), pattern.is_empty()) {
        (_, true) => dir.clone(),
        (true, false) => pattern,
        (false, false) => format!("{dir}/{pattern}"),
    };
    Ok((rel, dir))
}

/// A RUN `--mount` with its words expanded and its target made absolute.
fn step_mount(
    mount: &RunMount,
    state: &StepState,
    x: &dyn Fn(&str, &StepState) -> Result<String, BuildError>,
) -> Result<StepMount, BuildError> {
    let target =
        |t: &str| -> Result<String, BuildError> { Ok(join(&state.workdir, &x(t, state)?)) };
    Ok(match mount {
        RunMount::Cache(c) => StepMount::Cache {
            target: target(&c.target)?,
            id: match &c.id {
                Some(id) => x(id, state)?,
                None => x(&c.target, state)?,
            },
            mode: c.mode,
            uid: c.uid,
            gid: c.gid,
            read_only: c.read_only,
        },
        RunMount::Secret(s) => StepMount::Secret {
            id: x(&s.id, state)?,
            target: s.target.as_deref().map(target).transpose()?,
            env: s.env.clone(),
            required: s.required,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
        },
        RunMount::Tmpfs { target: t, size } => StepMount::Tmpfs {
            target: target(t)?,
            size: *size,
        },
    })
}

fn to_app(c: &Command) -> AppCommand {
    match c {
        Command::Exec(v) => AppCommand::Exec(v.clone()),
        Command::Shell(s) => AppCommand::Shell(s.clone()),
    }
}

/// The base a build starts from: the disk, and the registry image it came from, if any.
#[derive(Debug, Clone)]
pub struct ResolvedBase {
    /// The base disk.
    pub image: BaseImage,
    /// The registry image, when FROM named one.
    pub pulled: Option<PulledImage>,
}

/// The image FROM names, with ARGs declared before it expanded (their defaults).
pub fn from_word(context: &BuildContext) -> Result<(usize, String), BuildError> {
    let file = dockerfile::parse(&context.dockerfile).map_err(|e| err(e.line, e.message))?;
    let escape = file.escape;
    let mut args: Vec<(String, String)> = Vec::new();
    for ins in &file.instructions {
        match &ins.kind {
            InstructionKind::Arg(decls) => {
                for d in decls {
                    let v = match &d.default {
                        Some(v) => dockerfile::expand(v, &|n| lookup_in(&args, n), escape)
                            .map_err(|e| err(ins.line, e.message))?,
                        None => String::new(),
                    };
                    StepState::set(&mut args, &d.name, v);
                }
            }
            InstructionKind::From { image, .. } => {
                let word = dockerfile::expand(image, &|n| lookup_in(&args, n), escape)
                    .map_err(|e| err(ins.line, e.message))?;
                if word.is_empty() {
                    return Err(err(ins.line, format!("FROM {image} expands to nothing")));
                }
                return Ok((ins.line, word));
            }
            _ => break,
        }
    }
    Err(err(
        1,
        "the Dockerfile has no FROM: start it with FROM kiln/busybox, FROM kiln/debian:12 or a registry image",
    ))
}

fn lookup_in(list: &[(String, String)], name: &str) -> Option<String> {
    list.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

impl Plan {
    /// Parses the Dockerfile and plans every step on `base` (resolved by [`from_word`]); a
    /// registry image's config seeds the state and its ONBUILD triggers run first.
    pub fn make(
        context: &BuildContext,
        api_env: &[(String, String)],
        resolved: ResolvedBase,
    ) -> Result<Plan, BuildError> {
        let file = dockerfile::parse(&context.dockerfile).map_err(|e| err(e.line, e.message))?;
        let escape = file.escape;
        let mut instructions = file
            .instructions
            .into_iter()
            .skip_while(|i| matches!(i.kind, InstructionKind::Arg(_)));
        let from = instructions.next().ok_or_else(|| {
            err(
                1,
                "the Dockerfile is empty: start it with FROM kiln/busybox or FROM kiln/debian:12",
            )
        })?;
        if !matches!(from.kind, InstructionKind::From { .. }) {
            return Err(err(from.line, "the first instruction must be FROM"));
        }
        let base = resolved.image;
        // Like a Docker base image's config, the state starts with PATH set, so that
        // `ENV PATH=/opt/bin:$PATH` extends it.
        let mut state = StepState {
            env: vec![("PATH".to_string(), DEFAULT_PATH.to_string())],
            args: Vec::new(),
            api_env: api_env.to_vec(),
            workdir: "/".into(),
            user: String::new(),
            shell: vec!["/bin/sh".into(), "-c".into()],
        };
        let mut keys = KeyChain::new(&format!(
            "{} {} {}",
            base.name,
            base.version,
            base.disk.display()
        ));
        let mut plan = Plan {
            steps: vec![PlannedStep {
                index: 0,
                line: from.line,
                text: from.text.clone(),
                key: None,
                action: StepAction::Metadata,
                state: state.clone(),
            }],
            base,
            pulled: None,
            healthcheck: None,
            last: state.clone(),
            entrypoint: None,
            cmd: None,
            exposed: Vec::new(),
            labels: Vec::new(),
            stop_signal: "SIGTERM".into(),
        };
        let mut cmd_from_base = false;
        let mut triggers = Vec::new();
        if let Some(pulled) = resolved.pulled {
            cmd_from_base = plan.seed(&mut state, &pulled.config);
            for t in pulled.config.on_build.iter().flatten() {
                triggers.push(
                    dockerfile::parse_trigger(t, from.line).map_err(|e| err(e.line, e.message))?,
                );
            }
            plan.steps[0].state = state.clone();
            plan.pulled = Some(pulled);
        }
        let instructions = triggers.into_iter().chain(instructions);
        for (i, ins) in instructions.enumerate() {
            let line = ins.line;
            let x = |s: &str, st: &StepState| {
                dockerfile::expand(s, &|n| st.lookup(n), escape).map_err(|e| err(line, e.message))
            };
            let action = match &ins.kind {
                InstructionKind::From { .. } => {
                    return Err(err(
                        line,
                        "a second FROM: multi-stage builds are not supported yet",
                    ))
                }
                InstructionKind::Run(spec) => {
                    let (argv, script) = run_argv(spec, &state.shell, escape);
                    for doc in &spec.heredocs {
                        keys.feed(heredoc_as_written(doc).as_bytes());
                    }
                    let mut mounts = Vec::new();
                    for mount in &spec.mounts {
                        mounts.push(step_mount(mount, &state, &x)?);
                    }
                    StepAction::Run {
                        argv,
                        script,
                        mounts,
                        no_network: spec.network == RunNetwork::None,
                    }
                }
                InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
                    let unpack = matches!(ins.kind, InstructionKind::Add(_));
                    let mut sources = Vec::new();
                    let mut urls = Vec::new();
                    let mut inline = Vec::new();
                    for doc in &spec.heredocs {
                        let content = match doc.expand {
                            true => {
                                dockerfile::expand_vars(&doc.content, &|n| state.lookup(n), escape)
                                    .map_err(|e| err(line, e.message))?
                            }
                            false => doc.content.clone(),
                        };
                        keys.feed(doc.name.as_bytes());
                        keys.feed(content.as_bytes());
                        inline.push((doc.name.clone(), content.into_bytes()));
                    }
                    for s in &spec.sources {
                        let s = x(s, &state)?;
                        if unpack && dockerfile::is_http(&s) {
                            // The content is not known before the download: the URL (and
                            // the checksum, in the instruction's text) make the key, as
                            // Docker's cache does without a checksum.
                            keys.feed(s.as_bytes());
                            urls.push(s);
                            continue;
                        }
                        // Only ever a link-free path inside the context (see `source`).
                        let (rel, hashed) =
                            context_source(&context.dir, &s).map_err(|e| err(line, e))?;
                        let digest = hash_tree(&context.dir.join(hashed)).map_err(|e| {
                            err(line, format!("reading {s} in the build context: {e}"))
                        })?;
                        keys.feed(digest.as_bytes());
                        sources.push(if rel.is_empty() { ".".into() } else { rel });
                    }
                    let dest = join(&state.workdir, &x(&spec.dest, &state)?);
                    let chmod =
                        match &spec.chmod {
                            Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
                                err(line, format!("--chmod={m} is not an octal mode"))
                            })?),
                            None => None,
                        };
                    let chown = spec.chown.as_ref().map(|c| x(c, &state)).transpose()?;
                    let sha256 = spec
                        .checksum
                        .as_ref()
                        .map(|c| x(c, &state))
                        .transpose()?
                        .map(|c| {
                            c.strip_prefix("sha256:")
                                .filter(|h| {
                                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
                                })
                                .map(str::to_ascii_lowercase)
                                .ok_or_else(|| {
                                    err(
                                        line,
                                        format!("ADD --checksum={c}: give sha256:<64 hex digits>"),
                                    )
                                })
                        })
                        .transpose()?;
                    StepAction::Copy {
                        sources,
                        dest,
                        chown,
                        chmod,
                        unpack,
                        inline,
                        urls,
                        sha256,
                    }
                }
                InstructionKind::Env(pairs) => {
                    for (k, v) in pairs {
                        let v = x(v, &state)?;
                        StepState::set(&mut state.env, k, v);
                    }
                    StepAction::Metadata
                }
                InstructionKind::Arg(decls) => {
                    for d in decls {
                        let v = match &d.default {
                            Some(v) => x(v, &state)?,
                            None => String::new(),
                        };
                        StepState::set(&mut state.args, &d.name, v);
                    }
                    StepAction::Metadata
                }
                InstructionKind::Workdir(dir) => {
                    state.workdir = join(&state.workdir, &x(dir, &state)?);
                    StepAction::Mkdir(state.workdir.clone())
                }
                InstructionKind::User { user, group } => {
                    let user = x(user, &state)?;
                    state.user = match group {
                        Some(g) => format!("{user}:{}", x(g, &state)?),
                        None => user,
                    };
                    StepAction::Metadata
                }
                InstructionKind::Expose(ports) => {
                    for p in ports {
                        let p = Port::parse(&x(p, &state)?).map_err(|e| err(line, e))?;
                        if !p.udp && !plan.exposed.contains(&p.number) {
                            plan.exposed.push(p.number);
                        }
                    }
                    StepAction::Metadata
                }
                InstructionKind::Cmd(c) => {
                    plan.cmd = Some(to_app(c));
                    cmd_from_base = false;
                    StepAction::Metadata
                }
                InstructionKind::Entrypoint(c) => {
                    plan.entrypoint = Some(to_app(c));
                    if cmd_from_base {
                        plan.cmd = None;
                        cmd_from_base = false;
                    }
                    // Docker: a new ENTRYPOINT resets an inherited CMD; within one file, CMD after it stays.
                    StepAction::Metadata
                }
                InstructionKind::Label(pairs) => {
                    for (k, v) in pairs {
                        let v = x(v, &state)?;
                        StepState::set(&mut plan.labels, k, v);
                    }
                    StepAction::Metadata
                }
                InstructionKind::Healthcheck(h) => {
                    plan.healthcheck = match h {
                        Healthcheck::None => None,
                        Healthcheck::Check { test, .. } => Some(match test {
                            Command::Exec(v) => v.clone(),
                            Command::Shell(s) => {
                                state.shell.iter().cloned().chain([s.clone()]).collect()
                            }
                        }),
                    };
                    StepAction::Metadata
                }
                InstructionKind::Shell(sh) => {
                    state.shell = sh.clone();
                    StepAction::Metadata
                }
                InstructionKind::StopSignal(sig) => {
                    plan.stop_signal = x(sig, &state)?;
                    StepAction::Metadata
                }
                InstructionKind::Volume(_) | InstructionKind::Maintainer(_) => StepAction::Metadata,
            };
            keys.feed(ins.text.as_bytes());
            keys.feed(state.key_material().as_bytes());
            let key = (!matches!(action, StepAction::Metadata)).then(|| keys.key());
            plan.steps.push(PlannedStep {
                index: i + 1,
                line,
                text: ins.text.clone(),
                key,
                action,
                state: state.clone(),
            });
        }
        plan.last = state;
        Ok(plan)
    }

    /// Seeds the state from a registry image's config (Env, WorkingDir, User, Entrypoint,
    /// Cmd, ExposedPorts, Healthcheck, StopSignal, Labels); returns whether a Cmd came from it
    /// (a Dockerfile ENTRYPOINT then resets it, as Docker does).
    fn seed(&mut self, state: &mut StepState, c: &RunConfig) -> bool {
        for kv in c.env.iter().flatten() {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            if !k.is_empty() {
                StepState::set(&mut state.env, k, v.to_string());
            }
        }
        if let Some(w) = c.working_dir.as_deref().filter(|w| !w.is_empty()) {
            state.workdir = join("/", w);
        }
        if let Some(u) = &c.user {
            state.user = u.clone();
        }
        self.entrypoint = c
            .entrypoint
            .clone()
            .filter(|e| !e.is_empty())
            .map(AppCommand::Exec);
        self.cmd = c
            .cmd
            .clone()
            .filter(|e| !e.is_empty())
            .map(AppCommand::Exec);
        for key in c.exposed_ports.iter().flat_map(|m| m.keys()) {
            if let Ok(p) = Port::parse(key) {
                if !p.udp && !self.exposed.contains(&p.number) {
                    self.exposed.push(p.number);
                }
            }
        }
        self.healthcheck = c
            .healthcheck
            .as_ref()
            .and_then(|h| h.test.as_deref())
            .and_then(|t| match t {
                [kind, rest @ ..] if kind == "CMD" && !rest.is_empty() => Some(rest.to_vec()),
                [kind, line] if kind == "CMD-SHELL" => {
                    Some(state.shell.iter().cloned().chain([line.clone()]).collect())
                }
                _ => None,
            });
        if let Some(sig) = c.stop_signal.as_deref().filter(|s| !s.is_empty()) {
            self.stop_signal = sig.to_string();
        }
        for (k, v) in c.labels.iter().flatten() {
            StepState::set(&mut self.labels, k, v.clone());
        }
        self.cmd.is_some()
    }

    /// How the app runs, from ENTRYPOINT/CMD and the final state (uid/gid resolved later).
    pub fn image_config(&self, spec: &BuildSpec) -> Result<ImageConfig, BuildError> {
        let shell = &self.last.shell;
        let argv = match (&self.entrypoint, &self.cmd) {
            (Some(AppCommand::Shell(s)), _) => AppCommand::Shell(s.clone()).argv(shell),
            (Some(AppCommand::Exec(e)), Some(c)) => {
                e.iter().cloned().chain(c.argv(shell)).collect()
            }
            (Some(e), None) => e.argv(shell),
            (None, Some(c)) => c.argv(shell),
            (None, None) => {
                return Err(err(
                    self.steps.last().map(|s| s.line).unwrap_or(1),
                    "no CMD or ENTRYPOINT: kiln needs a command that starts the app",
                ))
            }
        };
        let app_port = if self.exposed.is_empty() || self.exposed.contains(&8080) {
            8080
        } else {
            self.exposed[0]
        };
        Ok(ImageConfig {
            app_argv: argv,
            env: self.last.app_env(),
            workdir: self.last.workdir.clone(),
            uid: 0,
            gid: 0,
            exposed_ports: self.exposed.clone(),
            app_port,
            hooks_port: spec.hooks.port,
            stop_signal: self.stop_signal.clone(),
            labels: self.labels.clone(),
            readiness: String::new(),
            base: format!("{} {}", self.base.name, self.base.version),
            base_digest: self.pulled.as_ref().map(|p| p.digest.clone()),
            base_index_digest: self.pulled.as_ref().and_then(|p| p.index_digest.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> StepState {
        StepState {
            env: vec![
                ("PATH".into(), DEFAULT_PATH.into()),
                ("A".into(), "1".into()),
            ],
            args: vec![("V".into(), "7".into())],
            api_env: vec![("A".into(), "api".into())],
            workdir: "/app".into(),
            user: String::new(),
            shell: vec!["/bin/sh".into(), "-c".into()],
        }
    }

    #[test]
    fn lookup_when_path_is_extended_then_the_default_is_kept() {
        let st = state();

        let path =
            crate::dockerfile::expand("/opt/bin:$PATH", &|n| st.lookup(n), '\\').expect("expand");

        assert_eq!(path, format!("/opt/bin:{DEFAULT_PATH}"));
    }

    #[test]
    fn run_env_when_api_sets_a_name_then_api_wins_and_args_are_visible() {
        let env = state().run_env();

        assert!(env.contains(&("A".into(), "api".into())));
        assert!(env.contains(&("V".into(), "7".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }

    #[test]
    fn join_when_relative_then_under_workdir() {
        assert_eq!(join("/app", "www/"), "/app/www/");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/app", "/etc"), "/etc");
    }

    #[test]
    fn context_source_when_it_climbs_out_or_is_absolute_then_it_names_the_context_file() {
        let ctx = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(ctx.path().join("src")).expect("mkdir");
        std::fs::write(ctx.path().join("x"), "x").expect("write");
        std::os::unix::fs::symlink("/", ctx.path().join("src/root")).expect("link");

        assert_eq!(
            context_source(ctx.path(), "../x"),
            Ok(("x".into(), "x".into()))
        );
        // Cleaned lexically first, as BuildKit does: `root/..` goes before any lookup.
        assert_eq!(
            context_source(ctx.path(), "/src/root/../*.py"),
            Ok(("src/*.py".into(), "src".into()))
        );
        assert_eq!(
            context_source(ctx.path(), "../*"),
            Ok(("*".into(), String::new()))
        );
        assert_eq!(
            context_source(ctx.path(), "src/root/src/*.py"),
            Ok(("src/*.py".into(), "src".into()))
        );
    }

    #[test]
    fn context_source_when_a_host_path_is_named_then_refused_naming_the_context_path() {
        let ctx = tempfile::tempdir().expect("tempdir");

        let err = context_source(ctx.path(), "../../../../dev/zero").expect_err("outside");

        assert!(
            err.starts_with("COPY source ../../../../dev/zero is not in the build context"),
            "{err}"
        );
    }

    #[test]
    fn is_archive_when_tarball_then_true_else_false() {
        assert!(is_archive("a.tar.gz") && is_archive("b.TGZ") && !is_archive("c.zip"));
    }

    fn heredoc_run(line: &str, docs: &[(&str, &str)]) -> RunSpec {
        RunSpec {
            heredocs: docs
                .iter()
                .map(|(name, content)| Heredoc {
                    name: name.to_string(),
                    content: content.to_string(),
                    expand: true,
                    strip_tabs: false,
                })
                .collect(),
            ..RunSpec::plain(Command::Shell(line.to_string()))
        }
    }

    fn sh() -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into()]
    }

    #[test]
    fn run_argv_when_only_a_heredoc_then_its_body_is_the_script() {
        let spec = heredoc_run("<<EOF", &[("EOF", "echo a\necho b\n")]);

        let (argv, script) = run_argv(&spec, &sh(), '\\');

        assert_eq!(argv, ["/bin/sh", "-c", "echo a\necho b\n"]);
        assert_eq!(script, None);
    }

    #[test]
    fn run_argv_when_body_has_a_shebang_then_its_interpreter_reads_the_script_file() {
        let spec = heredoc_run("<<-EOF", &[("EOF", "#!/usr/bin/env python3\nprint(1)\n")]);

        let (argv, script) = run_argv(&spec, &sh(), '\\');

        assert_eq!(argv, ["/usr/bin/env", "python3", SCRIPT_PATH]);
        assert_eq!(
            script.as_deref(),
            Some("#!/usr/bin/env python3\nprint(1)\n")
        );
    }

    #[test]
    fn run_argv_when_heredocs_feed_commands_then_the_shell_gets_line_and_bodies() {
        let spec = heredoc_run(
            "python3 <<A && cat <<'B'",
            &[("A", "print(1)\n"), ("B", "$x\n")],
        );

        let (argv, _) = run_argv(&spec, &sh(), '\\');

        assert_eq!(
            argv,
            [
                "/bin/sh",
                "-c",
                "python3 <<A && cat <<'B'\nprint(1)\nA\n$x\nB\n"
            ]
        );
    }

    fn pulled(config: serde_json::Value) -> ResolvedBase {
        ResolvedBase {
            image: BaseImage {
                name: "127.0.0.1:5000/py:1".into(),
                version: format!("sha256:{}", "a".repeat(64)),
                disk: "/nonexistent/disk.ext4".into(),
                size_bytes: 1 << 30,
            },
            pulled: Some(PulledImage {
                from: "py".into(),
                reference: "127.0.0.1:5000/py:1".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                index_digest: None,
                config: serde_json::from_value(config).expect("config"),
                layers: Vec::new(),
                diff_ids: Vec::new(),
                source: "test".into(),
                previous_digest: None,
            }),
        }
    }

    fn context(dockerfile: &str) -> (tempfile::TempDir, BuildContext) {
        let dir = tempfile::tempdir().expect("ctx");
        std::fs::write(dir.path().join("app.py"), "print(1)").expect("write");
        let ctx = BuildContext {
            dir: dir.path().to_path_buf(),
            dockerfile: dockerfile.into(),
            files: 1,
            bytes: 8,
        };
        (dir, ctx)
    }

    fn spec_for(ctx: &BuildContext) -> BuildSpec {
        BuildSpec {
            context: ctx.clone(),
            env: Vec::new(),
            hooks: Default::default(),
            memory_mib: 512,
            build_memory_mib: 512,
            cache_dir: "/x".into(),
            work_dir: "/x".into(),
            output_dir: "/x".into(),
            extra_ca: None,
            ready_timeout: std::time::Duration::from_secs(1),
            step_timeout: std::time::Duration::from_secs(1),
            egress: None,
            owner: "t".into(),
            image: "t".into(),
            mount_cache_dir: "/x".into(),
            secrets: Default::default(),
            registry: Default::default(),
        }
    }

    #[test]
    fn make_when_registry_base_then_its_config_seeds_state_and_onbuild_runs_first() {
        let (_d, ctx) = context("ARG TAG=1\nFROM py:${TAG}\nENV B=2\n");
        let base = pulled(serde_json::json!({
            "Env": ["PATH=/opt/py/bin:/usr/bin", "A=1"],
            "WorkingDir": "/srv",
            "User": "app",
            "Cmd": ["python3", "app.py"],
            "ExposedPorts": {"9090/tcp": {}},
            "Healthcheck": {"Test": ["CMD-SHELL", "true"]},
            "StopSignal": "SIGINT",
            "OnBuild": ["COPY app.py /srv/"]
        }));

        let plan = Plan::make(&ctx, &[], base).expect("plan");
        let config = plan.image_config(&spec_for(&ctx)).expect("config");

        assert_eq!(plan.steps[1].text, "ONBUILD COPY app.py /srv/");
        assert!(plan.steps[1].key.is_some());
        assert_eq!(config.app_argv, ["python3", "app.py"]);
        assert_eq!(config.workdir, "/srv");
        assert_eq!(plan.last.user, "app");
        assert_eq!(config.app_port, 9090);
        assert_eq!(config.stop_signal, "SIGINT");
        assert_eq!(
            plan.healthcheck,
            Some(vec!["/bin/sh".into(), "-c".into(), "true".into()])
        );
        assert!(config
            .env
            .contains(&("PATH".into(), "/opt/py/bin:/usr/bin".into())));
        assert!(
            config.env.contains(&("A".into(), "1".into()))
                && config.env.contains(&("B".into(), "2".into()))
        );
        assert_eq!(
            config.base_digest,
            Some(format!("sha256:{}", "a".repeat(64)))
        );
    }

    #[test]
    fn make_when_dockerfile_sets_entrypoint_then_the_base_cmd_is_reset() {
        let (_d, ctx) = context("FROM py\nENTRYPOINT [\"/serve\"]\n");
        let base = pulled(serde_json::json!({"Cmd": ["python3"], "Entrypoint": ["/old"]}));

        let plan = Plan::make(&ctx, &[], base).expect("plan");
        let config = plan.image_config(&spec_for(&ctx)).expect("config");

        assert_eq!(config.app_argv, ["/serve"]);
    }

    #[test]
    fn from_word_when_args_before_from_then_expanded() {
        let (_d, ctx) = context("ARG REG=127.0.0.1:5000\nARG IMG=$REG/py\nFROM ${IMG}:1 AS app\n");

        let (line, word) = from_word(&ctx).expect("from");

        assert_eq!((line, word.as_str()), (3, "127.0.0.1:5000/py:1"));
    }
}
