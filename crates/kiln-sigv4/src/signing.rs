//! SigV4 signatures on requests to kilnd (service `lambda`) and to S3-compatible stores,
//! made by `aws-sigv4` as AWS's SDKs make them.

use std::time::SystemTime;

use anyhow::Context;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use reqwest::header::{HeaderName, HeaderValue};

use crate::credentials::Credentials;

/// The service name in the credential scope: the model's `signingName`. botocore signs
/// `lambda-microvms` calls as `lambda` (endpointPrefix and signingName are both
/// `lambda`), so kiln does too and kilnd sees one scope from every client.
pub const SIGNING_NAME: &str = "lambda";

/// Signs requests with one access key for one region and service.
#[derive(Debug, Clone)]
pub struct RequestSigner {
    credentials: Credentials,
    region: String,
    service: &'static str,
}

impl RequestSigner {
    /// A signer of kilnd API requests for `region` (the credential scope's region).
    pub fn new(credentials: Credentials, region: impl Into<String>) -> Self {
        RequestSigner {
            credentials,
            region: region.into(),
            service: SIGNING_NAME,
        }
    }

    /// A signer of S3 requests for `region`: S3 signs the path as sent (no double
    /// encoding, no normalization) and carries the payload hash in `x-amz-content-sha256`.
    pub fn s3(credentials: Credentials, region: impl Into<String>) -> Self {
        RequestSigner {
            credentials,
            region: region.into(),
            service: "s3",
        }
    }

    /// A signer of S3 requests with the same key and region.
    pub fn for_s3(&self) -> Self {
        RequestSigner::s3(self.credentials.clone(), self.region.clone())
    }

    fn settings(&self) -> SigningSettings {
        let mut settings = SigningSettings::default();
        if self.service == "s3" {
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        }
        settings
    }

    /// The credentials it signs with.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Adds `x-amz-date`, `authorization` (and `x-amz-security-token`) to `req`, signed at
    /// `at` over its method, URL, headers present now and body. Every header present is
    /// signed, so callers set only `content-type` (when there is a body) before signing:
    /// with `host` and `x-amz-date` that is what botocore signs.
    pub fn sign(&self, req: &mut reqwest::Request, at: SystemTime) -> anyhow::Result<()> {
        let body: Vec<u8> = match req.body() {
            None => Vec::new(),
            Some(b) => b
                .as_bytes()
                .context("cannot sign a streamed request body (a bug in kiln)")?
                .to_vec(),
        };
        self.sign_body(req, SignableBody::Bytes(&body), at)
    }

    /// Signs a request whose body is streamed, over the body's SHA-256 `payload_sha256`
    /// (lower-case hex), which also goes in the signed `x-amz-content-sha256` header.
    pub fn sign_streamed(
        &self,
        req: &mut reqwest::Request,
        payload_sha256: &str,
        at: SystemTime,
    ) -> anyhow::Result<()> {
        req.headers_mut().insert(
            HeaderName::from_static("x-amz-content-sha256"),
            HeaderValue::from_str(payload_sha256)
                .context("the payload hash is not a header value")?,
        );
        self.sign_body(
            req,
            SignableBody::Precomputed(payload_sha256.to_string()),
            at,
        )
    }

    fn sign_body(
        &self,
        req: &mut reqwest::Request,
        body: SignableBody<'_>,
        at: SystemTime,
    ) -> anyhow::Result<()> {
        let headers: Vec<(&str, &str)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                v.to_str()
                    .map(|v| (k.as_str(), v))
                    .with_context(|| format!("header {k} is not text and cannot be signed"))
            })
            .collect::<anyhow::Result<_>>()?;
        let signable = SignableRequest::new(
            req.method().as_str(),
            req.url().as_str(),
            headers.into_iter(),
            body,
        )
        .with_context(|| format!("cannot sign a request to {}", req.url()))?;
        let identity = aws_credential_types::Credentials::new(
            &self.credentials.access_key_id,
            &self.credentials.secret_access_key,
            self.credentials.session_token.clone(),
            None,
            "kiln",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(at)
            .settings(self.settings())
            .build()
            .context("building SigV4 parameters")?
            .into();
        let (instructions, _signature) = sign(signable, &params)
            .with_context(|| format!("signing the request to {}", req.url()))?
            .into_parts();
        for (name, value) in instructions.headers() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("SigV4 produced a bad header name {name}"))?;
            let value = HeaderValue::from_str(value)
                .with_context(|| format!("SigV4 produced a bad value for {name}"))?;
            req.headers_mut().insert(name, value);
        }
        Ok(())
    }
}
