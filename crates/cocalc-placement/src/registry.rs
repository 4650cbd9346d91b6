//! The host registry: registrations, leases renewed by keepalives, and the
//! state every host is in.
//!
//! ## Leases and states
//!
//! A registration or keepalive grants a lease of `lease_multiplier ×` the
//! keepalive interval. A host's state is derived, never stored stale:
//! `Down` once its lease has expired, else `Draining` if an operator drained
//! it, else `Up`. A host that goes `Down` stays registered with its projects
//! still mapped to it: losing a heartbeat never by itself re-places or kills
//! anything (re-placement is an explicit operation elsewhere).
//!
//! ## Keepalive interval
//!
//! [`keepalive_interval`] grows with the number of hosts so that the total
//! keepalive rate stays near `target_per_sec` (the approach Nomad takes),
//! within `[min_interval, max_interval]`; each grant adds ± `jitter` so hosts
//! registered together spread out.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use cocalc_core::wire::{KeepaliveRequest, LeaseGrant, RegisterHostRequest};
use cocalc_core::{HostId, HostInfo, HostState, SharedClock, Timestamp};

use crate::rng::SeededRng;

/// Registry tunables.
#[derive(Debug, Clone, Copy)]
pub struct RegistryPolicy {
    /// Keepalives per second the master aims to receive in total (default 50).
    pub target_per_sec: f64,
    /// Shortest interval asked of a host (default 5 s).
    pub min_interval: Duration,
    /// Longest interval asked of a host (default 2 min).
    pub max_interval: Duration,
    /// Lease length in keepalive intervals (default 3).
    pub lease_multiplier: u32,
    /// Relative jitter applied to each interval (default 0.1 = ±10 %).
    pub jitter: f64,
}

impl Default for RegistryPolicy {
    fn default() -> Self {
        RegistryPolicy {
            target_per_sec: 50.0,
            min_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(120),
            lease_multiplier: 3,
            jitter: 0.1,
        }
    }
}

/// The keepalive interval for a fleet of `hosts` hosts, before jitter.
pub fn keepalive_interval(hosts: usize, policy: &RegistryPolicy) -> Duration {
    let secs = hosts as f64 / policy.target_per_sec.max(f64::MIN_POSITIVE);
    Duration::from_secs_f64(secs.min(policy.max_interval.as_secs_f64()))
        .clamp(policy.min_interval, policy.max_interval)
}

/// `base` scaled by a factor drawn uniformly from `[1 - jitter, 1 + jitter]`.
pub fn jittered(base: Duration, jitter: f64, rng: &SeededRng) -> Duration {
    let j = jitter.clamp(0.0, 1.0);
    base.mul_f64(1.0 - j + 2.0 * j * rng.unit())
}

/// What the registry keeps per host.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostRecord {
    /// The host as placement sees it (its `state` is refreshed on read).
    pub info: HostInfo,
    /// The host's public key (PASERK `k4.public`) for authenticating its calls.
    pub public_key: String,
    /// Drained by an operator.
    pub draining: bool,
    /// First registration.
    pub registered_at: Timestamp,
}

impl HostRecord {
    /// The state at `now`: `Down` past the lease, else `Draining` or `Up`.
    pub fn state_at(&self, now: Timestamp) -> HostState {
        if now >= self.info.lease_expires {
            HostState::Down
        } else if self.draining {
            HostState::Draining
        } else {
            HostState::Up
        }
    }
}

/// Why a registry call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No host with this id is registered.
    #[error("host {0} is not registered")]
    UnknownHost(HostId),
    /// The request names a different host than the one authenticated.
    #[error("request is for host {found}, authenticated as {expected}")]
    HostMismatch {
        /// The authenticated host.
        expected: HostId,
        /// The host in the request.
        found: HostId,
    },
}

/// The set of registered hosts.
#[derive(Debug)]
pub struct Registry {
    clock: SharedClock,
    policy: RegistryPolicy,
    rng: SeededRng,
    hosts: RwLock<HashMap<HostId, HostRecord>>,
}

impl Registry {
    /// An empty registry. `seed` fixes the jitter sequence.
    pub fn new(clock: SharedClock, policy: RegistryPolicy, seed: u64) -> Self {
        Registry {
            clock,
            policy,
            rng: SeededRng::new(seed),
            hosts: RwLock::new(HashMap::new()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &RegistryPolicy {
        &self.policy
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<HostId, HostRecord>> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<HostId, HostRecord>> {
        self.hosts.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads records (from the durable store) into the registry, replacing
    /// any with the same id. Each loaded host gets at least one fresh lease
    /// from now: stored leases are not kept current (keepalives are not
    /// written through), so this gives every host one lease to check in
    /// after a master restart instead of marking the whole fleet down.
    pub fn load(&self, records: impl IntoIterator<Item = HostRecord>) {
        let now = self.clock.now();
        let mut g = self.write();
        for r in records {
            g.insert(r.info.id, r);
        }
        let lease = keepalive_interval(g.len(), &self.policy) * self.policy.lease_multiplier.max(1);
        let fresh = now.saturating_add(lease);
        for r in g.values_mut() {
            r.info.lease_expires = r.info.lease_expires.max(fresh);
        }
    }

    fn grant(&self, n_hosts: usize, now: Timestamp) -> (Timestamp, Duration) {
        let base = keepalive_interval(n_hosts, &self.policy);
        let lease = base * self.policy.lease_multiplier.max(1);
        let next = jittered(base, self.policy.jitter, &self.rng);
        (now.saturating_add(lease), next)
    }

    /// Records a registration. The caller has already checked the host's
    /// right to register (bootstrap token or known key). Keeps the first
    /// registration time and the drain flag of a host registering again.
    pub fn register(&self, req: &RegisterHostRequest) -> (HostRecord, LeaseGrant) {
        let now = self.clock.now();
        let mut g = self.write();
        let n = g.len() + usize::from(!g.contains_key(&req.host));
        let (lease_expires, next) = self.grant(n, now);
        let (registered_at, draining) = g
            .get(&req.host)
            .map_or((now, false), |r| (r.registered_at, r.draining));
        let mut info = HostInfo::new(req.host, req.region.clone(), req.endpoint.clone());
        info.capacity = req.capacity;
        info.lease_expires = lease_expires;
        let mut rec = HostRecord {
            info,
            public_key: req.public_key.clone(),
            draining,
            registered_at,
        };
        rec.info.state = rec.state_at(now);
        g.insert(req.host, rec.clone());
        let grant = LeaseGrant::new(
            rec.info.state,
            lease_expires,
            next.as_millis() as u64,
            Vec::new(),
        );
        (rec, grant)
    }

    /// Counts a project just placed on `host` as running there until the
    /// host's next keepalive reports its own figures. Placement reads load
    /// from keepalives, which come every few seconds to minutes; without
    /// this, every placement between two beats would go to the host that
    /// looked emptiest at the last one. No-op for an unknown host.
    pub fn note_placement(&self, host: HostId) {
        if let Some(rec) = self.write().get_mut(&host) {
            rec.info.load.running_projects = rec.info.load.running_projects.saturating_add(1);
        }
    }

    /// Renews `host`'s lease with the health, capacity and load it reports.
    pub fn keepalive(
        &self,
        host: HostId,
        req: &KeepaliveRequest,
    ) -> Result<(HostRecord, LeaseGrant), RegistryError> {
        self.renew_with(host, req, |rec, grant| (rec.clone(), grant))
    }

    /// [`Registry::keepalive`] without a copy of the record: the master's
    /// hot path (keepalives are not written through to the durable store,
    /// see [`Registry::load`]).
    pub fn renew(&self, host: HostId, req: &KeepaliveRequest) -> Result<LeaseGrant, RegistryError> {
        self.renew_with(host, req, |_, grant| grant)
    }

    fn renew_with<T>(
        &self,
        host: HostId,
        req: &KeepaliveRequest,
        out: impl FnOnce(&HostRecord, LeaseGrant) -> T,
    ) -> Result<T, RegistryError> {
        if req.host != host {
            return Err(RegistryError::HostMismatch {
                expected: host,
                found: req.host,
            });
        }
        let now = self.clock.now();
        let mut g = self.write();
        let n = g.len();
        let (lease_expires, next) = self.grant(n, now);
        let rec = g.get_mut(&host).ok_or(RegistryError::UnknownHost(host))?;
        rec.info.health = req.health;
        rec.info.capacity = req.capacity;
        rec.info.load = req.load;
        rec.info.lease_expires = lease_expires;
        rec.info.state = rec.state_at(now);
        let grant = LeaseGrant::new(
            rec.info.state,
            lease_expires,
            next.as_millis() as u64,
            Vec::new(),
        );
        Ok(out(rec, grant))
    }

    /// Sets or clears the drain flag.
    pub fn set_draining(&self, host: HostId, draining: bool) -> Result<HostRecord, RegistryError> {
        let now = self.clock.now();
        let mut g = self.write();
        let rec = g.get_mut(&host).ok_or(RegistryError::UnknownHost(host))?;
        rec.draining = draining;
        rec.info.state = rec.state_at(now);
        Ok(rec.clone())
    }

    /// One host's record, state as of now.
    pub fn get(&self, host: HostId) -> Option<HostRecord> {
        let now = self.clock.now();
        self.read().get(&host).map(|r| {
            let mut r = r.clone();
            r.info.state = r.state_at(now);
            r
        })
    }

    /// Applies `f` to one host's record without copying it (hot paths that
    /// need a field or two). The record's `info.state` may be stale: use
    /// [`HostRecord::state_at`].
    pub fn inspect<T>(&self, host: HostId, f: impl FnOnce(&HostRecord) -> T) -> Option<T> {
        self.read().get(&host).map(f)
    }

    /// Every host as placement sees it, states as of now, sorted by id.
    pub fn hosts(&self) -> Vec<HostInfo> {
        let now = self.clock.now();
        let mut v: Vec<HostInfo> = self
            .read()
            .values()
            .map(|r| {
                let mut i = r.info.clone();
                i.state = r.state_at(now);
                i
            })
            .collect();
        v.sort_by_key(|h| h.id);
        v
    }

    /// Number of registered hosts.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when no host is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocalc_core::{Capacity, Health, HostEndpoint, Load, ManualClock, Region};
    use std::sync::Arc;

    fn req(n: u8) -> RegisterHostRequest {
        RegisterHostRequest::new(
            HostId::new_v4([n; 16]),
            "k4.public.x".into(),
            None,
            Region("r".into()),
            HostEndpoint::Url(format!("http://127.0.0.1:{n}")),
            Capacity::default(),
        )
    }

    #[test]
    fn interval_scales_with_fleet_and_is_clamped() {
        let p = RegistryPolicy::default();
        assert_eq!(keepalive_interval(1, &p), Duration::from_secs(5));
        assert_eq!(keepalive_interval(1000, &p), Duration::from_secs(20));
        assert_eq!(keepalive_interval(10_000, &p), Duration::from_secs(120));
        // Total rate at 1000 hosts: 1000 / 20 s = 50/s, the target.
        let rng = SeededRng::new(3);
        for _ in 0..1000 {
            let j = jittered(Duration::from_secs(20), 0.1, &rng);
            assert!(
                j >= Duration::from_secs(18) && j <= Duration::from_secs(22),
                "{j:?}"
            );
        }
    }

    #[test]
    fn lease_expiry_marks_down_without_forgetting_the_host() {
        let clock = ManualClock::new(Timestamp::from_secs(1000));
        let reg = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
        let (rec, grant) = reg.register(&req(1));
        assert_eq!(grant.state, HostState::Up);
        assert_eq!(grant.lease_expires, Timestamp::from_secs(1015));
        assert!((4500..=5500).contains(&grant.next_keepalive_ms));
        clock.advance(Duration::from_secs(14));
        assert_eq!(reg.get(rec.info.id).unwrap().info.state, HostState::Up);
        clock.advance(Duration::from_secs(1));
        assert_eq!(reg.get(rec.info.id).unwrap().info.state, HostState::Down);
        assert_eq!(reg.hosts().len(), 1, "down hosts stay registered");
        // A keepalive brings it back.
        let ka = KeepaliveRequest::new(
            rec.info.id,
            Health::Ok,
            Capacity::default(),
            Load::default(),
        );
        let (_, g) = reg.keepalive(rec.info.id, &ka).unwrap();
        assert_eq!(g.state, HostState::Up);
        // Keepalives from an unknown host or for another host are refused.
        let other = HostId::new_v4([9; 16]);
        assert_eq!(
            reg.keepalive(
                rec.info.id,
                &KeepaliveRequest::new(other, Health::Ok, Capacity::default(), Load::default())
            ),
            Err(RegistryError::HostMismatch {
                expected: rec.info.id,
                found: other
            })
        );
        let ka9 = KeepaliveRequest::new(other, Health::Ok, Capacity::default(), Load::default());
        assert_eq!(
            reg.keepalive(other, &ka9),
            Err(RegistryError::UnknownHost(other))
        );
    }

    #[test]
    fn loaded_hosts_get_one_fresh_lease_to_check_in() {
        let clock = ManualClock::new(Timestamp::from_secs(1000));
        let reg = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
        let (mut rec, _) = reg.register(&req(1));
        rec.info.lease_expires = Timestamp::from_secs(10); // long expired
        clock.advance(Duration::from_secs(3600));
        let restarted = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
        restarted.load([rec.clone()]);
        assert_eq!(
            restarted.get(rec.info.id).unwrap().info.state,
            HostState::Up
        );
        clock.advance(Duration::from_secs(15));
        assert_eq!(
            restarted.get(rec.info.id).unwrap().info.state,
            HostState::Down
        );
    }

    #[test]
    fn placements_count_as_load_until_the_next_keepalive() {
        let clock = ManualClock::new(Timestamp::from_secs(1000));
        let reg = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
        let (rec, _) = reg.register(&req(1));
        let id = rec.info.id;
        let running = |reg: &Registry| reg.get(id).unwrap().info.load.running_projects;
        reg.note_placement(id);
        reg.note_placement(id);
        assert_eq!(running(&reg), 2);
        assert_eq!(reg.hosts()[0].load.running_projects, 2, "placement sees it");
        // The host's own figure replaces the estimate.
        let load = Load {
            running_projects: 1,
            ..Load::default()
        };
        let ka = KeepaliveRequest::new(id, Health::Ok, Capacity::default(), load);
        reg.renew(id, &ka).unwrap();
        assert_eq!(running(&reg), 1);
        // An unknown host is ignored.
        reg.note_placement(HostId::new_v4([9; 16]));
        assert_eq!(reg.hosts().len(), 1);
    }

    #[test]
    fn draining_survives_reregistration() {
        let clock = ManualClock::new(Timestamp::from_secs(1000));
        let reg = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
        let (rec, _) = reg.register(&req(1));
        reg.set_draining(rec.info.id, true).unwrap();
        clock.advance(Duration::from_secs(3));
        let (again, grant) = reg.register(&req(1));
        assert_eq!(grant.state, HostState::Draining);
        assert_eq!(again.registered_at, Timestamp::from_secs(1000));
        reg.set_draining(rec.info.id, false).unwrap();
        assert_eq!(reg.get(rec.info.id).unwrap().info.state, HostState::Up);
    }
}
