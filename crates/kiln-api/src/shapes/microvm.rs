//! MicroVM shapes: run, describe, list, idle policy, auth tokens.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Logging, Unit, UNION_CONSTRAINT};
use crate::Timestamp;

wire_enum! {
    /// Lifecycle of a MicroVM (model `MicrovmState`).
    MicrovmState {
        /// Starting.
        Pending = "PENDING",
        /// Running and reachable.
        Running = "RUNNING",
        /// Being snapshotted and stopped.
        Suspending = "SUSPENDING",
        /// Stopped with its state saved.
        Suspended = "SUSPENDED",
        /// Being stopped for good.
        Terminating = "TERMINATING",
        /// Gone.
        Terminated = "TERMINATED",
    }
}

/// When an idle MicroVM is suspended and a suspended one terminated (model `IdlePolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdlePolicy {
    /// Idle seconds before suspending (at least 60).
    pub max_idle_duration_seconds: i32,
    /// Seconds to stay suspended before terminating (at least 0).
    pub suspended_duration_seconds: i32,
    /// Whether traffic to a suspended MicroVM resumes it.
    pub auto_resume_enabled: bool,
}

/// Body of `RunMicrovm` (model `RunMicrovmRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunMicrovmRequest {
    /// Up to 10 ingress network connectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_network_connectors: Option<Vec<String>>,
    /// Up to 10 egress network connectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_network_connectors: Option<Vec<String>>,
    /// Image name or ARN to run.
    pub image_identifier: String,
    /// Image version; the latest active one when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    /// Role the MicroVM's code runs as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
    /// Suspend/terminate when idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    /// Where the MicroVM's logs go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// KMS key for its snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_identifier: Option<String>,
    /// Opaque payload handed to the run hook (at most 4096 characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_hook_payload: Option<String>,
    /// Hard limit on its life, 1–28800 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_duration_in_seconds: Option<i32>,
    /// Idempotency token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// A MicroVM in full: output of `RunMicrovm` and `GetMicrovm`, whose shapes
/// (`RunMicrovmResponse`, `GetMicrovmResponse`) have the same members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmDescription {
    /// The MicroVM's id.
    pub microvm_id: String,
    /// Its lifecycle state.
    pub state: MicrovmState,
    /// Where to reach it.
    pub endpoint: String,
    /// The image it runs.
    pub image_arn: String,
    /// The image version it runs.
    pub image_version: String,
    /// Role its code runs as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
    /// Its idle policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    /// Hard limit on its life in seconds.
    pub maximum_duration_in_seconds: i32,
    /// When it started.
    pub started_at: Timestamp,
    /// When it terminated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminated_at: Option<Timestamp>,
    /// Why it is in its state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// KMS key for its snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_identifier: Option<String>,
    /// Its ingress network connectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_network_connectors: Option<Vec<String>>,
    /// Its egress network connectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_network_connectors: Option<Vec<String>>,
}

/// Output of `RunMicrovm` (model `RunMicrovmResponse`).
pub type RunMicrovmResponse = MicrovmDescription;

/// Output of `GetMicrovm` (model `GetMicrovmResponse`).
pub type GetMicrovmResponse = MicrovmDescription;

/// One MicroVM in a list (model `MicrovmItem`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmItem {
    /// The MicroVM's id.
    pub microvm_id: String,
    /// Its lifecycle state.
    pub state: MicrovmState,
    /// The image it runs.
    pub image_arn: String,
    /// The image version it runs.
    pub image_version: String,
    /// When it started.
    pub started_at: Timestamp,
}

/// Output of `ListMicrovms` (model `ListMicrovmsResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMicrovmsResponse {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// This page.
    pub items: Vec<MicrovmItem>,
}

/// Output of `TerminateMicrovm`: no members (model `TerminateMicrovmResponse`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateMicrovmResponse {}

/// Output of `SuspendMicrovm`: no members (model `SuspendMicrovmResponse`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendMicrovmResponse {}

/// Output of `ResumeMicrovm`: no members (model `ResumeMicrovmResponse`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeMicrovmResponse {}

/// An inclusive range of guest ports (model `PortRange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// First port, 1–65535.
    pub start_port: i32,
    /// Last port, 1–65535.
    pub end_port: i32,
}

/// Union `PortSpecification`: the guest ports an auth token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "PortSpecificationWire")]
pub enum PortSpecification {
    /// `{"port": 8080}`
    Port(i32),
    /// `{"range": {"startPort": 8000, "endPort": 8100}}`
    Range(PortRange),
    /// `{"allPorts": {}}`
    AllPorts(Unit),
}

impl PortSpecification {
    /// Whether guest port `port` is covered.
    pub fn allows(&self, port: u16) -> bool {
        let port = i32::from(port);
        match self {
            PortSpecification::Port(p) => *p == port,
            PortSpecification::Range(r) => r.start_port <= port && port <= r.end_port,
            PortSpecification::AllPorts(_) => true,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortSpecificationWire {
    port: Option<i32>,
    range: Option<PortRange>,
    all_ports: Option<Unit>,
}

impl TryFrom<PortSpecificationWire> for PortSpecification {
    type Error = String;
    fn try_from(w: PortSpecificationWire) -> Result<Self, String> {
        match (w.port, w.range, w.all_ports) {
            (Some(p), None, None) => Ok(PortSpecification::Port(p)),
            (None, Some(r), None) => Ok(PortSpecification::Range(r)),
            (None, None, Some(u)) => Ok(PortSpecification::AllPorts(u)),
            _ => Err(UNION_CONSTRAINT.to_string()),
        }
    }
}

/// Body of `CreateMicrovmAuthToken` (model `CreateMicrovmAuthTokenRequest`); the MicroVM
/// is the `microvmIdentifier` URI label ([`crate::params::MicrovmParams`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMicrovmAuthTokenRequest {
    /// Lifetime of the token in minutes (at least 1).
    pub expiration_in_minutes: i32,
    /// Ports the token opens (at least one).
    pub allowed_ports: Vec<PortSpecification>,
}

/// Output of `CreateMicrovmAuthToken` (model `CreateMicrovmAuthTokenResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMicrovmAuthTokenResponse {
    /// The token's parts, e.g. header name to header value (1–10 entries).
    pub auth_token: BTreeMap<String, String>,
}

/// Body of `CreateMicrovmShellAuthToken` (model `CreateMicrovmShellAuthTokenRequest`);
/// the MicroVM is the `microvmIdentifier` URI label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMicrovmShellAuthTokenRequest {
    /// Lifetime of the token in minutes (at least 1).
    pub expiration_in_minutes: i32,
}

/// Output of `CreateMicrovmShellAuthToken` (model `CreateMicrovmShellAuthTokenResponse`).
pub type CreateMicrovmShellAuthTokenResponse = CreateMicrovmAuthTokenResponse;
