//! Group commit: many requests share one store flush.
//!
//! A request that wrote to the store asks [`GroupCommit::durable`] and waits. One
//! task collects every waiter that arrived while the previous flush ran and covers
//! them all with the next flush, so under load one fsync acknowledges hundreds of
//! deliveries instead of one each. A waiter always registers after its own writes,
//! and a flush covers every write made before it starts, so no request is answered
//! before its data is on disk.

use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), String>>;

/// A handle to the flushing task. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommit {
    /// Starts the flushing task on the current runtime. `delay` is how long a flush
    /// waits to gather more writers (zero: flush as soon as the previous one ends).
    pub fn start(store: Arc<dyn Store>, delay: Duration) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let store = store.clone();
                let started = std::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                metrics::histogram!("klantreis_store_flush_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("klantreis_store_flush_batch").record(waiters.len() as f64);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "store flush failed");
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Waits until everything this caller wrote before the call is durable.
    pub async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| "the store is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the store is shutting down".to_string())?
    }
}
