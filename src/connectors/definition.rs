//! Connector definitions: one TOML file per vendor in `connectors/` (see
//! `connectors/README.md` for every key). A definition says how to authenticate,
//! how to list customers page by page and map each record, how to ask for only what
//! changed, and which named requests actions may send. Loading compiles every
//! template and expression, so a bad one is a `klantreis check` problem with its
//! file:line:column, not a failure half way through a sync.
//!
//! Definitions in the config's `connectors/` folder win; the shipped ones are also
//! built into the binary, so an instance works without the folder.

use super::mapping::{Mapping, Problems, RawMap};
use super::path::JsonPath;
use super::template::request_env;
use crate::diag::Diagnostic;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

/// Template variables a pull request may use besides the instance's params.
pub const PULL_VARS: &[&str] = &[
    "page_size",
    "cursor",
    "offset",
    "page",
    "since",
    "since_ms",
    "since_unix",
];

/// Instance keys the engine itself reads, by kind; definition params may not reuse them.
pub const HTTP_KEYS: &[(&str, KeyType)] = &[
    ("base_url", KeyType::Str),
    ("rate_per_sec", KeyType::Number),
    ("max_concurrency", KeyType::Int),
    ("timeout_secs", KeyType::Int),
    ("max_retries", KeyType::Int),
    ("retry_base_ms", KeyType::Int),
    ("retry_max_ms", KeyType::Int),
    ("page_size", KeyType::Int),
    ("overlap_secs", KeyType::Int),
    ("join", KeyType::Str),
    ("prefix", KeyType::Str),
    ("pull", KeyType::Bool),
];
pub const FILE_KEYS: &[(&str, KeyType)] = &[
    ("page_size", KeyType::Int),
    ("join", KeyType::Str),
    ("prefix", KeyType::Str),
    ("pull", KeyType::Bool),
];

/// The TOML type an engine key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Str,
    Number,
    Int,
    Bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    kind: Option<Spanned<String>>,
    #[serde(default)]
    description: String,
    base_url: Option<Spanned<String>>,
    rate_per_sec: Option<Spanned<f64>>,
    max_concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    params: BTreeMap<Spanned<String>, RawParam>,
    auth: Option<RawAuth>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    rate_limit: RawRateLimit,
    pull: Option<RawPull>,
    #[serde(default)]
    requests: BTreeMap<Spanned<String>, RawRequest>,
    check: Option<RawRequest>,
    /// `[webhooks]`: see [`super::inbound`].
    webhooks: Option<super::inbound::RawWebhooks>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(default)]
    secret: bool,
    required: Option<bool>,
    default: Option<String>,
    #[serde(default)]
    help: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    style: Spanned<String>,
    token: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    header: Option<Spanned<String>>,
    value: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    #[serde(default)]
    fatal: Vec<RawFatal>,
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFatal {
    path: Spanned<String>,
    equals: String,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    #[serde(default)]
    query: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    body: Option<Spanned<String>>,
    content_type: Option<String>,
    #[serde(default)]
    error_paths: Vec<Spanned<String>>,
    idempotent: Option<bool>,
    signature: Option<RawSignature>,
    lookup: Option<Spanned<String>>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    header: String,
    key: Spanned<String>,
    #[serde(default)]
    prefix: String,
    #[serde(default = "default_encoding")]
    encoding: Spanned<String>,
}

fn default_encoding() -> Spanned<String> {
    Spanned::new(0..0, "hex".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPull {
    method: Option<Spanned<String>>,
    path: Spanned<String>,
    #[serde(default)]
    query: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    body: Option<Spanned<String>>,
    content_type: Option<String>,
    records: Option<Spanned<String>>,
    page_size: Option<u64>,
    max_page_size: Option<u64>,
    pagination: RawPagination,
    incremental: Option<RawIncremental>,
    map: RawMap,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPagination {
    style: Spanned<String>,
    next: Option<Spanned<String>>,
    param: Option<String>,
    total: Option<Spanned<String>>,
    total_header: Option<String>,
    total_pages_header: Option<String>,
    first_page: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncremental {
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    #[serde(default)]
    query: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    body: Option<Spanned<String>>,
    content_type: Option<String>,
    records: Option<Spanned<String>>,
    pagination: Option<RawPagination>,
    restart_after: Option<u64>,
    overlap_secs: Option<u64>,
}

/// What a definition connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A REST API.
    Http,
    /// A JSON Lines or CSV file in klantreis's import format.
    File,
}

/// A value an instance supplies (`token`, `list_id`, ...).
#[derive(Debug, Clone)]
pub struct Param {
    pub secret: bool,
    pub required: bool,
    pub default: Option<String>,
    pub help: String,
}

/// How requests authenticate; the strings are template names.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Bearer { token: String },
    Basic { username: String, password: String },
    Header { name: String, value: String },
}

/// A 429 that waiting will not clear (HubSpot's daily limit).
#[derive(Debug, Clone)]
pub struct Fatal {
    pub path: JsonPath,
    pub equals: String,
    pub message: String,
}

/// Per-vendor 429 handling.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub fatal: Vec<Fatal>,
    /// First wait after a 429 that carries no `Retry-After` (then doubling).
    pub wait_ms: Option<u64>,
}

/// One HTTP request's shape; strings are template names.
#[derive(Debug, Clone)]
pub struct Shape {
    pub method: reqwest::Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub content_type: String,
}

/// Pagination styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// One page.
    None,
    /// A cursor in the body (HubSpot `paging.next.after`).
    Cursor,
    /// The next page's URL in the body (Klaviyo `links.next`, SuperOffice `odata.nextLink`).
    NextUrl,
    /// Offset and count against a total (Mailchimp `total_items`).
    Offset,
    /// Page numbers, until a total-pages header, a missing `Link: rel="next"` or a short page (WooCommerce).
    Page,
    /// `Link: <...>; rel="next"` headers (Shopify).
    Link,
}

/// How to get from one page to the next.
#[derive(Debug, Clone)]
pub struct Pagination {
    pub style: Style,
    pub next: Option<JsonPath>,
    /// The query parameter carrying the cursor, offset or page number. Without one a
    /// cursor is only available to templates as `{{ cursor }}` (search bodies).
    pub param: Option<String>,
    /// Body path of the total number of records.
    pub total: Option<JsonPath>,
    /// Header with the total number of records.
    pub total_header: Option<String>,
    /// Header with the total number of pages.
    pub total_pages_header: Option<String>,
    pub first_page: u64,
}

/// A list request with its pagination.
#[derive(Debug, Clone)]
pub struct Listing {
    pub shape: Shape,
    pub records: JsonPath,
    pub pagination: Pagination,
}

/// Asking only for what changed since a watermark.
#[derive(Debug, Clone)]
pub struct Incremental {
    pub listing: Listing,
    /// Start a new query from the newest change seen after this many records (HubSpot
    /// search stops at 10,000); the query must sort by change time, ascending.
    pub restart_after: Option<u64>,
    /// How far before the previous run's start the next one looks (clock skew).
    pub overlap_secs: u64,
}

/// `[pull]`.
#[derive(Debug, Clone)]
pub struct Pull {
    pub full: Listing,
    pub incremental: Option<Incremental>,
    pub page_size: u64,
    pub max_page_size: Option<u64>,
    pub map: Mapping,
}

/// A named outbound request (`[requests.NAME]`).
#[derive(Debug, Clone)]
pub struct Request {
    pub shape: Shape,
    pub description: String,
    /// A response with something at one of these paths failed even with a 2xx
    /// (GraphQL `errors` and `userErrors`).
    pub error_paths: Vec<JsonPath>,
    /// Whether a 5xx or a dropped connection may be retried (default: not for POST).
    pub idempotent: bool,
    pub signature: Option<Signature>,
    /// Another request of this definition that tells whether an earlier attempt
    /// of this one already took effect: before a repeat (after a timeout, or a
    /// crash between sending and recording), it is sent with the same context, and
    /// an answer that holds the attempt's `idempotency_key` as a string value
    /// anywhere means "already done". For receivers without idempotency keys
    /// (Brevo: the key travels as a tag, found again with `GET /smtp/emails`).
    pub lookup: Option<String>,
}

/// An HMAC-SHA256 signature of the body, sent in a header (outgoing webhooks).
#[derive(Debug, Clone)]
pub struct Signature {
    pub header: String,
    /// Template name of the key.
    pub key: String,
    pub prefix: String,
    pub base64: bool,
}

/// A loaded, checked definition.
#[derive(Debug)]
pub struct Definition {
    pub name: String,
    /// Where it came from (a file path, or `built-in connectors/NAME.toml`).
    pub origin: String,
    pub kind: Kind,
    pub description: String,
    /// Template name of the default base URL, if the definition has one.
    pub base_url: Option<String>,
    pub rate_per_sec: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub params: BTreeMap<String, Param>,
    pub auth: Auth,
    /// Header name → template name.
    pub headers: Vec<(String, String)>,
    pub rate_limit: RateLimit,
    pub pull: Option<Pull>,
    pub requests: BTreeMap<String, Request>,
    /// The request `check --online` makes (default: the first pull page).
    pub check: Option<Shape>,
    /// `[webhooks]`: how the vendor's webhooks are signed and what they mean;
    /// without it the instance takes no webhooks.
    pub webhooks: Option<super::inbound::Webhooks>,
    pub(crate) env: minijinja::Environment<'static>,
}

struct Compiler<'a> {
    p: Problems<'a>,
    env: minijinja::Environment<'static>,
    params: Vec<String>,
}

impl Compiler<'_> {
    /// Registers a template; `allowed` limits the variables it may use.
    fn tpl(
        &mut self,
        name: String,
        src: &Spanned<String>,
        allowed: Option<&[&str]>,
    ) -> Option<String> {
        let at = src.span().start;
        if let Err(e) = self
            .env
            .add_template_owned(name.clone(), src.get_ref().clone())
        {
            let line = e
                .line()
                .filter(|l| *l > 1)
                .map(|l| format!(" (template line {l})"))
                .unwrap_or_default();
            self.p.at(
                at,
                format!(
                    "bad template{line}: {}",
                    e.detail().unwrap_or(&e.to_string())
                ),
            );
            return None;
        }
        if let Some(allowed) = allowed {
            let t = self.env.get_template(&name).expect("just added");
            let mut unknown: Vec<String> = t
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !allowed.contains(&v.as_str()) && !self.params.contains(v))
                .collect();
            unknown.sort();
            if !unknown.is_empty() {
                let mut known: Vec<&str> = self.params.iter().map(String::as_str).collect();
                known.extend_from_slice(allowed);
                self.p.at(
                    at,
                    format!(
                        "template uses {} which is not defined here (available: {})",
                        unknown.join(", "),
                        known.join(", ")
                    ),
                );
                return None;
            }
        }
        Some(name)
    }

    fn method(&mut self, m: Option<&Spanned<String>>, default: reqwest::Method) -> reqwest::Method {
        match m {
            None => default,
            Some(m) => match m.get_ref().to_ascii_uppercase().as_str() {
                "GET" => reqwest::Method::GET,
                "POST" => reqwest::Method::POST,
                "PUT" => reqwest::Method::PUT,
                "PATCH" => reqwest::Method::PATCH,
                "DELETE" => reqwest::Method::DELETE,
                other => {
                    self.p.at(
                        m.span().start,
                        format!("unknown method {other:?} (GET, POST, PUT, PATCH, DELETE)"),
                    );
                    default
                }
            },
        }
    }

    fn path(&mut self, what: &str, s: &Spanned<String>) -> Option<JsonPath> {
        match JsonPath::parse(s.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.p.at(s.span().start, format!("{what}: {e}"));
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(
        &mut self,
        prefix: &str,
        method: Option<&Spanned<String>>,
        path: &Spanned<String>,
        query: &BTreeMap<String, Spanned<String>>,
        headers: &BTreeMap<String, Spanned<String>>,
        body: Option<&Spanned<String>>,
        content_type: Option<&String>,
        allowed: Option<&[&str]>,
    ) -> Shape {
        let default_method = if body.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let method = self.method(method, default_method);
        let path_t = self
            .tpl(format!("{prefix}.path"), path, allowed)
            .unwrap_or_default();
        let mut q = Vec::new();
        for (k, v) in query {
            if let Some(t) = self.tpl(format!("{prefix}.query.{k}"), v, allowed) {
                q.push((k.clone(), t));
            }
        }
        let mut h = Vec::new();
        for (k, v) in headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                self.p
                    .at(v.span().start, format!("{k:?} is not a valid header name"));
            }
            if let Some(t) = self.tpl(format!("{prefix}.headers.{k}"), v, allowed) {
                h.push((k.clone(), t));
            }
        }
        let body = body.and_then(|b| self.tpl(format!("{prefix}.body"), b, allowed));
        Shape {
            method,
            path: path_t,
            query: q,
            headers: h,
            body,
            content_type: content_type
                .cloned()
                .unwrap_or_else(|| "application/json".into()),
        }
    }

    fn pagination(&mut self, raw: &RawPagination) -> Pagination {
        let at = raw.style.span().start;
        let style = match raw.style.get_ref().as_str() {
            "none" => Style::None,
            "cursor" => Style::Cursor,
            "next_url" => Style::NextUrl,
            "offset" => Style::Offset,
            "page" => Style::Page,
            "link" => Style::Link,
            other => {
                self.p.at(
                    at,
                    format!("unknown pagination style {other:?} (none, cursor, next_url, offset, page, link)"),
                );
                Style::None
            }
        };
        let next = raw
            .next
            .as_ref()
            .and_then(|n| self.path("pagination.next", n));
        if matches!(style, Style::Cursor | Style::NextUrl) && raw.next.is_none() {
            self.p.at(
                at,
                format!(
                    "pagination style {:?} needs `next`, the body path of the next cursor or URL",
                    raw.style.get_ref()
                ),
            );
        }
        if matches!(style, Style::Offset | Style::Page) && raw.param.is_none() {
            self.p.at(
                at,
                format!(
                    "pagination style {:?} needs `param`, the query parameter to set",
                    raw.style.get_ref()
                ),
            );
        }
        let total = raw
            .total
            .as_ref()
            .and_then(|t| self.path("pagination.total", t));
        Pagination {
            style,
            next,
            param: raw.param.clone().filter(|p| !p.is_empty()),
            total,
            total_header: raw.total_header.clone(),
            total_pages_header: raw.total_pages_header.clone(),
            first_page: raw.first_page.unwrap_or(1),
        }
    }
}

impl Definition {
    /// Parses and checks a definition; every problem is returned with its position.
    pub fn parse(name: &str, origin: &str, text: &str) -> Result<Definition, Vec<Diagnostic>> {
        let raw: RawDefinition = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            vec![Diagnostic::at_offset(
                origin,
                text,
                offset,
                e.message().trim(),
            )]
        })?;
        let mut c = Compiler {
            p: Problems {
                file: origin,
                text,
                list: Vec::new(),
            },
            env: request_env(),
            params: raw.params.keys().map(|k| k.get_ref().clone()).collect(),
        };
        let kind = match raw.kind.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("http") => Kind::Http,
            Some("file") => Kind::File,
            Some(other) => {
                let at = raw.kind.as_ref().map_or(0, |k| k.span().start);
                c.p.at(at, format!("unknown kind {other:?} (http or file)"));
                Kind::Http
            }
        };
        let engine_keys = if kind == Kind::File {
            FILE_KEYS
        } else {
            HTTP_KEYS
        };
        let mut params = BTreeMap::new();
        for (k, p) in &raw.params {
            let name = k.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                || name == "type"
            {
                c.p.at(
                    k.span().start,
                    format!("param name {name:?} must be letters, digits and '_' (and not `type`)"),
                );
            }
            if engine_keys.iter().any(|(e, _)| e == name) || PULL_VARS.contains(&name.as_str()) {
                c.p.at(
                    k.span().start,
                    format!("param {name:?} clashes with an engine key or template variable"),
                );
            }
            params.insert(
                name.clone(),
                Param {
                    secret: p.secret,
                    required: p.required.unwrap_or(p.default.is_none()),
                    default: p.default.clone(),
                    help: p.help.clone(),
                },
            );
        }
        let rate_per_sec = raw.rate_per_sec.as_ref().map(|r| {
            if r.get_ref().is_nan() || *r.get_ref() < 0.0 {
                c.p.at(r.span().start, "rate_per_sec must be 0 (no limit) or more");
            }
            *r.get_ref()
        });
        let max_concurrency = raw.max_concurrency.as_ref().map(|m| {
            if *m.get_ref() < 1 {
                c.p.at(m.span().start, "max_concurrency must be at least 1");
            }
            (*m.get_ref()).max(1) as usize
        });

        if kind == Kind::File {
            if raw.auth.is_some()
                || raw.pull.is_some()
                || !raw.requests.is_empty()
                || raw.base_url.is_some()
            {
                c.p.at(0, "a file definition has only params (path, format); auth, pull and requests are for http");
            }
            if !params.contains_key("path") {
                c.p.at(0, "a file definition needs a `path` param");
            }
        }

        let params_only: &[&str] = &[];
        let base_url = raw
            .base_url
            .as_ref()
            .and_then(|b| c.tpl("base_url".into(), b, Some(params_only)));
        let auth = match &raw.auth {
            None => Auth::None,
            Some(a) => {
                let need = |c: &mut Compiler<'_>,
                            v: &Option<Spanned<String>>,
                            key: &str,
                            name: &str|
                 -> String {
                    match v {
                        Some(v) => c.tpl(name.into(), v, Some(params_only)).unwrap_or_default(),
                        None => {
                            c.p.at(
                                a.style.span().start,
                                format!("auth style {:?} needs `{key}`", a.style.get_ref()),
                            );
                            String::new()
                        }
                    }
                };
                match a.style.get_ref().as_str() {
                    "none" => Auth::None,
                    "bearer" => Auth::Bearer {
                        token: need(&mut c, &a.token, "token", "auth.token"),
                    },
                    "basic" => Auth::Basic {
                        username: need(&mut c, &a.username, "username", "auth.username"),
                        password: need(&mut c, &a.password, "password", "auth.password"),
                    },
                    "header" => {
                        let name = a
                            .header
                            .as_ref()
                            .map(|h| h.get_ref().clone())
                            .unwrap_or_default();
                        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                            c.p.at(
                                a.style.span().start,
                                "auth style \"header\" needs `header`, a valid header name",
                            );
                        }
                        Auth::Header {
                            name,
                            value: need(&mut c, &a.value, "value", "auth.value"),
                        }
                    }
                    other => {
                        c.p.at(
                            a.style.span().start,
                            format!("unknown auth style {other:?} (bearer, basic, header, none)"),
                        );
                        Auth::None
                    }
                }
            }
        };
        let mut headers = Vec::new();
        for (k, v) in &raw.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                c.p.at(v.span().start, format!("{k:?} is not a valid header name"));
            }
            if let Some(t) = c.tpl(format!("headers.{k}"), v, Some(params_only)) {
                headers.push((k.clone(), t));
            }
        }
        let mut fatal = Vec::new();
        for f in &raw.rate_limit.fatal {
            if let Some(path) = c.path("rate_limit.fatal.path", &f.path) {
                fatal.push(Fatal {
                    path,
                    equals: f.equals.clone(),
                    message: f.message.clone(),
                });
            }
        }
        let rate_limit = RateLimit {
            fatal,
            wait_ms: raw.rate_limit.wait_ms,
        };

        let pull = raw.pull.as_ref().and_then(|rp| {
            let full = Listing {
                shape: c.shape(
                    "pull",
                    rp.method.as_ref(),
                    &rp.path,
                    &rp.query,
                    &rp.headers,
                    rp.body.as_ref(),
                    rp.content_type.as_ref(),
                    Some(PULL_VARS),
                ),
                records: rp
                    .records
                    .as_ref()
                    .and_then(|r| c.path("records", r))
                    .unwrap_or_else(|| JsonPath::parse("").expect("the root path parses")),
                pagination: c.pagination(&rp.pagination),
            };
            let incremental = rp.incremental.as_ref().map(|ri| {
                // A separate path is a separate request; without one the incremental
                // request is the full one with extra query parameters.
                let shape = if let Some(path) = &ri.path {
                    c.shape(
                        "incremental",
                        ri.method.as_ref(),
                        path,
                        &ri.query,
                        &ri.headers,
                        ri.body.as_ref(),
                        ri.content_type.as_ref(),
                        Some(PULL_VARS),
                    )
                } else {
                    let mut shape = full.shape.clone();
                    for (k, v) in &ri.query {
                        if let Some(t) = c.tpl(format!("incremental.query.{k}"), v, Some(PULL_VARS)) {
                            shape.query.retain(|(q, _)| q != k);
                            shape.query.push((k.clone(), t));
                        }
                    }
                    for (k, v) in &ri.headers {
                        if let Some(t) = c.tpl(format!("incremental.headers.{k}"), v, Some(PULL_VARS)) {
                            shape.headers.retain(|(q, _)| q != k);
                            shape.headers.push((k.clone(), t));
                        }
                    }
                    shape
                };
                let records = match &ri.records {
                    Some(r) => c.path("incremental.records", r).unwrap_or_else(|| full.records.clone()),
                    None => full.records.clone(),
                };
                let pagination = match &ri.pagination {
                    Some(p) => c.pagination(p),
                    None => full.pagination.clone(),
                };
                Incremental {
                    listing: Listing {
                        shape,
                        records,
                        pagination,
                    },
                    restart_after: ri.restart_after,
                    overlap_secs: ri.overlap_secs.unwrap_or(300),
                }
            });
            let map = Mapping::parse(&rp.map, &mut c.p);
            if let (Some(inc), Some(m)) = (&incremental, &map) {
                if inc.restart_after.is_some() && m.updated.is_none() {
                    c.p.at(rp.path.span().start, "incremental.restart_after needs map.updated (the change time to restart from)");
                }
            }
            let page_size = rp.page_size.unwrap_or(100).max(1);
            if let Some(max) = rp.max_page_size {
                if page_size > max {
                    c.p.at(rp.path.span().start, format!("page_size {page_size} is above max_page_size {max}"));
                }
            }
            Some(Pull {
                full,
                incremental,
                page_size,
                max_page_size: rp.max_page_size,
                map: map?,
            })
        });

        let mut requests = BTreeMap::new();
        for (name, r) in &raw.requests {
            let n = name.get_ref();
            let Some(path) = &r.path else {
                c.p.at(
                    name.span().start,
                    format!("request {n:?} needs a `path` (\"\" for the base URL itself)"),
                );
                continue;
            };
            let shape = c.shape(
                &format!("requests.{n}"),
                r.method.as_ref(),
                path,
                &r.query,
                &r.headers,
                r.body.as_ref(),
                r.content_type.as_ref(),
                None,
            );
            let error_paths = r
                .error_paths
                .iter()
                .filter_map(|p| c.path("error_paths", p))
                .collect();
            let signature = r.signature.as_ref().map(|s| Signature {
                header: s.header.clone(),
                key: c
                    .tpl(format!("requests.{n}.signature.key"), &s.key, None)
                    .unwrap_or_default(),
                prefix: s.prefix.clone(),
                base64: match s.encoding.get_ref().as_str() {
                    "hex" => false,
                    "base64" => true,
                    other => {
                        c.p.at(
                            s.encoding.span().start,
                            format!("unknown signature encoding {other:?} (hex, base64)"),
                        );
                        false
                    }
                },
            });
            let idempotent = r
                .idempotent
                .unwrap_or(shape.method != reqwest::Method::POST);
            let lookup = r.lookup.as_ref().map(|l| {
                if !raw.requests.keys().any(|k| k.get_ref() == l.get_ref()) {
                    c.p.at(
                        l.span().start,
                        format!(
                            "request {n:?}: lookup {:?} is not a request of this definition",
                            l.get_ref()
                        ),
                    );
                }
                l.get_ref().clone()
            });
            requests.insert(
                n.clone(),
                Request {
                    shape,
                    description: r.description.clone(),
                    error_paths,
                    idempotent,
                    signature,
                    lookup,
                },
            );
        }
        let check = raw.check.as_ref().and_then(|r| {
            let path = r.path.as_ref()?;
            Some(c.shape(
                "check",
                r.method.as_ref(),
                path,
                &r.query,
                &r.headers,
                r.body.as_ref(),
                r.content_type.as_ref(),
                Some(PULL_VARS),
            ))
        });
        let request_names: Vec<&str> = raw.requests.keys().map(|k| k.get_ref().as_str()).collect();
        let webhooks = raw
            .webhooks
            .as_ref()
            .and_then(|w| super::inbound::compile(w, &request_names, &mut c.p));
        if kind == Kind::Http
            && raw.pull.is_none()
            && raw.requests.is_empty()
            && raw.webhooks.is_none()
        {
            c.p.at(
                0,
                "an http definition needs a [pull] section, [requests] or [webhooks]",
            );
        }
        if !c.p.list.is_empty() {
            return Err(c.p.list);
        }
        Ok(Definition {
            name: name.to_string(),
            origin: origin.to_string(),
            kind,
            description: raw.description,
            base_url,
            rate_per_sec,
            max_concurrency,
            params,
            auth,
            headers,
            rate_limit,
            pull,
            requests,
            check,
            webhooks,
            env: c.env,
        })
    }

    /// Renders one of this definition's templates.
    pub(crate) fn render(&self, template: &str, ctx: &minijinja::Value) -> Result<String, String> {
        let t = self.env.get_template(template).map_err(|e| e.to_string())?;
        t.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                if !msg.contains(d) {
                    msg = format!("{msg}: {d}");
                }
            }
            msg
        })
    }

    /// The engine keys an instance of this definition accepts.
    pub fn engine_keys(&self) -> &'static [(&'static str, KeyType)] {
        match self.kind {
            Kind::File => FILE_KEYS,
            Kind::Http => HTTP_KEYS,
        }
    }
}

/// Why a definition could not be had.
#[derive(Debug, Clone)]
pub enum LookupError {
    Unknown { known: Vec<String> },
    Invalid(Vec<Diagnostic>),
}

/// The definitions an installation can use: the config's `connectors/` folder first,
/// then the built-in ones. Each is parsed once.
pub struct Registry {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Loaded>>,
}

/// A definition as loaded: usable, or its problems.
type Loaded = Result<Arc<Definition>, Vec<Diagnostic>>;

impl Registry {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The folder searched first.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every definition name available, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = super::builtin::BUILTIN
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) == Some("toml") {
                    if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                        names.push(stem.to_string());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    fn source(&self, name: &str) -> Option<(String, String)> {
        let file = self.dir.join(format!("{name}.toml"));
        if file.is_file() {
            return match std::fs::read_to_string(&file) {
                Ok(text) => Some((file.display().to_string(), text)),
                Err(e) => Some((file.display().to_string(), format!("\u{0}unreadable: {e}"))),
            };
        }
        super::builtin::BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| (format!("built-in connectors/{n}.toml"), text.to_string()))
    }

    /// The definition called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Definition>, LookupError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(LookupError::Unknown {
                known: self.names(),
            });
        }
        if let Some(r) = self.cache.lock().get(name) {
            return r.clone().map_err(LookupError::Invalid);
        }
        let Some((origin, text)) = self.source(name) else {
            return Err(LookupError::Unknown {
                known: self.names(),
            });
        };
        let r = match text.strip_prefix('\u{0}') {
            Some(err) => Err(vec![Diagnostic::new(&origin, 1, 1, err)]),
            None => Definition::parse(name, &origin, &text).map(Arc::new),
        };
        self.cache.lock().insert(name.to_string(), r.clone());
        r.map_err(LookupError::Invalid)
    }

    /// Checks every definition in the folder and every built-in one.
    pub fn check_all(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for name in self.names() {
            if let Err(LookupError::Invalid(ds)) = self.get(&name) {
                out.extend(ds);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems of a definition that must not load, as `file:line:column: ...`.
    fn problems(text: &str) -> Vec<String> {
        Definition::parse("x", "x.toml", text)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn every_shipped_definition_loads() {
        for (name, text) in super::super::builtin::BUILTIN {
            if let Err(ds) = Definition::parse(name, name, text) {
                panic!(
                    "{name}: {}",
                    ds.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }

    #[test]
    fn a_lookup_must_name_a_request_of_the_definition() {
        let text = "base_url = \"https://x.example\"\n[requests.send]\nmethod = \"POST\"\npath = \"/s\"\nlookup = \"find\"\n";
        let ds = Definition::parse("t", "t.toml", text).unwrap_err();
        let msg = ds
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(msg.contains("t.toml:5:"), "{msg}");
        assert!(msg.contains("lookup \"find\" is not a request"), "{msg}");
        let ok = format!("{text}[requests.find]\npath = \"/f\"\n");
        let d = Definition::parse("t", "t.toml", &ok).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(d.requests["send"].lookup.as_deref(), Some("find"));
    }

    #[test]
    fn problems_point_into_the_definition() {
        let text = r#"
base_url = "https://x.example"
[params.token]
secret = true
[auth]
style = "bearer"
token = "{{ tokn }}"
[pull]
path = "/contacts/{{ page }"
[pull.pagination]
style = "sideways"
[pull.map]
id = "id"
"#;
        let all = problems(text);
        assert!(
            all.iter()
                .any(|d| d.starts_with("x.toml:7:") && d.contains("tokn")),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|d| d.starts_with("x.toml:9:") && d.contains("bad template")),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|d| d.starts_with("x.toml:11:") && d.contains("sideways")),
            "{all:?}"
        );
        let ds = Definition::parse("x", "x.toml", "colour = 1\n").unwrap_err();
        assert!(ds[0].to_string().contains("colour"), "{ds:?}");
    }

    #[test]
    fn bad_webhooks_sections_point_at_the_problem() {
        let head = "base_url = \"https://x.example\"\n[requests.ping]\npath = \"/\"\n";
        // An unknown key: the TOML itself is refused, at the key.
        let text = format!(
            "{head}[webhooks]\nsignature = {{ scheme = \"hmac_sha256_base64\", header = \"X-Sig\" }}\ndelivery_id = {{ header = \"X-Id\" }}\ncolour = \"red\"\n"
        );
        let all = problems(&text);
        assert!(
            all.iter()
                .any(|d| d.starts_with("x.toml:7:") && d.contains("colour")),
            "{all:?}"
        );
        // An unknown scheme, a bad type and a bad fact: each at its line.
        let text = format!(
            "{head}[webhooks]\nsignature = {{ scheme = \"carrier_pigeon\" }}\ndelivery_id = {{ header = \"X-Id\" }}\n"
        );
        let all = problems(&text);
        assert!(
            all.iter()
                .any(|d| d.starts_with("x.toml:5:") && d.contains("carrier_pigeon")),
            "{all:?}"
        );
        let text = format!(
            "{head}[webhooks]\nsignature = {{ scheme = \"fetch\", request = \"nosuch\" }}\ndelivery_id = {{ path = \"$when\" }}\n[webhooks.topics.t]\nemail = {{ path = \"mail\", type = \"colour\" }}\n"
        );
        let all = problems(&text);
        for (line, what) in [(5, "nosuch"), (6, "$when"), (8, "colour")] {
            assert!(
                all.iter()
                    .any(|d| d.starts_with(&format!("x.toml:{line}:")) && d.contains(what)),
                "{what}: {all:?}"
            );
        }
        // The shipped sections load.
        for name in ["shopify", "woocommerce", "webhook", "mollie"] {
            assert!(super::super::inbound::builtin(name).is_some(), "{name}");
        }
    }

    #[test]
    fn registry_prefers_the_folder_and_rejects_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hubspot.toml"),
            "description = \"mine\"\nbase_url = \"https://x\"\n[requests.ping]\npath = \"/\"\n",
        )
        .unwrap();
        let r = Registry::new(dir.path());
        assert_eq!(r.get("hubspot").unwrap().description, "mine");
        assert!(r.get("mailchimp").unwrap().pull.is_some());
        assert!(matches!(
            r.get("../etc/passwd"),
            Err(LookupError::Unknown { .. })
        ));
        match r.get("nosuch") {
            Err(LookupError::Unknown { known }) => assert!(known.contains(&"klaviyo".to_string())),
            other => panic!("{other:?}"),
        }
    }
}
