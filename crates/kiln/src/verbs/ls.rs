//! `kiln ls` (MicroVMs) and `kiln images`.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use kiln_api::shapes::{
    ListMicrovmImageVersionsOutput, ListMicrovmImagesResponse, ListMicrovmsResponse, MicrovmState,
};
use kiln_api::Operation;
use serde_json::{json, Value};

use crate::client::{Call, Kilnd};
use crate::render::{age, image_name, Table};
use crate::verbs::build::is_not_found;
use crate::verbs::run::describe;
use crate::{Global, Output};

/// `kiln ls` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  kiln ls\n  kiln ls --all --image web\n  kiln ls images")]
pub struct LsArgs {
    /// What to list.
    #[arg(value_enum, default_value_t = Listing::Microvms)]
    pub what: Listing,
    /// Include terminated MicroVMs.
    #[arg(long, short)]
    pub all: bool,
    /// Only MicroVMs of this image (name or ARN).
    #[arg(long)]
    pub image: Option<String>,
}

/// What `kiln ls` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Listing {
    /// MicroVMs: id, image:version, state, age, endpoint.
    Microvms,
    /// Images: newest version and its state.
    Images,
}

/// Runs `kiln ls`.
pub async fn run(g: &Global, kilnd: &Kilnd, a: LsArgs) -> anyhow::Result<ExitCode> {
    if a.what == Listing::Images {
        return images(g, kilnd).await;
    }
    let mut call = Call::new(Operation::ListMicrovms);
    if let Some(image) = &a.image {
        call = call.query("imageIdentifier", image);
    }
    let list: ListMicrovmsResponse = serde_json::from_value(kilnd.call_all_pages(&call).await?)?;
    let mut rows = Vec::new();
    for item in list.items {
        if item.state == MicrovmState::Terminated && !a.all {
            continue;
        }
        let endpoint = if item.state == MicrovmState::Terminated {
            String::new()
        } else {
            match describe(kilnd, &item.microvm_id).await {
                Ok(d) => d.endpoint,
                // Terminated between the list and now.
                Err(e) if is_not_found(&e) => String::new(),
                Err(e) => return Err(e),
            }
        };
        rows.push(json!({
            "microvmId": item.microvm_id,
            "image": image_name(&item.image_arn),
            "imageArn": item.image_arn,
            "imageVersion": item.image_version,
            "state": item.state,
            "startedAt": item.started_at,
            "endpoint": endpoint,
        }));
    }
    match g.output {
        Output::Json => println!("{}", crate::render::json(&json!({ "items": rows }))),
        Output::Table => {
            if rows.is_empty() {
                eprintln!(
                    "no MicroVMs{}; start one with `kiln run IMAGE`",
                    if a.all {
                        ""
                    } else {
                        " running (--all shows terminated ones)"
                    }
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["id", "image", "state", "age", "endpoint"]);
            for r in &rows {
                t.row(vec![
                    text(&r["microvmId"]),
                    format!("{}:{}", text(&r["image"]), text(&r["imageVersion"])),
                    text(&r["state"]),
                    r["startedAt"].as_f64().map(age).unwrap_or_default(),
                    text(&r["endpoint"]),
                ]);
            }
            print!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A version's base as a cell: its name and, for a registry image, the digest it resolved
/// to, shortened (`python:3.12-slim 0 @sha256:0a1b2c3d4e5f`).
fn base_cell(base: &Value, digest: &Value) -> String {
    let mut cell = base.as_str().unwrap_or("-").to_string();
    if let Some(d) = digest.as_str() {
        let short: String = d.chars().take("sha256:".len() + 12).collect();
        cell = format!("{cell} @{short}");
    }
    cell
}

/// Runs `kiln images`: each image with its newest version, that version's state and base.
pub async fn images(g: &Global, kilnd: &Kilnd) -> anyhow::Result<ExitCode> {
    let list: ListMicrovmImagesResponse = serde_json::from_value(
        kilnd
            .call_all_pages(&Call::new(Operation::ListMicrovmImages))
            .await?,
    )?;
    let mut rows = Vec::new();
    for image in list.items {
        let call =
            Call::new(Operation::ListMicrovmImageVersions).label("imageIdentifier", &image.name);
        let versions: ListMicrovmImageVersionsOutput = match kilnd.call_all_pages(&call).await {
            Ok(v) => serde_json::from_value(v)?,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(e),
        };
        let newest = versions
            .items
            .iter()
            .max_by_key(|v| v.image_version.parse::<u64>().unwrap_or(0));
        // What the newest version was built from (drift: a tag may point elsewhere now).
        let details = match newest {
            Some(v) => {
                let path = format!(
                    "/kiln/v1/images/{}/versions/{}/details",
                    kiln_api::uri::percent_encode(&image.name),
                    kiln_api::uri::percent_encode(&v.image_version)
                );
                kilnd
                    .kiln_json(reqwest::Method::GET, &path, None)
                    .await
                    .ok()
            }
            None => None,
        }
        .unwrap_or(Value::Null);
        rows.push(json!({
            "name": image.name,
            "imageArn": image.image_arn,
            "state": image.state,
            "latestVersion": newest.map(|v| v.image_version.clone()),
            "latestVersionState": newest.map(|v| v.state),
            "latestActiveImageVersion": image.latest_active_image_version,
            "createdAt": image.created_at,
            "base": details["base"],
            "baseDigest": details["baseDigest"],
        }));
    }
    match g.output {
        Output::Json => println!("{}", crate::render::json(&json!({ "items": rows }))),
        Output::Table => {
            if rows.is_empty() {
                eprintln!("no images yet; build one with `kiln build DIR`");
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&[
                "name",
                "latest",
                "build",
                "active",
                "image state",
                "base (latest)",
                "age",
            ]);
            for r in &rows {
                t.row(vec![
                    text(&r["name"]),
                    text(&r["latestVersion"]),
                    text(&r["latestVersionState"]),
                    text(&r["latestActiveImageVersion"]),
                    text(&r["state"]),
                    base_cell(&r["base"], &r["baseDigest"]),
                    r["createdAt"].as_f64().map(age).unwrap_or_default(),
                ]);
            }
            print!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_cell_when_registry_base_then_short_digest_else_name() {
        let digest = json!(format!("sha256:{}", "0a1b2c3d4e5f".repeat(5)));
        assert_eq!(
            base_cell(&json!("docker.io/library/python:3.12-slim 0"), &digest),
            "docker.io/library/python:3.12-slim 0 @sha256:0a1b2c3d4e5f"
        );
        assert_eq!(base_cell(&json!("busybox 1"), &Value::Null), "busybox 1");
        assert_eq!(base_cell(&Value::Null, &Value::Null), "-");
    }
}
