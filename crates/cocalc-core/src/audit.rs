//! [`AuditRecord`]: one grant or refusal of interest, in a structured form
//! shared by hosts, proxies and the master.

use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId, UserId};
use crate::time::Timestamp;

/// Whether access was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// Access granted.
    Grant,
    /// Access refused.
    Refuse,
}

/// One audited decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditRecord {
    /// When.
    pub at: Timestamp,
    /// Granted or refused.
    pub outcome: AuditOutcome,
    /// Stable reason code (`token_expired`, `acl_denied`, `granted`).
    pub reason: String,
    /// What was being done (`token_verify`, `file_read`, `exec`).
    pub action: String,
    /// The user, when known.
    pub user: Option<UserId>,
    /// The project, when known.
    pub project: Option<ProjectId>,
    /// The host that decided, when known.
    pub host: Option<HostId>,
    /// The token's `jti`, when known.
    pub token_id: Option<String>,
    /// Free-form detail (the error message).
    pub detail: String,
}

impl AuditRecord {
    /// A record with the required fields; the optional ones start empty.
    pub fn new(
        at: Timestamp,
        outcome: AuditOutcome,
        action: impl Into<String>,
        reason: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        AuditRecord {
            at,
            outcome,
            reason: reason.into(),
            action: action.into(),
            user: None,
            project: None,
            host: None,
            token_id: None,
            detail: detail.into(),
        }
    }
}
