//! `klantreis run`: one long-lived process on tokio with the HTTP server
//! ([`crate::server`]), the [`crate::scheduler`], the action dispatcher (the
//! outbox) and hot reload of the rules.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting connections, let requests in flight
//! finish, stop the scheduler and wait for running jobs, flush the store, return;
//! each wait is bounded by `[server] shutdown_timeout_secs`. SIGHUP, or a change
//! under `rules/` or to config.toml, reloads the rules ([`AppState::reload`]).

use crate::clock::SharedClock;
use crate::server::{AppState, Loaded};
use crate::store::{SledStore, Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Errors that stop the service from starting or ending cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

/// How `klantreis run` starts.
pub struct RunOptions {
    pub config_path: PathBuf,
    /// `--listen`; default `[server] listen`.
    pub listen: Option<String>,
    pub clock: SharedClock,
}

/// Runs the service until SIGTERM or SIGINT.
pub fn run(opts: RunOptions) -> Result<(), ServiceError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("klantreis")
        .build()
        .map_err(|e| ServiceError::Runtime(e.to_string()))?;
    let result = rt.block_on(serve(opts));
    // Blocking tasks still running (a sweep) are not waited for past this point.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(opts: RunOptions) -> Result<(), ServiceError> {
    // Take over the signals before anything else: until then SIGTERM and SIGHUP
    // would end the process with their default action.
    let signals = Signals::install().map_err(|e| ServiceError::Runtime(e.to_string()))?;
    let loaded = Loaded::load(&opts.config_path, &opts.clock).map_err(ServiceError::Config)?;
    let config = &loaded.config;
    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| config.server.listen.clone());
    let admin_token = match &config.server.admin_token {
        None => None,
        Some(raw) => match crate::config::expand_env(raw) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                tracing::warn!("[server] admin_token is empty: the admin API and /metrics are off");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "[server] admin_token cannot be read: the admin API and /metrics are off");
                None
            }
        },
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok();
    let store = Arc::new(SledStore::open(&config.store.path, config.store.cache_mb)?);
    let schedule = crate::scheduler::Schedule::from_settings(&config.schedule)
        .map_err(|e| ServiceError::Config(e.to_string()))?;
    let catch_up = config.schedule.catch_up;
    let timeout = Duration::from_secs(config.server.shutdown_timeout_secs.max(1));
    let rules_dir = config.rules_dir.clone();
    let address_file = address_file(&config.store.path);
    let state = AppState::new(
        opts.config_path.clone(),
        loaded,
        store.clone(),
        opts.clock.clone(),
        admin_token,
        metrics,
    );

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServiceError::Runtime(e.to_string()))?;
    // Tests and scripts read the bound address (for `--listen 127.0.0.1:0`) here.
    println!("klantreis listening on http://{addr}");
    // CLI read commands find the service here while it holds the store.
    if let Err(e) = write_address(&address_file, addr) {
        tracing::warn!(file = %address_file.display(), error = %e, "cannot write the service address");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "klantreis serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scheduler = tokio::spawn(crate::scheduler::run(
        state.clone(),
        schedule,
        catch_up,
        stop_rx.clone(),
    ));
    let dispatcher = tokio::spawn(dispatch_loop(state.clone(), stop_rx.clone()));
    let _watcher = watch_rules(state.clone(), &rules_dir, &opts.config_path);
    let Signals { stop, hup } = signals;
    tokio::spawn(reload_on_sighup(state.clone(), hup));

    let mut server_stop = stop_rx.clone();
    let app = crate::server::router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.changed().await;
            })
            .await
    });

    stop.wait().await;
    tracing::info!("shutting down: no new requests; finishing those in flight");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(timeout, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!(
            secs = timeout.as_secs(),
            "requests still in flight after the shutdown timeout"
        ),
    }
    if tokio::time::timeout(timeout, scheduler).await.is_err() {
        tracing::warn!("scheduled jobs still running after the shutdown timeout");
    }
    if tokio::time::timeout(timeout, dispatcher).await.is_err() {
        tracing::warn!("actions still being sent after the shutdown timeout");
    }
    let flushed = tokio::task::spawn_blocking(move || store.flush())
        .await
        .map_err(|e| ServiceError::Runtime(e.to_string()))?;
    flushed?;
    let _ = std::fs::remove_file(&address_file);
    tracing::info!("store flushed; bye");
    Ok(())
}

/// Where the running service writes the URL it answers on: beside the store
/// (`data/store` → `data/store.service`).
pub fn address_file(store_path: &std::path::Path) -> std::path::PathBuf {
    let mut name = store_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".service");
    store_path.with_file_name(name)
}

fn write_address(file: &std::path::Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    // A service bound to every interface is reached on loopback from this machine.
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let tmp = file.with_extension("service.tmp");
    std::fs::write(&tmp, format!("http://{host}:{}\n", addr.port()))?;
    std::fs::rename(&tmp, file)
}

/// The URL a running service wrote with [`address_file`], if any.
pub fn read_address(store_path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(address_file(store_path)).ok()?;
    let url = text.trim();
    url.starts_with("http://").then(|| url.to_string())
}

/// The action dispatcher: sends due outbox entries when woken by new entries, and
/// at least every second for retries and delayed actions, until shutdown.
async fn dispatch_loop(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = state.dispatch_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => break,
        }
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.dispatch_due()).await {
            Ok(Some(Ok(r))) => tracing::info!(
                done = r.done,
                retrying = r.retrying,
                dead = r.dead,
                skipped = r.skipped,
                deferred = r.deferred,
                "actions dispatched"
            ),
            Ok(Some(Err(e))) => tracing::error!(error = %e, "dispatch failed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "dispatcher panicked"),
        }
    }
}

/// SIGTERM/SIGINT (stop) and SIGHUP (reload), installed at start.
struct Signals {
    stop: Stop,
    hup: Hup,
}

#[cfg(unix)]
struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}
#[cfg(not(unix))]
struct Stop;

#[cfg(unix)]
type Hup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hup = ();

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            stop: Stop {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hup: signal(SignalKind::hangup())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            stop: Stop,
            hup: (),
        })
    }
}

impl Stop {
    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(unix)]
async fn reload_on_sighup(state: Arc<AppState>, mut hup: Hup) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the rules");
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || st.reload()).await;
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_state: Arc<AppState>, _hup: Hup) {}

/// Watches `rules/` and config.toml; a change (after a short quiet period, as
/// editors write in several steps) reloads the rules. The watcher lives as long as
/// the returned handle.
fn watch_rules(
    state: Arc<AppState>,
    rules_dir: &std::path::Path,
    config_path: &std::path::Path,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if !ev.kind.is_access() {
                let _ = tx.send(());
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the rules; reload with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(rules_dir, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %rules_dir.display(), "cannot watch the rules folder; reload with SIGHUP");
    }
    // Watch the config's folder, not the file: editors replace files by renaming.
    let config_dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let Err(e) = watcher.watch(config_dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, "cannot watch config.toml; reload with SIGHUP");
    }
    tokio::spawn(async move {
        let mut last = state.loaded.load().fingerprint;
        while rx.recv().await.is_some() {
            // Let the editor finish writing, then take every event so far as one.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let st = state.clone();
            let now = tokio::task::spawn_blocking(move || {
                crate::server::fingerprint(&st.config_path, &st.loaded.load().config.rules_dir)
            })
            .await
            .unwrap_or_default();
            if now == last {
                continue; // the store or something unrelated changed
            }
            last = now;
            tracing::info!("rules or config changed: reloading");
            let st = state.clone();
            let _ = tokio::task::spawn_blocking(move || st.reload()).await;
        }
    });
    Some(watcher)
}
