//! `kiln curl VM PATH`: one HTTPS request to a MicroVM's app through its endpoint, with a
//! fresh token.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::client::Kilnd;
use crate::endpoint::EndpointClient;
use crate::verbs::run::{describe, token, AUTH_HEADER, DEFAULT_PORT, PORT_HEADER};
use crate::{Global, Output};

/// Minutes the token `kiln curl` asks for lasts: one request needs little.
const TOKEN_MINUTES: i32 = 5;

/// `kiln curl` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "The status line goes to stderr and the body to stdout (-i puts both on stdout).\n\n\
Examples:\n  kiln curl mvm-0a1b2c /\n  kiln curl mvm-0a1b2c /items -X POST -d '{\"name\":\"x\"}' -H 'Content-Type: application/json'\n  kiln curl mvm-0a1b2c /metrics --port 9100 -i"
)]
pub struct CurlArgs {
    /// The MicroVM's id or ARN.
    pub microvm: String,
    /// Path and query on the app.
    #[arg(default_value = "/")]
    pub path: String,
    /// HTTP method [default: GET, or POST with --data].
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    pub method: Option<String>,
    /// Request body; @FILE reads a file, @- standard input.
    #[arg(short = 'd', long = "data", value_name = "DATA")]
    pub data: Option<String>,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// The port inside the MicroVM.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Print the status line and response headers on stdout before the body.
    #[arg(short = 'i', long)]
    pub include: bool,
    /// Exit with 22 when the answer is 400 or more, as curl -f does.
    #[arg(short = 'f', long)]
    pub fail: bool,
    /// CA certificate the endpoint is checked against [default: <home>/tls/ca.pem].
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
}

fn body(data: &str) -> anyhow::Result<Vec<u8>> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the request body from stdin")?;
            Ok(buf)
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("--data @{path}: cannot read {path}"))
        }
        None => Ok(data.as_bytes().to_vec()),
    }
}

/// Runs `kiln curl`.
pub async fn run(g: &Global, kilnd: &Kilnd, a: CurlArgs) -> anyhow::Result<ExitCode> {
    let vm = describe(kilnd, &a.microvm).await?;
    let ca = a
        .cacert
        .clone()
        .unwrap_or_else(|| g.home().join("tls").join("ca.pem"));
    let endpoint = EndpointClient::new(&vm.endpoint, kilnd.endpoint(), &ca)?;
    let token = token(kilnd, &vm.microvm_id, a.port, TOKEN_MINUTES).await?;
    let data = a.data.as_deref().map(body).transpose()?;
    let method = a
        .method
        .clone()
        .unwrap_or_else(|| if data.is_some() { "POST" } else { "GET" }.into());
    let method = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("-X {method}: not an HTTP method"))?;
    let url = endpoint.url(&a.path)?;
    let mut req = endpoint
        .http
        .request(method, url.clone())
        .header(AUTH_HEADER, &token);
    if a.port != DEFAULT_PORT {
        req = req.header(PORT_HEADER, a.port.to_string());
    }
    for h in &a.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("-H {h}: write \"Name: value\"");
        };
        req = req.header(name.trim(), value.trim());
    }
    if let Some(data) = data {
        req = req.body(data);
    }
    let resp = req.send().await.map_err(|e| {
        anyhow::anyhow!(
            "no answer from {url} (MicroVM {}, {}): {}; `kiln ls` shows whether it runs",
            vm.microvm_id,
            vm.state,
            crate::client::root_cause(&e)
        )
    })?;
    let status = resp.status();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("the answer from {url} broke off"))?;
    let status_line = format!(
        "HTTP {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    );
    match g.output {
        Output::Json => {
            let v = json!({
                "microvmId": vm.microvm_id,
                "url": url.as_str(),
                "status": status.as_u16(),
                "headers": headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect::<serde_json::Map<_, _>>(),
                "body": String::from_utf8_lossy(&bytes),
            });
            println!("{}", crate::render::json(&v));
        }
        Output::Table => {
            let mut out = std::io::stdout().lock();
            if a.include {
                writeln!(out, "{status_line}")?;
                for (k, v) in &headers {
                    writeln!(out, "{k}: {v}")?;
                }
                writeln!(out)?;
            } else {
                eprintln!("{status_line}");
            }
            out.write_all(&bytes)?;
            out.flush()?;
        }
    }
    if a.fail && status.as_u16() >= 400 {
        return Ok(ExitCode::from(22));
    }
    Ok(ExitCode::SUCCESS)
}
