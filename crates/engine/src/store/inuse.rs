//! Is a disk file in use by the kernel? A file attached to a loop device can be written
//! through the device at any moment, and a file system mounted from it is live: sealing it
//! would rewrite bytes under a mounted file system. Files are compared by device and inode,
//! never by path text (a symlink or `/x/../x/v.img` names the same file).
//!
//! Used by the seal job (it refuses an attached image, whoever calls it), by the daemon
//! when it adopts a path, and by front-ends that mount volumes.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The loop devices (`/dev/loopN`) whose backing file is `path`, found through
/// `/sys/block/loop*/loop/backing_file` and compared by the device and inode of a `stat`
/// of that backing path. A backing file that was deleted or renamed since it was attached
/// cannot be `stat`ed by its old name and is not reported.
pub fn attached_loop_devices(path: &Path) -> io::Result<Vec<PathBuf>> {
    let want = id_of(&fs::metadata(path)?);
    let mut found = Vec::new();
    let sys = match fs::read_dir("/sys/block") {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in sys {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = match fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) {
            Ok(b) => b,
            // Not attached (no `loop/` directory) or detached meanwhile.
            Err(_) => continue,
        };
        let backing = backing.trim_end_matches('\n');
        if let Ok(m) = fs::metadata(backing) {
            if id_of(&m) == want {
                found.push(PathBuf::from(format!("/dev/{name}")));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Mount points of file systems mounted from `path`: from the block device itself, or
/// from a loop device it is attached to (`/proc/self/mountinfo`, matched by device
/// number). Partitions of a loop device (`loop0p1`) are not followed.
pub fn mounts_of(path: &Path) -> io::Result<Vec<PathBuf>> {
    let meta = fs::metadata(path)?;
    let mut devs = Vec::new();
    if meta.file_type().is_block_device() {
        devs.push(meta.rdev());
    }
    for dev in attached_loop_devices(path)? {
        if let Ok(m) = fs::metadata(&dev) {
            devs.push(m.rdev());
        }
    }
    if devs.is_empty() {
        return Ok(Vec::new());
    }
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounts_of_devices(&info, &devs))
}

/// Mount points in the text of a `mountinfo` whose device (field 3, decimal
/// `major:minor`) is one of `devs`.
pub fn mounts_of_devices(mountinfo: &str, devs: &[u64]) -> Vec<PathBuf> {
    let want: Vec<(u32, u32)> = devs
        .iter()
        .map(|&d| (rustix::fs::major(d), rustix::fs::minor(d)))
        .collect();
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let dev = f.nth(2)?;
            let point = f.nth(1)?;
            let (maj, min) = dev.split_once(':')?;
            let id = (maj.parse().ok()?, min.parse().ok()?);
            want.contains(&id).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of mountinfo: mountpoint (unescaped), device, file system type.
pub(crate) fn parse_mountinfo(line: &str) -> Option<(String, String, String)> {
    let (left, right) = line.split_once(" - ")?;
    let mut f = left.split(' ');
    let dev = f.nth(2)?;
    let point = f.nth(1)?;
    let fstype = right.split(' ').next()?;
    Some((unescape(point), dev.into(), fstype.into()))
}

/// One line saying how `path` is in use by the kernel, or `None` when it is not.
pub fn describe_use(path: &Path) -> io::Result<Option<String>> {
    let mounts = mounts_of(path)?;
    if !mounts.is_empty() {
        return Ok(Some(format!("mounted at {}", join(&mounts))));
    }
    let loops = attached_loop_devices(path)?;
    if !loops.is_empty() {
        return Ok(Some(format!("attached to loop device {}", join(&loops))));
    }
    Ok(None)
}

fn join(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn id_of(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_match_by_device_number() {
        let info = "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
                    40 22 7:3 / /mnt/a\\040b rw - ext4 /dev/loop3 rw\n\
                    41 22 7:30 / /mnt/c rw - ext4 /dev/loop30 rw\n\
                    bad line\n";
        let dev = rustix::fs::makedev(7, 3);
        assert_eq!(
            mounts_of_devices(info, &[dev]),
            vec![PathBuf::from("/mnt/a b")]
        );
        assert!(mounts_of_devices(info, &[rustix::fs::makedev(8, 1)]).is_empty());
    }

    #[test]
    fn a_plain_file_is_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        assert!(attached_loop_devices(&p).unwrap().is_empty());
        assert_eq!(describe_use(&p).unwrap(), None);
        assert!(attached_loop_devices(&dir.path().join("missing")).is_err());
    }
}
