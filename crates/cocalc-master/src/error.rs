//! [`MasterError`] and its mapping to HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cocalc_core::ApiError;

/// Why a master call failed. Variants say who is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// The caller's request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No or bad credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials fine, access not (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such thing, or not visible to the caller (404).
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Placement found no host (503).
    #[error(transparent)]
    Placement(#[from] cocalc_core::PlacementError),
    /// The master itself failed (500).
    #[error("internal error: {0}")]
    Internal(String),
    /// A host answered a forwarded call with this error (passed through).
    #[error("{}", .0.message)]
    Upstream(ApiError),
}

impl From<&MasterError> for ApiError {
    fn from(e: &MasterError) -> Self {
        let (status, code) = match e {
            MasterError::BadRequest(_) => (400, "bad_request"),
            MasterError::Unauthorized(_) => (401, "unauthorized"),
            MasterError::Forbidden(_) => (403, "forbidden"),
            MasterError::NotFound(_) => (404, "not_found"),
            MasterError::Conflict(_) => (409, "conflict"),
            MasterError::Placement(p) => return ApiError::from(p),
            MasterError::Upstream(a) => return a.clone(),
            MasterError::Internal(_) => (500, "internal"),
        };
        let err = ApiError::new(status, code, e.to_string());
        match e {
            MasterError::Unauthorized(_) => {
                err.with_hint("send `Authorization: Bearer <api key>` with a valid key")
            }
            _ => err,
        }
    }
}

impl From<cocalc_placement::StoreError> for MasterError {
    fn from(e: cocalc_placement::StoreError) -> Self {
        match e {
            cocalc_placement::StoreError::Conflict { .. } => MasterError::Conflict(e.to_string()),
            cocalc_placement::StoreError::NotPlaced(_) => MasterError::NotFound(e.to_string()),
            other => MasterError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for MasterError {
    fn into_response(self) -> Response {
        let api = ApiError::from(&self);
        let status = StatusCode::from_u16(api.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (status, Json(api)).into_response()
    }
}
