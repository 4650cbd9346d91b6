//! Which snapshots to keep: counts per time bucket, as a pure function.
//!
//! [`RetentionPolicy::select`] looks only at snapshot times and "now", so
//! tests and the simulator drive it with any clock. [`apply_retention`]
//! deletes what it did not keep through any [`Storage`].
//!
//! The rule, for each bucket kind with count `n`: walk the snapshots from
//! newest to oldest and keep the newest snapshot of each of the `n` most
//! recent periods (UTC day, ISO week starting Monday, calendar month) that
//! hold a snapshot; `frequent` keeps the `n` newest snapshots outright. A
//! snapshot is kept if any bucket keeps it. The newest snapshot and any
//! snapshot dated after "now" (clock skew) are always kept, so an idle
//! project never loses its last state.

use std::collections::BTreeSet;

use cocalc_core::{ProjectId, SnapshotInfo, Storage, StorageError, Timestamp};

use crate::names::civil_from_days;

/// Counts per bucket. The default keeps 4 frequent, 7 daily, 4 weekly and 2
/// monthly snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// The newest snapshots kept regardless of their time.
    pub frequent: usize,
    /// Newest snapshot of each of this many most recent days.
    pub daily: usize,
    /// Newest snapshot of each of this many most recent ISO weeks.
    pub weekly: usize,
    /// Newest snapshot of each of this many most recent months.
    pub monthly: usize,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            frequent: 4,
            daily: 7,
            weekly: 4,
            monthly: 2,
        }
    }
}

/// The outcome of [`RetentionPolicy::select`]: indices into the input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Retention {
    /// Snapshots to keep, ascending.
    pub keep: Vec<usize>,
    /// Snapshots to delete, ascending.
    pub delete: Vec<usize>,
}

/// Maps a time to the period (day, week, month) it falls in.
type Period = fn(Timestamp) -> i64;

fn day(t: Timestamp) -> i64 {
    t.as_millis().div_euclid(86_400_000)
}

fn iso_week(t: Timestamp) -> i64 {
    // 1970-01-01 was a Thursday; +3 makes weeks start on Monday.
    (day(t) + 3).div_euclid(7)
}

fn month(t: Timestamp) -> i64 {
    let (y, m, _) = civil_from_days(day(t));
    y * 12 + m
}

impl RetentionPolicy {
    /// Decides which of `times` (any order) to keep at `now`.
    pub fn select(&self, times: &[Timestamp], now: Timestamp) -> Retention {
        let mut order: Vec<usize> = (0..times.len()).collect();
        // Newest first; ties broken by index for determinism.
        order.sort_by(|&a, &b| times[b].cmp(&times[a]).then(a.cmp(&b)));
        let mut keep = BTreeSet::new();
        if let Some(&newest) = order.first() {
            keep.insert(newest);
        }
        for &i in &order {
            if times[i] > now {
                keep.insert(i);
            }
        }
        for &i in order.iter().take(self.frequent) {
            keep.insert(i);
        }
        let buckets: [(usize, Period); 3] = [
            (self.daily, day),
            (self.weekly, iso_week),
            (self.monthly, month),
        ];
        for (count, period) in buckets {
            let mut seen = BTreeSet::new();
            for &i in &order {
                if seen.len() >= count {
                    break;
                }
                if seen.insert(period(times[i])) {
                    keep.insert(i);
                }
            }
        }
        let delete = (0..times.len()).filter(|i| !keep.contains(i)).collect();
        Retention {
            keep: keep.into_iter().collect(),
            delete,
        }
    }
}

/// Applies `policy` to `project`'s snapshots on `storage` at `now`; returns
/// the names it deleted, oldest first.
pub async fn apply_retention(
    storage: &dyn Storage,
    project: ProjectId,
    policy: &RetentionPolicy,
    now: Timestamp,
) -> Result<Vec<String>, StorageError> {
    let snaps: Vec<SnapshotInfo> = storage.snapshots(project).await?;
    let times: Vec<Timestamp> = snaps.iter().map(|s| s.created).collect();
    let plan = policy.select(&times, now);
    let mut deleted = Vec::new();
    for i in plan.delete {
        let name = &snaps[i].name;
        storage.delete_snapshot(project, name).await?;
        deleted.push(name.clone());
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocalc_core::{Clock, ManualClock};
    use std::time::Duration;

    const MIN: u64 = 60;
    const HOUR: u64 = 3600;
    const DAY: u64 = 86_400;

    /// Snapshots every `step` seconds for `total` seconds, taken with a
    /// fake clock; returns the times and the clock at the end.
    fn take(start: Timestamp, step: u64, total: u64) -> (Vec<Timestamp>, ManualClock) {
        let clock = ManualClock::new(start);
        let mut v = Vec::new();
        let mut t = 0;
        while t < total {
            v.push(clock.now());
            clock.advance(Duration::from_secs(step));
            t += step;
        }
        (v, clock)
    }

    fn kept(p: &RetentionPolicy, times: &[Timestamp], now: Timestamp) -> Vec<Timestamp> {
        p.select(times, now)
            .keep
            .iter()
            .map(|&i| times[i])
            .collect()
    }

    // 2026-01-05 00:00 UTC is a Monday.
    const MONDAY: Timestamp = Timestamp::from_secs(1_767_571_200);

    #[test]
    fn default_counts_are_4_7_4_2() {
        let p = RetentionPolicy::default();
        assert_eq!((p.frequent, p.daily, p.weekly, p.monthly), (4, 7, 4, 2));
    }

    #[test]
    fn empty_and_single_inputs() {
        let p = RetentionPolicy::default();
        assert_eq!(p.select(&[], MONDAY), Retention::default());
        let r = p.select(&[MONDAY], MONDAY);
        assert_eq!(r.keep, vec![0]);
        assert!(r.delete.is_empty());
    }

    #[test]
    fn hourly_snapshots_over_ten_weeks_keep_the_bucket_heads() {
        let (times, clock) = take(MONDAY, HOUR, 70 * DAY);
        let p = RetentionPolicy::default();
        let r = p.select(&times, clock.now());
        assert_eq!(r.keep.len() + r.delete.len(), times.len());
        let k = kept(&p, &times, clock.now());
        // 4 frequent (the newest 4 hours), the last hour of each of the
        // previous 6 days, plus last-of-week and last-of-month snapshots
        // further back, all deduplicated.
        let newest = *times.last().unwrap();
        for i in 0..4 {
            assert!(k.contains(&times[times.len() - 1 - i]));
        }
        for d in 1..7 {
            let end_of_day = Timestamp(((day(newest) - d + 1) * 86_400_000) - 3_600_000);
            assert!(k.contains(&end_of_day), "day -{d}");
        }
        // The newest snapshot of each of the last 4 ISO weeks is kept.
        let weeks: BTreeSet<i64> = k.iter().map(|&t| iso_week(t)).collect();
        assert!(weeks.len() >= 4);
        // At most 4 + 7 + 4 + 2 snapshots survive.
        assert!(k.len() <= 17, "kept {}", k.len());
        // The oldest snapshot is gone; months: 2 kept at most.
        assert!(!k.contains(&times[0]));
        let months: BTreeSet<i64> = k.iter().map(|&t| month(t)).collect();
        assert!(months.len() <= 3);
    }

    #[test]
    fn idle_project_keeps_its_old_snapshots() {
        // Snapshots stopped 90 days ago: nothing newer to replace them.
        let (times, clock) = take(MONDAY, DAY, 10 * DAY);
        clock.advance(Duration::from_secs(90 * DAY));
        let p = RetentionPolicy {
            frequent: 0,
            daily: 3,
            weekly: 0,
            monthly: 0,
        };
        let k = kept(&p, &times, clock.now());
        assert_eq!(k, times[7..].to_vec());
    }

    #[test]
    fn zero_policy_still_keeps_the_newest_and_future_ones() {
        let (mut times, clock) = take(MONDAY, 10 * MIN, 2 * HOUR);
        let future = clock.now().saturating_add(Duration::from_secs(HOUR));
        times.insert(0, future);
        let p = RetentionPolicy {
            frequent: 0,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let r = p.select(&times, clock.now());
        assert_eq!(r.keep, vec![0]); // the future one is also the newest
        assert_eq!(r.delete.len(), times.len() - 1);
        let r2 = p.select(&times[1..], clock.now());
        assert_eq!(r2.keep, vec![times.len() - 2]);
    }

    #[test]
    fn configurable_counts_are_honoured() {
        let (times, clock) = take(MONDAY, 6 * HOUR, 40 * DAY);
        let p = RetentionPolicy {
            frequent: 2,
            daily: 2,
            weekly: 0,
            monthly: 0,
        };
        let k = kept(&p, &times, clock.now());
        // 2 newest (same day) + newest of the day before.
        assert_eq!(k.len(), 3, "{k:?}");
        let result = p.select(&times, clock.now());
        assert_eq!(result.keep.len() + result.delete.len(), times.len());
    }
}
