//! Extractors whose rejections are the API's JSON errors (axum's own
//! answer in plain text).

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;

/// The request body, bounded by the router's body limit (413 beyond it).
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| {
            let code =
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE { "too-large" } else { "bad-request" };
            ApiError::new(e.status(), code, format!("request body: {}", e.body_text()))
        })
    }
}

/// The one path parameter of a route (a VM's name, an operation's id).
pub struct Param(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Param(p))
            .map_err(|e| ApiError::bad(format!("path: {}", e.body_text())))
    }
}
