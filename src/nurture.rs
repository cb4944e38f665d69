//! The nurture sweep: evaluate every stored customer in every journey and record the
//! transitions. CPU-bound, so it runs on plain threads (one scanning the store, the
//! others decoding and evaluating), never on async workers.

use crate::model::{decode_states, PhaseState, PhaseStates, Transition};
use crate::rules::RuleSet;
use crate::store::{PhaseUpdate, ScanItem, Store, StoreError};
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
}

/// At most this many errors are kept with their details.
const MAX_ERROR_SAMPLES: usize = 200;

impl NurtureSummary {
    fn merge(&mut self, o: NurtureSummary) {
        self.evaluated += o.evaluated;
        self.errors += o.errors;
        self.customers_changed += o.customers_changed;
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
        let mut map = if idx == last {
            base.take().expect("taken once, at the last journey")
        } else {
            base.as_ref().expect("present until the last journey").clone()
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
    if new_states != states {
        summary.customers_changed += 1;
        Some(PhaseUpdate {
            id: item.id.clone(),
            states: new_states,
            transitions,
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
                            .filter_map(|item| evaluate_customer(rules, item, now, now_text, &mut summary))
                            .collect();
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
