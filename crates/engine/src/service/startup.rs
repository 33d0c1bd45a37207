//! What the daemon checks and takes before it serves: every setting (a bad one is found at
//! start-up, not when a disk fails to seal), the state directory itself (canonical, owned
//! by the daemon's user and writable by nobody else; one daemon per state directory, named
//! by its pid when a second one tries), and the recovery of what a crash or a stop left.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pdguard_core::geometry::{MAX_SECTOR_SIZE, MIN_SECTOR_SIZE};
use pdguard_core::{Phase, Profile};

use super::lifecycle::{Event, Life, MAX_GRACE_MS};
use super::runner::{record_lost, storage_of};
use super::{Config, Service, ServiceError};
use crate::jobs::{self, strategy};
use crate::registry::DiskState;
use crate::store::file::default_record_path;
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
        if self.grace.as_millis() > u128::from(MAX_GRACE_MS) {
            return Err(format!(
                "--grace {:?} is longer than the longest grace period, {} days; give a shorter one",
                self.grace,
                MAX_GRACE_MS / 86_400_000
            ));
        }
        if self.jobs == 0 {
            return Err(
                "--jobs 0: at least one job must be able to run; pass --jobs 1 or more".into(),
            );
        }
        check_docker_mount_timeout(self.docker_mount_timeout)
    }
}

/// `--docker-mount-timeout`: more than zero and less than dockerd's own limit, so that a
/// Mount always answers before dockerd gives up on it.
pub fn check_docker_mount_timeout(t: std::time::Duration) -> Result<(), String> {
    let ms = |d: std::time::Duration| {
        crate::units::millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    if t.is_zero() || t >= super::DOCKERD_MOUNT_TIMEOUT {
        return Err(format!(
            "--docker-mount-timeout {}: a Mount must answer before dockerd gives up on it ({}); give a duration such as 90s or 30s",
            ms(t),
            ms(super::DOCKERD_MOUNT_TIMEOUT),
        ));
    }
    Ok(())
}

/// Refuse a state directory another user owns, or that its group or others may write: they
/// could plant a symlink at `mounts/NAME` or swap a disk file under the daemon. One line,
/// with the fix.
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot read the state directory {}: {e}", dir.display()))?;
    if !m.is_dir() {
        return Err(format!(
            "the state directory {} is not a directory; give a directory with --state-dir",
            dir.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if m.uid() != me {
        return Err(format!(
            "the state directory {} is owned by uid {}, not by the daemon's uid {me}; chown it to the daemon's user or give another --state-dir",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "the state directory {} is writable by its group or others (mode {:o}); run `chmod 700 {}` or give another --state-dir",
            dir.display(),
            m.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// The state directory made (mode 0700) if missing, canonicalized once (symlinks and `..`
/// resolved: every path compared with the kernel's derives from it), checked by
/// [`check_state_dir`], closed to group and others, with its `disks/` inside.
pub(super) fn prepare_state_dir(dir: &Path) -> Result<PathBuf, ServiceError> {
    let io = |what: String| move |source| ServiceError::Io { what, source };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!(
            "cannot create the state directory {}",
            dir.display()
        )))?;
    let dir = super::adopt::canonical_state_dir(dir)?;
    check_state_dir(&dir).map_err(ServiceError::Invalid)?;
    // Readable only by the daemon's user (disk files inherit nothing, but their names do).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("cannot set the mode of {}", dir.display())))?;
    let disks = dir.join("disks");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&disks)
        .map_err(io(format!("cannot create {}", disks.display())))?;
    Ok(dir)
}

impl Service {
    /// At start: set every gate from its disk's state, retry what a restart may have fixed,
    /// resume the jobs a stop or a crash interrupted, and fail sealed disks whose record is
    /// gone.
    pub(super) async fn recover(&self) {
        let mut st = self.s.state.lock().await;
        let names: Vec<String> = st.disks.keys().cloned().collect();
        for name in &names {
            let Ok(life) = st.life(name) else { continue };
            let Some(d) = st.disks.get(name).cloned() else {
                continue;
            };
            let event = match &life {
                Life::Sealed { .. } | Life::Failed { .. } if Self::record_migrating(&d) => {
                    tracing::info!(disk = %name, "its seal record is in phase migrating: resuming the migration of its instant reclaim");
                    Some(Event::ResumeMigration)
                }
                Life::Failed { dangling, error } => retry_of(&d, *dangling).map(|seal| {
                    tracing::info!(disk = %name, %error, "retrying a disk that failed before this start");
                    Event::Retry { seal }
                }),
                Life::Sealed { .. } if d.record_expected && !default_record_path(&d.path).exists() => {
                    let why = record_lost(&d);
                    tracing::error!(disk = %name, "{why}");
                    Some(Event::RecordLost { why })
                }
                _ => None,
            };
            if let Some(kind) = life.job() {
                let from = jobs::inspect(&storage_of(&d))
                    .map(|r| format!("from {}", r.phase.name()))
                    .unwrap_or_else(|_| "from the start".into());
                tracing::info!(disk = %name, "resuming {} of {name} {from}", kind.name());
            }
            self.gate(name).set(self.gate_state_for(name, d.state));
            let r = match event {
                Some(e) => self.apply(&mut st, name, e).map(drop),
                None => match life.job() {
                    Some(kind) => {
                        self.ensure_job(&d, kind);
                        Ok(())
                    }
                    None => Ok(()),
                },
            };
            if let Err(e) = r {
                tracing::error!(disk = %name, error = %crate::error_chain(&e), "cannot recover the disk");
            }
        }
    }
}

/// A disk that failed for a reason a restart may have removed (a bad setting, a full file
/// system) is retried: a dangling disk whose seal never wrote a record is sealed again
/// (`Some(true)`), and a job a record shows half done is resumed. A failure of the data
/// itself (a sealed image that does not verify, a lost record) stays `failed` (`None`).
fn retry_of(d: &crate::registry::Disk, dangling: bool) -> Option<bool> {
    debug_assert_eq!(d.state, DiskState::Failed);
    let storage = storage_of(d);
    if !storage.record_path().exists() {
        return (dangling && !d.record_expected).then_some(true);
    }
    match jobs::inspect(&storage).map(|r| r.phase) {
        Ok(Phase::SealScatter | Phase::SealGather) => Some(true),
        Ok(Phase::UnsealScatter | Phase::UnsealGather) => Some(false),
        _ => None,
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
            docker_mount_timeout: crate::service::DOCKER_MOUNT_TIMEOUT,
            reclaim: Default::default(),
        }
    }

    #[test]
    fn a_state_dir_others_may_write_or_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("st");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check_state_dir(&p), Ok(()));
        for mode in [0o770, 0o707, 0o777] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_state_dir(&p).unwrap_err();
            assert!(e.contains("writable") && e.contains("chmod 700"), "{e}");
            assert!(prepare_state_dir(&p).is_err(), "mode {mode:o} was accepted");
            // Refused, not quietly fixed.
            let m = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(m, mode);
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let dotdot = dir.path().join("st").join("..").join("st");
        for given in [&link, &dotdot] {
            assert_eq!(
                prepare_state_dir(given).unwrap(),
                std::fs::canonicalize(&p).unwrap()
            );
        }
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let e = check_state_dir(&p).unwrap_err();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn a_grace_past_ten_years_is_refused() {
        let c = Config {
            grace: std::time::Duration::from_millis(u64::MAX),
            ..cfg()
        };
        let e = c.check().unwrap_err();
        assert!(e.contains("--grace"), "{e}");
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
            Config {
                docker_mount_timeout: std::time::Duration::ZERO,
                reclaim: Default::default(),
                ..cfg()
            },
            Config {
                docker_mount_timeout: super::super::DOCKERD_MOUNT_TIMEOUT,
                reclaim: Default::default(),
                ..cfg()
            },
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
