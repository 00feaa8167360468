//! `kiln`: the command-line interface.

mod client;
mod demo;
mod doctor;
mod endpoint;
mod input;
mod logs;
mod operations;
mod progress;
mod render;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::client::{ApiFailure, Kilnd};
use kiln_sigv4::CredentialSources;
use kiln_sigv4::RequestSigner;

/// kiln runs each user's code in a microVM restored from a snapshot of the running app.
#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about,
    long_about = None,
    after_help = "Every AWS lambda-microvms operation is a subcommand too, named as the AWS CLI \
                  names it (`kiln run-microvm --image-identifier web`).\n\n\
                  A first walk:\n  \
                  kiln build ./app --name web\n  \
                  kiln run web\n  \
                  kiln curl mvm-… /\n  \
                  kiln ls"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// The help heading of the flags every command takes.
const GLOBAL: &str = "Global options";

/// Flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Data directory (guest kernels, base images, kilnd's credentials and CA).
    #[arg(long, global = true, env = "KILN_HOME", value_name = "DIR", help_heading = GLOBAL)]
    pub home: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table, help_heading = GLOBAL)]
    pub output: Output,
    /// kilnd's API address.
    #[arg(
        long,
        visible_alias = "endpoint-url",
        global = true,
        env = "KILN_ENDPOINT",
        default_value = "http://127.0.0.1:7171",
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub endpoint: String,
    /// Region of the request signature [default: AWS_REGION, AWS_DEFAULT_REGION, else local].
    #[arg(long, global = true, value_name = "REGION", help_heading = GLOBAL)]
    pub region: Option<String>,
    /// Credentials profile to sign with [default: AWS_PROFILE, else default].
    #[arg(long, global = true, value_name = "NAME", help_heading = GLOBAL)]
    pub profile: Option<String>,
}

impl Global {
    /// The data directory.
    pub fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(kiln_vmm::home::kiln_home)
    }

    /// The signature's region.
    pub fn region(&self) -> String {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "local".into())
    }

    /// A client of kilnd, signing with the credentials found.
    pub fn kilnd(&self) -> anyhow::Result<Kilnd> {
        let credentials =
            CredentialSources::from_env(self.profile.clone(), &self.home()).resolve()?;
        Kilnd::new(
            &self.endpoint,
            RequestSigner::new(credentials, self.region()),
        )
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Readable text for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Zip a directory with a Dockerfile and build it into an image version.
    Build(verbs::build::BuildArgs),
    /// Start a MicroVM from an image and print its endpoint and a token.
    Run(verbs::run::RunArgs),
    /// List MicroVMs (or, with `images`, images).
    Ls(verbs::ls::LsArgs),
    /// List images with their newest version and its state.
    #[command(after_help = "Example:\n  kiln images")]
    Images,
    /// Send an HTTPS request to a MicroVM's app through its endpoint.
    Curl(verbs::curl::CurlArgs),
    /// Suspend MicroVMs: memory and disk go to disk until they resume.
    #[command(after_help = "Example:\n  kiln suspend mvm-0a1b2c")]
    Suspend(verbs::session::Ids),
    /// Resume suspended MicroVMs.
    #[command(after_help = "Example:\n  kiln resume mvm-0a1b2c")]
    Resume(verbs::session::Ids),
    /// Terminate MicroVMs.
    #[command(after_help = "Example:\n  kiln rm mvm-0a1b2c mvm-3d4e5f")]
    Rm(verbs::session::Ids),
    /// Open an interactive shell in a MicroVM (run with the SHELL_INGRESS connector).
    Shell(verbs::shell::ShellArgs),
    /// Run a command in a MicroVM (run with the SHELL_INGRESS connector); exits with its code.
    Exec(verbs::sandbox::ExecArgs),
    /// Copy a file into or out of a MicroVM (one side MICROVM:/path).
    Cp(verbs::sandbox::CpArgs),
    /// Manage the access keys kilnd accepts (list, create, revoke).
    #[command(
        subcommand,
        after_help = "Example:\n  kiln keys create --principal alice"
    )]
    Keys(verbs::keys::KeysCommand),
    /// Manage the operator's egress connectors (list, create, show, delete).
    #[command(
        subcommand,
        after_help = "Example:\n  kiln connectors create pypi --allow '*.pypi.org:443'"
    )]
    Connectors(verbs::connectors::ConnectorsCommand),
    /// Show what a MicroVM's guest tried to reach: connections and lookups, allowed or blocked.
    #[command(after_help = "Example:\n  kiln flows mvm-0a1b2c --blocked")]
    Flows(verbs::connectors::FlowsArgs),
    /// Show the audit log: who changed what, and what kilnd did on its own.
    Events(verbs::events::EventsArgs),
    /// Show your quotas (limit and use of each) and the API rates.
    Quotas(verbs::quotas::QuotasArgs),
    /// Show what MicroVMs used: vCPU-seconds, GiB-seconds, suspended seconds, snapshot bytes.
    Usage(verbs::usage::UsageArgs),
    /// Print an image version's build log, or a MicroVM's app output (`--follow` streams it).
    #[command(
        after_help = "A MicroVM id (mvm-…) or ARN prints that MicroVM's app stdout and stderr;\n\
anything else names an image and prints its build log.\n\n\
Examples:\n  kiln logs web --follow\n  kiln logs mvm-0a1b2c --follow"
    )]
    Logs {
        /// The image's name, or a MicroVM's id or ARN.
        image: String,
        /// The version (default: the newest).
        #[arg(long)]
        version: Option<String>,
        /// Keep streaming until the build ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Check that this host can run microVMs, fetching the guest kernel if needed.
    ///
    /// Exits 0 only when VMs can run; otherwise says what to install.
    #[command(after_help = "Example:\n  kiln doctor")]
    Doctor,
    /// Boot a microVM, snapshot it while a process runs, and restore it twice.
    #[command(after_help = "Example:\n  kiln demo")]
    Demo,
    /// Point E2B's SDKs at this kilnd (`eval "$(kiln e2b env)"`).
    #[command(subcommand, after_help = "Example:\n  eval \"$(kiln e2b env)\"")]
    E2b(verbs::e2b::E2bCommand),
    /// Print the path of the local CA that signs MicroVM endpoints (give it to HTTPS clients).
    #[command(
        after_help = "Example:\n  curl --cacert \"$(kiln ca)\" https://mvm-….kiln.localhost:7443/"
    )]
    Ca,
}

/// The whole command line: kiln's own commands, then one subcommand per AWS operation.
fn command_line() -> clap::Command {
    let mut cmd = Cli::command();
    for spec in operations::OPERATIONS {
        cmd = cmd.subcommand(spec.command());
    }
    cmd
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let matches = command_line().get_matches();
    let result = match matches.subcommand() {
        Some((name, sub)) if operations::by_command(name).is_some() => {
            match Global::from_arg_matches(&matches) {
                Ok(global) => operation(&global, name, sub),
                Err(e) => e.exit(),
            }
        }
        _ => match Cli::from_arg_matches(&matches) {
            Ok(cli) => run(cli),
            Err(e) => e.exit(),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error, its causes, and for API errors what to do.
fn report(e: &anyhow::Error) {
    match e.downcast_ref::<ApiFailure>() {
        Some(f) => {
            eprintln!("error: {e:#}");
            eprintln!("hint: {}", f.hint());
        }
        None => eprintln!("error: {e:#}"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// One AWS operation from its subcommand's flags.
fn operation(global: &Global, name: &str, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    let Some(spec) = operations::by_command(name) else {
        anyhow::bail!("unknown operation {name}");
    };
    let call = spec.call(matches)?;
    let kilnd = global.kilnd()?;
    let out = runtime()?.block_on(async {
        if spec.merge_pages(matches) {
            kilnd.call_all_pages(&call).await
        } else {
            kilnd.call(&call).await
        }
    })?;
    render::print(&out, global.output);
    Ok(ExitCode::SUCCESS)
}

/// Runs an async command to its end.
fn block(
    f: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(f)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Doctor => doctor::run(&g.home(), g.output),
        Command::Demo => demo::run(&g.home(), g.output),
        Command::Ca => ca(&g.home(), g.output),
        Command::Build(a) => block(verbs::build::run(g, &g.kilnd()?, a)),
        Command::Run(a) => block(verbs::run::run(g, &g.kilnd()?, a)),
        Command::Ls(a) => block(verbs::ls::run(g, &g.kilnd()?, a)),
        Command::Images => block(verbs::ls::images(g, &g.kilnd()?)),
        Command::Curl(a) => block(verbs::curl::run(g, &g.kilnd()?, a)),
        Command::Suspend(ids) => block(verbs::session::suspend(g, &g.kilnd()?, ids)),
        Command::Resume(ids) => block(verbs::session::resume(g, &g.kilnd()?, ids)),
        Command::Rm(ids) => block(verbs::session::rm(g, &g.kilnd()?, ids)),
        Command::Keys(k) => block(verbs::keys::run(g, &g.kilnd()?, k)),
        Command::Connectors(c) => block(verbs::connectors::run(g, &g.kilnd()?, c)),
        Command::Flows(a) => block(verbs::connectors::flows(g, &g.kilnd()?, a)),
        Command::Events(a) => block(verbs::events::run(g, &g.kilnd()?, a)),
        Command::Quotas(a) => block(verbs::quotas::run(g, &g.kilnd()?, a)),
        Command::Usage(a) => block(verbs::usage::run(g, &g.kilnd()?, a)),
        Command::Shell(a) => block(verbs::shell::run(g, &g.kilnd()?, a)),
        Command::E2b(c) => block(verbs::e2b::run(g, &g.kilnd()?, c)),
        Command::Exec(a) => block(verbs::sandbox::exec(g, &g.kilnd()?, a)),
        Command::Cp(a) => block(verbs::sandbox::cp(g, &g.kilnd()?, a)),
        Command::Logs {
            image,
            version: None,
            follow,
        } if verbs::sandbox::is_microvm(&image) => {
            block(verbs::sandbox::app_logs(&g.kilnd()?, &image, follow))
        }
        Command::Logs {
            image,
            version,
            follow,
        } => block(logs::run(&g.kilnd()?, &image, version.as_deref(), follow)),
    }
}

/// `kiln ca`: where the endpoint CA certificate is.
fn ca(home: &std::path::Path, output: Output) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}
