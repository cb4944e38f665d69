//! The functions rules can call: `now`, `days_since`, `hours_since`, `count_events`,
//! `last_event` and `has_tag`. They read the evaluation time from the call's tag (set
//! per evaluation from the one clock), never from the wall clock.

use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, NativeCallContext, FLOAT, INT};

type Res<T> = Result<T, Box<EvalAltResult>>;

/// The evaluation time (unix seconds) of the current call.
fn now_of(ctx: &NativeCallContext) -> Res<INT> {
    ctx.tag()
        .and_then(|t| t.as_int().ok())
        .ok_or_else(|| "now() is only available while a customer is being evaluated".into())
}

/// Unix seconds of a time given as an RFC 3339 string or as unix seconds.
fn seconds_of(t: &Dynamic) -> Res<INT> {
    if let Ok(i) = t.as_int() {
        return Ok(i);
    }
    if let Ok(f) = t.as_float() {
        return Ok(f as INT);
    }
    if t.is_string() {
        let s = t
            .clone()
            .into_immutable_string()
            .map_err(|e| -> Box<EvalAltResult> { e.into() })?;
        return crate::time::unix_seconds(&s).ok_or_else(|| {
            format!("{s:?} is not an RFC 3339 time such as \"2026-11-01T10:00:00Z\"").into()
        });
    }
    Err(format!(
        "expected a time (an RFC 3339 string or unix seconds), got {}",
        if t.is_unit() { "()" } else { t.type_name() }
    )
    .into())
}

/// Calls `f` with each event map of the customer.
fn for_each_event(customer: &Map, mut f: impl FnMut(&Map)) {
    let Some(events) = customer.get("events") else {
        return;
    };
    if let Some(arr) = events.read_lock::<Array>() {
        for e in arr.iter() {
            if let Some(m) = e.read_lock::<Map>() {
                f(&m);
            }
        }
    }
}

fn kind_is(e: &Map, kind: &str) -> bool {
    e.get("kind")
        .and_then(|k| {
            k.read_lock::<rhai::ImmutableString>()
                .map(|s| s.as_str() == kind)
        })
        .unwrap_or(false)
}

fn at_of(e: &Map) -> Option<INT> {
    let at = e.get("at")?;
    seconds_of(at).ok()
}

fn count_within(
    ctx: &NativeCallContext,
    customer: &Map,
    kind: &str,
    within_days: Option<FLOAT>,
) -> Res<INT> {
    let now = now_of(ctx)?;
    let mut n = 0;
    for_each_event(customer, |e| {
        if kind_is(e, kind) {
            match within_days {
                None => n += 1,
                Some(days) => {
                    if let Some(at) = at_of(e) {
                        if (now - at) as FLOAT <= days * 86_400.0 {
                            n += 1;
                        }
                    }
                }
            }
        }
    });
    Ok(n)
}

/// Tags compare trimmed and case-insensitively (Unicode-aware).
fn same_tag(a: &str, want: &str) -> bool {
    let a = a.trim();
    a.eq_ignore_ascii_case(want) || a.to_lowercase() == want.to_lowercase()
}

fn has_tag(customer: &Map, tag: &str) -> bool {
    let want = tag.trim();
    let Some(tags) = customer.get("tags") else {
        return false;
    };
    if let Some(arr) = tags.read_lock::<Array>() {
        return arr.iter().any(|t| {
            t.read_lock::<rhai::ImmutableString>()
                .is_some_and(|s| same_tag(&s, want))
        });
    }
    if let Some(s) = tags.read_lock::<rhai::ImmutableString>() {
        return s.split(',').any(|t| same_tag(t, want));
    }
    false
}

/// Registers the rule helpers on `engine`.
pub fn register(engine: &mut Engine) {
    engine.register_fn("now", |ctx: NativeCallContext| now_of(&ctx));
    engine.register_fn(
        "days_since",
        |ctx: NativeCallContext, t: Dynamic| -> Res<FLOAT> {
            Ok((now_of(&ctx)? - seconds_of(&t)?) as FLOAT / 86_400.0)
        },
    );
    engine.register_fn(
        "hours_since",
        |ctx: NativeCallContext, t: Dynamic| -> Res<FLOAT> {
            Ok((now_of(&ctx)? - seconds_of(&t)?) as FLOAT / 3_600.0)
        },
    );
    engine.register_fn(
        "count_events",
        |ctx: NativeCallContext, customer: &mut Map, kind: &str| -> Res<INT> {
            count_within(&ctx, customer, kind, None)
        },
    );
    engine.register_fn(
        "count_events",
        |ctx: NativeCallContext, customer: &mut Map, kind: &str, days: INT| -> Res<INT> {
            count_within(&ctx, customer, kind, Some(days as FLOAT))
        },
    );
    engine.register_fn(
        "count_events",
        |ctx: NativeCallContext, customer: &mut Map, kind: &str, days: FLOAT| -> Res<INT> {
            count_within(&ctx, customer, kind, Some(days))
        },
    );
    engine.register_fn("last_event", |customer: &mut Map, kind: &str| -> Dynamic {
        let Some(events) = customer.get("events") else {
            return Dynamic::UNIT;
        };
        let Some(arr) = events.read_lock::<Array>() else {
            return Dynamic::UNIT;
        };
        // Remember the best index; clone only the winner.
        let mut best: Option<(INT, usize)> = None;
        for (i, e) in arr.iter().enumerate() {
            if let Some(m) = e.read_lock::<Map>() {
                if kind_is(&m, kind) {
                    let at = at_of(&m).unwrap_or(INT::MIN);
                    // Events are stored in time order; ">=" keeps the last of equal times.
                    if best.is_none_or(|(b, _)| at >= b) {
                        best = Some((at, i));
                    }
                }
            }
        }
        best.map_or(Dynamic::UNIT, |(_, i)| arr[i].clone())
    });
    engine.register_fn("has_tag", |customer: &mut Map, tag: &str| {
        has_tag(customer, tag)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(json: serde_json::Value) -> Map {
        rhai::serde::to_dynamic(json).unwrap().cast::<Map>()
    }

    #[test]
    fn has_tag_accepts_arrays_and_comma_strings() {
        assert!(has_tag(
            &map(serde_json::json!({"tags": ["VIP ", "b"]})),
            "vip"
        ));
        assert!(has_tag(
            &map(serde_json::json!({"tags": "a, Vip ,c"})),
            " vip"
        ));
        assert!(!has_tag(&map(serde_json::json!({"tags": "a,b"})), "vip"));
        assert!(!has_tag(&map(serde_json::json!({})), "vip"));
    }
}
