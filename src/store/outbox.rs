//! The outbox's storage: [`OutboxStore`], implemented for [`SledStore`].
//!
//! Entries live in the `phases` tree beside the phase states and history, so that
//! [`Store::record_phases`] writes a transition and the entries it plans in one
//! atomic batch. Planning must cost little beside the transition (sled pays per key
//! written), so an entry is stored in one of two places:
//! - **embedded**: entries planned by a transition are written *inside* that
//!   transition's history record `h/{customer}\0{at}{seq}` (the last transition of
//!   the customer's update in that batch): the record's MessagePack map gets one more
//!   field, `outbox`, first, holding the entries as planned. [`crate::model::Transition`]
//!   ignores the field, so history reads are unchanged. An embedded copy is never
//!   rewritten (only `forget` strips it), so it is found by every later check;
//! - **own key** `o/{customer}\0{key}` → [`Entry`]: written by
//!   [`OutboxStore::outbox_put`] whenever the dispatcher (or `retry`) changes an
//!   entry, and for planned entries that cannot be embedded (written with
//!   `only_new: false`, or without a transition). An `o/` key **shadows** an embedded
//!   copy with the same key: the `o/` value is the entry's current state.
//!
//! `only_new` is checked under the customers' stripe locks against both places: the
//! keys embedded in their history (read in one pass over a batch's neighbouring ids,
//! see `history_facts`), and the `o/` key only if they have history (without
//! history they have no `o/` keys; see `prepare_outbox`).
//!
//! The due index holds the entries that are still open (pending, scheduled, in
//! flight); delayed triggers are simply entries due later, so they are durable
//! timers that any run can fire:
//! - `q/{due:be64}\0{batch:be64}` → `customer\0key\0customer\0key\0...`: one list
//!   per `record_phases` batch and due time, naming every embedded entry that batch
//!   planned with that due (ids never contain control characters, so a list key is
//!   told apart from a single key by the NUL after the due time);
//! - `q/{due:be64}{customer}\0{key}` → empty: one key per entry whose due was set
//!   by `outbox_put` (retry backoff, quiet-hours deferral, the next occurrence, a
//!   retry by hand) or that was written under its own key by `record_phases`.
//!
//! An index member is live while its entry (as `outbox_get` reads it) is open and
//! still due at the key's time. `outbox_due` skips members that are not, removes
//! single keys and lists once nothing in them is live, and lists an entry once if
//! two keys name it; `outbox_next_due` skips (and removes) lists with nothing live.
//! A put that keeps an open entry open at the same due time (claiming it as in
//! flight) leaves the index alone; any other put into an open state writes a single
//! key, so a list member that went stale never needs to come back.
//!
//! Other keys: `m/code-secret` → 32 random bytes keying coupon codes (unguessable,
//! yet the same code for the same idempotency key).
//!
//! `forget` (both [`OutboxStore::outbox_forget`] and [`Store::forget`]) erases the
//! `o/` keys, strips embedded entries from history records and removes the customer
//! from every due key and list (it reads the whole due index to find them).

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
    /// Writes `new` only if no entry with its key exists, checked and written under
    /// the customer's lock (so a nurture planning the same key at the same moment
    /// cannot write it too). Returns whether it was written.
    fn outbox_put_new(&self, new: &Entry) -> Result<bool, StoreError>;
    /// Erases a customer's entries (`forget`).
    fn outbox_forget(&self, customer: &str) -> Result<u64, StoreError>;
    /// The per-store secret that keys coupon codes; created on first use.
    fn outbox_secret(&self) -> Result<Vec<u8>, StoreError>;
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Codec(crate::model::CodecError::Decode(e.to_string()))
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

fn due_prefix(due: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.extend_from_slice(b"q/");
    // Flip the sign bit so negative times sort before positive ones.
    k.extend_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    k
}

fn due_key(due: i64, customer: &str, key: &str) -> Vec<u8> {
    let mut k = due_prefix(due);
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn list_key(due: i64, batch: u64) -> Vec<u8> {
    let mut k = due_prefix(due);
    k.push(0);
    k.extend_from_slice(&batch.to_be_bytes());
    k
}

fn due_of(k: &[u8]) -> i64 {
    let b: [u8; 8] = k[2..10].try_into().expect("due keys hold 8 bytes");
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// Whether a due key is a batch's list (a NUL where a single key's id starts).
fn is_list(k: &[u8]) -> bool {
    k.get(10) == Some(&0)
}

fn split_due(k: &[u8]) -> Option<(&str, &str)> {
    let rest = &k[10..];
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((
        std::str::from_utf8(&rest[..nul]).ok()?,
        std::str::from_utf8(&rest[nul + 1..]).ok()?,
    ))
}

/// The (customer, key) members of a due list.
fn list_members(v: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    let mut parts = v.split(|b| *b == 0);
    std::iter::from_fn(move || loop {
        let c = parts.next()?;
        let k = parts.next()?;
        if let (Ok(c), Ok(k)) = (std::str::from_utf8(c), std::str::from_utf8(k)) {
            if !c.is_empty() {
                return Some((c, k));
            }
        }
    })
}

/// The customer id in an `o/` or `h/` key (between the prefix and the first NUL).
fn customer_of(k: &[u8]) -> &[u8] {
    let rest = &k[2..];
    &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
}

/// The field an embedding history record starts with: MessagePack `"outbox"`.
const MARK: &[u8] = b"\xa6outbox";

/// A history record (an encoded [`crate::model::Transition`], a MessagePack map)
/// with `entries` embedded as its first field, `outbox`.
fn embed(transition: &[u8], entries: &[&Entry]) -> Result<Vec<u8>, StoreError> {
    let mut rest = transition;
    let n = rmp::decode::read_map_len(&mut rest).map_err(corrupt)?;
    let mut out = Vec::with_capacity(transition.len() + 16 + 320 * entries.len());
    rmp::encode::write_map_len(&mut out, n + 1).map_err(corrupt)?;
    out.extend_from_slice(MARK);
    rmp::encode::write_array_len(&mut out, entries.len() as u32).map_err(corrupt)?;
    for e in entries {
        rmp_serde::encode::write_named(&mut out, *e).map_err(corrupt)?;
    }
    out.extend_from_slice(rest);
    Ok(out)
}

/// The entries embedded in a history record (none for most records).
fn embedded_in(record: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let mut rd = record;
    if rmp::decode::read_map_len(&mut rd).is_err() || !rd.starts_with(MARK) {
        return Ok(Vec::new());
    }
    rd = &rd[MARK.len()..];
    let n = rmp::decode::read_array_len(&mut rd).map_err(corrupt)?;
    (0..n)
        .map(|_| rmp_serde::from_read::<_, Entry>(&mut rd).map_err(corrupt))
        .collect()
}

fn has_embedded(record: &[u8]) -> bool {
    let mut rd = record;
    rmp::decode::read_map_len(&mut rd).is_ok() && rd.starts_with(MARK)
}

const SECRET_KEY: &[u8] = b"m/code-secret";

/// What a `record_phases` batch writes for the outbox, decided by
/// [`SledStore::prepare_outbox`] under the customers' locks.
#[derive(Default)]
pub(crate) struct OutboxPlan<'a> {
    /// Per update (by index): the entries embedded in its last transition's record.
    embedded: Vec<Vec<&'a Entry>>,
    /// Entries written under their own `o/` keys, with single due keys.
    own: Vec<&'a Entry>,
    /// Due time → the members of this batch's list for it.
    lists: std::collections::BTreeMap<i64, Vec<u8>>,
}

impl OutboxPlan<'_> {
    /// The value of update `i`'s history record for `t` (its last transition if
    /// `last`): the encoded transition, with the update's planned entries embedded.
    pub(crate) fn history_value(
        &self,
        i: usize,
        t: &crate::model::Transition,
        last: bool,
    ) -> Result<Vec<u8>, StoreError> {
        match self.embedded.get(i) {
            Some(entries) if last && !entries.is_empty() => embed(&t.encode(), entries),
            _ => Ok(t.encode()),
        }
    }

    /// Adds the `o/` keys and the due index to the batch.
    pub(crate) fn finish(
        self,
        store: &SledStore,
        batch: &mut sled::Batch,
    ) -> Result<(), StoreError> {
        for e in self.own {
            batch.insert(entry_key(&e.customer, &e.key), e.encode());
            if e.state.is_open() {
                batch.insert(due_key(e.due, &e.customer, &e.key), &[]);
            }
        }
        if !self.lists.is_empty() {
            let id = store.db.generate_id().map_err(backend)?;
            for (due, members) in self.lists {
                batch.insert(list_key(due, id), members);
            }
        }
        Ok(())
    }
}

impl SledStore {
    /// Decides which planned entries a `record_phases` batch writes, and where.
    /// Entries marked `only_new` are left out when an entry with their key exists
    /// (under its own key or embedded); the returned guards (the customers' stripe
    /// locks, taken in ascending order) must be held until the batch is applied, so
    /// two runs planning the same customer cannot both find the key absent.
    pub(crate) fn prepare_outbox<'a>(
        &self,
        updates: &'a [PhaseUpdate],
    ) -> Result<(Vec<parking_lot::MutexGuard<'_, ()>>, OutboxPlan<'a>), StoreError> {
        let mut plan = OutboxPlan::default();
        if updates.iter().all(|u| u.outbox.is_empty()) {
            return Ok((Vec::new(), plan));
        }
        let mut touched = [false; super::STRIPES];
        for u in updates {
            for w in &u.outbox {
                touched[super::stripe_of(&w.entry.customer)] = true;
            }
        }
        let guards: Vec<_> = (0..super::STRIPES)
            .filter(|s| touched[*s])
            .map(|s| self.stripes[s].lock())
            .collect();
        plan.embedded = vec![Vec::new(); updates.len()];
        let mut seen = std::collections::HashSet::new();
        // Per customer, read once: whether they have any history, and the keys of
        // their embedded entries.
        let mut known = self.history_facts(
            updates
                .iter()
                .flat_map(|u| u.outbox.iter())
                .filter(|w| w.only_new)
                .map(|w| w.entry.customer.as_str())
                .collect(),
        )?;
        for (i, u) in updates.iter().enumerate() {
            for w in &u.outbox {
                let e = &w.entry;
                if w.only_new {
                    if !seen.insert((e.customer.as_str(), e.key.as_str())) {
                        continue;
                    }
                    if !known.contains_key(e.customer.as_str()) {
                        let facts = self.embedded_keys_of(&e.customer)?;
                        known.insert(e.customer.as_str(), facts);
                    }
                    let (has_history, keys) = &known[e.customer.as_str()];
                    if keys.contains(&e.key) {
                        continue;
                    }
                    // A customer without history has no `o/` keys: those are written
                    // for entries a transition planned (recorded with it), by the
                    // dispatcher for such entries and their next occurrences, and
                    // `forget` erases them before the history. (Only a `record_phases`
                    // update without transitions writes `o/` keys without history;
                    // nurture never plans one, and a copy embedded later would be
                    // shadowed by that key, so no reader could see it.)
                    if *has_history
                        && self
                            .phases
                            .contains_key(entry_key(&e.customer, &e.key))
                            .map_err(backend)?
                    {
                        continue;
                    }
                }
                // Embedded only when the key is new (so no `o/` key shadows the copy)
                // and the list encoding holds (keys without NUL).
                if w.only_new
                    && e.customer == u.id
                    && !u.transitions.is_empty()
                    && !e.key.contains('\0')
                {
                    plan.embedded[i].push(e);
                    if e.state.is_open() {
                        let m = plan.lists.entry(e.due).or_default();
                        m.extend_from_slice(e.customer.as_bytes());
                        m.push(0);
                        m.extend_from_slice(e.key.as_bytes());
                        m.push(0);
                    }
                } else {
                    plan.own.push(e);
                }
            }
        }
        Ok((guards, plan))
    }

    /// Whether a customer has any history record, and the keys of the entries
    /// embedded in them.
    fn embedded_keys_of(&self, customer: &str) -> Result<(bool, Vec<String>), StoreError> {
        let mut any = false;
        let mut keys = Vec::new();
        for kv in self
            .phases
            .scan_prefix(super::sled_store::history_prefix(customer))
        {
            let (_, v) = kv.map_err(backend)?;
            any = true;
            if has_embedded(&v) {
                keys.extend(embedded_in(&v)?.into_iter().map(|e| e.key));
            }
        }
        Ok((any, keys))
    }

    /// [`SledStore::embedded_keys_of`] for many customers. A nurture batch holds a
    /// run of neighbouring ids, so one pass over the history between the first and
    /// the last of them is cheaper than a scan per customer (each sled scan pins and
    /// copies a leaf); if that range holds much more history than the customers
    /// own, the rest is read customer by customer.
    fn history_facts<'a>(
        &self,
        mut customers: Vec<&'a str>,
    ) -> Result<std::collections::HashMap<&'a str, (bool, Vec<String>)>, StoreError> {
        customers.sort_unstable();
        customers.dedup();
        let mut facts = std::collections::HashMap::with_capacity(customers.len());
        let mut next = 0; // customers[..next] are complete
        if customers.len() >= 8 {
            let lo = super::sled_store::history_prefix(customers[0]);
            let mut hi = super::sled_store::history_prefix(customers[customers.len() - 1]);
            *hi.last_mut().expect("a prefix ends in NUL") = 1;
            let budget = 4 * customers.len() + 256;
            let mut visited = 0;
            let mut current: Option<(&str, bool, Vec<String>)> = None;
            for kv in self.phases.range(lo..hi) {
                let (k, v) = kv.map_err(backend)?;
                visited += 1;
                if visited > budget {
                    // Too much history between them: finish the rest one by one.
                    current = None;
                    break;
                }
                let c = customer_of(&k);
                if current
                    .as_ref()
                    .is_some_and(|(cur, _, _)| cur.as_bytes() != c)
                {
                    let (cur, any, keys) = current.take().expect("checked");
                    facts.insert(cur, (any, keys));
                    next += 1;
                }
                if current.is_none() {
                    // Customers before this one have no history.
                    while next < customers.len() && customers[next].as_bytes() < c {
                        facts.insert(customers[next], (false, Vec::new()));
                        next += 1;
                    }
                    if next < customers.len() && customers[next].as_bytes() == c {
                        current = Some((customers[next], false, Vec::new()));
                    } else {
                        continue; // someone else's history
                    }
                }
                let (_, any, keys) = current.as_mut().expect("set above");
                *any = true;
                if has_embedded(&v) {
                    keys.extend(embedded_in(&v)?.into_iter().map(|e| e.key));
                }
            }
            if visited <= budget {
                if let Some((cur, any, keys)) = current.take() {
                    facts.insert(cur, (any, keys));
                    next += 1;
                }
                for c in &customers[next..] {
                    facts.insert(*c, (false, Vec::new()));
                }
                next = customers.len();
            }
        }
        for c in &customers[next..] {
            facts.insert(*c, self.embedded_keys_of(c)?);
        }
        Ok(facts)
    }

    /// A customer's embedded entries (current or shadowed by an `o/` key).
    fn embedded_of(&self, customer: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .phases
            .scan_prefix(super::sled_store::history_prefix(customer))
        {
            let (_, v) = kv.map_err(backend)?;
            if has_embedded(&v) {
                out.extend(embedded_in(&v)?);
            }
        }
        Ok(out)
    }

    /// Whether the entry a due-index member names is open and due at `due`.
    fn live(&self, customer: &str, key: &str, due: i64) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .outbox_get(customer, key)?
            .filter(|e| e.state.is_open() && e.due == due))
    }

    /// [`OutboxStore::outbox_forget`] with the customer's stripe lock held.
    pub(crate) fn forget_outbox_locked(&self, customer: &str) -> Result<u64, StoreError> {
        let n = self.outbox_of(customer)?.len() as u64;
        let mut batch = sled::Batch::default();
        let mut any = false;
        for kv in self.phases.scan_prefix(customer_prefix(customer)) {
            batch.remove(kv.map_err(backend)?.0);
            any = true;
        }
        // Embedded entries: rewrite the record as the bare transition.
        for kv in self
            .phases
            .scan_prefix(super::sled_store::history_prefix(customer))
        {
            let (k, v) = kv.map_err(backend)?;
            if has_embedded(&v) {
                let t = crate::model::Transition::decode(&v)?;
                batch.insert(k, t.encode());
                any = true;
            }
        }
        // Every due key and list that names the customer (stale ones too).
        for kv in self.phases.scan_prefix(b"q/") {
            let (k, v) = kv.map_err(backend)?;
            if is_list(&k) {
                if !list_members(&v).any(|(c, _)| c == customer) {
                    continue;
                }
                let mut rest = Vec::with_capacity(v.len());
                for (c, key) in list_members(&v).filter(|(c, _)| *c != customer) {
                    rest.extend_from_slice(c.as_bytes());
                    rest.push(0);
                    rest.extend_from_slice(key.as_bytes());
                    rest.push(0);
                }
                if rest.is_empty() {
                    batch.remove(k);
                } else {
                    batch.insert(k, rest);
                }
                any = true;
            } else if split_due(&k).is_some_and(|(c, _)| c == customer) {
                batch.remove(k);
                any = true;
            }
        }
        if any {
            self.phases.apply_batch(batch).map_err(backend)?;
        }
        Ok(n)
    }
}

impl OutboxStore for SledStore {
    fn as_store(&self) -> &dyn Store {
        self
    }

    fn outbox_get(&self, customer: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        if let Some(v) = self.phases.get(entry_key(customer, key)).map_err(backend)? {
            return Ok(Some(Entry::decode(&v)?));
        }
        Ok(self
            .embedded_of(customer)?
            .into_iter()
            .find(|e| e.key == key))
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
        // Not under its own key, so an embedded copy is current.
        for kv in self.phases.scan_prefix(b"h/") {
            let (_, v) = kv.map_err(backend)?;
            if has_embedded(&v) {
                if let Some(e) = embedded_in(&v)?.into_iter().find(|e| e.key == key) {
                    return Ok(Some(e));
                }
            }
        }
        Ok(None)
    }

    fn outbox_of(&self, customer: &str) -> Result<Vec<Entry>, StoreError> {
        let mut m = std::collections::BTreeMap::new();
        for kv in self.phases.scan_prefix(customer_prefix(customer)) {
            let e = Entry::decode(&kv.map_err(backend)?.1)?;
            m.insert(e.key.clone(), e);
        }
        for e in self.embedded_of(customer)? {
            m.entry(e.key.clone()).or_insert(e);
        }
        Ok(m.into_values().collect())
    }

    fn outbox_due(&self, until: i64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for kv in self.phases.scan_prefix(b"q/") {
            let (k, v) = kv.map_err(backend)?;
            let due = due_of(&k);
            if due > until || out.len() >= limit {
                break;
            }
            if is_list(&k) {
                let mut live = false;
                for (customer, key) in list_members(&v) {
                    if let Some(e) = self.live(customer, key, due)? {
                        live = true;
                        if listed.insert((customer.to_string(), key.to_string())) {
                            out.push(e);
                        }
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
                if !live {
                    // Every member moved on: drop the list (unless it changed since).
                    let _ = self
                        .phases
                        .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                        .map_err(backend)?;
                }
                continue;
            }
            let Some((customer, key)) = split_due(&k) else {
                continue;
            };
            match self.live(customer, key, due)? {
                Some(e) => {
                    if listed.insert((customer.to_string(), key.to_string())) {
                        out.push(e);
                    }
                }
                // A stale index key (the entry moved on): drop it.
                None => {
                    self.phases.remove(&k).map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        for kv in self.phases.scan_prefix(b"q/") {
            let (k, v) = kv.map_err(backend)?;
            if !is_list(&k) {
                return Ok(Some(due_of(&k)));
            }
            let due = due_of(&k);
            for (customer, key) in list_members(&v) {
                if self.live(customer, key, due)?.is_some() {
                    return Ok(Some(due));
                }
            }
            // A list whose members all moved on says nothing about what is due.
            let _ = self
                .phases
                .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                .map_err(backend)?;
        }
        Ok(None)
    }

    fn outbox_scan(&self, visit: &mut dyn FnMut(Entry) -> bool) -> Result<(), StoreError> {
        // Merge-join, customer by customer, the `o/` keys with the embedding history
        // records (both are in customer order after their prefixes).
        let mut own = self.phases.scan_prefix(b"o/");
        let mut hist = self
            .phases
            .scan_prefix(b"h/")
            .filter(|kv| kv.as_ref().map_or(true, |(_, v)| has_embedded(v)));
        let mut o_next = own.next().transpose().map_err(backend)?;
        let mut h_next = hist.next().transpose().map_err(backend)?;
        loop {
            let customer = match (&o_next, &h_next) {
                (None, None) => break,
                (Some((a, _)), None) => customer_of(a).to_vec(),
                (None, Some((b, _))) => customer_of(b).to_vec(),
                (Some((a, _)), Some((b, _))) => customer_of(a).min(customer_of(b)).to_vec(),
            };
            let mut m = std::collections::BTreeMap::new();
            while let Some((k, v)) = o_next.take() {
                if customer_of(&k) != customer.as_slice() {
                    o_next = Some((k, v));
                    break;
                }
                let e = Entry::decode(&v)?;
                m.insert(e.key.clone(), e);
                o_next = own.next().transpose().map_err(backend)?;
            }
            while let Some((k, v)) = h_next.take() {
                if customer_of(&k) != customer.as_slice() {
                    h_next = Some((k, v));
                    break;
                }
                for e in embedded_in(&v)? {
                    m.entry(e.key.clone()).or_insert(e);
                }
                h_next = hist.next().transpose().map_err(backend)?;
            }
            for e in m.into_values() {
                if !visit(e) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn outbox_put_new(&self, new: &Entry) -> Result<bool, StoreError> {
        let _guard = self.stripes[super::stripe_of(&new.customer)].lock();
        if self.outbox_get(&new.customer, &new.key)?.is_some() {
            return Ok(false);
        }
        self.outbox_put(None, new)?;
        Ok(true)
    }

    fn outbox_put(&self, old: Option<&Entry>, new: &Entry) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        // Open before and after at the same time (a claim): whatever indexed the old
        // entry (a list or its own key) indexes the new one.
        let same_index = old.is_some_and(|o| {
            o.state.is_open()
                && new.state.is_open()
                && o.due == new.due
                && o.customer == new.customer
                && o.key == new.key
        });
        if !same_index {
            if let Some(o) = old {
                if o.state.is_open() {
                    batch.remove(due_key(o.due, &o.customer, &o.key));
                }
            }
            if new.state.is_open() {
                batch.insert(due_key(new.due, &new.customer, &new.key), &[]);
            }
        }
        batch.insert(entry_key(&new.customer, &new.key), new.encode());
        self.phases.apply_batch(batch).map_err(backend)
    }

    fn outbox_forget(&self, customer: &str) -> Result<u64, StoreError> {
        let _guard = self.stripes[super::stripe_of(customer)].lock();
        self.forget_outbox_locked(customer)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PhaseState, PhaseStates, Transition};
    use crate::outbox::State;

    fn entry(customer: &str, key: &str, due: i64) -> Entry {
        Entry {
            key: key.into(),
            customer: customer.into(),
            action: "a".into(),
            journey: "j".into(),
            phase: "p".into(),
            phase_since: "2026-11-01T00:00:00Z".into(),
            trigger: "enter".into(),
            reason: "entered j p".into(),
            created_at: "2026-11-01T00:00:00Z".into(),
            due,
            state: State::Pending,
            attempts: 0,
            last_error: None,
            note: None,
            results: Default::default(),
            done_at: None,
            channel: None,
        }
    }

    fn update(customer: &str, entries: &[(&str, i64)]) -> PhaseUpdate {
        let mut states = PhaseStates::new();
        states.insert(
            "j".into(),
            PhaseState {
                phase: "p".into(),
                since: "2026-11-01T00:00:00Z".into(),
                flags: vec![],
            },
        );
        PhaseUpdate {
            id: customer.into(),
            states,
            transitions: vec![Transition {
                journey: "j".into(),
                from: None,
                to: Some("p".into()),
                at: "2026-11-01T00:00:00Z".into(),
                rules_version: "v1".into(),
                flags: vec!["f".into()],
            }],
            outbox: entries
                .iter()
                .map(|(k, due)| OutboxWrite {
                    entry: entry(customer, k, *due),
                    only_new: true,
                })
                .collect(),
        }
    }

    fn keys(s: &SledStore, prefix: &[u8]) -> usize {
        s.phases.scan_prefix(prefix).count()
    }

    fn all_keys(s: &SledStore) -> Vec<(String, State)> {
        let mut v = Vec::new();
        s.outbox_scan(&mut |e| {
            v.push((e.key, e.state));
            true
        })
        .unwrap();
        v
    }

    #[test]
    fn planned_entries_are_embedded_in_the_history_record_and_listed_per_batch() {
        let s = SledStore::temporary().unwrap();
        s.record_phases(&[
            update("c1", &[("k1", 100), ("k2", 200)]),
            update("c2", &[("k3", 100)]),
        ])
        .unwrap();
        // No own keys; one list per due time.
        assert_eq!(keys(&s, b"o/"), 0);
        assert_eq!(keys(&s, b"q/"), 2);
        // History reads as before.
        let h = s.history("c1").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].flags, vec!["f".to_string()]);
        assert_eq!(h[0], update("c1", &[]).transitions[0]);
        // Every reader sees the entries.
        assert_eq!(
            s.outbox_get("c1", "k2").unwrap().unwrap(),
            entry("c1", "k2", 200)
        );
        assert!(s.outbox_get("c1", "k3").unwrap().is_none());
        assert_eq!(
            s.outbox_of("c1").unwrap(),
            vec![entry("c1", "k1", 100), entry("c1", "k2", 200)]
        );
        assert_eq!(
            s.outbox_find("k3").unwrap().unwrap(),
            entry("c2", "k3", 100)
        );
        assert!(s.outbox_find("k4").unwrap().is_none());
        assert_eq!(
            all_keys(&s),
            vec![
                ("k1".into(), State::Pending),
                ("k2".into(), State::Pending),
                ("k3".into(), State::Pending)
            ]
        );
        assert_eq!(s.outbox_next_due().unwrap(), Some(100));
        let due: Vec<_> = s
            .outbox_due(150, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(due, vec!["k1", "k3"]);
        assert_eq!(s.outbox_due(300, 2).unwrap().len(), 2);
        assert_eq!(s.outbox_due(300, 10).unwrap().len(), 3);
    }

    #[test]
    fn planning_an_existing_key_again_writes_nothing() {
        let s = SledStore::temporary().unwrap();
        // Twice in one batch, then again in a later batch.
        s.record_phases(&[update("c1", &[("k1", 100), ("k1", 100)])])
            .unwrap();
        assert_eq!(s.outbox_of("c1").unwrap().len(), 1);
        s.record_phases(&[update("c1", &[("k1", 100)])]).unwrap();
        assert_eq!(all_keys(&s).len(), 1);
        assert_eq!(keys(&s, b"q/"), 1, "no second list for nothing new");
        // Also once the dispatcher moved it to its own key.
        let old = s.outbox_get("c1", "k1").unwrap().unwrap();
        let mut done = old.clone();
        done.state = State::Done;
        s.outbox_put(Some(&old), &done).unwrap();
        s.record_phases(&[update("c1", &[("k1", 100)])]).unwrap();
        assert_eq!(all_keys(&s), vec![("k1".into(), State::Done)]);
        assert!(s.outbox_due(1000, 10).unwrap().is_empty());
    }

    #[test]
    fn an_own_key_written_without_history_still_shadows_a_later_plan() {
        let s = SledStore::temporary().unwrap();
        let mut u = update("c1", &[("k1", 100)]);
        u.transitions.clear();
        s.record_phases(&[u]).unwrap();
        s.record_phases(&[update("c1", &[("k1", 200)])]).unwrap();
        assert_eq!(s.outbox_of("c1").unwrap(), vec![entry("c1", "k1", 100)]);
        assert_eq!(all_keys(&s).len(), 1);
        assert_eq!(s.outbox_due(150, 10).unwrap().len(), 1);
        assert_eq!(s.outbox_due(250, 10).unwrap().len(), 1);
        // With history, the own key is found and nothing is embedded.
        s.record_phases(&[update("c1", &[("k1", 300)])]).unwrap();
        assert_eq!(
            s.phases
                .scan_prefix(b"h/")
                .filter(|kv| has_embedded(&kv.as_ref().unwrap().1))
                .count(),
            1
        );
    }

    #[test]
    fn history_facts_for_many_customers_match_one_scan_each() {
        let s = SledStore::temporary().unwrap();
        let ids: Vec<String> = (0..40).map(|i| format!("c{i:02}")).collect();
        for (i, id) in ids.iter().enumerate() {
            match i % 3 {
                0 => s
                    .record_phases(&[update(id, &[(&format!("k{i}"), 100)])])
                    .unwrap(),
                1 => s.record_phases(&[update(id, &[])]).unwrap(),
                _ => {}
            }
        }
        // Lots of someone else's history between them (past the pass's budget).
        for _ in 0..400 {
            s.record_phases(&[update("c05x", &[])]).unwrap();
        }
        let check = |subset: Vec<&str>| {
            let facts = s.history_facts(subset.clone()).unwrap();
            let distinct: std::collections::HashSet<_> = subset.iter().collect();
            assert_eq!(facts.len(), distinct.len());
            for c in subset {
                assert_eq!(facts[c], s.embedded_keys_of(c).unwrap(), "{c}");
            }
        };
        check(ids.iter().map(String::as_str).collect());
        check(ids.iter().step_by(2).map(String::as_str).collect());
        check(ids.iter().skip(6).take(12).map(String::as_str).collect());
        check(ids.iter().skip(20).rev().map(String::as_str).collect());
        check(vec!["c00", "c05x", "c39", "c99", "b", "c00"]);
        let mut many: Vec<&str> = ids.iter().map(String::as_str).collect();
        many.push("c05x");
        check(many);
        assert!(s.embedded_keys_of("c03").unwrap().0);
        assert_eq!(s.embedded_keys_of("c03").unwrap().1, vec!["k3".to_string()]);
        assert_eq!(s.embedded_keys_of("c02").unwrap(), (false, vec![]));
    }

    #[test]
    fn concurrent_planners_write_an_entry_once() {
        let s = std::sync::Arc::new(SledStore::temporary().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.record_phases(&[update(&format!("c{i}"), &[("k", 100)])])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(all_keys(&s).len(), 50);
        assert_eq!(s.outbox_due(100, usize::MAX).unwrap().len(), 50);
    }

    #[test]
    fn the_dispatchers_puts_shadow_the_embedded_copy_and_move_the_index() {
        let s = SledStore::temporary().unwrap();
        s.record_phases(&[update("c1", &[("k1", 100), ("k2", 100)])])
            .unwrap();
        let k1 = s.outbox_get("c1", "k1").unwrap().unwrap();
        // Claimed: in flight at the same due, still listed (a restart repeats it).
        let mut claimed = k1.clone();
        claimed.state = State::InFlight;
        claimed.attempts = 1;
        s.outbox_put(Some(&k1), &claimed).unwrap();
        assert_eq!(keys(&s, b"q/"), 1, "a claim leaves the index alone");
        assert_eq!(s.outbox_get("c1", "k1").unwrap().unwrap(), claimed);
        assert_eq!(s.outbox_due(100, 10).unwrap()[0], claimed);
        // Retried later: listed at the new due only, once.
        let mut later = claimed.clone();
        later.state = State::Pending;
        later.due = 500;
        s.outbox_put(Some(&claimed), &later).unwrap();
        let due: Vec<_> = s
            .outbox_due(100, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(due, vec!["k2"]);
        let due: Vec<_> = s.outbox_due(600, 10).unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[1], later);
        // Both done: nothing due, and the list is gone.
        for e in due {
            let mut d = e.clone();
            d.state = State::Done;
            s.outbox_put(Some(&e), &d).unwrap();
        }
        assert_eq!(s.outbox_next_due().unwrap(), None);
        assert!(s.outbox_due(1000, 10).unwrap().is_empty());
        assert_eq!(keys(&s, b"q/"), 0);
        // Each entry once, in its current state.
        assert_eq!(
            all_keys(&s),
            vec![("k1".into(), State::Done), ("k2".into(), State::Done)]
        );
        assert_eq!(s.outbox_of("c1").unwrap().len(), 2);
        // A retry by hand indexes it again.
        let dead = s.outbox_get("c1", "k1").unwrap().unwrap();
        let mut again = dead.clone();
        again.state = State::Pending;
        again.due = 700;
        s.outbox_put(Some(&dead), &again).unwrap();
        assert_eq!(s.outbox_next_due().unwrap(), Some(700));
    }

    #[test]
    fn entries_without_a_transition_or_replacing_get_their_own_keys() {
        let s = SledStore::temporary().unwrap();
        let mut u = update("c1", &[("k1", 100)]);
        u.transitions.clear();
        s.record_phases(&[u]).unwrap();
        let mut u = update("c2", &[("k2", 100)]);
        u.outbox[0].only_new = false;
        s.record_phases(&[u]).unwrap();
        assert_eq!(keys(&s, b"o/"), 2);
        assert_eq!(s.outbox_due(100, 10).unwrap().len(), 2);
    }

    #[test]
    fn forget_leaves_no_trace_in_entries_history_or_index() {
        let s = SledStore::temporary().unwrap();
        s.record_phases(&[
            update("secret-id", &[("k1", 100), ("k2", 200)]),
            update("c2", &[("k3", 100)]),
        ])
        .unwrap();
        let k1 = s.outbox_get("secret-id", "k1").unwrap().unwrap();
        let mut later = k1.clone();
        later.due = 300;
        s.outbox_put(Some(&k1), &later).unwrap();
        assert_eq!(s.outbox_forget("secret-id").unwrap(), 2);
        assert!(s.outbox_of("secret-id").unwrap().is_empty());
        // The transition stays until `forget` (a customer's history is its own).
        assert_eq!(s.history("secret-id").unwrap().len(), 1);
        let mut left = 0;
        for kv in s.phases.iter() {
            let (k, v) = kv.unwrap();
            let hay = [&k[..], &v[..]].concat();
            if hay.windows(9).any(|w| w == b"secret-id")
                && !k.starts_with(b"h/")
                && !k.starts_with(b"s/")
            {
                left += 1;
            }
        }
        assert_eq!(left, 0);
        // The other customer is still due.
        assert_eq!(
            s.outbox_due(1000, 10).unwrap(),
            vec![entry("c2", "k3", 100)]
        );
        s.forget("secret-id").unwrap();
        for kv in s.phases.iter() {
            let (k, v) = kv.unwrap();
            let hay = [&k[..], &v[..]].concat();
            assert!(!hay.windows(9).any(|w| w == b"secret-id"), "{k:?}");
        }
    }

    #[test]
    fn store_forget_alone_erases_the_outbox_too() {
        let s = SledStore::temporary().unwrap();
        s.record_phases(&[
            update("secret-id", &[("k1", 100)]),
            update("c2", &[("k3", 100)]),
        ])
        .unwrap();
        assert!(s.forget("secret-id").unwrap());
        for kv in s.phases.iter() {
            let (k, v) = kv.unwrap();
            let hay = [&k[..], &v[..]].concat();
            assert!(!hay.windows(9).any(|w| w == b"secret-id"), "{k:?}");
        }
        assert_eq!(s.outbox_due(1000, 10).unwrap().len(), 1);
    }
}
