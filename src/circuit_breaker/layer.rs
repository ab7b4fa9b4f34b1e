use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use tower_layer::Layer;

use super::config::{BreakerConfig, BreakerConfigError};
use super::handle::BreakerHandle;
use super::service::CircuitBreaker;
use super::state::Owner;
use crate::classify::ErrorsOnly;

/// Chooses the breaker a request counts for: the layer's one breaker ([`Single`]) or a
/// breaker per key ([`ByKey`], made by [`CircuitBreakerLayer::keyed`]).
///
/// Implemented by [`Single`] and [`ByKey`]; the layer's constructors pick it.
pub trait BreakerKey<Req>: Clone {
    /// The hash of the request's key under the layer's hasher, or `None` for the layer's
    /// single breaker.
    fn key_hash(&self, req: &Req, hasher: &RandomState) -> Option<u64>;

    /// Whether every request counts for the layer's single breaker, known before the
    /// request is seen: then `poll_ready` can refuse without waiting on the inner service.
    /// `false` by default (a keyed breaker is known only in `call`).
    fn is_single(&self) -> bool {
        false
    }
}

/// One breaker for every request (the [`CircuitBreakerLayer::new`] layer).
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl<Req> BreakerKey<Req> for Single {
    #[inline]
    fn key_hash(&self, _req: &Req, _hasher: &RandomState) -> Option<u64> {
        None
    }

    #[inline]
    fn is_single(&self) -> bool {
        true
    }
}

/// A breaker per key, the key given by a function of the request (the
/// [`CircuitBreakerLayer::keyed`] layer).
#[derive(Clone)]
pub struct ByKey<F> {
    key_fn: F,
}

impl<F> fmt::Debug for ByKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByKey").finish_non_exhaustive()
    }
}

impl<Req, F, K> BreakerKey<Req> for ByKey<F>
where
    F: Fn(&Req) -> K + Clone,
    K: Hash,
{
    #[inline]
    fn key_hash(&self, req: &Req, hasher: &RandomState) -> Option<u64> {
        Some(hasher.hash_one((self.key_fn)(req)))
    }
}

/// Applies a circuit breaker to a service; see the [module docs](super).
///
/// # Clone
///
/// Clones share the breaker(s): every service made by one layer, and every clone of those
/// services, counts into the same state and is refused together when it opens. Two
/// dependencies that must trip separately need two layers (or one [keyed](Self::keyed) layer).
///
/// # Memory
///
/// The state of a one-breaker layer with a system clock ([`Clock::fast`] or [`Clock::std`])
/// and a small window (at most 4096 calls or 64 buckets) is kept in a `'static` place, so that
/// a call's future refers to it without a reference count. Such a state is not freed when its
/// layer, services and handles are gone but reset and kept for the next layer made with the
/// same configuration; at most 256 are ever made in a process (a few kilobytes each at most),
/// and past that layers keep their state behind an `Arc`, as keyed layers and layers with
/// other clocks always do.
///
/// [`Clock::fast`]: crate::clock::Clock::fast
/// [`Clock::std`]: crate::clock::Clock::std
pub struct CircuitBreakerLayer<C = ErrorsOnly, K = Single> {
    shared: Arc<Owner>,
    classify: C,
    key: K,
    pending_while_open: bool,
}

impl<C: Clone, K: Clone> Clone for CircuitBreakerLayer<C, K> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            key: self.key.clone(),
            pending_while_open: self.pending_while_open,
        }
    }
}

impl<C: fmt::Debug, K: fmt::Debug> fmt::Debug for CircuitBreakerLayer<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("limits", &self.shared.limits)
            .field("classify", &self.classify)
            .field("key", &self.key)
            .field("pending_while_open", &self.pending_while_open)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// One breaker, shared by every service this layer makes, classifying with
    /// [`ErrorsOnly`] (change it with [`classify`](Self::classify)).
    ///
    /// # Errors
    ///
    /// A [`BreakerConfigError`] when the configuration is invalid (see
    /// [`BreakerConfig::validate`]).
    pub fn new(config: BreakerConfig) -> Result<Self, BreakerConfigError> {
        config.validate()?;
        Ok(CircuitBreakerLayer {
            shared: Arc::new(Owner::new(&config, false)),
            classify: ErrorsOnly,
            key: Single,
            pending_while_open: false,
        })
    }
}

impl<C> CircuitBreakerLayer<C, Single> {
    /// A handle on the layer's breaker: its state and figures, and manual control.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.shared.clone(), 0, None)
    }

    /// Readiness for a breaker under a balancer (tower's `Balance`, `ReadyCache`): while the
    /// breaker refuses, its services' `poll_ready` is *pending* instead of ready with the
    /// refusal, so that the balancer skips the endpoint and sends its requests to the others.
    ///
    /// By default a breaker that refuses is ready at once and refuses in `call` (tower's
    /// `LoadShed` pattern), so that a caller is refused rather than left waiting. A balancer
    /// picks among the services that are ready, and prefers the least loaded: an open
    /// endpoint, ready at once and quick to answer with its refusals, would draw a large
    /// share of the traffic and refuse it while healthy endpoints idle. With this mode, an
    /// open breaker's `poll_ready` is pending until the end of its open time (a timer wakes
    /// the caller then), and then decides again: once the open time is over, it claims a
    /// probe slot and waits on the endpoint's readiness, so the balancer sends the endpoint
    /// its probes and takes it back once they pass. Forced open, it looks again after a
    /// period drawn between half and one and a half times the open time; half-open with
    /// every probe slot taken, after the wait the refusal's `retry_after` would have given
    /// (a random share of the open time a failed probe would start).
    ///
    /// Only for a breaker whose caller is a balancer or a `ReadyCache`, which poll many
    /// services and call the ready ones. Any other caller waits in `poll_ready` for as long
    /// as the breaker refuses (up to the open time, or for ever while forced open); behind
    /// tower's `Buffer`, every caller of the buffer waits with it. Outside a tokio runtime,
    /// where no timer can wake the caller, the breaker refuses as by default. Keyed breakers
    /// learn the key only in `call` and have no such mode.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::balance::p2c::Balance;
    /// use tower::discover::ServiceList;
    /// use tower::load::{CompleteOnResponse, PendingRequests};
    /// use tower::{BoxError, Layer, ServiceExt};
    /// use tower_bulwark::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
    /// // One breaker per endpoint, each a dependency of its own.
    /// let endpoint = |name: &'static str| -> Result<_, BoxError> {
    ///     let breaker = CircuitBreakerLayer::new(
    ///         BreakerConfig::consecutive_failures(3).open_time(Duration::from_secs(30)),
    ///     )?
    ///     .for_balancer();
    ///     let svc = breaker.layer(tower::service_fn(move |_req: ()| async move {
    ///         Ok::<_, BoxError>(name)
    ///     }));
    ///     Ok(PendingRequests::new(svc, CompleteOnResponse::default()))
    /// };
    /// let balance = Balance::new(ServiceList::new(vec![endpoint("a")?, endpoint("b")?]));
    /// let answer = balance.oneshot(()).await?;
    /// assert!(answer == "a" || answer == "b");
    /// # Ok(()) }
    /// ```
    pub fn for_balancer(mut self) -> Self {
        self.pending_while_open = true;
        self
    }
}

impl<F> CircuitBreakerLayer<ErrorsOnly, ByKey<F>> {
    /// A breaker per key, where `key_fn` gives a request's key (such as its host or
    /// authority, for a client that calls many hosts).
    ///
    /// At most [`max_keys`](BreakerConfig::max_keys) keys (rounded up to a power of two) have
    /// a breaker; the breakers are allocated when the layer is built, so the memory is fixed.
    /// Keys live in a fixed-capacity lock-free table, identified by a 64-bit hash of the key
    /// (the standard library's `RandomState`, randomly seeded per layer; two keys whose hashes
    /// collide, a chance of about 2^-64 per pair, share a breaker): looking up a key, and
    /// claiming a free slot for a new one, take no lock. A new key whose slots (8 places from its hash) are all taken
    /// reuses one whose breaker is healthy (closed, no failure in its window) or stale (its
    /// last failure, or the end of its open time with no request since, 10 minutes or twice
    /// the longest open time ago); a breaker that has tripped and is still asked for is never
    /// reused, so a flood of new keys cannot reset it. If none is free, the request goes
    /// through without a breaker (a `tracing` event at `DEBUG` says so).
    ///
    /// ```
    /// use http::{Request, Response};
    /// use tower::{BoxError, ServiceBuilder, ServiceExt};
    /// use tower_bulwark::circuit_breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer};
    /// use tower_bulwark::classify::HttpStatus;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
    /// // One breaker per host, for a client that calls many.
    /// let breakers = CircuitBreakerLayer::keyed(
    ///     BreakerConfig::consecutive_failures(1).max_keys(256),
    ///     |req: &Request<()>| req.uri().authority().map(|a| a.to_string()),
    /// )?
    /// .classify(HttpStatus::new());
    /// let client = ServiceBuilder::new()
    ///     .layer(breakers.clone())
    ///     .service_fn(|req: Request<()>| async move {
    ///         let status = if req.uri().host() == Some("sick.example") { 503 } else { 200 };
    ///         Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
    ///     });
    ///
    /// let get = |uri: &str| Request::get(uri).body(()).unwrap();
    /// client.clone().oneshot(get("http://sick.example/a")).await?;
    /// client.clone().oneshot(get("http://well.example/a")).await?;
    /// let sick = breakers.handle_for(&Some("sick.example".to_string())).unwrap();
    /// let well = breakers.handle_for(&Some("well.example".to_string())).unwrap();
    /// assert_eq!(sick.state(), BreakerState::Open);
    /// assert_eq!(well.state(), BreakerState::Closed);
    /// assert!(client.clone().oneshot(get("http://sick.example/b")).await.is_err());
    /// assert!(client.oneshot(get("http://well.example/b")).await.is_ok());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// A [`BreakerConfigError`] when the configuration is invalid.
    pub fn keyed(config: BreakerConfig, key_fn: F) -> Result<Self, BreakerConfigError> {
        config.validate_keyed()?;
        Ok(CircuitBreakerLayer {
            shared: Arc::new(Owner::new(&config, true)),
            classify: ErrorsOnly,
            key: ByKey { key_fn },
            pending_while_open: false,
        })
    }
}

impl<C, F> CircuitBreakerLayer<C, ByKey<F>> {
    /// A handle on the breaker of `key`, if the key has one (it gets one with its first
    /// request). The handle acts only on this key's breaker: once the key's slot is given
    /// to another key it acts on nothing (see [`BreakerHandle`]'s `# Keyed breakers`).
    pub fn handle_for<Q: Hash + ?Sized>(&self, key: &Q) -> Option<BreakerHandle> {
        let h = self.shared.hasher.hash_one(key).max(1);
        self.shared
            .find_slot(h)
            .map(|idx| BreakerHandle::new(self.shared.clone(), idx, Some(h)))
    }

    /// How many keys have a breaker now.
    pub fn keys_in_use(&self) -> usize {
        self.shared.keys_in_use()
    }
}

impl<C, K> CircuitBreakerLayer<C, K> {
    /// Decides with `classify` what counts as a failure: [`HttpStatus`] (5xx) for HTTP,
    /// [`GrpcStatus`] for gRPC, a [`ClassifyFn`], or [`ErrorsOnly`] (the default).
    ///
    /// [`HttpStatus`]: crate::classify::HttpStatus
    /// [`GrpcStatus`]: crate::classify::GrpcStatus
    /// [`ClassifyFn`]: crate::classify::ClassifyFn
    pub fn classify<C2>(self, classify: C2) -> CircuitBreakerLayer<C2, K> {
        CircuitBreakerLayer {
            shared: self.shared,
            classify,
            key: self.key,
            pending_while_open: self.pending_while_open,
        }
    }
}

impl<S, C: Clone, K: Clone> Layer<S> for CircuitBreakerLayer<C, K> {
    type Service = CircuitBreaker<S, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            self.shared.clone(),
            self.classify.clone(),
            self.key.clone(),
            self.pending_while_open,
        )
    }
}
