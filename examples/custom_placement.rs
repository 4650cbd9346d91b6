//! A custom placement strategy: keep projects in one region, prefer the host
//! with the most free project slots, and explain the choice.
//!
//! `cargo run -p cocalc-examples --example custom_placement`

use cocalc_core::placement::ineligibility;
use cocalc_core::{
    Candidate, Capacity, Exclusion, HostEndpoint, HostId, HostInfo, Placement, PlacementDecision,
    PlacementError, PlacementRequest, ProjectId, Region,
};

/// Most free slots wins, within the requested region only.
struct MostFreeSlots;

impl Placement for MostFreeSlots {
    fn name(&self) -> &str {
        "most-free-slots"
    }

    fn place(
        &self,
        req: &PlacementRequest,
        hosts: &[HostInfo],
    ) -> Result<PlacementDecision, PlacementError> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts);
        }
        let mut excluded: Vec<Exclusion> = Vec::new();
        let mut note = |why: &str| Exclusion::count(&mut excluded, why);
        let mut candidates = Vec::new();
        for h in hosts {
            if let Some(why) = ineligibility(h) {
                note(why);
            } else if req.region.as_ref().is_some_and(|r| *r != h.region) {
                note("other region");
            } else {
                let free = h
                    .capacity
                    .project_slots
                    .saturating_sub(h.load.running_projects);
                candidates.push(Candidate {
                    host: h.id,
                    score: -(free as f64),
                    note: format!("{free} free slots"),
                });
            }
        }
        candidates.sort_by(|a, b| a.score.total_cmp(&b.score));
        let best = candidates.first().ok_or(PlacementError::NoEligibleHost {
            total: hosts.len(),
            excluded: excluded.clone(),
        })?;
        let reason = format!("most free slots in region: {}", best.note);
        Ok(PlacementDecision::new(
            best.host,
            self.name(),
            reason,
            candidates,
            excluded,
        ))
    }
}

fn host(n: u8, region: &str, slots: u32) -> HostInfo {
    let mut h = HostInfo::new(
        HostId::new_v4([n; 16]),
        Region(region.into()),
        HostEndpoint::Url(format!("http://10.0.0.{n}:8443")),
    );
    h.capacity = Capacity {
        project_slots: slots,
        ..Capacity::default()
    };
    h
}

fn main() {
    let hosts = [host(1, "eu", 10), host(2, "eu", 40), host(3, "us", 100)];
    let mut req = PlacementRequest::new(ProjectId::new_v4([7; 16]));
    req.region = Some(Region("eu".into()));
    match MostFreeSlots.place(&req, &hosts) {
        Ok(d) => {
            println!("chose {} by {}: {}", d.host, d.strategy, d.reason);
            for c in &d.candidates {
                println!("  candidate {} score {} ({})", c.host, c.score, c.note);
            }
            for e in &d.excluded {
                println!("  excluded {}: {}", e.hosts, e.reason);
            }
        }
        Err(e) => println!("no placement: {e}"),
    }
}
