//! Placement strategies: [`LeastLoaded`] and [`DataAware`].
//!
//! Both apply [`ineligibility`] first (down, draining and failing hosts are
//! never chosen), exclude full hosts, and score the rest (lower is better).
//! The decision lists the best few candidates with their scores, the
//! excluded hosts by reason, and one sentence saying why the winner won.
//!
//! ## Scale
//!
//! Scoring every host costs O(hosts) per decision. With `sample = Some(k)`,
//! a strategy scores `k` hosts drawn at random (plus, for [`DataAware`],
//! every host that holds the project's data): the "power of k choices",
//! which keeps load within a small factor of the optimum at a fraction of the
//! cost. The random source is seeded, so a simulation can fix it. Decisions
//! made from a sample say so.

use cocalc_core::placement::ineligibility;
use cocalc_core::{
    Candidate, Exclusion, Health, HostInfo, Placement, PlacementDecision, PlacementError,
    PlacementRequest,
};

use crate::rng::SeededRng;

/// How many candidates a decision lists.
pub const LISTED_CANDIDATES: usize = 5;

/// Score added for a host outside the requested region.
pub const REGION_PENALTY: f64 = 10.0;
/// Score added for a degraded host.
pub const DEGRADED_PENALTY: f64 = 1.0;
/// Score subtracted for a host that holds the project's data.
pub const DATA_BONUS: f64 = 5.0;

/// The load component of a host's score: its highest pressure among CPU,
/// memory and project slots, each as a fraction of capacity (0 = idle,
/// 1 = full). Unknown capacities count as no pressure.
pub fn pressure(h: &HostInfo) -> f64 {
    let mem = if h.capacity.memory_bytes > 0 {
        h.load.memory_used_bytes as f64 / h.capacity.memory_bytes as f64
    } else {
        0.0
    };
    let slots = if h.capacity.project_slots > 0 {
        h.load.running_projects as f64 / h.capacity.project_slots as f64
    } else {
        0.0
    };
    h.load.cpu.max(mem).max(slots).max(0.0)
}

fn is_full(h: &HostInfo) -> bool {
    h.capacity.project_slots > 0 && h.load.running_projects >= h.capacity.project_slots
}

/// Keeps the best `LISTED_CANDIDATES` candidates, best first.
#[derive(Default)]
struct Best {
    top: Vec<Candidate>,
}

impl Best {
    fn offer(&mut self, host: &HostInfo, score: f64, note: impl FnOnce() -> String) {
        if self.top.len() == LISTED_CANDIDATES && self.top.last().is_some_and(|w| score >= w.score)
        {
            return;
        }
        if self.top.iter().any(|c| c.host == host.id) {
            return;
        }
        let pos = self.top.partition_point(|c| c.score <= score);
        self.top.insert(
            pos,
            Candidate {
                host: host.id,
                score,
                note: note(),
            },
        );
        self.top.truncate(LISTED_CANDIDATES);
    }
}

#[derive(Default)]
struct Excluded(Vec<Exclusion>);

impl Excluded {
    fn add(&mut self, why: &str) {
        Exclusion::count(&mut self.0, why);
    }
}

/// Shared scoring loop: `extra` adds strategy-specific exclusion or score.
struct Scorer<'a> {
    req: &'a PlacementRequest,
    best: Best,
    excluded: Excluded,
    considered: usize,
}

impl<'a> Scorer<'a> {
    fn new(req: &'a PlacementRequest) -> Self {
        Scorer {
            req,
            best: Best::default(),
            excluded: Excluded::default(),
            considered: 0,
        }
    }

    fn consider(&mut self, h: &HostInfo, extra: impl Fn(&HostInfo) -> Result<f64, &'static str>) {
        self.considered += 1;
        if let Some(why) = ineligibility(h) {
            self.excluded.add(why);
            return;
        }
        if is_full(h) {
            self.excluded.add("full");
            return;
        }
        let adj = match extra(h) {
            Ok(a) => a,
            Err(why) => {
                self.excluded.add(why);
                return;
            }
        };
        let p = pressure(h);
        let other_region = self.req.region.as_ref().is_some_and(|r| *r != h.region);
        let degraded = h.health == Health::Degraded;
        let score = p
            + if other_region { REGION_PENALTY } else { 0.0 }
            + if degraded { DEGRADED_PENALTY } else { 0.0 }
            + adj;
        self.best.offer(h, score, || {
            let mut note = format!("pressure {p:.2}");
            if other_region {
                note.push_str(", other region");
            }
            if degraded {
                note.push_str(", degraded");
            }
            if adj < 0.0 {
                note.push_str(", holds the project's data");
            }
            note
        });
    }

    fn finish(
        self,
        strategy: &str,
        total: usize,
        why: impl FnOnce(&Candidate) -> String,
    ) -> Result<PlacementDecision, PlacementError> {
        let Some(best) = self.best.top.first() else {
            return Err(PlacementError::NoEligibleHost {
                total,
                excluded: self.excluded.0,
            });
        };
        let mut reason = why(best);
        if self.considered < total {
            reason.push_str(&format!(
                " (scored a random sample of {} of {total} hosts)",
                self.considered
            ));
        }
        Ok(PlacementDecision::new(
            best.host,
            strategy,
            reason,
            self.best.top.clone(),
            self.excluded.0,
        ))
    }
}

/// Finds a host by id: binary search when `hosts` is sorted by id (as
/// [`Registry::hosts`](crate::Registry::hosts) returns it), else a scan.
fn find_host(hosts: &[HostInfo], id: cocalc_core::HostId) -> Option<&HostInfo> {
    match hosts.binary_search_by_key(&id, |h| h.id) {
        Ok(i) => Some(&hosts[i]),
        Err(_) => hosts.iter().find(|h| h.id == id),
    }
}

/// Visits every host, or a random sample of `k` of them.
fn visit<'h>(
    hosts: &'h [HostInfo],
    sample: Option<(usize, &SeededRng)>,
    mut f: impl FnMut(&'h HostInfo),
) {
    match sample {
        Some((k, rng)) if hosts.len() > k => {
            for _ in 0..k {
                f(&hosts[rng.below(hosts.len())]);
            }
        }
        _ => hosts.iter().for_each(f),
    }
}

/// The least-loaded eligible host, preferring the requested region.
///
/// Score = pressure (0–1) + 10 if outside the requested region + 1 if
/// degraded. Full hosts are excluded.
#[derive(Debug)]
pub struct LeastLoaded {
    sample: Option<usize>,
    rng: SeededRng,
}

impl Default for LeastLoaded {
    fn default() -> Self {
        LeastLoaded::new()
    }
}

impl LeastLoaded {
    /// Scores every host.
    pub fn new() -> Self {
        LeastLoaded {
            sample: None,
            rng: SeededRng::new(0),
        }
    }

    /// Scores a random sample of `k` hosts when there are more than `k`.
    pub fn sampled(k: usize, seed: u64) -> Self {
        LeastLoaded {
            sample: Some(k.max(1)),
            rng: SeededRng::new(seed),
        }
    }
}

impl Placement for LeastLoaded {
    fn name(&self) -> &str {
        "least-loaded"
    }

    fn place(
        &self,
        req: &PlacementRequest,
        hosts: &[HostInfo],
    ) -> Result<PlacementDecision, PlacementError> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts);
        }
        let mut s = Scorer::new(req);
        visit(hosts, self.sample.map(|k| (k, &self.rng)), |h| {
            s.consider(h, |_| Ok(0.0))
        });
        s.finish(self.name(), hosts.len(), |best| match &req.region {
            Some(r) if !best.note.contains("other region") => {
                format!("least loaded eligible host in region {r} ({})", best.note)
            }
            Some(r) => format!(
                "no eligible host in region {r}; least loaded elsewhere ({})",
                best.note
            ),
            None => format!("least loaded eligible host ({})", best.note),
        })
    }
}

/// Prefers a host that already holds the project's data (or a snapshot of
/// it), then the least loaded; never a host below the disk-headroom floor.
///
/// Score = least-loaded score − 5 for holding the data. A host whose free
/// disk is below `min_free_bytes` or `min_free_fraction` of its pool is
/// excluded as `low disk headroom`.
#[derive(Debug)]
pub struct DataAware {
    /// Least free bytes a host must have.
    pub min_free_bytes: u64,
    /// Least free fraction of its pool a host must have.
    pub min_free_fraction: f64,
    inner: LeastLoaded,
}

impl Default for DataAware {
    /// Floors: 10 GiB free and 10 % of the pool; every host scored.
    fn default() -> Self {
        DataAware::new(10 << 30, 0.10)
    }
}

impl DataAware {
    /// With the given headroom floors, scoring every host.
    pub fn new(min_free_bytes: u64, min_free_fraction: f64) -> Self {
        DataAware {
            min_free_bytes,
            min_free_fraction,
            inner: LeastLoaded::new(),
        }
    }

    /// Also sample `k` hosts at random (hosts with data are always scored).
    pub fn sampled(mut self, k: usize, seed: u64) -> Self {
        self.inner = LeastLoaded::sampled(k, seed);
        self
    }

    fn headroom(&self, h: &HostInfo) -> Result<(), &'static str> {
        let c = &h.capacity;
        let fraction_ok = c.disk_total_bytes == 0
            || (c.disk_free_bytes as f64) >= self.min_free_fraction * c.disk_total_bytes as f64;
        if c.disk_free_bytes < self.min_free_bytes || !fraction_ok {
            Err("low disk headroom")
        } else {
            Ok(())
        }
    }
}

impl Placement for DataAware {
    fn name(&self) -> &str {
        "data-aware"
    }

    fn place(
        &self,
        req: &PlacementRequest,
        hosts: &[HostInfo],
    ) -> Result<PlacementDecision, PlacementError> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts);
        }
        let has_data = |h: &HostInfo| req.hosts_with_data.contains(&h.id);
        let extra = |h: &HostInfo| -> Result<f64, &'static str> {
            self.headroom(h)?;
            Ok(if has_data(h) { -DATA_BONUS } else { 0.0 })
        };
        let mut s = Scorer::new(req);
        if self.inner.sample.is_some_and(|k| hosts.len() > k) {
            // Hosts with data are few; find them even when sampling.
            for id in &req.hosts_with_data {
                if let Some(h) = find_host(hosts, *id) {
                    s.consider(h, extra);
                }
            }
        }
        visit(
            hosts,
            self.inner.sample.map(|k| (k, &self.inner.rng)),
            |h| s.consider(h, extra),
        );
        s.finish(self.name(), hosts.len(), |best| {
            if req.hosts_with_data.contains(&best.host) {
                format!("holds the project's data ({})", best.note)
            } else if req.hosts_with_data.is_empty() {
                format!("no host holds data yet; least loaded ({})", best.note)
            } else {
                format!(
                    "no host with the project's data is eligible; least loaded ({})",
                    best.note
                )
            }
        })
    }
}
