//! What several layers share: one random generator.

pub(crate) mod rng;
