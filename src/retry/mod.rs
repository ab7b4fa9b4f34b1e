//! Not yet built: see the crate's issue tracker.
