//! `config.toml`: parsed into a raw form (unknown keys are errors), then validated
//! into a [`Config`] whose relative paths resolve against the config file's folder.

use crate::diag::Diagnostic;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Everything that can be wrong with a config file; each problem names file:line:column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    rules: RuleSettings,
    #[serde(default)]
    journeys: Vec<RawJourney>,
    /// `[connectors.NAME]` instances; their keys depend on the definition they name,
    /// so they are kept generic here and checked by [`crate::connectors`].
    #[serde(default)]
    connectors: RawInstances,
    /// `[server]`: how `klantreis run` listens (see [`ServerSettings`]).
    #[serde(default)]
    server: ServerSettings,
    /// `[schedule]`: cron schedules of `klantreis run` (see [`ScheduleSettings`]).
    #[serde(default)]
    schedule: RawSchedule,
    /// `[[actions]]`: what happens per phase (see [`crate::actions`]).
    #[serde(default)]
    actions: Vec<crate::actions::RawAction>,
    /// `[outbox]`: dispatcher and guard settings.
    #[serde(default)]
    outbox: crate::actions::OutboxSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_path")]
    path: String,
    #[serde(default = "default_cache_mb")]
    cache_mb: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            path: default_store_path(),
            cache_mb: default_cache_mb(),
        }
    }
}

fn default_store_path() -> String {
    "data/klantreis".into()
}
fn default_cache_mb() -> u64 {
    256
}

/// Sandbox limits for rule evaluation (`[rules]` in config.toml).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleSettings {
    /// The folder rule files and `import`s resolve under.
    pub dir: String,
    /// Rhai operations one evaluation may take.
    pub max_operations: u64,
    /// Nested function calls.
    pub max_call_depth: usize,
    /// Nesting of expressions.
    pub max_expr_depth: usize,
    pub max_string_bytes: usize,
    pub max_array_len: usize,
    pub max_map_len: usize,
    /// Wall-clock budget of one evaluation.
    pub timeout_ms: u64,
}

impl Default for RuleSettings {
    fn default() -> Self {
        Self {
            dir: "rules".into(),
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_bytes: 64 * 1024,
            max_array_len: 10_000,
            max_map_len: 10_000,
            timeout_ms: 1000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJourney {
    name: Spanned<String>,
    rules: Spanned<String>,
    phases: Spanned<Vec<String>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file itself, as given.
    pub file: PathBuf,
    /// The folder relative paths resolve against.
    pub base_dir: PathBuf,
    pub store: StoreSettings,
    pub rules: RuleSettings,
    /// `rules.dir` resolved.
    pub rules_dir: PathBuf,
    pub journeys: Vec<JourneyConfig>,
    /// `[connectors.NAME]` instances, in name order.
    pub connectors: Vec<ConnectorInstanceConfig>,
    /// The folder of connector definitions (`connectors/` next to the config file);
    /// definitions not found there come from the ones built into klantreis.
    pub connectors_dir: PathBuf,
    /// `[server]` of `klantreis run`.
    pub server: ServerSettings,
    /// `[schedule]` of `klantreis run`, every expression checked.
    pub schedule: ScheduleSettings,
    /// `[[actions]]`, checked against the journeys and connectors.
    pub actions: Vec<crate::actions::ActionConfig>,
    /// `[outbox]`.
    pub outbox: crate::actions::OutboxSettings,
}

/// `[server]`: the HTTP side of `klantreis run`. `admin_token` may hold `${VAR}`;
/// it is expanded when the service starts and never logged.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// The address to listen on (`--listen` wins).
    pub listen: String,
    /// The bearer token of the admin API and `/metrics`; none means they are off.
    pub admin_token: Option<String>,
    /// Webhook bodies above this many bytes are refused with 413.
    pub max_body_bytes: usize,
    /// How far a signed timestamp may be from now (Stripe-style signatures).
    pub webhook_tolerance_secs: u64,
    /// How long a SIGTERM waits for requests and runs in flight.
    pub shutdown_timeout_secs: u64,
    /// How long a group commit waits to gather more writes before its flush.
    pub commit_delay_us: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_token: None,
            max_body_bytes: 1024 * 1024,
            webhook_tolerance_secs: 300,
            shutdown_timeout_secs: 10,
            commit_delay_us: 0,
        }
    }
}

impl std::fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSettings")
            .field("listen", &self.listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    #[serde(default = "default_timezone")]
    timezone: Spanned<String>,
    #[serde(default = "default_true")]
    catch_up: bool,
    nurture: Option<Spanned<String>>,
    #[serde(default)]
    sync: BTreeMap<Spanned<String>, Spanned<String>>,
}

impl Default for RawSchedule {
    fn default() -> Self {
        Self {
            timezone: default_timezone(),
            catch_up: true,
            nurture: None,
            sync: BTreeMap::new(),
        }
    }
}

fn default_timezone() -> Spanned<String> {
    Spanned::new(0..0, "Europe/Amsterdam".to_string())
}
fn default_true() -> bool {
    true
}

/// `[schedule]`: when `klantreis run` syncs and nurtures. Expressions are crontab
/// (5 fields, or 6 with seconds first; weekdays 1 = Monday, 0 and 7 = Sunday) in
/// `timezone`.
#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    /// An IANA zone name (default Europe/Amsterdam).
    pub timezone: String,
    /// Run a job missed while the service was down once at start.
    pub catch_up: bool,
    pub nurture: Option<String>,
    /// Instance name → expression.
    pub sync: BTreeMap<String, String>,
}

/// Parses a crontab expression the way the scheduler does: POSIX weekdays, seconds
/// optional (a 6-field expression starts with them).
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a crontab expression: {e}"))
}

/// One `[connectors.NAME]` instance as written. Every key except `type` is kept with
/// its position; [`crate::connectors`] checks them against the named definition.
/// Values may hold credentials, so `Debug` prints only the key names.
#[derive(Clone)]
pub struct ConnectorInstanceConfig {
    pub name: String,
    /// The definition (`type = "hubspot"`).
    pub kind: String,
    /// Where `type` is written (1-based line and column).
    pub kind_at: (usize, usize),
    /// Where the instance table starts.
    pub at: (usize, usize),
    pub settings: BTreeMap<String, Setting>,
}

/// One key of a connector instance, with its position in the config file.
#[derive(Clone)]
pub struct Setting {
    pub value: toml::Value,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Debug for ConnectorInstanceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorInstanceConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("settings", &self.settings.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Setting(*** at {}:{})", self.line, self.column)
    }
}

/// Where and how the embedded store lives.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub path: PathBuf,
    pub cache_mb: u64,
}

/// One journey: a name, its phases in order, and the rule file that picks them.
#[derive(Debug, Clone)]
pub struct JourneyConfig {
    pub name: String,
    pub phases: Vec<String>,
    /// The rule file, resolved.
    pub rules_path: PathBuf,
    /// The rule file as written in config.toml (used in messages).
    pub rules_display: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text as if read from `path`; every problem found is returned.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let (config, problems) = Self::parse_lenient(path, text)?;
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Like [`Config::parse`], but a file that parses returns its usable part (journeys
    /// with problems left out) beside the problems, so `check` can go on and compile
    /// the rules of the other journeys. Syntax errors and unknown keys are still fatal.
    pub fn parse_lenient(path: &Path, text: &str) -> Result<(Self, Vec<Diagnostic>), ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            ConfigError::Invalid(vec![Diagnostic::at_offset(
                &file,
                text,
                offset,
                e.message().trim(),
            )])
        })?;
        let base_dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut problems = Vec::new();
        let mut journeys: Vec<JourneyConfig> = Vec::new();
        let key_at = |key: &str| text.find(key).unwrap_or(0);
        if raw.rules.max_operations == 0 {
            problems.push(Diagnostic::at_offset(
                &file,
                text,
                key_at("max_operations"),
                "rules.max_operations must be at least 1 (0 would mean unlimited)",
            ));
        }
        if raw.rules.timeout_ms == 0 {
            problems.push(Diagnostic::at_offset(
                &file,
                text,
                key_at("timeout_ms"),
                "rules.timeout_ms must be at least 1",
            ));
        }
        for j in raw.journeys {
            let before = problems.len();
            let name = j.name.get_ref().trim().to_string();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            {
                problems.push(Diagnostic::at_offset(
                    &file,
                    text,
                    j.name.span().start,
                    format!(
                        "journey name {:?} must be letters, digits, '_' or '-'",
                        j.name.get_ref()
                    ),
                ));
            }
            if journeys.iter().any(|o| o.name == name) {
                problems.push(Diagnostic::at_offset(
                    &file,
                    text,
                    j.name.span().start,
                    format!("journey {name:?} is defined twice"),
                ));
            }
            let phases = j.phases.get_ref().clone();
            if phases.is_empty() {
                problems.push(Diagnostic::at_offset(
                    &file,
                    text,
                    j.phases.span().start,
                    format!("journey {name:?} has no phases"),
                ));
            }
            for (i, p) in phases.iter().enumerate() {
                if p.trim().is_empty() {
                    problems.push(Diagnostic::at_offset(
                        &file,
                        text,
                        j.phases.span().start,
                        "a phase name is empty",
                    ));
                } else if phases[..i].contains(p) {
                    problems.push(Diagnostic::at_offset(
                        &file,
                        text,
                        j.phases.span().start,
                        format!("phase {p:?} is listed twice in journey {name:?}"),
                    ));
                }
            }
            let rules_path = base_dir.join(j.rules.get_ref());
            if !rules_path.is_file() {
                problems.push(Diagnostic::at_offset(
                    &file,
                    text,
                    j.rules.span().start,
                    format!("rule file {} does not exist", rules_path.display()),
                ));
            }
            if problems.len() == before {
                journeys.push(JourneyConfig {
                    name,
                    phases,
                    rules_path,
                    rules_display: j.rules.get_ref().clone(),
                });
            }
        }
        if journeys.is_empty() && problems.is_empty() {
            problems.push(Diagnostic::new(&file, 1, 1, "no [[journeys]] are defined"));
        }
        let connectors_dir = base_dir.join("connectors");
        let connectors =
            connector_instances(&file, text, &connectors_dir, raw.connectors, &mut problems);
        let actions = crate::actions::validate(
            &file,
            text,
            raw.actions,
            &journeys,
            &connectors,
            &mut problems,
        );
        let rules_dir = base_dir.join(&raw.rules.dir);
        let schedule = schedule_settings(&file, text, raw.schedule, &connectors, &mut problems);
        let config = Config {
            file: path.to_path_buf(),
            store: StoreSettings {
                path: base_dir.join(&raw.store.path),
                cache_mb: raw.store.cache_mb,
            },
            rules_dir,
            rules: raw.rules,
            base_dir,
            journeys,
            connectors,
            connectors_dir,
            server: raw.server,
            schedule,
            actions,
            outbox: raw.outbox,
        };
        Ok((config, problems))
    }

    /// The journey with this name.
    pub fn journey(&self, name: &str) -> Option<&JourneyConfig> {
        self.journeys.iter().find(|j| j.name == name)
    }
}

type RawInstances =
    BTreeMap<Spanned<String>, Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>;

/// `[connectors.NAME]` tables with their positions; an instance with a problem is
/// reported and left out.
fn connector_instances(
    file: &str,
    text: &str,
    dir: &Path,
    raw: RawInstances,
    problems: &mut Vec<Diagnostic>,
) -> Vec<ConnectorInstanceConfig> {
    let pos = |offset: usize| crate::diag::line_col(text, offset);
    let mut out = Vec::new();
    for (name, table) in raw {
        let at = pos(table.span().start);
        let n = name.get_ref().clone();
        let before = problems.len();
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(Diagnostic::at_offset(
                file,
                text,
                name.span().start,
                format!("connector name {n:?} must be ASCII letters, digits, '_' or '-' (it becomes part of customer ids)"),
            ));
        }
        let mut kind = None;
        let mut settings = BTreeMap::new();
        for (k, v) in table.into_inner() {
            let (line, column) = pos(k.span().start);
            if k.get_ref() == "type" {
                match v.get_ref() {
                    toml::Value::String(s) => kind = Some((s.clone(), pos(v.span().start))),
                    _ => problems.push(Diagnostic::new(
                        file,
                        line,
                        column,
                        "`type` must be a string naming a definition in connectors/",
                    )),
                }
                continue;
            }
            settings.insert(
                k.into_inner(),
                Setting {
                    value: v.into_inner(),
                    line,
                    column,
                },
            );
        }
        let Some((kind, kind_at)) = kind else {
            if problems.len() == before {
                problems.push(Diagnostic::new(
                    file,
                    at.0,
                    at.1,
                    format!("connector {n:?} has no `type` (a definition in connectors/, e.g. type = \"hubspot\")"),
                ));
            }
            continue;
        };
        let inst = ConnectorInstanceConfig {
            name: n,
            kind,
            kind_at,
            at,
            settings,
        };
        problems.extend(crate::connectors::validate_instances(
            file,
            dir,
            std::slice::from_ref(&inst),
        ));
        if problems.len() == before {
            out.push(inst);
        }
    }
    out
}

/// Checks `[schedule]`: the zone exists, every expression parses, every sync
/// schedule names a configured instance.
fn schedule_settings(
    file: &str,
    text: &str,
    raw: RawSchedule,
    connectors: &[ConnectorInstanceConfig],
    problems: &mut Vec<Diagnostic>,
) -> ScheduleSettings {
    if raw.timezone.get_ref().parse::<chrono_tz::Tz>().is_err() {
        problems.push(Diagnostic::at_offset(
            file,
            text,
            raw.timezone.span().start,
            format!(
                "schedule.timezone {:?} is not an IANA time zone such as Europe/Amsterdam",
                raw.timezone.get_ref()
            ),
        ));
    }
    let mut check = |expr: &Spanned<String>| {
        if let Err(e) = parse_cron(expr.get_ref()) {
            problems.push(Diagnostic::at_offset(file, text, expr.span().start, e));
        }
    };
    if let Some(n) = &raw.nurture {
        check(n);
    }
    let mut sync = BTreeMap::new();
    let mut unknown = Vec::new();
    for (name, expr) in raw.sync {
        check(&expr);
        if !connectors.iter().any(|c| &c.name == name.get_ref()) {
            unknown.push((name.span().start, name.get_ref().clone()));
        }
        sync.insert(name.into_inner(), expr.into_inner());
    }
    for (at, name) in unknown {
        problems.push(Diagnostic::at_offset(
            file,
            text,
            at,
            format!("schedule.sync names {name:?}, which is not a [connectors.NAME] instance"),
        ));
    }
    ScheduleSettings {
        timezone: raw.timezone.into_inner(),
        catch_up: raw.catch_up,
        nurture: raw.nurture.map(Spanned::into_inner),
        sync,
    }
}

/// Replaces every `${NAME}` in `value` with that environment variable. A missing
/// variable is an error naming it; the value itself is never put in a message.
pub fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed ${{ in {value:?}"));
        };
        let name = &after[..end];
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/a.rhai"), "fn phase(c) { () }").unwrap();
        Config::parse(&dir.path().join("config.toml"), text)
    }

    #[test]
    fn unknown_key_names_key_and_position() {
        let err = parse("[store]\npath = \"x\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.toml:3:1"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn journeys_validate_and_resolve_paths() {
        let c = parse(
            "[[journeys]]\nname = \"j\"\nrules = \"rules/a.rhai\"\nphases = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert!(c.journeys[0].rules_path.ends_with("rules/a.rhai"));
        assert!(c.store.path.ends_with("data/klantreis"));
        let err = parse(
            "[[journeys]]\nname = \"j\"\nrules = \"rules/missing.rhai\"\nphases = [\"a\", \"a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listed twice"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains(":3:9"), "{err}");
    }

    #[test]
    fn env_expansion_names_missing_variable() {
        std::env::set_var("KLANTREIS_TEST_TOKEN", "s3cret");
        assert_eq!(
            expand_env("Bearer ${KLANTREIS_TEST_TOKEN}").unwrap(),
            "Bearer s3cret"
        );
        let err = expand_env("${KLANTREIS_SURELY_MISSING}").unwrap_err();
        assert!(err.contains("KLANTREIS_SURELY_MISSING"));
    }
}
