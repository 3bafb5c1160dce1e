//! Servers of a test's own, for the fault tests that stop or kill one: never the shared
//! instances other tests are using at the same moment.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 and an empty directory of this process's for a server `name`
/// to listen on and write to.
pub fn free_port_and_dir(name: &str) -> Option<(u16, std::path::PathBuf)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir =
        std::env::temp_dir().join(format!("tower402-own-{name}-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    Some((port, dir))
}

/// A `redis-server` of this test's own, writing every command to its append-only file in a
/// directory of its own (so it can be killed and started again with its data), killed when
/// dropped.
pub struct OwnRedis {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    /// Starts one on a free port, or `None` (after [`skip`]) where it cannot be started.
    pub fn start() -> Option<OwnRedis> {
        let (port, dir) = free_port_and_dir("redis")?;
        OwnRedis::spawn(port, dir)
    }

    fn spawn(port: u16, dir: std::path::PathBuf) -> Option<OwnRedis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                skip("redis-server", &e);
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::yield_now();
        }
        Some(OwnRedis { child, port, dir })
    }

    /// `kill -9`, then the server again on the same port with what it had written.
    pub fn crash_and_restart(mut self) -> OwnRedis {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (port, dir) = (self.port, self.dir.clone());
        std::mem::forget(self);
        OwnRedis::spawn(port, dir).expect("redis-server restarts")
    }

    /// Sends `sig` (`-STOP`, `-CONT`, ...) to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; no assertion here (this may run in a panic).
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Says loudly that a test did not run, or fails it where the backends are required.
pub fn skip(what: &str, why: &dyn std::fmt::Display) {
    assert!(
        std::env::var("TOWER402_REQUIRE_BACKENDS").as_deref() != Ok("1"),
        "{what} could not be started: {why}"
    );
    eprintln!("SKIPPED: {what} could not be started ({why})");
}
