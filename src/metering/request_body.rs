use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::metering::replay::{lock, SharedTap};

pin_project! {
    /// Request body handed to the service inside [`Metering`](crate::metering::Metering): the
    /// original body, or the bytes the layer read to price the request followed by whatever
    /// is left. The handler always sees the body intact.
    pub struct RequestBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] body: B },
        Peeked { buffered: Option<Bytes>, rest: Pin<Box<B>> },
        Digesting { #[pin] body: B, tap: SharedTap },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        RequestBody {
            kind: Kind::Passthrough { body },
        }
    }

    /// The body of a request with an `Idempotency-Key`: its digest is taken as the handler
    /// reads it, for the record of its response.
    pub(crate) fn digesting(body: B, tap: SharedTap) -> Self {
        RequestBody {
            kind: Kind::Digesting { body, tap },
        }
    }

    pub(crate) fn peeked(buffered: Bytes, rest: Pin<Box<B>>) -> Self {
        RequestBody {
            kind: Kind::Peeked {
                buffered: (!buffered.is_empty()).then_some(buffered),
                rest,
            },
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Passthrough { .. } => "RequestBody::Passthrough",
            Kind::Peeked { .. } => "RequestBody::Peeked",
            Kind::Digesting { .. } => "RequestBody::Digesting",
        })
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Peeked { buffered, rest } => match buffered.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => rest.as_mut().poll_frame(cx),
            },
            KindProj::Digesting { mut body, tap } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let mut tap = lock(tap);
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(data) = f.data_ref() {
                            tap.feed(data);
                        }
                        if body.is_end_stream() {
                            tap.end();
                        }
                    }
                    None => tap.end(),
                    Some(Err(_)) => {}
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } | Kind::Digesting { body, .. } => body.is_end_stream(),
            Kind::Peeked { buffered, rest } => buffered.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } | Kind::Digesting { body, .. } => body.size_hint(),
            Kind::Peeked { buffered, rest } => {
                let extra = buffered.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
        }
    }
}

/// Why a body could not be peeked.
pub(crate) enum PeekError<E> {
    TooLarge,
    Body(E),
}

/// Reads the whole body if it is at most `limit` bytes. Trailers are dropped (request
/// trailers are not used by the APIs this prices).
pub(crate) async fn peek<B>(
    body: B,
    limit: usize,
) -> Result<(Bytes, Pin<Box<B>>), PeekError<B::Error>>
where
    B: Body<Data = Bytes>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(PeekError::TooLarge);
    }
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    loop {
        let frame = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => return Err(PeekError::Body(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(PeekError::TooLarge);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok((buf.freeze(), body))
}
