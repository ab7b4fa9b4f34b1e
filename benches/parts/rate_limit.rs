//! Benches for the `rate_limit` layer and its peers.
#![allow(dead_code, unused_imports)]

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion};

/// Entries of the `overhead` group (single thread).
pub fn overhead(_g: &mut BenchmarkGroup<'_, WallTime>) {}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(_c: &mut Criterion) {}
