//! Fake SuperOffice CRM WebAPI v1, the Person archive (API-NOTES I).
//!
//! - `GET /{tenant}/api/v1/Person` and `GET /api/v1/Person` (for a base URL that
//!   already holds the tenant, see [`FakeServer::api_base`]). Another tenant in the
//!   path is a 404. Query: `$top` (default [`Config::default_top`], 200; the real
//!   default is UNCONFIRMED), `$skip`, `$select` (columns below; `PrimaryKey` and
//!   `EntityName` are always there), `$orderBy` (`personId` or `updatedDate`, with
//!   `asc`/`desc`), `$filter` (clauses joined by ` and `: `updatedDate after|gt|ge|
//!   before|lt|le '<time>'`, `personId gt|ge|lt|le|eq N`, `email eq|contains '<text>'`;
//!   the column names are UNCONFIRMED and others are a 400), `$mode`, `$format`,
//!   `$jsonSafe`, `$output` (accepted, ignored).
//!   The answer is `ODataSlimResponse`: `odata.metadata`, `odata.nextLink` (the full URL
//!   with `$skip` advanced, absent on the last page) and `value[]` rows of
//!   `PrimaryKey`, `EntityName: "person"`, `personId`, `fullName`, `firstname`,
//!   `lastname`, `email`, `updatedDate`, `registeredDate` (times as
//!   `2024-03-05T08:00:00`, UTC, no zone: UNCONFIRMED).
//! - `GET .../api/v1/Person/{id}`: a PersonEntity with `PersonId`, `Firstname`,
//!   `Lastname`, `FullName`, `Emails[]`, `Updated`, `Registered` (shape UNCONFIRMED).
//! - Needs `Authorization: Bearer <token>` **and** `SO-AppToken: <app token>`; either
//!   missing or wrong is 401 with `WWW-Authenticate: Bearer`. Needs JSON: an `Accept`
//!   that names `application/json` (or `$format=JSON`), else 406, so a client that
//!   forgets the header notices. Error bodies `{"Error","ErrorType","Message"}` are
//!   UNCONFIRMED.

use axum::response::Response;
use serde_json::{json, Map, Value};

use super::contacts::{Contact, ContactBook, Order, UpdatedRange};
use super::server::{Ctx, FakeServer, Faults, RecordedRequest, Throttle, Vendor};
use super::util::{bearer, json, naive, parse_iso, segments, set_header, url_with};

pub const DEFAULT_TENANT: &str = "Cust12345";
pub const DEFAULT_TOKEN: &str = "8A:Cust12345.fake-access-token";
pub const DEFAULT_APP_TOKEN: &str = "fake-application-token";
const COLUMNS: [&str; 7] = [
    "personId",
    "fullName",
    "firstname",
    "lastname",
    "email",
    "updatedDate",
    "registeredDate",
];

/// How to start the fake.
#[derive(Debug, Clone)]
pub struct Config {
    pub tenant: String,
    pub token: String,
    pub app_token: String,
    pub contacts: ContactBook,
    pub faults: Faults,
    /// Rows per page without `$top`.
    pub default_top: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tenant: DEFAULT_TENANT.to_string(),
            token: DEFAULT_TOKEN.to_string(),
            app_token: DEFAULT_APP_TOKEN.to_string(),
            contacts: ContactBook::generate(25),
            faults: Faults::default(),
            default_top: 200,
        }
    }
}

/// The fake's state.
pub struct SuperOffice {
    tenant: String,
    token: String,
    app_token: String,
    contacts: ContactBook,
    default_top: usize,
}

impl SuperOffice {
    pub fn new(cfg: &Config) -> Self {
        Self {
            tenant: cfg.tenant.clone(),
            token: cfg.token.clone(),
            app_token: cfg.app_token.clone(),
            contacts: cfg.contacts.clone(),
            default_top: cfg.default_top.max(1),
        }
    }

    pub fn contacts(&self) -> &ContactBook {
        &self.contacts
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl FakeServer<SuperOffice> {
    /// `{base_url}/{tenant}/api/v1`, like the `webapi_url` claim plus `v1`.
    pub fn api_base(&self) -> String {
        format!("{}/{}/api/v1", self.base_url, self.tenant)
    }
}

pub async fn start(cfg: Config) -> FakeServer<SuperOffice> {
    FakeServer::start(SuperOffice::new(&cfg), cfg.faults).await
}

pub fn start_blocking(cfg: Config) -> FakeServer<SuperOffice> {
    FakeServer::start_blocking(SuperOffice::new(&cfg), cfg.faults)
}

fn error(status: u16, kind: &str, message: &str) -> Response {
    json(
        status,
        &json!({"Error": message, "ErrorType": kind, "Message": message}),
    )
}

enum Clause {
    Updated(&'static str, chrono::DateTime<chrono::Utc>),
    PersonId(&'static str, u64),
    Email(bool, String),
}

fn parse_filter(s: &str) -> Result<Vec<Clause>, String> {
    let mut out = Vec::new();
    for clause in s.split(" and ").map(str::trim).filter(|c| !c.is_empty()) {
        let mut parts = clause.splitn(3, ' ');
        let (col, op, val) = match (parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(o), Some(v)) => (c, o, v.trim().trim_matches('\'')),
            _ => return Err(format!("Cannot parse filter clause '{clause}'")),
        };
        let norm = |op: &str| -> Option<&'static str> {
            Some(match op {
                "after" | "gt" => "gt",
                "ge" => "ge",
                "before" | "lt" => "lt",
                "le" => "le",
                "eq" => "eq",
                _ => return None,
            })
        };
        match col {
            "updatedDate" => {
                let op = norm(op)
                    .ok_or_else(|| format!("Operator '{op}' is not supported on updatedDate"))?;
                let t = parse_iso(val).ok_or_else(|| format!("Invalid date '{val}'"))?;
                out.push(Clause::Updated(op, t));
            }
            "personId" => {
                let op = norm(op)
                    .ok_or_else(|| format!("Operator '{op}' is not supported on personId"))?;
                out.push(Clause::PersonId(
                    op,
                    val.parse().map_err(|_| format!("Invalid number '{val}'"))?,
                ));
            }
            "email" => match op {
                "eq" => out.push(Clause::Email(true, val.to_lowercase())),
                "contains" => out.push(Clause::Email(false, val.to_lowercase())),
                _ => return Err(format!("Operator '{op}' is not supported on email")),
            },
            other => {
                return Err(format!(
                    "Unknown column '{other}' (the fake knows updatedDate, personId, email)"
                ))
            }
        }
    }
    Ok(out)
}

fn cmp_ok<T: PartialOrd>(op: &str, a: T, b: T) -> bool {
    match op {
        "gt" => a > b,
        "ge" => a >= b,
        "lt" => a < b,
        "le" => a <= b,
        _ => a == b,
    }
}

fn row(c: &Contact, select: &[&str]) -> Value {
    let mut m = Map::new();
    m.insert("PrimaryKey".into(), json!(c.id));
    m.insert("EntityName".into(), json!("person"));
    for col in select {
        let v = match *col {
            "personId" => json!(c.id),
            "fullName" => json!(c.full_name()),
            "firstname" => json!(c.first_name),
            "lastname" => json!(c.last_name),
            "email" => json!(c.email),
            "updatedDate" => json!(naive(c.updated_at)),
            "registeredDate" => json!(naive(c.created_at)),
            _ => continue,
        };
        m.insert((*col).to_string(), v);
    }
    Value::Object(m)
}

impl Vendor for SuperOffice {
    fn authorize(&self, req: &RecordedRequest) -> Result<(), Response> {
        let token_ok = bearer(req.header("authorization")) == Some(self.token.as_str());
        let app_ok = req.header("so-apptoken").map(str::trim) == Some(self.app_token.as_str());
        if token_ok && app_ok {
            return Ok(());
        }
        let why = if !token_ok {
            "Missing or invalid bearer token"
        } else {
            "Missing or invalid SO-AppToken"
        };
        let mut r = error(401, "UnauthorizedAccessException", why);
        set_header(&mut r, "www-authenticate", "Bearer");
        Err(r)
    }

    fn server_error(&self, _req: &RecordedRequest) -> Response {
        error(500, "SoException", "An unexpected error occurred.")
    }

    fn throttled(&self, _req: &RecordedRequest, t: &Throttle) -> Response {
        let mut r = error(429, "TooManyRequests", "Too many requests.");
        if let Some(s) = t.retry_after_secs {
            set_header(&mut r, "retry-after", &s.to_string());
        }
        r
    }

    fn handle(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let segs = segments(&req.path);
        let mut segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        if segs.first() != Some(&"api") {
            if segs.first() != Some(&self.tenant.as_str()) {
                return error(404, "NotFound", "Unknown tenant");
            }
            segs.remove(0);
        }
        let q = req.query();
        let json_ok = q
            .get("$format")
            .is_some_and(|f| f.eq_ignore_ascii_case("json"))
            || req
                .header("accept")
                .is_some_and(|a| a.to_ascii_lowercase().contains("application/json"));
        if !json_ok {
            return error(
                406,
                "NotAcceptable",
                "Send 'Accept: application/json' (the fake does not speak XML)",
            );
        }
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["api", "v1", "Person"]) => self.list(ctx, req),
            ("GET", ["api", "v1", "Person", id]) => {
                match id.parse::<u64>().ok().and_then(|id| self.contacts.get(id)) {
                    Some(c) => json(
                        200,
                        &json!({"PersonId": c.id, "Firstname": c.first_name, "Lastname": c.last_name, "FullName": c.full_name(),
                        "Emails": [{"Value": c.email, "StrippedValue": c.email.to_lowercase(), "Description": "", "Rank": 1}],
                        "Updated": naive(c.updated_at), "Registered": naive(c.created_at), "TableRight": null}),
                    ),
                    None => error(404, "NotFound", &format!("Person {id} not found")),
                }
            }
            _ => error(404, "NotFound", "No such resource"),
        }
    }
}

impl SuperOffice {
    fn list(&self, ctx: &Ctx<'_>, req: &RecordedRequest) -> Response {
        let q = req.query();
        let top = match q.number::<usize>("$top") {
            Ok(v) => v.unwrap_or(self.default_top).max(1),
            Err(raw) => return error(400, "ArgumentException", &format!("Invalid $top '{raw}'")),
        };
        let skip = match q.number::<usize>("$skip") {
            Ok(v) => v.unwrap_or(0),
            Err(raw) => return error(400, "ArgumentException", &format!("Invalid $skip '{raw}'")),
        };
        let select: Vec<&str> = match q.get("$select").filter(|s| !s.trim().is_empty()) {
            None => COLUMNS.to_vec(),
            Some(s) => {
                let mut cols = Vec::new();
                for c in s.split(',').map(str::trim) {
                    match COLUMNS.iter().find(|k| k.eq_ignore_ascii_case(c)) {
                        Some(k) => cols.push(*k),
                        None => {
                            return error(
                                400,
                                "ArgumentException",
                                &format!("Unknown column '{c}' in $select"),
                            )
                        }
                    }
                }
                cols
            }
        };
        let order = match q.get("$orderBy").map(str::trim).filter(|s| !s.is_empty()) {
            None => Order::IdAsc,
            Some(o) => {
                let mut it = o.split_whitespace();
                let desc = match it.nth(1) {
                    None => false,
                    Some(d) if d.eq_ignore_ascii_case("asc") => false,
                    Some(d) if d.eq_ignore_ascii_case("desc") => true,
                    Some(d) => {
                        return error(
                            400,
                            "ArgumentException",
                            &format!("Invalid sort direction '{d}'"),
                        )
                    }
                };
                match (o.split_whitespace().next().unwrap_or(""), desc) {
                    ("personId", false) => Order::IdAsc,
                    ("personId", true) => Order::IdDesc,
                    ("updatedDate", false) => Order::UpdatedAsc,
                    ("updatedDate", true) => Order::UpdatedDesc,
                    (c, _) => {
                        return error(400, "ArgumentException", &format!("Cannot order by '{c}'"))
                    }
                }
            }
        };
        let clauses = match q.get("$filter").map(parse_filter).transpose() {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => return error(400, "ArgumentException", &e),
        };
        let mut range = UpdatedRange::default();
        let mut rest = Vec::new();
        for c in &clauses {
            match c {
                Clause::Updated("gt", t) => range.after = Some((*t, false)),
                Clause::Updated("ge", t) => range.after = Some((*t, true)),
                Clause::Updated("lt", t) => range.before = Some((*t, false)),
                Clause::Updated("le", t) => range.before = Some((*t, true)),
                other => rest.push(other),
            }
        }
        let keep = |c: &Contact| {
            rest.iter().all(|cl| match cl {
                Clause::Updated(op, t) => cmp_ok(op, c.updated_at, *t),
                Clause::PersonId(op, n) => cmp_ok(op, c.id, *n),
                Clause::Email(true, e) => c.email.to_lowercase() == *e,
                Clause::Email(false, e) => c.email.to_lowercase().contains(e.as_str()),
            })
        };
        let book = self.contacts.read();
        let sel = book.select(
            &format!("superoffice|{}", q.get("$filter").unwrap_or("")),
            range,
            order,
            if rest.is_empty() { None } else { Some(&keep) },
        );
        let start = skip.min(sel.len());
        let end = (start + top).min(sel.len());
        let value: Vec<Value> = sel[start..end]
            .iter()
            .map(|&p| row(book.at(p), &select))
            .collect();
        let prefix = if req.path.starts_with("/api/") {
            String::new()
        } else {
            format!("/{}", self.tenant)
        };
        let mut body = json!({
            "odata.metadata": format!("{}{prefix}/api/v1/archive$metadata", ctx.base_url),
        });
        if end < sel.len() {
            let mut pairs = q.with("$skip", &end.to_string(), &[]);
            if !q.has("$top") {
                pairs.push(("$top".to_string(), top.to_string()));
            }
            // OData writes `$skip` literally; `$` needs no escaping in a query.
            let next = url_with(ctx.base_url, &req.path, &pairs).replace("%24", "$");
            body["odata.nextLink"] = json!(next);
        }
        body["value"] = Value::Array(value);
        json(200, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(DEFAULT_TOKEN)
            .header("SO-AppToken", DEFAULT_APP_TOKEN)
            .header("Accept", "application/json")
    }

    #[tokio::test]
    async fn persons_follow_next_link_to_the_end() {
        let s = start(Config {
            contacts: ContactBook::generate(130),
            ..Config::default()
        })
        .await;
        let mut url = format!(
            "{}/Person?$top=50&$select=personId,email,updatedDate",
            s.api_base()
        );
        let mut n = 0;
        loop {
            let v: Value = get(&url).send().await.unwrap().json().await.unwrap();
            assert!(v["odata.metadata"].is_string());
            for r in v["value"].as_array().unwrap() {
                assert_eq!(r["EntityName"], "person");
                assert_eq!(r["PrimaryKey"], r["personId"]);
                assert!(r.get("fullName").is_none());
                n += 1;
            }
            match v.get("odata.nextLink").and_then(Value::as_str) {
                Some(next) => {
                    assert!(next.contains("$skip="));
                    url = next.to_string()
                }
                None => break,
            }
        }
        assert_eq!(n, 130);
        // A base URL that already holds the tenant works the same.
        let v: Value = get(&s.url("/api/v1/Person?$filter=personId%20le%201002"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["value"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn needs_both_tokens_and_json() {
        let s = start(Config::default()).await;
        let url = format!("{}/Person", s.api_base());
        let c = reqwest::Client::new();
        let r = c
            .get(&url)
            .bearer_auth(DEFAULT_TOKEN)
            .header("Accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .header("SO-AppToken", DEFAULT_APP_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(&url)
            .bearer_auth(DEFAULT_TOKEN)
            .header("SO-AppToken", DEFAULT_APP_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 406);
        let since = s.contacts().max_updated_at().unwrap();
        s.contacts().touch(1005);
        let v: Value = get(&url)
            .query(&[("$filter", format!("updatedDate after '{}'", naive(since)))])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["value"].as_array().unwrap().len(), 1);
    }
}
