//! Each instruction's arguments, checked and split into an [`InstructionKind`].

use std::time::Duration;

use super::parser::{flags, heredoc_marker, json_array, words, Logical};
use super::{
    ArgDecl, CacheMount, Command, CopySpec, Healthcheck, InstructionKind, ParseError, RunMount,
    RunNetwork, RunSpec, SecretMount,
};

/// An exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Port {
    /// The port number.
    pub number: u16,
    /// `true` for `/udp`, `false` for TCP (the default).
    pub udp: bool,
}

impl Port {
    /// Parses `8080`, `8080/tcp` or `53/udp` (after expansion).
    pub fn parse(word: &str) -> Result<Self, String> {
        let (number, protocol) = word.split_once('/').unwrap_or((word, "tcp"));
        let udp = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => false,
            "udp" => true,
            other => {
                return Err(format!(
                    "port {word:?}: protocol {other:?} is not tcp or udp"
                ))
            }
        };
        match number.parse::<u16>() {
            Ok(number) if number > 0 => Ok(Self { number, udp }),
            _ => Err(format!(
                "port {word:?} is not a number from 1 to 65535 (ranges are not supported)"
            )),
        }
    }
}

/// Parses one logical line into what it says.
pub(crate) fn parse_instruction(
    logical: &Logical,
    escape: char,
) -> Result<InstructionKind, ParseError> {
    let line = logical.line;
    let err = |message: String| ParseError::new(line, message);
    let keyword = logical.keyword.to_ascii_uppercase();
    let rest = logical.rest.as_str();
    let needs_args = |what: &str| {
        if rest.is_empty() {
            Err(err(format!("{keyword} needs {what}")))
        } else {
            Ok(())
        }
    };
    match keyword.as_str() {
        "FROM" => {
            let (found, rest) = flags(rest);
            allow_flags(&keyword, &found, &["platform"], line)?;
            let platform = flag_value(&keyword, &found, "platform", line)?;
            let parts = words(rest, escape);
            match parts.as_slice() {
                [image] => Ok(InstructionKind::From {
                    image: image.clone(),
                    alias: None,
                    platform,
                }),
                [image, as_kw, alias] if as_kw.eq_ignore_ascii_case("as") => {
                    Ok(InstructionKind::From {
                        image: image.clone(),
                        alias: Some(stage_name(alias, line)?),
                        platform,
                    })
                }
                _ => Err(err("FROM takes `[--platform=…] image [AS name]`".into())),
            }
        }
        "RUN" => run(logical).map(InstructionKind::Run),
        "COPY" | "ADD" => {
            let spec = copy_spec(&keyword, logical, escape)?;
            if keyword == "COPY" {
                return Ok(InstructionKind::Copy(spec));
            }
            if let Some(url) = spec.sources.iter().find(|s| is_git(s)) {
                return Err(err(format!(
                    "ADD from a Git repository is not supported: clone it in a RUN step ({url})"
                )));
            }
            Ok(InstructionKind::Add(spec))
        }
        "ENV" => {
            needs_args("a name and a value")?;
            Ok(InstructionKind::Env(pairs(&keyword, rest, escape, line)?))
        }
        "LABEL" => {
            needs_args("key=value pairs")?;
            Ok(InstructionKind::Label(pairs(&keyword, rest, escape, line)?))
        }
        "ARG" => {
            needs_args("a name")?;
            let decls = words(rest, escape)
                .into_iter()
                .map(|word| {
                    let (name, default) = match word.split_once('=') {
                        Some((name, default)) => (name.to_string(), Some(default.to_string())),
                        None => (word, None),
                    };
                    check_name(&keyword, &name, line)?;
                    Ok(ArgDecl { name, default })
                })
                .collect::<Result<_, ParseError>>()?;
            Ok(InstructionKind::Arg(decls))
        }
        "WORKDIR" => {
            needs_args("a directory")?;
            Ok(InstructionKind::Workdir(rest.to_string()))
        }
        "USER" => {
            let parts = words(rest, escape);
            let [spec] = parts.as_slice() else {
                return Err(err("USER takes one `user[:group]`".into()));
            };
            let (user, group) = match spec.split_once(':') {
                Some((user, group)) => (user.to_string(), Some(group.to_string())),
                None => (spec.clone(), None),
            };
            if user.is_empty() || group.as_ref().is_some_and(String::is_empty) {
                return Err(err(format!(
                    "USER {spec:?}: user and group must not be empty"
                )));
            }
            Ok(InstructionKind::User { user, group })
        }
        "EXPOSE" => {
            needs_args("a port")?;
            let ports = words(rest, escape);
            for port in ports.iter().filter(|p| !p.contains('$')) {
                Port::parse(port).map_err(&err)?;
            }
            Ok(InstructionKind::Expose(ports))
        }
        "CMD" => {
            needs_args("a command")?;
            Ok(InstructionKind::Cmd(command(rest)))
        }
        "ENTRYPOINT" => {
            needs_args("a command")?;
            Ok(InstructionKind::Entrypoint(command(rest)))
        }
        "HEALTHCHECK" => healthcheck(rest, line).map(InstructionKind::Healthcheck),
        "SHELL" => match json_array(rest) {
            Some(shell) if !shell.is_empty() => Ok(InstructionKind::Shell(shell)),
            _ => Err(err(
                "SHELL takes a JSON array, e.g. SHELL [\"/bin/bash\", \"-c\"]".into(),
            )),
        },
        "STOPSIGNAL" => {
            let parts = words(rest, escape);
            let [signal] = parts.as_slice() else {
                return Err(err("STOPSIGNAL takes one signal, e.g. SIGTERM or 15".into()));
            };
            if !signal.contains('$') && !is_signal(signal) {
                return Err(err(format!(
                    "STOPSIGNAL {signal:?} is not a signal name (SIGTERM, TERM) or number (1-64)"
                )));
            }
            Ok(InstructionKind::StopSignal(signal.clone()))
        }
        "VOLUME" => {
            needs_args("a path")?;
            Ok(InstructionKind::Volume(
                json_array(rest).unwrap_or_else(|| words(rest, escape)),
            ))
        }
        "MAINTAINER" => {
            needs_args("a name")?;
            Ok(InstructionKind::Maintainer(rest.to_string()))
        }
        "ONBUILD" => Err(err(
            "ONBUILD is not supported: put the instructions in this Dockerfile".into(),
        )),
        _ => Err(err(format!(
            "unknown instruction `{}`: check the spelling (FROM, RUN, COPY, ADD, ENV, ARG, \
             WORKDIR, USER, EXPOSE, CMD, ENTRYPOINT, LABEL, HEALTHCHECK, SHELL, STOPSIGNAL, \
             VOLUME)",
            logical.keyword
        ))),
    }
}

/// Exec form when the arguments are a JSON array of strings, else shell form.
fn command(rest: &str) -> Command {
    match json_array(rest) {
        Some(argv) => Command::Exec(argv),
        None => Command::Shell(rest.to_string()),
    }
}

/// Fails on any flag not in `allowed`, in Docker's words (`unknown flag: name`).
fn allow_flags(
    keyword: &str,
    found: &[(String, Option<String>)],
    allowed: &[&str],
    line: usize,
) -> Result<(), ParseError> {
    match found
        .iter()
        .find(|(name, _)| !allowed.contains(&name.as_str()))
    {
        Some((name, _)) => {
            let known: Vec<String> = allowed.iter().map(|a| format!("--{a}")).collect();
            let hint = match known.is_empty() {
                true => format!("{keyword} takes no flags"),
                false => format!("{keyword} takes {}", known.join(", ")),
            };
            Err(ParseError::new(
                line,
                format!("unknown flag: {name} ({hint})"),
            ))
        }
        None => Ok(()),
    }
}

/// The value of flag `--flag=…` if given; given without a value is an error.
fn flag_value(
    keyword: &str,
    found: &[(String, Option<String>)],
    flag: &str,
    line: usize,
) -> Result<Option<String>, ParseError> {
    match found.iter().find(|(name, _)| name == flag) {
        Some((_, Some(value))) if !value.is_empty() => Ok(Some(value.clone())),
        Some(_) => Err(ParseError::new(
            line,
            format!("{keyword} --{flag} needs a value, e.g. --{flag}=…"),
        )),
        None => Ok(None),
    }
}

/// A stage name (`FROM … AS name`) as Docker takes it: lowercased, then a letter followed
/// by letters, digits, `-`, `_` and `.`.
fn stage_name(alias: &str, line: usize) -> Result<String, ParseError> {
    let name = alias.to_ascii_lowercase();
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    match valid {
        true => Ok(name),
        false => Err(ParseError::new(
            line,
            format!(
                "FROM … AS {alias}: a stage name starts with a letter and holds only letters, \
                 digits, '-', '_' and '.'"
            ),
        )),
    }
}

/// `RUN [--mount=…]… [--network=…] command`, with the here-documents its line opens.
fn run(logical: &Logical) -> Result<RunSpec, ParseError> {
    let line = logical.line;
    let err = |message: String| ParseError::new(line, message);
    let (found, rest) = flags(&logical.rest);
    allow_flags("RUN", &found, &["mount", "network"], line)?;
    let mut mounts = Vec::new();
    let mut network = RunNetwork::Default;
    for (name, value) in &found {
        let value = value
            .as_deref()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| err(format!("RUN --{name} needs a value, e.g. --{name}=…")))?;
        if name == "mount" {
            mounts.push(run_mount(value).map_err(&err)?);
            continue;
        }
        network = match value.to_ascii_lowercase().as_str() {
            "default" => RunNetwork::Default,
            "none" => RunNetwork::None,
            "host" => {
                return Err(err(
                    "RUN --network=host is not allowed: a build step never shares the host's \
                     network; use --network=default (the build's egress policy) or none"
                        .into(),
                ))
            }
            other => {
                return Err(err(format!(
                    "RUN --network={other}: unsupported network mode (use default or none)"
                )))
            }
        };
    }
    if rest.is_empty() {
        return Err(err("RUN needs a command".into()));
    }
    let command = command(rest);
    if matches!(command, Command::Exec(_)) && !logical.heredocs.is_empty() {
        return Err(err(
            "RUN in exec form (a JSON array) cannot take here-documents: use the shell form".into(),
        ));
    }
    Ok(RunSpec {
        command,
        heredocs: logical.heredocs.clone(),
        mounts,
        network,
    })
}

/// One `--mount` value: comma-separated `key=value` fields (BuildKit's names).
fn run_mount(value: &str) -> Result<RunMount, String> {
    let mut fields = Vec::new();
    for field in value.split(',').filter(|f| !f.is_empty()) {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().to_string())),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        fields.push((key, val));
    }
    let get = |names: &[&str]| -> Option<Option<String>> {
        fields
            .iter()
            .rev()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.clone())
    };
    let kind = get(&["type"]).flatten().unwrap_or_else(|| "bind".into());
    let allowed: &[&str] = match kind.as_str() {
        "cache" => &[
            "type",
            "target",
            "dst",
            "destination",
            "id",
            "sharing",
            "mode",
            "uid",
            "gid",
            "ro",
            "readonly",
            "rw",
            "readwrite",
        ],
        "secret" => &[
            "type",
            "target",
            "dst",
            "destination",
            "id",
            "required",
            "mode",
            "uid",
            "gid",
            "env",
        ],
        "tmpfs" => &["type", "target", "dst", "destination", "size"],
        "bind" | "ssh" => {
            return Err(format!(
                "RUN --mount=type={kind} is not supported: kiln supports type=cache, \
                 type=secret and type=tmpfs (COPY what the step needs from the context)"
            ))
        }
        other => {
            return Err(format!(
                "RUN --mount=type={other}: unknown mount type (cache, secret, tmpfs, bind, ssh)"
            ))
        }
    };
    if let Some((key, _)) = fields.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "RUN --mount={value}: unexpected key '{key}' for type={kind}"
        ));
    }
    let target = get(&["target", "dst", "destination"]).flatten();
    let number = |name: &str, radix: u32, default: u32| -> Result<u32, String> {
        match get(&[name]) {
            None => Ok(default),
            Some(Some(v)) => u32::from_str_radix(&v, radix).map_err(|_| {
                format!(
                    "RUN --mount {name}={v}: give {}",
                    if radix == 8 {
                        "an octal mode like 0755"
                    } else {
                        "a number"
                    }
                )
            }),
            Some(None) => Err(format!("RUN --mount {name}: give a value ({name}=…)")),
        }
    };
    let boolean = |names: &[&str]| -> Result<bool, String> {
        match get(names) {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("RUN --mount {}={v}: give true or false", names[0])),
            },
        }
    };
    match kind.as_str() {
        "cache" => {
            let target = target.ok_or("RUN --mount=type=cache needs target=<path>")?;
            let sharing = get(&["sharing"])
                .flatten()
                .unwrap_or_else(|| "shared".into());
            if !["shared", "private", "locked"].contains(&sharing.as_str()) {
                return Err(format!(
                    "RUN --mount sharing={sharing}: give shared, private or locked"
                ));
            }
            let mode = number("mode", 8, 0o755)?;
            if mode > 0o7777 {
                return Err(format!(
                    "RUN --mount mode={mode:o}: give an octal mode like 0755"
                ));
            }
            Ok(RunMount::Cache(CacheMount {
                target,
                id: get(&["id"]).flatten().filter(|id| !id.is_empty()),
                sharing,
                mode,
                uid: number("uid", 10, 0)?,
                gid: number("gid", 10, 0)?,
                read_only: boolean(&["ro", "readonly"])?,
            }))
        }
        "secret" => {
            let env = get(&["env"]).flatten().filter(|e| !e.is_empty());
            let id = match (get(&["id"]).flatten(), &target) {
                (Some(id), _) if !id.is_empty() => id,
                (_, Some(t)) => t.rsplit('/').next().unwrap_or_default().to_string(),
                _ => String::new(),
            };
            if id.is_empty() {
                return Err(
                    "RUN --mount=type=secret needs id=<name> (or a target to name it)".into(),
                );
            }
            let target = match (target, &env) {
                (Some(t), _) => Some(t),
                (None, Some(_)) => None,
                (None, None) => Some(format!("/run/secrets/{id}")),
            };
            let mode = number("mode", 8, 0o400)?;
            if mode > 0o7777 {
                return Err(format!(
                    "RUN --mount mode={mode:o}: give an octal mode like 0400"
                ));
            }
            Ok(RunMount::Secret(SecretMount {
                id,
                target,
                env,
                required: boolean(&["required"])?,
                mode,
                uid: number("uid", 10, 0)?,
                gid: number("gid", 10, 0)?,
            }))
        }
        _ => {
            let target = target.ok_or("RUN --mount=type=tmpfs needs target=<path>")?;
            let size = match get(&["size"]) {
                None => None,
                Some(v) => Some(
                    v.as_deref()
                        .and_then(parse_size)
                        .ok_or("RUN --mount size: give bytes or a size like 64m")?,
                ),
            };
            Ok(RunMount::Tmpfs { target, size })
        }
    }
}

/// `123`, `64k`, `64m`, `1g` (binary units, as Docker's `size=`).
fn parse_size(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (digits, shift) = match lower.chars().last()? {
        'k' => (&lower[..lower.len() - 1], 10),
        'm' => (&lower[..lower.len() - 1], 20),
        'g' => (&lower[..lower.len() - 1], 30),
        _ => (lower, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn copy_spec(keyword: &str, logical: &Logical, escape: char) -> Result<CopySpec, ParseError> {
    let line = logical.line;
    let (found, rest) = flags(&logical.rest);
    let allowed: &[&str] = match keyword {
        "ADD" => &["chown", "chmod", "link", "checksum"],
        _ => &["from", "chown", "chmod", "link"],
    };
    allow_flags(keyword, &found, allowed, line)?;
    let value = |flag: &str| flag_value(keyword, &found, flag, line);
    let from = value("from")?;
    let chown = value("chown")?;
    let chmod = value("chmod")?;
    let checksum = value("checksum")?;
    if let Some(mode) = chmod.as_ref().filter(|m| !m.contains('$')) {
        if mode.is_empty() || u32::from_str_radix(mode, 8).map_or(true, |m| m > 0o7777) {
            return Err(ParseError::new(
                line,
                format!("{keyword} --chmod={mode}: give an octal mode like 755"),
            ));
        }
    }
    let json = json_array(rest);
    let from_json = json.is_some();
    let mut paths = json.unwrap_or_else(|| words(rest, escape));
    if paths.len() < 2 {
        return Err(ParseError::new(
            line,
            format!("{keyword} needs at least one source and a destination"),
        ));
    }
    let dest = paths.pop().unwrap_or_default();
    // Here-document markers among the sources are inline files, taken in order.
    let mut inline = logical.heredocs.iter();
    let mut heredocs = Vec::new();
    let mut sources = Vec::new();
    for path in paths {
        match heredoc_marker(&path, escape).filter(|_| !from_json) {
            Some(marker) => match inline.next() {
                Some(doc) if doc.name == marker.name => heredocs.push(doc.clone()),
                _ => {
                    return Err(ParseError::new(
                        line,
                        format!("{keyword} {path}: the here-document has no body"),
                    ))
                }
            },
            None => sources.push(path),
        }
    }
    if let Some(sum) = checksum.as_deref().filter(|c| !c.contains('$')) {
        let hex = sum.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::new(
                line,
                format!("ADD --checksum={sum}: give sha256:<64 hex digits>"),
            ));
        }
        if sources.iter().any(|s| !is_http(s)) || !heredocs.is_empty() {
            return Err(ParseError::new(
                line,
                "ADD --checksum applies to http(s) URLs only: every source must be one",
            ));
        }
    }
    if from.is_some() && !heredocs.is_empty() {
        return Err(ParseError::new(
            line,
            "COPY --from copies files of another stage or image: here-documents cannot be among its sources",
        ));
    }
    Ok(CopySpec {
        from,
        sources,
        heredocs,
        checksum,
        dest,
        chown,
        chmod,
    })
}

/// Whether an ADD source is an `http://` or `https://` URL.
pub fn is_http(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

fn is_git(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    ["git@", "git://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
        || (is_http(&lower) && lower.ends_with(".git"))
}

/// `k=v k2="v 2"` pairs, or the legacy `k rest of line` form.
fn pairs(
    keyword: &str,
    rest: &str,
    escape: char,
    line: usize,
) -> Result<Vec<(String, String)>, ParseError> {
    let parts = words(rest, escape);
    let first_has_eq = parts.first().is_some_and(|w| w.contains('='));
    if !first_has_eq {
        let (name, value) = rest.split_once(char::is_whitespace).ok_or_else(|| {
            ParseError::new(
                line,
                format!("{keyword} {rest}: give a value (`{keyword} name=value`)"),
            )
        })?;
        check_name(keyword, name, line)?;
        return Ok(vec![(name.to_string(), value.trim_start().to_string())]);
    }
    parts
        .into_iter()
        .map(|word| {
            let (name, value) = word.split_once('=').ok_or_else(|| {
                ParseError::new(
                    line,
                    format!("{keyword}: `{word}` has no `=`: write name=value"),
                )
            })?;
            if keyword == "ENV" {
                check_name(keyword, name, line)?;
            } else if name.is_empty() {
                return Err(ParseError::new(line, format!("{keyword}: a key is empty")));
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

fn check_name(keyword: &str, name: &str, line: usize) -> Result<(), ParseError> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ParseError::new(
            line,
            format!("{keyword}: {name:?} is not a valid variable name (letters, digits, _)"),
        ))
    }
}

fn is_signal(signal: &str) -> bool {
    if let Ok(number) = signal.parse::<u32>() {
        return (1..=64).contains(&number);
    }
    let name = signal.strip_prefix("SIG").unwrap_or(signal);
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-')
}

fn healthcheck(rest: &str, line: usize) -> Result<Healthcheck, ParseError> {
    let err = |message: String| ParseError::new(line, message);
    if rest.eq_ignore_ascii_case("none") {
        return Ok(Healthcheck::None);
    }
    let (found, rest) = flags(rest);
    allow_flags(
        "HEALTHCHECK",
        &found,
        &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        line,
    )?;
    let (cmd_kw, test) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if !cmd_kw.eq_ignore_ascii_case("cmd") || test.trim().is_empty() {
        return Err(err(
            "HEALTHCHECK takes NONE or `[--interval=… --timeout=… --start-period=… \
             --retries=…] CMD command`"
                .into(),
        ));
    }
    let mut interval = Duration::from_secs(30);
    let mut timeout = Duration::from_secs(30);
    let mut start_period = Duration::ZERO;
    let mut retries = 3;
    for (name, value) in &found {
        let value = value.as_deref().unwrap_or_default();
        let duration = || {
            parse_duration(value).ok_or_else(|| {
                err(format!(
                    "HEALTHCHECK --{name}={value}: give a duration like 30s, 1m30s or 500ms"
                ))
            })
        };
        match name.as_str() {
            "interval" => interval = duration()?,
            "timeout" => timeout = duration()?,
            "start-period" => start_period = duration()?,
            "start-interval" => {
                duration()?;
            }
            _ => {
                retries = value.parse().map_err(|_| {
                    err(format!(
                        "HEALTHCHECK --retries={value}: give a whole number"
                    ))
                })?
            }
        }
    }
    Ok(Healthcheck::Check {
        test: command(test.trim()),
        interval,
        timeout,
        start_period,
        retries,
    })
}

/// Go's `time.ParseDuration` for non-negative values: `1m30s`, `1.5h`, `500ms`, `0`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_when_go_syntax_then_seconds() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("5d"), None);
    }

    #[test]
    fn port_parse_when_protocols_then_tcp_default_and_udp() {
        assert_eq!(
            Port::parse("8080"),
            Ok(Port {
                number: 8080,
                udp: false
            })
        );
        assert_eq!(
            Port::parse("8080/tcp"),
            Ok(Port {
                number: 8080,
                udp: false
            })
        );
        assert_eq!(
            Port::parse("53/udp"),
            Ok(Port {
                number: 53,
                udp: true
            })
        );
        assert!(Port::parse("70000").is_err());
        assert!(Port::parse("80/sctp").is_err());
    }
}
