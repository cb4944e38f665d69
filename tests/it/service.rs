//! `klantreis run`: the real binary on 127.0.0.1:0 with a temp store, fed real signed
//! deliveries from the vendor fakes. Deadlines only bound polling; nothing asserts
//! on how long anything took.

use crate::support::Sandbox;
use klantreis::fakes::{shopify, woocommerce};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-admin-token";
const SHOP_SECRET: &str = "shop-secret";
const WOO_SECRET: &str = "woo-secret";
const HOOK_SECRET: &str = "whsec_test";

/// The instances the tests append to the shipped config.
fn service_config() -> String {
    format!(
        r#"
[connectors.shop]
type = "shopify"
shop = "test"
token = "shpat_test"
webhook_secret = "{SHOP_SECRET}"

[connectors.woo]
type = "woocommerce"
url = "https://shop.example"
consumer_key = "ck_test"
consumer_secret = "cs_test"
webhook_secret = "{WOO_SECRET}"

[connectors.hook]
type = "webhook"
url = "https://hooks.example"
secret = "{HOOK_SECRET}"

[[actions]]
name = "order-thanks"
journey = "decision"
phase = "purchase"
trigger = "enter"
kind = "log"
"#
    )
}

/// The shipped config and rules with the test instances, a 64 KiB body limit, and
/// the admin token from the environment, or none.
fn sandbox(admin: bool) -> Sandbox {
    let sb = Sandbox::shipped();
    let templates = crate::support::repo().join("templates");
    if templates.is_dir() {
        crate::support::copy_dir(&templates, &sb.path().join("templates"));
    }
    let shipped = std::fs::read_to_string(sb.config()).unwrap();
    let token_line = "admin_token = \"${KLANTREIS_ADMIN_TOKEN}\"";
    let limit_line = "max_body_bytes = 1048576";
    assert!(shipped.contains(token_line) && shipped.contains(limit_line));
    let mut text = shipped
        .replace(token_line, if admin { token_line } else { "" })
        .replace(limit_line, "max_body_bytes = 65536");
    text.push_str(&service_config());
    sb.write("config.toml", &text);
    sb
}

/// A running `klantreis run`.
struct Service {
    child: Child,
    log: std::path::PathBuf,
    base: String,
    client: reqwest::Client,
}

impl Service {
    fn start(sb: &Sandbox) -> Service {
        let log = std::fs::File::create(sb.path().join("service.log")).unwrap();
        let mut child = Command::new(crate::support::bin())
            .arg("--config")
            .arg(sb.config())
            .args(["run", "--listen", "127.0.0.1:0"])
            .current_dir(sb.path())
            .env("KLANTREIS_ADMIN_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn klantreis run");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("the service prints its address")
            .unwrap();
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        Service {
            child,
            log: sb.path().join("service.log"),
            base,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut rb = self.client.get(self.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// SIGTERM, and the exit code.
    fn stop(mut self) -> i32 {
        // SAFETY: signalling our own child process by its id.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if !status.success() {
                    eprintln!(
                        "service ended with {status:?}; its log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the service did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

async fn body_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A fresh `orders/create` for a new customer, ordered an hour ago.
fn new_order(email: &str, customer_id: u64) -> Value {
    let mut o = shopify::orders_create();
    let at = chrono::Utc::now() - chrono::Duration::hours(1);
    o["created_at"] = json!(at.to_rfc3339());
    o["email"] = json!(email);
    o["contact_email"] = json!(email);
    o["customer"]["email"] = json!(email);
    o["customer"]["id"] = json!(customer_id);
    o
}

fn phase_of(explained: &Value, journey: &str) -> Option<String> {
    explained["journeys"]
        .as_array()?
        .iter()
        .find(|j| j["journey"] == journey)?["phase"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_shopify_order_moves_a_new_customer_and_a_retry_changes_nothing() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let hook = svc.url("/webhooks/shop");
    let d = shopify::Delivery::new("orders/create", &new_order("ann@example.com", 42));
    let (status, v) = body_json(d.send(&hook, SHOP_SECRET).await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "accepted");
    assert_eq!(v["customer"], "shop:42");
    let transitions = v["transitions"].as_array().unwrap().clone();
    assert!(!transitions.is_empty(), "re-evaluated at once: {v}");

    let (status, x) = svc.get("/api/customers/shop:42", Some(TOKEN)).await;
    assert_eq!(status, 200, "{x}");
    assert_eq!(x["customer"]["email"], "ann@example.com");
    assert_eq!(x["customer"]["shopify_id"], "42");
    assert_eq!(x["customer"]["events"][0]["kind"], "order_created");
    // The order is an hour old: the decision journey has them in purchase.
    assert_eq!(phase_of(&x, "decision").as_deref(), Some("purchase"), "{x}");
    let history_len = |x: &Value| {
        x["journeys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["history"].as_array().unwrap().len())
            .sum::<usize>()
    };
    let before = history_len(&x);
    assert_eq!(before, transitions.len());
    // The action of entering purchase is in the outbox, and the dispatcher sends it.
    let thanks = |o: &Value| -> Vec<Value> {
        o["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "order-thanks" && e["customer"] == "shop:42")
            .cloned()
            .collect()
    };
    let (status, o) = svc.get("/api/outbox", Some(TOKEN)).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(thanks(&o).len(), 1, "{o}");
    poll("the action to be sent", || async {
        let (_, o) = svc.get("/api/outbox", Some(TOKEN)).await;
        thanks(&o).first().is_some_and(|e| e["state"] == "done")
    })
    .await;

    // The same delivery again (Shopify's retry): accepted, nothing changes.
    let (status, v) = body_json(d.send(&hook, SHOP_SECRET).await.unwrap()).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("duplicate")));
    let (_, x) = svc.get("/api/customers/shop:42", Some(TOKEN)).await;
    assert_eq!(history_len(&x), before);
    assert_eq!(x["customer"]["events"].as_array().unwrap().len(), 1);
    let (_, o) = svc.get("/api/outbox", Some(TOKEN)).await;
    assert_eq!(thanks(&o).len(), 1, "no second action: {o}");

    // The "Events" form without the X- prefix; the same person by email.
    let mut f = new_order("ANN@example.com ", 42);
    f["fulfillments"] = json!([{"created_at": chrono::Utc::now().to_rfc3339()}]);
    let d2 = shopify::Delivery::new("orders/fulfilled", &f);
    let mut rb = reqwest::Client::new().post(&hook);
    for (k, v) in d2.headers_unprefixed(SHOP_SECRET) {
        rb = rb.header(k, v);
    }
    let (status, v) = body_json(rb.body(d2.body.clone()).send().await.unwrap()).await;
    assert_eq!(
        (status, v["customer"].as_str()),
        (200, Some("shop:42")),
        "{v}"
    );

    // A refund names only the order; it reaches the customer through it.
    let d3 = shopify::Delivery::new("refunds/create", &shopify::refunds_create());
    let (status, v) = body_json(d3.send(&hook, SHOP_SECRET).await.unwrap()).await;
    assert_eq!(
        (status, v["customer"].as_str()),
        (200, Some("shop:42")),
        "{v}"
    );

    assert_eq!(svc.stop(), 0, "SIGTERM exits cleanly");
    // After shutdown the CLI reads the same store.
    let out = sb.run(&["explain", "shop:42", "--json"]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let x: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = x["customer"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"order_fulfilled") && kinds.contains(&"order_refunded"),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn woocommerce_ping_and_guest_order() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let hook = svc.url("/webhooks/woo");
    let r = woocommerce::send_ping(&hook, 17).await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "the creation ping gets exactly 200"
    );
    let (_, funnel) = svc.get("/api/funnel", Some(TOKEN)).await;
    assert_eq!(total(&funnel), 0, "the ping stores nothing");

    let mut order = woocommerce::order_created();
    order["date_created_gmt"] = json!((chrono::Utc::now() - chrono::Duration::hours(2))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string());
    let d = woocommerce::Delivery::new("order.created", 17, &order);
    let (status, v) = body_json(d.send(&hook, WOO_SECRET).await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["customer"], "woo:john.doe@example.com",
        "a guest, by billing email"
    );
    let mut done = order.clone();
    done["status"] = json!("completed");
    done["date_completed_gmt"] = json!(chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string());
    let d = woocommerce::Delivery::new("order.updated", 17, &done);
    let (status, v) = body_json(d.send(&hook, WOO_SECRET).await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    let (_, x) = svc
        .get("/api/customers/woo:john.doe@example.com", Some(TOKEN))
        .await;
    let kinds: Vec<&str> = x["customer"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["order_created", "order_fulfilled"],
        "completed means delivered"
    );
    assert_eq!(svc.stop(), 0);
}

fn total(funnel: &Value) -> u64 {
    funnel
        .as_object()
        .map(|j| {
            j.values()
                .flat_map(|p| p.as_object().unwrap().values())
                .map(|n| n.as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_a_json_reason_and_stores_nothing() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let c = reqwest::Client::new();
    let shop = svc.url("/webhooks/shop");
    let order = new_order("bob@example.com", 7);
    let d = shopify::Delivery::new("orders/create", &order);
    let send = |headers: Vec<(String, String)>, body: Vec<u8>, url: String| {
        let c = c.clone();
        async move {
            let mut rb = c.post(url);
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            body_json(rb.body(body).send().await.unwrap()).await
        }
    };
    let mut cases: Vec<(&str, (u16, Value), u16, &str)> = Vec::new();
    // No signature.
    let no_sig: Vec<_> = d
        .headers(SHOP_SECRET)
        .into_iter()
        .filter(|(k, _)| k != "X-Shopify-Hmac-Sha256")
        .collect();
    cases.push((
        "missing signature",
        send(no_sig, d.body.clone(), shop.clone()).await,
        401,
        "bad_signature",
    ));
    cases.push((
        "wrong secret",
        send(d.headers("not-the-secret"), d.body.clone(), shop.clone()).await,
        401,
        "bad_signature",
    ));
    // A body changed after signing.
    let mut tampered = d.body.clone();
    tampered.extend_from_slice(b" ");
    cases.push((
        "tampered body",
        send(d.headers(SHOP_SECRET), tampered, shop.clone()).await,
        401,
        "bad_signature",
    ));
    // Signed, but not JSON.
    let bad = b"{not json".to_vec();
    let mut h = d.headers(SHOP_SECRET);
    for (k, v) in h.iter_mut() {
        if k == "X-Shopify-Hmac-Sha256" {
            *v = shopify::sign(&bad, SHOP_SECRET);
        }
    }
    cases.push((
        "malformed JSON",
        send(h, bad, shop.clone()).await,
        400,
        "malformed_json",
    ));
    cases.push((
        "unknown instance",
        send(
            d.headers(SHOP_SECRET),
            d.body.clone(),
            svc.url("/webhooks/nope"),
        )
        .await,
        404,
        "unknown_instance",
    ));
    let big = vec![b' '; 70_000];
    cases.push((
        "body over the limit",
        send(d.headers(SHOP_SECRET), big, shop.clone()).await,
        413,
        "body_too_large",
    ));
    let r = c.get(&shop).send().await.unwrap();
    cases.push((
        "wrong method",
        body_json(r).await,
        405,
        "method_not_allowed",
    ));
    // Stripe-style: a stale (replayed) timestamp, and a bad v1.
    let body = br#"{"id":"evt_1","type":"customer.signed_up","email":"eve@example.com"}"#.to_vec();
    let stale_t = chrono::Utc::now().timestamp() - 3600;
    let sig = |t: i64, secret: &str| {
        let mut payload = format!("{t}.").into_bytes();
        payload.extend_from_slice(&body);
        format!(
            "t={t},v1={}",
            klantreis::fakes::webhook::sign_hex(&payload, secret)
        )
    };
    cases.push((
        "stale timestamp",
        send(
            vec![("Webhook-Signature".into(), sig(stale_t, HOOK_SECRET))],
            body.clone(),
            svc.url("/webhooks/hook"),
        )
        .await,
        401,
        "stale_timestamp",
    ));
    let now_t = chrono::Utc::now().timestamp();
    cases.push((
        "bad v1",
        send(
            vec![("Webhook-Signature".into(), sig(now_t, "other"))],
            body.clone(),
            svc.url("/webhooks/hook"),
        )
        .await,
        401,
        "bad_signature",
    ));
    for (name, (status, v), want_status, want_reason) in &cases {
        assert_eq!(*status, *want_status, "{name}: {v}");
        assert_eq!(v["error"], *want_reason, "{name}: {v}");
        assert!(v["message"].is_string(), "{name}: {v}");
    }
    let (_, funnel) = svc.get("/api/funnel", Some(TOKEN)).await;
    assert_eq!(total(&funnel), 0, "nothing stored: {funnel}");
    let (status, _) = svc.get("/api/customers/shop:7", Some(TOKEN)).await;
    assert_eq!(status, 404);
    // The same Stripe-style delivery, fresh and with a rotated secret's v1 first: accepted.
    let both = format!("{},v1=deadbeef", sig(now_t, HOOK_SECRET));
    let (status, v) = send(
        vec![("Webhook-Signature".into(), both)],
        body.clone(),
        svc.url("/webhooks/hook"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["customer"], "hook:eve@example.com");
    let (status, m) = svc.get("/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let m = m.as_str().unwrap().to_string();
    assert!(
        m.contains("klantreis_webhooks_refused_total{reason=\"bad_signature\"}"),
        "{m}"
    );
    assert!(m.contains("klantreis_webhooks_accepted_total"), "{m}");
    assert_eq!(svc.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_right_after_the_answer_loses_nothing() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let hook = svc.url("/webhooks/shop");
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let d = shopify::Delivery::new(
            "orders/create",
            &new_order(&format!("k{i}@example.com"), 1000 + i),
        );
        let (status, _) = body_json(d.send(&hook, SHOP_SECRET).await.unwrap()).await;
        assert_eq!(status, 200);
        ids.push(format!("shop:{}", 1000 + i));
    }
    svc.kill9();
    for id in ids {
        let out = sb.run(&["explain", &id, "--json"]);
        assert!(
            out.status.success(),
            "{id}: {}",
            crate::support::stderr(&out)
        );
        let x: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            phase_of(&x, "decision").is_some(),
            "{id}: phase recorded: {x}"
        );
    }
}

async fn poll<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service_transition(v: &Value) -> Value {
    v["transitions"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["journey"] == "service"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_edits_while_running_good_taken_broken_refused() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let (_, h) = svc.get("/healthz", None).await;
    let v0 = h["rules"]["versions"]["service"].clone();

    // A good edit: everyone with a `ticket` event is in "melding".
    sb.write(
        "rules/service.rhai",
        "fn phase(customer) { if count_events(customer, \"ticket\") > 0 { \"melding\" } else { () } }\n",
    );
    poll("the good edit", || async {
        let (_, h) = svc.get("/healthz", None).await;
        h["rules"]["versions"]["service"] != v0
    })
    .await;
    let (status, v) = svc
        .post_json("/api/customers/t1/events", &json!({"kind": "ticket"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let t = service_transition(&v);
    assert_eq!(t["to"], "melding", "{v}");
    let (_, h) = svc.get("/healthz", None).await;
    let v1 = h["rules"]["versions"]["service"].clone();
    assert_eq!(t["rules_version"], v1, "transitions carry the new version");

    // A broken edit: refused, the old rules go on answering, /healthz says why.
    sb.write("rules/service.rhai", "fn phase(customer) { if \n");
    poll("the refused edit in /healthz", || async {
        let (_, h) = svc.get("/healthz", None).await;
        h["rules"]["reload_error"].is_string()
    })
    .await;
    let (_, h) = svc.get("/healthz", None).await;
    assert_eq!(h["status"], "degraded");
    assert!(
        h["rules"]["reload_error"]
            .as_str()
            .unwrap()
            .contains("service.rhai"),
        "{h}"
    );
    assert_eq!(h["rules"]["versions"]["service"], v1);
    let (status, v) = svc
        .post_json("/api/customers/t2/events", &json!({"kind": "ticket"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        service_transition(&v)["to"],
        "melding",
        "old rules answer: {v}"
    );
    let (_, m) = svc.get("/metrics", Some(TOKEN)).await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("klantreis_rules_reloads_total{outcome=\"failed\"}"),
        "{m}"
    );
    assert_eq!(svc.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_metrics_need_the_token_and_are_off_without_one() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    for path in ["/metrics", "/api/funnel", "/api/customers/x"] {
        let (status, v) = svc.get(path, None).await;
        assert_eq!(
            (status, &v["error"]),
            (401, &json!("unauthorized")),
            "{path}"
        );
        let (status, _) = svc.get(path, Some("wrong")).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = svc.get("/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, v) = svc.post_json("/api/nurture", &json!({})).await;
    assert!(status == 202 || status == 409, "{status} {v}");
    let (status, v) = svc.get("/healthz", None).await;
    assert_eq!((status, &v["status"]), (200, &json!("ok")));
    assert_eq!(svc.stop(), 0);

    let sb = sandbox(false);
    let svc = Service::start(&sb);
    for path in ["/metrics", "/api/funnel"] {
        let (status, v) = svc.get(path, Some(TOKEN)).await;
        assert_eq!(
            (status, &v["error"]),
            (403, &json!("admin_api_disabled")),
            "{path}"
        );
    }
    // While the service holds the store, the CLI says so and how to reach it.
    let out = sb.run(&["funnel"]);
    assert!(!out.status.success());
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("held by the running klantreis service"),
        "{err}"
    );
    assert_eq!(svc.stop(), 0);
}

/// `klantreis ARGS` against the sandbox, with `token` as KLANTREIS_ADMIN_TOKEN.
fn cli_with_token(sb: &Sandbox, args: &[&str], token: &str) -> std::process::Output {
    Command::new(crate::support::bin())
        .arg("--config")
        .arg(sb.config())
        .args(args)
        .current_dir(sb.path())
        .env("KLANTREIS_ADMIN_TOKEN", token)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn read_commands_go_through_the_running_service() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let (status, v) = svc
        .post_json(
            "/api/customers/ann/events",
            &json!({"attributes": {"email": "ann@example.com"},
                    "events": [{"kind": "order_created", "at": "2026-11-20T10:00:00Z", "data": {"order_id": "1"}}]}),
        )
        .await;
    assert!(status < 300, "{status} {v}");
    let (_, api_funnel) = svc.get("/api/funnel", Some(TOKEN)).await;
    let address = std::fs::read_to_string(sb.path().join("data/klantreis.service")).unwrap();
    assert_eq!(address.trim(), svc.base);

    // The store is held by the service; read commands ask it instead.
    let out = cli_with_token(&sb, &["funnel", "--json"], TOKEN);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let cli_funnel: Value = serde_json::from_str(&crate::support::stdout(&out)).unwrap();
    assert_eq!(cli_funnel, api_funnel);
    assert!(total(&cli_funnel) >= 1);

    let out = cli_with_token(&sb, &["funnel"], TOKEN);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(crate::support::stdout(&out).contains("lifecycle"));

    let out = cli_with_token(&sb, &["explain", "ann", "--json"], TOKEN);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let x: Value = serde_json::from_str(&crate::support::stdout(&out)).unwrap();
    assert_eq!(x["id"], "ann");
    let out = cli_with_token(&sb, &["explain", "nobody", "--json"], TOKEN);
    assert_eq!(out.status.code(), Some(1));

    let out = cli_with_token(&sb, &["outbox", "--json"], TOKEN);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let entries: Value = serde_json::from_str(&crate::support::stdout(&out)).unwrap();
    assert!(entries.is_array(), "{entries}");

    // Commands that change the store do not go through the service: they say why.
    let out = cli_with_token(&sb, &["outbox", "retry", "--dead"], TOKEN);
    assert!(!out.status.success());
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("held by the running klantreis service"),
        "{err}"
    );
    assert!(err.contains("changes the store"), "{err}");

    // A wrong token is refused with a clear message, not a lock error.
    let out = cli_with_token(&sb, &["funnel"], "wrong");
    assert!(!out.status.success());
    assert!(
        crate::support::stderr(&out).contains("refused"),
        "{}",
        crate::support::stderr(&out)
    );

    assert_eq!(svc.stop(), 0);
    // Stopped: the address file is gone and the CLI opens the store itself.
    assert!(!sb.path().join("data/klantreis.service").exists());
    let out = cli_with_token(&sb, &["funnel", "--json"], TOKEN);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let local: Value = serde_json::from_str(&crate::support::stdout(&out)).unwrap();
    assert_eq!(local, api_funnel);
}

#[test]
fn openapi_describes_every_route_and_nothing_else() {
    let text = std::fs::read_to_string(crate::support::repo().join("openapi.yaml")).unwrap();
    let mut in_paths = false;
    let mut path = String::new();
    let mut spec: Vec<(String, String)> = Vec::new();
    let mut responses = 0;
    for line in text.lines() {
        if line.starts_with("paths:") {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = false;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            let m = m.trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                spec.push((m.to_string(), path.clone()));
            }
        } else if line.trim() == "responses:" {
            responses += 1;
        }
    }
    let mut routes: Vec<(String, String)> = klantreis::server::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    spec.sort();
    assert_eq!(spec, routes, "openapi.yaml and the router differ");
    assert_eq!(
        responses,
        routes.len(),
        "every operation lists its responses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mollie_webhook_fetches_the_payment_and_dedupes_per_status() {
    use klantreis::fakes::mollie;
    let mut paid = mollie::Payment::new("tr_5B8cwPMGnU6qLbRvo7qEZo", "paid", "45.00", "EUR");
    paid.metadata = json!({"email": "pay@example.com"});
    let fake = mollie::start(mollie::Config {
        payments: vec![paid],
        ..Default::default()
    })
    .await;
    let sb = sandbox(true);
    crate::support::copy_dir(
        &crate::support::repo().join("connectors"),
        &sb.path().join("connectors"),
    );
    let mut text = std::fs::read_to_string(sb.config()).unwrap();
    text.push_str(&format!(
        "\n[connectors.pay]\ntype = \"mollie\"\napi_key = \"{}\"\nbase_url = \"{}\"\n",
        mollie::DEFAULT_API_KEY,
        fake.base_url
    ));
    sb.write("config.toml", &text);
    let svc = Service::start(&sb);
    let hook = svc.url("/webhooks/pay");
    let r = mollie::send_webhook(&hook, "tr_5B8cwPMGnU6qLbRvo7qEZo")
        .await
        .unwrap();
    let (status, v) = body_json(r).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["topic"], "payment.paid");
    assert_eq!(v["customer"], "pay:pay@example.com");
    assert_eq!(
        fake.requests_to("/v2/payments/tr_5B8cwPMGnU6qLbRvo7qEZo")
            .len(),
        1
    );
    let r = mollie::send_webhook(&hook, "tr_5B8cwPMGnU6qLbRvo7qEZo")
        .await
        .unwrap();
    let (_, v) = body_json(r).await;
    assert_eq!(v["status"], "duplicate", "same payment, same status");
    let (_, x) = svc
        .get("/api/customers/pay:pay@example.com", Some(TOKEN))
        .await;
    assert_eq!(x["customer"]["events"][0]["kind"], "payment_paid", "{x}");
    let r = mollie::send_webhook(&hook, "tr_unknown").await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "an id Mollie does not know");
    assert_eq!(svc.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_on_a_webhook_is_405_with_a_reason_and_counted() {
    let sb = sandbox(true);
    let svc = Service::start(&sb);
    let r = reqwest::Client::new()
        .get(svc.url("/webhooks/shop"))
        .send()
        .await
        .unwrap();
    let (status, v) = body_json(r).await;
    assert_eq!(status, 405, "{v}");
    assert_eq!(v["error"], "method_not_allowed", "{v}");
    assert!(v["message"].is_string(), "{v}");
    let (status, m) = svc.get("/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let m = m.as_str().unwrap().to_string();
    assert!(
        m.contains("klantreis_webhooks_refused_total{reason=\"method_not_allowed\"} 1"),
        "{m}"
    );
    assert_eq!(svc.stop(), 0);
}

/// A shop klantreis has no code for: its webhooks are described in TOML only.
const ACME_DEFINITION: &str = r#"
description = "Acme Shop: webhooks only"
base_url = "https://acme.example"

[params.webhook_secret]
secret = true
help = "the key that signs Acme's webhooks"

[webhooks]
signature = { scheme = "hmac_sha256_base64", header = "X-Acme-Signature" }
delivery_id = { header = "X-Acme-Delivery" }
topic = { path = "event", default = "unknown" }

[webhooks.topics."order.placed"]
email = ["buyer.mail", "contact.mail"]
source_id = { path = "buyer.ref", transform = "last_segment" }
order_id = "order.number"
[webhooks.topics."order.placed".attributes]
first_name = "buyer.given_name"
total_spent = { path = "buyer.lifetime_value", type = "number" }
orders_count = { path = "buyer.orders", type = "integer" }
vip = { path = "buyer.vip", type = "bool" }
[[webhooks.topics."order.placed".events]]
kind = "order_created"
time = ["order.placed_at", "order.created"]
data = { order_id = "order.number", total = { path = "order.total", type = "number" } }
[[webhooks.topics."order.placed".events]]
when = { path = "order.gift", equals = "yes" }
kind = "gift_{order.channel}"
time = "order.placed_at"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shop_is_supported_by_writing_its_webhooks_in_toml() {
    let sb = sandbox(true);
    sb.write("connectors/acmeshop.toml", ACME_DEFINITION);
    let mut text = std::fs::read_to_string(sb.config()).unwrap();
    text.push_str("\n[connectors.acme]\ntype = \"acmeshop\"\nwebhook_secret = \"acme-secret\"\n");
    sb.write("config.toml", &text);
    let out = sb.run(&["check"]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));

    let svc = Service::start(&sb);
    let placed = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let body = serde_json::to_vec(&json!({
        "event": "order.placed",
        "buyer": {"mail": "Zoe@Example.com", "ref": "acme/buyers/981", "given_name": "Zoe",
                  "lifetime_value": "310.50", "orders": 3, "vip": "true"},
        "order": {"number": 5001, "placed_at": placed, "total": "99.95", "gift": "yes", "channel": "web.app"}
    }))
    .unwrap();
    let post = |body: Vec<u8>, secret: &str, delivery: &str| {
        reqwest::Client::new()
            .post(svc.url("/webhooks/acme"))
            .header("X-Acme-Signature", shopify::sign(&body, secret))
            .header("X-Acme-Delivery", delivery)
            .body(body)
            .send()
    };
    let (status, v) = body_json(post(body.clone(), "wrong", "d1").await.unwrap()).await;
    assert_eq!((status, &v["error"]), (401, &json!("bad_signature")), "{v}");
    let (status, v) = body_json(post(body.clone(), "acme-secret", "d1").await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["topic"], "order.placed");
    assert_eq!(v["customer"], "acme:981", "the source id, its last segment");

    let (status, x) = svc.get("/api/customers/acme:981", Some(TOKEN)).await;
    assert_eq!(status, 200, "{x}");
    let c = &x["customer"];
    assert_eq!(c["email"], "zoe@example.com");
    assert_eq!(c["acmeshop_id"], "981");
    assert_eq!(c["first_name"], "Zoe");
    assert_eq!(c["total_spent"], json!(310.5));
    assert_eq!(c["orders_count"], json!(3));
    assert_eq!(c["vip"], json!(true));
    let events = c["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["order_created", "gift_web_app"], "{c}");
    assert_eq!(
        events[0]["data"],
        json!({"order_id": "5001", "total": 99.95})
    );
    assert_eq!(phase_of(&x, "decision").as_deref(), Some("purchase"), "{x}");

    // The same delivery again: a duplicate; a topic the definition does not map is
    // accepted and ignored.
    let (_, v) = body_json(post(body, "acme-secret", "d1").await.unwrap()).await;
    assert_eq!(v["status"], "duplicate", "{v}");
    let other = serde_json::to_vec(&json!({"event": "stock.changed"})).unwrap();
    let (status, v) = body_json(post(other, "acme-secret", "d2").await.unwrap()).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("ignored")),
        "{v}"
    );
    // A delivery without its id header is refused.
    let r = reqwest::Client::new()
        .post(svc.url("/webhooks/acme"))
        .header("X-Acme-Signature", shopify::sign(b"{}", "acme-secret"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, v) = body_json(r).await;
    assert_eq!((status, &v["error"]), (400, &json!("bad_request")), "{v}");
    assert_eq!(svc.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_definition_has_no_webhooks_is_404() {
    let sb = sandbox(true);
    let mut text = std::fs::read_to_string(sb.config()).unwrap();
    text.push_str("\n[connectors.mail]\ntype = \"brevo\"\napi_key = \"xkeysib-test\"\nsender_email = \"noreply@shop.example\"\n");
    sb.write("config.toml", &text);
    let svc = Service::start(&sb);
    let r = reqwest::Client::new()
        .post(svc.url("/webhooks/mail"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, v) = body_json(r).await;
    assert_eq!(
        (status, &v["error"]),
        (404, &json!("unknown_instance")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("no [webhooks]"),
        "{v}"
    );
    assert_eq!(svc.stop(), 0);
}
