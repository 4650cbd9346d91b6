//! Project activity and the idle culler.
//!
//! A project is *idle* when nobody uses it: no browser or API activity
//! reported by the data plane, **and** no CPU use above a threshold, **and**
//! no open TCP connections inside it. A long computation with no browser
//! attached is therefore not idle, and neither is a server with a client.
//!
//! The culler is split in two, so tests and the simulator can drive it:
//!
//! * [`decide`] is a pure function of the [`CullPolicy`], the project's
//!   [`IdleState`], a fresh [`ActivitySample`] and "now";
//! * [`IdleCuller`] is the driver: it samples every running project through
//!   an [`ActivitySource`], applies [`decide`], and stops the projects whose
//!   verdict is [`CullDecision::Stop`]. It reads time from an injected
//!   [`Clock`](cocalc_core::Clock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cocalc_core::{ProjectId, ProjectState, Runner, RunnerError, SharedClock, Timestamp};

/// One measurement of a project's activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ActivitySample {
    /// Total CPU time the project's processes have used since it started,
    /// microseconds (a counter; [`decide`] works on differences).
    pub cpu_time_us: u64,
    /// Processes in the project now.
    pub processes: u64,
    /// Established TCP connections in the project's network namespace now.
    pub connections: u64,
}

/// Where activity samples come from (a runner that can measure its projects).
#[async_trait]
pub trait ActivitySource: Send + Sync {
    /// Samples a running project; `Ok(None)` if it is not running.
    async fn sample(&self, project: ProjectId) -> Result<Option<ActivitySample>, RunnerError>;
}

/// When the culler considers a project idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CullPolicy {
    /// A project idle for this long is stopped.
    pub idle_timeout: Duration,
    /// CPU use above this fraction of one core, averaged since the previous
    /// sample, counts as activity (e.g. `0.05` = 5 % of a core).
    pub cpu_threshold: f64,
    /// Grace given to a culled project to exit before it is killed.
    pub stop_grace: Duration,
}

impl Default for CullPolicy {
    /// One hour idle, 5 % of a core, 10 s grace.
    fn default() -> Self {
        CullPolicy {
            idle_timeout: Duration::from_secs(3600),
            cpu_threshold: 0.05,
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// What the culler remembers about one project between samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleState {
    /// Last time the project was seen active (or first seen).
    pub last_active: Timestamp,
    /// The previous sample and when it was taken.
    pub previous: Option<(Timestamp, ActivitySample)>,
}

impl IdleState {
    /// State of a project first seen at `now` (counts as active then).
    pub fn new(now: Timestamp) -> Self {
        IdleState {
            last_active: now,
            previous: None,
        }
    }
}

/// Why a project counted as active in a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveBecause {
    /// CPU use above the threshold since the previous sample.
    Cpu,
    /// Open TCP connections.
    Connections,
    /// The CPU counter went backwards: the project restarted.
    Restarted,
}

/// The verdict for one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CullDecision {
    /// Active now.
    Active(ActiveBecause),
    /// Idle, but for less than the timeout (idle for this long so far).
    Idle(Duration),
    /// Idle for at least the timeout: stop it.
    Stop,
}

/// The pure culling decision: the verdict and the state to keep.
///
/// The first sample of a project only establishes a baseline for CPU use
/// (open connections still count at once).
pub fn decide(
    policy: &CullPolicy,
    state: &IdleState,
    sample: ActivitySample,
    now: Timestamp,
) -> (CullDecision, IdleState) {
    let mut active = None;
    if sample.connections > 0 {
        active = Some(ActiveBecause::Connections);
    }
    if let Some((then, prev)) = state.previous {
        if sample.cpu_time_us < prev.cpu_time_us {
            active = active.or(Some(ActiveBecause::Restarted));
        } else {
            let wall_us = now.since(then).as_micros() as f64;
            let used = (sample.cpu_time_us - prev.cpu_time_us) as f64;
            if wall_us > 0.0 && used / wall_us > policy.cpu_threshold {
                active = Some(ActiveBecause::Cpu);
            }
        }
    }
    let mut next = IdleState {
        last_active: state.last_active,
        previous: Some((now, sample)),
    };
    let verdict = match active {
        Some(why) => {
            next.last_active = now;
            CullDecision::Active(why)
        }
        None => {
            let idle = now.since(state.last_active);
            if idle >= policy.idle_timeout {
                CullDecision::Stop
            } else {
                CullDecision::Idle(idle)
            }
        }
    };
    (verdict, next)
}

/// The idle culler's driver: keeps an [`IdleState`] per project, takes
/// "user activity" reports from the data plane, and on each
/// [`tick`](IdleCuller::tick) samples and culls.
#[derive(Debug)]
pub struct IdleCuller {
    policy: CullPolicy,
    clock: SharedClock,
    states: HashMap<ProjectId, IdleState>,
}

impl IdleCuller {
    /// A culler with `policy`, reading time from `clock`.
    pub fn new(policy: CullPolicy, clock: SharedClock) -> Self {
        IdleCuller {
            policy,
            clock,
            states: HashMap::new(),
        }
    }

    /// Records user activity (a browser, terminal or API request) now.
    pub fn note_activity(&mut self, project: ProjectId) {
        let now = self.clock.now();
        let st = self
            .states
            .entry(project)
            .or_insert_with(|| IdleState::new(now));
        st.last_active = st.last_active.max(now);
    }

    /// The state kept for `project`, if any.
    pub fn state(&self, project: ProjectId) -> Option<&IdleState> {
        self.states.get(&project)
    }

    /// Samples every running project of `runner` through `source`, decides,
    /// and stops the idle ones. Returns every verdict. A project that fails to
    /// sample is left alone (and reported as an error in the list); a project
    /// that is no longer running is forgotten.
    pub async fn tick(
        &mut self,
        runner: &dyn Runner,
        source: &dyn ActivitySource,
    ) -> Result<Vec<(ProjectId, Result<CullDecision, RunnerError>)>, RunnerError> {
        let running: Vec<ProjectId> = runner
            .list()
            .await?
            .into_iter()
            .filter(|s| s.state == ProjectState::Running)
            .map(|s| s.project)
            .collect();
        self.states.retain(|p, _| running.contains(p));
        let mut out = Vec::with_capacity(running.len());
        for project in running {
            let sample = match source.sample(project).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    self.states.remove(&project);
                    continue;
                }
                Err(e) => {
                    out.push((project, Err(e)));
                    continue;
                }
            };
            let now = self.clock.now();
            let state = *self
                .states
                .entry(project)
                .or_insert_with(|| IdleState::new(now));
            let (verdict, next) = decide(&self.policy, &state, sample, now);
            self.states.insert(project, next);
            if verdict == CullDecision::Stop {
                if let Err(e) = runner.stop(project, self.policy.stop_grace).await {
                    out.push((project, Err(e)));
                    continue;
                }
                self.states.remove(&project);
            }
            out.push((project, Ok(verdict)));
        }
        Ok(out)
    }
}

impl IdleCuller {
    /// Ticks every `every` (real time, `tokio::time`) until `shutdown`
    /// resolves, logging failures. Decisions still read the injected clock;
    /// simulations call [`tick`](IdleCuller::tick) themselves instead.
    pub async fn run(
        mut self,
        runner: &dyn Runner,
        source: &dyn ActivitySource,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            match self.tick(runner, source).await {
                Ok(verdicts) => {
                    for (project, v) in verdicts {
                        match v {
                            Ok(CullDecision::Stop) => {
                                tracing::info!(%project, "stopped idle project")
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(%project, "idle culler: {e}"),
                        }
                    }
                }
                Err(e) => tracing::warn!("idle culler: listing projects: {e}"),
            }
        }
    }
}

/// Measures the process tree rooted at host `pid` through `/proc` and the
/// cgroup it lives in (cgroup v1 `cpuacct`/`pids`/`memory` or the v2 unified
/// hierarchy). Returns the sample and the memory use in bytes.
pub fn sample_cgroup_of(pid: u32) -> std::io::Result<(ActivitySample, u64)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut cpu_us = None;
    let mut pids = None;
    let mut mem = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let path = path.trim_start_matches('/');
        if ctrls.is_empty() {
            // cgroup v2 unified hierarchy.
            let base = Path::new("/sys/fs/cgroup").join(path);
            if cpu_us.is_none() {
                cpu_us = read_v2_usage_usec(&base.join("cpu.stat"));
            }
            pids = pids.or_else(|| read_u64(&base.join("pids.current")));
            mem = mem.or_else(|| read_u64(&base.join("memory.current")));
            continue;
        }
        for c in ctrls.split(',') {
            let base: PathBuf = Path::new("/sys/fs/cgroup").join(c).join(path);
            match c {
                "cpuacct" => {
                    cpu_us = read_u64(&base.join("cpuacct.usage")).map(|ns| ns / 1000);
                }
                "pids" => pids = read_u64(&base.join("pids.current")),
                "memory" => mem = read_u64(&base.join("memory.usage_in_bytes")),
                _ => {}
            }
        }
    }
    let cpu_time_us = cpu_us.ok_or_else(|| {
        std::io::Error::other(format!("no CPU accounting found for pid {pid}'s cgroup"))
    })?;
    let sample = ActivitySample {
        cpu_time_us,
        processes: pids.unwrap_or(0),
        connections: count_established(pid)?,
    };
    Ok((sample, mem.unwrap_or(0)))
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_v2_usage_usec(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Established TCP connections (IPv4 and IPv6) in the network namespace of
/// host process `pid`: `CurrEstab` of `/proc/PID/net/snmp`. (Walking
/// `/proc/PID/net/tcp` instead costs ~10 ms here: the kernel scans every
/// namespace's sockets.)
pub fn count_established(pid: u32) -> std::io::Result<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    curr_estab(&snmp)
        .ok_or_else(|| std::io::Error::other(format!("no Tcp CurrEstab in /proc/{pid}/net/snmp")))
}

/// `CurrEstab` from the text of a `/proc/net/snmp` file (a `Tcp:` header
/// line followed by a `Tcp:` value line).
pub fn curr_estab(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let idx = names.split_whitespace().position(|n| n == "CurrEstab")?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use cocalc_core::{
        ExecRequest, ExecStream, ManualClock, ProjectSpec, RunStatus, Runner, RunnerError,
    };
    use std::sync::{Arc, Mutex};

    fn policy() -> CullPolicy {
        CullPolicy {
            idle_timeout: Duration::from_secs(600),
            cpu_threshold: 0.05,
            stop_grace: Duration::from_secs(1),
        }
    }

    fn s(cpu_s: u64, conns: u64) -> ActivitySample {
        ActivitySample {
            cpu_time_us: cpu_s * 1_000_000,
            processes: 3,
            connections: conns,
        }
    }

    #[test]
    fn idle_project_is_stopped_after_the_timeout() {
        let p = policy();
        let t0 = Timestamp::from_secs(1000);
        let mut st = IdleState::new(t0);
        let (d, n) = decide(&p, &st, s(1, 0), t0);
        assert_eq!(d, CullDecision::Idle(Duration::ZERO));
        st = n;
        let (d, n) = decide(&p, &st, s(1, 0), Timestamp::from_secs(1300));
        assert_eq!(d, CullDecision::Idle(Duration::from_secs(300)));
        st = n;
        let (d, _) = decide(&p, &st, s(1, 0), Timestamp::from_secs(1600));
        assert_eq!(d, CullDecision::Stop);
    }

    #[test]
    fn long_computation_without_browser_is_not_idle() {
        let p = policy();
        let mut st = IdleState::new(Timestamp::from_secs(0));
        let mut cpu = 0;
        for minute in 1..=120 {
            cpu += 30; // half a core
            let (d, n) = decide(&p, &st, s(cpu, 0), Timestamp::from_secs(minute * 60));
            if minute > 1 {
                assert_eq!(
                    d,
                    CullDecision::Active(ActiveBecause::Cpu),
                    "minute {minute}"
                );
            }
            st = n;
        }
    }

    #[test]
    fn cpu_below_threshold_counts_as_idle() {
        let p = policy();
        let st = IdleState {
            last_active: Timestamp::from_secs(0),
            previous: Some((Timestamp::from_secs(0), s(10, 0))),
        };
        // 1 s of CPU in 700 s: 0.14 % of a core.
        let (d, _) = decide(&p, &st, s(11, 0), Timestamp::from_secs(700));
        assert_eq!(d, CullDecision::Stop);
    }

    #[test]
    fn open_connection_keeps_a_project_alive() {
        let p = policy();
        let st = IdleState {
            last_active: Timestamp::from_secs(0),
            previous: Some((Timestamp::from_secs(0), s(10, 0))),
        };
        let (d, n) = decide(&p, &st, s(10, 1), Timestamp::from_secs(7000));
        assert_eq!(d, CullDecision::Active(ActiveBecause::Connections));
        assert_eq!(n.last_active, Timestamp::from_secs(7000));
    }

    #[test]
    fn counter_going_backwards_means_restart_and_activity() {
        let p = policy();
        let st = IdleState {
            last_active: Timestamp::from_secs(0),
            previous: Some((Timestamp::from_secs(0), s(100, 0))),
        };
        let (d, _) = decide(&p, &st, s(1, 0), Timestamp::from_secs(7000));
        assert_eq!(d, CullDecision::Active(ActiveBecause::Restarted));
    }

    #[test]
    fn parses_curr_estab_from_proc_net_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs\n\
Tcp: 1 200 120000 -1 5 3 0 0 2 100\n\
Udp: InDatagrams\nUdp: 0\n";
        assert_eq!(curr_estab(snmp), Some(2));
        assert_eq!(curr_estab("Ip: 1\n"), None);
    }

    /// A runner with fixed running projects that records stops.
    #[derive(Default)]
    struct FakeRunner {
        running: Mutex<Vec<ProjectId>>,
        stopped: Mutex<Vec<ProjectId>>,
    }

    #[async_trait]
    impl Runner for FakeRunner {
        async fn start(&self, spec: &ProjectSpec) -> Result<RunStatus, RunnerError> {
            Ok(RunStatus::stopped(spec.project))
        }
        async fn stop(&self, project: ProjectId, _grace: Duration) -> Result<(), RunnerError> {
            self.running.lock().unwrap().retain(|p| *p != project);
            self.stopped.lock().unwrap().push(project);
            Ok(())
        }
        async fn status(&self, project: ProjectId) -> Result<RunStatus, RunnerError> {
            Ok(RunStatus::stopped(project))
        }
        async fn exec(&self, p: ProjectId, _r: ExecRequest) -> Result<ExecStream, RunnerError> {
            Err(RunnerError::NotRunning(p))
        }
        async fn list(&self) -> Result<Vec<RunStatus>, RunnerError> {
            Ok(self
                .running
                .lock()
                .unwrap()
                .iter()
                .map(|p| {
                    let mut s = RunStatus::stopped(*p);
                    s.state = ProjectState::Running;
                    s
                })
                .collect())
        }
    }

    struct FakeSource(Mutex<HashMap<ProjectId, ActivitySample>>);

    #[async_trait]
    impl ActivitySource for FakeSource {
        async fn sample(&self, p: ProjectId) -> Result<Option<ActivitySample>, RunnerError> {
            Ok(self.0.lock().unwrap().get(&p).copied())
        }
    }

    #[tokio::test]
    async fn driver_stops_only_the_truly_idle_project() {
        let idle = ProjectId::from_bytes([1; 16]);
        let busy = ProjectId::from_bytes([2; 16]);
        let browsed = ProjectId::from_bytes([3; 16]);
        let runner = FakeRunner::default();
        runner.running.lock().unwrap().extend([idle, busy, browsed]);
        let source = FakeSource(Mutex::new(HashMap::new()));
        let clock = ManualClock::new(Timestamp::from_secs(0));
        let mut culler = IdleCuller::new(policy(), Arc::new(clock.clone()));
        let mut busy_cpu = 0;
        for _ in 0..12 {
            {
                let mut m = source.0.lock().unwrap();
                m.insert(idle, s(5, 0));
                m.insert(busy, s(busy_cpu, 0));
                m.insert(browsed, s(7, 0));
            }
            culler.note_activity(browsed);
            let _ = culler.tick(&runner, &source).await.unwrap();
            clock.advance(Duration::from_secs(60));
            busy_cpu += 60;
        }
        assert_eq!(*runner.stopped.lock().unwrap(), vec![idle]);
        assert!(culler.state(idle).is_none());
        assert!(culler.state(busy).is_some());
    }
}
