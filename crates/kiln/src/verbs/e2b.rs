//! `kiln e2b env`: the shell exports that point E2B's SDKs at this kilnd.

use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;

use crate::client::Kilnd;
use crate::{Global, Output};

/// `kiln e2b …`.
#[derive(Subcommand, Debug)]
pub enum E2bCommand {
    /// Print `export` lines for E2B's SDKs: E2B_API_URL, E2B_API_KEY (your access key as an
    /// E2B key), E2B_DOMAIN, E2B_SANDBOX_URL, and kiln's CA as SSL_CERT_FILE (Python) and NODE_EXTRA_CA_CERTS (Node).
    #[command(
        after_help = "Example:\n  eval \"$(kiln e2b env)\"\n  python3 -c 'from e2b import Sandbox; print(Sandbox.create().commands.run(\"uname -a\").stdout)'"
    )]
    Env,
}

/// The E2B key of an access key: `e2b_` and the hex of `<id>:<secret>` (kilnd's `e2b::keys`).
pub fn e2b_key(access_key_id: &str, secret: &str) -> String {
    let hex: String = format!("{access_key_id}:{secret}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("e2b_{hex}")
}

/// Runs an `e2b` subcommand.
pub async fn run(g: &Global, kilnd: &Kilnd, command: E2bCommand) -> anyhow::Result<ExitCode> {
    match command {
        E2bCommand::Env => env(g, kilnd).await,
    }
}

async fn env(g: &Global, kilnd: &Kilnd) -> anyhow::Result<ExitCode> {
    let config = kilnd
        .kiln_json(Method::GET, "/e2b/kiln/config", None)
        .await?;
    let domain = config["domain"]
        .as_str()
        .unwrap_or("kiln.localhost")
        .to_string();
    let port = config["endpointPort"].as_u64().unwrap_or(443);
    let credentials = kilnd.credentials();
    let api_url = format!("{}/e2b", kilnd.endpoint().trim_end_matches('/'));
    let key = e2b_key(&credentials.access_key_id, &credentials.secret_access_key);
    // One URL for every sandbox (E2b-Sandbox-Id routing): `<port>-<id>.<domain>` needs
    // wildcard DNS, which `*.localhost` names lack on many hosts.
    let sandbox_url = format!("https://127.0.0.1:{port}");
    let ca = g.home().join("tls").join("ca.pem");
    let vars = [
        ("E2B_API_URL", api_url),
        ("E2B_API_KEY", key),
        ("E2B_DOMAIN", domain),
        ("E2B_SANDBOX_URL", sandbox_url),
        ("SSL_CERT_FILE", ca.display().to_string()),
        // Node (E2B's JS SDK) reads extra CAs from here, not from SSL_CERT_FILE.
        ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
    ];
    match g.output {
        Output::Json => {
            let map: serde_json::Map<String, serde_json::Value> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect();
            println!("{}", serde_json::Value::Object(map));
        }
        Output::Table => {
            for (k, v) in vars {
                println!("export {k}='{}'", v.replace('\'', "'\\''"));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_matches_kilnd_format() {
        assert_eq!(super::e2b_key("AK", "s"), "e2b_414b3a73");
    }
}
