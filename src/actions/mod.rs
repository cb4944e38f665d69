//! Actions per phase: `[[actions]]` in config.toml, bound to a journey and phase,
//! with a trigger, an optional Rhai condition, parameters and guards.
//!
//! - this file: the config shape ([`RawAction`] as written, [`ActionConfig`] once
//!   checked, [`OutboxSettings`] for `[outbox]`), compiled into [`Actions`];
//! - [`plan`]: which outbox entries a transition creates (with nurture's batch);
//! - [`guard`]: what the dispatcher checks when an entry is due (still in the
//!   phase, condition, consent, quiet hours, frequency caps);
//! - [`kinds`]: executing one entry (coupon, review_request, email, crm_update,
//!   webhook, log) on the connectors' outbound requests.
//!
//! Actions never run here: planning only writes entries, and only the outbox
//! dispatcher ([`crate::outbox::dispatch`]) executes them.

pub mod guard;
pub mod kinds;
pub mod plan;

pub use plan::plan_update;

use crate::config::{ConnectorInstanceConfig, JourneyConfig};
use crate::diag::Diagnostic;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Errors building the actions.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// One `[[actions]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    name: Spanned<String>,
    journey: Spanned<String>,
    phase: Spanned<String>,
    #[serde(default)]
    trigger: Option<Spanned<String>>,
    #[serde(default)]
    when: Option<Spanned<String>>,
    kind: Spanned<String>,
    #[serde(default)]
    connector: Option<Spanned<String>>,
    #[serde(default)]
    params: Option<Spanned<toml::Table>>,
    #[serde(default)]
    reentry: Option<Spanned<String>>,
    #[serde(default)]
    channel: Option<Spanned<String>>,
    #[serde(default)]
    marketing: Option<bool>,
    #[serde(default)]
    cap: Option<Cap>,
    #[serde(default)]
    cancel_on_exit: Option<bool>,
    #[serde(default)]
    quiet_hours: Option<bool>,
}

/// A frequency cap: at most `max` sends per `per_days` days.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cap {
    pub max: u32,
    pub per_days: f64,
}

/// `[outbox]` in config.toml: dispatcher and guard settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSettings {
    /// The `log` sink's file (JSON Lines), relative to config.toml.
    pub log_path: String,
    /// Attempts before an entry is dead.
    pub max_attempts: u32,
    /// First retry wait, doubling per attempt (with jitter), and the longest wait
    /// (which also caps `Retry-After`).
    pub retry_base_secs: u64,
    pub retry_max_secs: u64,
    /// The time zone of customers without a `timezone` attribute (IANA name).
    pub timezone: String,
    /// Quiet hours `"HH:MM-HH:MM"` in the customer's time zone ("" for none):
    /// marketing actions due then are deferred to the end, never dropped.
    pub quiet_hours: String,
    /// Requests in flight per connector.
    pub concurrency: usize,
    /// Per webhook request.
    pub timeout_secs: u64,
    /// Per channel caps over all actions (`[outbox.caps] email = { max = 1, per_days = 3 }`).
    pub caps: BTreeMap<String, Cap>,
    /// Prefix of generated coupon codes.
    pub code_prefix: String,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            log_path: "data/actions.jsonl".into(),
            max_attempts: 8,
            retry_base_secs: 30,
            retry_max_secs: 3600,
            timezone: "Europe/Amsterdam".into(),
            quiet_hours: String::new(),
            concurrency: 8,
            timeout_secs: 10,
            caps: BTreeMap::new(),
            code_prefix: "KR-".into(),
        }
    }
}

/// When an action fires.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// On entering the phase.
    Enter,
    /// On leaving it.
    Exit,
    /// This many seconds after entering, if still there (a durable timer).
    After(i64),
    /// At every occurrence of a cron expression while in the phase.
    Every(Box<croner::Cron>, String),
}

impl Trigger {
    /// Parses `enter`, `exit`, `after 7d` (s, m, h, d, w) or `every <cron>`.
    pub fn parse(s: &str) -> Result<Trigger, String> {
        let s = s.trim();
        match s {
            "enter" => return Ok(Trigger::Enter),
            "exit" => return Ok(Trigger::Exit),
            _ => {}
        }
        if let Some(d) = s.strip_prefix("after ") {
            return parse_duration(d.trim()).map(Trigger::After);
        }
        if let Some(c) = s.strip_prefix("every ") {
            let cron: croner::Cron = c
                .trim()
                .parse()
                .map_err(|e| format!("invalid cron expression {c:?}: {e}"))?;
            return Ok(Trigger::Every(Box::new(cron), c.trim().to_string()));
        }
        Err(format!(
            "unknown trigger {s:?}: use enter, exit, \"after 7d\" or \"every <cron expression>\""
        ))
    }

    /// Whether it fires after the moment of the transition (so the customer may have
    /// left by then).
    pub fn is_delayed(&self) -> bool {
        matches!(self, Trigger::After(_) | Trigger::Every(..))
    }

    /// The next cron occurrence after `t` (unix seconds), with the expression read
    /// in `tz` (the customer's time zone: "every 0 9 * * 1" is Monday 09:00 where
    /// they live, across clock changes).
    pub fn next_after(&self, t: i64, tz: chrono_tz::Tz) -> Option<i64> {
        match self {
            Trigger::Every(c, _) => {
                let at = chrono::DateTime::from_timestamp(t, 0)?.with_timezone(&tz);
                c.find_next_occurrence(&at, false)
                    .ok()
                    .map(|d| d.timestamp())
            }
            _ => None,
        }
    }
}

fn parse_duration(s: &str) -> Result<i64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 7d, 12h, 30m"))?;
    let mult = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use s, m, h, d or w)")),
    };
    Ok(n * mult)
}

/// How often an action may fire for one customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reentry {
    /// Once ever, whatever the number of phase entries.
    OncePerCustomer,
    /// Once each time the customer enters the phase (the default).
    OncePerPhaseEntry,
    /// Every time the trigger fires: for `every` triggers each occurrence, for the
    /// others the same as once per phase entry.
    EveryTime,
}

/// The closed set of action kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Coupon,
    ReviewRequest,
    Email,
    CrmUpdate,
    Webhook,
    Log,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "coupon" => Kind::Coupon,
            "review_request" => Kind::ReviewRequest,
            "email" => Kind::Email,
            "crm_update" => Kind::CrmUpdate,
            "webhook" => Kind::Webhook,
            "log" => Kind::Log,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Coupon => "coupon",
            Kind::ReviewRequest => "review_request",
            Kind::Email => "email",
            Kind::CrmUpdate => "crm_update",
            Kind::Webhook => "webhook",
            Kind::Log => "log",
        }
    }

    /// The channel consent and caps apply to, unless the action names one.
    fn default_channel(self) -> Option<&'static str> {
        match self {
            Kind::Coupon | Kind::ReviewRequest | Kind::Email => Some("email"),
            _ => None,
        }
    }
}

/// The connector name meaning "the log sink", usable wherever a connector is named.
pub const LOG_SINK: &str = "log";

/// One checked `[[actions]]` entry.
#[derive(Debug, Clone)]
pub struct ActionConfig {
    pub name: String,
    pub journey: String,
    pub phase: String,
    pub trigger_text: String,
    pub trigger: Trigger,
    /// The Rhai condition, with where it is written (for messages).
    pub when: Option<(String, (usize, usize))>,
    pub kind: Kind,
    /// A `[connectors.NAME]` instance, or [`LOG_SINK`].
    pub connector: String,
    /// Parameters; string values are minijinja templates.
    pub params: Map<String, Value>,
    pub reentry: Reentry,
    pub channel: Option<String>,
    /// Marketing actions need consent for their channel; transactional ones do not.
    pub marketing: bool,
    pub cap: Option<Cap>,
    pub cancel_on_exit: bool,
    pub quiet_hours: bool,
    /// Where the action's table starts.
    pub at: (usize, usize),
}

/// Validates `[[actions]]` against the journeys and connectors (for `Config::parse`);
/// actions with a problem are reported and left out. Conditions and templates are
/// compiled by [`check`], which has the rule engine.
pub fn validate(
    file: &str,
    text: &str,
    raw: Vec<RawAction>,
    journeys: &[JourneyConfig],
    connectors: &[ConnectorInstanceConfig],
    problems: &mut Vec<Diagnostic>,
) -> Vec<ActionConfig> {
    let mut out: Vec<ActionConfig> = Vec::new();
    let pos = |o: usize| crate::diag::line_col(text, o);
    for a in raw {
        let before = problems.len();
        let mut bad = |offset: usize, m: String| {
            problems.push(Diagnostic::at_offset(file, text, offset, m));
        };
        let name = a.name.get_ref().clone();
        if name.is_empty() || out.iter().any(|o| o.name == name) {
            bad(
                a.name.span().start,
                format!("action name {name:?} is empty or used twice"),
            );
        }
        match journeys.iter().find(|j| &j.name == a.journey.get_ref()) {
            None => bad(
                a.journey.span().start,
                format!(
                    "action {name}: unknown journey {:?} (known: {})",
                    a.journey.get_ref(),
                    journeys
                        .iter()
                        .map(|j| j.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(j) if !j.phases.contains(a.phase.get_ref()) => bad(
                a.phase.span().start,
                format!(
                    "action {name}: journey {} has no phase {:?} (its phases: {})",
                    j.name,
                    a.phase.get_ref(),
                    j.phases.join(", ")
                ),
            ),
            Some(_) => {}
        }
        let trigger_text = a
            .trigger
            .as_ref()
            .map_or("enter".to_string(), |t| t.get_ref().clone());
        let trigger = match Trigger::parse(&trigger_text) {
            Ok(t) => Some(t),
            Err(m) => {
                bad(
                    a.trigger
                        .as_ref()
                        .map_or(a.name.span().start, |t| t.span().start),
                    format!("action {name}: {m}"),
                );
                None
            }
        };
        let kind = Kind::parse(a.kind.get_ref());
        if kind.is_none() {
            bad(
                a.kind.span().start,
                format!(
                    "action {name}: unknown kind {:?} (use coupon, review_request, email, crm_update, webhook or log)",
                    a.kind.get_ref()
                ),
            );
        }
        let connector = a
            .connector
            .as_ref()
            .map_or(LOG_SINK.to_string(), |c| c.get_ref().clone());
        if connector != LOG_SINK && !connectors.iter().any(|c| c.name == connector) {
            bad(
                a.connector.as_ref().map_or(0, |c| c.span().start),
                format!(
                    "action {name}: unknown connector {connector:?} (configured: {}, or \"log\")",
                    connectors
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        let params: Map<String, Value> = match &a.params {
            None => Map::new(),
            Some(p) => match serde_json::to_value(p.get_ref()) {
                Ok(Value::Object(m)) => m,
                _ => {
                    bad(
                        p.span().start,
                        format!("action {name}: params must be a table"),
                    );
                    Map::new()
                }
            },
        };
        if let Some(Value::String(ec)) = params.get("email_connector") {
            if ec != LOG_SINK && !connectors.iter().any(|c| &c.name == ec) {
                bad(
                    a.params.as_ref().map_or(0, |p| p.span().start),
                    format!("action {name}: unknown email_connector {ec:?}"),
                );
            }
        }
        let reentry = match a.reentry.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("once_per_phase_entry") => Reentry::OncePerPhaseEntry,
            Some("once_per_customer") => Reentry::OncePerCustomer,
            Some("every_time") => Reentry::EveryTime,
            Some(other) => {
                bad(
                    a.reentry.as_ref().map_or(0, |r| r.span().start),
                    format!("action {name}: unknown reentry {other:?} (use once_per_customer, once_per_phase_entry or every_time)"),
                );
                Reentry::OncePerPhaseEntry
            }
        };
        if let Some(c) = &a.cap {
            if c.max == 0 || c.per_days <= 0.0 {
                bad(
                    a.name.span().start,
                    format!("action {name}: cap needs max >= 1 and per_days > 0"),
                );
            }
        }
        if problems.len() != before {
            continue;
        }
        let (Some(kind), Some(trigger)) = (kind, trigger) else {
            continue;
        };
        let channel = a
            .channel
            .map(|c| c.into_inner())
            .or_else(|| kind.default_channel().map(str::to_string));
        let marketing = a
            .marketing
            .unwrap_or(matches!(kind, Kind::Coupon | Kind::Email));
        out.push(ActionConfig {
            name,
            journey: a.journey.into_inner(),
            phase: a.phase.into_inner(),
            trigger_text,
            trigger,
            when: a.when.map(|w| {
                // Point at the expression's first character, inside the quotes.
                let p = pos(w.span().start + 1);
                (w.into_inner(), p)
            }),
            kind,
            connector,
            params,
            reentry,
            channel,
            marketing,
            cap: a.cap,
            cancel_on_exit: a.cancel_on_exit.unwrap_or(true),
            quiet_hours: a.quiet_hours.unwrap_or(marketing),
            at: pos(a.name.span().start),
        });
    }
    out
}

/// A compiled action: its config, its condition's AST.
pub struct CompiledAction {
    pub config: ActionConfig,
    when: Option<rhai::AST>,
}

/// Every configured action, compiled, with the engine their conditions run on.
pub struct Actions {
    pub list: Vec<CompiledAction>,
    pub settings: OutboxSettings,
    /// Folder of `template = "NAME"` files (`templates/NAME.html`).
    pub templates_dir: PathBuf,
    /// The log sink's file, resolved.
    pub log_path: PathBuf,
    engine: rhai::Engine,
    jinja: minijinja::Environment<'static>,
}

impl std::fmt::Debug for Actions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actions")
            .field(
                "actions",
                &self.list.iter().map(|a| &a.config.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What a condition is compiled as: a function, so helpers see the evaluation time
/// through the call's tag exactly as in rules.
const WHEN_PREFIX: &str = "fn when(customer) { ";

impl Actions {
    /// Compiles every action's condition and checks templates. Every problem is
    /// returned with file:line:column.
    pub fn build(config: &crate::config::Config) -> Result<Actions, ActionError> {
        let file = config.file.display().to_string();
        let engine = crate::rules::build_engine(&config.rules, &config.rules_dir, false);
        let mut problems = Vec::new();
        let mut list = Vec::new();
        let templates_dir = config.base_dir.join("templates");
        for a in &config.actions {
            let when = match &a.when {
                None => None,
                Some((expr, (line, col))) => {
                    match engine.compile(format!("{WHEN_PREFIX}{expr}\n}}")) {
                        Ok(ast) => Some(ast),
                        Err(e) => {
                            let (l, c) = (e.1.line().unwrap_or(1), e.1.position().unwrap_or(1));
                            let (l, c) = if l == 1 {
                                (*line, col + c.saturating_sub(WHEN_PREFIX.len() + 1))
                            } else {
                                // Past the expression (an unfinished one meets the
                                // wrapper's closing brace): point at its end.
                                (*line, col + expr.chars().count())
                            };
                            problems.push(Diagnostic::new(
                                &file,
                                l,
                                c,
                                format!("action {}: `when` does not compile: {}", a.name, e.0),
                            ));
                            None
                        }
                    }
                }
            };
            for (k, v) in &a.params {
                let Value::String(s) = v else { continue };
                if k == "template" {
                    let p = templates_dir.join(format!("{s}.html"));
                    match std::fs::read_to_string(&p) {
                        Err(_) => problems.push(Diagnostic::new(
                            &file,
                            a.at.0,
                            a.at.1,
                            format!(
                                "action {}: unknown template {s:?} ({} does not exist)",
                                a.name,
                                p.display()
                            ),
                        )),
                        Ok(t) => {
                            if let Err(e) = minijinja::Environment::new().template_from_str(&t) {
                                problems.push(Diagnostic::new(
                                    &file,
                                    a.at.0,
                                    a.at.1,
                                    format!("action {}: template {s:?}: {e}", a.name),
                                ));
                            }
                        }
                    }
                } else if let Err(e) = minijinja::Environment::new().template_from_str(s) {
                    problems.push(Diagnostic::new(
                        &file,
                        a.at.0,
                        a.at.1,
                        format!("action {}: params.{k} is not a valid template: {e}", a.name),
                    ));
                }
            }
            list.push(CompiledAction {
                config: a.clone(),
                when,
            });
        }
        if config.outbox.timezone.parse::<chrono_tz::Tz>().is_err() {
            problems.push(Diagnostic::new(
                &file,
                1,
                1,
                format!(
                    "[outbox] timezone {:?} is not an IANA time zone",
                    config.outbox.timezone
                ),
            ));
        }
        if !config.outbox.quiet_hours.is_empty()
            && guard::parse_quiet(&config.outbox.quiet_hours).is_none()
        {
            problems.push(Diagnostic::new(
                &file,
                1,
                1,
                format!(
                    "[outbox] quiet_hours {:?} must look like \"21:00-08:00\"",
                    config.outbox.quiet_hours
                ),
            ));
        }
        if !problems.is_empty() {
            return Err(ActionError::Invalid(problems));
        }
        let mut jinja = minijinja::Environment::new();
        jinja.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        Ok(Actions {
            list,
            log_path: config.base_dir.join(&config.outbox.log_path),
            settings: config.outbox.clone(),
            templates_dir,
            engine,
            jinja,
        })
    }

    /// The action with this name.
    pub fn get(&self, name: &str) -> Option<&CompiledAction> {
        self.list.iter().find(|a| a.config.name == name)
    }

    /// Whether any action is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Evaluates an action's condition for a customer map (with `phase` set) at `now`.
    pub fn condition(
        &self,
        a: &CompiledAction,
        customer: rhai::Map,
        now: i64,
    ) -> Result<bool, String> {
        let Some(ast) = &a.when else { return Ok(true) };
        let options = rhai::CallFnOptions::new().with_tag(now);
        self.engine
            .call_fn_with_options::<rhai::Dynamic>(
                options,
                &mut rhai::Scope::new(),
                ast,
                "when",
                (rhai::Dynamic::from_map(customer),),
            )
            .map_err(|e| format!("action {}: `when` failed: {e}", a.config.name))
            .and_then(|d| {
                d.as_bool().map_err(|t| {
                    format!("action {}: `when` returned {t}, not a bool", a.config.name)
                })
            })
    }

    /// Renders one template string with `ctx`.
    pub fn render(&self, template: &str, ctx: &Value) -> Result<String, String> {
        self.jinja
            .render_str(template, ctx)
            .map_err(|e| format!("template: {e}"))
    }

    /// The text of `template = "NAME"`.
    pub fn template_text(&self, name: &str) -> Result<String, String> {
        let p = self.templates_dir.join(format!("{name}.html"));
        std::fs::read_to_string(&p).map_err(|e| format!("template {}: {e}", p.display()))
    }
}

/// The problems `klantreis check` reports about actions (conditions, templates,
/// outbox settings); structural ones come from `Config::parse`.
pub fn check(config: &crate::config::Config) -> Vec<Diagnostic> {
    match Actions::build(config) {
        Ok(_) => Vec::new(),
        Err(ActionError::Invalid(d)) => d,
    }
}

/// Resolves the log sink's path against the config folder.
pub fn log_path(base_dir: &Path, settings: &OutboxSettings) -> PathBuf {
    base_dir.join(&settings.log_path)
}
