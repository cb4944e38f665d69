//! The statement recorder behind `explain`: which lines of a rule ran, in order.

use rhai::debugger::{DebuggerCommand, DebuggerEvent};
use rhai::{ASTNode, Engine};
use std::cell::RefCell;

/// One statement that ran.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// The file (rule or imported module) as named in messages.
    pub source: String,
    pub line: usize,
}

thread_local! {
    static STEPS: RefCell<Option<Vec<Step>>> = const { RefCell::new(None) };
}

/// At most this many steps are recorded per evaluation.
const MAX_STEPS: usize = 10_000;

/// Registers a debugger that records every statement while a recording is active.
#[allow(deprecated)] // rhai marks the debugger API volatile, not deprecated
pub fn install(engine: &mut Engine) {
    engine.register_debugger(
        |_, dbg| dbg,
        |_ctx, event, node, source, pos| {
            if matches!(event, DebuggerEvent::End) {
                return Ok(DebuggerCommand::Continue);
            }
            // Statements, and expressions too: Rhai reports an expression used as a
            // statement (an implicit result such as `"kijk"` in a branch, or a final
            // `return` the optimizer turned into a value) only as an expression.
            let relevant = match node {
                ASTNode::Stmt(stmt) => {
                    !matches!(stmt, rhai::Stmt::Block(..) | rhai::Stmt::Noop(..))
                }
                _ => true,
            };
            if relevant {
                if let Some(line) = pos.line() {
                    STEPS.with(|s| {
                        if let Some(steps) = s.borrow_mut().as_mut() {
                            let source = source.unwrap_or("");
                            // Consecutive steps on one line are one line of the trace.
                            if steps
                                .last()
                                .is_some_and(|l: &Step| l.line == line && l.source == source)
                            {
                                return;
                            }
                            if steps.len() < MAX_STEPS {
                                steps.push(Step {
                                    source: source.to_string(),
                                    line,
                                });
                            }
                        }
                    });
                }
            }
            Ok(DebuggerCommand::StepInto)
        },
    );
}

/// Runs `f` while recording the statements it evaluates.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<Step>) {
    STEPS.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let out = f();
    let steps = STEPS.with(|s| s.borrow_mut().take()).unwrap_or_default();
    (out, steps)
}
