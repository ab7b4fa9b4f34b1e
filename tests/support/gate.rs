//! Holds one request in a handler until the test releases it, so that a second request meets
//! the first in flight without the test sleeping.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Armed by the test; passed by every request; holds the first one after arming.
#[derive(Debug, Default)]
pub struct Gate {
    armed: AtomicBool,
    entered: Notify,
    release: Notify,
}

impl Gate {
    /// In a handler: if armed, disarm, say so, and wait to be released.
    pub async fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
    }

    /// In the test: the next request through [`pass`](Self::pass) will be held.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// In the test: waits until the held request is in its handler.
    pub async fn entered(&self) {
        self.entered.notified().await;
    }

    /// In the test: lets the held request go on.
    pub fn release(&self) {
        self.release.notify_one();
    }
}
