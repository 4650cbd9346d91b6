//! The host agent's generation fence and start on demand, with the process
//! runner and directory storage (no privileges needed).

use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::{AclCache, AclPolicy, Gate, MemoryAuditSink};
use cocalc_core::{
    Generation, HostId, ManualClock, Permission, ProjectId, ProjectState, StaticTokenVerifier,
    Timestamp, TokenClaims, UserId,
};
use cocalc_host::local_store::LocalStore;
use cocalc_host::{AgentConfig, AgentError, HostAgent, ImagePolicy, ProcessRunner};
use cocalc_storage::DirStorage;

const T0: i64 = 1_800_000_000;

fn claims(project: ProjectId, host: HostId, generation: u64) -> TokenClaims {
    TokenClaims::new(
        "m".into(),
        UserId::new_v4([2; 16]),
        project,
        host,
        Generation(generation),
        Permission::Write,
        Timestamp::from_secs(T0),
        Timestamp::from_secs(T0),
        Timestamp::from_secs(T0 + 600),
        format!("jti-{generation}"),
        "kid".into(),
    )
}

async fn agent(dir: &std::path::Path, local: LocalStore) -> (HostAgent, ProjectId) {
    agent_on(dir, local, HostId::new_v4([1; 16])).await
}

/// [`agent`] for another host id (its tokens name that host).
async fn agent_on(
    dir: &std::path::Path,
    local: LocalStore,
    host: HostId,
) -> (HostAgent, ProjectId) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let project = ProjectId::new_v4([3; 16]);
    let mut v = StaticTokenVerifier::new(host, clock.clone());
    for g in 1..=3 {
        v.insert(format!("gen{g}"), claims(project, host, g));
        let mut m = claims(project, host, g);
        m.user = UserId::MASTER;
        m.permission = Permission::Admin;
        m.token_id = format!("master-{g}");
        v.insert(format!("master{g}"), m);
    }
    let acl = Arc::new(AclCache::new(clock.clone(), AclPolicy::default()));
    acl.master_up();
    acl.set(project, UserId::new_v4([2; 16]), Some(Permission::Write));
    let gate = Gate::new(
        host,
        Arc::new(v),
        acl,
        Arc::new(MemoryAuditSink::new()),
        clock.clone(),
    );
    let storage = Arc::new(DirStorage::new(dir.join("projects"), clock.clone()).unwrap());
    let runner = Arc::new(ProcessRunner::new(ImagePolicy::single("host"), clock));
    let a = HostAgent::new(AgentConfig::new(host), runner, storage, gate).with_local_store(local);
    a.restore().await.unwrap();
    (a, project)
}

#[tokio::test]
async fn tokens_and_commands_for_older_generations_are_refused_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("local.db");
    {
        let (a, p) = agent(dir.path(), LocalStore::open(&db).unwrap()).await;
        // The first request starts the project on demand (volume created).
        let g = a
            .authorize("gen2", p, Permission::Write, "exec")
            .await
            .unwrap();
        assert_eq!(
            a.ensure_running(&g).await.unwrap().state,
            ProjectState::Running
        );
        // An older generation's token is stale now.
        let e = a
            .authorize("gen1", p, Permission::Write, "exec")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::StaleGeneration {
                    got: Generation(1),
                    seen: Generation(2),
                    ..
                }
            ),
            "{e}"
        );
        // So is a master command for it; a newer one moves the fence.
        assert!(matches!(
            a.start_at(p, Generation(1)).await,
            Err(AgentError::StaleGeneration { .. })
        ));
        a.start_at(p, Generation(3)).await.unwrap();
        assert!(a
            .authorize("gen2", p, Permission::Write, "exec")
            .await
            .is_err());
        a.stop(p).await.unwrap();
        assert_eq!(a.status(p).await.unwrap().state, ProjectState::Stopped);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A restarted agent remembers the fence from its local store.
    let (a, p) = agent(dir.path(), LocalStore::open(&db).unwrap()).await;
    assert_eq!(a.fence(p), Some(Generation(3)));
    assert!(matches!(
        a.authorize("gen2", p, Permission::Write, "exec").await,
        Err(AgentError::StaleGeneration { .. })
    ));
    assert!(a
        .authorize("gen3", p, Permission::Write, "exec")
        .await
        .is_ok());
}

#[tokio::test]
async fn stop_all_stops_every_running_project() {
    let dir = tempfile::tempdir().unwrap();
    let (a, p) = agent(
        dir.path(),
        LocalStore::open(&dir.path().join("l.db")).unwrap(),
    )
    .await;
    let q = ProjectId::new_v4([4; 16]);
    assert!(a.stop_all().await.unwrap().is_empty(), "nothing runs yet");
    for project in [p, q] {
        let s = a.start_at(project, Generation(1)).await.unwrap();
        assert_eq!(s.state, ProjectState::Running);
    }
    let failed = a.stop_all().await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    for project in [p, q] {
        assert_eq!(
            a.status(project).await.unwrap().state,
            ProjectState::Stopped
        );
    }
    let listed = a.runner().list().await.unwrap();
    assert!(
        listed.iter().all(|s| s.state != ProjectState::Running),
        "{listed:?}"
    );
}

#[tokio::test]
async fn a_move_freezes_the_source_and_only_the_master_drives_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, p) = agent(
        dir.path(),
        LocalStore::open(&dir.path().join("local.db")).unwrap(),
    )
    .await;
    let user = a
        .authorize("gen2", p, Permission::Write, "exec")
        .await
        .unwrap();
    a.ensure_running(&user).await.unwrap();
    // A user's token, even one allowed to write, makes no move calls.
    assert!(matches!(
        a.move_snapshot(&user, true).await,
        Err(AgentError::MasterOnly(_))
    ));
    assert!(matches!(
        a.move_release(&user).await,
        Err(AgentError::MasterOnly(_))
    ));
    let m = a
        .authorize("master2", p, Permission::Admin, "move_snapshot")
        .await
        .unwrap();
    let base = a.move_snapshot(&m, false).await.unwrap();
    assert!(!base.was_running && !a.is_frozen(p));
    assert_eq!(a.status(p).await.unwrap().state, ProjectState::Running);
    // Frozen: stopped, and no start gets through until thawed.
    let frozen = a.move_snapshot(&m, true).await.unwrap();
    assert!(frozen.was_running && a.is_frozen(p), "{frozen:?}");
    assert_eq!(frozen.snapshot, base.snapshot, "nothing changed");
    assert_eq!(a.status(p).await.unwrap().state, ProjectState::Stopped);
    let e = a.ensure_running(&user).await.unwrap_err();
    assert!(matches!(e, AgentError::Moving(_)), "{e}");
    assert_eq!(cocalc_core::ApiError::from(&e).code, "project_moving");
    assert!(matches!(
        a.start_at(p, Generation(2)).await,
        Err(AgentError::Moving(_))
    ));
    // A second freeze answers what the first saw.
    assert!(a.move_snapshot(&m, true).await.unwrap().was_running);
    // A full copy into a host that holds the project is refused first.
    let pull = cocalc_core::moves::MovePullRequest::new(
        "http://127.0.0.1:9".into(),
        "t".into(),
        base.snapshot.clone(),
        None,
        false,
    );
    assert!(matches!(
        a.move_pull(&m, &pull).await,
        Err(AgentError::VolumeExists(_))
    ));
    // Thawed with restart: it runs again, as before the freeze.
    a.move_thaw(&m, true).await.unwrap();
    assert!(!a.is_frozen(p));
    assert_eq!(a.status(p).await.unwrap().state, ProjectState::Running);
    // Frozen again and thawed without restart: it stays stopped.
    a.move_snapshot(&m, true).await.unwrap();
    a.move_thaw(&m, false).await.unwrap();
    assert_eq!(a.status(p).await.unwrap().state, ProjectState::Stopped);
    // A discard naming a snapshot this copy does not hold leaves it alone
    // (it is not that move's copy).
    assert!(!a
        .move_discard(&m, Some("2000-01-01T00:00:00.000Z"))
        .await
        .unwrap());
    assert!(a.storage().volume(p).await.is_ok());
    // Released with the next generation: the copy is gone and the old
    // placement's tokens are refused.
    let m3 = a
        .authorize("master3", p, Permission::Admin, "move_release")
        .await
        .unwrap();
    a.move_release(&m3).await.unwrap();
    assert!(a.storage().volume(p).await.is_err());
    assert!(matches!(
        a.authorize("gen2", p, Permission::Write, "exec").await,
        Err(AgentError::StaleGeneration { .. })
    ));
}

#[tokio::test]
async fn a_pushed_fence_stops_the_project_and_outlives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("local.db");
    {
        let (a, p) = agent(dir.path(), LocalStore::open(&db).unwrap()).await;
        let g = a
            .authorize("gen1", p, Permission::Write, "exec")
            .await
            .unwrap();
        a.ensure_running(&g).await.unwrap();
        a.fence_at(p, Generation(3)).await.unwrap();
        assert_eq!(a.status(p).await.unwrap().state, ProjectState::Stopped);
        assert_eq!(a.fence(p), Some(Generation(3)));
        assert!(matches!(
            a.authorize("gen2", p, Permission::Write, "exec").await,
            Err(AgentError::StaleGeneration { .. })
        ));
        // A fence never goes back.
        a.fence_at(p, Generation(2)).await.unwrap();
        assert_eq!(a.fence(p), Some(Generation(3)));
    }
    let (a, p) = agent(dir.path(), LocalStore::open(&db).unwrap()).await;
    assert_eq!(a.fence(p), Some(Generation(3)));
}

/// A pull whose caller goes away (the master stopped, or gave up on the
/// target) still runs to its end, and a discard waits for it, so it sees
/// the copy the pull made and deletes it: nothing half-received is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_outlives_its_caller_and_a_discard_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    let dst_dir = dir.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let (src, p) = agent(&src_dir, LocalStore::open(&src_dir.join("l.db")).unwrap()).await;
    let (dst, _) = agent_on(
        &dst_dir,
        LocalStore::open(&dst_dir.join("l.db")).unwrap(),
        HostId::new_v4([4; 16]),
    )
    .await;
    let home = src.volume(p).await.unwrap().home;
    std::fs::write(home.join("big.bin"), vec![5u8; 24 << 20]).unwrap();
    let src = Arc::new(src);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, cocalc_host::dataplane::router(src.clone()))
            .await
            .unwrap();
    });
    let on_src = cocalc_client::HostClient::new(&url, p, "master2");
    let base = on_src.move_snapshot(false).await.unwrap().snapshot;

    let m = dst
        .authorize("master2", p, Permission::Admin, "move_pull")
        .await
        .unwrap();
    let req = cocalc_core::moves::MovePullRequest::new(
        url.clone(),
        "master2".into(),
        base.clone(),
        None,
        false,
    );
    // The caller gives up almost at once: the pull goes on.
    let cut = tokio::time::timeout(Duration::from_millis(5), dst.move_pull(&m, &req)).await;
    assert!(cut.is_err(), "the pull ended within 5 ms: {cut:?}");
    assert!(
        dst.move_discard(&m, Some(&base)).await.unwrap(),
        "the pull's copy was deleted"
    );
    assert!(dst.storage().volume(p).await.is_err());
    // Done again, to the end: the copy is whole.
    let got = dst.move_pull(&m, &req).await.unwrap();
    assert_eq!(got.name, base);
    let copied = dst.storage().volume(p).await.unwrap().home.join("big.bin");
    assert_eq!(std::fs::read(copied).unwrap().len(), 24 << 20);
}
