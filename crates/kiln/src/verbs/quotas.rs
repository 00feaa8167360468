//! `kiln quotas`: the caller's quotas and what it uses of each (`/kiln/v1/quotas`), and
//! the API rates kilnd throttles each operation to.

use std::process::ExitCode;

use clap::Args;
use reqwest::Method;
use serde_json::Value;

use crate::client::Kilnd;
use crate::render::Table;
use crate::{Global, Output};

/// `kiln quotas` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  kiln quotas\n  kiln quotas --principal alice   (admin)\n  \
                        kiln quotas --output json"
)]
pub struct QuotasArgs {
    /// Another principal's quotas (admin only).
    #[arg(long)]
    pub principal: Option<String>,
}

/// One cell of the limit or used column.
fn amount(code: &str, v: &Value) -> String {
    match v.as_u64() {
        Some(n) if code.starts_with("StoredBytes") => crate::render::bytes(n),
        Some(n) => n.to_string(),
        None => "-".to_string(),
    }
}

/// A rate as people read it.
fn rate(v: &Value) -> String {
    let number = |k: &str| v[k].as_f64().unwrap_or_default();
    format!("{}/s (burst {})", number("perSecond"), number("burst"))
}

/// Runs `kiln quotas`.
pub async fn run(g: &Global, kilnd: &Kilnd, args: QuotasArgs) -> anyhow::Result<ExitCode> {
    let path = match &args.principal {
        Some(p) => format!(
            "/kiln/v1/quotas?principal={}",
            kiln_api::uri::percent_encode(p)
        ),
        None => "/kiln/v1/quotas".to_string(),
    };
    let v = kilnd.kiln_json(Method::GET, &path, None).await?;
    match g.output {
        Output::Json => println!("{}", crate::render::json(&v)),
        Output::Table => {
            println!(
                "quotas of principal {}",
                v["principal"].as_str().unwrap_or("?")
            );
            let mut t = Table::new(&["quota", "used", "limit", "what"]);
            for q in v["quotas"].as_array().into_iter().flatten() {
                let code = q["quotaCode"].as_str().unwrap_or_default();
                t.row(vec![
                    code.to_string(),
                    amount(code, &q["used"]),
                    amount(code, &q["limit"]),
                    q["description"].as_str().unwrap_or_default().to_string(),
                ]);
            }
            print!("{t}");
            let throttles = v["throttles"].as_array().cloned().unwrap_or_default();
            if !throttles.is_empty() {
                println!("\nAPI rates (per principal and operation; others unthrottled unless * is listed)");
                let mut t = Table::new(&["operation", "rate"]);
                for r in &throttles {
                    t.row(vec![
                        r["operation"].as_str().unwrap_or_default().to_string(),
                        rate(r),
                    ]);
                }
                print!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_when_no_usage_then_dash() {
        assert_eq!(amount("BuildDurationSeconds", &Value::Null), "-");
        assert_eq!(
            amount("StoredBytesPerPrincipal", &serde_json::json!(2048)),
            "2.0 KiB"
        );
    }
}
