//! `MemoryStore`'s byte bound against the memory the process really spends on it: the
//! resident set measured from `/proc/self/statm`, in a test binary of its own so that no
//! other test allocates meanwhile.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{Claim, Fingerprint, MemoryStore, Record, Store, StoreKey};

fn now<F: Future>(f: F) -> F::Output {
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory store future pending"),
    }
}

/// Resident bytes of this process, or `None` where `/proc` is not there.
fn rss() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A small record as a JSON API answers: one header, a short body.
fn record(f: Fingerprint, i: u32) -> Record {
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-order-id", i.to_string().parse().unwrap());
    Record::response(
        f,
        StatusCode::CREATED,
        h,
        Bytes::from(format!("{{\"id\":{i},\"state\":\"placed\"}}")),
        None,
    )
}

#[test]
fn the_byte_bound_covers_what_the_process_really_spends() {
    let Some(before) = rss() else {
        eprintln!("no /proc/self/statm: skipped");
        return;
    };
    let n = 300_000u32;
    let (clock, _hand) = Clock::manual();
    let store = MemoryStore::builder()
        .max_entries(n as usize + 1)
        .max_bytes(1 << 30)
        .shards(1)
        .scope_share(1.0)
        .clock(clock)
        .build()
        .unwrap();
    for i in 0..n {
        let k = StoreKey::new("tenant-1", format!("order-{i:08}"));
        let f = Fingerprint::from_u128(u128::from(i));
        let Claim::Claimed(l) = now(store.claim(&k, f, Duration::from_secs(60))).unwrap() else {
            panic!("a new key is claimed");
        };
        now(store.complete(&l, record(f, i), Duration::from_secs(3600))).unwrap();
    }
    let after = rss().unwrap();
    let grown = after.saturating_sub(before);
    let charged = store.stats().bytes;
    assert_eq!(store.stats().entries, n as usize);
    eprintln!("{n} records: RSS grew {grown} bytes, the store charged {charged}");
    // What the store charges covers what it really holds (with 10% for the allocator's
    // own bookkeeping and the test's noise), and does not overcharge by much either.
    assert!(
        grown <= charged + charged / 10,
        "RSS grew {grown} bytes for {n} records; the store charged {charged}"
    );
    assert!(
        charged <= 2 * grown,
        "the store charged {charged} bytes for {n} records; RSS grew only {grown}"
    );
    drop(store);
}
