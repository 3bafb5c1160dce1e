//! The guard that owns a request's hold until it is settled or released, on every exit path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::account::AccountId;
use crate::backend::{bounded, is_outage};
use crate::charge::Charge;
use crate::credits::Credits;
use crate::error::LedgerError;
use crate::in_process::InProcessLedger;
use crate::ledger::PerCharge;
use crate::ledger::{Hold, OverEstimate, ReservationId, Settlement, Usage};
use crate::metering::body::spawn_or_expire;
use crate::metering::layer::{DisconnectPolicy, DryStreamPolicy, StreamErrorPolicy};
use crate::metering::replay::Recorder;
use crate::metering::retry::Pending;
use crate::metering::{MeterConfig, UsageError, UsageScanner};

/// What a settlement exports: the request's usage-event context (feature `usage`), taken
/// once when the reservation is finished.
#[cfg(feature = "usage")]
pub(crate) type Export = Option<Box<crate::usage::UsageContext>>;
/// Nothing to export without the `usage` feature: always `None` and zero-sized (a type,
/// not `()`, so passing it along is not a unit argument).
#[cfg(not(feature = "usage"))]
pub(crate) type Export = Option<std::convert::Infallible>;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The charges of one request: the gate's one route cost (no allocation), or what a pricing
/// rule estimated.
#[derive(Debug, Clone)]
pub(crate) enum Charges {
    One(Charge),
    Many(Arc<[Charge]>),
}

impl Charges {
    pub(crate) fn as_slice(&self) -> &[Charge] {
        match self {
            Charges::One(c) => std::slice::from_ref(c),
            Charges::Many(c) => c,
        }
    }

    /// Shared, for a ledger's reservation record.
    pub(crate) fn to_arc(&self) -> Arc<[Charge]> {
        match self {
            Charges::One(c) => Arc::from([c.clone()]),
            Charges::Many(c) => c.clone(),
        }
    }
}

/// What the request holds in the ledger.
pub(crate) enum Held {
    /// A keyed reservation record (shared ledgers, and requests with an `Idempotency-Key`).
    Reservation(ReservationId),
    /// An in-process hold without a record, owned by this guard alone.
    Hold(AccountId, Hold),
    /// A hold a shared ledger made in this process ([`LocalHolds`]), owned by this guard
    /// alone.
    Local(AccountId, Hold),
}

impl Held {
    fn account(&self) -> &AccountId {
        match self {
            Held::Reservation(id) => &id.account,
            Held::Hold(account, _) | Held::Local(account, _) => account,
        }
    }
}

/// What must still happen to a reservation.
pub(crate) enum Action {
    Release,
    Settle(Vec<Usage>),
    /// Settle the estimate: the units reserved (built where it is settled, not allocated).
    SettleEstimate,
}

/// Owns an open reservation until it is settled or released.
///
/// Dropped without being finished (a cancelled request, a body dropped mid-stream) it
/// finishes the reservation on a spawned Tokio task; where there is no runtime, the
/// reservation is left to expire (and says so in the log). A reservation is never leaked.
pub(crate) struct Guard {
    config: Arc<MeterConfig>,
    held: Held,
    /// Credits the reservation holds (for the metrics of how it ends).
    held_credits: Credits,
    charges: Charges,
    known: Option<Vec<Usage>>,
    scanner: Option<Box<dyn UsageScanner>>,
    responded: bool,
    /// Some of the body's data has gone out.
    delivered: bool,
    release_on_grpc_error: bool,
    /// The non-zero `grpc-status` the trailers carried.
    grpc_failed: Option<i32>,
    done: bool,
    /// Records the response of a request with an `Idempotency-Key`.
    recorder: Option<Box<Recorder>>,
    /// Watching for a stream that runs dry ([`DryStreamPolicy::Cut`]).
    dry: Option<Box<DryWatch>>,
    export: Export,
    /// The payer's plan's overdraft: a cost beyond the hold may be charged into a debt of
    /// this much where the layer's policy draws the balance (zero: none).
    overdraft: Credits,
    /// The request's span (the current one when the hold was made): settlement is recorded
    /// on it, and logged inside it.
    span: tracing::Span,
}

/// What a stream may still draw on beyond its hold, and what it delivered that was paid for.
struct DryWatch {
    /// Credit available after the hold.
    available: Credits,
    /// Allowance units left after the hold, per charge.
    allowance_left: PerCharge<Option<u64>>,
    /// What was delivered up to the last event that went out.
    paid: Option<Vec<Usage>>,
    /// The start of an event not yet complete: held back until it is.
    pending: bytes::BytesMut,
}

/// The longest unfinished event held back while watching for a dry stream.
const MAX_PENDING_EVENT: usize = 256 * 1024;

/// What of a chunk goes out.
pub(crate) enum Pass {
    /// The chunk as it is.
    Whole,
    /// These bytes (the whole events so far; maybe none).
    Part(bytes::Bytes),
    /// These bytes, then the stream is cut: it ran dry.
    Cut(bytes::Bytes),
}

/// Where the first event in `b` ends (after its blank line), if it does.
fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1), b.get(i + 2), b.get(i + 3)) {
            (b'\n', Some(b'\n'), _, _) => return Some(i + 2),
            (b'\r', Some(b'\n'), Some(b'\r'), Some(b'\n')) => return Some(i + 4),
            (b'\r', Some(b'\r'), _, _) => return Some(i + 2),
            _ => i += 1,
        }
    }
    None
}

/// Whether what the stream has counted, the last event included, is more than its hold and
/// what the account had left can pay; if not, it is what was paid for so far.
fn runs_dry(
    scanner: &mut dyn UsageScanner,
    watch: &mut DryWatch,
    charges: &[Charge],
    account: &AccountId,
) -> bool {
    let Some(delivered) = scanner.delivered() else {
        return false;
    };
    let mut needed = Credits::ZERO;
    let mut payable = true;
    for (i, c) in charges.iter().enumerate() {
        let units = delivered
            .iter()
            .filter(|u| u.meter == c.meter)
            .fold(0u64, |acc, u| acc.saturating_add(u.units));
        let left = watch.allowance_left.get(i).copied().flatten().unwrap_or(0);
        let beyond = units.saturating_sub(c.units).saturating_sub(left);
        if beyond == 0 {
            continue;
        }
        if !c.overage {
            payable = false;
            break;
        }
        match crate::charge::price(beyond, c.unit_price, c.price_per)
            .and_then(|p| needed.checked_add(p))
        {
            Some(n) => needed = n,
            None => {
                payable = false;
                break;
            }
        }
    }
    if payable && needed <= watch.available {
        watch.paid = Some(delivered);
        return false;
    }
    tracing::warn!(
        target: "tower_402::metering",
        account = account.as_str(),
        needed = needed.get(),
        available = watch.available.get(),
        "stream ran past its hold and the balance cannot pay for more; cutting it"
    );
    true
}

impl Guard {
    /// Takes the hold and the request's charges over.
    pub(crate) fn new(
        config: Arc<MeterConfig>,
        held: Held,
        held_credits: Credits,
        charges: Charges,
    ) -> Self {
        crate::observe::held_reserved(held_credits, Some(held.account()));
        Guard {
            overdraft: Credits::ZERO,
            config,
            held,
            held_credits,
            charges,
            known: None,
            scanner: None,
            responded: false,
            delivered: false,
            release_on_grpc_error: false,
            grpc_failed: None,
            done: false,
            recorder: None,
            dry: None,
            export: Export::default(),
            span: tracing::Span::current(),
        }
    }

    /// Lets a cost beyond the hold be charged into an overdraft of up to `limit` credits
    /// (the payer's plan's, [`Plan::overdraft`](crate::plan::Plan::overdraft)), where the
    /// layer's policy draws the balance.
    pub(crate) fn overdraft(&mut self, limit: Credits) {
        self.overdraft = limit;
    }

    /// How a cost beyond the hold is charged: the layer's policy, or the plan's overdraft.
    fn policy(&self) -> OverEstimate {
        match self.config.over_estimate {
            OverEstimate::DrawBalance if !self.overdraft.is_zero() => {
                OverEstimate::Overdraft(self.overdraft)
            }
            policy => policy,
        }
    }

    /// Under [`DryStreamPolicy::Cut`], watches the stream against what the account had left
    /// after the hold (if the scanner can count what it delivers).
    pub(crate) fn watch_dry(
        &mut self,
        available: Credits,
        allowance_left: &PerCharge<Option<u64>>,
    ) {
        if self.config.on_dry_stream != DryStreamPolicy::Cut || self.known.is_some() {
            return;
        }
        if let Some(s) = &mut self.scanner {
            if s.count_delivered() {
                self.dry = Some(Box::new(DryWatch {
                    available,
                    allowance_left: allowance_left.clone(),
                    paid: None,
                    pending: bytes::BytesMut::new(),
                }));
            }
        }
    }

    /// The request's usage-event context: its event is sent when it is settled.
    #[cfg(feature = "usage")]
    pub(crate) fn export(&mut self, context: crate::usage::UsageContext) {
        self.export = Some(Box::new(context));
    }

    /// The reservation's key, if the hold has a record.
    #[cfg(feature = "usage")]
    pub(crate) fn reservation_key(&self) -> Option<&str> {
        match &self.held {
            Held::Reservation(id) => Some(id.key.as_str()),
            Held::Hold(..) | Held::Local(..) => None,
        }
    }

    /// Records the response for idempotent replays (a request with an `Idempotency-Key`),
    /// written when the body ends and the reservation is settled.
    pub(crate) fn record(&mut self, recorder: Recorder) {
        self.recorder = Some(Box::new(recorder));
    }

    /// The recorder, if this response is recorded.
    pub(crate) fn recorder(&mut self) -> Option<&mut Recorder> {
        self.recorder.as_deref_mut()
    }

    /// The charges this request reserved.
    pub(crate) fn charges(&self) -> &[Charge] {
        self.charges.as_slice()
    }

    fn estimate(&self) -> Vec<Usage> {
        estimate(self.charges.as_slice())
    }

    pub(crate) fn config(&self) -> &Arc<MeterConfig> {
        &self.config
    }

    pub(crate) fn account(&self) -> &str {
        self.held.account().as_str()
    }

    pub(crate) fn account_id(&self) -> &AccountId {
        self.held.account()
    }

    /// The response head arrived: usage is either known now or read from the body.
    pub(crate) fn responded(
        &mut self,
        known: Option<Vec<Usage>>,
        scanner: Option<Box<dyn UsageScanner>>,
    ) {
        self.responded = true;
        self.known = known;
        self.scanner = scanner;
    }

    /// A gRPC call whose errors are not billed as successes: a non-zero `grpc-status` in the
    /// trailers ends the stream as failed. It is released if no message went out before it,
    /// else charged for what it delivered by the [`StreamErrorPolicy`].
    pub(crate) fn release_on_grpc_error(&mut self) {
        self.release_on_grpc_error = true;
    }

    /// A chunk of the body, about to go out: what of it to pass on.
    ///
    /// Watching for a dry stream, only whole events go out (the rest waits for the chunk that
    /// completes it), so that a cut falls between events and the client's stream stays
    /// well-formed; each event is counted before it goes out.
    pub(crate) fn data(&mut self, chunk: &bytes::Bytes) -> Pass {
        let Some(mut watch) = self.dry.take() else {
            self.delivered |= !chunk.is_empty();
            if let Some(s) = &mut self.scanner {
                s.data(chunk);
            }
            if let Some(r) = &mut self.recorder {
                r.data(chunk);
            }
            return Pass::Whole;
        };
        watch.pending.extend_from_slice(chunk);
        let mut out = 0;
        let mut cut = false;
        if let Some(scanner) = self.scanner.as_deref_mut() {
            while let Some(len) = event_end(&watch.pending[out..]) {
                let end = out + len;
                scanner.data(&watch.pending[out..end]);
                if runs_dry(
                    scanner,
                    &mut watch,
                    self.charges.as_slice(),
                    self.held.account(),
                ) {
                    cut = true;
                    break;
                }
                out = end;
            }
            if !cut && watch.pending.len() - out > MAX_PENDING_EVENT {
                // An event too long to hold back (the scanner skips it too): it goes out as
                // it comes.
                scanner.data(&watch.pending[out..]);
                out = watch.pending.len();
            }
        }
        let passed = watch.pending.split_to(out).freeze();
        if cut {
            watch.pending.clear();
        }
        self.dry = Some(watch);
        self.delivered |= !passed.is_empty();
        if let Some(r) = &mut self.recorder {
            r.data(&passed);
        }
        if cut {
            Pass::Cut(passed)
        } else {
            Pass::Part(passed)
        }
    }

    /// The body ended: what was held back of an unfinished last event, which goes out now.
    pub(crate) fn flush(&mut self) -> Option<bytes::Bytes> {
        let watch = self.dry.as_mut()?;
        if watch.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut watch.pending).freeze();
        if let Some(s) = &mut self.scanner {
            s.data(&rest);
        }
        if let Some(r) = &mut self.recorder {
            r.data(&rest);
        }
        self.delivered = true;
        Some(rest)
    }

    /// Ends a stream that ran dry: its last bytes (an error event in its own shape, also
    /// recorded) and what to settle (what it delivered before the cut; the estimate for the
    /// meters it did not report).
    pub(crate) fn cut(&mut self) -> (Option<bytes::Bytes>, Action) {
        let message = "The balance cannot pay for more of this response; the stream was ended \
                       and what was delivered is charged.";
        let event = self
            .scanner
            .as_ref()
            .and_then(|s| s.end_event("INSUFFICIENT_CREDITS", message));
        if let (Some(r), Some(event)) = (&mut self.recorder, &event) {
            r.data(event);
        }
        let paid = self.dry.take().and_then(|w| w.paid);
        let action = match paid {
            Some(paid) => {
                let usage = self
                    .charges
                    .as_slice()
                    .iter()
                    .map(|c| Usage {
                        meter: c.meter.clone(),
                        units: paid
                            .iter()
                            .find(|u| u.meter == c.meter)
                            .map_or(c.units, |u| u.units),
                    })
                    .chain(
                        paid.iter()
                            .filter(|u| !self.charges.as_slice().iter().any(|c| c.meter == u.meter))
                            .cloned(),
                    )
                    .collect();
                Action::Settle(self.checked(Ok(usage)))
            }
            None => Action::SettleEstimate,
        };
        (event, action)
    }

    pub(crate) fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.release_on_grpc_error {
            self.grpc_failed = crate::problem::grpc_status(trailers).filter(|&code| code != 0);
        }
        if let Some(s) = &mut self.scanner {
            s.trailers(trailers);
        }
        if let Some(r) = &mut self.recorder {
            r.trailers(trailers);
        }
    }

    fn checked(&self, usage: Result<Vec<Usage>, UsageError>) -> Vec<Usage> {
        let usage = usage.and_then(|u| self.fold(u)).and_then(|u| {
            match u.iter().find(|u| u.units > self.config.max_units) {
                Some(big) => Err(UsageError::Invalid(format!(
                    "{} {} is above the limit of {}",
                    big.units, big.meter, self.config.max_units
                ))),
                None => Ok(u),
            }
        });
        match usage {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(
                    target: "tower_402::metering",
                    account = self.account(),
                    error = %e,
                    "no usable usage figure; charging the estimate"
                );
                self.estimate()
            }
        }
    }

    /// Usage of meters this request reserved no charge on, counted on the meter the extractor
    /// says they count as ([`UsageExtractor::counts_as`]: cached input tokens as input for a
    /// model without a cached price); others are left for the ledger to ignore.
    ///
    /// [`UsageExtractor::counts_as`]: crate::metering::UsageExtractor::counts_as
    fn fold(&self, mut usage: Vec<Usage>) -> Result<Vec<Usage>, UsageError> {
        let charges = self.charges.as_slice();
        let reserved = |m: &crate::plan::Meter| charges.iter().any(|c| &c.meter == m);
        if usage.iter().all(|u| reserved(&u.meter)) {
            return Ok(usage);
        }
        let Some(extractor) = &self.config.usage else {
            return Ok(usage);
        };
        let mut i = 0;
        while i < usage.len() {
            if reserved(&usage[i].meter) {
                i += 1;
                continue;
            }
            let Some(target) = extractor.counts_as(&usage[i].meter).filter(|t| reserved(t)) else {
                i += 1;
                continue;
            };
            let moved = usage.remove(i);
            match usage.iter_mut().find(|u| u.meter == target) {
                Some(t) => {
                    t.units = t.units.checked_add(moved.units).ok_or_else(|| {
                        UsageError::Invalid(format!("{} {} overflow", moved.units, moved.meter))
                    })?
                }
                None => usage.push(Usage {
                    meter: target,
                    units: moved.units,
                }),
            }
        }
        Ok(usage)
    }

    /// The body ended: what to settle.
    pub(crate) fn at_end(&mut self) -> Action {
        if let Some(code) = self.grpc_failed {
            return self.failed(Some(code));
        }
        if let Some(known) = self.known.take() {
            return Action::Settle(self.checked(Ok(known)));
        }
        match self.scanner.as_mut().map(|s| s.finish()) {
            Some(usage) => Action::Settle(self.checked(usage)),
            None => Action::SettleEstimate,
        }
    }

    fn so_far(&mut self) -> Option<Vec<Usage>> {
        let seen = self.scanner.as_mut().and_then(|s| s.so_far())?;
        Some(self.checked(Ok(seen)))
    }

    /// The body failed mid-stream.
    pub(crate) fn at_error(&mut self) -> Action {
        self.failed(None)
    }

    /// A stream that ended in an error (a failed body, or a gRPC `grpc_status`): released if
    /// it delivered nothing, else as the [`StreamErrorPolicy`] says.
    fn failed(&mut self, grpc_status: Option<i32>) -> Action {
        let account = self.account();
        if !self.delivered {
            tracing::info!(
                target: "tower_402::metering",
                account,
                grpc_status,
                "stream failed before delivering any data; releasing the reservation"
            );
            return Action::Release;
        }
        match self.config.on_stream_error {
            StreamErrorPolicy::Release => {
                tracing::info!(
                    target: "tower_402::metering",
                    account,
                    grpc_status,
                    "stream failed after delivering data; releasing the reservation by policy"
                );
                Action::Release
            }
            StreamErrorPolicy::ChargeDelivered => {
                tracing::info!(
                    target: "tower_402::metering",
                    account,
                    grpc_status,
                    "stream failed after delivering data; charging what it delivered"
                );
                self.cut_short()
            }
        }
    }

    /// Dropped unfinished.
    fn at_drop(&mut self) -> Action {
        if !self.responded {
            // Cancelled before the response: the handler's future was dropped with it.
            return Action::Release;
        }
        self.cut_short()
    }

    /// A response that did not run to its end (dropped, or failed after delivering data):
    /// the usage the handler reported, else what the [`DisconnectPolicy`] charges.
    fn cut_short(&mut self) -> Action {
        if let Some(known) = self.known.take() {
            return Action::Settle(self.checked(Ok(known)));
        }
        match self.config.on_disconnect {
            DisconnectPolicy::ChargeEstimate => Action::SettleEstimate,
            DisconnectPolicy::ChargeUsageSoFar => {
                Action::Settle(self.so_far().unwrap_or_else(|| self.estimate()))
            }
        }
    }

    /// Carries out `action`: right here with a ledger that needs no I/O (`None`), else the
    /// future that does. The guard is finished from here on.
    pub(crate) fn finish(&mut self, action: Action) -> Option<BoxFuture> {
        self.done = true;
        let export = std::mem::take(&mut self.export);
        let _entered = self.span.enter();
        if let Held::Local(account, hold) = &self.held {
            return finish_local(
                &self.config,
                account,
                hold,
                self.held_credits,
                self.charges.as_slice(),
                action,
                self.policy(),
                export,
                &self.span,
            );
        }
        if let Some(ledger) = self.config.ledger.in_process() {
            run_now(
                ledger,
                &self.config,
                &self.held,
                self.held_credits,
                self.charges.as_slice(),
                action,
                self.policy(),
                export,
            );
            return None;
        }
        let Held::Reservation(id) = &self.held else {
            // Holds are only made by in-process ledgers, which answer above.
            tracing::error!(
                target: "tower_402::metering",
                account = self.account(),
                "an in-process hold on a ledger without an in-process path; not settled"
            );
            return None;
        };
        let config = self.config.clone();
        // Reference counts, not copies.
        let (id, charges) = (id.clone(), self.charges.to_arc());
        let run = run(
            config,
            id,
            self.held_credits,
            charges,
            action,
            self.policy(),
            export,
        );
        Some(Box::pin(tracing::Instrument::instrument(
            run,
            self.span.clone(),
        )))
    }

    /// Carries out the action of a body that ended, with the response's record when it is
    /// recorded and settled (not released: a released request's retry runs anew).
    ///
    /// On a shared ledger the record is written first, then the settlement: a retry sees the
    /// reservation open (`409 IDEMPOTENCY_KEY_IN_USE`, retry later) until both are done, never
    /// a settled request without its record. An in-process ledger settles inline; its record
    /// is written in the same poll.
    pub(crate) fn finish_at_end(&mut self, action: Action) -> Option<BoxFuture> {
        let recorder = match action {
            Action::Release => None,
            Action::Settle(_) | Action::SettleEstimate => self.recorder.take(),
        };
        let settle = self.finish(action);
        let Some(recorder) = recorder else {
            return settle;
        };
        let config = self.config.clone();
        Some(Box::pin(async move {
            (*recorder).write(&config).await;
            if let Some(settle) = settle {
                settle.await;
            }
        }))
    }

    pub(crate) fn release(&mut self) -> Option<BoxFuture> {
        self.finish(Action::Release)
    }
}

/// The units a charge reserved, as usage.
fn reserved(c: &Charge) -> Usage {
    Usage {
        meter: c.meter.clone(),
        units: c.units,
    }
}

/// The units reserved, as usage: what settling the estimate charges.
fn estimate(charges: &[Charge]) -> Vec<Usage> {
    charges.iter().map(reserved).collect()
}

/// What a ledger call to finish a reservation answered.
pub(crate) enum Outcome {
    Released(Result<(), LedgerError>),
    Settled(Result<Settlement, LedgerError>),
}

async fn run(
    config: Arc<MeterConfig>,
    id: ReservationId,
    held: Credits,
    charges: Arc<[Charge]>,
    action: Action,
    policy: OverEstimate,
    export: Export,
) {
    let now = config.clock.now();
    // This path allocates its future anyway: the estimate is simply a usage list here.
    let usage = match action {
        Action::Release => None,
        Action::Settle(usage) => Some(usage),
        Action::SettleEstimate => Some(estimate(&charges)),
    };
    let outcome = match &usage {
        None => Outcome::Released(
            bounded::<_, LedgerError>(
                "ledger.release",
                config.timeout,
                config.ledger.release(&id, now),
            )
            .await,
        ),
        Some(usage) => Outcome::Settled(
            bounded::<_, LedgerError>(
                "ledger.settle",
                config.timeout,
                config.ledger.settle(&id, usage, policy, now),
            )
            .await,
        ),
    };
    let failed = match &outcome {
        Outcome::Released(Err(e)) | Outcome::Settled(Err(e)) => is_outage(e).then_some(e),
        _ => None,
    };
    if let Some(e) = failed {
        tracing::warn!(
            target: "tower_402::metering",
            account = id.account.as_str(),
            error = %e,
            "settlement did not land; queued, retried until it does"
        );
        let retries = config.retries.clone();
        retries.push(Pending {
            config,
            id,
            held,
            charges,
            usage,
            policy,
            export,
        });
        return;
    }
    report(
        &config,
        &id.account,
        held,
        &charges,
        outcome,
        usage.as_deref(),
        export,
    );
}

/// The same as [`run`] on a ledger that answers without I/O, for a record or a hold.
#[allow(clippy::too_many_arguments)] // the guard's fields, borrowed apart
fn run_now(
    ledger: &dyn InProcessLedger,
    config: &MeterConfig,
    held: &Held,
    held_credits: Credits,
    charges: &[Charge],
    action: Action,
    policy: OverEstimate,
    export: Export,
) {
    let now = config.clock.now();
    let release = || match held {
        Held::Reservation(id) => ledger.release(id, now),
        Held::Hold(account, hold) => ledger.release_hold(account, hold, charges, now),
        // Ended by `finish_local`, never here.
        Held::Local(..) => Err(LedgerError::UnknownReservation),
    };
    let settle = |usage: &[Usage]| match held {
        Held::Reservation(id) => ledger.settle(id, usage, policy, now),
        Held::Hold(account, hold) => ledger.settle_hold(account, hold, charges, usage, policy, now),
        // Ended by `finish_local`, never here.
        Held::Local(..) => Err(LedgerError::UnknownReservation),
    };
    let outcome = match &action {
        Action::Release => Outcome::Released(release()),
        Action::Settle(usage) => Outcome::Settled(settle(usage)),
        Action::SettleEstimate => {
            // The common one or two charges settle from the stack.
            Outcome::Settled(match charges {
                [a] => settle(&[reserved(a)]),
                [a, b] => settle(&[reserved(a), reserved(b)]),
                _ => settle(&estimate(charges)),
            })
        }
    };
    // `None` for a settled estimate: the units reserved, read from the charges.
    let usage = match &action {
        Action::Settle(usage) => Some(&usage[..]),
        _ => None,
    };
    report(
        config,
        held.account(),
        held_credits,
        charges,
        outcome,
        usage,
        export,
    );
}

/// Ends a [`Held::Local`] hold: given back, or settled in this process when the ledger's
/// [`LocalHolds::try_settle_hold`] can; else the future that settles it with the shared
/// ledger.
#[allow(clippy::too_many_arguments)] // the guard's fields, borrowed apart
fn finish_local(
    config: &Arc<MeterConfig>,
    account: &AccountId,
    hold: &Hold,
    held_credits: Credits,
    charges: &[Charge],
    action: Action,
    policy: OverEstimate,
    export: Export,
    span: &tracing::Span,
) -> Option<BoxFuture> {
    let Some(holds) = config.ledger.local_holds() else {
        no_local_holds(account);
        return None;
    };
    let now = config.clock.now();
    let settled = match &action {
        Action::Release => {
            holds.release_hold(account, hold, now);
            let outcome = Outcome::Released(Ok(()));
            report(
                config,
                account,
                held_credits,
                charges,
                outcome,
                None,
                export,
            );
            return None;
        }
        Action::Settle(usage) => holds.try_settle_hold(account, hold, charges, usage, policy, now),
        // The common one or two charges settle from the stack.
        Action::SettleEstimate => match charges {
            [a] => holds.try_settle_hold(account, hold, charges, &[reserved(a)], policy, now),
            [a, b] => {
                let usage = [reserved(a), reserved(b)];
                holds.try_settle_hold(account, hold, charges, &usage, policy, now)
            }
            _ => holds.try_settle_hold(account, hold, charges, &estimate(charges), policy, now),
        },
    };
    let usage = match action {
        Action::Settle(usage) => Some(usage),
        _ => None,
    };
    if let Some(s) = settled {
        let outcome = Outcome::Settled(Ok(s));
        report(
            config,
            account,
            held_credits,
            charges,
            outcome,
            usage.as_deref(),
            export,
        );
        return None;
    }
    let (config, account, hold) = (config.clone(), account.clone(), hold.clone());
    let charges: Arc<[Charge]> = Arc::from(charges);
    let settle = async move {
        let Some(holds) = config.ledger.local_holds() else {
            no_local_holds(&account);
            return;
        };
        let units = usage.clone().unwrap_or_else(|| estimate(&charges));
        // Bounded like any settlement: the body's last frame waits for it. The hold's own
        // part is settled in this process before the shared ledger is asked for the rest; a
        // timeout leaves the rest uncharged (logged), never charged twice.
        let settle = async {
            Ok::<_, LedgerError>(
                holds
                    .settle_hold(&account, &hold, &charges, &units, policy, now)
                    .await,
            )
        };
        let outcome = Outcome::Settled(bounded("ledger.settle", config.timeout, settle).await);
        report(
            &config,
            &account,
            held_credits,
            &charges,
            outcome,
            usage.as_deref(),
            export,
        );
    };
    Some(Box::pin(tracing::Instrument::instrument(
        settle,
        span.clone(),
    )))
}

/// A [`Held::Local`] hold on a ledger that has no local holds: not reached (the hold was
/// made by this ledger's `local_holds`), logged if it ever is.
fn no_local_holds(account: &AccountId) {
    tracing::error!(
        target: "tower_402::metering",
        account = account.as_str(),
        "a local hold on a ledger without local holds; not settled"
    );
}

/// Logs and counts how a reservation ended, and reports threshold crossings.
pub(crate) fn report(
    config: &MeterConfig,
    payer: &AccountId,
    held: Credits,
    charges: &[Charge],
    outcome: Outcome,
    usage: Option<&[Usage]>,
    export: Export,
) {
    let account = payer.as_str();
    match &outcome {
        Outcome::Released(Ok(())) => crate::observe::held_released(held, Some(payer)),
        Outcome::Settled(Ok(s)) => crate::observe::settled(held, Some(s), Some(payer)),
        Outcome::Released(Err(_)) | Outcome::Settled(Err(_)) => {
            crate::observe::settled(held, None, Some(payer))
        }
    }
    match outcome {
        Outcome::Released(Ok(())) => tracing::debug!(
            target: "tower_402::metering",
            account,
            "reservation released"
        ),
        Outcome::Released(Err(e)) => tracing::error!(
            target: "tower_402::metering",
            account,
            error = %e,
            "release refused by the ledger; a hold still open is charged its estimate when it expires"
        ),
        Outcome::Settled(Ok(s)) => {
            if s.shortfall.is_empty() {
                tracing::info!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    available = s.available_after.get(),
                    "request settled"
                );
            } else {
                tracing::warn!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    shortfall_credits = s.shortfall.credits.get(),
                    shortfall_units = ?s.shortfall.units,
                    "request settled with a shortfall: usage exceeded what could be charged"
                );
            }
            crate::observe::record_settlement(s.charged.get(), usage);
            if let Some(t) = &config.thresholds {
                t.after_settle(payer, charges, &s);
            }
            #[cfg(feature = "usage")]
            export_usage(config, payer, charges, usage, &s, export);
            #[cfg(not(feature = "usage"))]
            let _ = export;
        }
        Outcome::Settled(Err(e)) => tracing::error!(
            target: "tower_402::metering",
            account,
            error = %e,
            "settlement refused by the ledger; a hold still open is charged its estimate when it expires"
        ),
    }
}

/// Hands the settled request's usage event to the outbox (never waits).
#[cfg(feature = "usage")]
fn export_usage(
    config: &MeterConfig,
    payer: &AccountId,
    charges: &[Charge],
    usage: Option<&[Usage]>,
    s: &Settlement,
    export: Export,
) {
    let (Some(outbox), Some(context)) = (&config.outbox, export) else {
        return;
    };
    let mut meters = std::collections::BTreeMap::new();
    match usage {
        Some(usage) => {
            for u in usage {
                let m = meters.entry(u.meter.as_str().to_owned()).or_insert(0u64);
                *m = m.saturating_add(u.units);
            }
        }
        None => {
            for c in charges {
                meters.insert(c.meter.as_str().to_owned(), c.units);
            }
        }
    }
    let event = (*context).event(
        outbox.source(),
        outbox.event_type(),
        payer,
        meters,
        s.charged,
        config.clock.now(),
    );
    outbox.push(event);
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let action = self.at_drop();
        if let Some(fut) = self.finish(action) {
            spawn_or_expire(fut, self.account());
        }
    }
}
