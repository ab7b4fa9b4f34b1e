use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use super::future::{Keyed, ResponseFuture};
use super::key;
use super::layer::{Counters, FromBytes, RebuildBody, Shared};
use super::store::{Store, StoreKey};
use crate::rejection::{Rejection, RejectionKind};

/// The service made by [`IdempotencyLayer`](super::IdempotencyLayer); see the
/// [module docs](super).
///
/// # Clone
///
/// Clones share the layer's store, configuration and figures. A clone starts unreserved: a
/// keyed request takes the service made ready by `poll_ready` into its response future and
/// leaves a fresh clone in its place.
pub struct Idempotency<S, St, M = FromBytes> {
    inner: S,
    store: St,
    shared: Arc<Shared>,
    rebuild: M,
}

impl<S, St, M> Idempotency<S, St, M> {
    pub(crate) fn new(inner: S, store: St, shared: Arc<Shared>, rebuild: M) -> Self {
        Idempotency {
            inner,
            store,
            shared,
            rebuild,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St: Clone, M: Clone> Clone for Idempotency<S, St, M> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            store: self.store.clone(),
            shared: self.shared.clone(),
            rebuild: self.rebuild.clone(),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug, M> fmt::Debug for Idempotency<S, St, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<S, St, M, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    St: Store,
    M: RebuildBody<ReqB>,
    ReqB: Body,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Unpin,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<super::ReplayBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, St, M, ReqB, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let cfg = &self.shared.config;
        if !cfg.methods.iter().any(|m| m == req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        let key = match key::parse(&parts.headers, &cfg.header) {
            Ok(Some(key)) => {
                let scope = cfg.scope.of(&parts);
                if scope.is_empty() && cfg.scope.is_credentials() {
                    self.shared.anonymous();
                }
                if cfg.scope.is_unscoped() {
                    StoreKey::unscoped(&key)
                } else {
                    StoreKey::new(scope, &key)
                }
            }
            Ok(None) if !cfg.required => {
                let req = Request::from_parts(parts, body);
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Ok(None) => {
                Counters::bump(&self.shared.stats.invalid);
                // Dropped as refused (`util::stamp`), for a `RejectionLayer` above.
                crate::util::stamp::refuse((parts, body));
                return ResponseFuture::reject(Rejection::new(
                    RejectionKind::IdempotencyKeyMissing,
                ));
            }
            Err(detail) => {
                Counters::bump(&self.shared.stats.invalid);
                tracing::debug!(detail, "idempotency key refused");
                crate::util::stamp::refuse((parts, body));
                return ResponseFuture::reject(
                    Rejection::new(RejectionKind::IdempotencyKeyInvalid).with_detail(detail),
                );
            }
        };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = declared.is_some_and(|n| n > cfg.max_request_body as u64)
            || body.size_hint().lower() > cfg.max_request_body as u64;
        if too_large {
            Counters::bump(&self.shared.stats.too_large);
            crate::util::stamp::refuse((parts, body));
            return ResponseFuture::reject(
                Rejection::new(RejectionKind::PayloadTooLarge)
                    .with_detail("request body larger than the idempotency layer buffers"),
            );
        }
        // Take the service that `poll_ready` made ready; leave an unreserved clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::keyed(
            Keyed::new(
                inner,
                self.store.clone(),
                self.shared.clone(),
                self.rebuild.clone(),
                parts,
                key,
            ),
            body,
        )
    }
}
