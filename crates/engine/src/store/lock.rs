//! One job per image, across processes (STYLE.md 13): `flock(2)` on the image itself.
//!
//! `flock` locks belong to an open file description, so two jobs in one process (two
//! threads of the daemon) conflict just as two processes do, and the kernel drops the lock
//! when its holder dies, even by SIGKILL: a crash never leaves a stale lock behind. It
//! works on regular files and block devices alike. It is advisory: it keeps pdguard jobs
//! apart, not other programs (see [`super::inuse`] for loop devices and mounts).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::FlockOperation;

use super::safe_open::{self, Accept, How};
use super::{Result, StoreError};

/// How a job holds its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// One job that may write: seal, unseal, shred.
    Exclusive,
    /// Any number of readers that must not see the image change: verify.
    Shared,
}

/// A held image lock; dropping it releases the lock.
pub struct ImageLock {
    _held: Box<dyn Send + Sync>,
}

impl ImageLock {
    /// Wrap whatever keeps the lock held (an open file, a guard of the in-memory store).
    pub fn new(held: Box<dyn Send + Sync>) -> Self {
        Self { _held: held }
    }
}

impl std::fmt::Debug for ImageLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageLock")
    }
}

/// `flock(LOCK_NB)` on `path`, opened read-only (enough for `flock`, and a block device
/// opened read-only is not claimed) through [`super::safe_open`]: never through a symbolic
/// link, never waiting on a FIFO; a regular file or a block device.
pub fn flock_path(path: &Path, name: &str, mode: LockMode) -> Result<ImageLock> {
    let how = How::READ.accept(Accept::RegularOrBlock);
    let file = safe_open::open(path, "lock target", how)?.ok_or_else(|| {
        StoreError::io(
            "open",
            format!("image {name}"),
            io::ErrorKind::NotFound.into(),
        )
    })?;
    flock_file(file, name, mode)
}

/// `flock(LOCK_NB)` on a file already opened (and checked) by the caller; the lock is held
/// as long as the returned guard keeps `file` open.
pub fn flock_file(file: File, name: &str, mode: LockMode) -> Result<ImageLock> {
    let op = match mode {
        LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
        LockMode::Shared => FlockOperation::NonBlockingLockShared,
    };
    match rustix::fs::flock(&file, op) {
        Ok(()) => Ok(ImageLock::new(Box::new(file))),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = file.metadata().ok().and_then(|m| {
                let locks = std::fs::read_to_string("/proc/locks").ok()?;
                lock_holder(&locks, m.dev(), m.ino())
            });
            Err(StoreError::Busy {
                image: name.into(),
                holder,
            })
        }
        Err(e) => Err(StoreError::io(
            "lock",
            format!("image {name}"),
            io::Error::from(e),
        )),
    }
}

/// The pid holding an `flock` on the file (`dev`, `ino`), from the text of `/proc/locks`:
/// `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF` (device as hex major:minor). Waiters
/// (`1: -> FLOCK ...`) and a pid of 0 (a holder in another pid namespace) are skipped.
pub fn lock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = (
        u64::from(rustix::fs::major(dev)),
        u64::from(rustix::fs::minor(dev)),
        ino,
    );
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let mut id = f.get(5)?.splitn(3, ':');
        let major = u64::from_str_radix(id.next()?, 16).ok()?;
        let minor = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        ((major, minor, inode) == want && pid != 0).then_some(pid)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lock_holder_finds_the_pid_by_device_and_inode() {
        let dev = rustix::fs::makedev(0x103, 0x2a);
        let text = "1: POSIX  ADVISORY  WRITE 77 103:2a:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 88 103:2a:98 0 EOF\n\
                    3: -> FLOCK  ADVISORY  WRITE 55 103:2a:99 0 EOF\n\
                    4: FLOCK  ADVISORY  READ 4242 103:2a:99 0 EOF\n";
        assert_eq!(lock_holder(text, dev, 99), Some(4242));
        assert_eq!(lock_holder(text, dev, 98), Some(88));
        assert_eq!(lock_holder(text, dev, 97), None);
        assert_eq!(lock_holder("garbage\n\n1: FLOCK x", dev, 99), None);
    }

    #[test]
    fn a_second_exclusive_lock_in_the_same_process_is_busy_and_names_this_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        let held = flock_path(&p, "img", LockMode::Exclusive).unwrap();
        match flock_path(&p, "img", LockMode::Shared) {
            Err(StoreError::Busy { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("expected busy, got {other:?}"),
        }
        drop(held);
        let a = flock_path(&p, "img", LockMode::Shared).unwrap();
        let _b = flock_path(&p, "img", LockMode::Shared).unwrap();
        assert!(matches!(
            flock_path(&p, "img", LockMode::Exclusive),
            Err(StoreError::Busy { .. })
        ));
        drop(a);
    }

    #[test]
    fn a_fifo_or_a_link_as_lock_target_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = flock_path(&fifo, "fifo", LockMode::Exclusive).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.to_string().contains("FIFO"), "{e}");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let e = flock_path(&link, "link", LockMode::Shared).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
