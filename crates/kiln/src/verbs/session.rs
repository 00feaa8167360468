//! `kiln suspend`, `kiln resume`, `kiln rm`: one operation on each MicroVM named.

use std::process::ExitCode;

use clap::Args;
use kiln_api::Operation;
use serde_json::json;

use crate::client::{Call, Kilnd};
use crate::render::Table;
use crate::verbs::run::describe;
use crate::{Global, Output};

/// MicroVMs to act on.
#[derive(Args, Debug)]
pub struct Ids {
    /// MicroVM ids (mvm-…) or ARNs.
    #[arg(required = true, value_name = "MICROVM")]
    pub ids: Vec<String>,
}

/// Suspends each MicroVM.
pub async fn suspend(g: &Global, kilnd: &Kilnd, ids: Ids) -> anyhow::Result<ExitCode> {
    each(g, kilnd, ids, Operation::SuspendMicrovm).await
}

/// Resumes each MicroVM.
pub async fn resume(g: &Global, kilnd: &Kilnd, ids: Ids) -> anyhow::Result<ExitCode> {
    each(g, kilnd, ids, Operation::ResumeMicrovm).await
}

/// Terminates each MicroVM.
pub async fn rm(g: &Global, kilnd: &Kilnd, ids: Ids) -> anyhow::Result<ExitCode> {
    each(g, kilnd, ids, Operation::TerminateMicrovm).await
}

/// Calls `op` on every id, then shows each one's state; the others go on when one fails.
async fn each(g: &Global, kilnd: &Kilnd, ids: Ids, op: Operation) -> anyhow::Result<ExitCode> {
    let mut rows = Vec::new();
    let mut failed = 0;
    let single = ids.ids.len() == 1;
    for id in &ids.ids {
        let call = Call::new(op).label("microvmIdentifier", id);
        let result = match kilnd.call(&call).await {
            Ok(_) => describe(kilnd, id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(vm) => rows.push(json!({
                "microvmId": vm.microvm_id,
                "state": vm.state,
                "stateReason": vm.state_reason,
            })),
            // One MicroVM: its error is the command's error, hint included.
            Err(e) if single => return Err(e),
            Err(e) => {
                failed += 1;
                crate::report(&e.context(id.clone()));
            }
        }
    }
    match g.output {
        Output::Json => println!("{}", crate::render::json(&json!({ "items": rows }))),
        Output::Table if !rows.is_empty() => {
            let mut t = Table::new(&["id", "state"]);
            for r in &rows {
                t.row(vec![
                    r["microvmId"].as_str().unwrap_or_default().to_string(),
                    r["state"].as_str().unwrap_or_default().to_string(),
                ]);
            }
            print!("{t}");
        }
        Output::Table => {}
    }
    if failed > 0 {
        eprintln!("{failed} of {} MicroVMs failed", ids.ids.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
