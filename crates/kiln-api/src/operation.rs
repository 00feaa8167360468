//! The 24 operations: HTTP method, path template, success status, and routing.

use std::collections::HashMap;

use crate::uri::{percent_decode, percent_encode};

/// One operation of the `lambda-microvms` API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// `POST /2025-09-09/microvms/{microvmIdentifier}/auth-token`
    CreateMicrovmAuthToken,
    /// `POST /2025-09-09/microvm-images` (201)
    CreateMicrovmImage,
    /// `POST /2025-09-09/microvms/{microvmIdentifier}/shell-auth-token`
    CreateMicrovmShellAuthToken,
    /// `DELETE /2025-09-09/microvm-images/{imageIdentifier}`
    DeleteMicrovmImage,
    /// `DELETE /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}`
    DeleteMicrovmImageVersion,
    /// `GET /2025-09-09/microvms/{microvmIdentifier}`
    GetMicrovm,
    /// `GET /2025-09-09/microvm-images/{imageIdentifier}`
    GetMicrovmImage,
    /// `GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}`
    GetMicrovmImageBuild,
    /// `GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}`
    GetMicrovmImageVersion,
    /// `GET /2025-09-09/managed-microvm-images/{imageIdentifier}/versions`
    ListManagedMicrovmImageVersions,
    /// `GET /2025-09-09/managed-microvm-images`
    ListManagedMicrovmImages,
    /// `GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds`
    ListMicrovmImageBuilds,
    /// `GET /2025-09-09/microvm-images/{imageIdentifier}/versions`
    ListMicrovmImageVersions,
    /// `GET /2025-09-09/microvm-images`
    ListMicrovmImages,
    /// `GET /2025-09-09/microvms`
    ListMicrovms,
    /// `GET /2017-03-31/tags/{Resource}`
    ListTags,
    /// `POST /2025-09-09/microvms/{microvmIdentifier}/resume`
    ResumeMicrovm,
    /// `POST /2025-09-09/microvms`
    RunMicrovm,
    /// `POST /2025-09-09/microvms/{microvmIdentifier}/suspend`
    SuspendMicrovm,
    /// `POST /2017-03-31/tags/{Resource}` (204)
    TagResource,
    /// `DELETE /2025-09-09/microvms/{microvmIdentifier}`
    TerminateMicrovm,
    /// `DELETE /2017-03-31/tags/{Resource}` (204)
    UntagResource,
    /// `PUT /2025-09-09/microvm-images/{imageIdentifier}`
    UpdateMicrovmImage,
    /// `PATCH /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}`
    UpdateMicrovmImageVersion,
}

use Operation::*;

impl Operation {
    /// Every operation, in model order.
    pub const ALL: [Operation; 24] = [
        CreateMicrovmAuthToken,
        CreateMicrovmImage,
        CreateMicrovmShellAuthToken,
        DeleteMicrovmImage,
        DeleteMicrovmImageVersion,
        GetMicrovm,
        GetMicrovmImage,
        GetMicrovmImageBuild,
        GetMicrovmImageVersion,
        ListManagedMicrovmImageVersions,
        ListManagedMicrovmImages,
        ListMicrovmImageBuilds,
        ListMicrovmImageVersions,
        ListMicrovmImages,
        ListMicrovms,
        ListTags,
        ResumeMicrovm,
        RunMicrovm,
        SuspendMicrovm,
        TagResource,
        TerminateMicrovm,
        UntagResource,
        UpdateMicrovmImage,
        UpdateMicrovmImageVersion,
    ];

    /// The operation's model name, e.g. `CreateMicrovmImage`.
    pub fn name(self) -> &'static str {
        self.spec().0
    }

    /// The HTTP method, upper case.
    pub fn method(self) -> &'static str {
        self.spec().1
    }

    /// The model's `requestUri`, e.g. `/2025-09-09/microvm-images/{imageIdentifier}`.
    pub fn path_template(self) -> &'static str {
        self.spec().2
    }

    /// The status of a successful response.
    pub fn success_status(self) -> u16 {
        self.spec().3
    }

    /// The operation named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    fn spec(self) -> (&'static str, &'static str, &'static str, u16) {
        const IMAGE: &str = "/2025-09-09/microvm-images/{imageIdentifier}";
        const VERSION: &str =
            "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}";
        const MICROVM: &str = "/2025-09-09/microvms/{microvmIdentifier}";
        const TAGS: &str = "/2017-03-31/tags/{Resource}";
        match self {
            CreateMicrovmAuthToken => (
                "CreateMicrovmAuthToken",
                "POST",
                "/2025-09-09/microvms/{microvmIdentifier}/auth-token",
                200,
            ),
            CreateMicrovmImage => ("CreateMicrovmImage", "POST", "/2025-09-09/microvm-images", 201),
            CreateMicrovmShellAuthToken => (
                "CreateMicrovmShellAuthToken",
                "POST",
                "/2025-09-09/microvms/{microvmIdentifier}/shell-auth-token",
                200,
            ),
            DeleteMicrovmImage => ("DeleteMicrovmImage", "DELETE", IMAGE, 200),
            DeleteMicrovmImageVersion => ("DeleteMicrovmImageVersion", "DELETE", VERSION, 200),
            GetMicrovm => ("GetMicrovm", "GET", MICROVM, 200),
            GetMicrovmImage => ("GetMicrovmImage", "GET", IMAGE, 200),
            GetMicrovmImageBuild => (
                "GetMicrovmImageBuild",
                "GET",
                "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}",
                200,
            ),
            GetMicrovmImageVersion => ("GetMicrovmImageVersion", "GET", VERSION, 200),
            ListManagedMicrovmImageVersions => (
                "ListManagedMicrovmImageVersions",
                "GET",
                "/2025-09-09/managed-microvm-images/{imageIdentifier}/versions",
                200,
            ),
            ListManagedMicrovmImages => {
                ("ListManagedMicrovmImages", "GET", "/2025-09-09/managed-microvm-images", 200)
            }
            ListMicrovmImageBuilds => (
                "ListMicrovmImageBuilds",
                "GET",
                "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds",
                200,
            ),
            ListMicrovmImageVersions => (
                "ListMicrovmImageVersions",
                "GET",
                "/2025-09-09/microvm-images/{imageIdentifier}/versions",
                200,
            ),
            ListMicrovmImages => ("ListMicrovmImages", "GET", "/2025-09-09/microvm-images", 200),
            ListMicrovms => ("ListMicrovms", "GET", "/2025-09-09/microvms", 200),
            ListTags => ("ListTags", "GET", TAGS, 200),
            ResumeMicrovm => {
                ("ResumeMicrovm", "POST", "/2025-09-09/microvms/{microvmIdentifier}/resume", 200)
            }
            RunMicrovm => ("RunMicrovm", "POST", "/2025-09-09/microvms", 200),
            SuspendMicrovm => {
                ("SuspendMicrovm", "POST", "/2025-09-09/microvms/{microvmIdentifier}/suspend", 200)
            }
            TagResource => ("TagResource", "POST", TAGS, 204),
            TerminateMicrovm => ("TerminateMicrovm", "DELETE", MICROVM, 200),
            UntagResource => ("UntagResource", "DELETE", TAGS, 204),
            UpdateMicrovmImage => ("UpdateMicrovmImage", "PUT", IMAGE, 200),
            UpdateMicrovmImageVersion => ("UpdateMicrovmImageVersion", "PATCH", VERSION, 200),
        }
    }

    /// Matches this operation's template against a raw path (query string, if any,
    /// ignored), returning the percent-decoded labels. Labels match one non-empty
    /// segment; a `/` inside a label must arrive as `%2F`.
    pub fn match_path(self, path: &str) -> Option<HashMap<String, String>> {
        let path = path.split('?').next().unwrap_or_default();
        let mut got = path.split('/');
        let mut labels = HashMap::new();
        for want in self.path_template().split('/') {
            let seg = got.next()?;
            match want.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(name) => {
                    if seg.is_empty() {
                        return None;
                    }
                    labels.insert(name.to_string(), percent_decode(seg)?);
                }
                None if seg == want => {}
                None => return None,
            }
        }
        got.next().is_none().then_some(labels)
    }

    /// The operation a request's method and raw path name, with its decoded URI labels.
    pub fn route(method: &str, path: &str) -> Option<(Operation, HashMap<String, String>)> {
        Self::ALL
            .into_iter()
            .filter(|op| op.method().eq_ignore_ascii_case(method))
            .find_map(|op| op.match_path(path).map(|labels| (op, labels)))
    }

    /// Whether some operation has `path` under another method (so a server can answer
    /// 405 rather than 404).
    pub fn path_known(path: &str) -> bool {
        Self::ALL
            .into_iter()
            .any(|op| op.match_path(path).is_some())
    }

    /// The path with each `{label}` replaced by its percent-encoded value from
    /// `labels`; `None` if one is missing.
    pub fn render_path(self, labels: &[(&str, &str)]) -> Option<String> {
        let mut out = Vec::new();
        for seg in self.path_template().split('/') {
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let (_, value) = labels.iter().find(|(k, _)| *k == name)?;
                    out.push(percent_encode(value));
                }
                None => out.push(seg.to_string()),
            }
        }
        Some(out.join("/"))
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(method: &str, path: &str) -> (Operation, Vec<(String, String)>) {
        let (op, labels) = Operation::route(method, path).expect("route");
        let mut labels: Vec<_> = labels.into_iter().collect();
        labels.sort();
        (op, labels)
    }

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_operation_routes_its_own_rendered_path() {
        let values = [
            ("microvmIdentifier", "mvm-1"),
            ("imageIdentifier", "web"),
            ("imageVersion", "3"),
            ("buildId", "b-1"),
            (
                "Resource",
                "arn:aws:lambda:local:000000000000:microvm-image:web",
            ),
        ];
        for op in Operation::ALL {
            let path = op.render_path(&values).expect("all labels given");
            let (got, _) = routed(op.method(), &path);
            assert_eq!(got, op, "{path}");
        }
    }

    #[test]
    fn image_paths_route_with_labels() {
        assert_eq!(
            routed("POST", "/2025-09-09/microvm-images"),
            (CreateMicrovmImage, vec![])
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images"),
            (ListMicrovmImages, vec![])
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images/web"),
            (GetMicrovmImage, l(&[("imageIdentifier", "web")]))
        );
        assert_eq!(
            routed("PUT", "/2025-09-09/microvm-images/web"),
            (UpdateMicrovmImage, l(&[("imageIdentifier", "web")]))
        );
        assert_eq!(
            routed("DELETE", "/2025-09-09/microvm-images/web"),
            (DeleteMicrovmImage, l(&[("imageIdentifier", "web")]))
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images/web/versions"),
            (ListMicrovmImageVersions, l(&[("imageIdentifier", "web")]))
        );
        let v = l(&[("imageIdentifier", "web"), ("imageVersion", "2")]);
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images/web/versions/2"),
            (GetMicrovmImageVersion, v.clone())
        );
        assert_eq!(
            routed("PATCH", "/2025-09-09/microvm-images/web/versions/2"),
            (UpdateMicrovmImageVersion, v.clone())
        );
        assert_eq!(
            routed("DELETE", "/2025-09-09/microvm-images/web/versions/2"),
            (DeleteMicrovmImageVersion, v.clone())
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images/web/versions/2/builds"),
            (ListMicrovmImageBuilds, v)
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvm-images/web/versions/2/builds/b7"),
            (
                GetMicrovmImageBuild,
                l(&[
                    ("imageIdentifier", "web"),
                    ("imageVersion", "2"),
                    ("buildId", "b7")
                ])
            )
        );
    }

    #[test]
    fn managed_image_paths_route() {
        assert_eq!(
            routed("GET", "/2025-09-09/managed-microvm-images"),
            (ListManagedMicrovmImages, vec![])
        );
        assert_eq!(
            routed("GET", "/2025-09-09/managed-microvm-images/al2023/versions"),
            (
                ListManagedMicrovmImageVersions,
                l(&[("imageIdentifier", "al2023")])
            )
        );
    }

    #[test]
    fn microvm_paths_route() {
        let m = l(&[("microvmIdentifier", "mvm-1")]);
        assert_eq!(routed("POST", "/2025-09-09/microvms"), (RunMicrovm, vec![]));
        assert_eq!(
            routed("GET", "/2025-09-09/microvms?maxResults=5"),
            (ListMicrovms, vec![])
        );
        assert_eq!(
            routed("GET", "/2025-09-09/microvms/mvm-1"),
            (GetMicrovm, m.clone())
        );
        assert_eq!(
            routed("DELETE", "/2025-09-09/microvms/mvm-1"),
            (TerminateMicrovm, m.clone())
        );
        assert_eq!(
            routed("POST", "/2025-09-09/microvms/mvm-1/suspend"),
            (SuspendMicrovm, m.clone())
        );
        assert_eq!(
            routed("POST", "/2025-09-09/microvms/mvm-1/resume"),
            (ResumeMicrovm, m.clone())
        );
        assert_eq!(
            routed("POST", "/2025-09-09/microvms/mvm-1/auth-token"),
            (CreateMicrovmAuthToken, m.clone())
        );
        assert_eq!(
            routed("POST", "/2025-09-09/microvms/mvm-1/shell-auth-token"),
            (CreateMicrovmShellAuthToken, m)
        );
    }

    #[test]
    fn tags_path_decodes_percent_encoded_arn() {
        let raw =
            "/2017-03-31/tags/arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aweb";
        let r = l(&[(
            "Resource",
            "arn:aws:lambda:local:000000000000:microvm-image:web",
        )]);
        assert_eq!(routed("GET", raw), (ListTags, r.clone()));
        assert_eq!(routed("POST", raw), (TagResource, r.clone()));
        assert_eq!(
            routed("DELETE", &format!("{raw}?tagKeys=a")),
            (UntagResource, r)
        );
    }

    #[test]
    fn unknown_paths_and_methods_do_not_route() {
        assert!(Operation::route("GET", "/2025-09-09/microvm-images/").is_none());
        assert!(Operation::route("GET", "/2025-09-09/microvms/a/b").is_none());
        assert!(Operation::route("PUT", "/2025-09-09/microvms").is_none());
        assert!(Operation::path_known("/2025-09-09/microvms"));
        assert!(!Operation::path_known("/2015-03-31/functions"));
    }

    #[test]
    fn success_statuses_follow_the_model() {
        assert_eq!(CreateMicrovmImage.success_status(), 201);
        assert_eq!(TagResource.success_status(), 204);
        assert_eq!(UntagResource.success_status(), 204);
        assert_eq!(RunMicrovm.success_status(), 200);
    }
}
