//! `POST /webhooks/{instance}`: deliveries from shops and other sources.
//!
//! The instance is a `[connectors.NAME]` in config.toml; its `type` says how the
//! delivery is signed and what each topic means for the customer:
//! - `shopify`: `X-Shopify-Hmac-Sha256` (also without `X-`), base64 HMAC-SHA256 of
//!   the raw body; deduplicated on `X-Shopify-Webhook-Id` (API-NOTES D).
//! - `woocommerce`: `X-WC-Webhook-Signature`, the same HMAC; the unsigned creation
//!   ping `webhook_id=N` gets exactly 200 and stores nothing (API-NOTES E).
//! - `webhook` (any other source): a Stripe-style signed timestamp,
//!   `Webhook-Signature` or `Stripe-Signature: t=…,v1=…`, hex HMAC of `"{t}.{body}"`,
//!   several `v1` during a secret rotation, `[server] webhook_tolerance_secs` (300)
//!   against replays (API-NOTES F).
//!
//! - any connector whose definition has a `webhook_fetch` request (`mollie`): the
//!   unsigned body only names an object (`id=tr_…`); the object is fetched from the
//!   vendor with that request and the instance's credentials (API-NOTES G).
//!
//! The key is the instance's `webhook_secret` (for `webhook`, also `secret`).
//!
//! Order of work: refuse what is bad (nothing is stored for a refusal), skip a
//! delivery already accepted, merge the customer and re-evaluate them, record the
//! delivery, then wait for a group-commit flush and only then answer 2xx. The
//! delivery record is written after the customer, so a crash in between at worst
//! makes the sender's retry apply the (idempotent) merge again.

use super::{AppState, HttpError};
use crate::config::{expand_env, ConnectorInstanceConfig};
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
    let limit = state.settings.max_body_bytes;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| HttpError::TooLarge(limit))?;
    // Unsigned webhooks that only name an object (Mollie) need no secret: what
    // counts is what the vendor answers when asked with our credentials.
    let fetches = !matches!(inst.kind.as_str(), "shopify" | "woocommerce" | "webhook");
    let secret = if fetches {
        String::new()
    } else {
        webhook_secret(inst)?
    };
    let now = state.clock.now();
    let parsed = match inst.kind.as_str() {
        "shopify" => shopify(headers, &body, &secret)?,
        "woocommerce" => match woocommerce(headers, &body, &secret)? {
            Some(p) => p,
            None => {
                metrics::counter!("klantreis_webhooks_accepted_total", "instance" => instance.to_string(), "topic" => "ping").increment(1);
                return Ok(Json(json!({"status": "ping"})).into_response());
            }
        },
        "webhook" => signed(
            headers,
            &body,
            &secret,
            now.timestamp(),
            state.settings.webhook_tolerance_secs,
        )?,
        other => match loaded
            .connectors
            .get(instance)
            .filter(|c| c.definition().requests.contains_key(FETCH_REQUEST))
        {
            Some(conn) => fetched(conn, &body).await?,
            None => {
                return Err(HttpError::UnknownInstance(format!(
                    "instance {instance:?} is a {other} connector, which receives no webhooks"
                )))
            }
        },
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

/// The instance's webhook key (`webhook_secret`, or `secret` for `webhook`), with
/// `${VAR}` expanded. Never logged.
fn webhook_secret(inst: &ConnectorInstanceConfig) -> Result<String, HttpError> {
    let setting = inst
        .settings
        .get("webhook_secret")
        .or_else(|| {
            (inst.kind == "webhook")
                .then(|| inst.settings.get("secret"))
                .flatten()
        })
        .and_then(|s| s.value.as_str());
    let Some(raw) = setting else {
        return Err(HttpError::UnknownInstance(format!(
            "instance {:?} takes no webhooks: it has no webhook_secret",
            inst.name
        )));
    };
    match expand_env(raw) {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) => Err(HttpError::UnknownInstance(format!(
            "instance {:?} takes no webhooks: its webhook_secret is empty",
            inst.name
        ))),
        Err(e) => Err(HttpError::Internal(format!(
            "instance {:?}: webhook_secret: {e}",
            inst.name
        ))),
    }
}

/// The first of these headers that is present.
fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
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

fn parse_json(body: &[u8]) -> Result<Value, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::MalformedJson(format!("invalid JSON: {e}")))
}

/// A JSON value at a dotted path.
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// A scalar as a string (ids are 64-bit integers: never through f64).
fn text(v: &Value, path: &str) -> Option<String> {
    match at(v, path)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Money as a number (Shopify and WooCommerce send strings).
fn number(v: &Value, path: &str) -> Option<Value> {
    match at(v, path)? {
        Value::Number(n) => Some(Value::Number(n.clone())),
        Value::String(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
        _ => None,
    }
}

/// An RFC 3339 time in the stored form; a time without a zone is taken as UTC
/// (WooCommerce's `*_gmt` fields).
fn time(v: &Value, path: &str) -> Option<String> {
    let s = text(v, path)?;
    let t = crate::time::parse(&s).or_else(|| crate::time::parse(&format!("{s}Z")))?;
    Some(crate::time::format(t))
}

fn put(attrs: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        attrs.insert(key.to_string(), v);
    }
}

fn event(kind: &str, at: Option<String>, data: Value) -> Option<Event> {
    Some(Event {
        kind: kind.to_string(),
        at: at?,
        data,
    })
}

/// Shopify (API-NOTES D).
pub fn shopify(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<Parsed, HttpError> {
    check_base64_hmac(
        header(headers, &["x-shopify-hmac-sha256", "shopify-hmac-sha256"]),
        body,
        secret,
    )?;
    let delivery_id = header(headers, &["x-shopify-webhook-id", "shopify-webhook-id"])
        .ok_or_else(|| HttpError::BadRequest("X-Shopify-Webhook-Id is missing".into()))?
        .to_string();
    let topic = header(headers, &["x-shopify-topic", "shopify-topic"])
        .ok_or_else(|| HttpError::BadRequest("X-Shopify-Topic is missing".into()))?
        .to_string();
    let v = parse_json(body)?;
    let change = shopify_change(&topic, &v);
    Ok(Parsed {
        delivery_id,
        topic,
        change,
    })
}

fn shopify_customer_attributes(c: &Value, attrs: &mut Map<String, Value>) {
    for (key, path) in [
        ("first_name", "first_name"),
        ("last_name", "last_name"),
        ("phone", "phone"),
        ("city", "default_address.city"),
        ("country", "default_address.country_code"),
        ("currency", "currency"),
        ("shopify_state", "state"),
    ] {
        put(attrs, key, text(c, path).map(Value::String));
    }
    put(
        attrs,
        "orders_count",
        at(c, "orders_count")
            .and_then(|v| v.as_i64())
            .map(Value::from),
    );
    put(attrs, "total_spent", number(c, "total_spent"));
}

/// What a Shopify topic means for the customer.
fn shopify_change(topic: &str, v: &Value) -> Option<Change> {
    let mut ch = Change::default();
    let order_data = || {
        json!({
            "order_id": text(v, "id"),
            "name": text(v, "name"),
            "total": number(v, "total_price"),
            "currency": text(v, "currency"),
        })
    };
    match topic {
        "orders/create" | "orders/fulfilled" | "orders/paid" | "orders/cancelled" => {
            ch.email = text(v, "email")
                .or_else(|| text(v, "contact_email"))
                .or_else(|| text(v, "customer.email"));
            ch.source_id = text(v, "customer.id");
            ch.order_id = text(v, "id");
            if let Some(c) = at(v, "customer") {
                shopify_customer_attributes(c, &mut ch.attributes);
            }
            let (kind, when) = match topic {
                "orders/create" => ("order_created", time(v, "created_at")),
                "orders/fulfilled" => (
                    "order_fulfilled",
                    time(v, "fulfillments.0.created_at").or_else(|| time(v, "updated_at")),
                ),
                "orders/paid" => ("order_paid", time(v, "updated_at")),
                _ => (
                    "order_cancelled",
                    time(v, "cancelled_at").or_else(|| time(v, "updated_at")),
                ),
            };
            ch.events.extend(event(kind, when, order_data()));
        }
        "customers/create" | "customers/update" => {
            ch.email = text(v, "email");
            ch.source_id = text(v, "id");
            shopify_customer_attributes(v, &mut ch.attributes);
            if topic == "customers/create" {
                ch.events
                    .extend(event("customer_created", time(v, "created_at"), json!({})));
            }
        }
        "customers/purchasing_summary" => {
            let gid = text(v, "customerId")?;
            ch.source_id = Some(gid.rsplit('/').next().unwrap_or(&gid).to_string());
            put(
                &mut ch.attributes,
                "orders_count",
                at(v, "numberOfOrders")
                    .and_then(|n| n.as_i64())
                    .map(Value::from),
            );
            put(
                &mut ch.attributes,
                "total_spent",
                number(v, "amountSpent.amount"),
            );
        }
        "refunds/create" => {
            let order = text(v, "order_id")?;
            ch.by_order = Some(order.clone());
            let amount: f64 = at(v, "transactions")
                .and_then(Value::as_array)
                .map(|ts| {
                    ts.iter()
                        .filter_map(|t| number(t, "amount").and_then(|n| n.as_f64()))
                        .sum()
                })
                .unwrap_or(0.0);
            ch.events.extend(event(
                "order_refunded",
                time(v, "created_at"),
                json!({"order_id": order, "refund_id": text(v, "id"), "amount": amount}),
            ));
        }
        _ => return None,
    }
    Some(ch)
}

/// WooCommerce (API-NOTES E). `None` is the creation ping.
pub fn woocommerce(
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<Option<Parsed>, HttpError> {
    let signature = header(headers, &["x-wc-webhook-signature"]);
    if signature.is_none() && body.starts_with(b"webhook_id=") {
        // The unsigned ping sent when the webhook is saved: exactly 200, nothing stored.
        return Ok(None);
    }
    check_base64_hmac(signature, body, secret)?;
    let topic = header(headers, &["x-wc-webhook-topic"])
        .ok_or_else(|| HttpError::BadRequest("X-WC-Webhook-Topic is missing".into()))?
        .to_string();
    // The delivery id is a hash of webhook id and second, so two deliveries in one
    // second share it (API-NOTES E1): the body's hash tells them apart.
    let body_hash = hex(&<Sha256 as sha2::Digest>::digest(body)[..8]);
    let delivery_id = format!(
        "{}/{}/{body_hash}",
        header(headers, &["x-wc-webhook-id"]).unwrap_or("0"),
        header(headers, &["x-wc-webhook-delivery-id"]).unwrap_or("-"),
    );
    let v = parse_json(body)?;
    let change = woo_change(&topic, &v);
    Ok(Some(Parsed {
        delivery_id,
        topic,
        change,
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a WooCommerce topic means for the customer. Guests (`customer_id` 0) are
/// matched by billing email.
fn woo_change(topic: &str, v: &Value) -> Option<Change> {
    let mut ch = Change::default();
    match topic {
        "order.created" | "order.updated" => {
            ch.email = text(v, "billing.email");
            ch.source_id = text(v, "customer_id").filter(|id| id != "0");
            ch.order_id = text(v, "id");
            for (key, path) in [
                ("first_name", "billing.first_name"),
                ("last_name", "billing.last_name"),
                ("phone", "billing.phone"),
                ("city", "billing.city"),
                ("postcode", "billing.postcode"),
                ("country", "billing.country"),
            ] {
                put(&mut ch.attributes, key, text(v, path).map(Value::String));
            }
            let data = json!({
                "order_id": text(v, "id"),
                "status": text(v, "status"),
                "total": number(v, "total"),
                "currency": text(v, "currency"),
            });
            let status = text(v, "status").unwrap_or_default();
            if topic == "order.created" {
                ch.events
                    .extend(event("order_created", time(v, "date_created_gmt"), data));
            } else if status == "completed" {
                ch.events.extend(event(
                    "order_fulfilled",
                    time(v, "date_completed_gmt").or_else(|| time(v, "date_modified_gmt")),
                    data,
                ));
            } else if status == "refunded" {
                ch.events
                    .extend(event("order_refunded", time(v, "date_modified_gmt"), data));
            }
        }
        "customer.created" | "customer.updated" => {
            ch.email = text(v, "email");
            ch.source_id = text(v, "id");
            for (key, path) in [
                ("first_name", "first_name"),
                ("last_name", "last_name"),
                ("phone", "billing.phone"),
                ("city", "billing.city"),
                ("postcode", "billing.postcode"),
                ("country", "billing.country"),
            ] {
                put(&mut ch.attributes, key, text(v, path).map(Value::String));
            }
            put(
                &mut ch.attributes,
                "paying_customer",
                at(v, "is_paying_customer").cloned(),
            );
            if topic == "customer.created" {
                ch.events.extend(event(
                    "customer_created",
                    time(v, "date_created_gmt"),
                    json!({}),
                ));
            }
        }
        _ => return None,
    }
    Some(ch)
}

/// A generic signed JSON webhook with a Stripe-style timestamped signature
/// (API-NOTES F). The body: `{"id", "type", "created"?, "email"?, "customer_id"?,
/// "attributes"?, "data"?}`; the event kind is `type` with dots as underscores.
pub fn signed(
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
    now: i64,
    tolerance_secs: u64,
) -> Result<Parsed, HttpError> {
    let Some(sig) = header(headers, &["webhook-signature", "stripe-signature"]) else {
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
    let v = parse_json(body)?;
    let delivery_id =
        text(&v, "id").ok_or_else(|| HttpError::BadRequest("the body has no \"id\"".into()))?;
    let topic = text(&v, "type").unwrap_or_else(|| "event".into());
    let when = at(&v, "created")
        .and_then(Value::as_i64)
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(crate::time::format)
        .or_else(|| time(&v, "at"))
        .unwrap_or_else(|| {
            crate::time::format(chrono::DateTime::from_timestamp(t, 0).unwrap_or_default())
        });
    let mut ch = Change {
        email: text(&v, "email")
            .or_else(|| text(&v, "data.object.email"))
            .or_else(|| text(&v, "data.object.customer_email"))
            .or_else(|| text(&v, "data.object.receipt_email")),
        source_id: text(&v, "customer_id").or_else(|| text(&v, "data.object.customer")),
        ..Change::default()
    };
    if let Some(Value::Object(a)) = at(&v, "attributes") {
        for (k, val) in a {
            if !crate::model::RESERVED_ATTRIBUTES.contains(&k.as_str()) {
                ch.attributes.insert(k.clone(), val.clone());
            }
        }
    }
    let data = at(&v, "data.object")
        .or_else(|| at(&v, "data"))
        .filter(|d| d.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    ch.events.push(Event {
        kind: topic.replace(['.', '/'], "_"),
        at: when,
        data,
    });
    Ok(Parsed {
        delivery_id,
        topic,
        change: Some(ch),
    })
}

/// The definition request that fetches the object a webhook names.
pub const FETCH_REQUEST: &str = "webhook_fetch";

/// A webhook that only names an object (Mollie: `id=tr_…`, form-encoded): fetch it
/// with the definition's `webhook_fetch` request and map what the vendor says.
async fn fetched(conn: &crate::connectors::Connector, body: &[u8]) -> Result<Parsed, HttpError> {
    let id = url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| text(&v, "id"))
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
        .send(FETCH_REQUEST, &json!({ "id": id }))
        .await
        .map_err(|e| match e {
            crate::connectors::ConnectorError::Status { status: 404, .. } => {
                HttpError::BadRequest(format!("{} knows no object {id:?}", conn.kind()))
            }
            e => HttpError::Upstream(e.to_string()),
        })?;
    let v = r.body;
    let status = text(&v, "status").unwrap_or_else(|| "unknown".into());
    // Mollie calls again on every status change: one delivery per (id, status).
    let delivery_id = format!("{id}:{status}");
    let topic = format!(
        "{}.{status}",
        text(&v, "resource").unwrap_or_else(|| "object".into())
    );
    let when = [
        "paidAt",
        "authorizedAt",
        "failedAt",
        "canceledAt",
        "expiredAt",
        "createdAt",
    ]
    .iter()
    .find_map(|k| time(&v, k));
    let mut ch = Change {
        email: text(&v, "metadata.email")
            .or_else(|| text(&v, "metadata.customer_email"))
            .or_else(|| text(&v, "billingEmail")),
        source_id: text(&v, "metadata.customer_id").or_else(|| text(&v, "customerId")),
        ..Change::default()
    };
    ch.events.extend(event(
        &format!("payment_{status}"),
        when,
        json!({
            "payment_id": id,
            "amount": number(&v, "amount.value"),
            "currency": text(&v, "amount.currency"),
            "description": text(&v, "description"),
            "method": text(&v, "method"),
        }),
    ));
    let has_identity = ch.email.is_some() || ch.source_id.is_some();
    Ok(Parsed {
        delivery_id,
        topic,
        change: has_identity.then_some(ch),
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
}
