//! Registers a fleet in simulated time and reports how long it took, in
//! simulated and in real time: `cargo run --release -p cocalc-sim
//! --example fleet -- --hosts 2000`.

use std::time::{Duration, Instant};

use clap::Parser;
use cocalc_sim::{Fleet, FleetConfig};

/// Arguments.
#[derive(Parser, Debug)]
struct Args {
    /// How many hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated milliseconds per step.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
}

fn main() {
    let args = Args::parse();
    let mut cfg = FleetConfig::new(args.hosts).seed(args.seed);
    cfg.tick = Duration::from_millis(args.tick_ms);
    let t0 = Instant::now();
    let mut fleet = Fleet::new(cfg);
    let took = fleet.run_until(Duration::from_secs(600), |f| {
        f.hosts().iter().all(|h| h.model.key_sets() > 0)
    });
    println!(
        "{} hosts registered in {:?} simulated, {:?} real; master sees {:?}",
        args.hosts,
        took,
        t0.elapsed(),
        fleet.states()
    );
    let t1 = Instant::now();
    fleet.run_for(Duration::from_secs(120));
    println!(
        "120 s more simulated in {:?} real; master sees {:?}",
        t1.elapsed(),
        fleet.states()
    );
}
