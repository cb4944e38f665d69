//! Fake Mollie payments API and webhook helpers (API-NOTES G).
//!
//! - `GET /v2/payments/{id}` with `Authorization: Bearer <test_|live_ key>` returns the
//!   payment (`resource`, `id`, `mode`, `createdAt`, `amount {value, currency}`,
//!   `description`, `method`, `metadata`, `status`, the status's own timestamp such as
//!   `paidAt`, `profileId`, `sequenceType`, `redirectUrl`, `webhookUrl`, `_links`) as
//!   `application/hal+json`. Unknown id: 404; missing or wrong key: 401; both in
//!   Mollie's `{status, title, detail, _links}` error shape.
//! - Payments are put in by the test: [`Mollie::put_payment`], [`Mollie::set_status`].
//! - Webhook (G): unsigned, `application/x-www-form-urlencoded`, body `id=tr_...`,
//!   `User-Agent: Mollie HTTP client/1.0`: [`webhook_body`], [`webhook_headers`],
//!   [`send_webhook`]. The retry schedule is UNCONFIRMED and not modelled.

use std::collections::BTreeMap;

use axum::response::Response;
use chrono::{DateTime, Duration, Utc};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{bearer, respond, segments, set_header};

pub const DEFAULT_API_KEY: &str = "test_dHar4XY7LxsDOtmnkVtjNVWXLSlXsM";
pub const STATUSES: [&str; 7] = [
    "open",
    "canceled",
    "pending",
    "authorized",
    "expired",
    "failed",
    "paid",
];

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    pub payments: Vec<Payment>,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_string(),
            payments: Vec::new(),
            faults: Faults::default(),
        }
    }
}

/// A payment the fake serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    /// `tr_...`.
    pub id: String,
    /// One of [`STATUSES`].
    pub status: String,
    /// A decimal string with two decimals, `"10.00"`.
    pub amount_value: String,
    pub currency: String,
    pub description: String,
    pub method: Option<String>,
    pub metadata: Value,
    pub webhook_url: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Payment {
    /// A payment created now with the given status and amount.
    pub fn new(id: &str, status: &str, amount_value: &str, currency: &str) -> Self {
        Self {
            id: id.to_string(),
            status: status.to_string(),
            amount_value: amount_value.to_string(),
            currency: currency.to_string(),
            description: format!("Payment {id}"),
            method: Some("ideal".to_string()),
            metadata: Value::Null,
            webhook_url: None,
            created_at: Utc::now(),
        }
    }
}

/// The fake's state.
pub struct Mollie {
    api_key: String,
    payments: Mutex<BTreeMap<String, Payment>>,
}

impl Mollie {
    pub fn new(cfg: &Config) -> Self {
        Self {
            api_key: cfg.api_key.clone(),
            payments: Mutex::new(
                cfg.payments
                    .iter()
                    .map(|p| (p.id.clone(), p.clone()))
                    .collect(),
            ),
        }
    }

    /// Adds or replaces a payment.
    pub fn put_payment(&self, p: Payment) {
        self.payments.lock().insert(p.id.clone(), p);
    }

    /// Changes a payment's status; `false` when there is no such payment.
    pub fn set_status(&self, id: &str, status: &str) -> bool {
        match self.payments.lock().get_mut(id) {
            Some(p) => {
                p.status = status.to_string();
                true
            }
            None => false,
        }
    }

    pub fn payment(&self, id: &str) -> Option<Payment> {
        self.payments.lock().get(id).cloned()
    }
}

pub async fn start(cfg: Config) -> FakeServer<Mollie> {
    FakeServer::start(Mollie::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Mollie> {
    FakeServer::start_blocking(Mollie::new(&cfg), cfg.faults)
}

fn hal(status: u16, v: &Value) -> Response {
    respond(status, "application/hal+json", v.to_string())
}

fn error(status: u16, title: &str, detail: &str, doc: &str) -> Response {
    hal(
        status,
        &json!({"status": status, "title": title, "detail": detail,
            "_links": {"documentation": {"href": doc, "type": "text/html"}}}),
    )
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// The payment resource as `GET /v2/payments/{id}` returns it.
pub fn payment_json(p: &Payment, base_url: &str, test_mode: bool) -> Value {
    let mut v = json!({
        "resource": "payment",
        "id": p.id,
        "mode": if test_mode { "test" } else { "live" },
        "createdAt": iso(p.created_at),
        "amount": {"value": p.amount_value, "currency": p.currency},
        "description": p.description,
        "method": p.method,
        "metadata": p.metadata,
        "status": p.status,
        "isCancelable": p.status == "open" || p.status == "authorized",
        "profileId": "pfl_QkEhN94Ba",
        "sequenceType": "oneoff",
        "redirectUrl": "https://shop.example/order/12345/",
        "webhookUrl": p.webhook_url,
        "_links": {
            "self": {"href": format!("{base_url}/v2/payments/{}", p.id), "type": "application/hal+json"},
            "dashboard": {"href": format!("https://my.mollie.com/dashboard/org_12345678/payments/{}", p.id), "type": "text/html"},
            "documentation": {"href": "https://docs.mollie.com/reference/get-payment", "type": "text/html"}
        }
    });
    let later = iso(p.created_at + Duration::minutes(2));
    match p.status.as_str() {
        "paid" => {
            v["paidAt"] = json!(later);
            v["amountRefunded"] = json!({"value": "0.00", "currency": p.currency});
            v["amountRemaining"] = json!({"value": p.amount_value, "currency": p.currency});
        }
        "open" => v["expiresAt"] = json!(iso(p.created_at + Duration::minutes(15))),
        "authorized" => v["authorizedAt"] = json!(later),
        "canceled" => v["canceledAt"] = json!(later),
        "expired" => v["expiredAt"] = json!(later),
        "failed" => v["failedAt"] = json!(later),
        _ => {}
    }
    v
}

impl Vendor for Mollie {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        match bearer(req.header("authorization")) {
            Some(k) if k == self.api_key => Ok(()),
            _ => Err(error(
                401,
                "Unauthorized Request",
                "Missing authentication, or failed to authenticate",
                "https://docs.mollie.com/overview/authentication",
            )),
        }
    }

    fn server_error(&self, _req: &RecordedRequest) -> Response {
        error(
            500,
            "Internal Server Error",
            "An internal server error occurred while processing your request",
            "https://docs.mollie.com/overview/handling-errors",
        )
    }

    fn throttled(&self, _req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = error(
            429,
            "Too Many Requests",
            "You have exceeded the rate limit.",
            "https://docs.mollie.com/overview/handling-errors",
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
            ("GET", ["v2", "payments", id]) => match self.payment(id) {
                Some(p) => hal(
                    200,
                    &payment_json(&p, ctx.base_url, self.api_key.starts_with("test_")),
                ),
                None => error(
                    404,
                    "Not Found",
                    &format!("No payment exists with token {id}."),
                    "https://docs.mollie.com/overview/handling-errors",
                ),
            },
            _ => error(
                404,
                "Not Found",
                "The requested resource does not exist.",
                "https://docs.mollie.com/overview/handling-errors",
            ),
        }
    }
}

/// The webhook body for a payment: `id=tr_...`, form-encoded.
pub fn webhook_body(payment_id: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("id", payment_id)
        .finish()
}

/// The webhook headers (no signature: Mollie's classic webhooks are unsigned).
pub fn webhook_headers() -> Vec<(String, String)> {
    vec![
        (
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        ),
        ("User-Agent".into(), "Mollie HTTP client/1.0".into()),
    ]
}

/// POSTs the webhook for `payment_id` to `url`.
pub async fn send_webhook(url: &str, payment_id: &str) -> reqwest::Result<reqwest::Response> {
    let mut rb = reqwest::Client::new().post(url);
    for (k, v) in webhook_headers() {
        rb = rb.header(k, v);
    }
    rb.body(webhook_body(payment_id)).send().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_payments_by_id_with_bearer_auth() {
        let s = start(Config {
            payments: vec![Payment::new(
                "tr_5B8cwPMGnU6qLbRvo7qEZo",
                "open",
                "10.00",
                "EUR",
            )],
            ..Config::default()
        })
        .await;
        let url = s.url("/v2/payments/tr_5B8cwPMGnU6qLbRvo7qEZo");
        let c = reqwest::Client::new();
        let v: Value = c
            .get(&url)
            .bearer_auth(DEFAULT_API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["resource"], "payment");
        assert_eq!(v["status"], "open");
        assert_eq!(v["amount"], json!({"value": "10.00", "currency": "EUR"}));
        assert!(s.set_status("tr_5B8cwPMGnU6qLbRvo7qEZo", "paid"));
        let v: Value = c
            .get(&url)
            .bearer_auth(DEFAULT_API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "paid");
        assert!(v["paidAt"].is_string());
        assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
        assert_eq!(
            c.get(s.url("/v2/payments/tr_nope"))
                .bearer_auth(DEFAULT_API_KEY)
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
        assert_eq!(
            webhook_body("tr_5B8cwPMGnU6qLbRvo7qEZo"),
            "id=tr_5B8cwPMGnU6qLbRvo7qEZo"
        );
    }
}
