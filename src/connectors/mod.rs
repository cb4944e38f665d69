//! Connectors: pulling customers from the tools a business already uses (CRMs,
//! email tools, shops) and sending requests back to them, driven by declarative
//! definitions in `connectors/` (one TOML file per vendor; see `connectors/README.md`).
//!
//! - [`definition`]: loading and checking definitions ([`Registry`]).
//! - [`inbound`]: a definition's `[webhooks]` section (how `klantreis run` reads
//!   the vendor's webhooks).
//! - [`Connector`]: a config.toml instance bound to its definition.
//! - [`sync`] / [`sync_all`]: pulling page by page into the [`Store`], resumable and
//!   incremental; [`Connector::send`]: the named outbound requests actions use.
//! - [`check`]: what `klantreis check` reports about definitions and instances.
//!
//! **Invariant:** a page's customers and the sync position after it are committed
//! in one [`Store::merge_page`], so an interrupted sync never loses or repeats work
//! it has reported. Credentials live in [`Secret`]s and are never logged.

pub mod definition;
pub mod inbound;
pub mod mapping;
pub mod path;
pub mod secret;
pub mod template;

mod builtin;
mod file;
mod http;
mod identity;
mod instance;
mod outbound;
mod sync;

pub use definition::{Definition, Registry};
pub use http::HttpResponse;
pub use instance::{Connector, Join};
pub use outbound::{RenderedRequest, Response};
pub use secret::Secret;
pub use sync::{sync, InstanceReport, Progress, SkippedRecord, SyncOptions, SyncReport};

use crate::clock::SharedClock;
use crate::config::{Config, ConnectorInstanceConfig};
use crate::diag::Diagnostic;
use crate::store::{Store, StoreError};
use serde::Serialize;
use std::path::Path;

/// Everything that can go wrong in a connector. Messages start with the instance
/// name and never contain a credential.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{instance}: {}", problems.join("; "))]
    Config {
        instance: String,
        problems: Vec<String>,
    },
    #[error(
        "{instance}: {vendor} refused the credentials ({status} on {request}); check {credential}"
    )]
    Auth {
        instance: String,
        vendor: String,
        status: u16,
        request: String,
        credential: String,
    },
    #[error("{instance}: rate limited on {request}: {message}")]
    RateLimited {
        instance: String,
        request: String,
        message: String,
        /// The vendor's last `Retry-After`, in seconds (rounded up), if it sent one:
        /// when the outbox retries later, it waits at least this long.
        retry_after_secs: Option<u64>,
    },
    #[error("{instance}: {request} answered {status}: {body}")]
    Status {
        instance: String,
        request: String,
        status: u16,
        body: String,
    },
    #[error("{instance}: {request}: {message}")]
    Network {
        instance: String,
        request: String,
        message: String,
    },
    #[error(
        "{instance}: malformed page {page} ({request}): {message}; the pages before it are stored and the next sync resumes here"
    )]
    MalformedPage {
        instance: String,
        request: String,
        page: u64,
        message: String,
    },
    #[error("{instance}: {message}")]
    Template { instance: String, message: String },
    #[error("{instance}: no request named {name:?} (this connector has: {known})")]
    UnknownRequest {
        instance: String,
        name: String,
        known: String,
    },
    #[error("{instance}: {message}")]
    File { instance: String, message: String },
    #[error("{instance}: {source}")]
    Store {
        instance: String,
        #[source]
        source: StoreError,
    },
    #[error("no connector instance named {name:?} in config.toml (configured: {known})")]
    UnknownInstance { name: String, known: String },
    #[error("{instance}: {message}")]
    Internal { instance: String, message: String },
}

impl ConnectorError {
    pub(crate) fn store(instance: &str, source: StoreError) -> Self {
        ConnectorError::Store {
            instance: instance.to_string(),
            source,
        }
    }

    /// Whether the source refused the credentials (401/403).
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectorError::Auth { .. })
    }
}

/// Checks instances against their definitions (type, keys, value types, required
/// params) for `Config::parse`; environment variables are checked by [`check`].
pub fn validate_instances(
    file: &str,
    dir: &Path,
    instances: &[ConnectorInstanceConfig],
) -> Vec<Diagnostic> {
    if instances.is_empty() {
        return Vec::new();
    }
    let registry = Registry::new(dir);
    let mut out = Vec::new();
    for inst in instances {
        let problems = match instance::definition_for(inst, &registry) {
            Err(p) => vec![p],
            Ok(def) => instance::key_problems(inst, &def),
        };
        out.extend(
            problems
                .into_iter()
                .map(|((line, column), m)| Diagnostic::new(file, line, column, m)),
        );
    }
    out
}

/// Everything `klantreis check` finds about connectors without a network: every
/// definition in `connectors/` (and the built-in ones), and every instance built
/// as a sync would (unknown type, missing `${VAR}`, bad values and templates).
pub fn check(config: &Config) -> Vec<Diagnostic> {
    let registry = Registry::new(&config.connectors_dir);
    let mut out = registry.check_all();
    let file = config.file.display().to_string();
    let clock = crate::clock::from_option(None);
    for inst in &config.connectors {
        if let Err(problems) =
            Connector::try_build(inst, &registry, &config.base_dir, clock.clone())
        {
            out.extend(problems.into_iter().map(|((line, column), m)| {
                Diagnostic::new(&file, line, column, format!("connector {}: {m}", inst.name))
            }));
        }
    }
    out
}

/// Builds every configured instance; those that cannot be built come back as errors.
pub fn build_all(
    config: &Config,
    clock: SharedClock,
) -> (Vec<Connector>, Vec<(String, ConnectorError)>) {
    let registry = Registry::new(&config.connectors_dir);
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for inst in &config.connectors {
        match Connector::build(inst, &registry, &config.base_dir, clock.clone()) {
            Ok(c) => ok.push(c),
            Err(e) => bad.push((inst.name.clone(), e)),
        }
    }
    (ok, bad)
}

/// Syncs one named instance, or every instance that pulls, one after another (so
/// identities resolve the same way on every run). An instance that fails is in the
/// report with its error; the others go on. The store is flushed at the end.
pub async fn sync_all(
    config: &Config,
    store: &dyn Store,
    only: Option<&str>,
    opts: &SyncOptions,
    clock: SharedClock,
    progress: &(dyn Fn(Progress<'_>) + Send + Sync),
) -> Result<SyncReport, ConnectorError> {
    let registry = Registry::new(&config.connectors_dir);
    let selected: Vec<&ConnectorInstanceConfig> = match only {
        None => config.connectors.iter().collect(),
        Some(n) => match config.connectors.iter().find(|c| c.name == n) {
            Some(c) => vec![c],
            None => {
                return Err(ConnectorError::UnknownInstance {
                    name: n.to_string(),
                    known: config
                        .connectors
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        },
    };
    let mut report = SyncReport::new();
    for inst in selected {
        let conn = match Connector::build(inst, &registry, &config.base_dir, clock.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(instance = %inst.name, error = %e, "connector not usable");
                report.insert(inst.name.clone(), InstanceReport::failed(&e));
                continue;
            }
        };
        if !conn.pulls() {
            if only.is_some() {
                let e = ConnectorError::Config {
                    instance: inst.name.clone(),
                    problems: vec![format!(
                        "a {} connector does not pull (it only sends)",
                        conn.kind()
                    )],
                };
                report.insert(inst.name.clone(), InstanceReport::failed(&e));
            }
            continue;
        }
        report.insert(inst.name.clone(), sync(&conn, store, opts, progress).await);
    }
    store
        .flush()
        .map_err(|e| ConnectorError::store("sync", e))?;
    Ok(report)
}

/// The runtime the blocking entry points use: two workers, so fetching the next page
/// and committing the current one overlap.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("klantreis-connector")
        .enable_all()
        .build()
}

/// [`sync_all`] for callers without a runtime (the CLI). Do not call it from async code.
pub fn sync_all_blocking(
    config: &Config,
    store: &dyn Store,
    only: Option<&str>,
    opts: &SyncOptions,
    clock: SharedClock,
    progress: &(dyn Fn(Progress<'_>) + Send + Sync),
) -> Result<SyncReport, ConnectorError> {
    let rt = runtime().map_err(|e| ConnectorError::Internal {
        instance: "sync".into(),
        message: format!("cannot start the async runtime: {e}"),
    })?;
    rt.block_on(sync_all(config, store, only, opts, clock, progress))
}

/// The answer of one instance to `check --online`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OnlineCheck {
    pub instance: String,
    pub ok: bool,
    pub message: String,
}

/// Makes one cheap authenticated request per instance (the definition's `[check]`,
/// else the first page of its pull with one record) and reports the answer.
pub async fn check_online(config: &Config, clock: SharedClock) -> Vec<OnlineCheck> {
    let (ok, bad) = build_all(config, clock);
    let mut out: Vec<OnlineCheck> = bad
        .into_iter()
        .map(|(instance, e)| OnlineCheck {
            instance,
            ok: false,
            message: e.to_string(),
        })
        .collect();
    for c in ok {
        out.push(online_one(&c).await);
    }
    out.sort_by(|a, b| a.instance.cmp(&b.instance));
    out
}

async fn online_one(c: &Connector) -> OnlineCheck {
    let result = |ok: bool, message: String| OnlineCheck {
        instance: c.name().to_string(),
        ok,
        message,
    };
    let def = c.definition();
    if def.kind == definition::Kind::File {
        let path = &c.0.file.as_ref().expect("file connectors have a path").path;
        return match std::fs::metadata(path) {
            Ok(m) => result(
                true,
                format!("{} is readable ({} bytes)", path.display(), m.len()),
            ),
            Err(e) => result(
                false,
                format!("{}: cannot read {}: {e}", c.name(), path.display()),
            ),
        };
    }
    let run = sync::RunState {
        started: c.0.clock.now(),
        incremental: false,
        query_since: None,
        next: sync::PageState::Start,
        max_seen: None,
        in_query: 0,
    };
    let req = if let Some(shape) = &def.check {
        let listing = definition::Listing {
            shape: shape.clone(),
            records: path::JsonPath::parse("").expect("the root path parses"),
            pagination: definition::Pagination {
                style: definition::Style::None,
                next: None,
                param: None,
                total: None,
                total_header: None,
                total_pages_header: None,
                first_page: 1,
            },
        };
        sync::list_request(c, &listing, &run, 1)
    } else if let Some(pull) = &def.pull {
        sync::list_request(c, &pull.full, &run, 1)
    } else {
        return result(
            true,
            format!(
                "nothing to check without sending (a {} connector has no [check])",
                def.name
            ),
        );
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => return result(false, e.to_string()),
    };
    let started = std::time::Instant::now();
    match c.execute(&req).await {
        Ok(r) => result(
            true,
            format!(
                "{} answered {} in {} ms",
                req.describe(),
                r.status,
                started.elapsed().as_millis()
            ),
        ),
        Err(e) => result(false, e.to_string()),
    }
}

/// [`check_online`] for callers without a runtime.
pub fn check_online_blocking(config: &Config, clock: SharedClock) -> Vec<OnlineCheck> {
    match runtime() {
        Ok(rt) => rt.block_on(check_online(config, clock)),
        Err(e) => vec![OnlineCheck {
            instance: "check".into(),
            ok: false,
            message: format!("cannot start the async runtime: {e}"),
        }],
    }
}
