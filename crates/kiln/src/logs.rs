//! `kiln logs`: an image version's build log from kilnd, followed live if asked.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use kiln_api::Operation;
use reqwest::Method;

use crate::client::{Call, Kilnd};

/// Prints (and with `follow`, streams until the build ends) the build log of `image`'s
/// `version` (latest when `None`).
pub async fn run(
    kilnd: &Kilnd,
    image: &str,
    version: Option<&str>,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let version = match version {
        Some(v) => v.to_string(),
        None => latest_version(kilnd, image).await?,
    };
    let resp = kilnd
        .kiln(Method::GET, &build_log_path(image, &version, follow), None)
        .await?;
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the log stream from kilnd broke off")?;
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// kiln's path of a version's build log.
pub fn build_log_path(image: &str, version: &str, follow: bool) -> String {
    format!(
        "/kiln/v1/images/{}/versions/{}/build-log{}",
        kiln_api::uri::percent_encode(image),
        kiln_api::uri::percent_encode(version),
        if follow { "?follow=true" } else { "" }
    )
}

/// The highest version number of an image.
pub async fn latest_version(kilnd: &Kilnd, image: &str) -> anyhow::Result<String> {
    let call = Call::new(Operation::ListMicrovmImageVersions).label("imageIdentifier", image);
    let v = kilnd.call_all_pages(&call).await?;
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
        .with_context(|| format!("image {image} has no versions yet: build one with `kiln build`"))
}
