//! A fixed-capacity, lock-free table of GCRA states, one per key.
//!
//! The table is an array of groups of 8 slots (two cache lines). A key hashes (with a
//! per-table random seed) to one group and lives in one of its slots. A slot is two words:
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
//! fixed at construction. When all 8 slots of a group hold keys whose TAT is still ahead, the
//! key closest to whole is evicted (it had the most tokens back); that key starts afresh on its
//! next request. Evictions are counted.
//!
//! Two distinct keys share a state only if their 60-bit seeded hashes collide.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use super::gcra::{self, Step};

const GROUP: usize = 8;
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
    hasher: foldhash::fast::RandomState,
    evictions: AtomicU64,
}

/// The result of a keyed check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    pub(crate) step: Step,
    /// The TAT after the step (or the current one on rejection), for headers.
    pub(crate) tat: u64,
}

impl Table {
    /// A table for at least `max_keys` keys (rounded up to a power of two, at least 8).
    pub(crate) fn new(max_keys: usize) -> Table {
        let slots = max_keys.clamp(GROUP, 1 << 26).next_power_of_two();
        let n_groups = slots / GROUP;
        let groups = (0..n_groups).map(|_| Group::default()).collect();
        Table {
            groups,
            mask: n_groups - 1,
            hasher: foldhash::fast::RandomState::default(),
            evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.groups.len() * GROUP
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
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
        let group = &self.groups[(hash as usize) & self.mask];
        let ident = Self::ident(hash);
        for slot in &group.slots {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag & !GEN_MASK == ident {
                let word = slot.tat.load(Ordering::Acquire);
                if word & GEN_MASK == tag & GEN_MASK {
                    return Some(word >> GEN_BITS);
                }
            }
        }
        None
    }

    /// One GCRA step for the key with this hash.
    ///
    /// The fast path finds the key in its group and moves its TAT with one compare-and-swap;
    /// anything else (absent key, a claim in progress, a lost race) takes the slow path.
    #[inline]
    pub(crate) fn check(
        &self,
        hash: u64,
        now: u64,
        interval: u64,
        tolerance: u64,
        max_wait_ns: u64,
    ) -> Checked {
        let now = now.min(MAX_TIME - 1);
        let group = &self.groups[(hash as usize) & self.mask];
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
                match gcra::step(tat, now, interval, tolerance, max_wait_ns) {
                    Step::Admit { new_tat, wait_ns } => {
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
                            };
                        }
                    }
                    reject @ Step::Reject { .. } => return Checked { step: reject, tat },
                }
            }
            break;
        }
        self.check_slow(hash, now, interval, tolerance, max_wait_ns)
    }

    /// Moves the key's TAT back by one interval if it is still `new_tat` (a reserved turn
    /// given back); does nothing if the key moved on or left its slot.
    pub(crate) fn refund(&self, hash: u64, new_tat: u64, interval: u64) {
        let group = &self.groups[(hash as usize) & self.mask];
        let ident = Self::ident(hash);
        for slot in &group.slots {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag & !GEN_MASK != ident {
                continue;
            }
            let gen = tag & GEN_MASK;
            let word = (new_tat.min(MAX_TIME) << GEN_BITS) | gen;
            let back = (new_tat.min(MAX_TIME).saturating_sub(interval) << GEN_BITS) | gen;
            let _ = slot
                .tat
                .compare_exchange(word, back, Ordering::AcqRel, Ordering::Acquire);
            return;
        }
    }

    #[cold]
    #[inline(never)]
    fn check_slow(
        &self,
        hash: u64,
        now: u64,
        interval: u64,
        tolerance: u64,
        max_wait_ns: u64,
    ) -> Checked {
        let group = &self.groups[(hash as usize) & self.mask];
        let ident = Self::ident(hash);
        'retry: loop {
            // Look for the key.
            for slot in &group.slots {
                let tag = slot.tag.load(Ordering::Acquire);
                if tag & !GEN_MASK != ident {
                    continue;
                }
                let gen = tag & GEN_MASK;
                let mut word = slot.tat.load(Ordering::Acquire);
                loop {
                    if word & GEN_MASK != gen {
                        // The slot is being handed to another key (or was): wait for the claim
                        // to publish its tag, then look again.
                        settle(slot);
                        continue 'retry;
                    }
                    let tat = word >> GEN_BITS;
                    match gcra::step(tat, now, interval, tolerance, max_wait_ns) {
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
                                    }
                                }
                                Err(actual) => word = actual,
                            }
                        }
                        reject @ Step::Reject { .. } => {
                            return Checked { step: reject, tat };
                        }
                    }
                }
            }

            // Absent: claim an empty slot, else one whose state is in the past (the oldest),
            // else the slot closest to whole; bump its generation. Empty slots first, so that
            // keys sharing a group do not take each other's stale slots in turn.
            let mut victim: Option<(&Slot, u64)> = None;
            for slot in &group.slots {
                let (tag, word) = settle(slot);
                if tag & !GEN_MASK == ident {
                    // The key was published meanwhile.
                    continue 'retry;
                }
                if tag == 0 && word >> GEN_BITS <= now {
                    victim = Some((slot, word));
                    break;
                }
                let tat = word >> GEN_BITS;
                if victim.is_none_or(|(_, w)| (w >> GEN_BITS) > tat) {
                    victim = Some((slot, word));
                }
            }
            let (slot, word) = victim.expect("a group has slots");
            let evicting = (word >> GEN_BITS) > now;
            // A fresh key's step: the TAT of an absent key is "now".
            let step = gcra::step(0, now, interval, tolerance, max_wait_ns);
            let new_tat = match step {
                Step::Admit { new_tat, .. } => new_tat.min(MAX_TIME),
                // Only when the burst is smaller than one interval's wait: not possible for a
                // valid quota, but stay correct: nothing to store for a refused fresh key.
                Step::Reject { .. } => return Checked { step, tat: now },
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
            return Checked { step, tat: new_tat };
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
            .field("capacity", &self.capacity())
            .field("evictions", &self.evictions())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(c: Checked) -> bool {
        matches!(c.step, Step::Admit { .. })
    }

    #[test]
    fn keys_are_independent() {
        let t = Table::new(1024);
        let (i, tol) = (1_000, 3_000);
        let (a, b) = (t.hash("a"), t.hash("b"));
        let now = 10_000;
        for _ in 0..3 {
            assert!(admitted(t.check(a, now, i, tol, 0)));
        }
        assert!(!admitted(t.check(a, now, i, tol, 0)));
        for _ in 0..3 {
            assert!(admitted(t.check(b, now, i, tol, 0)));
        }
        assert!(!admitted(t.check(b, now, i, tol, 0)));
        assert_eq!(t.peek(a), Some(now + 3_000));
        assert_eq!(t.peek(t.hash("c")), None);
        assert_eq!(t.live_entries(now), 2);
        assert_eq!(t.live_entries(now + 3_000), 0);
    }

    #[test]
    fn keys_sharing_a_group_keep_their_slots() {
        // Two keys of one group, both stale between their requests: each keeps its slot
        // (empty slots are taken before stale ones).
        let t = Table::new(8);
        let (i, tol) = (1, 1 << 32);
        let (a, b) = (t.hash(&1u64), t.hash(&2u64));
        t.check(a, 10, i, tol, 0);
        t.check(b, 20, i, tol, 0);
        let before = t.groups[0]
            .slots
            .iter()
            .filter(|s| s.tag.load(Ordering::Relaxed) != 0)
            .count();
        for now in (30..1_000).step_by(10) {
            t.check(if now % 20 == 0 { a } else { b }, now, i, tol, 0);
        }
        let after = t.groups[0]
            .slots
            .iter()
            .filter(|s| s.tag.load(Ordering::Relaxed) != 0)
            .count();
        assert_eq!((before, after), (2, 2));
        // Each slot's generation was bumped once, at its claim.
        for s in &t.groups[0].slots[..2] {
            assert_eq!(s.tag.load(Ordering::Relaxed) & GEN_MASK, 1);
        }
    }

    #[test]
    fn stale_slots_are_reused_without_eviction() {
        let t = Table::new(8); // one group
        let (i, tol) = (10, 10);
        let mut now = 100;
        for k in 0u64..1_000 {
            assert!(admitted(t.check(t.hash(&k), now, i, tol, 0)));
            now += 10; // each key's state is in the past by the next request
        }
        assert_eq!(t.evictions(), 0);
        assert!(t.live_entries(now) <= 8);
    }

    #[test]
    fn full_group_evicts_closest_to_whole() {
        let t = Table::new(8);
        let (i, tol) = (1_000, 1_000);
        let now = 5_000;
        for k in 0u64..8 {
            assert!(admitted(t.check(t.hash(&k), now + k, i, tol, 0)));
        }
        assert_eq!(t.evictions(), 0);
        assert!(admitted(t.check(t.hash(&100u64), now + 8, i, tol, 0)));
        assert_eq!(t.evictions(), 1);
        // Key 0 had the earliest TAT and was evicted.
        assert_eq!(t.peek(t.hash(&0u64)), None);
        assert!(t.peek(t.hash(&7u64)).is_some());
    }
}
