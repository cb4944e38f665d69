//! The outbox benchmark (issue 4): N customers entering koester (the shipped 5K rule)
//! with and without a planned action, then dispatching every action against a fast
//! local webhook fake with the default per-connector concurrency cap.
//!
//! Reports: the nurture time without actions, with actions (planning and writing the
//! outbox entries in the transitions' batches), the added cost per transition, and
//! dispatch throughput in actions per second.
//!
//! Run: `cargo bench --bench outbox -- --customers 100000 [--concurrency 8]`

use chrono::{DateTime, Utc};
use klantreis::actions::Actions;
use klantreis::clock::{FixedClock, SharedClock};
use klantreis::config::Config;
use klantreis::model::{Customer, Event};
use klantreis::nurture::{self, NurtureOptions};
use klantreis::outbox::{self, DispatchOptions};
use klantreis::rules::RuleSet;
use klantreis::store::{SledStore, Store};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: &str = "2026-11-20T12:00:00Z";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_config(dir: &Path, hook_url: &str, with_action: bool, concurrency: usize) -> Config {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::copy(repo.join("rules/5k.rhai"), dir.join("rules/5k.rhai")).unwrap();
    let action = if with_action {
        "[[actions]]\nname = \"loyalty\"\njourney = \"lifecycle\"\nphase = \"koester\"\nwhen = \"customer.total_spent >= 100\"\nkind = \"webhook\"\nconnector = \"hook\"\n"
    } else {
        ""
    };
    let text = format!(
        "[store]\npath = \"data/store\"\ncache_mb = 512\n\n[outbox]\nconcurrency = {concurrency}\nquiet_hours = \"\"\n\n\
         [[journeys]]\nname = \"lifecycle\"\nrules = \"rules/5k.rhai\"\nphases = [\"kijk\", \"kies\", \"koop\", \"krijg\", \"koester\"]\n\n\
         [connectors.hook]\ntype = \"webhook\"\nbase_url = \"{hook_url}\"\nmax_concurrency = {concurrency}\n\n{action}"
    );
    std::fs::write(dir.join("config.toml"), text).unwrap();
    Config::load(&dir.join("config.toml")).unwrap()
}

/// Customers who ordered 40 days ago and had it delivered 35 days ago: koester.
fn customers(n: usize) -> Vec<Customer> {
    (0..n)
        .map(|i| {
            let mut c = Customer::new(format!("c{i:07}"));
            c.attributes
                .insert("email".into(), json!(format!("c{i}@example.com")));
            c.attributes.insert("total_spent".into(), json!(150.0));
            c.attributes.insert("orders_count".into(), json!(1));
            c.events = vec![
                Event {
                    kind: "order_created".into(),
                    at: "2026-10-11T10:00:00Z".into(),
                    data: json!({"order_id": i}),
                },
                Event {
                    kind: "order_fulfilled".into(),
                    at: "2026-10-16T10:00:00Z".into(),
                    data: json!({"order_id": i}),
                },
            ];
            c
        })
        .collect()
}

fn fill(store: &SledStore, n: usize) {
    for chunk in customers(n).chunks(10_000) {
        store.merge_bulk(chunk.to_vec()).unwrap();
    }
    store.flush().unwrap();
}

fn main() {
    let n = arg("--customers", 100_000);
    let concurrency = arg("--concurrency", 8);
    let now: DateTime<Utc> = NOW.parse().unwrap();
    let hook = klantreis::fakes::webhook::start_blocking(Default::default());
    hook.set_recording(false);
    let url = hook.url("/in");

    // Nurture without actions.
    let plain = tempfile::tempdir().unwrap();
    let config = write_config(plain.path(), &url, false, concurrency);
    let rules = RuleSet::load(&config).unwrap();
    let store = SledStore::open(&config.store.path, 512).unwrap();
    fill(&store, n);
    let t = Instant::now();
    let s = nurture::run(&store, &rules, &NurtureOptions::at(now), &|_| {}).unwrap();
    let plain_secs = t.elapsed().as_secs_f64();
    let transitions = s.transition_count();
    drop(store);

    // Nurture with one planned action per transition into koester.
    let with = tempfile::tempdir().unwrap();
    let config = write_config(with.path(), &url, true, concurrency);
    let rules = RuleSet::load(&config).unwrap();
    let actions = Actions::build(&config).unwrap();
    let store = SledStore::open(&config.store.path, 512).unwrap();
    fill(&store, n);
    let t = Instant::now();
    let s = nurture::run_with_actions(
        &store,
        &rules,
        Some(&actions),
        &NurtureOptions::at(now),
        &|_| {},
    )
    .unwrap();
    let with_secs = t.elapsed().as_secs_f64();
    let planned: u64 = s.actions_planned.values().sum();

    // Dispatch everything.
    let clock: SharedClock = Arc::new(FixedClock::new(now));
    let t = Instant::now();
    let r = outbox::dispatch(
        &store,
        &actions,
        &config,
        clock,
        &[],
        &DispatchOptions::default(),
    )
    .unwrap();
    let dispatch_secs = t.elapsed().as_secs_f64();

    let added = with_secs - plain_secs;
    println!("customers: {n}, transitions: {transitions}, actions planned: {planned}");
    println!("nurture without actions: {plain_secs:.2} s");
    println!(
        "nurture with actions:    {with_secs:.2} s  (+{:.1}%, {:.1} µs added per transition)",
        100.0 * added / plain_secs,
        1e6 * added / transitions.max(1) as f64
    );
    println!(
        "dispatch: {} done, {} dead in {dispatch_secs:.2} s = {:.0} actions/s (concurrency {concurrency} per connector)",
        r.done,
        r.dead,
        r.done as f64 / dispatch_secs
    );
}
