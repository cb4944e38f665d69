//! The durable outbox: every side effect klantreis performs on a customer's behalf
//! (a coupon, an email, a CRM write, a webhook, a log line) is first an [`Entry`]
//! written in the same atomic store batch as the phase transition that caused it,
//! then executed by the [`dispatch`] loop.
//!
//! **Invariant:** only the outbox performs side effects. Rules decide, nurture
//! records decisions and plans entries; [`dispatch`] is the one place that sends.
//!
//! Exactly once: an entry's [`Entry::key`] is deterministic (customer, journey, the
//! phase entry, action name), so planning the same transition twice finds the entry
//! already there and writes nothing. Before each attempt the dispatcher re-reads the
//! entry and only sends when it is still pending; the attempt is made durable as
//! `in_flight` before anything leaves the process, and the key travels downstream
//! (`Idempotency-Key`, Klaviyo `unique_id`, the coupon code itself, the log sink's
//! own index) so that an attempt interrupted between "sent" and "marked done" is
//! recognised by the receiver, or by the log sink itself, when it is repeated.

mod dispatch;

pub use dispatch::{dispatch, DispatchOptions, DispatchReport, Fired};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("no outbox entry {0:?}")]
    UnknownEntry(String),
    #[error("outbox entry {id} is {state}, not dead: only dead entries can be retried")]
    NotDead { id: String, state: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
}

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting to be sent at `due` (in the future: a durable timer, "scheduled").
    Pending,
    /// An attempt was started; if the process dies now, the next dispatcher
    /// repeats it with the same idempotency key.
    InFlight,
    Done,
    /// Failed `max_attempts` times, or permanently; `last_error` says why.
    Dead,
    /// A guard decided against it (no consent, condition false); `note` says why.
    Skipped,
    /// The customer left the phase before a delayed action was due.
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InFlight => "in_flight",
            State::Done => "done",
            State::Dead => "dead",
            State::Skipped => "skipped",
            State::Cancelled => "cancelled",
        }
    }

    /// Whether the dispatcher still has work to do on it.
    pub fn is_open(self) -> bool {
        matches!(self, State::Pending | State::InFlight)
    }
}

/// One planned action execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The idempotency key, also the entry's id in the CLI.
    pub key: String,
    pub customer: String,
    /// The `[[actions]]` name.
    pub action: String,
    pub journey: String,
    pub phase: String,
    /// When the customer entered the phase this entry belongs to (RFC 3339).
    pub phase_since: String,
    /// The trigger as configured (`enter`, `exit`, `after 7d`, `every ...`).
    pub trigger: String,
    /// Why it was planned, for `explain`.
    pub reason: String,
    pub created_at: String,
    /// Unix seconds at which it may be attempted next.
    pub due: i64,
    pub state: State,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A guard's or the dispatcher's remark (deferred for quiet hours, skipped: no consent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What the action produced (the coupon code, a message id, the HTTP status).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub results: Map<String, Value>,
    /// When it was done (RFC 3339); also what frequency caps count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at: Option<String>,
    /// The channel frequency caps and consent apply to (`email`, ...), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("serializing to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, crate::model::CodecError> {
        rmp_serde::from_slice(bytes).map_err(|e| crate::model::CodecError::Decode(e.to_string()))
    }

    /// `pending` with a future `due` reads as `scheduled`.
    pub fn display_state(&self, now: i64) -> &'static str {
        match self.state {
            State::Pending if self.due > now => "scheduled",
            s => s.as_str(),
        }
    }
}

/// The deterministic idempotency key of one execution: a hash of its parts, so it
/// carries no personal data downstream.
pub fn idempotency_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    // Written into one buffer: planning computes a key per transition.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(35);
    key.push_str("kr_");
    for b in &d[..16] {
        key.push(HEX[usize::from(b >> 4)] as char);
        key.push(HEX[usize::from(b & 15)] as char);
    }
    key
}

/// The wait before attempt `attempts + 1`: exponential from `base`, capped at `max`,
/// with "full jitter" in its upper half so a burst of failures does not retry in step.
pub fn backoff_secs(attempts: u32, base: u64, max: u64, key: &str) -> u64 {
    let exp = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
    let capped = exp.min(max).max(1);
    // Jitter from the key and the attempt number: deterministic per entry (so tests
    // and `--now` runs repeat), different between entries.
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(attempts.to_be_bytes());
    let r = u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"));
    let half = capped / 2;
    half + if capped > half {
        r % (capped - half + 1)
    } else {
        0
    }
}

/// All entries, for `klantreis outbox`, optionally only those in `state`.
pub fn list(
    store: &dyn crate::store::OutboxStore,
    state: Option<State>,
) -> Result<Vec<Entry>, OutboxError> {
    let mut out = Vec::new();
    store.outbox_scan(&mut |e| {
        if state.is_none_or(|s| s == e.state) {
            out.push(e);
        }
        true
    })?;
    Ok(out)
}

/// Puts a dead entry back to pending, due at `now`, with a fresh attempt budget.
pub fn retry(
    store: &dyn crate::store::OutboxStore,
    key: &str,
    now: i64,
) -> Result<Entry, OutboxError> {
    let Some(old) = store.outbox_find(key)? else {
        return Err(OutboxError::UnknownEntry(key.to_string()));
    };
    if old.state != State::Dead {
        return Err(OutboxError::NotDead {
            id: key.to_string(),
            state: old.state.as_str().to_string(),
        });
    }
    let mut new = old.clone();
    new.state = State::Pending;
    new.due = now;
    new.attempts = 0;
    new.note = Some(format!(
        "retried by hand after: {}",
        old.last_error.as_deref().unwrap_or("?")
    ));
    store.outbox_put(Some(&old), &new)?;
    store.as_store().flush()?;
    Ok(new)
}

/// Puts every dead entry back; returns how many.
pub fn retry_dead(store: &dyn crate::store::OutboxStore, now: i64) -> Result<usize, OutboxError> {
    let dead = list(store, Some(State::Dead))?;
    for e in &dead {
        retry(store, &e.key, now)?;
    }
    Ok(dead.len())
}

/// Counts per state (with `scheduled` apart from `pending`).
pub fn counts(
    store: &dyn crate::store::OutboxStore,
    now: i64,
) -> Result<std::collections::BTreeMap<String, u64>, OutboxError> {
    let mut m = std::collections::BTreeMap::new();
    store.outbox_scan(&mut |e| {
        *m.entry(e.display_state(now).to_string()).or_default() += 1;
        true
    })?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_distinct() {
        let a = idempotency_key(&["c1", "lifecycle", "koester", "2026-01-01T00:00:00Z", "x"]);
        assert_eq!(
            a,
            idempotency_key(&["c1", "lifecycle", "koester", "2026-01-01T00:00:00Z", "x"])
        );
        assert_ne!(
            a,
            idempotency_key(&["c1", "lifecycle", "koester", "2026-01-02T00:00:00Z", "x"])
        );
        assert!(a.starts_with("kr_") && a.len() == 35);
        // The same text as the first releases wrote (keys are stored and sent).
        let mut h = Sha256::new();
        for p in ["c1", "lifecycle", "koester", "2026-01-01T00:00:00Z", "x"] {
            h.update(p.as_bytes());
            h.update([0u8]);
        }
        let hex: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(a, format!("kr_{hex}"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b1 = backoff_secs(1, 10, 1000, "k");
        let b4 = backoff_secs(4, 10, 1000, "k");
        assert!((5..=10).contains(&b1), "{b1}");
        assert!((40..=80).contains(&b4), "{b4}");
        assert!(backoff_secs(30, 10, 1000, "k") <= 1000);
    }
}
