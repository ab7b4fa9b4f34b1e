//! What several layers share: one random generator, the stamp that tells whose refusal a
//! rejection is.

pub(crate) mod rng;
pub(crate) mod stamp;
