//! Connector tests (issue 3): the shipped definitions, changed only by `base_url` and
//! credentials, against loopback fakes of each vendor (src/fakes). They assert on what
//! arrives in the store and on the requests the fakes received. Every store is a
//! temporary one, every server listens on 127.0.0.1:0, and nothing is timed.

use crate::support::{stderr, stdout, Sandbox};
use klantreis::clock::{FixedClock, SharedClock};
use klantreis::config::Config;
use klantreis::connectors::{
    self, Connector, InstanceReport, Progress, Registry, SyncOptions, SyncReport,
};
use klantreis::fakes::{
    brevo, hubspot, klaviyo, mailchimp, shopify, subscriber_hash, superoffice, webhook,
    woocommerce, Consent, Contact, ContactBook, Faults, RecordedRequest,
};
use klantreis::model::Customer;
use klantreis::store::{SledStore, Store};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The clock of every sync here: after all fake data, so the watermark is the newest
/// change seen.
const NOW: &str = "2026-11-20T12:00:00Z";
/// When the fakes' books stamp changes made by the tests.
const CHANGED_AT: &str = "2025-06-01T09:30:00Z";

/// Instance keys that keep tests quick: short retry waits and no request-rate cap.
/// They are instance settings; the definitions are the shipped ones.
const QUICK: &str = "retry_base_ms = 2\nretry_max_ms = 20\nrate_per_sec = 0\n";

fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
    klantreis::time::parse(s).expect("an RFC 3339 time")
}

fn clock() -> SharedClock {
    Arc::new(FixedClock::new(at(NOW)))
}

/// A book whose later changes are stamped [`CHANGED_AT`].
fn book(n: usize) -> ContactBook {
    let b = ContactBook::generate(n);
    b.set_clock(Arc::new(FixedClock::new(at(CHANGED_AT))));
    b
}

/// A temp folder with one journey; each test writes its `[connectors.*]`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/a.rhai"), "fn phase(c) { () }\n").unwrap();
        Self { dir }
    }

    fn text(instances: &str) -> String {
        format!(
            "[store]\npath = \"data/store\"\n\n[[journeys]]\nname = \"j\"\nrules = \"rules/a.rhai\"\nphases = [\"a\"]\n\n{instances}"
        )
    }

    fn parse(&self, instances: &str) -> Result<Config, String> {
        let path = self.dir.path().join("config.toml");
        let text = Self::text(instances);
        std::fs::write(&path, &text).unwrap();
        Config::parse(&path, &text).map_err(|e| e.to_string())
    }

    fn config(&self, instances: &str) -> Config {
        self.parse(instances)
            .unwrap_or_else(|e| panic!("config:\n{e}\n{instances}"))
    }
}

async fn sync_with(
    config: &Config,
    store: &dyn Store,
    only: Option<&str>,
    full: bool,
) -> SyncReport {
    connectors::sync_all(config, store, only, &SyncOptions { full }, clock(), &|_| {})
        .await
        .expect("sync runs")
}

async fn sync(config: &Config, store: &dyn Store) -> SyncReport {
    sync_with(config, store, None, false).await
}

fn ok(report: &SyncReport, name: &str) -> InstanceReport {
    let r = report
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {report:?}"));
    assert_eq!(r.error, None, "{name}: {r:?}");
    assert_eq!(r.errors, 0, "{name}: {r:?}");
    r.clone()
}

/// Every customer in the store, in id order.
fn dump(store: &SledStore) -> Vec<Customer> {
    let mut out = Vec::new();
    store
        .scan(1000, &mut |items| {
            out.extend(
                items
                    .iter()
                    .map(|i| Customer::decode(&i.record).expect("a stored record decodes")),
            );
            true
        })
        .unwrap();
    out
}

fn cursor(store: &SledStore, instance: &str) -> Option<Value> {
    store
        .cursor(&format!("connector/{instance}"))
        .unwrap()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

// ----------------------------------------------------------------- the six vendors

/// How a vendor's consent arrives in `consent_email`.
#[derive(Clone, Copy, PartialEq)]
enum ConsentMapping {
    /// `consent_email` is true exactly for subscribed contacts.
    Full,
    /// HubSpot: only opt-outs are known (false); the rest is left unset.
    OptOutOnly,
    None,
}

/// One vendor fake with an instance of its shipped definition pointed at it.
struct Vendor {
    name: &'static str,
    prefix: &'static str,
    /// The instance table, `[connectors.<name>]`.
    instance: String,
    source_id: fn(&Contact) -> String,
    consent: ConsentMapping,
    tags: bool,
    /// Whether the API can be asked for changes only.
    incremental: bool,
    requests: Box<dyn Fn() -> Vec<RecordedRequest> + Send + Sync>,
    set_faults: Box<dyn Fn(Faults) + Send + Sync>,
    clear: Box<dyn Fn() + Send + Sync>,
}

macro_rules! handles {
    ($s:expr) => {{
        let (a, b, c) = ($s.clone(), $s.clone(), $s);
        (
            Box::new(move || a.requests()) as Box<dyn Fn() -> Vec<RecordedRequest> + Send + Sync>,
            Box::new(move |f| b.set_faults(f)) as Box<dyn Fn(Faults) + Send + Sync>,
            Box::new(move || c.clear_requests()) as Box<dyn Fn() + Send + Sync>,
        )
    }};
}

fn hubspot_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(hubspot::start_blocking(hubspot::Config {
        contacts: book.clone(),
        faults,
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.crm]\ntype = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"{}\"\n{QUICK}\n",
        s.base_url,
        hubspot::DEFAULT_TOKEN
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "crm",
        prefix: "hubspot",
        instance,
        source_id: |c| c.id.to_string(),
        consent: ConsentMapping::OptOutOnly,
        tags: false,
        incremental: true,
        requests,
        set_faults,
        clear,
    }
}

fn mailchimp_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(mailchimp::start_blocking(mailchimp::Config {
        contacts: book.clone(),
        faults: Faults {
            max_concurrent: Some(10),
            ..faults
        },
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.news]\ntype = \"mailchimp\"\nbase_url = \"{}/3.0\"\napi_key = \"{}\"\nlist_id = \"{}\"\n{QUICK}\n",
        s.base_url,
        mailchimp::DEFAULT_API_KEY,
        mailchimp::DEFAULT_LIST_ID
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "news",
        prefix: "mailchimp",
        instance,
        source_id: |c| subscriber_hash(&c.email),
        consent: ConsentMapping::Full,
        tags: true,
        incremental: true,
        requests,
        set_faults,
        clear,
    }
}

fn klaviyo_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(klaviyo::start_blocking(klaviyo::Config {
        contacts: book.clone(),
        faults,
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.flows]\ntype = \"klaviyo\"\nbase_url = \"{}\"\napi_key = \"{}\"\n{QUICK}\n",
        s.base_url,
        klaviyo::DEFAULT_API_KEY
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "flows",
        prefix: "klaviyo",
        instance,
        source_id: |c| klaviyo::profile_id(c.id),
        consent: ConsentMapping::Full,
        tags: false,
        incremental: true,
        requests,
        set_faults,
        clear,
    }
}

fn shopify_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(shopify::start_blocking(shopify::Config {
        contacts: book.clone(),
        faults,
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.shop]\ntype = \"shopify\"\nbase_url = \"{}\"\ntoken = \"{}\"\n{QUICK}\n",
        s.base_url,
        shopify::DEFAULT_TOKEN
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "shop",
        prefix: "shopify",
        instance,
        source_id: |c| shopify::customer_id(c.id).to_string(),
        consent: ConsentMapping::Full,
        tags: true,
        incremental: true,
        requests,
        set_faults,
        clear,
    }
}

fn woocommerce_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(woocommerce::start_blocking(woocommerce::Config {
        contacts: book.clone(),
        faults,
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.woo]\ntype = \"woocommerce\"\nbase_url = \"{}/wp-json/wc/v3\"\nconsumer_key = \"{}\"\nconsumer_secret = \"{}\"\n{QUICK}\n",
        s.base_url,
        woocommerce::DEFAULT_CONSUMER_KEY,
        woocommerce::DEFAULT_CONSUMER_SECRET
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "woo",
        prefix: "woocommerce",
        instance,
        source_id: |c| c.id.to_string(),
        consent: ConsentMapping::None,
        tags: false,
        incremental: true,
        requests,
        set_faults,
        clear,
    }
}

fn superoffice_vendor(book: &ContactBook, faults: Faults) -> Vendor {
    let s = Arc::new(superoffice::start_blocking(superoffice::Config {
        contacts: book.clone(),
        faults,
        ..Default::default()
    }));
    let instance = format!(
        "[connectors.so]\ntype = \"superoffice\"\nbase_url = \"{}/{}/api/v1\"\ntoken = \"{}\"\napp_token = \"{}\"\n{QUICK}\n",
        s.base_url,
        superoffice::DEFAULT_TENANT,
        superoffice::DEFAULT_TOKEN,
        superoffice::DEFAULT_APP_TOKEN
    );
    let (requests, set_faults, clear) = handles!(s);
    Vendor {
        name: "so",
        prefix: "superoffice",
        instance,
        source_id: |c| c.id.to_string(),
        consent: ConsentMapping::None,
        tags: false,
        incremental: false,
        requests,
        set_faults,
        clear,
    }
}

type MakeVendor = fn(&ContactBook, Faults) -> Vendor;

const VENDORS: &[MakeVendor] = &[
    hubspot_vendor,
    mailchimp_vendor,
    klaviyo_vendor,
    shopify_vendor,
    woocommerce_vendor,
    superoffice_vendor,
];

/// Every contact of `book` is one customer with the vendor's id and attributes.
fn assert_pulled(store: &SledStore, book: &ContactBook, v: &Vendor) {
    let contacts = book.all();
    assert_eq!(
        store.customer_count().unwrap(),
        contacts.len() as u64,
        "{}: no duplicates",
        v.name
    );
    for c in &contacts {
        let id = store
            .id_for_email(&c.email)
            .unwrap()
            .unwrap_or_else(|| panic!("{}: {} is not in the store", v.name, c.email));
        let cust = store
            .customer(&id)
            .unwrap()
            .expect("indexed customers exist");
        let a = &cust.attributes;
        let what = format!("{} contact {}", v.name, c.id);
        assert_eq!(
            a[&format!("{}_id", v.prefix)],
            json!((v.source_id)(c)),
            "{what}"
        );
        assert_eq!(a["email"], json!(c.email.to_lowercase()), "{what}");
        assert_eq!(a["first_name"], json!(c.first_name), "{what}");
        assert_eq!(a["last_name"], json!(c.last_name), "{what}");
        match v.consent {
            ConsentMapping::Full => {
                assert_eq!(
                    a["consent_email"],
                    json!(c.consent == Consent::Subscribed),
                    "{what}"
                )
            }
            ConsentMapping::OptOutOnly => assert_eq!(
                a.get("consent_email"),
                (c.consent == Consent::Unsubscribed).then_some(&json!(false)),
                "{what}"
            ),
            ConsentMapping::None => assert_eq!(a.get("consent_email"), None, "{what}"),
        }
        if v.tags {
            let mut tags = c.tags.clone();
            tags.sort();
            assert_eq!(a["tags"], json!(tags), "{what}");
            assert_eq!(a[&format!("{}_tags", v.prefix)], json!(tags), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pulls_every_contact_from_each_vendor_through_pagination_429s_and_500s() {
    // 5xx on every 4th request and 429 on every 7th: each vendor's own error shapes,
    // mostly without Retry-After (Shopify always sends one).
    let faults = Faults {
        fail_every: Some(4),
        throttle_every: Some(7),
        ..Default::default()
    };
    for make in VENDORS {
        // Enough contacts for several pages with every vendor's default page size.
        let book = book(610);
        let v = make(&book, faults);
        let setup = Setup::new();
        // Small pages where the default would fit everything on one page.
        let page = if matches!(v.prefix, "mailchimp" | "shopify" | "superoffice") {
            "page_size = 100\n"
        } else {
            ""
        };
        let config = setup.config(&format!("{}{page}", v.instance));
        let store = SledStore::temporary().unwrap();
        let report = sync(&config, &store).await;
        let r = ok(&report, v.name);
        assert_eq!(r.fetched, 610, "{}: {r:?}", v.name);
        assert_eq!(r.created, 610, "{}: {r:?}", v.name);
        assert!(r.pages >= 3, "{}: paged: {r:?}", v.name);
        assert!(r.retried > 0, "{}: the faults were retried: {r:?}", v.name);
        let reqs = (v.requests)();
        assert!(
            reqs.iter().any(|q| q.status == 500),
            "{}: a 500 was served",
            v.name
        );
        assert!(
            reqs.iter().any(|q| q.status == 429),
            "{}: a 429 was served",
            v.name
        );
        assert_eq!(
            u64::try_from(reqs.len()).unwrap(),
            r.requests,
            "{}: requests counted",
            v.name
        );
        assert_pulled(&store, &book, &v);
        assert!(
            cursor(&store, v.name).unwrap()["since"].is_string(),
            "{}: watermark stored",
            v.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sync_fetches_only_what_changed_where_the_api_allows_it() {
    for make in VENDORS {
        let book = book(240);
        let v = make(&book, Faults::default());
        let config = Setup::new().config(&v.instance);
        let store = SledStore::temporary().unwrap();
        let first = ok(&sync(&config, &store).await, v.name);
        assert!(!first.incremental);
        assert_eq!(first.fetched, 240);
        let newest = book.max_updated_at().unwrap();

        (v.clear)();
        let ids = book.ids();
        for id in [ids[3], ids[150]] {
            book.update(id, |c| c.first_name = format!("Changed {}", c.id))
                .unwrap();
        }
        let second = ok(&sync(&config, &store).await, v.name);
        let reqs = (v.requests)();
        for id in [ids[3], ids[150]] {
            let c = book.get(id).unwrap();
            let cust = store
                .customer(&store.id_for_email(&c.email).unwrap().unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(
                cust.attributes["first_name"],
                json!(format!("Changed {id}")),
                "{}",
                v.name
            );
        }
        assert_eq!(second.updated, 2, "{}: {second:?}", v.name);
        assert_eq!(store.customer_count().unwrap(), 240);
        if !v.incremental {
            // SuperOffice: no change filter is known to work, so every sync lists all.
            assert!(!second.incremental);
            assert_eq!(second.fetched, 240);
            continue;
        }
        assert!(second.incremental, "{}: {second:?}", v.name);
        // The changed two, plus at most the newest record of the first sync where the
        // API's filter is inclusive (HubSpot GTE, Shopify updated_at_min).
        assert!((2..=3).contains(&second.fetched), "{}: {second:?}", v.name);
        let first_req = &reqs[0];
        let newest_ms = newest.timestamp_millis().to_string();
        let newest_iso = klantreis::time::format(newest);
        match v.prefix {
            "hubspot" => {
                assert_eq!(first_req.method, "POST");
                assert_eq!(first_req.path, "/crm/v3/objects/contacts/search");
                let body = first_req.json().unwrap();
                assert_eq!(
                    body["filterGroups"][0]["filters"][0]["propertyName"],
                    "lastmodifieddate"
                );
                assert_eq!(
                    body["filterGroups"][0]["filters"][0]["value"],
                    json!(newest_ms)
                );
            }
            "mailchimp" => assert_eq!(
                first_req.query_param("since_last_changed"),
                Some(newest_iso)
            ),
            "klaviyo" => assert_eq!(
                first_req.query_param("filter"),
                Some(format!("greater-than(updated,{newest_iso})"))
            ),
            "shopify" => assert_eq!(first_req.query_param("updated_at_min"), Some(newest_iso)),
            "woocommerce" => assert_eq!(first_req.query_param("modified_after"), Some(newest_iso)),
            other => panic!("{other}"),
        }
        // Nothing changed: the third sync gets at most the records at the watermark
        // itself (both changes carry the same time) where the filter is inclusive.
        let third = ok(&sync(&config, &store).await, v.name);
        assert!(third.fetched <= 2, "{}: {third:?}", v.name);
        assert_eq!(third.created + third.updated, 0, "{}: {third:?}", v.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_search_past_10000_changes_starts_a_new_search_from_the_newest_change_seen() {
    let book = book(10_050);
    let v = hubspot_vendor(&book, Faults::default());
    let config = Setup::new().config(&v.instance);
    let store = SledStore::temporary().unwrap();
    ok(&sync(&config, &store).await, "crm");
    (v.clear)();
    // Every contact changes, each a second after the one before.
    let base = at(CHANGED_AT);
    for (i, id) in book.ids().into_iter().enumerate() {
        book.update_quietly(id, |c| {
            c.first_name = "New".into();
            c.updated_at = base + chrono::Duration::seconds(i as i64);
        });
    }
    let r = ok(&sync(&config, &store).await, "crm");
    assert!(r.incremental);
    // The search refuses to page past 10,000 (the fake answers 400, as HubSpot does):
    // the second search starts at the newest change the first one delivered.
    let filters: Vec<String> = (v.requests)()
        .iter()
        .filter_map(|q| q.json())
        .filter(|b| b["after"].is_null())
        .map(|b| {
            b["filterGroups"][0]["filters"][0]["value"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let newest_of_first = base + chrono::Duration::seconds(9_999);
    assert_eq!(filters.len(), 2, "{filters:?}");
    assert_eq!(filters[1], newest_of_first.timestamp_millis().to_string());
    assert_eq!(r.fetched, 10_051, "the boundary record comes twice: {r:?}");
    assert_eq!(r.updated, 10_050);
    let all = dump(&store);
    assert!(all
        .iter()
        .all(|c| c.attributes["first_name"] == json!("New")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_lists_everything_again() {
    let book = book(120);
    let v = hubspot_vendor(&book, Faults::default());
    let config = Setup::new().config(&v.instance);
    let store = SledStore::temporary().unwrap();
    ok(&sync(&config, &store).await, "crm");
    (v.clear)();
    let r = ok(&sync_with(&config, &store, Some("crm"), true).await, "crm");
    assert!(!r.incremental);
    assert_eq!((r.fetched, r.unchanged), (120, 120));
    assert!(
        (v.requests)().iter().all(|q| q.method == "GET"),
        "the list endpoint, not search"
    );
}

// ------------------------------------------------------------------------ identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_person_in_three_tools_is_one_customer_with_all_three_ids() {
    let t = at("2024-03-01T10:00:00Z");
    let person = |id: u64, email: &str| Contact::new(id, email, "Ann", "Lee", t);
    let mut ann_mc = person(2, "ann.lee@example.com");
    ann_mc.tags = vec!["newsletter".into()];
    let mut ann_shop = person(3, "ANN.LEE@EXAMPLE.COM");
    ann_shop.tags = vec!["vip".into()];
    let hub = ContactBook::new(vec![
        person(1, "Ann.Lee@Example.com"),
        person(11, "bo@example.com"),
    ]);
    let mc = ContactBook::new(vec![ann_mc, person(12, "cy@example.com")]);
    let shop = ContactBook::new(vec![ann_shop, person(13, "Bo@Example.com")]);
    let (h, m, s) = (
        hubspot_vendor(&hub, Faults::default()),
        mailchimp_vendor(&mc, Faults::default()),
        shopify_vendor(&shop, Faults::default()),
    );
    let config = Setup::new().config(&format!("{}{}{}", h.instance, m.instance, s.instance));
    let store = SledStore::temporary().unwrap();
    let report = sync(&config, &store).await;
    for name in ["crm", "news", "shop"] {
        ok(&report, name);
    }
    // Ann, Bo (HubSpot and Shopify) and Cy.
    assert_eq!(store.customer_count().unwrap(), 3);
    let id = store.id_for_email("ann.lee@example.com").unwrap().unwrap();
    assert_eq!(id, "crm:1", "the first source to bring a person names them");
    let ann = store.customer(&id).unwrap().unwrap();
    assert_eq!(ann.attributes["email"], json!("ann.lee@example.com"));
    assert_eq!(ann.attributes["hubspot_id"], json!("1"));
    assert_eq!(
        ann.attributes["mailchimp_id"],
        json!(subscriber_hash("ann.lee@example.com"))
    );
    assert_eq!(
        ann.attributes["shopify_id"],
        json!(shopify::customer_id(3).to_string())
    );
    assert_eq!(
        ann.attributes["tags"],
        json!(["newsletter", "vip"]),
        "tags are a union over sources"
    );
    let bo = store
        .customer(&store.id_for_email("BO@example.com").unwrap().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(bo.id, "crm:11");
    assert_eq!(
        bo.attributes["shopify_id"],
        json!(shopify::customer_id(13).to_string())
    );

    // Syncing again (in any letter case) changes nothing.
    let again = sync_with(&config, &store, None, true).await;
    for name in ["crm", "news", "shop"] {
        let r = ok(&again, name);
        assert_eq!((r.created, r.updated), (0, 0), "{name}: {r:?}");
    }
    assert_eq!(store.customer_count().unwrap(), 3);
}

// ------------------------------------------------------- interruptions and resuming

/// A store after one clean sync of `instances`.
async fn clean_run(instances: &str) -> (Vec<Customer>, Option<Value>, String) {
    let config = Setup::new().config(instances);
    let store = SledStore::temporary().unwrap();
    let report = sync(&config, &store).await;
    let (name, r) = report.iter().next().unwrap();
    assert_eq!(r.error, None);
    (dump(&store), cursor(&store, name), name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_half_way_resumes_and_ends_with_the_same_store_as_a_clean_run() {
    // Cursor (HubSpot), offset (Mailchimp) and page-number (WooCommerce) pagination.
    for make in [
        hubspot_vendor as MakeVendor,
        mailchimp_vendor,
        woocommerce_vendor,
    ] {
        let book = book(2000);
        let v = make(&book, Faults::default());
        let instance = format!("{}page_size = 100\n", v.instance);
        let (clean, clean_cursor, name) = clean_run(&instance).await;
        (v.clear)();

        let config = Setup::new().config(&instance);
        let store = SledStore::temporary().unwrap();
        // "Kill" the sync: drop its future once 4 pages are committed.
        let pages = AtomicU64::new(0);
        let kill = tokio::sync::Notify::new();
        let progress = |_: Progress<'_>| {
            if pages.fetch_add(1, Ordering::SeqCst) + 1 == 4 {
                kill.notify_one();
            }
        };
        let opts = SyncOptions::default();
        tokio::select! {
            r = connectors::sync_all(&config, &store, None, &opts, clock(), &progress) => {
                panic!("{name}: the sync ended before it was killed: {r:?}")
            }
            _ = kill.notified() => {}
        }
        let stored = store.customer_count().unwrap();
        assert!(
            (400..2000).contains(&stored),
            "{name}: killed half way with {stored} stored"
        );
        assert_eq!(stored % 100, 0, "{name}: whole pages only");
        assert!(
            cursor(&store, &name).unwrap()["run"].is_object(),
            "{name}: the position is stored"
        );

        let r = ok(&sync(&config, &store).await, &name);
        assert!(r.resumed, "{name}: {r:?}");
        assert_eq!(
            r.fetched,
            2000 - stored,
            "{name}: resumes after the last committed page"
        );
        assert_eq!(
            dump(&store),
            clean,
            "{name}: the same store as one clean run"
        );
        assert_eq!(
            cursor(&store, &name),
            clean_cursor,
            "{name}: the same sync position"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_fails_hard_half_way_loses_nothing_and_the_rerun_completes() {
    let book = book(900);
    let v = klaviyo_vendor(&book, Faults::default());
    let (clean, clean_cursor, _) = clean_run(&v.instance).await;

    let config = Setup::new().config(&v.instance);
    let store = SledStore::temporary().unwrap();
    // After 3 pages every request fails with a 500, for longer than the retries last.
    let pages = AtomicU64::new(0);
    let progress = |_: Progress<'_>| {
        if pages.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
            (v.set_faults)(Faults {
                fail_every: Some(1),
                ..Default::default()
            });
        }
    };
    let report = connectors::sync_all(
        &config,
        &store,
        None,
        &SyncOptions::default(),
        clock(),
        &progress,
    )
    .await
    .unwrap();
    let r = &report["flows"];
    let err = r.error.as_deref().expect("the instance stopped");
    assert!(err.starts_with("flows: GET /api/profiles"), "{err}");
    assert!(err.contains("500"), "{err}");
    let stored = store.customer_count().unwrap();
    assert!((300..900).contains(&stored), "{stored}");

    (v.set_faults)(Faults::default());
    let r = ok(&sync(&config, &store).await, "flows");
    assert!(r.resumed);
    assert_eq!(r.fetched, 900 - stored);
    assert_eq!(dump(&store), clean);
    assert_eq!(cursor(&store, "flows"), clean_cursor);
}

// -------------------------------------------------------------------- failures

/// A customer put there before any sync; no failure may touch it.
fn seeded_store() -> (SledStore, Customer) {
    let store = SledStore::temporary().unwrap();
    let mut c = Customer::new("c-earlier");
    c.attributes
        .insert("email".into(), json!("earlier@example.com"));
    c.attributes.insert("orders_count".into(), json!(3));
    store.merge_customers(vec![c.clone()]).unwrap();
    (store, c)
}

fn assert_kept(store: &SledStore, c: &Customer) {
    assert_eq!(
        store.customer(&c.id).unwrap().as_ref(),
        Some(c),
        "what was stored before is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_stop_that_instance_with_the_variable_named_and_others_go_on() {
    let book = book(150);
    let h = hubspot_vendor(&book, Faults::default());
    let m = mailchimp_vendor(&book, Faults::default());
    std::env::set_var("KLANTREIS_TEST_WRONG_HUBSPOT_TOKEN", "pat-na1-wrong");
    let bad_hub = h.instance.replace(
        hubspot::DEFAULT_TOKEN,
        "${KLANTREIS_TEST_WRONG_HUBSPOT_TOKEN}",
    );
    let config = Setup::new().config(&format!("{bad_hub}{}", m.instance));
    let (store, earlier) = seeded_store();
    let report = sync(&config, &store).await;
    let err = report["crm"].error.as_deref().expect("crm stops");
    assert!(err.contains("refused the credentials (401"), "{err}");
    assert!(
        err.contains("`token` (from ${KLANTREIS_TEST_WRONG_HUBSPOT_TOKEN})"),
        "{err}"
    );
    assert!(
        !err.contains("pat-na1-wrong"),
        "never the secret itself: {err}"
    );
    assert_eq!(report["crm"].requests, 1, "a 401 is not retried");
    let news = ok(&report, "news");
    assert_eq!(news.created, 150, "the other instance goes on");
    assert_kept(&store, &earlier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_variable_is_named_by_check_and_by_sync() {
    let book = book(10);
    let h = hubspot_vendor(&book, Faults::default());
    let instance = h
        .instance
        .replace(hubspot::DEFAULT_TOKEN, "${KLANTREIS_TEST_SURELY_UNSET}");
    let setup = Setup::new();
    let config = setup.config(&instance);
    let problems = connectors::check(&config);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = problems[0].to_string();
    let line = Setup::text(&instance)
        .lines()
        .position(|l| l.starts_with("token ="))
        .unwrap()
        + 1;
    assert!(
        p.contains(&format!("config.toml:{line}:1: connector crm: `token`")),
        "{p}"
    );
    assert!(p.contains("KLANTREIS_TEST_SURELY_UNSET is not set"), "{p}");

    let (store, earlier) = seeded_store();
    let report = sync(&config, &store).await;
    let err = report["crm"].error.as_deref().unwrap();
    assert!(
        err.contains("KLANTREIS_TEST_SURELY_UNSET is not set"),
        "{err}"
    );
    assert!(
        (h.requests)().is_empty(),
        "nothing was sent without the credential"
    );
    assert_kept(&store, &earlier);
    assert_eq!(store.customer_count().unwrap(), 1);
}

#[test]
fn an_unknown_definition_is_a_config_error_at_its_place() {
    let setup = Setup::new();
    let instance = "[connectors.crm]\ntype = \"hubspto\"\ntoken = \"x\"\n";
    let err = setup.parse(instance).unwrap_err();
    let line = Setup::text(instance)
        .lines()
        .position(|l| l.starts_with("type ="))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!(
            "config.toml:{line}:8: unknown connector type \"hubspto\""
        )),
        "{err}"
    );
    assert!(err.contains("known: brevo, file, hubspot"), "{err}");
    let err = setup
        .parse("[connectors.crm]\ntype = \"hubspot\"\ntoken = \"x\"\ncolour = \"red\"\n")
        .unwrap_err();
    assert!(
        err.contains("unknown key `colour` for a hubspot connector"),
        "{err}"
    );
    let err = setup
        .parse("[connectors.news]\ntype = \"mailchimp\"\napi_key = \"x-us6\"\n")
        .unwrap_err();
    assert!(err.contains("connector \"news\" needs `list_id`"), "{err}");
}

/// A HubSpot-shaped server (wiremock) whose pages the test writes by hand.
fn hs_record(id: &str, email: Value) -> Value {
    json!({"id": id, "properties": {"email": email, "firstname": format!("F{id}"), "lastname": "L"},
           "createdAt": "2024-03-01T10:00:00.000Z", "updatedAt": "2024-03-05T08:00:00.000Z", "archived": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_stops_the_instance_keeps_earlier_pages_and_the_rerun_resumes_there() {
    use wiremock::matchers::{method, path, query_param, query_param_is_missing};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    let page1 = json!({"results": [hs_record("1", json!("a@example.com")), hs_record("2", json!("b@example.com"))],
                       "paging": {"next": {"after": "p2"}}});
    Mock::given(method("GET"))
        .and(path("/crm/v3/objects/contacts"))
        .and(query_param_is_missing("after"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page1))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/crm/v3/objects/contacts"))
        .and(query_param("after", "p2"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>upstream hiccup</html>"))
        .mount(&server)
        .await;
    let instance = format!(
        "[connectors.crm]\ntype = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"t\"\n{QUICK}",
        server.uri()
    );
    let config = Setup::new().config(&instance);
    let (store, earlier) = seeded_store();
    let report = sync(&config, &store).await;
    let err = report["crm"].error.as_deref().unwrap();
    assert!(
        err.starts_with(
            "crm: malformed page 2 (GET /crm/v3/objects/contacts): the body is not JSON"
        ),
        "{err}"
    );
    assert_eq!(store.customer_count().unwrap(), 3, "page 1 is stored");
    assert_kept(&store, &earlier);

    // A page whose records are not a list is malformed too.
    server.reset().await;
    Mock::given(method("GET"))
        .and(query_param("after", "p2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"results": {"oops": 1}})))
        .mount(&server)
        .await;
    let err = sync(&config, &store).await["crm"].error.clone().unwrap();
    assert!(
        err.contains("expected a list of records at \"results\", found an object"),
        "{err}"
    );

    // Fixed: the rerun asks for page 2, not page 1.
    server.reset().await;
    Mock::given(method("GET"))
        .and(query_param("after", "p2"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"results": [hs_record("3", json!("c@example.com"))]})),
        )
        .mount(&server)
        .await;
    let r = ok(&sync(&config, &store).await, "crm");
    assert!(r.resumed);
    assert_eq!((r.fetched, r.created), (1, 1));
    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].url.query().unwrap().contains("after=p2"));
    assert_eq!(store.customer_count().unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_fail_mapping_are_reported_with_their_id_and_skipped() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    let mut no_id = hs_record("x", json!("n@example.com"));
    no_id.as_object_mut().unwrap().remove("id");
    let page = json!({"results": [hs_record("1", json!("a@example.com")), no_id,
                                  hs_record("17", json!("not-an-address")), hs_record("18", json!(42)),
                                  hs_record("2", Value::Null)]});
    Mock::given(method("GET"))
        .and(path("/crm/v3/objects/contacts"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page))
        .mount(&server)
        .await;
    let instance = format!(
        "[connectors.crm]\ntype = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"t\"\n{QUICK}",
        server.uri()
    );
    let config = Setup::new().config(&instance);
    let store = SledStore::temporary().unwrap();
    let report = sync(&config, &store).await;
    let r = &report["crm"];
    assert_eq!(r.error, None);
    assert_eq!(
        (r.fetched, r.created, r.skipped, r.errors),
        (5, 2, 3, 3),
        "{r:?}"
    );
    let skipped: Vec<(String, String)> = r
        .skipped_records
        .iter()
        .map(|s| (s.record.clone(), s.reason.clone()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            (
                "#2 of page 1".to_string(),
                "the record has no id".to_string()
            ),
            (
                "17".to_string(),
                "email \"not-an-address\" is not an address".to_string()
            ),
            ("18".to_string(), "email is not a string: 42".to_string()),
        ]
    );
    // A record without an email is kept under its source-prefixed id.
    assert_eq!(
        store.customer("crm:2").unwrap().unwrap().attributes["hubspot_id"],
        json!("2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspots_daily_limit_stops_at_once_with_its_message() {
    let book = book(30);
    let s = hubspot::start_blocking(hubspot::Config {
        contacts: book.clone(),
        faults: Faults {
            throttle_every: Some(1),
            ..Default::default()
        },
        policy_name: "DAILY".into(),
        ..Default::default()
    });
    let instance = format!(
        "[connectors.crm]\ntype = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"{}\"\n{QUICK}",
        s.base_url,
        hubspot::DEFAULT_TOKEN
    );
    let config = Setup::new().config(&instance);
    let store = SledStore::temporary().unwrap();
    let r = sync(&config, &store).await["crm"].clone();
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("HubSpot's daily API limit is reached"),
        "{r:?}"
    );
    assert_eq!(s.request_count(), 1, "waiting does not help, so no retries");
}

// ---------------------------------------------------------------- outbound requests

fn connector(instance: &str, name: &str) -> Connector {
    let setup = Setup::new();
    let config = setup.config(instance);
    let inst = config.connectors.iter().find(|c| c.name == name).unwrap();
    Connector::build(
        inst,
        &Registry::new(&config.connectors_dir),
        &config.base_dir,
        clock(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_reach_each_vendor_in_its_wire_format() {
    let book = book(5);
    let ann = book.all()[0].clone();
    let customer = json!({"email": ann.email, "hubspot_id": ann.id.to_string(), "first_name": "Ann", "last_name": "Lee"});

    // HubSpot: set a property (values go as strings).
    let h = hubspot_vendor(&book, Faults::default());
    let c = connector(&h.instance, "crm");
    let r = c
        .send("update_contact", &json!({"customer": customer, "properties": {"lifecyclestage": "customer", "favorite": 7}}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(book.get(ann.id).unwrap().lifecycle_stage, "customer");
    assert_eq!(book.get(ann.id).unwrap().properties["favorite"], "7");

    // Mailchimp: tags, addressed by the md5 of the lower-cased email.
    let m = mailchimp_vendor(&book, Faults::default());
    let c = connector(&m.instance, "news");
    let r = c
        .send(
            "add_tags",
            &json!({"customer": customer, "tags": ["VIP", "b2b"]}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body.clone()), (204, Value::Null));
    c.send(
        "remove_tags",
        &json!({"customer": customer, "tags": ["b2b"]}),
    )
    .await
    .unwrap();
    let reqs = (m.requests)();
    let tag_req = reqs.iter().find(|q| q.method == "POST").unwrap();
    assert_eq!(
        tag_req.path,
        format!(
            "/3.0/lists/{}/members/{}/tags",
            mailchimp::DEFAULT_LIST_ID,
            subscriber_hash(&ann.email)
        )
    );
    assert_eq!(
        tag_req.json().unwrap(),
        json!({"tags": [{"name": "VIP", "status": "active"}, {"name": "b2b", "status": "active"}], "is_syncing": false})
    );

    // Klaviyo: an event, with the revision header and the JSON:API media type.
    let k = Arc::new(klaviyo::start_blocking(klaviyo::Config {
        contacts: book.clone(),
        ..Default::default()
    }));
    let inst = format!(
        "[connectors.flows]\ntype = \"klaviyo\"\nbase_url = \"{}\"\napi_key = \"{}\"\n",
        k.base_url,
        klaviyo::DEFAULT_API_KEY
    );
    let c = connector(&inst, "flows");
    let ctx = json!({"customer": customer, "metric": "Review Requested", "properties": {"OrderId": "1001"},
                     "time": "2024-03-01T10:00:00+00:00", "value": 49.99, "unique_id": "order-1001-review"});
    assert_eq!(c.send("create_event", &ctx).await.unwrap().status, 202);
    c.send("create_event", &ctx).await.unwrap();
    let events = k.events();
    assert_eq!(events.len(), 1, "the unique_id makes a repeat harmless");
    assert_eq!(events[0].metric, "Review Requested");
    assert_eq!(k.duplicates(), 1);
    let req = k
        .requests()
        .into_iter()
        .find(|q| q.method == "POST")
        .unwrap();
    assert_eq!(req.header("revision"), Some(klaviyo::REVISION));
    assert_eq!(req.header("content-type"), Some(klaviyo::MEDIA_TYPE));

    // Shopify: a discount code through GraphQL; userErrors are an error.
    let s = shopify_vendor(&book, Faults::default());
    let c = connector(&s.instance, "shop");
    let ctx = json!({"code": "THANKS-7F3K", "percentage": 0.1, "title": "Review thank-you 10%",
                     "starts_at": "2024-03-01T00:00:00Z"});
    assert_eq!(
        c.send("create_discount_code", &ctx).await.unwrap().status,
        200
    );
    let err = c
        .send("create_discount_code", &ctx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TAKEN") || err.contains("taken") || err.contains("unique"),
        "{err}"
    );

    // WooCommerce: a coupon.
    let w = Arc::new(woocommerce::start_blocking(woocommerce::Config {
        contacts: book.clone(),
        ..Default::default()
    }));
    let inst = format!(
        "[connectors.woo]\ntype = \"woocommerce\"\nurl = \"{}\"\nconsumer_key = \"{}\"\nconsumer_secret = \"{}\"\n",
        w.base_url,
        woocommerce::DEFAULT_CONSUMER_KEY,
        woocommerce::DEFAULT_CONSUMER_SECRET
    );
    let c = connector(&inst, "woo");
    let r = c
        .send(
            "create_coupon",
            &json!({"code": "10off", "amount": 10, "email": "ann@example.com"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.body["amount"], json!("10.00"));
    assert_eq!(w.coupons().len(), 1);

    // Brevo: a transactional email.
    let b = brevo::start_blocking(brevo::Config::default());
    let inst = format!(
        "[connectors.mail]\ntype = \"brevo\"\nbase_url = \"{}/v3\"\napi_key = \"{}\"\nsender_email = \"noreply@shop.example\"\nsender_name = \"Shop\"\n",
        b.base_url,
        brevo::DEFAULT_API_KEY
    );
    let c = connector(&inst, "mail");
    let r = c
        .send("send_email", &json!({"customer": customer, "template_id": 12, "params": {"firstName": "Ann"}, "tags": ["review-request"]}))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let sent = b.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, vec![ann.email.clone()]);
    assert_eq!(sent[0].template_id, Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_is_signed_and_retried_only_when_safe() {
    use hmac::{Hmac, Mac};
    let hook = webhook::start_blocking(webhook::Config::with_statuses(&[200]));
    let inst = format!(
        "[connectors.hook]\ntype = \"webhook\"\nurl = \"{}/in\"\nsecret = \"s3cret\"\n{QUICK}",
        hook.base_url
    );
    let c = connector(&inst, "hook");
    let payload = json!({"customer": "c1", "phase": "koop"});
    c.send("send", &json!({"payload": payload})).await.unwrap();
    let req = &hook.requests()[0];
    assert_eq!(req.path, "/in");
    assert_eq!(req.json().unwrap(), payload);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(&req.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        req.header("x-klantreis-signature"),
        Some(format!("sha256={want}").as_str())
    );

    // A POST that got a 500 may have done its work: it is not repeated.
    hook.clear_requests();
    hook.push_statuses(&[500]);
    let err = c
        .send("send", &json!({"payload": payload}))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("answered 500"), "{err}");
    assert_eq!(hook.requests().len(), 1);
}

#[test]
fn outbound_templates_render_without_sending() {
    let c = connector(
        "[connectors.news]\ntype = \"mailchimp\"\napi_key = \"k-us6\"\nlist_id = \"57afe96172\"\n",
        "news",
    );
    let r = c
        .render_request(
            "add_tags",
            &json!({"customer": {"email": " Urist.McVankab@freddiesjokes.com "}, "tags": ["VIP"]}),
        )
        .unwrap();
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.url,
        "https://us6.api.mailchimp.com/3.0/lists/57afe96172/members/62eeb292278cc15f5817cb78f7790b08/tags"
    );
    assert!(
        r.headers.is_empty(),
        "no credentials in a rendering: {:?}",
        r.headers
    );
    let err = c
        .render_request("add_tags", &json!({"customer": {}}))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("news: requests.add_tags.path:"), "{err}");
    let err = c
        .render_request("nope", &json!({}))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "news: no request named \"nope\" (this connector has: add_tags, remove_tags)"
    );
}

// ------------------------------------------------------------- definitions and check

#[test]
fn a_new_rest_source_is_a_file_in_connectors_and_an_instance() {
    let setup = Setup::new();
    let dir = setup.dir.path().join("connectors");
    std::fs::create_dir_all(&dir).unwrap();
    // The README's worked example, verbatim.
    let readme =
        std::fs::read_to_string(crate::support::repo().join("connectors/README.md")).unwrap();
    let def = readme
        .split("```toml\n# connectors/acme.toml")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the README has the acme example");
    std::fs::write(
        dir.join("acme.toml"),
        format!("# connectors/acme.toml{def}"),
    )
    .unwrap();
    let config = setup.config("[connectors.acme]\ntype = \"acme\"\nbase_url = \"https://acme.example\"\napi_key = \"k\"\n");
    assert!(
        connectors::check(&config).is_empty(),
        "{:?}",
        connectors::check(&config)
    );
    let c = connector_in(&config, "acme");
    assert!(c.pulls());

    // A broken template in a definition is reported at its line in that file.
    std::fs::write(
        dir.join("broken.toml"),
        "base_url = \"https://x\"\n[requests.ping]\npath = \"/{{ x \"\n",
    )
    .unwrap();
    let problems: Vec<String> = connectors::check(&config)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("broken.toml:3:8: bad template"),
        "{problems:?}"
    );
}

fn connector_in(config: &Config, name: &str) -> Connector {
    let inst = config.connectors.iter().find(|c| c.name == name).unwrap();
    Connector::build(
        inst,
        &Registry::new(&config.connectors_dir),
        &config.base_dir,
        clock(),
    )
    .unwrap()
}

#[test]
fn secrets_never_show_in_debug_output() {
    let setup = Setup::new();
    let config =
        setup.config("[connectors.crm]\ntype = \"hubspot\"\ntoken = \"pat-na1-secret-value\"\n");
    let shown = format!("{config:?} {:?}", connector_in(&config, "crm"));
    assert!(!shown.contains("secret-value"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_makes_one_authenticated_request_per_instance() {
    let book = book(3);
    let h = hubspot_vendor(&book, Faults::default());
    let k = klaviyo_vendor(&book, Faults::default());
    let bad = k.instance.replace(klaviyo::DEFAULT_API_KEY, "pk_wrong");
    let config = Setup::new().config(&format!("{}{bad}", h.instance));
    let checks = connectors::check_online(&config, clock()).await;
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert_eq!(
        (checks[0].instance.as_str(), checks[0].ok),
        ("crm", true),
        "{checks:?}"
    );
    assert!(
        checks[0]
            .message
            .starts_with("GET /crm/v3/objects/contacts answered 200"),
        "{checks:?}"
    );
    assert_eq!(
        (checks[1].instance.as_str(), checks[1].ok),
        ("flows", false),
        "{checks:?}"
    );
    assert!(
        checks[1].message.contains("refused the credentials (401"),
        "{checks:?}"
    );
    let reqs = (h.requests)();
    assert_eq!(reqs.len(), 1, "one cheap request");
    assert_eq!(reqs[0].query_param("limit").as_deref(), Some("1"));
    assert_eq!(
        (k.requests)()[0].query_param("page[size]").as_deref(),
        Some("1")
    );
}

// ------------------------------------------------------------------------- the CLI

#[test]
fn klantreis_sync_pulls_all_six_vendors_into_one_customer_per_person() {
    // All six serve the same people, with 500s and 429s along the way.
    let book = book(250);
    let faults = Faults {
        fail_every: Some(3),
        throttle_every: Some(5),
        ..Default::default()
    };
    let vendors: Vec<Vendor> = VENDORS.iter().map(|make| make(&book, faults)).collect();
    let sb = Sandbox::shipped();
    let config = std::fs::read_to_string(sb.config()).unwrap();
    // The shipped demo instance points at examples/, which this sandbox lacks.
    let config = config.replace(
        "[connectors.demo]\ntype = \"file\"\npath = \"examples/customers.jsonl\"\n",
        "",
    );
    // Pages of 50, so that every vendor pages and meets the faults.
    let instances: String = vendors
        .iter()
        .map(|v| format!("{}page_size = 50\n", v.instance))
        .collect();
    sb.write("config.toml", &format!("{config}\n{instances}"));
    let o = sb.run(&["sync", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // Instances go in name order: crm (HubSpot) names everyone, the rest join by email.
    assert_eq!(v["crm"]["created"], json!(250), "{v:#}");
    for name in ["crm", "flows", "news", "shop", "so", "woo"] {
        assert_eq!(v[name]["fetched"], json!(250), "{name}: {v:#}");
        assert_eq!(v[name]["errors"], json!(0), "{name}: {v:#}");
        assert!(v[name]["retried"].as_u64().unwrap() > 0, "{name}: {v:#}");
        if name != "crm" {
            assert_eq!(
                (&v[name]["created"], &v[name]["updated"]),
                (&json!(0), &json!(250)),
                "{name}: {v:#}"
            );
        }
    }
    let store = SledStore::open(&sb.path().join("data/klantreis"), 8).unwrap();
    assert_eq!(store.customer_count().unwrap(), 250);
    for c in book.all() {
        let cust = store
            .customer(&store.id_for_email(&c.email).unwrap().unwrap())
            .unwrap()
            .unwrap();
        for v in &vendors {
            assert_eq!(
                cust.attributes[&format!("{}_id", v.prefix)],
                json!((v.source_id)(&c))
            );
        }
    }
    drop(store);

    let o = sb.run(&["sync", "crm"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("crm: fetched "), "{}", stdout(&o));
    assert!(stdout(&o).contains("(incremental)"), "{}", stdout(&o));
    let o = sb.run(&["sync", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no connector instance named \"nosuch\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn nurture_syncs_the_demo_file_first_unless_told_not_to() {
    let sb = Sandbox::shipped_with_examples();
    let o = sb.run(&["nurture", "--json", "--now", NOW, "--no-sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["evaluated"], json!(0));
    let o = sb.run(&["nurture", "--json", "--now", NOW]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["evaluated"], json!(300));
    assert!(
        stderr(&o).contains("sync demo: fetched 300, created 300"),
        "{}",
        stderr(&o)
    );
    let o = sb.run(&["check", "--online"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("online ok demo: "), "{}", stdout(&o));
}
