//! A call routed, parsed and validated: labels, query and body together per operation.

use std::collections::HashMap;

use crate::operation::Operation;
use crate::params::*;
use crate::shapes::*;
use crate::validate::{parse_body, Validate};
use crate::ApiError;

/// One validated call of each operation. `params` are URI labels, `query` the query
/// string, `body` the JSON body; an operation without one has no such field. Each
/// variant is the operation of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    CreateMicrovmAuthToken {
        params: MicrovmParams,
        body: CreateMicrovmAuthTokenRequest,
    },
    CreateMicrovmImage {
        body: Box<CreateMicrovmImageRequest>,
    },
    CreateMicrovmShellAuthToken {
        params: MicrovmParams,
        body: CreateMicrovmShellAuthTokenRequest,
    },
    DeleteMicrovmImage {
        params: ImageParams,
    },
    DeleteMicrovmImageVersion {
        params: ImageVersionParams,
    },
    GetMicrovm {
        params: MicrovmParams,
    },
    GetMicrovmImage {
        params: ImageParams,
    },
    GetMicrovmImageBuild {
        params: ImageBuildParams,
    },
    GetMicrovmImageVersion {
        params: ImageVersionParams,
    },
    ListManagedMicrovmImageVersions {
        params: ImageParams,
        query: ListManagedMicrovmImageVersionsQuery,
    },
    ListManagedMicrovmImages {
        query: ListManagedMicrovmImagesQuery,
    },
    ListMicrovmImageBuilds {
        params: ImageVersionParams,
        query: ListMicrovmImageBuildsQuery,
    },
    ListMicrovmImageVersions {
        params: ImageParams,
        query: ListMicrovmImageVersionsQuery,
    },
    ListMicrovmImages {
        query: ListMicrovmImagesQuery,
    },
    ListMicrovms {
        query: ListMicrovmsQuery,
    },
    ListTags {
        params: TagsParams,
    },
    ResumeMicrovm {
        params: MicrovmParams,
    },
    RunMicrovm {
        body: Box<RunMicrovmRequest>,
    },
    SuspendMicrovm {
        params: MicrovmParams,
    },
    TagResource {
        params: TagsParams,
        body: TagResourceRequest,
    },
    TerminateMicrovm {
        params: MicrovmParams,
    },
    UntagResource {
        params: TagsParams,
        query: UntagResourceQuery,
    },
    UpdateMicrovmImage {
        params: ImageParams,
        body: Box<UpdateMicrovmImageRequest>,
    },
    UpdateMicrovmImageVersion {
        params: ImageVersionParams,
        body: UpdateMicrovmImageVersionRequest,
    },
}

fn labels<T: FromLabels + Validate>(labels: &HashMap<String, String>) -> Result<T, ApiError> {
    let value = T::from_labels(labels)?;
    value.validate()?;
    Ok(value)
}

fn query<T: QueryString + Validate>(pairs: &[(String, String)]) -> Result<T, ApiError> {
    let value = T::from_query(pairs)?;
    value.validate()?;
    Ok(value)
}

impl Request {
    /// Builds `op`'s request from the labels [`Operation::route`] returned, the decoded
    /// query pairs ([`crate::uri::parse_query`]) and the raw body. Members of other
    /// locations (a body on a GET, unknown query keys) are ignored, as AWS does.
    pub fn parse(
        op: Operation,
        uri_labels: &HashMap<String, String>,
        query_pairs: &[(String, String)],
        body: &[u8],
    ) -> Result<Request, ApiError> {
        let l = uri_labels;
        let q = query_pairs;
        Ok(match op {
            Operation::CreateMicrovmAuthToken => Request::CreateMicrovmAuthToken {
                params: labels(l)?,
                body: parse_body(body)?,
            },
            Operation::CreateMicrovmImage => Request::CreateMicrovmImage {
                body: Box::new(parse_body(body)?),
            },
            Operation::CreateMicrovmShellAuthToken => Request::CreateMicrovmShellAuthToken {
                params: labels(l)?,
                body: parse_body(body)?,
            },
            Operation::DeleteMicrovmImage => Request::DeleteMicrovmImage { params: labels(l)? },
            Operation::DeleteMicrovmImageVersion => {
                Request::DeleteMicrovmImageVersion { params: labels(l)? }
            }
            Operation::GetMicrovm => Request::GetMicrovm { params: labels(l)? },
            Operation::GetMicrovmImage => Request::GetMicrovmImage { params: labels(l)? },
            Operation::GetMicrovmImageBuild => Request::GetMicrovmImageBuild { params: labels(l)? },
            Operation::GetMicrovmImageVersion => {
                Request::GetMicrovmImageVersion { params: labels(l)? }
            }
            Operation::ListManagedMicrovmImageVersions => {
                Request::ListManagedMicrovmImageVersions {
                    params: labels(l)?,
                    query: query(q)?,
                }
            }
            Operation::ListManagedMicrovmImages => {
                Request::ListManagedMicrovmImages { query: query(q)? }
            }
            Operation::ListMicrovmImageBuilds => Request::ListMicrovmImageBuilds {
                params: labels(l)?,
                query: query(q)?,
            },
            Operation::ListMicrovmImageVersions => Request::ListMicrovmImageVersions {
                params: labels(l)?,
                query: query(q)?,
            },
            Operation::ListMicrovmImages => Request::ListMicrovmImages { query: query(q)? },
            Operation::ListMicrovms => Request::ListMicrovms { query: query(q)? },
            Operation::ListTags => Request::ListTags { params: labels(l)? },
            Operation::ResumeMicrovm => Request::ResumeMicrovm { params: labels(l)? },
            Operation::RunMicrovm => Request::RunMicrovm {
                body: Box::new(parse_body(body)?),
            },
            Operation::SuspendMicrovm => Request::SuspendMicrovm { params: labels(l)? },
            Operation::TagResource => Request::TagResource {
                params: labels(l)?,
                body: parse_body(body)?,
            },
            Operation::TerminateMicrovm => Request::TerminateMicrovm { params: labels(l)? },
            Operation::UntagResource => Request::UntagResource {
                params: labels(l)?,
                query: query(q)?,
            },
            Operation::UpdateMicrovmImage => Request::UpdateMicrovmImage {
                params: labels(l)?,
                body: Box::new(parse_body(body)?),
            },
            Operation::UpdateMicrovmImageVersion => Request::UpdateMicrovmImageVersion {
                params: labels(l)?,
                body: parse_body(body)?,
            },
        })
    }

    /// The operation this request calls.
    pub fn operation(&self) -> Operation {
        match self {
            Request::CreateMicrovmAuthToken { .. } => Operation::CreateMicrovmAuthToken,
            Request::CreateMicrovmImage { .. } => Operation::CreateMicrovmImage,
            Request::CreateMicrovmShellAuthToken { .. } => Operation::CreateMicrovmShellAuthToken,
            Request::DeleteMicrovmImage { .. } => Operation::DeleteMicrovmImage,
            Request::DeleteMicrovmImageVersion { .. } => Operation::DeleteMicrovmImageVersion,
            Request::GetMicrovm { .. } => Operation::GetMicrovm,
            Request::GetMicrovmImage { .. } => Operation::GetMicrovmImage,
            Request::GetMicrovmImageBuild { .. } => Operation::GetMicrovmImageBuild,
            Request::GetMicrovmImageVersion { .. } => Operation::GetMicrovmImageVersion,
            Request::ListManagedMicrovmImageVersions { .. } => {
                Operation::ListManagedMicrovmImageVersions
            }
            Request::ListManagedMicrovmImages { .. } => Operation::ListManagedMicrovmImages,
            Request::ListMicrovmImageBuilds { .. } => Operation::ListMicrovmImageBuilds,
            Request::ListMicrovmImageVersions { .. } => Operation::ListMicrovmImageVersions,
            Request::ListMicrovmImages { .. } => Operation::ListMicrovmImages,
            Request::ListMicrovms { .. } => Operation::ListMicrovms,
            Request::ListTags { .. } => Operation::ListTags,
            Request::ResumeMicrovm { .. } => Operation::ResumeMicrovm,
            Request::RunMicrovm { .. } => Operation::RunMicrovm,
            Request::SuspendMicrovm { .. } => Operation::SuspendMicrovm,
            Request::TagResource { .. } => Operation::TagResource,
            Request::TerminateMicrovm { .. } => Operation::TerminateMicrovm,
            Request::UntagResource { .. } => Operation::UntagResource,
            Request::UpdateMicrovmImage { .. } => Operation::UpdateMicrovmImage,
            Request::UpdateMicrovmImageVersion { .. } => Operation::UpdateMicrovmImageVersion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uri::parse_query;

    fn call(method: &str, path: &str, body: &str) -> Result<Request, ApiError> {
        let (path, raw_query) = path.split_once('?').unwrap_or((path, ""));
        let (op, l) = Operation::route(method, path).expect("routes");
        let req = Request::parse(op, &l, &parse_query(raw_query), body.as_bytes())?;
        assert_eq!(req.operation(), op);
        Ok(req)
    }

    #[test]
    fn run_microvm_parses_body() {
        let req = call(
            "POST",
            "/2025-09-09/microvms",
            r#"{"imageIdentifier":"web"}"#,
        )
        .unwrap();
        let Request::RunMicrovm { body } = req else {
            panic!("wrong variant")
        };
        assert_eq!(body.image_identifier, "web");
    }

    #[test]
    fn list_builds_reads_labels_and_query() {
        let req = call(
            "GET",
            "/2025-09-09/microvm-images/web/versions/1/builds?maxResults=2&chipset=GRAVITON",
            "",
        )
        .unwrap();
        let Request::ListMicrovmImageBuilds { params, query } = req else {
            panic!("wrong variant")
        };
        assert_eq!(params.image_version, "1");
        assert_eq!(query.page.max_results, Some(2));
        assert_eq!(query.chipset, Some(Chipset::Graviton));
    }

    #[test]
    fn max_results_out_of_range_is_rejected() {
        let err = call("GET", "/2025-09-09/microvms?maxResults=51", "").unwrap_err();
        assert_eq!(
            err.message(),
            "1 validation error detected: Value at 'maxResults' failed to satisfy constraint: \
             Member must have value less than or equal to 50"
        );
    }

    #[test]
    fn tagging_a_foreign_arn_is_rejected() {
        let err = call(
            "POST",
            "/2017-03-31/tags/arn%3Aaws%3As3%3A%3A%3Abucket",
            r#"{"Tags":{}}"#,
        )
        .unwrap_err();
        assert!(err.message().contains("'Resource'"), "{}", err.message());
    }

    #[test]
    fn untag_reads_repeated_keys() {
        let path = "/2017-03-31/tags/arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aweb?tagKeys=a&tagKeys=b";
        let Request::UntagResource { params, query } = call("DELETE", path, "").unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(
            params.resource,
            "arn:aws:lambda:local:000000000000:microvm-image:web"
        );
        assert_eq!(query.tag_keys, vec!["a", "b"]);
    }
}
