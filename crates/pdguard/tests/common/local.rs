//! A daemon on the unix socket of its own state directory, driven by the CLI clients; the
//! end-to-end tests that need no log and no TCP share it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, code, pdguard, s, stderr};

/// A running `pdguard serve`; killed when dropped.
pub struct Daemon {
    child: Child,
    state: PathBuf,
}

impl Daemon {
    /// Start `pdguard serve --state-dir STATE EXTRA…` and wait until `status` answers.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        let child = Command::new(bin())
            .args(["serve", "--state-dir", s(state)])
            .args(extra)
            .env_remove("PDGUARD_KEY_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Self {
            child,
            state: state.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while code(&d.cli(&["status"])) != 0 {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Run a client command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--state-dir", s(&self.state)]);
        pdguard(&a)
    }

    /// Run a client command with `--json`; it must succeed. Its JSON answer.
    pub fn ok(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.cli(&a);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub fn disk(&self, name: &str) -> Value {
        self.ok(&["disk", "show", name])
    }

    /// Wait until `name` is in `state` (or fail after `secs`).
    pub fn wait_state(&self, name: &str, state: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.disk(name);
            if d["state"] == state {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {state}: {d}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
