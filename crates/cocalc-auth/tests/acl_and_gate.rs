//! The host's ACL cache and the gate: TTL, push invalidation, revocations,
//! offline grace — all on a manual clock, no sleeps.

use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::{
    AccessError, AclCache, AclPolicy, AuthError, Gate, KeySet, MemoryAuditSink, MintRequest,
    Minter, Verifier,
};
use cocalc_core::{
    AuditOutcome, Generation, HostId, ManualClock, Permission, ProjectId, Timestamp, TokenClaims,
    TokenError, UserId,
};

const T0: i64 = 1_800_000_000;
const MIN: Duration = Duration::from_secs(60);

fn claims(user: UserId, project: ProjectId, perm: Permission, iat: i64, jti: &str) -> TokenClaims {
    TokenClaims::new(
        "m".into(),
        user,
        project,
        HostId::new_v4([1; 16]),
        Generation(1),
        perm,
        Timestamp::from_secs(iat),
        Timestamp::from_secs(iat),
        Timestamp::from_secs(iat + 600),
        jti.into(),
        "k4.pid.x".into(),
    )
}

fn setup() -> (ManualClock, AclCache, UserId, ProjectId) {
    let clock = ManualClock::new(Timestamp::from_secs(T0));
    let acl = AclCache::new(Arc::new(clock.clone()), AclPolicy::new(5 * MIN, 60 * MIN));
    (
        clock,
        acl,
        UserId::new_v4([2; 16]),
        ProjectId::new_v4([3; 16]),
    )
}

#[test]
fn fresh_entries_serve_and_stale_ones_need_refresh() {
    let (clock, acl, u, p) = setup();
    acl.master_up();
    let c = claims(u, p, Permission::Admin, T0, "j1");
    assert_eq!(
        acl.check(&c, Permission::Read),
        Err(AccessError::NeedsRefresh {
            project: p,
            user: u
        })
    );
    acl.set(p, u, Some(Permission::Write));
    // Effective permission is the lesser of token (admin) and ACL (write).
    assert_eq!(acl.check(&c, Permission::Read), Ok(Permission::Write));
    assert_eq!(
        acl.check(&c, Permission::Admin),
        Err(AccessError::Insufficient {
            needed: Permission::Admin,
            has: Permission::Write
        })
    );
    clock.advance(5 * MIN);
    assert!(matches!(
        acl.check(&c, Permission::Read),
        Err(AccessError::NeedsRefresh { .. })
    ));
    acl.set(p, u, Some(Permission::Write));
    assert!(acl.check(&c, Permission::Read).is_ok());
}

#[test]
fn token_permission_caps_the_acl() {
    let (_clock, acl, u, p) = setup();
    acl.master_up();
    acl.set(p, u, Some(Permission::Admin));
    let c = claims(u, p, Permission::Read, T0, "j");
    assert_eq!(acl.check(&c, Permission::Read), Ok(Permission::Read));
    assert!(matches!(
        acl.check(&c, Permission::Write),
        Err(AccessError::Insufficient { .. })
    ));
}

#[test]
fn push_invalidation_removes_and_replaces_entries() {
    let (_clock, acl, u, p) = setup();
    acl.master_up();
    let c = claims(u, p, Permission::Write, T0, "j");
    acl.set(p, u, Some(Permission::Write));
    assert!(acl.check(&c, Permission::Write).is_ok());
    // Collaborator removed: the master pushes "no access".
    acl.set(p, u, None);
    assert_eq!(
        acl.check(&c, Permission::Read),
        Err(AccessError::Denied {
            project: p,
            user: u
        })
    );
    // Replaced by a read-only grant.
    acl.set(p, u, Some(Permission::Read));
    assert_eq!(acl.check(&c, Permission::Read), Ok(Permission::Read));
    // Dropped entirely: must ask again.
    acl.remove(p, u);
    assert!(matches!(
        acl.check(&c, Permission::Read),
        Err(AccessError::NeedsRefresh { .. })
    ));
    acl.set(p, u, Some(Permission::Read));
    acl.remove_project(p);
    assert!(acl.entries().is_empty());
}

#[test]
fn master_tokens_carry_their_own_permission_but_not_past_revocation() {
    let (clock, acl, _u, p) = setup();
    let m = UserId::MASTER;
    assert!(m.is_master() && !UserId::new_v4([0; 16]).is_master());
    // No entry, and the link counts as down: a user's token would be
    // refused; the master's own is served with what it carries.
    let c = claims(m, p, Permission::Admin, T0, "move-1");
    assert_eq!(acl.check(&c, Permission::Admin), Ok(Permission::Admin));
    clock.advance(120 * MIN);
    assert_eq!(acl.check(&c, Permission::Write), Ok(Permission::Admin));
    let weak = claims(m, p, Permission::Read, T0, "move-2");
    assert_eq!(
        acl.check(&weak, Permission::Write),
        Err(AccessError::Insufficient {
            needed: Permission::Write,
            has: Permission::Read
        })
    );
    acl.revoke_token("move-1", c.expires);
    assert!(matches!(
        acl.check(&c, Permission::Read),
        Err(AccessError::TokenRevoked { .. })
    ));
}

#[test]
fn user_cutoff_and_token_revocation_apply_at_once() {
    let (clock, acl, u, p) = setup();
    acl.master_up();
    acl.set(p, u, Some(Permission::Write));
    let old = claims(u, p, Permission::Write, T0, "old");
    clock.advance(MIN);
    let newer = claims(u, p, Permission::Write, T0 + 60, "new");
    // Sign out everywhere at T0 + 30 s: the older token dies, the newer lives.
    acl.revoke_user(u, Timestamp::from_secs(T0 + 30));
    assert!(matches!(
        acl.check(&old, Permission::Read),
        Err(AccessError::UserRevoked { .. })
    ));
    assert!(acl.check(&newer, Permission::Read).is_ok());
    // An earlier cutoff does not undo a later one.
    acl.revoke_user(u, Timestamp::from_secs(T0 - 100));
    assert!(acl.check(&old, Permission::Read).is_err());
    // Revoking one jti.
    acl.revoke_token("new", newer.expires);
    assert_eq!(
        acl.check(&newer, Permission::Read),
        Err(AccessError::TokenRevoked {
            token_id: "new".into()
        })
    );
    // Pruning keeps revocations until the token has expired anyway.
    acl.prune(Duration::from_secs(30));
    assert!(acl.check(&newer, Permission::Read).is_err());
    clock.set(newer.expires.saturating_add(Duration::from_secs(31)));
    acl.prune(Duration::from_secs(30));
    // After pruning the revocation is gone; the token itself is expired, which
    // the verifier (not the ACL cache) refuses.
    acl.set(p, u, Some(Permission::Write));
    assert!(acl.check(&newer, Permission::Read).is_ok());
}

#[test]
fn offline_grace_serves_cached_entries_then_refuses_everything() {
    let (clock, acl, u, p) = setup();
    acl.master_up();
    acl.set(p, u, Some(Permission::Write));
    let c = claims(u, p, Permission::Write, T0, "j");
    let stranger = claims(UserId::new_v4([9; 16]), p, Permission::Write, T0, "s");

    clock.advance(MIN);
    acl.master_down();
    let down_at = Timestamp::from_secs(T0 + 60);
    assert_eq!(acl.master_down_since(), Some(down_at));
    // Stale by TTL, but the master is away: served from cache.
    clock.advance(30 * MIN);
    assert_eq!(acl.check(&c, Permission::Write), Ok(Permission::Write));
    // No entry and no master: refused, saying why.
    assert!(matches!(
        acl.check(&stranger, Permission::Read),
        Err(AccessError::NotCachedOffline { .. })
    ));
    // Repeated "down" reports do not extend the grace.
    acl.master_down();
    clock.set(
        down_at
            .saturating_add(60 * MIN)
            .saturating_sub(Duration::from_millis(1)),
    );
    assert!(acl.check(&c, Permission::Write).is_ok());
    clock.set(down_at.saturating_add(60 * MIN));
    let e = acl.check(&c, Permission::Write).unwrap_err();
    assert_eq!(
        e,
        AccessError::MasterUnreachable {
            since: down_at,
            grace: 60 * MIN
        }
    );
    assert!(e.to_string().contains("master unreachable"), "{e}");
    assert_eq!(e.http_status(), 503);
    // The master comes back: fresh answers are needed again.
    acl.master_up();
    assert!(matches!(
        acl.check(&c, Permission::Write),
        Err(AccessError::NeedsRefresh { .. })
    ));
}

#[test]
fn a_new_cache_counts_as_offline_since_creation() {
    let (clock, acl, u, p) = setup();
    // Entries restored from the host's local store, written before a restart.
    acl.restore(cocalc_auth::AclEntry {
        project: p,
        user: u,
        permission: Some(Permission::Read),
        written: Timestamp::from_secs(T0 - 3600),
    });
    let c = claims(u, p, Permission::Read, T0, "j");
    assert!(
        acl.check(&c, Permission::Read).is_ok(),
        "serves at once after restart"
    );
    clock.advance(60 * MIN);
    assert!(matches!(
        acl.check(&c, Permission::Read),
        Err(AccessError::MasterUnreachable { .. })
    ));
}

/// A gate auditing to `audit`, its ACL cache (user `u` may write project
/// `p`), and a write token for `p` on its host, with the token's id.
struct GateFixture {
    gate: Gate,
    acl: Arc<AclCache>,
    host: HostId,
    u: UserId,
    p: ProjectId,
    token: String,
    token_id: String,
}

fn gate_fixture(audit: Arc<dyn cocalc_auth::AuditSink>) -> GateFixture {
    let shared: Arc<ManualClock> = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let keys = KeySet::generate(Timestamp(1)).unwrap();
    let host = HostId::new_v4([1; 16]);
    let (u, p) = (UserId::new_v4([2; 16]), ProjectId::new_v4([3; 16]));
    let minter = Minter::new("m", keys.clone(), shared.clone());
    let verifier = Arc::new(Verifier::new(host, keys.public_only(), shared.clone()));
    let acl = Arc::new(AclCache::new(shared.clone(), AclPolicy::default()));
    let gate = Gate::new(host, verifier, acl.clone(), audit, shared);
    acl.master_up();
    acl.set(p, u, Some(Permission::Write));
    let (token, minted) = minter
        .mint(&MintRequest {
            user: u,
            project: p,
            host,
            generation: Generation(1),
            permission: Permission::Write,
            ttl: 10 * MIN,
        })
        .unwrap();
    GateFixture {
        gate,
        acl,
        host,
        u,
        p,
        token,
        token_id: minted.token_id,
    }
}

#[test]
fn gate_checks_token_project_and_acl_and_audits_everything() {
    let audit = Arc::new(MemoryAuditSink::new());
    let GateFixture {
        gate,
        acl,
        host,
        u,
        p,
        token,
        token_id,
    } = gate_fixture(audit.clone());

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = gate
            .authorize(&token, p, Permission::Write, "exec")
            .await
            .unwrap();
        assert_eq!(g.permission, Permission::Write);
        assert_eq!(g.claims.user, u);

        let other = ProjectId::new_v4([4; 16]);
        let e = gate
            .authorize(&token, other, Permission::Read, "file_read")
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            AuthError::Token(TokenError::WrongProject { .. })
        ));

        let e = gate
            .authorize("v4.public.garbage", p, Permission::Read, "exec")
            .await
            .unwrap_err();
        assert_eq!(e.code(), "token_bad_footer");

        acl.set(p, u, None);
        let e = gate
            .authorize(&token, p, Permission::Read, "exec")
            .await
            .unwrap_err();
        assert_eq!(
            e,
            AuthError::Access(AccessError::Denied {
                project: p,
                user: u
            })
        );
    });

    let recs = audit.records();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[0].outcome, AuditOutcome::Grant);
    assert_eq!(recs[0].action, "exec");
    assert_eq!(recs[0].token_id.as_deref(), Some(token_id.as_str()));
    assert_eq!(recs[1].reason, "token_wrong_project");
    assert_eq!(recs[1].user, Some(u));
    assert_eq!(recs[2].reason, "token_bad_footer");
    assert_eq!(recs[2].user, None, "unverified tokens name no user");
    assert_eq!(recs[3].reason, "acl_denied");
    assert!(recs[1..].iter().all(|r| r.outcome == AuditOutcome::Refuse));
    assert!(recs.iter().all(|r| r.host == Some(host)));
}

/// Answers ACL refreshes as the master would (`permission` for everyone),
/// or fails as an unreachable master does; counts the calls.
struct FakeMaster {
    acl: Arc<AclCache>,
    permission: Option<Permission>,
    reachable: std::sync::atomic::AtomicBool,
    /// Answers "not on this host" (a project moved away).
    refuses: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl cocalc_auth::AclRefresher for FakeMaster {
    async fn refresh(
        &self,
        project: ProjectId,
        user: UserId,
    ) -> Result<(), cocalc_auth::RefreshError> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.reachable.load(Ordering::Relaxed) {
            return Err(cocalc_auth::RefreshError::Unreachable(
                "connection refused".into(),
            ));
        }
        if self.refuses.load(Ordering::Relaxed) {
            return Err(cocalc_auth::RefreshError::Refused(format!(
                "project {project} is not placed on this host"
            )));
        }
        self.acl.set(project, user, self.permission);
        self.acl.master_up();
        Ok(())
    }
}

/// A user the cache has never seen, while the link is thought down (as
/// after a push channel that failed during registration): the gate asks
/// the master rather than refusing, and refuses only if the master cannot
/// answer.
#[test]
fn a_missing_entry_is_asked_for_even_while_the_link_is_thought_down() {
    use std::sync::atomic::Ordering;
    let GateFixture {
        gate,
        acl,
        u,
        p,
        token,
        ..
    } = gate_fixture(Arc::new(MemoryAuditSink::new()));
    let master = Arc::new(FakeMaster {
        acl: acl.clone(),
        permission: Some(Permission::Write),
        reachable: true.into(),
        refuses: false.into(),
        calls: 0.into(),
    });
    let gate = gate.with_refresher(master.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        // Known to the cache: served, link down or not, without asking.
        acl.master_down();
        gate.authorize(&token, p, Permission::Write, "exec")
            .await
            .unwrap();
        assert_eq!(master.calls.load(Ordering::Relaxed), 0);
        // Unknown: asked for, and the link is up again.
        acl.remove(p, u);
        acl.master_down();
        let g = gate
            .authorize(&token, p, Permission::Write, "exec")
            .await
            .unwrap();
        assert_eq!(g.permission, Permission::Write);
        assert_eq!(master.calls.load(Ordering::Relaxed), 1);
        assert_eq!(acl.master_down_since(), None);
        // Unknown with the master really away: refused as before.
        acl.remove(p, u);
        master.reachable.store(false, Ordering::Relaxed);
        acl.master_down();
        let e = gate
            .authorize(&token, p, Permission::Write, "exec")
            .await
            .unwrap_err();
        assert_eq!(e.code(), "acl_not_cached_offline");
        assert_eq!(master.calls.load(Ordering::Relaxed), 2);
        // A master that answers "not on this host" (the project moved
        // away): refused with its reason, and the link counts as up, so
        // other projects are not pushed into offline mode.
        master.reachable.store(true, Ordering::Relaxed);
        master.refuses.store(true, Ordering::Relaxed);
        acl.master_up();
        let e = gate
            .authorize(&token, p, Permission::Write, "exec")
            .await
            .unwrap_err();
        assert_eq!(e.code(), "master_refused");
        assert_eq!(cocalc_core::ApiError::from(&e).status, 403);
        assert!(e.to_string().contains("not placed on this host"), "{e}");
        assert_eq!(acl.master_down_since(), None, "the master answered");
        assert_eq!(master.calls.load(Ordering::Relaxed), 3);
    });
}

/// Keeps refusals only, as a sink that logs grants at a disabled level does.
struct RefusalsOnly(MemoryAuditSink);

impl cocalc_auth::AuditSink for RefusalsOnly {
    fn record(&self, record: cocalc_core::AuditRecord) {
        self.0.record(record);
    }

    fn wants_grants(&self) -> bool {
        false
    }
}

#[test]
fn a_sink_that_wants_no_grants_gets_refusals_only() {
    let audit = Arc::new(RefusalsOnly(MemoryAuditSink::new()));
    let GateFixture { gate, p, token, .. } = gate_fixture(audit.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = gate.authorize(&token, p, Permission::Write, "exec").await;
        assert!(g.is_ok(), "granted all the same");
        let e = gate
            .authorize("v4.public.garbage", p, Permission::Read, "exec")
            .await
            .unwrap_err();
        assert_eq!(e.code(), "token_bad_footer");
    });
    let recs = audit.0.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].outcome, AuditOutcome::Refuse);
    assert_eq!(recs[0].reason, "token_bad_footer");
}
