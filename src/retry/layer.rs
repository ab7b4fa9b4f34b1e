//! The layer, its shared state and its handle.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tower_layer::Layer;

use crate::classify::ErrorsOnly;
use crate::clock::{duration_nanos, Clock};
use crate::util::rng::entropy;

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
    shared: Arc<Shared<C, R>>,
}

/// What a retry service shares with its clones and its response futures: the layer's state,
/// and the service that retries are made on (a clone of the wrapped service, made once, on
/// the first call that may be retried, and cloned again only when a retry happens). The
/// first attempt therefore pays no clone of the inner service.
pub(crate) struct Core<S, C, R> {
    pub(crate) shared: Arc<Shared<C, R>>,
    /// In a `Mutex` so that the core is `Sync` for any `Send` service; locked only to clone
    /// the service for a retry, never on the first attempt.
    template: OnceLock<Mutex<S>>,
}

/// One of a service's per-thread holds on its [`Core`]: a response future clones the `Arc`
/// of its thread's anchor, so threads do not all write one reference count.
#[repr(align(128))]
pub(crate) struct Anchor<S, C, R>(Arc<Core<S, C, R>>);

impl<S, C, R> Deref for Anchor<S, C, R> {
    type Target = Shared<C, R>;

    #[inline]
    fn deref(&self) -> &Shared<C, R> {
        &self.0.shared
    }
}

impl<S: Clone, C, R> Anchor<S, C, R> {
    /// Keeps a clone of `svc` for retries, the first time only.
    #[inline]
    pub(crate) fn keep_template(&self, svc: &S) {
        if self.0.template.get().is_none() {
            let _ = self.0.template.set(Mutex::new(svc.clone()));
        }
    }

    /// A fresh clone of the service for a retry (`None` if none was kept, which a future that
    /// retries never sees: the template is kept before its first attempt is made).
    pub(crate) fn service(&self) -> Option<S> {
        let template = self.0.template.get()?;
        let svc = template.lock().unwrap_or_else(PoisonError::into_inner);
        Some(svc.clone())
    }
}

/// A retry service's anchors, one per thread shard.
pub(crate) struct Anchors<S, C, R>([Arc<Anchor<S, C, R>>; SHARDS]);

impl<S, C, R> Anchors<S, C, R> {
    pub(crate) fn new(shared: Arc<Shared<C, R>>) -> Self {
        let core = Arc::new(Core {
            shared,
            template: OnceLock::new(),
        });
        Anchors(std::array::from_fn(|_| Arc::new(Anchor(core.clone()))))
    }

    /// The layer's state.
    #[inline]
    pub(crate) fn shared(&self) -> &Shared<C, R> {
        &self.0[0].0.shared
    }

    /// This shard's anchor, for a response future.
    #[inline]
    pub(crate) fn anchor(&self, shard: usize) -> Arc<Anchor<S, C, R>> {
        self.0[shard].clone()
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
    /// The longest server hint waited out, in nanoseconds.
    pub(crate) max_hint: u64,
    pub(crate) deadline: Option<u64>,
    pub(crate) budget: Option<Budget>,
    pub(crate) clock: Clock,
    /// Whether a retry decision needs a time reading (a budget or a deadline).
    pub(crate) needs_clock: bool,
    pub(crate) rng: Rng,
    /// Drawn from the process's entropy whatever the seed, and mixed into every generated
    /// `Idempotency-Key`: replicas given one seed never generate the same keys.
    pub(crate) key_salt: u128,
    pub(crate) retries: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
}

impl<C, R> RetryLayer<C, R> {
    /// Builds the layer and its state from a policy.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for zero attempts, a multiplier below 1, a NaN or out-of-range
    /// jitter, a maximum delay below the base, a zero base with a maximum that is not zero, a
    /// zero deadline, or a policy clock that is not the clock its budget runs on.
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
        // One clock for the deadline and the budget: the budget takes the policy's if it has
        // none yet, and a contradiction is refused.
        let clock = match &budget {
            Some(b) => b.clock_for(policy.clock.as_ref())?,
            None => policy.clock.unwrap_or_default(),
        };
        let rng = match policy.seed {
            Some(seed) => Rng::seeded(seed),
            None => Rng::from_entropy(),
        };
        Ok(RetryLayer {
            shared: Arc::new(Shared {
                control: Control {
                    max_attempts: AtomicU32::new(policy.max_attempts),
                    backoff: policy.backoff,
                    max_hint: duration_nanos(policy.max_hint),
                    deadline: policy.deadline.map(duration_nanos),
                    needs_clock: budget.is_some() || policy.deadline.is_some(),
                    budget,
                    clock,
                    rng,
                    key_salt: (u128::from(entropy()) << 64) | u128::from(entropy()),
                    retries: AtomicU64::new(0),
                    budget_exhausted: AtomicU64::new(0),
                },
                classify: policy.classify,
                replay: policy.replay,
            }),
        })
    }

    /// A handle to the layer's figures and run-time settings.
    pub fn handle(&self) -> RetryHandle
    where
        C: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        RetryHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<C, R> Clone for RetryLayer<C, R> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<C: fmt::Debug, R: fmt::Debug> fmt::Debug for RetryLayer<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("classify", &self.shared.classify)
            .field("replay", &self.shared.replay)
            .field("control", &self.shared.control)
            .finish()
    }
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("max_attempts", &self.max_attempts.load(Ordering::Relaxed))
            .field("backoff", &self.backoff)
            .field("max_hint_nanos", &self.max_hint)
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
        Retry::new(inner, Arc::new(Anchors::new(self.shared.clone())))
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
