//! Fake Klaviyo API, JSON:API style (API-NOTES C).
//!
//! - `GET /api/profiles` (also with a trailing slash; C1): `page[size]` (default 20,
//!   1..=100, else 400), `page[cursor]` (opaque), `filter` (`equals`, `any`,
//!   `greater-than`, `greater-or-equal`, `less-than`, `less-or-equal` on `updated`,
//!   `created`, `email`, `id`, `phone_number`, `external_id`; combined with `and(...)`
//!   or top-level commas), `sort` (`id`, `updated`, each with `-`; others are a 400 in
//!   the fake), `fields[profile]` (sparse attributes). `links.self` is the request URL;
//!   `links.next` is the full URL with `page%5Bcursor%5D=...` and the other parameters
//!   kept, and `null` on the last page (`links.prev` is always `null`). Cursors are
//!   keyset positions, so changes between pages neither skip nor repeat contacts.
//!   Profile ids come from [`profile_id`].
//! - `GET /api/profiles/{id}`.
//! - `POST /api/events` (C2): validates `data.type == "event"`, an object
//!   `properties`, `metric.data.type == "metric"` with a name of 1..127 chars,
//!   `profile.data.type == "profile"` with an `id` or at least one of `email`,
//!   `phone_number`, `external_id`, `anonymous_id`, and `time` (if given: ISO 8601,
//!   after 1990, at most a year ahead); a failure is a 400 JSON:API error with
//!   `source.pointer`. Answers 202 with an empty body. An event whose
//!   (profile, metric, `unique_id`) was seen before is accepted but recorded once
//!   (without `unique_id` the key is `time` to the second): [`Klaviyo::events`],
//!   [`Klaviyo::duplicates`].
//! - Every call needs `Authorization: Klaviyo-API-Key <key>` (401 `not_authenticated`
//!   when missing or another scheme, `authentication_failed` when wrong) and a
//!   `revision: YYYY-MM-DD[.suffix]` header (400 without). Responses are
//!   `application/vnd.api+json`; non-429 responses carry `RateLimit-Limit`,
//!   `-Remaining` and `-Reset` when a rate limit is configured.
//! - 429: the throttled error body of C3. `Retry-After` only when
//!   [`Faults::retry_after_secs`] is set: the brief asks for "default absent", while the
//!   notes suggest sending it; clients must cope without it either way (UNCONFIRMED).

use std::collections::HashSet;

use axum::response::Response;
use chrono::{DateTime, Duration, TimeZone, Utc};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::contacts::{Consent, Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{
    b64url, b64url_decode, empty, fake_uuid, iso_utc_offset, parse_iso, respond, segments,
    set_header, url_with,
};

/// The private key the fake accepts by default.
pub const DEFAULT_API_KEY: &str = "pk_fake_0123456789abcdef0123456789abcdef";
/// The current stable revision (C).
pub const REVISION: &str = "2026-07-15";
pub const MEDIA_TYPE: &str = "application/vnd.api+json";

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    pub contacts: ContactBook,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults::default(),
        }
    }
}

/// An event as recorded (once per dedupe key).
#[derive(Debug, Clone, PartialEq)]
pub struct KlaviyoEvent {
    pub metric: String,
    /// `profile.data` as sent.
    pub profile: Value,
    pub properties: Value,
    pub time: Option<String>,
    pub value: Option<f64>,
    pub unique_id: Option<String>,
    /// The whole request body.
    pub body: Value,
}

/// The fake's state.
pub struct Klaviyo {
    api_key: String,
    contacts: ContactBook,
    events: Mutex<Vec<KlaviyoEvent>>,
    seen: Mutex<HashSet<String>>,
    duplicates: Mutex<u64>,
}

impl Klaviyo {
    pub fn new(cfg: &Config) -> Self {
        Self {
            api_key: cfg.api_key.clone(),
            contacts: cfg.contacts.clone(),
            events: Mutex::new(Vec::new()),
            seen: Mutex::new(HashSet::new()),
            duplicates: Mutex::new(0),
        }
    }

    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }

    /// The recorded events, without duplicates, in arrival order.
    pub fn events(&self) -> Vec<KlaviyoEvent> {
        self.events.lock().clone()
    }

    /// How many accepted events were duplicates (not recorded again).
    pub fn duplicates(&self) -> u64 {
        *self.duplicates.lock()
    }
}

pub async fn start(cfg: Config) -> FakeServer<Klaviyo> {
    FakeServer::start(Klaviyo::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Klaviyo> {
    FakeServer::start_blocking(Klaviyo::new(&cfg), cfg.faults)
}

/// The Klaviyo profile id of a contact: a ULID-shaped 26-character string.
pub fn profile_id(contact_id: u64) -> String {
    format!("01HQ{contact_id:022}")
}

/// The contact id behind a [`profile_id`].
pub fn contact_id(profile_id: &str) -> Option<u64> {
    profile_id
        .strip_prefix("01HQ")
        .filter(|s| s.len() == 22)?
        .parse()
        .ok()
}

fn api_json(status: u16, v: &Value) -> Response {
    respond(status, MEDIA_TYPE, v.to_string())
}

/// A JSON:API error document with one error.
fn error(
    status: u16,
    code: &str,
    title: &str,
    detail: &str,
    source: Option<Value>,
    seq: u64,
) -> Response {
    let mut e = json!({"id": fake_uuid(seq), "status": status, "code": code, "title": title, "detail": detail});
    if let Some(s) = source {
        e["source"] = s;
    }
    e["links"] = json!({});
    e["meta"] = json!({});
    api_json(status, &json!({"errors": [e]}))
}

fn invalid(detail: &str, pointer: Option<&str>, parameter: Option<&str>, seq: u64) -> Response {
    let source = match (pointer, parameter) {
        (Some(p), _) => Some(json!({"pointer": p})),
        (None, Some(p)) => Some(json!({"parameter": p})),
        _ => None,
    };
    error(400, "invalid", "Invalid input.", detail, source, seq)
}

fn valid_revision(r: &str) -> bool {
    let (date, suffix) = match r.split_once('.') {
        Some((d, s)) => (d, Some(s)),
        None => (r, None),
    };
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && !suffix.is_some_and(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        })
}

impl Vendor for Klaviyo {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        let auth = req.header("authorization").unwrap_or("").trim();
        let Some(key) = auth.strip_prefix("Klaviyo-API-Key ") else {
            return Err(error(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                "Missing or invalid private key.",
                Some(json!({"pointer": "/data/"})),
                req.seq,
            ));
        };
        if key.trim() != self.api_key {
            return Err(error(
                401,
                "authentication_failed",
                "Incorrect authentication credentials.",
                "Incorrect authentication credentials.",
                Some(json!({"pointer": "/data/"})),
                req.seq,
            ));
        }
        Ok(())
    }

    fn server_error(&self, req: &RecordedRequest) -> Response {
        error(
            500,
            "error",
            "A server error occurred.",
            "A server error occurred.",
            None,
            req.seq,
        )
    }

    fn throttled(&self, req: &RecordedRequest, t: &Throttle) -> Response {
        let secs = t.retry_after_secs.unwrap_or(t.reset_secs).max(1);
        let unit = if secs == 1 { "second" } else { "seconds" };
        let body = json!({"errors": [{
            "id": fake_uuid(req.seq),
            "status": 429,
            "code": "throttled",
            "title": "Request was throttled.",
            "detail": format!("Request was throttled. Expected available in {secs} {unit}."),
            "source": {"pointer": "/data"},
            "links": {"type": "https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling#rate-limits"},
            "meta": {}
        }]});
        let mut r = api_json(429, &body);
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        match req.header("revision").map(str::trim) {
            None | Some("") => {
                return invalid(
                    "Missing `revision` header.",
                    None,
                    Some("revision"),
                    req.seq,
                );
            }
            Some(r) if !valid_revision(r) => {
                return invalid(
                    &format!("Invalid `revision` header: '{r}'."),
                    None,
                    Some("revision"),
                    req.seq,
                );
            }
            _ => {}
        }
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let mut r = match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["api", "profiles"]) => self.list(ctx, req),
            ("GET", ["api", "profiles", id]) => {
                let book = self.contacts.read();
                match contact_id(id).and_then(|n| book.get(n)) {
                    Some(c) => api_json(
                        200,
                        &json!({"data": profile_json(c, ctx.base_url, None, additional_subscriptions(req)), "links": {"self": format!("{}/api/profiles/{id}/", ctx.base_url)}}),
                    ),
                    None => error(
                        404,
                        "not_found",
                        "Not found.",
                        &format!("A profile with id {id} does not exist."),
                        None,
                        req.seq,
                    ),
                }
            }
            ("POST", ["api", "events"]) => self.create_event(req),
            (_, ["api", "profiles" | "events", ..]) => error(
                405,
                "method_not_allowed",
                "Method not allowed.",
                &format!("Method \"{}\" not allowed.", req.method),
                None,
                req.seq,
            ),
            _ => error(404, "not_found", "Not found.", "Not found.", None, req.seq),
        };
        if let Some(u) = ctx.rate {
            set_header(&mut r, "ratelimit-limit", &u.limit.to_string());
            set_header(
                &mut r,
                "ratelimit-remaining",
                &u.limit.saturating_sub(u.used).to_string(),
            );
            set_header(&mut r, "ratelimit-reset", &u.reset_secs.to_string());
        }
        r
    }
}

/// The C1 profile resource of a contact; `fields` limits the attributes;
/// `subscriptions` adds `attributes.subscriptions` (`additional-fields[profile]`).
pub fn profile_json(
    c: &Contact,
    base_url: &str,
    fields: Option<&[String]>,
    subscriptions: bool,
) -> Value {
    let id = profile_id(c.id);
    let mut props = serde_json::Map::new();
    for (k, v) in &c.properties {
        props.insert(k.clone(), json!(v));
    }
    let mut attrs = json!({
        "email": c.email,
        "phone_number": c.phone,
        "external_id": null,
        "anonymous_id": null,
        "first_name": c.first_name,
        "last_name": c.last_name,
        "organization": null,
        "locale": null,
        "title": null,
        "image": null,
        "created": iso_utc_offset(c.created_at),
        "updated": iso_utc_offset(c.updated_at),
        "last_event_date": null,
        "location": {"address1": null, "address2": null, "city": null, "country": null, "latitude": null,
                     "longitude": null, "region": null, "zip": null, "timezone": null, "ip": null},
        "properties": props,
    });
    if let (Some(f), Some(m)) = (fields, attrs.as_object_mut()) {
        m.retain(|k, _| f.iter().any(|x| x == k));
    }
    if subscriptions {
        attrs["subscriptions"] = subscriptions_json(c);
    }
    json!({"type": "profile", "id": id, "attributes": attrs, "links": {"self": format!("{base_url}/api/profiles/{id}/")}})
}

/// `attributes.subscriptions` of a contact (email consent from [`Contact::consent`]).
fn subscriptions_json(c: &Contact) -> Value {
    let (consent, can) = match c.consent {
        Consent::Subscribed => ("SUBSCRIBED", true),
        Consent::Unsubscribed => ("UNSUBSCRIBED", false),
        Consent::Pending | Consent::NotSubscribed => ("NEVER_SUBSCRIBED", false),
    };
    let at = (consent != "NEVER_SUBSCRIBED").then(|| iso_utc_offset(c.created_at));
    json!({
        "email": {"marketing": {"can_receive_email_marketing": can, "consent": consent, "consent_timestamp": at,
            "last_updated": at, "method": at.as_ref().map(|_| "API"), "method_detail": null,
            "custom_method_detail": null, "double_optin": null, "suppression": [], "list_suppressions": []}},
        "sms": {"marketing": {"can_receive_sms_marketing": false, "consent": "NEVER_SUBSCRIBED",
            "consent_timestamp": null, "method": null, "method_detail": null, "last_updated": null}}
    })
}

/// One parsed filter condition.
enum Cond {
    /// On `updated` or `created`.
    Time {
        created: bool,
        op: &'static str,
        t: DateTime<Utc>,
    },
    /// `equals` / `any` on a text field.
    OneOf { field: String, values: Vec<String> },
}

/// Splits at commas that are outside parentheses, brackets and quotes.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0);
    for (i, ch) in s.char_indices() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(ch),
            (None, '(' | '[') => depth += 1,
            (None, ')' | ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['\'', '"'] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

fn parse_filter(s: &str) -> Result<Vec<Cond>, String> {
    let mut out = Vec::new();
    for part in split_top(s) {
        parse_expr(part.trim(), &mut out)?;
    }
    Ok(out)
}

fn parse_expr(s: &str, out: &mut Vec<Cond>) -> Result<(), String> {
    let open = s
        .find('(')
        .ok_or_else(|| format!("Invalid filter expression '{s}'"))?;
    if !s.ends_with(')') {
        return Err(format!("Invalid filter expression '{s}'"));
    }
    let (name, inner) = (s[..open].trim(), &s[open + 1..s.len() - 1]);
    if name == "and" {
        for part in split_top(inner) {
            parse_expr(part.trim(), out)?;
        }
        return Ok(());
    }
    let args = split_top(inner);
    if args.len() != 2 {
        return Err(format!("'{name}' takes two arguments"));
    }
    let field = args[0].trim().to_string();
    let time_op = match name {
        "greater-than" => Some("gt"),
        "greater-or-equal" => Some("ge"),
        "less-than" => Some("lt"),
        "less-or-equal" => Some("le"),
        "equals" if field == "updated" || field == "created" => Some("eq"),
        "equals" | "any" => None,
        other => return Err(format!("Unsupported filter operation '{other}'")),
    };
    match time_op {
        Some(op) => {
            if field != "updated" && field != "created" {
                return Err(format!("'{name}' is not allowed on field '{field}'"));
            }
            let raw = unquote(args[1]);
            let t = parse_iso(&raw).ok_or_else(|| format!("Invalid datetime '{raw}'"))?;
            out.push(Cond::Time {
                created: field == "created",
                op,
                t,
            });
        }
        None => {
            if !["email", "id", "phone_number", "external_id"].contains(&field.as_str()) {
                return Err(format!("'{name}' is not allowed on field '{field}'"));
            }
            let v = args[1].trim();
            let values = if name == "any" {
                let list = v
                    .strip_prefix('[')
                    .and_then(|x| x.strip_suffix(']'))
                    .ok_or("any() takes a [list]")?;
                split_top(list).into_iter().map(unquote).collect()
            } else {
                vec![unquote(v)]
            };
            out.push(Cond::OneOf { field, values });
        }
    }
    Ok(())
}

fn additional_subscriptions(req: &RecordedRequest) -> bool {
    req.query()
        .get("additional-fields[profile]")
        .is_some_and(|f| f.split(',').any(|x| x.trim() == "subscriptions"))
}

fn text_field(c: &Contact, field: &str) -> Option<String> {
    match field {
        "email" => Some(c.email.to_lowercase()),
        "id" => Some(profile_id(c.id)),
        "phone_number" => c.phone.clone(),
        _ => None,
    }
}

impl Klaviyo {
    fn list(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let q = req.query();
        let size = match q.number::<i64>("page[size]") {
            Ok(v) => v.unwrap_or(20),
            Err(raw) => {
                return invalid(
                    &format!("'{raw}' is not a valid integer."),
                    None,
                    Some("page[size]"),
                    req.seq,
                )
            }
        };
        if !(1..=100).contains(&size) {
            return invalid(
                "Page size must be between 1 and 100.",
                None,
                Some("page[size]"),
                req.seq,
            );
        }
        let size = size as usize;
        let conds = match q.get("filter").map(parse_filter).transpose() {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => return invalid(&e, None, Some("filter"), req.seq),
        };
        let sort = q.get("sort").unwrap_or("id");
        let order = match sort {
            "id" => Order::IdAsc,
            "-id" => Order::IdDesc,
            "updated" => Order::UpdatedAsc,
            "-updated" => Order::UpdatedDesc,
            other => {
                return invalid(
                    &format!(
                    "Sort '{other}' is not supported (the klantreis fake sorts by id or updated)."
                ),
                    None,
                    Some("sort"),
                    req.seq,
                )
            }
        };
        let by_updated = matches!(order, Order::UpdatedAsc | Order::UpdatedDesc);
        let subs = additional_subscriptions(req);
        let fields: Option<Vec<String>> = q.get("fields[profile]").map(|f| {
            f.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        // Cursor: the key of the last profile delivered.
        let last: Option<(i64, u64)> = match q.get("page[cursor]").filter(|c| !c.is_empty()) {
            None => None,
            Some(cur) => {
                let text = b64url_decode(cur)
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let parts: Vec<&str> = text.split("::").collect();
                let parsed = match (parts.as_slice(), by_updated) {
                    (["id", id], false) => id.parse().ok().map(|id| (0, id)),
                    (["updated", ms, id], true) => ms.parse().ok().zip(id.parse().ok()),
                    _ => None,
                };
                match parsed {
                    Some(k) => Some(k),
                    None => {
                        return invalid("Invalid page cursor.", None, Some("page[cursor]"), req.seq)
                    }
                }
            }
        };
        let mut range = UpdatedRange::default();
        let mut rest: Vec<&Cond> = Vec::new();
        for c in &conds {
            match c {
                Cond::Time {
                    created: false,
                    op,
                    t,
                } => match *op {
                    "gt" => range.after = Some((*t, false)),
                    "ge" => range.after = Some((*t, true)),
                    "lt" => range.before = Some((*t, false)),
                    "le" => range.before = Some((*t, true)),
                    _ => {
                        range.after = Some((*t, true));
                        range.before = Some((*t, true));
                    }
                },
                other => rest.push(other),
            }
        }
        let keep = |c: &Contact| {
            rest.iter().all(|cond| match cond {
                Cond::Time { op, t, .. } => match *op {
                    "gt" => c.created_at > *t,
                    "ge" => c.created_at >= *t,
                    "lt" => c.created_at < *t,
                    "le" => c.created_at <= *t,
                    _ => c.created_at == *t,
                },
                Cond::OneOf { field, values } => text_field(c, field).is_some_and(|v| {
                    values.iter().any(|x| {
                        if field == "email" {
                            x.to_lowercase() == v
                        } else {
                            *x == v
                        }
                    })
                }),
            })
        };
        let book = self.contacts.read();
        let sel = book.select(
            &format!("klaviyo|{}", q.get("filter").unwrap_or("")),
            range,
            order,
            if rest.is_empty() { None } else { Some(&keep) },
        );
        let key = |p: u32| {
            let c = book.at(p);
            (
                if by_updated {
                    c.updated_at.timestamp_millis()
                } else {
                    0
                },
                c.id,
            )
        };
        let start = match last {
            None => 0,
            Some(l) => match order {
                Order::IdAsc | Order::UpdatedAsc => sel.partition_point(|&p| key(p) <= l),
                Order::IdDesc | Order::UpdatedDesc => sel.partition_point(|&p| key(p) >= l),
            },
        };
        let end = (start + size).min(sel.len());
        let data: Vec<Value> = sel[start..end]
            .iter()
            .map(|&p| profile_json(book.at(p), ctx.base_url, fields.as_deref(), subs))
            .collect();
        let next = (end < sel.len() && end > start).then(|| {
            let (ms, id) = key(sel[end - 1]);
            let cursor = if by_updated {
                format!("updated::{ms}::{id}")
            } else {
                format!("id::{id}")
            };
            url_with(
                ctx.base_url,
                &req.path,
                &q.with("page[cursor]", &b64url(cursor.as_bytes()), &[]),
            )
        });
        let self_link = if req.query.is_empty() {
            format!("{}{}", ctx.base_url, req.path)
        } else {
            format!("{}{}?{}", ctx.base_url, req.path, req.query)
        };
        api_json(
            200,
            &json!({"data": data, "links": {"self": self_link, "next": next, "prev": null}}),
        )
    }

    fn create_event(&self, req: &RecordedRequest) -> Response {
        let bad = |detail: &str, pointer: &str| invalid(detail, Some(pointer), None, req.seq);
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return bad(&format!("JSON parse error - {e}"), "/data"),
        };
        if body.pointer("/data/type").and_then(Value::as_str) != Some("event") {
            return bad("'type' must be 'event'.", "/data/type");
        }
        let Some(attrs) = body.pointer("/data/attributes").filter(|a| a.is_object()) else {
            return bad("'attributes' is a required field.", "/data/attributes");
        };
        let Some(properties) = attrs.get("properties").filter(|p| p.is_object()) else {
            return bad(
                "'properties' is a required object.",
                "/data/attributes/properties",
            );
        };
        if attrs.pointer("/metric/data/type").and_then(Value::as_str) != Some("metric") {
            return bad(
                "'metric' must be {\"data\": {\"type\": \"metric\", ...}}.",
                "/data/attributes/metric/data/type",
            );
        }
        let metric = attrs
            .pointer("/metric/data/attributes/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if metric.trim().is_empty() || metric.chars().count() >= 128 {
            return bad(
                "The metric name must have 1 to 127 characters.",
                "/data/attributes/metric/data/attributes/name",
            );
        }
        let Some(profile) = attrs
            .pointer("/profile/data")
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("profile"))
        else {
            return bad(
                "'profile' must be {\"data\": {\"type\": \"profile\", ...}}.",
                "/data/attributes/profile/data/type",
            );
        };
        let ident = |k: &str| -> Option<String> {
            profile
                .pointer(&format!("/attributes/{k}"))
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    format!(
                        "{k}:{}",
                        if k == "email" {
                            s.trim().to_lowercase()
                        } else {
                            s.trim().to_string()
                        }
                    )
                })
        };
        let identity = profile
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| format!("id:{s}"))
            .or_else(|| ident("email"))
            .or_else(|| ident("phone_number"))
            .or_else(|| ident("external_id"))
            .or_else(|| ident("anonymous_id"));
        let Some(identity) = identity else {
            return bad(
                "One of id, email, phone_number, external_id or anonymous_id is required for the profile.",
                "/data/attributes/profile/data/attributes",
            );
        };
        let time = match attrs.get("time") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let raw = v.as_str().unwrap_or("");
                let Some(t) = parse_iso(raw) else {
                    return bad(
                        &format!("'{raw}' is not a valid datetime."),
                        "/data/attributes/time",
                    );
                };
                let floor = Utc
                    .with_ymd_and_hms(1990, 1, 1, 0, 0, 0)
                    .single()
                    .expect("valid date");
                if t <= floor || t > Utc::now() + Duration::days(365) {
                    return bad(
                        "The event time must be after 1990 and at most one year in the future.",
                        "/data/attributes/time",
                    );
                }
                Some(t)
            }
        };
        let value = match attrs.get("value") {
            None | Some(Value::Null) => None,
            Some(v) => match v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                Some(n) => Some(n),
                None => return bad("'value' must be a number.", "/data/attributes/value"),
            },
        };
        let unique_id = attrs
            .get("unique_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let dedupe = match (&unique_id, time) {
            (Some(u), _) => format!("{identity}|{metric}|u:{u}"),
            (None, Some(t)) => format!("{identity}|{metric}|t:{}", t.timestamp()),
            (None, None) => format!("{identity}|{metric}|t:{}", Utc::now().timestamp()),
        };
        if self.seen.lock().insert(dedupe) {
            self.events.lock().push(KlaviyoEvent {
                metric: metric.to_string(),
                profile: profile.clone(),
                properties: properties.clone(),
                time: attrs
                    .get("time")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                value,
                unique_id,
                body: body.clone(),
            });
        } else {
            *self.duplicates.lock() += 1;
        }
        empty(202)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(url)
            .header(
                "authorization",
                format!("Klaviyo-API-Key {DEFAULT_API_KEY}"),
            )
            .header("revision", REVISION)
    }

    #[tokio::test]
    async fn profiles_follow_links_next_to_the_end() {
        let s = start(Config {
            contacts: ContactBook::generate(230),
            ..Config::default()
        })
        .await;
        let mut url =
            s.url("/api/profiles/?page[size]=100&additional-fields[profile]=subscriptions");
        let mut n = 0;
        loop {
            let r = get(&url).send().await.unwrap();
            assert_eq!(r.headers()["content-type"], MEDIA_TYPE);
            let v: Value = r.json().await.unwrap();
            n += v["data"].as_array().unwrap().len();
            assert!(
                v["data"][0]["attributes"]["subscriptions"]["email"]["marketing"]["consent"]
                    .is_string()
            );
            match v["links"]["next"].as_str() {
                Some(next) => {
                    assert!(next.starts_with(&s.base_url) && next.contains("page%5Bcursor%5D="));
                    url = next.to_string();
                }
                None => break,
            }
        }
        assert_eq!(n, 230);
        let r = get(&s.url("/api/profiles?page[size]=101"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn updated_filter_and_revision_header() {
        let s = start(Config::default()).await;
        let cut = s.contacts().max_updated_at().unwrap();
        s.contacts().touch(1002);
        let filter = format!("greater-than(updated,{})", cut.format("%Y-%m-%dT%H:%M:%SZ"));
        let v: Value = get(&s.url("/api/profiles"))
            .query(&[("filter", filter)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["id"], profile_id(1002));
        assert!(v["links"]["next"].is_null());
        let r = reqwest::Client::new()
            .get(s.url("/api/profiles"))
            .header(
                "authorization",
                format!("Klaviyo-API-Key {DEFAULT_API_KEY}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["source"]["parameter"], "revision");
        let r = reqwest::Client::new()
            .get(s.url("/api/profiles"))
            .header("revision", REVISION)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }

    #[tokio::test]
    async fn events_are_validated_and_deduplicated() {
        let s = start(Config::default()).await;
        let event = json!({"data": {"type": "event", "attributes": {
            "properties": {"OrderId": "1001"}, "time": "2024-03-01T10:00:00+00:00", "value": 49.99,
            "unique_id": "order-1001-review",
            "metric": {"data": {"type": "metric", "attributes": {"name": "Review Requested"}}},
            "profile": {"data": {"type": "profile", "attributes": {"email": "sarah.mason@klaviyo-demo.com"}}}}}});
        let post = |b: &Value| {
            reqwest::Client::new()
                .post(s.url("/api/events"))
                .header(
                    "authorization",
                    format!("Klaviyo-API-Key {DEFAULT_API_KEY}"),
                )
                .header("revision", REVISION)
                .header("content-type", MEDIA_TYPE)
                .body(b.to_string())
                .send()
        };
        for _ in 0..2 {
            let r = post(&event).await.unwrap();
            assert_eq!(r.status(), 202);
            assert!(r.bytes().await.unwrap().is_empty());
        }
        assert_eq!(s.events().len(), 1);
        assert_eq!(s.duplicates(), 1);
        let mut bad = event.clone();
        bad["data"]["attributes"]["profile"]["data"]["attributes"] = json!({});
        let r = post(&bad).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["errors"][0]["source"]["pointer"],
            "/data/attributes/profile/data/attributes"
        );
        let mut bad = event.clone();
        bad["data"]["attributes"]
            .as_object_mut()
            .unwrap()
            .remove("properties");
        assert_eq!(post(&bad).await.unwrap().status(), 400);
    }

    #[tokio::test]
    async fn throttled_body_without_retry_after_by_default() {
        let s = start(Config {
            faults: Faults {
                throttle_every: Some(1),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let r = get(&s.url("/api/profiles")).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().get("retry-after").is_none());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "throttled");
        s.set_faults(Faults {
            throttle_every: Some(1),
            retry_after_secs: Some(3),
            ..Faults::default()
        });
        let r = get(&s.url("/api/profiles")).send().await.unwrap();
        assert_eq!(r.headers()["retry-after"], "3");
    }

    #[test]
    fn filter_parser() {
        let c =
            parse_filter("and(greater-than(updated,2024-01-01T00:00:00Z),equals(email,'a@b.com'))")
                .unwrap();
        assert_eq!(c.len(), 2);
        assert!(parse_filter("any(email,['a@b.com','c@d.com'])").is_ok());
        assert!(parse_filter("contains(email,'x')").is_err());
        assert!(
            valid_revision("2026-07-15")
                && valid_revision("2024-10-15.pre")
                && !valid_revision("2024-1-15")
        );
    }
}
