//! The layer, its shared state and its handle.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tower_layer::Layer;

use crate::classify::ErrorsOnly;
use crate::clock::{duration_nanos, Clock};

use super::backoff::{Backoff, Rng};
use super::budget::{Budget, SHARDS};
use super::policy::{BudgetChoice, CloneRequest, ConfigError, RetryPolicy};
use super::service::Retry;

/// Retries failed requests with jittered exponential backoff, inside a retry budget; see the
/// [module docs](super).
///
/// # Clone
///
/// Clones, and every service the layer makes, share one state: the budget, the random
/// generator, the figures and the run-time settings of the [`RetryHandle`].
pub struct RetryLayer<C = ErrorsOnly, R = CloneRequest> {
    hub: Arc<Hub<C, R>>,
}

/// The state of a layer and the anchors its response futures hold it by.
///
/// A response future that may retry must keep the state alive, but taking a reference on one
/// count per call would make every thread write one cache line. Each anchor is a reference to
/// the state on a cache line of its own; a future takes a reference on its thread's anchor
/// instead, so threads count on different lines. The memory is bounded: [`SHARDS`] anchors per
/// layer, freed with the layer's last service, handle or future.
pub(crate) struct Hub<C, R> {
    pub(crate) shared: Arc<Shared<C, R>>,
    anchors: [Arc<Anchor<C, R>>; SHARDS],
}

/// A reference to a layer's state, alone on its cache line; see [`Hub`].
#[repr(align(128))]
pub(crate) struct Anchor<C, R>(Arc<Shared<C, R>>);

impl<C, R> Deref for Anchor<C, R> {
    type Target = Shared<C, R>;

    #[inline]
    fn deref(&self) -> &Shared<C, R> {
        &self.0
    }
}

impl<C, R> Hub<C, R> {
    fn new(shared: Shared<C, R>) -> Self {
        let shared = Arc::new(shared);
        Hub {
            anchors: std::array::from_fn(|_| Arc::new(Anchor(shared.clone()))),
            shared,
        }
    }

    /// A reference to the state for a response future, counted on the line of `shard` (this
    /// thread's, from `budget::shard`).
    #[inline]
    pub(crate) fn anchor(&self, shard: usize) -> Arc<Anchor<C, R>> {
        self.anchors[shard].clone()
    }
}

pub(crate) struct Shared<C, R> {
    pub(crate) control: Control,
    pub(crate) classify: C,
    pub(crate) replay: R,
}

/// The part of the state that does not depend on the classifier or the request type.
pub(crate) struct Control {
    pub(crate) max_attempts: AtomicU32,
    pub(crate) backoff: Backoff,
    pub(crate) deadline: Option<u64>,
    pub(crate) budget: Option<Budget>,
    pub(crate) clock: Clock,
    /// Whether a retry decision needs a time reading (a budget or a deadline).
    pub(crate) needs_clock: bool,
    pub(crate) rng: Rng,
    pub(crate) retries: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
}

impl<C, R> RetryLayer<C, R> {
    /// Builds the layer and its state from a policy.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for zero attempts, a multiplier below 1, a NaN or out-of-range
    /// jitter, a maximum delay below the base, or a zero deadline.
    pub fn new(policy: RetryPolicy<C, R>) -> Result<Self, ConfigError> {
        if policy.max_attempts == 0 {
            return Err(ConfigError::ZeroAttempts);
        }
        policy.backoff.validate()?;
        if policy.deadline.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDeadline);
        }
        let budget = match policy.budget {
            BudgetChoice::Default => Some(
                Budget::builder()
                    .clock(policy.clock.clone().unwrap_or_default())
                    .build()?,
            ),
            BudgetChoice::Given(b) => Some(b),
            BudgetChoice::Off => None,
        };
        let clock = match &budget {
            Some(b) => b.clock().clone(),
            None => policy.clock.unwrap_or_default(),
        };
        let rng = match policy.seed {
            Some(seed) => Rng::seeded(seed),
            None => Rng::from_entropy(),
        };
        Ok(RetryLayer {
            hub: Arc::new(Hub::new(Shared {
                control: Control {
                    max_attempts: AtomicU32::new(policy.max_attempts),
                    backoff: policy.backoff,
                    deadline: policy.deadline.map(duration_nanos),
                    needs_clock: budget.is_some() || policy.deadline.is_some(),
                    budget,
                    clock,
                    rng,
                    retries: AtomicU64::new(0),
                    budget_exhausted: AtomicU64::new(0),
                },
                classify: policy.classify,
                replay: policy.replay,
            })),
        })
    }

    /// A handle to the layer's figures and run-time settings.
    pub fn handle(&self) -> RetryHandle
    where
        C: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        RetryHandle {
            shared: self.hub.shared.clone(),
        }
    }
}

impl<C, R> Clone for RetryLayer<C, R> {
    fn clone(&self) -> Self {
        RetryLayer {
            hub: self.hub.clone(),
        }
    }
}

impl<C: fmt::Debug, R: fmt::Debug> fmt::Debug for RetryLayer<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("classify", &self.hub.shared.classify)
            .field("replay", &self.hub.shared.replay)
            .field("control", &self.hub.shared.control)
            .finish()
    }
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("max_attempts", &self.max_attempts.load(Ordering::Relaxed))
            .field("backoff", &self.backoff)
            .field("deadline_nanos", &self.deadline)
            .field("budget", &self.budget)
            .field("retries", &self.retries.load(Ordering::Relaxed))
            .field(
                "budget_exhausted",
                &self.budget_exhausted.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl<S, C, R> Layer<S> for RetryLayer<C, R> {
    type Service = Retry<S, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.hub.clone())
    }
}

trait HasControl: Send + Sync {
    fn control(&self) -> &Control;
}

impl<C: Send + Sync, R: Send + Sync> HasControl for Shared<C, R> {
    fn control(&self) -> &Control {
        &self.control
    }
}

/// Figures and run-time settings of a [`RetryLayer`], shared with every service it made.
///
/// ```
/// use tower_bulwark::retry::{RetryLayer, RetryPolicy};
///
/// let layer = RetryLayer::new(RetryPolicy::errors()).unwrap();
/// let handle = layer.handle();
/// assert_eq!(handle.max_attempts(), 3);
/// handle.set_max_attempts(5).unwrap();
/// assert_eq!(handle.max_attempts(), 5);
/// assert!(handle.set_max_attempts(0).is_err());
/// assert_eq!(handle.retries(), 0);
/// ```
#[derive(Clone)]
pub struct RetryHandle {
    shared: Arc<dyn HasControl>,
}

impl RetryHandle {
    fn control(&self) -> &Control {
        self.shared.control()
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.control().max_attempts.load(Ordering::Relaxed)
    }

    /// Changes the attempts in all, for requests that start from now on.
    ///
    /// # Errors
    ///
    /// [`ConfigError::ZeroAttempts`] for zero.
    pub fn set_max_attempts(&self, max_attempts: u32) -> Result<(), ConfigError> {
        if max_attempts == 0 {
            return Err(ConfigError::ZeroAttempts);
        }
        self.control()
            .max_attempts
            .store(max_attempts, Ordering::Relaxed);
        Ok(())
    }

    /// Retries made so far (attempts after the first).
    pub fn retries(&self) -> u64 {
        self.control().retries.load(Ordering::Relaxed)
    }

    /// Retries refused because the budget was spent.
    pub fn budget_exhausted(&self) -> u64 {
        self.control().budget_exhausted.load(Ordering::Relaxed)
    }

    /// The layer's budget, to read its figures or change its ratio.
    pub fn budget(&self) -> Option<&Budget> {
        self.control().budget.as_ref()
    }
}

impl fmt::Debug for RetryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryHandle")
            .field("control", self.control())
            .finish()
    }
}
