//! A daemon started with its stderr read for the "serving" line (so that `--api
//! tcp:127.0.0.1:0` works), and clients run with a controlled environment.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, code, s, stderr};

/// A running `pdguard serve`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    /// `tcp:127.0.0.1:PORT` or `unix:PATH`, as the daemon printed it.
    pub api: String,
}

impl Daemon {
    /// Start a daemon (patent profile: no key needed) and wait for its "serving" line.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(bin())
            .args(["serve", "--profile", "patent", "--state-dir", s(state)])
            .args(extra)
            .env_remove("PDGUARD_KEY_FILE")
            .env_remove("PDGUARD_API_TOKEN_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        // Reads stderr to its end, so that the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut d = Self {
            child,
            api: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.split("serving the admin API on ").nth(1) {
                        d.api = rest.split(' ').next().unwrap().to_string();
                        return d;
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("daemon did not come up: {seen:?}");
    }

    pub fn addr(&self) -> &str {
        self.api.strip_prefix("tcp:").unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a daemon that must refuse to start; returns its output.
pub fn refused_start(state: &Path, extra: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(["serve", "--profile", "patent", "--state-dir", s(state)])
        .args(extra)
        .env_remove("PDGUARD_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started although it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A client command with a controlled environment (`env`: extra variables).
pub fn client(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("PDGUARD_KEY_FILE")
        .env_remove("PDGUARD_API_TOKEN_FILE")
        .env_remove("PDGUARD_STATE_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn json_of(o: &Output) -> Value {
    assert_eq!(code(o), 0, "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}
