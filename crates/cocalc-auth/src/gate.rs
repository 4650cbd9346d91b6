//! [`Gate`]: the one check every data-plane request passes — token, then
//! project, then revocations and ACL — with an audit record either way.

use std::sync::Arc;

use cocalc_core::{
    ApiError, AuditOutcome, AuditRecord, HostId, Permission, ProjectId, SharedClock, TokenClaims,
    TokenError, TokenVerifier,
};

use crate::acl::{AccessError, AclCache};
use crate::audit::AuditSink;

/// Why the gate refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token itself failed a check.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token is fine; access is not.
    #[error(transparent)]
    Access(#[from] AccessError),
}

impl AuthError {
    /// Stable code for audit records and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Token(e) => e.code(),
            AuthError::Access(e) => e.code(),
        }
    }
}

impl From<&AuthError> for ApiError {
    fn from(e: &AuthError) -> Self {
        match e {
            AuthError::Token(t) => ApiError::from(t),
            AuthError::Access(a) => ApiError::from(a),
        }
    }
}

/// What a successful check yields.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The verified claims.
    pub claims: Arc<TokenClaims>,
    /// The effective permission (the lesser of token and ACL).
    pub permission: Permission,
}

/// Fetches a fresh ACL answer from the master into the cache (the host's
/// master link implements this). Called by the [`Gate`] when the cache
/// answers [`AccessError::NeedsRefresh`], or
/// [`AccessError::NotCachedOffline`] (the master may be back before the
/// link noticed).
#[async_trait::async_trait]
pub trait AclRefresher: Send + Sync {
    /// Stores the master's current answer for `(project, user)` in the ACL
    /// cache. [`RefreshError::Unreachable`] means the master could not be
    /// asked (the gate then counts the link as down);
    /// [`RefreshError::Refused`] that it answered with a refusal to say
    /// (the project is not on this host any more): the request is refused,
    /// and the link stays up.
    async fn refresh(
        &self,
        project: ProjectId,
        user: cocalc_core::UserId,
    ) -> Result<(), RefreshError>;
}

/// Why an [`AclRefresher`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// The master could not be reached.
    #[error("master unreachable: {0}")]
    Unreachable(String),
    /// The master refused to answer for this project on this host.
    #[error("master refused: {0}")]
    Refused(String),
}

/// Token verification plus ACL check plus audit, for one host.
pub struct Gate {
    host: HostId,
    verifier: Arc<dyn TokenVerifier>,
    acl: Arc<AclCache>,
    audit: Arc<dyn AuditSink>,
    clock: SharedClock,
    refresher: Option<Arc<dyn AclRefresher>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate for `host`.
    pub fn new(
        host: HostId,
        verifier: Arc<dyn TokenVerifier>,
        acl: Arc<AclCache>,
        audit: Arc<dyn AuditSink>,
        clock: SharedClock,
    ) -> Self {
        Gate {
            host,
            verifier,
            acl,
            audit,
            clock,
            refresher: None,
        }
    }

    /// Asks `refresher` whenever the cache needs a fresh answer; if the
    /// master cannot be reached the link is marked down and the cache
    /// decides within its offline grace.
    pub fn with_refresher(mut self, refresher: Arc<dyn AclRefresher>) -> Self {
        self.refresher = Some(refresher);
        self
    }

    /// The ACL cache behind the gate (for push updates).
    pub fn acl(&self) -> &Arc<AclCache> {
        &self.acl
    }

    /// Flushes the gate's audit sink ([`AuditSink::flush`]); call
    /// periodically.
    pub fn flush_audit(&self) {
        self.audit.flush();
    }

    /// Checks that `token` lets its bearer do `action` (needing `needed`) on
    /// `project`. Every outcome is audited (grants only when the sink
    /// [wants them](AuditSink::wants_grants)). [`AccessError::NeedsRefresh`]
    /// means: fetch the ACL entry from the master, `set` it, call again.
    pub async fn authorize(
        &self,
        token: &str,
        project: ProjectId,
        needed: Permission,
        action: &str,
    ) -> Result<Grant, AuthError> {
        let result = self.decide(token, project, needed).await;
        if result.is_ok() && !self.audit.wants_grants() {
            return result.map_err(|(e, _)| e);
        }
        let (outcome, reason, detail, claims) = match &result {
            Ok(g) => (
                AuditOutcome::Grant,
                "granted",
                String::new(),
                Some(g.claims.clone()),
            ),
            Err((e, claims)) => (
                AuditOutcome::Refuse,
                e.code(),
                e.to_string(),
                claims.clone(),
            ),
        };
        let mut rec = AuditRecord::new(self.clock.now(), outcome, action, reason, detail);
        rec.host = Some(self.host);
        rec.project = Some(project);
        if let Some(c) = claims {
            rec.user = Some(c.user);
            rec.token_id = Some(c.token_id.clone());
        }
        self.audit.record(rec);
        result.map_err(|(e, _)| e)
    }

    async fn decide(
        &self,
        token: &str,
        project: ProjectId,
        needed: Permission,
    ) -> Result<Grant, (AuthError, Option<Arc<TokenClaims>>)> {
        let claims = self
            .verifier
            .verify(token)
            .await
            .map_err(|e| (AuthError::Token(e), None))?;
        let fail = |e: AuthError| (e, Some(claims.clone()));
        claims
            .require_project(project)
            .map_err(|e| fail(e.into()))?;
        // An entry that is stale, or missing while the link is thought
        // down, is asked for: a missing entry cannot be served anyway, and
        // the link may be back (a push channel that failed while the host
        // registered marks it down until the next contact).
        let permission = match (self.acl.check(&claims, needed), &self.refresher) {
            (
                Err(AccessError::NeedsRefresh { .. } | AccessError::NotCachedOffline { .. }),
                Some(r),
            ) => {
                match r.refresh(project, claims.user).await {
                    Ok(()) => self.acl.check(&claims, needed),
                    Err(RefreshError::Refused(reason)) => {
                        // The master answered: the link is up, and its
                        // "not here" is the answer.
                        self.acl.master_up();
                        Err(AccessError::RefusedByMaster { project, reason })
                    }
                    Err(why) => {
                        tracing::warn!(%project, error = %why, "ACL refresh failed; master link marked down");
                        self.acl.master_down();
                        self.acl.check(&claims, needed)
                    }
                }
            }
            (result, _) => result,
        }
        .map_err(|e| fail(e.into()))?;
        Ok(Grant { claims, permission })
    }
}
