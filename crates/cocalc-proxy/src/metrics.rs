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

use cocalc_core::counters::encode::{
    access_log_lines, client_connections, counter, counters, gauge, gauges,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::{Ingress, TunnelHub};

/// The content type of [`ProxyMetrics::render`]'s output.
pub use cocalc_core::counters::CONTENT_TYPE;

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
        cocalc_core::counters::encode::render("cocalc_proxy", Box::new(self.clone()))
    }
}

/// Counters by reason, read now.
fn by_reason(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    by_reason: ByReason<'_>,
) -> Result<(), std::fmt::Error> {
    counters(
        encoder,
        name,
        help,
        by_reason
            .into_iter()
            .map(|(reason, n)| ([("reason", reason.to_string())], n.load(Ordering::Relaxed))),
    )
}

impl Collector for ProxyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = self.ingress.refusals();
        by_reason(
            &mut encoder,
            "http_refusals",
            "HTTP requests refused at the edge, by reason (each is also an audit record)",
            vec![
                ("bad_path", &r.bad_path),
                ("bad_token", &r.bad_token),
                ("rate_limited", &r.rate_limited),
                ("unreachable", &r.unreachable),
                ("tls_handshake", &r.tls_handshake),
                ("too_many_connections", &r.too_many_connections),
                ("host_not_responding", &r.host_not_responding),
                ("bad_proxy_header", &r.bad_proxy_header),
                ("tunnel_elsewhere", &r.tunnel_elsewhere),
            ],
        )?;
        counter(
            &mut encoder,
            "peer_forwards",
            "Requests and SSH connections for hidden hosts whose tunnels land at other \
             proxies, forwarded to those",
            self.ingress.peer_forwards(),
        )?;
        let checks = self.ingress.host_checks();
        counters(
            &mut encoder,
            "host_checks",
            "Health checks of hosts that kept a request waiting, by result (silent: the \
             requests waiting on it ended with 504)",
            [
                ("answered", checks.answered.load(Ordering::Relaxed)),
                ("silent", checks.silent.load(Ordering::Relaxed)),
            ]
            .map(|(result, n)| ([("result", result.to_string())], n)),
        )?;
        if let Some(log) = self.ingress.access_log() {
            access_log_lines(&mut encoder, (log.written(), log.dropped()))?;
        }
        #[cfg(feature = "ssh")]
        if let Some(ssh) = &self.ssh {
            let r = ssh.refusals();
            by_reason(
                &mut encoder,
                "ssh_refusals",
                "SSH logins refused, by reason (each is also an audit record)",
                vec![
                    ("bad_user", &r.bad_user),
                    ("not_authorized", &r.not_authorized),
                    ("master_error", &r.master_error),
                    ("bad_method", &r.bad_method),
                    ("rate_limited", &r.rate_limited),
                    ("too_many_connections", &r.too_many_connections),
                ],
            )?;
            counter(
                &mut encoder,
                "ssh_earlier_grant_logins",
                "SSH logins let in while the master could not be asked, from its earlier grants",
                ssh.earlier_grant_logins(),
            )?;
        }
        let t = self.tunnels.stats();
        counter(
            &mut encoder,
            "tunnels_accepted",
            "Reverse tunnels accepted from hidden hosts",
            t.accepted.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "tunnel_handshakes_refused",
            "Tunnel handshakes refused (bad signature, unknown host, replay, rate limit)",
            t.refused.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "tunnel_streams",
            "Connections to hidden hosts carried as streams inside their tunnel",
            t.streams.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "dial_backs",
            "Connections to hidden hosts carried on dial-back connections",
            t.dials.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "dial_back_failures",
            "Dial-backs that failed or were late (the connection used a tunnel stream)",
            t.dial_failures.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "dial_backs_refused",
            "Dial-back connections refused (unknown, expired or malformed nonce)",
            t.dials_refused.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "tunnels_connected",
            "Hidden hosts with a tunnel to this proxy now",
            self.tunnels.connected().len() as i64,
        )?;
        counter(
            &mut encoder,
            "tunnel_moves",
            "Hidden hosts that agreed to move their tunnel to another proxy while this one \
             drained",
            t.moves.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "draining",
            "1 while the proxy drains before a stop (its health check answers 503), else 0",
            i64::from(self.ingress.draining()),
        )?;
        let routes = self.ingress.route_stats();
        gauges(
            &mut encoder,
            "routes",
            "Hosts' addresses known, fresh or stale (past their TTL: still used while the \
             master is asked again, or away)",
            [
                ([("state", "fresh".to_string())], routes.fresh as i64),
                ([("state", "stale".to_string())], routes.stale as i64),
            ],
        )?;
        counter(
            &mut encoder,
            "master_lookup_failures",
            "Route lookups at the master that failed",
            routes.lookup_failures,
        )?;
        gauge(
            &mut encoder,
            "master_away",
            "1 while the master does not answer route lookups (the proxy routes with the \
             addresses it knows)",
            i64::from(routes.master_away),
        )?;
        client_connections(
            &mut encoder,
            "Connections with project requests (and SSH sessions) open now, under the \
             per-client cap",
            self.ingress.connections_held(),
        )?;
        Ok(())
    }
}
