//! Small conversions between the store and the wire shapes, shared by the API handlers.

use kiln_api::{ApiError, Timestamp};
use serde_json::Value;

use crate::store::StoreError;

/// A store failure as the API reports it (logged; the client sees a 500).
pub fn internal(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure");
    ApiError::internal(format!("kilnd's metadata store failed: {e}"))
}

/// Epoch seconds as stored → the wire's timestamp.
pub fn ts(secs: f64) -> Timestamp {
    Timestamp::from_millis((secs * 1000.0) as i64)
}

/// Any output shape → JSON.
pub fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::internal(e.to_string()))
}

/// The BLAKE3 of a request's JSON: what an idempotency token is checked against.
pub fn request_hash<T: serde::Serialize>(req: &T) -> Result<String, ApiError> {
    let text = serde_json::to_string(req).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(blake3::hash(text.as_bytes()).to_hex().to_string())
}
