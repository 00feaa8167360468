//! The audit log: every call that changes something (images, versions, MicroVMs, tokens,
//! tags, access keys) and every action kilnd takes on its own (idle suspend, auto-resume,
//! terminations by the reaper), kept in the store and read through `GET /kiln/v1/events`.
//!
//! An event says who (principal and access key id), what (the operation), on what (an
//! `image:version`, an image, a MicroVM id or an access key id), the result (`ok` or the
//! error type) and when. It never holds a request or response body, so no token, secret or
//! run-hook payload can reach it.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_api::{ApiError, Operation};
use serde_json::{json, Value};

use crate::api::wire::internal;
use crate::auth::keys::Caller;
use crate::now;
use crate::store::{AuditQuery, AuditRow, Store};

/// The principal of what kilnd does on its own; no access key may be created for it.
pub const KILND: &str = "kilnd";

/// Most events one `GET /kiln/v1/events` returns.
pub const MAX_LIMIT: usize = 1000;

/// Events one `GET /kiln/v1/events` returns unless asked otherwise.
pub const DEFAULT_LIMIT: usize = 100;

/// Longest target kept: identifiers are short; anything longer is input to be cut.
const MAX_TARGET: usize = 256;

/// The audit log in the store.
pub struct AuditLog {
    store: Arc<dyn Store>,
}

/// Whether an operation changes something, and so is audited.
pub fn is_mutating(op: Operation) -> bool {
    use Operation::*;
    match op {
        CreateMicrovmAuthToken
        | CreateMicrovmImage
        | CreateMicrovmShellAuthToken
        | DeleteMicrovmImage
        | DeleteMicrovmImageVersion
        | ResumeMicrovm
        | RunMicrovm
        | SuspendMicrovm
        | TagResource
        | TerminateMicrovm
        | UntagResource
        | UpdateMicrovmImage
        | UpdateMicrovmImageVersion => true,
        GetMicrovm
        | GetMicrovmImage
        | GetMicrovmImageBuild
        | GetMicrovmImageVersion
        | ListManagedMicrovmImageVersions
        | ListManagedMicrovmImages
        | ListMicrovmImageBuilds
        | ListMicrovmImageVersions
        | ListMicrovmImages
        | ListMicrovms
        | ListTags => false,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_TARGET).collect()
}

/// An image identifier (name or ARN) as its name.
fn image_name(identifier: &str) -> String {
    kiln_api::image_identifier(identifier)
        .map(|r| r.name().to_string())
        .unwrap_or_else(|_| clip(identifier))
}

/// A MicroVM identifier (id or ARN) as its id.
fn microvm_id(identifier: &str) -> String {
    kiln_api::arn::microvm_identifier(identifier)
        .map(|id| clip(&id))
        .unwrap_or_else(|_| clip(identifier))
}

/// What an AWS operation acted on, from its URI labels, and for calls that create something
/// from the answer (the new version or MicroVM) or the body's name; never anything else of
/// a body or an answer.
pub fn target(
    op: Operation,
    labels: &HashMap<String, String>,
    body: &[u8],
    answer: Option<&Value>,
) -> Option<String> {
    use Operation::*;
    let label = |name: &str| labels.get(name).map(String::as_str);
    let answered = |member: &str| answer.and_then(|a| a[member].as_str()).map(clip);
    let body_member = |member: &str| {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|b| b[member].as_str().map(clip))
    };
    let with_version = |image: String| match answered("imageVersion") {
        Some(v) => format!("{image}:{v}"),
        None => image,
    };
    match op {
        CreateMicrovmImage => answered("name")
            .or_else(|| body_member("name"))
            .map(with_version),
        UpdateMicrovmImage => label("imageIdentifier").map(image_name).map(with_version),
        DeleteMicrovmImage => label("imageIdentifier").map(image_name),
        UpdateMicrovmImageVersion | DeleteMicrovmImageVersion => {
            let image = label("imageIdentifier").map(image_name)?;
            Some(match label("imageVersion") {
                Some(v) => format!("{image}:{}", clip(v)),
                None => image,
            })
        }
        RunMicrovm => answered("microvmId").or_else(|| {
            body_member("imageIdentifier")
                .map(|i| image_name(&i))
                .map(|image| match body_member("imageVersion") {
                    Some(v) => format!("{image}:{v}"),
                    None => image,
                })
        }),
        TerminateMicrovm
        | SuspendMicrovm
        | ResumeMicrovm
        | CreateMicrovmAuthToken
        | CreateMicrovmShellAuthToken => label("microvmIdentifier").map(microvm_id),
        TagResource | UntagResource => label("Resource").map(image_name),
        _ => None,
    }
}

/// `ok`, or the error type.
fn outcome<T>(result: &Result<T, ApiError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => e.error_type().into(),
    }
}

/// An event as `GET /kiln/v1/events` shows it.
pub fn event_json(e: &AuditRow) -> Value {
    json!({
        "id": e.id,
        "time": e.time,
        "timestamp": rfc3339(e.time),
        "principal": e.principal,
        "accessKeyId": e.access_key_id,
        "owner": e.owner,
        "operation": e.operation,
        "target": e.target,
        "result": e.result,
        "reason": e.reason,
    })
}

/// Epoch seconds as an RFC 3339 UTC time, to the millisecond.
pub fn rfc3339(secs: f64) -> String {
    let nanos = (secs * 1000.0).round() as i128 * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl AuditLog {
    /// The audit log in `store`.
    pub fn new(store: Arc<dyn Store>) -> AuditLog {
        AuditLog { store }
    }

    fn record(&self, event: AuditRow) {
        // The call has happened whatever the log says: a failure to record it is kilnd's
        // problem to report, not the caller's.
        if let Err(e) = self.store.insert_audit_event(&event) {
            tracing::error!(error = %e, operation = %event.operation, principal = %event.principal, "cannot write the audit log");
        }
    }

    /// Records an AWS operation `caller` made, if it changes something.
    pub fn api_call(
        &self,
        caller: &Caller,
        op: Operation,
        labels: &HashMap<String, String>,
        body: &[u8],
        result: &Result<Value, ApiError>,
    ) {
        if !is_mutating(op) {
            return;
        }
        let target = target(op, labels, body, result.as_ref().ok());
        self.call(caller, op.name(), target.as_deref(), result);
    }

    /// Records a call of kiln's own API (access keys) that `caller` made.
    pub fn call<T>(
        &self,
        caller: &Caller,
        operation: &str,
        target: Option<&str>,
        result: &Result<T, ApiError>,
    ) {
        self.record(AuditRow {
            id: 0,
            time: now(),
            principal: caller.principal.clone(),
            access_key_id: Some(caller.access_key_id.clone()),
            owner: caller.principal.clone(),
            operation: operation.into(),
            target: target.map(clip),
            result: outcome(result),
            reason: None,
        });
    }

    /// Records what kilnd did on its own to MicroVM `microvm` of `owner`, and why.
    pub fn kilnd<T>(
        &self,
        operation: &str,
        owner: &str,
        microvm: &str,
        result: &Result<T, ApiError>,
        reason: &str,
    ) {
        self.record(AuditRow {
            id: 0,
            time: now(),
            principal: KILND.into(),
            access_key_id: None,
            owner: owner.into(),
            operation: operation.into(),
            target: Some(clip(microvm)),
            result: outcome(result),
            reason: Some(reason.into()),
        });
    }

    /// `GET /kiln/v1/events`: admin sees every event, anyone else their own calls and what
    /// kilnd did to their MicroVMs. `{"events": [...]}`, oldest first.
    pub fn events(
        &self,
        caller: &Caller,
        since: Option<f64>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Value, ApiError> {
        let rows = self
            .store
            .audit_events(&AuditQuery {
                since,
                after,
                owner: caller.owner_filter(),
                limit: limit.clamp(1, MAX_LIMIT),
            })
            .map_err(internal)?;
        Ok(json!({ "events": rows.iter().map(event_json).collect::<Vec<_>>() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            crate::store::SqliteStore::open(&dir.path().join("kiln.db"), "host-a").expect("store");
        (dir, AuditLog::new(Arc::new(store)))
    }

    fn caller(principal: &str) -> Caller {
        Caller {
            principal: principal.into(),
            account: "000000000000".into(),
            access_key_id: format!("AKIA{}", principal.to_uppercase()),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn operations(v: &Value) -> Vec<String> {
        v["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["operation"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn events_when_alice_asks_then_her_calls_and_kilnd_on_her_vms_only() {
        let (_dir, log) = log();
        let ok: Result<(), ApiError> = Ok(());
        log.call(&caller("admin"), "CreateAccessKey", Some("AKIAALICE"), &ok);
        log.call(&caller("alice"), "RunMicrovm", Some("mvm-a"), &ok);
        log.kilnd("SuspendMicrovm", "alice", "mvm-a", &ok, "idle for 60 s");
        log.kilnd("SuspendMicrovm", "admin", "mvm-b", &ok, "idle for 60 s");

        let alice = log.events(&caller("alice"), None, None, 10).expect("alice");
        let admin = log.events(&caller("admin"), None, None, 10).expect("admin");

        assert_eq!(operations(&alice), ["RunMicrovm", "SuspendMicrovm"]);
        assert_eq!(alice["events"][1]["principal"], KILND);
        assert_eq!(alice["events"][1]["target"], "mvm-a");
        assert_eq!(alice["events"][1]["accessKeyId"], Value::Null);
        assert_eq!(operations(&admin).len(), 4);
    }

    #[test]
    fn events_when_limited_then_newest_without_cursor_and_oldest_after_one() {
        let (_dir, log) = log();
        for op in ["A", "B", "C", "D"] {
            log.call(&caller("admin"), op, None, &Ok::<(), ApiError>(()));
        }

        let newest = log.events(&caller("admin"), None, None, 2).expect("newest");
        let first = newest["events"][0]["id"].as_i64().expect("id");
        let from_start = log
            .events(&caller("admin"), Some(0.0), None, 2)
            .expect("since");
        let after = log
            .events(&caller("admin"), None, Some(first), 10)
            .expect("after");

        assert_eq!(operations(&newest), ["C", "D"]);
        assert_eq!(operations(&from_start), ["A", "B"]);
        assert_eq!(operations(&after), ["D"]);
    }

    #[test]
    fn api_call_when_reads_then_not_recorded_and_writes_name_their_target() {
        let (_dir, log) = log();
        let admin = caller("admin");
        let answer = json!({"microvmId": "mvm-1", "state": "RUNNING"});
        let body = br#"{"imageIdentifier": "web", "runHookPayload": "s3cr3t"}"#;

        log.api_call(
            &admin,
            Operation::ListMicrovms,
            &labels(&[]),
            b"",
            &Ok(json!({})),
        );
        log.api_call(
            &admin,
            Operation::RunMicrovm,
            &labels(&[]),
            body,
            &Ok(answer),
        );
        log.api_call(
            &admin,
            Operation::RunMicrovm,
            &labels(&[]),
            body,
            &Err(ApiError::not_found("MicrovmImage", "web")),
        );
        log.api_call(
            &admin,
            Operation::DeleteMicrovmImageVersion,
            &labels(&[
                (
                    "imageIdentifier",
                    "arn:aws:lambda:local:000000000000:microvm-image:web",
                ),
                ("imageVersion", "2"),
            ]),
            b"",
            &Ok(Value::Null),
        );
        let events = log.events(&admin, None, None, 10).expect("events");

        let targets: Vec<&str> = events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["target"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(targets, ["mvm-1", "web", "web:2"]);
        assert_eq!(events["events"][1]["result"], "ResourceNotFoundException");
        assert!(!events.to_string().contains("s3cr3t"), "{events}");
    }

    #[test]
    fn rfc3339_when_epoch_seconds_then_utc_to_the_millisecond() {
        assert_eq!(rfc3339(1_757_419_200.5), "2025-09-09T12:00:00.5Z");
        assert_eq!(rfc3339(1_757_419_200.0), "2025-09-09T12:00:00Z");
    }
}
