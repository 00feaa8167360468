//! `kiln shell VM`: an interactive shell in a MicroVM, over its HTTPS endpoint.
//!
//! A shell token (CreateMicrovmShellAuthToken) opens a WebSocket on the endpoint; kilnd runs
//! `/bin/sh -l` on a terminal in the guest through its agent. On a terminal, kiln puts the
//! local one in raw mode and forwards window-size changes; with piped input it types the
//! input and prints what the shell answers, so `echo 'ls /' | kiln shell VM` works in scripts.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use kiln_api::shapes::microvm::{
    CreateMicrovmShellAuthTokenRequest, CreateMicrovmShellAuthTokenResponse,
};
use kiln_api::Operation;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Call, Kilnd};
use crate::endpoint::EndpointClient;
use crate::verbs::run::{describe, AUTH_HEADER};
use crate::Global;

/// `kiln shell` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "The MicroVM must have been run with the SHELL_INGRESS connector:\n  \
kiln run-microvm --image-identifier web --ingress-network-connectors SHELL_INGRESS\n\n\
Examples:\n  kiln shell mvm-0a1b2c\n  echo 'cat /etc/os-release' | kiln shell mvm-0a1b2c"
)]
pub struct ShellArgs {
    /// The MicroVM's id or ARN.
    pub microvm: String,
    /// Minutes the shell token stays valid for opening the session.
    #[arg(long, default_value_t = 5)]
    pub token_minutes: i32,
    /// CA certificate the endpoint is checked against [default: <home>/tls/ca.pem].
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
}

/// A shell token for MicroVM `id`.
async fn shell_token(kilnd: &Kilnd, id: &str, minutes: i32) -> anyhow::Result<String> {
    let call = Call::new(Operation::CreateMicrovmShellAuthToken)
        .label("microvmIdentifier", id)
        .json(&CreateMicrovmShellAuthTokenRequest {
            expiration_in_minutes: minutes,
        })?;
    let out: CreateMicrovmShellAuthTokenResponse = kilnd.call_as(&call).await?;
    out.auth_token
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(AUTH_HEADER))
        .map(|(_, v)| v.clone())
        .with_context(|| format!("kilnd's shell token for {id} has no {AUTH_HEADER} entry"))
}

/// The local terminal's size, when stdout is one.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which lives across the call.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The local terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("entering raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = nix::sys::termios::tcsetattr(
            stdin.as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

/// Runs `kiln shell`; exits with the shell's exit code.
pub async fn run(g: &Global, kilnd: &Kilnd, a: ShellArgs) -> anyhow::Result<ExitCode> {
    let vm = describe(kilnd, &a.microvm).await?;
    let token = shell_token(kilnd, &vm.microvm_id, a.token_minutes).await?;
    let ca = a
        .cacert
        .clone()
        .unwrap_or_else(|| g.home().join("tls").join("ca.pem"));
    let endpoint = EndpointClient::new(&vm.endpoint, kilnd.endpoint(), &ca)?;
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (cols, rows) = window_size().unwrap_or((80, 24));
    let url = endpoint.url(&format!("/?cols={cols}&rows={rows}"))?;
    let resp = endpoint
        .http
        .get(url.clone())
        .header(AUTH_HEADER, &token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "no answer from {url} (MicroVM {}, {}): {}",
                vm.microvm_id,
                vm.state,
                crate::client::root_cause(&e)
            )
        })?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("the endpoint refused the shell ({status}): {}", text.trim());
    }
    let upgraded = resp
        .upgrade()
        .await
        .context("switching the connection to WebSocket")?;
    let ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(upgraded, Role::Client, None).await;
    let (mut to_vm, mut from_vm) = ws.split();

    let _raw = if interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    // Standard input is read on a thread of its own (a blocking read cannot be cancelled).
    let (typed_tx, mut typed) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if typed_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watching the terminal's size")?;
    let mut stdin_open = true;
    let mut reason = None;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            data = typed.recv(), if stdin_open => match data {
                Some(data) => {
                    if to_vm.send(Message::binary(data)).await.is_err() {
                        break;
                    }
                }
                None => stdin_open = false,
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = window_size() {
                    let resize = serde_json::json!({"resize": {"cols": cols, "rows": rows}});
                    let _ = to_vm.send(Message::text(resize.to_string())).await;
                }
            },
            message = from_vm.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Close(frame))) => {
                    reason = frame.map(|f| f.reason.to_string());
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(_raw);
                    bail!("the shell session broke off: {e}");
                }
                None => break,
            },
        }
    }
    drop(_raw);
    let code = reason
        .as_deref()
        .and_then(|r| r.strip_prefix("exit "))
        .and_then(|c| c.parse::<u8>().ok());
    match (code, reason) {
        (Some(code), _) => Ok(ExitCode::from(code)),
        (None, Some(r)) if !r.is_empty() => {
            eprintln!("kiln: the shell ended: {r}");
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
