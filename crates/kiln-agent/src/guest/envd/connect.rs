//! The Connect RPC protocol with the JSON codec, as envd's clients speak it.
//!
//! Unary calls: `POST /<package>.<Service>/<Method>` with `Content-Type: application/json`
//! and the request message as the body; the answer is the response message (200) or an
//! error object `{"code": "...", "message": "..."}` with the HTTP status of its code.
//! Streaming calls use `application/connect+json`: every message is an envelope (1 flag byte,
//! a 4-byte big-endian length, the JSON), and the response ends with an end-of-stream
//! envelope (flag 0x02) carrying `{}` or `{"error": {...}}`.
//!
//! The JSON is protobuf's canonical mapping: lowerCamelCase names (the original snake_case
//! names are accepted too), `bytes` as base64, 64-bit integers as strings (numbers accepted),
//! enums by name (numbers accepted).

use std::io::{self, Read};

use base64::Engine as _;
use serde_json::{json, Map, Value};

/// Envelope flag: the message is compressed (never accepted: envd offers no compression).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Largest message accepted in a request.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request was cancelled.
    Canceled,
    /// An unknown error.
    Unknown,
    /// The request is malformed.
    InvalidArgument,
    /// The deadline passed.
    DeadlineExceeded,
    /// Not found.
    NotFound,
    /// Already exists.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// Out of a resource.
    ResourceExhausted,
    /// The system is not in a state for this.
    FailedPrecondition,
    /// Not implemented.
    Unimplemented,
    /// An internal error.
    Internal,
    /// Unavailable for now.
    Unavailable,
    /// No valid credentials.
    Unauthenticated,
}

impl Code {
    /// The code's wire name.
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status a unary error with this code carries.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal => 500,
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }
}

/// An RPC failure: a code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// The error as Connect's JSON error object.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code.name(), "message": self.message})
    }

    /// The error for an I/O failure on `what`.
    pub fn io(what: &str, e: &io::Error) -> Self {
        let code = match e.kind() {
            io::ErrorKind::NotFound => Code::NotFound,
            io::ErrorKind::AlreadyExists => Code::AlreadyExists,
            io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            io::ErrorKind::InvalidInput => Code::InvalidArgument,
            _ => Code::Internal,
        };
        let code = match e.raw_os_error() {
            Some(libc::ENOTDIR) | Some(libc::EISDIR) | Some(libc::ENOTEMPTY) => {
                Code::InvalidArgument
            }
            _ => code,
        };
        RpcError::new(code, format!("{what}: {e}"))
    }
}

/// Encodes one envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The end-of-stream envelope: success, or the error.
pub fn end_stream(error: Option<&RpcError>) -> Vec<u8> {
    let body = match error {
        None => json!({}),
        Some(e) => json!({"error": e.to_json()}),
    };
    envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// Reads one envelope; `Ok(None)` at a clean end of the body (between envelopes).
pub fn read_envelope(
    reader: &mut impl Read,
    max: usize,
) -> Result<Option<(u8, Vec<u8>)>, RpcError> {
    let mut prefix = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(RpcError::invalid(
                    "the request ended inside an envelope prefix",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(RpcError::new(
                    Code::Canceled,
                    format!("reading the request: {e}"),
                ))
            }
        }
    }
    let flags = prefix[0];
    if flags & FLAG_COMPRESSED != 0 {
        return Err(RpcError::new(
            Code::Unimplemented,
            "compressed messages are not supported (send identity)",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("message of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(|e| RpcError::invalid(format!("the request ended inside a message: {e}")))?;
    Ok(Some((flags, payload)))
}

/// Parses a JSON message; it must be an object.
pub fn parse_message(bytes: &[u8]) -> Result<Value, RpcError> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| RpcError::invalid(format!("the request is not valid JSON: {e}")))?
    };
    if !value.is_object() {
        return Err(RpcError::invalid(
            "the request message must be a JSON object",
        ));
    }
    Ok(value)
}

/// Field `camel` (or its snake_case `snake`) of a message; JSON null counts as absent.
pub fn field<'a>(message: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    message
        .get(camel)
        .or_else(|| message.get(snake))
        .filter(|v| !v.is_null())
}

/// A string field (default "").
pub fn string(message: &Value, camel: &str, snake: &str) -> Result<String, RpcError> {
    match field(message, camel, snake) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(RpcError::invalid(format!("field {camel} must be a string"))),
    }
}

/// An optional string field.
pub fn opt_string(message: &Value, camel: &str, snake: &str) -> Result<Option<String>, RpcError> {
    match field(message, camel, snake) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RpcError::invalid(format!("field {camel} must be a string"))),
    }
}

/// A bool field (default false when absent).
pub fn opt_bool(message: &Value, camel: &str, snake: &str) -> Result<Option<bool>, RpcError> {
    match field(message, camel, snake) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RpcError::invalid(format!(
            "field {camel} must be a boolean"
        ))),
    }
}

/// An unsigned integer field (number or decimal string), bounded by `max`.
pub fn uint(message: &Value, camel: &str, snake: &str, max: u64) -> Result<Option<u64>, RpcError> {
    let bad = || RpcError::invalid(format!("field {camel} must be an integer from 0 to {max}"));
    let n = match field(message, camel, snake) {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
        Some(Value::String(s)) => s.parse::<u64>().map_err(|_| bad())?,
        Some(_) => return Err(bad()),
    };
    if n > max {
        return Err(bad());
    }
    Ok(Some(n))
}

/// A map<string,string> field.
pub fn string_map(
    message: &Value,
    camel: &str,
    snake: &str,
) -> Result<Vec<(String, String)>, RpcError> {
    match field(message, camel, snake) {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(RpcError::invalid(format!(
                    "values of {camel} must be strings"
                ))),
            })
            .collect(),
        Some(_) => Err(RpcError::invalid(format!(
            "field {camel} must be an object"
        ))),
    }
}

/// A repeated string field.
pub fn string_list(message: &Value, camel: &str, snake: &str) -> Result<Vec<String>, RpcError> {
    match field(message, camel, snake) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(RpcError::invalid(format!(
                    "items of {camel} must be strings"
                ))),
            })
            .collect(),
        Some(_) => Err(RpcError::invalid(format!("field {camel} must be an array"))),
    }
}

/// A bytes field (standard or URL-safe base64, padding optional).
pub fn bytes(value: &Value, name: &str) -> Result<Vec<u8>, RpcError> {
    let Value::String(s) = value else {
        return Err(RpcError::invalid(format!(
            "field {name} must be base64 text"
        )));
    };
    let trimmed = s.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| RpcError::invalid(format!("field {name} is not valid base64")))
}

/// Encodes bytes for JSON.
pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// An enum field given by name or number; `names[i]` is the name of value `i`... as pairs.
pub fn enum_value(
    message: &Value,
    camel: &str,
    snake: &str,
    names: &[(&str, i64)],
) -> Result<Option<i64>, RpcError> {
    match field(message, camel, snake) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| RpcError::invalid(format!("field {camel} is not a valid enum number"))),
        Some(Value::String(s)) => names
            .iter()
            .find(|(name, _)| name == s)
            .map(|(_, v)| Some(*v))
            .ok_or_else(|| RpcError::invalid(format!("field {camel} has unknown value {s:?}"))),
        Some(_) => Err(RpcError::invalid(format!(
            "field {camel} must be an enum name"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn envelope_round_trips() {
        let mut wire = envelope(0, br#"{"a":1}"#);
        wire.extend(end_stream(None));
        let mut reader = Cursor::new(wire);
        let (flags, payload) = read_envelope(&mut reader, 100).unwrap().unwrap();
        assert_eq!((flags, payload.as_slice()), (0, &br#"{"a":1}"#[..]));
        let (flags, payload) = read_envelope(&mut reader, 100).unwrap().unwrap();
        assert_eq!((flags, payload.as_slice()), (FLAG_END_STREAM, &b"{}"[..]));
        assert_eq!(read_envelope(&mut reader, 100).unwrap(), None);
    }

    #[test]
    fn oversized_envelope_is_refused_before_allocating() {
        let wire = [0u8, 0xff, 0xff, 0xff, 0xff];
        let err = read_envelope(&mut Cursor::new(wire), 1024).unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
    }

    #[test]
    fn compressed_envelope_is_refused() {
        let wire = envelope(FLAG_COMPRESSED, b"x");
        assert_eq!(
            read_envelope(&mut Cursor::new(wire), 1024)
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
    }

    #[test]
    fn error_end_stream_carries_code_and_message() {
        let wire = end_stream(Some(&RpcError::new(Code::NotFound, "no such process")));
        let v: Value = serde_json::from_slice(&wire[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no such process");
    }

    #[test]
    fn fields_accept_both_spellings_and_numbers_as_strings() {
        let m: Value =
            serde_json::from_str(r#"{"watcher_id":"w1","depth":"3","stdin":"aGk"}"#).unwrap();
        assert_eq!(string(&m, "watcherId", "watcher_id").unwrap(), "w1");
        assert_eq!(uint(&m, "depth", "depth", 10).unwrap(), Some(3));
        assert_eq!(bytes(&m["stdin"], "stdin").unwrap(), b"hi");
        assert!(uint(&m, "depth", "depth", 2).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_envelope_streams_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut reader = Cursor::new(bytes);
            for _ in 0..64 {
                match read_envelope(&mut reader, 64) {
                    Ok(Some((_, payload))) => { proptest::prop_assert!(payload.len() <= 64); let _ = parse_message(&payload); }
                    _ => break,
                }
            }
        }

        #[test]
        fn arbitrary_json_fields_never_panic(text in "\\PC{0,64}") {
            if let Ok(v) = parse_message(text.as_bytes()) {
                let _ = string(&v, "path", "path");
                let _ = uint(&v, "pid", "pid", u32::MAX as u64);
                let _ = string_map(&v, "envs", "envs");
                let _ = string_list(&v, "args", "args");
                if let Some(x) = field(&v, "stdin", "stdin") { let _ = bytes(x, "stdin"); }
            }
        }
    }
}
