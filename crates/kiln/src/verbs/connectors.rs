//! `kiln connectors` (the operator's egress connectors, `/kiln/v1/connectors`) and
//! `kiln flows VM` (what a MicroVM's guest tried to reach).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::Kilnd;
use crate::render::{timestamp, Table};
use crate::{Global, Output};

/// `kiln connectors` subcommands.
#[derive(Subcommand, Debug)]
pub enum ConnectorsCommand {
    /// List the operator's egress connectors (AWS's INTERNET_EGRESS etc. are always there).
    #[command(visible_alias = "ls", after_help = "Example:\n  kiln connectors ls")]
    List,
    /// Define a deny-by-default egress connector (admin): only what --allow names is
    /// reachable, and only allowed names resolve.
    #[command(
        after_help = "Examples:\n  kiln connectors create pypi --allow '*.pypi.org:443' --allow 'files.pythonhosted.org:443'\n  kiln connectors create mirror --allow 10.20.0.5/32:3142\n\nUse it with: kiln run IMAGE --egress pypi  (or its ARN in egressNetworkConnectors)"
    )]
    Create {
        /// The connector's name (lower-case letters, digits, '-').
        name: String,
        /// What it allows (repeatable): NAME[:PORTS], *.NAME[:PORTS] or CIDR[:PORTS];
        /// PORTS like 443, 80,443 or 8000-8100 (default: every port).
        #[arg(long = "allow", required = true, value_name = "ENTRY")]
        allow: Vec<String>,
        /// A note for people.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Show one connector.
    Show {
        /// Its name.
        name: String,
    },
    /// Delete a connector (admin); MicroVMs running with it keep their policy.
    #[command(visible_alias = "rm")]
    Delete {
        /// Its name.
        name: String,
    },
}

/// `kiln flows VM`.
#[derive(Args, Debug)]
pub struct FlowsArgs {
    /// The MicroVM's id.
    pub microvm: String,
    /// Only refused flows.
    #[arg(long)]
    pub blocked: bool,
}

fn connector_table(list: &[Value]) -> String {
    let mut t = Table::new(&["name", "allow", "arn", "created"]);
    for c in list {
        let allow: Vec<String> = c["allow"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        t.row(vec![
            c["name"].as_str().unwrap_or_default().to_string(),
            allow.join(" "),
            c["arn"].as_str().unwrap_or_default().to_string(),
            c["createdAt"].as_f64().map(timestamp).unwrap_or_default(),
        ]);
    }
    t.to_string()
}

/// Runs `kiln connectors …`.
pub async fn run(g: &Global, kilnd: &Kilnd, cmd: ConnectorsCommand) -> anyhow::Result<ExitCode> {
    let (method, path, body) = match &cmd {
        ConnectorsCommand::List => (Method::GET, "/kiln/v1/connectors".to_string(), None),
        ConnectorsCommand::Create {
            name,
            allow,
            description,
        } => (
            Method::POST,
            "/kiln/v1/connectors".to_string(),
            Some(json!({ "name": name, "allow": allow, "description": description })),
        ),
        ConnectorsCommand::Show { name } => (
            Method::GET,
            format!(
                "/kiln/v1/connectors/{}",
                kiln_api::uri::percent_encode(name)
            ),
            None,
        ),
        ConnectorsCommand::Delete { name } => (
            Method::DELETE,
            format!(
                "/kiln/v1/connectors/{}",
                kiln_api::uri::percent_encode(name)
            ),
            None,
        ),
    };
    let v = kilnd.kiln_json(method, &path, body.as_ref()).await?;
    match g.output {
        Output::Json => println!("{}", crate::render::json(&v)),
        Output::Table => {
            let list = match v.get("connectors").and_then(Value::as_array) {
                Some(list) => list.clone(),
                None => vec![v.clone()],
            };
            if list.is_empty() {
                println!("no operator connectors; AWS's INTERNET_EGRESS is always available");
            } else {
                print!("{}", connector_table(&list));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kiln flows VM`.
pub async fn flows(g: &Global, kilnd: &Kilnd, a: FlowsArgs) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/kiln/v1/microvms/{}/flows",
        kiln_api::uri::percent_encode(&a.microvm)
    );
    let v = kilnd.kiln_json(Method::GET, &path, None).await?;
    let flows: Vec<Value> = v["flows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| !a.blocked || f["allowed"] == Value::Bool(false))
        .collect();
    match g.output {
        Output::Json => println!("{}", crate::render::json(&Value::Array(flows))),
        Output::Table => {
            let mut t = Table::new(&[
                "time",
                "proto",
                "destination",
                "port",
                "name",
                "verdict",
                "out",
                "in",
            ]);
            for f in &flows {
                let verdict = if f["allowed"] == Value::Bool(true) {
                    if f["open"] == Value::Bool(true) {
                        "open"
                    } else {
                        "allowed"
                    }
                    .to_string()
                } else {
                    format!("blocked: {}", f["reason"].as_str().unwrap_or_default())
                };
                t.row(vec![
                    f["startedAt"].as_f64().map(timestamp).unwrap_or_default(),
                    f["protocol"].as_str().unwrap_or_default().to_string(),
                    f["destination"].as_str().unwrap_or("-").to_string(),
                    f["port"].to_string(),
                    f["name"].as_str().unwrap_or("-").to_string(),
                    verdict,
                    f["bytesOut"].to_string(),
                    f["bytesIn"].to_string(),
                ]);
            }
            if flows.is_empty() {
                println!("no flows recorded for {}", a.microvm);
            } else {
                print!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
