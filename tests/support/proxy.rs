//! A TCP forwarder on loopback between a client and a server (a test's Redis) that faults one
//! exact command: when the bytes the client sends contain a pattern (an argument only that
//! command carries), it cuts the connection before they reach the server, or holds them (and
//! everything sent after them) back for a while.
//!
//! Rules fire once, in the order they were added; a new connection (the client reconnecting)
//! passes through untouched once the rules are spent.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// What a rule does to the bytes that match it.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Close both sides of the connection; the matching bytes never reach the server.
    Cut,
    /// Forward the matching bytes (and what follows) only after this long.
    Delay(Duration),
}

struct Rule {
    pattern: Vec<u8>,
    fault: Fault,
}

struct Shared {
    rules: Mutex<Vec<Rule>>,
    /// One permit per rule that has acted (for a delay: once the bytes went on).
    fired: Semaphore,
}

impl Shared {
    /// The fault of the first rule whose pattern `window` contains, removing the rule.
    fn take(&self, window: &[u8]) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let i = rules.iter().position(|r| {
            !r.pattern.is_empty() && window.windows(r.pattern.len()).any(|w| w == r.pattern)
        })?;
        Some(rules.remove(i).fault)
    }

    fn longest(&self) -> usize {
        let rules = self.rules.lock().unwrap();
        rules.iter().map(|r| r.pattern.len()).max().unwrap_or(0)
    }
}

/// A running forwarder; stops accepting when dropped.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream_port`.
    pub async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            rules: Mutex::new(Vec::new()),
            fired: Semaphore::new(0),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, upstream_port, s.clone()));
            }
        });
        Proxy {
            port,
            shared,
            accept,
        }
    }

    /// The URL of a Redis server behind this proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Adds a one-shot rule: `fault` for the first client bytes that contain `pattern`.
    pub fn on(&self, pattern: impl Into<Vec<u8>>, fault: Fault) {
        self.shared.rules.lock().unwrap().push(Rule {
            pattern: pattern.into(),
            fault,
        });
    }

    /// Waits until a rule has acted (a delayed command has been sent on).
    pub async fn fired(&self) {
        self.shared.fired.acquire().await.unwrap().forget();
    }

    /// Rules not yet fired.
    pub fn pending(&self) -> usize {
        self.shared.rules.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, upstream_port: u16, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    // The end of what came before, so that a pattern split over two reads is still seen.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(chunk);
        match shared.take(&window) {
            Some(Fault::Cut) => {
                // Both halves of both sockets go: the server never sees these bytes and the
                // client sees its connection closed.
                back.abort();
                shared.fired.add_permits(1);
                return;
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                if to_server.write_all(chunk).await.is_err() {
                    break;
                }
                shared.fired.add_permits(1);
            }
            None => {
                if to_server.write_all(chunk).await.is_err() {
                    break;
                }
            }
        }
        let keep = shared.longest().saturating_sub(1).min(window.len());
        tail = window[window.len() - keep..].to_vec();
    }
    let _ = to_server.shutdown().await;
    let _ = back.await;
}
