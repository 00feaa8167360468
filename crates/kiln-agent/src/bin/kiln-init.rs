//! kiln-init: the guest's PID 1. It boots the guest (mounts, modules, root switch,
//! network), then serves the agent protocol on the virtio-serial port.
//! `kiln-init --serve-unix PATH` serves the agent on a unix socket instead, for development;
//! `kiln-init --serve-envd ADDR [--detach]` serves E2B's envd (token in KILN_ENVD_TOKEN).

use std::os::unix::net::UnixListener;
use std::path::Path;

use kiln_agent::console;
use kiln_agent::guest::agent::{Agent, AgentConfig, EofPolicy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("--serve-unix"), Some(path)) => {
            if let Err(message) = serve_unix(Path::new(path)) {
                console!("{message}");
                std::process::exit(1);
            }
        }
        (Some("--serve-envd"), Some(addr)) => {
            // envd on ADDR with the token in KILN_ENVD_TOKEN; `--detach` (kilnd's way, over
            // the agent) returns once it listens.
            let detach = args.get(3).map(String::as_str) == Some("--detach");
            if let Err(e) = kiln_agent::guest::envd::serve_from_command_line(addr, detach) {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        (Some(kiln_agent::guest::warm::PROBE_FLAG), Some(port)) => {
            // The agent's warm-up: one HTTP exchange with the agent on the guest's loopback.
            if let Err(e) = kiln_agent::guest::warm::probe(port) {
                eprintln!("warm-up probe: {e}");
                std::process::exit(1);
            }
        }
        _ if std::process::id() == 1 => kiln_agent::guest::boot::run_as_pid1(),
        _ => {
            eprintln!("usage: kiln-init (as PID 1) | kiln-init --serve-unix PATH | kiln-init --serve-envd ADDR [--detach] | kiln-init --warm-probe PORT");
            std::process::exit(2);
        }
    }
}

/// Serves each connection on `path` in its own thread; the agent outlives connections.
fn serve_unix(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            ))
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    let agent = Agent::new(AgentConfig { guest_ops: false });
    console!("agent ready on {}", path.display());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                console!("accept on {} failed: {e}", path.display());
                continue;
            }
        };
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                let writer = match stream.try_clone() {
                    Ok(writer) => writer,
                    Err(e) => return console!("cannot duplicate the connection: {e}"),
                };
                if let Err(e) = agent.serve(stream, writer, EofPolicy::Return) {
                    console!("connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            console!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}
