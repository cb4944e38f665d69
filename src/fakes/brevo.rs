//! Fake Brevo transactional email API (API-NOTES H).
//!
//! - `POST /v3/smtp/email` with the `api-key` header. Validation as in H: `to` (a
//!   non-empty list of `{email, name?}`) unless `messageVersions` (each with its own
//!   `to`); `sender` (`{email}` or `{id}`) and `subject` unless `templateId`; content
//!   from `htmlContent`, `textContent` or `templateId`; at most 2000 recipients per call
//!   and 99 per version. Answers 201 `{"messageId":"<...@relay.domain.com>"}`, or with
//!   `messageVersions` 201 `{"messageIds":[...]}`, or with `scheduledAt` 202
//!   `{"messageId", "batchId"}` (UNCONFIRMED). Sent mails: [`Brevo::sent`].
//! - `GET /v3/smtp/emails?email=|templateId=|messageId=` (one of them required;
//!   `sort` `desc` (default) or `asc`, `limit` (default 500, at most 1000),
//!   `offset`): `{"count", "transactionalEmails": [{"email", "subject",
//!   "templateId", "messageId", "uuid", "date", "from", "tags"}]}` (the list of
//!   transactional emails, Brevo API reference "get-transac-emails-list"; one item
//!   per recipient).
//! - `GET /v3/account` (the connection check): a fixed account.
//! - Errors: 400 `{"code":"missing_parameter"|"invalid_parameter","message"}` (the body
//!   shape is UNCONFIRMED; both codes are in Brevo's list), 401
//!   `{"code":"unauthorized","message":"Key not found"}`.
//! - With a rate limit configured, every response carries `x-sib-ratelimit-limit`,
//!   `-remaining` and `-reset` (seconds); a 429 has them too, with the body
//!   `{"code":"too_many_requests","message":...}` (UNCONFIRMED) and `Retry-After`
//!   only when [`Faults::retry_after_secs`] is set.

use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{json, segments, set_header};

pub const DEFAULT_API_KEY: &str =
    "xkeysib-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef-FakeKey01";

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_string(),
            faults: Faults::default(),
        }
    }
}

/// One accepted send.
#[derive(Debug, Clone, PartialEq)]
pub struct SentEmail {
    /// One per message version (one without versions).
    pub message_ids: Vec<String>,
    /// Every recipient email, over all versions.
    pub to: Vec<String>,
    pub subject: Option<String>,
    pub template_id: Option<i64>,
    pub params: Value,
    pub tags: Vec<String>,
    pub scheduled_at: Option<String>,
    /// When it was accepted (RFC 3339).
    pub date: String,
    /// The whole request body.
    pub body: Value,
}

/// The fake's state.
pub struct Brevo {
    api_key: String,
    sent: Mutex<Vec<SentEmail>>,
}

impl Brevo {
    pub fn new(cfg: &Config) -> Self {
        Self {
            api_key: cfg.api_key.clone(),
            sent: Mutex::new(Vec::new()),
        }
    }

    /// The mails accepted so far.
    pub fn sent(&self) -> Vec<SentEmail> {
        self.sent.lock().clone()
    }
}

pub async fn start(cfg: Config) -> FakeServer<Brevo> {
    FakeServer::start(Brevo::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Brevo> {
    FakeServer::start_blocking(Brevo::new(&cfg), cfg.faults)
}

fn error(status: u16, code: &str, message: &str) -> Response {
    json(status, &json!({"code": code, "message": message}))
}

fn rate_headers(r: &mut Response, limit: u32, remaining: u32, reset: u64) {
    set_header(r, "x-sib-ratelimit-limit", &limit.to_string());
    set_header(r, "x-sib-ratelimit-remaining", &remaining.to_string());
    set_header(r, "x-sib-ratelimit-reset", &reset.to_string());
}

fn valid_email(e: &str) -> bool {
    let e = e.trim();
    match e.split_once('@') {
        Some((l, d)) => !l.is_empty() && d.contains('.') && !d.starts_with('.') && !e.contains(' '),
        None => false,
    }
}

/// Checks a recipient list; returns the emails.
fn recipients(v: Option<&Value>, field: &str) -> Result<Vec<String>, Response> {
    let Some(list) = v.and_then(Value::as_array).filter(|l| !l.is_empty()) else {
        return Err(error(
            400,
            "missing_parameter",
            &format!("{field} is missing"),
        ));
    };
    let mut out = Vec::new();
    for r in list {
        let email = r.get("email").and_then(Value::as_str).unwrap_or("");
        if !valid_email(email) {
            return Err(error(
                400,
                "invalid_parameter",
                &format!("email is not valid in {field}"),
            ));
        }
        out.push(email.to_string());
    }
    Ok(out)
}

impl Vendor for Brevo {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        match req.header("api-key") {
            Some(k) if k.trim() == self.api_key => Ok(()),
            _ => Err(error(401, "unauthorized", "Key not found")),
        }
    }

    fn server_error(&self, _req: &RecordedRequest) -> Response {
        error(500, "internal_error", "Internal server error")
    }

    fn throttled(&self, _req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = error(
            429,
            "too_many_requests",
            "The expected rate limit is exceeded.",
        );
        rate_headers(&mut r, t.limit, 0, t.reset_secs);
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let mut r = match (req.method.as_str(), segs.as_slice()) {
            ("POST", ["v3", "smtp", "email"]) => self.send(ctx, req),
            ("GET", ["v3", "smtp", "emails"]) => self.list(req),
            ("GET", ["v3", "account"]) => json(
                200,
                &json!({"email": "owner@shop.example", "firstName": "Shop", "lastName": "Owner",
                    "companyName": "Shop", "address": {"street": "", "city": "", "zipCode": "", "country": "NL"},
                    "plan": [{"type": "free", "creditsType": "sendLimit", "credits": 300}],
                    "relay": {"enabled": true, "data": {"userName": "owner@shop.example",
                        "relay": "smtp-relay.brevo.com", "port": 587}}}),
            ),
            (_, ["v3", "smtp", "email"]) => error(405, "method_not_allowed", "Method not allowed"),
            _ => error(404, "document_not_found", "Not found"),
        };
        if let Some(u) = ctx.rate {
            rate_headers(
                &mut r,
                u.limit,
                u.limit.saturating_sub(u.used),
                u.reset_secs,
            );
        }
        r
    }
}

impl Brevo {
    /// `GET /v3/smtp/emails`.
    fn list(&self, req: &RecordedRequest) -> Response {
        let email = req.query_param("email");
        let template = req.query_param("templateId");
        let message = req.query_param("messageId");
        if email.is_none() && template.is_none() && message.is_none() {
            return error(
                400,
                "missing_parameter",
                "email, templateId or messageId is mandatory",
            );
        }
        let limit = match req.query_param("limit").map(|l| l.parse::<usize>()) {
            None => 500,
            Some(Ok(n)) if n <= 1000 => n,
            _ => return error(400, "invalid_parameter", "limit must be between 0 and 1000"),
        };
        let offset = req
            .query_param("offset")
            .and_then(|o| o.parse::<usize>().ok())
            .unwrap_or(0);
        let mut items = Vec::new();
        for m in self.sent.lock().iter() {
            for (i, to) in m.to.iter().enumerate() {
                let id = m.message_ids.get(i).unwrap_or(&m.message_ids[0]);
                if email
                    .as_deref()
                    .is_some_and(|e| !e.eq_ignore_ascii_case(to))
                    || template
                        .as_deref()
                        .is_some_and(|t| Some(t) != m.template_id.map(|n| n.to_string()).as_deref())
                    || message.as_deref().is_some_and(|x| x != id)
                {
                    continue;
                }
                items.push(json!({
                    "email": to, "subject": m.subject, "templateId": m.template_id,
                    "messageId": id, "uuid": format!("{:08x}-0000-4000-8000-{:012x}", items.len(), m.message_ids.len()),
                    "date": m.date, "from": m.body["sender"]["email"], "tags": m.tags,
                }));
            }
        }
        if req.query_param("sort").as_deref() != Some("asc") {
            items.reverse();
        }
        let count = items.len();
        let page: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
        json(200, &json!({"count": count, "transactionalEmails": page}))
    }

    fn send(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return error(400, "invalid_parameter", "Invalid JSON in the request body"),
        };
        let template_id = match body.get("templateId") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64().filter(|n| *n > 0) {
                Some(n) => Some(n),
                None => {
                    return error(
                        400,
                        "invalid_parameter",
                        "templateId must be a positive integer",
                    )
                }
            },
        };
        let mut to = Vec::new();
        let versions = body
            .get("messageVersions")
            .and_then(Value::as_array)
            .filter(|v| !v.is_empty());
        match versions {
            Some(vs) => {
                for v in vs {
                    let r = match recipients(v.get("to"), "messageVersions.to") {
                        Ok(r) => r,
                        Err(e) => return e,
                    };
                    if r.len() > 99 {
                        return error(
                            400,
                            "invalid_parameter",
                            "A message version has at most 99 recipients",
                        );
                    }
                    to.extend(r);
                }
            }
            None => match recipients(body.get("to"), "to") {
                Ok(r) => to = r,
                Err(e) => return e,
            },
        }
        if to.len() > 2000 {
            return error(400, "invalid_parameter", "At most 2000 recipients per call");
        }
        for f in ["cc", "bcc"] {
            if body.get(f).is_some_and(|v| !v.is_null()) {
                if let Err(e) = recipients(body.get(f), f) {
                    return e;
                }
            }
        }
        let subject = body
            .get("subject")
            .and_then(Value::as_str)
            .map(str::to_string);
        if template_id.is_none() {
            let sender = body.get("sender");
            let sender_ok = sender.is_some_and(|s| {
                s.get("id").is_some_and(Value::is_i64)
                    || s.get("email")
                        .and_then(Value::as_str)
                        .is_some_and(valid_email)
            });
            if sender.is_none() {
                return error(400, "missing_parameter", "sender is missing");
            }
            if !sender_ok {
                return error(
                    400,
                    "invalid_parameter",
                    "sender is invalid: give a valid email or an id",
                );
            }
            if subject.as_deref().is_none_or_blank() {
                return error(400, "missing_parameter", "subject is missing");
            }
            let has = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.trim().is_empty())
            };
            if !has("htmlContent") && !has("textContent") {
                return error(
                    400,
                    "missing_parameter",
                    "htmlContent or textContent is missing",
                );
            }
        }
        let n = versions.map_or(1, Vec::len);
        let ids: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "<{}{:06}.{}@relay.domain.com>",
                    202_403_010_000u64,
                    ctx.seq,
                    i + 1
                )
            })
            .collect();
        let scheduled_at = body
            .get("scheduledAt")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.sent.lock().push(SentEmail {
            message_ids: ids.clone(),
            to,
            subject,
            template_id,
            params: body.get("params").cloned().unwrap_or(Value::Null),
            tags: body
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            scheduled_at: scheduled_at.clone(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            body: body.clone(),
        });
        if scheduled_at.is_some() {
            return json(
                202,
                &json!({"messageId": ids[0], "batchId": format!("5c6cfa04-eed9-42c2-8b5c-{:012x}", ctx.seq)}),
            );
        }
        if versions.is_some() {
            json(201, &json!({ "messageIds": ids }))
        } else {
            json(201, &json!({"messageId": ids[0]}))
        }
    }
}

trait BlankExt {
    fn is_none_or_blank(&self) -> bool;
}

impl BlankExt for Option<&str> {
    fn is_none_or_blank(&self) -> bool {
        self.map(str::trim).filter(|s| !s.is_empty()).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::server::RateLimit;
    use std::time::Duration;

    async fn post(s: &FakeServer<Brevo>, key: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(s.url("/v3/smtp/email"))
            .header("api-key", key)
            .header("accept", "application/json")
            .json(body)
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sends_validates_and_refuses_bad_keys() {
        let s = start(Config::default()).await;
        let mail = json!({"sender": {"name": "Shop", "email": "noreply@shop.example"},
            "to": [{"email": "ann@example.com", "name": "Ann Lee"}],
            "subject": "How was your order #1001?", "templateId": 12,
            "params": {"firstName": "Ann"}, "tags": ["review-request"]});
        let r = post(&s, DEFAULT_API_KEY, &mail).await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        assert!(v["messageId"]
            .as_str()
            .unwrap()
            .ends_with("@relay.domain.com>"));
        assert_eq!(s.sent()[0].to, ["ann@example.com"]);
        assert_eq!(s.sent()[0].template_id, Some(12));
        let no_template = json!({"to": [{"email": "ann@example.com"}], "htmlContent": "<p>Hi</p>"});
        let r = post(&s, DEFAULT_API_KEY, &no_template).await;
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "missing_parameter"
        );
        let r = post(&s, DEFAULT_API_KEY, &json!({"templateId": 3})).await;
        assert_eq!(r.status(), 400);
        let r = post(&s, "xkeysib-wrong", &mail).await;
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"code": "unauthorized", "message": "Key not found"})
        );
        assert_eq!(s.sent().len(), 1);
    }

    #[tokio::test]
    async fn rate_limit_headers_and_429() {
        let s = start(Config {
            faults: Faults {
                rate_limit: Some(RateLimit::new(1, Duration::from_secs(30))),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let mail = json!({"sender": {"email": "a@shop.example"}, "to": [{"email": "b@example.com"}],
            "subject": "s", "textContent": "t"});
        let r = post(&s, DEFAULT_API_KEY, &mail).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["x-sib-ratelimit-remaining"], "0");
        let r = post(&s, DEFAULT_API_KEY, &mail).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-sib-ratelimit-limit"], "1");
        assert!(r.headers().contains_key("x-sib-ratelimit-reset"));
    }
}
