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
use crate::ledger::{Replay, ReserveOutcome, ReserveRequest};
use crate::metering::future::{Prepared, ResponseFuture, Ticket};
use crate::metering::guard::{Charges, Guard, Held};
use crate::metering::idempotency::{fingerprint, idempotency_key, idempotent_key, unique_key};
use crate::metering::pricing::price;
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
        };
        // With an in-process ledger and no body to read, preparing needs no I/O: it runs here,
        // with no future to allocate.
        if let Some(ledger) = config.ledger.in_process().filter(|_| !needs_body) {
            let prepared = prepare_now(config, ledger, start, RequestBody::passthrough(body));
            return ResponseFuture::prepared(prepared, inner, config, now, grpc);
        }
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
}

/// What the ledger step came to.
// Short-lived and moved once: boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Booked {
    /// Held, by a record or an in-process hold.
    Held(Ticket),
    /// A retry of a request already settled under its key: not charged again.
    Replayed,
    /// The ledger is down and the layer fails open.
    Unmetered,
}

/// Everything before the inner call, without I/O: price from the route's cost, hold in the
/// in-process ledger.
fn prepare_now<B>(
    config: &Arc<MeterConfig>,
    ledger: &dyn crate::in_process::InProcessLedger,
    start: Start,
    body: RequestBody<B>,
) -> Prepared<B> {
    let charges = match price(
        config,
        &start.parts,
        None,
        &start.entitlement,
        start.gate_charge.as_ref(),
        start.now,
    ) {
        Ok(c) => c,
        Err(denial) => return refuse(denial, &start.entitlement.account),
    };
    let Some(charges) = charges else {
        return admitted(config, start, body, None);
    };
    let account = &start.entitlement.account;
    let booked = match &start.idem {
        // No key: a hold owned by the request's guard, no record (see `in_process`).
        None => on_hold(
            config,
            account,
            ledger.hold(account, charges.as_slice(), start.now),
            charges,
        ),
        Some(key) => {
            let request = reserve_request(config, &start, key.clone(), &charges, None);
            on_reserve(config, account, ledger.reserve(&request), charges)
        }
    };
    match booked {
        Ok(booked) => admitted(config, start, body, Some(booked)),
        Err(denial) => refuse(denial, account),
    }
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
    let (body, peeked) = if needs_body {
        match peek(body, config.max_body).await {
            Ok((bytes, rest)) => (RequestBody::peeked(bytes.clone(), rest), Some(bytes)),
            Err(PeekError::TooLarge) => {
                let denial = Denial::Custom(Box::new(crate::decision::CustomDenial::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "REQUEST_TOO_LARGE",
                    "Request too large",
                    format!(
                        "The request body is larger than the {} bytes this API prices.",
                        config.max_body
                    ),
                )));
                return refuse(denial, account);
            }
            Err(PeekError::Body(_)) => {
                let denial = Denial::BadRequest {
                    code: "INVALID_REQUEST",
                    detail: "The request body could not be read.".into(),
                };
                return refuse(denial, account);
            }
        }
    } else {
        (RequestBody::passthrough(body), None)
    };
    let charges = match price(
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
    let Some(charges) = charges else {
        return admitted(config, start, body, None);
    };
    let booked = match (config.ledger.in_process(), &start.idem) {
        (Some(ledger), None) => on_hold(
            config,
            account,
            ledger.hold(account, charges.as_slice(), start.now),
            charges,
        ),
        (in_process, key) => {
            let key = key.clone().unwrap_or_else(unique_key);
            let request = reserve_request(config, &start, key, &charges, peeked.as_deref());
            let outcome = match in_process {
                Some(ledger) => ledger.reserve(&request),
                None => bounded(config.timeout, config.ledger.reserve(&request)).await,
            };
            on_reserve(config, account, outcome, charges)
        }
    };
    match booked {
        Ok(booked) => admitted(config, start, body, Some(booked)),
        Err(denial) => refuse(denial, account),
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
    body: Option<&[u8]>,
) -> ReserveRequest {
    let idempotent = start.idem.is_some();
    ReserveRequest {
        account: start.entitlement.account.clone(),
        key,
        fingerprint: if idempotent {
            fingerprint(&start.parts, charges.as_slice(), body)
        } else {
            0
        },
        charges: charges.to_arc(),
        ttl_secs: config.ttl_secs,
        idempotent,
        now: start.now,
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

/// What a keyed reservation answered.
fn on_reserve(
    config: &Arc<MeterConfig>,
    account: &AccountId,
    outcome: Result<ReserveOutcome, LedgerError>,
    charges: Charges,
) -> Result<Booked, Denial> {
    match outcome {
        Ok(ReserveOutcome::Reserved(r)) => Ok(Booked::Held(Ticket {
            guard: Guard::new(config.clone(), Held::Reservation(r.id), charges),
            available_after: r.available_after,
            allowance_units: r.allowance_units,
            allowance_left: r.allowance_left,
        })),
        Ok(ReserveOutcome::Replayed(Replay::Completed(_))) => {
            tracing::info!(
                target: "tower_402::metering",
                account = account.as_str(),
                "idempotent retry of a settled request; not charged again"
            );
            Ok(Booked::Replayed)
        }
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
            let (available_after, allowance_units, allowance_left) = (
                hold.available_after,
                hold.allowance_units.clone(),
                hold.allowance_left.clone(),
            );
            Ok(Booked::Held(Ticket {
                guard: Guard::new(config.clone(), Held::Hold(account.clone(), hold), charges),
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
    let Start {
        mut parts,
        mut entitlement,
        ..
    } = start;
    let (ticket, replayed) = match booked {
        None | Some(Booked::Unmetered) => (None, false),
        Some(Booked::Replayed) => (None, true),
        Some(Booked::Held(ticket)) => {
            entitlement.available = Some(ticket.available_after);
            if let Some(w) = crate::metering::headers::soft_limit(config, &ticket) {
                entitlement.warnings.push(w);
            }
            (Some(ticket), false)
        }
    };
    let warnings = entitlement.warnings.clone();
    parts.extensions.insert(entitlement);
    Prepared::Call {
        req: Request::from_parts(parts, body),
        ticket,
        replayed,
        warnings,
    }
}
