//! `GET /kiln/v1/images/{name}/versions/{version}/details`: how a built version runs and what
//! it was built from — above all the resolved digest of a registry base (drift: a tag may
//! point elsewhere tomorrow; this says what this version holds).

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_api::ApiError;

use crate::api::{error_response, Api, Signed};

/// The version's `image.json` (app argv, env, ports, base, baseDigest, baseIndexDigest), as
/// the build wrote it; a version not built yet has none.
pub async fn version_details(
    State(api): State<Api>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    signed: Signed,
) -> Response {
    let path = match api.images.build_log_path(&signed.caller, &name, &version) {
        Ok((log, _)) => log.with_file_name("image.json"),
        Err(e) => return error_response(&e),
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(_) => error_response(&ApiError::conflict(
            "MicrovmImageVersion",
            &format!("{name}:{version}"),
            format!(
                "image {name} version {version} has no details yet: its build has not succeeded"
            ),
        )),
    }
}
