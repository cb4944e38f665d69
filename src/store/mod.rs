//! Storage. Only this module touches sled; everything else goes through the
//! [`Store`] trait, so a PostgreSQL backend can follow without reshaping callers.
//!
//! Records travel as encoded blobs ([`ScanItem`]) so that a sweep can decode them on
//! worker threads instead of on the scanning thread.

mod deliveries;
mod outbox;
mod sled_store;

pub use deliveries::{DeliveryRecord, DeliveryStore};
pub use outbox::{OutboxStore, OutboxWrite};
pub use sled_store::SledStore;

use crate::model::{CodecError, Customer, PhaseStates, Transition};
use std::collections::BTreeMap;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store (sled admits one process at a time).
    #[error(
        "the store at {path} is in use by another klantreis process (is `klantreis run` serving it?); \
         stop that process, or ask it through its HTTP API"
    )]
    Locked { path: String },
    #[error("store backend error: {0}")]
    Backend(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("invalid customer id {0:?}: ids must be non-empty and contain no control characters")]
    InvalidId(String),
}

/// How a batch of customer merges went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MergeStats {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
}

impl MergeStats {
    pub fn add(&mut self, o: MergeStats) {
        self.created += o.created;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
    }
}

/// One customer as a sweep sees it: the encoded record and the encoded phase states.
#[derive(Debug, Clone)]
pub struct ScanItem {
    pub id: String,
    /// [`Customer::encode`] bytes.
    pub record: Vec<u8>,
    /// [`crate::model::encode_states`] bytes, if the customer is in any journey.
    pub states: Option<Vec<u8>>,
}

/// The new phase states of one customer and the transitions that led there.
#[derive(Debug, Clone)]
pub struct PhaseUpdate {
    pub id: String,
    pub states: PhaseStates,
    pub transitions: Vec<Transition>,
    /// Outbox entries the transitions planned, written in the same atomic batch.
    pub outbox: Vec<OutboxWrite>,
}

/// Customers per phase per journey.
pub type Funnel = BTreeMap<String, BTreeMap<String, u64>>;

/// A customer store.
pub trait Store: Send + Sync {
    /// Merges customers into the store (new attribute values win, identical events are
    /// not repeated). Customers with the same id in one batch are merged in order.
    fn merge_customers(&self, batch: Vec<Customer>) -> Result<MergeStats, StoreError> {
        self.merge_page(batch, None)
    }

    /// Like [`Store::merge_customers`], for bulk imports: the email identity index is
    /// not updated record by record but marked stale, and rebuilt in one pass the next
    /// time it is used (as a database builds an index after a bulk load).
    fn merge_bulk(&self, batch: Vec<Customer>) -> Result<MergeStats, StoreError> {
        self.merge_customers(batch)
    }

    /// Like [`Store::merge_customers`], and in the same atomic step sets the named
    /// cursor (a connector's sync position), so a sync killed half way resumes from
    /// the last page whose records are stored.
    fn merge_page(
        &self,
        batch: Vec<Customer>,
        cursor: Option<(&str, &[u8])>,
    ) -> Result<MergeStats, StoreError>;

    /// A cursor set by [`Store::merge_page`].
    fn cursor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The id of the customer whose `email` attribute is this address (compared
    /// trimmed and lower-cased). Rebuilds the index first if a bulk import left it stale.
    fn id_for_email(&self, email: &str) -> Result<Option<String>, StoreError>;

    /// One customer's record.
    fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError>;

    /// How many customers are stored.
    fn customer_count(&self) -> Result<u64, StoreError>;

    /// One customer's phase per journey.
    fn phase_states(&self, id: &str) -> Result<PhaseStates, StoreError>;

    /// One customer's transitions, oldest first.
    fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError>;

    /// Visits every customer in id order, `chunk` at a time, until `visit` returns false.
    fn scan(
        &self,
        chunk: usize,
        visit: &mut dyn FnMut(Vec<ScanItem>) -> bool,
    ) -> Result<(), StoreError>;

    /// Records new phase states and their transitions; one call is atomic.
    fn record_phases(&self, updates: &[PhaseUpdate]) -> Result<(), StoreError>;

    /// Customers per phase per journey.
    fn funnel(&self) -> Result<Funnel, StoreError>;

    /// Erases a customer and everything stored about them. Returns whether they existed.
    fn forget(&self, id: &str) -> Result<bool, StoreError>;

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Lock stripes for read-modify-write merges of customer records.
pub const STRIPES: usize = 64;

/// The stripe of a customer id (FNV-1a, stable across runs and platforms). A backend
/// serialises merges per stripe, so writers that split their work by
/// `stripe_of(id) % writers` never wait for each other.
pub fn stripe_of(id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % STRIPES as u64) as usize
}

/// The form emails are compared in: trimmed and lower-cased.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Checks that an id can be stored (non-empty, no control characters).
pub fn validate_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(StoreError::InvalidId(id.to_string()));
    }
    Ok(())
}
