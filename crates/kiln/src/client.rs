//! kilnd's API as kiln calls it: the AWS operations and kiln's own `/kiln/v1` paths,
//! every request signed with SigV4; API errors kept typed so the CLI can give a hint.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use kiln_api::Operation;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use kiln_sigv4::RequestSigner;

/// One call of an AWS operation: URI labels, query pairs and the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The operation.
    pub op: Operation,
    labels: Vec<(&'static str, String)>,
    query: Vec<(String, String)>,
    /// The JSON body, for operations with body members.
    pub body: Option<Vec<u8>>,
}

impl Call {
    /// A call of `op` with no input yet.
    pub fn new(op: Operation) -> Self {
        Call {
            op,
            labels: Vec::new(),
            query: Vec::new(),
            body: None,
        }
    }

    /// Sets the path label `name`.
    pub fn label(mut self, name: &'static str, value: &str) -> Self {
        self.labels.push((name, value.to_string()));
        self
    }

    /// Adds a query pair (repeatable keys stay repeated).
    pub fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the JSON body.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> anyhow::Result<Self> {
        self.body = Some(
            serde_json::to_vec(body)
                .with_context(|| format!("encoding the body of {}", self.op))?,
        );
        Ok(self)
    }

    /// The path with its labels filled in and percent-encoded.
    pub fn path(&self) -> anyhow::Result<String> {
        let labels: Vec<(&str, &str)> = self.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.op.render_path(&labels).with_context(|| {
            format!(
                "{} needs every label of {} (a bug in kiln)",
                self.op,
                self.op.path_template()
            )
        })
    }

    /// The encoded query string, without `?`.
    pub fn query_string(&self) -> String {
        kiln_api::uri::format_query(&self.query)
    }

    /// The same call asking for the page after `token`.
    fn next_page(&self, token: &str) -> Self {
        let mut next = self.clone();
        next.query.retain(|(k, _)| k != "nextToken");
        next.query.push(("nextToken".into(), token.into()));
        next
    }
}

/// An error kilnd answered with: its type, message and the resource it names.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct ApiFailure {
    /// What was called: an operation name or `METHOD /kiln/v1/…`.
    pub call: String,
    /// The subcommand that calls it, when it is an AWS operation.
    pub command: Option<String>,
    /// HTTP status.
    pub status: u16,
    /// `x-amzn-ErrorType`, e.g. `ResourceNotFoundException`.
    pub error_type: String,
    /// The error's message.
    pub message: String,
    /// `resourceType` of not-found and conflict errors.
    pub resource_type: Option<String>,
    /// Where the signing key came from.
    pub signed_with: String,
    /// kilnd's address.
    pub endpoint: String,
}

impl ApiFailure {
    /// What the user can do about it.
    pub fn hint(&self) -> String {
        let help = self
            .command
            .as_ref()
            .map(|c| format!("`kiln {c} --help` lists its flags"))
            .unwrap_or_else(|| "`kiln --help` lists the commands".into());
        match self.error_type.as_str() {
            "ResourceNotFoundException" => match self.resource_type.as_deref() {
                Some("Microvm") => "list MicroVMs with `kiln ls --all`".into(),
                Some("MicrovmImage") => "list images with `kiln images`".into(),
                Some("MicrovmImageVersion") => {
                    "list an image's versions with `kiln list-microvm-image-versions --image-identifier IMAGE`".into()
                }
                Some("MicrovmImageBuild") => {
                    "list a version's builds with `kiln list-microvm-image-builds --image-identifier IMAGE --image-version N`".into()
                }
                Some("ManagedMicrovmImage") => {
                    "list the managed images with `kiln list-managed-microvm-images`".into()
                }
                Some("operation") => format!(
                    "kilnd at {} does not serve {}: it is probably older than this kiln; upgrade kilnd",
                    self.endpoint, self.call
                ),
                _ => "check the identifier; `kiln ls` and `kiln images` list what exists".into(),
            },
            "ValidationException" | "InvalidParameterValueException" => {
                format!("fix the value the message names; {help}")
            }
            "ConflictException" | "ResourceConflictException" => {
                "the resource's state forbids this now: check it (`kiln ls`, `kiln images`) and retry once it settles".into()
            }
            "InsufficientCapacityException" | "ServiceQuotaExceededException" => {
                "terminate MicroVMs you no longer need (`kiln ls`, `kiln rm ID`), or start kilnd with a higher --max-microvms / --max-memory-mib".into()
            }
            "ThrottlingException" | "TooManyRequestsException" => {
                "kilnd is throttling: retry in a few seconds".into()
            }
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignatureException"
            | "MissingAuthenticationTokenException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "ExpiredTokenException" => format!(
                "kiln signed with {}; kilnd accepts the key in its own <KILN_HOME>/credentials and keys made with `kiln keys create`: \
                 use --profile or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for another key, or --home for kilnd's data directory",
                self.signed_with
            ),
            "InternalServerException" | "ServiceException" => {
                "kilnd failed while handling this; its log (stderr) says more".into()
            }
            _ => help,
        }
    }
}

/// The innermost error of a chain: for a failed connection, what the socket said.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A kilnd to call.
#[derive(Debug, Clone)]
pub struct Kilnd {
    endpoint: String,
    http: reqwest::Client,
    signer: RequestSigner,
}

/// Reads the error kilnd sent.
async fn failure(
    resp: reqwest::Response,
    call: String,
    command: Option<String>,
    kilnd: &Kilnd,
) -> ApiFailure {
    let status = resp.status().as_u16();
    let header_type = resp
        .headers()
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|t| t.split(':').next().unwrap_or_default().to_string());
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let error_type = header_type
        .or_else(|| field("__type").map(|t| t.rsplit('#').next().unwrap_or_default().to_string()))
        .or_else(|| field("code"))
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = field("message")
        .or_else(|| field("Message"))
        .unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() {
                "(no message)".into()
            } else {
                t.chars().take(2000).collect()
            }
        });
    ApiFailure {
        call,
        command,
        status,
        error_type,
        message,
        resource_type: field("resourceType"),
        signed_with: format!(
            "access key {} from {}",
            kilnd.signer.credentials().access_key_id,
            kilnd.signer.credentials().source
        ),
        endpoint: kilnd.endpoint.clone(),
    }
}

/// Makes ring the process's TLS provider (reqwest is built without one; kilnd uses ring
/// too). Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Kilnd {
    /// A client of the kilnd at `endpoint` (e.g. `http://127.0.0.1:7171`).
    pub fn new(endpoint: &str, signer: RequestSigner) -> anyhow::Result<Self> {
        install_tls_provider();
        let endpoint = endpoint.trim_end_matches('/').to_string();
        reqwest::Url::parse(&endpoint).with_context(|| {
            format!("kilnd endpoint {endpoint} is not a URL: use e.g. http://127.0.0.1:7171")
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // kilnd is reached directly, as the AWS CLI reaches a local --endpoint-url.
            .no_proxy()
            .build()
            .context("creating the HTTP client")?;
        Ok(Kilnd {
            endpoint,
            http,
            signer,
        })
    }

    /// The credentials requests are signed with.
    pub fn credentials(&self) -> &kiln_sigv4::Credentials {
        self.signer.credentials()
    }

    /// kilnd's API address.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The signed request for `call`, signed at `at`.
    pub fn request(&self, call: &Call, at: SystemTime) -> anyhow::Result<reqwest::Request> {
        let mut url = format!("{}{}", self.endpoint, call.path()?);
        let query = call.query_string();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        let method = Method::from_bytes(call.op.method().as_bytes())
            .with_context(|| format!("{} has a bad method (a bug in kiln)", call.op))?;
        self.build(method, &url, call.body.clone(), at)
    }

    fn build(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        at: SystemTime,
    ) -> anyhow::Result<reqwest::Request> {
        let url = reqwest::Url::parse(url).with_context(|| format!("bad request URL {url}"))?;
        let mut req = reqwest::Request::new(method, url);
        if let Some(body) = body {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            *req.body_mut() = Some(body.into());
        }
        self.signer.sign(&mut req, at)?;
        Ok(req)
    }

    async fn send(&self, req: reqwest::Request) -> anyhow::Result<reqwest::Response> {
        let what = format!("{} {}", req.method(), req.url().path());
        self.http.execute(req).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach kilnd at {} ({what}): {}; is kilnd running? Start it (`kilnd`) or point --endpoint / KILN_ENDPOINT at it",
                self.endpoint,
                root_cause(&e)
            )
        })
    }

    /// Calls an AWS operation; its output (`Null` when it has none).
    pub async fn call(&self, call: &Call) -> anyhow::Result<Value> {
        let req = self.request(call, SystemTime::now())?;
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            let command = crate::operations::kebab(call.op.name());
            return Err(
                failure(resp, call.op.name().to_string(), Some(command), self)
                    .await
                    .into(),
            );
        }
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading kilnd's answer to {}", call.op))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("kilnd's answer to {} is not JSON", call.op))
    }

    /// Calls an AWS operation and reads its output as `T`.
    pub async fn call_as<T: DeserializeOwned>(&self, call: &Call) -> anyhow::Result<T> {
        let v = self.call(call).await?;
        serde_json::from_value(v).with_context(|| {
            format!(
                "kilnd's answer to {} does not have the model's shape",
                call.op
            )
        })
    }

    /// Calls a list operation page after page; one output with every page's `items`.
    pub async fn call_all_pages(&self, call: &Call) -> anyhow::Result<Value> {
        let mut first = self.call(call).await?;
        let mut token = first["nextToken"].as_str().map(str::to_string);
        let mut pages = 1;
        while let Some(t) = token {
            pages += 1;
            if pages > 1000 {
                anyhow::bail!(
                    "{} kept returning a nextToken after 1000 pages; stopping (a bug in kilnd?)",
                    call.op
                );
            }
            let page = self.call(&call.next_page(&t)).await?;
            if let (Some(all), Some(more)) =
                (first["items"].as_array_mut(), page["items"].as_array())
            {
                all.extend(more.iter().cloned());
            }
            token = page["nextToken"].as_str().map(str::to_string);
        }
        if let Some(obj) = first.as_object_mut() {
            obj.remove("nextToken");
        }
        Ok(first)
    }

    /// A signed request to kiln's own API (`path` starts with `/kiln/v1/`); the response
    /// when it succeeded.
    pub async fn kiln(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .context("encoding the request body")?;
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let req = self.build(
            method,
            &format!("{}{path}", self.endpoint),
            body,
            SystemTime::now(),
        )?;
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(failure(resp, what, None, self).await.into());
        }
        Ok(resp)
    }

    /// A signed PUT to kiln's own API whose body `body` is streamed, not held in memory:
    /// the signature covers `sha256` (the body's, lower-case hex), which kilnd checks before
    /// keeping anything. The response when it succeeded.
    pub async fn kiln_put_streamed(
        &self,
        path: &str,
        body: reqwest::Body,
        sha256: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let what = format!("PUT {}", path.split('?').next().unwrap_or(path));
        let url = format!("{}{path}", self.endpoint);
        let url = reqwest::Url::parse(&url).with_context(|| format!("bad request URL {url}"))?;
        let mut req = reqwest::Request::new(Method::PUT, url);
        req.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.signer
            .sign_streamed(&mut req, sha256, SystemTime::now())?;
        *req.body_mut() = Some(body);
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(failure(resp, what, None, self).await.into());
        }
        Ok(resp)
    }

    /// A request to kilnd's embedded S3 store at `path` (`/bucket[/key]`), signed with the
    /// same key for the `s3` service; the answer whatever its status.
    pub async fn s3(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.endpoint);
        let url = reqwest::Url::parse(&url).with_context(|| format!("bad S3 URL {url}"))?;
        let mut req = reqwest::Request::new(method, url);
        if let Some(body) = body {
            *req.body_mut() = Some(body.into());
        }
        self.signer.for_s3().sign(&mut req, SystemTime::now())?;
        self.send(req).await
    }

    /// [`Kilnd::kiln`], the answer read as JSON (`Null` when empty).
    pub async fn kiln_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.kiln(method, path, body).await?;
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading kilnd's answer to {path}"))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("kilnd's answer to {path} is not JSON"))
    }
}

#[cfg(test)]
mod tests {
    //! Signatures compared with botocore's for the same requests, at 2025-09-09T12:00:00Z
    //! with `AKIDEXAMPLE` / `wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY` in region `local`.
    //! The expected values were printed by botocore 1.44.8: a `lambda-microvms` client
    //! with `get_current_datetime` patched, capturing the request in `before-send`
    //! (untag, list), and `SigV4Auth(creds, "lambda", "local").add_auth` on an
    //! `AWSRequest` carrying kiln's exact body (run).

    use super::*;
    use kiln_sigv4::Credentials;

    fn kilnd() -> Kilnd {
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            source: "test".into(),
        };
        Kilnd::new("http://127.0.0.1:7171", RequestSigner::new(creds, "local")).expect("client")
    }

    fn at() -> SystemTime {
        // 2025-09-09T12:00:00Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_757_419_200)
    }

    fn header(req: &reqwest::Request, name: &str) -> String {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn sign_when_untag_with_arn_label_then_matches_botocore() {
        let call = Call::new(Operation::UntagResource)
            .label(
                "Resource",
                "arn:aws:lambda:local:000000000000:microvm-image:web",
            )
            .query("tagKeys", "b key")
            .query("tagKeys", "a");

        let req = kilnd().request(&call, at()).expect("signed");

        assert_eq!(
            req.url().as_str(),
            "http://127.0.0.1:7171/2017-03-31/tags/arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aweb?tagKeys=b%20key&tagKeys=a"
        );
        assert_eq!(header(&req, "x-amz-date"), "20250909T120000Z");
        assert_eq!(
            header(&req, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250909/local/lambda/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=772412ae3386bb293a3fd669e518a95a47063dfe53d6899e0abdc86b6af69e09"
        );
    }

    #[test]
    fn sign_when_list_with_query_then_matches_botocore() {
        let call = Call::new(Operation::ListMicrovms)
            .query("imageIdentifier", "web")
            .query("maxResults", "5");

        let req = kilnd().request(&call, at()).expect("signed");

        assert_eq!(
            header(&req, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250909/local/lambda/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=b45138385db0b526d7a5ddd54376a8eb8402f95d60febbc9626d00ddb20c4238"
        );
    }

    #[test]
    fn sign_when_post_with_json_body_then_content_type_signed_as_botocore() {
        let call = Call::new(Operation::RunMicrovm)
            // A BTreeMap: serde_json's Map keeps insertion order when a crate elsewhere in the
            // workspace turns on `preserve_order`, and the body must be the same bytes.
            .json(&std::collections::BTreeMap::from([
                ("imageIdentifier", "web"),
                ("clientToken", "tok-1"),
            ]))
            .expect("body");

        let req = kilnd().request(&call, at()).expect("signed");

        assert_eq!(
            req.body().and_then(|b| b.as_bytes()),
            Some(&br#"{"clientToken":"tok-1","imageIdentifier":"web"}"#[..])
        );
        assert_eq!(header(&req, "content-type"), "application/json");
        assert_eq!(
            header(&req, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250909/local/lambda/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=42b36e98e16b78625b0f4d4a145e865936caf6f2a07ac6bc88738273458f2b04"
        );
    }

    #[test]
    fn sign_when_post_without_body_members_then_no_body_and_host_date_signed() {
        let call = Call::new(Operation::SuspendMicrovm).label("microvmIdentifier", "mvm-1");

        let req = kilnd().request(&call, at()).expect("signed");

        assert!(req.body().is_none());
        assert_eq!(
            header(&req, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250909/local/lambda/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=597f5c03f781f2cdecf7cf3245b210d26a145b93f0f7440c7a8f8a17116b6831"
        );
    }

    #[test]
    fn hint_when_microvm_not_found_then_points_at_kiln_ls() {
        let f = ApiFailure {
            call: "GetMicrovm".into(),
            command: Some("get-microvm".into()),
            status: 404,
            error_type: "ResourceNotFoundException".into(),
            message: "Microvm mvm-x not found".into(),
            resource_type: Some("Microvm".into()),
            signed_with: "test".into(),
            endpoint: "http://127.0.0.1:7171".into(),
        };

        assert!(f.hint().contains("kiln ls"), "{}", f.hint());
    }
}
