//! Drift check against botocore's own `lambda-microvms` model: every operation's
//! method, path and status, and every member of every input, output and exception.
//!
//! The model is read from `$KILN_BOTOCORE_MODEL` (a `service-2.json` or `.json.gz`),
//! else from the venv `make pyenv` builds under `target/pyenv`.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_api::params::*;
use kiln_api::shapes::*;
use kiln_api::{ApiError, Operation};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

const MODEL_SUFFIX: &str =
    "site-packages/botocore/data/lambda-microvms/2025-09-09/service-2.json.gz";

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BOTOCORE_MODEL") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let lib = root.join("target/pyenv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path().join(MODEL_SUFFIX))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "botocore's lambda-microvms model not found: set KILN_BOTOCORE_MODEL to its \
             service-2.json(.gz), or run `make pyenv` to build {}/python3*/{MODEL_SUFFIX}",
            lib.display()
        )
    })
}

fn load_model() -> Value {
    let path = model_path();
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let text = if path.extension().is_some_and(|x| x == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .unwrap_or_else(|e| panic!("decompressing {}: {e}", path.display()));
        s
    } else {
        String::from_utf8(raw).unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

struct Model {
    shapes: Map<String, Value>,
}

impl Model {
    fn shape(&self, name: &str) -> &Value {
        self.shapes
            .get(name)
            .unwrap_or_else(|| panic!("model has no shape {name}"))
    }

    fn members(&self, name: &str) -> Vec<(String, Value)> {
        let members = self.shape(name)["members"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        members.into_iter().collect()
    }

    /// A value of `name` with every member set; unions pick member `variant % n`.
    fn sample(&self, name: &str, variant: usize) -> Value {
        let shape = self.shape(name);
        match shape["type"].as_str().unwrap_or_default() {
            "structure" => {
                let members = self.members(name);
                if shape["union"].as_bool() == Some(true) {
                    let (m, def) = &members[variant % members.len()];
                    return json!({ m.as_str(): self.sample(def["shape"].as_str().unwrap_or_default(), variant) });
                }
                let obj: Map<String, Value> = members
                    .iter()
                    .filter(|(_, def)| def.get("location").is_none())
                    .map(|(m, def)| {
                        (
                            m.clone(),
                            self.sample(def["shape"].as_str().unwrap_or_default(), variant),
                        )
                    })
                    .collect();
                Value::Object(obj)
            }
            "list" => json!([self.sample(
                shape["member"]["shape"].as_str().unwrap_or_default(),
                variant
            )]),
            "map" => {
                json!({ "k": self.sample(shape["value"]["shape"].as_str().unwrap_or_default(), variant) })
            }
            "string" => match shape["enum"].as_array() {
                Some(values) => values[variant % values.len()].clone(),
                None => json!("x"),
            },
            "integer" | "long" => json!(1),
            "boolean" => json!(true),
            "timestamp" => json!(1_700_000_000),
            other => panic!("shape {name} has unhandled type {other}"),
        }
    }

    /// Query-string pairs of an input, one per querystring member.
    fn query_sample(&self, input: &str) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self
            .members(input)
            .into_iter()
            .filter(|(_, def)| def["location"] == "querystring")
            .map(|(_, def)| {
                let key = def["locationName"].as_str().unwrap_or_default().to_string();
                let value = match self.sample(def["shape"].as_str().unwrap_or_default(), 0) {
                    Value::Array(items) => items[0].clone(),
                    v => v,
                };
                let value = match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                };
                (key, value)
            })
            .collect();
        pairs.sort();
        pairs
    }

    fn uri_labels(&self, input: &str) -> BTreeSet<String> {
        self.members(input)
            .into_iter()
            .filter(|(_, def)| def["location"] == "uri")
            .map(|(_, def)| def["locationName"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

type BodyCheck = fn(&Value) -> Result<Value, String>;
type QueryCheck = fn(&[(String, String)]) -> Result<Vec<(String, String)>, String>;
type LabelCheck = fn(&HashMap<String, String>) -> Result<(), String>;

fn body<T: Serialize + DeserializeOwned>(v: &Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(t).map_err(|e| e.to_string())
}

fn query<T: QueryString>(pairs: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let q = T::from_query(pairs).map_err(|e| e.to_string())?;
    let mut out = q.to_query();
    out.sort();
    Ok(out)
}

fn labels<T: FromLabels>(l: &HashMap<String, String>) -> Result<(), String> {
    T::from_labels(l).map(|_| ()).map_err(|e| e.to_string())
}

/// The Rust side of each operation: body, query, labels, output.
struct Wire {
    input: Option<BodyCheck>,
    query: Option<QueryCheck>,
    labels: Option<LabelCheck>,
    output: Option<BodyCheck>,
}

fn wire(op: Operation) -> Wire {
    use Operation::*;
    let w = |input, query, labels, output| Wire {
        input,
        query,
        labels,
        output,
    };
    match op {
        CreateMicrovmAuthToken => w(
            Some(body::<CreateMicrovmAuthTokenRequest>),
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<CreateMicrovmAuthTokenResponse>),
        ),
        CreateMicrovmImage => w(
            Some(body::<CreateMicrovmImageRequest>),
            None,
            None,
            Some(body::<CreateMicrovmImageResponse>),
        ),
        CreateMicrovmShellAuthToken => w(
            Some(body::<CreateMicrovmShellAuthTokenRequest>),
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<CreateMicrovmShellAuthTokenResponse>),
        ),
        DeleteMicrovmImage => w(
            None,
            None,
            Some(labels::<ImageParams>),
            Some(body::<DeleteMicrovmImageOutput>),
        ),
        DeleteMicrovmImageVersion => w(
            None,
            None,
            Some(labels::<ImageVersionParams>),
            Some(body::<DeleteMicrovmImageVersionOutput>),
        ),
        GetMicrovm => w(
            None,
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<GetMicrovmResponse>),
        ),
        GetMicrovmImage => w(
            None,
            None,
            Some(labels::<ImageParams>),
            Some(body::<GetMicrovmImageOutput>),
        ),
        GetMicrovmImageBuild => w(
            None,
            None,
            Some(labels::<ImageBuildParams>),
            Some(body::<GetMicrovmImageBuildOutput>),
        ),
        GetMicrovmImageVersion => w(
            None,
            None,
            Some(labels::<ImageVersionParams>),
            Some(body::<GetMicrovmImageVersionOutput>),
        ),
        ListManagedMicrovmImageVersions => w(
            None,
            Some(query::<ListManagedMicrovmImageVersionsQuery>),
            Some(labels::<ImageParams>),
            Some(body::<ListManagedMicrovmImageVersionsOutput>),
        ),
        ListManagedMicrovmImages => w(
            None,
            Some(query::<ListManagedMicrovmImagesQuery>),
            None,
            Some(body::<ListManagedMicrovmImagesOutput>),
        ),
        ListMicrovmImageBuilds => w(
            None,
            Some(query::<ListMicrovmImageBuildsQuery>),
            Some(labels::<ImageVersionParams>),
            Some(body::<ListMicrovmImageBuildsOutput>),
        ),
        ListMicrovmImageVersions => w(
            None,
            Some(query::<ListMicrovmImageVersionsQuery>),
            Some(labels::<ImageParams>),
            Some(body::<ListMicrovmImageVersionsOutput>),
        ),
        ListMicrovmImages => w(
            None,
            Some(query::<ListMicrovmImagesQuery>),
            None,
            Some(body::<ListMicrovmImagesResponse>),
        ),
        ListMicrovms => w(
            None,
            Some(query::<ListMicrovmsQuery>),
            None,
            Some(body::<ListMicrovmsResponse>),
        ),
        ListTags => w(
            None,
            None,
            Some(labels::<TagsParams>),
            Some(body::<ListTagsResponse>),
        ),
        ResumeMicrovm => w(
            None,
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<ResumeMicrovmResponse>),
        ),
        RunMicrovm => w(
            Some(body::<RunMicrovmRequest>),
            None,
            None,
            Some(body::<RunMicrovmResponse>),
        ),
        SuspendMicrovm => w(
            None,
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<SuspendMicrovmResponse>),
        ),
        TagResource => w(
            Some(body::<TagResourceRequest>),
            None,
            Some(labels::<TagsParams>),
            None,
        ),
        TerminateMicrovm => w(
            None,
            None,
            Some(labels::<MicrovmParams>),
            Some(body::<TerminateMicrovmResponse>),
        ),
        UntagResource => w(
            None,
            Some(query::<UntagResourceQuery>),
            Some(labels::<TagsParams>),
            None,
        ),
        UpdateMicrovmImage => w(
            Some(body::<UpdateMicrovmImageRequest>),
            None,
            Some(labels::<ImageParams>),
            Some(body::<UpdateMicrovmImageResponse>),
        ),
        UpdateMicrovmImageVersion => w(
            Some(body::<UpdateMicrovmImageVersionRequest>),
            None,
            Some(labels::<ImageVersionParams>),
            Some(body::<UpdateMicrovmImageVersionResponse>),
        ),
    }
}

fn model() -> (Value, Model) {
    let m = load_model();
    let shapes = m["shapes"].as_object().cloned().unwrap_or_default();
    (m, Model { shapes })
}

fn template_labels(template: &str) -> BTreeSet<String> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_model_operation_has_the_same_method_path_and_status() {
    let (m, _) = model();
    let ops = m["operations"].as_object().expect("operations");
    assert_eq!(
        ops.len(),
        Operation::ALL.len(),
        "operation count differs from the model"
    );
    for (name, def) in ops {
        let op = Operation::from_name(name).unwrap_or_else(|| panic!("no Operation for {name}"));
        let http = &def["http"];
        assert_eq!(op.method(), http["method"], "{name} method");
        assert_eq!(op.path_template(), http["requestUri"], "{name} path");
        assert_eq!(
            u64::from(op.success_status()),
            http["responseCode"].as_u64().unwrap_or(200),
            "{name} status"
        );
    }
}

#[test]
fn every_member_of_every_input_and_output_round_trips() {
    let (m, model) = model();
    let ops = m["operations"].as_object().expect("operations");
    for (name, def) in ops {
        let op = Operation::from_name(name).unwrap_or_else(|| panic!("no Operation for {name}"));
        let w = wire(op);
        let input = def["input"]["shape"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no input"));

        // Body members: what the model sends must come back out of the Rust shape whole.
        for variant in 0..3 {
            let sample = model.sample(input, variant);
            let empty = sample.as_object().is_none_or(Map::is_empty);
            match w.input {
                Some(check) => {
                    let got =
                        check(&sample).unwrap_or_else(|e| panic!("{name} input {sample}: {e}"));
                    assert_eq!(got, sample, "{name} input body loses or renames members");
                }
                None => assert!(
                    empty,
                    "{name}: model has body members {sample} kiln has no shape for"
                ),
            }
        }

        // Query members: each one read and written back.
        let pairs = model.query_sample(input);
        match w.query {
            Some(check) => {
                let got = check(&pairs).unwrap_or_else(|e| panic!("{name} query {pairs:?}: {e}"));
                assert_eq!(got, pairs, "{name} query members");
            }
            None => assert!(
                pairs.is_empty(),
                "{name}: model has query members {pairs:?}"
            ),
        }

        // URI members: exactly the template's labels, and the Params struct reads them.
        let uri = model.uri_labels(input);
        assert_eq!(
            uri,
            template_labels(op.path_template()),
            "{name} uri members"
        );
        match w.labels {
            Some(check) => {
                let map: HashMap<String, String> =
                    uri.iter().map(|l| (l.clone(), "x".to_string())).collect();
                check(&map).unwrap_or_else(|e| panic!("{name} labels: {e}"));
            }
            None => assert!(uri.is_empty(), "{name}: model has uri members {uri:?}"),
        }

        // Output.
        match (def["output"]["shape"].as_str(), w.output) {
            (Some(output), Some(check)) => {
                for variant in 0..3 {
                    let sample = model.sample(output, variant);
                    let got =
                        check(&sample).unwrap_or_else(|e| panic!("{name} output {sample}: {e}"));
                    assert_eq!(got, sample, "{name} output loses or renames members");
                }
            }
            (None, None) => {}
            (model_out, _) => {
                panic!("{name}: model output {model_out:?} vs kiln output shape mismatch")
            }
        }
    }
}

#[test]
fn every_model_exception_maps_to_api_error() {
    let (_, model) = model();
    let exceptions: Vec<String> = model
        .shapes
        .iter()
        .filter(|(_, s)| s["exception"].as_bool() == Some(true))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        exceptions.len(),
        kiln_api::error::ERROR_TYPES.len(),
        "exception count"
    );
    for name in exceptions {
        let shape = model.shape(&name);
        let body: Map<String, Value> = model
            .members(&name)
            .into_iter()
            .filter(|(_, def)| def.get("location").is_none())
            .map(|(m, _)| (m, json!("x")))
            .collect();
        let has_retry = model
            .members(&name)
            .iter()
            .any(|(_, def)| def["locationName"] == "Retry-After");
        let err =
            ApiError::from_response(&name, &Value::Object(body.clone()), has_retry.then_some(7))
                .unwrap_or_else(|| panic!("no ApiError for {name}"));
        assert_eq!(err.error_type(), name);
        assert_eq!(
            u64::from(err.status()),
            shape["error"]["httpStatusCode"].as_u64().unwrap_or(0),
            "{name} status"
        );
        assert_eq!(err.body(), Value::Object(body), "{name} body members");
        assert_eq!(
            err.retry_after_seconds(),
            has_retry.then_some(7),
            "{name} Retry-After"
        );
    }
}
