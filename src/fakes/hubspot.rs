//! Fake HubSpot CRM v3 contacts API (API-NOTES A).
//!
//! - `GET /crm/v3/objects/contacts` (A1): `limit` (default 10, clamped to
//!   [`Config::max_list_limit`], 100 by default: the real maximum is UNCONFIRMED),
//!   `after`, `properties`, `archived`. Ordered by id; the `after` cursor is the id of
//!   the next contact, as on the real API (clients must treat it as opaque).
//!   `paging.next.{after,link}` where `link` is the full URL with the other query
//!   parameters kept; `paging` is absent on the last page.
//! - `POST /crm/v3/objects/contacts/search` (A2): `filterGroups` (up to 6, OR'd; the
//!   filters of a group AND'd; every operator of the enum), `sorts` as objects or as
//!   strings (`"-prop"` sorts descending), `query` (substring of email/name/phone),
//!   `properties`, `limit` (default 10, above 200 is a 400), `after` as a numeric offset
//!   in a string (or a number). `total` counts every match; `paging.next` is given while
//!   matches remain, also past 10,000, but asking for `after >= 10000` is a 400, as the
//!   real API does. Date properties (`createdate`, `lastmodifieddate`) compare as epoch
//!   milliseconds; their filter values may be epoch-ms strings or ISO 8601.
//! - `GET|PATCH /crm/v3/objects/contacts/{id}` (A3), also `?idProperty=email`. PATCH
//!   takes `{"properties": {...}}` with string (or null) values only: any other JSON
//!   type is a 400 here (the notes say clients always send strings). `email`,
//!   `firstname`, `lastname`, `phone` and `lifecyclestage` map onto [`Contact`] fields;
//!   other names land in [`Contact::properties`]; the read-only `hs_object_id`,
//!   `createdate` and `lastmodifieddate` are a 400. `updated_at` becomes the book's now.
//!   The backward-lifecycle rule (A4, UNCONFIRMED) is not enforced.
//! - Properties are strings; a known property without a value is `null` (as HubSpot
//!   answers); `createdate`, `hs_object_id` and `lastmodifieddate` are always returned.
//!   Without `properties` the default set of A2 is returned.
//! - Auth: `Authorization: Bearer <token>`, else 401 with the A5 error body
//!   (`status`, `message`, `correlationId`, `category: INVALID_AUTHENTICATION`).
//! - 429: the A5 body with `"message":"You have reached your secondly limit."`,
//!   `errorType: RATE_LIMIT` and [`Config::policy_name`] (`TEN_SECONDLY_ROLLING`);
//!   `Retry-After` only when [`Faults::retry_after_secs`] is set (absent on the real
//!   API, UNCONFIRMED), plus `X-HubSpot-RateLimit-Max/-Remaining` (UNCONFIRMED names).
//! - Speed: pages are a binary search plus a slice of a cached id-ordered list, and
//!   are serialized straight from the contacts without building JSON values.

use std::borrow::Cow;
use std::cmp::Ordering;

use axum::response::Response;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};

use super::contacts::{Book, Consent, Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, ThrottleReason, Vendor};
use super::util::{
    bearer, fake_uuid, iso_millis_z, json, parse_epoch_ms_or_iso, respond, segments, set_header,
    url_with,
};

/// The token the fake accepts by default.
pub const DEFAULT_TOKEN: &str = "pat-na1-00000000-1111-2222-3333-444444444444";

/// The properties search and list return when none are asked for (A2).
pub const DEFAULT_PROPERTIES: [&str; 6] = [
    "createdate",
    "email",
    "firstname",
    "hs_object_id",
    "lastmodifieddate",
    "lastname",
];

const ALWAYS: [&str; 3] = ["createdate", "hs_object_id", "lastmodifieddate"];
const READ_ONLY: [&str; 3] = ["createdate", "hs_object_id", "lastmodifieddate"];
/// Standard contact properties the fake has no field for: `null` unless set in
/// [`Contact::properties`].
const STANDARD: [&str; 10] = [
    "company",
    "city",
    "country",
    "state",
    "zip",
    "address",
    "jobtitle",
    "website",
    "mobilephone",
    "hs_language",
];
const OPERATORS: [&str; 13] = [
    "BETWEEN",
    "CONTAINS_TOKEN",
    "EQ",
    "GT",
    "GTE",
    "HAS_PROPERTY",
    "IN",
    "LT",
    "LTE",
    "NEQ",
    "NOT_CONTAINS_TOKEN",
    "NOT_HAS_PROPERTY",
    "NOT_IN",
];
/// Search cannot page past this many results (A2).
pub const SEARCH_CAP: usize = 10_000;

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    /// The accepted bearer token.
    pub token: String,
    pub contacts: ContactBook,
    pub faults: Faults,
    /// Largest page the list endpoint serves; a larger `limit` is clamped.
    pub max_list_limit: u32,
    /// `policyName` in the 429 body.
    pub policy_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            token: DEFAULT_TOKEN.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults::default(),
            max_list_limit: 100,
            policy_name: "TEN_SECONDLY_ROLLING".to_string(),
        }
    }
}

/// The fake's state.
pub struct HubSpot {
    token: String,
    contacts: ContactBook,
    max_list_limit: u32,
    policy_name: String,
}

impl HubSpot {
    pub fn new(cfg: &Config) -> Self {
        Self {
            token: cfg.token.clone(),
            contacts: cfg.contacts.clone(),
            max_list_limit: cfg.max_list_limit.max(1),
            policy_name: cfg.policy_name.clone(),
        }
    }

    /// The contacts served (change them between syncs).
    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }
}

/// Starts the fake on the current runtime.
pub async fn start(cfg: Config) -> FakeServer<HubSpot> {
    FakeServer::start(HubSpot::new(&cfg), cfg.faults).await
}

/// Starts the fake on its own thread.
pub fn start_blocking(cfg: Config) -> FakeServer<HubSpot> {
    FakeServer::start_blocking(HubSpot::new(&cfg), cfg.faults)
}

fn error(status: u16, category: &str, message: &str, seq: u64) -> Response {
    json(
        status,
        &json!({"status": "error", "message": message, "correlationId": fake_uuid(seq), "category": category}),
    )
}

impl Vendor for HubSpot {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        match bearer(req.header("authorization")) {
            Some(t) if t == self.token => Ok(()),
            Some(_) => Err(error(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                req.seq,
            )),
            None => Err(error(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports both API Key and OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                req.seq,
            )),
        }
    }

    fn server_error(&self, req: &RecordedRequest) -> Response {
        error(
            500,
            "INTERNAL_ERROR",
            "An internal error occurred.",
            req.seq,
        )
    }

    fn throttled(&self, req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = json(
            429,
            &json!({
                "status": "error",
                "message": "You have reached your secondly limit.",
                "errorType": "RATE_LIMIT",
                "correlationId": fake_uuid(req.seq),
                "policyName": self.policy_name,
                "requestId": fake_uuid(req.seq ^ 0xABCD),
            }),
        );
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        if t.reason == ThrottleReason::Rate {
            set_header(&mut r, "x-hubspot-ratelimit-max", &t.limit.to_string());
            set_header(&mut r, "x-hubspot-ratelimit-remaining", "0");
        }
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["crm", "v3", "objects", "contacts"]) => self.list(ctx, req),
            ("POST", ["crm", "v3", "objects", "contacts", "search"]) => self.search(ctx, req),
            ("GET", ["crm", "v3", "objects", "contacts", id]) => self.get_one(req, id),
            ("PATCH", ["crm", "v3", "objects", "contacts", id]) => self.patch(req, id),
            (_, ["crm", "v3", "objects", "contacts", ..]) => {
                error(405, "METHOD_NOT_ALLOWED", "Method not allowed", req.seq)
            }
            _ => error(404, "OBJECT_NOT_FOUND", "resource not found", req.seq),
        }
    }
}

/// A property of a contact: `None` when the property is unknown (left out of the
/// response), `Some(None)` when known but empty (`null`).
fn prop<'a>(c: &'a Contact, name: &str) -> Option<Option<Cow<'a, str>>> {
    let text = |s: &'a str| {
        Some(if s.is_empty() {
            None
        } else {
            Some(Cow::Borrowed(s))
        })
    };
    match name {
        "email" => text(&c.email),
        "firstname" => text(&c.first_name),
        "lastname" => text(&c.last_name),
        "phone" => Some(c.phone.as_deref().map(Cow::Borrowed)),
        "lifecyclestage" => text(&c.lifecycle_stage),
        "createdate" => Some(Some(Cow::Owned(iso_millis_z(c.created_at)))),
        "lastmodifieddate" => Some(Some(Cow::Owned(iso_millis_z(c.updated_at)))),
        "hs_object_id" => Some(Some(Cow::Owned(c.id.to_string()))),
        "hs_email_optout" => Some(Some(Cow::Borrowed(if c.consent == Consent::Unsubscribed {
            "true"
        } else {
            "false"
        }))),
        other if STANDARD.contains(&other) => {
            Some(c.properties.get(other).map(|v| Cow::Borrowed(v.as_str())))
        }
        other => c
            .properties
            .get(other)
            .map(|v| Some(Cow::Borrowed(v.as_str()))),
    }
}

fn is_date(name: &str) -> bool {
    matches!(name, "createdate" | "lastmodifieddate")
}

/// The value to compare on: dates and ids as numbers, the rest as lower-cased text.
#[derive(PartialEq, PartialOrd)]
enum Key {
    Num(f64),
    Text(String),
}

fn key_of(c: &Contact, name: &str) -> Option<Key> {
    match name {
        "createdate" => Some(Key::Num(c.created_at.timestamp_millis() as f64)),
        "lastmodifieddate" => Some(Key::Num(c.updated_at.timestamp_millis() as f64)),
        "hs_object_id" => Some(Key::Num(c.id as f64)),
        _ => {
            let v = prop(c, name)??;
            Some(match v.parse::<f64>() {
                Ok(n) => Key::Num(n),
                Err(_) => Key::Text(v.to_lowercase()),
            })
        }
    }
}

fn key_of_value(name: &str, v: &str) -> Key {
    if is_date(name) {
        if let Some(t) = parse_epoch_ms_or_iso(v) {
            return Key::Num(t.timestamp_millis() as f64);
        }
    }
    match v.trim().parse::<f64>() {
        Ok(n) => Key::Num(n),
        Err(_) => Key::Text(v.to_lowercase()),
    }
}

fn cmp_keys(a: &Key, b: &Key) -> Option<Ordering> {
    match (a, b) {
        (Key::Num(x), Key::Num(y)) => x.partial_cmp(y),
        (Key::Text(x), Key::Text(y)) => Some(x.cmp(y)),
        (Key::Num(x), Key::Text(y)) => Some(x.to_string().cmp(y)),
        (Key::Text(x), Key::Num(y)) => Some(x.cmp(&y.to_string())),
    }
}

struct Filter {
    prop: String,
    op: String,
    value: Option<String>,
    values: Vec<String>,
    high: Option<String>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Filter {
    fn matches(&self, c: &Contact) -> bool {
        let have = key_of(c, &self.prop);
        let cmp_to = |v: &Option<String>| -> Option<Ordering> {
            let v = v.as_deref()?;
            cmp_keys(have.as_ref()?, &key_of_value(&self.prop, v))
        };
        match self.op.as_str() {
            "EQ" => cmp_to(&self.value) == Some(Ordering::Equal),
            "NEQ" => cmp_to(&self.value) != Some(Ordering::Equal),
            "GT" => cmp_to(&self.value) == Some(Ordering::Greater),
            "GTE" => matches!(
                cmp_to(&self.value),
                Some(Ordering::Greater | Ordering::Equal)
            ),
            "LT" => cmp_to(&self.value) == Some(Ordering::Less),
            "LTE" => matches!(cmp_to(&self.value), Some(Ordering::Less | Ordering::Equal)),
            "BETWEEN" => {
                matches!(
                    cmp_to(&self.value),
                    Some(Ordering::Greater | Ordering::Equal)
                ) && matches!(cmp_to(&self.high), Some(Ordering::Less | Ordering::Equal))
            }
            "IN" => self
                .values
                .iter()
                .any(|v| cmp_to(&Some(v.clone())) == Some(Ordering::Equal)),
            "NOT_IN" => !self
                .values
                .iter()
                .any(|v| cmp_to(&Some(v.clone())) == Some(Ordering::Equal)),
            "HAS_PROPERTY" => have.is_some(),
            "NOT_HAS_PROPERTY" => have.is_none(),
            "CONTAINS_TOKEN" | "NOT_CONTAINS_TOKEN" => {
                let token = self
                    .value
                    .as_deref()
                    .unwrap_or("")
                    .trim_matches('*')
                    .to_lowercase();
                let hit = prop(c, &self.prop)
                    .flatten()
                    .is_some_and(|v| v.to_lowercase().contains(&token));
                hit == (self.op == "CONTAINS_TOKEN")
            }
            _ => false,
        }
    }
}

struct Props<'a> {
    c: &'a Contact,
    names: &'a [String],
}

impl Serialize for Props<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for n in self.names {
            if let Some(v) = prop(self.c, n) {
                m.serialize_entry(n, &v)?;
            }
        }
        m.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Obj<'a> {
    id: String,
    properties: Props<'a>,
    created_at: String,
    updated_at: String,
    archived: bool,
}

fn obj<'a>(c: &'a Contact, names: &'a [String]) -> Obj<'a> {
    Obj {
        id: c.id.to_string(),
        properties: Props { c, names },
        created_at: iso_millis_z(c.created_at),
        updated_at: iso_millis_z(c.updated_at),
        archived: false,
    }
}

#[derive(Serialize)]
struct Page<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<usize>,
    results: Vec<Obj<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paging: Option<Value>,
}

/// Requested property names plus the ones always returned, without duplicates.
fn prop_names<'a>(requested: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut any = false;
    for p in requested {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        any = true;
        if !out.iter().any(|o| o == p) {
            out.push(p.to_string());
        }
    }
    if !any {
        return DEFAULT_PROPERTIES.iter().map(|s| s.to_string()).collect();
    }
    for a in ALWAYS {
        if !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    out
}

fn page_json(page: &Page<'_>) -> Response {
    match serde_json::to_vec(page) {
        Ok(body) => respond(200, "application/json;charset=utf-8", body),
        Err(e) => respond(500, "text/plain", e.to_string()),
    }
}

impl HubSpot {
    fn list(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let q = req.query();
        let limit = match q.number::<i64>("limit") {
            Ok(v) => v.unwrap_or(10).clamp(1, i64::from(self.max_list_limit)) as usize,
            Err(raw) => {
                return error(
                    400,
                    "VALIDATION_ERROR",
                    &format!("Unable to parse 'limit': {raw}"),
                    req.seq,
                )
            }
        };
        let after = match q.get("after") {
            None | Some("") => None,
            Some(a) => match a.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    return error(
                        400,
                        "VALIDATION_ERROR",
                        &format!("Invalid 'after' cursor: {a}"),
                        req.seq,
                    )
                }
            },
        };
        let names = prop_names(q.get("properties").unwrap_or("").split(','));
        if q.get("archived") == Some("true") {
            return page_json(&Page {
                total: None,
                results: Vec::new(),
                paging: None,
            });
        }
        let book = self.contacts.read();
        let all = book.select("all", UpdatedRange::default(), Order::IdAsc, None);
        let start = after.map_or(0, |a| all.partition_point(|&p| book.at(p).id < a));
        let end = (start + limit).min(all.len());
        let results = all[start..end]
            .iter()
            .map(|&p| obj(book.at(p), &names))
            .collect();
        let paging = (end < all.len()).then(|| {
            let next = book.at(all[end]).id.to_string();
            let link = url_with(ctx.base_url, &req.path, &q.with("after", &next, &[]));
            json!({"next": {"after": next, "link": link}})
        });
        page_json(&Page {
            total: None,
            results,
            paging,
        })
    }

    fn search(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let bad = |m: &str| error(400, "VALIDATION_ERROR", m, req.seq);
        let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(&req.body) {
                Ok(v @ Value::Object(_)) => v,
                _ => return bad("Invalid input JSON: the body must be a JSON object"),
            }
        };
        let limit = match body.get("limit") {
            None | Some(Value::Null) => 10,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=200).contains(&n) => n as usize,
                _ => return bad("limit must be a number from 1 to 200"),
            },
        };
        let after = match body.get("after") {
            None | Some(Value::Null) => 0,
            Some(v) => match scalar(v).and_then(|s| {
                if s.is_empty() {
                    Some(0)
                } else {
                    s.parse::<usize>().ok()
                }
            }) {
                Some(n) => n,
                None => return bad("Invalid 'after': expected a numeric offset"),
            },
        };
        if after >= SEARCH_CAP {
            return bad("Cannot page beyond 10000 results. Narrow the search with filters.");
        }
        let groups = match body.get("filterGroups") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(gs)) => {
                if gs.len() > 6 {
                    return bad("Too many filter groups: at most 5 (6 in the spec) are allowed");
                }
                let mut out = Vec::new();
                for g in gs {
                    let mut filters = Vec::new();
                    for f in g
                        .get("filters")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or(&[])
                    {
                        let Some(prop) = f.get("propertyName").and_then(Value::as_str) else {
                            return bad("Each filter needs a propertyName");
                        };
                        let op = f
                            .get("operator")
                            .and_then(Value::as_str)
                            .unwrap_or("EQ")
                            .to_string();
                        if !OPERATORS.contains(&op.as_str()) {
                            return bad(&format!("Unknown operator {op}"));
                        }
                        filters.push(Filter {
                            prop: prop.to_string(),
                            op,
                            value: f.get("value").and_then(scalar),
                            values: f
                                .get("values")
                                .and_then(Value::as_array)
                                .map(|a| a.iter().filter_map(scalar).collect())
                                .unwrap_or_default(),
                            high: f.get("highValue").and_then(scalar),
                        });
                    }
                    out.push(filters);
                }
                out
            }
            Some(_) => return bad("filterGroups must be an array"),
        };
        let mut sorts: Vec<(String, bool)> = Vec::new();
        for s in body
            .get("sorts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            match s {
                Value::String(p) => match p.strip_prefix('-') {
                    Some(p) => sorts.push((p.to_string(), true)),
                    None => sorts.push((p.to_string(), false)),
                },
                Value::Object(o) => {
                    let Some(p) = o.get("propertyName").and_then(Value::as_str) else {
                        return bad("Each sort needs a propertyName");
                    };
                    let desc = o.get("direction").and_then(Value::as_str) == Some("DESCENDING");
                    sorts.push((p.to_string(), desc));
                }
                _ => return bad("sorts must be strings or objects"),
            }
        }
        let text = body
            .get("query")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_lowercase();
        let names: Vec<String> = match body.get("properties").and_then(Value::as_array) {
            Some(a) => prop_names(a.iter().filter_map(Value::as_str)),
            None => prop_names(std::iter::empty()),
        };
        let key = format!(
            "hubspot-search|{}|{}|{}",
            body.get("filterGroups")
                .map(Value::to_string)
                .unwrap_or_default(),
            body.get("sorts").map(Value::to_string).unwrap_or_default(),
            text
        );
        let book = self.contacts.read();
        let matches = book.cached(&key, |b| run_search(b, &groups, &sorts, &text));
        let total = matches.len();
        let start = after.min(total);
        let end = (start + limit).min(total);
        let results = matches[start..end]
            .iter()
            .map(|&p| obj(book.at(p), &names))
            .collect();
        let paging = (end < total).then(|| {
            let next = end.to_string();
            json!({"next": {"after": next, "link": format!("{}{}?after={}", ctx.base_url, req.path, next)}})
        });
        page_json(&Page {
            total: Some(total),
            results,
            paging,
        })
    }

    fn find(&self, book: &Book, req: &RecordedRequest, id: &str) -> Result<u64, Response> {
        let id_prop = req.query().get("idProperty").map(str::to_string);
        let found = match id_prop.as_deref() {
            Some("email") => book.get_by_email(id).map(|c| c.id),
            None | Some("hs_object_id") => id
                .parse::<u64>()
                .ok()
                .and_then(|n| book.get(n))
                .map(|c| c.id),
            Some(other) => {
                return Err(error(
                    400,
                    "VALIDATION_ERROR",
                    &format!("Property {other} is not a unique identifier"),
                    req.seq,
                ))
            }
        };
        found.ok_or_else(|| error(404, "OBJECT_NOT_FOUND", "resource not found", req.seq))
    }

    fn get_one(&self, req: &RecordedRequest, id: &str) -> Response {
        let book = self.contacts.read();
        let id = match self.find(&book, req, id) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let names = prop_names(req.query().get("properties").unwrap_or("").split(','));
        let c = book.get(id).expect("found above");
        match serde_json::to_vec(&obj(c, &names)) {
            Ok(body) => respond(200, "application/json;charset=utf-8", body),
            Err(e) => respond(500, "text/plain", e.to_string()),
        }
    }

    fn patch(&self, req: &RecordedRequest, id: &str) -> Response {
        let bad = |m: &str| error(400, "VALIDATION_ERROR", m, req.seq);
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return bad("Invalid input JSON"),
        };
        let Some(props) = body.get("properties").and_then(Value::as_object) else {
            return bad("The body needs a 'properties' object");
        };
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        for (k, v) in props {
            if READ_ONLY.contains(&k.as_str()) {
                return bad(&format!("Property \"{k}\" is read-only (READ_ONLY_VALUE)"));
            }
            match v {
                Value::String(s) => changes.push((k.clone(), Some(s.clone()))),
                Value::Null => changes.push((k.clone(), None)),
                other => {
                    return bad(&format!("Property values must be strings; \"{k}\" is {other} (fake is strict, see API-NOTES A3)"))
                }
            }
        }
        let mut book = self.contacts.write();
        let id = match self.find(&book, req, id) {
            Ok(id) => id,
            Err(r) => return r,
        };
        if let Some((_, Some(email))) = changes.iter().find(|(k, _)| k == "email") {
            if let Some(other) = book.get_by_email(email).filter(|c| c.id != id) {
                return error(
                    409,
                    "CONFLICT",
                    &format!("Contact already exists. Existing ID: {}", other.id),
                    req.seq,
                );
            }
        }
        let now = book.now();
        let updated = book
            .modify(id, |c| {
                for (k, v) in &changes {
                    let s = v.clone().unwrap_or_default();
                    match k.as_str() {
                        "email" => c.email = s,
                        "firstname" => c.first_name = s,
                        "lastname" => c.last_name = s,
                        "phone" => c.phone = v.clone().filter(|x| !x.is_empty()),
                        "lifecyclestage" => c.lifecycle_stage = s,
                        _ => match v {
                            Some(x) if !x.is_empty() => {
                                c.properties.insert(k.clone(), x.clone());
                            }
                            _ => {
                                c.properties.remove(k);
                            }
                        },
                    }
                }
                c.updated_at = now;
            })
            .expect("found above");
        drop(book);
        let names = prop_names(
            DEFAULT_PROPERTIES
                .iter()
                .copied()
                .chain(changes.iter().map(|(k, _)| k.as_str())),
        );
        match serde_json::to_vec(&obj(&updated, &names)) {
            Ok(body) => respond(200, "application/json;charset=utf-8", body),
            Err(e) => respond(500, "text/plain", e.to_string()),
        }
    }
}

fn run_search(b: &Book, groups: &[Vec<Filter>], sorts: &[(String, bool)], text: &str) -> Vec<u32> {
    let hit = |c: &Contact| {
        let text_ok = text.is_empty()
            || [
                c.email.as_str(),
                &c.first_name,
                &c.last_name,
                c.phone.as_deref().unwrap_or(""),
            ]
            .iter()
            .any(|f| f.to_lowercase().contains(text));
        let groups_ok = groups.is_empty() || groups.iter().any(|g| g.iter().all(|f| f.matches(c)));
        text_ok && groups_ok
    };
    let mut v: Vec<u32> = (0..b.len() as u32).filter(|&p| hit(b.at(p))).collect();
    if !sorts.is_empty() {
        v.sort_by(|&x, &y| {
            let (cx, cy) = (b.at(x), b.at(y));
            for (name, desc) in sorts {
                let o = match (key_of(cx, name), key_of(cy, name)) {
                    (Some(a), Some(b)) => cmp_keys(&a, &b).unwrap_or(Ordering::Equal),
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => Ordering::Equal,
                };
                let o = if *desc { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            cx.id.cmp(&cy.id)
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::server::RateLimit;
    use std::time::Duration;

    fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    #[tokio::test]
    async fn list_pages_to_the_end_and_paging_is_absent_on_the_last_page() {
        let s = start(Config {
            contacts: ContactBook::generate(250),
            ..Config::default()
        })
        .await;
        let mut url = s.url("/crm/v3/objects/contacts?limit=100&properties=email,firstname");
        let mut ids = Vec::new();
        loop {
            let v: Value = client()
                .get(&url)
                .bearer_auth(DEFAULT_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for r in v["results"].as_array().unwrap() {
                assert!(r["id"].is_string());
                assert!(r["properties"]["email"].is_string());
                assert!(r["properties"]["hs_object_id"].is_string());
                assert!(r["properties"].get("lastname").is_none());
                ids.push(r["id"].as_str().unwrap().to_string());
            }
            match v.get("paging") {
                Some(p) => {
                    let link = p["next"]["link"].as_str().unwrap();
                    assert!(link.contains("properties=email%2Cfirstname"));
                    url = link.to_string();
                }
                None => break,
            }
        }
        assert_eq!(ids.len(), 250);
        assert_eq!(ids[0], "1001");
    }

    #[tokio::test]
    async fn search_filters_by_lastmodifieddate_and_caps_at_10000() {
        let book = ContactBook::generate(60);
        let cut = book.all()[30].updated_at;
        let expected = book.all().iter().filter(|c| c.updated_at >= cut).count();
        let s = start(Config {
            contacts: book,
            ..Config::default()
        })
        .await;
        let body = json!({
            "filterGroups":[{"filters":[{"propertyName":"lastmodifieddate","operator":"GTE","value": cut.timestamp_millis().to_string()}]}],
            "sorts":[{"propertyName":"lastmodifieddate","direction":"ASCENDING"}],
            "properties":["email"], "limit": 7, "after": "0"});
        let mut after = Some("0".to_string());
        let mut seen = 0;
        let mut last = String::new();
        while let Some(a) = after {
            let mut b = body.clone();
            b["after"] = json!(a);
            let v: Value = client()
                .post(s.url("/crm/v3/objects/contacts/search"))
                .bearer_auth(DEFAULT_TOKEN)
                .json(&b)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(v["total"], json!(expected));
            for r in v["results"].as_array().unwrap() {
                let m = r["properties"]["lastmodifieddate"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert!(m >= last);
                last = m;
                seen += 1;
            }
            after = v["paging"]["next"]["after"].as_str().map(str::to_string);
        }
        assert_eq!(seen, expected);
        let r = client()
            .post(s.url("/crm/v3/objects/contacts/search"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"after": "10000", "sorts": ["-createdate"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = client()
            .post(s.url("/crm/v3/objects/contacts/search"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"limit": 201}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn patch_by_email_updates_and_bumps_lastmodifieddate() {
        let s = start(Config::default()).await;
        let c = s.contacts().get(1003).unwrap();
        let r = client()
            .patch(s.url(&format!(
                "/crm/v3/objects/contacts/{}?idProperty=email",
                c.email.to_uppercase()
            )))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"properties": {"lifecyclestage": "customer", "favorite": "tea"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["id"], "1003");
        assert_eq!(v["properties"]["lifecyclestage"], "customer");
        let after = s.contacts().get(1003).unwrap();
        assert!(after.updated_at > c.updated_at);
        assert_eq!(after.properties["favorite"], "tea");
        let r = client()
            .patch(s.url("/crm/v3/objects/contacts/1003"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"properties": {"age": 5}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = client()
            .patch(s.url("/crm/v3/objects/contacts/99"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"properties": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }

    #[tokio::test]
    async fn wrong_token_gets_401_and_rate_limit_gets_the_429_shape() {
        let s = start(Config {
            faults: Faults {
                rate_limit: Some(RateLimit::new(2, Duration::from_secs(60))),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let url = s.url("/crm/v3/objects/contacts");
        let r = client().get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["category"], "INVALID_AUTHENTICATION");
        assert!(v["correlationId"].is_string() && v["message"].is_string());
        for _ in 0..2 {
            assert_eq!(
                client()
                    .get(&url)
                    .bearer_auth(DEFAULT_TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .status(),
                200
            );
        }
        let r = client()
            .get(&url)
            .bearer_auth(DEFAULT_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().get("retry-after").is_none());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errorType"], "RATE_LIMIT");
        assert_eq!(v["policyName"], "TEN_SECONDLY_ROLLING");
        assert_eq!(v["message"], "You have reached your secondly limit.");
        assert_eq!(s.requests_to("/crm/v3/objects/contacts").len(), 4);
        assert_eq!(s.requests().last().unwrap().status, 429);
    }

    #[tokio::test]
    async fn fail_every_gives_500s_deterministically() {
        let s = start(Config {
            faults: Faults {
                fail_every: Some(2),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let url = s.url("/crm/v3/objects/contacts");
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(
                client()
                    .get(&url)
                    .bearer_auth(DEFAULT_TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(statuses, [200, 500, 200, 500]);
    }
}
