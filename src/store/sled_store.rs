//! The embedded default backend, on sled.
//!
//! Trees:
//! - `customers`: customer id → [`Customer::encode`] record. Keys starting with NUL
//!   (ids never contain control characters) hold bookkeeping in the same tree, so one
//!   batch updates it atomically with the records: `\0count/{stripe}` (number of
//!   customers per lock stripe; the count is their sum),
//!   `\0email/{email}` → id (the identity index), `\0cursor/{name}` (sync cursors).
//! - `phases`: `s/{id}` → the customer's [`PhaseStates`]; `h/{id}\0{seq:be64}` → one
//!   [`Transition`]. States and their history share a tree so that one batch
//!   records both atomically. History keys are `h/{id}\0{at:be64}{seq:be64}`: time
//!   order first, so the order survives compaction. The outbox (`o/`, `q/`, `m/`)
//!   lives here too, so transitions and their actions are one batch; entries planned
//!   by a transition are embedded in its history record until the dispatcher first
//!   changes them: see `src/store/outbox.rs`.
//!
//! Merges are read-modify-write, serialised per customer by a striped lock; a batch
//! locks the stripes it touches in ascending order, so writers that partition their
//! work by [`SledStore::stripe_of`] run in parallel.
//!
//! sled acknowledges writes before they are on disk; callers that acknowledge
//! anything to the outside call [`Store::flush`] first.

use super::{
    normalize_email, validate_id, Funnel, MergeStats, PhaseUpdate, ScanItem, Store, StoreError,
};
use crate::model::{decode_states, encode_states, Customer, PhaseStates, Transition};
use std::collections::HashMap;
use std::path::Path;

use super::STRIPES;

fn count_key(stripe: usize) -> Vec<u8> {
    format!("\0count/{stripe:02}").into_bytes()
}

fn email_key(email: &str) -> Vec<u8> {
    let mut k = EMAIL_PREFIX.to_vec();
    k.extend_from_slice(normalize_email(email).as_bytes());
    k
}

/// Present while the email index misses records merged by [`Store::merge_bulk`].
const INDEX_STALE_KEY: &[u8] = b"\0email-index-stale";
const EMAIL_PREFIX: &[u8] = b"\0email/";

fn cursor_key(name: &str) -> Vec<u8> {
    let mut k = b"\0cursor/".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// The normalized email of a customer record, if it has one.
fn email_of(c: &Customer) -> Option<String> {
    c.attributes
        .get("email")
        .and_then(|v| v.as_str())
        .map(normalize_email)
        .filter(|e| !e.is_empty())
}

/// A store in a sled directory.
pub struct SledStore {
    // Crate-visible so that store extensions in sibling files (outbox, webhook
    // deliveries) can open their own trees and batch with these.
    pub(crate) db: sled::Db,
    pub(crate) customers: sled::Tree,
    pub(crate) phases: sled::Tree,
    /// Serialise read-modify-write merges of one customer (striped by id hash).
    pub(crate) stripes: Vec<parking_lot::Mutex<()>>,
}

fn new_stripes() -> Vec<parking_lot::Mutex<()>> {
    (0..STRIPES).map(|_| parking_lot::Mutex::new(())).collect()
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn state_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 2);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn history_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 11);
    k.extend_from_slice(b"h/");
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

impl SledStore {
    /// Opens (or creates) the store at `path` with a page cache of `cache_mb` MiB.
    pub fn open(path: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        recover_interrupted_compaction(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_mb.max(8) * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked {
                        path: path.display().to_string(),
                    }
                }
                e => backend(e),
            })?;
        let customers = db.open_tree("customers").map_err(backend)?;
        let phases = db.open_tree("phases").map_err(backend)?;
        Ok(Self {
            db,
            customers,
            phases,
            stripes: new_stripes(),
        })
    }

    /// A store in a fresh temporary directory that is removed when dropped (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(backend)?;
        let customers = db.open_tree("customers").map_err(backend)?;
        let phases = db.open_tree("phases").map_err(backend)?;
        Ok(Self {
            db,
            customers,
            phases,
            stripes: new_stripes(),
        })
    }

    /// Merges a batch under its stripes' locks. With `index` the email index is kept
    /// current; without (bulk imports) it is marked stale and rebuilt on next use.
    fn merge(
        &self,
        batch: Vec<Customer>,
        cursor: Option<(&str, &[u8])>,
        index: bool,
    ) -> Result<MergeStats, StoreError> {
        let mut touched = [false; STRIPES];
        for c in &batch {
            touched[Self::stripe_of(&c.id)] = true;
        }
        // Ascending order: two batches never wait for each other in a cycle.
        let _guards: Vec<_> = (0..STRIPES)
            .filter(|s| touched[*s])
            .map(|s| self.stripes[s].lock())
            .collect();
        let mut created = [0u64; STRIPES];
        let mut stats = MergeStats::default();
        // Customers touched by this batch, in first-seen order, with whether they
        // existed and changed, and the email they were indexed under before.
        let mut old_emails: HashMap<String, Option<String>> = HashMap::new();
        let mut pending: HashMap<String, (Customer, bool, bool)> =
            HashMap::with_capacity(batch.len());
        let mut order: Vec<String> = Vec::with_capacity(batch.len());
        for mut c in batch {
            validate_id(&c.id)?;
            if let Some((existing, _, changed)) = pending.get_mut(&c.id) {
                *changed |= existing.merge(c);
                continue;
            }
            match self.customers.get(c.id.as_bytes()).map_err(backend)? {
                Some(bytes) => {
                    let mut existing = Customer::decode(&bytes)?;
                    old_emails.insert(existing.id.clone(), email_of(&existing));
                    let changed = existing.merge(c);
                    order.push(existing.id.clone());
                    pending.insert(existing.id.clone(), (existing, true, changed));
                }
                None => {
                    c.normalize();
                    order.push(c.id.clone());
                    pending.insert(c.id.clone(), (c, false, true));
                }
            }
        }
        let mut batch = sled::Batch::default();
        for id in order {
            let (c, existed, changed) = &pending[&id];
            match (existed, changed) {
                (false, _) => {
                    stats.created += 1;
                    created[Self::stripe_of(&id)] += 1;
                }
                (true, true) => stats.updated += 1,
                (true, false) => {
                    stats.unchanged += 1;
                    continue;
                }
            }
            batch.insert(c.id.as_bytes(), c.encode());
            if !index {
                continue;
            }
            let new_email = email_of(c);
            let old_email = old_emails.get(&id).cloned().flatten();
            if new_email != old_email {
                if let Some(old) = old_email {
                    batch.remove(email_key(&old));
                }
            }
            if let Some(e) = new_email {
                batch.insert(email_key(&e), c.id.as_bytes());
            }
        }
        if !index && (stats.created > 0 || stats.updated > 0) {
            batch.insert(INDEX_STALE_KEY, &[1u8]);
        }
        if let Some((name, value)) = cursor {
            batch.insert(cursor_key(name), value);
        }
        for (stripe, n) in created.iter().enumerate().filter(|(_, n)| **n > 0) {
            let count = self.stripe_count(stripe)? + n;
            batch.insert(count_key(stripe), &count.to_be_bytes());
        }
        self.customers.apply_batch(batch).map_err(backend)?;
        Ok(stats)
    }

    /// Rebuilds the email index from the records, under every stripe lock.
    pub fn rebuild_email_index(&self) -> Result<u64, StoreError> {
        #[derive(serde::Deserialize)]
        struct EmailOnly {
            email: Option<serde_json::Value>,
        }
        let _guards: Vec<_> = self.stripes.iter().map(|s| s.lock()).collect();
        if !self
            .customers
            .contains_key(INDEX_STALE_KEY)
            .map_err(backend)?
        {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        for kv in self.customers.scan_prefix(EMAIL_PREFIX) {
            batch.remove(kv.map_err(backend)?.0);
        }
        self.customers.apply_batch(batch).map_err(backend)?;
        let mut batch = sled::Batch::default();
        let (mut pending, mut indexed) = (0, 0u64);
        for kv in self.customers.iter() {
            let (k, v) = kv.map_err(backend)?;
            if k.first() == Some(&0) {
                continue;
            }
            let rec: EmailOnly = rmp_serde::from_slice(&v)
                .map_err(|e| StoreError::Codec(crate::model::CodecError::Decode(e.to_string())))?;
            if let Some(serde_json::Value::String(e)) = rec.email {
                if !e.trim().is_empty() {
                    batch.insert(email_key(&e), k);
                    pending += 1;
                    indexed += 1;
                }
            }
            if pending == 10_000 {
                self.customers
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(backend)?;
                pending = 0;
            }
        }
        batch.remove(INDEX_STALE_KEY);
        self.customers.apply_batch(batch).map_err(backend)?;
        tracing::info!(
            indexed,
            secs = started.elapsed().as_secs_f64(),
            "rebuilt the email identity index after a bulk import"
        );
        Ok(indexed)
    }

    fn stripe_count(&self, stripe: usize) -> Result<u64, StoreError> {
        Ok(self
            .customers
            .get(count_key(stripe))
            .map_err(backend)?
            .map_or(0, |v| {
                u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
            }))
    }

    fn stripe_of(id: &str) -> usize {
        super::stripe_of(id)
    }

    /// Rewrites the store at `path` into a fresh directory and swaps it in, so that
    /// bytes of erased records (sled's log keeps them until segments are reused) are
    /// gone from disk. The store must not be open. Returns the size before and after.
    pub fn compact(path: &Path, cache_mb: u64) -> Result<(u64, u64), StoreError> {
        let before = dir_size(path);
        let tmp = sibling(path, "compacting");
        let old = sibling(path, "old");
        let _ = std::fs::remove_dir_all(&tmp);
        {
            let src = Self::open(path, cache_mb)?;
            let dst = sled::Config::new().path(&tmp).open().map_err(backend)?;
            dst.import(src.db.export());
            dst.flush().map_err(backend)?;
        }
        std::fs::rename(path, &old).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::remove_dir_all(&old).map_err(io)?;
        Ok((before, dir_size(path)))
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// A compaction stopped between its two renames leaves the store under `.old`: put
/// it back. A half-written `.compacting` copy is dropped.
fn recover_interrupted_compaction(path: &Path) -> Result<(), StoreError> {
    let old = sibling(path, "old");
    if !path.exists() && old.exists() {
        std::fs::rename(&old, path).map_err(io)?;
    } else if path.exists() && old.exists() {
        std::fs::remove_dir_all(&old).map_err(io)?;
    }
    let tmp = sibling(path, "compacting");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io)?;
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Store for SledStore {
    fn merge_page(
        &self,
        batch: Vec<Customer>,
        cursor: Option<(&str, &[u8])>,
    ) -> Result<MergeStats, StoreError> {
        self.merge(batch, cursor, true)
    }

    fn merge_bulk(&self, batch: Vec<Customer>) -> Result<MergeStats, StoreError> {
        self.merge(batch, None, false)
    }

    fn cursor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .customers
            .get(cursor_key(name))
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn id_for_email(&self, email: &str) -> Result<Option<String>, StoreError> {
        if self
            .customers
            .contains_key(INDEX_STALE_KEY)
            .map_err(backend)?
        {
            self.rebuild_email_index()?;
        }
        Ok(self
            .customers
            .get(email_key(email))
            .map_err(backend)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        if validate_id(id).is_err() {
            return Ok(None);
        }
        match self.customers.get(id.as_bytes()).map_err(backend)? {
            Some(bytes) => Ok(Some(Customer::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn customer_count(&self) -> Result<u64, StoreError> {
        (0..STRIPES).map(|s| self.stripe_count(s)).sum()
    }

    fn phase_states(&self, id: &str) -> Result<PhaseStates, StoreError> {
        match self.phases.get(state_key(id)).map_err(backend)? {
            Some(bytes) => Ok(decode_states(&bytes)?),
            None => Ok(PhaseStates::new()),
        }
    }

    fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        self.phases
            .scan_prefix(history_prefix(id))
            .map(|kv| {
                let (_, v) = kv.map_err(backend)?;
                Ok(Transition::decode(&v)?)
            })
            .collect()
    }

    fn scan(
        &self,
        chunk: usize,
        visit: &mut dyn FnMut(Vec<ScanItem>) -> bool,
    ) -> Result<(), StoreError> {
        let chunk = chunk.max(1);
        let mut states = self.phases.scan_prefix(b"s/").peekable();
        let mut buf = Vec::with_capacity(chunk);
        for kv in self.customers.iter() {
            let (k, v) = kv.map_err(backend)?;
            if k.first() == Some(&0) {
                continue;
            }
            // Merge-join with the states, which are in the same key order after "s/".
            let mut state = None;
            while let Some(next) = states.peek() {
                let (sk, _) = match next {
                    Ok(kv) => kv,
                    Err(_) => {
                        let e = states.next().expect("peeked").unwrap_err();
                        return Err(backend(e));
                    }
                };
                match sk[2..].cmp(&k[..]) {
                    std::cmp::Ordering::Less => {
                        states.next();
                    }
                    std::cmp::Ordering::Equal => {
                        let (_, sv) = states.next().expect("peeked").map_err(backend)?;
                        state = Some(sv.to_vec());
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            buf.push(ScanItem {
                id: String::from_utf8_lossy(&k).into_owned(),
                record: v.to_vec(),
                states: state,
            });
            if buf.len() == chunk && !visit(std::mem::replace(&mut buf, Vec::with_capacity(chunk)))
            {
                return Ok(());
            }
        }
        if !buf.is_empty() {
            visit(buf);
        }
        Ok(())
    }

    fn record_phases(&self, updates: &[PhaseUpdate]) -> Result<(), StoreError> {
        // Planned outbox entries join the same batch, most of them embedded in the
        // history record of the transition that planned them (see
        // src/store/outbox.rs); the guards hold the customers' locks until it is
        // applied.
        let (_guards, outbox) = self.prepare_outbox(updates)?;
        let mut batch = sled::Batch::default();
        for (i, u) in updates.iter().enumerate() {
            if u.states.is_empty() {
                batch.remove(state_key(&u.id));
            } else {
                batch.insert(state_key(&u.id), encode_states(&u.states));
            }
            let last = u.transitions.len().saturating_sub(1);
            for (j, t) in u.transitions.iter().enumerate() {
                let seq = self.db.generate_id().map_err(backend)?;
                let at = crate::time::unix_seconds(&t.at).unwrap_or(0);
                let mut key = history_prefix(&u.id);
                key.extend_from_slice(&at.to_be_bytes());
                key.extend_from_slice(&seq.to_be_bytes());
                batch.insert(key, outbox.history_value(i, t, j == last)?);
            }
        }
        outbox.finish(self, &mut batch)?;
        self.phases.apply_batch(batch).map_err(backend)
    }

    fn funnel(&self) -> Result<Funnel, StoreError> {
        let mut funnel = Funnel::new();
        for kv in self.phases.scan_prefix(b"s/") {
            let (_, v) = kv.map_err(backend)?;
            let states: PhaseStates = decode_states(&v)?;
            for (journey, s) in states {
                *funnel
                    .entry(journey)
                    .or_default()
                    .entry(s.phase)
                    .or_default() += 1;
            }
        }
        Ok(funnel)
    }

    fn forget(&self, id: &str) -> Result<bool, StoreError> {
        if validate_id(id).is_err() {
            return Ok(false);
        }
        let stripe = Self::stripe_of(id);
        let _guard = self.stripes[stripe].lock();
        let existing = self.customers.get(id.as_bytes()).map_err(backend)?;
        let existed = existing.is_some();
        let email = match existing {
            Some(bytes) => email_of(&Customer::decode(&bytes)?),
            None => None,
        };
        // Outbox entries (own keys, embedded copies, due keys and list members).
        let mut any_phase = self.forget_outbox_locked(id)? > 0;
        let mut phases = sled::Batch::default();
        phases.remove(state_key(id));
        for kv in self.phases.scan_prefix(history_prefix(id)) {
            let (k, _) = kv.map_err(backend)?;
            phases.remove(k);
            any_phase = true;
        }
        any_phase |= self.phases.contains_key(state_key(id)).map_err(backend)?;
        self.phases.apply_batch(phases).map_err(backend)?;
        if existed {
            let mut customers = sled::Batch::default();
            customers.remove(id.as_bytes());
            if let Some(e) = email {
                // Read the index directly: a stale index is rebuilt from records on
                // next use, and this record is gone by then.
                let indexed = self.customers.get(email_key(&e)).map_err(backend)?;
                if indexed.as_deref() == Some(id.as_bytes()) {
                    customers.remove(email_key(&e));
                }
            }
            let count = self.stripe_count(stripe)?.saturating_sub(1);
            customers.insert(count_key(stripe), &count.to_be_bytes());
            self.customers.apply_batch(customers).map_err(backend)?;
        }
        self.flush()?;
        Ok(existed || any_phase)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}
