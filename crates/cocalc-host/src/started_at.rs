//! Parsing of the timestamps podman reports (`State.StartedAt`).
//!
//! Podman answers RFC 3339 with up to nanosecond precision and a zone, e.g.
//! `2026-11-24T01:06:43.558048566Z` or `2026-11-24T01:06:43.558048566+00:00`.
//! A container that never started reports the zero time of Go
//! (`0001-01-01T00:00:00Z`), which [`parse_started_at`] maps to `None`.

use cocalc_core::Timestamp;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A timestamp that is not RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp: {input:?}: {reason}")]
pub struct TimestampError {
    /// The text that failed to parse.
    pub input: String,
    /// What the parser objected to.
    pub reason: String,
}

/// Parses an RFC 3339 timestamp (fractional seconds of any length up to
/// nanoseconds, `Z` or a numeric offset) into milliseconds since the epoch,
/// rounding toward the past.
pub fn parse_rfc3339(s: &str) -> Result<Timestamp, TimestampError> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| TimestampError {
        input: s.to_string(),
        reason: e.to_string(),
    })?;
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    let ms = i64::try_from(ms).map_err(|_| TimestampError {
        input: s.to_string(),
        reason: "out of range".into(),
    })?;
    Ok(Timestamp(ms))
}

/// Parses podman's `StartedAt`: `Ok(None)` for an empty string or a time
/// before 1970 (podman's "never started" is year 1), else the instant.
pub fn parse_started_at(s: &str) -> Result<Option<Timestamp>, TimestampError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let t = parse_rfc3339(s)?;
    Ok((t > Timestamp::EPOCH).then_some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-24T01:06:43Z is 1795482403 seconds after the epoch.
    const SECS: i64 = 1_795_482_403;

    #[test]
    fn parses_podman_nanoseconds_with_z() {
        let t = parse_rfc3339("2026-11-24T01:06:43.558048566Z").unwrap();
        assert_eq!(t, Timestamp(SECS * 1000 + 558));
    }

    #[test]
    fn parses_numeric_offsets() {
        let a = parse_rfc3339("2026-11-24T01:06:43.558048566+00:00").unwrap();
        assert_eq!(a, Timestamp(SECS * 1000 + 558));
        let b = parse_rfc3339("2026-11-24T02:06:43.5+01:00").unwrap();
        assert_eq!(b, Timestamp(SECS * 1000 + 500));
        let c = parse_rfc3339("2026-11-23T20:06:43-05:00").unwrap();
        assert_eq!(c, Timestamp(SECS * 1000));
    }

    #[test]
    fn never_started_is_none() {
        assert_eq!(parse_started_at("0001-01-01T00:00:00Z").unwrap(), None);
        assert_eq!(parse_started_at("").unwrap(), None);
        assert!(parse_started_at("2026-11-24T01:06:43.558048566Z")
            .unwrap()
            .is_some());
    }

    #[test]
    fn rejects_garbage_with_the_input_named() {
        let e = parse_rfc3339("yesterday").unwrap_err();
        assert!(e.to_string().contains("yesterday"), "{e}");
        assert!(parse_rfc3339("2026-11-24 01:06:43").is_err());
        assert!(
            parse_rfc3339("2026-11-24T01:06:43").is_err(),
            "zone is required"
        );
    }
}
