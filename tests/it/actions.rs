//! Actions through the outbox (issue 4): each kind's exact request against the
//! vendor fakes, faults (500, 429, timeouts, refused connections), exactly once under
//! repeated runs and SIGKILL, re-entry, and one test per guard that fails without it.

use chrono::{DateTime, Duration, Utc};
use klantreis::actions::Actions;
use klantreis::clock::{FixedClock, SharedClock};
use klantreis::config::Config;
use klantreis::fakes::{self, Faults};
use klantreis::model::Customer;
use klantreis::nurture::{self, NurtureOptions};
use klantreis::outbox::{self, DispatchOptions, State};
use klantreis::rules::RuleSet;
use klantreis::store::{OutboxStore, SledStore, Store};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

const T0: &str = "2026-11-20T12:00:00Z";

fn t0() -> DateTime<Utc> {
    T0.parse().unwrap()
}

/// A journey whose phase is the customer's `stage` attribute, so tests move
/// customers by hand.
const RULE: &str = "fn phase(c) { if c.stage == () { return (); } c.stage }\n";

struct World {
    dir: tempfile::TempDir,
    config: Config,
    rules: RuleSet,
    actions: Actions,
    store: SledStore,
}

fn config_text(extra: &str) -> String {
    format!(
        r#"[store]
path = "data/store"

[outbox]
log_path = "data/actions.jsonl"
max_attempts = 4
retry_base_secs = 2
retry_max_secs = 8
timezone = "UTC"
quiet_hours = ""
concurrency = 4
timeout_secs = 2

[[journeys]]
name = "lifecycle"
rules = "rules/j.rhai"
phases = ["kijk", "koester"]

{extra}
"#
    )
}

fn world(extra: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(dir.path().join("rules/j.rhai"), RULE).unwrap();
    std::fs::write(
        dir.path().join("templates/coupon.html"),
        "Hi {{ customer.first_name }}, code {{ coupon_code }}",
    )
    .unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text(extra)).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let rules = RuleSet::load(&config).unwrap();
    let actions = Actions::build(&config).unwrap_or_else(|e| panic!("{e}"));
    let store = SledStore::open(&config.store.path, 16).unwrap();
    World {
        dir,
        config,
        rules,
        actions,
        store,
    }
}

fn customer(id: &str, stage: Option<&str>, attrs: Value) -> Customer {
    let mut c = Customer::new(id);
    if let Value::Object(m) = attrs {
        c.attributes = m;
    }
    c.attributes
        .insert("stage".into(), stage.map_or(Value::Null, |s| json!(s)));
    if stage.is_none() {
        c.attributes.remove("stage");
    }
    c
}

impl World {
    fn put(&self, c: Customer) {
        self.store.merge_customers(vec![c]).unwrap();
    }

    fn set_stage(&self, id: &str, stage: Option<&str>) {
        let mut c = self.store.customer(id).unwrap().unwrap();
        match stage {
            Some(s) => c.attributes.insert("stage".into(), json!(s)),
            None => c.attributes.insert("stage".into(), json!(null)),
        };
        // Merging keeps attributes it does not see, so write the record through a
        // forget-free path: the new value wins.
        self.store.merge_customers(vec![c]).unwrap();
    }

    fn nurture(&self, at: DateTime<Utc>) -> nurture::NurtureSummary {
        nurture::run_with_actions(
            &self.store,
            &self.rules,
            Some(&self.actions),
            &NurtureOptions::at(at),
            &|_| {},
        )
        .unwrap()
    }

    fn dispatch(&self, at: DateTime<Utc>) -> outbox::DispatchReport {
        let clock: SharedClock = Arc::new(FixedClock::new(at));
        outbox::dispatch(
            &self.store,
            &self.actions,
            &self.config,
            clock,
            &[],
            &DispatchOptions::default(),
        )
        .unwrap()
    }

    /// Dispatches at increasing times until nothing is open (or `rounds` runs).
    fn drain(&self, mut at: DateTime<Utc>, rounds: usize) -> DateTime<Utc> {
        for _ in 0..rounds {
            self.dispatch(at);
            match self.store.outbox_next_due().unwrap() {
                None => break,
                Some(d) => {
                    at = DateTime::from_timestamp(d.max(at.timestamp() + 1), 0).unwrap();
                }
            }
        }
        at
    }

    fn entries(&self) -> Vec<outbox::Entry> {
        outbox::list(&self.store, None).unwrap()
    }

    /// The customers of the log sink's lines, in order.
    fn logged_customers(&self) -> Vec<String> {
        self.log_lines()
            .iter()
            .map(|l| l["customer"].as_str().unwrap().to_string())
            .collect()
    }

    /// The customer's only (first) outbox entry.
    fn entry_of(&self, customer: &str) -> outbox::Entry {
        self.entries()
            .into_iter()
            .find(|e| e.customer == customer)
            .unwrap_or_else(|| panic!("no entry for {customer}"))
    }

    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("data/actions.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn log_action(name: &str, extra: &str) -> String {
    format!(
        "[[actions]]\nname = \"{name}\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"log\"\n{extra}\n"
    )
}

// ---------------------------------------------------------------- outbox basics

#[test]
fn transition_and_entries_are_planned_together_and_dispatched_once() {
    let w = world(&log_action(
        "hello",
        "trigger = \"enter\"\nwhen = \"customer.total_spent >= 100\"",
    ));
    w.put(customer(
        "rich",
        Some("koester"),
        json!({"total_spent": 150}),
    ));
    w.put(customer(
        "poor",
        Some("koester"),
        json!({"total_spent": 50}),
    ));
    w.put(customer("away", Some("kijk"), json!({"total_spent": 500})));
    let s = w.nurture(t0());
    assert_eq!(s.actions_planned.get("hello"), Some(&1));
    // Two runs at the same instant, and a dispatch between: nothing twice.
    w.dispatch(t0());
    let s2 = w.nurture(t0());
    assert!(s2.actions_planned.is_empty());
    w.dispatch(t0());
    let lines = w.log_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["customer"], "rich");
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Done);
    assert_eq!(w.store.history("rich").unwrap().len(), 1);
}

#[test]
fn a_dry_run_lists_payloads_and_writes_nothing() {
    let w = world(&log_action("hello", ""));
    w.put(customer("a", Some("koester"), json!({})));
    let mut opts = NurtureOptions::at(t0());
    opts.dry_run = true;
    let s =
        nurture::run_with_actions(&w.store, &w.rules, Some(&w.actions), &opts, &|_| {}).unwrap();
    let clock: SharedClock = Arc::new(FixedClock::new(t0()));
    let r = outbox::dispatch(
        &w.store,
        &w.actions,
        &w.config,
        clock,
        &s.planned,
        &DispatchOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.fired.len(), 1);
    assert_eq!(r.fired[0].outcome, "would_send");
    assert!(w.entries().is_empty());
    assert!(w.store.phase_states("a").unwrap().is_empty());
    assert!(w.log_lines().is_empty());
}

// ---------------------------------------------------------------- re-entry

fn reentry_coupons(policy: &str) -> usize {
    let w = world(&log_action(
        "coupon",
        &format!("trigger = \"enter\"\nreentry = \"{policy}\""),
    ));
    w.put(customer("c", Some("koester"), json!({})));
    w.nurture(t0());
    w.dispatch(t0());
    w.set_stage("c", Some("kijk"));
    w.nurture(t0() + Duration::days(1));
    w.set_stage("c", Some("koester"));
    w.nurture(t0() + Duration::days(2));
    w.dispatch(t0() + Duration::days(2));
    w.log_lines().len()
}

#[test]
fn leaving_and_re_entering_gives_a_second_coupon_only_if_the_policy_says_so() {
    assert_eq!(reentry_coupons("once_per_customer"), 1);
    assert_eq!(reentry_coupons("once_per_phase_entry"), 2);
}

// ---------------------------------------------------------------- guards

#[test]
fn consent_guard_skips_marketing_without_consent() {
    let w = world(&log_action(
        "promo",
        "channel = \"email\"\nmarketing = true",
    ));
    w.put(customer(
        "yes",
        Some("koester"),
        json!({"consent_email": true}),
    ));
    w.put(customer(
        "no",
        Some("koester"),
        json!({"consent_email": false}),
    ));
    w.put(customer("unknown", Some("koester"), json!({})));
    w.nurture(t0());
    w.dispatch(t0());
    let who = w.logged_customers();
    assert_eq!(who, ["yes"]);
    let skipped = w
        .entries()
        .iter()
        .filter(|e| e.state == State::Skipped)
        .count();
    assert_eq!(skipped, 2);
}

#[test]
fn transactional_actions_ignore_consent() {
    let w = world(&log_action(
        "receipt",
        "channel = \"email\"\nmarketing = false",
    ));
    w.put(customer(
        "no",
        Some("koester"),
        json!({"consent_email": false}),
    ));
    w.nurture(t0());
    w.dispatch(t0());
    assert_eq!(w.log_lines().len(), 1);
}

#[test]
fn frequency_cap_defers_the_second_email_within_the_window() {
    let extra = format!(
        "{}{}",
        log_action("first", "channel = \"email\"\nmarketing = false"),
        log_action(
            "second",
            "channel = \"email\"\nmarketing = false\ncap = { max = 1, per_days = 3 }"
        )
    );
    let w = world(&extra);
    w.put(customer("c", Some("koester"), json!({})));
    w.nurture(t0());
    w.dispatch(t0());
    w.dispatch(t0() + Duration::hours(1));
    assert_eq!(w.log_lines().len(), 1, "the cap holds the second back");
    let pending: Vec<_> = w
        .entries()
        .into_iter()
        .filter(|e| e.state == State::Pending)
        .collect();
    assert_eq!(pending.len(), 1, "deferred, not dropped");
    assert!(pending[0].due >= (t0() + Duration::days(3)).timestamp());
    w.dispatch(t0() + Duration::days(3) + Duration::minutes(1));
    assert_eq!(w.log_lines().len(), 2, "sent once the window has passed");
}

#[test]
fn global_channel_caps_apply_across_actions() {
    let extra = format!(
        "{}{}",
        log_action("a", "channel = \"sms\"\nmarketing = false"),
        log_action("b", "channel = \"sms\"\nmarketing = false")
    );
    let w = reconfigure(
        world(&extra),
        "quiet_hours = \"\"",
        "quiet_hours = \"\"\ncaps = { sms = { max = 1, per_days = 1 } }",
    );
    w.put(customer("c", Some("koester"), json!({})));
    w.nurture(t0());
    w.dispatch(t0());
    assert_eq!(w.log_lines().len(), 1, "one sms per day over both actions");
    w.dispatch(t0() + Duration::days(1) + Duration::minutes(1));
    assert_eq!(w.log_lines().len(), 2, "the other a day later, not dropped");
}

/// The same world with one line of config.toml replaced.
fn reconfigure(w: World, from: &str, to: &str) -> World {
    let path = w.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen(from, to, 1);
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let actions = Actions::build(&config).unwrap_or_else(|e| panic!("{e}"));
    World {
        config,
        actions,
        ..w
    }
}

#[test]
fn quiet_hours_defer_to_the_morning_in_the_customers_time_zone() {
    let w = reconfigure(
        world(&log_action(
            "promo",
            "channel = \"email\"\nmarketing = true",
        )),
        "quiet_hours = \"\"",
        "quiet_hours = \"21:00-08:00\"",
    );
    // 21:30 UTC is 22:30 in Amsterdam (quiet) and 17:30 in Curaçao (not quiet).
    let late = "2026-11-23T21:30:00Z".parse::<DateTime<Utc>>().unwrap();
    w.put(customer(
        "ams",
        Some("koester"),
        json!({"consent_email": true, "timezone": "Europe/Amsterdam"}),
    ));
    w.put(customer(
        "cur",
        Some("koester"),
        json!({"consent_email": true, "timezone": "America/Curacao"}),
    ));
    w.nurture(late);
    w.dispatch(late);
    let who = w.logged_customers();
    assert_eq!(who, ["cur"]);
    let ams = w.entry_of("ams");
    assert_eq!(ams.state, State::Pending, "deferred, never dropped");
    // 08:00 in Amsterdam is 07:00 UTC.
    assert_eq!(
        ams.due,
        "2026-11-24T07:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp()
    );
    w.dispatch("2026-11-24T07:00:00Z".parse().unwrap());
    assert_eq!(w.log_lines().len(), 2);
}

#[test]
fn leaving_the_phase_cancels_a_delayed_action() {
    let w = world(&log_action("later", "trigger = \"after 7d\""));
    w.put(customer("stays", Some("koester"), json!({})));
    w.put(customer("leaves", Some("koester"), json!({})));
    w.nurture(t0());
    w.dispatch(t0());
    assert!(w.log_lines().is_empty(), "not due yet");
    w.set_stage("leaves", Some("kijk"));
    w.nurture(t0() + Duration::days(1));
    // Any later run fires the durable timer.
    w.dispatch(t0() + Duration::days(8));
    let who = w.logged_customers();
    assert_eq!(who, ["stays"]);
    let left = w.entry_of("leaves");
    assert_eq!(left.state, State::Cancelled);
}

// ---------------------------------------------------------------- vendors

fn connector(name: &str, kind: &str, base_url: &str, keys: &str) -> String {
    format!(
        "[connectors.{name}]\ntype = \"{kind}\"\nbase_url = \"{base_url}\"\nmax_retries = 0\n{keys}\n"
    )
}

#[test]
fn coupon_creates_a_shopify_code_and_emails_it_through_brevo() {
    let shop = fakes::shopify::start_blocking(Default::default());
    let brevo = fakes::brevo::start_blocking(Default::default());
    let extra = format!(
        "{}{}{}",
        connector(
            "shop",
            "shopify",
            &shop.base_url,
            &format!("token = \"{}\"", fakes::shopify::DEFAULT_TOKEN)
        ),
        connector(
            "mail",
            "brevo",
            &format!("{}/v3", brevo.base_url),
            &format!(
                "api_key = \"{}\"\nsender_email = \"shop@example.com\"",
                fakes::brevo::DEFAULT_API_KEY
            )
        ),
        "[[actions]]\nname = \"loyalty\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"coupon\"\nconnector = \"shop\"\nparams = { percent = 15, valid_days = 30, subject = \"For you\", template = \"coupon\", email_connector = \"mail\" }\n"
    );
    let w = world(&extra);
    w.put(customer(
        "ann",
        Some("koester"),
        json!({"email": "ann@example.com", "first_name": "Ann", "consent_email": true}),
    ));
    w.nurture(t0());
    w.drain(t0(), 3);
    let codes = shop.discount_codes();
    assert_eq!(codes.len(), 1);
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Done, "{e:?}");
    assert_eq!(e.results["coupon_code"], json!(codes[0].code));
    let gql = shop.requests_under("/admin/api/");
    let body = gql[0].json().unwrap();
    let input = &body["variables"]["basicCodeDiscount"];
    assert_eq!(input["code"], json!(codes[0].code));
    assert_eq!(input["customerGets"]["value"]["percentage"], json!(0.15));
    let sent = brevo.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, ["ann@example.com"]);
    assert_eq!(sent[0].params["coupon_code"], json!(codes[0].code));
    assert!(sent[0].body["htmlContent"]
        .as_str()
        .unwrap()
        .contains(&codes[0].code));
}

#[test]
fn coupon_on_woocommerce_posts_the_exact_coupon() {
    let woo = fakes::woocommerce::start_blocking(Default::default());
    let extra = format!(
        "{}{}",
        connector(
            "woo",
            "woocommerce",
            &format!("{}/wp-json/wc/v3", woo.base_url),
            &format!(
                "consumer_key = \"{}\"\nconsumer_secret = \"{}\"",
                fakes::woocommerce::DEFAULT_CONSUMER_KEY,
                fakes::woocommerce::DEFAULT_CONSUMER_SECRET
            )
        ),
        "[[actions]]\nname = \"loyalty\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"coupon\"\nconnector = \"woo\"\nparams = { percent = 10 }\n"
    );
    let w = world(&extra);
    w.put(customer(
        "ann",
        Some("koester"),
        json!({"email": "ann@example.com", "consent_email": true}),
    ));
    w.nurture(t0());
    w.drain(t0(), 3);
    let coupons = woo.coupons();
    assert_eq!(coupons.len(), 1, "{:?}", w.entries());
    let req = &woo.requests_to("/wp-json/wc/v3/coupons")[0];
    let body = req.json().unwrap();
    assert_eq!(body["discount_type"], "percent");
    assert_eq!(body["amount"], "10");
    assert_eq!(body["email_restrictions"], json!(["ann@example.com"]));
    assert_eq!(body["code"], coupons[0]["code"]);
}

#[test]
fn crm_updates_make_the_vendors_exact_requests() {
    let hs = fakes::hubspot::start_blocking(Default::default());
    let mc = fakes::mailchimp::start_blocking(Default::default());
    let kl = fakes::klaviyo::start_blocking(Default::default());
    let email = hs.contacts().all()[0].email.clone();
    // The fakes share one generated book: take a different person for each.
    let mc_email = mc.contacts().all()[1].email.clone();
    let kl_email = kl.contacts().all()[2].email.clone();
    let extra = format!(
        "{}{}{}{}",
        connector("crm", "hubspot", &hs.base_url, &format!("token = \"{}\"", fakes::hubspot::DEFAULT_TOKEN)),
        connector(
            "news",
            "mailchimp",
            &format!("{}/3.0", mc.base_url),
            &format!(
                "api_key = \"{}\"\nlist_id = \"{}\"",
                fakes::mailchimp::DEFAULT_API_KEY,
                fakes::mailchimp::DEFAULT_LIST_ID
            )
        ),
        connector("kl", "klaviyo", &kl.base_url, &format!("api_key = \"{}\"", fakes::klaviyo::DEFAULT_API_KEY)),
        "[[actions]]\nname = \"hs\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"crm_update\"\nconnector = \"crm\"\nparams = { properties = { klantreis_phase = \"{{ phase }}\" } }\n\
         [[actions]]\nname = \"mc\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"crm_update\"\nconnector = \"news\"\nparams = { tags = [\"loyal\"] }\n\
         [[actions]]\nname = \"kl\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"crm_update\"\nconnector = \"kl\"\nparams = { metric = \"Entered koester\" }\n"
    );
    let w = world(&extra);
    w.put(customer("h", Some("koester"), json!({"email": email})));
    w.put(customer("m", Some("koester"), json!({"email": mc_email})));
    w.put(customer("k", Some("koester"), json!({"email": kl_email})));
    w.nurture(t0());
    w.drain(t0(), 3);
    // Every action ran for every customer; pick the vendor's own customer.
    let patch: Vec<_> = hs
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.query_param("idProperty").as_deref() == Some("email"))
        .collect();
    let mine = patch
        .iter()
        .find(|r| r.path.contains(&email.replace('@', "%40")) || r.path.contains(&email))
        .expect("a PATCH for the HubSpot contact");
    assert_eq!(
        mine.json().unwrap(),
        json!({"properties": {"klantreis_phase": "koester"}})
    );
    let tags = mc.tag_updates();
    let t = tags
        .iter()
        .find(|t| t.email == mc_email)
        .expect("tags for the member");
    assert_eq!(t.tags, [("loyal".to_string(), true)]);
    let events = kl.events();
    let ev = events
        .iter()
        .find(|e| e.profile.to_string().contains(&kl_email))
        .expect("an event for the profile");
    assert_eq!(ev.metric, "Entered koester");
    let key = w
        .entries()
        .into_iter()
        .find(|e| e.customer == "k" && e.action == "kl")
        .unwrap()
        .key;
    assert_eq!(ev.unique_id.as_deref(), Some(key.as_str()));
}

#[test]
fn webhook_is_signed_per_standard_webhooks_with_an_idempotency_key() {
    let hook = fakes::webhook::start_blocking(Default::default());
    // whsec_ + base64("klantreis-test-secret")
    let secret = "whsec_a2xhbnRyZWlzLXRlc3Qtc2VjcmV0";
    let extra = format!(
        "{}[[actions]]\nname = \"hook\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"webhook\"\nconnector = \"hook\"\n",
        connector("hook", "webhook", &hook.url("/in"), &format!("secret = \"{secret}\""))
    );
    let w = world(&extra);
    w.put(customer(
        "c",
        Some("koester"),
        json!({"email": "c@example.com"}),
    ));
    w.nurture(t0());
    w.dispatch(t0());
    let reqs = hook.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    let key = &w.entries()[0].key;
    assert_eq!(r.header("idempotency-key"), Some(key.as_str()));
    assert_eq!(r.header("webhook-id"), Some(key.as_str()));
    let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    assert_eq!(ts, t0().timestamp());
    let want = klantreis::actions::kinds::standard_webhook_signature(secret, key, ts, &r.body);
    assert_eq!(r.header("webhook-signature"), Some(want.as_str()));
    // Independently: HMAC over "id.ts.body" keyed with the decoded secret.
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"klantreis-test-secret").unwrap();
    mac.update(format!("{key}.{ts}.").as_bytes());
    mac.update(&r.body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(want, format!("v1,{b64}"));
    assert_eq!(r.json().unwrap()["customer"]["id"], "c");
}

// ---------------------------------------------------------------- faults

fn webhook_world(url: &str, n: usize) -> World {
    let extra = format!(
        "{}[[actions]]\nname = \"hook\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"webhook\"\nconnector = \"hook\"\n",
        connector("hook", "webhook", url, "")
    );
    let w = world(&extra);
    let batch: Vec<Customer> = (0..n)
        .map(|i| customer(&format!("c{i:03}"), Some("koester"), json!({})))
        .collect();
    w.store.merge_customers(batch).unwrap();
    w.nurture(t0());
    w
}

fn deliveries(reqs: &[fakes::RecordedRequest]) -> (usize, HashMap<String, usize>) {
    let mut ok = HashMap::new();
    for r in reqs.iter().filter(|r| (200..300).contains(&r.status)) {
        *ok.entry(r.header("idempotency-key").unwrap().to_string())
            .or_insert(0) += 1;
    }
    (reqs.len(), ok)
}

#[test]
fn server_errors_and_throttling_end_exactly_once() {
    let hook = fakes::webhook::start_blocking(fakes::webhook::Config {
        faults: Faults {
            fail_every: Some(3),
            throttle_every: Some(4),
            retry_after_secs: Some(1),
            ..Faults::default()
        },
        ..Default::default()
    });
    let w = webhook_world(&hook.url("/in"), 40);
    w.drain(t0(), 30);
    let (_, ok) = deliveries(&hook.requests());
    assert!(ok.values().all(|n| *n == 1), "none twice: {ok:?}");
    let entries = w.entries();
    assert_eq!(entries.len(), 40);
    for e in &entries {
        match e.state {
            State::Done => assert!(ok.contains_key(&e.key), "done but never delivered: {e:?}"),
            State::Dead => {
                assert!(!ok.contains_key(&e.key));
                assert!(
                    e.last_error.as_deref().unwrap().contains("answered"),
                    "{e:?}"
                );
            }
            s => panic!("nothing may be left open or lost: {s:?}"),
        }
    }
    assert!(ok.len() >= 30, "most get through: {}", ok.len());
}

#[test]
fn a_receiver_that_keeps_failing_leaves_dead_letters_that_can_be_retried() {
    let hook = fakes::webhook::start_blocking(fakes::webhook::Config {
        then_status: 500,
        ..Default::default()
    });
    let w = webhook_world(&hook.url("/in"), 3);
    let at = w.drain(t0(), 20);
    let dead = outbox::list(&w.store, Some(State::Dead)).unwrap();
    assert_eq!(dead.len(), 3, "nothing lost: {:?}", w.entries());
    assert!(dead
        .iter()
        .all(|e| e.attempts == 4 && e.last_error.as_deref().unwrap().contains("500")));
    assert_eq!(hook.request_count(), 12);
    // The receiver recovers; the dead letters are put back by hand and delivered.
    hook.push_statuses(&[200, 200, 200]);
    assert_eq!(outbox::retry_dead(&w.store, at.timestamp()).unwrap(), 3);
    w.dispatch(at);
    assert!(w.entries().iter().all(|e| e.state == State::Done));
}

#[test]
fn timeouts_and_refused_connections_are_retried_until_delivered() {
    // Refused: a port nothing listens on (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let w = webhook_world(&format!("http://127.0.0.1:{port}/in"), 2);
    w.dispatch(t0());
    let open = w.entries();
    assert!(open
        .iter()
        .all(|e| e.state == State::Pending && e.attempts == 1));
    assert!(open[0].last_error.as_deref().unwrap().contains("refused"));

    // Timeouts: a receiver slower than timeout_secs (2 s), then fast.
    let hook = fakes::webhook::start_blocking(fakes::webhook::Config {
        faults: Faults {
            delay: std::time::Duration::from_millis(2500),
            ..Faults::default()
        },
        ..Default::default()
    });
    let w = webhook_world(&hook.url("/in"), 2);
    w.dispatch(t0());
    assert!(w.entries().iter().all(
        |e| e.state == State::Pending && e.last_error.as_deref().unwrap().contains("timed out")
    ));
    hook.set_faults(Faults::default());
    w.drain(t0() + Duration::seconds(1), 10);
    assert!(w.entries().iter().all(|e| e.state == State::Done));
    // A timed-out request may have reached the receiver: the repeat carries the same
    // key, so the receiver can tell (at-least-once on the wire, once per key).
    let keys: HashSet<String> = hook
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 2);
}

// ---------------------------------------------------------------- SIGKILL

fn kill_loop(extra_for: &dyn Fn(&str) -> String, url: &str, n: usize) -> (World, u32) {
    let w = world(&extra_for(url));
    let batch: Vec<Customer> = (0..n)
        .map(|i| {
            customer(
                &format!("c{i:03}"),
                Some("koester"),
                json!({"email": format!("c{i:03}@example.com")}),
            )
        })
        .collect();
    w.store.merge_customers(batch).unwrap();
    w.store.flush().unwrap();
    let cfg: PathBuf = w.dir.path().join("config.toml");
    let World {
        dir,
        config,
        rules,
        actions,
        store,
    } = w;
    drop(store); // the binary needs the store
    let mut kills = 0;
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    for round in 0..40 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_klantreis"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "nurture",
                "--no-sync",
                "--now",
                T0,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if round < 12 {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let ms = 30 + rng_state % 300;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            if child.try_wait().unwrap().is_none() {
                // SIGKILL: no destructor, no flush.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                kills += 1;
            }
        }
        let status = child.wait().unwrap();
        if round >= 12 && status.success() {
            let store = SledStore::open(&config.store.path, 16).unwrap();
            let open = outbox::list(&store, None)
                .unwrap()
                .iter()
                .filter(|e| e.state.is_open())
                .count();
            drop(store);
            if open == 0 {
                break;
            }
        }
    }
    let store = SledStore::open(&config.store.path, 16).unwrap();
    (
        World {
            dir,
            config,
            rules,
            actions,
            store,
        },
        kills,
    )
}

#[test]
fn sigkill_loop_log_sink_writes_each_action_exactly_once() {
    let (w, kills) = kill_loop(&|_| log_action("hello", ""), "", 3000);
    let lines = w.log_lines();
    eprintln!("log sink: {kills} kills, {} lines", lines.len());
    let keys: HashSet<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 3000, "nothing lost ({kills} kills)");
    assert_eq!(lines.len(), 3000, "nothing twice ({kills} kills)");
    assert!(w.entries().iter().all(|e| e.state == State::Done));
}

#[test]
fn sigkill_loop_webhook_receiver_processes_each_action_exactly_once() {
    let hook = fakes::webhook::start_blocking(fakes::webhook::Config {
        faults: Faults {
            slow_answer: std::time::Duration::from_millis(10),
            ..Faults::default()
        },
        ..Default::default()
    });
    let extra = |url: &str| {
        format!(
            "{}[[actions]]\nname = \"hook\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"webhook\"\nconnector = \"hook\"\n",
            connector("hook", "webhook", url, "")
        )
    };
    let (w, kills) = kill_loop(&extra, &hook.url("/in"), 400);
    let entries = w.entries();
    assert!(entries.iter().all(|e| e.state == State::Done));
    // What took effect at the receiver: each action once, none lost.
    let processed = hook.processed();
    let distinct: HashSet<&String> = processed.iter().collect();
    assert_eq!(distinct.len(), processed.len(), "an action processed twice");
    let keys: HashSet<&String> = entries.iter().map(|e| &e.key).collect();
    assert_eq!(distinct, keys, "every action delivered ({kills} kills)");
    // On the wire, an attempt cut off by SIGKILL after sending is repeated with the
    // same webhook-id, and the receiver acknowledges it without processing it again
    // (Standard Webhooks: receivers deduplicate on webhook-id). Only attempts in
    // flight at a kill can repeat: at most `concurrency` (4) per kill.
    let (total, _) = deliveries(&hook.requests());
    eprintln!(
        "webhook: {kills} kills, {total} requests, {} acknowledged repeats",
        hook.repeats()
    );
    assert!(
        hook.repeats() <= kills as usize * 4,
        "{} repeats for {kills} kills",
        hook.repeats()
    );
}

/// A Brevo fake with `faults`, and a world with an email action through it and
/// one customer, ann, in koester, planned at t0.
fn brevo_world(
    faults: Faults,
    extra_keys: &str,
) -> (fakes::FakeServer<fakes::brevo::Brevo>, World) {
    let brevo = fakes::brevo::start_blocking(fakes::brevo::Config {
        faults,
        ..Default::default()
    });
    let w = world(&brevo_email_action(&brevo.base_url, extra_keys));
    w.put(customer(
        "ann",
        Some("koester"),
        json!({"email": "ann@example.com"}),
    ));
    w.nurture(t0());
    (brevo, w)
}

fn brevo_email_action(url: &str, extra_keys: &str) -> String {
    format!(
        "{}[[actions]]\nname = \"welcome\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"email\"\nconnector = \"mail\"\nmarketing = false\nparams = {{ subject = \"Welcome {{{{ customer.id }}}}\", html = \"<p>Hi</p>\" }}\n",
        connector(
            "mail",
            "brevo",
            &format!("{url}/v3"),
            &format!(
                "api_key = \"{}\"\nsender_email = \"shop@example.com\"\nrate_per_sec = 0\n{extra_keys}",
                fakes::brevo::DEFAULT_API_KEY
            )
        )
    )
}

/// Per idempotency key, how many mails Brevo accepted.
fn mails_per_key(sent: &[fakes::brevo::SentEmail]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for m in sent {
        for t in m.tags.iter().filter(|t| t.starts_with("kr_")) {
            *n.entry(t.clone()).or_insert(0) += 1;
        }
    }
    n
}

#[test]
fn sigkill_loop_brevo_sends_each_email_exactly_once() {
    // Each mail is accepted 20 ms before Brevo answers, so most kills land while
    // mails that went out are not yet recorded as done.
    let brevo = fakes::brevo::start_blocking(fakes::brevo::Config {
        faults: Faults {
            slow_answer: std::time::Duration::from_millis(20),
            ..Faults::default()
        },
        ..Default::default()
    });
    let (w, kills) = kill_loop(&|url| brevo_email_action(url, ""), &brevo.base_url, 300);
    let entries = w.entries();
    assert!(
        entries.iter().all(|e| e.state == State::Done),
        "{entries:?}"
    );
    // Brevo takes no idempotency key: an attempt whose outcome a kill cut off is
    // looked up by its tag before it is repeated, so Brevo gets each mail once.
    let per_key = mails_per_key(&brevo.sent());
    let found_earlier = entries
        .iter()
        .filter(|e| e.results.contains_key("send_email_found_earlier"))
        .count();
    eprintln!(
        "brevo: {kills} kills, {} mails, {found_earlier} found by lookup instead of sent again",
        brevo.sent().len()
    );
    assert_eq!(per_key.len(), 300, "nothing lost ({kills} kills)");
    assert!(
        per_key.values().all(|n| *n == 1),
        "a mail sent twice ({kills} kills)"
    );
    assert_eq!(brevo.sent().len(), 300);
    assert!(
        found_earlier > 0,
        "no kill fell between a send and its record ({kills} kills): the test proved nothing"
    );
    for e in &entries {
        assert_eq!(per_key.get(&e.key), Some(&1), "{e:?}");
    }
}

#[test]
fn a_brevo_send_that_timed_out_but_went_through_is_not_sent_again() {
    // Brevo accepts the mail but answers after the client gave up (timeout_secs = 1).
    let (brevo, w) = brevo_world(
        Faults {
            slow_answer: std::time::Duration::from_millis(1600),
            ..Faults::default()
        },
        "timeout_secs = 1",
    );
    w.dispatch(t0());
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Pending, "{e:?}");
    assert!(
        e.last_error.as_deref().unwrap().contains("timed out"),
        "{e:?}"
    );
    assert_eq!(brevo.sent().len(), 1, "the first attempt went through");
    brevo.set_faults(Faults::default());
    w.drain(t0() + Duration::seconds(1), 10);
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Done, "{e:?}");
    assert_eq!(e.results["send_email_found_earlier"], true, "{e:?}");
    assert!(e.results["message_id"].as_str().unwrap().starts_with('<'));
    // The repeat asked first (GET /v3/smtp/emails?email=...) and did not send.
    assert_eq!(brevo.sent().len(), 1, "sent twice");
    let lookups = brevo.requests_to("/v3/smtp/emails");
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].query_param("email").as_deref(),
        Some("ann@example.com")
    );
    assert_eq!(brevo.sent()[0].tags, ["welcome".to_string(), e.key.clone()]);
}

#[test]
fn a_brevo_send_that_failed_is_sent_again_after_the_lookup_finds_nothing() {
    let (brevo, w) = brevo_world(
        Faults {
            fail_first: 1,
            ..Faults::default()
        },
        "",
    );
    w.drain(t0(), 10);
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Done, "{e:?}");
    assert!(!e.results.contains_key("send_email_found_earlier"));
    assert_eq!(brevo.sent().len(), 1);
    assert_eq!(brevo.requests_to("/v3/smtp/emails").len(), 1);
}

#[test]
fn a_vendors_retry_after_sets_when_the_outbox_tries_again() {
    // Brevo throttles with Retry-After: 7; the connector does not retry itself
    // (max_retries = 0), so the outbox waits the 7 s, not its own 1-2 s backoff.
    let (brevo, w) = brevo_world(
        Faults {
            throttle_every: Some(1),
            retry_after_secs: Some(7),
            ..Faults::default()
        },
        "",
    );
    w.dispatch(t0());
    let e = &w.entries()[0];
    assert_eq!(e.state, State::Pending, "{e:?}");
    assert_eq!(e.due, t0().timestamp() + 7, "{e:?}");
    brevo.set_faults(Faults::default());
    w.dispatch(t0() + Duration::seconds(6));
    assert_eq!(
        w.entries()[0].state,
        State::Pending,
        "not before Retry-After"
    );
    w.dispatch(t0() + Duration::seconds(7));
    assert_eq!(w.entries()[0].state, State::Done);
    assert_eq!(brevo.sent().len(), 1);
}

// ---------------------------------------------------------------- every <cron>

fn every_world(reentry: &str) -> World {
    let w = world(&log_action(
        "weekly",
        &format!("trigger = \"every 0 9 * * 1\"\nreentry = \"{reentry}\""),
    ));
    // Mondays 09:00 in the customer's zone: Amsterdam is UTC+1 in winter.
    w.put(customer(
        "ann",
        Some("koester"),
        json!({"timezone": "Europe/Amsterdam"}),
    ));
    w
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[test]
fn every_cron_trigger_fires_each_monday_in_the_customers_zone_while_in_the_phase() {
    let w = every_world("every_time");
    w.nurture(t0()); // Friday 2026-11-20: planned for Monday 23rd, 09:00 Amsterdam.
    let e = &w.entries()[0];
    assert_eq!(e.due, at("2026-11-23T08:00:00Z").timestamp(), "{e:?}");
    w.dispatch(at("2026-11-23T07:59:59Z"));
    assert!(w.log_lines().is_empty(), "not before it is due");
    w.dispatch(at("2026-11-23T08:00:00Z"));
    w.dispatch(at("2026-11-23T08:00:00Z")); // a second run at the same instant
    assert_eq!(w.log_lines().len(), 1);
    // The next occurrence is planned: Monday 30th.
    let open: Vec<_> = w
        .entries()
        .into_iter()
        .filter(|e| e.state.is_open())
        .collect();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].due, at("2026-11-30T08:00:00Z").timestamp());
    // A run days late fires the missed occurrence once, not once per missed week.
    w.nurture(at("2026-12-09T10:00:00Z"));
    w.dispatch(at("2026-12-09T10:00:00Z"));
    assert_eq!(w.log_lines().len(), 2);
    let open: Vec<_> = w
        .entries()
        .into_iter()
        .filter(|e| e.state.is_open())
        .collect();
    assert_eq!(open[0].due, at("2026-12-14T08:00:00Z").timestamp());
    // Leaving the phase stops it: the planned occurrence is cancelled.
    w.set_stage("ann", Some("kijk"));
    w.nurture(at("2026-12-10T10:00:00Z"));
    w.dispatch(at("2026-12-14T08:00:00Z"));
    w.dispatch(at("2026-12-21T08:00:00Z"));
    assert_eq!(w.log_lines().len(), 2);
    let states: Vec<State> = w.entries().iter().map(|e| e.state).collect();
    assert_eq!(
        states.iter().filter(|s| **s == State::Done).count(),
        2,
        "{states:?}"
    );
    assert!(states.contains(&State::Cancelled), "{states:?}");
    assert!(!states.iter().any(|s| s.is_open()), "{states:?}");
    let days: Vec<String> = w
        .log_lines()
        .iter()
        .map(|l| l["at"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(days, ["2026-11-23T08:00:00Z", "2026-12-09T10:00:00Z"]);
}

#[test]
fn every_cron_trigger_with_the_default_policy_fires_once_per_phase_entry() {
    let w = every_world("once_per_phase_entry");
    w.nurture(t0());
    w.dispatch(at("2026-11-23T08:00:00Z"));
    w.dispatch(at("2026-11-30T08:00:00Z"));
    w.dispatch(at("2026-12-07T08:00:00Z"));
    assert_eq!(w.log_lines().len(), 1);
    assert_eq!(w.entries().len(), 1);
}

// ---------------------------------------------------------------- check

#[test]
fn check_reports_bad_actions_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/j.rhai"), RULE).unwrap();
    let text = config_text(
        "[[actions]]\nname = \"a\"\njourney = \"nope\"\nphase = \"koester\"\nkind = \"log\"\n\n\
         [[actions]]\nname = \"b\"\njourney = \"lifecycle\"\nphase = \"gone\"\nkind = \"log\"\n\n\
         [[actions]]\nname = \"c\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"email\"\nconnector = \"nowhere\"\n\n\
         [[actions]]\nname = \"d\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"log\"\nwhen = \"customer.total_spent >= \"\n\n\
         [[actions]]\nname = \"e\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"log\"\nparams = { template = \"missing\" }\n",
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let (config, problems) = Config::parse_lenient(&path, &text).unwrap();
    let mut all: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
    all.extend(
        klantreis::actions::check(&config)
            .iter()
            .map(|d| d.to_string()),
    );
    let joined = all.join("\n");
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let f = path.display().to_string();
    assert!(
        joined.contains(&format!(
            "{f}:{}:11: action a: unknown journey \"nope\"",
            line_of("\"nope\"")
        )),
        "{joined}"
    );
    assert!(
        joined.contains(&format!(
            "{f}:{}:9: action b: journey lifecycle has no phase \"gone\"",
            line_of("\"gone\"")
        )),
        "{joined}"
    );
    assert!(
        joined.contains(&format!(
            "{f}:{}:13: action c: unknown connector \"nowhere\"",
            line_of("\"nowhere\"")
        )),
        "{joined}"
    );
    assert!(
        joined.contains(&format!("{f}:{}:", line_of("total_spent >= \"")))
            && joined.contains("action d: `when` does not compile"),
        "{joined}"
    );
    assert!(
        joined.contains("action e: unknown template \"missing\""),
        "{joined}"
    );
}

#[test]
fn review_request_is_a_brevo_email_once_per_order() {
    let brevo = fakes::brevo::start_blocking(Default::default());
    let extra = format!(
        "{}[[actions]]\nname = \"review\"\njourney = \"lifecycle\"\nphase = \"koester\"\nkind = \"review_request\"\nconnector = \"mail\"\nreentry = \"every_time\"\nparams = {{ subject = \"How was order {{{{ customer.last_order }}}}?\", html = \"<a href='{{{{ params.review_url }}}}'>review</a>\", review_url = \"https://shop.example/r/{{{{ customer.id }}}}\" }}\n",
        connector(
            "mail",
            "brevo",
            &format!("{}/v3", brevo.base_url),
            &format!(
                "api_key = \"{}\"\nsender_email = \"shop@example.com\"",
                fakes::brevo::DEFAULT_API_KEY
            )
        )
    );
    let w = world(&extra);
    let mut c = customer(
        "ann",
        Some("koester"),
        json!({"email": "ann@example.com", "first_name": "Ann", "last_order": 1001}),
    );
    c.events.push(klantreis::model::Event {
        kind: "order_fulfilled".into(),
        at: "2026-11-15T10:00:00Z".into(),
        data: json!({"order_id": 1001}),
    });
    w.put(c);
    w.nurture(t0());
    w.dispatch(t0());
    // Leave and come back without a new order: no second request for order 1001.
    w.set_stage("ann", Some("kijk"));
    w.nurture(t0() + Duration::days(1));
    w.set_stage("ann", Some("koester"));
    w.nurture(t0() + Duration::days(2));
    w.dispatch(t0() + Duration::days(2));
    let sent = brevo.sent();
    assert_eq!(sent.len(), 1, "{:?}", w.entries());
    assert_eq!(sent[0].to, ["ann@example.com"]);
    assert_eq!(sent[0].subject.as_deref(), Some("How was order 1001?"));
    assert_eq!(sent[0].params["review_url"], "https://shop.example/r/ann");
    assert_eq!(sent[0].body["sender"]["email"], "shop@example.com");
    let key = &w.entries()[0].key;
    assert_eq!(sent[0].tags, ["review".to_string(), key.clone()]);
}

// ---------------------------------------------------------------- the shipped demo

fn shipped_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(repo.join("config.toml"), dir.path().join("config.toml")).unwrap();
    for sub in ["rules", "connectors", "examples"] {
        copy_tree(&repo.join(sub), &dir.path().join(sub));
    }
    dir
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn klantreis(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_klantreis"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_demo_fires_loyalty_coupons_and_review_requests_into_the_log_sink() {
    let dir = shipped_copy();
    let o = klantreis(dir.path(), &["demo"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(dir.path().join("data/actions.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let customers: HashMap<String, Value> =
        std::fs::read_to_string(dir.path().join("examples/customers.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["id"].as_str().unwrap().to_string(), v)
            })
            .collect();
    let coupons: Vec<&Value> = lines
        .iter()
        .filter(|l| l["action"] == "loyalty-coupon")
        .collect();
    let reviews: Vec<&Value> = lines
        .iter()
        .filter(|l| l["action"] == "review-request")
        .collect();
    assert!(!coupons.is_empty() && !reviews.is_empty(), "{log}");
    for c in &coupons {
        let who = &customers[c["customer"].as_str().unwrap()];
        assert!(who["total_spent"].as_f64().unwrap() >= 100.0, "{c}");
        assert_eq!(who["consent_email"], json!(true), "{c}");
        assert_eq!(c["phase"], "koester");
        let code = c["payload"]["coupon_code"].as_str().unwrap();
        assert!(c["payload"]["html"].as_str().unwrap().contains(code));
    }
    for r in &reviews {
        let who = &customers[r["customer"].as_str().unwrap()];
        assert!(
            who["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "order_fulfilled"),
            "{r}"
        );
    }
    // A second demo sends nothing again.
    klantreis(dir.path(), &["demo"]);
    let again = std::fs::read_to_string(dir.path().join("data/actions.jsonl")).unwrap();
    assert_eq!(again, log);
    let o = klantreis(dir.path(), &["outbox", "--json"]);
    let entries: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        entries.iter().filter(|e| e["state"] == "done").count(),
        lines.len()
    );
    let id = coupons[0]["customer"].as_str().unwrap();
    let o = klantreis(dir.path(), &["explain", id, "--now", T0]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("done loyalty-coupon") && text.contains("because entered lifecycle koester"),
        "{text}"
    );
    // `explain --json` (and so the admin API) carries the same actions.
    let o = klantreis(dir.path(), &["explain", id, "--now", T0, "--json"]);
    let x: Value = serde_json::from_slice(&o.stdout).unwrap();
    let actions = x["actions"].as_array().expect("explain --json has actions");
    assert!(
        actions
            .iter()
            .any(|a| a["action"] == "loyalty-coupon" && a["state"] == "done"),
        "{x}"
    );
}

#[test]
fn nurture_dry_run_lists_the_demo_actions_and_writes_nothing() {
    let dir = shipped_copy();
    let o = klantreis(dir.path(), &["import", "examples/customers.jsonl"]);
    assert!(o.status.success());
    let o = klantreis(
        dir.path(),
        &["nurture", "--dry-run", "--no-sync", "--now", T0],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("would_send")
            && text.contains("loyalty-coupon")
            && text.contains("review-request"),
        "{text}"
    );
    assert!(
        text.contains("\"coupon_code\""),
        "payloads are shown: {text}"
    );
    assert!(!dir.path().join("data/actions.jsonl").exists());
    let o = klantreis(dir.path(), &["outbox", "--json"]);
    let entries: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(entries.is_empty());
}
