//! Checks of inputs against the model's constraints, reported the way AWS words them.
//!
//! Required body members are enforced while parsing ([`parse_body`]): they are plain
//! fields, so a missing one fails with `Member must not be null`. Everything else —
//! lengths, patterns, ranges, list and map sizes — is checked by [`Validate`], which
//! gathers every violation into one `ValidationException`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use serde::de::DeserializeOwned;

use crate::params::{
    ImageBuildParams, ImageParams, ImageVersionParams, ListMicrovmImageBuildsQuery,
    ListMicrovmImagesQuery, ListMicrovmsQuery, MicrovmParams, PageQuery, TagsParams,
    UntagResourceQuery,
};
use crate::shapes::*;
use crate::ApiError;

/// The smallest `idlePolicy.maxIdleDurationSeconds` accepted: the model's 60, lowered only by
/// a daemon's configuration (for tests that cannot wait minutes).
pub static MIN_IDLE_SECONDS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(60);

/// The memory sizes AWS offers for `resources.minimumMemoryInMiB`, MiB.
pub const MEMORY_SIZES_MIB: [i32; 5] = [512, 1024, 2048, 4096, 8192];

/// The constraint text of a missing required member.
pub const NOT_NULL: &str = "Member must not be null";

/// An input the model constrains.
pub trait Validate {
    /// Adds this value's violations to `v`, naming members under `path` (`""` at the top).
    fn check(&self, path: &str, v: &mut Violations);

    /// `Ok`, or one `ValidationException` listing every violation.
    fn validate(&self) -> Result<(), ApiError> {
        let mut v = Violations::default();
        self.check("", &mut v);
        v.finish()
    }
}

/// Violations found so far, each `Value at '<path>' failed to satisfy constraint: <c>`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(Vec<String>);

impl Violations {
    /// Records that the member at `path` fails `constraint`.
    pub fn add(&mut self, path: &str, constraint: &str) {
        self.0.push(format!(
            "Value at '{path}' failed to satisfy constraint: {constraint}"
        ));
    }

    /// `Ok` when nothing was recorded, else the `ValidationException` AWS would send.
    pub fn finish(self) -> Result<(), ApiError> {
        let n = self.0.len();
        match n {
            0 => Ok(()),
            1 => Err(ApiError::validation(format!(
                "1 validation error detected: {}",
                self.0[0]
            ))),
            _ => Err(ApiError::validation(format!(
                "{n} validation errors detected: {}",
                self.0.join("; ")
            ))),
        }
    }
}

/// A `ValidationException` for one member failing one constraint.
pub fn member_must(path: &str, constraint: &str) -> ApiError {
    let mut v = Violations::default();
    v.add(path, constraint);
    v.finish()
        .err()
        .unwrap_or_else(|| ApiError::validation(constraint))
}

/// Parses a JSON request body (empty means `{}`) and validates it. Syntax errors,
/// missing required members, wrong types, bad enum values and unions with other than
/// one member set all come back as `ValidationException`s naming the member.
pub fn parse_body<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = wire_path(e.path());
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::validation(format!(
                "Could not parse request body into json: {inner}"
            ));
        }
        let text = inner.to_string();
        let text = text.split(" at line ").next().unwrap_or_default();
        if let Some(field) = text
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            return member_must(&join(&path, field), NOT_NULL);
        }
        if text.starts_with("invalid type: null") {
            return member_must(&path, NOT_NULL);
        }
        if text.starts_with("Member must") {
            return member_must(&path, text);
        }
        member_must(&path, &format!("Member must be well-formed: {text}"))
    })?;
    value.validate()?;
    Ok(value)
}

/// Renders a serde path as AWS does: `cpuConfigurations.1.member.architecture`.
fn wire_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        let part = match seg {
            Segment::Seq { index } => format!("{}.member", index + 1),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => continue,
        };
        out = join(&out, &part);
    }
    out
}

/// `parent.child`, or `child` at the top.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// A model `pattern`: its text for messages and an anchored Rust translation.
pub struct Pattern {
    /// The pattern as the model writes it, quoted in messages.
    pub model: &'static str,
    rust: &'static str,
    compiled: OnceLock<Regex>,
}

impl Pattern {
    const fn new(model: &'static str, rust: &'static str) -> Self {
        Pattern {
            model,
            rust,
            compiled: OnceLock::new(),
        }
    }

    /// Whether the whole of `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        self.compiled
            .get_or_init(|| {
                // The patterns are constants checked by a unit test.
                Regex::new(self.rust).expect("model pattern compiles")
            })
            .is_match(s)
    }
}

// Java's `\s` is ASCII-only, so spell it out rather than use Rust's Unicode `\s`.
/// Model `NonBlankString`, `Version`, `AuthTokenKey`, `EnvironmentVariableKey`.
pub static NON_BLANK: Pattern = Pattern::new(r"[^\s]+", r"^[^ \t\n\x0B\x0C\r]+$");
/// Model `ImageName`.
pub static IMAGE_NAME: Pattern = Pattern::new("[a-zA-Z0-9-_]+", "^[a-zA-Z0-9_-]+$");
/// Model `CloudWatchLoggingLogGroupString`.
pub static LOG_GROUP: Pattern = Pattern::new(r"[a-zA-Z0-9_\-/.#]+", r"^[a-zA-Z0-9_\-/.#]+$");
/// Model `CloudWatchLoggingLogStreamString`.
pub static LOG_STREAM: Pattern = Pattern::new("[^:*]*", "^[^:*]*$");
/// Model `RoleArn`.
pub static ROLE_ARN: Pattern = Pattern::new(
    r"arn:aws[a-z\-]*:iam::[0-9]{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+",
    r"^arn:aws[a-z\-]*:iam::[0-9]{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$",
);
/// Model `KmsKeyIdentifier`.
pub static KMS_KEY: Pattern = Pattern::new(
    r"(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/[a-zA-Z0-9:/_-]+|alias/[a-zA-Z0-9:/_-]+|[a-zA-Z0-9-]+)",
    r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/[a-zA-Z0-9:/_-]+|alias/[a-zA-Z0-9:/_-]+|[a-zA-Z0-9-]+)$",
);
/// Model `TagKey` and `TagValue`.
pub static TAG_TEXT: Pattern = Pattern::new(
    r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)",
    r"^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$",
);
/// Model `TaggableResource`, narrowed to the image ARNs kiln tags and widened in its
/// region part to any `[a-z0-9-]+`, so kiln's default region `local` is taggable.
pub static TAGGABLE_RESOURCE: Pattern = Pattern::new(
    r"arn:(aws[a-zA-Z-]*):lambda:[a-z0-9-]+:\d{12}:microvm-image:[a-zA-Z0-9-_]+",
    r"^arn:(aws[a-zA-Z-]*):lambda:[a-z0-9-]+:[0-9]{12}:microvm-image:[a-zA-Z0-9_-]+$",
);

/// Length and pattern limits of a string shape.
#[derive(Clone, Copy)]
struct Text {
    min: usize,
    max: Option<usize>,
    pattern: Option<&'static Pattern>,
}

const fn text(min: usize, max: usize, pattern: Option<&'static Pattern>) -> Text {
    Text {
        min,
        max: Some(max),
        pattern,
    }
}

const NON_BLANK_STRING: Text = text(1, 2048, Some(&NON_BLANK));
const IDENTIFIER: Text = text(1, 256, None);
const ROLE: Text = text(20, 2048, Some(&ROLE_ARN));
const KMS: Text = text(1, 2048, Some(&KMS_KEY));
const CONNECTOR: Text = text(1, 2048, None);
const CLIENT_TOKEN: Text = text(1, 128, None);
const TAG_KEY: Text = text(1, 128, Some(&TAG_TEXT));
const TAG_VALUE: Text = text(0, 256, Some(&TAG_TEXT));

fn text_violations(s: &str, t: Text) -> Vec<String> {
    let mut out = Vec::new();
    // AWS counts characters, not bytes.
    let len = s.chars().count();
    if let Some(max) = t.max {
        if len > max {
            out.push(format!(
                "Member must have length less than or equal to {max}"
            ));
        }
    }
    if len < t.min {
        out.push(format!(
            "Member must have length greater than or equal to {}",
            t.min
        ));
    }
    if let Some(p) = t.pattern {
        if !p.matches(s) {
            out.push(format!(
                "Member must satisfy regular expression pattern: {}",
                p.model
            ));
        }
    }
    out
}

fn check_text(v: &mut Violations, path: &str, s: &str, t: Text) {
    for c in text_violations(s, t) {
        v.add(path, &c);
    }
}

fn check_opt_text(v: &mut Violations, path: &str, s: &Option<String>, t: Text) {
    if let Some(s) = s {
        check_text(v, path, s, t);
    }
}

fn check_int(v: &mut Violations, path: &str, n: Option<i32>, min: Option<i32>, max: Option<i32>) {
    let Some(n) = n else { return };
    if let Some(max) = max {
        if n > max {
            v.add(
                path,
                &format!("Member must have value less than or equal to {max}"),
            );
        }
    }
    if let Some(min) = min {
        if n < min {
            v.add(
                path,
                &format!("Member must have value greater than or equal to {min}"),
            );
        }
    }
}

fn check_size(v: &mut Violations, path: &str, len: usize, min: usize, max: Option<usize>) {
    if let Some(max) = max {
        if len > max {
            v.add(
                path,
                &format!("Member must have length less than or equal to {max}"),
            );
        }
    }
    if len < min {
        v.add(
            path,
            &format!("Member must have length greater than or equal to {min}"),
        );
    }
}

fn check_list<T>(
    v: &mut Violations,
    path: &str,
    list: Option<&[T]>,
    min: usize,
    max: Option<usize>,
    mut each: impl FnMut(&mut Violations, &str, &T),
) {
    let Some(list) = list else { return };
    check_size(v, path, list.len(), min, max);
    for (i, item) in list.iter().enumerate() {
        each(v, &join(path, &format!("{}.member", i + 1)), item);
    }
}

fn check_map(
    v: &mut Violations,
    path: &str,
    map: &BTreeMap<String, String>,
    size: (usize, Option<usize>),
    key: Text,
    value: Text,
) {
    check_size(v, path, map.len(), size.0, size.1);
    for (k, val) in map {
        let bad_key = text_violations(k, key);
        if !bad_key.is_empty() {
            v.add(
                path,
                &format!("Map keys must satisfy constraint: [{}]", bad_key.join(", ")),
            );
        }
        let bad_value = text_violations(val, value);
        if !bad_value.is_empty() {
            v.add(
                path,
                &format!(
                    "Map value must satisfy constraint: [{}]",
                    bad_value.join(", ")
                ),
            );
        }
    }
}

fn check_tags(v: &mut Violations, path: &str, tags: &Tags) {
    check_map(v, path, tags, (0, None), TAG_KEY, TAG_VALUE);
}

impl Validate for Logging {
    fn check(&self, path: &str, v: &mut Violations) {
        if let Logging::CloudWatch(cw) = self {
            let path = join(path, "cloudWatch");
            check_opt_text(
                v,
                &join(&path, "logGroup"),
                &cw.log_group,
                text(1, 512, Some(&LOG_GROUP)),
            );
            check_opt_text(
                v,
                &join(&path, "logStream"),
                &cw.log_stream,
                text(1, 512, Some(&LOG_STREAM)),
            );
        }
    }
}

impl Validate for CodeArtifact {
    fn check(&self, path: &str, v: &mut Violations) {
        let CodeArtifact::Uri(uri) = self;
        check_text(v, &join(path, "uri"), uri, NON_BLANK_STRING);
    }
}

impl Validate for Hooks {
    fn check(&self, path: &str, v: &mut Violations) {
        check_int(v, &join(path, "port"), self.port, Some(1), Some(65535));
        if let Some(h) = &self.microvm_hooks {
            let p = join(path, "microvmHooks");
            let range = |v: &mut Violations, name: &str, n: Option<i32>| {
                check_int(v, &join(&p, name), n, Some(1), Some(60));
            };
            range(v, "runTimeoutInSeconds", h.run_timeout_in_seconds);
            range(v, "resumeTimeoutInSeconds", h.resume_timeout_in_seconds);
            range(v, "suspendTimeoutInSeconds", h.suspend_timeout_in_seconds);
            range(
                v,
                "terminateTimeoutInSeconds",
                h.terminate_timeout_in_seconds,
            );
        }
        // A runtime hook is called only once the app said it is ready (AWS refuses the
        // image otherwise).
        let enabled = |h: &Option<HookState>| *h == Some(HookState::Enabled);
        let runtime_hook = self.microvm_hooks.as_ref().is_some_and(|h| {
            enabled(&h.run) || enabled(&h.resume) || enabled(&h.suspend) || enabled(&h.terminate)
        });
        let ready = self
            .microvm_image_hooks
            .as_ref()
            .is_some_and(|h| enabled(&h.ready));
        if runtime_hook && !ready {
            v.add(
                &join(path, "microvmImageHooks.ready"),
                "Member must be ENABLED when a run, resume, suspend or terminate hook is enabled",
            );
        }
        if let Some(h) = &self.microvm_image_hooks {
            let p = join(path, "microvmImageHooks");
            check_int(
                v,
                &join(&p, "readyTimeoutInSeconds"),
                h.ready_timeout_in_seconds,
                Some(1),
                Some(3600),
            );
            check_int(
                v,
                &join(&p, "validateTimeoutInSeconds"),
                h.validate_timeout_in_seconds,
                Some(1),
                Some(3600),
            );
        }
    }
}

impl Validate for ImageVersionConfig {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "baseImageArn"),
            &self.base_image_arn,
            NON_BLANK_STRING,
        );
        check_opt_text(
            v,
            &join(path, "baseImageVersion"),
            &self.base_image_version,
            NON_BLANK_STRING,
        );
        check_text(v, &join(path, "buildRoleArn"), &self.build_role_arn, ROLE);
        self.code_artifact.check(&join(path, "codeArtifact"), v);
        if let Some(logging) = &self.logging {
            logging.check(&join(path, "logging"), v);
        }
        check_list(
            v,
            &join(path, "egressNetworkConnectors"),
            self.egress_network_connectors.as_deref(),
            0,
            Some(1),
            |v, p, c| check_text(v, p, c, CONNECTOR),
        );
        check_list(
            v,
            &join(path, "resources"),
            self.resources.as_deref(),
            0,
            Some(1),
            |v, p, r| {
                if !MEMORY_SIZES_MIB.contains(&r.minimum_memory_in_mib) {
                    v.add(
                        &join(p, "minimumMemoryInMiB"),
                        &format!("Supported memory sizes in MiB are: {MEMORY_SIZES_MIB:?}"),
                    );
                }
            },
        );
        if let Some(hooks) = &self.hooks {
            hooks.check(&join(path, "hooks"), v);
        }
        if let Some(env) = &self.environment_variables {
            check_map(
                v,
                &join(path, "environmentVariables"),
                env,
                (0, Some(100)),
                text(1, 256, Some(&NON_BLANK)),
                Text {
                    min: 0,
                    max: Some(4096),
                    pattern: None,
                },
            );
        }
        check_opt_text(
            v,
            &join(path, "kmsKeyIdentifier"),
            &self.kms_key_identifier,
            KMS,
        );
    }
}

impl Validate for CreateMicrovmImageRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        self.config.check(path, v);
        check_text(
            v,
            &join(path, "name"),
            &self.name,
            text(1, 64, Some(&IMAGE_NAME)),
        );
        if let Some(tags) = &self.tags {
            check_tags(v, &join(path, "tags"), tags);
        }
        check_opt_text(
            v,
            &join(path, "clientToken"),
            &self.client_token,
            CLIENT_TOKEN,
        );
    }
}

impl Validate for UpdateMicrovmImageRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        self.config.check(path, v);
        check_opt_text(
            v,
            &join(path, "clientToken"),
            &self.client_token,
            CLIENT_TOKEN,
        );
    }
}

impl Validate for UpdateMicrovmImageVersionRequest {
    // `status` is an enum, checked while parsing.
    fn check(&self, _path: &str, _v: &mut Violations) {}
}

impl Validate for RunMicrovmRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        for (name, list) in [
            ("ingressNetworkConnectors", &self.ingress_network_connectors),
            ("egressNetworkConnectors", &self.egress_network_connectors),
        ] {
            check_list(
                v,
                &join(path, name),
                list.as_deref(),
                0,
                Some(10),
                |v, p, c| check_text(v, p, c, CONNECTOR),
            );
        }
        check_text(
            v,
            &join(path, "imageIdentifier"),
            &self.image_identifier,
            IDENTIFIER,
        );
        check_opt_text(
            v,
            &join(path, "imageVersion"),
            &self.image_version,
            NON_BLANK_STRING,
        );
        check_opt_text(
            v,
            &join(path, "executionRoleArn"),
            &self.execution_role_arn,
            ROLE,
        );
        if let Some(idle) = &self.idle_policy {
            let p = join(path, "idlePolicy");
            check_int(
                v,
                &join(&p, "maxIdleDurationSeconds"),
                Some(idle.max_idle_duration_seconds),
                Some(MIN_IDLE_SECONDS.load(std::sync::atomic::Ordering::Relaxed)),
                None,
            );
            check_int(
                v,
                &join(&p, "suspendedDurationSeconds"),
                Some(idle.suspended_duration_seconds),
                Some(0),
                None,
            );
        }
        if let Some(logging) = &self.logging {
            logging.check(&join(path, "logging"), v);
        }
        check_opt_text(
            v,
            &join(path, "kmsKeyIdentifier"),
            &self.kms_key_identifier,
            KMS,
        );
        check_opt_text(
            v,
            &join(path, "runHookPayload"),
            &self.run_hook_payload,
            Text {
                min: 0,
                max: Some(4096),
                pattern: None,
            },
        );
        check_int(
            v,
            &join(path, "maximumDurationInSeconds"),
            self.maximum_duration_in_seconds,
            Some(1),
            Some(28800),
        );
        check_opt_text(
            v,
            &join(path, "clientToken"),
            &self.client_token,
            CLIENT_TOKEN,
        );
    }
}

impl Validate for PortSpecification {
    fn check(&self, path: &str, v: &mut Violations) {
        match self {
            PortSpecification::Port(p) => {
                check_int(v, &join(path, "port"), Some(*p), Some(1), Some(65535))
            }
            PortSpecification::Range(r) => {
                let p = join(path, "range");
                check_int(
                    v,
                    &join(&p, "startPort"),
                    Some(r.start_port),
                    Some(1),
                    Some(65535),
                );
                check_int(
                    v,
                    &join(&p, "endPort"),
                    Some(r.end_port),
                    Some(1),
                    Some(65535),
                );
            }
            PortSpecification::AllPorts(_) => {}
        }
    }
}

impl Validate for CreateMicrovmAuthTokenRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        check_int(
            v,
            &join(path, "expirationInMinutes"),
            Some(self.expiration_in_minutes),
            Some(1),
            None,
        );
        check_list(
            v,
            &join(path, "allowedPorts"),
            Some(&self.allowed_ports[..]),
            1,
            None,
            |v, p, spec| spec.check(p, v),
        );
    }
}

impl Validate for CreateMicrovmShellAuthTokenRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        check_int(
            v,
            &join(path, "expirationInMinutes"),
            Some(self.expiration_in_minutes),
            Some(1),
            None,
        );
    }
}

impl Validate for TagResourceRequest {
    fn check(&self, path: &str, v: &mut Violations) {
        check_tags(v, &join(path, "Tags"), &self.tags);
    }
}

impl Validate for MicrovmParams {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "microvmIdentifier"),
            &self.microvm_identifier,
            IDENTIFIER,
        );
    }
}

impl Validate for ImageParams {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "imageIdentifier"),
            &self.image_identifier,
            IDENTIFIER,
        );
    }
}

impl Validate for ImageVersionParams {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "imageIdentifier"),
            &self.image_identifier,
            IDENTIFIER,
        );
        check_text(
            v,
            &join(path, "imageVersion"),
            &self.image_version,
            NON_BLANK_STRING,
        );
    }
}

impl Validate for ImageBuildParams {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "imageIdentifier"),
            &self.image_identifier,
            IDENTIFIER,
        );
        check_text(
            v,
            &join(path, "imageVersion"),
            &self.image_version,
            NON_BLANK_STRING,
        );
        check_text(v, &join(path, "buildId"), &self.build_id, NON_BLANK_STRING);
    }
}

impl Validate for TagsParams {
    fn check(&self, path: &str, v: &mut Violations) {
        check_text(
            v,
            &join(path, "Resource"),
            &self.resource,
            text(1, 10000, Some(&TAGGABLE_RESOURCE)),
        );
    }
}

impl Validate for PageQuery {
    fn check(&self, path: &str, v: &mut Violations) {
        check_int(
            v,
            &join(path, "maxResults"),
            self.max_results,
            Some(1),
            Some(50),
        );
    }
}

impl Validate for ListMicrovmImagesQuery {
    fn check(&self, path: &str, v: &mut Violations) {
        self.page.check(path, v);
        check_opt_text(
            v,
            &join(path, "nameFilter"),
            &self.name_filter,
            NON_BLANK_STRING,
        );
    }
}

impl Validate for ListMicrovmImageBuildsQuery {
    fn check(&self, path: &str, v: &mut Violations) {
        self.page.check(path, v);
        check_opt_text(
            v,
            &join(path, "chipsetGeneration"),
            &self.chipset_generation,
            NON_BLANK_STRING,
        );
    }
}

impl Validate for ListMicrovmsQuery {
    fn check(&self, path: &str, v: &mut Violations) {
        self.page.check(path, v);
        check_opt_text(
            v,
            &join(path, "imageIdentifier"),
            &self.image_identifier,
            IDENTIFIER,
        );
    }
}

impl Validate for UntagResourceQuery {
    fn check(&self, path: &str, v: &mut Violations) {
        check_list(
            v,
            &join(path, "tagKeys"),
            Some(&self.tag_keys[..]),
            0,
            None,
            |v, p, k| check_text(v, p, k, TAG_KEY),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn create_body(overrides: serde_json::Value) -> Vec<u8> {
        let mut body = json!({
            "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:al2023",
            "buildRoleArn": "arn:aws:iam::000000000000:role/build",
            "codeArtifact": {"uri": "s3://bucket/app.zip"},
            "name": "web"
        });
        if let (Some(b), Some(o)) = (body.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&body).unwrap()
    }

    fn create_error(overrides: serde_json::Value) -> String {
        parse_body::<CreateMicrovmImageRequest>(&create_body(overrides))
            .unwrap_err()
            .message()
            .to_string()
    }

    fn create_ok(overrides: serde_json::Value) -> bool {
        parse_body::<CreateMicrovmImageRequest>(&create_body(overrides)).is_ok()
    }

    fn one(path: &str, constraint: &str) -> String {
        format!("1 validation error detected: Value at '{path}' failed to satisfy constraint: {constraint}")
    }

    #[test]
    fn every_model_pattern_compiles() {
        for p in [
            &NON_BLANK,
            &IMAGE_NAME,
            &LOG_GROUP,
            &LOG_STREAM,
            &ROLE_ARN,
            &KMS_KEY,
            &TAG_TEXT,
            &TAGGABLE_RESOURCE,
        ] {
            p.matches("");
        }
    }

    #[test]
    fn valid_create_body_parses() {
        let req: CreateMicrovmImageRequest = parse_body(&create_body(json!({}))).unwrap();
        assert_eq!(req.name, "web");
    }

    #[test]
    fn name_pattern_violation_is_worded_like_aws() {
        assert_eq!(
            create_error(json!({"name": "web server"})),
            one(
                "name",
                "Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+"
            )
        );
    }

    #[test]
    fn pattern_must_match_whole_string() {
        assert!(create_error(json!({"name": "ok!"})).contains("regular expression pattern"));
    }

    #[test]
    fn too_long_name_reports_max_length() {
        assert_eq!(
            create_error(json!({"name": "a".repeat(65)})),
            one("name", "Member must have length less than or equal to 64")
        );
    }

    #[test]
    fn short_role_reports_min_length_and_pattern() {
        assert_eq!(
            create_error(json!({"buildRoleArn": "arn:x"})),
            "2 validation errors detected: \
             Value at 'buildRoleArn' failed to satisfy constraint: Member must have length greater than or equal to 20; \
             Value at 'buildRoleArn' failed to satisfy constraint: Member must satisfy regular expression pattern: \
             arn:aws[a-z\\-]*:iam::[0-9]{12}:role/?[a-zA-Z_0-9+=,.@\\-_/]+"
        );
    }

    #[test]
    fn missing_required_member_is_not_null() {
        let err = parse_body::<CreateMicrovmImageRequest>(br#"{"name":"web"}"#).unwrap_err();
        assert_eq!(err.error_type(), "ValidationException");
        assert!(
            err.message().contains("Member must not be null"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn nested_integer_range_names_the_path() {
        assert_eq!(
            create_error(json!({"hooks": {"microvmHooks": {"runTimeoutInSeconds": 61}}})),
            one(
                "hooks.microvmHooks.runTimeoutInSeconds",
                "Member must have value less than or equal to 60"
            )
        );
    }

    #[test]
    fn runtime_hook_without_ready_names_the_ready_hook() {
        let without = create_error(json!({"hooks": {"microvmHooks": {"suspend": "ENABLED"}}}));
        let with_ready = json!({"hooks": {
            "microvmHooks": {"run": "ENABLED", "terminate": "ENABLED"},
            "microvmImageHooks": {"ready": "ENABLED"},
        }});

        assert_eq!(
            without,
            one(
                "hooks.microvmImageHooks.ready",
                "Member must be ENABLED when a run, resume, suspend or terminate hook is enabled"
            )
        );
        assert!(create_ok(with_ready));
    }

    #[test]
    fn memory_size_outside_the_offered_sizes_lists_them() {
        assert_eq!(
            create_error(json!({"resources": [{"minimumMemoryInMiB": 256}]})),
            one(
                "resources.1.member.minimumMemoryInMiB",
                "Supported memory sizes in MiB are: [512, 1024, 2048, 4096, 8192]"
            )
        );
        assert!(create_ok(
            json!({"resources": [{"minimumMemoryInMiB": 2048}]})
        ));
    }

    #[test]
    fn list_size_is_checked() {
        assert_eq!(
            create_error(json!({"egressNetworkConnectors": ["a", "b"]})),
            one(
                "egressNetworkConnectors",
                "Member must have length less than or equal to 1"
            )
        );
    }

    #[test]
    fn map_size_and_entries_are_checked() {
        let env: serde_json::Map<String, serde_json::Value> =
            (0..101).map(|i| (format!("K{i}"), json!("v"))).collect();
        assert_eq!(
            create_error(json!({"environmentVariables": env})),
            one(
                "environmentVariables",
                "Member must have length less than or equal to 100"
            )
        );
        assert_eq!(
            create_error(json!({"tags": {"": "x"}})),
            one("tags", "Map keys must satisfy constraint: [Member must have length greater than or equal to 1]")
        );
    }

    #[test]
    fn bad_enum_value_names_the_set() {
        let msg = create_error(json!({"cpuConfigurations": [{"architecture": "RISCV"}]}));
        assert_eq!(
            msg,
            one(
                "cpuConfigurations.1.member.architecture",
                "Member must satisfy enum value set: [ARM_64, X86_64]"
            )
        );
    }

    #[test]
    fn union_with_no_member_is_rejected() {
        assert_eq!(
            create_error(json!({"codeArtifact": {}})),
            one("codeArtifact", "Member must have exactly one member set")
        );
    }

    #[test]
    fn run_microvm_ranges_are_checked() {
        let err = parse_body::<RunMicrovmRequest>(
            br#"{"imageIdentifier":"web","maximumDurationInSeconds":0,
                 "idlePolicy":{"maxIdleDurationSeconds":59,"suspendedDurationSeconds":0,"autoResumeEnabled":false}}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.message(),
            "2 validation errors detected: \
             Value at 'idlePolicy.maxIdleDurationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 60; \
             Value at 'maximumDurationInSeconds' failed to satisfy constraint: Member must have value greater than or equal to 1"
        );
    }

    #[test]
    fn auth_token_needs_a_port() {
        let err = parse_body::<CreateMicrovmAuthTokenRequest>(
            br#"{"expirationInMinutes":5,"allowedPorts":[]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.message(),
            one(
                "allowedPorts",
                "Member must have length greater than or equal to 1"
            )
        );
        let err = parse_body::<CreateMicrovmAuthTokenRequest>(
            br#"{"expirationInMinutes":5,"allowedPorts":[{"port":70000}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.message(),
            one(
                "allowedPorts.1.member.port",
                "Member must have value less than or equal to 65535"
            )
        );
    }

    #[test]
    fn malformed_json_is_a_validation_error() {
        let err = parse_body::<RunMicrovmRequest>(b"{not json").unwrap_err();
        assert!(
            err.message()
                .starts_with("Could not parse request body into json"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn empty_body_means_empty_object() {
        let err = parse_body::<RunMicrovmRequest>(b"").unwrap_err();
        assert_eq!(err.message(), one("imageIdentifier", NOT_NULL));
    }

    #[test]
    fn tag_value_pattern_is_checked() {
        let err = parse_body::<TagResourceRequest>(br#"{"Tags":{"k":"bad*value"}}"#).unwrap_err();
        assert!(
            err.message().contains("Map value must satisfy constraint"),
            "{}",
            err.message()
        );
        let ok = parse_body::<TagResourceRequest>("{\"Tags\":{\"équipe\":\"café 1\"}}".as_bytes());
        assert!(ok.is_ok());
    }

    #[test]
    fn kms_key_forms_are_accepted() {
        for key in [
            "alias/kiln",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:123456789012:key/abc",
        ] {
            assert!(parse_body::<CreateMicrovmImageRequest>(&create_body(
                json!({"kmsKeyIdentifier": key})
            ))
            .is_ok());
        }
        assert!(create_error(json!({"kmsKeyIdentifier": "not a key"})).contains("kmsKeyIdentifier"));
    }
}
