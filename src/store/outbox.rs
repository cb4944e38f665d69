//! The outbox's storage: [`OutboxStore`], implemented for [`SledStore`].
//!
//! Entries live in the `phases` tree beside the phase states and history, so that
//! [`Store::record_phases`] writes a transition and the entries it plans in one
//! atomic batch:
//! - `o/{customer}\0{key}` → [`Entry`] (MessagePack);
//! - `q/{due:be64}{customer}\0{key}` → empty: the due index of entries that are
//!   still open (pending, scheduled, in flight); delayed triggers are simply
//!   entries due later, so they are durable timers that any run can fire;
//! - `m/code-secret` → 32 random bytes keying coupon codes (unguessable, yet the
//!   same code for the same idempotency key).

use super::{PhaseUpdate, SledStore, Store, StoreError};
use crate::outbox::Entry;

/// An entry planned with a transition, written by [`Store::record_phases`] in the
/// transition's batch.
#[derive(Debug, Clone)]
pub struct OutboxWrite {
    pub entry: Entry,
    /// Write only if no entry with this key exists (the re-entry policy and the
    /// exactly-once guarantee rest on this); checked under the customer's lock.
    pub only_new: bool,
}

/// Storage for outbox entries.
pub trait OutboxStore: Send + Sync {
    /// The same store as a plain [`Store`].
    fn as_store(&self) -> &dyn Store;
    /// One entry.
    fn outbox_get(&self, customer: &str, key: &str) -> Result<Option<Entry>, StoreError>;
    /// An entry by key alone (slow: scans; for the CLI).
    fn outbox_find(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// A customer's entries, in key order.
    fn outbox_of(&self, customer: &str) -> Result<Vec<Entry>, StoreError>;
    /// Open entries due at or before `until`, earliest first, at most `limit`.
    fn outbox_due(&self, until: i64, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// The earliest due time of an open entry.
    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError>;
    /// Visits every entry until `visit` returns false.
    fn outbox_scan(&self, visit: &mut dyn FnMut(Entry) -> bool) -> Result<(), StoreError>;
    /// Replaces `old` (as read) with `new` atomically, moving the due index along.
    fn outbox_put(&self, old: Option<&Entry>, new: &Entry) -> Result<(), StoreError>;
    /// Erases a customer's entries (`forget`).
    fn outbox_forget(&self, customer: &str) -> Result<u64, StoreError>;
    /// The per-store secret that keys coupon codes; created on first use.
    fn outbox_secret(&self) -> Result<Vec<u8>, StoreError>;
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn entry_key(customer: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(customer.len() + key.len() + 3);
    k.extend_from_slice(b"o/");
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn customer_prefix(customer: &str) -> Vec<u8> {
    let mut k = b"o/".to_vec();
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k
}

fn due_key(due: i64, customer: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(customer.len() + key.len() + 11);
    k.extend_from_slice(b"q/");
    // Flip the sign bit so negative times sort before positive ones.
    k.extend_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn due_of(k: &[u8]) -> i64 {
    let b: [u8; 8] = k[2..10].try_into().expect("due keys hold 8 bytes");
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

fn split_due(k: &[u8]) -> Option<(&str, &str)> {
    let rest = &k[10..];
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((
        std::str::from_utf8(&rest[..nul]).ok()?,
        std::str::from_utf8(&rest[nul + 1..]).ok()?,
    ))
}

const SECRET_KEY: &[u8] = b"m/code-secret";

impl SledStore {
    /// Adds planned entries to a `record_phases` batch. Entries marked `only_new` are
    /// left out when their key exists; the returned guards (the customers' stripe
    /// locks, taken in ascending order) must be held until the batch is applied, so
    /// two runs planning the same customer cannot both find the key absent.
    pub(crate) fn add_outbox_writes(
        &self,
        batch: &mut sled::Batch,
        updates: &[PhaseUpdate],
    ) -> Result<Vec<parking_lot::MutexGuard<'_, ()>>, StoreError> {
        if updates.iter().all(|u| u.outbox.is_empty()) {
            return Ok(Vec::new());
        }
        let mut touched = [false; super::STRIPES];
        for u in updates.iter().filter(|u| !u.outbox.is_empty()) {
            touched[super::stripe_of(&u.id)] = true;
        }
        let guards: Vec<_> = (0..super::STRIPES)
            .filter(|s| touched[*s])
            .map(|s| self.stripes[s].lock())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for u in updates {
            for w in &u.outbox {
                let e = &w.entry;
                let k = entry_key(&e.customer, &e.key);
                if w.only_new
                    && (!seen.insert(k.clone()) || self.phases.contains_key(&k).map_err(backend)?)
                {
                    continue;
                }
                batch.insert(k, e.encode());
                if e.state.is_open() {
                    batch.insert(due_key(e.due, &e.customer, &e.key), &[]);
                }
            }
        }
        Ok(guards)
    }
}

impl OutboxStore for SledStore {
    fn as_store(&self) -> &dyn Store {
        self
    }

    fn outbox_get(&self, customer: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        match self.phases.get(entry_key(customer, key)).map_err(backend)? {
            Some(v) => Ok(Some(Entry::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn outbox_find(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        for kv in self.phases.scan_prefix(b"o/") {
            let (k, v) = kv.map_err(backend)?;
            if k.len() > key.len() + 2
                && k.ends_with(key.as_bytes())
                && k[k.len() - key.len() - 1] == 0
            {
                return Ok(Some(Entry::decode(&v)?));
            }
        }
        Ok(None)
    }

    fn outbox_of(&self, customer: &str) -> Result<Vec<Entry>, StoreError> {
        self.phases
            .scan_prefix(customer_prefix(customer))
            .map(|kv| Ok(Entry::decode(&kv.map_err(backend)?.1)?))
            .collect()
    }

    fn outbox_due(&self, until: i64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.phases.scan_prefix(b"q/") {
            let (k, _) = kv.map_err(backend)?;
            if due_of(&k) > until || out.len() >= limit {
                break;
            }
            let Some((customer, key)) = split_due(&k) else {
                continue;
            };
            match self.outbox_get(customer, key)? {
                Some(e) if e.state.is_open() && e.due == due_of(&k) => out.push(e),
                // A stale index key (the entry moved on): drop it.
                _ => {
                    self.phases.remove(&k).map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .phases
            .scan_prefix(b"q/")
            .next()
            .transpose()
            .map_err(backend)?
            .map(|(k, _)| due_of(&k)))
    }

    fn outbox_scan(&self, visit: &mut dyn FnMut(Entry) -> bool) -> Result<(), StoreError> {
        for kv in self.phases.scan_prefix(b"o/") {
            let (_, v) = kv.map_err(backend)?;
            if !visit(Entry::decode(&v)?) {
                break;
            }
        }
        Ok(())
    }

    fn outbox_put(&self, old: Option<&Entry>, new: &Entry) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        if let Some(o) = old {
            if o.state.is_open() {
                batch.remove(due_key(o.due, &o.customer, &o.key));
            }
        }
        batch.insert(entry_key(&new.customer, &new.key), new.encode());
        if new.state.is_open() {
            batch.insert(due_key(new.due, &new.customer, &new.key), &[]);
        }
        self.phases.apply_batch(batch).map_err(backend)
    }

    fn outbox_forget(&self, customer: &str) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for e in self.outbox_of(customer)? {
            batch.remove(entry_key(&e.customer, &e.key));
            batch.remove(due_key(e.due, &e.customer, &e.key));
            n += 1;
        }
        self.phases.apply_batch(batch).map_err(backend)?;
        Ok(n)
    }

    fn outbox_secret(&self) -> Result<Vec<u8>, StoreError> {
        if let Some(v) = self.phases.get(SECRET_KEY).map_err(backend)? {
            return Ok(v.to_vec());
        }
        let fresh: [u8; 32] = rand::random();
        // Two first users race: whoever writes first wins, both read the winner.
        let _ = self
            .phases
            .compare_and_swap(SECRET_KEY, None as Option<&[u8]>, Some(&fresh[..]))
            .map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(self
            .phases
            .get(SECRET_KEY)
            .map_err(backend)?
            .map(|v| v.to_vec())
            .unwrap_or_else(|| fresh.to_vec()))
    }
}
