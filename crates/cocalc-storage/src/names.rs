//! Snapshot names: the UTC time a snapshot was taken, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
//!
//! The format has a fixed width, so names sort in time order.

use cocalc_core::Timestamp;

/// Formats `t` as a snapshot name, e.g. `2026-11-24T02:20:00.000Z`.
///
/// ```
/// use cocalc_core::Timestamp;
/// use cocalc_storage::names::{parse_snapshot_name, snapshot_name};
/// let name = snapshot_name(Timestamp(1_795_486_800_123));
/// assert_eq!(name, "2026-11-24T02:20:00.123Z");
/// assert_eq!(parse_snapshot_name(&name), Some(Timestamp(1_795_486_800_123)));
/// ```
pub fn snapshot_name(t: Timestamp) -> String {
    let ms = t.as_millis();
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Parses a name made by [`snapshot_name`]; `None` for anything else.
pub fn parse_snapshot_name(name: &str) -> Option<Timestamp> {
    let b = name.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = &name[r];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if civil_from_days(days) != (y, mo, d) {
        return None; // 31 February and the like
    }
    Some(Timestamp(
        days * 86_400_000 + h * 3_600_000 + mi * 60_000 + s * 1000 + ms,
    ))
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Day count since 1970-01-01 of a (year, month, day).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_in_time_order() {
        let mut last = String::new();
        for t in [0i64, 1, 999, 86_399_999, 951_782_400_000, 1_795_486_800_123] {
            let n = snapshot_name(Timestamp(t));
            assert_eq!(parse_snapshot_name(&n), Some(Timestamp(t)), "{n}");
            assert!(n > last, "{n} sorts after {last}");
            last = n;
        }
        assert_eq!(snapshot_name(Timestamp(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            snapshot_name(Timestamp(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "latest",
            "2026-02-30T00:00:00.000Z",
            "2026-13-01T00:00:00.000Z",
            "2026-01-01T24:00:00.000Z",
            "2026-01-01T00:00:00.000",
            "+026-01-01T00:00:00.000Z",
            "../../etc/passwd",
        ] {
            assert_eq!(parse_snapshot_name(bad), None, "{bad}");
        }
    }
}
