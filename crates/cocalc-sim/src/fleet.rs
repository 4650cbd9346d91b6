//! [`Fleet`]: one master and any number of hosts in a turmoil simulation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocalc_auth::{AclCache, AclPolicy, KeySet};
use cocalc_core::{
    Capacity, Generation, Health, HostEndpoint, HostId, HostState, Load, ProjectId,
    ProjectPlacement, Region, SharedClock,
};
use cocalc_host::master_link::{HostStatus, LinkConfig, MasterLink};
use cocalc_master::{Caller, Directory, Master, MasterConfig};
use cocalc_placement::{LeastLoaded, MemoryStore, Registry, RegistryPolicy};
use ed25519_dalek::SigningKey;

use crate::model::HostModel;
use crate::net::{SimClock, SimDialer, SimListener};

/// The admin key of the simulated master.
pub const ADMIN_KEY: &str = "sim-admin";
/// The simulated master's name and port.
const MASTER: (&str, u16) = ("master", 8080);
/// When the simulation's clock starts (2026-01-01T00:00:00Z).
const EPOCH_SECS: u64 = 1_767_225_600;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How many hosts.
    pub hosts: usize,
    /// The seed of everything random in the run (turmoil's network, the
    /// runtimes' scheduling, the registry's jitter, the hosts' keys).
    pub seed: u64,
    /// turmoil's step: simulated time per step. Larger is faster to run
    /// and coarser (message delays are rounded up to it).
    pub tick: Duration,
    /// The master's keepalive and lease policy.
    pub policy: RegistryPolicy,
    /// The hosts' ACL policy (offline grace).
    pub acl: AclPolicy,
    /// Slots each host reports.
    pub slots: u32,
    /// How many racks the hosts are spread over (host `i` is in rack
    /// `i % racks`). A rack is one machine of the simulated network, so a
    /// partition cuts a whole rack off; turmoil links every pair of
    /// machines and visits every link for every machine on each step, so
    /// racks keep the machines few at thousands of hosts.
    pub racks: usize,
}

impl FleetConfig {
    /// `hosts` hosts, seed 1, 50 ms steps, the default policies, 100
    /// project slots per host.
    pub fn new(hosts: usize) -> Self {
        FleetConfig {
            hosts,
            seed: 1,
            tick: Duration::from_millis(50),
            policy: RegistryPolicy::default(),
            acl: AclPolicy::default(),
            slots: 100,
            racks: hosts.clamp(1, 16),
        }
    }

    /// The same with another seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// A call [`Fleet::call`] hands to the operators' machine.
type Job =
    Box<dyn FnOnce(Arc<Master>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>;

/// What the master, the hosts and the operators' machine share before the
/// network does: the master, once built, one bootstrap token per host, and
/// the calls waiting to run.
struct Shared {
    master: Mutex<Option<Arc<Master>>>,
    tokens: Mutex<Vec<String>>,
    jobs_tx: tokio::sync::mpsc::UnboundedSender<Job>,
    jobs_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Job>>,
}

impl Shared {
    fn new() -> Self {
        let (jobs_tx, jobs_rx) = tokio::sync::mpsc::unbounded_channel();
        Shared {
            master: Mutex::new(None),
            tokens: Mutex::new(Vec::new()),
            jobs_tx,
            jobs_rx: tokio::sync::Mutex::new(jobs_rx),
        }
    }

    fn master(&self) -> Option<Arc<Master>> {
        self.master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One simulated host: its identity, what it runs, and its ACL cache.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// Its name (`h0`, `h1`, …), in its endpoint URL.
    pub name: String,
    /// Its rack: the simulated machine it runs on.
    pub rack: usize,
    /// Its id at the master.
    pub id: HostId,
    /// What it runs.
    pub model: Arc<HostModel>,
    /// Its ACL cache (which knows whether the master link is up).
    pub acl: Arc<AclCache>,
}

/// How many hosts the master sees in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Lease valid.
    pub up: usize,
    /// Lease valid, draining.
    pub draining: usize,
    /// Lease expired.
    pub down: usize,
}

/// A project that runs on more than one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleRun {
    /// The project.
    pub project: ProjectId,
    /// Every host it runs on, with the generation.
    pub hosts: Vec<(HostId, Generation)>,
}

/// A master and its hosts in a turmoil simulation. Everything runs in
/// simulated time: a simulated minute costs what the code does in it, not
/// a minute.
pub struct Fleet {
    sim: turmoil::Sim<'static>,
    shared: Arc<Shared>,
    hosts: Vec<SimHost>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("hosts", &self.hosts.len())
            .field("elapsed", &self.sim.elapsed())
            .finish_non_exhaustive()
    }
}

/// How many racks a fleet has: at least one, at most one per host.
fn racks(cfg: &FleetConfig) -> usize {
    cfg.racks.clamp(1, cfg.hosts.max(1))
}

/// The simulated machine of a rack.
fn rack_name(rack: usize) -> String {
    format!("rack{rack}")
}

/// A deterministic 32-byte value from a seed and an index.
fn derive(seed: u64, index: u64, salt: u8) -> [u8; 32] {
    let mut x = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(salt) << 56;
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

impl Fleet {
    /// Builds the simulation: the master (the real `Master` and HTTP
    /// router, on an in-memory directory and map) and `cfg.hosts` hosts,
    /// each running the real [`MasterLink`] with a [`HostModel`]. Nothing
    /// runs until the fleet is stepped.
    pub fn new(cfg: FleetConfig) -> Fleet {
        let sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(365 * 24 * 3600))
            .tick_duration(cfg.tick)
            .epoch(std::time::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
            .rng_seed(cfg.seed)
            // turmoil panics on a full accept queue (a kernel would drop
            // the SYN); with every host dialing at once, make room for all.
            .tcp_capacity(64 + 4 * cfg.hosts)
            .build();
        let mut fleet = Fleet {
            sim,
            shared: Arc::new(Shared::new()),
            hosts: Vec::with_capacity(cfg.hosts),
        };
        fleet.add_master(&cfg);
        fleet.add_operators();
        for i in 0..cfg.hosts {
            fleet.add_host(&cfg, i);
        }
        for rack in 0..racks(&cfg) {
            fleet.add_rack(&cfg, rack);
        }
        fleet
    }

    fn add_master(&mut self, cfg: &FleetConfig) {
        let shared = self.shared.clone();
        let (hosts, seed, policy) = (cfg.hosts, cfg.seed, cfg.policy);
        self.sim.host(MASTER.0, move || {
            let shared = shared.clone();
            async move {
                let clock: SharedClock = Arc::new(SimClock::new());
                let master = Master::new(
                    MasterConfig::new(ADMIN_KEY),
                    clock.clone(),
                    Directory::open(None)?,
                    Arc::new(MemoryStore::new()),
                    Registry::new(clock.clone(), policy, seed),
                    Box::new(LeastLoaded::new()),
                    KeySet::generate(clock.now())?,
                )
                .await?;
                let master = Arc::new(master);
                let admin = master.authenticate(ADMIN_KEY)?;
                let mut tokens = Vec::with_capacity(hosts);
                for _ in 0..hosts {
                    tokens.push(master.bootstrap_token(&admin)?.0);
                }
                *shared.tokens.lock().unwrap_or_else(|p| p.into_inner()) = tokens;
                *shared.master.lock().unwrap_or_else(|p| p.into_inner()) = Some(master.clone());
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", MASTER.1)).await?;
                axum::serve(SimListener(listener), cocalc_master::http::router(master)).await?;
                Ok(())
            }
        });
    }

    /// The machine [`Fleet::call`] runs operators' and users' calls on, one
    /// after another. (One machine for all of them: each machine added to
    /// turmoil makes every later step slower.)
    fn add_operators(&mut self) {
        let shared = self.shared.clone();
        self.sim.host("operators", move || {
            let shared = shared.clone();
            async move {
                loop {
                    let job = shared.jobs_rx.lock().await.recv().await;
                    let Some(job) = job else { return Ok(()) };
                    let master = loop {
                        if let Some(m) = shared.master() {
                            break m;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    job(master).await;
                }
            }
        });
    }

    fn add_host(&mut self, cfg: &FleetConfig, i: usize) {
        let id_bytes: [u8; 16] = derive(cfg.seed, i as u64, 2)[..16]
            .try_into()
            .expect("16 of 32 bytes");
        let clock: SharedClock = Arc::new(SimClock::new());
        self.hosts.push(SimHost {
            name: format!("h{i}"),
            rack: i % racks(cfg),
            id: HostId::new_v4(id_bytes),
            model: Arc::new(HostModel::new()),
            acl: Arc::new(AclCache::new(clock, cfg.acl)),
        });
    }

    /// One simulated machine running the master links of its rack's hosts.
    fn add_rack(&mut self, cfg: &FleetConfig, rack: usize) {
        let members: Vec<(usize, SimHost)> = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.rack == rack)
            .map(|(i, h)| (i, h.clone()))
            .collect();
        let shared = self.shared.clone();
        let seed = cfg.seed;
        let capacity = Capacity {
            cpu_millis: 16_000,
            memory_bytes: 64 << 30,
            disk_free_bytes: 1 << 40,
            disk_total_bytes: 2 << 40,
            project_slots: cfg.slots,
        };
        self.sim.host(rack_name(rack).as_str(), move || {
            let (shared, members) = (shared.clone(), members.clone());
            async move {
                let tokens = loop {
                    let tokens = shared
                        .tokens
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if !tokens.is_empty() {
                        break tokens;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                let mut links = tokio::task::JoinSet::new();
                for (i, host) in members {
                    let cfg = LinkConfig {
                        master_url: format!("http://{}:{}", MASTER.0, MASTER.1),
                        host: host.id,
                        key: SigningKey::from_bytes(&derive(seed, i as u64, 1)),
                        bootstrap_token: tokens.get(i).cloned(),
                        region: Region("sim".into()),
                        endpoint: HostEndpoint::Url(format!("http://{}:8443", host.name)),
                    };
                    let clock: SharedClock = Arc::new(SimClock::new());
                    let link = MasterLink::new(cfg, clock, host.acl.clone(), host.model.clone())
                        .with_dialer(Arc::new(SimDialer::new(MASTER.0, MASTER.1)));
                    let model = host.model.clone();
                    let status: Arc<dyn HostStatus> = Arc::new(move || {
                        let running = model.running_projects().len();
                        let load = Load {
                            running_projects: u32::try_from(running).unwrap_or(u32::MAX),
                            ..Load::default()
                        };
                        (Health::Ok, capacity, load)
                    });
                    links.spawn(Arc::new(link).run(status, std::future::pending()));
                }
                while links.join_next().await.is_some() {}
                Ok(())
            }
        });
    }

    /// The hosts, in the order they were made.
    pub fn hosts(&self) -> &[SimHost] {
        &self.hosts
    }

    /// The host with id `id`.
    pub fn host(&self, id: HostId) -> Option<&SimHost> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// Steps the simulation once; a simulated machine whose software
    /// failed is a bug in the run and panics with its error.
    fn step(&mut self) {
        if let Err(e) = self.sim.step() {
            panic!("simulation failed at {:?}: {e}", self.sim.elapsed());
        }
    }

    /// Runs the simulation for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.sim.elapsed() + d;
        while self.sim.elapsed() < until {
            self.step();
        }
    }

    /// Runs until `done` holds, checked after every step, or `limit` of
    /// simulated time has passed. The simulated time it took, or `None`.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Fleet) -> bool,
    ) -> Option<Duration> {
        let start = self.sim.elapsed();
        loop {
            if done(self) {
                return Some(self.sim.elapsed() - start);
            }
            if self.sim.elapsed() - start >= limit {
                return None;
            }
            self.step();
        }
    }

    /// The master, once it has started (steps the simulation until then).
    pub fn master(&mut self) -> Arc<Master> {
        loop {
            if let Some(m) = self
                .shared
                .master
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return m;
            }
            self.step();
        }
    }

    /// The admin caller.
    pub fn admin(&mut self) -> Caller {
        self.master()
            .authenticate(ADMIN_KEY)
            .expect("the simulated admin key")
    }

    /// Runs `op` against the master on the operators' machine of the
    /// simulation (so it reads the simulated clock), stepping until it
    /// ends: what an operator's or a user's call does, without the HTTP in
    /// front of it.
    pub fn call<T, F, Fut>(&mut self, op: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Arc<Master>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
    {
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let job: Job = Box::new(move |master| {
            Box::pin(async move {
                let v = op(master).await;
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            })
        });
        if self.shared.jobs_tx.send(job).is_err() {
            panic!("the operators' machine of the simulation is gone");
        }
        loop {
            if let Some(v) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return v;
            }
            self.step();
        }
    }

    /// Where the map places `project` now (`None`: not placed); panics if
    /// the store fails, which the in-memory store does not.
    pub fn placement(&mut self, project: ProjectId) -> Option<ProjectPlacement> {
        self.call(move |m| async move {
            m.store()
                .placement(project)
                .await
                .expect("the in-memory map store")
        })
    }

    /// How many registered hosts the master sees in each state now.
    pub fn states(&mut self) -> StateCounts {
        let master = self.master();
        let mut c = StateCounts::default();
        for h in master.registry().hosts() {
            match h.state {
                HostState::Up => c.up += 1,
                HostState::Draining => c.draining += 1,
                HostState::Down => c.down += 1,
            }
        }
        c
    }

    /// Every registered host with its state at the master, as of the
    /// master's last reading of the simulated clock.
    pub fn master_now(&self) -> Vec<(HostId, HostState)> {
        let Some(master) = self
            .shared
            .master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Vec::new();
        };
        master
            .registry()
            .hosts()
            .into_iter()
            .map(|h| (h.id, h.state))
            .collect()
    }

    /// The master's state of one host, `None` before it registered.
    pub fn state_of(&mut self, host: HostId) -> Option<HostState> {
        let master = self.master();
        let now = master.now();
        master.registry().inspect(host, |h| h.state_at(now))
    }

    /// The hosts in `rack`.
    pub fn rack(&self, rack: usize) -> Vec<HostId> {
        self.hosts
            .iter()
            .filter(|h| h.rack == rack)
            .map(|h| h.id)
            .collect()
    }

    /// Cuts the network between the master and `rack` (both ways).
    pub fn partition(&mut self, rack: usize) {
        self.sim.partition(MASTER.0, rack_name(rack).as_str());
    }

    /// Heals what [`Fleet::partition`] cut.
    pub fn repair(&mut self, rack: usize) {
        self.sim.repair(MASTER.0, rack_name(rack).as_str());
    }

    /// Every project running on more than one host now.
    pub fn double_runs(&self) -> Vec<DoubleRun> {
        let mut by_project: std::collections::BTreeMap<ProjectId, Vec<(HostId, Generation)>> =
            Default::default();
        for h in &self.hosts {
            for (p, g) in h.model.running_projects() {
                by_project.entry(p).or_default().push((h.id, g));
            }
        }
        by_project
            .into_iter()
            .filter(|(_, hosts)| hosts.len() > 1)
            .map(|(project, hosts)| DoubleRun { project, hosts })
            .collect()
    }
}
