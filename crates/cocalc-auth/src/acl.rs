//! [`AclCache`]: the host's copy of who may do what in its projects, with
//! push invalidation, revocations and a bounded offline grace.
//!
//! ## Semantics
//!
//! * Entries map `(project, user)` to a permission, or to *no access* (a
//!   cached refusal). An entry is **fresh** for `ttl` after it was written.
//! * While the master link is **up**, a stale or missing entry is not used:
//!   [`AclCache::check`] answers [`AccessError::NeedsRefresh`] so the caller
//!   asks the master and [`AclCache::set`]s the answer.
//! * While the link is **down**, entries are served as they are (fresh or
//!   not) until `offline_grace` has passed since the link went down; after
//!   that every check fails with [`AccessError::MasterUnreachable`], which
//!   says since when and for how long the grace ran. A cache that has never
//!   reached the master counts as down since it was created, so a restarted
//!   host serves its restored entries for at most the grace.
//! * Revocations apply whatever the link state: a token whose `jti` was
//!   revoked, or issued before its user's "not before" cutoff, is refused.
//! * The effective permission is the lesser of the token's and the ACL's.
//!
//! Time comes from the injected clock, so tests drive it without sleeping.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use cocalc_core::{Permission, ProjectId, SharedClock, Timestamp, TokenClaims, UserId};

/// ACL cache tunables.
#[derive(Debug, Clone, Copy)]
pub struct AclPolicy {
    /// How long an entry is fresh while the master is reachable (default 5 min).
    pub ttl: Duration,
    /// How long cached entries serve after the master link goes down
    /// (default 1 h).
    pub offline_grace: Duration,
}

impl Default for AclPolicy {
    fn default() -> Self {
        AclPolicy {
            ttl: Duration::from_secs(5 * 60),
            offline_grace: Duration::from_secs(60 * 60),
        }
    }
}

impl AclPolicy {
    /// A policy with the given TTL and offline grace.
    pub fn new(ttl: Duration, offline_grace: Duration) -> Self {
        AclPolicy { ttl, offline_grace }
    }
}

/// Why access was refused (or must be looked up first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The token's `jti` was revoked.
    #[error("token {token_id} was revoked")]
    TokenRevoked {
        /// The token id.
        token_id: String,
    },
    /// The user's tokens issued before a cutoff were revoked ("sign out
    /// everywhere", ban).
    #[error(
        "tokens of user {user} issued before {not_before:?} are revoked; open the project again"
    )]
    UserRevoked {
        /// The user.
        user: UserId,
        /// The cutoff.
        not_before: Timestamp,
    },
    /// The master has been unreachable for longer than the offline grace.
    #[error(
        "master unreachable since {since:?}; cached access expired after the offline grace of {} s",
        grace.as_secs()
    )]
    MasterUnreachable {
        /// When the link went down.
        since: Timestamp,
        /// The grace that ran out.
        grace: Duration,
    },
    /// The master is unreachable and this host has no cached entry.
    #[error("master unreachable and no cached access for user {user} on project {project}")]
    NotCachedOffline {
        /// The project.
        project: ProjectId,
        /// The user.
        user: UserId,
    },
    /// No fresh entry; ask the master, store the answer, check again.
    #[error("access of user {user} on project {project} must be fetched from the master")]
    NeedsRefresh {
        /// The project.
        project: ProjectId,
        /// The user.
        user: UserId,
    },
    /// The user has no access to the project.
    #[error("user {user} has no access to project {project}")]
    Denied {
        /// The project.
        project: ProjectId,
        /// The user.
        user: UserId,
    },
    /// The master, asked, refused to answer for this project on this host
    /// (it is placed on another host now); the master is reachable.
    #[error("the master refuses access to project {project} on this host: {reason}")]
    RefusedByMaster {
        /// The project.
        project: ProjectId,
        /// What the master said.
        reason: String,
    },
    /// The user's access (or the token's) is below what the action needs.
    #[error("{needed} access needed, {has} granted")]
    Insufficient {
        /// Needed.
        needed: Permission,
        /// Effective permission.
        has: Permission,
    },
}

impl AccessError {
    /// Stable code for audit records and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            AccessError::TokenRevoked { .. } => "token_revoked",
            AccessError::UserRevoked { .. } => "user_revoked",
            AccessError::MasterUnreachable { .. } => "master_unreachable",
            AccessError::NotCachedOffline { .. } => "acl_not_cached_offline",
            AccessError::NeedsRefresh { .. } => "acl_needs_refresh",
            AccessError::Denied { .. } => "acl_denied",
            AccessError::RefusedByMaster { .. } => "master_refused",
            AccessError::Insufficient { .. } => "acl_insufficient",
        }
    }

    /// HTTP status for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            AccessError::MasterUnreachable { .. } | AccessError::NotCachedOffline { .. } => 503,
            AccessError::NeedsRefresh { .. } => 503,
            AccessError::TokenRevoked { .. } | AccessError::UserRevoked { .. } => 401,
            AccessError::Denied { .. }
            | AccessError::RefusedByMaster { .. }
            | AccessError::Insufficient { .. } => 403,
        }
    }
}

impl From<&AccessError> for cocalc_core::ApiError {
    fn from(e: &AccessError) -> Self {
        cocalc_core::ApiError::new(e.http_status(), e.code(), e.to_string())
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    permission: Option<Permission>,
    written: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down { since: Timestamp },
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<(ProjectId, UserId), Entry>,
    user_cutoff: HashMap<UserId, Timestamp>,
    revoked: HashMap<String, Timestamp>,
    link: Link,
}

/// The host's ACL cache. Cheap to share behind an `Arc`; all methods take
/// `&self`.
#[derive(Debug)]
pub struct AclCache {
    clock: SharedClock,
    policy: AclPolicy,
    inner: RwLock<Inner>,
}

/// User cutoffs and revoked token ids (with their expiry), as
/// [`AclCache::revocations`] reports them.
pub type Revocations = (Vec<(UserId, Timestamp)>, Vec<(String, Timestamp)>);

/// A snapshot of one cache entry, for persistence and inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    /// The project.
    pub project: ProjectId,
    /// The user.
    pub user: UserId,
    /// Their permission, or `None` for "no access".
    pub permission: Option<Permission>,
    /// When it was written.
    pub written: Timestamp,
}

impl AclCache {
    /// An empty cache, link down since now.
    pub fn new(clock: SharedClock, policy: AclPolicy) -> Self {
        let now = clock.now();
        AclCache {
            clock,
            policy,
            inner: RwLock::new(Inner {
                entries: HashMap::new(),
                user_cutoff: HashMap::new(),
                revoked: HashMap::new(),
                link: Link::Down { since: now },
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // Each method leaves `Inner` consistent before it could panic.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy in force.
    pub fn policy(&self) -> AclPolicy {
        self.policy
    }

    /// Records that the master link is up (call on every successful contact).
    pub fn master_up(&self) {
        self.write().link = Link::Up;
    }

    /// Records that the master link went down. The grace counts from the
    /// first call after the link was up; repeated calls do not extend it.
    pub fn master_down(&self) {
        let now = self.clock.now();
        let mut g = self.write();
        if g.link == Link::Up {
            g.link = Link::Down { since: now };
        }
    }

    /// `Some(since)` while the link is down.
    pub fn master_down_since(&self) -> Option<Timestamp> {
        match self.read().link {
            Link::Up => None,
            Link::Down { since } => Some(since),
        }
    }

    /// Sets (or with `None`, refuses) a user's access, fresh from now.
    pub fn set(&self, project: ProjectId, user: UserId, permission: Option<Permission>) {
        let written = self.clock.now();
        self.write().entries.insert(
            (project, user),
            Entry {
                permission,
                written,
            },
        );
    }

    /// Restores an entry with its original write time (from a local store).
    pub fn restore(&self, entry: AclEntry) {
        self.write().entries.insert(
            (entry.project, entry.user),
            Entry {
                permission: entry.permission,
                written: entry.written,
            },
        );
    }

    /// Forgets one entry (the next check needs the master).
    pub fn remove(&self, project: ProjectId, user: UserId) {
        self.write().entries.remove(&(project, user));
    }

    /// Forgets every entry of a project.
    pub fn remove_project(&self, project: ProjectId) {
        self.write().entries.retain(|(p, _), _| *p != project);
    }

    /// Refuses every token of `user` issued before `not_before`. A later
    /// cutoff replaces an earlier one; an earlier one is ignored.
    pub fn revoke_user(&self, user: UserId, not_before: Timestamp) {
        let mut g = self.write();
        let e = g.user_cutoff.entry(user).or_insert(not_before);
        if *e < not_before {
            *e = not_before;
        }
    }

    /// Refuses the token with this `jti`; the entry is dropped by
    /// [`prune`](AclCache::prune) after `expires`.
    pub fn revoke_token(&self, token_id: impl Into<String>, expires: Timestamp) {
        self.write().revoked.insert(token_id.into(), expires);
    }

    /// Drops revocations of tokens that have expired anyway (plus `skew`).
    pub fn prune(&self, skew: Duration) {
        let now = self.clock.now();
        self.write()
            .revoked
            .retain(|_, exp| exp.saturating_add(skew) > now);
    }

    /// The revocations in force, for persistence: user cutoffs and revoked
    /// token ids with their expiry (restore them with
    /// [`revoke_user`](AclCache::revoke_user) and
    /// [`revoke_token`](AclCache::revoke_token)).
    pub fn revocations(&self) -> Revocations {
        let g = self.read();
        (
            g.user_cutoff.iter().map(|(u, t)| (*u, *t)).collect(),
            g.revoked.iter().map(|(j, t)| (j.clone(), *t)).collect(),
        )
    }

    /// Every entry, for persistence.
    pub fn entries(&self) -> Vec<AclEntry> {
        self.read()
            .entries
            .iter()
            .map(|(&(project, user), e)| AclEntry {
                project,
                user,
                permission: e.permission,
                written: e.written,
            })
            .collect()
    }

    /// Decides whether the bearer of `claims` may act with `needed` on the
    /// token's project. Returns the effective permission. A token of
    /// [`UserId::MASTER`] (after the revocation checks) has the permission
    /// it carries, whatever the cache holds and whether or not the master
    /// is reachable.
    pub fn check(
        &self,
        claims: &TokenClaims,
        needed: Permission,
    ) -> Result<Permission, AccessError> {
        let now = self.clock.now();
        let g = self.read();
        if g.revoked.contains_key(&claims.token_id) {
            return Err(AccessError::TokenRevoked {
                token_id: claims.token_id.clone(),
            });
        }
        if let Some(&cutoff) = g.user_cutoff.get(&claims.user) {
            if claims.issued_at < cutoff {
                return Err(AccessError::UserRevoked {
                    user: claims.user,
                    not_before: cutoff,
                });
            }
        }
        if claims.user.is_master() {
            // The master's own tokens (moves) carry the access they grant:
            // the master is where ACLs come from, so there is none to ask.
            if !claims.permission.allows(needed) {
                return Err(AccessError::Insufficient {
                    needed,
                    has: claims.permission,
                });
            }
            return Ok(claims.permission);
        }
        let (project, user) = (claims.project, claims.user);
        let entry = g.entries.get(&(project, user)).copied();
        let entry = match g.link {
            Link::Down { since } => {
                if now >= since.saturating_add(self.policy.offline_grace) {
                    return Err(AccessError::MasterUnreachable {
                        since,
                        grace: self.policy.offline_grace,
                    });
                }
                entry.ok_or(AccessError::NotCachedOffline { project, user })?
            }
            Link::Up => match entry {
                Some(e) if now < e.written.saturating_add(self.policy.ttl) => e,
                _ => return Err(AccessError::NeedsRefresh { project, user }),
            },
        };
        let acl = entry
            .permission
            .ok_or(AccessError::Denied { project, user })?;
        let has = acl.min(claims.permission);
        if !has.allows(needed) {
            return Err(AccessError::Insufficient { needed, has });
        }
        Ok(has)
    }
}
