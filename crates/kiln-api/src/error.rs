//! The service's modeled exceptions, as status, `x-amzn-ErrorType` and JSON body.
//!
//! boto3 picks the exception class from the `x-amzn-ErrorType` header
//! ([`ApiError::error_type`]), so a client gets `client.exceptions.ValidationException`
//! and friends; the body carries `message` and the shape's other body members.

use serde_json::{json, Map, Value};

/// One modeled exception of the `lambda-microvms` API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The input fails a model constraint (400).
    #[error("ValidationException: {message}")]
    Validation {
        /// What is wrong.
        message: String,
    },
    /// The caller may not do this (403).
    #[error("AccessDeniedException: {message}")]
    AccessDenied {
        /// Why.
        message: String,
    },
    /// The named resource does not exist (404).
    #[error("ResourceNotFoundException: {message}")]
    ResourceNotFound {
        /// What was not found.
        message: String,
        /// Kind of resource, e.g. `MicrovmImage`.
        resource_type: Option<String>,
        /// The identifier that was looked up.
        resource_id: Option<String>,
    },
    /// The resource's state forbids the call (409).
    #[error("ConflictException: {message}")]
    Conflict {
        /// What conflicts.
        message: String,
        /// The resource in the way.
        resource_id: Option<String>,
        /// Its kind.
        resource_type: Option<String>,
    },
    /// Too many calls (429).
    #[error("ThrottlingException: {message}")]
    Throttling {
        /// Why.
        message: String,
        /// Service of the quota.
        service_code: Option<String>,
        /// The quota hit.
        quota_code: Option<String>,
        /// Sent as the `Retry-After` header.
        retry_after_seconds: Option<i32>,
    },
    /// A quota would be exceeded (402).
    #[error("ServiceQuotaExceededException: {message}")]
    ServiceQuotaExceeded {
        /// Which quota and why.
        message: String,
        /// Resource that would exceed it.
        resource_id: Option<String>,
        /// Its kind.
        resource_type: Option<String>,
        /// Service of the quota.
        service_code: Option<String>,
        /// The quota.
        quota_code: Option<String>,
    },
    /// kiln failed (500).
    #[error("InternalServerException: {message}")]
    InternalServer {
        /// What failed.
        message: String,
        /// Sent as the `Retry-After` header.
        retry_after_seconds: Option<i32>,
    },
    /// No host capacity to run a MicroVM (500).
    #[error("InsufficientCapacityException: {message}")]
    InsufficientCapacity {
        /// What ran out.
        message: String,
    },
    /// Lambda-style bad parameter, from the tag operations (400).
    #[error("InvalidParameterValueException: {message}")]
    InvalidParameterValue {
        /// Lambda's `Type` member, `User` by default.
        kind: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// Lambda-style conflict, from the tag operations (409).
    #[error("ResourceConflictException: {message}")]
    ResourceConflict {
        /// Lambda's `Type` member, `User` by default.
        kind: Option<String>,
        /// What conflicts.
        message: String,
    },
    /// Lambda-style internal failure, from the tag operations (500).
    #[error("ServiceException: {message}")]
    Service {
        /// Lambda's `Type` member, `Service` by default.
        kind: Option<String>,
        /// What failed.
        message: String,
    },
    /// Lambda-style throttling, from the tag operations (429).
    #[error("TooManyRequestsException: {message}")]
    TooManyRequests {
        /// Lambda's `Type` member, `User` by default.
        kind: Option<String>,
        /// Why.
        message: String,
    },
    /// The request carries no signature (403). Like the three below, not in the service
    /// model: every AWS service sends it, and SDKs raise it as a generic client error.
    #[error("MissingAuthenticationTokenException: {message}")]
    MissingAuthenticationToken {
        /// What is missing.
        message: String,
    },
    /// The access key id is unknown or revoked (403).
    #[error("UnrecognizedClientException: {message}")]
    UnrecognizedClient {
        /// Why the key is not accepted.
        message: String,
    },
    /// The signature does not match the request, or it expired (403).
    #[error("InvalidSignatureException: {message}")]
    InvalidSignature {
        /// What does not match.
        message: String,
    },
    /// The signature's parts are missing or malformed (400).
    #[error("IncompleteSignatureException: {message}")]
    IncompleteSignature {
        /// What is missing or malformed.
        message: String,
    },
}

/// Every exception shape name the model declares, in model order.
pub const ERROR_TYPES: &[&str] = &[
    "AccessDeniedException",
    "ConflictException",
    "InsufficientCapacityException",
    "InternalServerException",
    "InvalidParameterValueException",
    "ResourceConflictException",
    "ResourceNotFoundException",
    "ServiceException",
    "ServiceQuotaExceededException",
    "ThrottlingException",
    "TooManyRequestsException",
    "ValidationException",
];

/// The authentication errors every AWS service can send, beyond the model's exceptions.
pub const COMMON_ERROR_TYPES: &[&str] = &[
    "IncompleteSignatureException",
    "InvalidSignatureException",
    "MissingAuthenticationTokenException",
    "UnrecognizedClientException",
];

impl ApiError {
    /// A `ValidationException` with `message`.
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::Validation {
            message: message.into(),
        }
    }

    /// A `ResourceNotFoundException` for `resource_type` `resource_id`.
    pub fn not_found(resource_type: &str, resource_id: &str) -> Self {
        ApiError::ResourceNotFound {
            message: format!("{resource_type} {resource_id} not found"),
            resource_type: Some(resource_type.to_string()),
            resource_id: Some(resource_id.to_string()),
        }
    }

    /// A `ResourceNotFoundException` for `resource_type` `resource_id` with AWS's own words.
    pub fn not_found_saying(
        resource_type: &str,
        resource_id: &str,
        message: impl Into<String>,
    ) -> Self {
        ApiError::ResourceNotFound {
            message: message.into(),
            resource_type: Some(resource_type.to_string()),
            resource_id: Some(resource_id.to_string()),
        }
    }

    /// A `ConflictException` on `resource_type` `resource_id`, saying why.
    pub fn conflict(resource_type: &str, resource_id: &str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            message: message.into(),
            resource_id: Some(resource_id.to_string()),
            resource_type: Some(resource_type.to_string()),
        }
    }

    /// An `AccessDeniedException` with `message`.
    pub fn access_denied(message: impl Into<String>) -> Self {
        ApiError::AccessDenied {
            message: message.into(),
        }
    }

    /// An `InternalServerException` with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::InternalServer {
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    /// The HTTP status the model gives this exception.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Validation { .. }
            | ApiError::InvalidParameterValue { .. }
            | ApiError::IncompleteSignature { .. } => 400,
            ApiError::ServiceQuotaExceeded { .. } => 402,
            ApiError::AccessDenied { .. }
            | ApiError::MissingAuthenticationToken { .. }
            | ApiError::UnrecognizedClient { .. }
            | ApiError::InvalidSignature { .. } => 403,
            ApiError::ResourceNotFound { .. } => 404,
            ApiError::Conflict { .. } | ApiError::ResourceConflict { .. } => 409,
            ApiError::Throttling { .. } | ApiError::TooManyRequests { .. } => 429,
            ApiError::InternalServer { .. }
            | ApiError::InsufficientCapacity { .. }
            | ApiError::Service { .. } => 500,
        }
    }

    /// The exception's shape name, for the `x-amzn-ErrorType` header.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Validation { .. } => "ValidationException",
            ApiError::AccessDenied { .. } => "AccessDeniedException",
            ApiError::ResourceNotFound { .. } => "ResourceNotFoundException",
            ApiError::Conflict { .. } => "ConflictException",
            ApiError::Throttling { .. } => "ThrottlingException",
            ApiError::ServiceQuotaExceeded { .. } => "ServiceQuotaExceededException",
            ApiError::InternalServer { .. } => "InternalServerException",
            ApiError::InsufficientCapacity { .. } => "InsufficientCapacityException",
            ApiError::InvalidParameterValue { .. } => "InvalidParameterValueException",
            ApiError::ResourceConflict { .. } => "ResourceConflictException",
            ApiError::Service { .. } => "ServiceException",
            ApiError::TooManyRequests { .. } => "TooManyRequestsException",
            ApiError::MissingAuthenticationToken { .. } => "MissingAuthenticationTokenException",
            ApiError::UnrecognizedClient { .. } => "UnrecognizedClientException",
            ApiError::InvalidSignature { .. } => "InvalidSignatureException",
            ApiError::IncompleteSignature { .. } => "IncompleteSignatureException",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::Validation { message }
            | ApiError::AccessDenied { message }
            | ApiError::ResourceNotFound { message, .. }
            | ApiError::Conflict { message, .. }
            | ApiError::Throttling { message, .. }
            | ApiError::ServiceQuotaExceeded { message, .. }
            | ApiError::InternalServer { message, .. }
            | ApiError::InsufficientCapacity { message }
            | ApiError::InvalidParameterValue { message, .. }
            | ApiError::ResourceConflict { message, .. }
            | ApiError::Service { message, .. }
            | ApiError::TooManyRequests { message, .. }
            | ApiError::MissingAuthenticationToken { message }
            | ApiError::UnrecognizedClient { message }
            | ApiError::InvalidSignature { message }
            | ApiError::IncompleteSignature { message } => message,
        }
    }

    /// Seconds to wait before retrying, sent as the `Retry-After` header.
    pub fn retry_after_seconds(&self) -> Option<i32> {
        match self {
            ApiError::Throttling {
                retry_after_seconds,
                ..
            }
            | ApiError::InternalServer {
                retry_after_seconds,
                ..
            } => *retry_after_seconds,
            _ => None,
        }
    }

    /// Response headers besides content type: `x-amzn-ErrorType` and, when set,
    /// `Retry-After`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![("x-amzn-ErrorType", self.error_type().to_string())];
        if let Some(secs) = self.retry_after_seconds() {
            headers.push(("Retry-After", secs.to_string()));
        }
        headers
    }

    /// The JSON response body: `message` plus the shape's other body members that are set.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        let mut put = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                body.insert(key.to_string(), Value::String(v.clone()));
            }
        };
        match self {
            ApiError::ResourceNotFound {
                resource_type,
                resource_id,
                ..
            }
            | ApiError::Conflict {
                resource_type,
                resource_id,
                ..
            } => {
                put("resourceId", resource_id);
                put("resourceType", resource_type);
            }
            ApiError::Throttling {
                service_code,
                quota_code,
                ..
            } => {
                put("serviceCode", service_code);
                put("quotaCode", quota_code);
            }
            ApiError::ServiceQuotaExceeded {
                resource_id,
                resource_type,
                service_code,
                quota_code,
                ..
            } => {
                put("resourceId", resource_id);
                put("resourceType", resource_type);
                put("serviceCode", service_code);
                put("quotaCode", quota_code);
            }
            ApiError::InvalidParameterValue { kind, .. }
            | ApiError::ResourceConflict { kind, .. }
            | ApiError::Service { kind, .. }
            | ApiError::TooManyRequests { kind, .. } => put("Type", kind),
            ApiError::Validation { .. }
            | ApiError::AccessDenied { .. }
            | ApiError::InternalServer { .. }
            | ApiError::InsufficientCapacity { .. }
            | ApiError::MissingAuthenticationToken { .. }
            | ApiError::UnrecognizedClient { .. }
            | ApiError::InvalidSignature { .. }
            | ApiError::IncompleteSignature { .. } => {}
        }
        body.insert("message".to_string(), json!(self.message()));
        Value::Object(body)
    }

    /// Rebuilds an error from a response: the `x-amzn-ErrorType` value (anything after
    /// `:` and before `#` ignored), the JSON body and the `Retry-After` header. `None`
    /// when the type is not one of the model's exceptions.
    pub fn from_response(error_type: &str, body: &Value, retry_after: Option<i32>) -> Option<Self> {
        let name = error_type.split(':').next().unwrap_or_default();
        let name = name.rsplit('#').next().unwrap_or_default();
        let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
        let message = text("message")
            .or_else(|| text("Message"))
            .unwrap_or_default();
        Some(match name {
            "ValidationException" => ApiError::Validation { message },
            "AccessDeniedException" => ApiError::AccessDenied { message },
            "ResourceNotFoundException" => ApiError::ResourceNotFound {
                message,
                resource_type: text("resourceType"),
                resource_id: text("resourceId"),
            },
            "ConflictException" => ApiError::Conflict {
                message,
                resource_id: text("resourceId"),
                resource_type: text("resourceType"),
            },
            "ThrottlingException" => ApiError::Throttling {
                message,
                service_code: text("serviceCode"),
                quota_code: text("quotaCode"),
                retry_after_seconds: retry_after,
            },
            "ServiceQuotaExceededException" => ApiError::ServiceQuotaExceeded {
                message,
                resource_id: text("resourceId"),
                resource_type: text("resourceType"),
                service_code: text("serviceCode"),
                quota_code: text("quotaCode"),
            },
            "InternalServerException" => ApiError::InternalServer {
                message,
                retry_after_seconds: retry_after,
            },
            "InsufficientCapacityException" => ApiError::InsufficientCapacity { message },
            "InvalidParameterValueException" => ApiError::InvalidParameterValue {
                kind: text("Type"),
                message,
            },
            "ResourceConflictException" => ApiError::ResourceConflict {
                kind: text("Type"),
                message,
            },
            "ServiceException" => ApiError::Service {
                kind: text("Type"),
                message,
            },
            "TooManyRequestsException" => ApiError::TooManyRequests {
                kind: text("Type"),
                message,
            },
            "MissingAuthenticationTokenException" => {
                ApiError::MissingAuthenticationToken { message }
            }
            "UnrecognizedClientException" => ApiError::UnrecognizedClient { message },
            "InvalidSignatureException" => ApiError::InvalidSignature { message },
            "IncompleteSignatureException" => ApiError::IncompleteSignature { message },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_body_names_the_resource() {
        let err = ApiError::not_found("Microvm", "mvm-1");
        assert_eq!(err.status(), 404);
        assert_eq!(err.error_type(), "ResourceNotFoundException");
        assert_eq!(
            err.body(),
            json!({"message": "Microvm mvm-1 not found", "resourceId": "mvm-1", "resourceType": "Microvm"})
        );
    }

    #[test]
    fn throttling_retry_after_goes_to_header_not_body() {
        let err = ApiError::Throttling {
            message: "slow down".into(),
            service_code: None,
            quota_code: None,
            retry_after_seconds: Some(3),
        };
        assert_eq!(
            err.headers(),
            vec![
                ("x-amzn-ErrorType", "ThrottlingException".to_string()),
                ("Retry-After", "3".to_string())
            ]
        );
        assert_eq!(err.body(), json!({"message": "slow down"}));
    }

    #[test]
    fn lambda_style_errors_carry_type() {
        let err = ApiError::InvalidParameterValue {
            kind: Some("User".into()),
            message: "bad".into(),
        };
        assert_eq!(err.body(), json!({"Type": "User", "message": "bad"}));
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn from_response_round_trips_every_type() {
        for name in ERROR_TYPES {
            let err = ApiError::from_response(
                &format!("{name}:http://internal"),
                &json!({"message": "m"}),
                None,
            )
            .expect("known type");
            assert_eq!(err.error_type(), *name);
            assert_eq!(err.message(), "m");
        }
    }

    #[test]
    fn from_response_when_common_auth_error_then_round_trips_with_its_status() {
        for name in COMMON_ERROR_TYPES {
            let err =
                ApiError::from_response(name, &json!({"message": "m"}), None).expect("known type");

            assert_eq!(err.error_type(), *name);
            assert_eq!(err.body(), json!({"message": "m"}));
            assert_eq!(
                err.status(),
                if *name == "IncompleteSignatureException" {
                    400
                } else {
                    403
                }
            );
        }
    }

    #[test]
    fn from_response_rejects_unknown_type() {
        assert_eq!(
            ApiError::from_response("NopeException", &json!({}), None),
            None
        );
    }
}
