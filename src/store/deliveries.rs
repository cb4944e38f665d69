//! Webhook deliveries and service bookkeeping, in a sled tree of their own
//! (`deliveries`), so the service can deduplicate deliveries and remember when each
//! scheduled job last ran.
//!
//! Keys: `d/{instance}\0{delivery id}` → the delivery record (MessagePack:
//! `{at, topic, customer}`); `o/{instance}\0{order id}` → customer id;
//! `r/{job}` → the last run of a scheduled job (RFC 3339).
//!
//! Like every sled write, these are durable only after [`Store::flush`]; the server
//! batches those flushes (group commit) and answers only after one covered the write.

use super::{SledStore, Store, StoreError};

/// A stored webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryRecord {
    /// When it was accepted (RFC 3339).
    pub at: String,
    pub topic: String,
    /// The customer it was applied to, if it concerned one.
    pub customer: Option<String>,
}

/// Delivery deduplication and scheduler bookkeeping.
pub trait DeliveryStore: Store {
    /// Whether this delivery of `instance` was already accepted.
    fn delivery_seen(&self, instance: &str, id: &str) -> Result<bool, StoreError>;

    /// Records an accepted delivery. Returns false when it was already recorded
    /// (a concurrent copy of the same delivery won).
    fn record_delivery(
        &self,
        instance: &str,
        id: &str,
        record: &DeliveryRecord,
    ) -> Result<bool, StoreError>;

    /// How many deliveries are recorded (all instances).
    fn delivery_count(&self) -> Result<u64, StoreError>;

    /// Remembers which customer an order of `instance` belongs to (refunds name
    /// only the order).
    fn remember_order(&self, instance: &str, order: &str, customer: &str)
        -> Result<(), StoreError>;

    /// The customer an order was remembered for.
    fn customer_of_order(&self, instance: &str, order: &str) -> Result<Option<String>, StoreError>;

    /// Erases what the deliveries tree knows about a customer (`forget`): order
    /// links to them are removed and delivery records lose their customer id; the
    /// delivery ids stay, so a late retry is still recognised and not re-applied.
    /// Returns how many entries changed.
    fn forget_deliveries(&self, customer: &str) -> Result<u64, StoreError>;

    /// When the scheduled job last ran (RFC 3339).
    fn last_run(&self, job: &str) -> Result<Option<String>, StoreError>;

    /// Remembers when a scheduled job ran.
    fn set_last_run(&self, job: &str, at: &str) -> Result<(), StoreError>;
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn delivery_key(instance: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + id.len() + 3);
    k.extend_from_slice(b"d/");
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn run_key(job: &str) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(job.as_bytes());
    k
}

impl SledStore {
    fn deliveries(&self) -> Result<sled::Tree, StoreError> {
        // sled caches opened trees, so this is a map lookup after the first call.
        self.db.open_tree("deliveries").map_err(backend)
    }
}

impl DeliveryStore for SledStore {
    fn delivery_seen(&self, instance: &str, id: &str) -> Result<bool, StoreError> {
        self.deliveries()?
            .contains_key(delivery_key(instance, id))
            .map_err(backend)
    }

    fn record_delivery(
        &self,
        instance: &str,
        id: &str,
        record: &DeliveryRecord,
    ) -> Result<bool, StoreError> {
        let value = rmp_serde::to_vec_named(record).expect("serializing to a Vec cannot fail");
        let swapped = self
            .deliveries()?
            .compare_and_swap(delivery_key(instance, id), None::<&[u8]>, Some(value))
            .map_err(backend)?;
        Ok(swapped.is_ok())
    }

    fn delivery_count(&self) -> Result<u64, StoreError> {
        Ok(self.deliveries()?.scan_prefix(b"d/").count() as u64)
    }

    fn remember_order(
        &self,
        instance: &str,
        order: &str,
        customer: &str,
    ) -> Result<(), StoreError> {
        let mut k = b"o".to_vec();
        k.extend_from_slice(&delivery_key(instance, order)[1..]);
        self.deliveries()?
            .insert(k, customer.as_bytes())
            .map_err(backend)?;
        Ok(())
    }

    fn customer_of_order(&self, instance: &str, order: &str) -> Result<Option<String>, StoreError> {
        let mut k = b"o".to_vec();
        k.extend_from_slice(&delivery_key(instance, order)[1..]);
        Ok(self
            .deliveries()?
            .get(k)
            .map_err(backend)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn forget_deliveries(&self, customer: &str) -> Result<u64, StoreError> {
        let tree = self.deliveries()?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in tree.scan_prefix(b"o/") {
            let (k, v) = kv.map_err(backend)?;
            if v.as_ref() == customer.as_bytes() {
                batch.remove(k);
                n += 1;
            }
        }
        for kv in tree.scan_prefix(b"d/") {
            let (k, v) = kv.map_err(backend)?;
            let Ok(mut r) = rmp_serde::from_slice::<DeliveryRecord>(&v) else {
                continue;
            };
            if r.customer.as_deref() == Some(customer) {
                r.customer = None;
                batch.insert(
                    k,
                    rmp_serde::to_vec_named(&r).expect("serializing to a Vec cannot fail"),
                );
                n += 1;
            }
        }
        tree.apply_batch(batch).map_err(backend)?;
        Ok(n)
    }

    fn last_run(&self, job: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .deliveries()?
            .get(run_key(job))
            .map_err(backend)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_last_run(&self, job: &str, at: &str) -> Result<(), StoreError> {
        self.deliveries()?
            .insert(run_key(job), at.as_bytes())
            .map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_deduplicate_per_instance() {
        let s = SledStore::temporary().unwrap();
        let r = DeliveryRecord {
            at: "2026-11-20T12:00:00Z".into(),
            topic: "orders/create".into(),
            customer: Some("c1".into()),
        };
        assert!(!s.delivery_seen("shop", "w1").unwrap());
        assert!(s.record_delivery("shop", "w1", &r).unwrap());
        assert!(!s.record_delivery("shop", "w1", &r).unwrap());
        assert!(s.delivery_seen("shop", "w1").unwrap());
        assert!(!s.delivery_seen("woo", "w1").unwrap());
        assert_eq!(s.delivery_count().unwrap(), 1);
        s.remember_order("shop", "o1", "c1").unwrap();
        assert_eq!(
            s.customer_of_order("shop", "o1").unwrap().as_deref(),
            Some("c1")
        );
        assert_eq!(s.forget_deliveries("c1").unwrap(), 2);
        assert_eq!(s.customer_of_order("shop", "o1").unwrap(), None);
        assert!(
            s.delivery_seen("shop", "w1").unwrap(),
            "the id stays for dedupe"
        );
        s.set_last_run("nurture", "2026-11-20T02:30:00Z").unwrap();
        assert_eq!(
            s.last_run("nurture").unwrap().as_deref(),
            Some("2026-11-20T02:30:00Z")
        );
    }
}
