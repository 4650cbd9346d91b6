//! Audit sinks: where grants and refusals go.
//!
//! Every [`Gate`](crate::Gate) decision becomes an [`AuditRecord`] handed to
//! an [`AuditSink`]. [`TracingAuditSink`] (the default) logs refusals at
//! `WARN` and grants at `DEBUG` under the `cocalc::audit` target, with a
//! budget of refusal lines per kind so a flood of bad requests cannot
//! flood the log (see [`LogBudget`]); [`MemoryAuditSink`] keeps records
//! for tests and inspection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cocalc_core::{AuditOutcome, AuditRecord};

/// Receives audit records. `record` is called on the request path: it must
/// not block (queue if the destination is slow).
pub trait AuditSink: Send + Sync {
    /// Takes one record.
    fn record(&self, record: AuditRecord);

    /// Whether grants are wanted at all right now. Gates skip building
    /// the record of a grant (on every allowed request) when this says
    /// no; refusals are always recorded. By default, yes.
    fn wants_grants(&self) -> bool {
        true
    }

    /// Hands on whatever the sink holds back (a summary of records it
    /// did not write out one by one). Called periodically by the
    /// daemons; by default there is nothing to do.
    fn flush(&self) {}
}

/// Logs records through `tracing` (target `cocalc::audit`): refusals at
/// `WARN`, each with its reason, action, user, project, token id and
/// detail, within the sink's [`LogBudget`] — past it, refusals of that
/// kind are counted and logged as one summary line (`refusals not
/// logged`, with the count) once the budget's window has passed, with
/// the next refusal or at [`AuditSink::flush`]. Grants at `DEBUG`.
///
/// The budget bounds the log, not the records' effect elsewhere: the
/// counters the proxy and hosts export count every refusal.
#[derive(Debug, Default)]
pub struct TracingAuditSink {
    budget: LogBudget,
}

impl TracingAuditSink {
    /// A sink with the default budget ([`LogBudget::default`]).
    pub fn new() -> Self {
        TracingAuditSink::default()
    }

    /// A sink with `budget`.
    pub fn with_budget(budget: LogBudget) -> Self {
        TracingAuditSink { budget }
    }

    fn summary(n: u64, kind: &str, window: Duration) {
        let (action, reason) = kind.split_once('\0').unwrap_or((kind, ""));
        tracing::warn!(
            target: "cocalc::audit",
            outcome = "refuse",
            action = %action,
            reason = %reason,
            suppressed = n,
            window_secs = window.as_secs_f64(),
            "refusals not logged: {n} more of this kind past the log budget"
        );
    }
}

impl AuditSink for TracingAuditSink {
    fn record(&self, r: AuditRecord) {
        if r.outcome == AuditOutcome::Grant && !self.wants_grants() {
            return;
        }
        if r.outcome == AuditOutcome::Refuse {
            let verdict = self.budget.check(&r.action, &r.reason, Instant::now());
            for (kind, n) in &verdict.summaries {
                Self::summary(*n, kind, self.budget.window);
            }
            if !verdict.log {
                return;
            }
        }
        let user = r.user.map(|u| u.to_string()).unwrap_or_default();
        let project = r.project.map(|p| p.to_string()).unwrap_or_default();
        let jti = r.token_id.as_deref().unwrap_or("");
        match r.outcome {
            AuditOutcome::Refuse => tracing::warn!(
                target: "cocalc::audit",
                outcome = "refuse",
                action = %r.action,
                reason = %r.reason,
                user = %user,
                project = %project,
                jti = %jti,
                detail = %r.detail,
                "access refused"
            ),
            AuditOutcome::Grant => tracing::debug!(
                target: "cocalc::audit",
                outcome = "grant",
                action = %r.action,
                reason = %r.reason,
                user = %user,
                project = %project,
                jti = %jti,
                "access granted"
            ),
        }
    }

    /// Grants are logged at `DEBUG`: wanted only when that is enabled for
    /// `cocalc::audit`.
    fn wants_grants(&self) -> bool {
        tracing::enabled!(target: "cocalc::audit", tracing::Level::DEBUG)
    }

    fn flush(&self) {
        for (kind, n) in self.budget.due(Instant::now()) {
            Self::summary(n, &kind, self.budget.window);
        }
    }
}

/// How many refusal lines of one kind (action and reason) a
/// [`TracingAuditSink`] writes per window: the first `lines` refusals of
/// a kind in a window are logged one by one, the rest counted, and the
/// count is reported once the window is over. Kinds are the refusal
/// codes of this code base (a few dozen); past [`LogBudget::MAX_KINDS`]
/// new kinds share one budget.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window: Duration,
    kinds: Mutex<HashMap<String, KindState, foldhash::fast::RandomState>>,
}

#[derive(Debug)]
struct KindState {
    since: Instant,
    logged: u32,
    suppressed: u64,
}

/// What [`LogBudget::check`] decided: whether to log this refusal, and
/// the summaries of kinds whose window ended with refusals held back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Log the refusal itself.
    pub log: bool,
    /// Kinds (`action`, NUL, `reason`) and how many of their refusals
    /// were not logged in their last window.
    pub summaries: Vec<(String, u64)>,
}

impl Default for LogBudget {
    /// 20 lines per kind per 10 s: a steady trickle of refusals is
    /// logged in full, a flood costs a few lines per kind and window.
    fn default() -> Self {
        LogBudget::new(20, Duration::from_secs(10))
    }
}

impl LogBudget {
    /// Kinds tracked one by one; more share the budget of one kind.
    pub const MAX_KINDS: usize = 256;

    /// `lines` refusals per kind per `window` (at least one line).
    pub fn new(lines: u32, window: Duration) -> Self {
        LogBudget {
            lines: lines.max(1),
            window,
            kinds: Mutex::new(HashMap::default()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, KindState, foldhash::fast::RandomState>> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one refusal of kind (`action`, `reason`) at `now`.
    pub fn check(&self, action: &str, reason: &str, now: Instant) -> Verdict {
        let mut kinds = self.lock();
        let mut key = String::with_capacity(action.len() + reason.len() + 1);
        key.push_str(action);
        key.push('\0');
        key.push_str(reason);
        if !kinds.contains_key(&key) && kinds.len() >= Self::MAX_KINDS {
            key = "*\0*".to_string();
        }
        // Kinds whose window is over are reported and forgotten first, so
        // this one's entry, if any, is in its window.
        let summaries = Self::take_due(&mut kinds, self.window, now);
        let k = kinds.entry(key).or_insert(KindState {
            since: now,
            logged: 0,
            suppressed: 0,
        });
        let log = k.logged < self.lines;
        if log {
            k.logged += 1;
        } else {
            k.suppressed += 1;
        }
        Verdict { log, summaries }
    }

    /// The summaries due at `now` (kinds whose window ended with
    /// refusals held back), which are then forgotten.
    pub fn due(&self, now: Instant) -> Vec<(String, u64)> {
        Self::take_due(&mut self.lock(), self.window, now)
    }

    fn take_due(
        kinds: &mut HashMap<String, KindState, foldhash::fast::RandomState>,
        window: Duration,
        now: Instant,
    ) -> Vec<(String, u64)> {
        let mut due = Vec::new();
        kinds.retain(|kind, k| {
            if now.saturating_duration_since(k.since) < window {
                return true;
            }
            if k.suppressed > 0 {
                due.push((kind.clone(), k.suppressed));
            }
            // A kind quiet for a whole window starts afresh next time.
            false
        });
        due
    }
}

/// Keeps every record in memory.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        MemoryAuditSink::default()
    }

    /// A copy of the records so far, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_flood_of_one_kind_is_logged_up_to_the_budget_then_summed_up() {
        let b = LogBudget::new(3, 10 * S);
        let t0 = Instant::now();
        let logged: Vec<bool> = (0..10)
            .map(|i| {
                let v = b.check("ingress", "token_invalid", t0 + i * S / 10);
                assert!(v.summaries.is_empty());
                v.log
            })
            .collect();
        assert_eq!(logged.iter().filter(|l| **l).count(), 3, "{logged:?}");
        assert!(logged[..3].iter().all(|l| *l), "the first three");
        // Another kind has its own budget meanwhile.
        assert!(b.check("ingress", "rate_limited", t0 + S).log);
        // Nothing is due before the window is over.
        assert!(b.due(t0 + 9 * S).is_empty());
        // The next refusal after the window is logged, with the count of
        // those held back.
        let v = b.check("ingress", "token_invalid", t0 + 11 * S);
        assert!(v.log);
        assert_eq!(v.summaries, [("ingress\0token_invalid".to_string(), 7)]);
        // Reported once.
        assert!(b.due(t0 + 30 * S).is_empty());
    }

    #[test]
    fn held_back_refusals_are_due_at_flush_when_no_more_come() {
        let b = LogBudget::new(1, 10 * S);
        let t0 = Instant::now();
        assert!(b.check("tunnel", "bad_signature", t0).log);
        assert!(!b.check("tunnel", "bad_signature", t0).log);
        assert!(!b.check("tunnel", "bad_signature", t0 + S).log);
        assert!(
            b.check("ssh", "unknown_user", t0).log,
            "one of another kind"
        );
        assert_eq!(
            b.due(t0 + 10 * S),
            [("tunnel\0bad_signature".to_string(), 2)],
            "only the kind with refusals held back"
        );
        assert!(b.due(t0 + 20 * S).is_empty());
        assert!(
            b.check("tunnel", "bad_signature", t0 + 20 * S).log,
            "a new window"
        );
    }

    #[test]
    fn kinds_past_the_limit_share_one_budget() {
        let b = LogBudget::new(2, 10 * S);
        let t0 = Instant::now();
        for i in 0..LogBudget::MAX_KINDS {
            assert!(b.check("a", &format!("r{i}"), t0).log);
        }
        let more: Vec<bool> = (0..5)
            .map(|i| b.check("a", &format!("new{i}"), t0).log)
            .collect();
        assert_eq!(more, [true, true, false, false, false]);
        let due = b.due(t0 + 10 * S);
        assert_eq!(due, [("*\0*".to_string(), 3)]);
    }

    /// What a [`TracingAuditSink`] logged while `f` ran, one line per
    /// event.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_tracing_sink_logs_refusals_within_its_budget_and_sums_up_the_rest() {
        let sink = TracingAuditSink::with_budget(LogBudget::new(2, Duration::from_millis(200)));
        let refusal = |reason: &str| {
            AuditRecord::new(
                cocalc_core::Timestamp(0),
                AuditOutcome::Refuse,
                "ingress",
                reason,
                "client 127.0.0.1:1: bad",
            )
        };
        let lines = logged(|| {
            for _ in 0..5 {
                sink.record(refusal("token_invalid"));
            }
            sink.record(refusal("rate_limited"));
            // A grant with DEBUG off: not logged, and no budget spent.
            sink.record(AuditRecord::new(
                cocalc_core::Timestamp(0),
                AuditOutcome::Grant,
                "ingress",
                "granted",
                "",
            ));
            sink.flush();
        });
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[..2].iter().all(|l| l.contains("access refused")
            && l.contains("reason=token_invalid")
            && l.contains("detail=client 127.0.0.1:1: bad")));
        assert!(lines[2].contains("reason=rate_limited"), "{lines:#?}");
        // After the window, the flush reports the three held back.
        std::thread::sleep(Duration::from_millis(250));
        let lines = logged(|| sink.flush());
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("refusals not logged: 3 more of this kind")
                && lines[0].contains("action=ingress")
                && lines[0].contains("reason=token_invalid")
                && lines[0].contains("suppressed=3"),
            "{lines:#?}"
        );
        assert!(logged(|| sink.flush()).is_empty(), "reported once");
    }
}
