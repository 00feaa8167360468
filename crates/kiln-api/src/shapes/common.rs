//! Shapes shared by image and MicroVM operations: logging, code artifacts, CPU and
//! memory requirements, hooks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A resource's tags (model `Tags`): key to value.
pub type Tags = BTreeMap<String, String>;

/// Environment variables of an image (model `EnvironmentVariableMap`).
pub type EnvironmentVariables = BTreeMap<String, String>;

wire_enum! {
    /// The instruction set a build targets (model `Architecture`).
    Architecture {
        /// 64-bit Arm.
        Arm64 = "ARM_64",
        /// 64-bit x86.
        X86_64 = "X86_64",
    }
}

wire_enum! {
    /// The processor family a build ran on (model `Chipset`).
    Chipset {
        /// AWS Graviton (Arm).
        Graviton = "GRAVITON",
        /// Intel x86.
        Intel = "INTEL",
    }
}

wire_enum! {
    /// An extra OS capability an image asks for (model `Capability`).
    Capability {
        /// Every capability.
        All = "ALL",
    }
}

wire_enum! {
    /// Whether a lifecycle hook runs (model `HookState`).
    HookState {
        /// The hook is not called.
        Disabled = "DISABLED",
        /// The hook is called.
        Enabled = "ENABLED",
    }
}

/// The model's `Unit`: an empty structure that marks a union member as chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {}

/// The model's `LoggingDisabled`: an empty structure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggingDisabled {}

/// Where logs go in CloudWatch (model `CloudWatchLogging`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudWatchLogging {
    /// Log group name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_group: Option<String>,
    /// Log stream name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_stream: Option<String>,
}

/// Union `Logging`: logging off, or to CloudWatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "LoggingWire")]
pub enum Logging {
    /// `{"disabled": {}}`
    Disabled(LoggingDisabled),
    /// `{"cloudWatch": {...}}`
    CloudWatch(CloudWatchLogging),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggingWire {
    disabled: Option<LoggingDisabled>,
    cloud_watch: Option<CloudWatchLogging>,
}

impl TryFrom<LoggingWire> for Logging {
    type Error = String;
    fn try_from(w: LoggingWire) -> Result<Self, String> {
        match (w.disabled, w.cloud_watch) {
            (Some(d), None) => Ok(Logging::Disabled(d)),
            (None, Some(c)) => Ok(Logging::CloudWatch(c)),
            _ => Err(UNION_CONSTRAINT.to_string()),
        }
    }
}

/// Union `CodeArtifact`: where an image's code comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "CodeArtifactWire")]
pub enum CodeArtifact {
    /// `{"uri": "s3://bucket/key.zip"}` or any URI kiln can fetch.
    Uri(String),
}

#[derive(Deserialize)]
struct CodeArtifactWire {
    uri: Option<String>,
}

impl TryFrom<CodeArtifactWire> for CodeArtifact {
    type Error = String;
    fn try_from(w: CodeArtifactWire) -> Result<Self, String> {
        w.uri
            .map(CodeArtifact::Uri)
            .ok_or_else(|| UNION_CONSTRAINT.to_string())
    }
}

/// The constraint text a union with zero or several members set fails.
pub const UNION_CONSTRAINT: &str = "Member must have exactly one member set";

/// One CPU target of an image (model `CpuConfiguration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuConfiguration {
    /// The instruction set.
    pub architecture: Architecture,
}

/// Memory an image needs (model `Resources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Minimum guest memory in MiB.
    #[serde(rename = "minimumMemoryInMiB")]
    pub minimum_memory_in_mib: i32,
}

/// Which lifecycle hooks an image's code implements (model `Hooks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// The guest port the hook server listens on (1–65535).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Hooks called over a MicroVM's life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_hooks: Option<MicrovmHooks>,
    /// Hooks called while an image version is built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_image_hooks: Option<MicrovmImageHooks>,
}

/// Run/resume/suspend/terminate hooks and their timeouts, 1–60 s (model `MicrovmHooks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmHooks {
    /// Called after a MicroVM starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<HookState>,
    /// Seconds the run hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_timeout_in_seconds: Option<i32>,
    /// Called after a MicroVM resumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<HookState>,
    /// Seconds the resume hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_timeout_in_seconds: Option<i32>,
    /// Called before a MicroVM suspends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspend: Option<HookState>,
    /// Seconds the suspend hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspend_timeout_in_seconds: Option<i32>,
    /// Called before a MicroVM terminates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate: Option<HookState>,
    /// Seconds the terminate hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate_timeout_in_seconds: Option<i32>,
}

/// Ready/validate hooks of an image build and their timeouts, 1–3600 s
/// (model `MicrovmImageHooks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmImageHooks {
    /// Called to ask whether the code is ready to be snapshotted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<HookState>,
    /// Seconds the ready hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout_in_seconds: Option<i32>,
    /// Called to validate a build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate: Option<HookState>,
    /// Seconds the validate hook may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate_timeout_in_seconds: Option<i32>,
}
