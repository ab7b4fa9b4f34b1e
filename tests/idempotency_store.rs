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

/// A store on a manual clock, whose keys (all in one scope) may fill it.
fn manual_store(entries: usize, bytes: usize, shards: usize) -> (MemoryStore, ManualClock) {
    let (clock, hand) = Clock::manual();
    let store = MemoryStore::builder()
        .max_entries(entries)
        .max_bytes(bytes)
        .shards(shards)
        .scope_share(1.0)
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
fn completing_an_expired_lease_in_a_full_shard_writes_it_not_a_panic() {
    // A shard at its byte bound; the lease being completed has expired, and no one else
    // holds the key: the handler ran, so its record lands (the `Store::complete` contract).
    let (s, hand) = manual_store(100, 256 << 10, 1);
    let k = key("slow");
    let l = lease(claim(&s, &k, fp(1)));
    hand.advance(LEASE + Duration::from_nanos(1));
    now(s.complete(&l, record(fp(1), 4096), TTL)).unwrap();
    assert!(matches!(claim(&s, &k, fp(1)), Claim::Completed(_)));
    hand.advance(TTL);
    assert!(matches!(claim(&s, &k, fp(1)), Claim::Claimed(_)));
}

/// A record written after its lease expired and was swept (the key holds nothing) lands, as
/// a claim would take the key; never over another owner's lease or a record.
#[test]
fn a_late_record_lands_on_a_free_key_only() {
    let (s, hand) = manual_store(100, 1 << 20, 1);
    let (a, b, c) = (key("a"), key("b"), key("c"));
    let la = lease(claim(&s, &a, fp(1)));
    let lb = lease(claim(&s, &b, fp(1)));
    let lc = lease(claim(&s, &c, fp(1)));
    hand.advance(LEASE + Duration::from_secs(1));
    // A claim of `b` drops its expired lease and takes the key; `a`'s and `c`'s are swept.
    let nb = lease(claim(&s, &b, fp(1)));
    lease(claim(&s, &key("d"), fp(1)));
    s.purge_expired();
    assert_eq!(
        s.stats().entries,
        2,
        "a's and c's leases swept; b's and d's new"
    );
    now(s.complete(&la, record(fp(1), 8), TTL)).unwrap();
    match claim(&s, &a, fp(1)) {
        Claim::Completed(r) => assert_eq!(r.body().len(), 8),
        other => panic!("expected the late record, got {other:?}"),
    }
    let err = now(s.complete(&lb, record(fp(1), 8), TTL)).unwrap_err();
    assert_eq!(
        err.kind(),
        StoreErrorKind::LeaseLost,
        "never over another's lease"
    );
    assert!(matches!(claim(&s, &b, fp(1)), Claim::InFlight));
    now(s.complete(&nb, record(fp(1), 1), TTL)).unwrap();
    // `c` lands, then a second write of it is lost (the record is there).
    now(s.complete(&lc, record(fp(1), 2), TTL)).unwrap();
    let err = now(s.complete(&lc, record(fp(1), 2), TTL)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost, "never over a record");
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
    let filled = s.stats();
    assert_eq!(filled.entries, 500);
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
    // What is left is the store's tables, grown for 500 entries.
    assert!(st.bytes < filled.bytes / 2, "{st:?} {filled:?}");
    assert_eq!(st.expired, 501);
}

#[test]
fn a_full_store_refuses_new_keys_and_evicts_no_completed_record() {
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
    // Full: a new key is refused; no completed record is dropped for it.
    let err = now(s.claim(&key("new1"), fp(1), LEASE)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Full);
    for k in &done {
        assert!(matches!(claim(&s, k, fp(1)), Claim::Completed(_)), "{k:?}");
    }
    assert!(matches!(claim(&s, live.key(), fp(1)), Claim::InFlight));
    assert_eq!(s.stats().entries, 4);
    // Expired records make room.
    hand.advance(TTL);
    lease(claim(&s, &key("new1"), fp(1)));
}

#[test]
fn the_byte_bound_is_the_stores_not_a_shards() {
    // 64 MiB over 64 shards, as by default: 500 records of 100 KiB (49 MB) all stay.
    let (s, _) = manual_store(100_000, 64 << 20, 64);
    let keys: Vec<_> = (0..500).map(|i| key(&format!("k{i}"))).collect();
    for k in &keys {
        let l = lease(claim(&s, k, fp(1)));
        now(s.complete(&l, record(fp(1), 100 << 10), TTL)).unwrap();
    }
    for k in &keys {
        match claim(&s, k, fp(1)) {
            Claim::Completed(r) => assert!(r.is_kept(), "{k:?} kept"),
            other => panic!("{k:?} forgotten: {other:?}"),
        }
    }
}

#[test]
fn a_record_just_under_a_mebibyte_is_kept_by_the_default_store() {
    let s = MemoryStore::default();
    let k = key("big");
    let l = lease(claim(&s, &k, fp(1)));
    now(s.complete(&l, record(fp(1), (1 << 20) - 16), TTL)).unwrap();
    let r = now(s.get(&k)).unwrap().unwrap();
    assert!(
        r.is_kept(),
        "a response under the layer's 1 MiB cap is kept"
    );
    assert_eq!(r.body().len(), (1 << 20) - 16);
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
fn the_byte_bound_refuses_claims_and_a_record_without_room_is_kept_as_a_marker() {
    // 256 KiB; claims stop at fifteen sixteenths of it, the rest is for completions.
    let (s, _) = manual_store(1000, 256 << 10, 1);
    let huge = key("huge");
    let huge_lease = lease(claim(&s, &huge, fp(7)));
    let mut keys = Vec::new();
    loop {
        let k = key(&format!("k{}", keys.len()));
        match now(s.claim(&k, fp(1), LEASE)) {
            Ok(Claim::Claimed(l)) => {
                now(s.complete(&l, record(fp(1), 8 << 10), TTL)).unwrap();
                keys.push(k);
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert_eq!(e.kind(), StoreErrorKind::Full);
                break;
            }
        }
        assert!(s.stats().bytes <= 256 << 10, "{:?}", s.stats());
        assert!(keys.len() < 1000, "the byte bound refused no claim");
    }
    assert!(keys.len() > 10, "{} records fit", keys.len());
    assert_eq!(s.stats().refused, 1);
    // Every record is still there.
    for k in &keys {
        assert!(now(s.get(k)).unwrap().unwrap().is_kept(), "{k:?}");
    }
    // A record larger than the room left becomes a "not kept" marker: its key never runs
    // twice.
    now(s.complete(&huge_lease, record(fp(7), 64 << 10), TTL)).unwrap();
    let r = now(s.get(&huge)).unwrap().unwrap();
    assert!(!r.is_kept());
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.fingerprint(), fp(7));
    assert_eq!(s.stats().not_kept, 1);
    assert!(s.stats().bytes <= 256 << 10, "{:?}", s.stats());
}

#[test]
fn a_full_store_says_when_its_earliest_entry_expires() {
    let (s, hand) = manual_store(2, 1 << 20, 1);
    lease(claim(&s, &key("a"), fp(1)));
    hand.advance(Duration::from_secs(10));
    lease(claim(&s, &key("b"), fp(1)));
    let err = now(s.claim(&key("c"), fp(1), LEASE)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Full);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(50)), "{err:?}");
}

#[test]
fn one_scope_holds_at_most_its_share() {
    let (clock, hand) = Clock::manual();
    let s = MemoryStore::builder()
        .max_entries(100)
        .scope_share(0.25)
        .shards(4)
        .clock(clock)
        .build()
        .unwrap();
    let flood: Vec<_> = (0..25)
        .map(|i| lease(claim(&s, &StoreKey::new("flood", format!("k{i}")), fp(1))))
        .collect();
    let err = now(s.claim(&StoreKey::new("flood", "one-more"), fp(1), LEASE)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Full);
    // Other scopes go on.
    for t in 0..10 {
        lease(claim(&s, &StoreKey::new(format!("tenant-{t}"), "k"), fp(1)));
    }
    // The flood's room comes back as its keys are released or expire.
    now(s.release(&flood[0])).unwrap();
    lease(claim(&s, &StoreKey::new("flood", "one-more"), fp(1)));
    assert!(now(s.claim(&StoreKey::new("flood", "again"), fp(1), LEASE)).is_err());
    hand.advance(LEASE);
    s.purge_expired();
    lease(claim(&s, &StoreKey::new("flood", "again"), fp(1)));
    // Bytes count too: a scope's share of 64 KiB of records.
    let (clock, _) = Clock::manual();
    let s = MemoryStore::builder()
        .max_bytes(1 << 20)
        .scope_share(0.0625)
        .shards(1)
        .clock(clock)
        .build()
        .unwrap();
    let mut held = 0;
    for i in 0..100 {
        let k = StoreKey::new("big", format!("k{i}"));
        match now(s.claim(&k, fp(1), LEASE)) {
            Ok(Claim::Claimed(l)) => {
                now(s.complete(&l, record(fp(1), 8 << 10), TTL)).unwrap();
                held += 1;
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        (6..=9).contains(&held),
        "{held} records of 8 KiB in a 64 KiB share"
    );
    lease(claim(&s, &StoreKey::new("small", "k"), fp(1)));
}

#[test]
fn many_distinct_keys_stay_within_bounds_and_expired_records_make_room() {
    let max_entries = 10_000;
    let max_bytes = 4 << 20;
    let (s, hand) = manual_store(max_entries, max_bytes, 16);
    let ttl = Duration::from_millis(100);
    let (mut refused, mut last) = (0, None);
    for i in 0..300_000u32 {
        let k = StoreKey::new("tenant", Bytes::from(format!("key-{i}")));
        let f = fp(u128::from(i));
        match now(s.claim(&k, f, LEASE)) {
            Ok(Claim::Claimed(l)) => {
                now(s.complete(&l, record(f, 64 + (i as usize % 256)), ttl)).unwrap();
                last = Some(k);
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert_eq!(e.kind(), StoreErrorKind::Full);
                refused += 1;
            }
        }
        if i % 200 == 0 {
            hand.advance(Duration::from_millis(1));
            let st = s.stats();
            assert!(st.entries <= max_entries && st.bytes <= max_bytes, "{st:?}");
        }
    }
    let st = s.stats();
    assert!(st.entries <= max_entries, "{st:?}");
    assert!(st.bytes <= max_bytes, "{st:?}");
    assert!(refused > 0, "the bound was reached");
    assert!(st.expired > 40_000, "expired records made room: {st:?}");
    // It is used, not empty: the byte bound is the one reached.
    assert!(st.bytes > max_bytes / 2, "{st:?}");
    assert!(now(s.get(&last.unwrap())).unwrap().is_some());
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
        b().max_bytes(4096).shards(8).build().err(),
        Some(ConfigError::TooSmall("max_bytes"))
    );
    for share in [0.0, -0.5, 1.5, f64::NAN] {
        assert_eq!(
            b().scope_share(share).build().err(),
            Some(ConfigError::ScopeShare),
            "{share}"
        );
    }
    // The bounds are the store's, not a shard's: ten entries over 64 shards is fine.
    assert!(b().max_entries(10).shards(64).build().is_ok());
    assert!(b()
        .max_entries(64)
        .shards(64)
        .scope_share(1.0)
        .build()
        .is_ok());
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
