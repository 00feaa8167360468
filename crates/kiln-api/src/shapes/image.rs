//! Image, image version, build and managed-image shapes.

use serde::{Deserialize, Serialize};

use super::common::{
    Architecture, Capability, Chipset, CodeArtifact, CpuConfiguration, EnvironmentVariables, Hooks,
    Logging, Resources, Tags,
};
use crate::Timestamp;

wire_enum! {
    /// Lifecycle of an image as a whole (model `MicrovmImageState`).
    MicrovmImageState {
        /// The first version is being built.
        Creating = "CREATING",
        /// The image exists.
        Created = "CREATED",
        /// The first version failed to build.
        CreateFailed = "CREATE_FAILED",
        /// A new version is being built.
        Updating = "UPDATING",
        /// The latest update finished.
        Updated = "UPDATED",
        /// The latest update failed.
        UpdateFailed = "UPDATE_FAILED",
        /// The image is being deleted.
        Deleting = "DELETING",
        /// Deleting the image failed.
        DeleteFailed = "DELETE_FAILED",
        /// The image is gone.
        Deleted = "DELETED",
    }
}

wire_enum! {
    /// Build progress of one image version (model `MicrovmImageVersionState`).
    MicrovmImageVersionState {
        /// Waiting to build.
        Pending = "PENDING",
        /// Building.
        InProgress = "IN_PROGRESS",
        /// Built; MicroVMs can run from it.
        Successful = "SUCCESSFUL",
        /// The build failed.
        Failed = "FAILED",
        /// Being deleted.
        Deleting = "DELETING",
        /// Gone.
        Deleted = "DELETED",
        /// Deleting failed.
        DeleteFailed = "DELETE_FAILED",
    }
}

wire_enum! {
    /// Whether a version may be used to run MicroVMs (model `MicrovmImageVersionStatus`).
    MicrovmImageVersionStatus {
        /// Usable.
        Active = "ACTIVE",
        /// Switched off by its owner.
        Inactive = "INACTIVE",
    }
}

wire_enum! {
    /// Availability of a managed base image version (model
    /// `ManagedMicrovmImageVersionStatus`).
    ManagedMicrovmImageVersionStatus {
        /// Usable as a base.
        Available = "AVAILABLE",
        /// Usable but superseded.
        Deprecated = "DEPRECATED",
        /// Withdrawn.
        Recalled = "RECALLED",
    }
}

wire_enum! {
    /// Progress of one per-CPU build of a version (model `BuildState`).
    BuildState {
        /// Waiting.
        Pending = "PENDING",
        /// Running.
        InProgress = "IN_PROGRESS",
        /// Finished with a snapshot.
        Successful = "SUCCESSFUL",
        /// Failed.
        Failed = "FAILED",
    }
}

/// What one image version is built from: the members Create/UpdateMicrovmImage take and
/// every version description echoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageVersionConfig {
    /// ARN of the (managed or own) image this one builds on.
    pub base_image_arn: String,
    /// Version of the base image; latest when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_image_version: Option<String>,
    /// IAM role the build assumes.
    pub build_role_arn: String,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the code comes from.
    pub code_artifact: CodeArtifact,
    /// Where build logs go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// At most one egress network connector for the build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_network_connectors: Option<Vec<String>>,
    /// CPU targets to build for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_configurations: Option<Vec<CpuConfiguration>>,
    /// At most one memory requirement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<Resources>>,
    /// Extra OS capabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_os_capabilities: Option<Vec<Capability>>,
    /// Hooks the code implements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    /// Environment of the code (at most 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment_variables: Option<EnvironmentVariables>,
    /// KMS key for snapshots at rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_identifier: Option<String>,
}

/// Body of `CreateMicrovmImage` (model `CreateMicrovmImageRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "ImageRequestWire")]
pub struct CreateMicrovmImageRequest {
    /// What the first version is built from.
    #[serde(flatten)]
    pub config: ImageVersionConfig,
    /// The image's name, unique per account and region.
    pub name: String,
    /// Tags for the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// Idempotency token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// The members of Create/UpdateMicrovmImage bodies, read flat. serde's `flatten` would
/// lose the member path of a bad value, which validation messages need.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageRequestWire {
    base_image_arn: String,
    base_image_version: Option<String>,
    build_role_arn: String,
    description: Option<String>,
    code_artifact: CodeArtifact,
    logging: Option<Logging>,
    egress_network_connectors: Option<Vec<String>>,
    cpu_configurations: Option<Vec<CpuConfiguration>>,
    resources: Option<Vec<Resources>>,
    additional_os_capabilities: Option<Vec<Capability>>,
    hooks: Option<Hooks>,
    environment_variables: Option<EnvironmentVariables>,
    kms_key_identifier: Option<String>,
    name: Option<String>,
    tags: Option<Tags>,
    client_token: Option<String>,
}

impl ImageRequestWire {
    fn split(
        self,
    ) -> (
        ImageVersionConfig,
        Option<String>,
        Option<Tags>,
        Option<String>,
    ) {
        let config = ImageVersionConfig {
            base_image_arn: self.base_image_arn,
            base_image_version: self.base_image_version,
            build_role_arn: self.build_role_arn,
            description: self.description,
            code_artifact: self.code_artifact,
            logging: self.logging,
            egress_network_connectors: self.egress_network_connectors,
            cpu_configurations: self.cpu_configurations,
            resources: self.resources,
            additional_os_capabilities: self.additional_os_capabilities,
            hooks: self.hooks,
            environment_variables: self.environment_variables,
            kms_key_identifier: self.kms_key_identifier,
        };
        (config, self.name, self.tags, self.client_token)
    }
}

impl TryFrom<ImageRequestWire> for CreateMicrovmImageRequest {
    type Error = String;
    fn try_from(wire: ImageRequestWire) -> Result<Self, String> {
        let (config, name, tags, client_token) = wire.split();
        // Worded as serde words it, so `parse_body` reports `name` as null.
        let name = name.ok_or_else(|| "missing field `name`".to_string())?;
        Ok(CreateMicrovmImageRequest {
            config,
            name,
            tags,
            client_token,
        })
    }
}

impl From<ImageRequestWire> for UpdateMicrovmImageRequest {
    fn from(wire: ImageRequestWire) -> Self {
        // `name` and `tags` are not members of this input; AWS ignores them too.
        let (config, _, _, client_token) = wire.split();
        UpdateMicrovmImageRequest {
            config,
            client_token,
        }
    }
}

/// The members every image description starts with (model `MicrovmImageSummary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmImageSummary {
    /// The image's ARN.
    pub image_arn: String,
    /// The image's name.
    pub name: String,
    /// The image's lifecycle state.
    pub state: MicrovmImageState,
    /// Newest version that built successfully.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_active_image_version: Option<String>,
    /// Newest version that failed to build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_failed_image_version: Option<String>,
    /// When the image was created.
    pub created_at: Timestamp,
}

/// Output of `CreateMicrovmImage` (model `CreateMicrovmImageResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMicrovmImageResponse {
    /// The image.
    #[serde(flatten)]
    pub image: MicrovmImageSummary,
    /// The configuration of the version being built.
    #[serde(flatten)]
    pub config: ImageVersionConfig,
    /// The image's tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// When the image last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    /// The version this call started building.
    pub image_version: String,
}

/// Body of `UpdateMicrovmImage` (model `UpdateMicrovmImageRequest`); the image is the
/// `imageIdentifier` URI label ([`crate::params::ImageParams`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "ImageRequestWire")]
pub struct UpdateMicrovmImageRequest {
    /// What the new version is built from.
    #[serde(flatten)]
    pub config: ImageVersionConfig,
    /// Idempotency token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// Output of `UpdateMicrovmImage` (model `UpdateMicrovmImageResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMicrovmImageResponse {
    /// The image.
    #[serde(flatten)]
    pub image: MicrovmImageSummary,
    /// The configuration of the version being built.
    #[serde(flatten)]
    pub config: ImageVersionConfig,
    /// When the image last changed.
    pub updated_at: Timestamp,
    /// The version this call started building.
    pub image_version: String,
}

/// Output of `GetMicrovmImage` (model `GetMicrovmImageOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetMicrovmImageOutput {
    /// The image.
    #[serde(flatten)]
    pub image: MicrovmImageSummary,
    /// The image's tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// When the image last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
}

/// Output of `DeleteMicrovmImage` (model `DeleteMicrovmImageOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteMicrovmImageOutput {
    /// The identifier the caller passed.
    pub image_identifier: String,
    /// The image's state after the call.
    pub state: MicrovmImageState,
}

/// Output of `ListMicrovmImages` (model `ListMicrovmImagesResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMicrovmImagesResponse {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<MicrovmImageSummary>,
}

/// One image version in full (model `MicrovmImageVersionSummary`); also the output of
/// `GetMicrovmImageVersion` and `UpdateMicrovmImageVersion`, whose shapes have the same
/// members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmImageVersionSummary {
    /// What the version was built from.
    #[serde(flatten)]
    pub config: ImageVersionConfig,
    /// The image's ARN.
    pub image_arn: String,
    /// The version.
    pub image_version: String,
    /// Build progress.
    pub state: MicrovmImageVersionState,
    /// Whether MicroVMs may run from it.
    pub status: MicrovmImageVersionStatus,
    /// When the version was created.
    pub created_at: Timestamp,
    /// When it last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    /// Why it is in its state (e.g. a build error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// The image's tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}

/// Output of `GetMicrovmImageVersion` (model `GetMicrovmImageVersionOutput`).
pub type GetMicrovmImageVersionOutput = MicrovmImageVersionSummary;

/// Output of `UpdateMicrovmImageVersion` (model `UpdateMicrovmImageVersionResponse`).
pub type UpdateMicrovmImageVersionResponse = MicrovmImageVersionSummary;

/// Body of `UpdateMicrovmImageVersion` (model `UpdateMicrovmImageVersionRequest`); image
/// and version are URI labels ([`crate::params::ImageVersionParams`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMicrovmImageVersionRequest {
    /// The new status.
    pub status: MicrovmImageVersionStatus,
}

/// Output of `DeleteMicrovmImageVersion` (model `DeleteMicrovmImageVersionOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteMicrovmImageVersionOutput {
    /// The identifier the caller passed.
    pub image_identifier: String,
    /// The version.
    pub image_version: String,
    /// The version's state after the call.
    pub state: MicrovmImageVersionState,
}

/// Output of `ListMicrovmImageVersions` (model `ListMicrovmImageVersionsOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMicrovmImageVersionsOutput {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<MicrovmImageVersionSummary>,
}

/// Sizes of what a build produced (model `SnapshotBuild`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotBuild {
    /// Bytes of guest memory in the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_snapshot_size_in_bytes: Option<i64>,
    /// Bytes the installed code takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_install_size_in_bytes: Option<i64>,
    /// Bytes of disk in the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_snapshot_size_in_bytes: Option<i64>,
}

/// One per-CPU build of a version (model `MicrovmImageBuildSummary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmImageBuildSummary {
    /// The image's ARN.
    pub image_arn: String,
    /// The version.
    pub image_version: String,
    /// The build's id.
    pub build_id: String,
    /// Progress.
    pub build_state: BuildState,
    /// Instruction set built for.
    pub architecture: Architecture,
    /// Processor family built on.
    pub chipset: Chipset,
    /// Processor generation built on.
    pub chipset_generation: String,
    /// Why the build is in its state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// When the build started.
    pub created_at: Timestamp,
}

/// Output of `GetMicrovmImageBuild` (model `GetMicrovmImageBuildOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetMicrovmImageBuildOutput {
    /// The build.
    #[serde(flatten)]
    pub build: MicrovmImageBuildSummary,
    /// What it produced, once successful.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_build: Option<SnapshotBuild>,
}

/// Output of `ListMicrovmImageBuilds` (model `ListMicrovmImageBuildsOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMicrovmImageBuildsOutput {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<MicrovmImageBuildSummary>,
}

/// A managed base image (model `ManagedMicrovmImageSummary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedMicrovmImageSummary {
    /// The managed image's ARN.
    pub image_arn: String,
    /// When it was published.
    pub created_at: Timestamp,
    /// When it last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
}

/// Output of `ListManagedMicrovmImages` (model `ListManagedMicrovmImagesOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListManagedMicrovmImagesOutput {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<ManagedMicrovmImageSummary>,
}

/// One version of a managed base image (model `ManagedMicrovmImageVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedMicrovmImageVersion {
    /// The managed image's ARN.
    pub image_arn: String,
    /// The version.
    pub image_version: String,
    /// Availability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ManagedMicrovmImageVersionStatus>,
    /// CPU targets it can be built for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supported_cpu_configurations: Option<Vec<CpuConfiguration>>,
    /// When it was published.
    pub created_at: Timestamp,
    /// When it last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
}

/// Output of `ListManagedMicrovmImageVersions` (model
/// `ListManagedMicrovmImageVersionsOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListManagedMicrovmImageVersionsOutput {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<ManagedMicrovmImageVersion>,
}
