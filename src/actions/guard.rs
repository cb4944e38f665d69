//! Guards, checked by the dispatcher when an entry is due (so they see the
//! customer as they are then): still in the phase, the condition of a delayed
//! trigger, consent per channel, quiet hours in the customer's time zone and
//! frequency caps. A deferral moves the entry's due time; nothing is dropped
//! except by consent, a false condition or leaving the phase, each with a note.

use super::{Actions, CompiledAction};
use crate::model::{Customer, PhaseStates};
use crate::outbox::{Entry, State};
use chrono::{TimeZone, Timelike};
use serde_json::Value;

/// What to do with a due entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Send,
    /// A guard decided against it.
    Skip(String),
    /// The customer left the phase (or was forgotten).
    Cancel(String),
    /// Not now: try again at this unix time.
    Defer(i64, String),
}

/// `"21:00-08:00"` → minutes after midnight of start and end.
pub fn parse_quiet(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    let hm = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    Some((hm(a)?, hm(b)?))
}

/// Whether the customer consented to `channel`: the `consent_<channel>` attribute
/// the connectors map (true, or "subscribed"/"yes"/"opt_in").
pub fn has_consent(customer: &Customer, channel: &str) -> bool {
    match customer.attributes.get(&format!("consent_{channel}")) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(
            s.to_ascii_lowercase().as_str(),
            "subscribed" | "yes" | "true" | "opt_in" | "opted_in"
        ),
        _ => false,
    }
}

/// The customer's time zone: the `timezone` attribute, else the configured default.
pub fn timezone_of(customer: &Customer, default: &str) -> chrono_tz::Tz {
    customer
        .attributes
        .get("timezone")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
        .or_else(|| default.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

/// If `now` falls in the quiet hours in `tz`, the first moment after them.
pub fn quiet_until(now: i64, tz: chrono_tz::Tz, window: (u32, u32)) -> Option<i64> {
    let (start, end) = window;
    if start == end {
        return None;
    }
    let local = tz.timestamp_opt(now, 0).single()?;
    let minute = local.hour() * 60 + local.minute();
    let inside = if start < end {
        minute >= start && minute < end
    } else {
        minute >= start || minute < end
    };
    if !inside {
        return None;
    }
    // Walk forward minute by minute to the end (at most a day): simple and right
    // across DST changes, which shift the local clock under us.
    let mut t = now - i64::from(local.second());
    for _ in 0..(24 * 60 + 1) {
        t += 60;
        let l = tz.timestamp_opt(t, 0).single()?;
        if l.hour() * 60 + l.minute() == end {
            return Some(t);
        }
    }
    None
}

/// Checks one due entry. `others` are the customer's other outbox entries (for caps).
pub fn check(
    actions: &Actions,
    a: &CompiledAction,
    entry: &Entry,
    customer: Option<&Customer>,
    states: &PhaseStates,
    others: &[Entry],
    now: i64,
) -> Verdict {
    let c = &a.config;
    let Some(customer) = customer else {
        return Verdict::Cancel("the customer is no longer stored".into());
    };
    if c.trigger.is_delayed() {
        let still = states
            .get(&entry.journey)
            .is_some_and(|s| s.phase == entry.phase && s.since == entry.phase_since);
        if !still && c.cancel_on_exit {
            return Verdict::Cancel(format!(
                "left {} {} before it was due",
                entry.journey, entry.phase
            ));
        }
        let mut map = crate::rules::RuleSet::customer_map_of(customer);
        crate::rules::RuleSet::set_phase(&mut map, states.get(&entry.journey));
        match actions.condition(a, map, now) {
            Ok(true) => {}
            Ok(false) => return Verdict::Skip("`when` was false when it was due".into()),
            Err(e) => return Verdict::Skip(e),
        }
    }
    if let Some(ch) = &c.channel {
        if c.marketing && !has_consent(customer, ch) {
            return Verdict::Skip(format!("no consent for {ch} (consent_{ch})"));
        }
    }
    if c.quiet_hours {
        if let Some(w) = parse_quiet(&actions.settings.quiet_hours) {
            let tz = timezone_of(customer, &actions.settings.timezone);
            if let Some(until) = quiet_until(now, tz, w) {
                return Verdict::Defer(until, format!("quiet hours in {tz}"));
            }
        }
    }
    if let Some(ch) = &c.channel {
        // Both caps count every send on the channel: an action's own cap says how
        // much mail it tolerates before it, e.g. "not if anything went out in 3 days".
        let sent: Vec<(i64, &Entry)> = others
            .iter()
            .filter(|o| o.key != entry.key && o.channel.as_deref() == Some(ch.as_str()))
            .filter_map(|o| match o.state {
                State::Done => o
                    .done_at
                    .as_deref()
                    .and_then(crate::time::unix_seconds)
                    .map(|t| (t, o)),
                State::InFlight => Some((now, o)),
                _ => None,
            })
            .collect();
        let mut caps = Vec::new();
        if let Some(cap) = actions.settings.caps.get(ch) {
            caps.push((*cap, None));
        }
        if let Some(cap) = c.cap {
            caps.push((cap, Some(c.name.as_str())));
        }
        for (cap, only) in caps {
            let window = (cap.per_days * 86_400.0) as i64;
            let mut times: Vec<i64> = sent
                .iter()
                .filter(|(t, _)| *t > now - window)
                .map(|(t, _)| *t)
                .collect();
            if times.len() as u32 >= cap.max {
                times.sort_unstable();
                let until = times[times.len() - cap.max as usize] + window;
                return Verdict::Defer(
                    until.max(now + 1),
                    format!(
                        "frequency cap: {} {ch} per {} days{}",
                        cap.max,
                        cap.per_days,
                        only.map(|n| format!(" for {n}")).unwrap_or_default()
                    ),
                );
            }
        }
    }
    Verdict::Send
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_hours_defer_to_the_end_in_local_time() {
        let tz: chrono_tz::Tz = "Europe/Amsterdam".parse().unwrap();
        // 2026-11-23 22:30 in Amsterdam (UTC+1) is 21:30 UTC.
        let now = chrono::Utc
            .with_ymd_and_hms(2026, 11, 23, 21, 30, 0)
            .unwrap()
            .timestamp();
        let until = quiet_until(now, tz, parse_quiet("21:00-08:00").unwrap()).unwrap();
        let want = chrono::Utc
            .with_ymd_and_hms(2026, 11, 24, 7, 0, 0)
            .unwrap()
            .timestamp();
        assert_eq!(until, want);
        let noon = chrono::Utc
            .with_ymd_and_hms(2026, 11, 23, 11, 0, 0)
            .unwrap()
            .timestamp();
        assert_eq!(quiet_until(noon, tz, (21 * 60, 8 * 60)), None);
    }
}
