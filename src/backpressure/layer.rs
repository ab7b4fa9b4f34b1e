use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::adaptive::{Adaptive, AdaptiveState};
use super::error::ConfigError;
use super::service::Backpressure;
use super::state::{BackpressureHandle, Shared, MAX_LIMIT};
use crate::classify::ErrorsOnly;

/// The permit is given back when the response future completes (the default).
///
/// A marker for [`BackpressureLayer`]; see [`BackpressureLayer::hold_until_body_end`] for the
/// other choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseOnResponse;

/// The permit is given back when the HTTP response body has been streamed to its end, fails,
/// or is dropped.
///
/// A marker for [`BackpressureLayer`], set by [`BackpressureLayer::hold_until_body_end`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseOnBodyEnd;

/// How long a request waits for a permit when `max_queue` is set and `max_wait` is not.
const QUEUE_WAIT: Duration = Duration::from_millis(100);

/// Settings of one layer, copied into every service it makes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub(crate) max_wait: Duration,
    pub(crate) max_queue: usize,
    pub(crate) retry_after: Duration,
}

/// Bounds the requests in flight with a budget shared by every service this layer makes;
/// see the [module docs](super).
///
/// By default a request that finds the budget spent is shed at once; [`max_wait`] lets it
/// wait for a permit, at most that long, with at most [`max_queue`] others (a `max_queue`
/// alone waits at most 100 ms).
///
/// # Clone
///
/// Clones of the layer, every service made from it (by any number of [`Layer::layer`] calls)
/// and every clone of those services draw on one budget. A layer made with
/// [`BackpressureLayer::shared`] draws on the budget of the handle it was given.
///
/// [`max_wait`]: BackpressureLayer::max_wait
/// [`max_queue`]: BackpressureLayer::max_queue
pub struct BackpressureLayer<R = ReleaseOnResponse, C = ErrorsOnly> {
    shared: Arc<Shared>,
    cfg: Config,
    /// `max_queue` was set: a queue implies waiting, for [`QUEUE_WAIT`] without `max_wait`.
    queue_set: bool,
    classify: C,
    _release: PhantomData<fn() -> R>,
}

impl BackpressureLayer {
    /// A layer that admits at most `max_in_flight` requests at once and sheds the rest.
    ///
    /// `max_in_flight` of 0 admits nothing until the limit is raised through the
    /// [handle](BackpressureLayer::handle) (a drain switch); values above 2³¹ − 1 are clamped
    /// to it.
    pub fn new(max_in_flight: usize) -> Self {
        let limit = u32::try_from(max_in_flight).unwrap_or(MAX_LIMIT);
        Self::from_shared(Arc::new(Shared::new(limit, None, None)))
    }

    /// A layer whose limit moves between a floor and a ceiling with the latency and failures
    /// it measures (AIMD or a gradient; see [`Adaptive`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the configuration cannot work: a floor of 0, bounds out of order,
    /// an initial limit out of bounds, a zero window, or a factor out of range.
    pub fn adaptive(adaptive: Adaptive) -> Result<Self, ConfigError> {
        adaptive.validate()?;
        let state = AdaptiveState::new(&adaptive);
        Ok(Self::from_shared(Arc::new(Shared::new(
            adaptive.initial as u32,
            Some(state),
            adaptive.clock.clone(),
        ))))
    }

    /// A layer that draws on the budget of `handle`: several routes or layers, one limit.
    ///
    /// The new layer starts with the default settings (shed at once); its own
    /// [`max_wait`](BackpressureLayer::max_wait) and [`max_queue`](BackpressureLayer::max_queue)
    /// apply to its requests, and `max_queue` is checked against the waiters of the whole
    /// budget.
    pub fn shared(handle: &BackpressureHandle) -> Self {
        Self::from_shared(handle.shared.clone())
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        BackpressureLayer {
            shared,
            cfg: Config {
                max_wait: Duration::ZERO,
                max_queue: usize::MAX,
                retry_after: Duration::from_secs(1),
            },
            queue_set: false,
            classify: ErrorsOnly,
            _release: PhantomData,
        }
    }
}

impl<R, C> BackpressureLayer<R, C> {
    /// How long a request may wait for a permit before it is shed (default zero: shed at
    /// once, unless [`max_queue`](Self::max_queue) is set, which waits 100 ms). Zero is the
    /// default, whichever way it is given.
    ///
    /// Waiting needs a tokio runtime with the time driver (`tokio::time`); a request that
    /// would wait outside any tokio runtime is shed at once.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.cfg.max_wait = max_wait;
        self
    }

    /// How many requests may wait at once (default: no bound beyond `max_wait`). A request
    /// that would be the `max_queue + 1`-th waiter is shed at once.
    ///
    /// A queue implies waiting: without a [`max_wait`](Self::max_wait) (or with a zero one),
    /// a queued request waits at most 100 ms, so that `BackpressureLayer::new(n).max_queue(m)`
    /// queues up to `m` requests rather than shedding every one. `max_queue(0)` sheds at
    /// once whatever `max_wait` says.
    pub fn max_queue(mut self, max_queue: usize) -> Self {
        self.cfg.max_queue = max_queue;
        self.queue_set = true;
        self
    }

    /// The base of the `retry_after` hint a shed request's [`Rejection`](crate::Rejection)
    /// carries (default 1 s). Each shed request is told a time drawn uniformly from
    /// `[retry_after, 3·retry_after)`, so that callers shed together do not come back
    /// together: with the default, `Retry-After: 1`, `2` or `3` over HTTP (whole seconds,
    /// rounded up). A base of zero gives a zero hint.
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.cfg.retry_after = retry_after;
        self
    }

    /// Holds each permit until the HTTP response body has been streamed to its end (or has
    /// failed, or was dropped), not only until the response head, so a streaming response
    /// counts as in flight. The service's responses become
    /// `http::Response<`[`PermitBody<B>`](super::PermitBody)`>`.
    pub fn hold_until_body_end(self) -> BackpressureLayer<ReleaseOnBodyEnd, C> {
        BackpressureLayer {
            shared: self.shared,
            cfg: self.cfg,
            queue_set: self.queue_set,
            classify: self.classify,
            _release: PhantomData,
        }
    }

    /// What counts as a failure of the dependency in an adaptive limit's samples, for the
    /// responses (errors always count as failures). Responses whose outcome
    /// [`is_failure`](crate::classify::Outcome::is_failure) are failures.
    ///
    /// By default ([`ErrorsOnly`]) every response is a success: for an HTTP service, give
    /// [`HttpStatus`](crate::classify::HttpStatus) so that 5xx responses pull the limit down
    /// (with [`hold_until_body_end`](Self::hold_until_body_end), 5xx and failing gRPC statuses
    /// in the headers or the trailers always count, and the classifier adds to them, the
    /// trailers through
    /// [`classify_body_trailers`](crate::classify::Classify::classify_body_trailers)). A fixed
    /// limit takes no samples and never calls the classifier.
    ///
    /// ```
    /// use tower_bulwark::backpressure::{Adaptive, Aimd, BackpressureLayer};
    /// use tower_bulwark::classify::HttpStatus;
    ///
    /// let layer = BackpressureLayer::adaptive(Adaptive::aimd(Aimd::default()))
    ///     .expect("valid configuration")
    ///     .classify(HttpStatus::default());
    /// # let _ = layer;
    /// ```
    pub fn classify<C2>(self, classify: C2) -> BackpressureLayer<R, C2> {
        BackpressureLayer {
            shared: self.shared,
            cfg: self.cfg,
            queue_set: self.queue_set,
            classify,
            _release: PhantomData,
        }
    }

    /// The settings its services get: a queue without a wait waits [`QUEUE_WAIT`].
    fn service_cfg(&self) -> Config {
        let mut cfg = self.cfg;
        if self.queue_set && cfg.max_wait.is_zero() {
            cfg.max_wait = QUEUE_WAIT;
        }
        cfg
    }

    /// A handle on this layer's budget: figures, and the limit changed at run time.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<R, C: Clone> Clone for BackpressureLayer<R, C> {
    fn clone(&self) -> Self {
        BackpressureLayer {
            shared: self.shared.clone(),
            cfg: self.cfg,
            queue_set: self.queue_set,
            classify: self.classify.clone(),
            _release: PhantomData,
        }
    }
}

impl<R, C> fmt::Debug for BackpressureLayer<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackpressureLayer")
            .field("budget", &self.handle())
            .field("max_wait", &self.service_cfg().max_wait)
            .field("max_queue", &self.cfg.max_queue)
            .field("retry_after", &self.cfg.retry_after)
            .field(
                "release",
                &std::any::type_name::<R>().rsplit("::").next().unwrap_or(""),
            )
            .field(
                "classify",
                &std::any::type_name::<C>().rsplit("::").next().unwrap_or(""),
            )
            .finish()
    }
}

impl<S, R, C: Clone> Layer<S> for BackpressureLayer<R, C> {
    type Service = Backpressure<S, R, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Backpressure::from_parts(
            inner,
            self.shared.clone(),
            self.service_cfg(),
            self.classify.clone(),
        )
    }
}
