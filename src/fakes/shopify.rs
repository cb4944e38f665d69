//! Fake Shopify Admin API and webhook helpers (API-NOTES D).
//!
//! Admin API, under `/admin/api/{version}/` (`version` is `YYYY-MM` or `unstable`,
//! anything else is a 404):
//! - `GET customers.json` (REST, legacy but still served): `limit` (default 50,
//!   clamped to 250), `page_info`, `updated_at_min` / `updated_at_max` (inclusive),
//!   `since_id`, `fields`. Ordered by id. Pagination is the `Link` header with
//!   `<...customers.json?limit=N&page_info=...>; rel="next"` and `rel="previous"`; the
//!   cursor carries the filters, and sending a filter together with `page_info` is a
//!   400, as on the real API (exact message UNCONFIRMED). Customer ids come from
//!   [`customer_id`] and are above 2^53, so a client that parses them into `f64` loses
//!   them. The shape is the REST customer up to 2024-10 (with `tags` as `"a, b"` and
//!   `email_marketing_consent`); times are in the shop's offset
//!   ([`Config::utc_offset_minutes`], -05:00 by default). `GET customers/{id}.json` too.
//! - `POST price_rules.json` then `POST price_rules/{id}/discount_codes.json` (D6):
//!   the exact shapes of D6, answered with 201 (UNCONFIRMED). Missing or invalid fields
//!   give 422 `{"errors":{"field":["can't be blank"]}}`; a code that exists (case-
//!   insensitively, REST or GraphQL) gives 422 `{"errors":{"code":["must be unique"]}}`.
//! - `POST graphql.json` with the `discountCodeBasicCreate` mutation (D6): the input
//!   comes from `variables.basicCodeDiscount` (or the only object variable); invalid
//!   input is HTTP 200 with `userErrors` (`BLANK`, `INVALID`, `TAKEN`). Other operations
//!   get a GraphQL `errors` array. Throttling on GraphQL answers HTTP 200 with the D7
//!   `THROTTLED` body (200 versus 429 is UNCONFIRMED).
//! - Auth: `X-Shopify-Access-Token`, else 401
//!   `{"errors":"[API] Invalid API key or access token (unrecognized login or wrong password)"}`.
//! - REST responses carry `X-Shopify-Shop-Api-Call-Limit: used/40` (the used count
//!   follows a configured rate limit, else 1). A REST 429 is
//!   `{"errors":"Exceeded 2 calls per second for api client. ..."}` and **always** has
//!   `Retry-After`, written as Shopify does, `2.0` ([`Faults::retry_after_secs`] or 2):
//!   a client that only parses integers must fall back gracefully.
//!
//! Created codes are kept: [`Shopify::discount_codes`], [`Shopify::price_rules`].
//!
//! Webhooks (D1–D5): [`sign`], [`Delivery`] (headers and sending) and sample payloads
//! ([`sample_payload`]) with 64-bit ids kept exact.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::Response;
use chrono::{DateTime, FixedOffset, Utc};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::contacts::{Consent, Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{
    append_header, b64url, b64url_decode, fake_uuid, hmac_sha256_base64, iso_in_offset, json,
    parse_iso, segments, set_header, url_with,
};

/// The access token the fake accepts by default.
pub const DEFAULT_TOKEN: &str = "shpat_00000000000000000000000000000000";
/// The API version used in sample URLs and webhook headers.
pub const DEFAULT_API_VERSION: &str = "2024-10";
pub const DEFAULT_SHOP_DOMAIN: &str = "klantreis-test.myshopify.com";
/// Customer ids are `CUSTOMER_ID_BASE + contact id`: far above 2^53.
pub const CUSTOMER_ID_BASE: u64 = 7_000_000_000_000_000_000;
const PRICE_RULE_ID_BASE: u64 = 996_606_713;
const DISCOUNT_ID_BASE: u64 = 1_054_381_139;

/// The Shopify customer id of a contact.
pub fn customer_id(contact_id: u64) -> u64 {
    CUSTOMER_ID_BASE + contact_id
}

/// The contact id behind a Shopify customer id.
pub fn contact_id(customer_id: u64) -> Option<u64> {
    customer_id.checked_sub(CUSTOMER_ID_BASE)
}

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub token: String,
    pub shop_domain: String,
    pub contacts: ContactBook,
    pub faults: Faults,
    /// The shop's UTC offset for the times it shows.
    pub utc_offset_minutes: i32,
    /// The bucket size shown in `X-Shopify-Shop-Api-Call-Limit`.
    pub call_limit: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            token: DEFAULT_TOKEN.to_string(),
            shop_domain: DEFAULT_SHOP_DOMAIN.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults::default(),
            utc_offset_minutes: -300,
            call_limit: 40,
        }
    }
}

/// How a discount code was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscountSource {
    Rest,
    GraphQl,
}

/// A discount code the fake created.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscountCode {
    pub id: u64,
    pub code: String,
    /// REST: the price rule it belongs to.
    pub price_rule_id: Option<u64>,
    /// GraphQL: `gid://shopify/DiscountCodeNode/<n>`.
    pub node_id: Option<String>,
    pub source: DiscountSource,
    /// REST: the price rule as answered; GraphQL: the `basicCodeDiscount` input.
    pub rule: Value,
}

/// The fake's state.
pub struct Shopify {
    token: String,
    shop_domain: String,
    contacts: ContactBook,
    offset: FixedOffset,
    call_limit: u32,
    price_rules: Mutex<Vec<Value>>,
    codes: Mutex<Vec<DiscountCode>>,
    next_id: AtomicU64,
}

impl Shopify {
    pub fn new(cfg: &Config) -> Self {
        Self {
            token: cfg.token.clone(),
            shop_domain: cfg.shop_domain.clone(),
            contacts: cfg.contacts.clone(),
            offset: FixedOffset::east_opt(cfg.utc_offset_minutes * 60)
                .unwrap_or(FixedOffset::east_opt(0).expect("zero")),
            call_limit: cfg.call_limit.max(1),
            price_rules: Mutex::new(Vec::new()),
            codes: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }

    pub fn shop_domain(&self) -> &str {
        &self.shop_domain
    }

    /// Price rules created over REST, as answered.
    pub fn price_rules(&self) -> Vec<Value> {
        self.price_rules.lock().clone()
    }

    /// Discount codes created over REST and GraphQL, in order.
    pub fn discount_codes(&self) -> Vec<DiscountCode> {
        self.codes.lock().clone()
    }

    fn time(&self, t: DateTime<Utc>) -> String {
        iso_in_offset(t, self.offset)
    }

    fn next(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub async fn start(cfg: Config) -> FakeServer<Shopify> {
    FakeServer::start(Shopify::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Shopify> {
    FakeServer::start_blocking(Shopify::new(&cfg), cfg.faults)
}

fn errors(status: u16, e: Value) -> Response {
    json(status, &json!({ "errors": e }))
}

fn is_graphql(req: &RecordedRequest) -> bool {
    req.path.ends_with("/graphql.json")
}

fn valid_version(v: &str) -> bool {
    let b = v.as_bytes();
    v == "unstable"
        || (b.len() == 7
            && b[4] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 4 || c.is_ascii_digit()))
}

impl Vendor for Shopify {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        match req.header("x-shopify-access-token") {
            Some(t) if t.trim() == self.token => Ok(()),
            _ => Err(errors(
                401,
                json!(
                    "[API] Invalid API key or access token (unrecognized login or wrong password)"
                ),
            )),
        }
    }

    fn server_error(&self, _req: &RecordedRequest) -> Response {
        errors(500, json!("Internal Server Error"))
    }

    fn throttled(&self, req: &RecordedRequest, t: &Throttle) -> Response {
        if is_graphql(req) {
            return json(
                200,
                &json!({
                    "errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED",
                        "documentation": "https://shopify.dev/api/usage/rate-limits"}}],
                    "extensions": {"cost": {"requestedQueryCost": 10, "actualQueryCost": null,
                        "throttleStatus": {"maximumAvailable": 2000.0, "currentlyAvailable": 0, "restoreRate": 100.0}}}
                }),
            );
        }
        let mut r = errors(
            429,
            json!("Exceeded 2 calls per second for api client. Reduce request rates to resume uninterrupted service."),
        );
        set_header(
            &mut r,
            "retry-after",
            &format!("{}.0", t.retry_after_secs.unwrap_or(2)),
        );
        set_header(
            &mut r,
            "x-shopify-shop-api-call-limit",
            &format!("{0}/{0}", self.call_limit),
        );
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (version, rest) = match segs.as_slice() {
            ["admin", "api", v, rest @ ..] if valid_version(v) => (*v, rest),
            _ => return errors(404, json!("Not Found")),
        };
        let mut r = match (req.method.as_str(), rest) {
            ("GET", ["customers.json"]) => self.customers(ctx, req, version),
            ("GET", ["customers", file]) if file.ends_with(".json") => {
                let id = file
                    .trim_end_matches(".json")
                    .parse::<u64>()
                    .ok()
                    .and_then(contact_id);
                match id.and_then(|id| self.contacts.get(id)) {
                    Some(c) => json(200, &json!({"customer": self.customer_json(&c)})),
                    None => errors(404, json!("Not Found")),
                }
            }
            ("POST", ["price_rules.json"]) => self.create_price_rule(req),
            ("POST", ["price_rules", id, "discount_codes.json"]) => {
                self.create_discount_code(req, id)
            }
            ("POST", ["graphql.json"]) => self.graphql(req),
            _ => errors(404, json!("Not Found")),
        };
        set_header(&mut r, "x-shopify-api-version", version);
        if !is_graphql(req) {
            let used = ctx.rate.map_or(1, |u| u.used);
            set_header(
                &mut r,
                "x-shopify-shop-api-call-limit",
                &format!("{used}/{}", self.call_limit),
            );
        }
        r
    }
}

/// Cursor state inside `page_info`.
#[derive(serde::Serialize, serde::Deserialize)]
struct PageInfo {
    /// `n`ext (after `k`) or `p`revious (before `k`).
    d: char,
    k: u64,
    min: Option<i64>,
    max: Option<i64>,
    since: Option<u64>,
}

fn consent_json(c: &Contact) -> Value {
    match c.consent {
        Consent::Subscribed => {
            json!({"state": "subscribed", "opt_in_level": "single_opt_in", "consent_updated_at": null})
        }
        Consent::Unsubscribed => {
            json!({"state": "unsubscribed", "opt_in_level": "single_opt_in", "consent_updated_at": null})
        }
        Consent::Pending => {
            json!({"state": "pending", "opt_in_level": "confirmed_opt_in", "consent_updated_at": null})
        }
        Consent::NotSubscribed => {
            json!({"state": "not_subscribed", "opt_in_level": null, "consent_updated_at": null})
        }
    }
}

impl Shopify {
    /// The REST customer (the shape up to 2024-10) of a contact.
    pub fn customer_json(&self, c: &Contact) -> Value {
        let id = customer_id(c.id);
        let mut consent = consent_json(c);
        if c.consent != Consent::NotSubscribed {
            consent["consent_updated_at"] = json!(self.time(c.created_at));
        }
        json!({
            "id": id,
            "email": c.email,
            "created_at": self.time(c.created_at),
            "updated_at": self.time(c.updated_at),
            "first_name": c.first_name,
            "last_name": c.last_name,
            "orders_count": 0,
            "state": "enabled",
            "total_spent": "0.00",
            "last_order_id": null,
            "note": null,
            "verified_email": true,
            "multipass_identifier": null,
            "tax_exempt": false,
            "tags": c.tags.join(", "),
            "last_order_name": null,
            "currency": "EUR",
            "phone": c.phone,
            "addresses": [],
            "tax_exemptions": [],
            "email_marketing_consent": consent,
            "sms_marketing_consent": null,
            "admin_graphql_api_id": format!("gid://shopify/Customer/{id}"),
        })
    }

    fn customers(&self, ctx: &Ctx<'_>, req: &RecordedRequest, version: &str) -> Response {
        let q = req.query();
        let limit = match q.number::<i64>("limit") {
            Ok(v) => v.unwrap_or(50).clamp(1, 250) as usize,
            Err(_) => return errors(400, json!({"limit": "Invalid value."})),
        };
        let fields: Option<Vec<String>> = q.get("fields").map(|f| {
            f.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        let info = match q.get("page_info") {
            Some(raw) => {
                if let Some((k, _)) =
                    q.0.iter()
                        .find(|(k, _)| !["page_info", "limit", "fields"].contains(&k.as_str()))
                {
                    return errors(
                        400,
                        json!({"page_info": format!("page_info cannot be combined with '{k}': only limit and fields may be sent with it")}),
                    );
                }
                match b64url_decode(raw).and_then(|b| serde_json::from_slice::<PageInfo>(&b).ok()) {
                    Some(p) => p,
                    None => return errors(400, json!({"page_info": "Invalid value."})),
                }
            }
            None => {
                let time = |name: &str| -> Result<Option<i64>, Response> {
                    match q.get(name).filter(|v| !v.is_empty()) {
                        None => Ok(None),
                        Some(v) => parse_iso(v)
                            .map(|t| Some(t.timestamp_millis()))
                            .ok_or_else(|| errors(400, json!({ name: "Invalid value." }))),
                    }
                };
                let min = match time("updated_at_min") {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let max = match time("updated_at_max") {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let since = match q.number::<u64>("since_id") {
                    Ok(v) => v.map(|s| s.saturating_sub(CUSTOMER_ID_BASE)),
                    Err(_) => return errors(400, json!({"since_id": "Invalid value."})),
                };
                PageInfo {
                    d: 'n',
                    k: since.unwrap_or(0),
                    min,
                    max,
                    since,
                }
            }
        };
        let ms = |v: i64| DateTime::from_timestamp_millis(v).unwrap_or_default();
        let range = UpdatedRange {
            after: info.min.map(|m| (ms(m), true)),
            before: info.max.map(|m| (ms(m), true)),
        };
        let book = self.contacts.read();
        let sel = book.select("shopify", range, Order::IdAsc, None);
        let floor = sel.partition_point(|&p| book.at(p).id <= info.since.unwrap_or(0));
        let (start, end) = if info.d == 'p' {
            let end = sel.partition_point(|&p| book.at(p).id < info.k).max(floor);
            (end.saturating_sub(limit).max(floor), end)
        } else {
            let start = sel.partition_point(|&p| book.at(p).id <= info.k).max(floor);
            (start, (start + limit).min(sel.len()))
        };
        let customers: Vec<Value> = sel[start..end]
            .iter()
            .map(|&p| {
                let mut v = self.customer_json(book.at(p));
                if let (Some(f), Some(m)) = (&fields, v.as_object_mut()) {
                    m.retain(|k, _| f.iter().any(|x| x == k));
                }
                v
            })
            .collect();
        let link = |d: char, k: u64| {
            let cursor = PageInfo {
                d,
                k,
                min: info.min,
                max: info.max,
                since: info.since,
            };
            let token = b64url(&serde_json::to_vec(&cursor).unwrap_or_default());
            let mut pairs = vec![("limit".to_string(), limit.to_string())];
            if let Some(f) = q.get("fields") {
                pairs.push(("fields".to_string(), f.to_string()));
            }
            pairs.push(("page_info".to_string(), token));
            url_with(
                ctx.base_url,
                &format!("/admin/api/{version}/customers.json"),
                &pairs,
            )
        };
        let mut links = Vec::new();
        if start > floor && end > start {
            links.push(format!(
                "<{}>; rel=\"previous\"",
                link('p', book.at(sel[start]).id)
            ));
        }
        if end < sel.len() && end > start {
            links.push(format!(
                "<{}>; rel=\"next\"",
                link('n', book.at(sel[end - 1]).id)
            ));
        }
        let mut r = json(200, &json!({ "customers": customers }));
        if !links.is_empty() {
            append_header(&mut r, "link", &links.join(", "));
        }
        r
    }

    fn create_price_rule(&self, req: &RecordedRequest) -> Response {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let Some(rule) = body.get("price_rule").and_then(Value::as_object) else {
            return errors(
                400,
                json!({"price_rule": "Required parameter missing or invalid"}),
            );
        };
        let text = |k: &str| {
            rule.get(k).and_then(|v| {
                v.as_str()
                    .map(str::to_string)
                    .or_else(|| v.as_f64().map(|n| n.to_string()))
            })
        };
        let mut errs = serde_json::Map::new();
        let mut fail = |k: &str, m: &str| {
            errs.entry(k.to_string())
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("array")
                .push(json!(m));
        };
        for k in [
            "title",
            "value_type",
            "value",
            "customer_selection",
            "target_type",
            "target_selection",
            "allocation_method",
            "starts_at",
        ] {
            if text(k).is_none_or_empty() {
                fail(k, "can't be blank");
            }
        }
        let allowed: [(&str, &[&str]); 5] = [
            ("value_type", &["fixed_amount", "percentage"]),
            ("target_type", &["line_item", "shipping_line"]),
            ("target_selection", &["all", "entitled"]),
            ("allocation_method", &["across", "each"]),
            ("customer_selection", &["all", "prerequisite"]),
        ];
        for (k, ok) in allowed {
            if let Some(v) = text(k).filter(|v| !v.is_empty()) {
                if !ok.contains(&v.as_str()) {
                    fail(k, "is not included in the list");
                }
            }
        }
        let value = text("value").and_then(|v| v.parse::<f64>().ok());
        match value {
            None if text("value").is_some() => fail("value", "is not a number"),
            Some(v) if v > 0.0 => fail("value", "must be less than or equal to 0"),
            Some(v) if v < -100.0 && text("value_type").as_deref() == Some("percentage") => {
                fail("value", "must be greater than or equal to -100")
            }
            _ => {}
        }
        let starts = text("starts_at").and_then(|s| parse_iso(&s));
        if starts.is_none() && !text("starts_at").is_none_or_empty() {
            fail("starts_at", "is invalid");
        }
        let ends = match text("ends_at").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => match parse_iso(&s) {
                Some(t) => Some(t),
                None => {
                    fail("ends_at", "is invalid");
                    None
                }
            },
        };
        if !errs.is_empty() {
            return errors(422, Value::Object(errs));
        }
        let id = PRICE_RULE_ID_BASE + self.next();
        let now = self.time(self.contacts.now());
        let v = value.unwrap_or(0.0);
        let value_text = if v.fract() == 0.0 {
            format!("{v:.1}")
        } else {
            v.to_string()
        };
        let get = |k: &str, d: Value| rule.get(k).cloned().unwrap_or(d);
        let answer = json!({
            "id": id,
            "value_type": text("value_type"),
            "value": value_text,
            "customer_selection": text("customer_selection"),
            "target_type": text("target_type"),
            "target_selection": text("target_selection"),
            "allocation_method": text("allocation_method"),
            "allocation_limit": get("allocation_limit", Value::Null),
            "once_per_customer": get("once_per_customer", json!(false)),
            "usage_limit": get("usage_limit", Value::Null),
            "starts_at": starts.map(|t| self.time(t)),
            "ends_at": ends.map(|t| self.time(t)),
            "created_at": now,
            "updated_at": now,
            "entitled_product_ids": get("entitled_product_ids", json!([])),
            "entitled_variant_ids": get("entitled_variant_ids", json!([])),
            "entitled_collection_ids": get("entitled_collection_ids", json!([])),
            "entitled_country_ids": get("entitled_country_ids", json!([])),
            "prerequisite_product_ids": [],
            "prerequisite_variant_ids": [],
            "prerequisite_collection_ids": [],
            "customer_segment_prerequisite_ids": [],
            "prerequisite_customer_ids": get("prerequisite_customer_ids", json!([])),
            "prerequisite_subtotal_range": get("prerequisite_subtotal_range", Value::Null),
            "prerequisite_quantity_range": null,
            "prerequisite_shipping_price_range": null,
            "prerequisite_to_entitlement_quantity_ratio": {"prerequisite_quantity": null, "entitled_quantity": null},
            "prerequisite_to_entitlement_purchase": {"prerequisite_amount": null},
            "title": text("title"),
            "admin_graphql_api_id": format!("gid://shopify/PriceRule/{id}"),
        });
        self.price_rules.lock().push(answer.clone());
        json(201, &json!({ "price_rule": answer }))
    }

    fn code_taken(&self, code: &str) -> bool {
        self.codes
            .lock()
            .iter()
            .any(|c| c.code.eq_ignore_ascii_case(code.trim()))
    }

    fn create_discount_code(&self, req: &RecordedRequest, rule_id: &str) -> Response {
        let rule = rule_id.parse::<u64>().ok().and_then(|id| {
            self.price_rules
                .lock()
                .iter()
                .find(|r| r["id"] == json!(id))
                .cloned()
        });
        let Some(rule) = rule else {
            return errors(404, json!("Not Found"));
        };
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let Some(dc) = body.get("discount_code").and_then(Value::as_object) else {
            return errors(
                400,
                json!({"discount_code": "Required parameter missing or invalid"}),
            );
        };
        let code = dc
            .get("code")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("");
        if code.is_empty() {
            return errors(422, json!({"code": ["can't be blank"]}));
        }
        if self.code_taken(code) {
            return errors(422, json!({"code": ["must be unique"]}));
        }
        let id = DISCOUNT_ID_BASE + self.next();
        let now = self.time(self.contacts.now());
        let rule_id = rule["id"].as_u64();
        self.codes.lock().push(DiscountCode {
            id,
            code: code.to_string(),
            price_rule_id: rule_id,
            node_id: None,
            source: DiscountSource::Rest,
            rule,
        });
        json(
            201,
            &json!({"discount_code": {"id": id, "price_rule_id": rule_id, "code": code, "usage_count": 0,
                "created_at": now, "updated_at": now}}),
        )
    }

    fn graphql(&self, req: &RecordedRequest) -> Response {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let Some(query) = body.get("query").and_then(Value::as_str) else {
            return errors(
                400,
                json!({"query": "Required parameter missing or invalid"}),
            );
        };
        let cost = json!({"cost": {"requestedQueryCost": 10, "actualQueryCost": 10,
            "throttleStatus": {"maximumAvailable": 2000.0, "currentlyAvailable": 1990, "restoreRate": 100.0}}});
        if !query.contains("discountCodeBasicCreate") {
            return json(
                200,
                &json!({"errors": [{"message": "The klantreis Shopify fake only supports the discountCodeBasicCreate mutation",
                    "extensions": {"code": "undefinedField"}}]}),
            );
        }
        let vars = body.get("variables").and_then(Value::as_object);
        let input = vars.and_then(|v| {
            v.get("basicCodeDiscount").cloned().or_else(|| {
                let objs: Vec<&Value> = v.values().filter(|x| x.is_object()).collect();
                (objs.len() == 1).then(|| objs[0].clone())
            })
        });
        let Some(input) = input.filter(Value::is_object) else {
            return json(
                200,
                &json!({"errors": [{"message": "Variable $basicCodeDiscount of type DiscountCodeBasicInput! was provided invalid value",
                    "extensions": {"code": "INVALID_VARIABLE", "problems": [{"path": [], "explanation": "Expected value to not be null"}]}}]}),
            );
        };
        let mut user_errors = Vec::new();
        let mut fail = |field: &str, code: &str, message: &str| {
            user_errors.push(
                json!({"field": ["basicCodeDiscount", field], "code": code, "message": message}),
            );
        };
        let s = |k: &str| {
            input
                .get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let (title, code) = (s("title"), s("code"));
        if title.is_empty() {
            fail("title", "BLANK", "Title can't be blank");
        }
        if code.is_empty() {
            fail("code", "BLANK", "Code can't be blank");
        } else if self.code_taken(&code) {
            fail(
                "code",
                "TAKEN",
                "Code must be unique. Please try a different code.",
            );
        }
        let starts = parse_iso(&s("startsAt"));
        if s("startsAt").is_empty() {
            fail("startsAt", "BLANK", "Starts at can't be blank");
        } else if starts.is_none() {
            fail("startsAt", "INVALID", "Starts at is invalid");
        }
        let ends = match input.get("endsAt").and_then(Value::as_str) {
            None => None,
            Some(e) => match parse_iso(e) {
                Some(t) if starts.is_some_and(|st| t <= st) => {
                    fail("endsAt", "INVALID", "Ends at needs to be after starts_at");
                    None
                }
                Some(t) => Some(t),
                None => {
                    fail("endsAt", "INVALID", "Ends at is invalid");
                    None
                }
            },
        };
        if input.get("context").is_none() && input.get("customerSelection").is_none() {
            fail("context", "BLANK", "Context can't be blank");
        }
        match input.get("customerGets") {
            None => fail("customerGets", "BLANK", "Customer gets can't be blank"),
            Some(g) => {
                let pct = g.pointer("/value/percentage").and_then(Value::as_f64);
                let amount = g.pointer("/value/discountAmount/amount");
                match (pct, amount) {
                    (Some(p), _) if !(p > 0.0 && p <= 1.0) => fail(
                        "customerGets",
                        "INVALID",
                        "Value must be between 0.0 and 1.0 (a fraction, not a percentage)",
                    ),
                    (Some(_), _) | (None, Some(_)) => {}
                    (None, None) => {
                        fail("customerGets", "INVALID", "Customer gets value is invalid")
                    }
                }
                if g.get("items").is_none() {
                    fail(
                        "customerGets",
                        "INVALID",
                        "Customer gets items can't be blank",
                    );
                }
            }
        }
        if !user_errors.is_empty() {
            return json(
                200,
                &json!({"data": {"discountCodeBasicCreate": {"codeDiscountNode": null, "userErrors": user_errors}}, "extensions": cost}),
            );
        }
        let n = self.next();
        let node_id = format!("gid://shopify/DiscountCodeNode/{}", 1_057_371_245 + n);
        self.codes.lock().push(DiscountCode {
            id: DISCOUNT_ID_BASE + n,
            code: code.clone(),
            price_rule_id: None,
            node_id: Some(node_id.clone()),
            source: DiscountSource::GraphQl,
            rule: input.clone(),
        });
        let utc = |t: Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        };
        json(
            200,
            &json!({"data": {"discountCodeBasicCreate": {
                "codeDiscountNode": {"id": node_id, "codeDiscount": {
                    "__typename": "DiscountCodeBasic", "title": title, "status": "ACTIVE",
                    "codes": {"nodes": [{"code": code}]},
                    "startsAt": utc(starts), "endsAt": utc(ends),
                    "usageLimit": input.get("usageLimit").cloned().unwrap_or(Value::Null),
                    "appliesOncePerCustomer": input.get("appliesOncePerCustomer").cloned().unwrap_or(json!(false))}},
                "userErrors": []}},
             "extensions": cost}),
        )
    }
}

trait BlankExt {
    fn is_none_or_empty(&self) -> bool;
}

impl BlankExt for Option<String> {
    fn is_none_or_empty(&self) -> bool {
        self.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .is_none()
    }
}

// ---------------------------------------------------------------------------------------
// Webhooks

/// `base64(HMAC-SHA256(secret, body))`, the value of `X-Shopify-Hmac-Sha256` (D2).
pub fn sign(body: &[u8], secret: &str) -> String {
    hmac_sha256_base64(body, secret.as_bytes())
}

/// One webhook delivery as Shopify would send it (D1).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    /// The raw body; the signature covers exactly these bytes.
    pub body: Vec<u8>,
    pub shop_domain: String,
    pub api_version: String,
    /// `X-Shopify-Webhook-Id`: unique per delivery, the idempotency key. Keep it to
    /// simulate a retry.
    pub webhook_id: String,
    pub event_id: String,
    /// `X-Shopify-Triggered-At`.
    pub triggered_at: String,
}

impl Delivery {
    /// A delivery of `payload` for `topic` with fresh ids (derived from the body and a
    /// counter) and the current time as `triggered_at`.
    pub fn new(topic: &str, payload: &Value) -> Self {
        static N: AtomicU64 = AtomicU64::new(1);
        let body = payload.to_string().into_bytes();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let h = body
            .iter()
            .fold(n, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
        Self {
            topic: topic.to_string(),
            body,
            shop_domain: DEFAULT_SHOP_DOMAIN.to_string(),
            api_version: DEFAULT_API_VERSION.to_string(),
            webhook_id: fake_uuid(h),
            event_id: fake_uuid(h ^ 0xE),
            triggered_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// The D1 headers, with the signature made with `secret` (names as Shopify writes them).
    pub fn headers(&self, secret: &str) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Shopify-Topic".into(), self.topic.clone()),
            ("X-Shopify-Hmac-Sha256".into(), sign(&self.body, secret)),
            ("X-Shopify-Shop-Domain".into(), self.shop_domain.clone()),
            ("X-Shopify-API-Version".into(), self.api_version.clone()),
            ("X-Shopify-Webhook-Id".into(), self.webhook_id.clone()),
            ("X-Shopify-Event-Id".into(), self.event_id.clone()),
            ("X-Shopify-Triggered-At".into(), self.triggered_at.clone()),
        ]
    }

    /// The same headers in the "Events" form, without the `X-` prefix (D1).
    pub fn headers_unprefixed(&self, secret: &str) -> Vec<(String, String)> {
        self.headers(secret)
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("X-").map(str::to_string).unwrap_or(k), v))
            .collect()
    }

    /// POSTs the delivery to `url`, signed with `secret`; returns the response.
    pub async fn send(&self, url: &str, secret: &str) -> reqwest::Result<reqwest::Response> {
        let mut rb = reqwest::Client::new()
            .post(url)
            .timeout(std::time::Duration::from_secs(5));
        for (k, v) in self.headers(secret) {
            rb = rb.header(k, v);
        }
        rb.body(self.body.clone()).send().await
    }
}

/// The sample payload of a topic: `orders/create`, `orders/fulfilled`,
/// `customers/create`, `customers/update`, `customers/purchasing_summary`,
/// `refunds/create`. Ids are exact 64-bit integers.
pub fn sample_payload(topic: &str) -> Option<Value> {
    Some(match topic {
        "orders/create" => orders_create(),
        "orders/fulfilled" => orders_fulfilled(),
        "customers/create" => customers_create(),
        "customers/update" => customers_update(),
        "customers/purchasing_summary" => customers_purchasing_summary(),
        "refunds/create" => refunds_create(),
        _ => return None,
    })
}

/// `orders/create` (D4, Shopify's sample, trimmed; ids restored from the gids).
pub fn orders_create() -> Value {
    json!({
        "id": 820_982_911_946_154_508u64, "admin_graphql_api_id": "gid://shopify/Order/820982911946154508",
        "name": "#9999", "order_number": 1234, "email": "jon@example.com", "contact_email": "jon@example.com",
        "created_at": "2021-12-31T19:00:00-05:00", "updated_at": "2021-12-31T19:00:00-05:00", "currency": "USD",
        "total_price": "404.95", "subtotal_price": "404.95", "total_tax": "0.00", "total_discounts": "20.00",
        "total_price_set": {"shop_money": {"amount": "404.95", "currency_code": "USD"},
                            "presentment_money": {"amount": "404.95", "currency_code": "USD"}},
        "financial_status": "voided", "fulfillment_status": null, "buyer_accepts_marketing": true, "customer_locale": "en",
        "test": true, "tags": "tag1, tag2", "discount_codes": [], "source_name": "web",
        "customer": {"id": 115_310_627_314_723_954u64, "email": "john@example.com", "first_name": "John", "last_name": "Smith",
            "state": "disabled", "verified_email": true, "currency": "USD", "phone": null,
            "admin_graphql_api_id": "gid://shopify/Customer/115310627314723954",
            "default_address": {"city": "Ottawa", "country_code": "CA"}},
        "line_items": [{"id": 487_817_672_276_298_554u64, "name": "Aviator sunglasses", "title": "Aviator sunglasses",
            "sku": "SKU2006-001", "quantity": 1, "price": "89.99", "product_id": 788_032_119_674_292_900u64, "variant_id": null,
            "total_discount": "0.00", "gift_card": false}]
    })
}

/// `orders/fulfilled`: the order, paid and fulfilled, with one fulfillment.
pub fn orders_fulfilled() -> Value {
    let mut o = orders_create();
    o["financial_status"] = json!("paid");
    o["fulfillment_status"] = json!("fulfilled");
    o["updated_at"] = json!("2022-01-02T10:00:00-05:00");
    o["fulfillments"] = json!([{
        "id": 4_451_115_532_345_678_901u64, "admin_graphql_api_id": "gid://shopify/Fulfillment/4451115532345678901",
        "order_id": 820_982_911_946_154_508u64, "status": "success", "created_at": "2022-01-02T10:00:00-05:00",
        "service": "manual", "shipment_status": null, "tracking_company": "PostNL", "tracking_number": "3SABCD1234567",
        "tracking_numbers": ["3SABCD1234567"], "tracking_url": "https://postnl.example/track/3SABCD1234567",
        "line_items": [{"id": 487_817_672_276_298_554u64, "quantity": 1, "fulfillment_status": "fulfilled"}]
    }]);
    o
}

/// `customers/create` (D5, the 2026-01 shape: no tags, consent or order totals).
pub fn customers_create() -> Value {
    json!({"id": 706_405_506_930_370_084u64, "email": "bob@biller.com", "first_name": "Bob", "last_name": "Biller",
        "state": "disabled", "note": "This customer loves ice cream", "verified_email": true, "multipass_identifier": null,
        "tax_exempt": false, "phone": null, "currency": "USD", "tax_exemptions": [],
        "created_at": "2021-12-31T19:00:00-05:00", "updated_at": "2021-12-31T19:00:00-05:00",
        "admin_graphql_api_id": "gid://shopify/Customer/706405506930370084",
        "default_address": {"id": 12321, "customer_id": 706_405_506_930_370_084u64, "city": "Ottawa", "zip": "K2P 2L8",
            "country_code": "CA", "default": true},
        "addresses": []})
}

/// `customers/update`: the same customer, changed later.
pub fn customers_update() -> Value {
    let mut c = customers_create();
    c["updated_at"] = json!("2022-01-05T09:30:00-05:00");
    c["note"] = json!("Prefers chocolate now");
    c["state"] = json!("enabled");
    c
}

/// `customers/purchasing_summary` (D4 note).
pub fn customers_purchasing_summary() -> Value {
    json!({"customerId": "gid://shopify/Customer/1", "numberOfOrders": 1,
        "amountSpent": {"amount": "100.00", "currencyCode": "USD"},
        "lastOrderId": "gid://shopify/Order/1", "occurredAt": "2005-05-05T04:00:00.000Z"})
}

/// `refunds/create` for the sample order.
pub fn refunds_create() -> Value {
    json!({"id": 890_088_186_047_892_319u64, "order_id": 820_982_911_946_154_508u64,
        "created_at": "2022-01-03T12:00:00-05:00", "processed_at": "2022-01-03T12:00:00-05:00",
        "note": "Things were damaged", "user_id": 548_380_009, "restock": false, "duties": [], "additional_fees": [],
        "total_duties_set": {"shop_money": {"amount": "0.00", "currency_code": "USD"},
                             "presentment_money": {"amount": "0.00", "currency_code": "USD"}},
        "return": null, "admin_graphql_api_id": "gid://shopify/Refund/890088186047892319",
        "refund_line_items": [{"id": 487_817_672_276_298_627u64, "quantity": 1, "line_item_id": 487_817_672_276_298_554u64,
            "location_id": null, "restock_type": "no_restock", "subtotal": 89.99, "total_tax": 0.0,
            "subtotal_set": {"shop_money": {"amount": "89.99", "currency_code": "USD"},
                             "presentment_money": {"amount": "89.99", "currency_code": "USD"}}}],
        "transactions": [{"id": 245_135_628_734_567_890u64, "order_id": 820_982_911_946_154_508u64, "kind": "refund",
            "gateway": "bogus", "status": "success", "message": null, "created_at": "2022-01-03T12:00:00-05:00",
            "test": true, "parent_id": 389_404_469_u64, "amount": "89.99", "currency": "USD",
            "admin_graphql_api_id": "gid://shopify/OrderTransaction/245135628734567890"}],
        "order_adjustments": []})
}

/// A `customers/create|update` payload for a contact. For `api_version` up to
/// `2024-10` it has the legacy fields (`tags`, `email_marketing_consent`,
/// `orders_count`, ...), from `2025-01` not (D4 note).
pub fn customer_payload(c: &Contact, api_version: &str) -> Value {
    let id = customer_id(c.id);
    let off = FixedOffset::west_opt(5 * 3600).expect("valid offset");
    let mut v = json!({"id": id, "email": c.email, "first_name": c.first_name, "last_name": c.last_name,
        "state": "enabled", "note": null, "verified_email": true, "multipass_identifier": null, "tax_exempt": false,
        "phone": c.phone, "currency": "EUR", "tax_exemptions": [],
        "created_at": iso_in_offset(c.created_at, off), "updated_at": iso_in_offset(c.updated_at, off),
        "admin_graphql_api_id": format!("gid://shopify/Customer/{id}"), "default_address": null, "addresses": []});
    if api_version <= "2024-10" {
        v["orders_count"] = json!(0);
        v["total_spent"] = json!("0.00");
        v["last_order_id"] = Value::Null;
        v["last_order_name"] = Value::Null;
        v["tags"] = json!(c.tags.join(", "));
        v["email_marketing_consent"] = consent_json(c);
        v["sms_marketing_consent"] = Value::Null;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::server::RateLimit;
    use std::time::Duration;

    fn rq(s: &FakeServer<Shopify>, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, s.url(path))
            .header("X-Shopify-Access-Token", DEFAULT_TOKEN)
    }

    fn next_link(r: &reqwest::Response) -> Option<String> {
        let h = r.headers().get("link")?.to_str().ok()?.to_string();
        h.split(", ")
            .find(|p| p.ends_with("rel=\"next\""))
            .map(|p| p[1..p.find('>').unwrap()].to_string())
    }

    #[test]
    fn sign_matches_the_d2_vector() {
        let body = br#"{"id":1234567890,"email":"customer@example.com","total_price":"123.45"}"#;
        assert_eq!(
            sign(body, "test-webhook-secret"),
            "QNyObTlKbMx2qDlPF/ZOZcBqg5OgPg+2oky3zldc0Gw="
        );
    }

    #[test]
    fn samples_keep_64_bit_ids() {
        let o = sample_payload("orders/create").unwrap();
        assert_eq!(o["id"].as_u64(), Some(820_982_911_946_154_508));
        assert!(o.to_string().contains("820982911946154508"));
        for t in [
            "orders/fulfilled",
            "customers/create",
            "customers/update",
            "customers/purchasing_summary",
            "refunds/create",
        ] {
            assert!(sample_payload(t).is_some(), "{t}");
        }
        let d = Delivery::new("orders/create", &o);
        let h = d.headers("s");
        assert!(h
            .iter()
            .any(|(k, v)| k == "X-Shopify-Hmac-Sha256" && *v == sign(&d.body, "s")));
        assert!(d
            .headers_unprefixed("s")
            .iter()
            .any(|(k, _)| k == "Shopify-Topic"));
    }

    #[tokio::test]
    async fn customers_page_by_link_header_with_exact_ids() {
        let s = start(Config {
            contacts: ContactBook::generate(120),
            ..Config::default()
        })
        .await;
        let r = rq(
            &s,
            reqwest::Method::GET,
            "/admin/api/2024-10/customers.json?limit=50",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.headers()["x-shopify-shop-api-call-limit"], "1/40");
        let mut url = next_link(&r);
        let first: Value = r.json().await.unwrap();
        let mut n = first["customers"].as_array().unwrap().len();
        assert_eq!(
            first["customers"][0]["id"].as_u64(),
            Some(customer_id(1001))
        );
        assert!(first["customers"][0]["email_marketing_consent"]["state"].is_string());
        while let Some(u) = url {
            let r = reqwest::Client::new()
                .get(&u)
                .header("X-Shopify-Access-Token", DEFAULT_TOKEN)
                .send()
                .await
                .unwrap();
            assert!(r.headers()["link"]
                .to_str()
                .unwrap()
                .contains("rel=\"previous\""));
            url = next_link(&r);
            n += r.json::<Value>().await.unwrap()["customers"]
                .as_array()
                .unwrap()
                .len();
        }
        assert_eq!(n, 120);
        // Incremental: only what changed since the last sync.
        let since = s.contacts().max_updated_at().unwrap();
        s.contacts().touch(1010);
        let r = rq(
            &s,
            reqwest::Method::GET,
            "/admin/api/2024-10/customers.json",
        )
        .query(&[(
            "updated_at_min",
            (since + chrono::Duration::seconds(1)).to_rfc3339(),
        )])
        .send()
        .await
        .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["customers"].as_array().unwrap().len(), 1);
        let r = rq(
            &s,
            reqwest::Method::GET,
            "/admin/api/2024-10/customers.json?page_info=abc&updated_at_min=2024-01-01",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn auth_and_rest_429() {
        let s = start(Config {
            faults: Faults {
                rate_limit: Some(RateLimit::new(1, Duration::from_secs(60))),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let r = reqwest::Client::new()
            .get(s.url("/admin/api/2024-10/customers.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["errors"],
            "[API] Invalid API key or access token (unrecognized login or wrong password)"
        );
        assert_eq!(
            rq(
                &s,
                reqwest::Method::GET,
                "/admin/api/2024-10/customers.json"
            )
            .send()
            .await
            .unwrap()
            .status(),
            200
        );
        let r = rq(
            &s,
            reqwest::Method::GET,
            "/admin/api/2024-10/customers.json",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2.0");
        assert!(r.headers().contains_key("x-shopify-shop-api-call-limit"));
    }

    #[tokio::test]
    async fn price_rule_then_discount_codes_and_duplicates() {
        let s = start(Config::default()).await;
        let r = rq(&s, reqwest::Method::POST, "/admin/api/2024-10/price_rules.json")
            .json(&json!({"price_rule": {"title": "SUMMERSALE10OFF", "target_type": "line_item", "target_selection": "all",
                "allocation_method": "across", "value_type": "fixed_amount", "value": "-10.0",
                "customer_selection": "all", "starts_at": "2017-01-19T17:59:10Z"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let id = v["price_rule"]["id"].as_u64().unwrap();
        assert_eq!(v["price_rule"]["value"], "-10.0");
        assert_eq!(v["price_rule"]["starts_at"], "2017-01-19T12:59:10-05:00");
        let path = format!("/admin/api/2024-10/price_rules/{id}/discount_codes.json");
        let post = || {
            rq(&s, reqwest::Method::POST, &path)
                .json(&json!({"discount_code": {"code": "SUMMERSALE10OFF"}}))
                .send()
        };
        let r = post().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["discount_code"]["price_rule_id"].as_u64(), Some(id));
        let r = post().await.unwrap();
        assert_eq!(r.status(), 422);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"errors": {"code": ["must be unique"]}})
        );
        let r = rq(
            &s,
            reqwest::Method::POST,
            "/admin/api/2024-10/price_rules.json",
        )
        .json(&json!({"price_rule": {"title": "x"}}))
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 422);
        assert_eq!(s.discount_codes().len(), 1);
    }

    #[tokio::test]
    async fn graphql_discount_code_basic_create() {
        let s = start(Config::default()).await;
        let q = "mutation CreateDiscountCode($basicCodeDiscount: DiscountCodeBasicInput!) { discountCodeBasicCreate(basicCodeDiscount: $basicCodeDiscount) { codeDiscountNode { id } userErrors { field code message } } }";
        let input = json!({"title": "Review thank-you 10%", "code": "THANKS-7F3K", "startsAt": "2024-03-01T00:00:00Z",
            "endsAt": "2024-04-01T00:00:00Z", "customerSelection": {"all": true},
            "customerGets": {"value": {"percentage": 0.1}, "items": {"all": true}}, "appliesOncePerCustomer": true, "usageLimit": 1});
        let post = |input: Value| {
            rq(&s, reqwest::Method::POST, "/admin/api/2024-10/graphql.json")
                .json(&json!({"query": q, "variables": {"basicCodeDiscount": input}}))
                .send()
        };
        let v: Value = post(input.clone()).await.unwrap().json().await.unwrap();
        let p = &v["data"]["discountCodeBasicCreate"];
        assert_eq!(p["userErrors"], json!([]));
        assert!(p["codeDiscountNode"]["id"]
            .as_str()
            .unwrap()
            .starts_with("gid://shopify/DiscountCodeNode/"));
        let r = post(input.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["data"]["discountCodeBasicCreate"]["userErrors"][0]["code"],
            "TAKEN"
        );
        let mut bad = input;
        bad["code"] = json!("OTHER");
        bad["customerGets"]["value"]["percentage"] = json!(10);
        let v: Value = post(bad).await.unwrap().json().await.unwrap();
        assert_eq!(
            v["data"]["discountCodeBasicCreate"]["userErrors"][0]["field"],
            json!(["basicCodeDiscount", "customerGets"])
        );
        assert_eq!(s.discount_codes().len(), 1);
        assert_eq!(s.discount_codes()[0].source, DiscountSource::GraphQl);
    }
}
