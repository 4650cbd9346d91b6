//! The master's metrics for Prometheus: its hosts by state and health,
//! each host's load against its capacity, users and projects, the hosts
//! listening on the push channel, moves of projects between hosts, and
//! the API's answers by status code.
//!
//! Everything but the answer counts is read at scrape time from state the
//! master keeps anyway (a `prometheus-client` collector); the answers are
//! one atomic increment each ([`cocalc_core::StatusCounts`], kept by the
//! router). The daemon serves them at `GET /metrics` on `metrics_listen`,
//! an address of its own, so the API port does not show them.

use std::sync::Arc;

use cocalc_core::counters::encode::{counter, counters, gauge, gauges, responses};
use cocalc_core::{Health, HostState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::master::{Caller, Master};

/// The content type of [`MasterMetrics::render`]'s output.
pub use cocalc_core::counters::CONTENT_TYPE;

/// Reads the master's state at each scrape.
#[derive(Clone)]
pub struct MasterMetrics {
    master: Arc<Master>,
}

impl std::fmt::Debug for MasterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterMetrics").finish_non_exhaustive()
    }
}

impl MasterMetrics {
    /// Metrics of `master`.
    pub fn new(master: Arc<Master>) -> Self {
        MasterMetrics { master }
    }

    /// All metrics now, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        cocalc_core::counters::encode::render("cocalc_master", Box::new(self.clone()))
    }
}

fn state_name(s: HostState) -> &'static str {
    match s {
        HostState::Up => "up",
        HostState::Draining => "draining",
        HostState::Down => "down",
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Degraded => "degraded",
        Health::Failing => "failing",
    }
}

impl Collector for MasterMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &self.master;
        // Reading the registry as the admin cannot be refused.
        let hosts = m.hosts(&Caller::Admin).unwrap_or_default();
        let mut by_state = Vec::new();
        for state in [HostState::Up, HostState::Draining, HostState::Down] {
            for health in [Health::Ok, Health::Degraded, Health::Failing] {
                let n = hosts
                    .iter()
                    .filter(|h| h.state == state && h.health == health)
                    .count();
                by_state.push((
                    [
                        ("state", state_name(state).to_string()),
                        ("health", health_name(health).to_string()),
                    ],
                    n as i64,
                ));
            }
        }
        gauges(
            &mut encoder,
            "hosts",
            "Registered hosts by state (up, draining, down: lease expired) and health",
            by_state,
        )?;
        let per_host = |f: fn(&cocalc_core::HostInfo) -> i64| {
            hosts
                .iter()
                .map(|h| ([("host", h.id.to_string())], f(h)))
                .collect::<Vec<_>>()
        };
        gauges(
            &mut encoder,
            "host_running_projects",
            "Projects running on each host (its last keepalive)",
            per_host(|h| i64::from(h.load.running_projects)),
        )?;
        gauges(
            &mut encoder,
            "host_project_slots",
            "Projects each host can run at once",
            per_host(|h| i64::from(h.capacity.project_slots)),
        )?;
        gauge(
            &mut encoder,
            "push_channels",
            "Hosts listening on the push channel now",
            m.push().connected().len() as i64,
        )?;
        if let Ok((users, projects)) = m.directory().counts() {
            gauge(&mut encoder, "users", "Users", users as i64)?;
            gauge(&mut encoder, "projects", "Projects", projects as i64)?;
        }
        let moves = m.moves().stats();
        counter(
            &mut encoder,
            "moves_begun",
            "Moves of projects between hosts begun since the master started",
            moves.begun,
        )?;
        counters(
            &mut encoder,
            "moves_ended",
            "Moves ended since the master started, by outcome (done: moved; rolled_back: left \
             where it was)",
            [
                ([("outcome", "done".to_string())], moves.done),
                ([("outcome", "rolled_back".to_string())], moves.rolled_back),
            ],
        )?;
        gauge(
            &mut encoder,
            "moves_running",
            "Moves running now",
            moves.running as i64,
        )?;
        responses(
            &mut encoder,
            "API answers by HTTP status code (401 and 403 are refused callers)",
            m.responses(),
        )?;
        Ok(())
    }
}
