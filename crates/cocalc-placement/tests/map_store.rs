//! The project→host map: one behaviour suite run against every store, and a
//! crash test that kills a writer process mid-burst.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cocalc_core::{
    Capacity, Generation, HostEndpoint, HostId, HostInfo, PlacementDecision, ProjectId,
    ProjectState, Region, Timestamp,
};
use cocalc_placement::{HostRecord, MapStore, MemoryStore, SqliteStore, StoreError};

fn decision(host: HostId, why: &str) -> PlacementDecision {
    PlacementDecision::new(host, "test", why, Vec::new(), Vec::new())
}

async fn contract(store: Arc<dyn MapStore>) {
    let p = ProjectId::new_v4([1; 16]);
    let (a, b) = (HostId::new_v4([2; 16]), HostId::new_v4([3; 16]));
    assert_eq!(store.placement(p).await.unwrap(), None);
    assert_eq!(store.decision(p).await.unwrap(), None);

    // First assignment: generation 1, with its decision.
    let e = store
        .assign(
            p,
            a,
            Some(Generation(0)),
            decision(a, "first"),
            Timestamp(10),
        )
        .await
        .unwrap();
    assert_eq!(
        (e.host, e.generation, e.state),
        (a, Generation(1), ProjectState::Stopped)
    );
    let d = store.decision(p).await.unwrap().unwrap();
    assert_eq!(
        (d.generation, d.decision.reason.as_str(), d.decided_at),
        (Generation(1), "first", Timestamp(10))
    );

    // A stale expectation is refused and changes nothing.
    let err = store
        .assign(
            p,
            b,
            Some(Generation(0)),
            decision(b, "stale"),
            Timestamp(11),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            project: p,
            expected: Generation(0),
            current: Generation(1)
        }
    );
    assert_eq!(store.placement(p).await.unwrap().unwrap().host, a);

    // A move bumps the generation; activity and state are kept per project.
    store.record_activity(p, Timestamp(50)).await.unwrap();
    store.record_activity(p, Timestamp(40)).await.unwrap();
    assert_eq!(
        store.placement(p).await.unwrap().unwrap().last_activity,
        Some(Timestamp(50))
    );
    let e = store
        .assign(
            p,
            b,
            Some(Generation(1)),
            decision(b, "moved"),
            Timestamp(60),
        )
        .await
        .unwrap();
    assert_eq!((e.host, e.generation), (b, Generation(2)));
    assert_eq!(e.last_activity, Some(Timestamp(50)));
    store.set_state(p, ProjectState::Running).await.unwrap();
    let e = store.placement(p).await.unwrap().unwrap();
    assert_eq!(e.state, ProjectState::Running);
    assert_eq!(
        store.decision(p).await.unwrap().unwrap().decision.reason,
        "moved"
    );
    assert_eq!(store.projects_on(a).await.unwrap(), vec![]);
    assert_eq!(store.projects_on(b).await.unwrap(), vec![e]);

    // Unplaced projects: precise errors.
    let q = ProjectId::new_v4([4; 16]);
    assert_eq!(
        store.set_state(q, ProjectState::Running).await,
        Err(StoreError::NotPlaced(q))
    );
    assert_eq!(
        store.record_activity(q, Timestamp(1)).await,
        Err(StoreError::NotPlaced(q))
    );
    // Without an expectation, assignment always succeeds.
    let e = store
        .assign(q, a, None, decision(a, "any"), Timestamp(1))
        .await
        .unwrap();
    assert_eq!(e.generation, Generation(1));

    // Host records round-trip.
    let mut info = HostInfo::new(a, Region("eu".into()), HostEndpoint::Tunnel("t-a".into()));
    info.capacity = Capacity {
        project_slots: 7,
        ..Capacity::default()
    };
    let rec = HostRecord {
        info,
        public_key: "k4.public.abc".into(),
        draining: true,
        registered_at: Timestamp(5),
    };
    store.put_host(&rec).await.unwrap();
    store.put_host(&rec).await.unwrap();
    assert_eq!(store.hosts().await.unwrap(), vec![rec]);
}

#[tokio::test]
async fn memory_store_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn sqlite_store_contract() {
    contract(Arc::new(SqliteStore::open_in_memory().unwrap())).await;
}

#[tokio::test]
async fn cached_sqlite_store_contract() {
    contract(Arc::new(SqliteStore::open_in_memory().unwrap().cached())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_placements_follow_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(
        SqliteStore::open(&dir.path().join("m.db"))
            .unwrap()
            .cached(),
    );
    let p = ProjectId::new_v4([1; 16]);
    // Readers keep filling the cache while moves go on; after each move
    // completes, every reader sees it.
    let mut readers = Vec::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..4 {
        let (s, stop) = (s.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.placement(p).await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    for g in 0..50u64 {
        let h = HostId::new_v4([(g % 5) as u8 + 10; 16]);
        s.assign(p, h, Some(Generation(g)), decision(h, "move"), Timestamp(1))
            .await
            .unwrap();
        let e = s.placement(p).await.unwrap().unwrap();
        assert_eq!((e.host, e.generation), (h, Generation(g + 1)));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test]
async fn sqlite_store_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.db");
    let p = ProjectId::new_v4([1; 16]);
    let a = HostId::new_v4([2; 16]);
    {
        let s = SqliteStore::open(&path).unwrap();
        s.assign(p, a, None, decision(a, "x"), Timestamp(1))
            .await
            .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.placement(p).await.unwrap().unwrap().host, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_set_lets_exactly_one_writer_win() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(SqliteStore::open(&dir.path().join("m.db")).unwrap());
    let p = ProjectId::new_v4([1; 16]);
    let mut tasks = Vec::new();
    for n in 0..8u8 {
        let s = s.clone();
        let h = HostId::new_v4([n + 10; 16]);
        tasks.push(tokio::spawn(async move {
            s.assign(p, h, Some(Generation(0)), decision(h, "race"), Timestamp(1))
                .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(e) => {
                wins += 1;
                assert_eq!(e.generation, Generation(1));
            }
            Err(StoreError::Conflict { current, .. }) => assert_eq!(current, Generation(1)),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(wins, 1);
}

const BURST_ENV: &str = "COCALC_MAP_BURST_DB";

/// In the child process: assign projects as fast as possible until killed.
async fn burst(path: &str) {
    let store = SqliteStore::open(std::path::Path::new(path)).unwrap();
    let mut n: u64 = 0;
    loop {
        let p = ProjectId::new_v4([(n % 50) as u8; 16]);
        let h = HostId::new_v4([(n % 7) as u8; 16]);
        store
            .assign(p, h, None, decision(h, "burst"), Timestamp(n as i64))
            .await
            .unwrap();
        n += 1;
        if n == 200 {
            // Tell the parent the burst is under way.
            std::fs::write(format!("{path}.started"), b"").unwrap();
        }
    }
}

#[tokio::test]
async fn map_survives_kill_mid_burst() {
    if let Ok(path) = std::env::var(BURST_ENV) {
        burst(&path).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("map.db");
    let db_s = db.to_str().unwrap().to_string();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "map_survives_kill_mid_burst", "--nocapture"])
        .env(BURST_ENV, &db_s)
        .spawn()
        .unwrap();
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

    // Reopen: integrity holds, every project has exactly one host, and its
    // generation equals the number of decisions stored for it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let mut st = conn
        .prepare(
            "SELECT m.project, m.generation, m.host,
                    (SELECT COUNT(*) FROM placement_decisions d WHERE d.project = m.project),
                    (SELECT host FROM placement_decisions d WHERE d.project = m.project
                       AND d.generation = m.generation)
             FROM project_map m",
        )
        .unwrap();
    let rows: Vec<(String, i64, String, i64, Option<String>)> = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 50, "all 50 projects placed");
    let total: i64 = rows.iter().map(|r| r.1).sum();
    assert!(total >= 200, "burst wrote {total} assignments");
    for (project, generation, host, decisions, decided_host) in rows {
        assert_eq!(generation, decisions, "{project}: generation vs decisions");
        assert_eq!(
            Some(host),
            decided_host,
            "{project}: map and decision agree"
        );
    }
    let per_project: i64 = conn
        .query_row(
            "SELECT MAX(c) FROM (SELECT COUNT(*) c FROM project_map GROUP BY project)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(per_project, 1);
}
