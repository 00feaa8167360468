//! `kiln keys`: the access keys kilnd accepts, through its admin API
//! (`/kiln/v1/keys`).

use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::Kilnd;
use crate::render::{key_values, timestamp, Table};
use crate::{Global, Output};

/// `kiln keys` subcommands.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// List the access keys kilnd knows (secrets are never shown again).
    #[command(after_help = "Example:\n  kiln keys list")]
    List,
    /// Create an access key for a principal; its secret is printed once.
    #[command(after_help = "Example:\n  kiln keys create --principal alice")]
    Create {
        /// Who the key is for, e.g. a user or an agent's name.
        #[arg(long)]
        principal: String,
    },
    /// Revoke an access key: kilnd refuses requests signed with it from now on.
    #[command(after_help = "Example:\n  kiln keys revoke AKIA0123456789EXAMPLE")]
    Revoke {
        /// The access key id.
        access_key_id: String,
    },
}

/// One key as `GET /kiln/v1/keys` lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Key {
    access_key_id: String,
    principal: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    created_at: Option<Value>,
    #[serde(default)]
    revoked: Option<Value>,
    #[serde(default)]
    revoked_at: Option<Value>,
}

/// A time as the keys API may send it: epoch seconds or text.
fn when(v: &Option<Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.as_f64().map(timestamp).unwrap_or_default(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".into(),
        _ => String::new(),
    }
}

/// Runs `kiln keys …`.
pub async fn run(g: &Global, kilnd: &Kilnd, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::List => {
            let v = kilnd.kiln_json(Method::GET, "/kiln/v1/keys", None).await?;
            // A bare list, or one under `items`/`keys`.
            let list = match &v {
                Value::Array(_) => v.clone(),
                other => other
                    .get("items")
                    .or_else(|| other.get("keys"))
                    .cloned()
                    .unwrap_or(Value::Array(Vec::new())),
            };
            let keys: Vec<Key> = serde_json::from_value(list.clone()).map_err(|e| {
                anyhow::anyhow!("kilnd's key list does not have the expected fields (accessKeyId, principal, createdAt, revoked): {e}")
            })?;
            match g.output {
                Output::Json => println!("{}", crate::render::json(&list)),
                Output::Table => {
                    let mut t = Table::new(&[
                        "access key id",
                        "principal",
                        "account",
                        "created",
                        "revoked",
                    ]);
                    for k in &keys {
                        t.row(vec![
                            k.access_key_id.clone(),
                            k.principal.clone(),
                            k.account.clone().unwrap_or_default(),
                            when(&k.created_at),
                            match &k.revoked_at {
                                Some(Value::Null) | None => when(&k.revoked),
                                at => when(at),
                            },
                        ]);
                    }
                    print!("{t}");
                }
            }
        }
        KeysCommand::Create { principal } => {
            let body = json!({ "principal": principal });
            let v = kilnd
                .kiln_json(Method::POST, "/kiln/v1/keys", Some(&body))
                .await?;
            match g.output {
                Output::Json => println!("{}", crate::render::json(&v)),
                Output::Table => {
                    let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                    print!(
                        "{}",
                        key_values(&[
                            ("accessKeyId".into(), field("accessKeyId")),
                            ("secretAccessKey".into(), field("secretAccessKey")),
                            ("principal".into(), field("principal")),
                            ("account".into(), field("account")),
                        ])
                    );
                    eprintln!(
                        "\nthe secret is shown only now; put both in a credentials file, e.g.\n  [{principal}]\n  aws_access_key_id = {}\n  aws_secret_access_key = …\nand use it with --profile {principal}",
                        field("accessKeyId")
                    );
                }
            }
        }
        KeysCommand::Revoke { access_key_id } => {
            let path = format!(
                "/kiln/v1/keys/{}",
                kiln_api::uri::percent_encode(&access_key_id)
            );
            kilnd.kiln(Method::DELETE, &path, None).await?;
            match g.output {
                Output::Json => println!(
                    "{}",
                    crate::render::json(&json!({ "accessKeyId": access_key_id, "revoked": true }))
                ),
                Output::Table => println!("revoked {access_key_id}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
