//! Placement strategies: eligibility, scoring, explanations.

use cocalc_core::{
    Capacity, Health, HostEndpoint, HostId, HostInfo, HostState, Load, Placement, PlacementError,
    PlacementRequest, ProjectId, Region,
};
use cocalc_placement::{DataAware, LeastLoaded};

fn host(n: u8, region: &str, cpu: f64) -> HostInfo {
    let mut h = HostInfo::new(
        HostId::new_v4([n; 16]),
        Region(region.into()),
        HostEndpoint::Url(format!("http://10.0.0.{n}:1")),
    );
    h.capacity = Capacity {
        cpu_millis: 4000,
        memory_bytes: 16 << 30,
        disk_free_bytes: 500 << 30,
        disk_total_bytes: 1000 << 30,
        project_slots: 10,
    };
    h.load = Load {
        running_projects: 0,
        cpu,
        memory_used_bytes: 0,
    };
    h
}

fn ex(d: &[cocalc_core::Exclusion]) -> Vec<(String, u32)> {
    d.iter().map(|e| (e.reason.clone(), e.hosts)).collect()
}

fn req() -> PlacementRequest {
    PlacementRequest::new(ProjectId::new_v4([99; 16]))
}

#[test]
fn least_loaded_picks_lowest_pressure_and_lists_candidates() {
    let hosts = [host(1, "eu", 0.7), host(2, "eu", 0.2), host(3, "eu", 0.5)];
    let d = LeastLoaded::new().place(&req(), &hosts).unwrap();
    assert_eq!(d.host, hosts[1].id);
    assert_eq!(d.strategy, "least-loaded");
    assert_eq!(d.candidates.len(), 3);
    assert_eq!(d.candidates[0].host, hosts[1].id);
    assert!(d.candidates.windows(2).all(|w| w[0].score <= w[1].score));
    assert!(d.reason.contains("least loaded"), "{}", d.reason);
    assert!(
        d.candidates[0].note.contains("pressure 0.20"),
        "{}",
        d.candidates[0].note
    );
}

#[test]
fn memory_and_slot_pressure_count_too() {
    let mut a = host(1, "eu", 0.1);
    a.load.memory_used_bytes = 15 << 30; // 94 % memory
    let mut b = host(2, "eu", 0.3);
    b.load.running_projects = 1;
    let d = LeastLoaded::new().place(&req(), &[a, b.clone()]).unwrap();
    assert_eq!(d.host, b.id);
}

#[test]
fn region_is_preferred_but_not_required() {
    let hosts = [host(1, "us", 0.0), host(2, "eu", 0.9)];
    let mut r = req();
    r.region = Some(Region("eu".into()));
    let d = LeastLoaded::new().place(&r, &hosts).unwrap();
    assert_eq!(d.host, hosts[1].id);
    assert!(d.reason.contains("in region eu"), "{}", d.reason);
    // No eligible host in the region: the least loaded elsewhere, said so.
    let mut full = hosts[1].clone();
    full.load.running_projects = 10;
    let d = LeastLoaded::new()
        .place(&r, &[hosts[0].clone(), full])
        .unwrap();
    assert_eq!(d.host, hosts[0].id);
    assert!(
        d.reason.contains("no eligible host in region eu"),
        "{}",
        d.reason
    );
    assert_eq!(ex(&d.excluded), vec![("full".to_string(), 1)]);
}

#[test]
fn draining_down_failing_and_full_hosts_are_never_chosen() {
    let mut hosts = vec![
        host(1, "eu", 0.0),
        host(2, "eu", 0.0),
        host(3, "eu", 0.0),
        host(4, "eu", 0.0),
    ];
    hosts[0].state = HostState::Draining;
    hosts[1].state = HostState::Down;
    hosts[2].health = Health::Failing;
    hosts[3].load.running_projects = 10;
    for s in [
        &LeastLoaded::new() as &dyn Placement,
        &DataAware::new(0, 0.0),
    ] {
        let e = s.place(&req(), &hosts).unwrap_err();
        let PlacementError::NoEligibleHost { total, excluded } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*total, 4, "{}", s.name());
        assert_eq!(
            ex(excluded),
            vec![
                ("draining".into(), 1),
                ("down".into(), 1),
                ("failing".into(), 1),
                ("full".into(), 1)
            ],
            "{}",
            s.name()
        );
    }
    assert_eq!(
        LeastLoaded::new().place(&req(), &[]),
        Err(PlacementError::NoHosts)
    );
}

#[test]
fn degraded_hosts_rank_below_healthy_ones() {
    let mut a = host(1, "eu", 0.0);
    a.health = Health::Degraded;
    let b = host(2, "eu", 0.5);
    let d = LeastLoaded::new().place(&req(), &[a, b.clone()]).unwrap();
    assert_eq!(d.host, b.id);
    assert!(d.candidates[1].note.contains("degraded"));
}

#[test]
fn data_aware_prefers_the_host_with_data_and_respects_headroom() {
    let hosts = [host(1, "eu", 0.1), host(2, "eu", 0.6), host(3, "eu", 0.0)];
    let mut r = req();
    r.hosts_with_data = vec![hosts[1].id];
    let s = DataAware::new(10 << 30, 0.1);
    let d = s.place(&r, &hosts).unwrap();
    assert_eq!(d.host, hosts[1].id);
    assert!(
        d.reason.starts_with("holds the project's data"),
        "{}",
        d.reason
    );

    // The data host is low on disk: excluded, and the reason says so.
    let mut low = hosts.clone();
    low[1].capacity.disk_free_bytes = 50 << 30; // 5 % of 1000 GiB
    let d = s.place(&r, &low).unwrap();
    assert_eq!(d.host, hosts[2].id);
    assert!(
        d.reason
            .contains("no host with the project's data is eligible"),
        "{}",
        d.reason
    );
    assert_eq!(ex(&d.excluded), vec![("low disk headroom".to_string(), 1)]);

    let d = s.place(&req(), &hosts).unwrap();
    assert!(d.reason.contains("no host holds data yet"), "{}", d.reason);
}

#[test]
fn sampling_is_seeded_and_says_so() {
    let hosts: Vec<HostInfo> = (0..200u8)
        .map(|n| host(n, "eu", f64::from(n) / 200.0))
        .collect();
    let a = LeastLoaded::sampled(16, 7).place(&req(), &hosts).unwrap();
    let b = LeastLoaded::sampled(16, 7).place(&req(), &hosts).unwrap();
    assert_eq!(a, b, "same seed, same decision");
    assert!(
        a.reason.contains("random sample of 16 of 200"),
        "{}",
        a.reason
    );
    // Data-aware sampling still finds the data host.
    let mut r = req();
    r.hosts_with_data = vec![hosts[150].id];
    let d = DataAware::new(0, 0.0)
        .sampled(16, 7)
        .place(&r, &hosts)
        .unwrap();
    assert_eq!(d.host, hosts[150].id);
}

#[test]
fn sampled_placement_spreads_load() {
    // Place 1000 projects on 50 hosts, updating load as we go: with 2-choice
    // sampling the fullest host ends within a small margin of the mean.
    let mut hosts: Vec<HostInfo> = (0..50u8).map(|n| host(n, "eu", 0.0)).collect();
    for h in &mut hosts {
        h.capacity.project_slots = 1000;
    }
    let s = LeastLoaded::sampled(2, 1);
    for _ in 0..1000 {
        let d = s.place(&req(), &hosts).unwrap();
        let h = hosts.iter_mut().find(|h| h.id == d.host).unwrap();
        h.load.running_projects += 1;
    }
    let max = hosts.iter().map(|h| h.load.running_projects).max().unwrap();
    let min = hosts.iter().map(|h| h.load.running_projects).min().unwrap();
    assert!(max <= 26 && min >= 14, "max {max} min {min} (mean 20)");
}
