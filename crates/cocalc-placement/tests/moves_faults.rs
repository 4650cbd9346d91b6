//! The move coordinator under injected faults, seeded: a model of the two
//! hosts (volumes, snapshots, the freeze, which host runs the project, the
//! project's writes) behind [`MoveSteps`], where any call may fail before
//! it acts, act and then lose its answer, or never answer because the
//! coordinator crashes mid-call (the run is dropped, a new coordinator
//! resumes from the store). After every seeded run the promises are
//! checked:
//!
//! * the project never runs on both hosts;
//! * a move that ends `done` left the map on the target with the next
//!   generation, the target holding every write the project made, the
//!   source's copy deleted;
//! * a move that ends `rolled_back` left the map as it was, the source's
//!   copy whole and thawed, and the target as it was before (no copy, or
//!   the stale copy it held, untouched).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cocalc_core::moves::MoveSnapshot;
use cocalc_core::{
    ApiError, Clock, Generation, HostId, ManualClock, MovePhase, MoveRecord, PlacementDecision,
    ProjectId, SharedClock, Timestamp,
};
use cocalc_placement::{MapStore, MemoryStore, MoveCoordinator, MoveSteps};

/// One host's state for the project.
#[derive(Debug, Clone, Default, PartialEq)]
struct Host {
    /// The live volume's content (a version number), if any.
    volume: Option<u64>,
    /// Snapshots: name and content.
    snapshots: Vec<(String, u64)>,
    running: bool,
    /// While frozen: whether it ran when frozen.
    frozen: Option<bool>,
    fence: u64,
}

#[derive(Debug)]
struct World {
    src: Host,
    dst: Host,
    /// The project's content now (each write adds one).
    version: u64,
    /// Next snapshot number.
    seq: u32,
    rng: u64,
    /// Chance in 1000 that a call fails before acting, and that one acts
    /// and then loses its answer.
    fail_before: u64,
    fail_after: u64,
    /// The call (counted from 1) at which the coordinator crashes.
    crash_at: Option<u32>,
    calls: u32,
}

impl World {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }

    fn both_running(&self) -> bool {
        self.src.running && self.dst.running
    }
}

/// What a call does after its effect: answer, lose the answer, or crash.
enum After {
    Answer,
    Lost,
    Crash,
}

struct Faulty {
    world: Arc<Mutex<World>>,
    crashed: Arc<AtomicBool>,
    crash: Arc<tokio::sync::Notify>,
}

fn err(code: &str, msg: &str) -> ApiError {
    ApiError::new(503, code, msg)
}

impl Faulty {
    /// Runs one call: maybe fails before acting, then `act` on the world,
    /// then answers, loses the answer, or crashes the coordinator.
    async fn call<T: Send>(
        &self,
        act: impl FnOnce(&mut World) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (result, after) = {
            let mut w = self.world.lock().unwrap();
            w.calls += 1;
            // The project writes now and then while it runs on the source.
            if w.src.running && w.src.frozen.is_none() && w.chance(500) {
                w.version += 1;
                w.src.volume = Some(w.version);
            }
            let crash_now = w.crash_at == Some(w.calls);
            let (before, after_loss) = (w.fail_before, w.fail_after);
            if !crash_now && w.chance(before) {
                return Err(err("injected", "failed before acting"));
            }
            // A crash may come before or after the call's effect.
            let result = if crash_now && w.chance(500) {
                Err(err("crashed", "crashed before acting"))
            } else {
                act(&mut w)
            };
            assert!(!w.both_running(), "running on both hosts: {w:?}");
            let after = if crash_now {
                After::Crash
            } else if w.chance(after_loss) {
                After::Lost
            } else {
                After::Answer
            };
            (result, after)
        };
        match after {
            After::Answer => result,
            After::Lost => Err(err("injected", "the answer was lost")),
            After::Crash => {
                self.crashed.store(true, Ordering::SeqCst);
                self.crash.notify_one();
                std::future::pending().await
            }
        }
    }
}

#[async_trait]
impl MoveSteps for Faulty {
    async fn snapshot(&self, _mv: &MoveRecord, freeze: bool) -> Result<MoveSnapshot, ApiError> {
        self.call(|w| {
            if w.src.volume.is_none() {
                return Err(err("not_found", "no volume on the source"));
            }
            let mut was_running = false;
            if freeze {
                let was = *w.src.frozen.get_or_insert(w.src.running);
                w.src.running = false;
                was_running = was;
            }
            let content = w.src.volume.unwrap();
            if w.src.snapshots.last().map(|s| s.1) != Some(content) {
                w.seq += 1;
                let name = format!("s{:04}", w.seq);
                w.src.snapshots.push((name, content));
            }
            let name = w.src.snapshots.last().unwrap().0.clone();
            Ok(MoveSnapshot::new(name, was_running))
        })
        .await
    }

    async fn pull(
        &self,
        _mv: &MoveRecord,
        snapshot: &str,
        parent: Option<&str>,
        last: bool,
    ) -> Result<(), ApiError> {
        self.call(|w| {
            if parent.is_none() && w.dst.volume.is_some() {
                return Err(ApiError::new(409, "volume_exists", "a volume is here"));
            }
            if let Some(p) = parent {
                if !w.dst.snapshots.iter().any(|s| s.0 == p) {
                    return Err(err("stream_incomplete", "parent not here"));
                }
            }
            let content = w
                .src
                .snapshots
                .iter()
                .find(|s| s.0 == snapshot)
                .map(|s| s.1)
                .ok_or_else(|| err("not_found", "no such snapshot on the source"))?;
            if w.dst.snapshots.iter().any(|s| s.0 == snapshot) {
                return Err(ApiError::new(409, "already_exists", "snapshot here"));
            }
            w.dst.snapshots.push((snapshot.to_string(), content));
            if w.dst.volume.is_none() || last {
                w.dst.volume = Some(content);
            }
            Ok(())
        })
        .await
    }

    async fn target_snapshots(&self, _mv: &MoveRecord) -> Result<Vec<String>, ApiError> {
        self.call(|w| Ok(w.dst.snapshots.iter().map(|s| s.0.clone()).collect()))
            .await
    }

    async fn thaw(&self, _mv: &MoveRecord, restart: bool) -> Result<(), ApiError> {
        self.call(|w| {
            let was = w.src.frozen.take();
            if restart && was == Some(true) {
                w.src.running = true;
            }
            Ok(())
        })
        .await
    }

    async fn discard(&self, mv: &MoveRecord) -> Result<(), ApiError> {
        self.call(|w| {
            if w.dst.running {
                return Err(ApiError::new(409, "project_running", "runs here"));
            }
            // As the host does: only a copy holding the move's first
            // snapshot is the move's.
            let ours = mv
                .base
                .as_ref()
                .is_some_and(|b| w.dst.snapshots.iter().any(|s| &s.0 == b));
            if ours {
                w.dst.volume = None;
                w.dst.snapshots.clear();
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, _mv: &MoveRecord, generation: Generation) -> Result<(), ApiError> {
        self.call(|w| {
            w.src.running = false;
            w.src.volume = None;
            w.src.snapshots.clear();
            w.src.frozen = None;
            w.src.fence = w.src.fence.max(generation.0);
            Ok(())
        })
        .await
    }

    async fn start(&self, _mv: &MoveRecord, _generation: Generation) -> Result<(), ApiError> {
        self.call(|w| {
            if w.dst.volume.is_none() {
                return Err(err("not_found", "no volume on the target"));
            }
            w.dst.running = true;
            Ok(())
        })
        .await
    }
}

/// One seeded move; panics with the seed if a promise is broken. Answers
/// how it ended and whether the coordinator crashed on the way.
async fn one_move(seed: u64) -> (MovePhase, bool) {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let shared: SharedClock = Arc::new(clock.clone());
    let store: Arc<dyn MapStore> = Arc::new(MemoryStore::new());
    let (p, from, to) = (
        ProjectId::new_v4([1; 16]),
        HostId::new_v4([2; 16]),
        HostId::new_v4([3; 16]),
    );
    let decision = |h| PlacementDecision::new(h, "test", "seeded", Vec::new(), Vec::new());
    store
        .assign(p, from, Some(Generation(0)), decision(from), clock.now())
        .await
        .unwrap();
    let mut w = World {
        src: Host {
            volume: Some(1),
            running: false,
            fence: 1,
            ..Host::default()
        },
        dst: Host::default(),
        version: 1,
        seq: 0,
        rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        fail_before: 0,
        fail_after: 0,
        crash_at: None,
        calls: 0,
    };
    w.src.running = w.chance(500);
    let stale = w.chance(150);
    if stale {
        w.dst.volume = Some(u64::MAX);
        w.dst.snapshots.push(("old".into(), u64::MAX));
    }
    let dst_before = w.dst.clone();
    w.fail_before = w.next() % 150;
    w.fail_after = w.next() % 60;
    w.crash_at = if w.chance(400) {
        Some(1 + (w.next() % 10) as u32)
    } else {
        None
    };
    let world = Arc::new(Mutex::new(w));
    let crashed = Arc::new(AtomicBool::new(false));
    let crash = Arc::new(tokio::sync::Notify::new());
    let steps = Arc::new(Faulty {
        world: world.clone(),
        crashed: crashed.clone(),
        crash: crash.clone(),
    });

    let mut coord = MoveCoordinator::new(store.clone(), shared.clone());
    let mv = MoveRecord::new(p, from, Generation(1), decision(to), clock.now());
    let mv = coord.begin(mv).await.unwrap();
    tokio::select! {
        r = coord.run(mv, steps.as_ref()) => { r.unwrap(); }
        () = crash.notified() => {}
    }
    // Resumes (after a crash, by a new coordinator) until the move is
    // finished, with fewer faults each time.
    let mut had_crash = false;
    for round in 0..40 {
        let rec = store.move_of(p).await.unwrap().unwrap();
        if rec.phase.is_finished() {
            break;
        }
        assert!(round < 39, "seed {seed}: never finished: {rec:?}");
        if crashed.swap(false, Ordering::SeqCst) {
            had_crash = true;
            coord = MoveCoordinator::new(store.clone(), shared.clone());
        }
        {
            let mut w = world.lock().unwrap();
            w.crash_at = None;
            w.fail_before /= 2;
            w.fail_after /= 2;
        }
        clock.advance(std::time::Duration::from_secs(15));
        let s = steps.clone();
        coord
            .resume(move |_| s.clone() as Arc<dyn MoveSteps>)
            .await
            .unwrap();
    }

    let rec = store.move_of(p).await.unwrap().unwrap();
    let at = store.placement(p).await.unwrap().unwrap();
    let w = world.lock().unwrap();
    assert!(!w.both_running(), "seed {seed}: {w:?}");
    match rec.phase {
        MovePhase::Done => {
            assert_eq!((at.host, at.generation), (to, Generation(2)), "seed {seed}");
            assert_eq!(
                w.dst.volume,
                Some(w.version),
                "seed {seed}: a write lost: {w:?}"
            );
            assert_eq!(w.src.volume, None, "seed {seed}: source kept: {w:?}");
            assert!(!w.src.running && w.src.fence == 2, "seed {seed}: {w:?}");
            assert!(!stale, "seed {seed}: moved into a stale copy: {w:?}");
        }
        MovePhase::RolledBack => {
            assert_eq!(
                (at.host, at.generation),
                (from, Generation(1)),
                "seed {seed}"
            );
            assert_eq!(w.src.volume, Some(w.version), "seed {seed}: {w:?}");
            assert_eq!(w.src.frozen, None, "seed {seed}: left frozen: {w:?}");
            assert!(!w.dst.running, "seed {seed}: {w:?}");
            assert_eq!(
                w.dst.volume, dst_before.volume,
                "seed {seed}: target: {w:?}"
            );
            if stale {
                assert_eq!(w.dst, dst_before, "seed {seed}: stale copy touched: {w:?}");
            } else {
                assert!(w.dst.snapshots.is_empty(), "seed {seed}: {w:?}");
            }
        }
        other => panic!("seed {seed}: ended in {other}: {rec:?}"),
    }
    (rec.phase, had_crash)
}

#[tokio::test]
async fn seeded_faults_never_lose_data_or_run_a_project_twice() {
    let (mut done, mut rolled_back, mut crashes) = (0, 0, 0);
    for seed in 1..=600u64 {
        let (phase, crashed) = one_move(seed).await;
        match phase {
            MovePhase::Done => done += 1,
            _ => rolled_back += 1,
        }
        crashes += usize::from(crashed);
    }
    // Both endings and crashes happen often enough to mean something.
    assert!(
        done >= 100 && rolled_back >= 100 && crashes >= 100,
        "done {done}, rolled back {rolled_back}, crashes {crashes}"
    );
    eprintln!("600 seeded moves: {done} done, {rolled_back} rolled back, {crashes} with a crash");
}
