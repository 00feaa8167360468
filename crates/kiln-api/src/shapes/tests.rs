//! Round trips of representative shapes against JSON written as the AWS docs show it.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::*;
use crate::Timestamp;

fn round_trip<T: Serialize + DeserializeOwned>(wire: Value) -> T {
    let value: T = serde_json::from_value(wire.clone()).expect("deserializes");
    assert_eq!(serde_json::to_value(&value).expect("serializes"), wire);
    value
}

#[test]
fn create_image_request_round_trips() {
    let req: CreateMicrovmImageRequest = round_trip(json!({
        "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
        "baseImageVersion": "1",
        "buildRoleArn": "arn:aws:iam::000000000000:role/build",
        "description": "web server",
        "codeArtifact": {"uri": "s3://bucket/app.zip"},
        "logging": {"cloudWatch": {"logGroup": "/kiln/web", "logStream": "build"}},
        "egressNetworkConnectors": ["nc-1"],
        "cpuConfigurations": [{"architecture": "X86_64"}],
        "resources": [{"minimumMemoryInMiB": 512}],
        "additionalOsCapabilities": ["ALL"],
        "hooks": {
            "port": 9000,
            "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 10, "suspend": "DISABLED"},
            "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 600}
        },
        "environmentVariables": {"PORT": "8080"},
        "kmsKeyIdentifier": "alias/kiln",
        "name": "web",
        "tags": {"team": "infra"},
        "clientToken": "tok-1"
    }));
    assert_eq!(req.name, "web");
    assert_eq!(
        req.config.code_artifact,
        CodeArtifact::Uri("s3://bucket/app.zip".into())
    );
    assert_eq!(
        req.config.resources,
        Some(vec![Resources {
            minimum_memory_in_mib: 512
        }])
    );
}

#[test]
fn minimal_create_image_request_omits_absent_members() {
    let req: CreateMicrovmImageRequest = round_trip(json!({
        "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
        "buildRoleArn": "arn:aws:iam::000000000000:role/build",
        "codeArtifact": {"uri": "file:///srv/app.zip"},
        "name": "web"
    }));
    assert_eq!(req.config.logging, None);
}

#[test]
fn unknown_input_members_are_ignored() {
    let req: UpdateMicrovmImageVersionRequest =
        serde_json::from_value(json!({"status": "INACTIVE", "futureMember": 1})).unwrap();
    assert_eq!(req.status, MicrovmImageVersionStatus::Inactive);
}

#[test]
fn image_version_summary_round_trips() {
    let v: MicrovmImageVersionSummary = round_trip(json!({
        "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
        "buildRoleArn": "arn:aws:iam::000000000000:role/build",
        "codeArtifact": {"uri": "s3://bucket/app.zip"},
        "logging": {"disabled": {}},
        "imageArn": "arn:aws:lambda:local:000000000000:microvm-image:web",
        "imageVersion": "2",
        "state": "IN_PROGRESS",
        "status": "ACTIVE",
        "createdAt": 1700000000,
        "updatedAt": 1700000060.5,
        "stateReason": "building",
        "tags": {}
    }));
    assert_eq!(
        v.config.logging,
        Some(Logging::Disabled(LoggingDisabled {}))
    );
    assert_eq!(
        v.updated_at,
        Some(Timestamp::from_millis(1_700_000_060_500))
    );
}

#[test]
fn create_image_response_flattens_image_and_config() {
    let r: CreateMicrovmImageResponse = round_trip(json!({
        "imageArn": "arn:aws:lambda:local:000000000000:microvm-image:web",
        "name": "web",
        "state": "CREATING",
        "createdAt": 1700000000,
        "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
        "buildRoleArn": "arn:aws:iam::000000000000:role/build",
        "codeArtifact": {"uri": "s3://bucket/app.zip"},
        "imageVersion": "1"
    }));
    assert_eq!(r.image.state, MicrovmImageState::Creating);
}

#[test]
fn get_build_output_round_trips() {
    let b: GetMicrovmImageBuildOutput = round_trip(json!({
        "imageArn": "arn:aws:lambda:local:000000000000:microvm-image:web",
        "imageVersion": "1",
        "buildId": "b-1",
        "buildState": "SUCCESSFUL",
        "architecture": "ARM_64",
        "chipset": "GRAVITON",
        "chipsetGeneration": "4",
        "createdAt": 1700000000,
        "snapshotBuild": {"memorySnapshotSizeInBytes": 268435456_i64, "diskSnapshotSizeInBytes": 1024}
    }));
    assert_eq!(b.build.architecture, Architecture::Arm64);
}

#[test]
fn managed_image_version_round_trips() {
    round_trip::<ListManagedMicrovmImageVersionsOutput>(json!({
        "items": [{
            "imageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
            "imageVersion": "1",
            "status": "AVAILABLE",
            "supportedCpuConfigurations": [{"architecture": "X86_64"}, {"architecture": "ARM_64"}],
            "createdAt": 1700000000
        }],
        "nextToken": "abc"
    }));
}

#[test]
fn run_microvm_request_and_response_round_trip() {
    let req: RunMicrovmRequest = round_trip(json!({
        "imageIdentifier": "web",
        "imageVersion": "2",
        "idlePolicy": {"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 3600, "autoResumeEnabled": true},
        "runHookPayload": "{\"hello\":1}",
        "maximumDurationInSeconds": 900,
        "ingressNetworkConnectors": ["public"]
    }));
    assert_eq!(req.idle_policy.map(|p| p.auto_resume_enabled), Some(true));
    let resp: RunMicrovmResponse = round_trip(json!({
        "microvmId": "mvm-0123",
        "state": "PENDING",
        "endpoint": "mvm-0123.microvms.local",
        "imageArn": "arn:aws:lambda:local:000000000000:microvm-image:web",
        "imageVersion": "2",
        "maximumDurationInSeconds": 900,
        "startedAt": 1700000000
    }));
    assert_eq!(resp.state, MicrovmState::Pending);
}

#[test]
fn port_specification_union_members_round_trip() {
    let req: CreateMicrovmAuthTokenRequest = round_trip(json!({
        "expirationInMinutes": 15,
        "allowedPorts": [{"port": 8080}, {"range": {"startPort": 9000, "endPort": 9010}}, {"allPorts": {}}]
    }));
    assert_eq!(req.allowed_ports[0], PortSpecification::Port(8080));
    assert!(req.allowed_ports[1].allows(9005));
    assert!(!req.allowed_ports[1].allows(9011));
    assert!(req.allowed_ports[2].allows(1));
}

#[test]
fn union_with_two_members_is_rejected() {
    let err = serde_json::from_value::<PortSpecification>(json!({"port": 1, "allPorts": {}}))
        .unwrap_err();
    assert!(err.to_string().contains(UNION_CONSTRAINT), "{err}");
    assert!(serde_json::from_value::<Logging>(json!({})).is_err());
}

#[test]
fn tag_shapes_use_pascal_case() {
    let req: TagResourceRequest = round_trip(json!({"Tags": {"team": "infra"}}));
    assert_eq!(req.tags.get("team").map(String::as_str), Some("infra"));
    round_trip::<ListTagsResponse>(json!({"Tags": {"a": "b"}}));
}

#[test]
fn empty_outputs_serialize_as_empty_objects() {
    assert_eq!(
        serde_json::to_value(TerminateMicrovmResponse {}).unwrap(),
        json!({})
    );
    assert_eq!(
        serde_json::to_value(SuspendMicrovmResponse {}).unwrap(),
        json!({})
    );
    assert_eq!(
        serde_json::to_value(ResumeMicrovmResponse {}).unwrap(),
        json!({})
    );
}

#[test]
fn enums_spell_model_values() {
    assert_eq!(MicrovmImageState::CreateFailed.as_str(), "CREATE_FAILED");
    assert_eq!(
        "DELETE_FAILED".parse::<MicrovmImageVersionState>(),
        Ok(MicrovmImageVersionState::DeleteFailed)
    );
    assert_eq!(MicrovmState::ALL.len(), 6);
    let err = serde_json::from_value::<MicrovmState>(json!("RUNNNING")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Member must satisfy enum value set: [PENDING, RUNNING"),
        "{err}"
    );
}
