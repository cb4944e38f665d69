//! Webhook benchmark: signed Shopify `orders/create` deliveries, each verified,
//! stored durably (group commit), applied to a new customer and re-evaluated in
//! every shipped journey with the shipped actions planned, against the same load on
//! a bare axum endpoint that does nothing (the ceiling). The load generator is an
//! in-process reqwest client on loopback with N deliveries in flight.
//!
//! `cargo bench --bench webhooks` (env `WEBHOOK_BENCH_N` = deliveries per level,
//! default 20000; `WEBHOOK_BENCH_LEVELS` = comma-separated concurrency levels;
//! `WEBHOOK_BENCH_COMMIT_DELAY_US` = `[server] commit_delay_us`).

use klantreis::fakes::shopify;
use klantreis::server::{AppState, Loaded};
use klantreis::store::SledStore;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The same allocator as the `klantreis` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-secret";

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

struct Prepared {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn deliveries(n: usize, offset: usize) -> Vec<Prepared> {
    let at = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    (0..n)
        .map(|i| {
            let i = i + offset;
            let mut o = shopify::orders_create();
            let email = format!("bench{i}@example.com");
            o["created_at"] = json!(at);
            o["email"] = json!(email);
            o["contact_email"] = json!(email);
            o["customer"]["email"] = json!(email);
            o["customer"]["id"] = json!(1_000_000 + i as u64);
            let d = shopify::Delivery::new("orders/create", &o);
            Prepared {
                headers: d.headers(SECRET),
                body: d.body,
            }
        })
        .collect()
}

/// Sends every delivery with `concurrency` in flight; returns (seconds, sorted latencies).
async fn load(url: &str, batch: Vec<Prepared>, concurrency: usize) -> (f64, Vec<Duration>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let queue = Arc::new(parking_lot::Mutex::new(batch));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let queue = queue.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(p) = queue.lock().pop() else { break };
                let mut rb = client.post(&url);
                for (k, v) in &p.headers {
                    rb = rb.header(k, v);
                }
                let t = Instant::now();
                let r = rb.body(p.body).send().await.expect("request");
                let status = r.status();
                let _ = r.bytes().await;
                lat.push(t.elapsed());
                assert!(status.is_success(), "{status}");
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    (secs, all)
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i].as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::var("WEBHOOK_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let levels: Vec<usize> = std::env::var("WEBHOOK_BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64, 256]);
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo.join("rules"), &dir.path().join("rules"));
    if repo.join("templates").is_dir() {
        copy_dir(&repo.join("templates"), &dir.path().join("templates"));
    }
    let mut config = std::fs::read_to_string(repo.join("config.toml")).unwrap();
    // `WEBHOOK_BENCH_COMMIT_DELAY_US`: how long a group commit gathers writers.
    if let Ok(us) = std::env::var("WEBHOOK_BENCH_COMMIT_DELAY_US") {
        config = config.replace(
            "shutdown_timeout_secs = 10",
            &format!("shutdown_timeout_secs = 10\ncommit_delay_us = {us}"),
        );
    }
    config.push_str(&format!(
        "\n[connectors.shop]\ntype = \"shopify\"\nshop = \"bench\"\ntoken = \"t\"\nwebhook_secret = \"{SECRET}\"\n"
    ));
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let clock = klantreis::clock::from_option(None);
        let loaded = Loaded::load(&config_path, &clock).expect("config loads");
        let store = Arc::new(
            SledStore::open(&loaded.config.store.path, loaded.config.store.cache_mb).unwrap(),
        );
        let state = AppState::new(config_path.clone(), loaded, store, clock, None, None);
        let app = klantreis::server::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let bare = axum::Router::new().route(
            "/webhooks/{instance}",
            axum::routing::post(|_b: axum::body::Bytes| async { "ok" }),
        );
        let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_addr = bare_listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(bare_listener, bare).await.unwrap() });

        println!(
            "webhooks: {n} signed Shopify orders/create per level, each a new customer; {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<28} {:>6} {:>12} {:>9} {:>9} {:>9}",
            "endpoint", "conc", "deliveries/s", "p50 ms", "p99 ms", "max ms"
        );
        let mut offset = 0;
        for &c in &levels {
            // Fewer deliveries when only one is in flight: it is latency-bound.
            let count = if c == 1 { n.min(2_000) } else { n };
            for (name, url) in [
                (
                    "klantreis (durable+eval)",
                    format!("http://{addr}/webhooks/shop"),
                ),
                (
                    "bare axum (ceiling)",
                    format!("http://{bare_addr}/webhooks/shop"),
                ),
            ] {
                let batch = deliveries(count, offset);
                offset += count;
                let (secs, lat) = load(&url, batch, c).await;
                println!(
                    "{:<28} {:>6} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
                    name,
                    c,
                    count as f64 / secs,
                    pct(&lat, 0.50),
                    pct(&lat, 0.99),
                    pct(&lat, 1.0)
                );
            }
        }
    });
}
