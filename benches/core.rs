//! The core benchmark (issue 2): import, first nurture and steady-state nurture of N
//! synthetic customers through the real `klantreis` binary, against a bare loop that
//! evaluates the same 5K rule with a plain Rhai engine over the same customers
//! already in memory, on one thread.
//!
//! Run: `cargo bench --bench core -- --customers 1000000`
//! (default 1,000,000; `--customers 100000` for a quick look).

use klantreis::rules::{register_helpers, RuleSet};
use rhai::{CallFnOptions, Dynamic, Engine, Map, Scope};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The same allocator as the binary, so the bare loop is not handicapped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: &str = "2026-11-20T12:00:00Z";

/// A small deterministic PRNG (xorshift64*), so every run benchmarks the same data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KINDS: &[&str] = &[
    "page_view",
    "page_view",
    "product_view",
    "product_view",
    "search",
    "newsletter_signup",
    "compare",
    "wishlist_add",
    "cart_add",
    "checkout_started",
    "order_created",
    "order_fulfilled",
    "review_submitted",
];

fn iso(secs: i64) -> String {
    klantreis::time::format(chrono::DateTime::from_timestamp(secs, 0).expect("in range"))
}

/// Writes `n` customers (about 6 events each over the last 400 days) as JSON Lines.
fn generate(path: &Path, n: usize) {
    let now = klantreis::time::unix_seconds(NOW).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    for i in 0..n {
        let events = rng.below(12) as usize;
        let mut evs = Vec::with_capacity(events);
        let mut orders = 0;
        let mut spent = 0.0;
        for _ in 0..events {
            let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
            let at = now - rng.below(400 * 86_400) as i64;
            let data = if kind == "order_created" {
                orders += 1;
                let total = (rng.below(20_000) as f64) / 100.0;
                spent += total;
                format!(
                    r#"{{"order_id":"{}","total":{total}}}"#,
                    rng.below(1_000_000)
                )
            } else {
                "{}".to_string()
            };
            evs.push(format!(
                r#"{{"kind":"{kind}","at":"{}","data":{data}}}"#,
                iso(at)
            ));
        }
        writeln!(
            out,
            r#"{{"id":"b{i:07}","email":"klant{i}@example.nl","first_name":"Klant","orders_count":{orders},"total_spent":{spent:.2},"consent_email":{},"tags":["{}"],"events":[{}]}}"#,
            rng.below(2) == 0,
            ["nieuwsbrief", "vip", "sport", "wonen"][rng.below(4) as usize],
            evs.join(",")
        )
        .unwrap();
    }
    out.flush().unwrap();
}

/// A `cart_add` an hour ago for every 100th customer: about 1% change phase.
fn generate_update(path: &Path, n: usize) {
    let at = iso(klantreis::time::unix_seconds(NOW).unwrap() - 3600);
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    for i in (0..n).step_by(100) {
        writeln!(
            out,
            r#"{{"id":"b{i:07}","events":[{{"kind":"cart_add","at":"{at}"}}]}}"#
        )
        .unwrap();
    }
    out.flush().unwrap();
}

/// Peak RSS (MiB) of the largest child process waited for so far.
fn children_peak_mib() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn self_peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn klantreis(dir: &Path, args: &[&str]) -> (f64, String) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_klantreis"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(args)
        .output()
        .expect("run klantreis");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "klantreis {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bare_loop(customers_file: &Path, rule: &Path) -> (f64, usize, [usize; 6]) {
    let mut engine = Engine::new();
    register_helpers(&mut engine);
    let ast = engine
        .compile(std::fs::read_to_string(rule).unwrap())
        .unwrap();
    let f = std::io::BufReader::new(std::fs::File::open(customers_file).unwrap());
    let mut customers: Vec<Map> = Vec::new();
    for line in f.lines() {
        let c =
            klantreis::import::customer_from_json(serde_json::from_str(&line.unwrap()).unwrap())
                .unwrap();
        let mut m = RuleSet::customer_map_of(&c);
        RuleSet::set_phase(&mut m, None);
        customers.push(m);
    }
    let n = customers.len();
    let now = klantreis::time::unix_seconds(NOW).unwrap();
    let phases = ["kijk", "kies", "koop", "krijg", "koester"];
    let mut counts = [0usize; 6];
    let started = Instant::now();
    for m in customers {
        let r: Dynamic = engine
            .call_fn_with_options(
                CallFnOptions::new().with_tag(now).eval_ast(false),
                &mut Scope::new(),
                &ast,
                "phase",
                (Dynamic::from_map(m),),
            )
            .unwrap();
        let s = r.into_string().unwrap_or_default();
        counts[phases.iter().position(|p| *p == s).unwrap_or(5)] += 1;
    }
    (started.elapsed().as_secs_f64(), n, counts)
}

fn main() {
    let mut n: usize = 1_000_000;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--customers") {
        n = args[i + 1].parse().expect("--customers N");
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-core");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("rules")).unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(repo.join("rules/5k.rhai"), root.join("rules/5k.rhai")).unwrap();
    std::fs::write(
        root.join("config.toml"),
        "[store]\npath = \"store\"\n\n[[journeys]]\nname = \"lifecycle\"\nrules = \"rules/5k.rhai\"\n\
         phases = [\"kijk\", \"kies\", \"koop\", \"krijg\", \"koester\"]\n",
    )
    .unwrap();
    println!(
        "klantreis core benchmark: {n} customers, 5K rules, {} cores",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let data = root.join("customers.jsonl");
    let update = root.join("update.jsonl");
    let t = Instant::now();
    generate(&data, n);
    generate_update(&update, n);
    let mib = std::fs::metadata(&data).unwrap().len() as f64 / (1 << 20) as f64;
    println!(
        "generated {mib:.0} MiB of JSON Lines in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let (import_s, _) = klantreis(&root, &["import", data.to_str().unwrap()]);
    println!(
        "import:             {import_s:7.2} s  {:>9.0} customers/s  (target >= 100,000/s)",
        n as f64 / import_s
    );
    let (first_s, first) = klantreis(&root, &["nurture", "--now", NOW, "--json"]);
    println!(
        "first nurture:      {first_s:7.2} s  {:>9.0} customers/s  (target >= 100,000/s)  {}",
        n as f64 / first_s,
        first.trim()
    );
    let (upd_s, _) = klantreis(&root, &["import", update.to_str().unwrap()]);
    println!("import 1% update:   {upd_s:7.2} s");
    let (steady_s, steady) = klantreis(&root, &["nurture", "--now", NOW, "--json"]);
    println!(
        "steady nurture 1%:  {steady_s:7.2} s  {:>9.0} customers/s  {}",
        n as f64 / steady_s,
        steady.trim()
    );
    let (idle_s, _) = klantreis(&root, &["nurture", "--now", NOW, "--json"]);
    println!(
        "steady nurture 0%:  {idle_s:7.2} s  {:>9.0} customers/s",
        n as f64 / idle_s
    );
    let peak = children_peak_mib();
    println!(
        "peak RSS of klantreis (largest of the runs above): {peak:.0} MiB  (target < 1024 MiB)"
    );

    let (bare_s, bare_n, counts) = bare_loop(&data, &root.join("rules/5k.rhai"));
    println!(
        "bare loop (1 thread, plain engine, customers in memory): {bare_s:7.2} s  {:>9.0} customers/s  {:.2} µs/customer  phases {counts:?}",
        bare_n as f64 / bare_s,
        bare_s * 1e6 / bare_n as f64
    );
    println!(
        "bench process peak RSS (holds all customers for the bare loop): {:.0} MiB",
        self_peak_mib()
    );
    println!(
        "steady nurture vs bare loop: {:.2}x the bare loop's time ({})",
        steady_s / bare_s,
        if steady_s <= bare_s {
            "target met"
        } else {
            "TARGET MISSED"
        }
    );
    let store_mib = dir_size(&root.join("store")) as f64 / (1 << 20) as f64;
    println!("store size on disk: {store_mib:.0} MiB");
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}
