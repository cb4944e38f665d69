//! Fake WooCommerce REST API v3 and webhook helpers (API-NOTES E).
//!
//! - `GET /wp-json/wc/v3/customers`: `page` (default 1), `per_page` (default 10,
//!   1..=100 else 400 `rest_invalid_param`), `modified_after` / `modified_before`
//!   (ISO 8601; a zone-less time is site time, and the fake's site runs on UTC, so
//!   `date_modified == date_modified_gmt`; strictly after/before), `email`, `order`
//!   (`asc|desc`). The fake always orders by id (`orderby` is accepted but ignored:
//!   WooCommerce defaults to `name`, which would only change the order). Headers
//!   `X-WP-Total`, `X-WP-TotalPages` and `Link: <...?page=N...>; rel="next"` (and
//!   `rel="prev"`); a page past the end is an empty array. `GET .../customers/{id}`.
//! - `POST /wp-json/wc/v3/coupons` (E4): 201 with the coupon (amount normalised to two
//!   decimals, `_links`); no `code` is 400 `rest_missing_callback_param`; a code that
//!   exists (case-insensitively) is 400 `woocommerce_rest_coupon_code_already_exists`
//!   (UNCONFIRMED, as in the notes). Created coupons: [`WooCommerce::coupons`].
//! - Auth: HTTP Basic `consumer_key:consumer_secret`, or the `consumer_key` /
//!   `consumer_secret` query parameters. None: 401 `woocommerce_rest_cannot_view`
//!   (`woocommerce_rest_cannot_create` on POST); a wrong key or secret: 401
//!   `woocommerce_rest_authentication_error`. Errors are
//!   `{"code","message","data":{"status"}}`.
//! - Webhooks (E1–E3): [`sign`], [`Delivery`] (the `X-WC-Webhook-*` headers,
//!   `User-Agent`, sending), the creation ping ([`ping_body`], [`send_ping`]: a
//!   `webhook_id=N` form body with no `X-WC-*` headers) and sample payloads
//!   ([`sample_payload`]: `order.created`, `order.updated`, `customer.created`).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::Response;
use chrono::Utc;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::contacts::{Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{
    append_header, basic_credentials, hmac_sha256_base64, json, md5_hex, naive, parse_iso,
    segments, set_header, url_with,
};

pub const DEFAULT_CONSUMER_KEY: &str = "ck_0123456789abcdef0123456789abcdef01234567";
pub const DEFAULT_CONSUMER_SECRET: &str = "cs_0123456789abcdef0123456789abcdef01234567";
/// `X-WC-Webhook-Source` of deliveries (`home_url('/')`, with the trailing slash).
pub const DEFAULT_SOURCE: &str = "https://shop.example/";
pub const USER_AGENT: &str = "WooCommerce/9.1.2 Hookshot (WordPress/6.5.5)";
const COUPON_ID_BASE: u64 = 719;

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub contacts: ContactBook,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            consumer_key: DEFAULT_CONSUMER_KEY.to_string(),
            consumer_secret: DEFAULT_CONSUMER_SECRET.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults::default(),
        }
    }
}

/// The fake's state.
pub struct WooCommerce {
    consumer_key: String,
    consumer_secret: String,
    contacts: ContactBook,
    coupons: Mutex<Vec<Value>>,
    next_id: AtomicU64,
}

impl WooCommerce {
    pub fn new(cfg: &Config) -> Self {
        Self {
            consumer_key: cfg.consumer_key.clone(),
            consumer_secret: cfg.consumer_secret.clone(),
            contacts: cfg.contacts.clone(),
            coupons: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }

    /// Coupons created so far, as answered.
    pub fn coupons(&self) -> Vec<Value> {
        self.coupons.lock().clone()
    }
}

pub async fn start(cfg: Config) -> FakeServer<WooCommerce> {
    FakeServer::start(WooCommerce::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<WooCommerce> {
    FakeServer::start_blocking(WooCommerce::new(&cfg), cfg.faults)
}

/// The WP REST error shape.
fn error(status: u16, code: &str, message: &str) -> Response {
    json(
        status,
        &json!({"code": code, "message": message, "data": {"status": status}}),
    )
}

fn invalid_param(name: &str, why: &str) -> Response {
    json(
        400,
        &json!({"code": "rest_invalid_param", "message": format!("Invalid parameter(s): {name}"),
            "data": {"status": 400, "params": {name: why}}}),
    )
}

impl Vendor for WooCommerce {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        let q = req.query();
        let creds = basic_credentials(req.header("authorization")).or_else(|| {
            Some((
                q.get("consumer_key")?.to_string(),
                q.get("consumer_secret")?.to_string(),
            ))
        });
        match creds {
            None => Err(if req.method == "GET" {
                error(
                    401,
                    "woocommerce_rest_cannot_view",
                    "Sorry, you cannot list resources.",
                )
            } else {
                error(
                    401,
                    "woocommerce_rest_cannot_create",
                    "Sorry, you are not allowed to create resources.",
                )
            }),
            Some((k, _)) if k != self.consumer_key => Err(error(
                401,
                "woocommerce_rest_authentication_error",
                "Consumer key is invalid.",
            )),
            Some((_, s)) if s != self.consumer_secret => Err(error(
                401,
                "woocommerce_rest_authentication_error",
                "Consumer secret is invalid.",
            )),
            Some(_) => Ok(()),
        }
    }

    fn server_error(&self, _req: &RecordedRequest) -> Response {
        error(
            500,
            "internal_server_error",
            "There has been a critical error on this website.",
        )
    }

    fn throttled(&self, _req: &RecordedRequest, t: &Throttle) -> Response {
        // WooCommerce has no rate limit of its own; hosts and plugins answer 429 like this.
        let mut r = error(
            429,
            "woocommerce_rest_too_many_requests",
            "Too many requests. Please wait and try again.",
        );
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["wp-json", "wc", "v3", "customers"]) => self.customers(ctx, req),
            ("GET", ["wp-json", "wc", "v3", "customers", id]) => {
                match id.parse::<u64>().ok().and_then(|id| self.contacts.get(id)) {
                    Some(c) => json(200, &customer_json(&c, ctx.base_url)),
                    None => error(404, "woocommerce_rest_invalid_id", "Invalid resource ID."),
                }
            }
            ("POST", ["wp-json", "wc", "v3", "coupons"]) => self.create_coupon(ctx, req),
            _ => error(
                404,
                "rest_no_route",
                "No route was found matching the URL and request method.",
            ),
        }
    }
}

/// The WooCommerce customer JSON of a contact; `base_url` is the site for `_links`.
pub fn customer_json(c: &Contact, base_url: &str) -> Value {
    let username = c.email.split('@').next().unwrap_or("").to_lowercase();
    json!({
        "id": c.id,
        "date_created": naive(c.created_at),
        "date_created_gmt": naive(c.created_at),
        "date_modified": naive(c.updated_at),
        "date_modified_gmt": naive(c.updated_at),
        "email": c.email,
        "first_name": c.first_name,
        "last_name": c.last_name,
        "role": "customer",
        "username": username,
        "billing": {"first_name": c.first_name, "last_name": c.last_name, "company": "", "address_1": "",
            "address_2": "", "city": "", "state": "", "postcode": "", "country": "NL", "email": c.email,
            "phone": c.phone.clone().unwrap_or_default()},
        "shipping": {"first_name": c.first_name, "last_name": c.last_name, "company": "", "address_1": "",
            "address_2": "", "city": "", "state": "", "postcode": "", "country": "NL", "phone": ""},
        "is_paying_customer": false,
        "avatar_url": "https://secure.gravatar.com/avatar/?s=96&d=mm&r=g",
        "meta_data": [],
        "_links": {"self": [{"href": format!("{base_url}/wp-json/wc/v3/customers/{}", c.id)}],
                   "collection": [{"href": format!("{base_url}/wp-json/wc/v3/customers")}]},
    })
}

impl WooCommerce {
    fn customers(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let q = req.query();
        let page = match q.number::<i64>("page") {
            Ok(v) => v.unwrap_or(1),
            Err(_) => return invalid_param("page", "page is not of type integer."),
        };
        if page < 1 {
            return invalid_param("page", "page must be greater than or equal to 1");
        }
        let per_page = match q.number::<i64>("per_page") {
            Ok(v) => v.unwrap_or(10),
            Err(_) => return invalid_param("per_page", "per_page is not of type integer."),
        };
        if !(1..=100).contains(&per_page) {
            return invalid_param(
                "per_page",
                "per_page must be between 1 (inclusive) and 100 (inclusive)",
            );
        }
        let (page, per_page) = (page as usize, per_page as usize);
        let mut range = UpdatedRange::default();
        for (name, after) in [("modified_after", true), ("modified_before", false)] {
            if let Some(v) = q.get(name).filter(|v| !v.is_empty()) {
                let Some(t) = parse_iso(v) else {
                    return invalid_param(name, "Invalid date.");
                };
                if after {
                    range.after = Some((t, false));
                } else {
                    range.before = Some((t, false));
                }
            }
        }
        let order = match q.get("order").unwrap_or("asc") {
            "asc" => Order::IdAsc,
            "desc" => Order::IdDesc,
            _ => return invalid_param("order", "order is not one of asc and desc."),
        };
        let email = q
            .get("email")
            .filter(|e| !e.is_empty())
            .map(str::to_lowercase);
        let book = self.contacts.read();
        let keep = email
            .as_deref()
            .map(|e| move |c: &Contact| c.email.to_lowercase() == e);
        let sel = book.select(
            &format!("woo|{email:?}"),
            range,
            order,
            keep.as_ref().map(|k| k as &dyn Fn(&Contact) -> bool),
        );
        let total = sel.len();
        let pages = total.div_ceil(per_page);
        let start = ((page - 1) * per_page).min(total);
        let end = (start + per_page).min(total);
        let body: Vec<Value> = sel[start..end]
            .iter()
            .map(|&p| customer_json(book.at(p), ctx.base_url))
            .collect();
        let mut r = json(200, &Value::Array(body));
        set_header(&mut r, "x-wp-total", &total.to_string());
        set_header(&mut r, "x-wp-totalpages", &pages.to_string());
        let link = |p: usize| {
            url_with(
                ctx.base_url,
                &req.path,
                &q.with("page", &p.to_string(), &["consumer_key", "consumer_secret"]),
            )
        };
        let mut links = Vec::new();
        if page > 1 {
            links.push(format!(
                "<{}>; rel=\"prev\"",
                link((page - 1).min(pages.max(1)))
            ));
        }
        if page < pages {
            links.push(format!("<{}>; rel=\"next\"", link(page + 1)));
        }
        if !links.is_empty() {
            append_header(&mut r, "link", &links.join(", "));
        }
        r
    }

    fn create_coupon(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return error(400, "rest_invalid_json", "Invalid JSON body passed."),
        };
        let code = body
            .get("code")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("");
        if code.is_empty() {
            return json(
                400,
                &json!({"code": "rest_missing_callback_param", "message": "Missing parameter(s): code",
                    "data": {"status": 400, "params": ["code"]}}),
            );
        }
        let discount_type = body
            .get("discount_type")
            .and_then(Value::as_str)
            .unwrap_or("fixed_cart");
        if !["percent", "fixed_cart", "fixed_product"].contains(&discount_type) {
            return invalid_param(
                "discount_type",
                "discount_type is not one of percent, fixed_cart, and fixed_product.",
            );
        }
        let money = |k: &str| -> Result<String, Response> {
            match body.get(k) {
                None | Some(Value::Null) => Ok("0.00".to_string()),
                Some(v) => {
                    let n = v.as_f64().or_else(|| {
                        v.as_str().and_then(|s| {
                            if s.is_empty() {
                                Some(0.0)
                            } else {
                                s.parse().ok()
                            }
                        })
                    });
                    n.map(|n| format!("{n:.2}"))
                        .ok_or_else(|| invalid_param(k, &format!("{k} is not of type string.")))
                }
            }
        };
        let (amount, minimum, maximum) = match (
            money("amount"),
            money("minimum_amount"),
            money("maximum_amount"),
        ) {
            (Ok(a), Ok(mi), Ok(ma)) => (a, mi, ma),
            (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
        };
        let expires = match body
            .get("date_expires")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(s) => match parse_iso(s) {
                Some(t) => Some(naive(t)),
                None => return invalid_param("date_expires", "Invalid date."),
            },
        };
        let mut coupons = self.coupons.lock();
        if coupons.iter().any(|c| {
            c["code"]
                .as_str()
                .is_some_and(|x| x.eq_ignore_ascii_case(code))
        }) {
            return error(
                400,
                "woocommerce_rest_coupon_code_already_exists",
                "The coupon code already exists",
            );
        }
        let id = COUPON_ID_BASE + self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = naive(self.contacts.now());
        let get = |k: &str, d: Value| body.get(k).cloned().unwrap_or(d);
        let coupon = json!({
            "id": id,
            "code": code,
            "amount": amount,
            "date_created": now, "date_created_gmt": now, "date_modified": now, "date_modified_gmt": now,
            "discount_type": discount_type,
            "description": get("description", json!("")),
            "date_expires": expires, "date_expires_gmt": expires,
            "usage_count": 0,
            "individual_use": get("individual_use", json!(false)),
            "product_ids": get("product_ids", json!([])),
            "excluded_product_ids": get("excluded_product_ids", json!([])),
            "usage_limit": get("usage_limit", Value::Null),
            "usage_limit_per_user": get("usage_limit_per_user", Value::Null),
            "limit_usage_to_x_items": get("limit_usage_to_x_items", Value::Null),
            "free_shipping": get("free_shipping", json!(false)),
            "product_categories": get("product_categories", json!([])),
            "excluded_product_categories": get("excluded_product_categories", json!([])),
            "exclude_sale_items": get("exclude_sale_items", json!(false)),
            "minimum_amount": minimum,
            "maximum_amount": maximum,
            "email_restrictions": get("email_restrictions", json!([])),
            "used_by": [],
            "meta_data": get("meta_data", json!([])),
            "_links": {"self": [{"href": format!("{}/wp-json/wc/v3/coupons/{id}", ctx.base_url)}],
                       "collection": [{"href": format!("{}/wp-json/wc/v3/coupons", ctx.base_url)}]},
        });
        coupons.push(coupon.clone());
        json(201, &coupon)
    }
}

// ---------------------------------------------------------------------------------------
// Webhooks

/// `base64(HMAC-SHA256(secret, body))`, the value of `X-WC-Webhook-Signature` (E1).
pub fn sign(body: &[u8], secret: &str) -> String {
    hmac_sha256_base64(body, secret.as_bytes())
}

/// `X-WC-Webhook-Delivery-ID`: a 32-hex hash of webhook id and Unix second, like
/// `wp_hash($id . strtotime('now'))` (the same second gives the same value).
pub fn delivery_id(webhook_id: u64, unix_secs: i64) -> String {
    md5_hex(format!("{webhook_id}{unix_secs}").as_bytes())
}

/// One webhook delivery as WooCommerce would send it (E1).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `order.created`; resource and event are its two halves.
    pub topic: String,
    pub webhook_id: u64,
    pub source: String,
    pub delivery_id: String,
    /// The raw body (`trim(wp_json_encode($payload))`); the signature covers these bytes.
    pub body: Vec<u8>,
}

impl Delivery {
    /// A delivery of `payload` with the current second's delivery id.
    pub fn new(topic: &str, webhook_id: u64, payload: &Value) -> Self {
        Self {
            topic: topic.to_string(),
            webhook_id,
            source: DEFAULT_SOURCE.to_string(),
            delivery_id: delivery_id(webhook_id, Utc::now().timestamp()),
            body: payload.to_string().trim().as_bytes().to_vec(),
        }
    }

    /// The E1 headers, signed with `secret`.
    pub fn headers(&self, secret: &str) -> Vec<(String, String)> {
        let (resource, event) = self.topic.split_once('.').unwrap_or((&self.topic, ""));
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("User-Agent".into(), USER_AGENT.into()),
            ("X-WC-Webhook-Source".into(), self.source.clone()),
            ("X-WC-Webhook-Topic".into(), self.topic.clone()),
            ("X-WC-Webhook-Resource".into(), resource.to_string()),
            ("X-WC-Webhook-Event".into(), event.to_string()),
            ("X-WC-Webhook-Signature".into(), sign(&self.body, secret)),
            ("X-WC-Webhook-ID".into(), self.webhook_id.to_string()),
            ("X-WC-Webhook-Delivery-ID".into(), self.delivery_id.clone()),
        ]
    }

    /// POSTs the delivery to `url`, signed with `secret`.
    pub async fn send(&self, url: &str, secret: &str) -> reqwest::Result<reqwest::Response> {
        let mut rb = reqwest::Client::new()
            .post(url)
            .timeout(std::time::Duration::from_secs(60));
        for (k, v) in self.headers(secret) {
            rb = rb.header(k, v);
        }
        rb.body(self.body.clone()).send().await
    }
}

/// The creation ping body (E2): `webhook_id=N`.
pub fn ping_body(webhook_id: u64) -> String {
    format!("webhook_id={webhook_id}")
}

/// The creation ping headers: a user agent and curl's default form content type; no
/// `X-WC-*` headers and no signature (E2).
pub fn ping_headers() -> Vec<(String, String)> {
    vec![
        ("User-Agent".into(), USER_AGENT.into()),
        (
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        ),
    ]
}

/// Sends the creation ping. WooCommerce only saves the webhook on exactly 200.
pub async fn send_ping(url: &str, webhook_id: u64) -> reqwest::Result<reqwest::Response> {
    let mut rb = reqwest::Client::new().post(url);
    for (k, v) in ping_headers() {
        rb = rb.header(k, v);
    }
    rb.body(ping_body(webhook_id)).send().await
}

/// The sample payload of `order.created`, `order.updated` or `customer.created`.
pub fn sample_payload(topic: &str) -> Option<Value> {
    Some(match topic {
        "order.created" => order_created(),
        "order.updated" => order_updated(),
        "customer.created" => customer_created(),
        _ => return None,
    })
}

/// `order.created` (E3, the WC-DOCS example, trimmed).
pub fn order_created() -> Value {
    json!({"id": 727, "parent_id": 0, "number": "727", "order_key": "wc_order_58d2d042d1d", "created_via": "rest-api",
        "status": "processing", "currency": "USD",
        "date_created": "2017-03-22T16:28:02", "date_created_gmt": "2017-03-22T19:28:02",
        "date_modified": "2017-03-22T16:28:08", "date_modified_gmt": "2017-03-22T19:28:08",
        "discount_total": "0.00", "shipping_total": "10.00", "total": "29.35", "total_tax": "1.35",
        "customer_id": 0,
        "billing": {"first_name": "John", "last_name": "Doe", "email": "john.doe@example.com", "phone": "(555) 555-5555",
                    "address_1": "969 Market", "city": "San Francisco", "state": "CA", "postcode": "94103", "country": "US"},
        "payment_method": "bacs", "date_paid": "2017-03-22T16:28:08", "date_completed": null,
        "line_items": [{"id": 315, "name": "Woo Single #1", "product_id": 93, "variation_id": 0, "quantity": 2,
                        "subtotal": "6.00", "total": "6.00", "total_tax": "0.45", "sku": "", "price": 3, "meta_data": []}],
        "coupon_lines": [], "meta_data": []})
}

/// `order.updated`: the same order, completed.
pub fn order_updated() -> Value {
    let mut o = order_created();
    o["status"] = json!("completed");
    o["date_modified"] = json!("2017-03-25T10:00:00");
    o["date_modified_gmt"] = json!("2017-03-25T13:00:00");
    o["date_completed"] = json!("2017-03-25T10:00:00");
    o["date_completed_gmt"] = json!("2017-03-25T13:00:00");
    o
}

/// `customer.created`: a customer in the REST shape.
pub fn customer_created() -> Value {
    let at = parse_iso("2017-03-21T16:09:28Z").unwrap_or_else(Utc::now);
    let mut c = Contact::new(25, "john.doe@example.com", "John", "Doe", at);
    c.phone = Some("(555) 555-5555".into());
    customer_json(&c, "https://shop.example")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_the_e1_vector() {
        assert_eq!(
            sign(
                br#"{"id":727,"status":"processing","total":"29.35"}"#,
                "wc-secret"
            ),
            "VhbBPYmlKCIUbkigp2M4E3oxWXvWcQ1NoLUpF3zoFwI="
        );
        let d = Delivery::new("order.created", 12, &order_created());
        let h = d.headers("wc-secret");
        let get = |k: &str| {
            h.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(get("X-WC-Webhook-Resource"), "order");
        assert_eq!(get("X-WC-Webhook-Event"), "created");
        assert_eq!(get("X-WC-Webhook-Delivery-ID").len(), 32);
        assert_eq!(ping_body(12), "webhook_id=12");
        assert!(sample_payload("customer.created").unwrap()["billing"]["email"].is_string());
    }

    #[tokio::test]
    async fn customers_page_with_wp_headers_and_modified_after() {
        let s = start(Config {
            contacts: ContactBook::generate(45),
            ..Config::default()
        })
        .await;
        let c = reqwest::Client::new();
        let mut url = Some(s.url("/wp-json/wc/v3/customers?per_page=20"));
        let mut n = 0;
        while let Some(u) = url {
            let r = c
                .get(&u)
                .basic_auth(DEFAULT_CONSUMER_KEY, Some(DEFAULT_CONSUMER_SECRET))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["x-wp-total"], "45");
            assert_eq!(r.headers()["x-wp-totalpages"], "3");
            url = r.headers().get("link").and_then(|l| {
                let l = l.to_str().unwrap();
                l.split(", ")
                    .find(|p| p.ends_with("rel=\"next\""))
                    .map(|p| p[1..p.find('>').unwrap()].to_string())
            });
            let v: Value = r.json().await.unwrap();
            n += v.as_array().unwrap().len();
            assert!(v[0]["billing"]["email"].is_string() && v[0]["date_modified_gmt"].is_string());
        }
        assert_eq!(n, 45);
        let since = s.contacts().max_updated_at().unwrap();
        s.contacts().touch(1003);
        let r = c
            .get(s.url("/wp-json/wc/v3/customers"))
            .query(&[("modified_after", naive(since))])
            .basic_auth(DEFAULT_CONSUMER_KEY, Some(DEFAULT_CONSUMER_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-wp-total"], "1");
        let r = c
            .get(s.url("/wp-json/wc/v3/customers"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "woocommerce_rest_cannot_view"
        );
        let r = c
            .get(s.url("/wp-json/wc/v3/customers?per_page=101"))
            .basic_auth(DEFAULT_CONSUMER_KEY, Some(DEFAULT_CONSUMER_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn coupons_are_created_once() {
        let s = start(Config::default()).await;
        let c = reqwest::Client::new();
        let body = json!({"code": "10off", "discount_type": "percent", "amount": "10", "individual_use": true,
            "exclude_sale_items": true, "minimum_amount": "100.00", "usage_limit": 1, "usage_limit_per_user": 1,
            "email_restrictions": ["ann@example.com"], "date_expires": "2024-04-01T00:00:00"});
        let post = || {
            c.post(s.url("/wp-json/wc/v3/coupons"))
                .basic_auth(DEFAULT_CONSUMER_KEY, Some(DEFAULT_CONSUMER_SECRET))
                .json(&body)
                .send()
        };
        let r = post().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["amount"], "10.00");
        assert_eq!(v["id"], 719);
        let r = post().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "woocommerce_rest_coupon_code_already_exists"
        );
        assert_eq!(s.coupons().len(), 1);
    }
}
