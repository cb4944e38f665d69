//! The HTTP client of one connector instance: reqwest over rustls, timeouts, a
//! request-rate and concurrency cap, and retries.
//!
//! Retries: 5xx and dropped connections are retried with exponential backoff and
//! jitter (only for requests that are safe to repeat; a POST that may have created
//! something is not repeated unless its definition says so). A 429 is always
//! retried: `Retry-After` is honoured when sent, but never needed, because HubSpot
//! and Klaviyo do not reliably send it; the definition can name 429 bodies that
//! waiting will not cure (HubSpot's daily limit). Mailchimp limits concurrent
//! connections rather than rate, which is what `max_concurrency` caps.
//! 401/403 stop the instance with a message naming the credential to check.

use super::definition::RateLimit;
use super::ConnectorError;
use crate::clock::SharedClock;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use url::Url;

/// Limits and retry policy of one instance.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Requests per second; 0 means no limit.
    pub rate_per_sec: f64,
    pub max_concurrency: usize,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<(String, Vec<u8>)>,
    /// Whether a 5xx or a broken connection may be retried.
    pub idempotent: bool,
}

impl Outgoing {
    /// `GET /path` for messages; never the query, which may hold personal data.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.url.path())
    }
}

/// A response with its body read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The client of one instance.
#[derive(Debug)]
pub struct Http {
    pub(crate) instance: String,
    pub(crate) vendor: String,
    client: reqwest::Client,
    /// Auth and definition headers, marked sensitive so they are never printed.
    fixed_headers: Vec<(HeaderName, HeaderValue)>,
    sem: tokio::sync::Semaphore,
    interval: Option<Duration>,
    next_slot: parking_lot::Mutex<Option<tokio::time::Instant>>,
    settings: HttpSettings,
    rate_limit: RateLimit,
    /// Which config key and environment variable the credentials come from.
    credential: String,
    clock: SharedClock,
    pub(crate) retried: AtomicU64,
    pub(crate) requests: AtomicU64,
}

impl Http {
    pub fn new(
        instance: &str,
        vendor: &str,
        fixed_headers: Vec<(HeaderName, HeaderValue)>,
        settings: HttpSettings,
        rate_limit: RateLimit,
        credential: String,
        clock: SharedClock,
    ) -> Result<Http, String> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            // Never follow a redirect: custom auth headers (api-key, X-Shopify-Access-Token)
            // would go along to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("klantreis/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(settings.max_concurrency.max(1))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let interval = (settings.rate_per_sec > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / settings.rate_per_sec));
        Ok(Http {
            instance: instance.to_string(),
            vendor: vendor.to_string(),
            client,
            fixed_headers,
            sem: tokio::sync::Semaphore::new(settings.max_concurrency.max(1)),
            interval,
            next_slot: parking_lot::Mutex::new(None),
            settings,
            rate_limit,
            credential,
            clock,
            retried: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    /// Waits for this request's slot under the rate cap. Pacing uses the monotonic
    /// clock: it measures intervals, it is not a "now" that anything is decided on.
    async fn pace(&self) {
        let Some(iv) = self.interval else { return };
        let at = {
            let mut next = self.next_slot.lock();
            let now = tokio::time::Instant::now();
            let t = match *next {
                Some(t) if t > now => t,
                _ => now,
            };
            *next = Some(t + iv);
            t
        };
        tokio::time::sleep_until(at).await;
    }

    fn backoff(&self, attempt: u32, base: Duration) -> Duration {
        let exp = base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.settings.retry_max);
        // "Equal jitter": at least half the backoff, so retries stay spread out but
        // never hammer the server right away.
        let half = exp / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half.max(Duration::from_millis(1)))
    }

    /// `Retry-After` in seconds or as an HTTP date.
    fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        let v = headers
            .get(reqwest::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim();
        if let Ok(secs) = v.parse::<f64>() {
            return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
        }
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        let wait = at.with_timezone(&chrono::Utc) - self.clock.now();
        Some(wait.to_std().unwrap_or(Duration::ZERO))
    }

    fn fatal_429(&self, body: &[u8]) -> Option<String> {
        if self.rate_limit.fatal.is_empty() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        self.rate_limit
            .fatal
            .iter()
            .find(|f| f.path.get(&v).and_then(|x| x.as_str()) == Some(f.equals.as_str()))
            .map(|f| f.message.clone())
    }

    async fn send_once(&self, req: &Outgoing) -> Result<HttpResponse, reqwest::Error> {
        let mut rb = self.client.request(req.method.clone(), req.url.clone());
        for (k, v) in self.fixed_headers.iter().chain(req.headers.iter()) {
            rb = rb.header(k, v);
        }
        if let Some((ct, body)) = &req.body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, ct.as_str())
                .body(body.clone());
        }
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// Sends a request, retrying as the module docs say.
    pub async fn execute(&self, req: &Outgoing) -> Result<HttpResponse, ConnectorError> {
        let what = req.describe();
        let mut attempt = 0u32;
        loop {
            let result = {
                let _permit = self
                    .sem
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                self.pace().await;
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.send_once(req).await
            };
            let can_retry = attempt < self.settings.max_retries;
            let wait = match result {
                Ok(r) if (200..300).contains(&r.status) => return Ok(r),
                Ok(r) if r.status == 401 || r.status == 403 => {
                    return Err(ConnectorError::Auth {
                        instance: self.instance.clone(),
                        vendor: self.vendor.clone(),
                        status: r.status,
                        request: what,
                        credential: self.credential.clone(),
                    })
                }
                Ok(r) if r.status == 429 => {
                    if let Some(message) = self.fatal_429(&r.body) {
                        return Err(ConnectorError::RateLimited {
                            instance: self.instance.clone(),
                            request: what,
                            message,
                            retry_after_secs: self
                                .retry_after(&r.headers)
                                .map(|d| d.as_secs_f64().ceil() as u64),
                        });
                    }
                    if !can_retry {
                        return Err(ConnectorError::RateLimited {
                            instance: self.instance.clone(),
                            request: what,
                            message: format!(
                                "still throttled after {attempt} retries; lower rate_per_sec or max_concurrency"
                            ),
                            retry_after_secs: self
                                .retry_after(&r.headers)
                                .map(|d| d.as_secs_f64().ceil() as u64),
                        });
                    }
                    let base = self
                        .rate_limit
                        .wait_ms
                        .map_or(self.settings.retry_base, Duration::from_millis);
                    match self.retry_after(&r.headers) {
                        Some(d) => d.min(self.settings.retry_max),
                        None => self.backoff(attempt, base),
                    }
                }
                Ok(r) if r.status >= 500 && req.idempotent && can_retry => {
                    self.backoff(attempt, self.settings.retry_base)
                }
                Ok(r) => {
                    return Err(ConnectorError::Status {
                        instance: self.instance.clone(),
                        request: what,
                        status: r.status,
                        body: snippet(&r.body),
                    })
                }
                Err(e) => {
                    // A failed connect never reached the server, so even a POST may try again.
                    if (req.idempotent || e.is_connect()) && can_retry {
                        self.backoff(attempt, self.settings.retry_base)
                    } else {
                        return Err(ConnectorError::Network {
                            instance: self.instance.clone(),
                            request: what,
                            message: describe_error(&e),
                        });
                    }
                }
            };
            attempt += 1;
            self.retried.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                instance = %self.instance,
                request = %what,
                attempt,
                wait_ms = wait.as_millis() as u64,
                "request retried"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// A reqwest error without its URL (queries can hold personal data) but with its causes.
fn describe_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the response broke off"
    } else {
        "request failed"
    };
    let mut msg = kind.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The start of an error body, on one line.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 300 {
        format!("{}…", one_line.chars().take(300).collect::<String>())
    } else if one_line.is_empty() {
        "(empty body)".into()
    } else {
        one_line
    }
}

/// The `rel="next"` target of a `Link` header, if any.
pub fn link_next(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(s) = value.to_str() else { continue };
        let mut rest = s;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else {
                break;
            };
            let url = &rest[open + 1..open + close];
            let after = &rest[open + close + 1..];
            // This link's params run up to the comma before the next `<`.
            let (params, next_rest) = match after.find('<') {
                Some(j) => {
                    let seg = &after[..j];
                    (&seg[..seg.rfind(',').unwrap_or(seg.len())], &after[j..])
                }
                None => (after, ""),
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim();
                p.strip_prefix("rel=")
                    .map(|r| {
                        r.trim_matches('"')
                            .split_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                    })
                    .unwrap_or(false)
            });
            if is_next {
                return Some(url.to_string());
            }
            rest = next_rest;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn link_headers() {
        let h = headers(&[(
            "link",
            r#"<https://s.myshopify.com/admin/api/2024-10/customers.json?limit=2&page_info=abc>; rel="next", <https://x/?page_info=z>; rel="previous""#,
        )]);
        assert_eq!(
            link_next(&h).unwrap(),
            "https://s.myshopify.com/admin/api/2024-10/customers.json?limit=2&page_info=abc"
        );
        let h = headers(&[(
            "link",
            r#"<https://x/?page=1>; rel="prev", <https://x/?page=3>; rel="next""#,
        )]);
        assert_eq!(link_next(&h).unwrap(), "https://x/?page=3");
        let h = headers(&[("link", r#"<https://x/?page=1>; rel="prev""#)]);
        assert_eq!(link_next(&h), None);
    }

    #[test]
    fn retry_after_and_backoff() {
        let clock = crate::clock::from_option(crate::time::parse("2015-10-21T07:28:00Z"));
        let http = Http::new(
            "t",
            "t",
            Vec::new(),
            HttpSettings {
                timeout: Duration::from_secs(1),
                max_retries: 3,
                retry_base: Duration::from_millis(100),
                retry_max: Duration::from_millis(1000),
                rate_per_sec: 0.0,
                max_concurrency: 1,
            },
            RateLimit {
                fatal: Vec::new(),
                wait_ms: None,
            },
            String::new(),
            clock,
        )
        .unwrap();
        assert_eq!(
            http.retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            http.retry_after(&headers(&[(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:05 GMT"
            )])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(http.retry_after(&headers(&[])), None);
        for attempt in 0..8 {
            let d = http.backoff(attempt, Duration::from_millis(100));
            assert!(d <= Duration::from_millis(1000), "{d:?}");
            assert!(d >= Duration::from_millis(50), "{d:?}");
        }
    }

    #[test]
    fn snippets_are_short() {
        assert_eq!(snippet(b"{\"a\":\n 1}"), "{\"a\": 1}");
        assert!(snippet(&vec![b'x'; 1000]).len() < 320);
    }
}
