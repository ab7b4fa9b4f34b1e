//! A throwaway `redis-server` for tests and benches: a free loopback port, no persistence,
//! killed on drop.
//!
//! When the binary is absent, [`RedisServer::start`] prints a `SKIPPED` line and returns
//! `None`, unless `BULWARK_REQUIRE_REDIS=1` (set by `.ci/run`), in which case it panics: in CI
//! the Redis tests must run.
#![allow(dead_code, unused_macros)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server, or returns `None` (after printing why) when `redis-server` is absent.
    pub fn start(test: &str) -> Option<RedisServer> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var("BULWARK_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("{test}: redis-server not found but BULWARK_REQUIRE_REDIS=1");
            }
            // Written to the process's stderr directly, past the test harness's output
            // capture, so that the skip shows in a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: redis-server not found on PATH \
                 (install it, e.g. `apt-get install redis-server`, to run the Redis tests)"
            );
            return None;
        }
        // Bind port 0 to let the OS pick a free port, then hand it to redis-server.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = RedisServer { child: None, port };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .args(["--loglevel", "notice"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        // Wait for the server's own word that it accepts connections, then keep draining its
        // output on a thread so that it never blocks on a full pipe.
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut log = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    let ready = line.contains("Ready to accept connections");
                    log.push(line);
                    if ready {
                        break;
                    }
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "redis-server on port {} exited before it was ready:\n{}",
                        self.port,
                        log.join("\n")
                    );
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): it keeps its data and its connections, and answers
    /// nothing until [`resume`](Self::resume), as a server stalled or cut off by the network.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [paused](Self::pause) server run again; it answers what it was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("a running server");
        let status = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a `redis-server` for the named test, or returns from the test when the binary is
/// absent (see [`RedisServer::start`]).
macro_rules! server_or_skip {
    ($name:expr) => {
        match RedisServer::start($name) {
            Some(s) => s,
            None => return,
        }
    };
}

/// A connection manager that gives up reconnecting quickly, so that a stopped server is
/// seen within a check's timeout and a restarted one is found again soon.
pub async fn conn(url: &str) -> redis::aio::ConnectionManager {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(2))
        .set_max_delay(Duration::from_millis(20))
        .set_number_of_retries(1)
        .set_connection_timeout(Some(Duration::from_millis(100)));
    redis::Client::open(url)
        .unwrap()
        .get_connection_manager_with_config(cfg)
        .await
        .unwrap()
}
