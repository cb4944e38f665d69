//! Pulling customers from a source into the store, page by page.
//!
//! A fetcher task requests page after page and hands each (parsed, with the
//! position after it) over a channel of two pages to the committer, which maps the
//! records, resolves identities and commits the customers *together with* the
//! sync position in one [`Store::merge_page`]. So memory holds at most a few pages
//! whatever the number of contacts, and a sync killed at any point resumes from the
//! last committed page: the store never has a page's customers without its cursor
//! or the other way round.
//!
//! Incremental sync: when a run completes, its watermark is stored: the newest
//! change time seen, but never later than the run's start minus `overlap_secs`
//! (changes made while the run was paging could otherwise be missed). The next run
//! asks the source only for records changed since then, where the definition says
//! how (`[pull.incremental]`).

use super::definition::{Kind, Listing, Pagination, Style};
use super::http::{link_next, Outgoing};
use super::identity::Resolver;
use super::instance::Connector;
use super::mapping::{expression_env, parse_time, Mapper};
use super::path::scalar_string;
use super::ConnectorError;
use crate::store::{MergeStats, Store};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Options of a sync.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Ignore the stored position and watermark: list everything again.
    pub full: bool,
}

/// A record that was reported and skipped.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SkippedRecord {
    /// The record's id in the source (or its place, when it has none).
    pub record: String,
    pub reason: String,
}

/// What a sync did for one instance.
#[derive(Debug, Default, Clone, Serialize)]
pub struct InstanceReport {
    /// Records received.
    pub fetched: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Records that failed mapping (see `skipped_records`).
    pub skipped: u64,
    /// Records the definition's `skip` expression left out (archived and the like).
    pub filtered: u64,
    /// Skipped records, plus one if the instance stopped with an error.
    pub errors: u64,
    /// HTTP requests made, and how many of them were retries.
    pub requests: u64,
    pub retried: u64,
    /// Pages committed.
    pub pages: u64,
    /// Whether only changes were asked for.
    pub incremental: bool,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    /// Whether the source was left alone because it has not changed (files).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub source_unchanged: bool,
    /// Why the instance stopped early; what was committed before stays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_records: Vec<SkippedRecord>,
}

/// Per instance name.
pub type SyncReport = BTreeMap<String, InstanceReport>;

const MAX_SAMPLES: usize = 100;

impl InstanceReport {
    pub(crate) fn skip(&mut self, instance: &str, record: String, reason: String) {
        // The report carries the reasons; one log line per record could flood stderr.
        tracing::debug!(instance, record = %record, reason = %reason, "record skipped");
        self.skipped += 1;
        if self.skipped_records.len() < MAX_SAMPLES {
            self.skipped_records.push(SkippedRecord { record, reason });
        }
    }

    pub(crate) fn add(&mut self, s: MergeStats) {
        self.created += s.created;
        self.updated += s.updated;
        self.unchanged += s.unchanged;
    }

    /// A report for an instance that could not start.
    pub fn failed(error: &ConnectorError) -> Self {
        Self {
            error: Some(error.to_string()),
            errors: 1,
            ..Default::default()
        }
    }
}

/// Progress of a running sync.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub instance: &'a str,
    pub fetched: u64,
    /// Records in the source (or in this incremental query), when it says.
    pub total: Option<u64>,
}

/// Where a listing is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PageState {
    Start,
    Cursor(String),
    Url(String),
    Offset(u64),
    Page(u64),
}

/// A run in progress, as committed with each page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunState {
    pub started: DateTime<Utc>,
    pub incremental: bool,
    /// The watermark the current query asks from.
    pub query_since: Option<DateTime<Utc>>,
    /// The page to fetch next.
    pub next: PageState,
    pub max_seen: Option<DateTime<Utc>>,
    /// Records received by the current query (for `restart_after`).
    pub in_query: u64,
}

/// A file's size and modification time, to skip rereading an unchanged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileStamp {
    pub len: u64,
    pub modified_ns: u128,
}

/// An instance's stored sync position (the store cursor `connector/<instance>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SyncState {
    /// Where the next incremental run starts.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// The run in progress, if one was interrupted.
    #[serde(default)]
    pub run: Option<RunState>,
    #[serde(default)]
    pub file: Option<FileStamp>,
}

pub(crate) fn cursor_name(instance: &str) -> String {
    format!("connector/{instance}")
}

pub(crate) fn load_state(store: &dyn Store, instance: &str) -> Result<SyncState, ConnectorError> {
    let bytes = store
        .cursor(&cursor_name(instance))
        .map_err(|e| ConnectorError::store(instance, e))?;
    Ok(match bytes {
        None => SyncState::default(),
        Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(instance, error = %e, "unreadable sync position; starting over with a full sync");
            SyncState::default()
        }),
    })
}

pub(crate) fn encode_state(s: &SyncState) -> Vec<u8> {
    serde_json::to_vec(s).expect("a sync state serializes")
}

/// Pulls one instance. Errors end up in the report; what was committed stays.
pub async fn sync(
    conn: &Connector,
    store: &dyn Store,
    opts: &SyncOptions,
    progress: &(dyn Fn(Progress<'_>) + Send + Sync),
) -> InstanceReport {
    let mut report = InstanceReport::default();
    let (req0, retry0) = conn.request_counts();
    let result = if conn.definition().kind == Kind::File {
        super::file::sync_file(conn, store, opts, progress, &mut report)
    } else {
        sync_http(conn, store, opts, progress, &mut report).await
    };
    let (req1, retry1) = conn.request_counts();
    report.requests = req1 - req0;
    report.retried = retry1 - retry0;
    if let Err(e) = result {
        // The caller gets the error in the report (the CLI prints it); this is for
        // long-running callers that only log.
        tracing::info!(instance = conn.name(), error = %e, "sync stopped");
        report.error = Some(e.to_string());
    }
    report.errors = report.skipped + u64::from(report.error.is_some());
    report
}

/// One fetched page, with the run position after it.
struct Fetched {
    records: Vec<Value>,
    run: RunState,
    done: bool,
    total: Option<u64>,
}

/// Aborts the fetcher when the sync is dropped half way (the committed pages stay).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sync_http(
    conn: &Connector,
    store: &dyn Store,
    opts: &SyncOptions,
    progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    report: &mut InstanceReport,
) -> Result<(), ConnectorError> {
    let name = conn.name().to_string();
    let def = conn.definition();
    let pull = def.pull.as_ref().ok_or_else(|| ConnectorError::Config {
        instance: name.clone(),
        problems: vec![format!("{} has no [pull] section", def.name)],
    })?;
    let state = load_state(store, &name)?;
    let now = conn.0.clock.now();
    let run = match (&state.run, opts.full) {
        (Some(r), false) if !r.incremental || pull.incremental.is_some() => {
            report.resumed = true;
            r.clone()
        }
        _ => {
            let since =
                if opts.full { None } else { state.since }.filter(|_| pull.incremental.is_some());
            RunState {
                started: now,
                incremental: since.is_some(),
                query_since: since,
                next: PageState::Start,
                max_seen: None,
                in_query: 0,
            }
        }
    };
    report.incremental = run.incremental;
    // While a run is in progress the old watermark stays, so an abandoned run
    // costs nothing; a --full run clears it.
    let keep_since = if opts.full { None } else { state.since };
    let overlap = conn
        .0
        .overlap_secs
        .or(pull.incremental.as_ref().map(|i| i.overlap_secs))
        .unwrap_or(300);
    tracing::info!(instance = %name, incremental = run.incremental, resumed = report.resumed, "sync started");

    let env = expression_env();
    let mapper = Mapper::new(&pull.map, &env).map_err(|message| ConnectorError::Template {
        instance: name.clone(),
        message,
    })?;
    let mut resolver = Resolver::new(
        store,
        &conn.0.join,
        Some(conn.id_attribute()),
        conn.tags_attribute(),
    );
    let key = cursor_name(&name);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Fetched, ConnectorError>>(2);
    let fetcher = tokio::spawn(fetch_loop(conn.clone(), run, tx));
    let _abort = AbortOnDrop(fetcher.abort_handle());

    let mut done = false;
    while let Some(msg) = rx.recv().await {
        let page = msg?;
        report.pages += 1;
        report.fetched += page.records.len() as u64;
        resolver.begin_page();
        let mut customers = Vec::with_capacity(page.records.len());
        for (i, rec) in page.records.iter().enumerate() {
            match mapper.map(rec) {
                Ok(Some(m)) => customers.push(
                    resolver
                        .customer(&name, m)
                        .map_err(|e| ConnectorError::store(&name, e))?,
                ),
                Ok(None) => report.filtered += 1,
                Err(reason) => {
                    let record = match &mapper.mapping().id.source {
                        super::mapping::Source::Path(p) => p.get(rec).and_then(scalar_string),
                        super::mapping::Source::Expr(_) => None,
                    }
                    .unwrap_or_else(|| format!("#{} of page {}", i + 1, report.pages));
                    report.skip(&name, record, reason);
                }
            }
        }
        let new_state = if page.done {
            let floor = page.run.started - chrono::Duration::seconds(overlap as i64);
            let since = match page.run.max_seen {
                Some(m) if m < floor => m,
                _ => floor,
            };
            SyncState {
                since: Some(since),
                run: None,
                file: None,
            }
        } else {
            SyncState {
                since: keep_since,
                run: Some(page.run.clone()),
                file: None,
            }
        };
        let stats = store
            .merge_page(customers, Some((&key, &encode_state(&new_state))))
            .map_err(|e| ConnectorError::store(&name, e))?;
        report.add(stats);
        progress(Progress {
            instance: &name,
            fetched: report.fetched,
            total: page.total,
        });
        if page.done {
            done = true;
            break;
        }
        // Committing blocks this task for a moment; let others (a server, a caller
        // that wants to cancel) run between pages even when the next page is ready.
        tokio::task::yield_now().await;
    }
    if !done {
        // The channel closed without a last page or an error: the fetcher died.
        return match fetcher.await {
            Err(e) if e.is_panic() => Err(ConnectorError::Internal {
                instance: name,
                message: "the page fetcher panicked".into(),
            }),
            _ => Err(ConnectorError::Internal {
                instance: name,
                message: "the page fetcher stopped early".into(),
            }),
        };
    }
    tracing::info!(instance = %name, fetched = report.fetched, created = report.created, updated = report.updated, "sync finished");
    Ok(())
}

async fn fetch_loop(
    conn: Connector,
    mut run: RunState,
    tx: tokio::sync::mpsc::Sender<Result<Fetched, ConnectorError>>,
) {
    if let Err(e) = fetch_pages(&conn, &mut run, &tx).await {
        let _ = tx.send(Err(e)).await;
    }
}

async fn fetch_pages(
    conn: &Connector,
    run: &mut RunState,
    tx: &tokio::sync::mpsc::Sender<Result<Fetched, ConnectorError>>,
) -> Result<(), ConnectorError> {
    let pull = conn
        .definition()
        .pull
        .as_ref()
        .expect("checked by sync_http");
    let (listing, restart_after) = match (&pull.incremental, run.incremental) {
        (Some(inc), true) => (&inc.listing, inc.restart_after),
        _ => (&pull.full, None),
    };
    let updated = pull.map.updated.as_ref();
    let mut page_no = 0u64;
    loop {
        page_no += 1;
        let req = list_request(conn, listing, run, conn.0.page_size)?;
        let resp = conn.execute(&req).await?;
        let malformed = |message: String| ConnectorError::MalformedPage {
            instance: conn.name().to_string(),
            request: req.describe(),
            page: page_no,
            message,
        };
        let mut body: Value = serde_json::from_slice(&resp.body)
            .map_err(|e| malformed(format!("the body is not JSON ({e})")))?;
        let p = &listing.pagination;
        let total = p
            .total
            .as_ref()
            .and_then(|t| t.get(&body))
            .and_then(as_u64)
            .or_else(|| {
                p.total_header
                    .as_ref()
                    .and_then(|h| header_u64(&resp.headers, h))
            });
        let records = match listing.records.take(&mut body) {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => {
                return Err(malformed(format!(
                    "no list of records at {:?}",
                    listing.records.as_str()
                )))
            }
            Some(other) => {
                return Err(malformed(format!(
                    "expected a list of records at {:?}, found {}",
                    listing.records.as_str(),
                    type_name(&other)
                )))
            }
        };
        let next = next_state(
            p,
            &run.next,
            &body,
            &resp.headers,
            records.len() as u64,
            conn.0.page_size,
        )
        .map_err(malformed)?;
        if let Some(u) = updated {
            for r in &records {
                if let Some(t) = u.get(r).and_then(parse_time) {
                    // None sorts before any time.
                    if run.max_seen < Some(t) {
                        run.max_seen = Some(t);
                    }
                }
            }
        }
        run.in_query += records.len() as u64;
        let done = next.is_none();
        if let Some(n) = next {
            run.next = n;
        }
        if let (Some(limit), false) = (restart_after, done) {
            if run.in_query >= limit {
                // The search caps a query's results (HubSpot: 10,000); records come
                // oldest change first, so a new query from the newest seen loses nothing.
                if run.max_seen.is_none() || run.max_seen == run.query_since {
                    return Err(malformed(format!(
                        "more than {limit} records share one change time; run `klantreis sync --full`"
                    )));
                }
                run.query_since = run.max_seen;
                run.next = PageState::Start;
                run.in_query = 0;
            }
        }
        let fetched = Fetched {
            records,
            run: run.clone(),
            done,
            total,
        };
        if tx.send(Ok(fetched)).await.is_err() || done {
            return Ok(());
        }
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The request for a listing's next page.
pub(crate) fn list_request(
    conn: &Connector,
    listing: &Listing,
    run: &RunState,
    page_size: u64,
) -> Result<Outgoing, ConnectorError> {
    let p = &listing.pagination;
    let mut ctx: Map<String, Value> = conn.base_context();
    ctx.insert("page_size".into(), page_size.into());
    let (cursor, offset, page) = match &run.next {
        PageState::Start => (
            None,
            (p.style == Style::Offset).then_some(0),
            (p.style == Style::Page).then_some(p.first_page),
        ),
        PageState::Cursor(c) => (Some(c.clone()), None, None),
        PageState::Offset(n) => (None, Some(*n), None),
        PageState::Page(n) => (None, None, Some(*n)),
        PageState::Url(_) => (None, None, None),
    };
    if let Some(c) = &cursor {
        ctx.insert("cursor".into(), c.clone().into());
    }
    if let Some(o) = offset {
        ctx.insert("offset".into(), o.into());
    }
    if let Some(n) = page {
        ctx.insert("page".into(), n.into());
    }
    if let Some(s) = run.query_since {
        ctx.insert("since".into(), crate::time::format(s).into());
        ctx.insert("since_ms".into(), s.timestamp_millis().to_string().into());
        ctx.insert("since_unix".into(), s.timestamp().to_string().into());
    }
    let ctx = minijinja::Value::from_serialize(&ctx);
    let shape = &listing.shape;
    let headers = conn.render_headers(&shape.headers, &ctx)?;
    if let PageState::Url(u) = &run.next {
        // A next-page URL carries everything (filters, cursor) and is followed as given.
        return Ok(Outgoing {
            method: reqwest::Method::GET,
            url: conn.url(u, &[])?,
            headers,
            body: None,
            idempotent: true,
        });
    }
    let path = conn.render(&shape.path, &ctx)?;
    let mut query = Vec::with_capacity(shape.query.len() + 1);
    for (k, t) in &shape.query {
        query.push((k.clone(), conn.render(t, &ctx)?));
    }
    if let Some(param) = &p.param {
        let value = match p.style {
            Style::Cursor => cursor,
            Style::Offset => offset.map(|o| o.to_string()),
            Style::Page => page.map(|n| n.to_string()),
            _ => None,
        };
        if let Some(v) = value {
            query.retain(|(k, _)| k != param);
            query.push((param.clone(), v));
        }
    }
    let body = match &shape.body {
        Some(t) => Some((
            shape.content_type.clone(),
            conn.render(t, &ctx)?.into_bytes(),
        )),
        None => None,
    };
    Ok(Outgoing {
        method: shape.method.clone(),
        url: conn.url(&path, &query)?,
        headers,
        body,
        // Listing changes nothing, so even a search POST may be repeated.
        idempotent: true,
    })
}

/// The position after a page, or `None` after the last one.
pub(crate) fn next_state(
    p: &Pagination,
    current: &PageState,
    body: &Value,
    headers: &reqwest::header::HeaderMap,
    n: u64,
    page_size: u64,
) -> Result<Option<PageState>, String> {
    Ok(match p.style {
        Style::None => None,
        Style::Cursor => {
            let next = p
                .next
                .as_ref()
                .and_then(|path| path.get(body))
                .and_then(scalar_string);
            match next {
                Some(c) if *current == PageState::Cursor(c.clone()) => {
                    return Err(format!(
                        "the next cursor {c:?} is the one just used; paging would never end"
                    ))
                }
                Some(c) => Some(PageState::Cursor(c)),
                None => None,
            }
        }
        Style::NextUrl => {
            let next = p
                .next
                .as_ref()
                .and_then(|path| path.get(body))
                .and_then(|v| v.as_str())
                .map(str::trim);
            match next {
                Some(u) if !u.is_empty() => {
                    if *current == PageState::Url(u.to_string()) {
                        return Err(
                            "the next-page link is the page just fetched; paging would never end"
                                .into(),
                        );
                    }
                    Some(PageState::Url(u.to_string()))
                }
                _ => None,
            }
        }
        Style::Offset => {
            let offset = match current {
                PageState::Offset(o) => *o,
                _ => 0,
            };
            let total = p.total.as_ref().and_then(|t| t.get(body)).and_then(as_u64);
            let next = offset + n;
            let more = match total {
                Some(t) => next < t && n > 0,
                None => n >= page_size && n > 0,
            };
            more.then_some(PageState::Offset(next))
        }
        Style::Page => {
            let page = match current {
                PageState::Page(x) => *x,
                _ => p.first_page,
            };
            let more = if n == 0 {
                false
            } else if let Some(total) = p
                .total_pages_header
                .as_ref()
                .and_then(|h| header_u64(headers, h))
            {
                page < total
            } else if headers.contains_key(reqwest::header::LINK) {
                link_next(headers).is_some()
            } else {
                n >= page_size
            };
            more.then_some(PageState::Page(page + 1))
        }
        Style::Link => link_next(headers).map(PageState::Url),
    })
}

#[cfg(test)]
mod tests {
    use super::super::path::JsonPath;
    use super::*;
    use serde_json::json;

    fn pag(style: Style) -> Pagination {
        Pagination {
            style,
            next: None,
            param: Some("p".into()),
            total: None,
            total_header: None,
            total_pages_header: None,
            first_page: 1,
        }
    }

    #[test]
    fn pagination_styles() {
        let h = reqwest::header::HeaderMap::new();
        let mut cursor = pag(Style::Cursor);
        cursor.next = Some(JsonPath::parse("paging.next.after").unwrap());
        let body = json!({"paging": {"next": {"after": "152"}}});
        assert_eq!(
            next_state(&cursor, &PageState::Start, &body, &h, 100, 100).unwrap(),
            Some(PageState::Cursor("152".into()))
        );
        assert!(next_state(
            &cursor,
            &PageState::Cursor("152".into()),
            &body,
            &h,
            100,
            100
        )
        .is_err());
        assert_eq!(
            next_state(&cursor, &PageState::Start, &json!({}), &h, 3, 100).unwrap(),
            None
        );

        let mut offset = pag(Style::Offset);
        offset.total = Some(JsonPath::parse("total_items").unwrap());
        let body = json!({"total_items": 250});
        assert_eq!(
            next_state(&offset, &PageState::Offset(100), &body, &h, 100, 100).unwrap(),
            Some(PageState::Offset(200))
        );
        assert_eq!(
            next_state(&offset, &PageState::Offset(200), &body, &h, 50, 100).unwrap(),
            None
        );

        let mut page = pag(Style::Page);
        page.total_pages_header = Some("X-WP-TotalPages".into());
        let mut wh = reqwest::header::HeaderMap::new();
        wh.insert("x-wp-totalpages", "3".parse().unwrap());
        assert_eq!(
            next_state(&page, &PageState::Start, &json!([]), &wh, 10, 10).unwrap(),
            Some(PageState::Page(2))
        );
        assert_eq!(
            next_state(&page, &PageState::Page(3), &json!([]), &wh, 10, 10).unwrap(),
            None
        );
        // Without the header: a short page is the last.
        assert_eq!(
            next_state(&page, &PageState::Page(2), &json!([]), &h, 4, 10).unwrap(),
            None
        );

        let mut lh = reqwest::header::HeaderMap::new();
        lh.insert(
            "link",
            r#"<https://x/c.json?page_info=abc>; rel="next""#.parse().unwrap(),
        );
        assert_eq!(
            next_state(&pag(Style::Link), &PageState::Start, &json!({}), &lh, 1, 1).unwrap(),
            Some(PageState::Url("https://x/c.json?page_info=abc".into()))
        );
    }

    #[test]
    fn state_round_trips() {
        let s = SyncState {
            since: crate::time::parse("2024-03-01T00:00:00Z"),
            run: Some(RunState {
                started: crate::time::parse("2024-03-02T00:00:00Z").unwrap(),
                incremental: true,
                query_since: None,
                next: PageState::Cursor("abc".into()),
                max_seen: None,
                in_query: 3,
            }),
            file: None,
        };
        let back: SyncState = serde_json::from_slice(&encode_state(&s)).unwrap();
        assert_eq!(back, s);
    }
}
