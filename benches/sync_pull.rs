//! Benchmark: pull 100,000 contacts from the HubSpot fake, 100 per page, into a sled
//! store on disk, through the shipped `hubspot` definition.
//!
//! Run: `cargo bench --bench sync_pull`. `SYNC_PULL_CONTACTS` sets another size and
//! `SYNC_PULL_CACHE_MB` the store's page cache (default 256, as in config.toml): sled
//! keeps what it writes in that cache, so resident memory grows until the cache is
//! full whatever the connector does; a small cache shows the connector's own share.
//!
//! Prints the contacts per second, the resident memory sampled as the sync goes, and
//! the peak (VmHWM). To show that the engine, not the fake, is what is measured, it
//! first times the fake alone: the same pages fetched with a bare HTTP client and
//! thrown away.

use klantreis::clock::{FixedClock, SharedClock};
use klantreis::config::Config;
use klantreis::connectors::{self, Progress, SyncOptions};
use klantreis::fakes::{hubspot, ContactBook, Faults};
use klantreis::store::{SledStore, Store};
use std::sync::Arc;
use std::time::Instant;

/// A field of /proc/self/status in kB (VmRSS, VmHWM); 0 where there is none.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn main() {
    let n: usize = std::env::var("SYNC_PULL_CONTACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let book = ContactBook::generate(n);
    let fake = hubspot::start_blocking(hubspot::Config {
        contacts: book,
        faults: Faults::default(),
        ..Default::default()
    });
    fake.set_recording(false);

    // The fake alone: every page, fetched and dropped.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fake_secs = rt.block_on(async {
        let client = reqwest::Client::new();
        let started = Instant::now();
        let mut url = fake.url("/crm/v3/objects/contacts?limit=100&archived=false");
        loop {
            let v: serde_json::Value = client
                .get(&url)
                .bearer_auth(hubspot::DEFAULT_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match v["paging"]["next"]["link"].as_str() {
                Some(next) => url = next.to_string(),
                None => break,
            }
        }
        started.elapsed().as_secs_f64()
    });
    drop(rt);

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/a.rhai"), "fn phase(c) { () }\n").unwrap();
    let cache_mb: u64 = std::env::var("SYNC_PULL_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let text = format!(
        "[store]\npath = \"data\"\ncache_mb = {cache_mb}\n\n[[journeys]]\nname = \"j\"\nrules = \"rules/a.rhai\"\nphases = [\"a\"]\n\n\
         [connectors.crm]\ntype = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"{}\"\nrate_per_sec = 0\n",
        fake.base_url,
        hubspot::DEFAULT_TOKEN
    );
    let config = Config::parse(&dir.path().join("config.toml"), &text).unwrap();
    let store = SledStore::open(&config.store.path, config.store.cache_mb).unwrap();
    let clock: SharedClock = Arc::new(FixedClock::new(
        klantreis::time::parse("2026-11-20T12:00:00Z").unwrap(),
    ));

    let rss_before = status_kb("VmRSS:");
    let samples = parking_lot::Mutex::new(Vec::new());
    let progress = |p: Progress<'_>| {
        let step = (n as u64 / 10).max(100);
        if p.fetched % step == 0 {
            samples.lock().push((p.fetched, status_kb("VmRSS:")));
        }
    };
    let started = Instant::now();
    let report = connectors::sync_all_blocking(
        &config,
        &store,
        None,
        &SyncOptions::default(),
        clock,
        &progress,
    )
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let r = &report["crm"];
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.created as usize, n);
    assert_eq!(store.customer_count().unwrap() as usize, n);

    println!("sync_pull: {n} contacts from the HubSpot fake, 100 per page, into sled on disk (cache {cache_mb} MB)");
    println!(
        "  the fake alone:  {:.2} s, {:.0} contacts/s (pages fetched and dropped)",
        fake_secs,
        n as f64 / fake_secs
    );
    println!(
        "  klantreis sync:  {:.2} s, {:.0} contacts/s ({} pages, {} requests)",
        secs,
        n as f64 / secs,
        r.pages,
        r.requests
    );
    println!(
        "  RSS before the sync: {:.1} MB (the fake's {n} contacts included)",
        mb(rss_before)
    );
    for (fetched, kb) in samples.lock().iter() {
        println!("  RSS at {fetched:>7} contacts: {:.1} MB", mb(*kb));
    }
    println!("  peak RSS (VmHWM): {:.1} MB", mb(status_kb("VmHWM:")));
}
