//! Why a customer is where they are: per journey the stored phase, its history, and
//! a fresh evaluation with a trace of the rule lines that decided it.

use crate::config::Config;
use crate::model::Transition;
use crate::rules::{trace, Decision, RuleSet};
use crate::store::{OutboxStore, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// One line of a rule that ran.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLine {
    pub source: String,
    pub line: usize,
    pub text: String,
}

/// One journey of an explanation.
#[derive(Debug, Clone, Serialize)]
pub struct JourneyExplanation {
    pub journey: String,
    /// The stored phase.
    pub phase: Option<String>,
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// Every transition in this journey, oldest first.
    pub history: Vec<Transition>,
    /// What the rules say at `evaluated_at`.
    pub evaluation: Option<Decision>,
    pub error: Option<String>,
    /// The statements that ran, in order (consecutive repeats folded).
    pub trace: Vec<TraceLine>,
}

/// Everything `explain` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub id: String,
    pub evaluated_at: String,
    pub customer: serde_json::Value,
    pub journeys: Vec<JourneyExplanation>,
    /// The actions planned or fired for the customer, with their state and reason.
    pub actions: Vec<crate::outbox::Entry>,
}

/// At most this many trace lines are shown per journey.
const MAX_TRACE_LINES: usize = 200;

/// Explains customer `id` at `now`. `rules` should be loaded with [`RuleSet::load_traced`].
pub fn explain(
    outbox: &dyn OutboxStore,
    rules: &RuleSet,
    config: &Config,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Explanation>, StoreError> {
    let store = outbox.as_store();
    let Some(customer) = store.customer(id)? else {
        return Ok(None);
    };
    let states = store.phase_states(id)?;
    let history = store.history(id)?;
    let base = RuleSet::customer_map_of(&customer);
    let mut files = SourceFiles::new(config);
    let mut journeys = Vec::new();
    for (idx, j) in rules.journeys.iter().enumerate() {
        let state = states.get(&j.name);
        let mut map = base.clone();
        RuleSet::set_phase(&mut map, state);
        let (result, steps) = trace::record(|| rules.evaluate(idx, map, now.timestamp()));
        let mut lines: Vec<TraceLine> = Vec::new();
        for s in steps {
            if lines
                .last()
                .is_some_and(|l| l.source == s.source && l.line == s.line)
            {
                continue;
            }
            if lines.len() == MAX_TRACE_LINES {
                break;
            }
            let text = files.line(&s.source, s.line);
            lines.push(TraceLine {
                source: s.source,
                line: s.line,
                text,
            });
        }
        let (evaluation, error) = match result {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.message)),
        };
        journeys.push(JourneyExplanation {
            journey: j.name.clone(),
            phase: state.map(|s| s.phase.clone()),
            since: state.map(|s| s.since.clone()),
            flags: state.map(|s| s.flags.clone()).unwrap_or_default(),
            history: history
                .iter()
                .filter(|t| t.journey == j.name)
                .cloned()
                .collect(),
            evaluation,
            error,
            trace: lines,
        });
    }
    Ok(Some(Explanation {
        id: id.to_string(),
        evaluated_at: crate::time::format(now),
        customer: customer.to_json(),
        journeys,
        actions: outbox.outbox_of(id)?,
    }))
}

/// Rule and module files by the names messages use, read once.
struct SourceFiles<'a> {
    config: &'a Config,
    cache: HashMap<String, Vec<String>>,
}

impl<'a> SourceFiles<'a> {
    fn new(config: &'a Config) -> Self {
        Self {
            config,
            cache: HashMap::new(),
        }
    }

    fn path_of(&self, source: &str) -> PathBuf {
        if let Some(j) = self
            .config
            .journeys
            .iter()
            .find(|j| j.rules_display == source)
        {
            return j.rules_path.clone();
        }
        if let Some(rel) = source.strip_prefix("rules/") {
            let p = self.config.rules_dir.join(rel);
            if p.is_file() {
                return p;
            }
        }
        self.config.base_dir.join(source)
    }

    fn line(&mut self, source: &str, line: usize) -> String {
        if !self.cache.contains_key(source) {
            let text = std::fs::read_to_string(self.path_of(source)).unwrap_or_default();
            self.cache.insert(
                source.to_string(),
                text.lines().map(str::to_string).collect(),
            );
        }
        self.cache[source]
            .get(line.saturating_sub(1))
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    }
}
