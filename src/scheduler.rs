//! The scheduler of `klantreis run`: cron schedules from `[schedule]` in config.toml
//! for `nurture` and for `sync` per connector instance.
//!
//! Expressions are crontab as users know it, parsed by `croner`: 5 fields (or 6 with
//! seconds first), weekdays 1 = Monday and 0 or 7 = Sunday, evaluated in the
//! configured time zone. At the autumn clock change a daily 02:30 job runs once (the
//! first 02:30), and in spring the 02:30 that does not exist runs once, at 03:00.
//!
//! [`Schedule`] is pure (times in, jobs out), so tests drive it with any instant;
//! [`run`] is the loop that reads the one clock, starts due jobs and never lets a
//! job overlap itself. A job missed while the service was down runs once at start
//! (`catch_up = true`, the default); the last run of each job is kept in the store.

use crate::config::{parse_cron, ScheduleSettings};
use crate::server::AppState;
use crate::store::DeliveryStore;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    Nurture,
    /// Sync one connector instance.
    Sync(String),
}

/// One scheduled job.
#[derive(Debug)]
pub struct Job {
    /// `nurture` or `sync:<instance>` (also the key of its last run in the store).
    pub name: String,
    pub kind: JobKind,
    pub expr: String,
    cron: croner::Cron,
    next: Option<DateTime<Utc>>,
}

/// Errors building a schedule (config.toml is checked first, so these are rare).
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule.timezone {0:?} is not an IANA time zone")]
    TimeZone(String),
    #[error("schedule of {job}: {message}")]
    Expression { job: String, message: String },
}

/// Every job with its next run.
#[derive(Debug)]
pub struct Schedule {
    pub tz: Tz,
    pub jobs: Vec<Job>,
}

impl Schedule {
    /// The jobs of `[schedule]`.
    pub fn from_settings(s: &ScheduleSettings) -> Result<Self, ScheduleError> {
        let tz: Tz = s
            .timezone
            .parse()
            .map_err(|_| ScheduleError::TimeZone(s.timezone.clone()))?;
        let mut jobs = Vec::new();
        let mut add = |name: String, kind: JobKind, expr: &str| -> Result<(), ScheduleError> {
            let cron = parse_cron(expr).map_err(|message| ScheduleError::Expression {
                job: name.clone(),
                message,
            })?;
            jobs.push(Job {
                name,
                kind,
                expr: expr.to_string(),
                cron,
                next: None,
            });
            Ok(())
        };
        if let Some(n) = &s.nurture {
            add("nurture".into(), JobKind::Nurture, n)?;
        }
        for (instance, expr) in &s.sync {
            add(
                format!("sync:{instance}"),
                JobKind::Sync(instance.clone()),
                expr,
            )?;
        }
        Ok(Self { tz, jobs })
    }

    /// The first run of job `idx` strictly after `t`.
    pub fn next_after(&self, idx: usize, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.jobs[idx]
            .cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// Plans every job's next run after `now`. Returns the jobs to run at once
    /// because a run fell between their last run (`last`) and `now` (with
    /// `catch_up`); a job that never ran is not caught up.
    pub fn start(
        &mut self,
        now: DateTime<Utc>,
        last: &dyn Fn(&str) -> Option<DateTime<Utc>>,
        catch_up: bool,
    ) -> Vec<usize> {
        let mut missed = Vec::new();
        for idx in 0..self.jobs.len() {
            if catch_up {
                if let Some(l) = last(&self.jobs[idx].name) {
                    if self.next_after(idx, l).is_some_and(|n| n <= now) {
                        missed.push(idx);
                    }
                }
            }
            self.jobs[idx].next = self.next_after(idx, now);
        }
        missed
    }

    /// The jobs due at `now`, each once however many runs it missed; their next run
    /// moves past `now`.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<usize> {
        let mut out = Vec::new();
        for idx in 0..self.jobs.len() {
            if self.jobs[idx].next.is_some_and(|n| n <= now) {
                out.push(idx);
                self.jobs[idx].next = self.next_after(idx, now);
            }
        }
        out
    }

    /// The earliest next run of any job.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        self.jobs.iter().filter_map(|j| j.next).min()
    }
}

/// Runs the schedule until `shutdown` turns true; waits for running jobs to end.
pub async fn run(
    state: Arc<AppState>,
    mut schedule: Schedule,
    catch_up: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let clock = state.clock.clone();
    let store = state.store.clone();
    let last = move |job: &str| {
        store
            .last_run(job)
            .ok()
            .flatten()
            .and_then(|t| crate::time::parse(&t))
    };
    let running: Vec<Arc<AtomicBool>> = schedule
        .jobs
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let now = clock.now();
    let missed = schedule.start(now, &last, catch_up);
    for j in &schedule.jobs {
        tracing::info!(job = %j.name, schedule = %j.expr, next = ?j.next, "job scheduled");
    }
    for idx in missed {
        tracing::info!(job = %schedule.jobs[idx].name, "job missed while the service was down: running it now");
        start_job(&state, &schedule.jobs[idx], &running[idx], &mut tasks);
    }
    loop {
        let now = clock.now();
        for idx in schedule.due(now) {
            start_job(&state, &schedule.jobs[idx], &running[idx], &mut tasks);
        }
        // Wake at the next run, but at least every second, so a clock that is moved
        // (tests) or a suspended machine is noticed.
        let wait = schedule
            .next_wakeup()
            .and_then(|n| (n - clock.now()).to_std().ok())
            .unwrap_or(std::time::Duration::from_secs(1))
            .min(std::time::Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn start_job(
    state: &Arc<AppState>,
    job: &Job,
    running: &Arc<AtomicBool>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    if running.swap(true, Ordering::SeqCst) {
        tracing::warn!(job = %job.name, "job skipped: its previous run is still running");
        metrics::counter!("klantreis_job_skipped_total", "job" => job.name.clone()).increment(1);
        return;
    }
    let state = state.clone();
    let name = job.name.clone();
    let kind = job.kind.clone();
    let running = running.clone();
    tasks.spawn(async move {
        let started_at = state.clock.now();
        let started = std::time::Instant::now();
        let (ok, summary) = run_job(&state, &kind).await;
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("klantreis_job_seconds", "job" => name.clone()).record(secs);
        metrics::counter!("klantreis_job_runs_total", "job" => name.clone(), "outcome" => if ok { "ok" } else { "failed" }).increment(1);
        if ok {
            tracing::info!(job = %name, secs, summary = %summary, "job finished");
        } else {
            tracing::error!(job = %name, secs, summary = %summary, "job failed");
        }
        let at = crate::time::format(started_at);
        let st = state.clone();
        let job_name = name.clone();
        let at2 = at.clone();
        let _ = tokio::task::spawn_blocking(move || st.store.set_last_run(&job_name, &at2)).await;
        state.health.lock().jobs.insert(
            name,
            serde_json::json!({"last_run": at, "ok": ok, "seconds": secs, "summary": summary}),
        );
        running.store(false, Ordering::SeqCst);
    });
}

/// Runs one job; returns whether it succeeded and its summary.
async fn run_job(state: &Arc<AppState>, kind: &JobKind) -> (bool, serde_json::Value) {
    match kind {
        JobKind::Nurture => match state.nurture().await {
            None => (
                true,
                serde_json::json!("skipped: a nurture run was already running"),
            ),
            Some(Ok(s)) => (
                s.errors == 0,
                serde_json::json!({"evaluated": s.evaluated, "transitions": s.transitions, "errors": s.errors}),
            ),
            Some(Err(e)) => (false, serde_json::json!(e.to_string())),
        },
        JobKind::Sync(instance) => {
            let loaded = state.loaded.load_full();
            let started = std::time::Instant::now();
            let r = crate::connectors::sync_all(
                &loaded.config,
                state.store.as_ref(),
                Some(instance),
                &crate::connectors::SyncOptions { full: false },
                state.clock.clone(),
                &|_| {},
            )
            .await;
            metrics::histogram!("klantreis_sync_seconds", "instance" => instance.clone())
                .record(started.elapsed().as_secs_f64());
            match r {
                Ok(report) => {
                    let ok = report.values().all(|r| r.errors == 0);
                    (
                        ok,
                        serde_json::to_value(&report).unwrap_or(serde_json::Value::Null),
                    )
                }
                Err(e) => (false, serde_json::json!(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn utc(s: &str) -> DateTime<Utc> {
        crate::time::parse(s).unwrap()
    }

    fn schedule(expr: &str) -> Schedule {
        Schedule::from_settings(&ScheduleSettings {
            timezone: "Europe/Amsterdam".into(),
            catch_up: true,
            nurture: Some(expr.into()),
            sync: BTreeMap::new(),
        })
        .unwrap()
    }

    /// Every run in (from, to].
    fn runs(s: &Schedule, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = utc(from);
        while let Some(n) = s.next_after(0, t) {
            if n > utc(to) {
                break;
            }
            out.push(n);
            t = n;
        }
        out
    }

    #[test]
    fn weekdays_are_posix_monday_is_one() {
        // Sunday 2026-11-22, 12:00 in Amsterdam (CET, UTC+1).
        let sunday = utc("2026-11-22T11:00:00Z");
        let s = schedule("0 9 * * 1");
        assert_eq!(s.next_after(0, sunday), Some(utc("2026-11-23T08:00:00Z")));
        for sun in ["0 9 * * 0", "0 9 * * 7"] {
            let s = schedule(sun);
            assert_eq!(
                s.next_after(0, sunday),
                Some(utc("2026-11-29T08:00:00Z")),
                "{sun}"
            );
        }
    }

    #[test]
    fn six_fields_take_seconds_first() {
        let s = schedule("30 0 9 * * *");
        assert_eq!(
            s.next_after(0, utc("2026-11-22T11:00:00Z")),
            Some(utc("2026-11-23T08:00:30Z"))
        );
    }

    #[test]
    fn autumn_clock_change_runs_a_daily_0230_job_once() {
        // 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:30 happens twice.
        let s = schedule("30 2 * * *");
        let r = runs(&s, "2026-10-24T12:00:00Z", "2026-10-26T12:00:00Z");
        assert_eq!(
            r,
            vec![utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")],
            "once on the 25th (the first 02:30, CEST), once on the 26th"
        );
    }

    #[test]
    fn spring_clock_change_runs_the_skipped_0230_once() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
        let s = schedule("30 2 * * *");
        let r = runs(&s, "2026-03-28T12:00:00Z", "2026-03-30T12:00:00Z");
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            r[0],
            utc("2026-03-29T01:00:00Z"),
            "at 03:00 CEST, right after the gap"
        );
        assert_eq!(r[1], utc("2026-03-30T00:30:00Z"));
    }

    #[test]
    fn due_jobs_run_once_however_many_runs_were_missed() {
        let clock = crate::clock::FixedClock::new(utc("2026-11-20T10:07:00Z"));
        use crate::clock::Clock;
        let mut s = schedule("*/15 * * * *");
        assert!(s.start(clock.now(), &|_| None, true).is_empty());
        clock.set(utc("2026-11-20T10:14:59Z"));
        assert!(s.due(clock.now()).is_empty());
        clock.set(utc("2026-11-20T10:15:00Z"));
        assert_eq!(s.due(clock.now()), vec![0]);
        assert!(s.due(clock.now()).is_empty(), "not twice for one run");
        clock.set(utc("2026-11-20T11:20:00Z"));
        assert_eq!(s.due(clock.now()), vec![0], "four missed runs run once");
        assert_eq!(s.next_wakeup(), Some(utc("2026-11-20T11:30:00Z")));
    }

    #[test]
    fn config_checks_zone_expressions_and_instances() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/a.rhai"), "fn phase(c) { () }").unwrap();
        let journey = "[[journeys]]\nname = \"j\"\nrules = \"rules/a.rhai\"\nphases = [\"a\"]\n";
        let parse = |schedule: &str| {
            crate::config::Config::parse(
                &dir.path().join("config.toml"),
                &format!("{journey}{schedule}"),
            )
        };
        let ok = parse("[schedule]\nnurture = \"30 2 * * 1-5\"\n").unwrap();
        assert_eq!(ok.schedule.timezone, "Europe/Amsterdam");
        assert!(ok.schedule.catch_up);
        let err = parse(
            "[schedule]\ntimezone = \"Mars/Olympus\"\nnurture = \"61 * * * *\"\n[schedule.sync]\ncrm = \"* * * * *\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Mars/Olympus"), "{err}");
        assert!(err.contains("\"61 * * * *\""), "{err}");
        assert!(err.contains("\"crm\""), "{err}");
        assert!(
            err.contains("config.toml:7:"),
            "positions point at the value: {err}"
        );
        let err = parse("[server]\nlisten = \"x\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("colour"),
            "unknown [server] keys are errors: {err}"
        );
    }

    #[test]
    fn a_run_missed_while_down_runs_once_at_start() {
        let mut s = schedule("30 2 * * *");
        let now = utc("2026-11-20T10:00:00Z");
        let last = |_: &str| Some(utc("2026-11-19T01:30:00Z"));
        assert_eq!(s.start(now, &last, true), vec![0]);
        let mut s = schedule("30 2 * * *");
        assert!(s.start(now, &last, false).is_empty(), "catch_up = false");
        let mut s = schedule("30 2 * * *");
        let recent = |_: &str| Some(utc("2026-11-20T01:30:00Z"));
        assert!(s.start(now, &recent, true).is_empty());
    }
}
