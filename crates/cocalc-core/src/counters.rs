//! [`StatusCounts`]: HTTP answers counted by status code, for the
//! daemons' metrics (one atomic increment per answer, read at scrape
//! time); with the `metrics` feature, [`encode`]: the helpers their
//! Prometheus collectors share.

use std::sync::atomic::{AtomicU64, Ordering};

/// The content type of the daemons' `/metrics` (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// HTTP answers counted by status code (100 to 599).
#[derive(Debug)]
pub struct StatusCounts {
    by_status: Box<[AtomicU64]>,
}

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts {
            by_status: (100..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl StatusCounts {
    /// Counts one answer with `status` (codes outside 100..=599 are not
    /// counted).
    pub fn record(&self, status: u16) {
        if let Some(n) = status
            .checked_sub(100)
            .and_then(|i| self.by_status.get(usize::from(i)))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The status codes seen so far with their counts, lowest code first.
    pub fn seen(&self) -> Vec<(u16, u64)> {
        self.by_status
            .iter()
            .zip(100u16..)
            .filter_map(|(n, code)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((code, n))
            })
            .collect()
    }
}

/// Writing the daemons' metrics in the OpenMetrics text format with
/// `prometheus-client`: the content type, rendering one collector, and
/// the sample shapes the master, the host and the proxy all use.
#[cfg(feature = "metrics")]
pub mod encode {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    use super::StatusCounts;

    pub use super::CONTENT_TYPE;

    /// Everything `collector` reports now, its names prefixed with
    /// `prefix` (`cocalc_master`), in the OpenMetrics text format.
    pub fn render(prefix: &str, collector: Box<dyn Collector>) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix(prefix);
        registry.register_collector(collector);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// One gauge sample without labels.
    pub fn gauge(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        v: i64,
    ) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(v);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }

    /// The two gauges of a per-client connection cap: `client_connections`
    /// (the connections held under it now, described by `help`) and
    /// `client_addresses` (the addresses holding them).
    pub fn client_connections(
        encoder: &mut DescriptorEncoder<'_>,
        help: &str,
        (addresses, held): (u64, u64),
    ) -> Result<(), std::fmt::Error> {
        gauge(encoder, "client_connections", help, held as i64)?;
        gauge(
            encoder,
            "client_addresses",
            "Client addresses holding such connections now",
            addresses as i64,
        )
    }

    /// The lines of an access log, `access_log_lines_total` by `result`:
    /// `written`, and `dropped` (the writer fell behind or could not
    /// write).
    pub fn access_log_lines(
        encoder: &mut DescriptorEncoder<'_>,
        (written, dropped): (u64, u64),
    ) -> Result<(), std::fmt::Error> {
        counters(
            encoder,
            "access_log_lines",
            "Access log lines, by result (dropped: the writer fell behind or could not write)",
            [("written", written), ("dropped", dropped)]
                .map(|(result, n)| ([("result", result.to_string())], n)),
        )
    }

    /// One counter sample without labels (`<name>_total`).
    pub fn counter(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        n: u64,
    ) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(n);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
    }

    /// A counter family with one sample per label set.
    pub fn counters<const N: usize>(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = ([(&'static str, String); N], u64)>,
    ) -> Result<(), std::fmt::Error> {
        let kind = ConstCounter::new(0u64).metric_type();
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, n) in samples {
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family with one sample per label set.
    pub fn gauges<const N: usize>(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = ([(&'static str, String); N], i64)>,
    ) -> Result<(), std::fmt::Error> {
        let kind = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// `http_responses_total{code}`: the answers `counts` has seen.
    pub fn responses(
        encoder: &mut DescriptorEncoder<'_>,
        help: &str,
        counts: &StatusCounts,
    ) -> Result<(), std::fmt::Error> {
        counters(
            encoder,
            "http_responses",
            help,
            counts
                .seen()
                .into_iter()
                .map(|(code, n)| ([("code", code.to_string())], n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_is_kept_and_impossible_ones_ignored() {
        let c = StatusCounts::default();
        for s in [200, 200, 404, 599, 100, 99, 600, 0, u16::MAX] {
            c.record(s);
        }
        assert_eq!(c.seen(), vec![(100, 1), (200, 2), (404, 1), (599, 1)]);
    }
}
