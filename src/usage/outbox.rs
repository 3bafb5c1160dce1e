//! The bounded outbox between the request path and a [`UsageSink`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::usage::{CloudEvent, SinkError, UsageSink};

/// How the [`Outbox`] queues, batches and retries.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Events queued at most while the sink is slow or down; beyond, events are dropped and
    /// counted (default 10,000). The batch being delivered is held on top of these.
    pub capacity: usize,
    /// Events per batch at most (default 100).
    pub batch_size: usize,
    /// The first wait before retrying a batch the sink could not take (default 100 ms); it
    /// doubles on each failure.
    pub retry_initial: Duration,
    /// The longest wait between retries (default 30 s).
    pub retry_max: Duration,
    /// The events' CloudEvents `source` (default `tower-402`).
    pub source: String,
    /// The events' CloudEvents `type`, which OpenMeter's meters select on (default
    /// `tower402.request`).
    pub event_type: String,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            capacity: 10_000,
            batch_size: 100,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            source: "tower-402".into(),
            event_type: "tower402.request".into(),
        }
    }
}

/// Counts of what happened to the events handed to an [`Outbox`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Taken into the queue.
    pub enqueued: u64,
    /// Delivered to the sink.
    pub delivered: u64,
    /// Dropped because the queue was full (the sink slow or down), or the outbox closed.
    pub dropped: u64,
    /// Refused by the sink for good ([`SinkError::Rejected`]).
    pub rejected: u64,
    /// Delivery attempts that failed and were retried.
    pub retries: u64,
}

#[derive(Debug, Default)]
struct Counters {
    enqueued: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    counters: Counters,
    /// Signalled after each batch is done with (delivered or rejected).
    progress: Notify,
}

/// Usage events on their way to a [`UsageSink`], off the request path.
///
/// The metering layer hands each settled request's event to the outbox without waiting: into
/// a bounded queue, or, when it is full, counted as dropped
/// ([`OutboxStats::dropped`], the `tower402_usage_events_dropped_total` metric). One task
/// takes the events out in batches and delivers each batch, retrying a sink that is down
/// with exponential backoff, in order, at least once.
///
/// Clones share the queue. The task ends when every clone is dropped and the queue is
/// delivered.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<CloudEvent>,
    shared: Arc<Shared>,
    source: Arc<str>,
    event_type: Arc<str>,
}

impl Outbox {
    /// Starts delivering to `sink` on a Tokio task: call it inside a Tokio runtime.
    pub fn start(sink: impl UsageSink, config: OutboxConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            progress: Notify::new(),
        });
        tokio::spawn(deliver(Box::new(sink), rx, shared.clone(), config.clone()));
        Outbox {
            tx,
            shared,
            source: config.source.into(),
            event_type: config.event_type.into(),
        }
    }

    /// What happened to the events so far.
    pub fn stats(&self) -> OutboxStats {
        let c = &self.shared.counters;
        OutboxStats {
            enqueued: c.enqueued.load(Ordering::Acquire),
            delivered: c.delivered.load(Ordering::Acquire),
            dropped: c.dropped.load(Ordering::Acquire),
            rejected: c.rejected.load(Ordering::Acquire),
            retries: c.retries.load(Ordering::Acquire),
        }
    }

    /// Waits until every event enqueued so far is delivered or rejected (for a graceful
    /// shutdown, and tests). Waits as long as the sink stays down.
    pub async fn drained(&self) {
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let s = self.stats();
            if s.delivered + s.rejected >= s.enqueued {
                return;
            }
            progress.await;
        }
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn event_type(&self) -> &str {
        &self.event_type
    }

    /// Queues `event`, never waiting: a full queue drops it, counted.
    pub(crate) fn push(&self, event: CloudEvent) {
        let c = &self.shared.counters;
        match self.tx.try_send(event) {
            Ok(()) => {
                c.enqueued.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                let dropped = c.dropped.fetch_add(1, Ordering::AcqRel) + 1;
                crate::observe::usage_events("dropped", 1);
                let event = match &e {
                    mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => {
                        ev
                    }
                };
                tracing::warn!(
                    target: "tower_402::usage",
                    account = event.subject.as_str(),
                    id = event.id.as_str(),
                    dropped,
                    "usage outbox full (the sink is slow or down); event dropped"
                );
            }
        }
    }
}

async fn deliver(
    sink: Box<dyn UsageSink>,
    mut rx: mpsc::Receiver<CloudEvent>,
    shared: Arc<Shared>,
    config: OutboxConfig,
) {
    let c = &shared.counters;
    let max = config.batch_size.max(1);
    let mut batch = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        let mut wait = config.retry_initial;
        loop {
            match sink.send(&batch).await {
                Ok(()) => {
                    c.delivered.fetch_add(batch.len() as u64, Ordering::AcqRel);
                    crate::observe::usage_events("delivered", batch.len() as u64);
                    break;
                }
                Err(SinkError::Rejected(e)) => {
                    c.rejected.fetch_add(batch.len() as u64, Ordering::AcqRel);
                    crate::observe::usage_events("rejected", batch.len() as u64);
                    tracing::error!(
                        target: "tower_402::usage",
                        events = batch.len(),
                        error = %e,
                        "usage sink rejected a batch; dropped"
                    );
                    break;
                }
                Err(e) => {
                    c.retries.fetch_add(1, Ordering::AcqRel);
                    crate::observe::usage_events("retried", 1);
                    tracing::warn!(
                        target: "tower_402::usage",
                        events = batch.len(),
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "usage sink unavailable; retrying the batch"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(config.retry_max);
                }
            }
        }
        batch.clear();
        shared.progress.notify_waiters();
    }
}
