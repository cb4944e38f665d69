//! The nurture sweep: evaluate every stored customer in every journey and record the
//! transitions. CPU-bound, so it runs on plain threads (one scanning the store, the
//! others decoding and evaluating), never on async workers.
//!
//! With actions configured ([`run_with_actions`]), each transition's outbox entries
//! are planned on the same worker ([`crate::actions::plan_update`]) and written in
//! the transition's own batch, so a transition never exists without its actions.
//! Nothing is sent here: the outbox dispatcher does that.
//!
//! Entry points for others:
//! - [`evaluate_customer`]: one customer, every journey, no actions, no I/O;
//! - [`evaluate_and_plan`]: the same plus the planned outbox entries;
//! - [`evaluate_and_record_one`]: re-evaluate ONE stored customer now and record
//!   the update with its planned entries (what the webhook service calls when an
//!   event arrives); it plans exactly what a sweep at the same instant would.

use crate::actions::Actions;
use crate::model::{decode_states, PhaseState, PhaseStates, Transition};
use crate::rules::RuleSet;
use crate::store::{OutboxWrite, PhaseUpdate, ScanItem, Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct NurtureOptions {
    /// The evaluation time (from the one clock).
    pub now: DateTime<Utc>,
    /// Evaluate and count, but write nothing.
    pub dry_run: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Customers per chunk handed to a worker.
    pub chunk: usize,
}

impl NurtureOptions {
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            now,
            dry_run: false,
            threads: 0,
            chunk: 512,
        }
    }
}

/// A rule that failed for one customer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CustomerError {
    pub id: String,
    pub journey: String,
    pub error: String,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct NurtureSummary {
    pub evaluated: u64,
    /// Per journey, `"from→to"` → count (`-` for "not in the journey").
    pub transitions: BTreeMap<String, BTreeMap<String, u64>>,
    /// Rule errors in all.
    pub errors: u64,
    /// The first errors, for the report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<CustomerError>,
    #[serde(skip)]
    pub customers_changed: u64,
    /// Outbox entries planned, per action name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub actions_planned: BTreeMap<String, u64>,
    /// In a dry run, the entries that would have been written (for `--dry-run`).
    #[serde(skip)]
    pub planned: Vec<OutboxWrite>,
}

/// At most this many errors are kept with their details.
const MAX_ERROR_SAMPLES: usize = 200;

impl NurtureSummary {
    fn merge(&mut self, o: NurtureSummary) {
        self.evaluated += o.evaluated;
        self.errors += o.errors;
        self.customers_changed += o.customers_changed;
        for (k, v) in o.actions_planned {
            *self.actions_planned.entry(k).or_default() += v;
        }
        self.planned.extend(o.planned);
        for (j, m) in o.transitions {
            let dst = self.transitions.entry(j).or_default();
            for (k, v) in m {
                *dst.entry(k).or_default() += v;
            }
        }
        for e in o.error_samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(e);
            }
        }
    }

    /// Transitions in all journeys.
    pub fn transition_count(&self) -> u64 {
        self.transitions.values().flat_map(|m| m.values()).sum()
    }

    fn error(&mut self, id: &str, journey: &str, error: String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(CustomerError {
                id: id.to_string(),
                journey: journey.to_string(),
                error,
            });
        }
    }
}

/// The label of a transition in summaries: `kijk→kies`, `-→kijk`.
pub fn transition_label(from: Option<&str>, to: Option<&str>) -> String {
    format!("{}→{}", from.unwrap_or("-"), to.unwrap_or("-"))
}

/// Evaluates one customer in every journey. Returns the update to record, if any.
pub fn evaluate_customer(
    rules: &RuleSet,
    item: &ScanItem,
    now: i64,
    now_text: &str,
    summary: &mut NurtureSummary,
) -> Option<PhaseUpdate> {
    evaluate_keeping_map(rules, item, now, now_text, summary, &mut None)
}

/// [`evaluate_customer`]; with `keep` set to `Some(..)` by the caller's request
/// (`keep` is `Some` on entry), the decoded customer map is left there for planning,
/// so actions do not decode the record a second time.
fn evaluate_keeping_map(
    rules: &RuleSet,
    item: &ScanItem,
    now: i64,
    now_text: &str,
    summary: &mut NurtureSummary,
    keep: &mut Option<rhai::Map>,
) -> Option<PhaseUpdate> {
    let want_map = keep.take().is_some();
    summary.evaluated += 1;
    let states: PhaseStates = match item.states.as_deref().map(decode_states).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            summary.error(&item.id, "*", e.to_string());
            return None;
        }
    };
    let base = match RuleSet::customer_map(&item.record) {
        Ok(m) => m,
        Err(e) => {
            summary.error(&item.id, "*", e.message);
            return None;
        }
    };
    let mut new_states = states.clone();
    let mut transitions = Vec::new();
    let last = rules.journeys.len().saturating_sub(1);
    let mut base = Some(base);
    for (idx, j) in rules.journeys.iter().enumerate() {
        let mut map = if idx == last && !want_map {
            base.take().expect("taken once, at the last journey")
        } else {
            base.as_ref()
                .expect("present until the last journey")
                .clone()
        };
        let current = states.get(&j.name);
        RuleSet::set_phase(&mut map, current);
        let decision = match rules.evaluate(idx, map, now) {
            Ok(d) => d,
            Err(e) => {
                summary.error(&item.id, &j.name, e.message);
                continue;
            }
        };
        let old = current.map(|s| s.phase.as_str());
        if decision.phase.as_deref() != old {
            *summary
                .transitions
                .entry(j.name.clone())
                .or_default()
                .entry(transition_label(old, decision.phase.as_deref()))
                .or_default() += 1;
            transitions.push(Transition {
                journey: j.name.clone(),
                from: old.map(str::to_string),
                to: decision.phase.clone(),
                at: now_text.to_string(),
                rules_version: j.version.clone(),
                flags: decision.flags.clone(),
            });
            match decision.phase {
                Some(phase) => {
                    new_states.insert(
                        j.name.clone(),
                        PhaseState {
                            phase,
                            since: now_text.to_string(),
                            flags: decision.flags,
                        },
                    );
                }
                None => {
                    new_states.remove(&j.name);
                }
            }
        } else if let Some(s) = new_states.get_mut(&j.name) {
            if s.flags != decision.flags {
                s.flags = decision.flags;
            }
        }
    }
    if want_map {
        *keep = base;
    }
    if new_states != states {
        summary.customers_changed += 1;
        Some(PhaseUpdate {
            id: item.id.clone(),
            states: new_states,
            transitions,
            outbox: Vec::new(),
        })
    } else {
        None
    }
}

/// Runs a sweep over every stored customer. `progress` is called with the number of
/// customers done so far, from worker threads.
pub fn run(
    store: &dyn Store,
    rules: &RuleSet,
    opts: &NurtureOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<NurtureSummary, StoreError> {
    run_with_actions(store, rules, None, opts, progress)
}

/// Evaluates one customer like [`evaluate_customer`] and plans the outbox entries
/// of its transitions into the update (a dry run keeps copies in `summary.planned`).
pub fn evaluate_and_plan(
    rules: &RuleSet,
    actions: Option<&Actions>,
    item: &ScanItem,
    now: i64,
    now_text: &str,
    summary: &mut NurtureSummary,
) -> Option<PhaseUpdate> {
    let active = actions.filter(|a| !a.is_empty());
    let mut map = active.map(|_| rhai::Map::new());
    let mut update = evaluate_keeping_map(rules, item, now, now_text, summary, &mut map)?;
    if let Some(actions) = active {
        let old = item
            .states
            .as_deref()
            .and_then(|b| decode_states(b).ok())
            .unwrap_or_default();
        let (writes, errors) =
            crate::actions::plan_update(actions, map, &item.record, &old, &update, now, now_text);
        for e in errors {
            summary.error(&item.id, "actions", e);
        }
        for w in &writes {
            *summary
                .actions_planned
                .entry(w.entry.action.clone())
                .or_default() += 1;
        }
        update.outbox = writes;
    }
    Some(update)
}

/// Re-evaluates one stored customer at `now` and records the update with its
/// planned outbox entries in one batch; returns the update, or `None` when nothing
/// changed (or the customer is unknown). The webhook service calls this when an
/// event arrives; the dispatcher then sends what is due.
pub fn evaluate_and_record_one(
    store: &dyn Store,
    rules: &RuleSet,
    actions: Option<&Actions>,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<PhaseUpdate>, StoreError> {
    let Some(customer) = store.customer(id)? else {
        return Ok(None);
    };
    let states = store.phase_states(id)?;
    let item = ScanItem {
        id: id.to_string(),
        record: customer.encode(),
        states: (!states.is_empty()).then(|| crate::model::encode_states(&states)),
    };
    let mut summary = NurtureSummary::default();
    let update = evaluate_and_plan(
        rules,
        actions,
        &item,
        now.timestamp(),
        &crate::time::format(now),
        &mut summary,
    );
    if let Some(u) = &update {
        store.record_phases(std::slice::from_ref(u))?;
        store.flush()?;
    }
    Ok(update)
}

/// [`run`] that also plans the outbox entries of every transition (written in the
/// same batch as the transition).
pub fn run_with_actions(
    store: &dyn Store,
    rules: &RuleSet,
    actions: Option<&Actions>,
    opts: &NurtureOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<NurtureSummary, StoreError> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let now = opts.now.timestamp();
    let now_text = crate::time::format(opts.now);
    let done = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<ScanItem>>(threads * 4);
    let result = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                let done = &done;
                let now_text = &now_text;
                scope.spawn(move || -> Result<NurtureSummary, StoreError> {
                    let mut summary = NurtureSummary::default();
                    for chunk in rx {
                        let n = chunk.len() as u64;
                        let updates: Vec<PhaseUpdate> = chunk
                            .iter()
                            .filter_map(|item| {
                                evaluate_and_plan(rules, actions, item, now, now_text, &mut summary)
                            })
                            .collect();
                        if opts.dry_run {
                            summary
                                .planned
                                .extend(updates.iter().flat_map(|u| u.outbox.iter().cloned()));
                        }
                        if !opts.dry_run && !updates.is_empty() {
                            store.record_phases(&updates)?;
                        }
                        let total = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                        progress(total);
                    }
                    Ok(summary)
                })
            })
            .collect();
        drop(rx);
        let scanned = store.scan(opts.chunk, &mut |chunk| tx.send(chunk).is_ok());
        drop(tx);
        let mut summary = NurtureSummary::default();
        let mut first_err = scanned.err();
        for w in workers {
            match w.join().expect("a nurture worker panicked") {
                Ok(s) => summary.merge(s),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    })?;
    if !opts.dry_run {
        store.flush()?;
    }
    Ok(result)
}
