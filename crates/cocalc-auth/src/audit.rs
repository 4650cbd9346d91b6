//! Audit sinks: where grants and refusals go.
//!
//! Every [`Gate`](crate::Gate) decision becomes an [`AuditRecord`] handed to
//! an [`AuditSink`]. [`TracingAuditSink`] (the default) logs refusals at
//! `WARN` and grants at `DEBUG` under the `cocalc::audit` target;
//! [`MemoryAuditSink`] keeps records for tests and inspection.

use std::sync::Mutex;

use cocalc_core::{AuditOutcome, AuditRecord};

/// Receives audit records. `record` is called on the request path: it must
/// not block (queue if the destination is slow).
pub trait AuditSink: Send + Sync {
    /// Takes one record.
    fn record(&self, record: AuditRecord);

    /// Whether grants are wanted at all right now. Gates skip building
    /// the record of a grant (on every allowed request) when this says
    /// no; refusals are always recorded. By default, yes.
    fn wants_grants(&self) -> bool {
        true
    }
}

/// Logs records through `tracing` (target `cocalc::audit`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAuditSink;

impl AuditSink for TracingAuditSink {
    fn record(&self, r: AuditRecord) {
        if r.outcome == AuditOutcome::Grant && !self.wants_grants() {
            return;
        }
        let user = r.user.map(|u| u.to_string()).unwrap_or_default();
        let project = r.project.map(|p| p.to_string()).unwrap_or_default();
        let jti = r.token_id.as_deref().unwrap_or("");
        match r.outcome {
            AuditOutcome::Refuse => tracing::warn!(
                target: "cocalc::audit",
                outcome = "refuse",
                action = %r.action,
                reason = %r.reason,
                user = %user,
                project = %project,
                jti = %jti,
                detail = %r.detail,
                "access refused"
            ),
            AuditOutcome::Grant => tracing::debug!(
                target: "cocalc::audit",
                outcome = "grant",
                action = %r.action,
                reason = %r.reason,
                user = %user,
                project = %project,
                jti = %jti,
                "access granted"
            ),
        }
    }

    /// Grants are logged at `DEBUG`: wanted only when that is enabled for
    /// `cocalc::audit`.
    fn wants_grants(&self) -> bool {
        tracing::enabled!(target: "cocalc::audit", tracing::Level::DEBUG)
    }
}

/// Keeps every record in memory.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        MemoryAuditSink::default()
    }

    /// A copy of the records so far, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}
