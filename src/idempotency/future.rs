//! The response future of the idempotency service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{self, HeaderName, HeaderValue};
use http::{request, response, HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_service::Service;

use super::body::{BodyBuf, ReplayBody, Settle};
use super::budget::Reservation;
use super::fingerprint::Fingerprint;
use super::layer::{Config, Counters, FailurePolicy, RebuildBody, Shared};
use super::record::Record;
use super::store::{
    Claim, DetachedWrite, Lease, Store, StoreError, StoreErrorKind, StoreKey, WritesInFlight,
};
use crate::classify::{GrpcCode, GrpcStatus, HttpStatus, Outcome};
use crate::rejection::{Rejection, RejectionKind};
use crate::util::stamp::Marks;

/// The header added to replayed responses.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pin_project! {
    /// Response future of [`Idempotency`](super::Idempotency).
    ///
    /// While the handler runs, this future renews the lease every third of its time to live, so no repeat can claim the
    /// key of a handler that outlives `lease_ttl`. A response whose body is not ready at once
    /// is handed on at its head, its lease first extended to the record's time to live: its
    /// body keeps a copy and writes the record at its end.
    ///
    /// # Cancel safety
    ///
    /// Dropped while its handler runs, it leaves the lease it holds to expire (renewals stop
    /// with it), since the handler may have had its effect: repeats get 409 until then. With
    /// [`release_on_drop(true)`](super::IdempotencyBuilder::release_on_drop) it gives the lease
    /// up at once instead, in `Drop`. Dropped before (reading the request body, claiming), it
    /// holds no lease. Dropped once the handler has answered with a
    /// response to store (reading its body, storing it), the request has run and its key is
    /// never released: the record (or, for a body not read to its end, a record that the
    /// response was not kept) is written under the lease in the background. The same holds
    /// for the body of a response handed on as it streams, dropped before its end. A claim still on
    /// its way to the store is the store's to clean up (see [`Store`]).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, St, M, ReqB, ResB>
    where
        S: Service<Request<ReqB>>,
        St: Store,
    {
        #[pin]
        state: State<S::Future, St::ClaimFuture, St::CompleteFuture, ReqB, ResB>,
        // Boxed: a keyed request allocates anyway (its key, its record), and a request that
        // passes through keeps a small future.
        ctx: Option<Box<Keyed<S, St, M, ResB>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, CF, KF, ReqB, ResB> {
        Passthrough { #[pin] fut: F },
        Ready { out: Option<Result<Response<ReplayBody<ResB>>, BoxError>> },
        ReadBody { #[pin] body: ReqB },
        Claim { #[pin] fut: Option<CF> },
        Wait { #[pin] sleep: Sleep },
        Call { #[pin] fut: F },
        Buffer {
            body: Option<ResB>,
            parts: Option<response::Parts>,
            trailers: Option<HeaderMap>,
        },
        Extend {
            fut: Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>,
            // When the extension was sent, and the time to live it asks for.
            sent: Instant,
            ttl: Duration,
            // Whether a task renews the lease while the body streams (the extension is then
            // one lease's time to live, not the record's).
            keepalive: bool,
            pending: Option<Response<ReplayBody<ResB>>>,
        },
        Complete {
            #[pin]
            fut: KF,
            pending: Option<Response<ReplayBody<ResB>>>,
        },
    }
}

/// Settles the key of a response handed on as it streams when its body ends: holds the
/// lease until then (renewed by a task while the body lives, on a tokio runtime; else
/// extended to the record's time to live). Under the cap it keeps a copy
/// of the body and, at the end, writes its record, or releases the key for a failure judged
/// as a buffered response's would be. Past the cap (from the start, or once the copy grows
/// past it), a gRPC failure (a failing status in the trailers, or a gRPC response that ends
/// with none) releases it; the end, a body error (the handler ran) or a drop writes the
/// record that the response was not kept (the guard does, in `Drop`).
struct Settlement<St: Store> {
    guard: Option<LeaseGuard<St>>,
    shared: Arc<Shared>,
    /// A gRPC response whose head has no `grpc-status`: its trailers must have one.
    needs_status: bool,
    /// The copy of a body still under the cap, to record at its end.
    recording: Option<Box<Recording>>,
    /// Dropped with the body: stops the task that renews the lease while it streams.
    _keepalive: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the task that renews `guard`'s lease every third of `lease_ttl` until the returned
/// sender is dropped (the body ended or went away) or the lease is no longer held (its record
/// written, or lost).
fn keep_alive<St: Store>(
    guard: &LeaseGuard<St>,
    lease_ttl: Duration,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let (store, lease) = (guard.store.clone(), guard.lease().clone());
    tokio::spawn(async move {
        let every = (lease_ttl / 3).max(Duration::from_millis(1));
        loop {
            let tick = std::pin::pin!(tokio::time::sleep(every));
            if let futures_util::future::Either::Left(_) =
                futures_util::future::select(&mut stopped, tick).await
            {
                return;
            }
            match store.renew(&lease, lease_ttl).await {
                Err(e) if e.kind() == StoreErrorKind::LeaseLost => return,
                Err(e) => {
                    tracing::debug!(error = %e, key = ?lease.key(), "could not renew the lease of a streaming response; trying again");
                }
                Ok(()) => {}
            }
        }
    });
    stop
}

/// What a streamed response under the cap keeps to write its record at the end.
struct Recording {
    fingerprint: Fingerprint,
    status: StatusCode,
    /// The head's headers as they are stored (with `Trailer`, dropped at the end if no
    /// trailers came); `None` when there are too many values to keep.
    headers: Option<HeaderMap>,
    /// What the head says of a gRPC call.
    grpc: GrpcHead,
    buf: BodyBuf,
    trailers: Option<HeaderMap>,
    /// The layer's buffer budget held for the copy: what it holds so far (reserved as each
    /// chunk comes, so that streams read slowly hold only what they have produced), given
    /// back at the end.
    room: Reservation,
}

impl<St: Store> Settlement<St> {
    fn release(&mut self, why: &'static str) {
        self.recording = None;
        if let Some(mut g) = self.guard.take() {
            if self._keepalive.is_some() {
                // Renewed while the body streamed: held about a lease from now.
                g.held_until = g.held_until.max(Instant::now() + self.shared.lease_ttl());
            }
            Counters::bump(&self.shared.stats.not_stored);
            tracing::debug!(key = ?g.lease.as_ref().map(Lease::key), why, "streamed response not stored; lease released");
            g.release();
        }
    }

    /// The end of a body recorded under the cap: its record is written under the lease (at
    /// once for a store that completes at once, in the background for another), or its key
    /// released for a failure.
    fn record(&mut self, r: Box<Recording>) {
        let Recording {
            fingerprint,
            status,
            headers,
            grpc,
            mut buf,
            trailers,
            room,
        } = *r;
        let data = buf.take();
        let config = &self.shared.config;
        if end_not_stored_as(grpc, trailers.as_ref(), &data, config) {
            self.release("a failure or refusal status at the end of its body");
            return;
        }
        let tail = match &trailers {
            Some(t) => stored_headers(t, &config.exclude, false).map(Some),
            None => Some(None),
        };
        let record = match (headers, tail) {
            (Some(mut head), Some(tail)) => {
                if tail.is_none() {
                    head.remove(header::TRAILER);
                }
                Record::response(fingerprint, status, head, data, tail)
            }
            _ => Record::not_kept(fingerprint, status),
        };
        // The copy is the record's now: the store holds it (or the write in flight).
        drop(room);
        if let Some(mut g) = self.guard.take() {
            tracing::debug!(key = ?g.lease.as_ref().map(Lease::key), "streamed response ended; writing its record");
            g.record = Some((record, self.shared.ttl()));
        }
    }
}

impl<St: Store> Settle for Settlement<St> {
    fn data(&mut self, data: &Bytes) {
        let Some(r) = self.recording.as_mut() else {
            return;
        };
        if !r.room.grow(&self.shared.buffers, data.len()) {
            // The layer's buffers are full: the copy is given up (and its room given back),
            // and the end decides as for a response past the cap (never run again).
            tracing::debug!(key = ?self.guard.as_ref().and_then(|g| g.lease.as_ref()).map(Lease::key), "no buffer room to keep a streamed response; its end decides");
            self.recording = None;
            return;
        }
        r.buf.push(data.clone());
        if r.buf.len() > self.shared.config.max_response_body {
            // Too large to keep after all: the copy and its room are given back, and the
            // end decides as for any response past the cap.
            tracing::debug!(key = ?self.guard.as_ref().and_then(|g| g.lease.as_ref()).map(Lease::key), "streamed response too large to keep; its end decides");
            self.recording = None;
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(r) = self.recording.as_mut() {
            match &mut r.trailers {
                Some(have) => have.extend(trailers.clone()),
                None => r.trailers = Some(trailers.clone()),
            }
            return;
        }
        if GrpcCode::from_headers(trailers).is_some() {
            self.needs_status = false;
        }
        if trailers_not_stored(trailers, &self.shared.config) {
            self.release("a failure or refusal status in the trailers");
        }
    }

    fn ended(&mut self) {
        if let Some(r) = self.recording.take() {
            self.record(r);
            return;
        }
        if self.needs_status && !self.shared.config.store_failures {
            self.release("a gRPC response that ended without a status");
        }
    }
}

/// What a keyed request carries through its states.
pub(crate) struct Keyed<S, St: Store, M, ResB> {
    inner: Option<S>,
    store: St,
    shared: Arc<Shared>,
    rebuild: M,
    parts: Option<request::Parts>,
    key: StoreKey,
    /// Whether the request is a gRPC call (`content-type: application/grpc...`): its answer
    /// is judged by gRPC's status, a proxy's HTTP status mapped as gRPC does.
    grpc: bool,
    buf: BodyBuf,
    body: Bytes,
    fingerprint: Fingerprint,
    guard: Option<LeaseGuard<St>>,
    /// Until when a lease taken by the claim in flight would be held: when it was sent plus
    /// the lease's time to live.
    claimed_until: Option<(Instant, Duration)>,
    renewal: Option<Renewal<St::RenewFuture>>,
    deadline: Option<Instant>,
    /// The layer's buffer budget held for the request body read so far.
    held: Reservation,
    /// The layer's buffer budget held for the response, reserved before the handler runs.
    room: Reservation,
    /// The copy of a response handed on as it streams, while its lease is extended.
    recording: Option<Box<Recording>>,
    /// The marks of the request's stamp (`util::stamp`): whether a layer of this crate below
    /// refused it, or dropped it while it held it, before the handler could see it.
    marks: Arc<Marks>,
    _body: std::marker::PhantomData<fn() -> ResB>,
}

impl<S, St: Store, M, ResB> Keyed<S, St, M, ResB> {
    pub(crate) fn new(
        inner: S,
        store: St,
        shared: Arc<Shared>,
        rebuild: M,
        mut parts: request::Parts,
        key: StoreKey,
    ) -> Self {
        let marks = crate::util::stamp::marks_of(&mut parts.extensions);
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Keyed {
            inner: Some(inner),
            store,
            shared,
            rebuild,
            parts: Some(parts),
            key,
            grpc,
            buf: BodyBuf::default(),
            body: Bytes::new(),
            fingerprint: Fingerprint::from_u128(0),
            guard: None,
            claimed_until: None,
            renewal: None,
            deadline: None,
            held: Reservation::default(),
            room: Reservation::default(),
            recording: None,
            marks,
            _body: std::marker::PhantomData,
        }
    }

    /// The claim of the key; `None` when this layer is still writing the key's record in
    /// the background (the key is in flight: the store is not asked).
    fn claim(&mut self) -> Option<St::ClaimFuture> {
        if self.shared.writes.contains(&self.key) {
            tracing::debug!(key = ?self.key, "idempotency record still being written; the key is in flight");
            return None;
        }
        let ttl = self.shared.lease_ttl();
        self.claimed_until = Some((Instant::now() + ttl, ttl));
        Some(self.store.claim(&self.key, self.fingerprint, ttl))
    }

    fn release(&mut self) {
        self.renewal = None;
        if let Some(g) = self.guard.take() {
            g.release();
        }
    }

    /// The request ran (or may have) and its response is not kept: its key is recorded so,
    /// never to run again (repeats get 409
    /// [`IdempotencyResponseNotStored`](RejectionKind::IdempotencyResponseNotStored)). The
    /// record that the handler answered `status`, if it did, is kept; else one of `status`.
    /// The write is the guard's (in `Drop`: at once for a store that completes at once, in
    /// the background for another).
    fn keep_not_kept(&mut self, status: StatusCode) {
        self.renewal = None;
        if let Some(mut g) = self.guard.take() {
            if g.record.is_none() {
                g.record = Some((
                    Record::not_kept(self.fingerprint, status),
                    self.shared.ttl(),
                ));
            }
        }
    }

    /// Keeps the lease while the handler runs: renews it when due and polls the renewal in
    /// flight. `Ready` when the lease can no longer be known held (a renewal found it lost, or
    /// none succeeded before it would expire) and the policy is to fail closed: the request
    /// must stop. Failing open, renewing stops and the request goes on.
    fn poll_lease(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(guard) = self.guard.as_mut() else {
            return Poll::Pending;
        };
        if guard.lease.is_none() {
            return Poll::Pending;
        }
        // Made on the first wait only: a handler that answers at once costs no timer.
        let r = self.renewal.get_or_insert_with(|| {
            let next = guard.held_until - guard.ttl + guard.ttl / 3;
            Renewal {
                timer: Box::pin(tokio::time::sleep_until(next)),
                next,
                sent: None,
                stopped: false,
            }
        });
        if r.stopped {
            return Poll::Pending;
        }
        let fail_closed = self.shared.config.policy == FailurePolicy::FailClosed;
        loop {
            if let Some((fut, at, ttl)) = r.sent.as_mut() {
                if let Poll::Ready(done) = fut.as_mut().poll(cx) {
                    let (at, ttl) = (*at, *ttl);
                    r.sent = None;
                    match done {
                        Ok(()) => {
                            guard.held_until = at + ttl;
                            guard.ttl = ttl;
                            r.next = at + ttl / 3;
                        }
                        Err(e) => {
                            Counters::bump(&self.shared.stats.store_errors);
                            if e.kind() == StoreErrorKind::LeaseLost {
                                tracing::warn!(key = ?self.key, "idempotency lease lost while the request runs");
                                if fail_closed {
                                    return Poll::Ready(());
                                }
                                r.stopped = true;
                                return Poll::Pending;
                            }
                            tracing::warn!(error = %e, key = ?self.key, "idempotency lease renewal failed; trying again");
                            r.next = Instant::now() + ttl / 6;
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= guard.held_until {
                tracing::warn!(key = ?self.key, "idempotency lease could not be renewed before it expired");
                if fail_closed {
                    return Poll::Ready(());
                }
                r.stopped = true;
                return Poll::Pending;
            }
            if r.sent.is_none() && now >= r.next {
                let ttl = self.shared.lease_ttl();
                let renew = self.store.renew(guard.lease(), ttl);
                r.sent = Some((Box::pin(renew), now, ttl));
                continue;
            }
            let wake = match r.sent {
                Some(_) => guard.held_until,
                None => r.next.min(guard.held_until),
            };
            if r.timer.deadline() != wake {
                r.timer.as_mut().reset(wake);
            }
            if r.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Hands `res` on as it streams: first extends the lease to the record's time to live,
    /// so that it is held until the body ends however slowly the client reads.
    fn extend<F, CF, KF, ReqB>(
        &mut self,
        res: Response<ReplayBody<ResB>>,
    ) -> State<F, CF, KF, ReqB, ResB> {
        self.renewal = None;
        let guard = self.guard.as_ref().expect("a lease is held");
        // On a tokio runtime a task renews the lease while the body streams, and stops with
        // the body: a process that dies mid-stream leaves the key to expire with one lease,
        // not held for the record's time to live. Without one, the lease is extended to the
        // record's time to live at once.
        let keepalive = tokio::runtime::Handle::try_current().is_ok();
        let ttl = if keepalive {
            self.shared.lease_ttl()
        } else {
            self.shared.ttl()
        };
        let extend = self.store.renew(guard.lease(), ttl);
        State::Extend {
            fut: Box::pin(extend),
            sent: Instant::now(),
            ttl,
            keepalive,
            pending: Some(res),
        }
    }

    /// The request stops because its lease could not be kept (failing closed): its handler
    /// (future or body) is dropped with this state, the lease goes as on a drop at this point,
    /// and the client gets 503.
    fn lease_not_kept<F, CF, KF, ReqB>(&mut self) -> State<F, CF, KF, ReqB, ResB> {
        tracing::warn!(key = ?self.key, "idempotency lease could not be kept; stopping the request (fail closed)");
        self.renewal = None;
        drop(self.guard.take());
        ready_err(Rejection::new(RejectionKind::StoreUnavailable).with_detail(LEASE_NOT_KEPT))
    }
}

/// The lease's renewal while the handler runs.
struct Renewal<F> {
    /// Fires at the next renewal, or at the lease's end while one is in flight.
    timer: Pin<Box<Sleep>>,
    /// When to send the next renewal.
    next: Instant,
    /// The renewal in flight: its future, when it was sent, the time to live it asks for.
    sent: Option<(Pin<Box<F>>, Instant, Duration)>,
    /// The lease could not be kept and the request fails open: no more renewals.
    stopped: bool,
}

/// Holds a lease; in `Drop`, unless it was completed, gives it up (before the handler has
/// answered) or writes its record in the background (after).
struct LeaseGuard<St: Store> {
    store: St,
    lease: Option<Lease>,
    release_on_drop: bool,
    /// The request's marks: one dropped before it ran (held by a layer below when a timeout
    /// above fired) gives its lease up at once.
    marks: Arc<Marks>,
    /// Set once the handler has answered with a response to store: what to write under the
    /// lease, and for how long, if the request ends before its record is written.
    record: Option<(Record, Duration)>,
    /// Until when the lease is known held: when its claim or last renewal was sent, plus the
    /// time to live it asked for (`ttl`).
    held_until: Instant,
    ttl: Duration,
    /// The layer's keys with a record written in the background (`None` for a store that
    /// writes at once): a record written from `Drop` keeps its key there until it ends.
    writes: Option<Arc<WritesInFlight>>,
}

impl<St: Store> LeaseGuard<St> {
    /// Gives the lease up now (failure, error): the key can run again.
    fn release(mut self) {
        self.record = None;
        if let Some(lease) = self.lease.take() {
            self.store.release_detached(lease, self.held_until);
        }
    }

    /// The lease became a record: nothing to give up.
    fn disarm(mut self) {
        self.lease = None;
    }

    fn lease(&self) -> &Lease {
        self.lease
            .as_ref()
            .expect("a guard holds its lease until consumed")
    }
}

impl<St: Store> Drop for LeaseGuard<St> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Some((record, ttl)) = self.record.take() {
                // The handler has run: its key must never run again, so the lease is never
                // given up; it becomes the record, or expires if that cannot be written.
                tracing::debug!(key = ?lease.key(), "idempotent request ended after its handler answered; writing its record in the background");
                let done = match &self.writes {
                    Some(writes) => writes.track(lease.key()),
                    None => DetachedWrite::new(),
                };
                self.store
                    .complete_detached(lease, record, ttl, self.ttl, done);
            } else if self.release_on_drop || self.marks.never_ran() {
                tracing::debug!(key = ?lease.key(), "idempotent request dropped; lease released");
                self.store.release_detached(lease, self.held_until);
            } else {
                tracing::debug!(key = ?lease.key(), "idempotent request dropped; lease left to expire");
            }
        }
    }
}

impl<S, St, M, ReqB, ResB> ResponseFuture<S, St, M, ReqB, ResB>
where
    S: Service<Request<ReqB>>,
    St: Store,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Passthrough { fut },
            ctx: None,
        }
    }

    pub(crate) fn reject(rejection: Rejection) -> Self {
        ResponseFuture {
            state: State::Ready {
                out: Some(Err(rejection.into())),
            },
            ctx: None,
        }
    }

    pub(crate) fn keyed(ctx: Keyed<S, St, M, ResB>, body: ReqB) -> Self {
        ResponseFuture {
            state: State::ReadBody { body },
            ctx: Some(Box::new(ctx)),
        }
    }
}

impl<S, St, M, ReqB, ResB> fmt::Debug for ResponseFuture<S, St, M, ReqB, ResB>
where
    S: Service<Request<ReqB>>,
    St: Store,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Passthrough { .. } => "passthrough",
            State::Ready { .. } => "ready",
            State::ReadBody { .. } => "reading request body",
            State::Claim { .. } => "claiming key",
            State::Wait { .. } => "waiting for request in flight",
            State::Call { .. } => "calling inner service",
            State::Buffer { .. } => "buffering response",
            State::Extend { .. } => "holding the key of a response handed on as it streams",
            State::Complete { .. } => "storing response",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("key", &self.ctx.as_ref().map(|c| &c.key))
            .finish()
    }
}

impl<S, St, M, ReqB, ResB> Future for ResponseFuture<S, St, M, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    St: Store,
    M: RebuildBody<ReqB>,
    ReqB: Body,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Unpin,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<ReplayBody<ResB>>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A request without a key (most of them) holds nothing: its response is passed on
        // from here, not through `poll_states` (whose answer would be one more copy of it).
        if let StateProj::Passthrough { fut } = self.as_mut().project().state.project() {
            let res = ready!(fut.poll(cx)).map_err(Into::into)?;
            return Poll::Ready(Ok(res.map(ReplayBody::inner)));
        }
        let out = ready!(self.as_mut().poll_states(cx));
        // Done: give back what the request still holds (its buffer reservations, its
        // buffered body, the inner service). Every lease is completed or released by now.
        *self.project().ctx = None;
        Poll::Ready(out)
    }
}

impl<S, St, M, ReqB, ResB> ResponseFuture<S, St, M, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    St: Store,
    M: RebuildBody<ReqB>,
    ReqB: Body,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Unpin,
    ResB::Error: Into<BoxError>,
{
    fn poll_states(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ReplayBody<ResB>>, BoxError>> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Passthrough { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(res.map(ReplayBody::inner)));
                }
                StateProj::Ready { out } => {
                    let mut out = out.take().expect("polled after completion");
                    if let (Err(e), Some(k)) = (&mut out, this.ctx.as_ref()) {
                        // This layer's own refusal, before the handler ran (not the 503 for a
                        // lease lost while it ran): marked on the request, so that a
                        // `RejectionLayer` above answers it as a refusal.
                        if let Some(r) = e.downcast_ref::<Rejection>() {
                            if r.detail() != Some(LEASE_NOT_KEPT) {
                                k.marks.mark_refused();
                            }
                        }
                    }
                    return Poll::Ready(out);
                }
                StateProj::ReadBody { mut body } => {
                    let k = this.ctx.as_mut().expect("keyed state");
                    let max = k.shared.config.max_request_body;
                    loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(mut data) = frame.into_data() {
                                    let n = data.remaining();
                                    k.buf.push(data.copy_to_bytes(n));
                                    if k.buf.len() > max {
                                        Counters::bump(&k.shared.stats.too_large);
                                        break ready_err(Rejection::new(
                                            RejectionKind::PayloadTooLarge,
                                        )
                                        .with_detail(
                                            "request body larger than the idempotency layer buffers",
                                        ));
                                    }
                                    if !k.held.grow(&k.shared.buffers, n) {
                                        break ready_err(buffers_full(&k.shared));
                                    }
                                }
                            }
                            Some(Err(e)) => {
                                // The client's fault (a reset stream, a broken encoding):
                                // a client error, and nothing was claimed or run.
                                let e: BoxError = e.into();
                                tracing::debug!(error = %e, "request body could not be read");
                                break ready_err(
                                    Rejection::new(RejectionKind::BadRequestBody)
                                        .with_detail("the request body could not be read"),
                                );
                            }
                            None => {
                                k.body = k.buf.take();
                                let parts = k.parts.as_ref().expect("request head");
                                let pq = parts
                                    .uri
                                    .path_and_query()
                                    .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
                                let value = |name| {
                                    parts
                                        .headers
                                        .get(name)
                                        .map_or(&[][..], HeaderValue::as_bytes)
                                };
                                k.fingerprint = Fingerprint::of_request(
                                    parts.method.as_str(),
                                    pq,
                                    value(header::CONTENT_TYPE),
                                    value(header::CONTENT_ENCODING),
                                    &k.body,
                                );
                                break State::Claim { fut: k.claim() };
                            }
                        }
                    }
                }
                StateProj::Claim { fut } => {
                    let claimed = match fut.as_pin_mut() {
                        Some(fut) => ready!(fut.poll(cx)),
                        None => Ok(Claim::InFlight),
                    };
                    let k = this.ctx.as_mut().expect("keyed state");
                    let stats = &k.shared.stats;
                    match claimed {
                        Err(e) if e.kind() == StoreErrorKind::Full => {
                            // No room for the key: refused whatever the policy, since running
                            // it would leave no record to stop a second run.
                            Counters::bump(&stats.store_full);
                            tracing::debug!(key = ?k.key, "idempotency store full; refusing a new key");
                            ready_err(
                                Rejection::new(RejectionKind::IdempotencyStoreFull)
                                    .with_retry_after(k.shared.retry_hint(e.retry_after()))
                                    .with_detail("no room for a new key in the idempotency store"),
                            )
                        }
                        Err(e) => {
                            Counters::bump(&stats.store_errors);
                            match k.shared.config.policy {
                                FailurePolicy::FailOpen => {
                                    tracing::warn!(error = %e, "idempotency store failed; running the request without a key (fail open)");
                                    State::Call { fut: call_inner(k) }
                                }
                                FailurePolicy::FailClosed => {
                                    tracing::warn!(error = %e, "idempotency store failed; refusing the request (fail closed)");
                                    ready_err(
                                        Rejection::new(RejectionKind::StoreUnavailable)
                                            .with_detail("the idempotency store failed"),
                                    )
                                }
                            }
                        }
                        Ok(Claim::Claimed(lease)) => {
                            let (held_until, ttl) = k.claimed_until.expect("a claim was sent");
                            k.guard = Some(LeaseGuard {
                                store: k.store.clone(),
                                lease: Some(lease),
                                release_on_drop: k.shared.config.release_on_drop,
                                marks: k.marks.clone(),
                                record: None,
                                held_until,
                                ttl,
                                writes: (!k.store.completes_at_once())
                                    .then(|| k.shared.writes.clone()),
                            });
                            // Room for the whole response, before the handler runs.
                            let max = k.shared.config.max_response_body;
                            if k.room.grow(&k.shared.buffers, max) {
                                Counters::bump(&k.shared.stats.executed);
                                State::Call { fut: call_inner(k) }
                            } else {
                                k.release();
                                ready_err(buffers_full(&k.shared))
                            }
                        }
                        Ok(Claim::InFlight) => match k.shared.wait() {
                            Some(max) => {
                                let now = Instant::now();
                                let deadline = *k.deadline.get_or_insert(now + max);
                                if now >= deadline {
                                    Counters::bump(&stats.in_flight);
                                    tracing::debug!(key = ?k.key, "waited for the request in flight; giving up");
                                    ready_err(in_flight(&k.shared))
                                } else {
                                    let at = deadline.min(now + k.shared.config.poll_interval);
                                    State::Wait {
                                        sleep: tokio::time::sleep_until(at),
                                    }
                                }
                            }
                            None => {
                                Counters::bump(&stats.in_flight);
                                tracing::debug!(key = ?k.key, "request with this key in flight");
                                ready_err(in_flight(&k.shared))
                            }
                        },
                        Ok(Claim::Completed(record)) => {
                            // A replay's body counts against the layer's buffers while it is
                            // held (a remote store's record is a copy of its own), until it
                            // is handed on or dropped.
                            let mut held = Reservation::default();
                            if !record.is_kept() {
                                Counters::bump(&stats.unreplayable);
                                ready_err(Rejection::new(
                                    RejectionKind::IdempotencyResponseNotStored,
                                ))
                            } else if held.grow(&k.shared.buffers, record.body().len()) {
                                Counters::bump(&stats.replayed);
                                tracing::debug!(key = ?k.key, status = %record.status(), "replaying stored response");
                                State::Ready {
                                    out: Some(Ok(replay(&record, held))),
                                }
                            } else {
                                ready_err(buffers_full(&k.shared))
                            }
                        }
                        Ok(Claim::Mismatch) => {
                            Counters::bump(&stats.mismatched);
                            tracing::debug!(key = ?k.key, "idempotency key reused with another payload");
                            ready_err(Rejection::new(RejectionKind::IdempotencyKeyReused))
                        }
                    }
                }
                StateProj::Wait { sleep } => {
                    ready!(sleep.poll(cx));
                    let k = this.ctx.as_mut().expect("keyed state");
                    State::Claim { fut: k.claim() }
                }
                StateProj::Call { fut } => 'call: {
                    let polled = fut.poll(cx);
                    let k = this.ctx.as_mut().expect("keyed state");
                    let Poll::Ready(result) = polled else {
                        ready!(k.poll_lease(cx));
                        break 'call k.lease_not_kept();
                    };
                    // The handler is done with the request body: the layer holds it no more.
                    k.held.release();
                    let res = match result {
                        Ok(res) => res,
                        Err(e) => {
                            let e: BoxError = e.into();
                            // The inner future goes now, before the decision: a holder below
                            // that still holds the request (a timeout fired while it queued)
                            // drops it as held, which marks it (`util::stamp`).
                            this.state.set(State::Ready { out: None });
                            let k = this.ctx.as_mut().expect("keyed state");
                            if k.shared.config.release_on_error
                                || refused_before_running(&*e, &k.marks)
                                || k.marks.never_ran()
                            {
                                // A layer below refused it, or dropped it before passing it
                                // on: the handler did not run.
                                k.release();
                            } else {
                                // It may have run (a timeout below cut off a handler that had
                                // its effect): its key never runs again.
                                tracing::debug!(error = %e, key = ?k.key, "the inner service failed; the key is recorded as run, its response not kept");
                                k.keep_not_kept(StatusCode::INTERNAL_SERVER_ERROR);
                            }
                            return Poll::Ready(Err(e));
                        }
                    };
                    if k.guard.is_none() {
                        // Failed open: nothing to store.
                        return Poll::Ready(Ok(res.map(ReplayBody::inner)));
                    }
                    if head_not_stored(res.status(), res.headers(), &k.shared.config, k.grpc) {
                        Counters::bump(&k.shared.stats.not_stored);
                        k.release();
                        return Poll::Ready(Ok(res.map(ReplayBody::inner)));
                    }
                    let (parts, body) = res.into_parts();
                    // The handler has answered: from here on its key never runs again.
                    let marker = Record::not_kept(k.fingerprint, parts.status);
                    if let Some(g) = k.guard.as_mut() {
                        g.record = Some((marker, k.shared.ttl()));
                    }
                    State::Buffer {
                        body: Some(body),
                        parts: Some(parts),
                        trailers: None,
                    }
                }
                StateProj::Buffer {
                    body,
                    parts: head,
                    trailers: tail,
                } => {
                    let k = this.ctx.as_mut().expect("keyed state");
                    let max = k.shared.config.max_response_body;
                    loop {
                        let b = body.as_mut().expect("response body");
                        let Poll::Ready(frame) = Pin::new(b).poll_frame(cx) else {
                            // A body that is not ready at once (a stream, server-sent
                            // events): the response is handed on now, and passes each frame
                            // on as it comes, keeping a copy; its end writes the record.
                            // Until then the lease is held as long as a record would be, so
                            // that no renewal depends on the client reading.
                            let parts = head.take().expect("response head");
                            let rest = body.take().expect("response body");
                            tracing::debug!(key = ?k.key, "response streams; its end writes its record");
                            let prefix = k.buf.take();
                            let mut buf = BodyBuf::default();
                            buf.push(prefix.clone());
                            // The copy holds room for what it has; each chunk reserves more
                            // as it comes (a stream read slowly holds no more than it made).
                            let mut room = k.room.take();
                            room.shrink_to(prefix.len());
                            k.recording = Some(Box::new(Recording {
                                fingerprint: k.fingerprint,
                                status: parts.status,
                                headers: stored_headers(
                                    &parts.headers,
                                    &k.shared.config.exclude,
                                    true,
                                ),
                                grpc: GrpcHead::of(&parts.headers),
                                buf,
                                trailers: tail.take(),
                                room,
                            }));
                            // The copy holds the room for these bytes.
                            let res = Response::from_parts(
                                parts,
                                ReplayBody::prefixed(prefix, rest, Reservation::default()),
                            );
                            break k.extend(res);
                        };
                        match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    k.buf.push(data);
                                    if k.buf.len() > max {
                                        // Too large to keep: the response streams on, and how
                                        // its body ends decides (a failure releases the key;
                                        // the end or a drop records it as not kept). Until
                                        // then the lease is held as long as a record would be,
                                        // so that no renewal depends on the client reading.
                                        let parts = head.take().expect("response head");
                                        tracing::debug!(key = ?k.key, "response too large to keep; its end decides");
                                        let rest = body.take().expect("response body");
                                        let prefix = k.buf.take();
                                        let mut held = k.room.take();
                                        held.shrink_to(prefix.len());
                                        let res = Response::from_parts(
                                            parts,
                                            ReplayBody::prefixed(prefix, rest, held),
                                        );
                                        break k.extend(res);
                                    }
                                }
                                Err(frame) => {
                                    if let Ok(t) = frame.into_trailers() {
                                        match tail {
                                            Some(have) => have.extend(t),
                                            None => *tail = Some(t),
                                        }
                                    }
                                }
                            },
                            Some(Err(e)) => {
                                // The handler answered a head to store: it ran, and its key
                                // never runs again. The marker set when it answered is
                                // written.
                                let e: BoxError = e.into();
                                tracing::debug!(error = %e, key = ?k.key, "the response body failed; the key is recorded as run, its response not kept");
                                let status = head
                                    .as_ref()
                                    .map_or(StatusCode::INTERNAL_SERVER_ERROR, |p| p.status);
                                k.keep_not_kept(status);
                                return Poll::Ready(Err(e));
                            }
                            None => {
                                let parts = head.take().expect("response head");
                                let data = k.buf.take();
                                let trailers = tail.take();
                                // The response body holds its bytes' share of the budget until
                                // it hands them on.
                                let mut held = k.room.take();
                                held.shrink_to(data.len());
                                let failed = end_not_stored(
                                    &parts.headers,
                                    trailers.as_ref(),
                                    &data,
                                    &k.shared.config,
                                );
                                if failed {
                                    Counters::bump(&k.shared.stats.not_stored);
                                    k.release();
                                    return Poll::Ready(Ok(Response::from_parts(
                                        parts,
                                        ReplayBody::buffered_held(data, trailers, held),
                                    )));
                                }
                                let exclude = &k.shared.config.exclude;
                                let head =
                                    stored_headers(&parts.headers, exclude, trailers.is_some());
                                let tail = match &trailers {
                                    Some(t) => stored_headers(t, exclude, false).map(Some),
                                    None => Some(None),
                                };
                                let record = match (head, tail) {
                                    (Some(head), Some(tail)) => Record::response(
                                        k.fingerprint,
                                        parts.status,
                                        head,
                                        data.clone(),
                                        tail,
                                    ),
                                    _ => {
                                        // Too many header values to keep: the response goes
                                        // on, and its key is recorded as run, never to run
                                        // again.
                                        tracing::debug!(key = ?k.key, "response has too many header values to keep; recording it as not kept");
                                        Record::not_kept(k.fingerprint, parts.status)
                                    }
                                };
                                let res = Response::from_parts(
                                    parts,
                                    ReplayBody::buffered_held(data, trailers, held),
                                );
                                break complete(k, record, res);
                            }
                        }
                    }
                }
                StateProj::Extend {
                    fut,
                    sent,
                    ttl,
                    keepalive,
                    pending,
                } => {
                    let done = ready!(fut.as_mut().poll(cx));
                    let k = this.ctx.as_mut().expect("keyed state");
                    let mut res = pending.take().expect("pending response");
                    match done {
                        Ok(()) => {
                            let mut guard = k.guard.take().expect("a lease is held");
                            guard.held_until = *sent + *ttl;
                            guard.ttl = *ttl;
                            let needs_status = grpc_kind(res.headers()) == Some(GrpcKind::Grpc)
                                && GrpcCode::from_headers(res.headers()).is_none();
                            let keepalive = keepalive.then(|| keep_alive(&guard, *ttl));
                            res.body_mut().settle_with(Box::new(Settlement {
                                guard: Some(guard),
                                shared: k.shared.clone(),
                                needs_status,
                                recording: k.recording.take(),
                                _keepalive: keepalive,
                            }));
                            return Poll::Ready(Ok(res));
                        }
                        Err(e) if e.kind() == StoreErrorKind::LeaseLost => {
                            Counters::bump(&k.shared.stats.store_errors);
                            tracing::warn!(error = %e, key = ?k.key, "the idempotency lease was lost before the response was recorded");
                            if let Some(g) = k.guard.take() {
                                g.disarm();
                            }
                            return Poll::Ready(Ok(res));
                        }
                        Err(e) => {
                            // The lease could not be extended: record the key as not kept at
                            // once instead, so that it never runs again.
                            Counters::bump(&k.shared.stats.store_errors);
                            tracing::warn!(error = %e, key = ?k.key, "could not hold the idempotency key of a response too large to keep; recording it as not kept");
                            let record = Record::not_kept(k.fingerprint, res.status());
                            complete(k, record, res)
                        }
                    }
                }
                StateProj::Complete { fut, pending } => {
                    let done = ready!(fut.poll(cx));
                    let k = this.ctx.as_mut().expect("keyed state");
                    match done {
                        Ok(()) => {
                            if let Some(g) = k.guard.take() {
                                g.disarm();
                            }
                        }
                        Err(e) if e.kind() == StoreErrorKind::LeaseLost => {
                            Counters::bump(&k.shared.stats.store_errors);
                            tracing::warn!(error = %e, key = ?k.key, "could not store the idempotent response: its lease was lost");
                            if let Some(g) = k.guard.take() {
                                g.disarm();
                            }
                        }
                        Err(e) => {
                            // The handler has run: never release. The guard writes the record
                            // in the background (the answer may only have been lost).
                            Counters::bump(&k.shared.stats.store_errors);
                            tracing::warn!(error = %e, key = ?k.key, "could not store the idempotent response; the key stays leased and the write is tried again");
                            drop(k.guard.take());
                        }
                    }
                    return Poll::Ready(Ok(pending.take().expect("pending response")));
                }
            };
            this.state.set(next);
        }
    }
}

/// The 503 of a request that finds the layer's buffers full.
fn buffers_full(shared: &Shared) -> Rejection {
    Counters::bump(&shared.stats.buffer_rejected);
    tracing::debug!("idempotency layer's buffers full; refusing a keyed request");
    Rejection::overloaded(Some(shared.retry_hint(None)))
        .with_detail("the idempotency layer buffers as much as it may")
}

/// The 409 of a repeat that finds its key leased. The lease ends, at the latest, one lease
/// time to live after it was last claimed or renewed (a request dropped mid-handler keeps its
/// lease until then, unless it releases on drop): the `Retry-After` is that bound, jittered, so
/// that a client that waits it out finds the key completed or free.
/// The answer to a repeat while its key is in flight: come back in about a second (jittered,
/// at most the lease TTL), for the replay once the first request has completed.
fn in_flight(shared: &Shared) -> Rejection {
    Rejection::new(RejectionKind::IdempotencyInFlight).with_retry_after(shared.in_flight_hint())
}

fn ready_err<F, CF, KF, ReqB, ResB>(rejection: Rejection) -> State<F, CF, KF, ReqB, ResB> {
    State::Ready {
        out: Some(Err(rejection.into())),
    }
}

fn call_inner<S, St, M, ReqB, ResB>(k: &mut Keyed<S, St, M, ResB>) -> S::Future
where
    S: Service<Request<ReqB>>,
    St: Store,
    M: RebuildBody<ReqB>,
{
    let parts = k.parts.take().expect("request head");
    let body = k.rebuild.rebuild(std::mem::take(&mut k.body));
    let mut inner = k.inner.take().expect("inner service");
    inner.call(Request::from_parts(parts, body))
}

fn complete<F, CF, St, ReqB, ResB, S, M>(
    k: &mut Keyed<S, St, M, ResB>,
    record: Record,
    res: Response<ReplayBody<ResB>>,
) -> State<F, CF, St::CompleteFuture, ReqB, ResB>
where
    St: Store,
{
    let ttl = k.shared.ttl();
    // The lease becomes the record: no more renewals.
    k.renewal = None;
    let guard = k.guard.as_mut().expect("a lease is held");
    if !k.store.completes_at_once() {
        // Kept for a write in the background, should the request be dropped before this one
        // is done.
        guard.record = Some((record.clone(), ttl));
    }
    State::Complete {
        fut: k.store.complete(guard.lease(), record, ttl),
        pending: Some(res),
    }
}

/// The replay of a stored response: same status, headers, body and trailers, plus
/// `Idempotent-Replayed: true`.
fn replay<B>(record: &Record, held: Reservation) -> Response<ReplayBody<B>> {
    let mut res = Response::new(ReplayBody::buffered_held(
        record.body().clone(),
        record.trailers().cloned(),
        held,
    ));
    *res.status_mut() = record.status();
    let headers = res.headers_mut();
    *headers = record.headers().clone();
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

/// Whether a response head says the request is not to be stored: it failed in a way worth
/// retrying (5xx, 429, a gRPC failure status in the headers of a trailers-only response), or,
/// unless `store_refusals`, it refused the caller without running (see `is_refusal_status`).
fn head_not_stored(status: StatusCode, headers: &HeaderMap, config: &Config, grpc: bool) -> bool {
    if !config.store_failures && head_is_failure(status, headers, grpc) {
        return true;
    }
    !config.store_refusals
        && (is_refusal_status(status) || GrpcCode::from_headers(headers).is_some_and(is_refusal))
}

/// Whether trailers (or the headers of a trailers-only gRPC response) say the request is not
/// to be stored: a gRPC failure status, or, unless `store_refusals`, a refusal.
fn trailers_not_stored(trailers: &HeaderMap, config: &Config) -> bool {
    GrpcCode::from_headers(trailers).is_some_and(|code| code_not_stored(code, config))
}

/// Whether a whole response (head, body and trailers), under the cap, says the request is
/// not to be stored: a gRPC failure or refusal status in its trailers; for a gRPC response
/// (`content-type: application/grpc...`), no `grpc-status` at all (a client reads that as a
/// failed call: the stream was cut short, a proxy dropped the trailers); for gRPC-Web
/// (`application/grpc-web`, `application/grpc-web+...`), the status in the trailer frame
/// that ends the body, judged as trailers are.
fn end_not_stored(
    head: &HeaderMap,
    trailers: Option<&HeaderMap>,
    body: &[u8],
    config: &Config,
) -> bool {
    end_not_stored_as(GrpcHead::of(head), trailers, body, config)
}

/// What a response head says of a gRPC call, for judging its end.
#[derive(Clone, Copy, Debug)]
struct GrpcHead {
    kind: Option<GrpcKind>,
    /// The head has a `grpc-status` (a trailers-only response).
    status: bool,
}

impl GrpcHead {
    fn of(head: &HeaderMap) -> GrpcHead {
        let kind = grpc_kind(head);
        GrpcHead {
            kind,
            status: kind.is_some() && GrpcCode::from_headers(head).is_some(),
        }
    }
}

/// [`end_not_stored`], with what the head says read beforehand.
fn end_not_stored_as(
    head: GrpcHead,
    trailers: Option<&HeaderMap>,
    body: &[u8],
    config: &Config,
) -> bool {
    if let Some(t) = trailers {
        if GrpcCode::from_headers(t).is_some() {
            return trailers_not_stored(t, config);
        }
    }
    let Some(kind) = head.kind else {
        return false;
    };
    if head.status {
        // A trailers-only response: its head was judged already.
        return false;
    }
    let code = match kind {
        GrpcKind::Grpc => None,
        GrpcKind::Web => grpc_web_status(body),
        // Base64: the trailer frame is not read; its status is not judged.
        GrpcKind::WebText => return false,
    };
    match code {
        Some(code) => code_not_stored(code, config),
        // No status anywhere: a failure (`UNKNOWN` to the client).
        None => !config.store_failures,
    }
}

/// What kind of gRPC response a head is, by its `content-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrpcKind {
    Grpc,
    Web,
    WebText,
}

fn grpc_kind(head: &HeaderMap) -> Option<GrpcKind> {
    let ct = head.get(header::CONTENT_TYPE)?.as_bytes();
    let rest = ct.strip_prefix(b"application/grpc")?;
    let Some(web) = rest.strip_prefix(b"-web") else {
        // `application/grpc`, `application/grpc+proto`, `application/grpc;...`; not
        // `application/grpcfoo`.
        return matches!(rest.first(), None | Some(b'+' | b';')).then_some(GrpcKind::Grpc);
    };
    if let Some(text) = web.strip_prefix(b"-text") {
        return matches!(text.first(), None | Some(b'+' | b';')).then_some(GrpcKind::WebText);
    }
    matches!(web.first(), None | Some(b'+' | b';')).then_some(GrpcKind::Web)
}

/// The `grpc-status` of a gRPC-Web body's trailer frame: the body is read as length-prefixed
/// frames (a flag byte, a 4-byte big-endian length, the payload), and if they cover it
/// exactly and the last is a trailer frame (flag bit 0x80), its HTTP/1-style header lines
/// are read for `grpc-status`. `None` when the body does not end with a trailer frame that
/// has one; a status that is not a number is `UNKNOWN`.
fn grpc_web_status(body: &[u8]) -> Option<GrpcCode> {
    let mut rest = body;
    let mut last: Option<(u8, &[u8])> = None;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest[5..].get(..len)?;
        last = Some((rest[0], payload));
        rest = &rest[5 + len..];
    }
    let (flag, payload) = last?;
    if flag & 0x80 == 0 {
        return None;
    }
    payload.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"grpc-status")
            .then(|| {
                std::str::from_utf8(value.trim_ascii())
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                    .map_or(GrpcCode::Unknown, GrpcCode::from_i32)
            })
    })
}

/// Whether a gRPC status says the request is not to be stored: a failure (unless
/// `store_failures`) or a refusal (unless `store_refusals`).
fn code_not_stored(code: GrpcCode, config: &Config) -> bool {
    (!config.store_failures && GrpcStatus::default().classify_code(code) != Outcome::Success)
        || (!config.store_refusals && is_refusal(code))
}

/// Whether an error from the inner service is provably a refusal before the handler ran:
/// the error itself a [`Rejection`] of a kind that refuses before running, and the request
/// marked refused by a layer of this crate below (`marks`, see `util::stamp`). A rejection
/// for a request not so marked is the handler's: one it forwards from its own client, with
/// `?` or wrapped in its own error, after it may have had its effect. Every other error
/// (tower's `Elapsed` from a timeout below, tower's `Overloaded`, the handler's own) may come
/// from a handler that had its effect.
fn refused_before_running(e: &(dyn std::error::Error + 'static), marks: &Marks) -> bool {
    if let Some(r) = e.downcast_ref::<Rejection>() {
        if !marks.refused() {
            // The request was not refused below: the rejection is the handler's (one it
            // forwards from its own client, after it may have had its effect).
            return false;
        }
        return match r.kind() {
            // The idempotency layer's own 503 for a lease it could not keep stops a handler
            // that ran; a store that failed before anything ran says otherwise.
            RejectionKind::StoreUnavailable => r.detail() != Some(LEASE_NOT_KEPT),
            RejectionKind::RateLimited
            | RejectionKind::Overloaded
            | RejectionKind::CircuitOpen
            | RejectionKind::IdempotencyInFlight
            | RejectionKind::IdempotencyKeyReused
            | RejectionKind::IdempotencyKeyMissing
            | RejectionKind::IdempotencyKeyInvalid
            | RejectionKind::IdempotencyResponseNotStored
            | RejectionKind::PayloadTooLarge
            | RejectionKind::IdempotencyStoreFull
            | RejectionKind::RateLimitKeyMissing
            | RejectionKind::ClientAddressUnknown
            | RejectionKind::BadRequestBody => true,
        };
    }
    // tower's `load_shed` `Overloaded` does not mark the request: it cannot be told from one
    // a handler forwards, so it is the handler's error (put `load_shed` above this layer, or use
    // `BackpressureLayer`).
    false
}

/// The detail of the 503 a request gets when its lease could not be kept while its handler
/// ran.
const LEASE_NOT_KEPT: &str = "the idempotency lease could not be kept";

/// Whether a response head says the request failed in a way worth retrying: 5xx, 429, or a
/// gRPC failure status in the headers (a trailers-only response). For a gRPC call, a head
/// without `grpc-status` is judged as [`GrpcStatus`] judges it for the breaker and the retry:
/// by its HTTP status mapped as gRPC does (a proxy's 400 is `INTERNAL`, its 503
/// `UNAVAILABLE`); a 200 leaves it to the trailers.
fn head_is_failure(status: StatusCode, headers: &HeaderMap, grpc: bool) -> bool {
    if HttpStatus::default().classify_status(status) != Outcome::Success {
        return true;
    }
    if grpc {
        return GrpcStatus::default().classify_head(status, headers) != Outcome::Success;
    }
    GrpcCode::from_headers(headers)
        .is_some_and(|c| GrpcStatus::default().classify_code(c) != Outcome::Success)
}

/// HTTP statuses that say the request was not carried out for this caller: 401, 403, 407
/// (its credentials were missing or refused), 421 (sent to a server that cannot answer for
/// the authority: RFC 9110 lets the client send it again elsewhere), 425 (too early: the
/// server would not risk running it from TLS early data, RFC 8470, and the client sends it
/// again once its handshake is done) and 429 (it was throttled). Stored, they would
/// hold a key (and room in the store) for a day on the word of a request that never ran:
/// forged credentials would fill the store. Not 408: a timeout below this layer (as
/// tower-http's `TimeoutLayer` answers it) may cut off a handler that has had its effect, so
/// it is stored like any 4xx and the key never runs again.
fn is_refusal_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 407 | 421 | 425 | 429)
}

/// gRPC codes that say the call was not carried out for this caller: `UNAUTHENTICATED`,
/// `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED` (throttled) and `ABORTED` (this crate's own
/// "try again", as for a key in flight).
fn is_refusal(code: GrpcCode) -> bool {
    matches!(
        code,
        GrpcCode::Unauthenticated
            | GrpcCode::PermissionDenied
            | GrpcCode::ResourceExhausted
            | GrpcCode::Aborted
    )
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    // Not in RFC 9110's list, but a connection header in practice (sent by old clients and
    // proxies, refused by HTTP/2): never replayed.
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The most header (or trailer) values a record keeps. A response with more (a `HeaderMap`
/// holds any number of values of one name, but its index only so many) is passed on and
/// recorded as not kept: repeats get 409, never a second run.
pub(crate) const MAX_STORED_HEADERS: usize = 8 << 10;

/// The headers (or trailers) kept in a record: all but `Set-Cookie`, hop-by-hop headers (and
/// those named by `Connection`), and the configured exclusions. `Trailer`, an end-to-end
/// field (RFC 9110), is kept when the response has trailers (`with_trailers`), so that a
/// replay over HTTP/1.1 announces them as the first run did. `None` when there are more than
/// [`MAX_STORED_HEADERS`] values: such a head is not kept.
fn stored_headers(
    headers: &HeaderMap,
    exclude: &[HeaderName],
    with_trailers: bool,
) -> Option<HeaderMap> {
    if headers.len() > MAX_STORED_HEADERS {
        return None;
    }
    let mut out = HeaderMap::try_with_capacity(headers.len()).ok()?;
    let listed = connection_names(headers);
    for (name, value) in headers {
        let skip = name == header::SET_COOKIE
            || HOP_BY_HOP.contains(name)
            || (name == header::TRAILER && !with_trailers)
            || exclude.contains(name)
            || listed.contains(name);
        if !skip {
            out.try_append(name.clone(), value.clone()).ok()?;
        }
    }
    Some(out)
}

/// The header names a `Connection` header lists (every value, split on commas), read from
/// its bytes: a token that is not a header name (obs-text, spaces) is skipped, and never hides
/// the others.
fn connection_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_survive_a_bad_token() {
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_bytes(b"x-a, caf\xe9 ,X-B,,  ").unwrap(),
        );
        h.append("connection", HeaderValue::from_static("x-c"));
        let names = connection_names(&h);
        assert_eq!(names, ["x-a", "x-b", "x-c"].map(HeaderName::from_static));
    }

    #[test]
    fn stored_headers_leave_out_cookies_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.append("set-cookie", "a=1".parse().unwrap());
        h.append("set-cookie", "b=2".parse().unwrap());
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-request-cost", "3".parse().unwrap());
        h.insert("trailer", "x-checksum".parse().unwrap());
        let exclude = [HeaderName::from_static("x-request-cost")];
        let out = stored_headers(&h, &exclude, false).unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out["content-type"], "application/json");
        // `Trailer` is end-to-end: kept for a response that has trailers.
        let out = stored_headers(&h, &exclude, true).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out["trailer"], "x-checksum");
    }

    #[test]
    fn too_many_header_values_are_not_kept() {
        let mut h = HeaderMap::new();
        for i in 0..MAX_STORED_HEADERS {
            h.append("link", HeaderValue::from_str(&format!("<{i}>")).unwrap());
        }
        assert_eq!(
            stored_headers(&h, &[], false).unwrap().len(),
            MAX_STORED_HEADERS
        );
        h.append("link", HeaderValue::from_static("<one more>"));
        assert!(stored_headers(&h, &[], false).is_none());
    }

    #[test]
    fn refusals_are_not_stored_by_default() {
        let config = |failures: bool, refusals: bool| {
            let mut b =
                super::super::IdempotencyLayer::builder(super::super::MemoryStore::default());
            b = b.store_failures(failures).store_refusals(refusals);
            b.build().unwrap()
        };
        let empty = HeaderMap::new();
        let default = config(false, false);
        let c = &default.shared().config;
        for s in [401, 403, 407, 429, 500, 503] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(head_not_stored(s, &empty, c, false), "{s}");
        }
        for s in [200, 201, 301, 400, 404, 408, 409, 422] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(!head_not_stored(s, &empty, c, false), "{s}");
        }
        let grpc = |code: i32| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", code.to_string().parse().unwrap());
            h
        };
        // UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ABORTED; UNAVAILABLE.
        for code in [16, 7, 8, 10, 14] {
            assert!(
                head_not_stored(StatusCode::OK, &grpc(code), c, false),
                "{code}"
            );
            assert!(trailers_not_stored(&grpc(code), c), "{code}");
        }
        // OK, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION.
        for code in [0, 5, 6, 9] {
            assert!(
                !head_not_stored(StatusCode::OK, &grpc(code), c, false),
                "{code}"
            );
            assert!(!trailers_not_stored(&grpc(code), c), "{code}");
        }
        // Each opt-in stores its own kind only.
        let refusals = config(false, true);
        let c = &refusals.shared().config;
        assert!(!head_not_stored(StatusCode::UNAUTHORIZED, &empty, c, false));
        assert!(!trailers_not_stored(&grpc(16), c));
        assert!(head_not_stored(
            StatusCode::SERVICE_UNAVAILABLE,
            &empty,
            c,
            false
        ));
        assert!(trailers_not_stored(&grpc(14), c));
        let failures = config(true, false);
        let c = &failures.shared().config;
        assert!(head_not_stored(StatusCode::UNAUTHORIZED, &empty, c, false));
        assert!(!head_not_stored(
            StatusCode::SERVICE_UNAVAILABLE,
            &empty,
            c,
            false
        ));
        assert!(!trailers_not_stored(&grpc(14), c));
        let both = config(true, true);
        let c = &both.shared().config;
        assert!(!head_not_stored(
            StatusCode::TOO_MANY_REQUESTS,
            &empty,
            c,
            false
        ));
    }

    fn web_frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn grpc_web_trailer_frames() {
        let msg = web_frame(0, b"\x08\x01");
        let trailer = web_frame(0x80, b"grpc-status: 14\r\ngrpc-message: down\r\n");
        let body = [msg.clone(), trailer.clone()].concat();
        assert_eq!(grpc_web_status(&body), Some(GrpcCode::Unavailable));
        assert_eq!(grpc_web_status(&trailer), Some(GrpcCode::Unavailable));
        // Names are case-insensitive, lines may end without `\r`, values may be unspaced.
        let ok = web_frame(0x80, b"Grpc-Message:fine\nGRPC-STATUS:0");
        assert_eq!(
            grpc_web_status(&[msg.clone(), ok].concat()),
            Some(GrpcCode::Ok)
        );
        let bad = web_frame(0x80, b"grpc-status: x\r\n");
        assert_eq!(grpc_web_status(&bad), Some(GrpcCode::Unknown));
        // No trailer frame, a trailer frame without a status, frames that do not cover the
        // body, a trailer frame that is not the last: no status.
        assert_eq!(grpc_web_status(&msg), None);
        assert_eq!(grpc_web_status(b""), None);
        assert_eq!(grpc_web_status(&web_frame(0x80, b"x-a: 1\r\n")), None);
        assert_eq!(grpc_web_status(&body[..body.len() - 1]), None);
        assert_eq!(grpc_web_status(&[&body[..], b"\0"].concat()), None);
        assert_eq!(grpc_web_status(&[trailer, msg].concat()), None);
    }

    #[test]
    fn grpc_kinds() {
        let kind = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            grpc_kind(&h)
        };
        assert_eq!(kind("application/grpc"), Some(GrpcKind::Grpc));
        assert_eq!(kind("application/grpc+proto"), Some(GrpcKind::Grpc));
        assert_eq!(kind("application/grpc-web"), Some(GrpcKind::Web));
        assert_eq!(kind("application/grpc-web+proto"), Some(GrpcKind::Web));
        assert_eq!(kind("application/grpc-web-text"), Some(GrpcKind::WebText));
        assert_eq!(
            kind("application/grpc-web-text+proto"),
            Some(GrpcKind::WebText)
        );
        assert_eq!(kind("application/grpcx"), None);
        assert_eq!(kind("application/json"), None);
        assert_eq!(grpc_kind(&HeaderMap::new()), None);
    }

    #[test]
    fn ends_not_stored() {
        let layer = super::super::IdempotencyLayer::builder(super::super::MemoryStore::default())
            .build()
            .unwrap();
        let c = &layer.shared().config;
        let head = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            h
        };
        let status = |code: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static(code));
            h
        };
        // gRPC: the trailers decide; none at all is a failure.
        let grpc = head("application/grpc");
        assert!(end_not_stored(&grpc, None, b"", c));
        assert!(end_not_stored(&grpc, Some(&HeaderMap::new()), b"", c));
        assert!(end_not_stored(&grpc, Some(&status("14")), b"", c));
        assert!(!end_not_stored(&grpc, Some(&status("0")), b"", c));
        // Trailers-only: the head says.
        let mut only = grpc.clone();
        only.insert("grpc-status", HeaderValue::from_static("5"));
        assert!(!end_not_stored(&only, None, b"", c));
        // gRPC-Web: the trailer frame decides; none at all is a failure.
        let web = head("application/grpc-web+proto");
        let fail = web_frame(0x80, b"grpc-status:14\r\n");
        let fine = web_frame(0x80, b"grpc-status:0\r\n");
        assert!(end_not_stored(&web, None, &fail, c));
        assert!(!end_not_stored(&web, None, &fine, c));
        assert!(end_not_stored(&web, None, &web_frame(0, b"m"), c));
        // gRPC-Web text (base64) is not read; HTTP is not judged by its end.
        assert!(!end_not_stored(
            &head("application/grpc-web-text"),
            None,
            b"",
            c
        ));
        assert!(!end_not_stored(&head("application/json"), None, b"", c));
        assert!(!end_not_stored(
            &HeaderMap::new(),
            Some(&HeaderMap::new()),
            b"",
            c
        ));
        // With `store_failures`, a missing status is stored.
        let stores = super::super::IdempotencyLayer::builder(super::super::MemoryStore::default())
            .store_failures(true)
            .build()
            .unwrap();
        assert!(!end_not_stored(&grpc, None, b"", &stores.shared().config));
    }

    #[test]
    fn errors_that_refuse_before_running() {
        let refused = Marks::default();
        refused.mark_refused();
        let boxed = |e: BoxError| refused_before_running(&*e, &refused);
        for kind in [
            RejectionKind::RateLimited,
            RejectionKind::Overloaded,
            RejectionKind::CircuitOpen,
            RejectionKind::IdempotencyInFlight,
            RejectionKind::StoreUnavailable,
        ] {
            // The request was refused by a layer below, and this is its rejection.
            assert!(boxed(Rejection::new(kind).into()), "{kind:?}");
            // The request was not refused (the rejection is another request's: the handler's
            // own client's): the handler's error.
            assert!(
                !refused_before_running(&Rejection::new(kind), &Marks::default()),
                "{kind:?}"
            );
        }
        // tower's shed does not mark the request: it cannot be told from a forwarded one.
        assert!(!boxed(tower::load_shed::error::Overloaded::new().into()));
        // Wrapped in another error, it is the service's (a handler passing on what its own
        // client was refused): not a refusal of this request.
        #[derive(Debug)]
        struct Wrap(Rejection);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert!(!boxed(Box::new(Wrap(Rejection::new(
            RejectionKind::RateLimited
        )))));
        // A handler that may have run: a timeout, its own error, a lease lost mid-handler.
        assert!(!boxed("handler failed".into()));
        assert!(!boxed(tower::timeout::error::Elapsed::new().into()));
        let lost = Rejection::new(RejectionKind::StoreUnavailable).with_detail(LEASE_NOT_KEPT);
        assert!(!boxed(lost.into()));
    }

    #[test]
    fn failure_heads() {
        let empty = HeaderMap::new();
        for grpc_call in [false, true] {
            let f = |s, h: &HeaderMap| head_is_failure(s, h, grpc_call);
            assert!(f(StatusCode::INTERNAL_SERVER_ERROR, &empty));
            assert!(f(StatusCode::TOO_MANY_REQUESTS, &empty));
            assert!(f(StatusCode::SERVICE_UNAVAILABLE, &empty));
            assert!(!f(StatusCode::OK, &empty), "a 200: the trailers decide");
            let mut grpc = HeaderMap::new();
            grpc.insert("grpc-status", "14".parse().unwrap());
            assert!(f(StatusCode::OK, &grpc));
            grpc.insert("grpc-status", "5".parse().unwrap());
            assert!(!f(StatusCode::OK, &grpc));
        }
        // An HTTP request: a 4xx is the answer, stored.
        assert!(!head_is_failure(StatusCode::CREATED, &empty, false));
        assert!(!head_is_failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            &empty,
            false
        ));
        assert!(!head_is_failure(StatusCode::BAD_REQUEST, &empty, false));
        // A gRPC call answered without grpc-status (a proxy): mapped as gRPC does, so a 400
        // is INTERNAL (a failure, not stored) and a 404 UNIMPLEMENTED (stored).
        assert!(head_is_failure(StatusCode::BAD_REQUEST, &empty, true));
        assert!(head_is_failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            &empty,
            true
        ));
        assert!(!head_is_failure(StatusCode::NOT_FOUND, &empty, true));
    }
}
