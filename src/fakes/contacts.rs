//! Seed data shared by the fakes: [`Contact`]s in a [`ContactBook`] that several fake
//! servers can serve at once, and that tests change between syncs.
//!
//! The book keeps contacts sorted by id, plus an index by `(updated_at, id)` rebuilt
//! lazily after a change, so a page costs a binary search and a slice, never a scan.
//! Filtered, ordered lists of positions are cached per book version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockUpgradableReadGuard, RwLockWriteGuard};
use serde::{Deserialize, Serialize};

use super::util::{md5_hex, mix, trunc_millis};
use crate::clock::{SharedClock, SystemClock};

/// Email-marketing consent, mapped onto each vendor's own vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    Subscribed,
    Unsubscribed,
    Pending,
    NotSubscribed,
}

/// A person as the fakes know them. Each vendor derives its own id from `id`
/// (HubSpot `"<id>"`, Shopify `shopify::customer_id(id)`, Klaviyo
/// `klaviyo::profile_id(id)`, Mailchimp the subscriber hash of `email`, WooCommerce and
/// SuperOffice `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub id: u64,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub phone: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub tags: Vec<String>,
    pub consent: Consent,
    /// HubSpot `lifecyclestage` (`subscriber`, `lead`, ..., `customer`).
    pub lifecycle_stage: String,
    /// Other properties (HubSpot PATCH writes unknown properties here).
    pub properties: BTreeMap<String, String>,
}

impl Contact {
    /// A subscribed lead created and updated at `at`.
    pub fn new(id: u64, email: &str, first_name: &str, last_name: &str, at: DateTime<Utc>) -> Self {
        Self {
            id,
            email: email.to_string(),
            first_name: first_name.to_string(),
            last_name: last_name.to_string(),
            phone: None,
            created_at: at,
            updated_at: at,
            tags: Vec::new(),
            consent: Consent::Subscribed,
            lifecycle_stage: "lead".to_string(),
            properties: BTreeMap::new(),
        }
    }

    /// `first last`, or whichever is present.
    pub fn full_name(&self) -> String {
        match (self.first_name.is_empty(), self.last_name.is_empty()) {
            (false, false) => format!("{} {}", self.first_name, self.last_name),
            (false, true) => self.first_name.clone(),
            _ => self.last_name.clone(),
        }
    }

    /// Mailchimp's subscriber hash: MD5 of the lower-cased email, lowercase hex (B2).
    pub fn subscriber_hash(&self) -> String {
        subscriber_hash(&self.email)
    }
}

/// MD5 of the lower-cased email, lowercase hex (Mailchimp B2).
pub fn subscriber_hash(email: &str) -> String {
    md5_hex(email.trim().to_lowercase().as_bytes())
}

const FIRST: &[&str] = &[
    "Ann", "Bram", "Chloé", "Daan", "Eva", "Finn", "Greta", "Hugo", "Iris", "Jan", "Kim", "Lotte",
    "Mila", "Noah", "Olga", "Pieter", "Quinn", "Rosa", "Sven", "Tess", "Urist", "Vera", "Willem",
    "Xandra", "Yara", "Zoë", "José", "Åsa", "Mohammed", "Mei", "Sanne", "Jesse", "Fleur", "Luuk",
    "Noor", "Sophie",
];
const LAST: &[&str] = &[
    "Lee",
    "de Vries",
    "Jansen",
    "Bakker",
    "Visser",
    "Smit",
    "Meijer",
    "de Boer",
    "Mulder",
    "Bos",
    "Vos",
    "Peters",
    "Hendriks",
    "van Leeuwen",
    "Dekker",
    "Brouwer",
    "Müller",
    "O'Brien",
    "Ørsted",
    "García",
    "Dubois",
    "Nowak",
    "Kowalski",
    "Yılmaz",
    "Chen",
    "Nguyen",
    "van den Berg",
    "McVankab",
    "Janssens",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "example.net",
    "mail.example",
    "shop.example",
];
const TAGS: &[&str] = &[
    "vip",
    "newsletter",
    "wholesale",
    "returning",
    "eu",
    "nl",
    "reviewer",
    "b2b",
];
const STAGES: &[&str] = &[
    "subscriber",
    "lead",
    "marketingqualifiedlead",
    "salesqualifiedlead",
    "opportunity",
    "customer",
    "evangelist",
];

/// The first generated id; ids are not positions, so code that confuses them fails.
pub const FIRST_GENERATED_ID: u64 = 1001;

/// `n` realistic contacts, the same for the same `seed`: ids from 1001, unique emails
/// (every 7th with capitals in it, to exercise lower-casing), names with diacritics
/// and apostrophes, creation spread over 2023, updates up to a year later (all
/// before 2025, whole seconds), tags, phones, consents and lifecycle stages.
pub fn generate_contacts(n: usize, seed: u64) -> Vec<Contact> {
    let start = Utc
        .with_ymd_and_hms(2023, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    let span = 365 * 86_400i64;
    (0..n)
        .map(|i| {
            let r = |k: u64| mix(seed ^ mix(i as u64 * 16 + k));
            let id = FIRST_GENERATED_ID + i as u64;
            let first = FIRST[(r(1) % FIRST.len() as u64) as usize];
            let last = LAST[(r(2) % LAST.len() as u64) as usize];
            let domain = DOMAINS[(r(3) % DOMAINS.len() as u64) as usize];
            let local = format!("{}.{}.{}", ascii_fold(first), ascii_fold(last), id);
            let email = if i % 7 == 3 {
                let mut cs = local.chars();
                let head: String = cs
                    .next()
                    .map(|c| c.to_ascii_uppercase())
                    .into_iter()
                    .collect();
                format!("{head}{}@{}", cs.as_str(), domain.to_uppercase())
            } else {
                format!("{local}@{domain}")
            };
            let created_off =
                if n > 1 { span * i as i64 / n as i64 } else { 0 } + (r(4) % 600) as i64;
            let created_at = start + Duration::seconds(created_off);
            let updated_at = created_at + Duration::seconds((r(5) % (span as u64)) as i64);
            let tags = TAGS
                .iter()
                .enumerate()
                .filter(|(k, _)| r(10 + *k as u64) % 5 == 0)
                .map(|(_, t)| t.to_string())
                .collect();
            let consent = match r(6) % 20 {
                0..=11 => Consent::Subscribed,
                12..=14 => Consent::Unsubscribed,
                15 => Consent::Pending,
                _ => Consent::NotSubscribed,
            };
            let phone = (r(7) % 3 != 0).then(|| format!("+316{:08}", r(8) % 100_000_000));
            Contact {
                id,
                email,
                first_name: first.to_string(),
                last_name: last.to_string(),
                phone,
                created_at,
                updated_at,
                tags,
                consent,
                lifecycle_stage: STAGES[(r(9) % STAGES.len() as u64) as usize].to_string(),
                properties: BTreeMap::new(),
            }
        })
        .collect()
}

fn ascii_fold(s: &str) -> String {
    s.chars()
        .filter_map(|c| match c {
            'é' | 'è' | 'ë' => Some('e'),
            'ü' => Some('u'),
            'ø' | 'Ø' => Some('o'),
            'å' | 'Å' => Some('a'),
            'ı' => Some('i'),
            'í' => Some('i'),
            'ç' => Some('c'),
            c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A shared, mutable set of contacts. Cloning gives another handle to the same book,
/// so one book can back several fakes (HubSpot and Shopify serving the same people).
#[derive(Clone)]
pub struct ContactBook {
    inner: Arc<RwLock<Book>>,
}

impl std::fmt::Debug for ContactBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactBook")
            .field("len", &self.len())
            .finish()
    }
}

impl Default for ContactBook {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

pub(crate) struct Book {
    contacts: Vec<Contact>,
    by_updated: Vec<u32>,
    by_email: HashMap<String, u64>,
    dirty: bool,
    version: u64,
    clock: SharedClock,
    cache: Mutex<HashMap<String, Arc<Vec<u32>>>>,
}

/// Read access with a fresh index; held while a page is rendered.
pub(crate) type BookRead<'a> = RwLockReadGuard<'a, Book>;

impl ContactBook {
    /// A book holding `contacts` (duplicates by id: the last wins).
    pub fn new(contacts: Vec<Contact>) -> Self {
        let mut book = Book {
            contacts: Vec::new(),
            by_updated: Vec::new(),
            by_email: HashMap::new(),
            dirty: true,
            version: 0,
            clock: Arc::new(SystemClock),
            cache: Mutex::new(HashMap::new()),
        };
        let mut contacts = contacts;
        contacts.sort_by_key(|c| c.id);
        contacts.reverse();
        contacts.dedup_by_key(|c| c.id);
        contacts.reverse();
        for c in &contacts {
            book.by_email.insert(c.email.to_lowercase(), c.id);
        }
        book.contacts = contacts;
        Self {
            inner: Arc::new(RwLock::new(book)),
        }
    }

    /// `n` generated contacts ([`generate_contacts`] with seed 42).
    pub fn generate(n: usize) -> Self {
        Self::new(generate_contacts(n, 42))
    }

    /// Uses `clock` for the `updated_at` of later changes (default: the system clock).
    pub fn set_clock(&self, clock: SharedClock) {
        self.inner.write().clock = clock;
    }

    /// The time the next change will carry (milliseconds precision).
    pub fn now(&self) -> DateTime<Utc> {
        trunc_millis(self.inner.read().clock.now())
    }

    pub fn len(&self) -> usize {
        self.inner.read().contacts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Incremented by every change.
    pub fn version(&self) -> u64 {
        self.inner.read().version
    }

    pub fn get(&self, id: u64) -> Option<Contact> {
        self.inner.read().get(id).cloned()
    }

    /// Looks a contact up by email, case-insensitively.
    pub fn get_by_email(&self, email: &str) -> Option<Contact> {
        self.inner.read().get_by_email(email).cloned()
    }

    /// All contacts, by id.
    pub fn all(&self) -> Vec<Contact> {
        self.inner.read().contacts.clone()
    }

    /// The ids, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.inner.read().contacts.iter().map(|c| c.id).collect()
    }

    /// The latest `updated_at`.
    pub fn max_updated_at(&self) -> Option<DateTime<Utc>> {
        self.inner
            .read()
            .contacts
            .iter()
            .map(|c| c.updated_at)
            .max()
    }

    /// The contacts updated strictly after `t`, by id (a test oracle for incremental syncs).
    pub fn changed_since(&self, t: DateTime<Utc>) -> Vec<Contact> {
        self.inner
            .read()
            .contacts
            .iter()
            .filter(|c| c.updated_at > t)
            .cloned()
            .collect()
    }

    /// Inserts or replaces a contact as given (its `updated_at` is kept).
    pub fn upsert(&self, contact: Contact) {
        let mut b = self.inner.write();
        b.upsert(contact);
    }

    /// Adds a new contact with the next free id, created and updated now; returns it.
    pub fn add(&self, email: &str, first_name: &str, last_name: &str) -> Contact {
        let mut b = self.inner.write();
        let id = b.contacts.last().map_or(FIRST_GENERATED_ID, |c| c.id + 1);
        let now = trunc_millis(b.clock.now());
        let c = Contact::new(id, email, first_name, last_name, now);
        b.upsert(c.clone());
        c
    }

    /// Changes a contact and sets its `updated_at` to now; returns the new version.
    pub fn update(&self, id: u64, f: impl FnOnce(&mut Contact)) -> Option<Contact> {
        let mut b = self.inner.write();
        let now = trunc_millis(b.clock.now());
        b.modify(id, |c| {
            f(c);
            c.updated_at = now;
        })
    }

    /// Changes a contact without touching `updated_at`.
    pub fn update_quietly(&self, id: u64, f: impl FnOnce(&mut Contact)) -> Option<Contact> {
        self.inner.write().modify(id, f)
    }

    /// Sets `updated_at` to now.
    pub fn touch(&self, id: u64) -> bool {
        self.update(id, |_| {}).is_some()
    }

    /// Removes a contact.
    pub fn remove(&self, id: u64) -> Option<Contact> {
        let mut b = self.inner.write();
        let pos = b.contacts.binary_search_by_key(&id, |c| c.id).ok()?;
        let c = b.contacts.remove(pos);
        b.by_email.remove(&c.email.to_lowercase());
        b.changed();
        Some(c)
    }

    /// Read access with the index up to date.
    pub(crate) fn read(&self) -> BookRead<'_> {
        let g = self.inner.upgradable_read();
        if g.dirty {
            let mut w = RwLockUpgradableReadGuard::upgrade(g);
            w.rebuild();
            RwLockWriteGuard::downgrade(w)
        } else {
            RwLockUpgradableReadGuard::downgrade(g)
        }
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Book> {
        self.inner.write()
    }
}

/// Which contacts by `updated_at`: `(time, inclusive)` bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct UpdatedRange {
    pub after: Option<(DateTime<Utc>, bool)>,
    pub before: Option<(DateTime<Utc>, bool)>,
}

/// The order of a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    IdAsc,
    IdDesc,
    UpdatedAsc,
    UpdatedDesc,
}

impl Book {
    fn changed(&mut self) {
        self.dirty = true;
        self.version += 1;
    }

    fn rebuild(&mut self) {
        let cs = &self.contacts;
        let mut idx: Vec<u32> = (0..cs.len() as u32).collect();
        idx.sort_by_key(|&p| (cs[p as usize].updated_at, cs[p as usize].id));
        self.by_updated = idx;
        self.cache.get_mut().clear();
        self.dirty = false;
    }

    pub(crate) fn upsert(&mut self, contact: Contact) {
        let (id, email) = (contact.id, contact.email.to_lowercase());
        match self.contacts.binary_search_by_key(&id, |c| c.id) {
            Ok(pos) => {
                let old = std::mem::replace(&mut self.contacts[pos], contact);
                self.by_email.remove(&old.email.to_lowercase());
            }
            Err(pos) => self.contacts.insert(pos, contact),
        }
        self.by_email.insert(email, id);
        self.changed();
    }

    pub(crate) fn modify(&mut self, id: u64, f: impl FnOnce(&mut Contact)) -> Option<Contact> {
        let pos = self.contacts.binary_search_by_key(&id, |c| c.id).ok()?;
        let old_email = self.contacts[pos].email.to_lowercase();
        f(&mut self.contacts[pos]);
        self.contacts[pos].id = id;
        let new_email = self.contacts[pos].email.to_lowercase();
        if new_email != old_email {
            self.by_email.remove(&old_email);
            self.by_email.insert(new_email, id);
        }
        self.changed();
        Some(self.contacts[pos].clone())
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        trunc_millis(self.clock.now())
    }

    pub(crate) fn len(&self) -> usize {
        self.contacts.len()
    }

    /// The contact at a position (positions are in id order).
    pub(crate) fn at(&self, pos: u32) -> &Contact {
        &self.contacts[pos as usize]
    }

    pub(crate) fn get(&self, id: u64) -> Option<&Contact> {
        self.contacts
            .binary_search_by_key(&id, |c| c.id)
            .ok()
            .map(|p| &self.contacts[p])
    }

    pub(crate) fn get_by_email(&self, email: &str) -> Option<&Contact> {
        let id = *self.by_email.get(&email.trim().to_lowercase())?;
        self.get(id)
    }

    /// A cached list of positions under `key`, computed by `f` on a miss. The cache is
    /// emptied by every change, so `key` only has to describe the query.
    pub(crate) fn cached(&self, key: &str, f: impl FnOnce(&Book) -> Vec<u32>) -> Arc<Vec<u32>> {
        if let Some(hit) = self.cache.lock().get(key) {
            return hit.clone();
        }
        let v = Arc::new(f(self));
        let mut c = self.cache.lock();
        if c.len() >= 64 {
            c.clear();
        }
        c.insert(key.to_string(), v.clone());
        v
    }

    /// Positions of the contacts in `range` that pass `keep`, in `order`; cached under
    /// `tag` (which must describe `keep`).
    pub(crate) fn select(
        &self,
        tag: &str,
        range: UpdatedRange,
        order: Order,
        keep: Option<&dyn Fn(&Contact) -> bool>,
    ) -> Arc<Vec<u32>> {
        let key = format!("select|{tag}|{range:?}|{order:?}");
        self.cached(&key, |b| {
            if range == UpdatedRange::default() && keep.is_none() && order == Order::IdAsc {
                return (0..b.len() as u32).collect();
            }
            let slice = b.updated_slice(range);
            let mut v: Vec<u32> = match keep {
                Some(k) => slice.iter().copied().filter(|&p| k(b.at(p))).collect(),
                None => slice.to_vec(),
            };
            match order {
                Order::UpdatedAsc => {}
                Order::UpdatedDesc => v.reverse(),
                Order::IdAsc => v.sort_unstable(),
                Order::IdDesc => v.sort_unstable_by(|a, b| b.cmp(a)),
            }
            v
        })
    }

    /// The slice of the `updated_at` index inside `range`.
    fn updated_slice(&self, range: UpdatedRange) -> &[u32] {
        let cs = &self.contacts;
        let ix = &self.by_updated;
        let lo = match range.after {
            None => 0,
            Some((t, true)) => ix.partition_point(|&p| cs[p as usize].updated_at < t),
            Some((t, false)) => ix.partition_point(|&p| cs[p as usize].updated_at <= t),
        };
        let hi = match range.before {
            None => ix.len(),
            Some((t, true)) => ix.partition_point(|&p| cs[p as usize].updated_at <= t),
            Some((t, false)) => ix.partition_point(|&p| cs[p as usize].updated_at < t),
        };
        &ix[lo..hi.max(lo)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_unique() {
        let a = generate_contacts(500, 7);
        assert_eq!(a, generate_contacts(500, 7));
        let mut emails: Vec<String> = a.iter().map(|c| c.email.to_lowercase()).collect();
        emails.sort();
        emails.dedup();
        assert_eq!(emails.len(), 500);
        assert!(a.iter().any(|c| c.email != c.email.to_lowercase()));
        assert!(a.iter().all(|c| c.updated_at >= c.created_at));
        assert_eq!(a[0].id, FIRST_GENERATED_ID);
    }

    #[test]
    fn selections_follow_changes() {
        let book = ContactBook::generate(50);
        let cut = book.all()[10].updated_at;
        let expected = book.changed_since(cut).len();
        let range = UpdatedRange {
            after: Some((cut, false)),
            before: None,
        };
        assert_eq!(
            book.read().select("t", range, Order::IdAsc, None).len(),
            expected
        );
        book.update(1001, |c| c.first_name = "Changed".into())
            .unwrap();
        let sel = book.read().select("t", range, Order::UpdatedAsc, None);
        let r = book.read();
        assert_eq!(r.at(*sel.last().unwrap()).id, 1001);
        assert_eq!(
            r.get_by_email(&book.get(1001).unwrap().email.to_uppercase())
                .unwrap()
                .id,
            1001
        );
    }

    #[test]
    fn subscriber_hash_vector() {
        assert_eq!(
            subscriber_hash("Urist.McVankab@FreddiesJokes.com"),
            "62eeb292278cc15f5817cb78f7790b08"
        );
    }
}
