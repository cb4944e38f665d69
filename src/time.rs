//! Timestamps as klantreis stores them: RFC 3339 in UTC with a `Z` suffix, and a fast
//! parser for that exact form (rules parse event times for every customer).

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Formats a time the way klantreis stores it: `2026-11-01T10:00:00Z`.
pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Parses an RFC 3339 timestamp (any offset) into UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    if let Some(secs) = parse_fast(s) {
        return Utc.timestamp_opt(secs, 0).single();
    }
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Unix seconds of an RFC 3339 timestamp.
pub fn unix_seconds(s: &str) -> Option<i64> {
    parse_fast(s).or_else(|| parse(s).map(|t| t.timestamp()))
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ` without allocating; `None` for any other form.
fn parse_fast(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b'T' && b[10] != b't' && b[10] != b' ')
        || b[13] != b':'
        || b[16] != b':'
        || (b[19] != b'Z' && b[19] != b'z')
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let mut v = 0i64;
        for &c in &b[from..to] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, se) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    if d > days_in_month(y, mo) {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_and_slow_paths_agree() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2024-02-29T23:59:59Z",
            "2026-11-20T12:00:00Z",
            "2000-03-01T00:00:00Z",
            "1999-12-31T23:59:59Z",
        ] {
            let slow = DateTime::parse_from_rfc3339(s).unwrap().timestamp();
            assert_eq!(parse_fast(s), Some(slow), "{s}");
        }
        assert_eq!(parse_fast("2023-02-29T00:00:00Z"), None);
        assert_eq!(
            unix_seconds("2026-11-20T13:00:00+01:00"),
            unix_seconds("2026-11-20T12:00:00Z")
        );
        assert_eq!(
            format(parse("2026-11-20T13:00:00+01:00").unwrap()),
            "2026-11-20T12:00:00Z"
        );
    }
}
