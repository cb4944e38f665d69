//! Importing customers from JSON Lines or CSV into a store. Parsing runs on all
//! cores while the previous chunk is merged into the store; a malformed line is
//! reported with its line number and skipped.

use crate::model::{Customer, Event, RESERVED_ATTRIBUTES};
use crate::store::{MergeStats, Store, StoreError};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};
use std::io::BufRead;

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    /// `.csv` files are CSV; everything else is JSON Lines.
    pub fn from_path(path: &str) -> Format {
        if path.to_ascii_lowercase().ends_with(".csv") {
            Format::Csv
        } else {
            Format::Jsonl
        }
    }
}

/// Errors that stop an import (as opposed to a bad line, which is skipped).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    #[error("reading CSV: {0}")]
    Csv(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A line that could not be imported.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LineError {
    pub line: u64,
    pub error: String,
}

/// What an import did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ImportReport {
    /// Customers read without error.
    pub customers: u64,
    #[serde(flatten)]
    pub stats: MergeStats,
    /// Lines skipped.
    pub errors: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<LineError>,
}

const MAX_ERROR_SAMPLES: usize = 100;
const CHUNK_LINES: usize = 4096;

impl ImportReport {
    fn error(&mut self, line: u64, error: String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(LineError { line, error });
        }
    }
}

/// Builds a customer from one JSON object in the import format.
pub fn customer_from_json(v: Value) -> Result<Customer, String> {
    let Value::Object(mut m) = v else {
        return Err("expected a JSON object with an \"id\"".into());
    };
    let id = match m.remove("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        None => return Err("missing \"id\"".into()),
        Some(_) => return Err("\"id\" must be a non-empty string or a number".into()),
    };
    if id.chars().any(char::is_control) {
        return Err("\"id\" contains control characters".into());
    }
    let events = match m.remove("events") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .enumerate()
            .map(|(i, e)| event_from_json(e).map_err(|err| format!("events[{i}]: {err}")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("\"events\" must be an array".into()),
    };
    if let Some(k) = RESERVED_ATTRIBUTES.iter().find(|k| m.contains_key(**k)) {
        return Err(format!(
            "{k:?} is reserved: phases are decided by the rules, not imported"
        ));
    }
    let mut c = Customer {
        id,
        attributes: m,
        events,
    };
    c.normalize();
    Ok(c)
}

/// Builds an event from `{kind, at, data}`; `at` is RFC 3339 or unix seconds.
pub fn event_from_json(v: Value) -> Result<Event, String> {
    let Value::Object(mut m) = v else {
        return Err("an event must be an object {kind, at, data}".into());
    };
    let kind = match m.remove("kind") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err("\"kind\" must be a non-empty string".into()),
    };
    let at = match m.remove("at") {
        Some(Value::String(s)) => {
            crate::time::parse(&s)
                .map(crate::time::format)
                .ok_or_else(|| {
                    format!("\"at\" {s:?} is not an RFC 3339 time such as 2026-11-01T10:00:00Z")
                })?
        }
        Some(Value::Number(n)) => {
            let secs = n.as_i64().ok_or("\"at\" must be whole unix seconds")?;
            let t = chrono::DateTime::from_timestamp(secs, 0).ok_or("\"at\" is out of range")?;
            crate::time::format(t)
        }
        _ => return Err("\"at\" is required (an RFC 3339 time or unix seconds)".into()),
    };
    let data = match m.remove("data") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(o)) => Value::Object(o),
        Some(_) => return Err("\"data\" must be an object".into()),
    };
    if let Some(k) = m.keys().next() {
        return Err(format!(
            "unknown event key {k:?} (events have kind, at and data)"
        ));
    }
    Ok(Event { kind, at, data })
}

/// A CSV cell as a JSON value: integers, floats and booleans are typed; empty cells
/// are left out; everything else is a string.
pub fn csv_value(cell: &str) -> Option<Value> {
    let s = cell.trim();
    if s.is_empty() {
        return None;
    }
    // "0612345678" (a phone number, a zip code) stays text; "0.5" is a number.
    let digits = s.strip_prefix('-').unwrap_or(s);
    let leading_zero = digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.");
    if leading_zero {
        return Some(Value::String(s.to_string()));
    }
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::from(i));
    }
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite()
            && s.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
        {
            return Some(Value::from(f));
        }
    }
    match s.to_ascii_lowercase().as_str() {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        _ => Some(Value::String(s.to_string())),
    }
}

type Parsed = Vec<(u64, Result<Customer, String>)>;

/// Imports customers from `input`. `progress` receives the bytes read so far.
///
/// The calling thread reads and hands chunks of lines to all cores for parsing;
/// writer threads (one per core) merge them into the store, each owning the customers
/// of its own lock stripes, so a customer's lines are merged in input order.
pub fn import(
    store: &dyn Store,
    input: impl BufRead,
    format: Format,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ImportReport, ImportError> {
    let writers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..writers)
        .map(|_| crossbeam_channel::bounded::<Parsed>(2))
        .unzip();
    std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .map(|rx| {
                scope.spawn(move || -> Result<ImportReport, ImportError> {
                    let mut report = ImportReport::default();
                    for chunk in rx {
                        let mut batch = Vec::with_capacity(chunk.len());
                        for (line, r) in chunk {
                            match r {
                                Ok(c) => batch.push(c),
                                Err(e) => report.error(line, e),
                            }
                        }
                        report.customers += batch.len() as u64;
                        if !batch.is_empty() {
                            report.stats.add(store.merge_bulk(batch)?);
                        }
                    }
                    Ok(report)
                })
            })
            .collect();
        let fan_out = |parsed: Parsed| -> bool {
            let mut parts: Vec<Parsed> = (0..writers)
                .map(|_| Vec::with_capacity(parsed.len() / writers + 1))
                .collect();
            for (line, r) in parsed {
                let w = match &r {
                    Ok(c) => crate::store::stripe_of(&c.id) % writers,
                    Err(_) => 0,
                };
                parts[w].push((line, r));
            }
            parts
                .into_iter()
                .zip(&txs)
                .all(|(p, tx)| p.is_empty() || tx.send(p).is_ok())
        };
        let read = match format {
            Format::Jsonl => read_jsonl(input, &fan_out, progress),
            Format::Csv => read_csv(input, &fan_out, progress),
        };
        drop(txs);
        let mut report = ImportReport::default();
        let mut failure = None;
        for h in handles {
            match h.join().expect("an import writer panicked") {
                Ok(r) => {
                    report.customers += r.customers;
                    report.stats.add(r.stats);
                    report.errors += r.errors;
                    report.error_samples.extend(r.error_samples);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        read?;
        report.error_samples.sort_by_key(|e| e.line);
        report.error_samples.truncate(MAX_ERROR_SAMPLES);
        store.flush()?;
        Ok(report)
    })
}

fn read_jsonl(
    mut input: impl BufRead,
    send: &dyn Fn(Parsed) -> bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), ImportError> {
    let mut line_no = 0u64;
    let mut bytes = 0u64;
    loop {
        let mut lines: Vec<(u64, String)> = Vec::with_capacity(CHUNK_LINES);
        let mut buf = String::new();
        while lines.len() < CHUNK_LINES {
            buf.clear();
            let n = input.read_line(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            line_no += 1;
            if !buf.trim().is_empty() {
                lines.push((line_no, std::mem::take(&mut buf)));
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        let parsed: Parsed = lines
            .into_par_iter()
            .map(|(n, l)| {
                let r = serde_json::from_str::<Value>(&l)
                    .map_err(|e| format!("invalid JSON: {e}"))
                    .and_then(customer_from_json);
                (n, r)
            })
            .collect();
        if !send(parsed) {
            return Ok(()); // a writer failed; its error is reported
        }
        progress(bytes);
    }
}

fn read_csv(
    input: impl BufRead,
    send: &dyn Fn(Parsed) -> bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), ImportError> {
    let mut rdr = csv::ReaderBuilder::new().flexible(false).from_reader(input);
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| ImportError::Csv(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let Some(id_col) = headers.iter().position(|h| h == "id") else {
        return Err(ImportError::Csv(
            "the header row has no \"id\" column".into(),
        ));
    };
    let mut chunk: Parsed = Vec::with_capacity(CHUNK_LINES);
    let mut rec = csv::StringRecord::new();
    loop {
        let line;
        let r = match rdr.read_record(&mut rec).map(|more| more.then_some(&rec)) {
            Ok(None) => break,
            Err(e) => {
                line = e.position().map_or(0, |p| p.line());
                Err(e.to_string())
            }
            Ok(Some(rec)) => {
                line = rec.position().map_or(0, |p| p.line());
                let mut m = Map::new();
                let mut id = String::new();
                for (i, cell) in rec.iter().enumerate() {
                    if i == id_col {
                        id = cell.trim().to_string();
                    } else if let Some(v) = csv_value(cell) {
                        m.insert(headers[i].clone(), v);
                    }
                }
                m.insert("id".into(), Value::String(id));
                customer_from_json(Value::Object(m))
            }
        };
        chunk.push((line, r));
        if chunk.len() == CHUNK_LINES {
            if !send(std::mem::take(&mut chunk)) {
                return Ok(());
            }
            progress(rdr.position().byte());
        }
    }
    if !chunk.is_empty() {
        send(chunk);
    }
    progress(rdr.position().byte());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_customer_follows_the_import_format() {
        let c = customer_from_json(json!({"id": "c1", "email": "a@b.nl", "orders_count": 2, "tags": ["vip"],
            "events": [{"kind": "order_created", "at": "2026-11-01T11:00:00+01:00", "data": {"total": 59.5}}]}))
        .unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.attributes.len(), 3);
        assert_eq!(c.events[0].at, "2026-11-01T10:00:00Z");
        assert!(customer_from_json(json!({"email": "x"}))
            .unwrap_err()
            .contains("id"));
        assert!(customer_from_json(json!({"id": "c1", "phase": "koop"}))
            .unwrap_err()
            .contains("reserved"));
        assert!(customer_from_json(
            json!({"id": "c1", "events": [{"kind": "x", "at": "yesterday"}]})
        )
        .unwrap_err()
        .contains("events[0]"));
    }

    #[test]
    fn csv_cells_are_typed() {
        assert_eq!(csv_value("2"), Some(json!(2)));
        assert_eq!(csv_value("59.5"), Some(json!(59.5)));
        assert_eq!(csv_value("TRUE"), Some(json!(true)));
        assert_eq!(csv_value("0612345678"), Some(json!("0612345678")));
        assert_eq!(csv_value("vip, new"), Some(json!("vip, new")));
        assert_eq!(csv_value(" "), None);
    }
}
