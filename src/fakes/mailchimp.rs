//! Fake Mailchimp Marketing API 3.0 (API-NOTES B).
//!
//! - `GET /3.0/lists/{list_id}/members` (B1): `count` (default 10; above 1000 is a 400,
//!   as the SDK refuses it), `offset`, `since_last_changed` / `before_last_changed`
//!   (ISO 8601; "after" is read as strictly after, UNCONFIRMED), `status`, `fields` and
//!   `exclude_fields` (dot paths). Members are ordered by contact id (Mailchimp's own
//!   order is undocumented); `total_items` counts every match. Member `id` is the
//!   subscriber hash (B2); `tags` shows at most 50 with `tags_count` the total; tag
//!   ids are derived from the tag name. Consent maps to `status`: subscribed,
//!   unsubscribed, pending, and `transactional` for never-subscribed contacts.
//! - `GET /3.0/lists/{list_id}/members/{hash}` and `.../{hash}/tags`, `GET /3.0/ping`.
//! - `POST /3.0/lists/{list_id}/members/{subscriber_hash}/tags` (B3): the hash must be
//!   the lowercase MD5 of a member's lower-cased email, else 404; body
//!   `{"tags":[{"name","status":"active|inactive"}],"is_syncing"}` else 400; answers
//!   204. Tags change on the contact without changing `last_changed` (whether the real
//!   API bumps it is UNCONFIRMED). Every accepted call is kept: [`Mailchimp::tag_updates`].
//! - Auth: HTTP Basic, any user, the API key as password. Missing: 401 "API Key
//!   Missing"; wrong: 401 "API Key Invalid". **Datacenter:** loopback has no
//!   `<dc>.api.mailchimp.com` host, so the fake plays one datacenter, [`Config::dc`]
//!   (by default the suffix of the configured key), and answers a valid key whose
//!   suffix differs with 403 "Wrong Datacenter" (text UNCONFIRMED). Set `dc` to another
//!   value to test that path; no `X-Fake-Dc` header is used.
//! - Errors are RFC 7807 problem JSON (`application/problem+json; charset=utf-8`) with
//!   `X-Request-Id` and the `Link: <...ProblemDetailDocument.json>; rel="describedBy"`
//!   header (B4). 400 validation errors carry `errors[] {field, message}` (UNCONFIRMED).
//! - Throttling is by **concurrency**: by default at most 10 requests in flight per API
//!   key ([`Faults::max_concurrent`], set by [`Config::default`]); more get 429 problem
//!   JSON with `"title":"Too Many Requests"` (exact text UNCONFIRMED) and no
//!   `Retry-After` unless [`Faults::retry_after_secs`] is set. Use [`Faults::delay`] to
//!   keep requests in flight in a test.

use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::contacts::{subscriber_hash, Consent, Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{
    basic_credentials, empty, fake_uuid, iso_utc_offset, mix, parse_iso, project_fields, respond,
    segments, set_header,
};

/// The key the fake accepts by default (datacenter `us6`).
pub const DEFAULT_API_KEY: &str = "0123456789abcdef0123456789abcdef-us6";
/// The list the fake serves by default.
pub const DEFAULT_LIST_ID: &str = "57afe96172";
/// Largest `count` (B1).
pub const MAX_COUNT: usize = 1000;

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    /// The datacenter this fake plays; a key with another suffix gets 403.
    pub dc: String,
    pub list_id: String,
    pub contacts: ContactBook,
    /// Default: `max_concurrent: Some(10)`, Mailchimp's documented limit.
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_string(),
            dc: "us6".to_string(),
            list_id: DEFAULT_LIST_ID.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults {
                max_concurrent: Some(10),
                ..Faults::default()
            },
        }
    }
}

/// One accepted `POST .../tags` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagUpdate {
    pub subscriber_hash: String,
    pub email: String,
    /// `(name, active)`.
    pub tags: Vec<(String, bool)>,
    pub is_syncing: bool,
}

/// The fake's state.
pub struct Mailchimp {
    api_key: String,
    dc: String,
    list_id: String,
    contacts: ContactBook,
    tag_updates: Mutex<Vec<TagUpdate>>,
}

impl Mailchimp {
    pub fn new(cfg: &Config) -> Self {
        Self {
            api_key: cfg.api_key.clone(),
            dc: cfg.dc.clone(),
            list_id: cfg.list_id.clone(),
            contacts: cfg.contacts.clone(),
            tag_updates: Mutex::new(Vec::new()),
        }
    }

    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }

    /// The tag calls accepted so far.
    pub fn tag_updates(&self) -> Vec<TagUpdate> {
        self.tag_updates.lock().clone()
    }
}

pub async fn start(cfg: Config) -> FakeServer<Mailchimp> {
    FakeServer::start(Mailchimp::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<Mailchimp> {
    FakeServer::start_blocking(Mailchimp::new(&cfg), cfg.faults)
}

/// RFC 7807 problem JSON with Mailchimp's headers.
fn problem(status: u16, title: &str, detail: &str, seq: u64, errors: Option<Value>) -> Response {
    let mut body = json!({
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": fake_uuid(seq),
    });
    if let Some(e) = errors {
        body["errors"] = e;
    }
    let mut r = respond(
        status,
        "application/problem+json; charset=utf-8",
        body.to_string(),
    );
    set_header(&mut r, "x-request-id", &fake_uuid(seq ^ 0x77));
    set_header(
        &mut r,
        "link",
        "<https://us6.api.mailchimp.com/schema/3.0/ProblemDetailDocument.json>; rel=\"describedBy\"",
    );
    r
}

fn invalid(detail: &str, field: &str, seq: u64) -> Response {
    problem(
        400,
        "Invalid Resource",
        detail,
        seq,
        Some(json!([{"field": field, "message": detail}])),
    )
}

fn not_found(seq: u64) -> Response {
    problem(
        404,
        "Resource Not Found",
        "The requested resource could not be found.",
        seq,
        None,
    )
}

fn ok_json(v: &Value) -> Response {
    respond(200, "application/json; charset=utf-8", v.to_string())
}

/// A stable tag id per name.
pub fn tag_id(name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    10_000 + mix(h) % 90_000
}

fn status_of(c: &Contact) -> &'static str {
    match c.consent {
        Consent::Subscribed => "subscribed",
        Consent::Unsubscribed => "unsubscribed",
        Consent::Pending => "pending",
        Consent::NotSubscribed => "transactional",
    }
}

/// The B1 member JSON of a contact.
pub fn member_json(c: &Contact, list_id: &str) -> Value {
    let tags: Vec<Value> = c
        .tags
        .iter()
        .take(50)
        .map(|t| json!({"id": tag_id(t), "name": t}))
        .collect();
    json!({
        "id": c.subscriber_hash(),
        "email_address": c.email,
        "unique_email_id": format!("{:010x}", mix(c.id) & 0xff_ffff_ffff),
        "contact_id": format!("{:032x}", u128::from(mix(c.id ^ 1)) << 64 | u128::from(mix(c.id ^ 2))),
        "full_name": c.full_name(),
        "web_id": 100_000 + c.id,
        "email_type": "html",
        "status": status_of(c),
        "merge_fields": {"FNAME": c.first_name, "LNAME": c.last_name, "PHONE": c.phone.clone().unwrap_or_default()},
        "stats": {"avg_open_rate": 0, "avg_click_rate": 0},
        "ip_signup": "",
        "timestamp_signup": "",
        "ip_opt": "",
        "timestamp_opt": iso_utc_offset(c.created_at),
        "member_rating": 2,
        "last_changed": iso_utc_offset(c.updated_at),
        "language": "",
        "vip": c.tags.iter().any(|t| t.eq_ignore_ascii_case("vip")),
        "email_client": "",
        "source": "API - Generic",
        "tags_count": c.tags.len(),
        "tags": tags,
        "list_id": list_id,
        "_links": [],
    })
}

impl Vendor for Mailchimp {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        let Some((_, key)) = basic_credentials(req.header("authorization")) else {
            return Err(problem(
                401,
                "API Key Missing",
                "Your request did not include an API key.",
                req.seq,
                None,
            ));
        };
        if key != self.api_key {
            return Err(problem(
                401,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
                req.seq,
                None,
            ));
        }
        let key_dc = key.rsplit_once('-').map_or("", |(_, dc)| dc);
        if key_dc != self.dc {
            return Err(problem(
                403,
                "Wrong Datacenter",
                &format!(
                    "The API key provided is linked to datacenter '{key_dc}', not '{}'.",
                    self.dc
                ),
                req.seq,
                None,
            ));
        }
        Ok(())
    }

    fn credential(&self, req: &RecordedRequest) -> String {
        basic_credentials(req.header("authorization"))
            .map(|(_, key)| key)
            .unwrap_or_else(|| req.header("authorization").unwrap_or("").to_string())
    }

    fn server_error(&self, req: &RecordedRequest) -> Response {
        problem(
            500,
            "Internal Server Error",
            "An unexpected internal error has occurred.",
            req.seq,
            None,
        )
    }

    fn throttled(&self, req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = problem(
            429,
            "Too Many Requests",
            &format!(
                "You have exceeded the limit of {} simultaneous connections.",
                t.limit
            ),
            req.seq,
            None,
        );
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, _ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["3.0", "ping"]) => ok_json(&json!({"health_status": "Everything's Chimpy!"})),
            (_, ["3.0", "lists", list, ..]) if *list != self.list_id => not_found(req.seq),
            ("GET", ["3.0", "lists", _, "members"]) => self.list_members(req),
            ("GET", ["3.0", "lists", _, "members", hash]) => match self.member(hash) {
                Some(c) => ok_json(&member_json(&c, &self.list_id)),
                None => not_found(req.seq),
            },
            ("GET", ["3.0", "lists", _, "members", hash, "tags"]) => match self.member(hash) {
                Some(c) => {
                    let tags: Vec<Value> = c
                        .tags
                        .iter()
                        .map(|t| json!({"id": tag_id(t), "name": t, "date_added": iso_utc_offset(c.created_at)}))
                        .collect();
                    ok_json(&json!({"tags": tags, "total_items": c.tags.len(), "_links": []}))
                }
                None => not_found(req.seq),
            },
            ("POST", ["3.0", "lists", _, "members", hash, "tags"]) => self.post_tags(req, hash),
            (_, ["3.0", "lists", _, "members", ..]) => problem(
                405,
                "Method Not Allowed",
                "The requested method and resource are not compatible. See the Allow header for this resource's available methods.",
                req.seq,
                None,
            ),
            _ => not_found(req.seq),
        }
    }
}

impl Mailchimp {
    /// The member whose subscriber hash is exactly `hash` (lowercase hex).
    fn member(&self, hash: &str) -> Option<Contact> {
        // Positions sorted by subscriber hash, built once per book version.
        let book = self.contacts.read();
        let idx = book.cached("mailchimp|by-hash", |b| {
            let mut v: Vec<(String, u32)> = (0..b.len() as u32)
                .map(|p| (subscriber_hash(&b.at(p).email), p))
                .collect();
            v.sort_unstable();
            v.into_iter().map(|(_, p)| p).collect()
        });
        let i = idx.partition_point(|&p| subscriber_hash(&book.at(p).email).as_str() < hash);
        idx.get(i)
            .map(|&p| book.at(p))
            .filter(|c| subscriber_hash(&c.email) == hash)
            .cloned()
    }

    fn list_members(&self, req: &RecordedRequest) -> Response {
        let q = req.query();
        let count = match q.number::<usize>("count") {
            Ok(v) => v.unwrap_or(10),
            Err(raw) => {
                return invalid(
                    &format!("count must be an integer, got '{raw}'"),
                    "count",
                    req.seq,
                )
            }
        };
        if count > MAX_COUNT {
            return invalid("count must be less than or equal to 1000", "count", req.seq);
        }
        let offset = match q.number::<usize>("offset") {
            Ok(v) => v.unwrap_or(0),
            Err(raw) => {
                return invalid(
                    &format!("offset must be an integer, got '{raw}'"),
                    "offset",
                    req.seq,
                )
            }
        };
        let mut range = UpdatedRange::default();
        for (name, is_after) in [("since_last_changed", true), ("before_last_changed", false)] {
            if let Some(v) = q.get(name).filter(|v| !v.is_empty()) {
                let Some(t) = parse_iso(v) else {
                    return invalid(
                        &format!("{name} must be an ISO 8601 time, got '{v}'"),
                        name,
                        req.seq,
                    );
                };
                if is_after {
                    range.after = Some((t, false));
                } else {
                    range.before = Some((t, false));
                }
            }
        }
        let status = q
            .get("status")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let Some(s) = &status {
            if ![
                "subscribed",
                "unsubscribed",
                "cleaned",
                "pending",
                "transactional",
                "archived",
            ]
            .contains(&s.as_str())
            {
                return invalid(&format!("Invalid status '{s}'"), "status", req.seq);
            }
        }
        let book = self.contacts.read();
        let keep = status
            .as_deref()
            .map(|s| move |c: &Contact| status_of(c) == s);
        let sel = book.select(
            &format!("mailchimp|{status:?}"),
            range,
            Order::IdAsc,
            keep.as_ref().map(|k| k as &dyn Fn(&Contact) -> bool),
        );
        let start = offset.min(sel.len());
        let end = (start + count).min(sel.len());
        let members: Vec<Value> = sel[start..end]
            .iter()
            .map(|&p| member_json(book.at(p), &self.list_id))
            .collect();
        let body = json!({
            "members": members,
            "list_id": self.list_id,
            "total_items": sel.len(),
            "_links": [],
        });
        let body = if q.has("fields") || q.has("exclude_fields") {
            project_fields(&body, q.get("fields"), q.get("exclude_fields"))
        } else {
            body
        };
        ok_json(&body)
    }

    fn post_tags(&self, req: &RecordedRequest, hash: &str) -> Response {
        let Some(c) = self.member(hash) else {
            return not_found(req.seq);
        };
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return invalid("The request body is not valid JSON.", "", req.seq),
        };
        let Some(list) = body.get("tags").and_then(Value::as_array) else {
            return invalid(
                "Schema describes array, object found instead",
                "tags",
                req.seq,
            );
        };
        let mut tags = Vec::new();
        for t in list {
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .map(str::trim)
                .unwrap_or("");
            let active = match t.get("status").and_then(Value::as_str) {
                Some("active") => true,
                Some("inactive") => false,
                _ => {
                    return invalid(
                        "Each tag needs a status of 'active' or 'inactive'",
                        "tags.status",
                        req.seq,
                    )
                }
            };
            if name.is_empty() {
                return invalid("Each tag needs a name", "tags.name", req.seq);
            }
            tags.push((name.to_string(), active));
        }
        let is_syncing = body
            .get("is_syncing")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        self.contacts.update_quietly(c.id, |c| {
            for (name, active) in &tags {
                let has = c.tags.iter().position(|t| t == name);
                match (active, has) {
                    (true, None) => c.tags.push(name.clone()),
                    (false, Some(i)) => {
                        c.tags.remove(i);
                    }
                    _ => {}
                }
            }
        });
        self.tag_updates.lock().push(TagUpdate {
            subscriber_hash: hash.to_string(),
            email: c.email.clone(),
            tags,
            is_syncing,
        });
        empty(204)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn get(s: &FakeServer<Mailchimp>, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(s.url(path))
            .basic_auth("anystring", Some(DEFAULT_API_KEY))
    }

    #[tokio::test]
    async fn members_page_with_offset_to_total_items() {
        let s = start(Config {
            contacts: ContactBook::generate(2345),
            ..Config::default()
        })
        .await;
        let mut offset = 0;
        let mut seen = Vec::new();
        loop {
            let v: Value = get(
                &s,
                &format!("/3.0/lists/{DEFAULT_LIST_ID}/members?count=1000&offset={offset}"),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
            let members = v["members"].as_array().unwrap();
            for m in members {
                assert_eq!(
                    m["id"].as_str().unwrap(),
                    subscriber_hash(m["email_address"].as_str().unwrap())
                );
                seen.push(m["id"].as_str().unwrap().to_string());
            }
            offset += members.len();
            if offset >= v["total_items"].as_u64().unwrap() as usize {
                break;
            }
        }
        assert_eq!(seen.len(), 2345);
        let r = get(
            &s,
            &format!("/3.0/lists/{DEFAULT_LIST_ID}/members?count=1001"),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json; charset=utf-8"
        );
    }

    #[tokio::test]
    async fn since_last_changed_returns_only_changes() {
        let s = start(Config::default()).await;
        let since = s.contacts().max_updated_at().unwrap();
        s.contacts().touch(1004);
        let v: Value = reqwest::Client::new()
            .get(s.url(&format!("/3.0/lists/{DEFAULT_LIST_ID}/members")))
            .query(&[
                ("since_last_changed", iso_utc_offset(since)),
                ("fields", "members.email_address,total_items".into()),
            ])
            .basic_auth("x", Some(DEFAULT_API_KEY))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["total_items"], 1);
        assert_eq!(v["members"][0].as_object().unwrap().len(), 1);
        assert_eq!(
            v["members"][0]["email_address"],
            s.contacts().get(1004).unwrap().email
        );
    }

    #[tokio::test]
    async fn tags_need_the_lowercase_hash_of_a_member() {
        let s = start(Config::default()).await;
        let c = s.contacts().get(1004).unwrap();
        assert_ne!(c.email, c.email.to_lowercase(), "generated with capitals");
        let body =
            json!({"tags":[{"name":"Review Requested","status":"active"}],"is_syncing":true});
        let url = |h: &str| s.url(&format!("/3.0/lists/{DEFAULT_LIST_ID}/members/{h}/tags"));
        let client = reqwest::Client::new();
        let r = client
            .post(url(&c.subscriber_hash()))
            .basic_auth("u", Some(DEFAULT_API_KEY))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert!(s
            .contacts()
            .get(1004)
            .unwrap()
            .tags
            .contains(&"Review Requested".to_string()));
        let wrong = crate::fakes::util::md5_hex(c.email.as_bytes());
        let r = client
            .post(url(&wrong))
            .basic_auth("u", Some(DEFAULT_API_KEY))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(s.tag_updates().len(), 1);
        assert!(s.tag_updates()[0].is_syncing);
    }

    #[tokio::test]
    async fn auth_and_datacenter() {
        let s = start(Config {
            dc: "us1".into(),
            ..Config::default()
        })
        .await;
        let url = s.url(&format!("/3.0/lists/{DEFAULT_LIST_ID}/members"));
        let c = reqwest::Client::new();
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .basic_auth("u", Some("bad-us6"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["title"], "API Key Invalid");
        let r = c
            .get(&url)
            .basic_auth("u", Some(DEFAULT_API_KEY))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }

    #[tokio::test]
    async fn too_many_concurrent_requests_get_429() {
        let s = start(Config {
            faults: Faults {
                max_concurrent: Some(2),
                delay: Duration::from_millis(150),
                ..Faults::default()
            },
            ..Config::default()
        })
        .await;
        let url = s.url(&format!("/3.0/lists/{DEFAULT_LIST_ID}/members"));
        let c = reqwest::Client::new();
        let futs = (0..4).map(|_| c.get(&url).basic_auth("u", Some(DEFAULT_API_KEY)).send());
        let rs = futures_join(futs.collect()).await;
        let mut statuses: Vec<u16> = rs.iter().map(|r| r.status().as_u16()).collect();
        statuses.sort();
        assert_eq!(statuses, [200, 200, 429, 429]);
        let limited = rs.into_iter().find(|r| r.status() == 429).unwrap();
        assert!(limited.headers().get("retry-after").is_none());
        let v: Value = limited.json().await.unwrap();
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["status"], 429);
        // Sequential requests are fine again.
        assert_eq!(
            c.get(&url)
                .basic_auth("u", Some(DEFAULT_API_KEY))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }

    async fn futures_join<
        F: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
    >(
        fs: Vec<F>,
    ) -> Vec<reqwest::Response> {
        let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap().unwrap());
        }
        out
    }
}
