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

/// A loop device as the kernel describes it (`LOOP_GET_STATUS64`, through `losetup`): its
/// node, its own device number and the device number of its backing file's file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDev {
    pub node: PathBuf,
    pub dev: (u32, u32),
    pub backing_dev: (u32, u32),
}

/// What a daemon that died left of a volume it had mounted over its FUSE file (instant
/// reclaim): the file systems at the mountpoint mounted from a loop device whose backing file
/// is on a FUSE mount at the volume's FUSE directory, those loop devices, and the FUSE mounts
/// themselves. Decided from the kernel's tables only ([`leftover_of`]), for paths the caller
/// derives from the state directory and the volume's name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// How many mounts on top at the mountpoint are from those loop devices.
    pub mounted: usize,
    /// The loop devices backed by a file on those FUSE mounts.
    pub loops: Vec<LoopDev>,
    /// How many FUSE mounts on top at the FUSE directory.
    pub fuse: usize,
}

impl Leftover {
    pub fn is_empty(&self) -> bool {
        self.mounted == 0 && self.loops.is_empty() && self.fuse == 0
    }
}

/// The mounts at `dir` in `mountinfo` (paths unescaped, compared whole), bottom first: each
/// one's device and file system type.
fn mounts_at(mountinfo: &str, dir: &Path) -> Vec<((u32, u32), String)> {
    let want = dir.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(super::inuse::parse_mountinfo)
        .filter(|(point, ..)| *point == want)
        .filter_map(|(_, dev, fstype)| Some((parse_dev(&dev)?, fstype)))
        .collect()
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn is_fuse(fstype: &str) -> bool {
    fstype == "fuse" || fstype.starts_with("fuse.")
}

/// Which of the kernel's mounts and loop devices are a dead instant mount's, for a volume
/// whose FUSE file no server of this process serves (the caller knows: it holds the
/// volume's FUSE slot, empty, or the daemon is starting). Every FUSE mount on top at
/// `fuse_dir` is then a previous life's; a loop device is the volume's when its backing
/// file's device is one of those FUSE mounts'; a mount at `mount_dir` is the volume's when
/// its device is one of those loop devices'. Anything else (another file system on top at
/// the mountpoint, a loop device on another file) is not pdguard's and is left alone.
pub fn leftover_of(
    mountinfo: &str,
    loops: &[LoopDev],
    fuse_dir: &Path,
    mount_dir: &Path,
) -> Leftover {
    let fuse_mounts = mounts_at(mountinfo, fuse_dir);
    let fuse: Vec<(u32, u32)> = fuse_mounts
        .iter()
        .rev()
        .take_while(|(_, t)| is_fuse(t))
        .map(|(d, _)| *d)
        .collect();
    let ours: Vec<LoopDev> = loops
        .iter()
        .filter(|l| fuse.contains(&l.backing_dev))
        .cloned()
        .collect();
    let mounted = mounts_at(mountinfo, mount_dir)
        .iter()
        .rev()
        .take_while(|(d, _)| ours.iter().any(|l| l.dev == *d))
        .count();
    Leftover {
        mounted,
        loops: ours,
        fuse: fuse.len(),
    }
}

/// The loop devices the kernel has set up, from `losetup --list --json` (which asks the
/// kernel, `LOOP_GET_STATUS64`, for each one's backing device).
fn loop_devices() -> Result<Vec<LoopDev>> {
    let out = run_out(
        "losetup",
        "mount",
        "--list".into(),
        &["--list", "--json", "--output", "NAME,MAJ:MIN,BACK-MAJ:MIN"],
    )?;
    parse_losetup_json(&out).ok_or_else(|| LoopFsError::Failed {
        tool: "losetup",
        what: "--list --json".into(),
        stderr: "its output is not the JSON util-linux writes".into(),
    })
}

fn parse_losetup_json(text: &str) -> Option<Vec<LoopDev>> {
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let devs = v.get("loopdevices")?.as_array()?;
    devs.iter()
        .map(|d| {
            let node = d.get("name")?.as_str()?;
            // Only the kernel's own loop device nodes.
            let n = node.strip_prefix("/dev/loop")?;
            if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            Some(LoopDev {
                node: PathBuf::from(node),
                dev: parse_dev(d.get("maj:min")?.as_str()?)?,
                backing_dev: d
                    .get("back-maj:min")
                    .and_then(|b| b.as_str())
                    .and_then(parse_dev)
                    .unwrap_or((0, 0)),
            })
        })
        .collect()
}

fn read_mountinfo() -> Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| LoopFsError::Io {
        what: "read /proc/self/mountinfo".into(),
        source,
    })
}

/// Lazily unmount what is on top at `dir` (`MNT_DETACH`, never following a link).
fn detach_mount(dir: &Path) -> Result<()> {
    use rustix::mount::UnmountFlags;
    match rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(LoopFsError::Io {
            what: format!("unmount {}", dir.display()),
            source: e.into(),
        }),
    }
}

/// Clean what a daemon that died left of a volume mounted over its FUSE file
/// ([`leftover_of`]; the caller guarantees no server of this process serves `fuse_dir`):
/// lazily unmount the file system at `mount_dir` (a container may still hold it; its I/O
/// fails), detach the loop devices backed by the dead FUSE file (the kernel defers the
/// detach of one still open until its last user closes it), and lazily unmount the dead
/// FUSE mount. Each unmount looks at the mount table again first and only ever takes a
/// mount that is still the volume's. Returns what it cleaned, in one line, or `None` when
/// nothing was left.
pub fn clean_leftover(fuse_dir: &Path, mount_dir: &Path) -> Result<Option<String>> {
    let info = read_mountinfo()?;
    // No FUSE mount at the FUSE directory: nothing of a dead instant mount to find (and no
    // `losetup` to run for every volume at every start).
    if !mounts_at(&info, fuse_dir).iter().any(|(_, t)| is_fuse(t)) {
        return Ok(None);
    }
    let plan = leftover_of(&info, &loop_devices()?, fuse_dir, mount_dir);
    if plan.is_empty() {
        return Ok(None);
    }
    let mut done = Vec::new();
    for _ in 0..plan.mounted {
        let top = mounts_at(&read_mountinfo()?, mount_dir).pop();
        match top {
            Some((d, fstype)) if plan.loops.iter().any(|l| l.dev == d) => {
                detach_mount(mount_dir)?;
                done.push(format!(
                    "unmounted the {fstype} file system at {} (lazily)",
                    mount_dir.display()
                ));
            }
            _ => break,
        }
    }
    for l in &plan.loops {
        let n = path_str(&l.node)?;
        match run("losetup", "mount", format!("-d {n}"), &["-d", n]) {
            // A loop device still open (the lazily unmounted file system is held, e.g. by
            // a container's process) is detached by the kernel once it is closed.
            Ok(()) if Path::new(&format!("/sys/block/{}/loop", loop_name(&l.node))).exists() => {
                done.push(format!(
                    "detached {n} (the kernel lets it go once the file system is no longer held)"
                ))
            }
            Ok(()) => done.push(format!("detached {n}")),
            // Gone meanwhile (its autoclear took it when the file system let go).
            Err(_) if !Path::new(&format!("/sys/block/{}/loop", loop_name(&l.node))).exists() => {
                done.push(format!("{n} was gone"))
            }
            Err(e) => return Err(e),
        }
    }
    for _ in 0..plan.fuse {
        match mounts_at(&read_mountinfo()?, fuse_dir).pop() {
            Some((_, t)) if is_fuse(&t) => {
                detach_mount(fuse_dir)?;
                done.push(format!(
                    "unmounted the dead FUSE mount at {}",
                    fuse_dir.display()
                ));
            }
            _ => break,
        }
    }
    Ok(Some(done.join(", ")))
}

fn loop_name(node: &Path) -> String {
    node.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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

    fn lo(n: u32, backing: (u32, u32)) -> LoopDev {
        LoopDev {
            node: PathBuf::from(format!("/dev/loop{n}")),
            dev: (7, n),
            backing_dev: backing,
        }
    }

    /// A daemon killed with a volume mounted over FUSE: the dead FUSE mount (0:61) at the
    /// FUSE dir, loop3 on it, ext4 from loop3 at the mountpoint. Other loop devices and
    /// mounts, on other files or at other places, are not the volume's.
    const KILLED: &str = "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
        90 22 0:61 / /st/fuse/v rw,nosuid - fuse.pdguard pdguard rw,user_id=0\n\
        91 22 7:3 / /st/mounts/v rw,relatime - ext4 /dev/loop3 rw\n\
        92 22 7:4 / /st/mounts/w rw,relatime - ext4 /dev/loop4 rw\n\
        93 22 0:62 / /st/fuse/w\\040x rw,nosuid - fuse.pdguard pdguard rw\n";

    #[test]
    fn a_dead_instant_mount_is_found_by_device_numbers() {
        let (fd, md) = (Path::new("/st/fuse/v"), Path::new("/st/mounts/v"));
        let loops = [lo(3, (0, 61)), lo(4, (259, 2)), lo(5, (0, 62))];
        let l = leftover_of(KILLED, &loops, fd, md);
        assert_eq!(l.mounted, 1);
        assert_eq!(l.loops, vec![lo(3, (0, 61))]);
        assert_eq!(l.fuse, 1);
        // Another volume's mountpoint is mounted from a loop on a plain file: not stale.
        let l = leftover_of(
            KILLED,
            &loops,
            Path::new("/st/fuse/w"),
            Path::new("/st/mounts/w"),
        );
        assert!(l.is_empty(), "{l:?}");
        // A mountinfo path is unescaped before it is compared.
        let l = leftover_of(
            KILLED,
            &loops,
            Path::new("/st/fuse/w x"),
            Path::new("/st/mounts/n"),
        );
        assert_eq!(
            (l.mounted, l.loops.clone(), l.fuse),
            (0, vec![lo(5, (0, 62))], 1)
        );
        // A path that only starts like the FUSE dir is not it.
        let l = leftover_of(KILLED, &loops, Path::new("/st/fuse"), md);
        assert!(l.is_empty(), "{l:?}");
    }

    #[test]
    fn a_mount_that_is_not_from_the_dead_file_is_left_alone() {
        let (fd, md) = (Path::new("/st/fuse/v"), Path::new("/st/mounts/v"));
        // Someone mounted a tmpfs over the volume's file system: nothing at the mountpoint
        // is taken (the Mount then refuses, naming it); the loop and the FUSE mount are.
        let info = format!("{KILLED}94 91 0:70 / /st/mounts/v rw - tmpfs tmpfs rw\n");
        let l = leftover_of(&info, &[lo(3, (0, 61))], fd, md);
        assert_eq!((l.mounted, l.loops.len(), l.fuse), (0, 1, 1));
        // No FUSE mount at the FUSE dir (it is a plain directory): nothing is the volume's,
        // not even a file system at the mountpoint from a loop device on another FUSE file.
        let info = "91 22 7:3 / /st/mounts/v rw - ext4 /dev/loop3 rw\n";
        assert!(leftover_of(info, &[lo(3, (0, 61))], fd, md).is_empty());
        // A non-FUSE mount on top at the FUSE dir hides the one below: not taken.
        let info = format!("{KILLED}95 90 0:71 / /st/fuse/v rw - tmpfs tmpfs rw\n");
        let l = leftover_of(&info, &[lo(3, (0, 61))], fd, md);
        assert!(l.is_empty(), "{l:?}");
        // A live volume mounted from a loop device on a plain file: nothing.
        let info = "91 22 7:3 / /st/mounts/v rw - ext4 /dev/loop3 rw\n";
        assert!(leftover_of(info, &[lo(3, (259, 2))], fd, md).is_empty());
    }

    #[test]
    fn losetup_json_is_read_and_only_loop_nodes_are_kept() {
        let out = r#"{"loopdevices": [
            {"name": "/dev/loop0", "maj:min": "  7:0  ", "back-maj:min": "     0:61  "},
            {"name": "/dev/loop12", "maj:min": "7:12", "back-maj:min": null}
        ]}"#;
        assert_eq!(
            parse_losetup_json(out).unwrap(),
            vec![lo(0, (0, 61)), lo(12, (0, 0))]
        );
        assert_eq!(parse_losetup_json("").unwrap(), vec![]);
        let evil =
            r#"{"loopdevices": [{"name": "/dev/sda", "maj:min": "8:0", "back-maj:min": "0:61"}]}"#;
        assert!(parse_losetup_json(evil).is_none());
        assert!(parse_losetup_json("{not json").is_none());
    }

    #[test]
    fn only_ext4_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.img");
        let e = mkfs(&f, "xfs").unwrap_err();
        assert!(e.to_string().contains("xfs"), "{e}");
    }
}
