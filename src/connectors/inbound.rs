//! `[webhooks]` in a definition: how the vendor's webhooks are signed, where a
//! delivery's id and topic are, and what each topic means for the customer (see
//! `connectors/README.md`, "Webhooks"). Loading checks every key, scheme, header
//! name and path, so a bad section is a `klantreis check` problem with its
//! file:line:column. `server::webhooks` interprets the compiled [`Webhooks`].

use super::mapping::Problems;
use super::path::JsonPath;
use crate::model::RESERVED_ATTRIBUTES;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// `[webhooks]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhooks {
    secret_param: Option<Spanned<toml::Value>>,
    signature: Spanned<RawSignature>,
    ping: Option<RawPing>,
    delivery_id: Spanned<RawKey>,
    topic: Option<Spanned<RawKey>>,
    #[serde(default)]
    topics: BTreeMap<Spanned<String>, RawTopic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    scheme: Spanned<String>,
    header: Option<Spanned<toml::Value>>,
    request: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPing {
    body_prefix: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    header: Option<Spanned<toml::Value>>,
    path: Option<Spanned<toml::Value>>,
    default: Option<String>,
    parts: Option<Vec<Spanned<RawPick>>>,
    join: Option<String>,
    #[serde(default)]
    add_body_hash: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPick {
    header: Option<Spanned<toml::Value>>,
    path: Option<Spanned<toml::Value>>,
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    email: Option<Spanned<toml::Value>>,
    source_id: Option<Spanned<toml::Value>>,
    order_id: Option<Spanned<toml::Value>>,
    by_order: Option<Spanned<toml::Value>>,
    #[serde(default)]
    attributes: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    attributes_from: Option<Spanned<String>>,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    kind: Spanned<String>,
    time: Spanned<toml::Value>,
    #[serde(default)]
    data: BTreeMap<String, Spanned<toml::Value>>,
    data_from: Option<Spanned<toml::Value>>,
    when: Option<RawWhen>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    path: Spanned<String>,
    equals: String,
}

/// A compiled `[webhooks]` section.
#[derive(Debug, Clone)]
pub struct Webhooks {
    /// Instance settings that may hold the key, first present wins.
    pub secret_params: Vec<String>,
    pub scheme: Scheme,
    /// An unsigned body starting with this (and no signature header) is the
    /// vendor's "does this URL work" ping: exactly 200, nothing stored.
    pub ping: Option<String>,
    pub delivery_id: Key,
    /// `None`: every delivery has the topic `webhook`.
    pub topic: Option<Key>,
    /// Topic → what it means; `*` is every topic not listed.
    pub topics: BTreeMap<String, Topic>,
}

/// How deliveries are authenticated.
#[derive(Debug, Clone)]
pub enum Scheme {
    /// Base64 HMAC-SHA256 of the raw body in the first of these (lower-cased)
    /// headers (Shopify, WooCommerce).
    HmacSha256Base64 { headers: Vec<String> },
    /// `t=UNIX,v1=HEX[,v1=...]`: hex HMAC-SHA256 of `"{t}.{body}"`, `t` within
    /// `[server] webhook_tolerance_secs` of now (Stripe, the generic webhook).
    TimestampedHex { headers: Vec<String> },
    /// Unsigned; the body only names an object (`id=...`), which is fetched with
    /// this definition request and the instance's credentials (Mollie).
    Fetch { request: String },
}

/// Where a value is: a path into the document (the body, or the fetched object) or
/// a fact about the delivery (`$topic`, `$id`, `$signature_timestamp`).
#[derive(Debug, Clone)]
pub enum Src {
    Path(JsonPath),
    Meta(Meta),
}

/// Facts about a delivery that are not in its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// The delivery's topic.
    Topic,
    /// The object id a `fetch` webhook named.
    Id,
    /// The signed timestamp `t` of a `timestamped_hex` signature (Unix seconds).
    SignatureTimestamp,
}

/// A delivery id or topic: parts joined, each the first header or path that has a
/// value, else its default; a part without either is a 400.
#[derive(Debug, Clone)]
pub struct Key {
    pub parts: Vec<Pick>,
    pub join: String,
    /// Append a hash of the body (WooCommerce's delivery ids repeat within a second).
    pub add_body_hash: bool,
}

/// One part of a [`Key`].
#[derive(Debug, Clone)]
pub struct Pick {
    /// Lower-cased header names.
    pub headers: Vec<String>,
    pub paths: Vec<Src>,
    pub default: Option<String>,
    /// The 400's message when there is no value (`X-Shopify-Topic is missing`).
    pub missing: String,
}

/// How a value is converted after it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// A non-empty string, or a number as written (ids never go through f64).
    Text,
    /// A number, or a string that parses as one (money).
    Number,
    /// A JSON integer.
    Integer,
    /// A JSON boolean, or `"true"`/`"false"`.
    Bool,
    /// A time stored as RFC 3339 UTC: RFC 3339, a zone-less time taken as UTC, or
    /// Unix seconds.
    Time,
    /// The value as sent.
    Any,
}

/// One mapped value: the first of its sources that gives one.
#[derive(Debug, Clone)]
pub struct Field {
    pub sources: Vec<Src>,
    pub ty: FieldType,
    /// `last_segment`: keep what follows the last `/` (`gid://shopify/Customer/7` → `7`).
    pub last_segment: bool,
    /// Values that mean "none" (WooCommerce's guest `customer_id` 0).
    pub unless: Vec<String>,
    /// The source is a list: the sum of the numbers at this path in each item.
    pub sum: Option<JsonPath>,
}

/// What one topic means for the customer.
#[derive(Debug, Clone, Default)]
pub struct Topic {
    pub email: Option<Field>,
    pub source_id: Option<Field>,
    /// The order this concerns, remembered so a later refund finds its customer.
    pub order_id: Option<Field>,
    /// A refund names only the order: the customer is found through it.
    pub by_order: Option<Field>,
    pub attributes: Vec<(String, Field)>,
    /// An object whose every key is an attribute (the engine's own names skipped).
    pub attributes_from: Option<Src>,
    pub events: Vec<EventMap>,
}

/// An event a topic records.
#[derive(Debug, Clone)]
pub struct EventMap {
    /// Literal text and placeholders; `.` and `/` in the result become `_`.
    pub kind: Vec<KindPart>,
    /// No time, no event.
    pub time: Field,
    pub data: Vec<(String, Field)>,
    /// The first of these that is an object is the data (then `data` is added).
    pub data_from: Vec<Src>,
    pub when: Option<(Src, String)>,
}

/// A piece of an event kind.
#[derive(Debug, Clone)]
pub enum KindPart {
    Text(String),
    /// `{path}`: the text there, or `unknown`.
    Value(Src),
}

const SCHEMES: &str = "hmac_sha256_base64, timestamped_hex, fetch";
const TYPES: &str = "text, number, integer, bool, time, any";

fn src(p: &mut Problems<'_>, at: usize, what: &str, s: &str) -> Option<Src> {
    if let Some(m) = s.trim().strip_prefix('$') {
        return match m {
            "topic" => Some(Src::Meta(Meta::Topic)),
            "id" => Some(Src::Meta(Meta::Id)),
            "signature_timestamp" => Some(Src::Meta(Meta::SignatureTimestamp)),
            other => {
                p.at(
                    at,
                    format!(
                        "{what}: unknown delivery fact ${other} ($topic, $id, $signature_timestamp)"
                    ),
                );
                None
            }
        };
    }
    match JsonPath::parse(s) {
        Ok(path) => Some(Src::Path(path)),
        Err(e) => {
            p.at(at, format!("{what}: {e}"));
            None
        }
    }
}

/// A string or a list of strings.
fn strings(p: &mut Problems<'_>, what: &str, v: &Spanned<toml::Value>) -> Vec<String> {
    match v.get_ref() {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_str()) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => {
            p.at(
                v.span().start,
                format!("{what}: expected a string or a non-empty list of strings"),
            );
            Vec::new()
        }
    }
}

fn headers(p: &mut Problems<'_>, what: &str, v: &Spanned<toml::Value>) -> Vec<String> {
    let names = strings(p, what, v);
    for n in &names {
        if axum::http::HeaderName::from_bytes(n.as_bytes()).is_err() {
            p.at(
                v.span().start,
                format!("{what}: {n:?} is not a valid header name"),
            );
        }
    }
    names
}

fn paths(p: &mut Problems<'_>, what: &str, v: &Spanned<toml::Value>) -> Vec<Src> {
    strings(p, what, v)
        .iter()
        .filter_map(|s| src(p, v.span().start, what, s))
        .collect()
}

fn pick(
    p: &mut Problems<'_>,
    what: &str,
    at: usize,
    header: Option<&Spanned<toml::Value>>,
    path: Option<&Spanned<toml::Value>>,
    default: Option<&String>,
) -> Pick {
    let hs = header.map(|h| headers(p, what, h)).unwrap_or_default();
    let written = path.map(|x| strings(p, what, x)).unwrap_or_default();
    let ps = written
        .iter()
        .filter_map(|s| src(p, path.map_or(at, |x| x.span().start), what, s))
        .collect();
    let missing = match (hs.first(), written.first()) {
        (Some(h), _) => format!("{h} is missing"),
        (None, Some(s)) => format!("the body has no {s:?}"),
        (None, None) => format!("{what} is missing"),
    };
    if header.is_none() && path.is_none() && default.is_none() {
        p.at(at, format!("{what} needs `header`, `path` or `default`"));
    }
    Pick {
        headers: hs.iter().map(|h| h.to_ascii_lowercase()).collect(),
        paths: ps,
        default: default.cloned(),
        missing,
    }
}

fn key(p: &mut Problems<'_>, what: &str, raw: &Spanned<RawKey>) -> Key {
    let at = raw.span().start;
    let k = raw.get_ref();
    let single = k.header.is_some() || k.path.is_some() || k.default.is_some();
    let parts = match (&k.parts, single) {
        (Some(_), true) => {
            p.at(
                at,
                format!("{what}: give either `parts` or `header`/`path`/`default`, not both"),
            );
            Vec::new()
        }
        (Some(parts), false) => {
            if parts.is_empty() {
                p.at(at, format!("{what}: `parts` is empty"));
            }
            parts
                .iter()
                .map(|part| {
                    let r = part.get_ref();
                    pick(
                        p,
                        what,
                        part.span().start,
                        r.header.as_ref(),
                        r.path.as_ref(),
                        r.default.as_ref(),
                    )
                })
                .collect()
        }
        (None, _) => vec![pick(
            p,
            what,
            at,
            k.header.as_ref(),
            k.path.as_ref(),
            k.default.as_ref(),
        )],
    };
    Key {
        parts,
        join: k.join.clone().unwrap_or_else(|| "/".into()),
        add_body_hash: k.add_body_hash,
    }
}

/// A value: a path, a list of fallback paths, or a table
/// `{ path, type, transform, unless, sum }`.
fn field(p: &mut Problems<'_>, what: &str, v: &Spanned<toml::Value>, ty: FieldType) -> Field {
    let at = v.span().start;
    let mut f = Field {
        sources: Vec::new(),
        ty,
        last_segment: false,
        unless: Vec::new(),
        sum: None,
    };
    let table = match v.get_ref() {
        toml::Value::Table(t) => t,
        _ => {
            f.sources = paths(p, what, v);
            return f;
        }
    };
    for (k, val) in table {
        let sub = Spanned::new(v.span(), val.clone());
        match k.as_str() {
            "path" => f.sources = paths(p, what, &sub),
            "type" => {
                f.ty = match val.as_str() {
                    Some("text") => FieldType::Text,
                    Some("number") => FieldType::Number,
                    Some("integer") => FieldType::Integer,
                    Some("bool") => FieldType::Bool,
                    Some("time") => FieldType::Time,
                    Some("any") => FieldType::Any,
                    _ => {
                        p.at(at, format!("{what}: unknown type {val} ({TYPES})"));
                        ty
                    }
                }
            }
            "transform" => match val.as_str() {
                Some("last_segment") => f.last_segment = true,
                _ => p.at(at, format!("{what}: unknown transform {val} (last_segment)")),
            },
            "unless" => f.unless = strings(p, what, &sub),
            "sum" => match val.as_str().map(JsonPath::parse) {
                Some(Ok(path)) => f.sum = Some(path),
                Some(Err(e)) => p.at(at, format!("{what}: sum: {e}")),
                None => p.at(at, format!("{what}: sum is a path")),
            },
            other => p.at(
                at,
                format!(
                    "{what}: unknown key {other:?} (a value is {{ path, type, transform, unless, sum }})"
                ),
            ),
        }
    }
    if f.sources.is_empty() {
        p.at(at, format!("{what} needs a `path`"));
    }
    if f.sum.is_some() && !matches!(f.ty, FieldType::Text | FieldType::Number) {
        p.at(at, format!("{what}: a sum is a number"));
    }
    if f.sum.is_some() {
        f.ty = FieldType::Number;
    }
    f
}

fn kind_parts(p: &mut Problems<'_>, what: &str, kind: &Spanned<String>) -> Vec<KindPart> {
    let at = kind.span().start;
    let mut out = Vec::new();
    let mut rest = kind.get_ref().as_str();
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(KindPart::Text(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            p.at(at, format!("{what}: a `{{` without its `}}`"));
            return out;
        };
        if let Some(s) = src(p, at, what, &rest[open + 1..open + close]) {
            out.push(KindPart::Value(s));
        }
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        p.at(at, format!("{what}: a `}}` without its `{{`"));
    }
    if !rest.is_empty() {
        out.push(KindPart::Text(rest.to_string()));
    }
    if out.is_empty() {
        p.at(at, format!("{what} is empty"));
    }
    out
}

/// Compiles `[webhooks]`; `requests` are the definition's request names.
pub(crate) fn compile(
    raw: &RawWebhooks,
    requests: &[&str],
    p: &mut Problems<'_>,
) -> Option<Webhooks> {
    let before = p.list.len();
    let sig = raw.signature.get_ref();
    let sig_at = sig.scheme.span().start;
    let sig_headers = |p: &mut Problems<'_>| match &sig.header {
        Some(h) => headers(p, "webhooks.signature.header", h)
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        None => {
            p.at(
                sig_at,
                format!(
                    "signature scheme {:?} needs `header`, the header(s) carrying it",
                    sig.scheme.get_ref()
                ),
            );
            Vec::new()
        }
    };
    let scheme = match sig.scheme.get_ref().as_str() {
        "hmac_sha256_base64" => Scheme::HmacSha256Base64 {
            headers: sig_headers(p),
        },
        "timestamped_hex" => Scheme::TimestampedHex {
            headers: sig_headers(p),
        },
        "fetch" => {
            let request = sig
                .request
                .as_ref()
                .map_or("webhook_fetch", |r| r.get_ref().as_str());
            if !requests.contains(&request) {
                let at = sig.request.as_ref().map_or(sig_at, |r| r.span().start);
                p.at(
                    at,
                    format!(
                        "signature scheme \"fetch\" needs the request {request:?} in [requests]"
                    ),
                );
            }
            if let Some(h) = &sig.header {
                p.at(h.span().start, "a fetched webhook is unsigned: no `header`");
            }
            Scheme::Fetch {
                request: request.to_string(),
            }
        }
        other => {
            p.at(
                sig_at,
                format!("unknown signature scheme {other:?} ({SCHEMES})"),
            );
            return None;
        }
    };
    if !matches!(scheme, Scheme::Fetch { .. }) {
        if let Some(r) = &sig.request {
            p.at(r.span().start, "`request` is only for the \"fetch\" scheme");
        }
    }
    let secret_params = match &raw.secret_param {
        Some(s) => strings(p, "webhooks.secret_param", s),
        None => vec!["webhook_secret".to_string()],
    };
    let ping = raw.ping.as_ref().map(|r| {
        if r.body_prefix.get_ref().is_empty() {
            p.at(r.body_prefix.span().start, "ping.body_prefix is empty");
        }
        r.body_prefix.get_ref().clone()
    });
    let delivery_id = key(p, "webhooks.delivery_id", &raw.delivery_id);
    let topic = raw.topic.as_ref().map(|t| key(p, "webhooks.topic", t));
    let mut topics = BTreeMap::new();
    for (name, t) in &raw.topics {
        let n = name.get_ref();
        let what = |k: &str| format!("webhooks.topics.{n:?}.{k}");
        let opt = |p: &mut Problems<'_>, k: &str, v: &Option<Spanned<toml::Value>>| {
            v.as_ref().map(|v| field(p, &what(k), v, FieldType::Text))
        };
        let mut topic = Topic {
            email: opt(p, "email", &t.email),
            source_id: opt(p, "source_id", &t.source_id),
            order_id: opt(p, "order_id", &t.order_id),
            by_order: opt(p, "by_order", &t.by_order),
            attributes_from: t
                .attributes_from
                .as_ref()
                .and_then(|a| src(p, a.span().start, &what("attributes_from"), a.get_ref())),
            ..Topic::default()
        };
        for (attr, v) in &t.attributes {
            let a = attr.get_ref();
            if RESERVED_ATTRIBUTES.contains(&a.as_str()) || a == "email" {
                p.at(
                    attr.span().start,
                    format!("attribute {a:?} is the engine's (use `email` for the address)"),
                );
            }
            let f = field(p, &what(&format!("attributes.{a}")), v, FieldType::Text);
            topic.attributes.push((a.clone(), f));
        }
        for (i, e) in t.events.iter().enumerate() {
            let w = what(&format!("events[{i}]"));
            let data_from = e
                .data_from
                .as_ref()
                .map(|d| paths(p, &format!("{w}.data_from"), d))
                .unwrap_or_default();
            let when = e.when.as_ref().and_then(|c| {
                let s = src(
                    p,
                    c.path.span().start,
                    &format!("{w}.when"),
                    c.path.get_ref(),
                )?;
                Some((s, c.equals.clone()))
            });
            topic.events.push(EventMap {
                kind: kind_parts(p, &format!("{w}.kind"), &e.kind),
                time: field(p, &format!("{w}.time"), &e.time, FieldType::Time),
                data: e
                    .data
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            field(p, &format!("{w}.data.{k}"), v, FieldType::Text),
                        )
                    })
                    .collect(),
                data_from,
                when,
            });
        }
        topics.insert(n.clone(), topic);
    }
    (p.list.len() == before).then_some(Webhooks {
        secret_params,
        scheme,
        ping,
        delivery_id,
        topic,
        topics,
    })
}

/// A shipped definition's `[webhooks]`, loaded once (for tests and benchmarks that
/// parse deliveries without a config).
pub fn builtin(name: &str) -> Option<&'static Webhooks> {
    static LOADED: std::sync::OnceLock<BTreeMap<&'static str, Webhooks>> =
        std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            super::builtin::BUILTIN
                .iter()
                .filter_map(|(n, text)| {
                    let def = super::Definition::parse(n, n, text).ok()?;
                    Some((*n, def.webhooks?))
                })
                .collect()
        })
        .get(name)
}
