//! The move coordinator against a fake [`MoveSteps`]: every call and its
//! arguments are logged, failures injected per step, and the stored
//! record and the map checked after each scenario (and, where it matters,
//! while a step runs).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cocalc_core::moves::MoveSnapshot;
use cocalc_core::{
    ApiError, Clock, Generation, HostId, ManualClock, MovePhase, MoveRecord, PlacementDecision,
    ProjectId, SharedClock, Timestamp,
};
use cocalc_placement::{MapStore, MemoryStore, MoveCoordinator, MoveError, MoveSteps, SqliteStore};

fn decision(host: HostId, why: &str) -> PlacementDecision {
    PlacementDecision::new(host, "test", why, Vec::new(), Vec::new())
}

fn project(n: u8) -> ProjectId {
    ProjectId::new_v4([n; 16])
}

fn host(n: u8) -> HostId {
    HostId::new_v4([n; 16])
}

/// The stores the coordinator is run against.
fn stores() -> Vec<(&'static str, Arc<dyn MapStore>)> {
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        ("sqlite", Arc::new(SqliteStore::open_in_memory().unwrap())),
    ]
}

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A fake set of host calls. Snapshot names come from a queue: each call
/// takes the next name while more than one is left, then repeats the last.
struct FakeSteps {
    /// Every call, with its arguments, in order.
    log: Mutex<Vec<String>>,
    /// Injected failures, keyed by a step's name (every call of it fails)
    /// or by one call exactly as logged.
    fail: Mutex<HashMap<String, ApiError>>,
    snapshots: Mutex<VecDeque<String>>,
    /// What a freezing snapshot answers for "was running".
    was_running: bool,
    /// The snapshots the target received (successful pulls).
    received: Mutex<Vec<String>>,
    /// Run once, inside the first pull, before it answers.
    on_pull: Mutex<Option<Hook>>,
    /// With a store: the stored move as each call saw it, by call.
    observe: Option<Arc<dyn MapStore>>,
    seen: Mutex<Vec<(String, Option<MoveRecord>)>>,
}

impl FakeSteps {
    fn new(snapshots: &[&str], was_running: bool) -> Self {
        FakeSteps {
            log: Mutex::default(),
            fail: Mutex::default(),
            snapshots: Mutex::new(snapshots.iter().map(|s| s.to_string()).collect()),
            was_running,
            received: Mutex::default(),
            on_pull: Mutex::default(),
            observe: None,
            seen: Mutex::default(),
        }
    }

    fn failing(self, step_or_call: &str, err: ApiError) -> Self {
        self.fail.lock().unwrap().insert(step_or_call.into(), err);
        self
    }

    fn observing(mut self, store: Arc<dyn MapStore>) -> Self {
        self.observe = Some(store);
        self
    }

    fn on_pull(self, hook: impl Future<Output = ()> + Send + 'static) -> Self {
        *self.on_pull.lock().unwrap() = Some(Box::pin(hook));
        self
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn seen(&self) -> Vec<(String, Option<MoveRecord>)> {
        self.seen.lock().unwrap().clone()
    }

    /// Logs the call and answers the injected failure of `step`, if any.
    async fn enter(
        &self,
        step: &'static str,
        call: String,
        mv: &MoveRecord,
    ) -> Result<(), ApiError> {
        self.log.lock().unwrap().push(call.clone());
        if let Some(store) = &self.observe {
            let stored = store.move_of(mv.project).await.unwrap();
            self.seen.lock().unwrap().push((call.clone(), stored));
        }
        let fail = self.fail.lock().unwrap();
        match fail.get(step).or_else(|| fail.get(&call)) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl MoveSteps for FakeSteps {
    async fn snapshot(&self, mv: &MoveRecord, freeze: bool) -> Result<MoveSnapshot, ApiError> {
        self.enter("snapshot", format!("snapshot(freeze={freeze})"), mv)
            .await?;
        let name = {
            let mut q = self.snapshots.lock().unwrap();
            if q.len() > 1 {
                q.pop_front().unwrap()
            } else {
                q.front().cloned().expect("the fake needs a snapshot name")
            }
        };
        Ok(MoveSnapshot::new(name, freeze && self.was_running))
    }

    async fn pull(
        &self,
        mv: &MoveRecord,
        snapshot: &str,
        parent: Option<&str>,
        last: bool,
    ) -> Result<(), ApiError> {
        let hook = self.on_pull.lock().unwrap().take();
        if let Some(hook) = hook {
            hook.await;
        }
        self.enter(
            "pull",
            format!("pull({snapshot}, {parent:?}, last={last})"),
            mv,
        )
        .await?;
        self.received.lock().unwrap().push(snapshot.to_string());
        Ok(())
    }

    async fn target_snapshots(&self, mv: &MoveRecord) -> Result<Vec<String>, ApiError> {
        self.enter("target_snapshots", "target_snapshots".into(), mv)
            .await?;
        Ok(self.received.lock().unwrap().clone())
    }

    async fn thaw(&self, mv: &MoveRecord, restart: bool) -> Result<(), ApiError> {
        self.enter("thaw", format!("thaw(restart={restart})"), mv)
            .await
    }

    async fn discard(&self, mv: &MoveRecord) -> Result<(), ApiError> {
        self.enter("discard", "discard".into(), mv).await
    }

    async fn release(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError> {
        self.enter("release", format!("release({generation})"), mv)
            .await
    }

    async fn start(&self, mv: &MoveRecord, generation: Generation) -> Result<(), ApiError> {
        self.enter("start", format!("start({}, {generation})", mv.to), mv)
            .await
    }
}

/// A coordinator over `store` with project 1 placed on host 2 at
/// generation 1, to be moved to host 3.
struct Env {
    store: Arc<dyn MapStore>,
    clock: ManualClock,
    coord: Arc<MoveCoordinator>,
    p: ProjectId,
    from: HostId,
    to: HostId,
}

impl Env {
    /// A new coordinator over the same store and clock: the master after a
    /// crash (nothing of the old one's memory is kept).
    fn restart(&mut self) {
        let shared: SharedClock = Arc::new(self.clock.clone());
        self.coord = Arc::new(MoveCoordinator::new(self.store.clone(), shared));
    }

    async fn new(store: Arc<dyn MapStore>) -> Env {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let shared: SharedClock = Arc::new(clock.clone());
        let (p, from, to) = (project(1), host(2), host(3));
        let placed = store
            .assign(
                p,
                from,
                Some(Generation(0)),
                decision(from, "first"),
                clock.now(),
            )
            .await
            .unwrap();
        assert_eq!(placed.generation, Generation(1));
        Env {
            coord: Arc::new(MoveCoordinator::new(store.clone(), shared)),
            store,
            clock,
            p,
            from,
            to,
        }
    }

    fn record(&self) -> MoveRecord {
        MoveRecord::new(
            self.p,
            self.from,
            Generation(1),
            decision(self.to, "move"),
            self.clock.now(),
        )
    }

    async fn begin(&self) -> MoveRecord {
        let mv = self.coord.begin(self.record()).await.unwrap();
        assert_eq!(mv.phase, MovePhase::Copying);
        assert_eq!(self.stored().await, mv);
        self.clock.advance(std::time::Duration::from_secs(1));
        mv
    }

    async fn stored(&self) -> MoveRecord {
        self.store.move_of(self.p).await.unwrap().unwrap()
    }

    async fn map(&self) -> (HostId, Generation) {
        let p = self.store.placement(self.p).await.unwrap().unwrap();
        (p.host, p.generation)
    }

    async fn resume(&self, steps: Arc<FakeSteps>) -> Vec<MoveRecord> {
        self.coord
            .resume(move |_| steps.clone() as Arc<dyn MoveSteps>)
            .await
            .unwrap()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn happy_path_of_a_running_project() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1", "s2"], true);
        let out = env.coord.run(mv, &steps).await.unwrap();

        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                r#"pull(s1, None, last=false)"#,
                "snapshot(freeze=true)",
                r#"pull(s2, Some("s1"), last=true)"#,
                "target_snapshots",
                "snapshot(freeze=true)",
                &format!("start({}, 2)", env.to),
                "release(2)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::Done, "{name}");
        assert_eq!(out.error, None, "{name}");
        assert_eq!(
            (out.base.as_deref(), out.last.as_deref()),
            (Some("s1"), Some("s2"))
        );
        assert!(out.was_running && out.copy_started, "{name}");
        assert_eq!(out.updated, env.clock.now(), "{name}");
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (env.to, Generation(2)), "{name}");
        let d = env.store.decision(env.p).await.unwrap().unwrap();
        assert_eq!(
            (d.generation, d.decision.host, d.decision.reason.as_str()),
            (Generation(2), env.to, "move"),
            "{name}"
        );
        assert!(env.store.unfinished_moves().await.unwrap().is_empty());
        assert_eq!(env.coord.running_phase(env.p), None, "{name}");
    }
}

#[tokio::test]
async fn every_phase_is_stored_before_its_work() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let steps = FakeSteps::new(&["s1", "s2"], true).observing(env.store.clone());
    env.coord.run(mv, &steps).await.unwrap();
    let seen = steps.seen();
    let at = |i: usize| seen[i].1.clone().unwrap();
    assert_eq!(seen.len(), 8);
    // The full copy: the first snapshot runs in Copying; the pull only
    // once the base and "the target may hold a copy" are stored.
    assert_eq!(
        (at(0).phase, at(0).copy_started),
        (MovePhase::Copying, false)
    );
    assert_eq!(
        (at(1).phase, at(1).base.as_deref(), at(1).copy_started),
        (MovePhase::Copying, Some("s1"), true)
    );
    // The freeze runs in Syncing; the incremental pull only once the last
    // snapshot and "was running" are stored.
    assert_eq!(
        (at(2).phase, at(2).last.clone()),
        (MovePhase::Syncing, None)
    );
    assert_eq!(
        (at(3).phase, at(3).last.as_deref(), at(3).was_running),
        (MovePhase::Syncing, Some("s2"), true)
    );
    assert_eq!(at(4).phase, MovePhase::Syncing);
    assert_eq!(at(5).phase, MovePhase::Syncing);
    // start and release run after the flip was stored.
    assert_eq!(
        (seen[6].0.starts_with("start"), at(6).phase),
        (true, MovePhase::Flipped)
    );
    assert_eq!(
        (seen[7].0.as_str(), at(7).phase),
        ("release(2)", MovePhase::Flipped)
    );
}

#[tokio::test]
async fn unchanged_source_needs_no_incremental_pull() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        // Stopped before the move: nothing is started afterwards either.
        let steps = FakeSteps::new(&["s1"], false);
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                "pull(s1, None, last=false)",
                "snapshot(freeze=true)",
                "target_snapshots",
                "snapshot(freeze=true)",
                "release(2)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::Done, "{name}");
        assert_eq!(
            (out.base.as_deref(), out.last.as_deref(), out.was_running),
            (Some("s1"), Some("s1"), false)
        );
        assert_eq!(env.stored().await.phase, MovePhase::Done, "{name}");
        assert_eq!(env.map().await, (env.to, Generation(2)), "{name}");
    }
}

#[tokio::test]
async fn failed_full_copy_rolls_back() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1", "s2"], true).failing(
            "pull",
            ApiError::new(502, "pull_failed", "the source hung up"),
        );
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                "pull(s1, None, last=false)",
                "discard",
                // The map still names the source: the source restarts
                // the project if its freeze had stopped it.
                "thaw(restart=true)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::RolledBack, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("full copy to the target"), "{name}: {err}");
        assert!(err.contains("the source hung up"), "{name}: {err}");
        assert!(err.contains("pull_failed"), "{name}: {err}");
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (env.from, Generation(1)), "{name}");
        assert_eq!(
            env.store
                .decision(env.p)
                .await
                .unwrap()
                .unwrap()
                .decision
                .reason,
            "first"
        );
        assert!(env.store.unfinished_moves().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn failed_incremental_pull_thaws_and_restarts_the_source() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let steps = FakeSteps::new(&["s1", "s2"], true).failing(
        r#"pull(s2, Some("s1"), last=true)"#,
        ApiError::new(502, "stream_cut", "the stream was cut"),
    );
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(
        steps.calls(),
        strings(&[
            "snapshot(freeze=false)",
            "pull(s1, None, last=false)",
            "snapshot(freeze=true)",
            r#"pull(s2, Some("s1"), last=true)"#,
            "discard",
            "thaw(restart=true)",
        ])
    );
    assert_eq!(out.phase, MovePhase::RolledBack);
    let err = out.error.clone().unwrap();
    assert!(err.contains("incremental copy to the target"), "{err}");
    assert!(err.contains("stream_cut"), "{err}");
    assert_eq!(env.stored().await, out);
    assert_eq!(env.map().await, (env.from, Generation(1)));
}

#[tokio::test]
async fn failed_validation_on_the_target_rolls_back() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let steps = FakeSteps::new(&["s1", "s2"], true).failing(
        "target_snapshots",
        ApiError::new(503, "down", "target down"),
    );
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(
        steps.calls()[4..],
        strings(&["target_snapshots", "discard", "thaw(restart=true)"])
    );
    assert_eq!(out.phase, MovePhase::RolledBack);
    let err = out.error.unwrap();
    assert!(err.contains("validation on the target"), "{err}");
    assert_eq!(env.map().await, (env.from, Generation(1)));
}

#[tokio::test]
async fn refused_full_copy_does_not_discard_the_targets_volume() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1"], true).failing(
            "pull",
            ApiError::new(409, "volume_exists", "a volume of the project is here"),
        );
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                "pull(s1, None, last=false)",
                "thaw(restart=true)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::RolledBack, "{name}");
        assert!(!out.copy_started, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("volume_exists"), "{name}: {err}");
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (env.from, Generation(1)), "{name}");
    }
}

#[tokio::test]
async fn source_changed_after_last_snapshot_rolls_back() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1", "s2", "s3"], true);
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                "pull(s1, None, last=false)",
                "snapshot(freeze=true)",
                r#"pull(s2, Some("s1"), last=true)"#,
                "target_snapshots",
                "snapshot(freeze=true)",
                "discard",
                "thaw(restart=true)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::RolledBack, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("source changed"), "{name}: {err}");
        assert!(err.contains("s3") && err.contains("s2"), "{name}: {err}");
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (env.from, Generation(1)), "{name}");
    }
}

#[tokio::test]
async fn map_changed_during_the_move_is_not_flipped() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let other = host(4);
        // An operator re-places the project while the full copy runs.
        let (s, p, at) = (env.store.clone(), env.p, env.clock.now());
        let steps = FakeSteps::new(&["s1", "s2"], true).on_pull(async move {
            s.assign(p, other, None, decision(other, "operator"), at)
                .await
                .unwrap();
        });
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls(),
            strings(&[
                "snapshot(freeze=false)",
                "pull(s1, None, last=false)",
                "snapshot(freeze=true)",
                r#"pull(s2, Some("s1"), last=true)"#,
                "target_snapshots",
                "snapshot(freeze=true)",
                "discard",
                // The map names another host: no restart on the source.
                "thaw(restart=false)",
            ]),
            "{name}"
        );
        assert_eq!(out.phase, MovePhase::RolledBack, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("map changed"), "{name}: {err}");
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (other, Generation(2)), "{name}");
        assert_eq!(
            env.store
                .decision(env.p)
                .await
                .unwrap()
                .unwrap()
                .decision
                .reason,
            "operator",
            "{name}"
        );
    }
}

#[tokio::test]
async fn failed_release_is_finished_by_resume() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1", "s2"], true).failing(
            "release",
            ApiError::new(503, "host_offline", "the source is offline"),
        );
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(
            steps.calls().last().map(String::as_str),
            Some("release(2)"),
            "{name}"
        );
        assert!(!steps.calls().contains(&"discard".to_string()), "{name}");
        assert_eq!(out.phase, MovePhase::Flipped, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("deleting the source's copy"), "{name}: {err}");
        assert!(err.contains("host_offline"), "{name}: {err}");
        assert_eq!(env.stored().await, out, "{name}");
        // The map flipped already; it stays flipped.
        assert_eq!(env.map().await, (env.to, Generation(2)), "{name}");
        assert_eq!(env.store.unfinished_moves().await.unwrap(), vec![out]);

        let again = Arc::new(FakeSteps::new(&["s2"], true));
        let done = env.resume(again.clone()).await;
        assert_eq!(again.calls(), strings(&["release(2)"]), "{name}");
        assert_eq!(done.len(), 1, "{name}");
        assert_eq!(done[0].phase, MovePhase::Done, "{name}");
        assert_eq!(env.stored().await, done[0], "{name}");
        assert_eq!(env.map().await, (env.to, Generation(2)), "{name}");
        assert!(env.store.unfinished_moves().await.unwrap().is_empty());
        // Nothing left to resume.
        let idle = Arc::new(FakeSteps::new(&["s2"], true));
        assert!(env.resume(idle.clone()).await.is_empty());
        assert!(idle.calls().is_empty());
    }
}

#[tokio::test]
async fn failed_start_on_the_target_still_releases_the_source() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let steps = FakeSteps::new(&["s1", "s2"], true)
        .failing("start", ApiError::new(500, "runner", "no image"));
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(
        steps.calls()[6..],
        strings(&[&format!("start({}, 2)", env.to), "release(2)"])
    );
    assert_eq!(out.phase, MovePhase::Done);
    let err = out.error.clone().unwrap();
    assert!(err.contains("starting on the target"), "{err}");
    assert_eq!(env.map().await, (env.to, Generation(2)));
}

#[tokio::test]
async fn failed_rollback_is_finished_by_resume() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        let steps = FakeSteps::new(&["s1", "s2", "s3"], true).failing(
            "discard",
            ApiError::new(409, "running", "the project runs on the target"),
        );
        let out = env.coord.run(mv, &steps).await.unwrap();
        // The discard failed: no thaw yet.
        assert_eq!(steps.calls().last().map(String::as_str), Some("discard"));
        assert!(!steps.calls().iter().any(|c| c.starts_with("thaw")));
        assert_eq!(out.phase, MovePhase::RollingBack, "{name}");
        let err = out.error.clone().unwrap();
        assert!(err.contains("source changed"), "{name}: {err}");
        assert!(err.contains("rollback not finished"), "{name}: {err}");
        assert!(
            err.contains("discarding the target's copy"),
            "{name}: {err}"
        );
        assert_eq!(env.stored().await, out, "{name}");
        assert_eq!(env.map().await, (env.from, Generation(1)), "{name}");
        assert_eq!(env.store.unfinished_moves().await.unwrap(), vec![out]);
        // A move of the project cannot begin meanwhile.
        assert_eq!(
            env.coord.begin(env.record()).await,
            Err(MoveError::InProgress {
                project: env.p,
                phase: MovePhase::RollingBack
            })
        );

        let again = Arc::new(FakeSteps::new(&["s3"], true));
        let done = env.resume(again.clone()).await;
        assert_eq!(
            again.calls(),
            strings(&["discard", "thaw(restart=true)"]),
            "{name}"
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].phase, MovePhase::RolledBack, "{name}");
        assert_eq!(env.stored().await, done[0], "{name}");
        assert_eq!(env.map().await, (env.from, Generation(1)), "{name}");
        assert!(env.store.unfinished_moves().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn resume_rolls_back_moves_interrupted_before_the_flip() {
    for (name, store) in stores() {
        let env = Env::new(store.clone()).await;
        // Cut during the first snapshot: nothing copied, nothing frozen.
        let mut copying = env.record();
        copying.started = Timestamp(10);
        store.put_move(&copying).await.unwrap();
        // Cut during the incremental pull of a running project, placed
        // on the same hosts.
        let q = project(9);
        store
            .assign(
                q,
                env.from,
                Some(Generation(0)),
                decision(env.from, "first"),
                Timestamp(1),
            )
            .await
            .unwrap();
        let mut syncing = MoveRecord::new(
            q,
            env.from,
            Generation(1),
            decision(env.to, "move"),
            Timestamp(20),
        );
        syncing.phase = MovePhase::Syncing;
        syncing.base = Some("s1".into());
        syncing.last = Some("s2".into());
        syncing.copy_started = true;
        syncing.was_running = true;
        store.put_move(&syncing).await.unwrap();

        let logs: Arc<Mutex<HashMap<ProjectId, Arc<FakeSteps>>>> = Arc::default();
        let l = logs.clone();
        let out = env
            .coord
            .resume(move |mv| {
                let s = Arc::new(FakeSteps::new(&["s9"], true));
                l.lock().unwrap().insert(mv.project, s.clone());
                s as Arc<dyn MoveSteps>
            })
            .await
            .unwrap();
        // Oldest first.
        assert_eq!(
            out.iter().map(|m| m.project).collect::<Vec<_>>(),
            vec![env.p, q],
            "{name}"
        );
        let logs = logs.lock().unwrap().clone();
        assert_eq!(
            logs[&env.p].calls(),
            strings(&["thaw(restart=true)"]),
            "{name}"
        );
        assert_eq!(
            logs[&q].calls(),
            strings(&["discard", "thaw(restart=true)"]),
            "{name}"
        );
        for (mv, phase) in [(&out[0], "copying"), (&out[1], "syncing")] {
            assert_eq!(mv.phase, MovePhase::RolledBack, "{name}");
            let err = mv.error.clone().unwrap();
            assert!(err.contains("interrupted"), "{name}: {err}");
            assert!(err.contains(phase), "{name}: {err}");
            assert_eq!(
                store.move_of(mv.project).await.unwrap().as_ref(),
                Some(mv),
                "{name}"
            );
            assert_eq!(
                store
                    .placement(mv.project)
                    .await
                    .unwrap()
                    .unwrap()
                    .generation,
                Generation(1),
                "{name}"
            );
            assert_eq!(
                store.placement(mv.project).await.unwrap().unwrap().host,
                env.from,
                "{name}"
            );
        }
        assert!(store.unfinished_moves().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn begin_refuses_a_second_move_until_the_first_finished() {
    for (name, store) in stores() {
        let env = Env::new(store).await;
        let mv = env.begin().await;
        assert_eq!(
            env.coord.begin(env.record()).await,
            Err(MoveError::InProgress {
                project: env.p,
                phase: MovePhase::Copying
            }),
            "{name}"
        );
        // The refused begin stored nothing over the first.
        assert_eq!(env.stored().await, mv, "{name}");
        // Another project is not held up.
        let other = MoveRecord::new(
            project(7),
            env.from,
            Generation(0),
            decision(env.to, "other"),
            env.clock.now(),
        );
        env.coord.begin(other).await.unwrap();

        let steps = FakeSteps::new(&["s1"], false);
        let out = env.coord.run(mv, &steps).await.unwrap();
        assert_eq!(out.phase, MovePhase::Done, "{name}");
        // Back again, from the new host at the new generation.
        let mut back = MoveRecord::new(
            env.p,
            env.to,
            Generation(2),
            decision(env.from, "back"),
            env.clock.now(),
        );
        back = env.coord.begin(back).await.unwrap();
        assert_eq!(env.stored().await, back, "{name}");
        let steps = FakeSteps::new(&["s5"], false);
        let out = env.coord.run(back, &steps).await.unwrap();
        assert_eq!(out.phase, MovePhase::Done, "{name}");
        assert_eq!(steps.calls().last().map(String::as_str), Some("release(3)"));
        assert_eq!(env.map().await, (env.from, Generation(3)), "{name}");
    }
}

#[tokio::test]
async fn begin_is_refused_while_the_move_runs_in_this_process() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let (coord, record) = (env.coord.clone(), env.record());
    let p = env.p;
    let checked = Arc::new(Mutex::new(None));
    let c = checked.clone();
    let steps = FakeSteps::new(&["s1", "s2"], true).on_pull(async move {
        let phase = coord.running_phase(p);
        let refused = coord.begin(record).await;
        *c.lock().unwrap() = Some((phase, refused));
    });
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(out.phase, MovePhase::Done);
    assert_eq!(
        checked.lock().unwrap().take(),
        Some((
            Some(MovePhase::Copying),
            Err(MoveError::InProgress {
                project: p,
                phase: MovePhase::Copying
            })
        ))
    );
    assert_eq!(env.coord.running_phase(p), None);
}

/// A crash after the flip's commit and before the Flipped phase was stored
/// leaves a Syncing record over a flipped map. Resume must not roll that
/// back (discarding the copy the map now points at); it should finish it.
#[tokio::test]
async fn resume_finishes_a_move_whose_flip_committed_before_the_crash() {
    let mut env = Env::new(Arc::new(MemoryStore::new())).await;
    let mut mv = env.begin().await;
    env.restart();
    mv.phase = MovePhase::Syncing;
    mv.base = Some("s1".into());
    mv.last = Some("s2".into());
    mv.copy_started = true;
    mv.was_running = true;
    env.store.put_move(&mv).await.unwrap();
    // The flip committed; then the coordinator died.
    env.store
        .assign(
            env.p,
            env.to,
            Some(Generation(1)),
            mv.decision.clone(),
            env.clock.now(),
        )
        .await
        .unwrap();
    let steps = Arc::new(FakeSteps::new(&["s2"], true));
    let out = env.resume(steps.clone()).await;
    // Not rolled back: started on the target (it ran) and released.
    assert_eq!(
        steps.calls(),
        strings(&[&format!("start({}, 2)", env.to), "release(2)"])
    );
    assert_eq!(out[0].phase, MovePhase::Done);
    assert!(out[0].restarted && out[0].error.is_none(), "{:?}", out[0]);
    assert_eq!(env.map().await, (env.to, Generation(2)));
}

async fn round_trip(name: &str, store: &dyn MapStore) {
    let mk = |n: u8, phase: MovePhase, started: i64| {
        let mut m = MoveRecord::new(
            project(n),
            host(2),
            Generation(u64::from(n)),
            decision(host(3), "rt"),
            Timestamp(started),
        );
        m.phase = phase;
        m.updated = Timestamp(started + 5);
        m
    };
    assert_eq!(store.move_of(project(1)).await.unwrap(), None, "{name}");
    assert!(store.unfinished_moves().await.unwrap().is_empty(), "{name}");

    let mut a = mk(1, MovePhase::Copying, 300);
    a.base = Some("s1".into());
    a.copy_started = true;
    let b = mk(2, MovePhase::Flipped, 100);
    let c = mk(3, MovePhase::Done, 50);
    let mut d = mk(4, MovePhase::RollingBack, 200);
    d.error = Some("discard: busy (running)".into());
    d.last = Some("s2".into());
    d.was_running = true;
    let e = mk(5, MovePhase::RolledBack, 10);
    let f = mk(6, MovePhase::Syncing, 200);
    for m in [&a, &b, &c, &d, &e, &f] {
        store.put_move(m).await.unwrap();
    }
    for m in [&a, &b, &c, &d, &e, &f] {
        assert_eq!(
            store.move_of(m.project).await.unwrap().as_ref(),
            Some(m),
            "{name}"
        );
    }
    let projects = |v: Vec<MoveRecord>| v.into_iter().map(|m| m.project).collect::<Vec<_>>();
    // Oldest first (ties by project), finished ones left out.
    assert_eq!(
        projects(store.unfinished_moves().await.unwrap()),
        vec![project(2), project(4), project(6), project(1)],
        "{name}"
    );
    // A later record of a project replaces the earlier one.
    let mut b2 = b.clone();
    b2.phase = MovePhase::Done;
    b2.updated = Timestamp(500);
    store.put_move(&b2).await.unwrap();
    assert_eq!(store.move_of(project(2)).await.unwrap(), Some(b2), "{name}");
    let mut c2 = mk(3, MovePhase::Copying, 400);
    c2.to = host(8);
    store.put_move(&c2).await.unwrap();
    assert_eq!(store.move_of(project(3)).await.unwrap(), Some(c2), "{name}");
    assert_eq!(
        projects(store.unfinished_moves().await.unwrap()),
        vec![project(4), project(6), project(1), project(3)],
        "{name}"
    );
}

#[tokio::test]
async fn move_records_round_trip_in_every_store() {
    round_trip("memory", &MemoryStore::new()).await;
    round_trip("sqlite", &SqliteStore::open_in_memory().unwrap()).await;
    round_trip(
        "sqlite cached",
        &SqliteStore::open_in_memory().unwrap().cached(),
    )
    .await;
}

#[tokio::test]
async fn move_records_survive_reopening_the_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        round_trip("sqlite file", &s).await;
    }
    let s = SqliteStore::open(&path).unwrap();
    let unfinished = s.unfinished_moves().await.unwrap();
    assert_eq!(
        unfinished.iter().map(|m| m.project).collect::<Vec<_>>(),
        vec![project(4), project(6), project(1), project(3)]
    );
    assert_eq!(
        unfinished[0].error.as_deref(),
        Some("discard: busy (running)")
    );
    assert_eq!(unfinished[2].base.as_deref(), Some("s1"));
    assert!(unfinished[2].copy_started);
    assert_eq!(unfinished[3].to, host(8));
    assert_eq!(
        s.move_of(project(2)).await.unwrap().map(|m| m.phase),
        Some(MovePhase::Done)
    );
    assert_eq!(
        s.move_of(project(5)).await.unwrap().map(|m| m.phase),
        Some(MovePhase::RolledBack)
    );
}

/// An operator re-places the project onto the move's own target while it
/// copies: the flip fails, and the rollback leaves the target's copy
/// alone (it is the project's volume now) and does not restart the source.
#[tokio::test]
async fn rollback_keeps_the_copy_when_the_map_names_the_target() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let (s, p, to, at) = (env.store.clone(), env.p, env.to, env.clock.now());
    let steps = FakeSteps::new(&["s1", "s2"], true).on_pull(async move {
        s.assign(p, to, None, decision(to, "operator"), at)
            .await
            .unwrap();
    });
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(out.phase, MovePhase::RolledBack);
    let calls = steps.calls();
    assert!(!calls.contains(&"discard".to_string()), "{calls:?}");
    assert_eq!(
        calls.last().map(String::as_str),
        Some("thaw(restart=false)")
    );
    assert_eq!(env.map().await, (to, Generation(2)));
}

/// Between `begin` and `run`, a periodic `resume` leaves the move alone
/// (it is not an interrupted one), and `run` then runs it.
#[tokio::test]
async fn resume_leaves_a_begun_move_to_its_run() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    assert_eq!(env.coord.running_phase(env.p), Some(MovePhase::Copying));
    let idle = Arc::new(FakeSteps::new(&["s1"], false));
    assert!(env.resume(idle.clone()).await.is_empty());
    assert!(idle.calls().is_empty(), "{:?}", idle.calls());
    let steps = FakeSteps::new(&["s1"], false);
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(out.phase, MovePhase::Done, "{out:?}");
    assert_eq!(env.coord.running_phase(env.p), None);
}

/// A failed start and a failed release are both reported; once a later
/// release succeeds, the failed start is what stays (the project is
/// moved, but not running).
#[tokio::test]
async fn a_failed_start_stays_reported_past_release_retries() {
    let env = Env::new(Arc::new(MemoryStore::new())).await;
    let mv = env.begin().await;
    let steps = FakeSteps::new(&["s1", "s2"], true)
        .failing(
            "start",
            ApiError::new(500, "runner", "no image; try another"),
        )
        .failing("release", ApiError::new(503, "host_unreachable", "gone"));
    let out = env.coord.run(mv, &steps).await.unwrap();
    assert_eq!(out.phase, MovePhase::Flipped);
    let err = out.error.clone().unwrap();
    assert!(
        err.starts_with("starting on the target: no image; try another")
            && err.contains("deleting the source's copy: gone"),
        "{err}"
    );
    let retry = Arc::new(FakeSteps::new(&["s2"], true).failing(
        "release",
        ApiError::new(503, "host_unreachable", "still gone"),
    ));
    let out = env.resume(retry.clone()).await.remove(0);
    let err = out.error.clone().unwrap();
    assert!(
        err.contains("no image; try another")
            && err.contains("still gone")
            && !err.contains(": gone"),
        "{err}"
    );
    assert_eq!(retry.calls(), strings(&["release(2)"]), "no second start");
    let out = env
        .resume(Arc::new(FakeSteps::new(&["s2"], true)))
        .await
        .remove(0);
    assert_eq!(out.phase, MovePhase::Done);
    assert_eq!(
        out.error.as_deref(),
        Some("starting on the target: no image; try another (runner)")
    );
}
