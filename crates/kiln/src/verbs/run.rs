//! `kiln run IMAGE`: start a MicroVM, wait until it runs, and hand out a token for it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kiln_api::shapes::{
    CreateMicrovmAuthTokenRequest, CreateMicrovmAuthTokenResponse, IdlePolicy, MicrovmDescription,
    MicrovmState, PortSpecification, RunMicrovmRequest,
};
use kiln_api::Operation;
use serde_json::json;

use crate::client::{Call, Kilnd};
use crate::render::key_values;
use crate::{input, Global, Output};

/// The header a token travels in to a MicroVM's endpoint.
pub const AUTH_HEADER: &str = "X-aws-proxy-auth";
/// The header naming the guest port, when it is not 8080.
pub const PORT_HEADER: &str = "X-aws-proxy-port";
/// The guest port an endpoint reaches when a request names none.
pub const DEFAULT_PORT: u16 = 8080;

/// `kiln run` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  kiln run web\n  kiln run web --idle 600 --port 8080 --open\n  kiln run web --shell && kiln shell mvm-…\n  TOKEN=$(kiln run web --output json | jq -r .token)"
)]
pub struct RunArgs {
    /// The image's name or ARN.
    pub image: String,
    /// The version to run [default: the newest active one].
    #[arg(long)]
    pub version: Option<String>,
    /// Suspend the MicroVM after this many seconds without inbound traffic (a request
    /// resumes it).
    #[arg(long, value_name = "SECONDS")]
    pub idle: Option<i32>,
    /// With --idle: terminate it after this many seconds suspended.
    #[arg(
        long,
        default_value_t = 86_400,
        value_name = "SECONDS",
        requires = "idle"
    )]
    pub keep_suspended: i32,
    /// Allow `kiln shell` into it (attaches the SHELL_INGRESS network connector).
    #[arg(long)]
    pub shell: bool,
    /// Egress connectors (repeatable): INTERNET_EGRESS or an operator connector's name or
    /// ARN (`kiln connectors ls`) [default: INTERNET_EGRESS].
    #[arg(
        long = "egress",
        value_name = "CONNECTOR",
        conflicts_with = "no_egress"
    )]
    pub egress: Vec<String>,
    /// No egress at all: the guest reaches nothing outside itself.
    #[arg(long)]
    pub no_egress: bool,
    /// Hard limit on its life, seconds (default 8 hours).
    #[arg(long, value_name = "SECONDS")]
    pub max_duration: Option<i32>,
    /// The guest port the token opens.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Minutes the token lasts (1-60).
    #[arg(long, default_value_t = 60, value_name = "MINUTES", value_parser = clap::value_parser!(i32).range(1..=60))]
    pub token_minutes: i32,
    /// Open the endpoint with xdg-open (browsers must add the token header themselves).
    #[arg(long)]
    pub open: bool,
}

/// Starts a MicroVM and waits until it runs (or fails to).
pub async fn launch(kilnd: &Kilnd, body: &RunMicrovmRequest) -> anyhow::Result<MicrovmDescription> {
    let vm: MicrovmDescription = kilnd
        .call_as(&Call::new(Operation::RunMicrovm).json(body)?)
        .await?;
    wait_running(kilnd, vm).await
}

/// Polls a MicroVM until it leaves PENDING; an error if it did not reach RUNNING.
pub async fn wait_running(
    kilnd: &Kilnd,
    mut vm: MicrovmDescription,
) -> anyhow::Result<MicrovmDescription> {
    let mut waited = Duration::ZERO;
    while vm.state == MicrovmState::Pending {
        if waited > Duration::from_secs(600) {
            bail!("MicroVM {} is still PENDING after {} s; see `kiln get-microvm --microvm-identifier {}`", vm.microvm_id, waited.as_secs(), vm.microvm_id);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        waited += Duration::from_millis(250);
        vm = describe(kilnd, &vm.microvm_id).await?;
    }
    if vm.state != MicrovmState::Running {
        bail!(
            "MicroVM {} is {}, not RUNNING: {}",
            vm.microvm_id,
            vm.state,
            vm.state_reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(vm)
}

/// `GetMicrovm`.
pub async fn describe(kilnd: &Kilnd, id: &str) -> anyhow::Result<MicrovmDescription> {
    kilnd
        .call_as(&Call::new(Operation::GetMicrovm).label("microvmIdentifier", id))
        .await
}

/// A token that opens `port` of MicroVM `id` for `minutes`.
pub async fn token(kilnd: &Kilnd, id: &str, port: u16, minutes: i32) -> anyhow::Result<String> {
    let body = CreateMicrovmAuthTokenRequest {
        expiration_in_minutes: minutes,
        allowed_ports: vec![PortSpecification::Port(i32::from(port))],
    };
    let call = Call::new(Operation::CreateMicrovmAuthToken)
        .label("microvmIdentifier", id)
        .json(&body)?;
    let out: CreateMicrovmAuthTokenResponse = kilnd.call_as(&call).await?;
    out.auth_token
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(AUTH_HEADER))
        .map(|(_, v)| v.clone())
        .with_context(|| {
            format!(
                "kilnd's token for {id} has no {AUTH_HEADER} entry (it sent {:?})",
                out.auth_token.keys().collect::<Vec<_>>()
            )
        })
}

/// Runs `kiln run`.
pub async fn run(g: &Global, kilnd: &Kilnd, a: RunArgs) -> anyhow::Result<ExitCode> {
    let body = RunMicrovmRequest {
        ingress_network_connectors: a
            .shell
            .then(|| vec!["HTTP_INGRESS".to_string(), "SHELL_INGRESS".to_string()]),
        egress_network_connectors: if a.no_egress {
            Some(Vec::new())
        } else if a.egress.is_empty() {
            None
        } else {
            Some(a.egress.clone())
        },
        image_identifier: a.image.clone(),
        image_version: a.version.clone(),
        execution_role_arn: None,
        idle_policy: a.idle.map(|idle| IdlePolicy {
            max_idle_duration_seconds: idle,
            suspended_duration_seconds: a.keep_suspended,
            auto_resume_enabled: true,
        }),
        logging: None,
        kms_key_identifier: None,
        run_hook_payload: None,
        maximum_duration_in_seconds: a.max_duration,
        client_token: Some(input::client_token()?),
    };
    let vm = launch(kilnd, &body).await?;
    let token = token(kilnd, &vm.microvm_id, a.port, a.token_minutes)
        .await
        .with_context(|| {
            format!(
                "MicroVM {} runs, but no token for it was issued (`kiln rm {}` ends it)",
                vm.microvm_id, vm.microvm_id
            )
        })?;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
        + f64::from(a.token_minutes) * 60.0;
    let url = format!("{}/", vm.endpoint.trim_end_matches('/'));
    match g.output {
        Output::Json => {
            let v = json!({
                "microvmId": vm.microvm_id,
                "state": vm.state,
                "endpoint": vm.endpoint,
                "imageArn": vm.image_arn,
                "imageVersion": vm.image_version,
                "port": a.port,
                "token": token,
                "tokenExpiresAt": expires,
                "caPath": g.home().join("tls/ca.pem"),
            });
            println!("{}", crate::render::json(&v));
        }
        Output::Table => {
            let mut pairs = vec![
                ("id".to_string(), vm.microvm_id.clone()),
                ("state".to_string(), vm.state.to_string()),
                (
                    "image".to_string(),
                    format!(
                        "{}:{}",
                        crate::render::image_name(&vm.image_arn),
                        vm.image_version
                    ),
                ),
                ("endpoint".to_string(), vm.endpoint.clone()),
                ("port".to_string(), a.port.to_string()),
                ("token".to_string(), token.clone()),
                ("expires".to_string(), crate::render::timestamp(expires)),
            ];
            if let Some(idle) = &vm.idle_policy {
                pairs.push((
                    "idle".to_string(),
                    format!("suspend after {} s idle", idle.max_idle_duration_seconds),
                ));
            }
            print!("{}", key_values(&pairs));
            eprintln!(
                "\ncall it: kiln curl {} /{}",
                vm.microvm_id,
                if a.port == DEFAULT_PORT {
                    String::new()
                } else {
                    format!(" --port {}", a.port)
                }
            );
        }
    }
    if a.open {
        open(&url);
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens `url` with xdg-open when there is one, else prints it.
fn open(url: &str) {
    eprintln!(
        "note: browsers do not send {AUTH_HEADER} on their own: the page answers 403 until an \
         extension adds the header with the token above, and the browser must trust kiln's CA \
         (`kiln ca` prints its path)"
    );
    match std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        _ => eprintln!("open {url} in a browser (xdg-open is not available here)"),
    }
}
