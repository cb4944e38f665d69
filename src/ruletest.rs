//! Rule tests as data (`rules/tests/*.toml`), run by `klantreis test`: each case
//! names a journey, a `now`, a customer and the phase expected.

use crate::diag::{line_col, Diagnostic};
use crate::model::PhaseState;
use crate::rules::RuleSet;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    journey: String,
    now: toml::Value,
    expect: Option<String>,
    #[serde(default)]
    expect_none: bool,
    expect_flags: Option<Vec<String>>,
    current_phase: Option<String>,
    phase_since: Option<toml::Value>,
    customer: toml::Value,
}

/// The outcome of one case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    /// `file:line` of the case.
    pub location: String,
    pub name: String,
    pub journey: String,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
}

/// All outcomes, plus files that could not be read at all.
#[derive(Debug, Default, serde::Serialize)]
pub struct TestReport {
    pub results: Vec<CaseResult>,
    pub problems: Vec<Diagnostic>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed() + self.problems.len()
    }
}

/// TOML to JSON; TOML datetimes become RFC 3339 strings.
fn to_json(v: toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => J::from(f),
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.into_iter().map(to_json).collect()),
        toml::Value::Table(t) => J::Object(t.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
    }
}

fn time_of(v: &toml::Value) -> Option<chrono::DateTime<chrono::Utc>> {
    match v {
        toml::Value::String(s) => crate::time::parse(s),
        toml::Value::Datetime(d) => crate::time::parse(&d.to_string()),
        _ => None,
    }
}

/// The test files under `path` (a file, or a folder searched for `*.toml`).
pub fn test_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// Runs every case in `files` against `rules`.
pub fn run(rules: &RuleSet, files: &[PathBuf]) -> TestReport {
    let mut report = TestReport::default();
    for file in files {
        let display = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                report
                    .problems
                    .push(Diagnostic::new(&display, 1, 1, format!("cannot read: {e}")));
                continue;
            }
        };
        let raw: RawFile = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let off = e.span().map_or(0, |s| s.start);
                report.problems.push(Diagnostic::at_offset(
                    &display,
                    &text,
                    off,
                    e.message().trim(),
                ));
                continue;
            }
        };
        for case in raw.cases {
            let (line, _) = line_col(&text, case.span().start);
            let case = case.into_inner();
            let failure = run_case(rules, &case).err();
            report.results.push(CaseResult {
                location: format!("{display}:{line}"),
                name: case.name,
                journey: case.journey,
                failure,
            });
        }
    }
    report
}

fn run_case(rules: &RuleSet, case: &RawCase) -> Result<(), String> {
    let idx = rules
        .journey_index(&case.journey)
        .ok_or_else(|| format!("unknown journey {:?}", case.journey))?;
    let now = time_of(&case.now).ok_or("`now` must be an RFC 3339 time")?;
    let expected = match (&case.expect, case.expect_none) {
        (Some(p), false) => Some(p.clone()),
        (None, true) => None,
        _ => {
            return Err("give exactly one of `expect = \"<phase>\"` or `expect_none = true`".into())
        }
    };
    let mut json = to_json(case.customer.clone());
    if let serde_json::Value::Object(m) = &mut json {
        m.entry("id")
            .or_insert_with(|| serde_json::Value::String("test".into()));
    }
    let customer = crate::import::customer_from_json(json).map_err(|e| format!("customer: {e}"))?;
    let state = match &case.current_phase {
        Some(p) => Some(PhaseState {
            phase: p.clone(),
            since: match &case.phase_since {
                Some(v) => {
                    crate::time::format(time_of(v).ok_or("`phase_since` must be an RFC 3339 time")?)
                }
                None => crate::time::format(now),
            },
            flags: Vec::new(),
        }),
        None => None,
    };
    let mut map = RuleSet::customer_map_of(&customer);
    RuleSet::set_phase(&mut map, state.as_ref());
    let d = rules
        .evaluate(idx, map, now.timestamp())
        .map_err(|e| format!("rule error: {e}"))?;
    if d.phase != expected {
        return Err(format!(
            "expected {}, got {}",
            expected.as_deref().unwrap_or("no phase"),
            d.phase.as_deref().unwrap_or("no phase")
        ));
    }
    if let Some(flags) = &case.expect_flags {
        let mut want = flags.clone();
        let mut got = d.flags.clone();
        want.sort();
        got.sort();
        if want != got {
            return Err(format!("expected flags {want:?}, got {got:?}"));
        }
    }
    Ok(())
}
