//! Placement decisions per second over 10,000 registered hosts, and
//! registry keepalives per second, measured in one run.
//!
//! Run: `cargo bench -p cocalc-placement --bench placement` (`-- --secs 1`
//! to shorten each measurement; default 2 s).
//!
//! Anchor: Nomad's C1M run placed 1M containers on 5,000 hosts in under
//! 5 minutes, ≈ 3,750 placements/s end to end (HashiCorp's published
//! figure, not measured here). The goal for this library is ≥ 100,000
//! decisions/s over 10,000 hosts.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocalc_core::wire::{KeepaliveRequest, RegisterHostRequest};
use cocalc_core::{
    Capacity, Health, HostEndpoint, HostId, Load, ManualClock, Placement, PlacementRequest,
    ProjectId, Region, Timestamp,
};
use cocalc_placement::{DataAware, LeastLoaded, Registry, RegistryPolicy, SeededRng};

const HOSTS: usize = 10_000;
const NOMAD_C1M_PER_SEC: f64 = 3_750.0;

fn measure(name: &str, secs: f64, mut f: impl FnMut()) -> f64 {
    for _ in 0..50 {
        f();
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{name:<52} {rate:>12.0} /s");
    rate
}

fn host_id(i: usize) -> HostId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    HostId::new_v4(b)
}

fn main() {
    let secs = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let registry = Registry::new(Arc::new(clock.clone()), RegistryPolicy::default(), 1);
    let rng = SeededRng::new(9);
    let regions = ["eu", "us", "asia", "sa"];
    for i in 0..HOSTS {
        let cap = Capacity {
            cpu_millis: 16_000,
            memory_bytes: 64 << 30,
            disk_free_bytes: (100 + rng.below(900) as u64) << 30,
            disk_total_bytes: 1000 << 30,
            project_slots: 200,
        };
        let id = host_id(i);
        registry.register(&RegisterHostRequest::new(
            id,
            "k4.public.x".into(),
            None,
            Region(regions[i % 4].into()),
            HostEndpoint::Url(format!(
                "http://10.{}.{}.{}:8443",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            )),
            cap,
        ));
        let load = Load {
            running_projects: rng.below(200) as u32,
            cpu: rng.unit(),
            memory_used_bytes: (rng.below(64) as u64) << 30,
        };
        registry
            .keepalive(id, &KeepaliveRequest::new(id, Health::Ok, cap, load))
            .expect("registered");
    }
    let hosts = registry.hosts();
    println!(
        "{} hosts registered, {} regions",
        hosts.len(),
        regions.len()
    );

    let mut req = PlacementRequest::new(ProjectId::new_v4([7; 16]));
    req.region = Some(Region("eu".into()));
    req.hosts_with_data = vec![host_id(1234)];

    let full = LeastLoaded::new();
    let sampled = LeastLoaded::sampled(64, 3);
    let data = DataAware::default().sampled(64, 4);
    let full_rate = measure("least-loaded, all 10,000 hosts scored", secs, || {
        black_box(full.place(black_box(&req), &hosts).expect("placed"));
    });
    let sampled_rate = measure("least-loaded, sample of 64", secs, || {
        black_box(sampled.place(black_box(&req), &hosts).expect("placed"));
    });
    let data_rate = measure("data-aware, sample of 64 + hosts with data", secs, || {
        black_box(data.place(black_box(&req), &hosts).expect("placed"));
    });

    let mut i = 0usize;
    let ka_rate = measure(
        "registry keepalive state updates (no HTTP/auth)",
        secs,
        || {
            let id = host_id(i % HOSTS);
            i += 1;
            let ka = KeepaliveRequest::new(id, Health::Ok, Capacity::default(), Load::default());
            black_box(registry.keepalive(id, &ka).expect("known"));
        },
    );
    let interval = cocalc_placement::keepalive_interval(HOSTS, registry.policy());
    clock.advance(Duration::from_secs(1));

    println!();
    println!("vs Nomad C1M ({NOMAD_C1M_PER_SEC} placements/s end to end, published):");
    println!("  full scan     {:>8.1}x", full_rate / NOMAD_C1M_PER_SEC);
    println!(
        "  sampled       {:>8.1}x   (goal: >= 100,000/s = 26.7x)",
        sampled_rate / NOMAD_C1M_PER_SEC
    );
    println!("  data-aware    {:>8.1}x", data_rate / NOMAD_C1M_PER_SEC);
    let fleet_rate = HOSTS as f64 / interval.as_secs_f64();
    println!(
        "keepalive interval at {HOSTS} hosts: {:?} -> {fleet_rate:.0} keepalives/s expected; \
         registry handles {ka_rate:.0}/s on one core ({:.2} % of a core at the expected rate)",
        interval,
        100.0 * fleet_rate / ka_rate
    );
}
