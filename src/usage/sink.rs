//! Where usage events go: the [`UsageSink`] trait, and the channel sink.

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::usage::CloudEvent;

/// Why a sink did not take a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Worth trying again later (the receiver is down, overloaded, or answered 5xx/429).
    #[error("usage sink unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Never going to be taken (the receiver answered 4xx, or is gone for good): the batch
    /// is counted as rejected and dropped.
    #[error("usage sink rejected the batch")]
    Rejected(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SinkError {
    /// A retryable failure with a message.
    pub fn unavailable(msg: impl fmt::Display) -> Self {
        SinkError::Unavailable(msg.to_string().into())
    }

    /// A permanent failure with a message.
    pub fn rejected(msg: impl fmt::Display) -> Self {
        SinkError::Rejected(msg.to_string().into())
    }
}

/// Takes batches of usage events. The [`Outbox`](crate::usage::Outbox) calls it from its own
/// task, one batch at a time, retrying [`SinkError::Unavailable`] with backoff: a sink never
/// runs on a request's path.
///
/// Delivery is at least once: a batch that failed may have been partly taken, and is sent
/// again whole. Receivers drop duplicates by [`CloudEvent::id`].
#[async_trait]
pub trait UsageSink: Send + Sync + 'static {
    /// Delivers `batch` (never empty), all or nothing from the outbox's point of view.
    async fn send(&self, batch: &[CloudEvent]) -> Result<(), SinkError>;
}

/// Hands events to a Tokio channel, for an application that consumes them itself (or for
/// tests). A full channel makes the outbox wait, off the request path; a dropped receiver
/// rejects every batch.
#[derive(Debug, Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<CloudEvent>,
}

impl ChannelSink {
    /// A sink and the receiving end of its channel, which holds `capacity` events.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<CloudEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (ChannelSink { tx }, rx)
    }
}

#[async_trait]
impl UsageSink for ChannelSink {
    async fn send(&self, batch: &[CloudEvent]) -> Result<(), SinkError> {
        for event in batch {
            self.tx
                .send(event.clone())
                .await
                .map_err(|_| SinkError::rejected("the channel's receiver is gone"))?;
        }
        Ok(())
    }
}
