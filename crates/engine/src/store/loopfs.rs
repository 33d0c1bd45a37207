//! A volume's file system on a loop device: `mkfs.ext4` on the sparse disk file, `mount -o
//! loop` under the state directory, `umount` and detach; and the check that a file is in use
//! by the kernel (attached to a loop device, or its mountpoint mounted), which no seal may
//! ignore whatever the registry says (DESIGN.md §4: a mounted volume is never sealed).
//!
//! For an instant reclaim the loop device is on a FUSE file pdguard serves instead
//! ([`mount_over_fuse`], [`super::fuse_file`]).
//!
//! The tools are util-linux's `mount`, `umount`, `losetup` and e2fsprogs' `mkfs.ext4`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::fuse_file::{FuseBacking, FuseFile, FuseOptions};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoopFsError {
    #[error("cannot run {tool} (install {package}, e.g. `apt-get install {package}`)")]
    Missing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} {what} failed: {stderr}")]
    Failed {
        tool: &'static str,
        what: String,
        stderr: String,
    },
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file system {0:?} is not supported; use fs=ext4")]
    UnsupportedFs(String),
    #[error("mountpoint {dir} is {kind}, not a directory; pdguard never mounts on a link or a file planted there: remove it and mount again")]
    BadMountpoint { dir: String, kind: &'static str },
    #[error(transparent)]
    Fuse(Box<super::fuse_file::FuseError>),
}

type Result<T, E = LoopFsError> = std::result::Result<T, E>;

fn run(tool: &'static str, package: &'static str, what: String, args: &[&str]) -> Result<()> {
    run_out(tool, package, what, args).map(drop)
}

/// Run a tool; its standard output, trimmed, when it succeeds.
fn run_out(
    tool: &'static str,
    package: &'static str,
    what: String,
    args: &[&str],
) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| LoopFsError::Missing {
            tool,
            package,
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    Err(LoopFsError::Failed {
        tool,
        what,
        stderr: String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; "),
    })
}

/// Make a file system on the (sparse) file. Nothing is discarded and the blocks the file
/// system would zero are known to be zeros already, so the file stays sparse.
pub fn mkfs(file: &Path, fs: &str) -> Result<()> {
    if fs != "ext4" {
        return Err(LoopFsError::UnsupportedFs(fs.into()));
    }
    let f = path_str(file)?;
    run(
        "mkfs.ext4",
        "e2fsprogs",
        format!("on {f}"),
        &["-q", "-F", "-E", "nodiscard,assume_storage_prezeroed=1", f],
    )
}

/// Loop-mount `file` at `dir` (created if needed). Already mounted there: nothing to do.
pub fn mount(file: &Path, dir: &Path) -> Result<()> {
    if is_mountpoint(dir)? {
        return Ok(());
    }
    make_mountpoint(dir)?;
    let (f, d) = (path_str(file)?, path_str(dir)?);
    run(
        "mount",
        "mount",
        format!("of {f} at {d}"),
        &["-o", "loop", f, d],
    )
}

/// A volume's file system mounted over a FUSE file (instant reclaim, docs/instant-reclaim.md
/// §8): the FUSE file served from its backing, a loop device on it, the file system of the
/// loop device mounted at `dir`. [`FuseMount::unmount`] then [`FuseMount::close`] undo it
/// in the reverse order; dropped, only the FUSE mount is detached (lazily: a loop device
/// still on it keeps being served until the kernel lets go of it).
pub struct FuseMount {
    fuse: FuseFile,
    dir: PathBuf,
}

/// Serve `backing` as the FUSE file in `fuse_dir`, put a loop device on it (with the loop
/// device's direct I/O: its requests reach the FUSE file several at once, bench/fuse.sh)
/// and mount its file system at `dir` (created as [`mount`] does). Any step that fails
/// undoes the ones before it.
pub fn mount_over_fuse(
    backing: Arc<dyn FuseBacking>,
    fuse_dir: &Path,
    dir: &Path,
) -> Result<FuseMount> {
    make_mountpoint(dir)?;
    if is_mountpoint(dir)? {
        return Err(LoopFsError::Failed {
            tool: "mount",
            what: format!("at {}", dir.display()),
            stderr: "something is mounted there already; unmount it first".into(),
        });
    }
    let fuse = FuseFile::mount(fuse_dir, backing, FuseOptions::default())
        .map_err(|e| LoopFsError::Fuse(Box::new(e)))?;
    let file = fuse.path();
    let f = path_str(&file)?;
    let dev = run_out(
        "losetup",
        "mount",
        format!("--find --show {f}"),
        &["--direct-io=on", "--find", "--show", f],
    )?;
    let d = path_str(dir)?;
    if let Err(e) = run("mount", "mount", format!("of {dev} at {d}"), &[&dev, d]) {
        let _ = run("losetup", "mount", format!("-d {dev}"), &["-d", &dev]);
        return Err(e);
    }
    Ok(FuseMount {
        fuse,
        dir: dir.to_path_buf(),
    })
}

impl FuseMount {
    /// The served file, as the loop device sees it.
    pub fn file(&self) -> PathBuf {
        self.fuse.path()
    }

    /// Unmount the file system and detach the loop device (again if it failed before: a
    /// process had its working directory in it). The FUSE file stays served.
    pub fn unmount(&self) -> Result<()> {
        unmount(&self.fuse.path(), &self.dir)
    }

    /// Unmount the FUSE file, after [`FuseMount::unmount`].
    pub fn close(self) -> Result<()> {
        self.fuse
            .unmount()
            .map_err(|e| LoopFsError::Fuse(Box::new(e)))
    }
}

/// Create the mountpoint `dir` (mode 0700) and its parent, or accept them if they are
/// real directories: a symbolic link or anything else planted at either is refused
/// (checked with `lstat`, never followed), so root never mounts a volume on a directory
/// someone else chose.
pub(crate) fn make_mountpoint(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what: String| move |source| LoopFsError::Io { what, source };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(io(format!("create the directory {}", parent.display())))?;
        check_real_dir(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("create the mountpoint {}", dir.display()))(e)),
    }
    check_real_dir(dir)
}

fn check_real_dir(dir: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(dir).map_err(|source| LoopFsError::Io {
        what: format!("inspect the mountpoint {}", dir.display()),
        source,
    })?;
    let t = m.file_type();
    let kind = if t.is_dir() {
        return Ok(());
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a directory"
    };
    Err(LoopFsError::BadMountpoint {
        dir: dir.display().to_string(),
        kind,
    })
}

/// Unmount `dir` (if mounted) and detach every loop device still backed by `file`.
pub fn unmount(file: &Path, dir: &Path) -> Result<()> {
    if is_mountpoint(dir)? {
        let d = path_str(dir)?;
        run("umount", "mount", format!("of {d}"), &[d])?;
    }
    for dev in loops_of(file)? {
        let d = path_str(&dev)?;
        run("losetup", "mount", format!("-d {d}"), &["-d", d])?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Why the kernel holds `file`, if it does: a file system mounted at `dir`, or one mounted
/// from the file, or a loop device backed by it (compared by device and inode;
/// [`super::inuse`]).
pub fn in_use(file: &Path, dir: &Path) -> Result<Option<String>> {
    if is_mountpoint(dir)? {
        return Ok(Some(format!("{} is mounted", dir.display())));
    }
    match super::inuse::describe_use(file) {
        Ok(why) => Ok(why.map(|why| format!("{} is {why}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoopFsError::Io {
            what: format!("find whether the kernel holds {}", file.display()),
            source,
        }),
    }
}

/// Loop devices whose backing file is `file` (same device and inode); none when the file
/// does not exist.
pub fn loops_of(file: &Path) -> Result<Vec<PathBuf>> {
    match super::inuse::attached_loop_devices(file) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(LoopFsError::Io {
            what: format!("list the loop devices of {}", file.display()),
            source,
        }),
    }
}

/// True when `dir` is a mountpoint, as the kernel sees the directory itself, never by path
/// text (a state directory given through a symlink or `..` names the same directory):
/// statx's `STATX_ATTR_MOUNT_ROOT`, or on a kernel without it, a device other than its
/// parent's. A symlink is never a mountpoint; a missing path is not one.
pub fn is_mountpoint(dir: &Path) -> Result<bool> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    let io = |source: rustix::io::Errno| LoopFsError::Io {
        what: format!("find whether {} is a mountpoint", dir.display()),
        source: source.into(),
    };
    let st = match statx(CWD, dir, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::BASIC_STATS) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    let root = StatxAttributes::MOUNT_ROOT;
    if st.stx_attributes_mask.contains(root) {
        return Ok(st.stx_attributes.contains(root));
    }
    if u32::from(st.stx_mode) & 0o170000 != 0o040000 {
        return Ok(false);
    }
    let parent = statx(
        CWD,
        dir.join(".."),
        AtFlags::empty(),
        StatxFlags::BASIC_STATS,
    )
    .map_err(io)?;
    let dev = |s: &rustix::fs::Statx| (s.stx_dev_major, s.stx_dev_minor);
    Ok(dev(&st) != dev(&parent) || st.stx_ino == parent.stx_ino)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| LoopFsError::Io {
        what: format!("use the path {} (not UTF-8)", p.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(super::super::inuse::unescape(r"/a\040b"), "/a b");
        assert_eq!(super::super::inuse::unescape(r"/x\134y"), r"/x\y");
        assert_eq!(super::super::inuse::unescape("/plain"), "/plain");
        assert_eq!(super::super::inuse::unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn a_plain_file_is_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.img");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(in_use(&f, &dir.path().join("m")).unwrap(), None);
        assert!(is_mountpoint(Path::new("/")).unwrap());
        assert!(!is_mountpoint(dir.path()).unwrap());
        assert!(!is_mountpoint(&dir.path().join("missing")).unwrap());
        // /proc is a mount; a symlink to it is not one, and `..` on the way changes nothing.
        assert!(is_mountpoint(Path::new("/proc")).unwrap());
        assert!(is_mountpoint(Path::new("/proc/../proc")).unwrap());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/proc", &link).unwrap();
        assert!(!is_mountpoint(&link).unwrap());
    }

    #[test]
    fn a_planted_mountpoint_link_or_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let mounts = dir.path().join("mounts");
        let m = mounts.join("vol");
        make_mountpoint(&m).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&m).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        make_mountpoint(&m).unwrap();
        std::fs::remove_dir(&m).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &m).unwrap();
        let e = make_mountpoint(&m).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && e.contains("vol"), "{e}");
        // mount itself refuses before running the tool.
        let e = mount(&dir.path().join("no.img"), &m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_file(&m).unwrap();
        std::fs::write(&m, b"x").unwrap();
        assert!(make_mountpoint(&m).is_err());
        std::fs::remove_file(&m).unwrap();
        // The parent, a link: refused too.
        std::fs::remove_dir(&mounts).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &mounts).unwrap();
        let e = make_mountpoint(&m).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    }

    #[test]
    fn only_ext4_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.img");
        let e = mkfs(&f, "xfs").unwrap_err();
        assert!(e.to_string().contains("xfs"), "{e}");
    }
}
