//! The command line: one function per subcommand. Only this module (and `main`) use
//! `anyhow`; the library reports typed errors.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use klantreis::actions::Actions;
use klantreis::config::Config;
use klantreis::nurture::{NurtureOptions, NurtureSummary};
use klantreis::rules::RuleSet;
use klantreis::store::{SledStore, Store};
use klantreis::{clock, connectors, explain, import, nurture, outbox, ruletest};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The time the shipped demo data is evaluated at, so the demo prints the same
/// funnel on every machine and every day.
pub const DEMO_NOW: &str = "2026-11-20T12:00:00Z";

#[derive(Debug, Parser)]
#[command(
    name = "klantreis",
    version,
    about = "Customer-journey phases in Rhai rules, on an embedded store"
)]
pub struct Cli {
    /// The config file; relative paths in it resolve against its folder.
    #[arg(
        long,
        global = true,
        default_value = "config.toml",
        env = "KLANTREIS_CONFIG"
    )]
    config: PathBuf,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate config.toml, connector definitions and instances, and compile every rule file; report every problem.
    Check {
        #[arg(long)]
        json: bool,
        /// Also make one cheap authenticated request per connector instance.
        #[arg(long)]
        online: bool,
    },
    /// Run the rule tests (rules/tests/*.toml by default).
    Test {
        /// A test file or a folder of them.
        path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Import customers from JSON Lines or CSV (by extension; `-` reads JSON Lines from stdin).
    Import {
        #[arg(default_value = "-")]
        file: String,
        /// Force the input format.
        #[arg(long, value_parser = ["jsonl", "csv"])]
        format: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Classify customers from JSON Lines without touching the store.
    Eval {
        #[arg(default_value = "-")]
        file: String,
        /// Only this journey.
        #[arg(long)]
        journey: Option<String>,
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long, value_parser = rfc3339)]
        now: Option<DateTime<Utc>>,
    },
    /// Evaluate every stored customer in every journey and record the transitions.
    Nurture {
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long, value_parser = rfc3339)]
        now: Option<DateTime<Utc>>,
        /// Evaluate and report, but write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Do not sync the connector instances first.
        #[arg(long)]
        no_sync: bool,
    },
    /// The action outbox: pending, scheduled, done and dead actions (`retry` puts dead ones back).
    Outbox {
        #[command(subcommand)]
        cmd: Option<OutboxCmd>,
        #[arg(long)]
        json: bool,
    },
    /// Pull customers from the connector instances in config.toml (all, or one by name).
    Sync {
        /// The instance (`[connectors.NAME]`); default: every instance that pulls.
        name: Option<String>,
        /// List everything again instead of only what changed since the last sync.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a customer's phases, their history, and the rule lines that decided them.
    Explain {
        id: String,
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long, value_parser = rfc3339)]
        now: Option<DateTime<Utc>>,
        #[arg(long)]
        json: bool,
    },
    /// Customers per phase per journey.
    Funnel {
        #[arg(long)]
        json: bool,
    },
    /// Erase a customer and everything stored about them, then compact the store so
    /// no bytes of them stay on disk.
    Forget {
        id: String,
        /// Skip the compaction (when forgetting many customers: run `compact` after).
        #[arg(long)]
        no_compact: bool,
    },
    /// Rewrite the store so erased records leave no bytes on disk.
    Compact,
    /// Run the service until SIGTERM: webhooks, the admin API, /healthz, /metrics,
    /// the [schedule] jobs and hot reload of the rules.
    Run {
        /// Listen here (default: [server] listen, else 127.0.0.1:8080); port 0 picks a
        /// free port. The bound address is printed on stdout.
        #[arg(long)]
        listen: Option<String>,
        /// Log JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Import the shipped demo customers, run a nurture and print the funnel.
    Demo {
        /// The demo data (JSON Lines or CSV).
        #[arg(long, default_value = "examples/customers.jsonl")]
        data: PathBuf,
        /// Evaluation time.
        #[arg(long, value_parser = rfc3339, default_value = DEMO_NOW)]
        now: DateTime<Utc>,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxCmd {
    /// Put a dead action (by id) or every dead action (--dead) back to pending.
    Retry {
        id: Option<String>,
        #[arg(long)]
        dead: bool,
    },
}

/// Logs go to stderr; `RUST_LOG` wins over `-v`.
/// The service logs at info by default, and as JSON lines with `run --log-json`.
pub fn init_logging(cli: &Cli) {
    let service = matches!(cli.command, Command::Run { .. });
    let default = match (cli.verbose, service) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if matches!(cli.command, Command::Run { log_json: true, .. }) {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check { json, online } => check(&cli.config, json, online),
        Command::Test { path, json } => test(&cli.config, path, json),
        Command::Import { file, format, json } => {
            import_cmd(&cli.config, &file, format.as_deref(), json)
        }
        Command::Eval { file, journey, now } => eval(&cli.config, &file, journey.as_deref(), now),
        Command::Nurture {
            now,
            dry_run,
            json,
            threads,
            no_sync,
        } => nurture_cmd(&cli.config, now, dry_run, json, threads, no_sync),
        Command::Outbox { cmd, json } => outbox_cmd(&cli.config, cmd, json),
        Command::Sync { name, full, json } => sync_cmd(&cli.config, name.as_deref(), full, json),
        Command::Explain { id, now, json } => explain_cmd(&cli.config, &id, now, json),
        Command::Funnel { json } => funnel(&cli.config, json),
        Command::Forget { id, no_compact } => forget(&cli.config, &id, !no_compact),
        Command::Compact => compact(&cli.config),
        Command::Run { listen, .. } => {
            klantreis::service::run(klantreis::service::RunOptions {
                config_path: cli.config.clone(),
                listen,
                clock: clock::from_option(None),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { data, now } => demo(&cli.config, &data, now),
    }
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn load_rules(config: &Config) -> Result<RuleSet> {
    RuleSet::load(config).map_err(|ds| {
        anyhow::anyhow!(
            "{}",
            ds.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn open_store(config: &Config) -> Result<SledStore> {
    match open_or_service(config)? {
        Opened::Store(s) => Ok(s),
        Opened::Service(api) => Err(held_by_service(
            config,
            &format!(
                "This command changes the store, so it does not go through the service ({}).",
                api.url
            ),
        )),
    }
}

/// The store, or, when the running service holds it, the service's admin API.
enum Opened {
    Store(SledStore),
    Service(ServiceApi),
}

/// Read commands (`explain`, `funnel`, `outbox`) use the service's admin API while
/// `klantreis run` holds the store (sled admits one process at a time).
fn open_or_service(config: &Config) -> Result<Opened> {
    match SledStore::open(&config.store.path, config.store.cache_mb) {
        Ok(s) => Ok(Opened::Store(s)),
        Err(klantreis::store::StoreError::Locked { .. }) => match ServiceApi::find(config) {
            Ok(api) => Ok(Opened::Service(api)),
            Err(why) => Err(held_by_service(config, &why)),
        },
        Err(e) => Err(e.into()),
    }
}

fn held_by_service(config: &Config, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the store at {path} is held by the running klantreis service (`klantreis run`).\n\
         {why}\n\
         Ask the service instead, e.g.\n  \
         curl -H \"Authorization: Bearer $KLANTREIS_ADMIN_TOKEN\" http://{listen}/api/customers/ID\n  \
         curl -H \"Authorization: Bearer $KLANTREIS_ADMIN_TOKEN\" http://{listen}/api/funnel\n\
         or stop the service (SIGTERM) and run this command again.",
        path = config.store.path.display(),
        listen = config.server.listen
    )
}

/// The running service's admin API: its address (from the file the service writes
/// beside the store, else `[server] listen`) and the admin token.
struct ServiceApi {
    url: String,
    token: String,
}

impl ServiceApi {
    fn find(config: &Config) -> std::result::Result<ServiceApi, String> {
        let token = match &config.server.admin_token {
            None => {
                return Err(
                    "Its admin API is off (no [server] admin_token), so this command cannot go through it."
                        .into(),
                )
            }
            Some(raw) => klantreis::config::expand_env(raw)
                .map_err(|e| format!("[server] admin_token: {e}"))?,
        };
        if token.trim().is_empty() {
            return Err("[server] admin_token is empty, so the admin API is off.".into());
        }
        let url = klantreis::service::read_address(&config.store.path)
            .unwrap_or_else(|| format!("http://{}", config.server.listen));
        Ok(ServiceApi {
            url,
            token: token.trim().to_string(),
        })
    }

    /// `GET path` with the token; the status and the JSON body.
    fn get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let url = format!("{}{path}", self.url);
        rt.block_on(async {
            let r = reqwest::Client::new()
                .get(&url)
                .bearer_auth(&self.token)
                .timeout(std::time::Duration::from_secs(30))
                .send()
                .await
                .with_context(|| {
                    format!("the store is held by the running service, which does not answer at {url}")
                })?;
            let status = r.status().as_u16();
            let v: serde_json::Value = r
                .json()
                .await
                .with_context(|| format!("{url} did not answer JSON"))?;
            if status == 401 || status == 403 {
                bail!(
                    "the running service refused {url} ({status}: {}); is KLANTREIS_ADMIN_TOKEN the service's token?",
                    v["message"].as_str().unwrap_or("")
                );
            }
            Ok((status, v))
        })
    }
}

/// `--now`: an RFC 3339 time. A bad value is a usage error (exit 2), like any flag.
fn rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    klantreis::time::parse(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-11-20T12:00:00Z"))
}

/// The evaluation time: `--now`, or the wall clock. The one place the CLI reads a clock.
fn parse_now(now: Option<DateTime<Utc>>) -> Result<DateTime<Utc>> {
    Ok(clock::from_option(now).now())
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template = if what == "bytes" {
        "{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} ({eta})"
    } else {
        "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})"
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn check(config_path: &Path, json: bool, online: bool) -> Result<ExitCode> {
    let mut problems: Vec<klantreis::diag::Diagnostic> = Vec::new();
    let mut journeys = 0;
    let mut online_checks: Vec<connectors::OnlineCheck> = Vec::new();
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    match Config::parse_lenient(config_path, &text) {
        Err(klantreis::config::ConfigError::Invalid(ds)) => problems.extend(ds),
        Err(e) => bail!(e),
        Ok((config, config_problems)) => {
            problems.extend(config_problems);
            journeys = config.journeys.len();
            if let Err(ds) = RuleSet::load(&config) {
                problems.extend(ds);
            }
            problems.extend(connectors::check(&config));
            problems.extend(klantreis::actions::check(&config));
            if online {
                online_checks =
                    connectors::check_online_blocking(&config, clock::from_option(None));
            }
        }
    }
    let online_failed = online_checks.iter().filter(|c| !c.ok).count();
    if json {
        let mut v = serde_json::json!({"ok": problems.is_empty() && online_failed == 0, "journeys": journeys, "problems": problems});
        if online {
            v["online"] = serde_json::to_value(&online_checks)?;
        }
        println!("{v}");
        return Ok(if problems.is_empty() && online_failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    for c in &online_checks {
        println!(
            "{} {}: {}",
            if c.ok { "online ok" } else { "online FAILED" },
            c.instance,
            c.message
        );
    }
    if problems.is_empty() && online_failed > 0 {
        println!("{online_failed} connector(s) failed the online check");
        return Ok(ExitCode::from(1));
    }
    if problems.is_empty() {
        println!(
            "ok: {} is valid; {journeys} journeys, every rule compiles",
            config_path.display()
        );
    } else {
        for p in &problems {
            println!("{p}");
        }
        println!("{} problem(s) found", problems.len());
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn test(config_path: &Path, path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config)?;
    let path = path.unwrap_or_else(|| config.rules_dir.join("tests"));
    let files = ruletest::test_files(&path);
    if files.is_empty() {
        bail!("no rule tests found at {}", path.display());
    }
    let report = ruletest::run(&rules, &files);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        for r in report.results.iter().filter(|r| r.failure.is_some()) {
            println!(
                "FAIL {} {:?} (journey {}): {}",
                r.location,
                r.name,
                r.journey,
                r.failure.as_deref().unwrap_or("")
            );
        }
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn import_cmd(
    config_path: &Path,
    file: &str,
    format: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let store = open_store(&config)?;
    let report = import_file(&store, file, format)?;
    print_import(&report, json)?;
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn import_file(
    store: &dyn Store,
    file: &str,
    format: Option<&str>,
) -> Result<import::ImportReport> {
    let format = match format {
        Some("csv") => import::Format::Csv,
        Some(_) => import::Format::Jsonl,
        None => import::Format::from_path(file),
    };
    if file == "-" {
        let stdin = std::io::stdin();
        return Ok(import::import(store, stdin.lock(), format, &|_| {})?);
    }
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let pb = progress_bar(len, "bytes");
    pb.set_message("importing");
    let report = import::import(store, BufReader::with_capacity(1 << 20, f), format, &|b| {
        pb.set_position(b)
    });
    pb.finish_and_clear();
    Ok(report?)
}

fn print_import(report: &import::ImportReport, json: bool) -> Result<()> {
    for e in &report.error_samples {
        eprintln!("line {}: {}", e.line, e.error);
    }
    if report.errors > report.error_samples.len() as u64 {
        eprintln!(
            "... and {} more bad lines",
            report.errors - report.error_samples.len() as u64
        );
    }
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "imported {} customers: {} new, {} updated, {} unchanged; {} bad lines skipped",
            report.customers,
            report.stats.created,
            report.stats.updated,
            report.stats.unchanged,
            report.errors
        );
    }
    Ok(())
}

fn eval(
    config_path: &Path,
    file: &str,
    journey: Option<&str>,
    now: Option<DateTime<Utc>>,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config)?;
    let now = parse_now(now)?.timestamp();
    let indices: Vec<usize> = match journey {
        Some(name) => vec![rules
            .journey_index(name)
            .with_context(|| format!("unknown journey {name:?}"))?],
        None => (0..rules.journeys.len()).collect(),
    };
    let input: Box<dyn BufRead> = if file == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?,
        ))
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut bad = 0u64;
    let mut rule_errors = 0u64;
    let mut lines = input.lines().enumerate();
    loop {
        let chunk: Vec<(usize, String)> = lines
            .by_ref()
            .take(1024)
            .map(|(i, l)| l.map(|l| (i + 1, l)))
            .collect::<std::io::Result<_>>()?;
        if chunk.is_empty() {
            break;
        }
        // Per input line: its output lines, each with whether the rule failed.
        let results: Vec<Result<Vec<(String, bool)>, String>> = chunk
            .par_iter()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                let c = serde_json::from_str(l)
                    .map_err(|e| format!("invalid JSON: {e}"))
                    .and_then(import::customer_from_json)
                    .map_err(|e| format!("line {n}: {e}"))?;
                let base = RuleSet::customer_map_of(&c);
                Ok(indices
                    .iter()
                    .map(|&i| {
                        let mut map = base.clone();
                        RuleSet::set_phase(&mut map, None);
                        let j = &rules.journeys[i].name;
                        let (v, failed) = match rules.evaluate(i, map, now) {
                            Ok(d) if d.flags.is_empty() => {
                                (serde_json::json!({"id": c.id, "journey": j, "phase": d.phase}), false)
                            }
                            Ok(d) => (
                                serde_json::json!({"id": c.id, "journey": j, "phase": d.phase, "flags": d.flags}),
                                false,
                            ),
                            Err(e) => (serde_json::json!({"id": c.id, "journey": j, "error": e.message}), true),
                        };
                        (v.to_string(), failed)
                    })
                    .collect())
            })
            .collect();
        for r in results {
            match r {
                Ok(lines) => {
                    for (l, failed) in lines {
                        rule_errors += u64::from(failed);
                        writeln!(out, "{l}")?;
                    }
                }
                Err(e) => {
                    bad += 1;
                    eprintln!("{e}");
                }
            }
        }
    }
    out.flush()?;
    if rule_errors > 0 {
        eprintln!("{rule_errors} evaluation(s) failed");
    }
    Ok(if bad == 0 && rule_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_nurture(
    store: &dyn Store,
    rules: &RuleSet,
    actions: Option<&Actions>,
    opts: &NurtureOptions,
) -> Result<(NurtureSummary, f64)> {
    let total = store.customer_count()?;
    let pb = progress_bar(total, "customers");
    pb.set_message(if opts.dry_run {
        "nurture (dry run)"
    } else {
        "nurture"
    });
    let started = std::time::Instant::now();
    let summary = nurture::run_with_actions(store, rules, actions, opts, &|n| pb.set_position(n))?;
    pb.finish_and_clear();
    Ok((summary, started.elapsed().as_secs_f64()))
}

fn print_summary(
    summary: &NurtureSummary,
    secs: f64,
    config: &Config,
    json: bool,
    dry_run: bool,
    actions: Option<&outbox::DispatchReport>,
) -> Result<()> {
    for e in &summary.error_samples {
        eprintln!(
            "rule error: customer {}, journey {}: {}",
            e.id, e.journey, e.error
        );
    }
    if summary.errors > summary.error_samples.len() as u64 {
        eprintln!(
            "... and {} more rule errors",
            summary.errors - summary.error_samples.len() as u64
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "evaluated": summary.evaluated,
                "transitions": summary.transitions,
                "errors": summary.errors,
                "dry_run": dry_run,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "actions": actions,
            })
        );
        return Ok(());
    }
    println!(
        "{}evaluated {} customers in {:.2} s ({:.0}/s); {} transitions, {} rule errors",
        if dry_run { "dry run: " } else { "" },
        summary.evaluated,
        secs,
        summary.evaluated as f64 / secs.max(1e-9),
        summary.transition_count(),
        summary.errors
    );
    for j in &config.journeys {
        if let Some(t) = summary.transitions.get(&j.name) {
            let mut items: Vec<_> = t.iter().collect();
            items.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let list: Vec<String> = items.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {}: {}", j.name, list.join(", "));
        }
    }
    if let Some(r) = actions {
        print_dispatch(r, dry_run);
    }
    Ok(())
}

fn nurture_cmd(
    config_path: &Path,
    now: Option<DateTime<Utc>>,
    dry_run: bool,
    json: bool,
    threads: usize,
    no_sync: bool,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config)?;
    let store = open_store(&config)?;
    // Sync first so the rules see today's data; a dry run writes nothing, so it
    // does not sync either. Sync problems are reported on stderr and the nurture
    // goes on with what is stored.
    if !no_sync && !dry_run && !config.connectors.is_empty() {
        let report = run_sync(&config, &store, None, false, clock::from_option(now))?;
        for (name, r) in &report {
            eprintln!("sync {}", sync_line(name, r));
        }
    }
    let mut opts = NurtureOptions::at(parse_now(now)?);
    opts.dry_run = dry_run;
    opts.threads = threads;
    let actions = load_actions(&config)?;
    let (summary, secs) = run_nurture(&store, &rules, actions.as_ref(), &opts)?;
    let report = dispatch_actions(
        &store,
        actions.as_ref(),
        &config,
        &summary,
        opts.now,
        dry_run,
    )?;
    print_summary(&summary, secs, &config, json, dry_run, report.as_ref())?;
    Ok(if summary.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_sync(
    config: &Config,
    store: &dyn Store,
    name: Option<&str>,
    full: bool,
    clock: clock::SharedClock,
) -> Result<connectors::SyncReport> {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} sync {msg} ({elapsed})").expect("valid template"),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let progress = |p: connectors::Progress<'_>| match p.total {
        Some(t) => pb.set_message(format!("{}: {}/{t} records", p.instance, p.fetched)),
        None => pb.set_message(format!("{}: {} records", p.instance, p.fetched)),
    };
    let opts = connectors::SyncOptions { full };
    let report = connectors::sync_all_blocking(config, store, name, &opts, clock, &progress);
    pb.finish_and_clear();
    Ok(report?)
}

/// One instance's sync, on one line.
fn sync_line(name: &str, r: &connectors::InstanceReport) -> String {
    let mode = match (r.source_unchanged, r.incremental, r.resumed) {
        (true, _, _) => " (source unchanged)",
        (_, true, true) => " (incremental, resumed)",
        (_, true, false) => " (incremental)",
        (_, false, true) => " (resumed)",
        _ => "",
    };
    let mut line = format!(
        "{name}: fetched {}, created {}, updated {}, unchanged {}; {} skipped, {} requests retried{mode}",
        r.fetched, r.created, r.updated, r.unchanged, r.skipped, r.retried
    );
    if let Some(e) = &r.error {
        line.push_str(&format!("\n  stopped: {e}"));
    }
    for s in &r.skipped_records {
        line.push_str(&format!("\n  skipped record {}: {}", s.record, s.reason));
    }
    if r.skipped > r.skipped_records.len() as u64 {
        line.push_str(&format!(
            "\n  ... and {} more skipped records",
            r.skipped - r.skipped_records.len() as u64
        ));
    }
    line
}

fn sync_cmd(config_path: &Path, name: Option<&str>, full: bool, json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let store = open_store(&config)?;
    let report = run_sync(&config, &store, name, full, clock::from_option(None))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if report.is_empty() {
        println!(
            "no connector instance pulls; add one under [connectors.NAME] in {}",
            config_path.display()
        );
    } else {
        for (name, r) in &report {
            println!("{}", sync_line(name, r));
        }
    }
    let failed = report.values().any(|r| r.errors > 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn explain_cmd(
    config_path: &Path,
    id: &str,
    now: Option<DateTime<Utc>>,
    json: bool,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = RuleSet::load_traced(&config).map_err(|ds| {
        anyhow::anyhow!(
            "{}",
            ds.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let store = match open_or_service(&config)? {
        Opened::Store(s) => s,
        Opened::Service(api) => {
            let path = format!(
                "/api/customers/{}",
                url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
            );
            let (status, v) = api.get(&path)?;
            if status == 404 {
                return Ok(no_such_customer(id, json));
            }
            if status != 200 {
                bail!("{}{path} answered {status}: {v}", api.url);
            }
            if now.is_some() {
                eprintln!("note: the running service explains at its own clock; --now is ignored");
            }
            if !json {
                eprintln!(
                    "(the running service holds the store; this is its answer, from {})",
                    api.url
                );
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
    };
    let Some(x) = explain::explain(&store, &rules, &config, id, parse_now(now)?)? else {
        return Ok(no_such_customer(id, json));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&x)?);
        return Ok(ExitCode::SUCCESS);
    }
    let email = x
        .customer
        .get("email")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    println!(
        "customer {} {}",
        x.id,
        if email.is_empty() {
            String::new()
        } else {
            format!("<{email}>")
        }
    );
    for j in &x.journeys {
        println!();
        match (&j.phase, &j.since) {
            (Some(p), Some(s)) => println!("{}: {p} since {s}", j.journey),
            _ => println!("{}: not in this journey", j.journey),
        }
        if !j.flags.is_empty() {
            println!("  flags: {}", j.flags.join(", "));
        }
        if !j.history.is_empty() {
            println!("  history:");
            for t in &j.history {
                println!(
                    "    {}  {} → {}  (rules {})",
                    t.at,
                    t.from.as_deref().unwrap_or("-"),
                    t.to.as_deref().unwrap_or("-"),
                    t.rules_version
                );
            }
        }
        match (&j.evaluation, &j.error) {
            (Some(d), _) => {
                let now_says = d.phase.as_deref().unwrap_or("no phase");
                println!("  why: at {} the rule gives {now_says}", x.evaluated_at);
                if d.phase != j.phase {
                    println!(
                        "  (that differs from the stored phase: the next nurture will record it)"
                    );
                }
            }
            (None, Some(e)) => println!("  the rule fails at {}: {e}", x.evaluated_at),
            _ => {}
        }
        for l in &j.trace {
            println!("    {}:{:<4} {}", l.source, l.line, l.text);
        }
    }
    print_actions_of(&store, id, parse_now(now)?.timestamp())?;
    Ok(ExitCode::SUCCESS)
}

fn no_such_customer(id: &str, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "error": "no such customer"})
        );
    } else {
        println!("no customer {id:?} in the store");
    }
    ExitCode::from(1)
}

fn print_funnel(config: &Config, funnel: &klantreis::store::Funnel) {
    const WIDTH: f64 = 40.0;
    for j in &config.journeys {
        let counts = funnel.get(&j.name);
        let total: u64 = counts.map_or(0, |c| c.values().sum());
        let max = counts
            .and_then(|c| c.values().max().copied())
            .unwrap_or(0)
            .max(1);
        let name_w = j
            .phases
            .iter()
            .map(|p| p.chars().count())
            .max()
            .unwrap_or(0);
        println!("{} ({} customers)", j.name, total);
        for p in &j.phases {
            let n = counts.and_then(|c| c.get(p)).copied().unwrap_or(0);
            let bar = "█".repeat(((n as f64 / max as f64) * WIDTH).round() as usize);
            let pad = " ".repeat(name_w - p.chars().count());
            println!("  {p}{pad}  {bar} {n}");
        }
    }
}

fn funnel(config_path: &Path, json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let store = match open_or_service(&config)? {
        Opened::Store(s) => s,
        Opened::Service(api) => {
            let (status, v) = api.get("/api/funnel")?;
            if status != 200 {
                bail!("{}/api/funnel answered {status}: {v}", api.url);
            }
            if json {
                println!("{v}");
            } else {
                let funnel: klantreis::store::Funnel = serde_json::from_value(v)
                    .context("the service's funnel is not journey → phase → count")?;
                print_funnel(&config, &funnel);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let funnel = store.funnel()?;
    if json {
        // Every configured phase appears, with 0 where nobody is.
        let mut out = serde_json::Map::new();
        for j in &config.journeys {
            let mut m = serde_json::Map::new();
            for p in &j.phases {
                let n = funnel
                    .get(&j.name)
                    .and_then(|c| c.get(p))
                    .copied()
                    .unwrap_or(0);
                m.insert(p.clone(), n.into());
            }
            out.insert(j.name.clone(), m.into());
        }
        println!("{}", serde_json::Value::Object(out));
    } else {
        print_funnel(&config, &funnel);
    }
    Ok(ExitCode::SUCCESS)
}

fn forget(config_path: &Path, id: &str, compact_after: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let store = open_store(&config)?;
    // Its actions too (before `forget`, which flushes).
    let actions = klantreis::store::OutboxStore::outbox_forget(&store, id)?;
    // And the webhook deliveries and order links that name them.
    let deliveries = klantreis::store::DeliveryStore::forget_deliveries(&store, id)?;
    let existed = store.forget(id)? || actions > 0 || deliveries > 0;
    drop(store);
    if existed {
        println!("forgot customer {id:?}: record, phases and history erased");
        if compact_after {
            let (before, after) = SledStore::compact(&config.store.path, config.store.cache_mb)?;
            println!(
                "store compacted ({} KiB → {} KiB): no bytes of the customer remain on disk",
                before / 1024,
                after / 1024
            );
        } else {
            println!("run `klantreis compact` to remove the erased bytes from disk");
        }
    } else {
        println!("nothing stored for customer {id:?}");
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(config_path: &Path) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let (before, after) = SledStore::compact(&config.store.path, config.store.cache_mb)?;
    println!(
        "store compacted: {} KiB → {} KiB",
        before / 1024,
        after / 1024
    );
    Ok(ExitCode::SUCCESS)
}

fn demo(config_path: &Path, data: &Path, now: DateTime<Utc>) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config)?;
    let store = open_store(&config)?;
    let data = if data.is_relative() {
        config.base_dir.join(data)
    } else {
        data.to_path_buf()
    };
    let data = data.to_string_lossy().into_owned();
    println!(
        "klantreis demo: importing {data} into {}",
        config.store.path.display()
    );
    let report = import_file(&store, &data, None)?;
    print_import(&report, false)?;
    println!("nurture at {}:", klantreis::time::format(now));
    let actions = load_actions(&config)?;
    let (summary, secs) = run_nurture(&store, &rules, actions.as_ref(), &NurtureOptions::at(now))?;
    let report = dispatch_actions(&store, actions.as_ref(), &config, &summary, now, false)?;
    print_summary(&summary, secs, &config, false, false, report.as_ref())?;
    if summary.transition_count() == 0 {
        println!("  (no changes: this store was already nurtured at this time)");
    }
    println!();
    print_funnel(&config, &store.funnel()?);
    println!();
    println!("next: `klantreis explain c0001` shows why a customer is where they are;");
    println!("      `klantreis test` runs the rule tests.");
    Ok(if summary.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The configured actions, compiled (`None` when there are none).
fn load_actions(config: &Config) -> Result<Option<Actions>> {
    if config.actions.is_empty() {
        return Ok(None);
    }
    Ok(Some(Actions::build(config)?))
}

/// Dispatches what is due after a nurture (in a dry run: renders what would be sent).
fn dispatch_actions(
    store: &SledStore,
    actions: Option<&Actions>,
    config: &Config,
    summary: &NurtureSummary,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<Option<outbox::DispatchReport>> {
    let Some(actions) = actions else {
        return Ok(None);
    };
    let opts = outbox::DispatchOptions {
        dry_run,
        ..Default::default()
    };
    let report = outbox::dispatch(
        store,
        actions,
        config,
        clock::from_option(Some(now)),
        &summary.planned,
        &opts,
    )?;
    Ok(Some(report))
}

fn print_dispatch(r: &outbox::DispatchReport, dry_run: bool) {
    if dry_run {
        let n = r.fired.iter().filter(|f| f.outcome == "would_send").count();
        println!("actions that would fire: {n} (nothing sent, nothing written)");
    } else {
        println!(
            "actions: {} done, {} retrying, {} dead, {} skipped, {} cancelled, {} deferred",
            r.done, r.retrying, r.dead, r.skipped, r.cancelled, r.deferred
        );
    }
    // A dry run lists everything; a real run the first lines (`outbox` has them all).
    let shown = if dry_run { r.fired.len() } else { 20 };
    if r.fired.len() > shown {
        println!(
            "  (the first {shown} of {}; `klantreis outbox` lists them all)",
            r.fired.len()
        );
    }
    for f in r.fired.iter().take(shown) {
        println!(
            "  {:<10} {} {} ({}){}",
            f.outcome,
            f.customer,
            f.action,
            f.key,
            f.note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        );
        if dry_run {
            for s in &f.steps {
                println!("      {}", serde_json::to_string(s).unwrap_or_default());
            }
        }
    }
}

fn outbox_cmd(config_path: &Path, cmd: Option<OutboxCmd>, json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let now = clock::from_option(None).now().timestamp();
    let store = match (open_or_service(&config)?, &cmd) {
        (Opened::Store(s), _) => s,
        (Opened::Service(api), None) => {
            let (status, v) = api.get("/api/outbox?limit=1000000")?;
            if status != 200 {
                bail!("{}/api/outbox answered {status}: {v}", api.url);
            }
            let entries: Vec<outbox::Entry> = serde_json::from_value(v["entries"].clone())
                .context("the service's outbox entries")?;
            let counts: std::collections::BTreeMap<String, u64> =
                serde_json::from_value(v["counts"].clone()).unwrap_or_default();
            print_outbox(&entries, &counts, now, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        (Opened::Service(api), Some(_)) => {
            return Err(held_by_service(
                &config,
                &format!(
                    "`outbox retry` changes the store, so it does not go through the service ({}).",
                    api.url
                ),
            ))
        }
    };
    match cmd {
        Some(OutboxCmd::Retry { id: Some(id), .. }) => {
            let e = outbox::retry(&store, &id, now)?;
            println!("{} is pending again (due now)", e.key);
        }
        Some(OutboxCmd::Retry { id: None, dead }) => {
            if !dead {
                bail!("give an outbox id, or --dead for every dead action");
            }
            println!(
                "{} dead action(s) put back",
                outbox::retry_dead(&store, now)?
            );
        }
        None => {
            let entries = outbox::list(&store, None)?;
            let counts = outbox::counts(&store, now)?;
            print_outbox(&entries, &counts, now, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_outbox(
    entries: &[outbox::Entry],
    counts: &std::collections::BTreeMap<String, u64>,
    now: i64,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    for e in entries {
        println!(
            "{:<10} {} {} {} attempts={}{}",
            e.display_state(now),
            e.key,
            e.customer,
            e.action,
            e.attempts,
            e.last_error
                .as_deref()
                .or(e.note.as_deref())
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        );
    }
    let list: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("{} action(s): {}", entries.len(), list.join(", "));
    Ok(())
}

/// `explain`: the actions planned or fired for a customer, and why.
fn print_actions_of(store: &SledStore, id: &str, now: i64) -> Result<()> {
    use klantreis::store::OutboxStore;
    let entries = store.outbox_of(id)?;
    if entries.is_empty() {
        return Ok(());
    }
    println!();
    println!("actions:");
    for e in entries {
        println!(
            "  {} {} [{}] because {} (trigger {}){}{}",
            e.display_state(now),
            e.action,
            e.key,
            e.reason,
            e.trigger,
            e.results
                .get("coupon_code")
                .map(|c| format!("; code {}", c.as_str().unwrap_or("")))
                .unwrap_or_default(),
            e.last_error
                .as_deref()
                .or(e.note.as_deref())
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
