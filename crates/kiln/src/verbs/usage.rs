//! `kiln usage`: what MicroVMs used (`/kiln/v1/usage`): vCPU-seconds and GiB-seconds while
//! they held the host's CPUs and memory, seconds suspended, saved sessions' bytes.

use std::process::ExitCode;

use clap::Args;
use reqwest::Method;
use serde_json::Value;

use crate::client::Kilnd;
use crate::render::Table;
use crate::{Global, Output};

/// `kiln usage` flags.
#[derive(Args, Debug)]
#[command(
    after_help = "vCPU-s and GiB-s count the time a MicroVM held its vCPUs and memory (launching,\n\
running, suspending, terminating); suspended time and the saved session's size are apart.\n\
MicroVMs that aged out of kilnd's store are summed in the totals.\n\n\
Examples:\n  kiln usage\n  kiln usage --principal alice   (admin)\n  kiln usage --all   (admin)\n  \
kiln usage --output json"
)]
pub struct UsageArgs {
    /// Another principal's usage (admin only).
    #[arg(long, conflicts_with = "all")]
    pub principal: Option<String>,
    /// Everyone's usage (admin only).
    #[arg(long)]
    pub all: bool,
}

/// Seconds as a cell: whole seconds, one decimal under ten.
fn seconds(v: &Value) -> String {
    match v.as_f64() {
        Some(s) if s < 10.0 => format!("{s:.1}"),
        Some(s) => format!("{s:.0}"),
        None => "-".to_string(),
    }
}

/// Runs `kiln usage`.
pub async fn run(g: &Global, kilnd: &Kilnd, args: UsageArgs) -> anyhow::Result<ExitCode> {
    let path = match (&args.principal, args.all) {
        (_, true) => "/kiln/v1/usage?all=true".to_string(),
        (Some(p), false) => format!(
            "/kiln/v1/usage?principal={}",
            kiln_api::uri::percent_encode(p)
        ),
        (None, false) => "/kiln/v1/usage".to_string(),
    };
    let v = kilnd.kiln_json(Method::GET, &path, None).await?;
    if g.output == Output::Json {
        println!("{}", crate::render::json(&v));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "microvm",
        "principal",
        "state",
        "vcpus",
        "memory",
        "vCPU-s",
        "GiB-s",
        "suspended-s",
        "snapshot",
    ]);
    let bytes = |v: &Value| crate::render::bytes(v.as_u64().unwrap_or_default());
    for m in v["microvms"].as_array().into_iter().flatten() {
        t.row(vec![
            m["microvmId"].as_str().unwrap_or_default().to_string(),
            m["principal"].as_str().unwrap_or_default().to_string(),
            m["state"].as_str().unwrap_or_default().to_string(),
            match (&m["vcpus"], &m["baselineVcpus"]) {
                (now, base) if now == base || base.is_null() => now.to_string(),
                (now, base) => format!("{now} (baseline {base})"),
            },
            match (&m["grantedMemoryMiB"], &m["memoryMiB"]) {
                (now, base) if now == base || now.is_null() => format!("{base} MiB"),
                (now, base) => format!("{now} MiB (baseline {base})"),
            },
            seconds(&m["vcpuSeconds"]),
            seconds(&m["memoryGiBSeconds"]),
            seconds(&m["suspendedSeconds"]),
            bytes(&m["snapshotBytes"]),
        ]);
    }
    for r in v["retired"].as_array().into_iter().flatten() {
        t.row(vec![
            format!("({} aged out)", r["microvms"]),
            r["principal"].as_str().unwrap_or_default().to_string(),
            "TERMINATED".to_string(),
            "-".to_string(),
            "-".to_string(),
            seconds(&r["vcpuSeconds"]),
            seconds(&r["memoryGiBSeconds"]),
            seconds(&r["suspendedSeconds"]),
            "-".to_string(),
        ]);
    }
    let total = &v["totals"];
    t.row(vec![
        format!("total ({})", total["microvms"]),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        seconds(&total["vcpuSeconds"]),
        seconds(&total["memoryGiBSeconds"]),
        seconds(&total["suspendedSeconds"]),
        bytes(&total["snapshotBytes"]),
    ]);
    print!("{t}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_when_small_or_large_then_readable() {
        assert_eq!(seconds(&serde_json::json!(2.26)), "2.3");
        assert_eq!(seconds(&serde_json::json!(3600.4)), "3600");
        assert_eq!(seconds(&Value::Null), "-");
    }
}
