//! The HTTP API: the AWS `lambda-microvms` operations (rest-json) and kiln's own `/kiln/v1`.
//! Every request but the health check and `/metrics` must carry a SigV4 signature by a kiln
//! access key.

pub mod wire;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path as UrlPath, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, put};
use axum::Router;
use kiln_api::{ApiError, Operation, Request};

use crate::artifacts::s3::S3Store;
use crate::auth::keys::{AccessKeys, Caller};
use crate::auth::sigv4::SignedRequest;
use crate::images::Images;
use crate::observe::audit::AuditLog;
use crate::observe::metrics::Metrics;
use crate::supervisor::Microvms;

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct Api {
    /// The image operations.
    pub images: Arc<Images>,
    /// The MicroVM operations.
    pub microvms: Arc<Microvms>,
    /// The access keys requests are signed with.
    pub keys: Arc<AccessKeys>,
    /// The S3-compatible artifact store, served on the same address.
    pub s3: Arc<S3Store>,
    /// The Prometheus metrics `GET /metrics` serves.
    pub metrics: Arc<Metrics>,
    /// The audit log every mutating call is recorded in.
    pub audit: Arc<AuditLog>,
    /// Network connectors and the egress gateway.
    pub network: Arc<crate::supervisor::network::Network>,
    /// Per-principal quotas.
    pub quotas: Arc<crate::auth::quotas::Quotas>,
    /// Per-principal, per-operation API rates.
    pub throttle: Arc<crate::auth::throttle::Throttle>,
    /// Background commands of kiln's sandbox API.
    pub sandbox: Arc<crate::sandbox::Sandbox>,
}

/// The whole API as one router.
pub fn router(api: Api) -> Router {
    Router::new()
        .route(
            "/kiln/v1/images/{name}/versions/{version}/build-log",
            get(build_log),
        )
        .route(
            "/kiln/v1/images/{name}/versions/{version}/details",
            get(crate::images::version_details::version_details),
        )
        .route("/kiln/v1/health", get(|| async { "ok\n" }))
        .route("/kiln/v1/events", get(events))
        .route("/metrics", any(metrics))
        .route("/kiln/v1/microvms/{id}", get(microvm_details))
        .route("/kiln/v1/microvms/{id}/flows", get(microvm_flows))
        .route(
            "/kiln/v1/connectors",
            get(list_connectors).post(create_connector),
        )
        .route(
            "/kiln/v1/connectors/{name}",
            get(get_connector).delete(delete_connector),
        )
        .route(
            "/kiln/v1/images/{name}/build-secrets",
            put(put_build_secrets),
        )
        .route("/kiln/v1/keys", get(list_keys).post(create_key))
        .route("/kiln/v1/quotas", get(quotas))
        .route("/kiln/v1/usage", get(usage))
        .route("/kiln/v1/whoami", get(whoami))
        .route("/kiln/v1/keys/{id}", delete(revoke_key))
        .merge(crate::sandbox::routes())
        .fallback(entry)
        .with_state(api)
}

/// A request whose SigV4 signature checked out: who sent it, and its body (read whole,
/// since the signature covers it). As an extractor it answers any failure with the error
/// AWS sends, before the handler runs.
pub struct Signed {
    /// Who signed it.
    pub caller: Caller,
    /// The body.
    pub body: Bytes,
}

impl FromRequest<Api> for Signed {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, api: &Api) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let request = axum::extract::Request::from_parts(parts.clone(), body);
        let body = Bytes::from_request(request, api)
            .await
            .map_err(IntoResponse::into_response)?;
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
        };
        match api.keys.authenticate(&signed) {
            Ok(caller) => Ok(Signed { caller, body }),
            Err(e) => {
                tracing::info!(
                    method = %parts.method,
                    path = %parts.uri.path(),
                    error = e.error_type(),
                    message = e.message(),
                    "request not authenticated"
                );
                Err(error_response(&e))
            }
        }
    }
}

/// Renders an [`ApiError`] the way AWS's rest-json protocol does, so SDKs raise the
/// modeled exception.
pub fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, e.body().to_string()).into_response();
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(e.error_type()) {
        h.insert("x-amzn-errortype", v);
    }
    for (name, value) in e.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    // The model gives InternalServerException a Retry-After: kilnd's failures are worth one
    // more try a second later unless the error says otherwise.
    if matches!(e, ApiError::InternalServer { .. }) && !h.contains_key("retry-after") {
        h.insert("retry-after", HeaderValue::from_static("1"));
    }
    resp
}

fn json_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let text = if status == StatusCode::NO_CONTENT {
        String::new()
    } else {
        body.to_string()
    };
    let mut resp = (status, text).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

/// Everything but kiln's own routes: S3 requests (signed for the `s3` service) go to the
/// artifact store, the rest are lambda-microvms operations.
async fn entry(State(api): State<Api>, req: axum::extract::Request) -> Response {
    if S3Store::is_s3_request(req.headers(), req.uri().query()) {
        return api.s3.serve(req).await;
    }
    let (method, uri) = (req.method().clone(), req.uri().clone());
    match Signed::from_request(req, &api).await {
        Ok(signed) => aws(api, method, uri, signed).await,
        Err(refusal) => refusal,
    }
}

/// Every AWS operation: route by method and path, parse and validate, dispatch.
async fn aws(api: Api, method: Method, uri: Uri, signed: Signed) -> Response {
    let Signed { caller, body } = signed;
    let path = uri.path();
    let Some((op, labels)) = Operation::route(method.as_str(), path) else {
        let e = ApiError::not_found("operation", &format!("{method} {path}"));
        tracing::debug!(%method, %path, "no such operation");
        return error_response(&e);
    };
    let query = uri
        .query()
        .map(kiln_api::uri::parse_query)
        .unwrap_or_default();
    // Throttled before parsing, and not audited: a flood costs no work and no store writes.
    if let Err(e) = api.throttle.admit(&caller.principal, op) {
        tracing::info!(operation = op.name(), principal = %caller.principal, "throttled");
        return error_response(&e);
    }
    let result = match Request::parse(op, &labels, &query, &body) {
        Ok(request) => dispatch(&api, &caller, request).await,
        Err(e) => Err(e),
    };
    api.audit.api_call(&caller, op, &labels, &body, &result);
    match result {
        Ok(value) => {
            tracing::info!(operation = op.name(), principal = %caller.principal, "ok");
            json_response(op.success_status(), value)
        }
        Err(e) => {
            tracing::info!(
                operation = op.name(),
                principal = %caller.principal,
                error = e.error_type(),
                message = e.message(),
                "refused"
            );
            error_response(&e)
        }
    }
}

/// Sends each request to the part of kilnd that owns it.
async fn dispatch(
    api: &Api,
    caller: &Caller,
    request: Request,
) -> Result<serde_json::Value, ApiError> {
    match request {
        Request::RunMicrovm { .. }
        | Request::GetMicrovm { .. }
        | Request::ListMicrovms { .. }
        | Request::TerminateMicrovm { .. }
        | Request::SuspendMicrovm { .. }
        | Request::ResumeMicrovm { .. }
        | Request::CreateMicrovmAuthToken { .. }
        | Request::CreateMicrovmShellAuthToken { .. } => api.microvms.handle(caller, request).await,
        other => api.images.handle(caller, other).await,
    }
}

/// `GET /kiln/v1/microvms/{id}`: kiln's details of a MicroVM (kernel, forwards, traffic).
async fn microvm_details(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    signed: Signed,
) -> Response {
    match api.microvms.details(&signed.caller, &id).await {
        Ok(v) => json_response(200, v),
        Err(e) => error_response(&e),
    }
}

/// `GET /kiln/v1/microvms/{id}/flows`: the connections and lookups its guest attempted
/// through the egress gateway (newest last, at most 512).
async fn microvm_flows(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    signed: Signed,
) -> Response {
    match api.microvms.flows(&signed.caller, &id) {
        Ok(flows) => json_response(200, serde_json::json!({ "microvmId": id, "flows": flows })),
        Err(e) => error_response(&e),
    }
}

/// `GET /kiln/v1/connectors`: the operator's egress connectors (any signed caller may
/// use them, so any may list them).
async fn list_connectors(State(api): State<Api>, _signed: Signed) -> Response {
    let list: Vec<_> = api
        .network
        .connectors()
        .iter()
        .map(|c| api.network.describe(c))
        .collect();
    json_response(200, serde_json::json!({ "connectors": list }))
}

/// `GET /kiln/v1/connectors/{name}`.
async fn get_connector(
    State(api): State<Api>,
    UrlPath(name): UrlPath<String>,
    _signed: Signed,
) -> Response {
    match api.network.connectors().iter().find(|c| c.name == name) {
        Some(c) => json_response(200, api.network.describe(c)),
        None => error_response(&ApiError::not_found("NetworkConnector", &name)),
    }
}

/// Body of `PUT /kiln/v1/images/{name}/build-secrets`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSecretsBody {
    /// Secret id → value, base64 (standard alphabet).
    secrets: std::collections::BTreeMap<String, String>,
}

/// `PUT /kiln/v1/images/{name}/build-secrets` with `{"secrets": {"id": "<base64>"}}`: stages
/// secrets for the caller's next build of image `name` (`RUN --mount=type=secret,id=…`).
/// kiln-only: the AWS request shapes stay as they are. Held in kilnd's memory only, taken
/// by that build; answered 204. Values are never logged or audited (only the image is).
async fn put_build_secrets(
    State(api): State<Api>,
    UrlPath(name): UrlPath<String>,
    signed: Signed,
) -> Response {
    use base64::Engine as _;
    let staged = (|| {
        let body: BuildSecretsBody = serde_json::from_slice(&signed.body).map_err(|e| {
            ApiError::validation(format!(
                "build secrets: {e} (expected {{\"secrets\": {{\"id\": \"<base64 value>\"}}}})"
            ))
        })?;
        let mut secrets = Vec::new();
        for (id, value) in body.secrets {
            if id.is_empty() || id.len() > 128 {
                return Err(ApiError::validation(
                    "build secrets: an id must have 1 to 128 characters",
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_bytes())
                .map_err(|_| {
                    ApiError::validation(format!("build secret {id:?}: the value is not base64"))
                })?;
            if bytes.len() > 512 * 1024 {
                return Err(ApiError::validation(format!(
                    "build secret {id:?}: larger than 512 KiB"
                )));
            }
            secrets.push((id, bytes));
        }
        api.images.builds.secrets.put(
            &signed.caller.principal,
            &name,
            kiln_image::build::BuildSecrets::new(secrets),
        );
        Ok(())
    })();
    api.audit
        .call(&signed.caller, "PutBuildSecrets", Some(&name), &staged);
    match staged {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_response(&e),
    }
}

/// Body of `POST /kiln/v1/connectors`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConnector {
    name: String,
    allow: Vec<String>,
    #[serde(default)]
    description: String,
}

/// `POST /kiln/v1/connectors` (admin) with `{"name", "allow": [ENTRY…], "description"}`:
/// a deny-by-default egress connector allowing only the entries.
async fn create_connector(State(api): State<Api>, signed: Signed) -> Response {
    let created = (|| {
        if !signed.caller.is_admin() {
            return Err(ApiError::access_denied(
                "only the admin principal defines network connectors",
            ));
        }
        let req: NewConnector = serde_json::from_slice(&signed.body).map_err(|e| {
            ApiError::validation(format!(
                "connector request: {e} (expected {{\"name\": \"…\", \"allow\": [\"*.example.com:443\", \"203.0.113.0/24\"]}})"
            ))
        })?;
        let allow = req
            .allow
            .iter()
            .map(|a| {
                a.parse().map_err(|e: kiln_net::policy::AllowParseError| {
                    ApiError::validation(e.to_string())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        api.network.create(&req.name, allow, req.description)
    })();
    let target = created.as_ref().ok().map(|c| c.name.clone());
    api.audit.call(
        &signed.caller,
        "CreateNetworkConnector",
        target.as_deref(),
        &created,
    );
    match created {
        Ok(c) => json_response(201, api.network.describe(&c)),
        Err(e) => error_response(&e),
    }
}

/// `DELETE /kiln/v1/connectors/{name}` (admin).
async fn delete_connector(
    State(api): State<Api>,
    UrlPath(name): UrlPath<String>,
    signed: Signed,
) -> Response {
    let deleted = if signed.caller.is_admin() {
        api.network.delete(&name)
    } else {
        Err(ApiError::access_denied(
            "only the admin principal deletes network connectors",
        ))
    };
    api.audit.call(
        &signed.caller,
        "DeleteNetworkConnector",
        Some(&name),
        &deleted,
    );
    match deleted {
        Ok(c) => json_response(200, api.network.describe(&c)),
        Err(e) => error_response(&e),
    }
}

/// `GET /kiln/v1/whoami`: `{principal, accessKeyId}` of the signer (what `kiln build` names
/// its artifact bucket after).
async fn whoami(signed: Signed) -> Response {
    json_response(
        200,
        serde_json::json!({
            "principal": signed.caller.principal,
            "accessKeyId": signed.caller.access_key_id,
        }),
    )
}

/// `GET /kiln/v1/keys` (admin): `{"keys": [{accessKeyId, principal, createdAt, revoked,
/// revokedAt}]}`, never a secret.
async fn list_keys(State(api): State<Api>, signed: Signed) -> Response {
    match api.keys.list(&signed.caller) {
        Ok(v) => json_response(200, v),
        Err(e) => error_response(&e),
    }
}

/// `POST /kiln/v1/keys` (admin) with `{"principal": "alice"}`: a new key,
/// `{accessKeyId, secretAccessKey, principal, account}`; the only time the secret is shown.
async fn create_key(State(api): State<Api>, signed: Signed) -> Response {
    let created = api.keys.create(&signed.caller, &signed.body);
    let target = created.as_ref().ok().map(|k| k.access_key_id.as_str());
    api.audit
        .call(&signed.caller, "CreateAccessKey", target, &created);
    match created {
        Ok(k) => json_response(
            201,
            serde_json::json!({
                "accessKeyId": k.access_key_id,
                "secretAccessKey": k.secret_access_key,
                "principal": k.principal,
                "account": k.account,
            }),
        ),
        Err(e) => error_response(&e),
    }
}

/// `DELETE /kiln/v1/keys/{accessKeyId}` (admin): revokes the key (idempotent); answers
/// the key as listed.
async fn revoke_key(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    signed: Signed,
) -> Response {
    let revoked = api.keys.revoke(&signed.caller, &id);
    api.audit
        .call(&signed.caller, "RevokeAccessKey", Some(&id), &revoked);
    match revoked {
        Ok(v) => json_response(200, v),
        Err(e) => error_response(&e),
    }
}

/// Query of `GET /kiln/v1/quotas`.
#[derive(serde::Deserialize)]
struct QuotasQuery {
    principal: Option<String>,
}

/// `GET /kiln/v1/quotas[?principal=NAME]`: each quota's limit and what the caller uses of
/// it (admin may ask for any principal), and the API rates that apply.
async fn quotas(State(api): State<Api>, Query(q): Query<QuotasQuery>, signed: Signed) -> Response {
    let principal = match q.principal {
        Some(p) if p != signed.caller.principal && !signed.caller.is_admin() => {
            return error_response(&ApiError::access_denied(
                "only the admin principal reads another principal's quotas",
            ))
        }
        Some(p) => p,
        None => signed.caller.principal.clone(),
    };
    // The stored-bytes figure walks the principal's directories: off the runtime.
    let quotas = api.quotas.clone();
    let report = {
        let principal = principal.clone();
        kiln_vmm::blocking(move || quotas.report(&principal)).await
    };
    match report {
        Ok(mut v) => {
            let rates = api.throttle.rates();
            let mut throttles: Vec<serde_json::Value> = rates
                .listed()
                .into_iter()
                .map(|(op, r)| {
                    serde_json::json!({ "operation": op, "perSecond": r.per_second, "burst": r.burst })
                })
                .collect();
            if let Some(r) = rates.others() {
                throttles.push(
                    serde_json::json!({ "operation": "*", "perSecond": r.per_second, "burst": r.burst }),
                );
            }
            v["throttles"] = serde_json::Value::Array(throttles);
            json_response(200, v)
        }
        Err(e) => error_response(&e),
    }
}

/// Query of `GET /kiln/v1/usage`.
#[derive(serde::Deserialize)]
struct UsageQuery {
    principal: Option<String>,
    all: Option<bool>,
}

/// `GET /kiln/v1/usage[?principal=NAME | ?all=true]`: what the caller's MicroVMs used (see
/// `observe::usage`); admin may ask for any principal or everyone.
async fn usage(State(api): State<Api>, Query(q): Query<UsageQuery>, signed: Signed) -> Response {
    let everyone = q.all.unwrap_or(false);
    let asks_another = q
        .principal
        .as_ref()
        .is_some_and(|p| *p != signed.caller.principal);
    if (everyone || asks_another) && !signed.caller.is_admin() {
        return error_response(&ApiError::access_denied(
            "only the admin principal reads another principal's usage",
        ));
    }
    let principal = match (everyone, q.principal) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => Some(signed.caller.principal.clone()),
    };
    match api.microvms.usage(principal.as_deref()) {
        Ok(v) => json_response(200, v),
        Err(e) => error_response(&e),
    }
}

/// `GET /metrics`: every metric in the Prometheus text format. Unsigned, since Prometheus
/// cannot sign; it shows counts only (no ids, principals or secrets), and the API listener
/// is on loopback unless `--api-listen` says otherwise. An S3 request for a bucket named
/// `metrics` still goes to the artifact store.
async fn metrics(State(api): State<Api>, req: axum::extract::Request) -> Response {
    if S3Store::is_s3_request(req.headers(), req.uri().query()) {
        return api.s3.serve(req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n").into_response();
    }
    match api.metrics.encode() {
        Ok(text) => {
            let mut resp = (StatusCode::OK, text).into_response();
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static(crate::observe::metrics::CONTENT_TYPE),
            );
            resp
        }
        Err(e) => error_response(&ApiError::internal(format!(
            "encoding the metrics failed: {e}"
        ))),
    }
}

/// Query of `GET /kiln/v1/events`, read as text so a bad value gets kiln's own message.
#[derive(serde::Deserialize)]
struct EventsQuery {
    since: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /kiln/v1/events[?since=<epoch seconds>][&after=<id>][&limit=N]`: the audit log,
/// `{"events": [...]}` oldest first. Without `since` or `after`, the newest `limit` events
/// (default 100, at most 1000); with them, the first `limit` from there on (page on with
/// `after=<the last id>`). Admin sees every event, anyone else their own.
async fn events(State(api): State<Api>, Query(q): Query<EventsQuery>, signed: Signed) -> Response {
    let since = match q.since.as_deref().map(str::parse::<f64>) {
        Some(Ok(s)) if s.is_finite() => Some(s),
        None => None,
        Some(_) => {
            return error_response(&ApiError::validation(format!(
                "since={} is not a time: give epoch seconds, e.g. since={}",
                q.since.unwrap_or_default(),
                crate::now().floor() - 3600.0
            )))
        }
    };
    let after =
        match q.after.as_deref().map(str::parse::<i64>) {
            Some(Ok(a)) => Some(a),
            None => None,
            Some(Err(_)) => return error_response(&ApiError::validation(
                "after must be an event id (the `id` of the last event you have), e.g. after=42",
            )),
        };
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        Some(Ok(n)) if (1..=crate::observe::audit::MAX_LIMIT).contains(&n) => n,
        None => crate::observe::audit::DEFAULT_LIMIT,
        Some(_) => {
            return error_response(&ApiError::validation(format!(
                "limit must be a number from 1 to {}",
                crate::observe::audit::MAX_LIMIT
            )))
        }
    };
    match api.audit.events(&signed.caller, since, after, limit) {
        Ok(v) => json_response(200, v),
        Err(e) => error_response(&e),
    }
}

/// Query of the build-log endpoint.
#[derive(serde::Deserialize)]
struct LogQuery {
    /// Keep the response open and stream new lines until the build ends.
    #[serde(default)]
    follow: bool,
}

/// `GET /kiln/v1/images/{name}/versions/{version}/build-log[?follow=true]`: the build log,
/// streamed while the build runs.
async fn build_log(
    State(api): State<Api>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    Query(q): Query<LogQuery>,
    signed: Signed,
) -> Response {
    // From here on the image is its store key, the identifier having been resolved.
    let (path, images, name) = match api.images.build_log_path(&signed.caller, &name, &version) {
        Ok((p, key)) => (p, api.images.clone(), key),
        Err(e) => return error_response(&e),
    };
    let state = (path, 0u64, false, images, name, version, q.follow);
    let stream = futures_util::stream::unfold(
        state,
        |(path, offset, done, images, name, version, follow)| async move {
            if done {
                return None;
            }
            loop {
                let chunk = read_from(&path, offset).await;
                if !chunk.is_empty() {
                    let next = offset + chunk.len() as u64;
                    return Some((
                        Ok::<_, std::io::Error>(Bytes::from(chunk)),
                        (path, next, false, images, name, version, follow),
                    ));
                }
                if !follow || images.build_finished(&name, &version) {
                    // One last read: the build may have written its final lines just now.
                    let tail = read_from(&path, offset).await;
                    let next = offset + tail.len() as u64;
                    return (!tail.is_empty()).then(|| {
                        (
                            Ok(Bytes::from(tail)),
                            (path, next, true, images, name, version, follow),
                        )
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut buf).await;
    buf
}
