//! The 24 `lambda-microvms` operations as subcommands named as the AWS CLI names them
//! (`kiln run-microvm --image-identifier web`), built from one table of input members.
//!
//! The table says where each member goes (URI label, query string, JSON body) and what
//! it holds; a test below checks it against botocore's model. Method, path template and
//! query encoding come from [`kiln_api`], so a call is the request kilnd parses.

use anyhow::{bail, Context};
use clap::builder::PossibleValuesParser;
use clap::{Arg, ArgAction, ArgMatches, Command};
use kiln_api::Operation;
use serde_json::{Map, Value};

use crate::client::Call;
use crate::input;

/// Where an input member travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// A `{label}` of the path.
    Label,
    /// The query string, under this key.
    Query(&'static str),
    /// The JSON body.
    Body,
}

/// What an input member holds, and so how its flag is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string.
    Str,
    /// An integer.
    Int,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A list of strings: several values, or a JSON array.
    StrList,
    /// A structure: JSON, or shorthand `key=value,…`.
    Struct,
    /// A list of structures: several JSON or shorthand values, or a JSON array.
    StructList,
    /// A string-to-string map: JSON, or shorthand `key=value,…`.
    Map,
}

/// One input member of an operation.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// The model's member name, e.g. `imageIdentifier`.
    pub name: &'static str,
    /// Where it goes.
    pub at: At,
    /// What it holds.
    pub kind: Kind,
    /// Whether the model requires it.
    pub required: bool,
    /// The flag's help.
    pub help: &'static str,
}

const fn m(name: &'static str, at: At, kind: Kind, required: bool, help: &'static str) -> Member {
    Member {
        name,
        at,
        kind,
        required,
        help,
    }
}

/// One operation as a subcommand.
#[derive(Debug, Clone, Copy)]
pub struct OperationSpec {
    /// The operation.
    pub op: Operation,
    /// What it does, one line.
    pub about: &'static str,
    /// An example command line (after `kiln `).
    pub example: &'static str,
    /// Its input members.
    pub members: &'static [Member],
}

const REQ: bool = true;
const OPT: bool = false;

const MICROVM_LABEL: Member = m(
    "microvmIdentifier",
    At::Label,
    Kind::Str,
    REQ,
    "The MicroVM's id (mvm-…) or ARN.",
);
const IMAGE_LABEL: Member = m(
    "imageIdentifier",
    At::Label,
    Kind::Str,
    REQ,
    "The image's name or ARN.",
);
const MANAGED_IMAGE_LABEL: Member = m(
    "imageIdentifier",
    At::Label,
    Kind::Str,
    REQ,
    "The managed image's name or ARN (e.g. busybox, debian-12).",
);
const VERSION_LABEL: Member = m(
    "imageVersion",
    At::Label,
    Kind::Str,
    REQ,
    "The image version, e.g. 1.",
);
const RESOURCE_LABEL: Member = m(
    "Resource",
    At::Label,
    Kind::Str,
    REQ,
    "The ARN of the image or MicroVM.",
);
const MAX_RESULTS: Member = m(
    "maxResults",
    At::Query("maxResults"),
    Kind::Int,
    OPT,
    "Largest page to return (1-50); only that page is printed.",
);
const NEXT_TOKEN: Member = m(
    "nextToken",
    At::Query("nextToken"),
    Kind::Str,
    OPT,
    "Continue after the page that returned this token; only that page is printed.",
);
const ARCHITECTURES: &[&str] = &["ARM_64", "X86_64"];

/// The members of Create- and UpdateMicrovmImage: those they share, in model order,
/// then `$extra`.
macro_rules! image_members {
    ($($extra:expr),* $(,)?) => {
        &[
            m("baseImageArn", At::Body, Kind::Str, REQ, "ARN of the managed base image, e.g. arn:aws:lambda:local:aws:microvm-image:busybox."),
            m("baseImageVersion", At::Body, Kind::Str, OPT, "Version of the base image (default: its latest)."),
            m("buildRoleArn", At::Body, Kind::Str, REQ, "IAM role ARN the build runs as, e.g. arn:aws:iam::000000000000:role/kiln-build."),
            m("description", At::Body, Kind::Str, OPT, "Free text describing this version."),
            m("codeArtifact", At::Body, Kind::Struct, REQ, "Where the zipped build context is: uri=s3://bucket/app.zip in kilnd's S3 store (or JSON {\"uri\":…}); file:///abs/path/app.zip only for admin, under kilnd's --artifact-root."),
            m("logging", At::Body, Kind::Struct, OPT, "Build logs: JSON {\"disabled\":{}} or {\"cloudWatch\":{\"logGroup\":…}}."),
            m("egressNetworkConnectors", At::Body, Kind::StrList, OPT, "At most one egress network connector for the build."),
            m("cpuConfigurations", At::Body, Kind::StructList, OPT, "CPU targets, e.g. architecture=X86_64."),
            m("resources", At::Body, Kind::StructList, OPT, "Memory the app needs, e.g. minimumMemoryInMiB=512."),
            m("additionalOsCapabilities", At::Body, Kind::StrList, OPT, "Extra OS capabilities (ALL)."),
            m("hooks", At::Body, Kind::Struct, OPT, "Lifecycle hooks, JSON, e.g. {\"port\":9000,\"microvmImageHooks\":{\"ready\":\"ENABLED\"}}."),
            m("environmentVariables", At::Body, Kind::Map, OPT, "The app's environment: KEY=value,KEY2=value or JSON."),
            m("kmsKeyIdentifier", At::Body, Kind::Str, OPT, "KMS key for snapshots at rest."),
            $($extra),*
        ]
    };
}

const CLIENT_TOKEN: Member = m(
    "clientToken",
    At::Body,
    Kind::Str,
    OPT,
    "Idempotency token (default: a fresh random one).",
);

const CREATE_IMAGE: &[Member] = image_members!(
    m(
        "name",
        At::Body,
        Kind::Str,
        REQ,
        "The image's name: letters, digits, - and _."
    ),
    m(
        "tags",
        At::Body,
        Kind::Map,
        OPT,
        "Tags: key=value,key2=value or JSON."
    ),
    CLIENT_TOKEN,
);

const UPDATE_IMAGE: &[Member] = image_members!(IMAGE_LABEL, CLIENT_TOKEN);

/// Every operation, in model order.
pub const OPERATIONS: &[OperationSpec] = &[
    OperationSpec {
        op: Operation::CreateMicrovmAuthToken,
        about: "Create a token that opens a MicroVM's HTTPS endpoint on some ports (1-60 minutes)",
        example: "create-microvm-auth-token --microvm-identifier mvm-0a1b --expiration-in-minutes 5 --allowed-ports port=8080",
        members: &[
            MICROVM_LABEL,
            m("expirationInMinutes", At::Body, Kind::Int, REQ, "Lifetime of the token, 1-60 minutes."),
            m("allowedPorts", At::Body, Kind::StructList, REQ, "Ports it opens: port=8080, range={\"startPort\":8000,\"endPort\":8100}, allPorts={} (several allowed), or a JSON list."),
        ],
    },
    OperationSpec {
        op: Operation::CreateMicrovmImage,
        about: "Create an image and start building its first version from a zipped build context",
        example: "create-microvm-image --name web --base-image-arn arn:aws:lambda:local:aws:microvm-image:busybox --build-role-arn arn:aws:iam::000000000000:role/kiln-build --code-artifact uri=s3://apps/app.zip",
        members: CREATE_IMAGE,
    },
    OperationSpec {
        op: Operation::CreateMicrovmShellAuthToken,
        about: "Create a token for a shell session in a MicroVM",
        example: "create-microvm-shell-auth-token --microvm-identifier mvm-0a1b --expiration-in-minutes 5",
        members: &[
            MICROVM_LABEL,
            m("expirationInMinutes", At::Body, Kind::Int, REQ, "Lifetime of the token, 1-60 minutes."),
        ],
    },
    OperationSpec {
        op: Operation::DeleteMicrovmImage,
        about: "Delete an image and all its versions",
        example: "delete-microvm-image --image-identifier web",
        members: &[IMAGE_LABEL],
    },
    OperationSpec {
        op: Operation::DeleteMicrovmImageVersion,
        about: "Delete one version of an image",
        example: "delete-microvm-image-version --image-identifier web --image-version 1",
        members: &[IMAGE_LABEL, VERSION_LABEL],
    },
    OperationSpec {
        op: Operation::GetMicrovm,
        about: "Describe a MicroVM: state, endpoint, image, idle policy",
        example: "get-microvm --microvm-identifier mvm-0a1b",
        members: &[MICROVM_LABEL],
    },
    OperationSpec {
        op: Operation::GetMicrovmImage,
        about: "Describe an image: state, latest active and failed versions",
        example: "get-microvm-image --image-identifier web",
        members: &[IMAGE_LABEL],
    },
    OperationSpec {
        op: Operation::GetMicrovmImageBuild,
        about: "Describe one build of an image version",
        example: "get-microvm-image-build --image-identifier web --image-version 1 --build-id b-…",
        members: &[
            IMAGE_LABEL,
            VERSION_LABEL,
            m("buildId", At::Label, Kind::Str, REQ, "The build's id (see list-microvm-image-builds)."),
        ],
    },
    OperationSpec {
        op: Operation::GetMicrovmImageVersion,
        about: "Describe an image version: build state, status, what it was built from",
        example: "get-microvm-image-version --image-identifier web --image-version 1",
        members: &[IMAGE_LABEL, VERSION_LABEL],
    },
    OperationSpec {
        op: Operation::ListManagedMicrovmImageVersions,
        about: "List the versions of a managed base image",
        example: "list-managed-microvm-image-versions --image-identifier busybox",
        members: &[MAX_RESULTS, NEXT_TOKEN, MANAGED_IMAGE_LABEL],
    },
    OperationSpec {
        op: Operation::ListManagedMicrovmImages,
        about: "List the managed base images (FROM kiln/busybox, FROM kiln/debian:12)",
        example: "list-managed-microvm-images",
        members: &[MAX_RESULTS, NEXT_TOKEN],
    },
    OperationSpec {
        op: Operation::ListMicrovmImageBuilds,
        about: "List the builds of an image version",
        example: "list-microvm-image-builds --image-identifier web --image-version 1",
        members: &[
            MAX_RESULTS,
            NEXT_TOKEN,
            IMAGE_LABEL,
            VERSION_LABEL,
            m("architecture", At::Query("architecture"), Kind::Enum(ARCHITECTURES), OPT, "Only builds for this instruction set."),
            m("chipset", At::Query("chipset"), Kind::Enum(&["GRAVITON", "INTEL"]), OPT, "Only builds on this processor family."),
            m("chipsetGeneration", At::Query("chipsetGeneration"), Kind::Str, OPT, "Only builds on this processor generation."),
        ],
    },
    OperationSpec {
        op: Operation::ListMicrovmImageVersions,
        about: "List the versions of an image",
        example: "list-microvm-image-versions --image-identifier web",
        members: &[MAX_RESULTS, NEXT_TOKEN, IMAGE_LABEL],
    },
    OperationSpec {
        op: Operation::ListMicrovmImages,
        about: "List images (see also `kiln images`)",
        example: "list-microvm-images --name-filter web",
        members: &[
            MAX_RESULTS,
            NEXT_TOKEN,
            m("nameFilter", At::Query("nameFilter"), Kind::Str, OPT, "Only images whose name contains this."),
        ],
    },
    OperationSpec {
        op: Operation::ListMicrovms,
        about: "List MicroVMs (see also `kiln ls`)",
        example: "list-microvms --image-identifier web",
        members: &[
            MAX_RESULTS,
            NEXT_TOKEN,
            m("imageIdentifier", At::Query("imageIdentifier"), Kind::Str, OPT, "Only MicroVMs of this image (name or ARN)."),
            m("imageVersion", At::Query("imageVersion"), Kind::Str, OPT, "Only MicroVMs of this image version."),
        ],
    },
    OperationSpec {
        op: Operation::ListTags,
        about: "List the tags of an image or MicroVM",
        example: "list-tags --resource arn:aws:lambda:local:000000000000:microvm-image:web",
        members: &[RESOURCE_LABEL],
    },
    OperationSpec {
        op: Operation::ResumeMicrovm,
        about: "Resume a suspended MicroVM with its memory and disk as they were",
        example: "resume-microvm --microvm-identifier mvm-0a1b",
        members: &[MICROVM_LABEL],
    },
    OperationSpec {
        op: Operation::RunMicrovm,
        about: "Start a MicroVM from an image (its latest active version unless one is given)",
        example: "run-microvm --image-identifier web --idle-policy maxIdleDurationSeconds=600,suspendedDurationSeconds=3600,autoResumeEnabled=true",
        members: &[
            m("ingressNetworkConnectors", At::Body, Kind::StrList, OPT, "Up to 10 ingress network connectors."),
            m("egressNetworkConnectors", At::Body, Kind::StrList, OPT, "Up to 10 egress network connectors (without one the VM has no egress)."),
            m("imageIdentifier", At::Body, Kind::Str, REQ, "The image's name or ARN."),
            m("imageVersion", At::Body, Kind::Str, OPT, "The version to run (default: the latest active one)."),
            m("executionRoleArn", At::Body, Kind::Str, OPT, "IAM role ARN the MicroVM's code runs as."),
            m("idlePolicy", At::Body, Kind::Struct, OPT, "Suspend when idle: maxIdleDurationSeconds=600,suspendedDurationSeconds=3600,autoResumeEnabled=true (or JSON)."),
            m("logging", At::Body, Kind::Struct, OPT, "Logs: JSON {\"disabled\":{}} or {\"cloudWatch\":{\"logGroup\":…}}."),
            m("kmsKeyIdentifier", At::Body, Kind::Str, OPT, "KMS key for its snapshots."),
            m("runHookPayload", At::Body, Kind::Str, OPT, "Text handed to the image's run hook (at most 4096 characters)."),
            m("maximumDurationInSeconds", At::Body, Kind::Int, OPT, "Hard limit on its life, 1-28800 seconds."),
            CLIENT_TOKEN,
        ],
    },
    OperationSpec {
        op: Operation::SuspendMicrovm,
        about: "Suspend a MicroVM: memory and disk go to disk, the host gets its memory back",
        example: "suspend-microvm --microvm-identifier mvm-0a1b",
        members: &[MICROVM_LABEL],
    },
    OperationSpec {
        op: Operation::TagResource,
        about: "Add or replace tags of an image or MicroVM",
        example: "tag-resource --resource arn:aws:lambda:local:000000000000:microvm-image:web --tags team=infra",
        members: &[
            RESOURCE_LABEL,
            m("Tags", At::Body, Kind::Map, REQ, "Tags: key=value,key2=value or JSON."),
        ],
    },
    OperationSpec {
        op: Operation::TerminateMicrovm,
        about: "Terminate a MicroVM (see also `kiln rm`)",
        example: "terminate-microvm --microvm-identifier mvm-0a1b",
        members: &[MICROVM_LABEL],
    },
    OperationSpec {
        op: Operation::UntagResource,
        about: "Remove tags from an image or MicroVM",
        example: "untag-resource --resource arn:aws:lambda:local:000000000000:microvm-image:web --tag-keys team owner",
        members: &[
            RESOURCE_LABEL,
            m("TagKeys", At::Query("tagKeys"), Kind::StrList, REQ, "Keys of the tags to remove."),
        ],
    },
    OperationSpec {
        op: Operation::UpdateMicrovmImage,
        about: "Build a new version of an image (see also `kiln build`)",
        example: "update-microvm-image --image-identifier web --base-image-arn arn:aws:lambda:local:aws:microvm-image:busybox --build-role-arn arn:aws:iam::000000000000:role/kiln-build --code-artifact uri=s3://apps/app.zip",
        members: UPDATE_IMAGE,
    },
    OperationSpec {
        op: Operation::UpdateMicrovmImageVersion,
        about: "Switch an image version on (ACTIVE) or off (INACTIVE) for new MicroVMs",
        example: "update-microvm-image-version --image-identifier web --image-version 1 --status INACTIVE",
        members: &[
            IMAGE_LABEL,
            VERSION_LABEL,
            m("status", At::Body, Kind::Enum(&["ACTIVE", "INACTIVE"]), REQ, "ACTIVE or INACTIVE."),
        ],
    },
];

/// `CreateMicrovmImage` → `create-microvm-image`; `maxResults` → `max-results`.
pub fn kebab(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if prev_lower {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower = false;
        } else {
            out.push(c);
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        }
    }
    out
}

/// The operation spec a subcommand name names.
pub fn by_command(name: &str) -> Option<&'static OperationSpec> {
    OPERATIONS.iter().find(|s| s.command_name() == name)
}

impl OperationSpec {
    /// The subcommand's name, e.g. `run-microvm`.
    pub fn command_name(&self) -> String {
        kebab(self.op.name())
    }

    /// Whether list pages are merged (no paging member given by the user).
    fn pages(&self) -> bool {
        self.members.iter().any(|m| m.name == "nextToken")
    }

    /// The clap subcommand.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.command_name())
            .about(self.about)
            .after_help(format!(
                "AWS operation {} ({} {}).\n\nExample:\n  kiln {}",
                self.op.name(),
                self.op.method(),
                self.op.path_template(),
                self.example
            ));
        for member in self.members {
            cmd = cmd.arg(member.arg());
        }
        cmd
    }

    /// The call the parsed flags describe.
    pub fn call(&self, matches: &ArgMatches) -> anyhow::Result<Call> {
        let mut call = Call::new(self.op);
        let mut body = Map::new();
        for member in self.members {
            let id = member.flag();
            let values: Vec<String> = match member.kind {
                Kind::Int => matches
                    .get_one::<i64>(&id)
                    .map(|n| vec![n.to_string()])
                    .unwrap_or_default(),
                _ => matches
                    .get_many::<String>(&id)
                    .map(|v| v.cloned().collect())
                    .unwrap_or_default(),
            };
            if values.is_empty() {
                if member.name == "clientToken" {
                    // As botocore fills idempotency tokens: a retried call is not run twice.
                    body.insert(member.name.into(), Value::String(input::client_token()?));
                }
                continue;
            }
            let flag = format!("--{id}");
            match member.at {
                At::Label => call = call.label(member.name, &values[0]),
                At::Query(key) => {
                    for v in member.query_values(&values, &flag)? {
                        call = call.query(key, &v);
                    }
                }
                At::Body => {
                    body.insert(member.name.into(), member.json(&values, &flag)?);
                }
            }
        }
        if self.members.iter().any(|m| m.at == At::Body) {
            call = call.json(&Value::Object(body))?;
        }
        Ok(call)
    }

    /// Whether the call should follow `nextToken` and merge the pages.
    pub fn merge_pages(&self, matches: &ArgMatches) -> bool {
        self.pages()
            && matches.get_one::<i64>("max-results").is_none()
            && matches.get_one::<String>("next-token").is_none()
    }
}

impl Member {
    /// The flag's name without dashes, e.g. `image-identifier`.
    pub fn flag(&self) -> String {
        kebab(self.name)
    }

    fn arg(&self) -> Arg {
        let id = self.flag();
        let arg = Arg::new(id.clone())
            .long(id)
            .help(self.help)
            .required(self.required);
        match self.kind {
            Kind::Str => arg.value_name("TEXT"),
            Kind::Int => arg.value_name("N").value_parser(clap::value_parser!(i64)),
            Kind::Enum(values) => arg
                .value_name("VALUE")
                .value_parser(PossibleValuesParser::new(values.iter().copied())),
            Kind::StrList => arg
                .value_name("TEXT")
                .num_args(1..)
                .action(ArgAction::Append),
            Kind::Struct => arg.value_name("JSON|KEY=VALUE,…"),
            Kind::Map => arg.value_name("KEY=VALUE,…|JSON"),
            Kind::StructList => arg
                .value_name("JSON|KEY=VALUE,…")
                .num_args(1..)
                .action(ArgAction::Append),
        }
    }

    fn query_values(&self, values: &[String], flag: &str) -> anyhow::Result<Vec<String>> {
        match self.kind {
            Kind::StrList => Ok(input::string_list(values, flag)?),
            Kind::Str | Kind::Int | Kind::Enum(_) => Ok(values.to_vec()),
            Kind::Struct | Kind::StructList | Kind::Map => {
                bail!("{flag}: a structure cannot go in a query string (a bug in kiln's table)")
            }
        }
    }

    fn json(&self, values: &[String], flag: &str) -> anyhow::Result<Value> {
        let first = values.first().map(String::as_str).unwrap_or_default();
        Ok(match self.kind {
            Kind::Str | Kind::Enum(_) => Value::String(first.to_string()),
            Kind::Int => Value::from(
                first
                    .parse::<i64>()
                    .with_context(|| format!("{flag}: {first} is not a whole number"))?,
            ),
            Kind::StrList => Value::from(input::string_list(values, flag)?),
            Kind::Struct => input::structure(first, flag)?,
            Kind::Map => input::string_map(first, flag)?,
            Kind::StructList => input::structure_list(values, flag)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(spec: &OperationSpec, args: &[&str]) -> Call {
        let cmd = spec.command();
        let matches = cmd
            .try_get_matches_from(
                std::iter::once(spec.command_name().as_str()).chain(args.iter().copied()),
            )
            .expect("flags parse");
        spec.call(&matches).expect("call")
    }

    /// The request kilnd would parse from `call`, through kiln-api's own router.
    fn as_kilnd_parses(call: &Call) -> Result<kiln_api::Request, kiln_api::ApiError> {
        let path = call.path().expect("path renders");
        let (op, labels) = Operation::route(call.op.method(), &path).expect("routes");
        assert_eq!(op, call.op);
        let query = kiln_api::uri::parse_query(&call.query_string());
        kiln_api::Request::parse(
            op,
            &labels,
            &query,
            call.body.as_deref().unwrap_or_default(),
        )
    }

    fn spec(op: Operation) -> &'static OperationSpec {
        OPERATIONS.iter().find(|s| s.op == op).expect("in table")
    }

    #[test]
    fn table_when_listed_then_every_operation_once_in_model_order() {
        let ops: Vec<Operation> = OPERATIONS.iter().map(|s| s.op).collect();

        assert_eq!(ops, Operation::ALL.to_vec());
    }

    #[test]
    fn kebab_when_model_names_then_aws_cli_flags() {
        let got: Vec<String> = ["CreateMicrovmImage", "maxResults", "Resource", "TagKeys"]
            .iter()
            .map(|n| kebab(n))
            .collect();

        assert_eq!(
            got,
            [
                "create-microvm-image",
                "max-results",
                "resource",
                "tag-keys"
            ]
        );
    }

    #[test]
    fn run_microvm_when_shorthand_idle_policy_then_kilnd_parses_typed_body() {
        let call = parse(
            spec(Operation::RunMicrovm),
            &[
                "--image-identifier",
                "web",
                "--idle-policy",
                "maxIdleDurationSeconds=600,suspendedDurationSeconds=0,autoResumeEnabled=true",
                "--egress-network-connectors",
                "nc-1",
                "nc-2",
            ],
        );

        let parsed = as_kilnd_parses(&call).expect("kilnd accepts it");

        let kiln_api::Request::RunMicrovm { body } = parsed else {
            panic!("not RunMicrovm: {parsed:?}")
        };
        assert_eq!(body.image_identifier, "web");
        let idle = body.idle_policy.expect("idle policy");
        assert_eq!(
            (
                idle.max_idle_duration_seconds,
                idle.suspended_duration_seconds,
                idle.auto_resume_enabled
            ),
            (600, 0, true)
        );
        assert_eq!(
            body.egress_network_connectors,
            Some(vec!["nc-1".into(), "nc-2".into()])
        );
        assert!(body.client_token.is_some_and(|t| !t.is_empty()));
    }

    #[test]
    fn create_image_when_shorthand_artifact_and_resources_then_kilnd_parses() {
        let call = parse(
            spec(Operation::CreateMicrovmImage),
            &[
                "--name",
                "web",
                "--base-image-arn",
                "arn:aws:lambda:local:aws:microvm-image:busybox",
                "--build-role-arn",
                "arn:aws:iam::000000000000:role/kiln-build",
                "--code-artifact",
                "uri=file:///tmp/app.zip",
                "--resources",
                "minimumMemoryInMiB=512",
                "--environment-variables",
                "PORT=8080,MODE=prod",
            ],
        );

        let parsed = as_kilnd_parses(&call).expect("kilnd accepts it");

        let kiln_api::Request::CreateMicrovmImage { body } = parsed else {
            panic!("not CreateMicrovmImage")
        };
        assert_eq!(
            body.config.code_artifact,
            kiln_api::shapes::CodeArtifact::Uri("file:///tmp/app.zip".into())
        );
        assert_eq!(
            body.config.resources.map(|r| r[0].minimum_memory_in_mib),
            Some(512)
        );
        let env = body.config.environment_variables.expect("env");
        assert_eq!(env.get("PORT").map(String::as_str), Some("8080"));
    }

    #[test]
    fn auth_token_when_ports_given_as_shorthand_and_json_then_all_kept() {
        let call = parse(
            spec(Operation::CreateMicrovmAuthToken),
            &[
                "--microvm-identifier",
                "mvm-1",
                "--expiration-in-minutes",
                "5",
                "--allowed-ports",
                "port=8080",
                r#"range={"startPort":9000,"endPort":9100}"#,
                r#"[{"allPorts":{}}]"#,
            ],
        );

        let parsed = as_kilnd_parses(&call).expect("kilnd accepts it");

        let kiln_api::Request::CreateMicrovmAuthToken { params, body } = parsed else {
            panic!("not CreateMicrovmAuthToken")
        };
        assert_eq!(params.microvm_identifier, "mvm-1");
        assert_eq!(body.allowed_ports.len(), 3);
        assert!(body.allowed_ports[1].allows(9050));
    }

    #[test]
    fn untag_when_arn_and_keys_then_label_encoded_and_keys_repeated() {
        let arn = "arn:aws:lambda:local:000000000000:microvm-image:web";
        let call = parse(
            spec(Operation::UntagResource),
            &["--resource", arn, "--tag-keys", "a", "b c"],
        );

        let parsed = as_kilnd_parses(&call).expect("kilnd accepts it");

        let kiln_api::Request::UntagResource { params, query } = parsed else {
            panic!("not UntagResource")
        };
        assert_eq!(params.resource, arn);
        assert_eq!(query.tag_keys, vec!["a", "b c"]);
        assert!(call.body.is_none());
    }

    #[test]
    fn every_operation_when_required_flags_given_then_kilnd_routes_and_parses() {
        let samples: HashMap<&str, Vec<&str>> = HashMap::from([
            ("microvmIdentifier", vec!["mvm-1"]),
            ("imageIdentifier", vec!["web"]),
            ("imageVersion", vec!["1"]),
            ("buildId", vec!["b-1"]),
            (
                "Resource",
                vec!["arn:aws:lambda:local:000000000000:microvm-image:web"],
            ),
            ("expirationInMinutes", vec!["5"]),
            ("allowedPorts", vec!["port=8080"]),
            (
                "baseImageArn",
                vec!["arn:aws:lambda:local:aws:microvm-image:busybox"],
            ),
            (
                "buildRoleArn",
                vec!["arn:aws:iam::000000000000:role/kiln-build"],
            ),
            ("codeArtifact", vec!["uri=file:///tmp/app.zip"]),
            ("name", vec!["web"]),
            ("Tags", vec!["a=b"]),
            ("TagKeys", vec!["a"]),
            ("status", vec!["INACTIVE"]),
        ]);
        for spec in OPERATIONS {
            let mut args = Vec::new();
            for member in spec.members.iter().filter(|m| m.required) {
                let flag = format!("--{}", member.flag());
                args.push(flag);
                for v in samples
                    .get(member.name)
                    .unwrap_or_else(|| panic!("no sample for {}", member.name))
                {
                    args.push(v.to_string());
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();

            let call = parse(spec, &args);
            let parsed = as_kilnd_parses(&call);

            assert_eq!(parsed.map(|r| r.operation()), Ok(spec.op), "{}", spec.op);
        }
    }

    #[test]
    fn struct_flag_when_not_json_or_shorthand_then_says_which_flag() {
        let cmd = spec(Operation::RunMicrovm).command();
        let matches = cmd
            .try_get_matches_from([
                "run-microvm",
                "--image-identifier",
                "web",
                "--idle-policy",
                "{broken",
            ])
            .expect("flags parse");

        let err = spec(Operation::RunMicrovm)
            .call(&matches)
            .expect_err("bad JSON")
            .to_string();

        assert!(err.contains("--idle-policy"), "{err}");
    }

    /// botocore's model, from `$KILN_BOTOCORE_MODEL` or the venv `make pyenv` builds.
    fn botocore_model() -> Value {
        use std::io::Read;
        const SUFFIX: &str =
            "site-packages/botocore/data/lambda-microvms/2025-09-09/service-2.json.gz";
        let path = std::env::var_os("KILN_BOTOCORE_MODEL")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/lib");
                std::fs::read_dir(lib).ok()?.flatten().map(|e| e.path().join(SUFFIX)).find(|p| p.exists())
            })
            .expect("botocore's lambda-microvms model not found: run `make pyenv` or set KILN_BOTOCORE_MODEL");
        let raw = std::fs::read(&path).expect("read the model");
        let mut text = String::new();
        if path.extension().is_some_and(|x| x == "gz") {
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut text)
                .expect("gunzip the model");
        } else {
            text = String::from_utf8(raw).expect("UTF-8 model");
        }
        serde_json::from_str(&text).expect("JSON model")
    }

    /// Location and kind as `uri`/`querystring:KEY`/`body` and the model's type names.
    fn described(at: At, kind: Kind) -> (String, String) {
        let at = match at {
            At::Label => "uri".to_string(),
            At::Query(key) => format!("querystring:{key}"),
            At::Body => "body".to_string(),
        };
        let kind = match kind {
            Kind::Str => "string".to_string(),
            Kind::Int => "integer".to_string(),
            Kind::Enum(values) => format!("string{values:?}"),
            Kind::StrList => "list<string>".to_string(),
            Kind::Struct => "structure".to_string(),
            Kind::StructList => "list<structure>".to_string(),
            Kind::Map => "map".to_string(),
        };
        (at, kind)
    }

    /// A member as the model describes it, in [`described`]'s terms.
    fn model_member(shapes: &Value, def: &Value) -> (String, String) {
        let shape = &shapes[def["shape"].as_str().unwrap_or_default()];
        let at = match (def["location"].as_str(), def["locationName"].as_str()) {
            (Some("querystring"), Some(key)) => format!("querystring:{key}"),
            (Some(other), _) => other.to_string(),
            (None, _) => "body".to_string(),
        };
        let ty = shape["type"].as_str().unwrap_or_default();
        let kind = match (ty, shape["enum"].as_array()) {
            ("string", Some(values)) => {
                let v: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                format!("string{v:?}")
            }
            ("long", _) => "integer".to_string(),
            ("list", _) => {
                let member = &shapes[shape["member"]["shape"].as_str().unwrap_or_default()];
                format!("list<{}>", member["type"].as_str().unwrap_or_default())
            }
            (other, _) => other.to_string(),
        };
        (at, kind)
    }

    #[test]
    fn table_when_compared_with_botocore_model_then_same_members() {
        let model = botocore_model();
        let shapes = &model["shapes"];
        for spec in OPERATIONS {
            let op = &model["operations"][spec.op.name()];
            let input = &shapes[op["input"]["shape"].as_str().unwrap_or_default()];
            let required = |name: &str| {
                input["required"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|n| n == name))
            };
            let mut want: Vec<(String, (String, String), bool)> = input["members"]
                .as_object()
                .map(|members| {
                    members
                        .iter()
                        .map(|(name, def)| {
                            (name.clone(), model_member(shapes, def), required(name))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut got: Vec<(String, (String, String), bool)> = spec
                .members
                .iter()
                .map(|m| (m.name.to_string(), described(m.at, m.kind), m.required))
                .collect();
            want.sort();
            got.sort();

            assert_eq!(got, want, "{}", spec.op);
        }
    }
}
