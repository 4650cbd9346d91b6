//! The [`Placement`] trait: choose a host for a project, and say why.
//!
//! Placement is a pure function of its inputs (the request and the host
//! records), so it is a plain synchronous trait: the master, tests and the
//! control-plane simulator all call it directly. Strategies live in
//! `cocalc-placement`; [`StaticPlacement`] is the reference implementation.

use serde::{Deserialize, Serialize};

use crate::id::{HostId, ProjectId};
use crate::record::{Health, HostInfo, HostState, Region};

/// What to place.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlacementRequest {
    /// The project (absent only in synthetic benchmarks).
    pub project: Option<ProjectId>,
    /// Preferred region, if any.
    pub region: Option<Region>,
    /// Hosts that already hold the project's data or a snapshot of it.
    pub hosts_with_data: Vec<HostId>,
}

impl PlacementRequest {
    /// A request for `project` with no preferences.
    pub fn new(project: ProjectId) -> Self {
        PlacementRequest {
            project: Some(project),
            ..Default::default()
        }
    }
}

/// One host the strategy considered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Candidate {
    /// The host.
    pub host: HostId,
    /// Its score; lower is better.
    pub score: f64,
    /// How the score came about, or why the host was excluded.
    pub note: String,
}

/// How many hosts a strategy excluded for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Exclusion {
    /// Why (`down`, `draining`, `full`, `low disk headroom`, ...).
    pub reason: String,
    /// How many hosts.
    pub hosts: u32,
}

impl Exclusion {
    /// Counts one more host excluded for `reason` in `list`.
    pub fn count(list: &mut Vec<Exclusion>, reason: &str) {
        match list.iter_mut().find(|e| e.reason == reason) {
            Some(e) => e.hosts += 1,
            None => list.push(Exclusion {
                reason: reason.to_string(),
                hosts: 1,
            }),
        }
    }
}

/// A placement choice that explains itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlacementDecision {
    /// The chosen host.
    pub host: HostId,
    /// Name of the strategy that chose it.
    pub strategy: String,
    /// One sentence: why this host.
    pub reason: String,
    /// The best-scoring eligible hosts, best first (at most a handful).
    pub candidates: Vec<Candidate>,
    /// How many hosts were excluded, by reason.
    pub excluded: Vec<Exclusion>,
}

impl PlacementDecision {
    /// A decision record.
    pub fn new(
        host: HostId,
        strategy: impl Into<String>,
        reason: impl Into<String>,
        candidates: Vec<Candidate>,
        excluded: Vec<Exclusion>,
    ) -> Self {
        PlacementDecision {
            host,
            strategy: strategy.into(),
            reason: reason.into(),
            candidates,
            excluded,
        }
    }
}

/// Why no host was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// No host is registered at all.
    #[error("no hosts are registered")]
    NoHosts,
    /// Hosts exist, none is eligible; the counts say why.
    #[error("no eligible host among {total}: {}", summary(excluded))]
    NoEligibleHost {
        /// Hosts considered.
        total: usize,
        /// Excluded hosts by reason.
        excluded: Vec<Exclusion>,
    },
}

fn summary(excluded: &[Exclusion]) -> String {
    excluded
        .iter()
        .map(|e| format!("{} {}", e.hosts, e.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a host may not take new projects, or `None` if it may.
/// Every strategy applies this rule first: draining, down and failing hosts
/// are never chosen.
pub fn ineligibility(host: &HostInfo) -> Option<&'static str> {
    match (host.state, host.health) {
        (HostState::Down, _) => Some("down"),
        (HostState::Draining, _) => Some("draining"),
        (_, Health::Failing) => Some("failing"),
        _ => None,
    }
}

/// Chooses a host for a project.
///
/// Contract: the chosen host is one of `hosts` and passes
/// [`ineligibility`]; the decision lists the strategy's name, a reason, the
/// best candidates with their scores, and the excluded counts. The same
/// inputs give the same decision unless the strategy documents randomness
/// (and then takes its RNG as an input).
pub trait Placement: Send + Sync {
    /// Name shown in decisions (`least-loaded`, `data-aware`).
    fn name(&self) -> &str;

    /// Picks a host.
    fn place(
        &self,
        request: &PlacementRequest,
        hosts: &[HostInfo],
    ) -> Result<PlacementDecision, PlacementError>;
}

/// Reference strategy: the first eligible host in the order given. Useful
/// with a single host, and as the simplest correct implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticPlacement;

impl Placement for StaticPlacement {
    fn name(&self) -> &str {
        "static"
    }

    fn place(
        &self,
        _request: &PlacementRequest,
        hosts: &[HostInfo],
    ) -> Result<PlacementDecision, PlacementError> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts);
        }
        let mut excluded: Vec<Exclusion> = Vec::new();
        for h in hosts {
            match ineligibility(h) {
                None => {
                    return Ok(PlacementDecision::new(
                        h.id,
                        self.name(),
                        "first eligible host in registration order",
                        vec![Candidate {
                            host: h.id,
                            score: 0.0,
                            note: "first eligible".into(),
                        }],
                        excluded,
                    ))
                }
                Some(why) => Exclusion::count(&mut excluded, why),
            }
        }
        Err(PlacementError::NoEligibleHost {
            total: hosts.len(),
            excluded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HostEndpoint;

    fn host(n: u8, state: HostState) -> HostInfo {
        let mut h = HostInfo::new(
            HostId::from_bytes([n; 16]),
            Region("r".into()),
            HostEndpoint::Url(format!("http://127.0.0.1:{n}")),
        );
        h.state = state;
        h
    }

    #[test]
    fn static_placement_skips_ineligible_and_explains() {
        let hosts = [
            host(1, HostState::Draining),
            host(2, HostState::Down),
            host(3, HostState::Up),
        ];
        let d = StaticPlacement
            .place(&PlacementRequest::default(), &hosts)
            .unwrap();
        assert_eq!(d.host, hosts[2].id);
        assert_eq!(d.strategy, "static");
        let ex: Vec<(&str, u32)> = d
            .excluded
            .iter()
            .map(|e| (e.reason.as_str(), e.hosts))
            .collect();
        assert_eq!(ex, vec![("draining", 1), ("down", 1)]);
        let err = StaticPlacement
            .place(&PlacementRequest::default(), &hosts[..2])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no eligible host among 2: 1 draining, 1 down"
        );
        assert_eq!(
            StaticPlacement.place(&PlacementRequest::default(), &[]),
            Err(PlacementError::NoHosts)
        );
    }
}
