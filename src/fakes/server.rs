//! The harness every fake runs on: an axum server on `127.0.0.1:0` that records each
//! request, applies the configured [`Faults`] and hands the request to a [`Vendor`].
//!
//! Order of checks for each request (so tests can predict which fault wins):
//! 1. record it and give it a sequence number (1-based, per server);
//! 2. `max_concurrent`: more in-flight requests for one credential than allowed gives
//!    the vendor's 429 at once (Mailchimp throttles this way);
//! 3. `delay`;
//! 4. `fail_first` / `fail_every`: the vendor's 500;
//! 5. the vendor's credential check (401/403 in its error shape);
//! 6. `throttle_every` / `rate_limit`: the vendor's 429;
//! 7. the vendor's handler.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::util::Query;

/// Bodies larger than this are cut off (the fakes never need more).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 1-based arrival number on this server.
    pub seq: u64,
    pub method: String,
    /// The raw path, still percent-encoded.
    pub path: String,
    /// The raw query string without `?` (empty when none).
    pub query: String,
    /// Header names lower-cased, in arrival order; a name may repeat.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The status the fake answered with.
    pub status: u16,
}

impl RecordedRequest {
    /// The first value of a header (the name is matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        Query::parse(&self.query).get(name).map(str::to_string)
    }

    /// All query parameters, decoded, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        Query::parse(&self.query).0
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub(crate) fn query(&self) -> Query {
        Query::parse(&self.query)
    }
}

/// Faults a fake injects; all off by default. Change them at any time with
/// [`FakeServer::set_faults`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Every Nth request (seq % N == 0) gets the vendor's 500.
    pub fail_every: Option<u32>,
    /// The first N requests get the vendor's 500.
    pub fail_first: u32,
    /// Every Nth request (seq % N == 0) gets the vendor's 429 (deterministic throttling).
    pub throttle_every: Option<u32>,
    /// At most `max_requests` per fixed `window`; the rest get the vendor's 429.
    pub rate_limit: Option<RateLimit>,
    /// At most N requests in flight per credential; more get the vendor's 429 at once.
    pub max_concurrent: Option<u32>,
    /// `Retry-After` seconds on a 429. `None` sends no `Retry-After`, except on
    /// Shopify REST, which always sends one (2 s when unset).
    pub retry_after_secs: Option<u64>,
    /// Waited before every response (except a concurrency 429).
    pub delay: Duration,
    /// Waited after the vendor handled a request, before answering: the request
    /// takes effect, the answer comes late (a client that times out loses the
    /// answer to a request that went through).
    pub slow_answer: Duration,
}

/// A fixed-window request limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max_requests: u32,
    pub window: Duration,
}

impl RateLimit {
    pub fn new(max_requests: u32, window: Duration) -> Self {
        Self {
            max_requests,
            window,
        }
    }
}

/// Why a 429 is being sent, for the vendor that renders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    /// `throttle_every`.
    Forced,
    /// `rate_limit`.
    Rate,
    /// `max_concurrent`.
    Concurrency,
}

/// What a vendor needs to render its 429.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    pub reason: ThrottleReason,
    pub retry_after_secs: Option<u64>,
    /// The limit in force (requests per window, or concurrent requests).
    pub limit: u32,
    /// Seconds until the window resets (rounded up; 1 when unknown).
    pub reset_secs: u64,
}

/// Rate-limit bookkeeping of the current window, for vendors that show it in headers.
#[derive(Debug, Clone, Copy)]
pub struct RateUsage {
    pub limit: u32,
    pub used: u32,
    pub reset_secs: u64,
}

/// Per-request context handed to [`Vendor::handle`].
#[derive(Debug)]
pub struct Ctx<'a> {
    /// `http://127.0.0.1:<port>`, for absolute links.
    pub base_url: &'a str,
    pub seq: u64,
    /// Present when a `rate_limit` is configured.
    pub rate: Option<RateUsage>,
}

/// One vendor's behaviour behind the harness. Each fake implements it; the handler is
/// synchronous because the harness does all the waiting.
pub trait Vendor: Send + Sync + Sized + 'static {
    /// Checks credentials; `Err` is the vendor's 401/403 response.
    fn authorize(&self, _req: &RecordedRequest) -> Result<(), Response> {
        Ok(())
    }

    /// The key that `max_concurrent` counts per (default: the `Authorization` header).
    fn credential(&self, req: &RecordedRequest) -> String {
        req.header("authorization").unwrap_or("").to_string()
    }

    /// The vendor's 500.
    fn server_error(&self, req: &RecordedRequest) -> Response;

    /// The vendor's 429.
    fn throttled(&self, req: &RecordedRequest, t: &Throttle) -> Response;

    /// Answers an authorized, unthrottled request.
    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response;
}

/// State shared by the server task and the [`FakeServer`] handle.
pub struct ServerState<V> {
    pub vendor: V,
    base_url: String,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RecordedRequest>>,
    recording: AtomicBool,
    seq: AtomicU64,
    window: Mutex<Window>,
    inflight: Arc<Mutex<HashMap<String, u32>>>,
}

struct Window {
    start: Instant,
    count: u32,
}

/// A running fake. Derefs to its vendor, so vendor accessors (`sent()`, `events()`,
/// `contacts()`, ...) are called on it directly. Stops when dropped.
pub struct FakeServer<V> {
    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub base_url: String,
    pub state: Arc<ServerState<V>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<V: Vendor> FakeServer<V> {
    /// Starts the fake on the current tokio runtime.
    ///
    /// # Panics
    /// When no loopback port can be bound, or outside a tokio runtime.
    pub async fn start(vendor: V, faults: Faults) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState::new(vendor, faults, format!("http://{addr}")));
        let app = router(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            base_url: state.base_url.clone(),
            state,
            stop: Some(tx),
            thread: None,
        }
    }

    /// Starts the fake on its own single-threaded runtime in a background thread, for
    /// benchmarks and tests without a runtime. Dropping the handle stops the thread.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub fn start_blocking(vendor: V, faults: Faults) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = std_listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState::new(vendor, faults, format!("http://{addr}")));
        let app = router(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("klantreis-fake".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake server runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app).into_future() => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime ends every open connection.
            })
            .expect("spawn fake server thread");
        Self {
            base_url: state.base_url.clone(),
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl<V> FakeServer<V> {
    /// `base_url + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// The vendor behind this server.
    pub fn vendor(&self) -> &V {
        &self.state.vendor
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let mut v = self.state.log.lock().clone();
        v.sort_by_key(|r| r.seq);
        v
    }

    /// The requests whose path (without query) is exactly `path`.
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The requests whose path starts with `prefix`.
    pub fn requests_under(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect()
    }

    /// How many requests have been recorded.
    pub fn request_count(&self) -> usize {
        self.state.log.lock().len()
    }

    /// Forgets the recorded requests (the sequence numbers keep counting).
    pub fn clear_requests(&self) {
        self.state.log.lock().clear();
    }

    /// Turns request recording on or off (benchmarks turn it off to save memory).
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::Relaxed);
    }

    /// Replaces the faults; takes effect from the next request. Resets the rate window.
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock() = faults;
        *self.state.window.lock() = Window {
            start: Instant::now(),
            count: 0,
        };
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.state.faults.lock()
    }

    /// Waits (polling) until at least `n` requests are recorded or `timeout` passes,
    /// and returns what was recorded.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let end = Instant::now() + timeout;
        while self.request_count() < n && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.requests()
    }

    /// [`FakeServer::wait_for_requests`] for code without a runtime.
    pub fn wait_for_requests_blocking(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let end = Instant::now() + timeout;
        while self.request_count() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.requests()
    }

    /// Stops the server. Also done on drop.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<V> Deref for FakeServer<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.state.vendor
    }
}

impl<V> Drop for FakeServer<V> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<V> std::fmt::Debug for FakeServer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl<V: Vendor> ServerState<V> {
    fn new(vendor: V, faults: Faults, base_url: String) -> Self {
        Self {
            vendor,
            base_url,
            faults: Mutex::new(faults),
            log: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            seq: AtomicU64::new(0),
            window: Mutex::new(Window {
                start: Instant::now(),
                count: 0,
            }),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn record(&self, mut rec: RecordedRequest, status: u16) {
        if self.recording.load(Ordering::Relaxed) {
            rec.status = status;
            self.log.lock().push(rec);
        }
    }
}

fn router<V: Vendor>(state: Arc<ServerState<V>>) -> Router {
    Router::new().fallback(move |req: Request| {
        let st = state.clone();
        async move { dispatch(st, req).await }
    })
}

/// Decrements the in-flight count of a credential when the request ends.
struct Slot {
    map: Arc<Mutex<HashMap<String, u32>>>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn dispatch<V: Vendor>(st: Arc<ServerState<V>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let seq = st.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let rec = RecordedRequest {
        seq,
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        status: 0,
    };
    let faults = *st.faults.lock();
    let vendor = &st.vendor;

    let _slot = match faults.max_concurrent {
        Some(max) => {
            let key = vendor.credential(&rec);
            let mut m = st.inflight.lock();
            let n = m.entry(key.clone()).or_insert(0);
            if *n >= max {
                drop(m);
                let t = Throttle {
                    reason: ThrottleReason::Concurrency,
                    retry_after_secs: faults.retry_after_secs,
                    limit: max,
                    reset_secs: 1,
                };
                let resp = vendor.throttled(&rec, &t);
                st.record(rec, resp.status().as_u16());
                return resp;
            }
            *n += 1;
            Some(Slot {
                map: st.inflight.clone(),
                key,
            })
        }
        None => None,
    };

    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }

    let nth = |every: Option<u32>| every.is_some_and(|n| n > 0 && seq % u64::from(n) == 0);
    let resp = if seq <= u64::from(faults.fail_first) || nth(faults.fail_every) {
        vendor.server_error(&rec)
    } else if let Err(denied) = vendor.authorize(&rec) {
        denied
    } else if nth(faults.throttle_every) {
        let t = Throttle {
            reason: ThrottleReason::Forced,
            retry_after_secs: faults.retry_after_secs,
            limit: faults.rate_limit.map_or(1, |r| r.max_requests),
            reset_secs: 1,
        };
        vendor.throttled(&rec, &t)
    } else {
        let mut usage = None;
        let mut over = None;
        if let Some(rl) = faults.rate_limit {
            let mut w = st.window.lock();
            let now = Instant::now();
            if now.duration_since(w.start) >= rl.window {
                *w = Window {
                    start: now,
                    count: 0,
                };
            }
            w.count += 1;
            let left = rl.window.saturating_sub(now.duration_since(w.start));
            let reset_secs = left.as_millis().div_ceil(1000).max(1) as u64;
            usage = Some(RateUsage {
                limit: rl.max_requests,
                used: w.count.min(rl.max_requests),
                reset_secs,
            });
            if w.count > rl.max_requests {
                over = Some(Throttle {
                    reason: ThrottleReason::Rate,
                    retry_after_secs: faults.retry_after_secs,
                    limit: rl.max_requests,
                    reset_secs,
                });
            }
        }
        match over {
            Some(t) => vendor.throttled(&rec, &t),
            None => vendor.handle(
                &Ctx {
                    base_url: &st.base_url,
                    seq,
                    rate: usage,
                },
                &rec,
            ),
        }
    };
    st.record(rec, resp.status().as_u16());
    if !faults.slow_answer.is_zero() {
        tokio::time::sleep(faults.slow_answer).await;
    }
    resp
}
