//! The file connector: a JSON Lines or CSV file in klantreis's import format
//! (exports, the demo data). Records are parsed by [`crate::import`]'s
//! `customer_from_json`, so a file means the same whether imported or synced; unlike
//! `klantreis import`, a sync joins on email like every connector, commits page by
//! page with its position, and skips a file that has not changed since the last
//! complete sync.
//!
//! Files are local and small next to an API, so they are read on the calling thread.

use super::identity::Resolver;
use super::instance::Connector;
use super::sync::{
    cursor_name, encode_state, load_state, FileStamp, InstanceReport, PageState, Progress,
    RunState, SyncOptions, SyncState,
};
use super::ConnectorError;
use crate::import::{customer_from_json, Format};
use crate::model::Customer;
use crate::store::Store;
use serde_json::{Map, Value};
use std::io::BufRead;

type Record = (String, Result<Customer, String>);

pub(crate) fn sync_file(
    conn: &Connector,
    store: &dyn Store,
    opts: &SyncOptions,
    progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    report: &mut InstanceReport,
) -> Result<(), ConnectorError> {
    let name = conn.name().to_string();
    let src = conn.0.file.as_ref().expect("file connectors have a path");
    let file_err = |message: String| ConnectorError::File {
        instance: name.clone(),
        message,
    };
    let meta = std::fs::metadata(&src.path)
        .map_err(|e| file_err(format!("cannot read {}: {e}", src.path.display())))?;
    let stamp = FileStamp {
        len: meta.len(),
        modified_ns: meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos()),
    };
    let state = load_state(store, &name)?;
    if !opts.full && state.run.is_none() && state.file.as_ref() == Some(&stamp) {
        report.source_unchanged = true;
        return Ok(());
    }
    let (skip, started) = match &state.run {
        Some(r) if !opts.full && state.file.as_ref() == Some(&stamp) => {
            report.resumed = true;
            let n = match r.next {
                PageState::Offset(n) => n,
                _ => 0,
            };
            (n, r.started)
        }
        _ => (0, conn.0.clock.now()),
    };
    let f = std::fs::File::open(&src.path)
        .map_err(|e| file_err(format!("cannot open {}: {e}", src.path.display())))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, f);
    let records: Box<dyn Iterator<Item = Record>> = match src.format {
        Format::Jsonl => Box::new(jsonl_records(reader)),
        Format::Csv => Box::new(csv_records(reader).map_err(file_err)?),
    };

    let key = cursor_name(&name);
    let mut resolver = Resolver::new(store, &conn.0.join, None, conn.tags_attribute());
    let page_size = conn.0.page_size.max(1) as usize;
    let mut index = 0u64;
    let mut page: Vec<Record> = Vec::with_capacity(page_size);
    let mut records = records.skip(skip as usize).peekable();
    index += skip;
    loop {
        page.clear();
        while page.len() < page_size {
            match records.next() {
                Some(r) => page.push(r),
                None => break,
            }
        }
        let done = records.peek().is_none();
        index += page.len() as u64;
        report.fetched += page.len() as u64;
        resolver.begin_page();
        let mut customers = Vec::with_capacity(page.len());
        for (place, r) in page.drain(..) {
            match r {
                Ok(mut c) => {
                    let email = c
                        .attributes
                        .get("email")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    c.id = resolver
                        .resolve_id(c.id.clone(), email.as_deref(), &c.attributes)
                        .map_err(|e| ConnectorError::store(&name, e))?;
                    customers.push(c);
                }
                Err(reason) => report.skip(&name, place, reason),
            }
        }
        let new_state = SyncState {
            since: None,
            run: (!done).then_some(RunState {
                started,
                incremental: false,
                query_since: None,
                next: PageState::Offset(index),
                max_seen: None,
                in_query: index,
            }),
            file: Some(stamp.clone()),
        };
        let stats = store
            .merge_page(customers, Some((&key, &encode_state(&new_state))))
            .map_err(|e| ConnectorError::store(&name, e))?;
        report.pages += 1;
        report.add(stats);
        progress(Progress {
            instance: &name,
            fetched: report.fetched,
            total: None,
        });
        if done {
            return Ok(());
        }
    }
}

fn jsonl_records(reader: impl BufRead) -> impl Iterator<Item = Record> {
    reader.lines().enumerate().filter_map(|(i, line)| {
        let place = format!("line {}", i + 1);
        match line {
            Err(e) => Some((place, Err(format!("cannot read: {e}")))),
            Ok(l) if l.trim().is_empty() => None,
            Ok(l) => {
                let r = serde_json::from_str::<Value>(&l)
                    .map_err(|e| format!("invalid JSON: {e}"))
                    .and_then(customer_from_json);
                Some((place, r))
            }
        }
    })
}

fn csv_records(reader: impl BufRead) -> Result<impl Iterator<Item = Record>, String> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(reader);
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| format!("reading CSV: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let Some(id_col) = headers.iter().position(|h| h == "id") else {
        return Err("the CSV header row has no \"id\" column".into());
    };
    Ok(rdr.into_records().map(move |rec| match rec {
        Err(e) => {
            let place = e
                .position()
                .map_or("a CSV row".to_string(), |p| format!("line {}", p.line()));
            (place, Err(e.to_string()))
        }
        Ok(rec) => {
            let place = rec
                .position()
                .map_or("a CSV row".to_string(), |p| format!("line {}", p.line()));
            let mut m = Map::new();
            for (i, cell) in rec.iter().enumerate() {
                if i == id_col {
                    m.insert("id".into(), Value::String(cell.trim().to_string()));
                } else if let Some(v) = crate::import::csv_value(cell) {
                    m.insert(headers[i].clone(), v);
                }
            }
            (place, customer_from_json(Value::Object(m)))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_import_records() {
        let text = "id,email,orders_count,consent_email,phone\nc1,A@b.nl,2,true,0612345678\n,x@y.z,1,false,\n";
        let recs: Vec<Record> = csv_records(std::io::Cursor::new(text)).unwrap().collect();
        let c = recs[0].1.as_ref().unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.attributes["orders_count"], serde_json::json!(2));
        assert_eq!(c.attributes["phone"], serde_json::json!("0612345678"));
        assert!(recs[1].1.is_err(), "a row without id is reported");
        assert_eq!(recs[1].0, "line 3");
        assert!(csv_records(std::io::Cursor::new("email\nx\n")).is_err());
    }
}
