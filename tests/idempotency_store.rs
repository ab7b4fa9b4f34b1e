//! `MemoryStore`: the store contract, bounds, eviction and expiry.

use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use proptest::prelude::*;
use tower_bulwark::clock::{Clock, ManualClock};
use tower_bulwark::idempotency::{
    Claim, ConfigError, Fingerprint, Lease, MemoryStore, Record, Store, StoreErrorKind, StoreKey,
};

/// Memory store futures are ready at once.
fn now<F: Future>(f: F) -> F::Output {
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory store future pending"),
    }
}

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);

fn fp(n: u128) -> Fingerprint {
    Fingerprint::from_u128(n)
}

fn key(k: &str) -> StoreKey {
    StoreKey::new("", Bytes::copy_from_slice(k.as_bytes()))
}

fn record(f: Fingerprint, body_len: usize) -> Record {
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/json".parse().unwrap());
    Record::response(
        f,
        StatusCode::OK,
        h,
        Bytes::from(vec![b'r'; body_len]),
        None,
    )
}

fn claim(store: &MemoryStore, k: &StoreKey, f: Fingerprint) -> Claim {
    now(store.claim(k, f, LEASE)).unwrap()
}

fn lease(c: Claim) -> Lease {
    match c {
        Claim::Claimed(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn manual_store(entries: usize, bytes: usize, shards: usize) -> (MemoryStore, ManualClock) {
    let (clock, hand) = Clock::manual();
    let store = MemoryStore::builder()
        .max_entries(entries)
        .max_bytes(bytes)
        .shards(shards)
        .clock(clock)
        .build()
        .unwrap();
    (store, hand)
}

#[test]
fn claim_complete_replay_mismatch() {
    let (s, _) = manual_store(100, 1 << 20, 1);
    let k = key("a");
    let l = lease(claim(&s, &k, fp(1)));
    assert!(matches!(claim(&s, &k, fp(1)), Claim::InFlight));
    assert!(matches!(claim(&s, &k, fp(2)), Claim::Mismatch));
    now(s.complete(&l, record(fp(1), 10), TTL)).unwrap();
    match claim(&s, &k, fp(1)) {
        Claim::Completed(r) => assert_eq!(r.body().len(), 10),
        other => panic!("{other:?}"),
    }
    assert!(matches!(claim(&s, &k, fp(2)), Claim::Mismatch));
    assert_eq!(now(s.get(&k)).unwrap().unwrap().fingerprint(), fp(1));
    assert!(now(s.get(&key("none"))).unwrap().is_none());
}

#[test]
fn scopes_are_separate_keys() {
    let (s, _) = manual_store(100, 1 << 20, 4);
    let a = StoreKey::new("tenant-a", "k");
    let b = StoreKey::new("tenant-b", "k");
    // Scope and key are delimited: ("ab", "c") is not ("a", "bc").
    let c = StoreKey::new("ab", "c");
    let d = StoreKey::new("a", "bc");
    for k in [&a, &b, &c, &d] {
        lease(claim(&s, k, fp(1)));
    }
    assert_eq!(s.stats().entries, 4);
}

#[test]
fn only_the_owner_completes_or_releases() {
    let (s, hand) = manual_store(100, 1 << 20, 1);
    let k = key("a");
    let old = lease(claim(&s, &k, fp(1)));
    hand.advance(LEASE);
    // The lease expired: another request claims the key.
    let new = lease(claim(&s, &k, fp(1)));
    assert_ne!(old.token(), new.token());
    let err = now(s.complete(&old, record(fp(1), 1), TTL)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    now(s.release(&old)).unwrap();
    assert!(
        matches!(claim(&s, &k, fp(1)), Claim::InFlight),
        "the old owner's release left the new lease alone"
    );
    now(s.release(&new)).unwrap();
    assert!(matches!(claim(&s, &k, fp(1)), Claim::Claimed(_)));
}

#[test]
fn completing_an_expired_lease_in_a_full_shard_is_lease_lost_not_a_panic() {
    // A shard at its byte bound: completing makes room by sweeping expired entries, and the
    // lease being completed is one of them.
    let rec_len = record(fp(1), 4096).encoded_len();
    let (s, hand) = manual_store(100, rec_len + 512, 1);
    let k = key("slow");
    let l = lease(claim(&s, &k, fp(1)));
    hand.advance(LEASE + Duration::from_nanos(1));
    let err = now(s.complete(&l, record(fp(1), 4096), TTL)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    // The key is free again.
    assert!(matches!(claim(&s, &k, fp(1)), Claim::Claimed(_)));
}

#[test]
fn records_and_leases_expire() {
    let (s, hand) = manual_store(100, 1 << 20, 1);
    let k = key("a");
    let l = lease(claim(&s, &k, fp(1)));
    now(s.complete(&l, record(fp(1), 1), TTL)).unwrap();
    hand.advance(TTL - Duration::from_nanos(1));
    assert!(matches!(claim(&s, &k, fp(1)), Claim::Completed(_)));
    hand.advance(Duration::from_nanos(1));
    assert!(now(s.get(&k)).unwrap().is_none());
    assert!(matches!(claim(&s, &k, fp(2)), Claim::Claimed(_)));

    let k2 = key("b");
    lease(claim(&s, &k2, fp(1)));
    hand.advance(LEASE);
    assert!(matches!(claim(&s, &k2, fp(1)), Claim::Claimed(_)));
}

#[test]
fn purge_removes_every_expired_entry() {
    let (s, hand) = manual_store(10_000, 64 << 20, 8);
    for i in 0..500 {
        let l = lease(claim(&s, &key(&format!("k{i}")), fp(1)));
        if i % 2 == 0 {
            now(s.complete(&l, record(fp(1), 100), Duration::from_secs(10))).unwrap();
        }
    }
    assert_eq!(s.stats().entries, 500);
    hand.advance(Duration::from_secs(11));
    lease(claim(&s, &key("fresh"), fp(1)));
    s.purge_expired();
    let st = s.stats();
    assert_eq!(
        st.entries, 251,
        "250 leases (60 s) and the fresh one remain"
    );
    hand.advance(LEASE);
    s.purge_expired();
    let st = s.stats();
    assert_eq!(st.entries, 0);
    assert_eq!(st.bytes, 0);
    assert_eq!(st.expired, 501);
}

#[test]
fn full_store_evicts_the_oldest_completed_record() {
    let (s, hand) = manual_store(4, 1 << 20, 1);
    let mut done = Vec::new();
    for i in 0..3 {
        let k = key(&format!("done{i}"));
        let l = lease(claim(&s, &k, fp(1)));
        hand.advance(Duration::from_secs(1));
        now(s.complete(&l, record(fp(1), 1), TTL)).unwrap();
        done.push(k);
    }
    let live = lease(claim(&s, &key("live"), fp(1)));
    assert_eq!(s.stats().entries, 4);
    // Full: the next claim evicts done0, the oldest completion.
    lease(claim(&s, &key("new1"), fp(1)));
    assert!(now(s.get(&done[0])).unwrap().is_none());
    assert!(now(s.get(&done[1])).unwrap().is_some());
    lease(claim(&s, &key("new2"), fp(1)));
    assert!(now(s.get(&done[1])).unwrap().is_none());
    assert!(now(s.get(&done[2])).unwrap().is_some());
    assert_eq!(s.stats().evicted, 2);
    assert_eq!(s.stats().entries, 4);
    // The live lease was never evicted.
    assert!(matches!(claim(&s, live.key(), fp(1)), Claim::InFlight));
}

#[test]
fn a_store_full_of_live_leases_refuses_and_never_evicts_them() {
    let (s, hand) = manual_store(3, 1 << 20, 1);
    let leases: Vec<_> = (0..3)
        .map(|i| lease(claim(&s, &key(&format!("l{i}")), fp(1))))
        .collect();
    let err = now(s.claim(&key("x"), fp(1), LEASE)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Full);
    for l in &leases {
        assert!(matches!(claim(&s, l.key(), fp(1)), Claim::InFlight));
    }
    // Once leases expire, their room is taken back.
    hand.advance(LEASE);
    assert!(matches!(claim(&s, &key("x"), fp(1)), Claim::Claimed(_)));
    assert!(s.stats().entries <= 3);
}

#[test]
fn byte_bound_evicts_and_oversized_records_are_kept_as_markers() {
    // One shard of 8 KiB.
    let (s, _) = manual_store(1000, 8 << 10, 1);
    let mut keys = Vec::new();
    for i in 0..20 {
        let k = key(&format!("k{i}"));
        let l = lease(claim(&s, &k, fp(1)));
        now(s.complete(&l, record(fp(1), 1000), TTL)).unwrap();
        keys.push(k);
        assert!(s.stats().bytes <= 8 << 10, "{:?}", s.stats());
    }
    assert!(s.stats().evicted > 0);
    assert!(now(s.get(&keys[19])).unwrap().is_some());
    // A record larger than the shard's budget becomes a "not kept" marker.
    let k = key("huge");
    let l = lease(claim(&s, &k, fp(7)));
    now(s.complete(&l, record(fp(7), 20_000), TTL)).unwrap();
    let r = now(s.get(&k)).unwrap().unwrap();
    assert!(!r.is_kept());
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.fingerprint(), fp(7));
}

#[test]
fn a_million_distinct_keys_stay_within_bounds() {
    let max_entries = 10_000;
    let max_bytes = 4 << 20;
    let (s, hand) = manual_store(max_entries, max_bytes, 16);
    for i in 0..1_000_000u32 {
        let k = StoreKey::new("tenant", Bytes::from(format!("key-{i}")));
        let f = fp(u128::from(i));
        let l = lease(claim(&s, &k, f));
        now(s.complete(&l, record(f, 64 + (i as usize % 256)), TTL)).unwrap();
        if i % 100_000 == 0 {
            hand.advance(Duration::from_millis(1));
            let st = s.stats();
            assert!(st.entries <= max_entries && st.bytes <= max_bytes, "{st:?}");
        }
    }
    let st = s.stats();
    assert!(st.entries <= max_entries, "{st:?}");
    assert!(st.bytes <= max_bytes, "{st:?}");
    // It is used, not empty: most of the room holds the newest records.
    assert!(st.entries > max_entries / 2, "{st:?}");
    assert_eq!(st.evicted as usize + st.entries, 1_000_000);
    let last = StoreKey::new("tenant", Bytes::from("key-999999"));
    assert!(now(s.get(&last)).unwrap().is_some());
}

#[test]
fn builder_validates() {
    let b = MemoryStore::builder;
    assert_eq!(
        b().max_entries(0).build().err(),
        Some(ConfigError::Zero("max_entries"))
    );
    assert_eq!(
        b().max_bytes(0).build().err(),
        Some(ConfigError::Zero("max_bytes"))
    );
    assert_eq!(b().shards(3).build().err(), Some(ConfigError::Shards));
    assert_eq!(b().shards(0).build().err(), Some(ConfigError::Shards));
    assert_eq!(
        b().max_entries(10).shards(64).build().err(),
        Some(ConfigError::TooSmall("max_entries"))
    );
    assert_eq!(
        b().max_bytes(4096).shards(8).build().err(),
        Some(ConfigError::TooSmall("max_bytes"))
    );
    assert!(b().max_entries(64).shards(64).build().is_ok());
}

#[test]
fn clones_share_state_across_threads() {
    let s = MemoryStore::default();
    let k = key("shared");
    let winners: usize = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                let k = k.clone();
                scope.spawn(move || usize::from(matches!(claim(&s, &k, fp(1)), Claim::Claimed(_))))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(winners, 1);
}

#[derive(Clone, Debug)]
enum Op {
    Claim(u8, u8),
    Complete(u8),
    Release(u8),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..2).prop_map(|(k, f)| Op::Claim(k, f)),
        (0u8..6).prop_map(Op::Complete),
        (0u8..6).prop_map(Op::Release),
        (0u16..2000).prop_map(Op::Advance),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    Lease { fp: u8, until: u64 },
    Done { fp: u8, until: u64 },
}

proptest! {
    /// Against a plain model (no bounds reached): every claim answers what the model says.
    #[test]
    fn matches_a_model(ops in proptest::collection::vec(op(), 1..120)) {
        let (s, hand) = manual_store(1000, 1 << 20, 2);
        let lease_ttl = Duration::from_millis(500);
        let ttl = Duration::from_millis(1500);
        let mut model: HashMap<u8, Model> = HashMap::new();
        let mut leases: HashMap<u8, Lease> = HashMap::new();
        let mut t = 0u64;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    hand.advance(Duration::from_millis(u64::from(ms)));
                    t += u64::from(ms) * 1_000_000;
                }
                Op::Claim(k, f) => {
                    let got = now(s.claim(&key(&k.to_string()), fp(u128::from(f)), lease_ttl)).unwrap();
                    let live = model.get(&k).copied().filter(|m| match m {
                        Model::Lease { until, .. } | Model::Done { until, .. } => *until > t,
                    });
                    match (live, got) {
                        (None, Claim::Claimed(l)) => {
                            model.insert(k, Model::Lease { fp: f, until: t + 500_000_000 });
                            leases.insert(k, l);
                        }
                        (Some(Model::Lease { fp, .. }), Claim::InFlight) => prop_assert_eq!(fp, f),
                        (Some(Model::Done { fp, .. }), Claim::Completed(r)) => {
                            prop_assert_eq!(fp, f);
                            prop_assert_eq!(r.fingerprint(), Fingerprint::from_u128(u128::from(f)));
                        }
                        (Some(Model::Lease { fp, .. } | Model::Done { fp, .. }), Claim::Mismatch) => {
                            prop_assert_ne!(fp, f)
                        }
                        (m, g) => prop_assert!(false, "model {:?}, store {:?}", m, g),
                    }
                }
                Op::Complete(k) => {
                    if let Some(l) = leases.remove(&k) {
                        let res = now(s.complete(&l, record(l.fingerprint(), 8), ttl));
                        let f = l.fingerprint().as_u128() as u8;
                        // `leases` holds the newest lease of each key, so the model's lease
                        // on `k` is this one. Before it expires, completing must succeed;
                        // after, the store may already have dropped it.
                        match model.get(&k).copied() {
                            Some(Model::Lease { until, .. }) if until > t => {
                                prop_assert!(res.is_ok());
                                model.insert(k, Model::Done { fp: f, until: t + 1_500_000_000 });
                            }
                            Some(Model::Lease { .. }) => {
                                if res.is_ok() {
                                    model.insert(k, Model::Done { fp: f, until: t + 1_500_000_000 });
                                } else {
                                    prop_assert_eq!(res.unwrap_err().kind(), StoreErrorKind::LeaseLost);
                                    model.remove(&k);
                                }
                            }
                            other => prop_assert!(false, "a held lease with model {:?}", other),
                        }
                    }
                }
                Op::Release(k) => {
                    if let Some(l) = leases.remove(&k) {
                        now(s.release(&l)).unwrap();
                        if matches!(model.get(&k), Some(Model::Lease { .. })) {
                            model.remove(&k);
                        }
                    }
                }
            }
        }
    }
}
