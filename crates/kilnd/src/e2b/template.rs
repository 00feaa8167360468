//! E2B templates are kiln images: `templateID` is an image name (optionally `name:version`) or
//! ARN in the caller's account. `base`, E2B's default, is kiln's own: an image `e2b-base` in
//! the caller's account, built on its first use from [`BASE_DOCKERFILE`] (Debian 12 with bash,
//! coreutils, python3 and E2B's `user`), the build waited for by the request that needed it.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::{ApiError, Request};

use crate::artifacts::s3::S3Store;
use crate::auth::keys::Caller;
use crate::images::{find_image, Images};

/// The name of the `base` template's image in each account.
pub const BASE_IMAGE: &str = "e2b-base";
/// How long a create waits for the `base` image to build.
const BASE_BUILD_WAIT: Duration = Duration::from_secs(30 * 60);

/// The `base` template: what E2B's own base offers that its SDK relies on (`/bin/bash -l -c`
/// for commands, the `user` account and its home as the default user and directory). The
/// "app" is a sleeper, ready at once (a HEALTHCHECK that always passes); envd is not part of
/// the image: kilnd starts it in each sandbox, with that sandbox's token.
pub const BASE_DOCKERFILE: &str = "FROM kiln/debian:12
RUN export DEBIAN_FRONTEND=noninteractive && apt-get update \\
 && apt-get install -y --no-install-recommends python3 procps \\
 && rm -rf /var/lib/apt/lists/* \\
 && useradd --create-home --shell /bin/bash --uid 1000 user
HEALTHCHECK --interval=1s --timeout=2s CMD true
CMD [\"sleep\", \"infinity\"]
";

/// The image identifier and version a `templateID` names, building `base` if needed.
pub async fn resolve(
    images: &Arc<Images>,
    s3: &S3Store,
    caller: &Caller,
    template: &str,
) -> Result<(String, Option<String>), ApiError> {
    if template.is_empty() {
        return Err(ApiError::validation(
            "templateID is required (e.g. \"base\")",
        ));
    }
    if template == "base" {
        ensure_base(images, s3, caller).await?;
        return Ok((BASE_IMAGE.to_string(), None));
    }
    if !template.starts_with("arn:") {
        if let Some((name, version)) = template.split_once(':') {
            if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) {
                return Ok((name.to_string(), Some(version.to_string())));
            }
        }
    }
    Ok((template.to_string(), None))
}

fn bucket_of(principal: &str) -> String {
    let hash = blake3::hash(principal.as_bytes()).to_hex();
    format!("kiln-e2b-{}", &hash[..16])
}

fn base_zip() -> Result<Vec<u8>, ApiError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("Dockerfile", options)
        .and_then(|()| {
            zip.write_all(BASE_DOCKERFILE.as_bytes())
                .map_err(Into::into)
        })
        .and_then(|()| zip.finish().map(|_| ()))
        .map_err(|e| ApiError::internal(format!("packing the base template: {e}")))?;
    Ok(buf.into_inner())
}

async fn ensure_base(images: &Arc<Images>, s3: &S3Store, caller: &Caller) -> Result<(), ApiError> {
    let existing = find_image(&images.store, &images.ctx, caller, BASE_IMAGE).ok();
    let key = match existing {
        Some(image) => image.key,
        None => {
            let uri = s3
                .put_for(
                    &caller.principal,
                    &bucket_of(&caller.principal),
                    "e2b-base.zip",
                    &base_zip()?,
                )
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let body = serde_json::from_value(serde_json::json!({
                "name": BASE_IMAGE,
                "baseImageArn": format!("arn:aws:lambda:{}:aws:microvm-image:debian-12", images.ctx.region),
                "buildRoleArn": format!("arn:aws:iam::{}:role/kiln-e2b", caller.account),
                "description": "E2B's base template (kiln e2b)",
                "codeArtifact": {"uri": uri},
                "resources": [{"minimumMemoryInMiB": 512}],
            }))
            .map_err(|e| ApiError::internal(format!("the base template request: {e}")))?;
            match images
                .handle(
                    caller,
                    Request::CreateMicrovmImage {
                        body: Box::new(body),
                    },
                )
                .await
            {
                Ok(_) => {}
                // Another create raced us to it: wait for that build.
                Err(e) if e.status() == 409 => {}
                Err(e) => return Err(e),
            }
            tracing::info!(principal = %caller.principal, "e2b: building the base template");
            find_image(&images.store, &images.ctx, caller, BASE_IMAGE)?.key
        }
    };
    let started = std::time::Instant::now();
    loop {
        let store = &images.store;
        if store
            .latest_version(&key, "SUCCESSFUL", Some("ACTIVE"))
            .map_err(|e| ApiError::internal(e.to_string()))?
            .is_some()
        {
            return Ok(());
        }
        let versions = store
            .versions(&key, 0, 1000)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let building = versions
            .iter()
            .any(|v| matches!(v.state.as_str(), "PENDING" | "IN_PROGRESS"));
        if !building {
            let reason = versions
                .last()
                .and_then(|v| v.state_reason.clone())
                .unwrap_or_else(|| "no version of it built".into());
            return Err(ApiError::internal(format!(
                "the base template (image {BASE_IMAGE}) failed to build: {reason}; see `kiln logs {BASE_IMAGE}`, \
                 then delete the image to build it again"
            )));
        }
        if started.elapsed() > BASE_BUILD_WAIT {
            return Err(ApiError::internal(format!(
                "the base template (image {BASE_IMAGE}) is still building after {} minutes; retry later",
                BASE_BUILD_WAIT.as_secs() / 60
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
