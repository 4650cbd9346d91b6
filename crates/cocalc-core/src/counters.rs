//! [`StatusCounts`]: HTTP answers counted by status code, for the
//! daemons' metrics (one atomic increment per answer, read at scrape
//! time).

use std::sync::atomic::{AtomicU64, Ordering};

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
