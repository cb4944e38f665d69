//! A generic webhook receiver for outgoing-webhook tests: accepts any request on any
//! path, records it, and answers from a configured status sequence (e.g. 500, 500,
//! then 200 for ever). [`Faults::delay`] makes it slow; the other faults work too,
//! with plain-text bodies.
//!
//! It is an idempotent receiver, as the Standard Webhooks specification asks of
//! consumers: a delivery whose `webhook-id` (else `Idempotency-Key`) it already
//! processed is acknowledged with 200 and not processed again.
//! [`Receiver::processed`] lists what took effect, once per id;
//! [`Receiver::repeats`] counts the acknowledged repeats. [`sign_hex`] checks klantreis's own `X-Klantreis-Signature`.

use std::collections::VecDeque;

use axum::response::Response;
use parking_lot::Mutex;

use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{hex, respond, set_header};

/// Lowercase hex HMAC-SHA256 of `body` keyed with `secret`: what klantreis's outgoing
/// webhook puts after `sha256=` in `X-Klantreis-Signature`.
pub fn sign_hex(body: &[u8], secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// How to start the receiver.
#[derive(Debug, Clone)]
pub struct Config {
    /// Statuses for the first requests, in order.
    pub statuses: Vec<u16>,
    /// The status once `statuses` is used up.
    pub then_status: u16,
    /// The response body (`text/plain`).
    pub body: String,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            statuses: Vec::new(),
            then_status: 200,
            body: "ok".to_string(),
            faults: Faults::default(),
        }
    }
}

impl Config {
    /// Answers `statuses` in order, then 200.
    pub fn with_statuses(statuses: &[u16]) -> Self {
        Self {
            statuses: statuses.to_vec(),
            ..Self::default()
        }
    }
}

/// The receiver's state.
pub struct Receiver {
    queue: Mutex<VecDeque<u16>>,
    then_status: u16,
    body: String,
    processed: Mutex<(Vec<String>, std::collections::HashSet<String>)>,
    repeats: std::sync::atomic::AtomicUsize,
}

impl Receiver {
    pub fn new(cfg: &Config) -> Self {
        Self {
            queue: Mutex::new(cfg.statuses.iter().copied().collect()),
            then_status: cfg.then_status,
            body: cfg.body.clone(),
            processed: Mutex::new(Default::default()),
            repeats: Default::default(),
        }
    }

    /// The delivery ids that took effect, in order, each once (deliveries without
    /// an id are listed as `""`, each time).
    pub fn processed(&self) -> Vec<String> {
        self.processed.lock().0.clone()
    }

    /// Repeats of an already processed delivery id (acknowledged, not processed).
    pub fn repeats(&self) -> usize {
        self.repeats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues more statuses (answered before `then_status`).
    pub fn push_statuses(&self, statuses: &[u16]) {
        self.queue.lock().extend(statuses.iter().copied());
    }
}

pub async fn start(cfg: Config) -> FakeServer<Receiver> {
    FakeServer::start(Receiver::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Receiver> {
    FakeServer::start_blocking(Receiver::new(&cfg), cfg.faults)
}

impl Vendor for Receiver {
    fn server_error(&self, _req: &RecordedRequest) -> Response {
        respond(500, "text/plain", "injected failure")
    }

    fn throttled(&self, _req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = respond(429, "text/plain", "too many requests");
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, _ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let id = req
            .header("webhook-id")
            .or_else(|| req.header("idempotency-key"))
            .unwrap_or("")
            .to_string();
        let mut done = self.processed.lock();
        if !id.is_empty() && done.1.contains(&id) {
            self.repeats
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return respond(200, "text/plain", "already processed");
        }
        let status = self.queue.lock().pop_front().unwrap_or(self.then_status);
        if (200..300).contains(&status) {
            done.0.push(id.clone());
            if !id.is_empty() {
                done.1.insert(id);
            }
        }
        respond(status, "text/plain", self.body.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn answers_the_status_sequence_and_records_bodies() {
        let s = start(Config::with_statuses(&[500, 500])).await;
        let c = reqwest::Client::new();
        let mut got = Vec::new();
        for i in 0..3 {
            got.push(
                c.post(s.url("/hooks/in"))
                    .body(format!("n={i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(got, [500, 500, 200]);
        let reqs = s.wait_for_requests(3, Duration::from_secs(1)).await;
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[2].body_text(), "n=2");
        assert_eq!(
            reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
            [500, 500, 200]
        );
        assert_eq!(s.requests_to("/hooks/in").len(), 3);
    }

    #[test]
    fn hex_signature_matches_the_stripe_style_vector() {
        // API-NOTES F: hex HMAC-SHA256 of "t.body" with the endpoint secret.
        let body = br#"1700000000.{"id":"evt_test","type":"payment_intent.succeeded"}"#;
        assert_eq!(
            sign_hex(body, "whsec_test_secret"),
            "1fa069bafb0fb0ec61ca8e80964ba68904130b9623f205d87d85ad75d5de7d02"
        );
    }

    #[test]
    fn blocking_start_works_without_a_runtime() {
        let s = start_blocking(Config::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = rt.block_on(async {
            reqwest::Client::new()
                .post(s.url("/x"))
                .send()
                .await
                .unwrap()
                .status()
        });
        assert_eq!(status, 200);
        assert_eq!(
            s.wait_for_requests_blocking(1, Duration::from_secs(1))
                .len(),
            1
        );
        drop(s);
    }
}
