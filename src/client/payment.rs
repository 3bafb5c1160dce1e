use std::future::Future;
use std::pin::Pin;

use super::refusal::Refusal;

/// The boxed future a [`OnPaymentRequired`] returns.
pub type PaymentFuture = Pin<Box<dyn Future<Output = PaymentOutcome> + Send>>;

/// What the application says about a payment condition ([`OnPaymentRequired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// The condition is fixed (credit topped up, plan upgraded): retry the request once,
    /// with the same `Idempotency-Key`.
    Fixed,
    /// Not fixed: hand the refusal to the caller.
    NotFixed,
}

/// Called when a request is refused for a payment condition (a 402, or a gRPC refusal whose
/// `ErrorInfo` reason is one). If it reports [`PaymentOutcome::Fixed`], the request is
/// retried once; a 402 is otherwise never retried.
///
/// A closure `Fn(&Refusal) -> impl Future<Output = PaymentOutcome>` is one; the default is
/// [`NeverFixed`].
pub trait OnPaymentRequired: Clone + Send + Sync + 'static {
    /// Fix `refusal`'s condition if the application can (an automatic top-up, a prompt), and
    /// say whether it did.
    fn on_payment_required(&self, refusal: &Refusal) -> PaymentFuture;
}

/// The default [`OnPaymentRequired`]: nothing is fixed, a payment refusal goes to the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverFixed;

impl OnPaymentRequired for NeverFixed {
    fn on_payment_required(&self, _refusal: &Refusal) -> PaymentFuture {
        Box::pin(std::future::ready(PaymentOutcome::NotFixed))
    }
}

impl<F, Fut> OnPaymentRequired for F
where
    F: Fn(&Refusal) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = PaymentOutcome> + Send + 'static,
{
    fn on_payment_required(&self, refusal: &Refusal) -> PaymentFuture {
        Box::pin(self(refusal))
    }
}
