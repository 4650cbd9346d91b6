//! The host's local SQLite cache: fencing, persistence, ACL and revocation
//! snapshots, and crash safety.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cocalc_auth::{AclCache, AclEntry, AclPolicy};
use cocalc_core::{Generation, ManualClock, Permission, ProjectId, Timestamp, UserId};
use cocalc_host::local_store::{LocalProject, LocalStore, LocalStoreError};

fn pid(n: u8) -> ProjectId {
    ProjectId::new_v4([n; 16])
}

fn uid(n: u8) -> UserId {
    UserId::new_v4([n; 16])
}

fn stale(project: ProjectId, got: u64, seen: u64) -> LocalStoreError {
    LocalStoreError::StaleGeneration {
        project,
        got: Generation(got),
        seen: Generation(seen),
    }
}

#[tokio::test]
async fn admit_records_and_reads_back() {
    let s = LocalStore::open_in_memory().unwrap();
    let p = pid(1);
    assert_eq!(s.project(p).await.unwrap(), None);
    let row = s
        .admit(p, Generation(3), Some("ubuntu:24.04".into()))
        .await
        .unwrap();
    let want = LocalProject {
        project: p,
        generation: Generation(3),
        image: Some("ubuntu:24.04".into()),
        last_use: None,
    };
    assert_eq!(row, want);
    assert_eq!(s.project(p).await.unwrap(), Some(want.clone()));
    assert_eq!(s.projects().await.unwrap(), vec![want]);
}

#[tokio::test]
async fn stale_generation_is_refused_with_a_precise_error() {
    let s = LocalStore::open_in_memory().unwrap();
    let p = pid(1);
    s.admit(p, Generation(5), None).await.unwrap();
    s.touch(p, Timestamp(100)).await.unwrap();
    let err = s
        .admit(p, Generation(4), Some("x".into()))
        .await
        .unwrap_err();
    assert_eq!(err, stale(p, 4, 5));
    let msg = err.to_string();
    assert!(msg.contains(&p.to_string()), "{msg}");
    assert!(msg.contains("generation 4 refused"), "{msg}");
    assert!(msg.contains("already seen generation 5"), "{msg}");
    // Nothing changed.
    let row = s.project(p).await.unwrap().unwrap();
    assert_eq!(row.generation, Generation(5));
    assert_eq!(row.image, None);
    assert_eq!(row.last_use, Some(Timestamp(100)));
}

#[tokio::test]
async fn equal_generation_is_idempotent_and_newer_replaces() {
    let s = LocalStore::open_in_memory().unwrap();
    let p = pid(1);
    let first = s.admit(p, Generation(5), Some("a".into())).await.unwrap();
    s.touch(p, Timestamp(50)).await.unwrap();
    let again = s.admit(p, Generation(5), Some("a".into())).await.unwrap();
    assert_eq!(
        again,
        LocalProject {
            last_use: Some(Timestamp(50)),
            ..first
        }
    );
    // Equal generation with another image: the image is replaced.
    let other = s.admit(p, Generation(5), Some("b".into())).await.unwrap();
    assert_eq!(other.image.as_deref(), Some("b"));
    assert_eq!(other.last_use, Some(Timestamp(50)));

    let newer = s.admit(p, Generation(9), None).await.unwrap();
    assert_eq!(
        newer,
        LocalProject {
            project: p,
            generation: Generation(9),
            image: None,
            last_use: Some(Timestamp(50)),
        }
    );
    assert_eq!(s.project(p).await.unwrap(), Some(newer));
    assert_eq!(
        s.admit(p, Generation(5), None).await.unwrap_err(),
        stale(p, 5, 9)
    );
}

#[tokio::test]
async fn forgotten_project_keeps_its_fence() {
    let s = LocalStore::open_in_memory().unwrap();
    let (p, q) = (pid(1), pid(2));
    s.admit(p, Generation(5), None).await.unwrap();
    s.admit(q, Generation(2), None).await.unwrap();
    s.forget(p).await.unwrap();
    assert_eq!(s.project(p).await.unwrap(), None);
    assert_eq!(
        s.projects()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.project)
            .collect::<Vec<_>>(),
        vec![q]
    );
    // Older: refused.
    assert_eq!(
        s.admit(p, Generation(4), None).await.unwrap_err(),
        stale(p, 4, 5)
    );
    // The forgotten generation itself: over on this host.
    assert_eq!(
        s.admit(p, Generation(5), None).await.unwrap_err(),
        stale(p, 5, 5)
    );
    assert_eq!(s.project(p).await.unwrap(), None);
    // Newer: admitted, fresh row.
    let back = s.admit(p, Generation(6), None).await.unwrap();
    assert_eq!(back.generation, Generation(6));
    assert_eq!(back.last_use, None);
    // Held again: equal is fine once more.
    s.admit(p, Generation(6), None).await.unwrap();
    // Forgetting twice, or an unknown project, changes nothing.
    s.forget(p).await.unwrap();
    s.forget(p).await.unwrap();
    s.forget(pid(9)).await.unwrap();
    assert_eq!(
        s.admit(p, Generation(6), None).await.unwrap_err(),
        stale(p, 6, 6)
    );
    s.admit(pid(9), Generation(1), None).await.unwrap();
    // Other projects are untouched.
    assert_eq!(
        s.project(q).await.unwrap().unwrap().generation,
        Generation(2)
    );
}

#[tokio::test]
async fn projects_are_sorted_by_id() {
    let s = LocalStore::open_in_memory().unwrap();
    for n in [9u8, 3, 200, 1, 77] {
        s.admit(pid(n), Generation(u64::from(n)), None)
            .await
            .unwrap();
    }
    let got: Vec<ProjectId> = s
        .projects()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.project)
        .collect();
    let mut want = got.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(got.len(), 5);
}

#[tokio::test]
async fn touch_is_monotonic() {
    let s = LocalStore::open_in_memory().unwrap();
    let p = pid(1);
    s.admit(p, Generation(1), None).await.unwrap();
    let last = || async { s.project(p).await.unwrap().unwrap().last_use };
    s.touch(p, Timestamp(100)).await.unwrap();
    assert_eq!(last().await, Some(Timestamp(100)));
    s.touch(p, Timestamp(50)).await.unwrap();
    assert_eq!(last().await, Some(Timestamp(100)));
    s.touch(p, Timestamp(100)).await.unwrap();
    assert_eq!(last().await, Some(Timestamp(100)));
    s.touch(p, Timestamp(150)).await.unwrap();
    assert_eq!(last().await, Some(Timestamp(150)));
    // A project this host does not hold: ignored, no row appears.
    s.touch(pid(2), Timestamp(10)).await.unwrap();
    assert_eq!(s.project(pid(2)).await.unwrap(), None);
}

#[tokio::test]
async fn generation_out_of_range_is_refused() {
    let s = LocalStore::open_in_memory().unwrap();
    let err = s
        .admit(pid(1), Generation(u64::MAX), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LocalStoreError::Backend(m) if m.contains("out of range")),
        "{err}"
    );
    assert_eq!(s.project(pid(1)).await.unwrap(), None);
    let top = Generation(i64::MAX as u64);
    assert_eq!(s.admit(pid(1), top, None).await.unwrap().generation, top);
}

fn acl_entries() -> Vec<AclEntry> {
    vec![
        AclEntry {
            project: pid(1),
            user: uid(1),
            permission: Some(Permission::Admin),
            written: Timestamp(1_000),
        },
        AclEntry {
            project: pid(1),
            user: uid(2),
            permission: None,
            written: Timestamp(2_000),
        },
        AclEntry {
            project: pid(2),
            user: uid(1),
            permission: Some(Permission::Read),
            written: Timestamp(-5),
        },
        AclEntry {
            project: pid(3),
            user: uid(3),
            permission: Some(Permission::Write),
            written: Timestamp(i64::MAX),
        },
    ]
}

fn sorted(mut v: Vec<AclEntry>) -> Vec<AclEntry> {
    v.sort_by_key(|e| (e.project, e.user));
    v
}

#[tokio::test]
async fn acl_snapshot_round_trips_through_the_cache() {
    let s = LocalStore::open_in_memory().unwrap();
    assert_eq!(s.load_acl().await.unwrap(), vec![]);

    // From a live cache to the store and back into a fresh cache.
    let clock = ManualClock::new(Timestamp(0));
    let cache = AclCache::new(Arc::new(clock.clone()), AclPolicy::default());
    for e in acl_entries() {
        cache.restore(e);
    }
    s.save_acl(&cache.entries()).await.unwrap();
    let loaded = s.load_acl().await.unwrap();
    assert_eq!(loaded, sorted(acl_entries()));

    let restored = AclCache::new(Arc::new(clock), AclPolicy::default());
    for e in loaded {
        restored.restore(e);
    }
    assert_eq!(sorted(restored.entries()), sorted(acl_entries()));

    // A later snapshot replaces the earlier one entirely.
    let later = vec![AclEntry {
        project: pid(4),
        user: uid(4),
        permission: None,
        written: Timestamp(7),
    }];
    s.save_acl(&later).await.unwrap();
    assert_eq!(s.load_acl().await.unwrap(), later);
    s.save_acl(&[]).await.unwrap();
    assert_eq!(s.load_acl().await.unwrap(), vec![]);
}

#[tokio::test]
async fn revocations_round_trip_and_replace() {
    let s = LocalStore::open_in_memory().unwrap();
    assert_eq!(s.load_revocations().await.unwrap(), (vec![], vec![]));
    let users = vec![(uid(2), Timestamp(200)), (uid(1), Timestamp(100))];
    let tokens = vec![
        ("tok-b".to_string(), Timestamp(20)),
        ("tok-a".to_string(), Timestamp(10)),
    ];
    s.save_revocations(&users, &tokens).await.unwrap();
    let (u, t) = s.load_revocations().await.unwrap();
    assert_eq!(u, vec![(uid(1), Timestamp(100)), (uid(2), Timestamp(200))]);
    assert_eq!(
        t,
        vec![
            ("tok-a".to_string(), Timestamp(10)),
            ("tok-b".to_string(), Timestamp(20))
        ]
    );

    // Duplicates keep the later time (a revocation never shrinks).
    s.save_revocations(
        &[(uid(3), Timestamp(300)), (uid(3), Timestamp(30))],
        &[
            ("t".to_string(), Timestamp(5)),
            ("t".to_string(), Timestamp(9)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        s.load_revocations().await.unwrap(),
        (
            vec![(uid(3), Timestamp(300))],
            vec![("t".to_string(), Timestamp(9))]
        )
    );

    s.save_revocations(&[], &[]).await.unwrap();
    assert_eq!(s.load_revocations().await.unwrap(), (vec![], vec![]));
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("host.db");
    {
        let s = LocalStore::open(&db).unwrap();
        s.admit(pid(1), Generation(4), Some("img".into()))
            .await
            .unwrap();
        s.touch(pid(1), Timestamp(42)).await.unwrap();
        s.admit(pid(2), Generation(7), None).await.unwrap();
        s.forget(pid(2)).await.unwrap();
        s.save_acl(&acl_entries()).await.unwrap();
        s.save_revocations(
            &[(uid(1), Timestamp(11))],
            &[("jti-1".to_string(), Timestamp(99))],
        )
        .await
        .unwrap();
    }
    let s = LocalStore::open(&db).unwrap();
    assert_eq!(
        s.projects().await.unwrap(),
        vec![LocalProject {
            project: pid(1),
            generation: Generation(4),
            image: Some("img".into()),
            last_use: Some(Timestamp(42)),
        }]
    );
    assert_eq!(
        s.admit(pid(1), Generation(3), None).await.unwrap_err(),
        stale(pid(1), 3, 4)
    );
    assert_eq!(
        s.admit(pid(2), Generation(7), None).await.unwrap_err(),
        stale(pid(2), 7, 7)
    );
    assert_eq!(s.load_acl().await.unwrap(), sorted(acl_entries()));
    assert_eq!(
        s.load_revocations().await.unwrap(),
        (
            vec![(uid(1), Timestamp(11))],
            vec![("jti-1".to_string(), Timestamp(99))]
        )
    );

    // The database is in WAL mode with synchronous=FULL.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn open_refuses_a_newer_schema_and_a_non_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("host.db");
    drop(LocalStore::open(&db).unwrap());
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = LocalStore::open(&db).unwrap_err();
    assert!(
        matches!(&err, LocalStoreError::Backend(m) if m.contains("schema version 99")),
        "{err}"
    );

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    assert!(matches!(
        LocalStore::open(&junk),
        Err(LocalStoreError::Backend(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admits_end_with_the_newest_generation() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(&dir.path().join("host.db")).unwrap();
    let p = pid(1);
    for round in 0..5u64 {
        let base = round * 100;
        let mut tasks = Vec::new();
        // Several tasks per generation, generations in a scrambled order.
        for i in 0..24u64 {
            let g = base + 1 + (i * 7) % 12;
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                (g, s.admit(p, Generation(g), None).await)
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                (g, Ok(row)) => assert_eq!(row.generation, Generation(g)),
                (g, Err(LocalStoreError::StaleGeneration { got, seen, .. })) => {
                    assert_eq!(got, Generation(g));
                    assert!(seen > got, "refused {got} while the newest was {seen}");
                }
                (_, Err(e)) => panic!("{e}"),
            }
        }
        assert_eq!(
            s.project(p).await.unwrap().unwrap().generation,
            Generation(base + 12)
        );
    }
}

const BURST_ENV: &str = "COCALC_LOCAL_STORE_BURST_DB";
const BURST_PROJECTS: u64 = 50;

/// In the child process: admit, touch, forget and snapshot as fast as
/// possible until killed.
async fn burst(path: &str) {
    let store = LocalStore::open(Path::new(path)).unwrap();
    let mut n: u64 = 0;
    loop {
        let p = pid((n % BURST_PROJECTS) as u8);
        let g = Generation(n / BURST_PROJECTS + 1);
        store.admit(p, g, Some(format!("img-{n}"))).await.unwrap();
        store.touch(p, Timestamp(n as i64)).await.unwrap();
        if n % 7 == 0 {
            store.forget(p).await.unwrap();
        }
        if n % 13 == 0 {
            // A snapshot of k entries, all written at n: after the crash the
            // table must hold one whole snapshot.
            let k = (n % 5 + 1) as u8;
            let entries: Vec<AclEntry> = (0..k)
                .map(|i| AclEntry {
                    project: p,
                    user: uid(i),
                    permission: (i % 2 == 0).then_some(Permission::Write),
                    written: Timestamp(n as i64),
                })
                .collect();
            store.save_acl(&entries).await.unwrap();
        }
        n += 1;
        if n == 400 {
            // Tell the parent the burst is under way.
            std::fs::write(format!("{path}.started"), b"").unwrap();
        }
    }
}

/// Kills the burst process if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn store_survives_kill_mid_burst() {
    if let Ok(path) = std::env::var(BURST_ENV) {
        burst(&path).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("host.db");
    let db_s = db.to_str().unwrap().to_string();
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store_survives_kill_mid_burst", "--nocapture"])
            .env(BURST_ENV, &db_s)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let started = std::path::PathBuf::from(format!("{db_s}.started"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "burst never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "burst process exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL: no chance to finish a transaction cleanly
    child.wait().unwrap();

    // Raw look: integrity holds, every held project has a fence at least
    // its generation, and the ACL table holds one whole snapshot.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let rows: Vec<(String, i64, Option<i64>)> = conn
        .prepare(
            "SELECT p.project, p.generation, f.generation FROM projects p
             LEFT JOIN fences f ON f.project = p.project",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (project, generation, fence) in &rows {
        let fence = fence.unwrap_or_else(|| panic!("{project}: held without a fence"));
        assert!(
            fence >= *generation,
            "{project}: fence {fence} < {generation}"
        );
    }
    let fences: Vec<(String, i64)> = conn
        .prepare("SELECT project, generation FROM fences")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(fences.len() as u64, BURST_PROJECTS, "every project fenced");
    let total: i64 = fences.iter().map(|f| f.1).sum();
    assert!(total >= 400, "burst wrote {total}");
    let (count, distinct_written, written): (i64, i64, Option<i64>) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT written), MAX(written) FROM acl",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let written = written.expect("an ACL snapshot was saved");
    assert_eq!(distinct_written, 1, "one snapshot, not a mix");
    assert_eq!(count, written % 5 + 1, "the whole snapshot of {written}");
    drop(conn);

    // Through the store: every fence still refuses its own generation and
    // older ones, and admits the next.
    let s = LocalStore::open(&db).unwrap();
    let held = s.projects().await.unwrap();
    assert_eq!(held.len(), rows.len());
    for (project, fence) in fences {
        let p: ProjectId = project.parse().unwrap();
        let fence = fence as u64;
        let is_held = held.iter().any(|r| r.project == p);
        let older = s.admit(p, Generation(fence - 1), None).await.unwrap_err();
        assert_eq!(older, stale(p, fence - 1, fence));
        if is_held {
            s.admit(p, Generation(fence), None).await.unwrap();
        } else {
            assert_eq!(
                s.admit(p, Generation(fence), None).await.unwrap_err(),
                stale(p, fence, fence)
            );
        }
        s.admit(p, Generation(fence + 1), None).await.unwrap();
    }
}
