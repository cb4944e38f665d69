//! Planning: the outbox entries one customer's phase update creates. Runs on
//! nurture's worker threads (and for one customer in the webhook service); pure
//! apart from reading the customer's record it is given, and deterministic, so two
//! runs at the same instant plan the same keys.

use super::{Actions, Kind, Reentry, Trigger};
use crate::model::PhaseStates;
use crate::outbox::{idempotency_key, Entry, State};
use crate::rules::RuleSet;
use crate::store::{OutboxWrite, PhaseUpdate};
use serde_json::Map;

/// Plans the entries for `update` (whose customer had `old` states before it) and
/// returns them; the caller puts them in `update.outbox`. `record` is the
/// customer's stored record, `decoded` its map if the caller has it already. A condition that fails is returned as an error string
/// beside the entries that could be planned.
pub fn plan_update(
    actions: &Actions,
    decoded: Option<rhai::Map>,
    record: &[u8],
    old: &PhaseStates,
    update: &PhaseUpdate,
    now: i64,
    now_text: &str,
) -> (Vec<OutboxWrite>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    if actions.is_empty() || update.transitions.is_empty() {
        return (out, errors);
    }
    // First the (transition, action) pairs that fire, then the customer's map for
    // those that need it (a condition, a review request's order, an `every` zone):
    // decoded at most once, cloned for all but its last use.
    let mut fired = Vec::new();
    for t in &update.transitions {
        for a in &actions.list {
            let c = &a.config;
            if c.journey != t.journey {
                continue;
            }
            let (since, fires_now) = match &c.trigger {
                Trigger::Exit if t.from.as_deref() == Some(c.phase.as_str()) => {
                    let since = old
                        .get(&t.journey)
                        .map_or(now_text.to_string(), |s| s.since.clone());
                    (since, true)
                }
                Trigger::Enter | Trigger::After(_) | Trigger::Every(..)
                    if t.to.as_deref() == Some(c.phase.as_str()) =>
                {
                    (now_text.to_string(), matches!(c.trigger, Trigger::Enter))
                }
                _ => continue,
            };
            // Conditions of immediate triggers are decided now, on the data that made
            // the transition; delayed ones when they are due.
            let needs_map = (fires_now && a.when.is_some())
                || c.kind == Kind::ReviewRequest
                || matches!(c.trigger, Trigger::Every(..));
            fired.push((t, a, since, fires_now, needs_map));
        }
    }
    let mut uses_left = fired.iter().filter(|f| f.4).count();
    let mut base: Option<rhai::Map> = decoded;
    for (t, a, since, fires_now, needs_map) in fired {
        let c = &a.config;
        let phase = c.phase.clone();
        let map = if needs_map {
            if base.is_none() {
                match RuleSet::customer_map(record) {
                    Ok(m) => base = Some(m),
                    Err(e) => {
                        errors.push(e.message);
                        return (out, errors);
                    }
                }
            }
            uses_left -= 1;
            if uses_left == 0 {
                base.take()
            } else {
                base.clone()
            }
        } else {
            None
        };
        let order = if c.kind == Kind::ReviewRequest {
            let m = map.as_ref().expect("review requests get the map");
            match latest_order(m, c.params.get("order_event").and_then(|v| v.as_str())) {
                Some(o) => Some(o),
                None => continue,
            }
        } else {
            None
        };
        let tz = match (&c.trigger, &map) {
            (Trigger::Every(..), Some(m)) => m
                .get("timezone")
                .and_then(|v| v.clone().into_string().ok())
                .and_then(|s| s.parse::<chrono_tz::Tz>().ok())
                .or_else(|| actions.settings.timezone.parse().ok())
                .unwrap_or(chrono_tz::UTC),
            _ => chrono_tz::UTC,
        };
        if let (true, Some(mut m)) = (fires_now && a.when.is_some(), map) {
            RuleSet::set_phase(&mut m, update.states.get(&t.journey));
            match actions.condition(a, m, now) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            }
        }
        let due = match &c.trigger {
            Trigger::After(secs) => now + secs,
            Trigger::Every(..) => c.trigger.next_after(now, tz).unwrap_or(now),
            _ => now,
        };
        let key = entry_key(&update.id, c, &phase, &since, order.as_deref(), due);
        let reason = format!(
            "{} {} {} at {}{}",
            match c.trigger {
                Trigger::Exit => "left",
                _ => "entered",
            },
            t.journey,
            phase,
            now_text,
            order
                .as_deref()
                .map(|o| format!(" (order {o})"))
                .unwrap_or_default()
        );
        out.push(OutboxWrite {
            entry: Entry {
                key,
                customer: update.id.clone(),
                action: c.name.clone(),
                journey: t.journey.clone(),
                phase,
                phase_since: since,
                trigger: c.trigger_text.clone(),
                reason,
                created_at: now_text.to_string(),
                due,
                state: State::Pending,
                attempts: 0,
                last_error: None,
                note: None,
                results: Map::new(),
                done_at: None,
                channel: c.channel.clone(),
            },
            only_new: true,
        });
    }
    (out, errors)
}

/// The idempotency key of one execution under the action's re-entry policy.
pub fn entry_key(
    customer: &str,
    c: &super::ActionConfig,
    phase: &str,
    since: &str,
    order: Option<&str>,
    due: i64,
) -> String {
    if let Some(o) = order {
        // A review request is once per order, whatever the phase entries.
        return idempotency_key(&[customer, &c.journey, &c.name, "order", o]);
    }
    match (c.reentry, &c.trigger) {
        (Reentry::OncePerCustomer, _) => idempotency_key(&[customer, &c.journey, &c.name]),
        (Reentry::EveryTime, Trigger::Every(..)) => idempotency_key(&[
            customer,
            &c.journey,
            phase,
            since,
            &c.name,
            &due.to_string(),
        ]),
        _ => idempotency_key(&[customer, &c.journey, phase, since, &c.name]),
    }
}

/// The id of the customer's latest order event (`order_fulfilled` by default):
/// `data.order_id`, else `data.id`, else its time.
pub fn latest_order(customer: &rhai::Map, kind: Option<&str>) -> Option<String> {
    let kind = kind.unwrap_or("order_fulfilled");
    let events = customer.get("events")?.clone().into_array().ok()?;
    let mut best: Option<(String, String)> = None;
    for e in events {
        let Some(m) = e.try_cast::<rhai::Map>() else {
            continue;
        };
        if m.get("kind").map(|k| k.to_string()) != Some(kind.to_string()) {
            continue;
        }
        let at = m.get("at").map(|v| v.to_string()).unwrap_or_default();
        let id = m
            .get("data")
            .and_then(|d| d.clone().try_cast::<rhai::Map>())
            .and_then(|d| d.get("order_id").or(d.get("id")).map(|v| v.to_string()))
            .unwrap_or_else(|| at.clone());
        if best.as_ref().is_none_or(|(b, _)| at >= *b) {
            best = Some((at, id));
        }
    }
    best.map(|(_, id)| id)
}
