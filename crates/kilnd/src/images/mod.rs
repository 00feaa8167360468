//! The image operations of the API: validation beyond the model, state transitions,
//! idempotency, and the store ⇄ wire-shape mapping.

pub mod builds;
pub mod managed;
pub mod registry;
pub mod version_details;

use std::path::PathBuf;
use std::sync::Arc;

use kiln_api::pagination::paginate;
use kiln_api::shapes::common::CodeArtifact;
use kiln_api::shapes::common::{Architecture, Chipset, Tags};
use kiln_api::shapes::image::*;
use kiln_api::{ApiError, ArnContext, Request};
use serde_json::{json, Value};

use crate::artifacts::ArtifactRefusal;
use crate::auth::keys::Caller;
use crate::images::builds::{version_dir, Builds};

use crate::api::wire::{internal, request_hash, to_value, ts};
use crate::now;
use crate::store::{self, ImageRow, Store, VersionRow};

/// Image operations over the store and the build runner.
pub struct Images {
    /// The metadata store.
    pub store: Arc<dyn Store>,
    /// The build runner.
    pub builds: Builds,
    /// ARN region and account.
    pub ctx: ArnContext,
    /// The data directory.
    pub home: PathBuf,
    /// Per-principal quotas (images, versions, builds, stored bytes).
    pub quotas: Arc<crate::auth::quotas::Quotas>,
}

fn not_implemented(op: &str) -> ApiError {
    ApiError::validation(format!(
        "{op} is not available in this version of kiln yet (MicroVMs arrive with the next release)"
    ))
}

impl Images {
    /// Executes one validated request for `caller`, who sees only its own images (admin
    /// sees all) and the managed ones.
    pub async fn handle(&self, caller: &Caller, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::CreateMicrovmImage { body } => self.create(caller, *body).await,
            Request::UpdateMicrovmImage { params, body } => {
                self.update(caller, &params.image_identifier, *body).await
            }
            Request::GetMicrovmImage { params } => {
                let image = self.image(caller, &params.image_identifier)?;
                to_value(&GetMicrovmImageOutput {
                    image: self.summary(&image)?,
                    tags: tags_of(&image),
                    updated_at: image.updated_at.map(ts),
                })
            }
            Request::ListMicrovmImages { query } => {
                let rows = self
                    .store
                    .images(
                        query.name_filter.as_deref(),
                        caller.owner_filter(),
                        usize::MAX >> 1,
                    )
                    .map_err(internal)?;
                let items = rows
                    .iter()
                    .map(|r| self.summary(r))
                    .collect::<Result<Vec<_>, _>>()?;
                // Sorted by account, then name: the order of their ARNs.
                let (items, next_token) = paginate(
                    &items,
                    |i| i.image_arn.as_str(),
                    query.page.max_results,
                    query.page.next_token.as_deref(),
                )?;
                to_value(&ListMicrovmImagesResponse { next_token, items })
            }
            Request::DeleteMicrovmImage { params } => self.delete(caller, &params.image_identifier),
            Request::GetMicrovmImageVersion { params } => {
                let (image, v) =
                    self.version(caller, &params.image_identifier, &params.image_version)?;
                to_value(&self.version_summary(&image, &v)?)
            }
            Request::ListMicrovmImageVersions { params, query } => {
                let image = self.image(caller, &params.image_identifier)?;
                let rows = self
                    .store
                    .versions(&image.key, 0, usize::MAX >> 1)
                    .map_err(internal)?;
                let items = rows
                    .iter()
                    .map(|v| self.version_summary(&image, v))
                    .collect::<Result<Vec<_>, _>>()?;
                // Page keys are zero-padded so they sort like the numbers.
                let keyed: Vec<(String, MicrovmImageVersionSummary)> = items
                    .into_iter()
                    .map(|s| {
                        (
                            format!("{:020}", s.image_version.parse::<u64>().unwrap_or(0)),
                            s,
                        )
                    })
                    .collect();
                let (page, next_token) = paginate(
                    &keyed,
                    |(k, _)| k.as_str(),
                    query.max_results,
                    query.next_token.as_deref(),
                )?;
                to_value(&ListMicrovmImageVersionsOutput {
                    next_token,
                    items: page.into_iter().map(|(_, s)| s).collect(),
                })
            }
            Request::UpdateMicrovmImageVersion { params, body } => {
                let (image, v) =
                    self.version(caller, &params.image_identifier, &params.image_version)?;
                self.store
                    .set_version_status(&image.key, v.version, body.status.as_str(), now())
                    .map_err(internal)?;
                let v = self
                    .store
                    .version(&image.key, v.version)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        ApiError::not_found(
                            "MicrovmImageVersion",
                            &format!("{}:{}", image.label, v.version),
                        )
                    })?;
                to_value(&self.version_summary(&image, &v)?)
            }
            Request::DeleteMicrovmImageVersion { params } => {
                let (image, v) =
                    self.version(caller, &params.image_identifier, &params.image_version)?;
                if matches!(v.state.as_str(), "PENDING" | "IN_PROGRESS") {
                    return Err(ApiError::conflict(
                        "MicrovmImageVersion",
                        &format!("{}:{}", image.label, v.version),
                        "the version is still building; wait for the build to end, then delete it",
                    ));
                }
                let versions = self.store.versions(&image.key, 0, 2).map_err(internal)?;
                if versions.len() <= 1 {
                    return Err(ApiError::validation(format!(
                        "This is the last version. Please delete the entire image \
                         (aws lambda-microvms delete-microvm-image --image-identifier {})",
                        image.label
                    )));
                }
                self.refuse_if_running(&image, Some(v.version))?;
                self.store
                    .delete_version(&image.key, v.version)
                    .map_err(internal)?;
                let _ = std::fs::remove_dir_all(version_dir(&self.home, &image.key, v.version));
                to_value(&DeleteMicrovmImageVersionOutput {
                    image_identifier: params.image_identifier,
                    image_version: v.version.to_string(),
                    state: MicrovmImageVersionState::Deleted,
                })
            }
            Request::GetMicrovmImageBuild { params } => {
                let (image, v) =
                    self.version(caller, &params.image_identifier, &params.image_version)?;
                if params.build_id != v.build_id {
                    return Err(ApiError::not_found("MicrovmImageBuild", &params.build_id));
                }
                to_value(&GetMicrovmImageBuildOutput {
                    build: self.build_summary(&image, &v)?,
                    snapshot_build: (v.memory_bytes.is_some()).then_some(SnapshotBuild {
                        memory_snapshot_size_in_bytes: v.memory_bytes,
                        code_install_size_in_bytes: v.code_bytes,
                        disk_snapshot_size_in_bytes: v.disk_bytes,
                    }),
                })
            }
            Request::ListMicrovmImageBuilds { params, query } => {
                let (image, v) =
                    self.version(caller, &params.image_identifier, &params.image_version)?;
                let mut items = vec![self.build_summary(&image, &v)?];
                if query
                    .architecture
                    .is_some_and(|a| a != Architecture::X86_64)
                    || query.chipset.is_some_and(|c| c != Chipset::Intel)
                {
                    items.clear();
                }
                to_value(&ListMicrovmImageBuildsOutput {
                    next_token: None,
                    items,
                })
            }
            Request::ListManagedMicrovmImages { query } => {
                let items = managed::summaries(&self.ctx);
                let (items, next_token) = paginate(
                    &items,
                    |i| i.image_arn.as_str(),
                    query.max_results,
                    query.next_token.as_deref(),
                )?;
                to_value(&ListManagedMicrovmImagesOutput { next_token, items })
            }
            Request::ListManagedMicrovmImageVersions { params, query } => {
                let name = kiln_api::image_identifier(&params.image_identifier)?;
                let m = managed::MANAGED
                    .iter()
                    .find(|m| m.name == name.name())
                    .ok_or_else(|| {
                        ApiError::not_found("ManagedMicrovmImage", &params.image_identifier)
                    })?;
                let items = managed::versions(&self.ctx, m);
                let (items, next_token) = paginate(
                    &items,
                    |i| i.image_version.as_str(),
                    query.max_results,
                    query.next_token.as_deref(),
                )?;
                to_value(&ListManagedMicrovmImageVersionsOutput { next_token, items })
            }
            Request::TagResource { params, body } => {
                let image = self.image(caller, &params.resource)?;
                let mut tags = tags_of(&image).unwrap_or_default();
                tags.extend(body.tags);
                self.store
                    .set_tags(&image.key, &json!(tags))
                    .map_err(internal)?;
                Ok(Value::Null)
            }
            Request::UntagResource { params, query } => {
                let image = self.image(caller, &params.resource)?;
                let mut tags = tags_of(&image).unwrap_or_default();
                for k in &query.tag_keys {
                    tags.remove(k);
                }
                self.store
                    .set_tags(&image.key, &json!(tags))
                    .map_err(internal)?;
                Ok(Value::Null)
            }
            Request::ListTags { params } => {
                let image = self.image(caller, &params.resource)?;
                Ok(json!({ "Tags": tags_of(&image).unwrap_or_default() }))
            }
            other => Err(not_implemented(other.operation().name())),
        }
    }

    async fn create(
        &self,
        caller: &Caller,
        req: CreateMicrovmImageRequest,
    ) -> Result<Value, ApiError> {
        let op = token_scope(caller, "CreateMicrovmImage");
        if let Some(saved) = self.replay(&op, req.client_token.as_deref(), &req)? {
            return Ok(saved);
        }
        self.check_config(caller, &req.config)?;
        let t = now();
        let mut image = ImageRow {
            key: String::new(),
            label: req.name.clone(),
            account: caller.account.clone(),
            state: MicrovmImageState::Creating.as_str().into(),
            created_at: t,
            updated_at: None,
            tags: json!(req.tags.clone().unwrap_or_default()),
            owner: caller.principal.clone(),
        };
        let stored = self.quotas.stored_bytes_of(&caller.principal).await?;
        let admitted = self
            .quotas
            .admit_image(&caller.principal, &req.name, stored)?;
        let mut created = false;
        for key in store::image_keys(&req.name, &caller.account, caller.is_admin()) {
            image.key = key;
            let version = pending_version(&image.key, 1, &req.config, t)?;
            created = self
                .store
                .create_image(&image, &version)
                .map_err(internal)?;
            if created {
                break;
            }
        }
        drop(admitted);
        if !created {
            return Err(ApiError::conflict(
                "MicrovmImage",
                &req.name,
                // Names are unique within an account: this caller has one of that name.
                format!("you have an image named {} already; use UpdateMicrovmImage to build a new version of it, or pick another name", req.name),
            ));
        }
        self.builds
            .spawn(image.key.clone(), 1, req.config.clone(), true);
        let out = to_value(&CreateMicrovmImageResponse {
            image: self.summary(&image)?,
            config: req.config.clone(),
            tags: req.tags.clone(),
            updated_at: None,
            image_version: "1".into(),
        })?;
        self.remember(&op, req.client_token.as_deref(), &req, &out)?;
        Ok(out)
    }

    async fn update(
        &self,
        caller: &Caller,
        identifier: &str,
        req: UpdateMicrovmImageRequest,
    ) -> Result<Value, ApiError> {
        let op = token_scope(caller, &format!("UpdateMicrovmImage:{identifier}"));
        if let Some(saved) = self.replay(&op, req.client_token.as_deref(), &req)? {
            return Ok(saved);
        }
        let image = self.image(caller, identifier)?;
        if matches!(image.state.as_str(), "CREATING" | "UPDATING") {
            return Err(ApiError::conflict(
                "MicrovmImage",
                &image.label,
                format!(
                    "image {} is {}: wait for its build to end",
                    image.label, image.state
                ),
            ));
        }
        self.check_config(caller, &req.config)?;
        let t = now();
        let row = pending_version(&image.key, 0, &req.config, t)?;
        // Counted against the image's owner (admin may update anyone's image).
        let stored = self.quotas.stored_bytes_of(&image.owner).await?;
        let admitted = self
            .quotas
            .admit_version(&image.owner, &image.key, &image.label, stored)?;
        let v = self
            .store
            .add_version(&image.key, MicrovmImageState::Updating.as_str(), row)
            .map_err(internal)?;
        drop(admitted);
        self.builds
            .spawn(image.key.clone(), v.version, req.config.clone(), false);
        let image = self
            .store
            .image(&image.key)
            .map_err(internal)?
            .ok_or_else(|| ApiError::not_found("MicrovmImage", identifier))?;
        let out = to_value(&UpdateMicrovmImageResponse {
            image: self.summary(&image)?,
            config: req.config.clone(),
            updated_at: ts(t),
            image_version: v.version.to_string(),
        })?;
        self.remember(&op, req.client_token.as_deref(), &req, &out)?;
        Ok(out)
    }

    fn delete(&self, caller: &Caller, identifier: &str) -> Result<Value, ApiError> {
        let image = self.image(caller, identifier)?;
        if matches!(image.state.as_str(), "CREATING" | "UPDATING") {
            return Err(ApiError::conflict(
                "MicrovmImage",
                &image.label,
                format!(
                    "image {} is {}: wait for its build to end, then delete it",
                    image.label, image.state
                ),
            ));
        }
        self.refuse_if_running(&image, None)?;
        self.store.delete_image(&image.key).map_err(internal)?;
        let _ = std::fs::remove_dir_all(self.home.join("images").join(&image.key));
        to_value(&DeleteMicrovmImageOutput {
            image_identifier: identifier.to_string(),
            state: MicrovmImageState::Deleted,
        })
    }

    /// A ConflictException while MicroVMs of the image (or of one version) are not yet
    /// TERMINATED: their sessions still restore from its snapshot.
    fn refuse_if_running(&self, image: &ImageRow, version: Option<i64>) -> Result<(), ApiError> {
        let live = self
            .store
            .microvms(Some(&image.key), version, None)
            .map_err(internal)?
            .into_iter()
            .filter(|m| m.state != kiln_api::shapes::microvm::MicrovmState::Terminated)
            .count();
        if live == 0 {
            return Ok(());
        }
        Err(ApiError::conflict(
            "MicrovmImage",
            &image.label,
            format!(
                "Cannot delete microvm image with running microvms ({live} not yet TERMINATED: \
                 terminate them first)"
            ),
        ))
    }

    /// Checks what the model cannot: a known base, a code artifact kiln can fetch.
    fn check_config(&self, caller: &Caller, c: &ImageVersionConfig) -> Result<(), ApiError> {
        self.builds
            .network
            .build_egress(c.egress_network_connectors.as_deref())?;
        managed::validate_base(&c.base_image_arn)?;
        let CodeArtifact::Uri(uri) = &c.code_artifact;
        let refused = |e: ArtifactRefusal| match e {
            ArtifactRefusal::FileNotAdmin { .. } | ArtifactRefusal::BucketNotGranted { .. } => {
                ApiError::access_denied(e.to_string())
            }
            _ => ApiError::validation(e.to_string()),
        };
        if uri.starts_with("s3://") {
            if self.builds.remote_s3_for(uri).is_some() {
                // The external store answers for the object when the build fetches it.
                return self
                    .builds
                    .artifacts()
                    .external(&caller.principal, uri)
                    .map_err(refused);
            }
            return self
                .builds
                .s3()
                .object_path(uri, &caller.principal)
                .map(drop)
                .map_err(|e| ApiError::validation(e.to_string()));
        }
        if uri.starts_with("file://") {
            return self
                .builds
                .artifacts()
                .file(&caller.principal, uri)
                .map(drop)
                .map_err(refused);
        }
        Err(ApiError::validation(format!(
            "codeArtifact.uri {uri} is not supported: upload the zip with `aws s3 cp app.zip s3://BUCKET/app.zip --endpoint-url <kilnd>` and use uri=s3://BUCKET/app.zip (`kiln build` does both)"
        )))
    }

    /// The image `identifier` names, if `caller` may see it.
    fn image(&self, caller: &Caller, identifier: &str) -> Result<ImageRow, ApiError> {
        find_image(&self.store, &self.ctx, caller, identifier)
    }

    fn version(
        &self,
        caller: &Caller,
        identifier: &str,
        version: &str,
    ) -> Result<(ImageRow, VersionRow), ApiError> {
        let image = self.image(caller, identifier)?;
        let number: i64 = version.parse().map_err(|_| {
            ApiError::not_found("MicrovmImageVersion", &format!("{}:{version}", image.label))
        })?;
        let v = self
            .store
            .version(&image.key, number)
            .map_err(internal)?
            .ok_or_else(|| {
                ApiError::not_found("MicrovmImageVersion", &format!("{}:{version}", image.label))
            })?;
        Ok((image, v))
    }

    fn summary(&self, image: &ImageRow) -> Result<MicrovmImageSummary, ApiError> {
        let active = self
            .store
            .latest_version(&image.key, "SUCCESSFUL", Some("ACTIVE"))
            .map_err(internal)?;
        let failed = self
            .store
            .latest_version(&image.key, "FAILED", None)
            .map_err(internal)?;
        Ok(MicrovmImageSummary {
            image_arn: self.image_arn(image),
            name: image.label.clone(),
            state: image.state.parse().unwrap_or(MicrovmImageState::Creating),
            latest_active_image_version: active.map(|v| v.to_string()),
            latest_failed_image_version: failed.map(|v| v.to_string()),
            created_at: ts(image.created_at),
        })
    }

    fn image_arn(&self, image: &ImageRow) -> String {
        self.ctx.image_arn_in(&image.account, &image.label)
    }

    fn version_summary(
        &self,
        image: &ImageRow,
        v: &VersionRow,
    ) -> Result<MicrovmImageVersionSummary, ApiError> {
        let config: ImageVersionConfig = serde_json::from_value(v.spec.clone())
            .map_err(|e| ApiError::internal(format!("stored version spec is unreadable: {e}")))?;
        Ok(MicrovmImageVersionSummary {
            config,
            image_arn: self.image_arn(image),
            image_version: v.version.to_string(),
            state: v.state.parse().unwrap_or(MicrovmImageVersionState::Pending),
            status: v
                .status
                .parse()
                .unwrap_or(MicrovmImageVersionStatus::Active),
            created_at: ts(v.created_at),
            updated_at: v.updated_at.map(ts),
            state_reason: v.state_reason.clone(),
            tags: tags_of(image),
        })
    }

    fn build_summary(
        &self,
        image: &ImageRow,
        v: &VersionRow,
    ) -> Result<MicrovmImageBuildSummary, ApiError> {
        Ok(MicrovmImageBuildSummary {
            image_arn: self.image_arn(image),
            image_version: v.version.to_string(),
            build_id: v.build_id.clone(),
            build_state: v.build_state.parse().unwrap_or(BuildState::Pending),
            architecture: Architecture::X86_64,
            chipset: Chipset::Intel,
            chipset_generation: "qemu".into(),
            state_reason: v.state_reason.clone(),
            created_at: ts(v.created_at),
        })
    }

    /// The stored answer to an earlier call with the same idempotency token, if any.
    fn replay<T: serde::Serialize>(
        &self,
        op: &str,
        token: Option<&str>,
        req: &T,
    ) -> Result<Option<Value>, ApiError> {
        let Some(token) = token else { return Ok(None) };
        let hash = request_hash(req)?;
        match self.store.client_token(token, op).map_err(internal)? {
            Some((h, response)) if h == hash => Ok(serde_json::from_str(&response).ok()),
            Some(_) => Err(ApiError::conflict(
                "ClientToken",
                token,
                "this clientToken was already used with different parameters; use a new token",
            )),
            None => Ok(None),
        }
    }

    fn remember<T: serde::Serialize>(
        &self,
        op: &str,
        token: Option<&str>,
        req: &T,
        out: &Value,
    ) -> Result<(), ApiError> {
        if let Some(token) = token {
            self.store
                .put_client_token(token, op, &request_hash(req)?, &out.to_string(), now())
                .map_err(internal)?;
        }
        Ok(())
    }

    /// The build log of a version `caller` may see (for `/kiln/v1`), and the image's
    /// store key for [`Images::build_finished`].
    pub fn build_log_path(
        &self,
        caller: &Caller,
        image: &str,
        version: &str,
    ) -> Result<(PathBuf, String), ApiError> {
        let (image, v) = self.version(caller, image, version)?;
        let path = version_dir(&self.home, &image.key, v.version).join("build.log");
        Ok((path, image.key))
    }

    /// Whether a version's build has ended (or the version is gone). Asked while streaming
    /// a log whose caller was checked by [`Images::build_log_path`], with the key it gave.
    pub fn build_finished(&self, key: &str, version: &str) -> bool {
        let Ok(number) = version.parse::<i64>() else {
            return true;
        };
        match self.store.version(key, number) {
            Ok(Some(v)) => !matches!(v.state.as_str(), "PENDING" | "IN_PROGRESS"),
            _ => true,
        }
    }
}

/// The image `identifier` names, if `caller` may see it. A bare name is the caller's own
/// image; an ARN names an image in its account, which only its owner (and admin) may see:
/// anyone else's image is not found, exactly like a missing one, so neither its existence
/// nor its owner leaks. Managed images are not the caller's to act on: not found either.
pub fn find_image(
    store: &Arc<dyn Store>,
    ctx: &ArnContext,
    caller: &Caller,
    identifier: &str,
) -> Result<ImageRow, ApiError> {
    let r = kiln_api::image_identifier(identifier)?;
    let Some((account, name)) = r.in_account(ctx, &caller.account) else {
        return Err(ApiError::not_found("MicrovmImage", identifier));
    };
    store
        .image_in(account, name)
        .map_err(internal)?
        .filter(|image| caller.can_access(&image.owner))
        .ok_or_else(|| ApiError::not_found("MicrovmImage", identifier))
}

/// A new version waiting to build; `version` 0 lets the store pick the next number.
fn pending_version(
    image: &str,
    version: i64,
    config: &ImageVersionConfig,
    now: f64,
) -> Result<VersionRow, ApiError> {
    Ok(VersionRow {
        image: image.to_string(),
        version,
        state: MicrovmImageVersionState::Pending.as_str().into(),
        status: MicrovmImageVersionStatus::Active.as_str().into(),
        state_reason: None,
        spec: to_value(config)?,
        created_at: now,
        updated_at: None,
        build_id: new_id(),
        build_state: BuildState::Pending.as_str().into(),
        snapshot_dir: None,
        memory_bytes: None,
        disk_bytes: None,
        code_bytes: None,
    })
}

/// Idempotency tokens are per principal: one principal's token never replays (or blocks)
/// another's request.
fn token_scope(caller: &Caller, op: &str) -> String {
    format!("{}/{op}", caller.principal)
}

fn tags_of(image: &ImageRow) -> Option<Tags> {
    serde_json::from_value::<Tags>(image.tags.clone())
        .ok()
        .filter(|t| !t.is_empty())
}

/// A random 16-byte hex id.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
