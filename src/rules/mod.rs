//! Rhai phase rules: a sandboxed engine, the compiled rule set, and evaluation.
//!
//! **Invariant:** rules do no I/O. The engine has no file, network or process
//! access; `import` resolves only under the rules folder (at compile time, into the
//! AST); `eval` is disabled; operations, call depth, sizes and wall-clock time are
//! bounded. A rule returns a [`Decision`] and never acts.

mod decode;
mod helpers;
mod sandbox;

pub use helpers::register as register_helpers;
pub mod trace;

use crate::config::{Config, JourneyConfig, RuleSettings};
use crate::diag::Diagnostic;
use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, Map, Position, Scope, AST};
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

thread_local! {
    /// When the evaluation running on this thread must stop.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The token `on_progress` stops a script with when its time is up.
const TIMEOUT_TOKEN: &str = "klantreis:timeout";

/// What a rule decided for one customer in one journey.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Decision {
    /// The phase, or `None` when the customer is not in the journey.
    pub phase: Option<String>,
    /// Flags the rule raised (e.g. `moment_of_truth`).
    pub flags: Vec<String>,
}

/// A rule that failed for one customer: the message names file:line:column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{message}")]
pub struct RuleError {
    pub message: String,
}

/// A journey whose rule compiled.
pub struct CompiledJourney {
    pub name: String,
    pub phases: Vec<String>,
    /// The rule file as named in config.toml.
    pub source: String,
    pub ast: AST,
    /// A short hash of the rule file and the helper modules it can import.
    pub version: String,
    /// Whether the AST has top-level statements (imports) to run before `phase`.
    needs_eval: bool,
    /// Where the rule loops. Rhai reports a budget overrun inside `phase` without a
    /// position, so messages point at the loop instead.
    loops: Vec<Position>,
}

/// The positions of every loop statement in `ast`, functions included.
fn loop_positions(ast: &AST) -> Vec<Position> {
    let mut out = Vec::new();
    ast.walk(&mut |path: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(s)) = path.last() {
            if matches!(
                s,
                rhai::Stmt::While(..) | rhai::Stmt::Do(..) | rhai::Stmt::For(..)
            ) {
                out.push(s.position());
            }
        }
        true
    });
    out.sort_by_key(|p| (p.line(), p.position()));
    out.dedup();
    out
}

/// The compiled rules of every journey, with the engine that runs them.
pub struct RuleSet {
    engine: Arc<Engine>,
    pub journeys: Vec<CompiledJourney>,
    timeout: Duration,
}

/// Builds the sandboxed engine. `debug_trace` adds the statement recorder used by
/// `explain` (it slows evaluation, so sweeps use an engine without it).
pub fn build_engine(settings: &RuleSettings, rules_dir: &Path, debug_trace: bool) -> Engine {
    let mut engine = Engine::new();
    engine.set_module_resolver(sandbox::SandboxResolver::new(rules_dir));
    engine.disable_symbol("eval");
    engine.set_strict_variables(true);
    engine.set_max_operations(settings.max_operations);
    engine.set_max_call_levels(settings.max_call_depth);
    engine.set_max_expr_depths(settings.max_expr_depth, settings.max_expr_depth);
    engine.set_max_string_size(settings.max_string_bytes);
    engine.set_max_array_size(settings.max_array_len);
    engine.set_max_map_size(settings.max_map_len);
    engine.set_max_modules(64);
    engine.on_print(|s| tracing::info!(target: "klantreis::rule", "{s}"));
    engine.on_debug(|s, src, pos| tracing::debug!(target: "klantreis::rule", source = src.unwrap_or(""), line = pos.line().unwrap_or(0), "{s}"));
    engine.on_progress(|ops| {
        if ops & 0x3ff == 0 {
            if let Some(deadline) = DEADLINE.with(Cell::get) {
                if Instant::now() >= deadline {
                    return Some(TIMEOUT_TOKEN.into());
                }
            }
        }
        None
    });
    helpers::register(&mut engine);
    if debug_trace {
        trace::install(&mut engine);
    }
    engine
}

/// Compiles one rule file into a self-contained AST (its imports embedded).
fn compile_file(engine: &Engine, path: &Path, display: &str) -> Result<AST, Diagnostic> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::new(display, 1, 1, format!("cannot read rule file: {e}")))?;
    let mut ast = engine
        .compile_into_self_contained(&Scope::new(), &text)
        .map_err(|e| {
            let mut d = diagnostic_of(&e, display);
            if d.file == display && d.line == 1 && d.column == 1 {
                // Imports are resolved without a position; point at the failing import.
                if let Some(pos) = import_position(engine, &text, &e) {
                    d.line = pos.line().unwrap_or(1);
                    d.column = pos.position().unwrap_or(1);
                }
            }
            d
        })?;
    ast.set_source(display);
    let has_phase = ast
        .iter_functions()
        .any(|f| f.name == "phase" && f.params.len() == 1);
    if !has_phase {
        return Err(Diagnostic::new(
            display,
            1,
            1,
            "the rule file defines no `fn phase(customer)`",
        ));
    }
    Ok(ast)
}

/// The position of the `import` statement a module error is about.
fn import_position(engine: &Engine, text: &str, e: &EvalAltResult) -> Option<Position> {
    let path = match e {
        EvalAltResult::ErrorInModule(path, ..) => path
            .trim_start_matches("rules/")
            .trim_end_matches(".rhai")
            .to_string(),
        EvalAltResult::ErrorModuleNotFound(msg, ..) => msg.split('"').nth(1)?.to_string(),
        _ => return None,
    };
    let ast = engine.compile(text).ok()?;
    let mut found = None;
    let mut first = None;
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(rhai::Stmt::Import(x, pos))) = nodes.last() {
            first.get_or_insert(*pos);
            if let rhai::Expr::StringConstant(s, ..) = &x.0 {
                if s.trim_end_matches(".rhai") == path {
                    found = Some(*pos);
                    return false;
                }
            }
        }
        true
    });
    found.or(first)
}

/// A diagnostic for a compile error, pointing into the file (or module) that has it.
fn diagnostic_of(e: &EvalAltResult, display: &str) -> Diagnostic {
    let (source, pos, msg) = innermost(e, display);
    Diagnostic::new(
        source,
        pos.line().unwrap_or(1),
        pos.position().unwrap_or(1),
        msg,
    )
}

/// The innermost error of a chain, with the source it happened in.
fn innermost(e: &EvalAltResult, source: &str) -> (String, Position, String) {
    match e {
        EvalAltResult::ErrorInFunctionCall(_, src, inner, _) => {
            let src = if src.is_empty() { source } else { src.as_str() };
            innermost(inner, src)
        }
        EvalAltResult::ErrorInModule(path, inner, pos) => {
            let (s, p, m) = innermost(inner, path);
            if p.is_none() {
                (source.to_string(), *pos, format!("in module {path:?}: {m}"))
            } else {
                (module_display(&s), p, m)
            }
        }
        EvalAltResult::ErrorParsing(pe, pos) => (source.to_string(), *pos, pe.to_string()),
        EvalAltResult::ErrorTerminated(token, pos) if token.is_string() => {
            let msg = if token
                .clone()
                .into_string()
                .is_ok_and(|s| s == TIMEOUT_TOKEN)
            {
                "the rule ran past its time budget (rules.timeout_ms)".to_string()
            } else {
                "the rule was terminated".to_string()
            };
            (source.to_string(), *pos, msg)
        }
        EvalAltResult::ErrorTooManyOperations(pos) => (
            source.to_string(),
            *pos,
            "the rule ran past its operation budget (rules.max_operations)".to_string(),
        ),
        other => {
            // Drop rhai's own " (line x, position y)" suffix: the position leads the message.
            let mut msg = other.to_string();
            if let Some(i) = msg.rfind(" (line ") {
                msg.truncate(i);
            }
            (source.to_string(), other.position(), msg)
        }
    }
}

/// Module sources are set to their path under the rules folder; show them as such.
fn module_display(s: &str) -> String {
    s.to_string()
}

/// The rule file and helper modules that can change a journey's behaviour, hashed.
fn rules_version(rule_path: &Path, rules_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(std::fs::read(rule_path).unwrap_or_default());
    let mut libs: Vec<_> = walk_rhai(&rules_dir.join("lib"));
    libs.sort();
    for p in libs {
        // The path relative to the rules folder: the same rules elsewhere are the same version.
        let rel = p.strip_prefix(rules_dir).unwrap_or(&p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update(std::fs::read(&p).unwrap_or_default());
    }
    let digest = h.finalize();
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn walk_rhai(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_rhai(&p));
            } else if p.extension().is_some_and(|x| x == "rhai") {
                out.push(p);
            }
        }
    }
    out
}

impl RuleSet {
    /// Compiles the rules of every journey in `config`; every problem is returned.
    pub fn load(config: &Config) -> Result<RuleSet, Vec<Diagnostic>> {
        Self::load_with(config, false)
    }

    /// Like [`RuleSet::load`], with the statement recorder that `explain` uses.
    pub fn load_traced(config: &Config) -> Result<RuleSet, Vec<Diagnostic>> {
        Self::load_with(config, true)
    }

    fn load_with(config: &Config, debug_trace: bool) -> Result<RuleSet, Vec<Diagnostic>> {
        let engine = build_engine(&config.rules, &config.rules_dir, debug_trace);
        let mut journeys = Vec::new();
        let mut problems = Vec::new();
        let budget = Duration::from_millis(config.rules.timeout_ms.max(1));
        for j in &config.journeys {
            // Helper modules run their top-level code while compiling: bound it too.
            DEADLINE.with(|d| d.set(Some(Instant::now() + budget)));
            let compiled = Self::compile_journey(&engine, j, &config.rules_dir);
            DEADLINE.with(|d| d.set(None));
            match compiled {
                Ok(c) => journeys.push(c),
                Err(d) => problems.push(d),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(RuleSet {
            engine: Arc::new(engine),
            journeys,
            timeout: Duration::from_millis(config.rules.timeout_ms.max(1)),
        })
    }

    fn compile_journey(
        engine: &Engine,
        j: &JourneyConfig,
        rules_dir: &Path,
    ) -> Result<CompiledJourney, Diagnostic> {
        let ast = compile_file(engine, &j.rules_path, &j.rules_display)?;
        let needs_eval = !ast.statements().is_empty();
        let loops = loop_positions(&ast);
        Ok(CompiledJourney {
            loops,
            name: j.name.clone(),
            phases: j.phases.clone(),
            source: j.rules_display.clone(),
            version: rules_version(&j.rules_path, rules_dir),
            ast,
            needs_eval,
        })
    }

    /// The index of a journey by name.
    pub fn journey_index(&self, name: &str) -> Option<usize> {
        self.journeys.iter().position(|j| j.name == name)
    }

    /// Turns a stored record into the map a rule sees (without `phase`/`phase_since`).
    pub fn customer_map(record: &[u8]) -> Result<Map, RuleError> {
        decode::customer_map(record).map_err(|e| RuleError {
            message: format!("corrupt customer record: {}", e.0),
        })
    }

    /// Turns a customer into the map a rule sees.
    pub fn customer_map_of(customer: &crate::model::Customer) -> Map {
        Self::customer_map(&customer.encode()).expect("a freshly encoded record decodes")
    }

    /// Sets the journey-specific fields a rule sees.
    pub fn set_phase(map: &mut Map, state: Option<&crate::model::PhaseState>) {
        match state {
            Some(s) => {
                map.insert("phase".into(), Dynamic::from(s.phase.clone()));
                map.insert("phase_since".into(), Dynamic::from(s.since.clone()));
            }
            None => {
                map.insert("phase".into(), Dynamic::UNIT);
                map.insert("phase_since".into(), Dynamic::UNIT);
            }
        }
    }

    /// Evaluates journey `index` for one customer at `now` (unix seconds).
    pub fn evaluate(&self, index: usize, customer: Map, now: i64) -> Result<Decision, RuleError> {
        let j = &self.journeys[index];
        DEADLINE.with(|d| d.set(Some(Instant::now() + self.timeout)));
        let options = CallFnOptions::new().with_tag(now).eval_ast(j.needs_eval);
        let result = self.engine.call_fn_with_options::<Dynamic>(
            options,
            &mut Scope::new(),
            &j.ast,
            "phase",
            (Dynamic::from_map(customer),),
        );
        DEADLINE.with(|d| d.set(None));
        let value = result.map_err(|e| {
            let (src, mut pos, mut msg) = innermost(&e, &j.source);
            let budget = matches!(
                *e,
                EvalAltResult::ErrorTooManyOperations(..) | EvalAltResult::ErrorTerminated(..)
            );
            if budget && pos.is_none() {
                if let Some(first) = j.loops.first() {
                    pos = *first;
                    if j.loops.len() > 1 {
                        let lines: Vec<String> = j.loops[1..]
                            .iter()
                            .filter_map(|p| p.line())
                            .map(|l| l.to_string())
                            .collect();
                        msg = format!(
                            "{msg}, in this loop or the one at line(s) {}",
                            lines.join(", ")
                        );
                    } else {
                        msg = format!("{msg}, in this loop");
                    }
                }
            }
            RuleError {
                message: match (pos.line(), pos.position()) {
                    (Some(l), Some(c)) => format!("{src}:{l}:{c}: {msg}"),
                    (Some(l), None) => format!("{src}:{l}: {msg}"),
                    _ => format!("{src}: {msg}"),
                },
            }
        })?;
        self.decision_of(j, value)
    }

    fn decision_of(&self, j: &CompiledJourney, value: Dynamic) -> Result<Decision, RuleError> {
        let bad = |what: String| RuleError {
            message: format!("{}: phase() returned {what}", j.source),
        };
        let (phase, flags) = if value.is_unit() {
            (None, Vec::new())
        } else if value.is_string() {
            (Some(value.into_string().expect("checked")), Vec::new())
        } else if value.is_map() {
            let m = value.cast::<Map>();
            let phase = match m.get("phase") {
                None => None,
                Some(p) if p.is_unit() => None,
                Some(p) if p.is_string() => Some(p.clone().into_string().expect("checked")),
                Some(p) => return Err(bad(format!("a map whose `phase` is a {}", p.type_name()))),
            };
            let mut flags = Vec::new();
            if let Some(f) = m.get("flags") {
                if let Some(arr) = f.read_lock::<rhai::Array>() {
                    for x in arr.iter() {
                        flags.push(x.to_string());
                    }
                } else if !f.is_unit() {
                    return Err(bad(format!(
                        "a map whose `flags` is a {}, not an array",
                        f.type_name()
                    )));
                }
            }
            (phase, flags)
        } else {
            return Err(bad(format!(
                "a {}; it must return a phase name, () or #{{phase: ..., flags: [...]}}",
                value.type_name()
            )));
        };
        if let Some(p) = &phase {
            if !j.phases.iter().any(|x| x == p) {
                return Err(RuleError {
                    message: format!(
                        "{}: phase() returned {p:?}, which is not a phase of journey {:?} ({})",
                        j.source,
                        j.name,
                        j.phases.join(", ")
                    ),
                });
            }
        }
        Ok(Decision { phase, flags })
    }
}
