//! `kiln`: the command-line interface.

mod demo;
mod doctor;
mod logs;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// kiln runs each user's code in a microVM restored from a snapshot of the running app.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    /// Data directory (guest kernels, base images, snapshots, VMs).
    #[arg(long, global = true, env = "KILN_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Readable text for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run microVMs, fetching the guest kernel if needed.
    ///
    /// Exits 0 only when VMs can run; otherwise says what to install.
    Doctor,
    /// Boot a microVM, snapshot it while a process runs, and restore it twice.
    Demo,
    /// Print the path of the local CA that signs MicroVM endpoints (give it to HTTPS clients).
    Ca,
    /// Print an image version's build log (`--follow` streams it until the build ends).
    Logs {
        /// The image's name.
        image: String,
        /// The version (default: the newest).
        #[arg(long)]
        version: Option<String>,
        /// Keep streaming until the build ends.
        #[arg(long, short)]
        follow: bool,
        /// kilnd's API address.
        #[arg(long, env = "KILN_ENDPOINT", default_value = "http://127.0.0.1:7171")]
        endpoint: String,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let home = cli.home.unwrap_or_else(kiln_vmm::home::kiln_home);
    let result = match cli.command {
        Command::Doctor => doctor::run(&home, cli.output),
        Command::Demo => demo::run(&home, cli.output),
        Command::Ca => ca(&home, cli.output),
        Command::Logs {
            image,
            version,
            follow,
            endpoint,
        } => logs::run(&endpoint, &image, version.as_deref(), follow),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kiln ca`: where the endpoint CA certificate is.
fn ca(home: &std::path::Path, output: Output) -> anyhow::Result<std::process::ExitCode> {
    let path = home.join("tls").join("ca.pem");
    if !path.exists() {
        anyhow::bail!(
            "no endpoint CA yet at {}: kilnd creates it on its first start (run kilnd, or pass --home)",
            path.display()
        );
    }
    match output {
        Output::Json => println!("{}", serde_json::json!({ "caPath": path })),
        Output::Table => println!("{}", path.display()),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
