//! The proxy's counters for Prometheus: refusals at the HTTP and SSH
//! edges by reason, and what the reverse tunnels did.
//!
//! [`ProxyMetrics`] reads the counters the ingress, the tunnel hub and the
//! SSH ingress keep anyway, at scrape time (a `prometheus-client`
//! collector), so serving metrics costs nothing per request. The daemon
//! serves them at `GET /metrics` on `metrics_listen`, an address of its
//! own, so the public ingress port does not show them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::{Ingress, TunnelHub};

/// The content type of [`ProxyMetrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counters by reason, as (reason, counter) pairs.
type ByReason<'a> = Vec<(&'static str, &'a AtomicU64)>;

/// Reads the proxy's parts at each scrape.
#[derive(Clone)]
pub struct ProxyMetrics {
    ingress: Arc<Ingress>,
    tunnels: Arc<TunnelHub>,
    #[cfg(feature = "ssh")]
    ssh: Option<Arc<crate::SshIngress>>,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics").finish_non_exhaustive()
    }
}

impl ProxyMetrics {
    /// Metrics of an ingress and its tunnel hub.
    pub fn new(ingress: Arc<Ingress>, tunnels: Arc<TunnelHub>) -> Self {
        ProxyMetrics {
            ingress,
            tunnels,
            #[cfg(feature = "ssh")]
            ssh: None,
        }
    }

    /// Also reports the SSH ingress's refusals.
    #[cfg(feature = "ssh")]
    pub fn with_ssh(mut self, ssh: Arc<crate::SshIngress>) -> Self {
        self.ssh = Some(ssh);
        self
    }

    /// All metrics now, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("cocalc_proxy");
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    by_reason: ByReason<'_>,
) -> Result<(), std::fmt::Error> {
    let kind = ConstCounter::new(0u64).metric_type();
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (reason, n) in by_reason {
        let labels = [("reason", reason)];
        let sample = family.encode_family(&labels)?;
        ConstCounter::new(n.load(Ordering::Relaxed)).encode(sample)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    n: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(n.load(Ordering::Relaxed));
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for ProxyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = self.ingress.refusals();
        counters(
            &mut encoder,
            "http_refusals",
            "HTTP requests refused at the edge, by reason (each is also an audit record)",
            vec![
                ("bad_path", &r.bad_path),
                ("bad_token", &r.bad_token),
                ("rate_limited", &r.rate_limited),
                ("unreachable", &r.unreachable),
            ],
        )?;
        #[cfg(feature = "ssh")]
        if let Some(ssh) = &self.ssh {
            let r = ssh.refusals();
            counters(
                &mut encoder,
                "ssh_refusals",
                "SSH logins refused, by reason (each is also an audit record)",
                vec![
                    ("bad_user", &r.bad_user),
                    ("not_authorized", &r.not_authorized),
                    ("master_error", &r.master_error),
                    ("bad_method", &r.bad_method),
                    ("rate_limited", &r.rate_limited),
                ],
            )?;
        }
        let t = self.tunnels.stats();
        counter(
            &mut encoder,
            "tunnels_accepted",
            "Reverse tunnels accepted from hidden hosts",
            &t.accepted,
        )?;
        counter(
            &mut encoder,
            "tunnel_handshakes_refused",
            "Tunnel handshakes refused (bad signature, unknown host, replay, rate limit)",
            &t.refused,
        )?;
        counter(
            &mut encoder,
            "tunnel_streams",
            "Connections to hidden hosts carried as streams inside their tunnel",
            &t.streams,
        )?;
        counter(
            &mut encoder,
            "dial_backs",
            "Connections to hidden hosts carried on dial-back connections",
            &t.dials,
        )?;
        counter(
            &mut encoder,
            "dial_back_failures",
            "Dial-backs that failed or were late (the connection used a tunnel stream)",
            &t.dial_failures,
        )?;
        counter(
            &mut encoder,
            "dial_backs_refused",
            "Dial-back connections refused (unknown, expired or malformed nonce)",
            &t.dials_refused,
        )?;
        let up = ConstGauge::new(self.tunnels.connected().len() as i64);
        up.encode(encoder.encode_descriptor(
            "tunnels_connected",
            "Hidden hosts with a tunnel to this proxy now",
            None,
            up.metric_type(),
        )?)?;
        Ok(())
    }
}
