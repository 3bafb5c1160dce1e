//! Usage events: one CloudEvent per settled request, exported off the request path
//! (feature `usage`).
//!
//! Give [`Billing::usage_outbox`](crate::Billing::usage_outbox) an [`Outbox`] and every
//! request that is settled, when its body ends, is dropped mid-stream, or fails after
//! delivering data, produces one [`CloudEvent`] whose `data` ([`UsageData`]) says who paid,
//! the units per meter, the credits actually charged, the route, the model of an LLM
//! request, the request id, a SHA-256 of the `Idempotency-Key` (never the key), and when it
//! started and ended. Released requests (refunded failures) produce none.
//!
//! The event is in the shape OpenMeter ingests: CloudEvents 1.0, `subject` the account,
//! `type` the [configured](OutboxConfig::event_type) event type, and a stable `id` (from the
//! account and the request's reservation), so a receiver drops the duplicates that
//! at-least-once delivery may bring.
//!
//! The outbox is bounded: a request hands its event over without waiting; when the sink is
//! down the queue fills to [`OutboxConfig::capacity`] and later events are counted as
//! dropped ([`OutboxStats::dropped`]). Sinks:
//!
//! - [`HttpSink`]: POSTs batches (CloudEvents batched mode) to a collector, retried with
//!   exponential backoff while it is down;
//! - [`FileSink`]: appends JSON Lines to a file;
//! - [`ChannelSink`]: hands events to a Tokio channel;
//! - any [`UsageSink`] of your own.
//!
//! # Example
//!
//! ```
//! use tower_402::usage::{ChannelSink, Outbox, OutboxConfig};
//! # use tower_402::{Billing, MemoryLedger, MemoryPlanStore, StaticKeys};
//! # use tower_402::plan::Catalog;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (sink, mut events) = ChannelSink::new(1024);
//! let outbox = Outbox::start(sink, OutboxConfig::default());
//! let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(),
//!                            Catalog::new())
//!     .usage_outbox(outbox.clone());
//! # let _ = (billing, &mut events);
//! // ... serve; each settled request arrives as `events.recv().await`.
//! # }
//! ```

mod event;
mod file;
mod http;
mod outbox;
mod sink;

pub use event::{CloudEvent, UsageData};
pub use file::FileSink;
pub use http::{HttpSink, CLOUDEVENTS_BATCH};
pub use outbox::{Outbox, OutboxConfig, OutboxStats};
pub use sink::{ChannelSink, SinkError, UsageSink};

pub(crate) use event::{sha256_hex, UsageContext};
