//! A fixed-capacity, lock-free table of GCRA states, one per key.
//!
//! The table is an array of groups of 8 slots (two cache lines), twice as many slots as the
//! keys it promises to track (`max_keys`, rounded up to a power of two). A key hashes (with a
//! per-table random seed) to its home group, and lives in one of the slots of that group or,
//! when it is full, of the next ones: its *window* of [`WINDOW`] groups. A slot is two words:
//!
//! - `tag`: the key's 60-bit hash identity and a 4-bit generation;
//! - `tat`: the key's theoretical arrival time (60 bits of nanoseconds, about 36 years) and
//!   the same 4-bit generation.
//!
//! Every change of a slot's TAT is one compare-and-swap on the `tat` word, whose expected value
//! includes the generation, so an update for the key that owned a slot cannot land on a slot
//! that was handed to another key meanwhile: the claim bumps the generation first (also by CAS
//! on the `tat` word), then publishes the new `tag`.
//!
//! A slot whose TAT is in the past holds no information (a key whose TAT has passed is the same
//! as an absent key), so it is free to reuse at once: the table needs no sweeper, and memory is
//! fixed at construction. A new key takes, in its window's order, the first group with a free
//! slot (a never used one first, else the one whose TAT is oldest). A key whose TAT is still
//! ahead (a *live* key) is evicted only when all the slots of the new key's window hold live
//! keys: then the live key closest to whole (the most tokens back) is evicted, starts afresh
//! on its next request, and the eviction is counted.
//!
//! # What `max_keys` guarantees
//!
//! With at most `max_keys` live keys, at most half the slots are live, and a window of
//! `8 × WINDOW` slots is all live only by a rare run of hash collisions: the occupancy test
//! (`keyed::tests::occupancy`) drives 25, 50, 75 and 100% of `max_keys` live keys through the
//! default table and sees no eviction and no admission above the limit. Beyond `max_keys`, live
//! keys are evicted by the rule above and counted.
//!
//! The common path is one hash, one group (its home) and one compare-and-swap; a key that lives
//! outside its home group (rare below `max_keys`) and a new key take the slow path, which reads
//! the window up to the first group with a never used slot.
//!
//! Two distinct keys share a state only if their 60-bit seeded hashes collide.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::SeedableRandomState;
use std::sync::atomic::{AtomicU64, Ordering};

use super::gcra::{self, Step};
use crate::clock::Clock;

const GROUP: usize = 8;
/// The groups a key may live in: its home group and the ones after it.
pub(crate) const WINDOW: usize = 8;
const GEN_BITS: u32 = 4;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
/// A time that fits in the `tat` word.
const MAX_TIME: u64 = u64::MAX >> GEN_BITS;

#[derive(Default)]
struct Slot {
    tag: AtomicU64,
    tat: AtomicU64,
}

#[repr(align(128))]
#[derive(Default)]
struct Group {
    slots: [Slot; GROUP],
}

pub(crate) struct Table {
    groups: Box<[Group]>,
    mask: usize,
    // The home group is the hash's top bits (the best mixed ones).
    shift: u32,
    // The groups of a key's window (fewer in a table with fewer groups).
    window: usize,
    // The keys tracked without eviction: half the slots.
    max_keys: usize,
    hasher: SeedableRandomState,
    evictions: AtomicU64,
}

/// The result of a keyed check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    pub(crate) step: Step,
    /// The TAT after the step (or the current one on rejection), for headers.
    pub(crate) tat: u64,
    /// The time the step was made at: the caller's, or the clock read again (see `check`).
    pub(crate) now: u64,
    /// The generation of the key's slot: a turn reserved under it is given back only to
    /// the same generation (not to the key's fresh state after an eviction).
    pub(crate) gen: u64,
}

impl Table {
    /// A table for at least `max_keys` keys (rounded up to a power of two, between 8 and
    /// 2^26), with twice as many slots.
    pub(crate) fn new(max_keys: usize) -> Table {
        Table::with_hasher(max_keys, SeedableRandomState::random())
    }

    fn with_hasher(max_keys: usize, hasher: SeedableRandomState) -> Table {
        let max_keys = max_keys.clamp(GROUP, 1 << 26).next_power_of_two();
        let n_groups = 2 * max_keys / GROUP;
        let groups = (0..n_groups).map(|_| Group::default()).collect();
        Table {
            groups,
            mask: n_groups - 1,
            shift: 64 - n_groups.trailing_zeros(),
            window: WINDOW.min(n_groups),
            max_keys,
            hasher,
            evictions: AtomicU64::new(0),
        }
    }

    /// The keys tracked without eviction (see the module docs).
    pub(crate) fn max_keys(&self) -> usize {
        self.max_keys
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The `d`-th group of the window of `hash`.
    #[inline]
    fn group(&self, hash: u64, d: usize) -> &Group {
        &self.groups[((hash >> self.shift) as usize).wrapping_add(d) & self.mask]
    }

    #[inline]
    pub(crate) fn hash<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Occupied slots whose key still has state at `now`.
    pub(crate) fn live_entries(&self, now: u64) -> usize {
        self.groups
            .iter()
            .flat_map(|g| g.slots.iter())
            .filter(|s| {
                s.tag.load(Ordering::Acquire) != 0
                    && (s.tat.load(Ordering::Acquire) >> GEN_BITS) > now
            })
            .count()
    }

    #[inline]
    fn ident(hash: u64) -> u64 {
        // 60 bits of identity, never zero (bit 63 set), generation bits clear.
        (hash | (1 << 63)) & !GEN_MASK
    }

    /// The TAT of a key without changing it (`None`: absent, i.e. whole).
    pub(crate) fn peek(&self, hash: u64) -> Option<u64> {
        let ident = Self::ident(hash);
        for d in 0..self.window {
            let mut unused = false;
            for slot in &self.group(hash, d).slots {
                let tag = slot.tag.load(Ordering::Acquire);
                unused |= tag == 0;
                if tag & !GEN_MASK == ident {
                    let word = slot.tat.load(Ordering::Acquire);
                    if word & GEN_MASK == tag & GEN_MASK {
                        return Some(word >> GEN_BITS);
                    }
                }
            }
            if unused {
                break;
            }
        }
        None
    }

    /// One GCRA step for the key with this hash.
    ///
    /// The fast path finds the key in its group and moves its TAT with one compare-and-swap;
    /// anything else (absent key, a claim in progress, a lost race) takes the slow path.
    ///
    /// `now` is the time read before the call. A key whose TAT is further ahead than
    /// `horizon` (at least the `gcra::span` of the quota and of the longest wait bound: a stale
    /// `now`, or a clock that went back) has the clock read again, once, through `clock`, and
    /// the step is made at that fresh time (see `gcra::step_checked`).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &self,
        hash: u64,
        now: u64,
        clock: &Clock,
        interval: u64,
        tolerance: u64,
        max_wait_ns: u64,
        horizon: u64,
    ) -> Checked {
        let now = now.min(MAX_TIME - 1);
        let group = self.group(hash, 0);
        let ident = Self::ident(hash);
        for slot in &group.slots {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag & !GEN_MASK != ident {
                continue;
            }
            let gen = tag & GEN_MASK;
            let word = slot.tat.load(Ordering::Acquire);
            if word & GEN_MASK == gen {
                let tat = word >> GEN_BITS;
                match gcra::step_in_span(tat, now, interval, tolerance, max_wait_ns, horizon) {
                    // Beyond the horizon: the slow path reads the clock again (after this
                    // acquire load) first.
                    None => break,
                    Some(Step::Admit { new_tat, wait_ns }) => {
                        let new_tat = new_tat.min(MAX_TIME);
                        if slot
                            .tat
                            .compare_exchange_weak(
                                word,
                                (new_tat << GEN_BITS) | gen,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                        {
                            return Checked {
                                step: Step::Admit { new_tat, wait_ns },
                                tat: new_tat,
                                now,
                                gen,
                            };
                        }
                    }
                    Some(reject) => {
                        return Checked {
                            step: reject,
                            tat,
                            now,
                            gen,
                        }
                    }
                }
            }
            break;
        }
        self.check_slow(hash, now, clock, interval, tolerance, max_wait_ns, horizon)
    }

    /// Moves the key's TAT back by one interval as `gcra::refunded` says (a reserved turn
    /// given back); does nothing if the key left its slot.
    ///
    /// `reserved_gen` is the generation of the slot the turn was reserved in (`None`: any).
    pub(crate) fn refund(
        &self,
        hash: u64,
        reserved_gen: Option<u64>,
        new_tat: u64,
        interval: u64,
        wake: u64,
        now: u64,
    ) {
        let ident = Self::ident(hash);
        for d in 0..self.window {
            for slot in &self.group(hash, d).slots {
                let tag = slot.tag.load(Ordering::Acquire);
                if tag & !GEN_MASK != ident {
                    continue;
                }
                let gen = tag & GEN_MASK;
                if reserved_gen.is_some_and(|g| g != gen) {
                    // The key was evicted and came back: its state is a fresh one.
                    return;
                }
                let new_tat = new_tat.min(MAX_TIME);
                // The generation is part of the expected word: a slot handed to another key
                // meanwhile is left alone.
                let _ = slot
                    .tat
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                        if word & GEN_MASK != gen {
                            return None;
                        }
                        gcra::refunded(word >> GEN_BITS, new_tat, interval, wake, now)
                            .map(|tat| (tat << GEN_BITS) | gen)
                    });
                return;
            }
        }
    }

    /// Moves every TAT later than `cap` back to `cap` (a quota change: no key may be further
    /// ahead than the new quota's window). One walk of the table, off the admit path; each
    /// change is a compare-and-swap on the `tat` word, generation kept.
    pub(crate) fn cap_tats(&self, cap: u64) {
        let cap = cap.min(MAX_TIME);
        for slot in self.groups.iter().flat_map(|g| g.slots.iter()) {
            let _ = slot
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                    ((word >> GEN_BITS) > cap).then_some((cap << GEN_BITS) | (word & GEN_MASK))
                });
        }
    }

    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn check_slow(
        &self,
        hash: u64,
        now: u64,
        clock: &Clock,
        interval: u64,
        tolerance: u64,
        max_wait_ns: u64,
        horizon: u64,
    ) -> Checked {
        let ident = Self::ident(hash);
        let mut now = now;
        'retry: loop {
            // Look for the key in its window, up to the first group with a never used slot: a
            // key is placed in the first group with a free slot, and a slot once used is never
            // unused again, so the key cannot be beyond such a group.
            for d in 0..self.window {
                let mut unused = false;
                for slot in &self.group(hash, d).slots {
                    let tag = slot.tag.load(Ordering::Acquire);
                    unused |= tag == 0;
                    if tag & !GEN_MASK != ident {
                        continue;
                    }
                    let gen = tag & GEN_MASK;
                    let mut word = slot.tat.load(Ordering::Acquire);
                    loop {
                        if word & GEN_MASK != gen {
                            // The slot is being handed to another key (or was): wait for the
                            // claim to publish its tag, then look again.
                            settle(slot);
                            continue 'retry;
                        }
                        let tat = word >> GEN_BITS;
                        // The TAT was read with an acquire: the thread that set it read its
                        // clock before, so a clock read again now is no earlier than that.
                        let (step, at) = gcra::step_rechecked(
                            tat,
                            now,
                            interval,
                            tolerance,
                            max_wait_ns,
                            horizon,
                            || clock.now_nanos().min(MAX_TIME - 1),
                        );
                        now = at;
                        match step {
                            Step::Admit { new_tat, wait_ns } => {
                                let new_tat = new_tat.min(MAX_TIME);
                                let new_word = (new_tat << GEN_BITS) | gen;
                                match slot.tat.compare_exchange_weak(
                                    word,
                                    new_word,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                ) {
                                    Ok(_) => {
                                        return Checked {
                                            step: Step::Admit { new_tat, wait_ns },
                                            tat: new_tat,
                                            now,
                                            gen,
                                        }
                                    }
                                    Err(actual) => word = actual,
                                }
                            }
                            reject @ Step::Reject { .. } => {
                                return Checked {
                                    step: reject,
                                    tat,
                                    now,
                                    gen,
                                };
                            }
                        }
                    }
                }
                if unused {
                    break;
                }
            }

            // Absent: in window order, the first group with a free slot gives it (a never
            // used slot first, else its oldest stale one); when every slot of the window is
            // live, the live key closest to whole is evicted. A group's never used slot is
            // taken before its stale ones, so that keys sharing a group do not take each
            // other's stale slots in turn.
            let mut chosen: Option<(&Slot, u64)> = None;
            let mut closest: Option<(&Slot, u64)> = None;
            'groups: for d in 0..self.window {
                let mut stale: Option<(&Slot, u64)> = None;
                for slot in &self.group(hash, d).slots {
                    let (tag, word) = settle(slot);
                    if tag & !GEN_MASK == ident {
                        // The key was published meanwhile.
                        continue 'retry;
                    }
                    let tat = word >> GEN_BITS;
                    if tat <= now {
                        if tag == 0 {
                            chosen = Some((slot, word));
                            break 'groups;
                        }
                        if stale.is_none_or(|(_, w)| (w >> GEN_BITS) > tat) {
                            stale = Some((slot, word));
                        }
                    } else if closest.is_none_or(|(_, w)| (w >> GEN_BITS) > tat) {
                        closest = Some((slot, word));
                    }
                }
                if stale.is_some() {
                    chosen = stale;
                    break;
                }
            }
            let (slot, word) = chosen.or(closest).expect("a window has slots");
            let evicting = (word >> GEN_BITS) > now;
            // A fresh key's step: the TAT of an absent key is "now".
            let step = gcra::step(0, now, interval, tolerance, max_wait_ns);
            let new_tat = match step {
                Step::Admit { new_tat, .. } => new_tat.min(MAX_TIME),
                // Only when the burst is smaller than one interval's wait: not possible for a
                // valid quota, but stay correct: nothing to store for a refused fresh key.
                Step::Reject { .. } => {
                    return Checked {
                        step,
                        tat: now,
                        now,
                        gen: 0,
                    }
                }
            };
            let gen = (word.wrapping_add(1)) & GEN_MASK;
            if slot
                .tat
                .compare_exchange(
                    word,
                    (new_tat << GEN_BITS) | gen,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                continue 'retry;
            }
            slot.tag.store(ident | gen, Ordering::Release);
            if evicting {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            return Checked {
                step,
                tat: new_tat,
                now,
                gen,
            };
        }
    }
}

/// Reads a slot's two words, waiting briefly while a claim is between its two writes.
#[inline]
fn settle(slot: &Slot) -> (u64, u64) {
    let mut spins = 0;
    loop {
        let tag = slot.tag.load(Ordering::Acquire);
        let word = slot.tat.load(Ordering::Acquire);
        if tag & GEN_MASK == word & GEN_MASK || spins >= 128 {
            return (tag, word);
        }
        spins += 1;
        if spins % 32 == 0 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("max_keys", &self.max_keys())
            .field("evictions", &self.evictions())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One check at `now`, on a clock that reads `now` too.
    fn chk(t: &Table, hash: u64, now: u64, i: u64, tol: u64, wait: u64, reach: u64) -> Checked {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(now);
        t.check(
            hash,
            now,
            &clock,
            i,
            tol,
            wait,
            gcra::span(i, tol, reach.max(wait)),
        )
    }

    fn admitted(c: Checked) -> bool {
        matches!(c.step, Step::Admit { .. })
    }

    /// A table whose hashes are the same from run to run.
    fn seeded(max_keys: usize, seed: u64) -> Table {
        Table::with_hasher(
            max_keys,
            SeedableRandomState::with_seed(seed, foldhash::SharedSeed::global_fixed()),
        )
    }

    #[test]
    fn keys_are_independent() {
        let t = Table::new(1024);
        let (i, tol) = (1_000, 3_000);
        let (a, b) = (t.hash("a"), t.hash("b"));
        let now = 10_000;
        for _ in 0..3 {
            assert!(admitted(chk(&t, a, now, i, tol, 0, 0)));
        }
        assert!(!admitted(chk(&t, a, now, i, tol, 0, 0)));
        for _ in 0..3 {
            assert!(admitted(chk(&t, b, now, i, tol, 0, 0)));
        }
        assert!(!admitted(chk(&t, b, now, i, tol, 0, 0)));
        assert_eq!(t.peek(a), Some(now + 3_000));
        assert_eq!(t.peek(t.hash("c")), None);
        assert_eq!(t.live_entries(now), 2);
        assert_eq!(t.live_entries(now + 3_000), 0);
        assert_eq!(t.max_keys(), 1024);
        assert_eq!(t.groups.len() * GROUP, 2048);
    }

    fn used_slots(t: &Table) -> usize {
        t.groups
            .iter()
            .flat_map(|g| g.slots.iter())
            .filter(|s| s.tag.load(Ordering::Relaxed) != 0)
            .count()
    }

    #[test]
    fn keys_sharing_a_group_keep_their_slots() {
        // Two keys, both stale between their requests: each keeps its slot (never used slots
        // are taken before stale ones), claimed once.
        let t = Table::new(8);
        let (i, tol) = (1, 1 << 32);
        let (a, b) = (t.hash(&1u64), t.hash(&2u64));
        chk(&t, a, 10, i, tol, 0, 0);
        chk(&t, b, 20, i, tol, 0, 0);
        let before = used_slots(&t);
        for now in (30..1_000).step_by(10) {
            chk(&t, if now % 20 == 0 { a } else { b }, now, i, tol, 0, 0);
        }
        assert_eq!((before, used_slots(&t)), (2, 2));
        // Each slot's generation was bumped once, at its claim.
        for s in t.groups.iter().flat_map(|g| g.slots.iter()) {
            if s.tag.load(Ordering::Relaxed) != 0 {
                assert_eq!(s.tag.load(Ordering::Relaxed) & GEN_MASK, 1);
            }
        }
    }

    #[test]
    fn stale_slots_are_reused_without_eviction() {
        let t = Table::new(8); // two groups
        let (i, tol) = (10, 10);
        let mut now = 100;
        for k in 0u64..1_000 {
            assert!(admitted(chk(&t, t.hash(&k), now, i, tol, 0, 0)));
            now += 10; // each key's state is in the past by the next request
        }
        assert_eq!(t.evictions(), 0);
        assert!(t.live_entries(now) <= 16);
    }

    #[test]
    fn a_full_group_overflows_into_the_next_before_evicting() {
        // 64 keys, 128 slots: whatever the hashes, every key fits in its window while the
        // table is at most half full; a group that fills up sends keys to the next one.
        let t = seeded(64, 7);
        let (i, tol) = (1_000, 1_000);
        for k in 0u64..64 {
            assert!(admitted(chk(&t, t.hash(&k), 5_000, i, tol, 0, 0)));
        }
        assert_eq!(t.evictions(), 0);
        for k in 0u64..64 {
            assert_eq!(t.peek(t.hash(&k)), Some(6_000), "key {k}");
            assert!(
                !admitted(chk(&t, t.hash(&k), 5_000, i, tol, 0, 0)),
                "key {k}"
            );
        }
    }

    #[test]
    fn a_full_window_evicts_the_key_closest_to_whole() {
        // 8 keys promised, 16 slots in two groups: one window holds the whole table.
        let t = Table::new(8);
        assert_eq!(t.window, 2);
        let (i, tol) = (1_000, 1_000);
        let now = 5_000;
        for k in 0u64..16 {
            assert!(admitted(chk(&t, t.hash(&k), now + k, i, tol, 0, 0)));
        }
        assert_eq!(t.evictions(), 0);
        assert!(admitted(chk(&t, t.hash(&100u64), now + 16, i, tol, 0, 0)));
        assert_eq!(t.evictions(), 1);
        // Key 0 had the earliest TAT and was evicted.
        assert_eq!(t.peek(t.hash(&0u64)), None);
        for k in 1u64..16 {
            assert!(t.peek(t.hash(&k)).is_some(), "key {k}");
        }
    }

    /// Drives `live` keys (a set that depends on `seed`), all live throughout, through a
    /// default-sized table: each key sends a burst and more, twice, with `now` in nanoseconds.
    /// Returns (admissions above the limit, evictions).
    fn drive(live: u64, seed: u64) -> (u64, u64) {
        let t = seeded(crate::rate_limit::DEFAULT_MAX_KEYS, 0);
        let key = |k: u64| (seed << 40) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // One token a second, burst 4: every key stays live for the whole run.
        let (i, burst) = (1_000_000_000u64, 4u64);
        let tol = i * burst;
        let mut now = 1u64 << 40;
        let start = now;
        let mut admitted_by_key = vec![0u64; live as usize];
        for round in 0..2 {
            for _ in 0..3 {
                for k in 0..live {
                    if admitted(chk(&t, t.hash(&key(k)), now, i, tol, 0, 0)) {
                        admitted_by_key[k as usize] += 1;
                    }
                    now += 1;
                }
            }
            assert!(round == 1 || now - start < i);
        }
        // The run is shorter than one interval: each key may have its burst, no more.
        let over = admitted_by_key
            .iter()
            .map(|&a| a.saturating_sub(burst))
            .sum();
        assert!(admitted_by_key.iter().all(|&a| a >= burst.min(6)));
        (over, t.evictions())
    }

    #[test]
    fn occupancy() {
        let max = crate::rate_limit::DEFAULT_MAX_KEYS as u64;
        for percent in [25, 50, 75, 100] {
            for seed in 0..2 {
                let (over, evictions) = drive(max * percent / 100, seed);
                assert_eq!(
                    (over, evictions),
                    (0, 0),
                    "{percent}% of max_keys, seed {seed}"
                );
            }
        }
        // Beyond max_keys, live keys are evicted, counted, and each eviction costs at most
        // one fresh burst.
        let (over, evictions) = drive(max * 2, 0);
        assert!(evictions > 0);
        assert!(over <= evictions * 4, "{over} over, {evictions} evictions");
    }

    /// The keyed table's version of the stale-time race (see the layer's test): a check with
    /// a time older than the clock's, against a spent key, reads the clock again and is
    /// refused; a clock that really went back finds the key whole.
    #[test]
    fn a_stale_now_does_not_refill_a_spent_key() {
        let t = seeded(64, 7);
        let (i, tol) = (1_000_000, 50_000_000);
        let (clock, hand) = Clock::manual();
        let h = t.hash(&1u64);
        let horizon = gcra::span(i, tol, 0);
        let check = |now: u64| admitted(t.check(h, now, &clock, i, tol, 0, horizon));
        hand.set_nanos(10_000_000);
        assert_eq!((0..60).filter(|_| check(10_000_000)).count(), 50);
        hand.set_nanos(15_000_000);
        assert_eq!((0..10).filter(|_| check(15_000_000)).count(), 5);
        assert_eq!((0..10).filter(|_| check(10_000_000)).count(), 0);
        hand.set_nanos(1_000_000);
        assert_eq!((0..60).filter(|_| check(1_000_000)).count(), 50);
    }
}
