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
            if let ASTNode::Stmt(stmt) = node {
                if !matches!(stmt, rhai::Stmt::Block(..) | rhai::Stmt::Noop(..)) {
                    if let Some(line) = pos.line() {
                        STEPS.with(|s| {
                            if let Some(steps) = s.borrow_mut().as_mut() {
                                if steps.len() < MAX_STEPS {
                                    let source = source.unwrap_or("").to_string();
                                    steps.push(Step { source, line });
                                }
                            }
                        });
                    }
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
