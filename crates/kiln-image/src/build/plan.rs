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
    self, Command, CopySpec, Healthcheck, Heredoc, Instruction, InstructionKind, Port, RunMount,
    RunNetwork, RunSpec,
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
    /// COPY or ADD from the build context, or `COPY --from` another stage or an image.
    Copy {
        /// `--from`: the sources are in that stage's or image's filesystem.
        from: Option<CopyFrom>,
        /// Source paths: relative to the context root; with `from`, as written (expanded),
        /// resolved inside that filesystem in the build VM.
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

/// The whole build, planned: the stages the image needs, in Dockerfile order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The stages before the image's that it needs (through FROM or `COPY --from`).
    pub stages: Vec<Stage>,
    /// The last stage: the image.
    pub image: Stage,
    /// The images FROM lines and `COPY --from` name, by the reference as expanded.
    pub images: Vec<(String, ResolvedBase)>,
}

/// One stage, planned.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Its position among the Dockerfile's stages (what `COPY --from=N` names).
    pub index: usize,
    /// Its `AS` name (lowercase), if any.
    pub name: Option<String>,
    /// What its FROM names.
    pub from: StageBase,
    /// The base image its filesystem descends from (through earlier stages, if so).
    pub base: BaseImage,
    /// The registry image that base was made from, when it was one.
    pub pulled: Option<PulledImage>,
    /// Every instruction, FROM first.
    pub steps: Vec<PlannedStep>,
    /// The HEALTHCHECK command, if any.
    pub healthcheck: Option<Vec<String>>,
    /// State after the last step.
    pub last: StepState,
    /// What its final filesystem is, for the cache keys of steps that copy from it: the
    /// key of its last filesystem step, else what it started from.
    pub layer_id: String,
    entrypoint: Option<AppCommand>,
    cmd: Option<AppCommand>,
    exposed: Vec<u16>,
    labels: Vec<(String, String)>,
    stop_signal: String,
}

impl Stage {
    /// How build logs and errors call it: its name, or its position.
    pub fn label(&self) -> String {
        stage_label(self.index, self.name.as_deref())
    }
}

fn stage_label(index: usize, name: Option<&str>) -> String {
    name.map_or_else(|| index.to_string(), str::to_string)
}

impl Plan {
    /// Every stage to build, in order; the image last.
    pub fn all(&self) -> impl Iterator<Item = &Stage> {
        self.stages.iter().chain([&self.image])
    }

    /// The planned stage at `index` (a stage the image needs).
    pub fn stage(&self, index: usize) -> Option<&Stage> {
        self.all().find(|s| s.index == index)
    }

    /// Steps of every stage to build, FROMs included.
    pub fn total_steps(&self) -> usize {
        self.all().map(|s| s.steps.len()).sum()
    }

    /// The base disk of an image FROM or `COPY --from` named.
    pub fn image_base(&self, reference: &str) -> Option<&BaseImage> {
        self.images
            .iter()
            .find(|(r, _)| r == reference)
            .map(|(_, b)| &b.image)
    }

    /// How build logs and errors call a `COPY --from` source.
    pub fn describe(&self, from: &CopyFrom) -> String {
        match from {
            CopyFrom::Stage(i) => format!(
                "stage {}",
                self.stage(*i).map_or_else(|| i.to_string(), Stage::label)
            ),
            CopyFrom::Image(reference) => format!("image {reference}"),
        }
    }
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
    let (literal, pattern) = source::split_glob(src);
    let dir = source::resolve(root, &literal).map_err(|e| e.for_source(src).to_string())?;
    Ok((source::join_pattern(&dir, &pattern), dir))
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

/// What a stage's FROM names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageBase {
    /// An image (the expanded reference): a kiln base or a registry image.
    Image(String),
    /// An earlier stage's result (its position).
    Stage(usize),
}

/// Where a `COPY --from` reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CopyFrom {
    /// An earlier stage's filesystem (its position).
    Stage(usize),
    /// An image's filesystem (the expanded reference), pulled like a FROM base.
    Image(String),
}

/// The platform kiln builds for and runs: what `$BUILDPLATFORM` and `$TARGETPLATFORM` are.
pub const PLATFORM: &str = "linux/amd64";

/// The ARGs Docker defines in the global scope: usable in FROM lines, and in a stage once
/// declared there (`ARG TARGETARCH`).
fn platform_args() -> Vec<(String, String)> {
    [
        ("BUILDPLATFORM", PLATFORM),
        ("BUILDOS", "linux"),
        ("BUILDARCH", "amd64"),
        ("BUILDVARIANT", ""),
        ("TARGETPLATFORM", PLATFORM),
        ("TARGETOS", "linux"),
        ("TARGETARCH", "amd64"),
        ("TARGETVARIANT", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Refuses a `FROM --platform` other than linux/amd64 (`amd64`, `x86_64`, a `vN` variant
/// are the same platform).
fn check_platform(platform: &str) -> Result<(), String> {
    let lower = platform.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('/').collect();
    let (os, arch, variant) = match parts.as_slice() {
        [arch] => ("linux", *arch, None),
        [os, arch] => (*os, *arch, None),
        [os, arch, variant] => (*os, *arch, Some(*variant)),
        _ => ("", "", None),
    };
    let amd64 = os == "linux"
        && matches!(arch, "amd64" | "x86_64" | "x86-64")
        && variant.is_none_or(|v| matches!(v, "v1" | "v2" | "v3" | "v4"));
    match amd64 {
        true => Ok(()),
        false => Err(format!(
            "FROM --platform={platform}: kiln builds and runs {PLATFORM} only; use \
             --platform={PLATFORM} (or $BUILDPLATFORM), or no --platform"
        )),
    }
}

/// One stage as the Dockerfile writes it.
#[derive(Debug, Clone)]
struct StageOutline {
    /// Its `AS` name (lowercase).
    name: Option<String>,
    /// Its FROM instruction.
    from: Instruction,
    /// What FROM names.
    base: StageBase,
    /// The instructions after FROM.
    instructions: Vec<Instruction>,
    /// Every `COPY --from` in it: line and source.
    copies: Vec<(usize, CopyFrom)>,
    /// Whether the image needs it.
    needed: bool,
}

impl StageOutline {
    fn label(&self, index: usize) -> String {
        stage_label(index, self.name.as_deref())
    }
}

/// The Dockerfile cut into stages: what each starts from and copies from, and which of them
/// the image needs (the last stage, and what it uses through FROM or `COPY --from`, as far
/// as that goes; BuildKit skips the rest too). Read from the text alone, before anything is
/// pulled, so a wrong reference fails at once.
#[derive(Debug, Clone)]
pub struct StageGraph {
    escape: char,
    /// The platform's ARGs and those declared before the first FROM, with their values.
    global_args: Vec<(String, String)>,
    stages: Vec<StageOutline>,
}

impl StageGraph {
    /// Parses the Dockerfile into its stages; refuses a stage that refers to itself or to a
    /// later stage, a repeated stage name, a stage index that names no earlier stage, and a
    /// `--platform` kiln does not run.
    pub fn parse(dockerfile: &str) -> Result<StageGraph, BuildError> {
        let file = dockerfile::parse(dockerfile).map_err(|e| err(e.line, e.message))?;
        let mut graph = StageGraph {
            escape: file.escape,
            global_args: platform_args(),
            stages: Vec::new(),
        };
        for ins in file.instructions {
            if let InstructionKind::From { alias, .. } = &ins.kind {
                if let Some(other) = graph
                    .stages
                    .iter()
                    .find(|s| s.name.is_some() && s.name == *alias)
                {
                    return Err(err(
                        ins.line,
                        format!(
                            "FROM … AS {}: the stage on line {} has that name already; give each stage its own",
                            alias.as_deref().unwrap_or_default(),
                            other.from.line
                        ),
                    ));
                }
                graph.stages.push(StageOutline {
                    name: alias.clone(),
                    from: ins,
                    base: StageBase::Image(String::new()),
                    instructions: Vec::new(),
                    copies: Vec::new(),
                    needed: false,
                });
                continue;
            }
            match (graph.stages.last_mut(), &ins.kind) {
                (Some(stage), _) => stage.instructions.push(ins),
                (None, InstructionKind::Arg(decls)) => {
                    for d in decls {
                        let v = match &d.default {
                            Some(v) => graph.expand(v, ins.line)?,
                            None => String::new(),
                        };
                        StepState::set(&mut graph.global_args, &d.name, v);
                    }
                }
                (None, _) => return Err(err(ins.line, "only ARG may come before FROM")),
            }
        }
        for i in 0..graph.stages.len() {
            graph.stages[i].base = graph.stage_base(i)?;
            let mut copies = Vec::new();
            for ins in &graph.stages[i].instructions {
                if let InstructionKind::Copy(CopySpec {
                    from: Some(from), ..
                }) = &ins.kind
                {
                    copies.push((ins.line, graph.copy_from(i, from, ins.line)?));
                }
            }
            graph.stages[i].copies = copies;
        }
        // Stages only ever use earlier ones, so one pass from the end finds every need.
        for i in (0..graph.stages.len()).rev() {
            let stage = &graph.stages[i];
            if !(stage.needed || i + 1 == graph.stages.len()) {
                continue;
            }
            let mut uses: Vec<usize> = stage
                .copies
                .iter()
                .filter_map(|(_, c)| match c {
                    CopyFrom::Stage(s) => Some(*s),
                    CopyFrom::Image(_) => None,
                })
                .collect();
            if let StageBase::Stage(s) = stage.base {
                uses.push(s);
            }
            graph.stages[i].needed = true;
            for s in uses {
                graph.stages[s].needed = true;
            }
        }
        Ok(graph)
    }

    /// The images the needed stages read (FROM bases, `COPY --from` images), each once, with
    /// the line that first names it.
    pub fn images(&self) -> Vec<(usize, String)> {
        let mut found: Vec<(usize, String)> = Vec::new();
        for stage in self.stages.iter().filter(|s| s.needed) {
            let base = match &stage.base {
                StageBase::Image(r) => Some((stage.from.line, r)),
                StageBase::Stage(_) => None,
            };
            let copied = stage.copies.iter().filter_map(|(line, c)| match c {
                CopyFrom::Image(r) => Some((*line, r)),
                CopyFrom::Stage(_) => None,
            });
            for (line, reference) in base.into_iter().chain(copied) {
                if !found.iter().any(|(_, r)| r == reference) {
                    found.push((line, reference.clone()));
                }
            }
        }
        found
    }

    /// The reference the image's filesystem descends from: the last stage's FROM, followed
    /// through the stages it names.
    pub fn image_base(&self) -> Result<String, BuildError> {
        let mut base = self.stages.last().map(|s| &s.base);
        while let Some(StageBase::Stage(i)) = base {
            base = self.stages.get(*i).map(|s| &s.base);
        }
        match base {
            Some(StageBase::Image(reference)) => Ok(reference.clone()),
            _ => Err(err(1, "the Dockerfile has no FROM")),
        }
    }

    /// The stages the image does not need: `stage NAME (Dockerfile line N)`.
    pub fn skipped(&self) -> Vec<String> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.needed)
            .map(|(i, s)| format!("stage {} (Dockerfile line {})", s.label(i), s.from.line))
            .collect()
    }

    /// Said when pulling `reference` failed and it could have meant a stage: no stage has
    /// that name, and which ones there are.
    pub fn not_a_stage(&self, reference: &str) -> Option<String> {
        let names: Vec<&str> = self
            .stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .collect();
        let plain = !reference.contains(['/', ':', '@']);
        (plain && !names.is_empty()).then(|| {
            format!(
                "no stage is named {reference} (the stages are {}), so it was taken for an image",
                names.join(", ")
            )
        })
    }

    fn expand(&self, raw: &str, line: usize) -> Result<String, BuildError> {
        dockerfile::expand(raw, &|n| lookup_in(&self.global_args, n), self.escape)
            .map_err(|e| err(line, e.message))
    }

    /// A global ARG's value, which a stage's `ARG NAME` without a default takes.
    fn global(&self, name: &str) -> Option<String> {
        lookup_in(&self.global_args, name)
    }

    /// The stage named `word` (Docker compares names lowercased).
    fn named(&self, word: &str) -> Option<usize> {
        let lower = word.to_ascii_lowercase();
        self.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
    }

    /// What stage `index`'s FROM names: an earlier stage, or an image.
    fn stage_base(&self, index: usize) -> Result<StageBase, BuildError> {
        let from = &self.stages[index].from;
        let line = from.line;
        let InstructionKind::From {
            image, platform, ..
        } = &from.kind
        else {
            return Err(err(line, "a stage must start with FROM"));
        };
        if let Some(platform) = platform {
            check_platform(&self.expand(platform, line)?).map_err(|m| err(line, m))?;
        }
        let word = self.expand(image, line)?;
        if word.is_empty() {
            return Err(err(line, format!("FROM {image} expands to nothing")));
        }
        match self.named(&word) {
            None => Ok(StageBase::Image(word)),
            Some(i) if i < index => Ok(StageBase::Stage(i)),
            Some(i) if i == index => Err(err(
                line,
                format!(
                    "FROM {word} AS {word}: a stage cannot start from itself; to use the image \
                     {word}, give the stage another name"
                ),
            )),
            Some(i) => Err(err(
                line,
                format!(
                    "FROM {word}: stage {word} is defined later (Dockerfile line {}); a stage \
                     can only start from an earlier one",
                    self.stages[i].from.line
                ),
            )),
        }
    }

    /// Where `COPY --from=<raw>` in stage `index` reads: an earlier stage (by name or
    /// position), else an image.
    pub fn copy_from(&self, index: usize, raw: &str, line: usize) -> Result<CopyFrom, BuildError> {
        let word = self.expand(raw, line)?;
        if word.is_empty() {
            return Err(err(line, format!("COPY --from={raw} expands to nothing")));
        }
        let found = match word.parse::<usize>() {
            Ok(n) if n < self.stages.len() => Some(n),
            Ok(_) => {
                return Err(err(
                    line,
                    format!(
                        "COPY --from={word}: there is no stage {word} (stages count from 0; \
                         this Dockerfile has {})",
                        self.stages.len()
                    ),
                ))
            }
            Err(_) => self.named(&word),
        };
        match found {
            None => Ok(CopyFrom::Image(word)),
            Some(i) if i < index => Ok(CopyFrom::Stage(i)),
            Some(i) if i == index => Err(err(
                line,
                format!("COPY --from={word}: a stage cannot copy from itself"),
            )),
            Some(i) => Err(err(
                line,
                format!(
                    "COPY --from={word}: stage {} comes later (Dockerfile line {}); copy only \
                     from an earlier stage",
                    self.stages[i].label(i),
                    self.stages[i].from.line
                ),
            )),
        }
    }
}

fn lookup_in(list: &[(String, String)], name: &str) -> Option<String> {
    list.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// What identifies a base disk in cache keys.
fn base_identity(base: &BaseImage) -> String {
    format!("{} {} {}", base.name, base.version, base.disk.display())
}

impl Plan {
    /// Plans every stage the image needs (see [`StageGraph`]) on the images the graph named,
    /// resolved (`images`, by reference): each step's state, action and cache key.
    pub fn make(
        context: &BuildContext,
        api_env: &[(String, String)],
        graph: &StageGraph,
        images: Vec<(String, ResolvedBase)>,
    ) -> Result<Plan, BuildError> {
        let mut planner = Planner {
            context,
            api_env,
            graph,
            images: &images,
            planned: Vec::new(),
        };
        for (i, outline) in graph.stages.iter().enumerate() {
            if outline.needed {
                let first = planner.planned.iter().map(|s| s.steps.len()).sum();
                let stage = planner.stage(i, first)?;
                planner.planned.push(stage);
            }
        }
        let mut stages = planner.planned;
        let image = stages.pop().ok_or_else(|| {
            err(
                1,
                "the Dockerfile has no FROM: start it with FROM kiln/busybox, FROM kiln/debian:12 or a registry image",
            )
        })?;
        Ok(Plan {
            stages,
            image,
            images,
        })
    }
}

/// Plans stages one after another; each sees the stages planned before it.
struct Planner<'a> {
    context: &'a BuildContext,
    api_env: &'a [(String, String)],
    graph: &'a StageGraph,
    images: &'a [(String, ResolvedBase)],
    planned: Vec<Stage>,
}

impl Planner<'_> {
    fn image(&self, reference: &str, line: usize) -> Result<&ResolvedBase, BuildError> {
        self.images
            .iter()
            .find(|(r, _)| r == reference)
            .map(|(_, b)| b)
            .ok_or_else(|| {
                err(
                    line,
                    format!("{reference} was not resolved before planning"),
                )
            })
    }

    fn planned(&self, index: usize, line: usize) -> Result<&Stage, BuildError> {
        self.planned
            .iter()
            .find(|s| s.index == index)
            .ok_or_else(|| err(line, format!("stage {index} is not planned before its use")))
    }

    /// The identity of what a `COPY --from` reads, for cache keys: the stage's final layer
    /// key, or the image's digest and disk.
    fn source_identity(&self, from: &CopyFrom, line: usize) -> Result<String, BuildError> {
        Ok(match from {
            CopyFrom::Stage(i) => format!("stage {}", self.planned(*i, line)?.layer_id),
            CopyFrom::Image(r) => format!("image {}", base_identity(&self.image(r, line)?.image)),
        })
    }

    /// Plans stage `index`, numbering its steps from `first`: a stage FROM an earlier one
    /// starts from that stage's state and image config (not its ARGs); a registry image's
    /// config seeds the state and its ONBUILD triggers run first.
    fn stage(&self, index: usize, first: usize) -> Result<Stage, BuildError> {
        let outline = &self.graph.stages[index];
        let escape = self.graph.escape;
        let from = &outline.from;
        // Like a Docker base image's config, the state starts with PATH set, so that
        // `ENV PATH=/opt/bin:$PATH` extends it.
        let mut state = StepState {
            env: vec![("PATH".to_string(), DEFAULT_PATH.to_string())],
            args: Vec::new(),
            api_env: self.api_env.to_vec(),
            workdir: "/".into(),
            user: String::new(),
            shell: vec!["/bin/sh".into(), "-c".into()],
        };
        let mut triggers = Vec::new();
        let (mut stage, mut keys, mut cmd_from_base) = match &outline.base {
            StageBase::Image(reference) => {
                let resolved = self.image(reference, from.line)?;
                let identity = base_identity(&resolved.image);
                let mut stage = Stage {
                    index,
                    name: outline.name.clone(),
                    from: outline.base.clone(),
                    base: resolved.image.clone(),
                    pulled: None,
                    steps: Vec::new(),
                    healthcheck: None,
                    last: state.clone(),
                    layer_id: identity.clone(),
                    entrypoint: None,
                    cmd: None,
                    exposed: Vec::new(),
                    labels: Vec::new(),
                    stop_signal: "SIGTERM".into(),
                };
                let mut cmd_from_base = false;
                if let Some(pulled) = &resolved.pulled {
                    cmd_from_base = stage.seed(&mut state, &pulled.config);
                    for t in pulled.config.on_build.iter().flatten() {
                        triggers.push(
                            dockerfile::parse_trigger(t, from.line)
                                .map_err(|e| err(e.line, e.message))?,
                        );
                    }
                    stage.pulled = Some(pulled.clone());
                }
                (stage, KeyChain::new(&identity), cmd_from_base)
            }
            StageBase::Stage(p) => {
                let parent = self.planned(*p, from.line)?;
                state = StepState {
                    args: Vec::new(),
                    ..parent.last.clone()
                };
                let stage = Stage {
                    index,
                    name: outline.name.clone(),
                    from: outline.base.clone(),
                    steps: Vec::new(),
                    last: state.clone(),
                    ..parent.clone()
                };
                let keys = KeyChain::new(&format!("stage {}", parent.layer_id));
                // Docker: an ENTRYPOINT resets the CMD the base stage gave.
                (stage, keys, parent.cmd.is_some())
            }
        };
        stage.steps.push(PlannedStep {
            index: first,
            line: from.line,
            text: from.text.clone(),
            key: None,
            action: StepAction::Metadata,
            state: state.clone(),
        });
        let instructions = triggers
            .into_iter()
            .chain(outline.instructions.iter().cloned());
        for (i, ins) in instructions.enumerate() {
            let line = ins.line;
            let x = |s: &str, st: &StepState| {
                dockerfile::expand(s, &|n| st.lookup(n), escape).map_err(|e| err(line, e.message))
            };
            let action = match &ins.kind {
                InstructionKind::From { .. } => {
                    return Err(err(
                        line,
                        "FROM inside a stage: a FROM starts the next stage",
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
                    let from = match &spec.from {
                        Some(raw) => Some(self.graph.copy_from(index, raw, line)?),
                        None => None,
                    };
                    if let Some(from) = &from {
                        // What the source stage's final layer (or the image) is, and the
                        // paths: the text fed below has them as written, this as expanded.
                        keys.feed(self.source_identity(from, line)?.as_bytes());
                    }
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
                        if from.is_some() {
                            keys.feed(s.as_bytes());
                            sources.push(s);
                            continue;
                        }
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
                            context_source(&self.context.dir, &s).map_err(|e| err(line, e))?;
                        let digest = hash_tree(&self.context.dir.join(hashed)).map_err(|e| {
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
                        from,
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
                        // Docker: a global ARG reaches a stage only through `ARG NAME`.
                        let v = match &d.default {
                            Some(v) => x(v, &state)?,
                            None => self.graph.global(&d.name).unwrap_or_default(),
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
                        if !p.udp && !stage.exposed.contains(&p.number) {
                            stage.exposed.push(p.number);
                        }
                    }
                    StepAction::Metadata
                }
                InstructionKind::Cmd(c) => {
                    stage.cmd = Some(to_app(c));
                    cmd_from_base = false;
                    StepAction::Metadata
                }
                InstructionKind::Entrypoint(c) => {
                    stage.entrypoint = Some(to_app(c));
                    if cmd_from_base {
                        stage.cmd = None;
                        cmd_from_base = false;
                    }
                    // Docker: a new ENTRYPOINT resets an inherited CMD; within one file, CMD after it stays.
                    StepAction::Metadata
                }
                InstructionKind::Label(pairs) => {
                    for (k, v) in pairs {
                        let v = x(v, &state)?;
                        StepState::set(&mut stage.labels, k, v);
                    }
                    StepAction::Metadata
                }
                InstructionKind::Healthcheck(h) => {
                    stage.healthcheck = match h {
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
                    stage.stop_signal = x(sig, &state)?;
                    StepAction::Metadata
                }
                InstructionKind::Volume(_) | InstructionKind::Maintainer(_) => StepAction::Metadata,
            };
            keys.feed(ins.text.as_bytes());
            keys.feed(state.key_material().as_bytes());
            let key = (!matches!(action, StepAction::Metadata)).then(|| keys.key());
            if let Some(key) = &key {
                stage.layer_id = key.clone();
            }
            stage.steps.push(PlannedStep {
                index: first + i + 1,
                line,
                text: ins.text.clone(),
                key,
                action,
                state: state.clone(),
            });
        }
        stage.last = state;
        Ok(stage)
    }
}

impl Stage {
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
            ready_check: super::ReadyCheck::Tcp,
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
            vcpu_growth: true,
            machine: kiln_vmm::MachineKind::Microvm,
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

        let graph = StageGraph::parse(&ctx.dockerfile).expect("graph");
        let plan = Plan::make(&ctx, &[], &graph, vec![("py:1".into(), base)]).expect("plan");
        let config = plan.image.image_config(&spec_for(&ctx)).expect("config");

        assert_eq!(plan.image.steps[1].text, "ONBUILD COPY app.py /srv/");
        assert!(plan.image.steps[1].key.is_some());
        assert_eq!(config.app_argv, ["python3", "app.py"]);
        assert_eq!(config.workdir, "/srv");
        assert_eq!(plan.image.last.user, "app");
        assert_eq!(config.app_port, 9090);
        assert_eq!(config.stop_signal, "SIGINT");
        assert_eq!(
            plan.image.healthcheck,
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

        let graph = StageGraph::parse(&ctx.dockerfile).expect("graph");
        let plan = Plan::make(&ctx, &[], &graph, vec![("py".into(), base)]).expect("plan");
        let config = plan.image.image_config(&spec_for(&ctx)).expect("config");

        assert_eq!(config.app_argv, ["/serve"]);
    }

    #[test]
    fn images_when_args_before_from_then_expanded() {
        let graph =
            StageGraph::parse("ARG REG=127.0.0.1:5000\nARG IMG=$REG/py\nFROM ${IMG}:1 AS app\n")
                .expect("graph");

        assert_eq!(graph.images(), [(3, "127.0.0.1:5000/py:1".to_string())]);
    }

    // Stages.

    /// A base disk named after `reference`, as if resolved (nothing is read from it).
    fn resolved(reference: &str, version: &str) -> ResolvedBase {
        ResolvedBase {
            image: BaseImage {
                name: reference.into(),
                version: version.into(),
                disk: format!("/nonexistent/{reference}.ext4").into(),
                size_bytes: 1 << 30,
            },
            pulled: None,
        }
    }

    /// Plans `dockerfile` with every image it names resolved at `version`.
    fn plan_at(dockerfile: &str, version: &str) -> Result<Plan, BuildError> {
        let (_d, ctx) = context(dockerfile);
        let graph = StageGraph::parse(dockerfile)?;
        let images = graph
            .images()
            .into_iter()
            .map(|(_, r)| (r.clone(), resolved(&r, version)))
            .collect();
        Plan::make(&ctx, &[], &graph, images)
    }

    fn plan_of(dockerfile: &str) -> Plan {
        plan_at(dockerfile, "1").expect("plan")
    }

    fn message(dockerfile: &str) -> (usize, String) {
        match StageGraph::parse(dockerfile).expect_err("refused") {
            BuildError::Dockerfile { line, message } => (line, message),
            other => panic!("not a Dockerfile error: {other}"),
        }
    }

    fn key_of(plan: &Plan, text: &str) -> Option<String> {
        plan.all()
            .flat_map(|s| &s.steps)
            .find(|s| s.text == text)
            .and_then(|s| s.key.clone())
    }

    const STAGES: &str = "ARG V=1
FROM kiln/busybox AS Base
RUN echo base
FROM kiln/debian:12 AS unused
RUN false
FROM registry.example/tools:${V} AS tools
FROM base AS builder
COPY --from=TOOLS /bin/tool /bin/
FROM kiln/busybox
COPY --from=builder /out /srv/
";

    #[test]
    fn graph_when_stages_use_each_other_then_only_what_the_image_needs_is_kept() {
        let graph = StageGraph::parse(STAGES).expect("graph");

        assert_eq!(graph.skipped(), ["stage unused (Dockerfile line 4)"]);
        assert_eq!(
            graph.images(),
            [
                (2, "kiln/busybox".to_string()),
                (6, "registry.example/tools:1".to_string())
            ]
        );
        assert_eq!(graph.image_base().expect("base"), "kiln/busybox");
    }

    #[test]
    fn make_when_stages_then_needed_ones_in_order_numbered_across_the_build() {
        let plan = plan_of(STAGES);

        let planned: Vec<(usize, String)> = plan.all().map(|s| (s.index, s.label())).collect();
        assert_eq!(
            planned,
            [
                (0, "base".to_string()),
                (2, "tools".to_string()),
                (3, "builder".to_string()),
                (4, "4".to_string())
            ]
        );
        let indices: Vec<usize> = plan.all().flat_map(|s| &s.steps).map(|s| s.index).collect();
        assert_eq!(indices, (0..plan.total_steps()).collect::<Vec<_>>());
        assert_eq!(plan.image.from, StageBase::Image("kiln/busybox".into()));
        let builder = plan.stage(3).expect("builder");
        assert_eq!(builder.from, StageBase::Stage(0));
        assert!(matches!(
            &builder.steps[1].action,
            StepAction::Copy { from: Some(CopyFrom::Stage(2)), sources, .. }
                if sources == &["/bin/tool"]
        ));
        assert_eq!(plan.describe(&CopyFrom::Stage(3)), "stage builder");
    }

    #[test]
    fn make_when_from_an_earlier_stage_then_its_state_and_config_carry_over_but_not_args() {
        let plan = plan_of(
            "FROM kiln/busybox AS base\nARG A=1\nENV E=2\nWORKDIR /w\nUSER nobody\nCMD [\"serve\"]\nFROM base\nRUN true\n",
        );

        let config = plan
            .image
            .image_config(&spec_for(&context("").1))
            .expect("config");
        let run = &plan.image.steps[1];

        assert_eq!(config.app_argv, ["serve"]);
        assert_eq!(config.workdir, "/w");
        assert!(config.env.contains(&("E".into(), "2".into())));
        assert_eq!(run.state.user, "nobody");
        assert!(run.state.args.is_empty(), "{:?}", run.state.args);
        assert_eq!(plan.image.base.name, "kiln/busybox");
    }

    #[test]
    fn make_when_copy_from_then_its_key_covers_the_source_stage_and_the_image_digest() {
        let df = |run: &str| {
            format!(
                "FROM kiln/busybox AS b\nRUN {run}\nFROM kiln/busybox\nCOPY --from=b /out /o\nCOPY --from=reg.example/f:1 /f /f\n"
            )
        };
        let base = plan_of(&df("make"));
        let same = plan_of(&df("make"));
        let changed = plan_of(&df("make all"));
        let other_digest = plan_at(&df("make"), "2").expect("plan");
        let copy_b = "COPY --from=b /out /o";
        let copy_f = "COPY --from=reg.example/f:1 /f /f";

        assert!(key_of(&base, copy_b).is_some());
        assert_eq!(key_of(&base, copy_b), key_of(&same, copy_b));
        assert_eq!(key_of(&base, copy_f), key_of(&same, copy_f));
        assert_ne!(key_of(&base, copy_b), key_of(&changed, copy_b));
        assert_ne!(key_of(&base, copy_f), key_of(&other_digest, copy_f));
    }

    #[test]
    fn make_when_a_global_arg_is_redeclared_in_a_stage_then_it_has_the_global_value() {
        let plan = plan_of(
            "ARG V=7\nARG W=8\nFROM kiln/busybox\nARG V\nARG TARGETPLATFORM\nARG X\nRUN echo\n",
        );

        let args = &plan.image.steps[4].state.args;

        assert_eq!(
            args,
            &[
                ("V".to_string(), "7".to_string()),
                ("TARGETPLATFORM".to_string(), PLATFORM.to_string()),
                ("X".to_string(), String::new())
            ]
        );
    }

    #[test]
    fn parse_when_platform_then_amd64_accepted_and_others_refused_naming_kilns() {
        let amd64 = StageGraph::parse("FROM --platform=$BUILDPLATFORM kiln/busybox\n");
        let aliases = StageGraph::parse("FROM --platform=linux/x86_64/v2 kiln/busybox AS a\n");
        let (line, arm) = message("ARG P=linux/arm64\nFROM --platform=$P kiln/busybox\n");

        assert!(amd64.is_ok() && aliases.is_ok());
        assert_eq!(line, 2);
        assert!(
            arm.contains("--platform=linux/arm64") && arm.contains("linux/amd64 only"),
            "{arm}"
        );
    }

    #[test]
    fn parse_when_a_stage_refers_to_itself_or_a_later_one_then_error_with_the_line() {
        let cases = [
            (
                "FROM kiln/busybox AS a\nFROM A AS a2\nFROM a2 AS A2x\nFROM b AS b\n",
                4,
                "cannot start from itself",
            ),
            (
                "FROM c\nFROM kiln/busybox AS c\n",
                1,
                "stage c is defined later (Dockerfile line 2)",
            ),
            (
                "FROM kiln/busybox AS a\nCOPY --from=b /x /x\nFROM kiln/busybox AS b\n",
                2,
                "stage b comes later (Dockerfile line 3)",
            ),
            (
                "FROM kiln/busybox AS a\nCOPY --from=A /x /x\n",
                2,
                "a stage cannot copy from itself",
            ),
            (
                "FROM kiln/busybox\nFROM kiln/busybox\nCOPY --from=1 /x /x\n",
                3,
                "a stage cannot copy from itself",
            ),
            (
                "FROM kiln/busybox\nCOPY --from=3 /x /x\n",
                2,
                "there is no stage 3",
            ),
            (
                "FROM kiln/busybox AS a\nFROM kiln/busybox AS A\n",
                2,
                "the stage on line 1 has that name already",
            ),
        ];

        for (dockerfile, line, expected) in cases {
            let (got_line, got) = message(dockerfile);

            assert_eq!(got_line, line, "{dockerfile:?}: {got}");
            assert!(got.contains(expected), "{dockerfile:?}: {got}");
        }
    }

    #[test]
    fn not_a_stage_when_a_plain_name_fails_to_pull_then_the_stages_are_named() {
        let graph = StageGraph::parse(
            "FROM kiln/busybox AS builder\nFROM kiln/busybox\nCOPY --from=buildr /x /x\n",
        )
        .expect("graph");

        let hint = graph.not_a_stage("buildr");

        assert_eq!(graph.images()[1], (3, "buildr".to_string()));
        assert_eq!(
            hint.as_deref(),
            Some("no stage is named buildr (the stages are builder), so it was taken for an image")
        );
        assert_eq!(graph.not_a_stage("alpine:3"), None);
    }
}
