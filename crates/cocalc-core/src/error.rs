//! [`ApiError`], the one error shape on the wire, and the single place where
//! every typed error of this crate maps to an HTTP status, a stable code and
//! a CLI exit code.

use serde::{Deserialize, Serialize};

use crate::backup::BackupError;
use crate::id::IdError;
use crate::placement::PlacementError;
use crate::runner::RunnerError;
use crate::storage::StorageError;
use crate::token::TokenError;
use crate::transport::TransportError;

/// An error as it crosses the wire: HTTP status, stable machine-readable
/// code, a message for people, and optionally what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Stable snake_case code (`token_expired`, `image_not_allowed`).
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ApiError {
    /// An error with status, code and message.
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The process exit code a CLI uses for this error: 2 for the caller's
    /// mistakes (4xx other than auth), 3 for refused credentials (401/403),
    /// 4 for not found (404), 5 for server-side and retryable failures.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            401 | 403 => 3,
            404 => 4,
            400..=499 => 2,
            _ => 5,
        }
    }
}

impl TokenError {
    /// Stable code for this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLong { .. } => "token_too_long",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::WrongHeader { .. } => "token_wrong_header",
            TokenError::Base64 { .. } => "token_bad_base64",
            TokenError::Footer(_) => "token_bad_footer",
            TokenError::UnknownKey { .. } => "token_unknown_key",
            TokenError::RetiredKey { .. } => "token_retired_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Claims(_) => "token_bad_claims",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } => "token_not_yet_valid",
            TokenError::BadTtl { .. } => "token_bad_ttl",
            TokenError::WrongHost { .. } => "token_wrong_host",
            TokenError::WrongProject { .. } => "token_wrong_project",
        }
    }
}

impl From<&TokenError> for ApiError {
    fn from(e: &TokenError) -> Self {
        let status = match e {
            TokenError::WrongHost { .. } | TokenError::WrongProject { .. } => 403,
            _ => 401,
        };
        let err = ApiError::new(status, e.code(), e.to_string());
        match e {
            TokenError::Expired { .. } | TokenError::NotYetValid { .. } => {
                err.with_hint("open the project again to get a fresh token")
            }
            TokenError::WrongHost { .. } => {
                err.with_hint("the project may have moved; open it again to learn its host")
            }
            _ => err,
        }
    }
}

impl From<&RunnerError> for ApiError {
    fn from(e: &RunnerError) -> Self {
        let (status, code) = match e {
            RunnerError::NotRunning(_) => (409, "project_not_running"),
            RunnerError::ImageNotAllowed { .. } => (400, "image_not_allowed"),
            RunnerError::ImageMissing { .. } => (422, "image_missing"),
            RunnerError::StaleGeneration { .. } => (409, "stale_generation"),
            RunnerError::InvalidRequest(_) => (400, "invalid_request"),
            RunnerError::Unsupported(_) => (501, "unsupported"),
            RunnerError::Timeout(_) => (504, "exec_timeout"),
            RunnerError::Backend(_) => (503, "runner_backend"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&StorageError> for ApiError {
    fn from(e: &StorageError) -> Self {
        let (status, code) = match e {
            StorageError::NotFound(_) => (404, "volume_not_found"),
            StorageError::AlreadyExists(_) => (409, "already_exists"),
            StorageError::SnapshotNotFound { .. } => (404, "snapshot_not_found"),
            StorageError::PathEscape(_) => (400, "path_escape"),
            StorageError::InvalidSnapshotName(_) => (400, "invalid_snapshot_name"),
            StorageError::QuotaExceeded(_) => (507, "quota_exceeded"),
            StorageError::Unsupported(_) => (501, "unsupported"),
            StorageError::StreamIncomplete(_) => (502, "stream_incomplete"),
            StorageError::Io(_) => (503, "storage_io"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&BackupError> for ApiError {
    fn from(e: &BackupError) -> Self {
        let (status, code) = match e {
            BackupError::NotFound { .. } => (404, "backup_not_found"),
            BackupError::Repository(_) => (503, "backup_repository"),
            BackupError::Io(_) => (503, "backup_io"),
            BackupError::Invalid(_) => (400, "invalid_request"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&PlacementError> for ApiError {
    fn from(e: &PlacementError) -> Self {
        ApiError::new(503, "no_eligible_host", e.to_string())
            .with_hint("register a host or undrain one, then retry")
    }
}

impl From<&TransportError> for ApiError {
    fn from(e: &TransportError) -> Self {
        let (status, code) = match e {
            TransportError::UnsupportedEndpoint(_) | TransportError::InvalidEndpoint(_) => {
                (502, "bad_host_endpoint")
            }
            TransportError::Unreachable { .. } => (502, "host_unreachable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&IdError> for ApiError {
    fn from(e: &IdError) -> Self {
        ApiError::new(400, "invalid_id", e.to_string())
    }
}

macro_rules! from_owned {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                ApiError::from(&e)
            }
        }
    )*};
}
from_owned!(
    TokenError,
    RunnerError,
    StorageError,
    PlacementError,
    TransportError,
    IdError
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::HostId;

    #[test]
    fn token_errors_map_to_auth_statuses() {
        let e = ApiError::from(TokenError::BadSignature);
        assert_eq!(
            (e.status, e.code.as_str(), e.exit_code()),
            (401, "token_bad_signature", 3)
        );
        let e = ApiError::from(TokenError::WrongHost {
            expected: HostId::from_bytes([1; 16]),
            found: HostId::from_bytes([2; 16]),
        });
        assert_eq!(e.status, 403);
        assert!(e.hint.unwrap().contains("open it again"));
    }

    #[test]
    fn image_errors_name_the_allowlist() {
        let e = ApiError::from(RunnerError::ImageNotAllowed {
            image: "ubuntu:99.04".into(),
            allowed: vec!["a:1".into(), "b:2".into()],
        });
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            "image not allowed: ubuntu:99.04; allowed: a:1, b:2"
        );
        assert_eq!(e.exit_code(), 2);
    }
}
