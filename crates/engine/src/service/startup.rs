//! What the daemon checks and takes before it serves: every setting (a bad one is found at
//! start-up, not when a disk fails to seal), and the state directory itself (one daemon
//! per state directory, named by its pid when a second one tries).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pdguard_core::geometry::{MAX_SECTOR_SIZE, MIN_SECTOR_SIZE};
use pdguard_core::Profile;

use super::{Config, ServiceError};
use crate::jobs::strategy;
use crate::store::{flock_path, ImageLock, LockMode, StoreError};

/// The file a daemon holds an exclusive `flock` on while it serves a state directory.
pub const DAEMON_LOCK_FILE: &str = "pdguard.lock";

impl Config {
    /// Every setting, checked before anything starts. The message names the setting, the
    /// cause and the fix, on one line.
    pub fn check(&self) -> Result<(), String> {
        if strategy::by_name(&self.strategy).is_none() {
            return Err(format!(
                "--strategy {:?} is not a strategy; use one of: {}",
                self.strategy,
                strategy::STRATEGIES.join(", ")
            ));
        }
        let s = self.sector_size;
        if !s.is_power_of_two() || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&s) {
            return Err(format!(
                "sector size {s} is not a power of two from {MIN_SECTOR_SIZE} to {MAX_SECTOR_SIZE}"
            ));
        }
        if self.profile == Profile::Secure && self.master_key.is_none() {
            return Err(
                "the secure profile needs a master key; pass --key-file FILE (make one with `pdguard keygen FILE`) or use --profile patent".into(),
            );
        }
        if self.jobs == 0 {
            return Err(
                "--jobs 0: at least one job must be able to run; pass --jobs 1 or more".into(),
            );
        }
        Ok(())
    }
}

/// Take the state directory for this daemon: an exclusive `flock` on
/// `STATE/pdguard.lock`, which holds the daemon's pid. The kernel drops it when the daemon
/// dies, even by SIGKILL, so a crash never leaves a stale lock.
pub fn lock_state_dir(state: &Path) -> Result<ImageLock, ServiceError> {
    let path = state.join(DAEMON_LOCK_FILE);
    let io = |what: String| move |source| ServiceError::Io { what, source };
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("cannot create {}", path.display())))?;
    match flock_path(&path, &path.display().to_string(), LockMode::Exclusive) {
        Ok(held) => {
            std::fs::write(&path, format!("{}\n", std::process::id()))
                .map_err(io(format!("cannot write {}", path.display())))?;
            Ok(held)
        }
        Err(StoreError::Busy { holder, .. }) => {
            let pid = holder.or_else(|| pid_in(&path));
            Err(ServiceError::Busy(another_daemon(pid, state)))
        }
        Err(e) => Err(ServiceError::Busy(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

fn pid_in(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn another_daemon(pid: Option<u32>, state: &Path) -> String {
    let who = match pid {
        Some(p) => format!("another pdguard daemon (pid {p})"),
        None => "another pdguard daemon".into(),
    };
    format!(
        "{who} serves {}; stop it first, or give this one another --state-dir",
        state.display()
    )
}

/// Where the lock of a state directory lives (for messages and tests).
pub fn lock_path(state: &Path) -> PathBuf {
    state.join(DAEMON_LOCK_FILE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gate::SealedIo;

    fn cfg() -> Config {
        Config {
            state_dir: PathBuf::from("/nonexistent"),
            grace: std::time::Duration::from_secs(1),
            profile: Profile::Patent,
            master_key: None,
            sealed_io: SealedIo::ReadOnly,
            jobs: 1,
            sector_size: 512,
            strategy: "window".into(),
            seal_stopped: false,
            observer: None,
        }
    }

    #[test]
    fn every_setting_is_checked() {
        assert_eq!(cfg().check(), Ok(()));
        let bad = [
            Config {
                strategy: "foo".into(),
                ..cfg()
            },
            Config {
                sector_size: 1000,
                ..cfg()
            },
            Config {
                sector_size: 256,
                ..cfg()
            },
            Config {
                profile: Profile::Secure,
                ..cfg()
            },
            Config { jobs: 0, ..cfg() },
        ];
        for c in bad {
            let e = c.check().expect_err("a bad setting passed");
            assert!(!e.contains('\n'), "not one line: {e}");
        }
    }

    #[test]
    fn a_second_lock_names_the_first_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock_state_dir(dir.path()).unwrap();
        let e = lock_state_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "another pdguard daemon (pid {})",
                std::process::id()
            )),
            "{e}"
        );
        drop(_held);
        lock_state_dir(dir.path()).unwrap();
    }
}
