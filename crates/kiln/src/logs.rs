//! `kiln logs`: an image version's build log from kilnd, followed live if asked.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use futures_util::StreamExt;

/// Prints (and with `follow`, streams until the build ends) the build log of `image`'s
/// `version` (latest when `None`).
pub fn run(
    endpoint: &str,
    image: &str,
    version: Option<&str>,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        let version = match version {
            Some(v) => v.to_string(),
            None => latest_version(&client, endpoint, image).await?,
        };
        let url = format!(
            "{}/kiln/v1/images/{image}/versions/{version}/build-log{}",
            endpoint.trim_end_matches('/'),
            if follow { "?follow=true" } else { "" }
        );
        let resp = client.get(&url).send().await.with_context(|| {
            format!(
                "cannot reach kilnd at {endpoint} (is it running? set --endpoint or KILN_ENDPOINT)"
            )
        })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            bail!("kilnd answered {status}: {}", message(&body));
        }
        let mut stream = resp.bytes_stream();
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("the log stream broke off")?;
            out.write_all(&chunk)?;
            out.flush()?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The highest version number of an image.
async fn latest_version(
    client: &reqwest::Client,
    endpoint: &str,
    image: &str,
) -> anyhow::Result<String> {
    let url = format!(
        "{}/2025-09-09/microvm-images/{image}/versions",
        endpoint.trim_end_matches('/')
    );
    let resp = client.get(&url).send().await.with_context(|| {
        format!("cannot reach kilnd at {endpoint} (is it running? set --endpoint or KILN_ENDPOINT)")
    })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("image {image}: {}", message(&body));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("kilnd sent a version list that is not JSON")?;
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            i["imageVersion"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
        })
        .max()
        .map(|n| n.to_string())
        .with_context(|| format!("image {image} has no versions"))
}

/// The `message` of an AWS-style error body, or the body itself.
fn message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}
