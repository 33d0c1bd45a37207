//! A test-only hook: pause a job at a chosen byte of a chosen pass, so that end-to-end
//! tests can SIGKILL it exactly there (tests/kill.rs), hold its image lock while another
//! job tries the same image (tests/locks.rs), or stop a daemon with a job in flight
//! (tests/operator.rs; `serve` passes it to its jobs). Read only from the environment of this
//! binary; without `PDGUARD_TEST_PAUSE_AT` it does nothing.
//!
//! - `PDGUARD_TEST_PAUSE_AT=PASS:BYTES` (e.g. `gather:1048576`): when the pass named `PASS`
//!   (`scatter`, `gather`, `verify`; `migrate` for an instant reclaim's migration, whose
//!   evacuations and moves count every byte they write, before their fsync and commit;
//!   `migrate-end`, of no bytes, as the migration's end starts)
//!   has moved at least `BYTES` bytes (0: as it starts), the job stops there, once.
//! - `PDGUARD_TEST_PAUSE_FILE=PATH`: on pausing, the job creates `PATH` (holding its pid)
//!   and waits until `PATH` is removed, then goes on. Without it, it waits to be killed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub struct PauseAt {
    pass: String,
    at: u64,
    file: Option<PathBuf>,
    current: Mutex<&'static str>,
    moved: AtomicU64,
    fired: AtomicBool,
}

impl PauseAt {
    /// The hook the environment asks for, if any. A malformed value is ignored with a
    /// warning: it is a test knob, never a user's.
    pub fn from_env() -> Option<Self> {
        let v = std::env::var("PDGUARD_TEST_PAUSE_AT").ok()?;
        let parsed = v
            .split_once(':')
            .and_then(|(p, b)| Some((p.to_string(), b.parse::<u64>().ok()?)));
        let Some((pass, at)) = parsed else {
            tracing::warn!(value = %v, "PDGUARD_TEST_PAUSE_AT is not PASS:BYTES; ignored");
            return None;
        };
        Some(Self {
            pass,
            at,
            file: std::env::var_os("PDGUARD_TEST_PAUSE_FILE").map(PathBuf::from),
            current: Mutex::new(""),
            moved: AtomicU64::new(0),
            fired: AtomicBool::new(false),
        })
    }

    pub fn pass(&self, name: &'static str) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = name;
        self.moved.store(0, Ordering::SeqCst);
        self.check(name);
    }

    pub fn advance(&self, bytes: u64) {
        self.moved.fetch_add(bytes, Ordering::SeqCst);
        let name = *self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.check(name);
    }

    fn check(&self, name: &str) {
        if name != self.pass || self.moved.load(Ordering::SeqCst) < self.at {
            return;
        }
        if self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        eprintln!(
            "pdguard: test hook: paused in pass {name} after {} bytes",
            self.moved.load(Ordering::SeqCst)
        );
        match &self.file {
            Some(f) => {
                let _ = std::fs::write(f, std::process::id().to_string());
                while f.exists() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            None => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}

/// The daemon's jobs report to the hook through the service's observer.
impl pdguard_engine::jobs::Progress for PauseAt {
    fn pass(&self, name: &'static str, _total_bytes: u64) {
        PauseAt::pass(self, name);
    }

    fn advance(&self, bytes: u64) {
        PauseAt::advance(self, bytes);
    }
}
