//! The dispatcher: takes due entries, checks guards, makes each attempt durable as
//! `in_flight` before sending, runs the attempts concurrently (a cap per connector),
//! and records the outcome: done, retried later with backoff, or dead.

use super::{backoff_secs, Entry, OutboxError, State};
use crate::actions::guard::{self, Verdict};
use crate::actions::kinds::{self, Sinks, Step};
use crate::actions::{Actions, Reentry, Trigger};
use crate::clock::SharedClock;
use crate::store::{OutboxStore, OutboxWrite};
use serde::Serialize;
use std::sync::Arc;

static DISPATCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How a dispatch runs.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Render and report, change nothing, send nothing.
    pub dry_run: bool,
    /// Entries claimed per round (each round is made durable before it is sent).
    pub batch: usize,
    /// At most this many entries in one run (0: all that are due).
    pub limit: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            batch: 512,
            limit: 0,
        }
    }
}

/// One entry the dispatcher handled (or, in a dry run, would send).
#[derive(Debug, Clone, Serialize)]
pub struct Fired {
    pub key: String,
    pub customer: String,
    pub action: String,
    /// The state it ended in (`done`, `pending` for a retry, `dead`, `skipped`, ...),
    /// or `would_send` in a dry run.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What was (or would be) sent.
    pub steps: Vec<Step>,
}

/// What a dispatch did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DispatchReport {
    pub done: u64,
    pub retrying: u64,
    pub dead: u64,
    pub skipped: u64,
    pub cancelled: u64,
    pub deferred: u64,
    /// Every entry handled, in order (a dry run lists what would be sent).
    pub fired: Vec<Fired>,
}

/// Dispatches every entry due at the clock's now, plus `planned` (entries a dry-run
/// nurture planned but did not write). Connectors are built from `config`.
pub fn dispatch(
    store: &dyn OutboxStore,
    actions: &Actions,
    config: &crate::config::Config,
    clock: SharedClock,
    planned: &[OutboxWrite],
    opts: &DispatchOptions,
) -> Result<DispatchReport, OutboxError> {
    let (connectors, bad) = crate::connectors::build_all(config, clock.clone());
    for (name, e) in bad {
        tracing::warn!(instance = %name, error = %e, "connector not usable for actions");
    }
    let sinks = Arc::new(
        Sinks::new(
            connectors,
            &actions.log_path,
            actions.settings.concurrency,
            actions.settings.timeout_secs,
            clock.clone(),
        )
        .map_err(|e| OutboxError::Runtime(e.to_string()))?,
    );
    dispatch_with(store, actions, sinks, clock, planned, opts)
}

/// [`dispatch`] with sinks built by the caller (tests, benchmarks, the service).
pub fn dispatch_with(
    store: &dyn OutboxStore,
    actions: &Actions,
    sinks: Arc<Sinks>,
    clock: SharedClock,
    planned: &[OutboxWrite],
    opts: &DispatchOptions,
) -> Result<DispatchReport, OutboxError> {
    // One dispatcher per process at a time (sled keeps other processes out): an
    // entry in flight belongs to the dispatcher that claimed it.
    let _one = DISPATCHING.lock().unwrap_or_else(|e| e.into_inner());
    let now = clock.now().timestamp();
    let now_text = crate::time::format(clock.now());
    // A dry run writes nothing, not even the code secret of a fresh store: its
    // coupon codes are previews.
    let secret = if opts.dry_run {
        b"dry-run preview".to_vec()
    } else {
        store.outbox_secret()?
    };
    let mut report = DispatchReport::default();
    let limit = if opts.limit == 0 {
        usize::MAX
    } else {
        opts.limit
    };
    let mut due = store.outbox_due(now, limit)?;
    if opts.dry_run {
        due.extend(
            planned
                .iter()
                .filter(|w| w.entry.due <= now)
                // Re-entry: a key already stored would not be written again.
                .filter(|w| {
                    !matches!(
                        store.outbox_get(&w.entry.customer, &w.entry.key),
                        Ok(Some(_))
                    )
                })
                .map(|w| w.entry.clone()),
        );
    }
    let st = store.as_store();
    for round in due.chunks(opts.batch.max(1)) {
        let mut sends: Vec<(Entry, Vec<Step>)> = Vec::new();
        for listed in round {
            // Check before each attempt: act only on the entry as stored now.
            let entry = if opts.dry_run {
                listed.clone()
            } else {
                match store.outbox_get(&listed.customer, &listed.key)? {
                    Some(e) if e.state.is_open() => e,
                    _ => continue,
                }
            };
            let Some(a) = actions.get(&entry.action) else {
                finish(
                    store,
                    &mut report,
                    entry,
                    State::Skipped,
                    Some("the action is no longer configured".into()),
                    None,
                    opts.dry_run,
                    vec![],
                )?;
                continue;
            };
            let customer = st.customer(&entry.customer)?;
            let states = st.phase_states(&entry.customer)?;
            let others = store.outbox_of(&entry.customer)?;
            match guard::check(actions, a, &entry, customer.as_ref(), &states, &others, now) {
                Verdict::Skip(why) => {
                    finish(
                        store,
                        &mut report,
                        entry,
                        State::Skipped,
                        Some(why),
                        None,
                        opts.dry_run,
                        vec![],
                    )?;
                    continue;
                }
                Verdict::Cancel(why) => {
                    finish(
                        store,
                        &mut report,
                        entry,
                        State::Cancelled,
                        Some(why),
                        None,
                        opts.dry_run,
                        vec![],
                    )?;
                    continue;
                }
                Verdict::Defer(until, why) => {
                    report.deferred += 1;
                    let mut e = entry.clone();
                    e.due = until;
                    e.note = Some(format!("deferred to {}: {why}", fmt_unix(until)));
                    report.fired.push(fired(&e, "deferred", vec![]));
                    if !opts.dry_run {
                        store.outbox_put(Some(&entry), &e)?;
                    }
                    continue;
                }
                Verdict::Send => {}
            }
            let customer = customer.expect("the guard cancels entries without a customer");
            let steps = match kinds::prepare(
                actions,
                &a.config,
                &entry,
                &customer,
                &secret,
                &|n| sinks.kind_of(n),
                &now_text,
            ) {
                Ok(s) => s,
                Err(e) => {
                    finish(
                        store,
                        &mut report,
                        entry,
                        State::Dead,
                        None,
                        Some(e),
                        opts.dry_run,
                        vec![],
                    )?;
                    continue;
                }
            };
            if opts.dry_run {
                report.fired.push(fired(&entry, "would_send", steps));
                continue;
            }
            let mut claimed = entry.clone();
            claimed.state = State::InFlight;
            claimed.attempts += 1;
            store.outbox_put(Some(&entry), &claimed)?;
            sends.push((claimed, steps));
        }
        if sends.is_empty() {
            continue;
        }
        // Durable before anything leaves the process: a kill from here on finds
        // the entries in flight and repeats them with the same keys.
        st.flush()?;
        // Each attempt holds a slot of the window until its outcome is durable, so a
        // kill can cut off at most `concurrency` attempts that were sent but not yet
        // marked done; outcomes that arrive together share one flush (group commit).
        let window = Arc::new(tokio::sync::Semaphore::new(
            actions.settings.concurrency.max(1),
        ));
        let mut sends: Vec<Option<(Entry, Vec<Step>)>> = sends.into_iter().map(Some).collect();
        let outcome: Result<(), OutboxError> = sinks.rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for (i, s) in sends.iter().enumerate() {
                let (e, steps) = s.as_ref().expect("all present before sending");
                let sinks = sinks.clone();
                let window = window.clone();
                let tx = tx.clone();
                let key = e.key.clone();
                let steps = steps.clone();
                // `attempts` counts this one: more than one means an earlier attempt
                // may have reached the receiver.
                let repeat = e.attempts > 1;
                tokio::spawn(async move {
                    let _slot = window.acquire_owned().await;
                    let r = sinks.run(&key, &steps, repeat).await;
                    let (ack, acked) = tokio::sync::oneshot::channel::<()>();
                    if tx.send((i, r, ack)).is_ok() {
                        let _ = acked.await;
                    }
                });
            }
            drop(tx);
            let mut left = sends.len();
            while left > 0 {
                let Some(first) = rx.recv().await else { break };
                let mut got = vec![first];
                while let Ok(more) = rx.try_recv() {
                    got.push(more);
                }
                let mut acks = Vec::with_capacity(got.len());
                for (i, r, ack) in got {
                    let (e, steps) = sends[i].take().expect("each attempt reports once");
                    record(store, actions, &mut report, e, steps, r, now, &now_text)?;
                    acks.push(ack);
                    left -= 1;
                }
                st.flush()?;
                for a in acks {
                    let _ = a.send(());
                }
            }
            Ok(())
        });
        outcome?;
        st.flush()?;
    }
    Ok(report)
}

/// Records one attempt's outcome: done, pending again after a backoff (or the
/// receiver's Retry-After), or dead after `max_attempts`.
#[allow(clippy::too_many_arguments)]
fn record(
    store: &dyn OutboxStore,
    actions: &Actions,
    report: &mut DispatchReport,
    e: Entry,
    steps: Vec<Step>,
    r: Result<serde_json::Map<String, serde_json::Value>, kinds::Failure>,
    now: i64,
    now_text: &str,
) -> Result<(), OutboxError> {
    let mut new = e.clone();
    match r {
        Ok(res) => {
            new.state = State::Done;
            new.results.extend(res);
            new.done_at = Some(now_text.to_string());
            new.last_error = None;
            report.done += 1;
            tracing::info!(customer = %e.customer, action = %e.action, key = %e.key, "action done");
            plan_next_occurrence(store, actions, &e, now)?;
        }
        Err(f) => {
            new.last_error = Some(f.message.clone());
            if f.retryable && e.attempts < actions.settings.max_attempts {
                let wait = match f.retry_after {
                    Some(s) => s.min(actions.settings.retry_max_secs),
                    None => backoff_secs(
                        e.attempts,
                        actions.settings.retry_base_secs,
                        actions.settings.retry_max_secs,
                        &e.key,
                    ),
                };
                new.state = State::Pending;
                new.due = now + wait as i64;
                report.retrying += 1;
                tracing::info!(customer = %e.customer, action = %e.action, attempt = e.attempts, wait_secs = wait, error = %f.message, "action failed; will retry");
            } else {
                new.state = State::Dead;
                report.dead += 1;
                tracing::warn!(customer = %e.customer, action = %e.action, attempts = e.attempts, error = %f.message, "action dead");
            }
        }
    }
    store.outbox_put(Some(&e), &new)?;
    report.fired.push(fired(&new, new.state.as_str(), steps));
    Ok(())
}

/// For `every` triggers: once an occurrence is handled, the next one is planned if
/// the policy allows more than one and the customer is still in the phase.
fn plan_next_occurrence(
    store: &dyn OutboxStore,
    actions: &Actions,
    e: &Entry,
    now: i64,
) -> Result<(), OutboxError> {
    let Some(a) = actions.get(&e.action) else {
        return Ok(());
    };
    if !matches!(a.config.trigger, Trigger::Every(..)) || a.config.reentry != Reentry::EveryTime {
        return Ok(());
    }
    let states = store.as_store().phase_states(&e.customer)?;
    if !states
        .get(&e.journey)
        .is_some_and(|s| s.phase == e.phase && s.since == e.phase_since)
    {
        return Ok(());
    }
    let tz = match store.as_store().customer(&e.customer)? {
        Some(c) => guard::timezone_of(&c, &actions.settings.timezone),
        None => return Ok(()),
    };
    let Some(next) = a.config.trigger.next_after(now.max(e.due), tz) else {
        return Ok(());
    };
    let key = crate::actions::plan::entry_key(
        &e.customer,
        &a.config,
        &e.phase,
        &e.phase_since,
        None,
        next,
    );
    let mut n = e.clone();
    n.key = key;
    n.due = next;
    n.state = State::Pending;
    n.attempts = 0;
    n.results.clear();
    n.done_at = None;
    n.last_error = None;
    n.note = None;
    store.outbox_put_new(&n)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn finish(
    store: &dyn OutboxStore,
    report: &mut DispatchReport,
    entry: Entry,
    state: State,
    note: Option<String>,
    error: Option<String>,
    dry_run: bool,
    steps: Vec<Step>,
) -> Result<(), OutboxError> {
    let mut new = entry.clone();
    new.state = state;
    new.note = note;
    if error.is_some() {
        new.last_error = error;
    }
    match state {
        State::Skipped => report.skipped += 1,
        State::Cancelled => report.cancelled += 1,
        State::Dead => report.dead += 1,
        _ => {}
    }
    report.fired.push(fired(&new, state.as_str(), steps));
    if !dry_run {
        store.outbox_put(Some(&entry), &new)?;
    }
    Ok(())
}

fn fired(e: &Entry, outcome: &str, steps: Vec<Step>) -> Fired {
    Fired {
        key: e.key.clone(),
        customer: e.customer.clone(),
        action: e.action.clone(),
        outcome: outcome.to_string(),
        note: e.note.clone().or_else(|| e.last_error.clone()),
        steps,
    }
}

fn fmt_unix(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(crate::time::format)
        .unwrap_or_else(|| t.to_string())
}
