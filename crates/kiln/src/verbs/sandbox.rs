//! `kiln exec`, `kiln cp` and `kiln logs VM`: kiln's sandbox API (commands, files and app
//! logs of a running MicroVM) from the command line.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Args;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Kilnd;
use crate::{Global, Output};

/// Largest stdin `kiln exec` forwards (kilnd's limit).
const MAX_STDIN: usize = 1 << 20;

/// `kiln exec` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "The MicroVM must have been run with the SHELL_INGRESS connector.\n\n\
Examples:\n  kiln exec mvm-0a1b2c -- ls -l /\n  kiln exec mvm-0a1b2c --sh 'ps | grep app'\n  \
echo hello | kiln exec mvm-0a1b2c -- cat\n  kiln exec mvm-0a1b2c --background -- sleep 600"
)]
pub struct ExecArgs {
    /// The MicroVM's id or ARN.
    pub microvm: String,
    /// Shell text to run with /bin/sh -c (instead of a command after --).
    #[arg(long = "sh", value_name = "TEXT")]
    pub shell: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub cwd: Option<String>,
    /// User to run as: name[:group] or uid[:gid] (default root).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Start it and print its handle instead of waiting (`kiln exec` … `--wait`/`--kill` later).
    #[arg(long)]
    pub background: bool,
    /// Do not forward stdin even when it is not a terminal.
    #[arg(long)]
    pub no_stdin: bool,
    /// The command and its arguments.
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// `kiln cp` flags.
#[derive(Args, Debug)]
#[command(after_help = "One side names the MicroVM as ID:/path.\n\n\
Examples:\n  kiln cp ./data.csv mvm-0a1b2c:/srv/data.csv\n  kiln cp mvm-0a1b2c:/var/log/app.log .")]
pub struct CpArgs {
    /// Source: a local file or MICROVM:/path.
    pub source: String,
    /// Destination: a local path or MICROVM:/path (a directory keeps the source's name).
    pub dest: String,
    /// Permission bits of an uploaded file, octal.
    #[arg(long, default_value = "0644")]
    pub mode: String,
}

/// Whether `s` names a MicroVM (an id as kilnd makes them, or a MicroVM ARN) rather than
/// an image.
pub fn is_microvm(s: &str) -> bool {
    let id = s
        .strip_prefix("arn:")
        .and_then(|_| s.rsplit_once(":microvm:").map(|(_, id)| id))
        .unwrap_or(s);
    id.strip_prefix("mvm-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `MICROVM:/path` split, when `s` has that form.
fn remote(s: &str) -> Option<(&str, &str)> {
    let at = s.find(":/")?;
    let (vm, path) = (&s[..at], &s[at + 1..]);
    is_microvm(vm).then_some((vm, path))
}

fn vm_path(id: &str, rest: &str) -> String {
    format!(
        "/kiln/v1/microvms/{}/{rest}",
        kiln_api::uri::percent_encode(id)
    )
}

/// `kiln exec VM -- cmd…`: streams the command's output; exits with its exit code (128+N for
/// signal N, 124 when its timeout killed it).
pub async fn exec(g: &Global, kilnd: &Kilnd, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut body = json!({});
    match (&a.shell, a.argv.is_empty()) {
        (Some(text), true) => body["command"] = json!(text),
        (None, false) => body["argv"] = json!(a.argv),
        _ => bail!(
            "give the command after -- (kiln exec VM -- ls -l) or as --sh 'shell text', not both"
        ),
    }
    let mut env = serde_json::Map::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))?;
        env.insert(k.to_string(), json!(v));
    }
    body["env"] = Value::Object(env);
    if let Some(cwd) = &a.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(user) = &a.user {
        body["user"] = json!(user);
    }
    if let Some(t) = a.timeout {
        body["timeoutSeconds"] = json!(t);
    }
    if a.background {
        body["background"] = json!(true);
    }
    let stdin = std::io::stdin();
    if !a.no_stdin && !a.background && !stdin.is_terminal() {
        let mut data = Vec::new();
        stdin
            .lock()
            .take(MAX_STDIN as u64 + 1)
            .read_to_end(&mut data)
            .context("reading stdin")?;
        if data.len() > MAX_STDIN {
            bail!(
                "stdin is larger than {} KiB: copy it in with `kiln cp` and redirect it in the command",
                MAX_STDIN >> 10
            );
        }
        body["stdin"] = json!(B64.encode(&data));
    }
    let resp = kilnd
        .kiln(Method::POST, &vm_path(&a.microvm, "exec"), Some(&body))
        .await?;
    if a.background {
        let v: Value =
            serde_json::from_slice(&resp.bytes().await.context("reading kilnd's answer")?)
                .context("kilnd's answer is not JSON")?;
        match g.output {
            Output::Json => println!("{v}"),
            Output::Table => println!("{}", v["execId"].as_str().unwrap_or_default()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = resp.bytes_stream();
    let mut pending = Vec::new();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let json_output = g.output == Output::Json;
    let mut exit: Option<Value> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the command's output stream from kilnd broke off")?;
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let event: Value = serde_json::from_slice(&line)
                .context("kilnd sent an exec event that is not JSON")?;
            let data = || {
                B64.decode(event["data"].as_str().unwrap_or_default())
                    .unwrap_or_default()
            };
            match event["type"].as_str() {
                Some("stdout") if json_output => out.extend(data()),
                Some("stderr") if json_output => err.extend(data()),
                Some("stdout") => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&data())?;
                    o.flush()?;
                }
                Some("stderr") => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&data())?;
                    e.flush()?;
                }
                Some("exit") => exit = Some(event.clone()),
                Some("error") => bail!(
                    "the command could not be followed to its end: {}",
                    event["message"].as_str().unwrap_or_default()
                ),
                _ => {}
            }
        }
    }
    let exit = exit.context("kilnd's exec stream ended without the command's exit")?;
    let code = if exit["timedOut"].as_bool() == Some(true) {
        124
    } else if let Some(c) = exit["exitCode"].as_i64() {
        c
    } else if let Some(s) = exit["signal"].as_i64() {
        128 + s
    } else {
        1
    };
    if json_output {
        println!(
            "{}",
            json!({
                "stdout": String::from_utf8_lossy(&out),
                "stderr": String::from_utf8_lossy(&err),
                "exitCode": exit["exitCode"],
                "signal": exit["signal"],
                "timedOut": exit["timedOut"],
            })
        );
    }
    Ok(ExitCode::from((code & 0xff) as u8))
}

/// `kiln cp SRC DST`, one side `MICROVM:/path`.
pub async fn cp(g: &Global, kilnd: &Kilnd, a: CpArgs) -> anyhow::Result<ExitCode> {
    match (remote(&a.source), remote(&a.dest)) {
        (None, Some((vm, path))) => upload(g, kilnd, Path::new(&a.source), vm, path, &a.mode).await,
        (Some((vm, path)), None) => download(g, kilnd, vm, path, Path::new(&a.dest)).await,
        (Some(_), Some(_)) => bail!("copy between MicroVMs through a local file: kiln cp VM1:/f f && kiln cp f VM2:/f"),
        (None, None) => bail!(
            "one side of kiln cp must be MICROVM:/path (e.g. mvm-0a1b2c…:/srv/file); neither {:?} nor {:?} is",
            a.source,
            a.dest
        ),
    }
}

/// The SHA-256 of a local file, read in pieces.
fn file_sha256(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        ctx.update(&buf[..n]);
    }
    let hex = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, len))
}

async fn upload(
    g: &Global,
    kilnd: &Kilnd,
    local: &Path,
    vm: &str,
    path: &str,
    mode: &str,
) -> anyhow::Result<ExitCode> {
    if local.is_dir() {
        bail!(
            "{} is a directory: kiln cp copies single files (tar it first)",
            local.display()
        );
    }
    let mut dest = path.to_string();
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} names no file", local.display()))?;
    if dest.ends_with('/') {
        dest.push_str(&name);
    } else {
        let stat = kilnd
            .kiln(
                Method::GET,
                &format!(
                    "{}?path={}",
                    vm_path(vm, "files/stat"),
                    kiln_api::uri::percent_encode(&dest)
                ),
                None,
            )
            .await;
        if let Ok(resp) = stat {
            let v: Value = json_of(resp).await;
            if v["type"] == "dir" {
                dest = format!("{}/{name}", dest.trim_end_matches('/'));
            }
        }
    }
    let local_owned = local.to_path_buf();
    let (sha, _len) = tokio::task::spawn_blocking(move || file_sha256(&local_owned))
        .await
        .context("hashing the file")??;
    let file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("opening {}", local.display()))?;
    let pieces = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let url = format!(
        "{}?path={}&mode={}",
        vm_path(vm, "files"),
        kiln_api::uri::percent_encode(&dest),
        kiln_api::uri::percent_encode(mode)
    );
    let resp = kilnd
        .kiln_put_streamed(&url, reqwest::Body::wrap_stream(pieces), &sha)
        .await?;
    let v: Value = json_of(resp).await;
    match g.output {
        Output::Json => println!("{}", json!({"path": dest, "sha256": sha, "stat": v})),
        Output::Table => eprintln!("{} → {vm}:{dest} ({} bytes)", local.display(), v["size"]),
    }
    Ok(ExitCode::SUCCESS)
}

async fn download(
    g: &Global,
    kilnd: &Kilnd,
    vm: &str,
    path: &str,
    local: &Path,
) -> anyhow::Result<ExitCode> {
    let name = path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("{path} names no file"))?;
    let target: PathBuf = if local.is_dir() {
        local.join(name)
    } else {
        local.to_path_buf()
    };
    let url = format!(
        "{}?path={}",
        vm_path(vm, "files"),
        kiln_api::uri::percent_encode(path)
    );
    let resp = kilnd.kiln(Method::GET, &url, None).await?;
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.kiln-part-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = async {
        let mut out = tokio::fs::File::create(&temp)
            .await
            .with_context(|| format!("creating {}", temp.display()))?;
        let mut stream = resp.bytes_stream();
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("the download from kilnd broke off; nothing was kept")?;
            len += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        tokio::fs::rename(&temp, &target)
            .await
            .with_context(|| format!("moving the download to {}", target.display()))?;
        Ok::<u64, anyhow::Error>(len)
    }
    .await;
    let len = match result {
        Ok(len) => len,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
    };
    match g.output {
        Output::Json => println!("{}", json!({"path": target, "size": len})),
        Output::Table => eprintln!("{vm}:{path} → {} ({len} bytes)", target.display()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn json_of(resp: reqwest::Response) -> Value {
    match resp.bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// `kiln logs MICROVM [--follow]`: the app's stdout and stderr since launch.
pub async fn app_logs(kilnd: &Kilnd, vm: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let path = format!(
        "{}{}",
        vm_path(vm, "logs"),
        if follow { "?follow=true" } else { "" }
    );
    let resp = kilnd.kiln(Method::GET, &path, None).await?;
    if resp.headers().get("x-kiln-logging").is_some() {
        eprintln!("kiln: {vm} runs with logging disabled: its app's output is not kept");
    }
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the log stream from kilnd broke off")?;
        let mut out = std::io::stdout().lock();
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_microvm_when_id_or_arn_then_true_and_image_names_false() {
        assert!(is_microvm("mvm-0a1b2c3d4e5f60718a"));
        assert!(is_microvm(
            "arn:aws:lambda:local:000000000000:microvm:mvm-0a1b"
        ));
        assert!(!is_microvm("web"));
        assert!(!is_microvm("mvm-web"));
        assert!(!is_microvm(
            "arn:aws:lambda:local:000000000000:microvm-image:web"
        ));
    }

    #[test]
    fn remote_when_vm_colon_path_then_split_and_local_paths_not() {
        assert_eq!(remote("mvm-0a1b:/srv/f"), Some(("mvm-0a1b", "/srv/f")));
        assert_eq!(
            remote("arn:aws:lambda:local:000000000000:microvm:mvm-0a:/x"),
            Some(("arn:aws:lambda:local:000000000000:microvm:mvm-0a", "/x"))
        );
        assert_eq!(remote("./data:/x"), None);
        assert_eq!(remote("/tmp/file"), None);
    }
}
