//! `POST /webhooks/{instance}`: deliveries from shops and other sources.
//!
//! The instance is a `[connectors.NAME]` in config.toml; the `[webhooks]` section of
//! its definition (`connectors/<type>.toml`, see `connectors/README.md`) says how a
//! delivery is signed, where its id and topic are, and what each topic means for
//! the customer. This module is the one interpreter of those sections; no vendor is
//! named in the code. The shipped definitions:
//! - `shopify`: `hmac_sha256_base64` in `X-Shopify-Hmac-Sha256` (also without
//!   `X-`); deduplicated on `X-Shopify-Webhook-Id` (API-NOTES D).
//! - `woocommerce`: the same scheme in `X-WC-Webhook-Signature`; the unsigned
//!   creation ping `webhook_id=N` (`ping.body_prefix`) gets exactly 200 and stores
//!   nothing; the delivery id is webhook id / delivery id / body hash (API-NOTES E).
//! - `webhook` (any other source): `timestamped_hex`, a Stripe-style
//!   `Webhook-Signature` or `Stripe-Signature: t=…,v1=…`, hex HMAC of
//!   `"{t}.{body}"`, several `v1` during a secret rotation, `[server]
//!   webhook_tolerance_secs` (300) against replays (API-NOTES F). Its topic `*`
//!   maps `email`, `customer_id`, `attributes`, `type` and `data.object`.
//! - `mollie`: `fetch`: the unsigned body only names an object (`id=tr_…`); the
//!   object is fetched with the definition's `webhook_fetch` request and the
//!   instance's credentials, and the topic's paths read it (API-NOTES G).
//!
//! The key is the first of the definition's `secret_param` settings the instance
//! has (`webhook_secret`; for `webhook`, also `secret`). An instance whose
//! definition has no `[webhooks]` is refused with 404, like an unknown one.
//!
//! Order of work: refuse what is bad (nothing is stored for a refusal), skip a
//! delivery already accepted, merge the customer and re-evaluate them, record the
//! delivery, then wait for a group-commit flush and only then answer 2xx. The
//! delivery record is written after the customer, so a crash in between at worst
//! makes the sender's retry apply the (idempotent) merge again.

use super::{AppState, HttpError};
use crate::config::{expand_env, ConnectorInstanceConfig};
use crate::connectors::inbound::{
    Field, FieldType, Key, KindPart, Meta, Scheme, Src, Topic, Webhooks,
};
use crate::model::{Customer, Event};
use crate::store::{DeliveryRecord, DeliveryStore, Store};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// What a verified delivery means.
#[derive(Debug)]
pub struct Parsed {
    pub delivery_id: String,
    pub topic: String,
    /// What it says about a customer, before identity is resolved.
    pub change: Option<Change>,
}

/// A change to one customer, with what identifies them.
#[derive(Debug, Default)]
pub struct Change {
    pub email: Option<String>,
    /// The customer's id in the source (for `<instance>:<id>` and `<type>_id`).
    pub source_id: Option<String>,
    /// The order this concerns, remembered so a later refund finds its customer.
    pub order_id: Option<String>,
    /// A refund names only the order: find the customer through it.
    pub by_order: Option<String>,
    pub attributes: Map<String, Value>,
    pub events: Vec<Event>,
}

/// The handler.
pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::response::Response, HttpError> {
    let result = receive_inner(&state, &instance, &headers, body).await;
    match &result {
        Ok(_) => {}
        Err(e) => {
            metrics::counter!("klantreis_webhooks_refused_total", "reason" => e.reason())
                .increment(1);
            tracing::info!(instance = %instance, reason = e.reason(), message = %e, "webhook refused");
        }
    }
    result
}

async fn receive_inner(
    state: &Arc<AppState>,
    instance: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::response::Response, HttpError> {
    let loaded = state.loaded.load_full();
    let Some(inst) = loaded.config.connectors.iter().find(|c| c.name == instance) else {
        return Err(HttpError::UnknownInstance(format!(
            "no connector instance {instance:?} in config.toml"
        )));
    };
    let Some(wh) = loaded
        .definitions
        .get(instance)
        .and_then(|d| d.webhooks.as_ref())
    else {
        return Err(HttpError::UnknownInstance(format!(
            "instance {instance:?} is a {} connector, which receives no webhooks (its definition has no [webhooks])",
            inst.kind
        )));
    };
    let limit = state.settings.max_body_bytes;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| HttpError::TooLarge(limit))?;
    let now = state.clock.now();
    let parsed = match &wh.scheme {
        // Unsigned webhooks that only name an object (Mollie) need no secret: what
        // counts is what the vendor answers when asked with our credentials.
        Scheme::Fetch { request } => {
            let Some(conn) = loaded.connectors.get(instance) else {
                return Err(HttpError::UnknownInstance(format!(
                    "instance {instance:?} cannot fetch what its webhooks name: it could not be built (run `klantreis check`)"
                )));
            };
            fetched(conn, wh, request, &body).await?
        }
        _ => {
            let secret = webhook_secret(inst, wh)?;
            match parse(
                wh,
                headers,
                &body,
                &secret,
                now.timestamp(),
                state.settings.webhook_tolerance_secs,
            )? {
                Some(p) => p,
                None => {
                    metrics::counter!("klantreis_webhooks_accepted_total", "instance" => instance.to_string(), "topic" => "ping").increment(1);
                    return Ok(Json(json!({"status": "ping"})).into_response());
                }
            }
        }
    };
    let st = state.clone();
    let inst_name = instance.to_string();
    let kind = inst.kind.clone();
    let now_text = crate::time::format(now);
    let slot = state
        .apply_slots
        .acquire()
        .await
        .map_err(|e| HttpError::Internal(e.to_string()))?;
    let outcome =
        tokio::task::spawn_blocking(move || apply(&st, &inst_name, &kind, parsed, &now_text))
            .await
            .map_err(|e| HttpError::Internal(e.to_string()))??;
    drop(slot);
    if outcome.status != "duplicate" {
        state.commit.durable().await.map_err(HttpError::Internal)?;
    }
    metrics::counter!(
        "klantreis_webhooks_accepted_total",
        "instance" => instance.to_string(),
        "topic" => outcome.topic.clone()
    )
    .increment(1);
    Ok(Json(json!({
        "status": outcome.status,
        "delivery": outcome.delivery_id,
        "topic": outcome.topic,
        "customer": outcome.customer,
        "transitions": outcome.transitions,
    }))
    .into_response())
}

struct Outcome {
    status: &'static str,
    delivery_id: String,
    topic: String,
    customer: Option<String>,
    transitions: Vec<crate::model::Transition>,
}

/// Applies a verified delivery (blocking).
fn apply(
    state: &AppState,
    instance: &str,
    kind: &str,
    parsed: Parsed,
    now_text: &str,
) -> Result<Outcome, HttpError> {
    let mut outcome = Outcome {
        status: "accepted",
        delivery_id: parsed.delivery_id.clone(),
        topic: parsed.topic.clone(),
        customer: None,
        transitions: Vec::new(),
    };
    if state.store.delivery_seen(instance, &parsed.delivery_id)? {
        outcome.status = "duplicate";
        return Ok(outcome);
    }
    if let Some(change) = parsed.change {
        let order_id = change.order_id.clone();
        if let Some(customer) = resolve(state, instance, kind, change)? {
            outcome.customer = Some(customer.id.clone());
            if let Some(o) = order_id {
                state.store.remember_order(instance, &o, &customer.id)?;
            }
            outcome.transitions = state.apply_and_evaluate(customer)?;
        } else {
            outcome.status = "ignored";
        }
    } else {
        outcome.status = "ignored";
    }
    let record = DeliveryRecord {
        at: now_text.to_string(),
        topic: parsed.topic,
        customer: outcome.customer.clone(),
    };
    if !state
        .store
        .record_delivery(instance, &parsed.delivery_id, &record)?
    {
        // A concurrent copy of this delivery was recorded first; the merge it made
        // and ours are the same, so this one is a duplicate too.
        outcome.status = "duplicate";
    }
    Ok(outcome)
}

/// Which customer a change is about, as the connectors join records: a known email
/// wins, else `<instance>:<source id>` (guests: `<instance>:<email>`).
fn resolve(
    state: &AppState,
    instance: &str,
    kind: &str,
    change: Change,
) -> Result<Option<Customer>, HttpError> {
    let email = change
        .email
        .as_deref()
        .map(crate::store::normalize_email)
        .filter(|e| !e.is_empty());
    let mut id = None;
    if let Some(order) = &change.by_order {
        id = state.store.customer_of_order(instance, order)?;
    }
    if id.is_none() {
        if let Some(e) = &email {
            id = state.store.id_for_email(e)?;
        }
    }
    let id = match (id, &change.source_id, &email) {
        (Some(id), _, _) => id,
        (None, Some(s), _) => format!("{instance}:{s}"),
        (None, None, Some(e)) => format!("{instance}:{e}"),
        (None, None, None) => return Ok(None),
    };
    let mut c = Customer::new(id);
    c.attributes = change.attributes;
    if let Some(e) = email {
        c.attributes.insert("email".into(), Value::String(e));
    }
    if let Some(s) = change.source_id {
        c.attributes.insert(format!("{kind}_id"), Value::String(s));
    }
    c.events = change.events;
    Ok(Some(c))
}

/// The instance's webhook key: the first of the definition's `secret_param`
/// settings the instance has, with `${VAR}` expanded. Never logged.
fn webhook_secret(inst: &ConnectorInstanceConfig, wh: &Webhooks) -> Result<String, HttpError> {
    let found = wh
        .secret_params
        .iter()
        .find_map(|p| inst.settings.get(p).map(|s| (p, s)));
    let Some((param, raw)) = found.and_then(|(p, s)| s.value.as_str().map(|v| (p, v))) else {
        return Err(HttpError::UnknownInstance(format!(
            "instance {:?} takes no webhooks: it has no {}",
            inst.name,
            wh.secret_params.join(" or ")
        )));
    };
    match expand_env(raw) {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) => Err(HttpError::UnknownInstance(format!(
            "instance {:?} takes no webhooks: its {param} is empty",
            inst.name
        ))),
        Err(e) => Err(HttpError::Internal(format!(
            "instance {:?}: {param}: {e}",
            inst.name
        ))),
    }
}

/// The first of these (lower-case) headers that is present.
fn header<'a, S: AsRef<str>>(headers: &'a HeaderMap, names: &[S]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(n.as_ref()).and_then(|v| v.to_str().ok()))
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Checks a base64 HMAC-SHA256 of the body in constant time.
fn check_base64_hmac(given: Option<&str>, body: &[u8], secret: &str) -> Result<(), HttpError> {
    let Some(given) = given else {
        return Err(HttpError::BadSignature(
            "the signature header is missing".into(),
        ));
    };
    let given = base64::engine::general_purpose::STANDARD
        .decode(given.trim())
        .map_err(|_| HttpError::BadSignature("the signature is not base64".into()))?;
    let expected = hmac(secret.as_bytes(), &[body]);
    if bool::from(expected.ct_eq(&given)) {
        Ok(())
    } else {
        Err(HttpError::BadSignature(
            "the signature does not match the body".into(),
        ))
    }
}

/// Checks a Stripe-style `t=…,v1=…[,v1=…]` signature: a hex HMAC-SHA256 of
/// `"{t}.{body}"`, any `v1` may match, `t` within the tolerance. Returns `t`.
fn check_timestamped(
    given: Option<&str>,
    body: &[u8],
    secret: &str,
    now: i64,
    tolerance_secs: u64,
) -> Result<i64, HttpError> {
    let Some(sig) = given else {
        return Err(HttpError::BadSignature(
            "the Webhook-Signature header is missing".into(),
        ));
    };
    let mut t = None;
    let mut v1 = Vec::new();
    for part in sig.split(',') {
        match part.trim().split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1.push(x.to_string()),
            _ => {} // other schemes (v0) are ignored
        }
    }
    let Some(t) = t else {
        return Err(HttpError::BadSignature(
            "the signature has no timestamp t=".into(),
        ));
    };
    let expected = hex(&hmac(
        secret.as_bytes(),
        &[t.to_string().as_bytes(), b".", body],
    ));
    if !v1
        .iter()
        .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())))
    {
        return Err(HttpError::BadSignature(
            "no v1 signature matches the body".into(),
        ));
    }
    if now.abs_diff(t) > tolerance_secs {
        return Err(HttpError::StaleTimestamp(format!(
            "the signed timestamp is more than {tolerance_secs} s from now (replayed or stale)"
        )));
    }
    Ok(t)
}

fn parse_json(body: &[u8]) -> Result<Value, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::MalformedJson(format!("invalid JSON: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a delivery is besides its document (`$topic`, `$id`, `$signature_timestamp`).
#[derive(Debug, Default)]
struct Facts {
    topic: Option<String>,
    id: Option<String>,
    signature_timestamp: Option<i64>,
}

/// The body, parsed as JSON only when a path needs it (so a missing header is
/// reported before a malformed body, as the vendors' checks would).
enum Doc<'a> {
    Raw(&'a [u8]),
    Parsed(Value),
}

impl Doc<'_> {
    fn get(&mut self) -> Result<&Value, HttpError> {
        if let Doc::Raw(body) = self {
            *self = Doc::Parsed(parse_json(body)?);
        }
        match self {
            Doc::Parsed(v) => Ok(v),
            Doc::Raw(_) => unreachable!("parsed just above"),
        }
    }
}

/// The value at a source; null is no value.
fn lookup(src: &Src, v: &Value, facts: &Facts) -> Option<Value> {
    let found = match src {
        Src::Path(p) => p.get(v).cloned(),
        Src::Meta(Meta::Topic) => facts.topic.clone().map(Value::String),
        Src::Meta(Meta::Id) => facts.id.clone().map(Value::String),
        Src::Meta(Meta::SignatureTimestamp) => facts.signature_timestamp.map(Value::from),
    };
    found.filter(|v| !v.is_null())
}

/// A scalar as a string (ids are 64-bit integers: never through f64).
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Converts a value to a field's type; `None` when it is not one.
fn convert(v: Value, ty: FieldType) -> Option<Value> {
    match ty {
        FieldType::Text => as_text(&v).map(Value::String),
        // Money: Shopify and WooCommerce send strings.
        FieldType::Number => match v {
            Value::Number(n) => Some(Value::Number(n)),
            Value::String(s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number),
            _ => None,
        },
        FieldType::Integer => v.as_i64().map(Value::from),
        FieldType::Bool => match v {
            Value::Bool(b) => Some(Value::Bool(b)),
            Value::String(s) if s == "true" || s == "false" => Some(Value::Bool(s == "true")),
            _ => None,
        },
        // RFC 3339; a time without a zone is UTC (WooCommerce's `*_gmt`); a number
        // is Unix seconds.
        FieldType::Time => {
            let t = match &v {
                Value::Number(n) => chrono::DateTime::from_timestamp(n.as_i64()?, 0)?,
                _ => {
                    let s = as_text(&v)?;
                    crate::time::parse(&s).or_else(|| crate::time::parse(&format!("{s}Z")))?
                }
            };
            Some(Value::String(crate::time::format(t)))
        }
        FieldType::Any => Some(v),
    }
}

/// A field's value: the first source that gives one.
fn value(f: &Field, v: &Value, facts: &Facts) -> Option<Value> {
    if let Some(item_path) = &f.sum {
        let total: f64 = f
            .sources
            .iter()
            .find_map(|s| lookup(s, v, facts))
            .and_then(|list| {
                list.as_array().map(|items| {
                    items
                        .iter()
                        .filter_map(|item| item_path.get(item).cloned())
                        .filter_map(|n| convert(n, FieldType::Number)?.as_f64())
                        .sum()
                })
            })
            .unwrap_or(0.0);
        return Some(Value::from(total));
    }
    f.sources.iter().find_map(|s| {
        let mut out = convert(lookup(s, v, facts)?, f.ty)?;
        if f.last_segment {
            if let Value::String(text) = &out {
                let last = text.rsplit('/').next().unwrap_or(text).to_string();
                out = Value::String(last);
            }
        }
        if !f.unless.is_empty() {
            if let Some(t) = as_text(&out) {
                if f.unless.contains(&t) {
                    return None;
                }
            }
        }
        Some(out)
    })
}

fn text_value(f: Option<&Field>, v: &Value, facts: &Facts) -> Option<String> {
    value(f?, v, facts).as_ref().and_then(as_text)
}

/// A delivery id or topic from its key.
fn key_value(
    key: &Key,
    headers: &HeaderMap,
    body: &[u8],
    doc: &mut Doc<'_>,
    facts: &Facts,
) -> Result<String, HttpError> {
    let mut parts = Vec::with_capacity(key.parts.len() + 1);
    for pick in &key.parts {
        let mut found = header(headers, &pick.headers).map(str::to_string);
        if found.is_none() && !pick.paths.is_empty() {
            let v = doc.get()?;
            found = pick
                .paths
                .iter()
                .find_map(|s| lookup(s, v, facts).as_ref().and_then(as_text));
        }
        match found.or_else(|| pick.default.clone()) {
            Some(x) => parts.push(x),
            None => return Err(HttpError::BadRequest(pick.missing.clone())),
        }
    }
    if key.add_body_hash {
        parts.push(hex(&<Sha256 as sha2::Digest>::digest(body)[..8]));
    }
    Ok(parts.join(&key.join))
}

/// Verifies a signed delivery and says what it means, by the definition's
/// `[webhooks]`. `None` is the vendor's unsigned ping.
pub fn parse(
    wh: &Webhooks,
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
    now: i64,
    tolerance_secs: u64,
) -> Result<Option<Parsed>, HttpError> {
    let mut facts = Facts::default();
    match &wh.scheme {
        Scheme::HmacSha256Base64 { headers: names } => {
            let signature = header(headers, names);
            if let Some(prefix) = &wh.ping {
                if signature.is_none() && body.starts_with(prefix.as_bytes()) {
                    // The unsigned ping sent when the webhook is saved: exactly 200,
                    // nothing stored.
                    return Ok(None);
                }
            }
            check_base64_hmac(signature, body, secret)?;
        }
        Scheme::TimestampedHex { headers: names } => {
            let signature = header(headers, names);
            if let Some(prefix) = &wh.ping {
                if signature.is_none() && body.starts_with(prefix.as_bytes()) {
                    return Ok(None);
                }
            }
            facts.signature_timestamp = Some(check_timestamped(
                signature,
                body,
                secret,
                now,
                tolerance_secs,
            )?);
        }
        Scheme::Fetch { .. } => {
            return Err(HttpError::Internal(
                "a fetched webhook has no signature to check".into(),
            ))
        }
    }
    let mut doc = Doc::Raw(body);
    interpret(wh, headers, body, &mut doc, facts).map(Some)
}

/// Delivery id, topic and change from a verified delivery's document.
fn interpret(
    wh: &Webhooks,
    headers: &HeaderMap,
    body: &[u8],
    doc: &mut Doc<'_>,
    mut facts: Facts,
) -> Result<Parsed, HttpError> {
    let delivery_id = key_value(&wh.delivery_id, headers, body, doc, &facts)?;
    let topic = match &wh.topic {
        Some(k) => key_value(k, headers, body, doc, &facts)?,
        None => "webhook".to_string(),
    };
    facts.topic = Some(topic.clone());
    let v = doc.get()?;
    let change = wh
        .topics
        .get(&topic)
        .or_else(|| wh.topics.get("*"))
        .map(|t| change(t, v, &facts));
    Ok(Parsed {
        delivery_id,
        topic,
        change,
    })
}

/// What one topic's mapping says about the customer.
fn change(t: &Topic, v: &Value, facts: &Facts) -> Change {
    let mut ch = Change {
        email: text_value(t.email.as_ref(), v, facts),
        source_id: text_value(t.source_id.as_ref(), v, facts),
        order_id: text_value(t.order_id.as_ref(), v, facts),
        by_order: text_value(t.by_order.as_ref(), v, facts),
        ..Change::default()
    };
    if let Some(Value::Object(a)) = t.attributes_from.as_ref().and_then(|s| lookup(s, v, facts)) {
        for (k, val) in a {
            if !crate::model::RESERVED_ATTRIBUTES.contains(&k.as_str()) {
                ch.attributes.insert(k, val);
            }
        }
    }
    for (name, f) in &t.attributes {
        if let Some(x) = value(f, v, facts) {
            ch.attributes.insert(name.clone(), x);
        }
    }
    for e in &t.events {
        if let Some((path, equals)) = &e.when {
            let actual = lookup(path, v, facts)
                .as_ref()
                .and_then(as_text)
                .unwrap_or_default();
            if &actual != equals {
                continue;
            }
        }
        let Some(at) = value(&e.time, v, facts).as_ref().and_then(as_text) else {
            continue;
        };
        let mut kind = String::new();
        for part in &e.kind {
            match part {
                KindPart::Text(s) => kind.push_str(s),
                KindPart::Value(s) => kind.push_str(
                    &lookup(s, v, facts)
                        .as_ref()
                        .and_then(as_text)
                        .unwrap_or_else(|| "unknown".into()),
                ),
            }
        }
        let mut data = e
            .data_from
            .iter()
            .find_map(|s| lookup(s, v, facts).filter(Value::is_object))
            .unwrap_or_else(|| json!({}));
        if let Value::Object(m) = &mut data {
            for (k, f) in &e.data {
                m.insert(k.clone(), value(f, v, facts).unwrap_or(Value::Null));
            }
        }
        ch.events.push(Event {
            kind: kind.replace(['.', '/'], "_"),
            at,
            data,
        });
    }
    ch
}

/// A webhook that only names an object (Mollie: `id=tr_…`, form-encoded, or a
/// JSON `id`): fetch it with the definition's request and map what the vendor says.
async fn fetched(
    conn: &crate::connectors::Connector,
    wh: &Webhooks,
    request: &str,
    body: &[u8],
) -> Result<Parsed, HttpError> {
    let id = url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("id").and_then(as_text))
        })
        .ok_or_else(|| HttpError::BadRequest("the body names no id (id=...)".into()))?;
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(HttpError::BadRequest(format!("{id:?} is not an object id")));
    }
    let r = conn
        .send(request, &json!({ "id": id }))
        .await
        .map_err(|e| match e {
            crate::connectors::ConnectorError::Status { status: 404, .. } => {
                HttpError::BadRequest(format!("{} knows no object {id:?}", conn.kind()))
            }
            e => HttpError::Upstream(e.to_string()),
        })?;
    let facts = Facts {
        id: Some(id),
        ..Facts::default()
    };
    let mut doc = Doc::Parsed(r.body);
    interpret(wh, &HeaderMap::new(), body, &mut doc, facts)
}

/// Answers `/webhooks/{instance}` with any method but POST, counted as a refusal.
pub async fn wrong_method() -> HttpError {
    let e = HttpError::MethodNotAllowed;
    metrics::counter!("klantreis_webhooks_refused_total", "reason" => e.reason()).increment(1);
    e
}

/// Shopify through its shipped definition.
pub fn shopify(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<Parsed, HttpError> {
    parse(shipped("shopify")?, headers, body, secret, 0, 0)?
        .ok_or_else(|| HttpError::BadRequest("a ping".into()))
}

/// WooCommerce through its shipped definition; `None` is the creation ping.
pub fn woocommerce(
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<Option<Parsed>, HttpError> {
    parse(shipped("woocommerce")?, headers, body, secret, 0, 0)
}

/// The generic Stripe-style signed webhook through its shipped definition.
pub fn signed(
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
    now: i64,
    tolerance_secs: u64,
) -> Result<Parsed, HttpError> {
    parse(
        shipped("webhook")?,
        headers,
        body,
        secret,
        now,
        tolerance_secs,
    )?
    .ok_or_else(|| HttpError::BadRequest("a ping".into()))
}

fn shipped(name: &str) -> Result<&'static Webhooks, HttpError> {
    crate::connectors::inbound::builtin(name).ok_or_else(|| {
        HttpError::Internal(format!("the shipped {name} definition has no [webhooks]"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shopify_test_vector_verifies() {
        let body = br#"{"id":1234567890,"email":"customer@example.com","total_price":"123.45"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "shopify-hmac-sha256",
            "QNyObTlKbMx2qDlPF/ZOZcBqg5OgPg+2oky3zldc0Gw="
                .parse()
                .unwrap(),
        );
        h.insert("shopify-webhook-id", "w1".parse().unwrap());
        h.insert("shopify-topic", "orders/create".parse().unwrap());
        let p = shopify(&h, body, "test-webhook-secret").unwrap();
        assert_eq!(p.delivery_id, "w1");
        assert!(shopify(&h, body, "other-secret").is_err());
    }

    #[test]
    fn stripe_style_vector_and_tolerance() {
        let body = br#"{"id":"evt_test","type":"payment_intent.succeeded"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "stripe-signature",
            "t=1700000000,v1=0000,v1=1fa069bafb0fb0ec61ca8e80964ba68904130b9623f205d87d85ad75d5de7d02"
                .parse()
                .unwrap(),
        );
        let p = signed(&h, body, "whsec_test_secret", 1_700_000_100, 300).unwrap();
        assert_eq!(p.topic, "payment_intent.succeeded");
        let e = signed(&h, body, "whsec_test_secret", 1_700_000_301, 300).unwrap_err();
        assert_eq!(e.reason(), "stale_timestamp");
        let e = signed(&h, body, "wrong", 1_700_000_000, 300).unwrap_err();
        assert_eq!(e.reason(), "bad_signature");
    }

    #[test]
    fn woocommerce_vector_and_ping() {
        let body = br#"{"id":727,"status":"processing","total":"29.35"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "x-wc-webhook-signature",
            "VhbBPYmlKCIUbkigp2M4E3oxWXvWcQ1NoLUpF3zoFwI="
                .parse()
                .unwrap(),
        );
        h.insert("x-wc-webhook-topic", "order.created".parse().unwrap());
        assert!(woocommerce(&h, body, "wc-secret").unwrap().is_some());
        assert!(
            woocommerce(&HeaderMap::new(), b"webhook_id=12", "wc-secret")
                .unwrap()
                .is_none()
        );
    }

    fn b64(body: &[u8], secret: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(hmac(secret.as_bytes(), &[body]))
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn shopify_topics_map_as_declared() {
        let order = json!({
            "id": 820982911946154508u64, "email": "", "contact_email": "Jon@Example.com",
            "created_at": "2024-01-02T10:00:00-05:00", "updated_at": "2024-01-03T10:00:00Z",
            "name": "#9999", "total_price": "199.65", "currency": "EUR",
            "fulfillments": [{"created_at": "2024-01-04T08:00:00Z"}],
            "customer": {"id": 115310627314723954u64, "first_name": "Jon", "orders_count": 3,
                         "total_spent": "400.10", "state": "enabled",
                         "default_address": {"city": "Utrecht", "country_code": "NL"}}
        });
        let body = serde_json::to_vec(&order).unwrap();
        let parse_topic = |topic: &str, body: &[u8]| {
            let h = headers(&[
                ("x-shopify-hmac-sha256", b64(body, "k")),
                ("x-shopify-webhook-id", "w".into()),
                ("x-shopify-topic", topic.into()),
            ]);
            shopify(&h, body, "k").unwrap().change.unwrap()
        };
        let ch = parse_topic("orders/create", &body);
        assert_eq!(
            ch.email.as_deref(),
            Some("Jon@Example.com"),
            "empty email falls back"
        );
        assert_eq!(ch.source_id.as_deref(), Some("115310627314723954"));
        assert_eq!(ch.order_id.as_deref(), Some("820982911946154508"));
        assert_eq!(ch.attributes["orders_count"], json!(3));
        assert_eq!(ch.attributes["total_spent"], json!(400.1));
        assert_eq!(ch.attributes["city"], json!("Utrecht"));
        assert_eq!(ch.attributes["shopify_state"], json!("enabled"));
        assert_eq!(ch.events[0].kind, "order_created");
        assert_eq!(ch.events[0].at, "2024-01-02T15:00:00Z");
        assert_eq!(
            ch.events[0].data,
            json!({"order_id": "820982911946154508", "name": "#9999", "total": 199.65, "currency": "EUR"})
        );
        let ch = parse_topic("orders/fulfilled", &body);
        assert_eq!(
            (ch.events[0].kind.as_str(), ch.events[0].at.as_str()),
            ("order_fulfilled", "2024-01-04T08:00:00Z")
        );
        let summary =
            br#"{"customerId":"gid://shopify/Customer/7","numberOfOrders":2,"amountSpent":{"amount":"12.50"}}"#;
        let ch = parse_topic("customers/purchasing_summary", summary);
        assert_eq!(ch.source_id.as_deref(), Some("7"));
        assert_eq!(ch.attributes["total_spent"], json!(12.5));
        assert!(ch.events.is_empty());
        let refund = br#"{"id":5,"order_id":820982911946154508,"created_at":"2024-01-05T00:00:00Z","transactions":[{"amount":"10.00"},{"amount":"2.5"}]}"#;
        let ch = parse_topic("refunds/create", refund);
        assert_eq!(ch.by_order.as_deref(), Some("820982911946154508"));
        assert_eq!(
            ch.events[0].data,
            json!({"order_id": "820982911946154508", "refund_id": "5", "amount": 12.5})
        );
        let h = headers(&[
            ("x-shopify-hmac-sha256", b64(b"{}", "k")),
            ("x-shopify-webhook-id", "w".into()),
            ("x-shopify-topic", "products/create".into()),
        ]);
        assert!(
            shopify(&h, b"{}", "k").unwrap().change.is_none(),
            "unmapped topic"
        );
        let h = headers(&[("x-shopify-hmac-sha256", b64(b"{}", "k"))]);
        let e = shopify(&h, b"{}", "k").unwrap_err();
        assert_eq!(e.to_string(), "X-Shopify-Webhook-Id is missing");
    }

    #[test]
    fn woocommerce_and_generic_topics_map_as_declared() {
        let order = json!({"id": 727, "status": "refunded", "total": "29.35", "currency": "USD",
            "customer_id": 0, "date_modified_gmt": "2017-03-22T19:28:08",
            "billing": {"email": "john@example.com", "city": "SF"}});
        let body = serde_json::to_vec(&order).unwrap();
        let h = headers(&[
            ("x-wc-webhook-signature", b64(&body, "k")),
            ("x-wc-webhook-topic", "order.updated".into()),
            ("x-wc-webhook-id", "3".into()),
            ("x-wc-webhook-delivery-id", "abc".into()),
        ]);
        let p = woocommerce(&h, &body, "k").unwrap().unwrap();
        assert!(p.delivery_id.starts_with("3/abc/") && p.delivery_id.len() == 22);
        let ch = p.change.unwrap();
        assert_eq!(ch.source_id, None, "a guest");
        assert_eq!(ch.email.as_deref(), Some("john@example.com"));
        assert_eq!(ch.events.len(), 1);
        assert_eq!(ch.events[0].kind, "order_refunded");
        assert_eq!(ch.events[0].at, "2017-03-22T19:28:08Z");
        assert_eq!(ch.events[0].data["status"], json!("refunded"));

        let body = br#"{"id":"evt_1","type":"invoice.paid","customer_id":"c9","attributes":{"plan":"pro","phase":"x"},"data":{"object":{"amount":5}}}"#;
        let t = 1_700_000_000i64;
        let mut payload = format!("{t}.").into_bytes();
        payload.extend_from_slice(body);
        let sig = hex(&hmac(b"k", &[&payload]));
        let h = headers(&[("webhook-signature", format!("t={t},v1={sig}"))]);
        let p = signed(&h, body, "k", t, 300).unwrap();
        assert_eq!(
            (p.delivery_id.as_str(), p.topic.as_str()),
            ("evt_1", "invoice.paid")
        );
        let ch = p.change.unwrap();
        assert_eq!(ch.source_id.as_deref(), Some("c9"));
        assert_eq!(ch.attributes.get("plan"), Some(&json!("pro")));
        assert!(!ch.attributes.contains_key("phase"), "the engine's own");
        assert_eq!(ch.events[0].kind, "invoice_paid");
        assert_eq!(ch.events[0].at, "2023-11-14T22:13:20Z", "the signed time");
        assert_eq!(ch.events[0].data, json!({"amount": 5}));
    }
}
