//! The HTTP side of `klantreis run`: webhooks from shops and other sources, the
//! admin API, `/healthz` and `/metrics` (the routes are described in `openapi.yaml`).
//!
//! - [`webhooks`]: `POST /webhooks/{instance}`: verify, store durably, apply to the
//!   customer, re-evaluate them at once.
//! - [`admin`]: the bearer-token admin API and `/metrics`.
//! - [`commit`]: group commit of store flushes.
//!
//! One error enum, [`HttpError`], maps every refusal to a status code and a JSON body
//! `{"error": "<reason>", "message": "..."}`; internal errors are logged, not leaked.

pub mod admin;
pub mod commit;
pub mod webhooks;

use crate::clock::SharedClock;
use crate::config::{Config, ServerSettings};
use crate::model::encode_states;
use crate::nurture::{self, NurtureSummary};
use crate::rules::RuleSet;
use crate::store::{DeliveryStore, PhaseUpdate, ScanItem, SledStore, Store, StoreError, STRIPES};
use arc_swap::ArcSwap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// The rules the service answers with, swapped as one piece on reload, so no
/// request ever sees a half-loaded set.
pub struct Loaded {
    pub config: Config,
    /// For evaluation.
    pub rules: RuleSet,
    /// The same rules with the statement recorder, for `GET /api/customers/{id}`.
    pub traced: RuleSet,
    /// The `[[actions]]`, compiled; `None` when there are none.
    pub actions: Option<crate::actions::Actions>,
    /// Connector instances that could be built (webhooks that fetch their object
    /// use them); one that cannot (a missing `${VAR}`) is left out and logged.
    pub connectors: std::collections::HashMap<String, crate::connectors::Connector>,
    /// Instance name → its definition, for every instance whose definition loads
    /// (its `[webhooks]` says how to read the instance's webhooks).
    pub definitions: std::collections::HashMap<String, Arc<crate::connectors::Definition>>,
    /// When they were loaded (RFC 3339).
    pub loaded_at: String,
    /// A hash of config.toml and every file under `rules/` when they were read, so a
    /// file event that changed nothing does not reload.
    pub fingerprint: u64,
}

impl Loaded {
    /// Loads config and rules; every problem in one message.
    pub fn load(config_path: &std::path::Path, clock: &SharedClock) -> Result<Self, String> {
        let config = Config::load(config_path).map_err(|e| e.to_string())?;
        let fingerprint = fingerprint(config_path, &config.rules_dir);
        let join = |ds: Vec<crate::diag::Diagnostic>| {
            ds.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let rules = RuleSet::load(&config).map_err(join)?;
        let traced = RuleSet::load_traced(&config).map_err(join)?;
        let actions = if config.actions.is_empty() {
            None
        } else {
            Some(crate::actions::Actions::build(&config).map_err(|e| e.to_string())?)
        };
        let (built, bad) = crate::connectors::build_all(&config, clock.clone());
        for (name, e) in bad {
            tracing::info!(instance = %name, error = %e, "connector not usable by the service");
        }
        let connectors = built
            .into_iter()
            .map(|c| (c.name().to_string(), c))
            .collect();
        let registry = crate::connectors::Registry::new(&config.connectors_dir);
        let definitions = config
            .connectors
            .iter()
            .filter_map(|inst| Some((inst.name.clone(), registry.get(&inst.kind).ok()?)))
            .collect();
        Ok(Self {
            config,
            rules,
            traced,
            actions,
            connectors,
            definitions,
            loaded_at: crate::time::format(clock.now()),
            fingerprint,
        })
    }

    /// Journey → rules version.
    pub fn versions(&self) -> serde_json::Map<String, serde_json::Value> {
        self.rules
            .journeys
            .iter()
            .map(|j| (j.name.clone(), json!(j.version)))
            .collect()
    }
}

/// A hash of the config file and of every file under the rules folder.
pub fn fingerprint(config_path: &std::path::Path, rules_dir: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    fn walk(dir: &std::path::Path, h: &mut std::collections::hash_map::DefaultHasher) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, h);
            } else {
                p.hash(h);
                std::fs::read(&p).unwrap_or_default().hash(h);
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(config_path).unwrap_or_default().hash(&mut h);
    walk(rules_dir, &mut h);
    h.finish()
}

/// What `/healthz` reports besides the rules.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Health {
    /// The last reload that failed (the old rules stay active), until one succeeds.
    pub reload_error: Option<String>,
    pub reload_failed_at: Option<String>,
    /// Last outcome of each scheduled job.
    pub jobs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Everything a request handler needs.
pub struct AppState {
    pub config_path: std::path::PathBuf,
    pub loaded: ArcSwap<Loaded>,
    pub store: Arc<SledStore>,
    pub clock: SharedClock,
    pub commit: commit::GroupCommit,
    pub settings: ServerSettings,
    /// The expanded admin token; `None` turns the admin API and `/metrics` off.
    pub admin_token: Option<String>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub health: parking_lot::Mutex<Health>,
    /// Bounds the blocking store-and-evaluate work running at once (twice the
    /// cores): more threads only contend for sled's locks and the CPU.
    pub apply_slots: tokio::sync::Semaphore,
    /// Wakes the dispatcher when new outbox entries were written.
    pub dispatch_wake: tokio::sync::Notify,
    /// Held while a nurture sweep runs, so sweeps never overlap.
    pub nurture_lock: Arc<tokio::sync::Mutex<()>>,
    /// Serialises merge + evaluate + record per customer (striped by id), so two
    /// deliveries for one customer cannot record the same transition twice.
    customer_locks: Vec<parking_lot::Mutex<()>>,
}

impl AppState {
    pub fn new(
        config_path: std::path::PathBuf,
        loaded: Loaded,
        store: Arc<SledStore>,
        clock: SharedClock,
        admin_token: Option<String>,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Arc<Self> {
        let settings = loaded.config.server.clone();
        let commit = commit::GroupCommit::start(
            store.clone(),
            std::time::Duration::from_micros(settings.commit_delay_us),
        );
        Arc::new(Self {
            config_path,
            loaded: ArcSwap::from_pointee(loaded),
            store,
            clock,
            commit,
            settings,
            admin_token,
            metrics,
            health: parking_lot::Mutex::new(Health::default()),
            dispatch_wake: tokio::sync::Notify::new(),
            apply_slots: tokio::sync::Semaphore::new(
                2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            nurture_lock: Arc::new(tokio::sync::Mutex::new(())),
            customer_locks: (0..STRIPES).map(|_| parking_lot::Mutex::new(())).collect(),
        })
    }

    /// Reloads config.toml and the rules. A set that does not load leaves the old
    /// one active; the error is logged, kept for `/healthz` and counted.
    pub fn reload(&self) -> Result<(), String> {
        match Loaded::load(&self.config_path, &self.clock) {
            Ok(new) => {
                let versions = new.versions();
                self.loaded.store(Arc::new(new));
                let mut h = self.health.lock();
                h.reload_error = None;
                h.reload_failed_at = None;
                metrics::counter!("klantreis_rules_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(versions = %serde_json::Value::Object(versions), "rules reloaded");
                Ok(())
            }
            Err(e) => {
                let mut h = self.health.lock();
                h.reload_error = Some(e.clone());
                h.reload_failed_at = Some(crate::time::format(self.clock.now()));
                metrics::counter!("klantreis_rules_reloads_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %e, "rules reload refused; the previous rules stay active");
                Err(e)
            }
        }
    }

    /// Merges `customer` into the store and evaluates them at once in every journey,
    /// recording any phase change. Blocking: call from `spawn_blocking`. The caller
    /// makes it durable ([`commit::GroupCommit::durable`]) before answering.
    pub fn apply_and_evaluate(
        &self,
        customer: crate::model::Customer,
    ) -> Result<Vec<crate::model::Transition>, StoreError> {
        let id = customer.id.clone();
        let _guard = self.customer_locks[crate::store::stripe_of(&id)].lock();
        self.store.merge_page(vec![customer], None)?;
        self.evaluate_locked(&id)
    }

    fn evaluate_locked(&self, id: &str) -> Result<Vec<crate::model::Transition>, StoreError> {
        let Some(c) = self.store.customer(id)? else {
            return Ok(Vec::new());
        };
        let states = self.store.phase_states(id)?;
        let item = ScanItem {
            id: id.to_string(),
            record: c.encode(),
            states: (!states.is_empty()).then(|| encode_states(&states)),
        };
        let loaded = self.loaded.load();
        let now = self.clock.now();
        let mut summary = NurtureSummary::default();
        // Plans the actions of any transition into the same update, so phase change
        // and outbox entries are recorded in one batch.
        let update: Option<PhaseUpdate> = nurture::evaluate_and_plan(
            &loaded.rules,
            loaded.actions.as_ref(),
            &item,
            now.timestamp(),
            &crate::time::format(now),
            &mut summary,
        );
        metrics::counter!("klantreis_evaluations_total").increment(1);
        if summary.errors > 0 {
            metrics::counter!("klantreis_rule_errors_total").increment(summary.errors);
            for e in &summary.error_samples {
                tracing::warn!(customer = %e.id, journey = %e.journey, error = %e.error, "rule failed");
            }
        }
        let Some(update) = update else {
            return Ok(Vec::new());
        };
        self.store.record_phases(std::slice::from_ref(&update))?;
        if !update.outbox.is_empty() {
            metrics::counter!("klantreis_actions_planned_total")
                .increment(update.outbox.len() as u64);
            self.dispatch_wake.notify_one();
        }
        for t in &update.transitions {
            metrics::counter!("klantreis_transitions_total", "journey" => t.journey.clone())
                .increment(1);
            tracing::info!(
                customer = %id,
                journey = %t.journey,
                from = t.from.as_deref().unwrap_or("-"),
                to = t.to.as_deref().unwrap_or("-"),
                "customer changed phase"
            );
        }
        Ok(update.transitions)
    }

    /// Runs one nurture sweep unless one is running (then `None`). Blocking work
    /// happens on a blocking thread.
    pub async fn nurture(self: &Arc<Self>) -> Option<Result<NurtureSummary, StoreError>> {
        let _guard = self.nurture_lock.clone().try_lock_owned().ok()?;
        let state = self.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let loaded = state.loaded.load_full();
            let opts = nurture::NurtureOptions::at(state.clock.now());
            nurture::run_with_actions(
                state.store.as_ref(),
                &loaded.rules,
                loaded.actions.as_ref(),
                &opts,
                &|_| {},
            )
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Backend(format!("nurture panicked: {e}"))));
        metrics::histogram!("klantreis_nurture_seconds").record(started.elapsed().as_secs_f64());
        self.dispatch_wake.notify_one();
        if let Ok(s) = &result {
            metrics::counter!("klantreis_evaluations_total").increment(s.evaluated);
            metrics::counter!("klantreis_rule_errors_total").increment(s.errors);
            for (journey, m) in &s.transitions {
                metrics::counter!("klantreis_transitions_total", "journey" => journey.clone())
                    .increment(m.values().sum());
            }
        }
        Some(result)
    }

    /// Sends the outbox entries that are due (blocking). `None` without actions or
    /// when nothing is due.
    pub fn dispatch_due(
        &self,
    ) -> Option<Result<crate::outbox::DispatchReport, crate::outbox::OutboxError>> {
        use crate::store::OutboxStore;
        let loaded = self.loaded.load_full();
        let actions = loaded.actions.as_ref()?;
        let now = self.clock.now().timestamp();
        match self.store.outbox_next_due() {
            Ok(Some(due)) if due <= now => {}
            Ok(_) => return None,
            Err(e) => return Some(Err(e.into())),
        }
        let started = std::time::Instant::now();
        let r = crate::outbox::dispatch(
            self.store.as_ref(),
            actions,
            &loaded.config,
            self.clock.clone(),
            &[],
            &crate::outbox::DispatchOptions::default(),
        );
        metrics::histogram!("klantreis_dispatch_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(rep) = &r {
            for (state, n) in [
                ("done", rep.done),
                ("retrying", rep.retrying),
                ("dead", rep.dead),
                ("skipped", rep.skipped),
                ("cancelled", rep.cancelled),
                ("deferred", rep.deferred),
            ] {
                metrics::counter!("klantreis_actions_total", "state" => state).increment(n);
            }
        }
        Some(r)
    }

    /// Whether the deliveries tree knows this delivery.
    pub fn seen(&self, instance: &str, id: &str) -> Result<bool, StoreError> {
        self.store.delivery_seen(instance, id)
    }
}

/// Every refusal and failure the HTTP API answers with.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    StaleTimestamp(String),
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnknownInstance(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("this route does not take that method")]
    MethodNotAllowed,
    #[error("a valid bearer token is required (Authorization: Bearer <[server] admin_token>)")]
    Unauthorized,
    #[error("the admin API is off: set [server] admin_token in config.toml to turn it on")]
    AdminDisabled,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Upstream(String),
    #[error("internal error")]
    Internal(String),
}

impl HttpError {
    /// The machine-readable reason (also the `reason` label of refusal metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::BadSignature(_) => "bad_signature",
            HttpError::StaleTimestamp(_) => "stale_timestamp",
            HttpError::MalformedJson(_) => "malformed_json",
            HttpError::BadRequest(_) => "bad_request",
            HttpError::UnknownInstance(_) => "unknown_instance",
            HttpError::NotFound(_) => "not_found",
            HttpError::TooLarge(_) => "body_too_large",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::Unauthorized => "unauthorized",
            HttpError::AdminDisabled => "admin_api_disabled",
            HttpError::Conflict(_) => "conflict",
            HttpError::Upstream(_) => "upstream",
            HttpError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::BadSignature(_) | HttpError::StaleTimestamp(_) | HttpError::Unauthorized => {
                StatusCode::UNAUTHORIZED
            }
            HttpError::MalformedJson(_) | HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::UnknownInstance(_) | HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::AdminDisabled => StatusCode::FORBIDDEN,
            HttpError::Conflict(_) => StatusCode::CONFLICT,
            HttpError::Upstream(_) => StatusCode::BAD_GATEWAY,
            HttpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        HttpError::Internal(e.to_string())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let message = match &self {
            HttpError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed");
                "internal error; see the service log".to_string()
            }
            other => other.to_string(),
        };
        (
            self.status(),
            Json(json!({"error": self.reason(), "message": message})),
        )
            .into_response()
    }
}

/// Answers a known path with the wrong method.
pub async fn method_not_allowed() -> HttpError {
    HttpError::MethodNotAllowed
}

async fn not_found() -> HttpError {
    HttpError::NotFound("no such route".into())
}

/// The whole router. Every route here is in `openapi.yaml` (a test checks both ways).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/webhooks/{instance}",
            post(webhooks::receive).fallback(webhooks::wrong_method),
        )
        .route("/healthz", get(healthz).fallback(method_not_allowed))
        .route("/metrics", get(admin::metrics).fallback(method_not_allowed))
        .merge(admin::router())
        .fallback(not_found)
        .with_state(state)
}

/// The routes as (method, path) pairs, for the OpenAPI test.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/webhooks/{instance}"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/api/customers/{id}"),
    ("post", "/api/customers/{id}/events"),
    ("get", "/api/funnel"),
    ("post", "/api/nurture"),
    ("get", "/api/outbox"),
];

/// `GET /healthz`: up, the active rules and their versions, the last reload error.
async fn healthz(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> impl IntoResponse {
    let loaded = state.loaded.load();
    let health = state.health.lock().clone();
    let status = if health.reload_error.is_some() {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({
        "status": status,
        "rules": {
            "loaded_at": loaded.loaded_at,
            "versions": loaded.versions(),
            "reload_error": health.reload_error,
            "reload_failed_at": health.reload_failed_at,
        },
        "jobs": health.jobs,
        "admin_api": state.admin_token.is_some(),
    }))
}
