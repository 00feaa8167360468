//! AWS Signature Version 4, server side: reads the signature of a request (the
//! `Authorization` header, or a presigned URL's query), rebuilds the canonical request the
//! way the AWS SDKs build it for a rest-json service, and checks the signature against the
//! access key's secret in constant time.
//!
//! The canonical URI is the request path as sent (already percent-encoded by the client),
//! with dot segments and empty segments removed, then percent-encoded once more: botocore,
//! the Go and Rust SDKs all double-encode for every service but S3, so an image ARN in a
//! path (`arn%3Aaws%3A…`) is signed as `arn%253Aaws%253A…`.

use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use kiln_api::ApiError;
use ring::{digest, hmac};

/// The only algorithm kiln accepts (SigV4a's ECDSA is not offered).
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// How far a request's date may be from kilnd's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// The longest a presigned URL may stay valid (AWS: 7 days).
pub const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

/// The payload hash a client sends when it does not sign the body.
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// What an unknown or revoked access key and a wrong signature both answer.
const UNRECOGNIZED: &str = "The security token included in the request is invalid: the access \
     key is unknown to this kiln or revoked, or the request was not signed with its secret \
     (check the credentials file; `kiln keys list` shows the keys)";

/// Why a request's signature is not accepted. Each message is what AWS says in the same
/// case, so the AWS CLI prints a familiar error; [`ApiError::from`] gives the error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// Neither an `Authorization` header nor a presigned query.
    #[error("Missing Authentication Token: sign requests with SigV4 (the AWS CLI and SDKs do; use the access key in <kiln home>/credentials)")]
    Missing,
    /// A part of the signature is missing or malformed.
    #[error("{0}")]
    Incomplete(String),
    /// The access key id is not one kilnd knows (or it was revoked).
    #[error("{UNRECOGNIZED}")]
    UnknownKey,
    /// The signature does not match the request.
    #[error("{UNRECOGNIZED}")]
    Mismatch,
    /// The request says something that contradicts its own signature.
    #[error("{0}")]
    Invalid(String),
    /// The request is dated too far in the past (or a presigned URL expired).
    #[error("Signature expired: {signed} is now earlier than {earliest} ({now} - {window}.)")]
    Expired {
        /// The request's date.
        signed: String,
        /// The earliest date accepted now.
        earliest: String,
        /// kilnd's clock.
        now: String,
        /// The window, e.g. `15 min`.
        window: String,
    },
    /// The request is dated too far in the future.
    #[error("Signature not yet current: {signed} is still later than {latest} ({now} + 15 min.)")]
    NotYetCurrent {
        /// The request's date.
        signed: String,
        /// The latest date accepted now.
        latest: String,
        /// kilnd's clock.
        now: String,
    },
}

impl From<SigV4Error> for ApiError {
    fn from(e: SigV4Error) -> ApiError {
        let message = e.to_string();
        match e {
            SigV4Error::Missing => ApiError::MissingAuthenticationToken { message },
            SigV4Error::Incomplete(_) => ApiError::IncompleteSignature { message },
            // One answer for both, so a caller cannot learn which access key ids exist.
            SigV4Error::UnknownKey | SigV4Error::Mismatch => {
                ApiError::UnrecognizedClient { message }
            }
            SigV4Error::Invalid(_)
            | SigV4Error::Expired { .. }
            | SigV4Error::NotYetCurrent { .. } => ApiError::InvalidSignature { message },
        }
    }
}

/// The parts of an HTTP request a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The path as sent, still percent-encoded.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The whole body.
    pub body: &'a [u8],
}

/// The credential scope: `AKID/YYYYMMDD/region/service/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The access key id.
    pub access_key_id: String,
    /// `YYYYMMDD`.
    pub date: String,
    /// The region the client signed for (kiln accepts any).
    pub region: String,
    /// The service the client signed for (`lambda` for lambda-microvms; kiln accepts any).
    pub service: String,
}

impl Scope {
    fn parse(credential: &str) -> Result<Scope, SigV4Error> {
        let parts: Vec<&str> = credential.split('/').collect();
        let [key, date, region, service, terminator] = parts[..] else {
            return Err(SigV4Error::Incomplete(format!(
                "Credential must have the form <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request, not '{credential}'"
            )));
        };
        if terminator != "aws4_request" {
            return Err(SigV4Error::Incomplete(format!(
                "Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'"
            )));
        }
        if key.is_empty() || region.is_empty() || service.is_empty() {
            return Err(SigV4Error::Incomplete(format!(
                "Credential has an empty part: '{credential}'"
            )));
        }
        Ok(Scope {
            access_key_id: key.to_string(),
            date: date.to_string(),
            region: region.to_string(),
            service: service.to_string(),
        })
    }

    fn text(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Where the signature travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    /// The `Authorization` header.
    Header,
    /// A presigned URL's query, valid for this long after its date.
    Query(Duration),
}

/// A request's signature, read but not yet checked.
#[derive(Debug, Clone)]
pub struct Signature {
    /// Whose key signed it, and for what region and service.
    pub scope: Scope,
    signed_headers: Vec<String>,
    /// The signature bytes (decoded from hex).
    signature: Vec<u8>,
    /// `YYYYMMDDTHHMMSSZ`.
    amz_date: String,
    location: Location,
}

impl Signature {
    /// Reads the signature of `req`: its `Authorization` header, else its presigned query.
    pub fn read(req: &SignedRequest<'_>) -> Result<Signature, SigV4Error> {
        if let Some(value) = req.headers.get("authorization") {
            let value = value.to_str().map_err(|_| {
                SigV4Error::Incomplete("the Authorization header is not ASCII".into())
            })?;
            return Signature::from_header(value, req.headers);
        }
        let query = req.query.unwrap_or_default();
        if query_pairs(query).any(|(k, _)| k == "X-Amz-Algorithm") {
            return Signature::from_query(query);
        }
        Err(SigV4Error::Missing)
    }

    fn from_header(value: &str, headers: &HeaderMap) -> Result<Signature, SigV4Error> {
        let (algorithm, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        check_algorithm(algorithm)?;
        let (mut credential, mut signed_headers, mut signature) = (None, None, None);
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(SigV4Error::Incomplete(format!(
                    "'{part}' not a valid key=value pair (missing equal-sign) in Authorization header"
                )));
            };
            match k.trim() {
                "Credential" => credential = Some(v.trim()),
                "SignedHeaders" => signed_headers = Some(v.trim()),
                "Signature" => signature = Some(v.trim()),
                _ => {}
            }
        }
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let mut missing = Vec::new();
        if credential.is_none() {
            missing.push("Authorization header requires 'Credential' parameter.");
        }
        if signature.is_none() {
            missing.push("Authorization header requires 'Signature' parameter.");
        }
        if signed_headers.is_none() {
            missing.push("Authorization header requires 'SignedHeaders' parameter.");
        }
        if amz_date.is_none() {
            missing.push("kiln requires an 'X-Amz-Date' header (the 'Date' header is not read).");
        }
        match (credential, signed_headers, signature, amz_date) {
            (Some(c), Some(h), Some(s), Some(d)) => Signature::new(c, h, s, d, Location::Header),
            _ => Err(SigV4Error::Incomplete(missing.join(" "))),
        }
    }

    fn from_query(query: &str) -> Result<Signature, SigV4Error> {
        let get = |name: &str| query_pairs(query).find(|(k, _)| k == name).map(|(_, v)| v);
        let required = [
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
            "X-Amz-Date",
            "X-Amz-Expires",
        ];
        let missing: Vec<String> = required
            .iter()
            .filter(|p| get(p).is_none())
            .map(|p| format!("AWS query-string parameters must include '{p}'."))
            .collect();
        if !missing.is_empty() {
            return Err(SigV4Error::Incomplete(missing.join(" ")));
        }
        let value = |name: &str| get(name).unwrap_or_default();
        check_algorithm(&value("X-Amz-Algorithm"))?;
        let expires = value("X-Amz-Expires")
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
            .filter(|d| !d.is_zero() && *d <= MAX_PRESIGN)
            .ok_or_else(|| {
                SigV4Error::Incomplete(format!(
                    "X-Amz-Expires must be a number of seconds from 1 to {}",
                    MAX_PRESIGN.as_secs()
                ))
            })?;
        Signature::new(
            &value("X-Amz-Credential"),
            &value("X-Amz-SignedHeaders"),
            &value("X-Amz-Signature"),
            &value("X-Amz-Date"),
            Location::Query(expires),
        )
    }

    fn new(
        credential: &str,
        signed_headers: &str,
        signature: &str,
        amz_date: &str,
        location: Location,
    ) -> Result<Signature, SigV4Error> {
        let scope = Scope::parse(credential)?;
        let signed_headers: Vec<String> = signed_headers
            .split(';')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if !signed_headers.iter().any(|h| h == "host") {
            return Err(SigV4Error::Incomplete(
                "'Host' must be a 'SignedHeader' in the AWS Authorization.".into(),
            ));
        }
        let signature = decode_hex(signature).ok_or_else(|| {
            SigV4Error::Incomplete(format!(
                "Signature must be 64 hexadecimal characters, not '{signature}'"
            ))
        })?;
        Ok(Signature {
            scope,
            signed_headers,
            signature,
            amz_date: amz_date.to_string(),
            location,
        })
    }

    /// Checks the signature with the access key's `secret`, with kilnd's clock at `now`.
    pub fn verify(
        &self,
        req: &SignedRequest<'_>,
        secret: &str,
        now: SystemTime,
    ) -> Result<(), SigV4Error> {
        let signed_at = parse_amz_date(&self.amz_date).ok_or_else(|| {
            SigV4Error::Incomplete(format!(
                "X-Amz-Date must have the form YYYYMMDD'T'HHMMSS'Z', not '{}'",
                self.amz_date
            ))
        })?;
        if !self.amz_date.starts_with(&self.scope.date) {
            return Err(SigV4Error::Invalid(format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{}'.",
                self.scope.date,
                &self.amz_date[..8],
                self.amz_date
            )));
        }
        self.check_time(signed_at, now)?;
        let payload = self.payload_hash(req)?;
        self.verify_payload(req, secret, &payload)
    }

    /// Checks the signature of a request whose body is streamed to where it goes rather than
    /// read first: the signature covers the body's SHA-256 as `x-amz-content-sha256` claims it,
    /// which is returned so the receiver compares it with what arrived before keeping anything.
    pub fn verify_streamed(
        &self,
        req: &SignedRequest<'_>,
        secret: &str,
        now: SystemTime,
    ) -> Result<String, SigV4Error> {
        let signed_at = parse_amz_date(&self.amz_date).ok_or_else(|| {
            SigV4Error::Incomplete(format!(
                "X-Amz-Date must have the form YYYYMMDD'T'HHMMSS'Z', not '{}'",
                self.amz_date
            ))
        })?;
        if !self.amz_date.starts_with(&self.scope.date) {
            return Err(SigV4Error::Invalid(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP".into(),
            ));
        }
        self.check_time(signed_at, now)?;
        let claimed = req
            .headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| v.len() == 64 && decode_hex(v).is_some())
            .ok_or_else(|| {
                SigV4Error::Incomplete(
                    "a streamed upload must carry the body's hex SHA-256 in x-amz-content-sha256 \
                     (signed); `kiln cp` sends it"
                        .into(),
                )
            })?;
        if !self
            .signed_headers
            .iter()
            .any(|h| h == "x-amz-content-sha256")
        {
            return Err(SigV4Error::Incomplete(
                "x-amz-content-sha256 must be among the signed headers of a streamed upload".into(),
            ));
        }
        self.verify_payload(req, secret, &claimed)?;
        Ok(claimed)
    }

    fn verify_payload(
        &self,
        req: &SignedRequest<'_>,
        secret: &str,
        payload: &str,
    ) -> Result<(), SigV4Error> {
        let canonical = self.canonical_request(req, payload);
        let string_to_sign = format!(
            "{ALGORITHM}\n{}\n{}\n{}",
            self.amz_date,
            self.scope.text(),
            hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
        );
        let key = signing_key(secret, &self.scope);
        // ring compares the tags in constant time.
        hmac::verify(&key, string_to_sign.as_bytes(), &self.signature)
            .map_err(|_| SigV4Error::Mismatch)
    }

    fn check_time(&self, signed_at: SystemTime, now: SystemTime) -> Result<(), SigV4Error> {
        let (window, text) = match self.location {
            Location::Header => (MAX_SKEW, "15 min".to_string()),
            Location::Query(expires) => (expires, format!("{} sec", expires.as_secs())),
        };
        if signed_at + window < now {
            return Err(SigV4Error::Expired {
                signed: self.amz_date.clone(),
                earliest: format_amz_date(now - window),
                now: format_amz_date(now),
                window: text,
            });
        }
        if signed_at > now + MAX_SKEW {
            return Err(SigV4Error::NotYetCurrent {
                signed: self.amz_date.clone(),
                latest: format_amz_date(now + MAX_SKEW),
                now: format_amz_date(now),
            });
        }
        Ok(())
    }

    /// The hashed payload: `x-amz-content-sha256` when sent (and true of the body), else
    /// the body's SHA-256 (a presigned URL signs no body).
    /// An unsigned payload only on GET and HEAD: a request that changes something has its
    /// body signed, so a captured or presigned request cannot carry another body.
    fn payload_hash(&self, req: &SignedRequest<'_>) -> Result<String, SigV4Error> {
        let body_hash = || hex(digest::digest(&digest::SHA256, req.body).as_ref());
        let unsigned = || {
            if matches!(req.method, "GET" | "HEAD") {
                Ok(UNSIGNED_PAYLOAD.to_string())
            } else {
                Err(SigV4Error::Invalid(format!(
                    "{} with an unsigned payload (UNSIGNED-PAYLOAD or a presigned URL): kiln \
                     accepts unsigned payloads only on GET and HEAD; sign the body (the AWS CLI \
                     and SDKs do)",
                    req.method
                )))
            }
        };
        let Some(claimed) = req.headers.get("x-amz-content-sha256") else {
            return match self.location {
                Location::Header => Ok(body_hash()),
                Location::Query(_) => unsigned(),
            };
        };
        let claimed = claimed.to_str().unwrap_or_default().trim();
        if claimed == UNSIGNED_PAYLOAD {
            return unsigned();
        }
        match decode_hex(claimed) {
            Some(_) if claimed.eq_ignore_ascii_case(&body_hash()) => Ok(claimed.to_string()),
            Some(_) => Err(SigV4Error::Invalid(
                "The provided 'x-amz-content-sha256' header does not match what was computed."
                    .into(),
            )),
            None => Err(SigV4Error::Incomplete(format!(
                "x-amz-content-sha256 must be the body's hex SHA-256 or UNSIGNED-PAYLOAD, not '{claimed}' (kiln takes no streaming signatures)"
            ))),
        }
    }

    fn canonical_request(&self, req: &SignedRequest<'_>, payload: &str) -> String {
        let mut headers = String::new();
        for name in &self.signed_headers {
            let values: Vec<String> = req
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| trim_all(&String::from_utf8_lossy(v.as_bytes())))
                .collect();
            headers.push_str(name);
            headers.push(':');
            headers.push_str(&values.join(","));
            headers.push('\n');
        }
        let skip_signature = matches!(self.location, Location::Query(_));
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            req.method,
            canonical_uri(req.path),
            canonical_query(req.query.unwrap_or_default(), skip_signature),
            headers,
            self.signed_headers.join(";"),
            payload
        )
    }
}

fn check_algorithm(algorithm: &str) -> Result<(), SigV4Error> {
    if algorithm == ALGORITHM {
        Ok(())
    } else {
        Err(SigV4Error::Incomplete(format!(
            "Unsupported AWS 'algorithm': '{algorithm}': kiln accepts {ALGORITHM} (SigV4) signatures only"
        )))
    }
}

/// The SigV4 signing key: the secret HMAC-chained through date, region, service.
fn signing_key(secret: &str, scope: &Scope) -> hmac::Key {
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = step(format!("AWS4{secret}").as_bytes(), &scope.date);
    let k_region = step(k_date.as_ref(), &scope.region);
    let k_service = step(k_region.as_ref(), &scope.service);
    let k_signing = step(k_service.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

/// Removes `.`, `..` and empty segments, then percent-encodes the (already encoded) path
/// once more, leaving `/` alone.
pub fn canonical_uri(raw_path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in raw_path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::from("/");
    out.push_str(
        &segments
            .iter()
            .map(|s| encode(s.as_bytes()))
            .collect::<Vec<_>>()
            .join("/"),
    );
    let trailing = ["/", "/.", "/.."].iter().any(|end| raw_path.ends_with(end));
    if trailing && !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// Every pair decoded (`+` as a space, as the SDKs' URL parsers read it), re-encoded the
/// SigV4 way, sorted by key then value; a presigned URL's own signature left out.
pub fn canonical_query(raw: &str, skip_signature: bool) -> String {
    let mut pairs: Vec<(String, String)> = query_pairs(raw)
        .filter(|(k, _)| !(skip_signature && k == "X-Amz-Signature"))
        .map(|(k, v)| (encode(k.as_bytes()), encode(v.as_bytes())))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decoded `(key, value)` pairs of a raw query; a malformed escape stays as written.
fn query_pairs(raw: &str) -> impl Iterator<Item = (String, String)> + '_ {
    raw.split('&').filter(|p| !p.is_empty()).map(|part| {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        (query_decode(k), query_decode(v))
    })
}

fn query_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    kiln_api::uri::percent_decode(&spaced).unwrap_or(spaced)
}

/// SigV4's URI encoding: every byte but the RFC 3986 unreserved ones as `%XX`.
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Trims spaces at both ends and folds runs of spaces into one.
fn trim_all(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex characters → 32 bytes.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// `YYYYMMDD'T'HHMMSS'Z'` → a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    if s.len() != 16 || !s.is_ascii() || &s[8..9] != "T" || &s[15..] != "Z" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let month = time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(num(0..4)? as i32, month, u8::try_from(num(6..8)?).ok()?)
            .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(num(9..11)?).ok()?,
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(13..15)?).ok()?,
    )
    .ok()?;
    let secs = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp();
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A time as `YYYYMMDD'T'HHMMSS'Z'`.
pub fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{
        sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    };
    use aws_sigv4::sign::v4;
    use axum::http::{HeaderName, HeaderValue};

    const KEY: &str = "AKIAKILNTEST0000TEST";
    const SECRET: &str = "kiln/secret+for/the/unit+tests/0123456789";
    const HOST: &str = "127.0.0.1:7171";

    /// A request as kilnd receives it.
    struct Sent {
        method: &'static str,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Sent {
        fn as_signed(&self) -> SignedRequest<'_> {
            SignedRequest {
                method: self.method,
                path: &self.path,
                query: self.query.as_deref(),
                headers: &self.headers,
                body: &self.body,
            }
        }

        fn verify(&self, secret: &str, now: SystemTime) -> Result<(), SigV4Error> {
            let req = self.as_signed();
            Signature::read(&req)?.verify(&req, secret, now)
        }
    }

    /// Signs with AWS's own signer (aws-sigv4), as the Rust SDK would, at `at`.
    fn signed_by_aws(
        method: &'static str,
        path_and_query: &str,
        headers: &[(&'static str, &'static str)],
        body: &[u8],
        at: SystemTime,
        presign: Option<Duration>,
    ) -> Sent {
        let identity = Credentials::new(KEY, SECRET, None, None, "unit-test").into();
        let mut settings = SigningSettings::default();
        if let Some(expires) = presign {
            settings.signature_location = SignatureLocation::QueryParams;
            settings.expires_in = Some(expires);
        }
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("local")
            .name("lambda")
            .time(at)
            .settings(settings)
            .build()
            .expect("signing params")
            .into();
        let mut all: Vec<(&str, &str)> = vec![("host", HOST)];
        all.extend_from_slice(headers);
        let signable_body = match presign {
            Some(_) => SignableBody::UnsignedPayload,
            None => SignableBody::Bytes(body),
        };
        let url = format!("http://{HOST}{path_and_query}");
        let signable = SignableRequest::new(method, url, all.iter().copied(), signable_body)
            .expect("signable");
        let (instructions, _) = sign(signable, &params)
            .expect("aws-sigv4 signs")
            .into_parts();
        let mut map = HeaderMap::new();
        for (name, value) in all
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .chain(
                instructions
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.to_string())),
            )
        {
            map.append(
                HeaderName::try_from(name).expect("header name"),
                HeaderValue::try_from(value).expect("header value"),
            );
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.to_string(), None),
        };
        let extra: Vec<String> = instructions
            .params()
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k.as_bytes()), encode(v.as_bytes())))
            .collect();
        let query = match (query, extra.is_empty()) {
            (q, true) => q,
            (None, false) => Some(extra.join("&")),
            (Some(q), false) => Some(format!("{q}&{}", extra.join("&"))),
        };
        Sent {
            method,
            path,
            query,
            headers: map,
            body: body.to_vec(),
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
    }

    fn create_image() -> Sent {
        signed_by_aws(
            "POST",
            "/2025-09-09/microvm-images/arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aapp/versions",
            &[("content-type", "application/json"), ("x-amz-user-agent", "kiln  unit   test")],
            br#"{"name": "app"}"#,
            now(),
            None,
        )
    }

    #[test]
    fn verify_when_aws_signer_signed_a_post_with_an_arn_in_the_path_then_accepted() {
        let sent = create_image();

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn verify_when_query_has_escapes_and_is_unsorted_then_accepted() {
        let sent = signed_by_aws(
            "GET",
            "/2025-09-09/microvms?maxResults=5&imageIdentifier=arn%3Aaws%3Alambda%3Alocal%3A000000000000%3Amicrovm-image%3Aa%20b&a=",
            &[],
            b"",
            now(),
            None,
        );

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn verify_when_secret_is_wrong_then_mismatch() {
        let sent = create_image();

        let result = sent.verify("not-the-secret", now());

        assert_eq!(result, Err(SigV4Error::Mismatch));
    }

    #[test]
    fn verify_when_body_changed_then_mismatch() {
        let mut sent = create_image();
        sent.body = br#"{"name": "evil"}"#.to_vec();

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Err(SigV4Error::Mismatch));
    }

    #[test]
    fn verify_when_signed_header_changed_then_mismatch() {
        let mut sent = create_image();
        sent.headers
            .insert("content-type", HeaderValue::from_static("text/plain"));

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Err(SigV4Error::Mismatch));
    }

    #[test]
    fn verify_when_path_changed_then_mismatch() {
        let mut sent = create_image();
        sent.path = sent.path.replace("image%3Aapp", "image%3Aother");

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Err(SigV4Error::Mismatch));
    }

    #[test]
    fn verify_when_query_changed_then_mismatch() {
        let mut sent = signed_by_aws(
            "GET",
            "/2025-09-09/microvms?maxResults=5",
            &[],
            b"",
            now(),
            None,
        );
        sent.query = Some("maxResults=50".into());

        let result = sent.verify(SECRET, now());

        assert_eq!(result, Err(SigV4Error::Mismatch));
    }

    #[test]
    fn verify_when_content_sha256_header_lies_about_the_body_then_refused() {
        let mut sent = create_image();
        sent.headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_static(
                "0000000000000000000000000000000000000000000000000000000000000000",
            ),
        );

        let result = sent.verify(SECRET, now()).map_err(ApiError::from);

        assert_eq!(
            result.map_err(|e| e.error_type()),
            Err("InvalidSignatureException")
        );
    }

    /// A streamed upload as `kiln cp` sends it: the body's hash in the signed
    /// `x-amz-content-sha256`, the body itself not yet read by kilnd.
    fn streamed_upload(body: &[u8]) -> (Sent, String) {
        let hash = hex(digest::digest(&digest::SHA256, body).as_ref());
        let leaked: &'static str = Box::leak(hash.clone().into_boxed_str());
        let mut sent = signed_by_aws(
            "PUT",
            "/kiln/v1/microvms/mvm-1/files?path=%2Fsrv%2Ff",
            &[("x-amz-content-sha256", leaked)],
            body,
            now(),
            None,
        );
        sent.body = Vec::new();
        (sent, hash)
    }

    #[test]
    fn verify_streamed_when_the_hash_header_is_signed_then_accepted_and_the_hash_returned() {
        let (sent, hash) = streamed_upload(b"file content");
        let req = sent.as_signed();

        let claimed = Signature::read(&req)
            .and_then(|s| s.verify_streamed(&req, SECRET, now()))
            .expect("accepted");

        assert_eq!(claimed, hash);
    }

    #[test]
    fn verify_streamed_when_the_hash_header_is_swapped_then_mismatch() {
        let (mut sent, _) = streamed_upload(b"file content");
        let other = hex(digest::digest(&digest::SHA256, b"another body").as_ref());
        sent.headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_str(&other).expect("value"),
        );
        let req = sent.as_signed();

        let result = Signature::read(&req).and_then(|s| s.verify_streamed(&req, SECRET, now()));

        assert!(matches!(result, Err(SigV4Error::Mismatch)), "{result:?}");
    }

    #[test]
    fn verify_streamed_when_the_hash_header_was_added_after_signing_then_refused() {
        let mut sent = signed_by_aws(
            "PUT",
            "/kiln/v1/microvms/mvm-1/files?path=%2Fsrv%2Ff",
            &[],
            b"",
            now(),
            None,
        );
        let forged = hex(digest::digest(&digest::SHA256, b"forged").as_ref());
        sent.headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_str(&forged).expect("value"),
        );
        let req = sent.as_signed();

        let result = Signature::read(&req).and_then(|s| s.verify_streamed(&req, SECRET, now()));

        assert!(
            matches!(result, Err(SigV4Error::Incomplete(_))),
            "{result:?}"
        );
    }

    #[test]
    fn verify_when_a_post_is_presigned_with_an_unsigned_payload_then_refused() {
        let sent = signed_by_aws(
            "POST",
            "/2025-09-09/microvms",
            &[("content-type", "application/json")],
            br#"{"imageIdentifier": "app"}"#,
            now(),
            Some(Duration::from_secs(300)),
        );

        let result = sent.verify(SECRET, now());

        assert!(
            matches!(&result, Err(SigV4Error::Invalid(m)) if m.starts_with("POST with an unsigned payload")),
            "{result:?}"
        );
    }

    #[test]
    fn verify_when_dated_20_minutes_ago_then_expired_says_both_times() {
        let sent = signed_by_aws(
            "GET",
            "/2025-09-09/microvm-images",
            &[],
            b"",
            now() - Duration::from_secs(20 * 60),
            None,
        );

        let err = sent.verify(SECRET, now()).expect_err("too old");

        assert_eq!(
            err.to_string(),
            "Signature expired: 20260528T200640Z is now earlier than 20260528T201140Z (20260528T202640Z - 15 min.)"
        );
        assert_eq!(
            ApiError::from(err).error_type(),
            "InvalidSignatureException"
        );
    }

    #[test]
    fn verify_when_dated_20_minutes_ahead_then_not_yet_current() {
        let sent = signed_by_aws(
            "GET",
            "/2025-09-09/microvm-images",
            &[],
            b"",
            now() + Duration::from_secs(20 * 60),
            None,
        );

        let err = sent.verify(SECRET, now()).expect_err("too new");

        assert!(matches!(err, SigV4Error::NotYetCurrent { .. }), "{err}");
    }

    #[test]
    fn verify_when_presigned_url_is_fresh_then_accepted_and_after_expiry_refused() {
        let sent = signed_by_aws(
            "GET",
            "/kiln/v1/images/app/versions/1/build-log?follow=true",
            &[],
            b"",
            now(),
            Some(Duration::from_secs(300)),
        );

        let fresh = sent.verify(SECRET, now() + Duration::from_secs(60));
        let late = sent.verify(SECRET, now() + Duration::from_secs(301));

        assert_eq!(fresh, Ok(()));
        assert!(matches!(late, Err(SigV4Error::Expired { .. })), "{late:?}");
    }

    #[test]
    fn read_when_no_signature_then_missing_authentication_token() {
        let headers = HeaderMap::new();
        let req = SignedRequest {
            method: "GET",
            path: "/2025-09-09/microvm-images",
            query: None,
            headers: &headers,
            body: b"",
        };

        let err = ApiError::from(Signature::read(&req).expect_err("unsigned"));

        assert_eq!(
            (err.error_type(), err.status()),
            ("MissingAuthenticationTokenException", 403)
        );
    }

    #[test]
    fn read_when_header_lacks_parts_then_incomplete_signature_names_them() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIAX/20260101/local/lambda/aws4_request",
            ),
        );
        let req = SignedRequest {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            body: b"",
        };

        let err = ApiError::from(Signature::read(&req).expect_err("incomplete"));

        assert_eq!(
            (err.error_type(), err.status()),
            ("IncompleteSignatureException", 400)
        );
        assert!(err.message().contains("'Signature'"), "{}", err.message());
        assert!(
            err.message().contains("'SignedHeaders'"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("X-Amz-Date"), "{}", err.message());
    }

    /// AWS's published SigV4 test suite, case `get-vanilla`.
    #[test]
    fn verify_when_aws_test_suite_get_vanilla_then_accepted() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.amazonaws.com"));
        headers.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
        headers.insert(
            "authorization",
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        );
        let req = SignedRequest {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            body: b"",
        };
        let at = parse_amz_date("20150830T123600Z").expect("date");

        let result = Signature::read(&req)
            .and_then(|s| s.verify(&req, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", at));

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn canonical_uri_when_path_has_escapes_and_dots_then_double_encoded_and_normalized() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a%3Ab/c d"), "/a%253Ab/c%20d");
        assert_eq!(canonical_uri("/a/./b/../c//d/"), "/a/c/d/");
    }

    #[test]
    fn amz_date_when_formatted_then_parses_back() {
        let text = format_amz_date(now());

        assert_eq!(parse_amz_date(&text), Some(now()));
        assert_eq!(parse_amz_date("20261301T000000Z"), None);
    }
}
