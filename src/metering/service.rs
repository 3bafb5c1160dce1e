use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use tower_service::Service;

use crate::account::AccountId;
use crate::backend::{bounded, is_outage, FailureMode};
use crate::denial::{log_denial, Denial};
use crate::entitlement::{Admission, Entitlement};
use crate::error::LedgerError;
use crate::ledger::{Recording, Replay, ReserveOutcome, ReserveRequest};
use crate::metering::future::{Prepared, ResponseFuture, Ticket};
use crate::metering::guard::{Charges, Guard, Held};
use crate::metering::idempotency::{fingerprint, idempotency_key, idempotent_key, unique_key};
use crate::metering::pricing::price;
use crate::metering::replay::{Recorder, Tap};
use crate::metering::request_body::{peek, PeekError};
use crate::metering::{MeterConfig, MeteringLayer, RequestBody};
use crate::problem::is_grpc;
use crate::time::Timestamp;

/// The service made by [`MeteringLayer`]. See the [module docs](crate::metering).
///
/// Not a `Service` on its own: the [gate](crate::gate::PaymentGate) of the same
/// [`Billing`](crate::Billing) wraps it and hands it each request it admitted, with who pays
/// and what the route costs. Metering without a gate, or outside it, does not compile.
#[derive(Clone)]
pub struct Metering<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<MeterConfig>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Metering<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metering")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Metering<S> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &MeteringLayer) -> Self {
        Metering {
            inner,
            config: layer.config.clone(),
        }
    }

    /// Returns `layer` itself: take the layer from [`Billing::metering`](crate::Billing::metering).
    pub fn layer(layer: MeteringLayer) -> MeteringLayer {
        layer
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Metering<S> {
    /// Drives the inner service to readiness (the gate's `poll_ready`).
    pub(crate) fn poll_ready<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<R>,
    {
        self.inner.poll_ready(cx)
    }

    /// Meters one request the gate admitted: reserve, then call the inner service, which was
    /// driven to readiness. When the call happens right here (no I/O to wait for) the ready
    /// service itself is called; when it happens later, the ready one is taken along and a
    /// fresh clone left in its place.
    pub(crate) fn call_admitted<ReqBody>(
        &mut self,
        req: Request<ReqBody>,
        admission: Admission,
        now: Timestamp,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>> + Clone + Send + 'static,
        ReqBody: Body<Data = Bytes> + Send + 'static,
    {
        let config = &self.config;
        let inner = &mut self.inner;
        let (entitlement, gate_charge) = match admission {
            Admission::Public => {
                return ResponseFuture::unmetered(inner.call(req.map(RequestBody::passthrough)))
            }
            Admission::FailedOpen => {
                crate::observe::decision(crate::observe::Outcome::FailedOpen, None, None);
                tracing::warn!(
                    target: "tower_402::metering",
                    "gate failed open; request served unmetered"
                );
                return ResponseFuture::unmetered(inner.call(req.map(RequestBody::passthrough)));
            }
            Admission::Entitled(entitlement, charge) => (entitlement, charge),
        };
        // A gRPC request gets gRPC answers, and its errors are not billed.
        let grpc = is_grpc(req.headers());
        let idem = match idempotency_key(req.headers()) {
            Ok(k) => k.map(idempotent_key),
            Err(denial) => {
                log_denial(Some(&entitlement.account), &denial);
                return ResponseFuture::refused(denial, config.clone(), now, grpc);
            }
        };
        let (parts, body) = req.into_parts();
        let needs_body = config
            .pricing
            .as_ref()
            .is_some_and(|p| p.needs_body(&parts));
        let start = Start {
            parts,
            entitlement,
            gate_charge,
            idem,
            now,
            #[cfg(feature = "usage")]
            model: None,
        };
        // With an in-process ledger and no body to read, preparing needs no I/O: it runs here,
        // with no future to allocate.
        // A request with an `Idempotency-Key` may be a retry to answer from its record, which
        // takes reading its body: it goes the way that may wait.
        if let Some(ledger) = config
            .ledger
            .in_process()
            .filter(|_| !needs_body && start.idem.is_none())
        {
            let prepared = prepare_now(config, ledger, start, RequestBody::passthrough(body));
            return ResponseFuture::prepared(prepared, inner, config, now, grpc);
        }
        // A shared ledger that may hold this request in this process (a lease): tried first,
        // the way that may wait if it cannot.
        let (start, body) = match config
            .ledger
            .local_holds()
            .filter(|_| !needs_body && start.idem.is_none())
        {
            Some(holds) => match prepare_local(config, holds, start, body) {
                Ok(prepared) => {
                    return ResponseFuture::prepared(prepared, inner, config, now, grpc)
                }
                Err(back) => back,
            },
            None => (start, body),
        };
        // Keep the service that was driven to readiness; leave a fresh clone in its place.
        let clone = inner.clone();
        let inner = std::mem::replace(inner, clone);
        let prepare = prepare_later(config.clone(), start, body, needs_body);
        ResponseFuture::preparing(Box::pin(prepare), inner, config.clone(), now, grpc)
    }
}

/// A request the gate admitted, on its way to its reservation.
pub(crate) struct Start {
    parts: http::request::Parts,
    entitlement: Entitlement,
    gate_charge: Option<crate::charge::Charge>,
    idem: Option<crate::ledger::ReservationKey>,
    now: Timestamp,
    /// The model an LLM request's body names, for its usage event.
    #[cfg(feature = "usage")]
    model: Option<String>,
}

/// What the ledger step came to.
// Short-lived and moved once: boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Booked {
    /// Held, by a record or an in-process hold.
    Held(Ticket),
    /// A retry of a request already settled under its key: answered from its record.
    Replayed,
    /// The ledger is down and the layer fails open.
    Unmetered,
}

/// The charges of a request whose body is not read: the gate's route cost, or the pricing
/// rule's estimate from its head.
fn price_route(
    config: &MeterConfig,
    start: &Start,
) -> Result<Option<crate::metering::pricing::Priced>, Denial> {
    price(
        config,
        &start.parts,
        None,
        &start.entitlement,
        start.gate_charge.as_ref(),
        start.now,
    )
}

/// Everything before the inner call, without I/O: price from the route's cost, hold in the
/// in-process ledger.
fn prepare_now<B>(
    config: &Arc<MeterConfig>,
    ledger: &dyn crate::in_process::InProcessLedger,
    mut start: Start,
    body: RequestBody<B>,
) -> Prepared<B> {
    let priced = match price_route(config, &start) {
        Ok(c) => c,
        Err(denial) => return refuse(denial, &start.entitlement.account),
    };
    let Some(priced) = priced else {
        return admitted(config, start, body, None);
    };
    let left: Vec<(usize, u64)> = priced
        .to_lower()
        .filter_map(|(i, c)| {
            let w = c.allowance?;
            let usage =
                ledger.allowance_usage(&start.entitlement.account, &c.meter, w.start, start.now);
            allowance_left(config, &start.entitlement.account, c, w.limit, usage).map(|l| (i, l))
        })
        .collect();
    let (charges, _, lowered) = priced.lower(&left);
    start.entitlement.lowered = lowered;
    let account = &start.entitlement.account;
    // No key (requests with one go to `prepare_later`): a hold owned by the request's guard,
    // no record (see `in_process`).
    let booked = on_hold(
        config,
        account,
        ledger.hold(account, charges.as_slice(), start.now),
        charges,
    );
    match booked {
        Ok(booked) => admitted(config, start, body, Some(booked)),
        Err(denial) => refuse(denial, account),
    }
}

/// [`prepare_now`] for a shared ledger's [local holds](crate::in_process::LocalHolds): priced
/// from the route's cost and held in this process, or given back (`Err`) for
/// [`prepare_later`] when the ledger cannot hold it here (no lease, not enough leased, an
/// allowance to count). Nothing is held or refused on the way back.
// The request travels back by value (a miss is answered on the async path); boxing it would
// cost an allocation per request.
#[allow(clippy::result_large_err)]
fn prepare_local<B>(
    config: &Arc<MeterConfig>,
    holds: &dyn crate::in_process::LocalHolds,
    mut start: Start,
    body: B,
) -> Result<Prepared<B>, (Start, B)> {
    let priced = match price_route(config, &start) {
        Ok(c) => c,
        Err(denial) => return Ok(refuse(denial, &start.entitlement.account)),
    };
    let Some(priced) = priced else {
        return Ok(admitted(
            config,
            start,
            RequestBody::passthrough(body),
            None,
        ));
    };
    // An allowance is counted by the shared ledger.
    if priced.to_lower().next().is_some() {
        return Err((start, body));
    }
    let charges = priced.charges;
    let account = &start.entitlement.account;
    let Some(hold) = holds.try_hold(account, charges.as_slice(), start.now) else {
        return Err((start, body));
    };
    start.entitlement.lowered = Vec::new();
    let credits = hold.credits;
    let ticket = Ticket {
        available_after: hold.available_after,
        allowance_units: hold.allowance_units.clone(),
        allowance_left: hold.allowance_left.clone(),
        guard: Guard::new(
            config.clone(),
            Held::Local(account.clone(), hold),
            credits,
            charges,
        ),
    };
    let booked = Some(Booked::Held(ticket));
    Ok(admitted(
        config,
        start,
        RequestBody::passthrough(body),
        booked,
    ))
}

/// Everything before the inner call, when it may wait: read the body if the pricing needs it,
/// estimate, reserve.
async fn prepare_later<B>(
    config: Arc<MeterConfig>,
    start: Start,
    body: B,
    needs_body: bool,
) -> Prepared<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let config = &config;
    let account = &start.entitlement.account;
    // A keyed request's body digest, for the record of its response: of the bytes read to
    // price it, or taken as the handler reads the body.
    let (body, peeked, tap) = if needs_body {
        match read_whole(config, body).await {
            Ok((bytes, rest)) => {
                let tap = start.idem.as_ref().map(|_| Tap::whole(&bytes));
                (RequestBody::peeked(bytes.clone(), rest), Some(bytes), tap)
            }
            Err(denial) => return refuse(denial, account),
        }
    } else if start.idem.is_some() {
        let tap = Tap::new(body.is_end_stream());
        (RequestBody::digesting(body, tap.clone()), None, Some(tap))
    } else {
        (RequestBody::passthrough(body), None, None)
    };
    #[cfg(feature = "usage")]
    let start = {
        let mut start = start;
        start.model = config
            .outbox
            .as_ref()
            .and(peeked.as_deref())
            .and_then(model_of);
        start
    };
    if crate::observe::tracing_request() {
        #[cfg(feature = "usage")]
        let model = start.model.clone();
        #[cfg(not(feature = "usage"))]
        let model = peeked.as_deref().and_then(model_of);
        if let Some(model) = model.or_else(|| peeked.as_deref().and_then(model_of)) {
            crate::observe::record_model(&model);
        }
    }
    let account = &start.entitlement.account;
    let priced = match price(
        config,
        &start.parts,
        peeked.as_deref(),
        &start.entitlement,
        start.gate_charge.as_ref(),
        start.now,
    ) {
        Ok(c) => c,
        Err(denial) => return refuse(denial, account),
    };
    let Some(priced) = priced else {
        return admitted(config, start, body, None);
    };
    let mut left = Vec::new();
    for (i, c) in priced.to_lower() {
        let Some(w) = c.allowance else { continue };
        let usage = match config.ledger.in_process() {
            Some(ledger) => ledger.allowance_usage(account, &c.meter, w.start, start.now),
            None => {
                bounded(
                    "ledger.allowance_usage",
                    config.timeout,
                    config
                        .ledger
                        .allowance_usage(account, &c.meter, w.start, start.now),
                )
                .await
            }
        };
        if let Some(l) = allowance_left(config, account, c, w.limit, usage) {
            left.push((i, l));
        }
    }
    let (charges, estimated, lowered) = priced.lower(&left);
    let mut start = start;
    start.entitlement.lowered = lowered;
    let account = &start.entitlement.account;
    let booked = match (config.ledger.in_process(), &start.idem) {
        (Some(ledger), None) => on_hold(
            config,
            account,
            ledger.hold(account, charges.as_slice(), start.now),
            charges,
        ),
        (in_process, key) => {
            let key = key.clone().unwrap_or_else(unique_key);
            let request =
                reserve_request(config, &start, key, &charges, &estimated, peeked.as_deref());
            match in_process {
                Some(ledger) => on_reserve(config, account, ledger.reserve(&request), charges),
                None => reserve_shared(config, &request, charges).await,
            }
        }
    };
    match booked {
        Ok(Booked::Replayed) => replay(config, &start, body, peeked).await,
        Ok(Booked::Held(mut ticket)) => {
            if let (Some(key), Some(tap)) = (&start.idem, tap) {
                let id = crate::ledger::ReservationId {
                    account: account.clone(),
                    key: key.clone(),
                };
                ticket
                    .guard
                    .record(Recorder::new(id, tap, config.max_recorded_response));
            }
            admitted(config, start, body, Some(Booked::Held(ticket)))
        }
        Ok(booked) => admitted(config, start, body, Some(booked)),
        Err(denial) => refuse(denial, account),
    }
}

/// The answer to a retry of a request already served and settled under its key: the recorded
/// response if the retry is the same request (same body digest), `409` otherwise. Never the
/// handler: running it again would be free, or a second charge.
async fn replay<B>(
    config: &MeterConfig,
    start: &Start,
    body: RequestBody<B>,
    peeked: Option<Bytes>,
) -> Prepared<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let account = &start.entitlement.account;
    let Some(key) = &start.idem else {
        return refuse(Denial::IdempotencyResponseNotRecorded, account);
    };
    let id = crate::ledger::ReservationId {
        account: account.clone(),
        key: key.clone(),
    };
    let record = match config.ledger.records() {
        Some(records) => bounded("records.get", config.timeout, records.get(&id, start.now)).await,
        None => Ok(None),
    };
    let record = match record {
        Ok(Some(record)) => record,
        Ok(None) => {
            tracing::info!(
                target: "tower_402::metering",
                account = account.as_str(),
                "retry of a settled request without a recorded response (too large, expired or \
                 dropped); refused, not run again"
            );
            return refuse(Denial::IdempotencyResponseNotRecorded, account);
        }
        Err(e) => {
            // Never fail open here: that would run the request again for free.
            tracing::error!(
                target: "tower_402::metering",
                account = account.as_str(),
                error = %e,
                "recorded responses unreachable; failing closed"
            );
            return refuse(
                Denial::Unavailable {
                    retry_after_secs: config.retry_after_secs,
                },
                account,
            );
        }
    };
    let bytes = match peeked {
        Some(bytes) => bytes,
        None => match read_whole(config, body).await {
            Ok((bytes, _)) => bytes,
            Err(denial) => return refuse(denial, account),
        },
    };
    if !record.body.matches(&bytes) {
        tracing::info!(
            target: "tower_402::metering",
            account = account.as_str(),
            "idempotency key reused with another request body"
        );
        return refuse(Denial::IdempotencyConflict { in_progress: false }, account);
    }
    match record.recording {
        Recording::Response(response) => {
            tracing::info!(
                target: "tower_402::metering",
                account = account.as_str(),
                status = response.status,
                "idempotent retry of a settled request; replaying the recorded response, not \
                 charged again"
            );
            crate::observe::decision(crate::observe::Outcome::Replayed, None, Some(account));
            Prepared::Replay(response)
        }
        _ => {
            tracing::info!(
                target: "tower_402::metering",
                account = account.as_str(),
                "retry of a settled request whose response was too large to record; refused"
            );
            refuse(Denial::IdempotencyResponseNotRecorded, account)
        }
    }
}

/// Reads a whole request body, bounded by `max_body`: `413 REQUEST_TOO_LARGE` beyond,
/// `400 INVALID_REQUEST` if it cannot be read.
async fn read_whole<B>(config: &MeterConfig, body: B) -> Result<(Bytes, Pin<Box<B>>), Denial>
where
    B: Body<Data = Bytes>,
{
    match peek(body, config.max_body).await {
        Ok(read) => Ok(read),
        Err(PeekError::TooLarge) => Err(Denial::Custom(Box::new(
            crate::decision::CustomDenial::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "REQUEST_TOO_LARGE",
                "Request too large",
                format!(
                    "The request body is larger than the {} bytes this API reads.",
                    config.max_body
                ),
            ),
        ))),
        Err(PeekError::Body(_)) => Err(Denial::BadRequest {
            code: "INVALID_REQUEST",
            detail: "The request body could not be read.".into(),
        }),
    }
}
fn refuse<B>(denial: Denial, account: &AccountId) -> Prepared<B> {
    Prepared::Refuse {
        denial,
        account: Some(account.clone()),
    }
}

/// The reservation for `start` under `key`. Only a client's idempotency key needs a
/// fingerprint: a key unique to this request never comes back.
fn reserve_request(
    config: &MeterConfig,
    start: &Start,
    key: crate::ledger::ReservationKey,
    charges: &Charges,
    estimated: &Charges,
    body: Option<&[u8]>,
) -> ReserveRequest {
    let idempotent = start.idem.is_some();
    ReserveRequest {
        account: start.entitlement.account.clone(),
        key,
        // Of the charges as estimated: a retry's are lowered by what is left when it comes.
        fingerprint: if idempotent {
            fingerprint(&start.parts, estimated.as_slice(), body)
        } else {
            0
        },
        charges: charges.to_arc(),
        ttl_secs: config.ttl_secs,
        idempotent,
        // The handler runs on this reservation's reply.
        on_expiry: crate::ledger::OnExpiry::Charge,
        // A retry of this call after a lost reply gets this reservation back.
        attempt: crate::metering::idempotency::attempt_id(),
        now: start.now,
    }
}

/// What is left of a charge's allowance, to lower its estimate to; `None` (the estimate is
/// reserved as it is) if the ledger cannot say.
fn allowance_left(
    config: &MeterConfig,
    account: &AccountId,
    charge: &crate::charge::Charge,
    limit: u64,
    usage: Result<crate::ledger::AllowanceUsage, LedgerError>,
) -> Option<u64> {
    let _ = config;
    match usage {
        Ok(u) => Some(limit.saturating_sub(u.taken())),
        Err(e) => {
            tracing::warn!(
                target: "tower_402::metering",
                account = account.as_str(),
                meter = charge.meter.as_str(),
                error = %e,
                "allowance unreadable; reserving the whole estimate"
            );
            None
        }
    }
}

/// A ledger error: fail open (unmetered, logged) or closed (503).
fn outage(config: &MeterConfig, account: &AccountId, e: &LedgerError) -> Result<Booked, Denial> {
    if is_outage(e) && config.failure == FailureMode::Open {
        tracing::warn!(
            target: "tower_402::metering",
            account = account.as_str(),
            error = %e,
            "ledger unreachable; failing open, request served unmetered"
        );
        return Ok(Booked::Unmetered);
    }
    tracing::error!(
        target: "tower_402::metering",
        account = account.as_str(),
        error = %e,
        "reservation failed; failing closed"
    );
    Err(Denial::Unavailable {
        retry_after_secs: config.retry_after_secs,
    })
}

/// Reserves on a shared ledger. A reservation whose reply was lost (the ledger unreachable or
/// timed out: it may have gone through) is tried once more at once, under the same key, which
/// also gets a fresh connection after a backend restart. If that finds the first attempt held
/// (a key unique to this request answering "in progress"), the hold is given back, the
/// release queued like any other if it cannot land now, and the request refused with `503`:
/// its handler never runs, so it is never charged, and the credit is not locked for a TTL.
async fn reserve_shared(
    config: &Arc<MeterConfig>,
    request: &ReserveRequest,
    charges: Charges,
) -> Result<Booked, Denial> {
    let account = &request.account;
    let call = || {
        bounded(
            "ledger.reserve",
            config.timeout,
            config.ledger.reserve(request),
        )
    };
    let outcome = match call().await {
        Err(e) if is_outage(&e) => {
            tracing::warn!(
                target: "tower_402::metering",
                account = account.as_str(),
                error = %e,
                "reservation failed; trying once more under the same key"
            );
            call().await
        }
        outcome => return on_reserve(config, account, outcome, charges),
    };
    // The retry carries the same attempt number: a ledger that keeps it (every backend of
    // this crate) gives back the reservation whose reply was lost, and the request goes on.
    // One that does not answers "in progress": on a key unique to this request that can only
    // be the lost one, so it is released and the request refused; under a client's key it
    // may be a concurrent duplicate, so it is left alone (409, and charged at its expiry).
    match outcome {
        Ok(ReserveOutcome::Replayed(Replay::InProgress)) if !request.idempotent => {
            tracing::warn!(
                target: "tower_402::metering",
                account = account.as_str(),
                "the first reservation had gone through; its reply was lost and this ledger \
                 does not keep attempts. Released; the request is refused, its handler never \
                 ran"
            );
            let mut guard = Guard::new(
                config.clone(),
                Held::Reservation(request.id()),
                crate::credits::Credits::ZERO,
                charges,
            );
            if let Some(release) = guard.release() {
                release.await;
            }
            Err(Denial::Unavailable {
                retry_after_secs: config.retry_after_secs,
            })
        }
        outcome => on_reserve(config, account, outcome, charges),
    }
}

/// What a keyed reservation answered.
fn on_reserve(
    config: &Arc<MeterConfig>,
    account: &AccountId,
    outcome: Result<ReserveOutcome, LedgerError>,
    charges: Charges,
) -> Result<Booked, Denial> {
    match outcome {
        Ok(ReserveOutcome::Reserved(r)) => Ok(Booked::Held(Ticket {
            guard: Guard::new(config.clone(), Held::Reservation(r.id), r.credits, charges),
            available_after: r.available_after,
            allowance_units: r.allowance_units,
            allowance_left: r.allowance_left,
        })),
        // Answered from the recorded response, not charged again (see `replay`).
        Ok(ReserveOutcome::Replayed(Replay::Completed(_))) => Ok(Booked::Replayed),
        Ok(ReserveOutcome::Replayed(_)) => Err(Denial::IdempotencyConflict { in_progress: true }),
        Ok(ReserveOutcome::Denied(denial)) => Err(denial),
        Err(LedgerError::KeyConflict) => Err(Denial::IdempotencyConflict { in_progress: false }),
        Err(e) => outage(config, account, &e),
    }
}

/// What an in-process hold answered.
fn on_hold(
    config: &Arc<MeterConfig>,
    account: &AccountId,
    outcome: Result<Result<crate::ledger::Hold, Denial>, LedgerError>,
    charges: Charges,
) -> Result<Booked, Denial> {
    match outcome {
        Ok(Ok(hold)) => {
            let (credits, available_after, allowance_units, allowance_left) = (
                hold.credits,
                hold.available_after,
                hold.allowance_units.clone(),
                hold.allowance_left.clone(),
            );
            Ok(Booked::Held(Ticket {
                guard: Guard::new(
                    config.clone(),
                    Held::Hold(account.clone(), hold),
                    credits,
                    charges,
                ),
                available_after,
                allowance_units,
                allowance_left,
            }))
        }
        Ok(Err(denial)) => Err(denial),
        Err(e) => outage(config, account, &e),
    }
}

/// The request goes on to the handler: its entitlement, now with what the reservation left
/// and any soft-limit warning, goes into the request extensions (once).
fn admitted<B>(
    config: &MeterConfig,
    start: Start,
    body: RequestBody<B>,
    booked: Option<Booked>,
) -> Prepared<B> {
    #[cfg(feature = "usage")]
    let export = config
        .outbox
        .as_ref()
        .map(|_| (start.idem.clone(), start.now, start.model.clone()));
    let Start {
        mut parts,
        mut entitlement,
        ..
    } = start;
    let outcome = match booked {
        Some(Booked::Unmetered) => crate::observe::Outcome::FailedOpen,
        _ => crate::observe::Outcome::Allowed,
    };
    crate::observe::decision(outcome, None, Some(&entitlement.account));
    let ticket = match booked {
        // A replay never gets here (see `replay`).
        None | Some(Booked::Unmetered) | Some(Booked::Replayed) => None,
        Some(Booked::Held(mut ticket)) => {
            if let Some(limit) = entitlement.plan.as_ref().and_then(|p| p.overdraft) {
                ticket.guard.overdraft(limit);
            }
            entitlement.available = Some(ticket.available_after);
            if let Some(w) = crate::metering::headers::soft_limit(config, &ticket) {
                entitlement.warnings.push(w);
            }
            #[cfg(feature = "usage")]
            let ticket = {
                let mut ticket = ticket;
                if let Some((idem, now, model)) = export {
                    let context = usage_context(&parts, idem.as_deref(), &ticket, now, model);
                    ticket.guard.export(context);
                }
                ticket
            };
            Some(ticket)
        }
    };
    let warnings = entitlement.warnings.clone();
    parts.extensions.insert(entitlement);
    Prepared::Call {
        req: Request::from_parts(parts, body),
        ticket,
        warnings,
    }
}

/// The `model` an LLM request's JSON body names (other members are skipped unread).
fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// What the usage event of this request will say besides its settlement.
#[cfg(feature = "usage")]
fn usage_context(
    parts: &http::request::Parts,
    idem: Option<&str>,
    ticket: &Ticket,
    now: Timestamp,
    model: Option<String>,
) -> crate::usage::UsageContext {
    let reservation = match ticket.guard.reservation_key() {
        Some(key) => key.to_owned(),
        None => crate::metering::idempotency::unique_key().to_string(),
    };
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    crate::usage::UsageContext {
        reservation,
        route: format!("{} {}", parts.method, parts.uri.path()),
        model,
        request_id,
        idempotency_key_sha256: idem
            .map(|k| crate::usage::sha256_hex(&[k.strip_prefix("idem:").unwrap_or(k).as_bytes()])),
        started_at: now,
    }
}
