//! The host's metrics for Prometheus: running projects against slots, how
//! long ago the master last granted a lease (the clock that the offline
//! grace runs on), the reverse tunnel of a hidden host, backups, and the
//! data plane's answers by status code.
//!
//! [`HostMetrics`] reads, at scrape time, what the host keeps anyway (a
//! `prometheus-client` collector); the answers cost one atomic increment
//! each ([`cocalc_core::StatusCounts`], kept by the data-plane router).
//! The daemon serves them at `GET /metrics` on `metrics_listen`, an
//! address of its own, so the data plane does not show them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cocalc_core::counters::encode::{
    access_log_lines, client_connections, counter, gauge, responses,
};
use cocalc_core::SharedClock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::agent::HostAgent;
use crate::master_link::MasterLink;
use crate::tunnel::TunnelClient;

/// The content type of [`HostMetrics::render`]'s output.
pub use cocalc_core::counters::CONTENT_TYPE;

/// Reads a host's parts at each scrape.
#[derive(Clone)]
pub struct HostMetrics {
    agent: Arc<HostAgent>,
    link: Arc<MasterLink>,
    clock: SharedClock,
    running: Arc<AtomicU32>,
    slots: u32,
    tunnel: Option<Arc<TunnelClient>>,
    tls_failures: Option<Arc<std::sync::atomic::AtomicU64>>,
    admission: Option<crate::admission::Admission>,
}

impl std::fmt::Debug for HostMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMetrics").finish_non_exhaustive()
    }
}

impl HostMetrics {
    /// Metrics of a host: its agent and master link, the running-project
    /// count it keeps for keepalives, its slots, and its tunnel if hidden.
    pub fn new(
        agent: Arc<HostAgent>,
        link: Arc<MasterLink>,
        clock: SharedClock,
        running: Arc<AtomicU32>,
        slots: u32,
        tunnel: Option<Arc<TunnelClient>>,
    ) -> Self {
        HostMetrics {
            agent,
            link,
            clock,
            running,
            slots,
            tunnel,
            tls_failures: None,
            admission: None,
        }
    }

    /// Also reports the per-client connection cap on the listener: the
    /// connections held under it and those refused.
    pub fn with_admission(mut self, admission: crate::admission::Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Also reports `failures`: TLS handshakes on the data plane that
    /// failed or stalled (a host serving HTTPS).
    pub fn with_tls_failures(mut self, failures: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.tls_failures = Some(failures);
        self
    }

    /// All metrics now, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        cocalc_core::counters::encode::render("cocalc_host", Box::new(self.clone()))
    }
}

impl Collector for HostMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "running_projects",
            "Projects running now (counted every 5 s)",
            i64::from(self.running.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "project_slots",
            "Projects this host may run at once",
            i64::from(self.slots),
        )?;
        if let Some(at) = self.link.last_lease() {
            let age = self.clock.now().since(at);
            let g = ConstGauge::new(age.as_secs_f64());
            g.encode(encoder.encode_descriptor(
                "master_lease_age_seconds",
                "Seconds since the master last granted a lease (registration or keepalive); \
                 the offline grace counts from here",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(t) = &self.tunnel {
            gauge(
                &mut encoder,
                "tunnel_connected",
                "1 while this hidden host's reverse tunnel is up",
                i64::from(t.is_connected()),
            )?;
            counter(
                &mut encoder,
                "tunnel_connects",
                "Reverse tunnels established (the first and every reconnect)",
                t.connects(),
            )?;
            counter(
                &mut encoder,
                "dial_backs",
                "Dial-back connections opened to the proxy for user connections",
                t.dials(),
            )?;
        }
        if let Some(b) = self.agent.backup_stats() {
            counter(
                &mut encoder,
                "backups_stored",
                "Backups that stored a new snapshot of a project",
                b.stored,
            )?;
            counter(
                &mut encoder,
                "backups_unchanged",
                "Backups asked for (by the API or the schedule) of projects unchanged since \
                 their last one",
                b.unchanged,
            )?;
            counter(
                &mut encoder,
                "backup_failures",
                "Backups that failed",
                b.failed,
            )?;
            counter(
                &mut encoder,
                "backup_restores",
                "Restores from backups",
                b.restored,
            )?;
            counter(
                &mut encoder,
                "backup_restore_failures",
                "Restores from backups that failed or were refused",
                b.restore_failed,
            )?;
            if let Some(t) = b.last_success {
                gauge(
                    &mut encoder,
                    "backup_last_success_timestamp_seconds",
                    "Unix time of the last backup that succeeded; alert when it grows old",
                    i64::try_from(t).unwrap_or(i64::MAX),
                )?;
            }
        }
        if let Some(n) = &self.tls_failures {
            counter(
                &mut encoder,
                "tls_handshake_failures",
                "TLS handshakes on the data plane that failed or stalled (plain HTTP to the \
                 HTTPS port, no protocol or certificate in common, 10 s without finishing)",
                n.load(Ordering::Relaxed),
            )?;
        }
        if let Some(a) = &self.admission {
            client_connections(
                &mut encoder,
                "Connections held under the per-client cap (client_connections) now",
                a.held(),
            )?;
            counter(
                &mut encoder,
                "client_connections_refused",
                "Connections answered 429 too_many_connections and closed (their address \
                 held client_connections already)",
                a.refused(),
            )?;
            if let Some(log) = a.access_log() {
                access_log_lines(&mut encoder, (log.written(), log.dropped()))?;
            }
        }
        responses(
            &mut encoder,
            "Data-plane answers by HTTP status code (401 and 403 are refused tokens)",
            self.agent.responses(),
        )?;
        Ok(())
    }
}
