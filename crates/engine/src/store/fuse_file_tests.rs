//! The FUSE file against a real kernel (the suite runs as root, with FUSE and loop devices).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;

use super::*;

/// A file backing that counts its flushes and fails every write from `fail_writes_after` on.
struct Counting {
    file: FileBacking,
    flushes: AtomicUsize,
    writes: AtomicUsize,
    fail_writes_after: usize,
}

impl Counting {
    fn new(path: &Path, fail_writes_after: usize) -> Arc<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Arc::new(Self {
            file: FileBacking::new(f).unwrap(),
            flushes: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            fail_writes_after,
        })
    }
    fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl FuseBacking for Counting {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) >= self.fail_writes_after {
            return Err(io::Error::other("injected write fault"));
        }
        self.file.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.file.flush()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn backing_file(dir: &Path, len: usize) -> PathBuf {
    let p = dir.join("volume.img");
    std::fs::write(&p, pattern(len, 7)).unwrap();
    p
}

fn open_rw(p: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

#[test]
fn a_file_is_served_read_and_written_through_fuse_and_unmounted() {
    let tmp = tempfile::tempdir().unwrap();
    let len = 1 << 20;
    let img = backing_file(tmp.path(), len);
    let backing = Counting::new(&img, usize::MAX);
    let mnt = tmp.path().join("fuse");
    let fuse = FuseFile::mount(&mnt, backing.clone(), FuseOptions::default())
        .expect("a FUSE mount needs root and /dev/fuse");
    assert!(super::super::loopfs::is_mountpoint(fuse.dir()).unwrap());
    let names: Vec<_> = std::fs::read_dir(fuse.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [FILE_NAME]);
    assert_eq!(std::fs::metadata(fuse.path()).unwrap().len(), len as u64);

    // Reads: the backing's bytes, anywhere; short at the end.
    let f = open_rw(&fuse.path());
    let mut all = Vec::new();
    (&f).read_to_end(&mut all).unwrap();
    assert_eq!(all, pattern(len, 7));
    let mut buf = [0u8; 100];
    assert_eq!(f.read_at(&mut buf, len as u64 - 40).unwrap(), 40);
    assert_eq!(buf[..40], pattern(len, 7)[len - 40..]);

    // Writes reach the backing file; fsync reaches the backing's flush.
    let data = pattern(3 * 4096 + 5, 99);
    f.write_all_at(&data, 12_345).unwrap();
    let before = backing.flushes();
    f.sync_all().unwrap();
    assert!(backing.flushes() > before, "fsync must reach flush()");
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk[12_345..12_345 + data.len()], data[..]);
    assert_eq!(on_disk[..12_345], pattern(len, 7)[..12_345]);

    // The file has a fixed size: a write past the end and a truncate are refused.
    let e = f.write_at(b"x", len as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_errno::ENOSPC), "{e}");
    assert!(f.set_len(4096).is_err());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len as u64);
    drop(f);

    let dir = fuse.dir().to_path_buf();
    fuse.unmount().unwrap();
    assert!(!super::super::loopfs::is_mountpoint(&dir).unwrap());
}

#[test]
fn a_failed_write_answers_eio_and_every_later_request_too() {
    let tmp = tempfile::tempdir().unwrap();
    let img = backing_file(tmp.path(), 64 << 10);
    let backing = Counting::new(&img, 1);
    let fuse = FuseFile::mount(&tmp.path().join("fuse"), backing, FuseOptions::default())
        .expect("a FUSE mount needs root and /dev/fuse");
    let f = open_rw(&fuse.path());
    f.write_all_at(b"first", 0).unwrap();
    let e = f.write_all_at(b"second", 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_errno::EIO), "{e}");
    // Poisoned: a read, which the backing would serve, is refused as well, and so is fsync.
    let mut buf = [0u8; 16];
    let e = f.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_errno::EIO), "{e}");
    assert!(f.sync_all().is_err());
    drop(f);
    assert_eq!(&std::fs::read(&img).unwrap()[..5], b"first");
}

/// What a daemon killed while serving leaves: a FUSE mount whose `/dev/fuse` was closed
/// (the kernel aborts the connection; every access `ENOTCONN`).
fn leave_dead_fuse_mount(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let dev = open_rw(Path::new("/dev/fuse"));
    let data = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        dev.as_raw_fd()
    ))
    .unwrap();
    rustix::mount::mount(
        "pdguard",
        dir,
        "fuse.pdguard",
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    )
    .unwrap();
    drop(dev);
}

#[test]
fn a_dead_fuse_mount_left_by_a_killed_daemon_is_detached_by_the_next_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let img = backing_file(tmp.path(), 64 << 10);
    let mnt = tmp.path().join("fuse");
    leave_dead_fuse_mount(&mnt);
    let e = std::fs::metadata(mnt.join(FILE_NAME)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_errno::ENOTCONN), "{e}");

    let fuse = FuseFile::mount(
        &mnt,
        Counting::new(&img, usize::MAX),
        FuseOptions::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(fuse.path()).unwrap(), pattern(64 << 10, 7));
    let dir = fuse.dir().to_path_buf();
    // Dropped (the daemon's shutdown): detached, and nothing is left below it.
    drop(fuse);
    assert!(top_mount(&dir).unwrap().is_none());
}

#[test]
fn another_file_system_mounted_on_the_directory_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let img = backing_file(tmp.path(), 64 << 10);
    let mnt = tmp.path().join("fuse");
    std::fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(
        "pdguard-test",
        &mnt,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    let e = FuseFile::mount(
        &mnt,
        Counting::new(&img, usize::MAX),
        FuseOptions::default(),
    );
    let text = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("tmpfs") && text.contains("fuse"), "{text}");
    assert_eq!(
        top_mount(&mnt.canonicalize().unwrap()).unwrap().unwrap().1,
        "tmpfs"
    );
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
}

#[test]
fn a_loop_device_on_the_fuse_file_carries_an_ext4_file_system() {
    use super::super::loopfs;
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("volume.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    loopfs::mkfs(&img, "ext4").unwrap();
    let backing = Counting::new(&img, usize::MAX);
    let fs_dir = tmp.path().join("mnt");
    let mounted = loopfs::mount_over_fuse(backing.clone(), &tmp.path().join("fuse"), &fs_dir)
        .expect("a loop mount over FUSE needs root");
    let fuse_file = mounted.file();
    assert_eq!(loopfs::loops_of(&fuse_file).unwrap().len(), 1);
    assert!(
        loopfs::loops_of(&img).unwrap().is_empty(),
        "the loop device is on the FUSE file"
    );
    let data = pattern(3 << 20, 42);
    {
        let mut f = File::create(fs_dir.join("hello")).unwrap();
        f.write_all(&data).unwrap();
        // The file system's flush goes down the loop device to the FUSE file's fsync.
        let before = backing.flushes();
        f.sync_all().unwrap();
        assert!(
            backing.flushes() > before,
            "the loop device's flush must reach flush()"
        );
    }
    mounted.unmount().unwrap();
    assert!(loopfs::loops_of(&fuse_file).unwrap().is_empty());
    mounted
        .close()
        .expect("nothing holds the FUSE file any more");
    assert!(!loopfs::is_mountpoint(&fs_dir).unwrap());
    assert!(!loopfs::is_mountpoint(&tmp.path().join("fuse")).unwrap());
    // The file system is in the plain file: mounted from it directly, it reads back.
    loopfs::mount(&img, &fs_dir).unwrap();
    let back = std::fs::read(fs_dir.join("hello"));
    loopfs::unmount(&img, &fs_dir).unwrap();
    assert_eq!(back.unwrap(), data);
}

/// Errno values, without a libc dependency in the tests.
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const ENOSPC: i32 = 28;
    pub const ENOTCONN: i32 = 107;
}
