//! [`MeteredBody`]: the response body that feeds the usage reader and settles at its end.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::metering::guard::{BoxFuture, Guard, Pass};

pub(crate) fn spawn_or_expire(fut: BoxFuture, account: &str) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
        }
        Err(_) => tracing::warn!(
            target: "tower_402::metering",
            account,
            "no Tokio runtime to finish a reservation; it will expire"
        ),
    }
}

/// A settlement under way. If the body is dropped before it completes (the client went away
/// while the last frame was held back), it goes on in a task instead of being lost.
pub(crate) struct Unfinished {
    fut: Option<BoxFuture>,
    account: crate::account::AccountId,
}

impl Unfinished {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(fut) = &mut self.fut {
            ready!(fut.as_mut().poll(cx));
            self.fut = None;
        }
        Poll::Ready(())
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            spawn_or_expire(fut, self.account.as_str());
        }
    }
}

// The guard inline: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Finish {
    Open(Guard),
    Running {
        fut: Unfinished,
        last: Option<Frame<Bytes>>,
        /// The stream was cut: after `last`, it ends (the inner body is not read again).
        cut: bool,
    },
    Done,
    /// Cut short by the dry-stream policy: nothing more.
    Ended,
}

pin_project! {
    /// Response body of [`Metering`](crate::metering::Metering): the inner body, fed to the
    /// usage extractor as it streams, and settled with the ledger when it ends (before its
    /// last frame is handed out, so a client holding the whole body sees a settled ledger).
    pub struct MeteredBody<B> {
        #[pin]
        body: ResponseBody<B>,
        finish: Finish,
        // A trailers frame waiting behind the held-back end of the last event. Boxed: it is
        // rare, and this body is moved whole on every response.
        stash: Option<Box<Frame<Bytes>>>,
    }
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("open", &matches!(self.finish, Finish::Open(_)))
            .finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    pub(crate) fn plain(body: ResponseBody<B>) -> Self {
        MeteredBody {
            body,
            finish: Finish::Done,
            stash: None,
        }
    }

    pub(crate) fn metered(body: ResponseBody<B>, guard: Guard) -> Self {
        MeteredBody {
            body,
            finish: Finish::Open(guard),
            stash: None,
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            match this.finish {
                Finish::Done => return this.body.as_mut().poll_frame(cx),
                Finish::Ended => return Poll::Ready(None),
                Finish::Running { fut, last, cut } => {
                    ready!(fut.poll(cx));
                    let last = last.take();
                    *this.finish = if *cut { Finish::Ended } else { Finish::Done };
                    return Poll::Ready(last.map(Ok));
                }
                Finish::Open(guard) => {
                    let frame = match this.stash.take() {
                        Some(stashed) => Some(Ok(*stashed)),
                        None => ready!(this.body.as_mut().poll_frame(cx)),
                    };
                    match frame {
                        Some(Ok(frame)) => {
                            let frame = if let Some(data) = frame.data_ref() {
                                match guard.data(data) {
                                    Pass::Whole => frame,
                                    Pass::Part(passed) => {
                                        if !this.body.is_end_stream() {
                                            if passed.is_empty() {
                                                continue;
                                            }
                                            return Poll::Ready(Some(Ok(Frame::data(passed))));
                                        }
                                        // The last frame: with what was held back.
                                        match guard.flush() {
                                            Some(rest) => {
                                                Frame::data([passed, rest].concat().into())
                                            }
                                            None => Frame::data(passed),
                                        }
                                    }
                                    Pass::Cut(passed) => {
                                        // The balance cannot pay for the next event: end the
                                        // stream with an error event instead, and settle what
                                        // went out.
                                        let (event, action) = guard.cut();
                                        let last = match event {
                                            Some(e) => [passed, e].concat().into(),
                                            None => passed,
                                        };
                                        let last = (!last.is_empty()).then(|| Frame::data(last));
                                        match guard.finish_at_end(action) {
                                            Some(fut) => {
                                                *this.finish = Finish::Running {
                                                    fut: Unfinished {
                                                        fut: Some(fut),
                                                        account: guard.account_id().clone(),
                                                    },
                                                    last,
                                                    cut: true,
                                                }
                                            }
                                            None => {
                                                *this.finish = Finish::Ended;
                                                return Poll::Ready(last.map(Ok));
                                            }
                                        }
                                        continue;
                                    }
                                }
                            } else {
                                if let Some(rest) = guard.flush() {
                                    // What was held back goes out before the trailers (which
                                    // come back through the stash).
                                    *this.stash = Some(Box::new(frame));
                                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                                }
                                if let Some(trailers) = frame.trailers_ref() {
                                    guard.trailers(trailers);
                                }
                                frame
                            };
                            // Trailers are always the last frame (a server may not poll the
                            // body again after them).
                            if !frame.is_trailers() && !this.body.is_end_stream() {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                            // The last frame: settle before handing it out.
                            let action = guard.at_end();
                            match guard.finish_at_end(action) {
                                Some(fut) => {
                                    *this.finish = Finish::Running {
                                        fut: Unfinished {
                                            fut: Some(fut),
                                            account: guard.account_id().clone(),
                                        },
                                        last: Some(frame),
                                        cut: false,
                                    }
                                }
                                None => {
                                    *this.finish = Finish::Done;
                                    return Poll::Ready(Some(Ok(frame)));
                                }
                            }
                        }
                        None => {
                            let rest = guard.flush().map(Frame::data);
                            let action = guard.at_end();
                            match guard.finish_at_end(action) {
                                Some(fut) => {
                                    *this.finish = Finish::Running {
                                        fut: Unfinished {
                                            fut: Some(fut),
                                            account: guard.account_id().clone(),
                                        },
                                        last: rest,
                                        cut: false,
                                    }
                                }
                                None => {
                                    *this.finish = Finish::Done;
                                    return Poll::Ready(rest.map(Ok));
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(
                                target: "tower_402::metering",
                                account = guard.account(),
                                "response body failed mid-stream"
                            );
                            let action = guard.at_error();
                            if let Some(fut) = guard.finish(action) {
                                spawn_or_expire(fut, guard.account());
                            }
                            *this.finish = Finish::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.finish {
            Finish::Ended => true,
            Finish::Done => self.body.is_end_stream(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
