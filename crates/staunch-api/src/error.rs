//! The API's one error type: an HTTP status, a stable machine-readable
//! code (documented in the OpenAPI spec's `Error` schema) and a message for
//! people. Every handler returns it; nothing below panics on input.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use staunch_host::storeio::StoreIoError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-definition", message)
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", what)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn busy(vm: &str, op: &str) -> Self {
        Self::new(StatusCode::CONFLICT, "busy", format!("VM '{vm}' has operation {op} in progress"))
    }
    pub fn wrong_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "wrong-state", message)
    }
    pub fn store(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", message)
    }
    pub fn vmm(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "vmm-error", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<StoreIoError> for ApiError {
    fn from(e: StoreIoError) -> Self {
        match &e {
            StoreIoError::Io(..) => ApiError::store(e.to_string()),
            StoreIoError::NoSuchVm(_) => ApiError::not_found(e.to_string()),
            StoreIoError::Def { .. } => ApiError::invalid(e.to_string()),
            // The store refused: quota, permissions, a bad path. Not the
            // client's fault in a way it can fix, nor a crash of ours.
            StoreIoError::Refused(..) => ApiError::store(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;
