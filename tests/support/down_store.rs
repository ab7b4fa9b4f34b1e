//! A shared idempotency store that is down: every operation fails as unavailable.

use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use tower_bulwark::idempotency::{
    Claim, Fingerprint, Lease, Record, Store, StoreError, StoreErrorKind, StoreKey,
};

/// A store that is always down.
#[derive(Clone, Debug)]
pub struct Down;

fn down<T>() -> Ready<Result<T, StoreError>> {
    ready(Err(StoreError::with_source(
        StoreErrorKind::Unavailable,
        "connection refused",
    )))
}

impl Store for Down {
    type ClaimFuture = Ready<Result<Claim, StoreError>>;
    type CompleteFuture = Ready<Result<(), StoreError>>;
    type RenewFuture = Ready<Result<(), StoreError>>;
    type ReleaseFuture = Ready<Result<(), StoreError>>;
    type GetFuture = Ready<Result<Option<Arc<Record>>, StoreError>>;

    fn claim(&self, _: &StoreKey, _: Fingerprint, _: Duration) -> Self::ClaimFuture {
        down()
    }
    fn complete(&self, _: &Lease, _: Record, _: Duration) -> Self::CompleteFuture {
        down()
    }
    fn renew(&self, _: &Lease, _: Duration) -> Self::RenewFuture {
        down()
    }
    fn release(&self, _: &Lease) -> Self::ReleaseFuture {
        down()
    }
    fn get(&self, _: &StoreKey) -> Self::GetFuture {
        down()
    }
}
