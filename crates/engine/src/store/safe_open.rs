//! The one way pdguard opens a file it did not just create: never through a symbolic link,
//! never waiting, and only a regular file (or, for an image, a block device), checked on
//! the open descriptor before a byte is read (DESIGN.md §6: everything read from disk is
//! untrusted input).
//!
//! - `O_NOFOLLOW`: a symbolic link as the last component is refused, not followed. With
//!   [`Parents::NoSymlinks`] (the daemon, whose paths are canonical) every directory on
//!   the path is opened one at a time with `O_NOFOLLOW | O_DIRECTORY` as well, so a link
//!   swapped in for a directory is refused too.
//! - `O_NONBLOCK`: opening a FIFO (which waits for a writer) or a device returns at once;
//!   the flag is cleared again once the file is known to be a regular file or block device.
//! - `lstat` before the open (a FIFO, socket, directory or character device is refused
//!   without being opened: opening a device can have effects), `fstat` after it (the
//!   authoritative check: the file read is the file checked).
//!
//! [`FileIdentity`] is what a file is, whatever path names it: device, inode, size and birth time.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What kinds of file a caller takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Records, key slots, key files, token files.
    Regular,
    /// Images: a raw image file or a block device.
    RegularOrBlock,
}

/// How the directories on the path are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parents {
    /// As the kernel resolves them (the path a user gave on the command line); only the
    /// last component is never followed.
    AsGiven,
    /// No symbolic link anywhere on the path, and no `..` (the daemon's canonical paths).
    NoSymlinks,
}

/// How to open: read-only or read-write, which kinds, which parents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct How {
    pub write: bool,
    pub accept: Accept,
    pub parents: Parents,
}

impl How {
    /// Read a regular file, directories resolved as given.
    pub const READ: How = How {
        write: false,
        accept: Accept::Regular,
        parents: Parents::AsGiven,
    };

    pub fn write(self, write: bool) -> Self {
        Self { write, ..self }
    }

    pub fn accept(self, accept: Accept) -> Self {
        Self { accept, ..self }
    }

    pub fn parents(self, parents: Parents) -> Self {
        Self { parents, ..self }
    }
}

#[derive(Debug, Error)]
pub enum SafeOpenError {
    #[error("{what} {path} is a symbolic link{}, which pdguard never follows there; put the file itself at that path", link_text(.target))]
    Symlink {
        what: String,
        path: String,
        target: Option<PathBuf>,
    },
    #[error("{what} {path} lies under {dir}, which is a symbolic link or not a directory; pdguard never follows a link on this path: use the real directory's path")]
    SymlinkDir {
        what: String,
        path: String,
        dir: String,
    },
    #[error("{what} {path} is {kind}, not a regular file{}; pdguard refuses it before reading a byte (it could block or never end): remove it, or put the real file there", if *.block_ok { " or block device" } else { "" })]
    NotRegular {
        what: String,
        path: String,
        kind: &'static str,
        block_ok: bool,
    },
    #[error("{what} {path} has a `..` component or names no file; give the file's full path")]
    BadPath { what: String, path: String },
    #[error("cannot {op} {what} {path}")]
    Io {
        op: &'static str,
        what: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

fn link_text(target: &Option<PathBuf>) -> String {
    match target {
        Some(t) => format!(" (to {})", t.display()),
        None => String::new(),
    }
}

/// What a file is, whatever path names it: its device and inode, its size in bytes (a
/// block device's size is its capacity), and its birth time (`statx` `STATX_BTIME`, in
/// nanoseconds since the epoch; 0 where the file system keeps none). The birth time tells
/// a file apart from a later one that got the freed inode number of a deleted one (ext4
/// hands the same number out again at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    #[serde(default)]
    pub born_ns: u64,
}

impl FileIdentity {
    /// The identity of an open file (`statx`, or `fstat` where there is none; a block
    /// device is measured by seeking to its end).
    pub fn of(file: &File) -> io::Result<Self> {
        use rustix::fs::{StatxFlags, StatxTimestamp};
        let mask = StatxFlags::BASIC_STATS | StatxFlags::BTIME;
        let (dev, ino, mode, size, born) =
            match rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, mask) {
                Ok(x) => {
                    let born = StatxFlags::from_bits_retain(x.stx_mask)
                        .contains(StatxFlags::BTIME)
                        .then_some(x.stx_btime);
                    let dev = rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor);
                    (dev, x.stx_ino, u32::from(x.stx_mode), x.stx_size, born)
                }
                Err(Errno::NOSYS) => {
                    let st = rustix::fs::fstat(file)?;
                    (st.st_dev, st.st_ino, st.st_mode, st.st_size as u64, None)
                }
                Err(e) => return Err(e.into()),
            };
        let size = if FileType::from_raw_mode(mode) == FileType::BlockDevice {
            rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?
        } else {
            size
        };
        let born_ns = born.map_or(0, |t: StatxTimestamp| {
            (t.tv_sec.max(0) as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::from(t.tv_nsec))
        });
        Ok(Self {
            dev,
            ino,
            size,
            born_ns,
        })
    }

    /// The identity `stat` gives for a path (following links), for messages about what a
    /// link leads to.
    pub fn of_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let born_ns = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            born_ns,
        }
    }
}

impl std::fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {}:{} inode {} ({} bytes",
            rustix::fs::major(self.dev),
            rustix::fs::minor(self.dev),
            self.ino,
            self.size
        )?;
        if self.born_ns != 0 {
            let (s, ns) = (self.born_ns / 1_000_000_000, self.born_ns % 1_000_000_000);
            write!(f, ", made at unix time {s}.{ns:09}")?;
        }
        f.write_str(")")
    }
}

/// Open `path` (`what` names it in messages: "seal record", "key slot", ...). `None` when
/// nothing is there. Refused, before a byte is read: a symbolic link (as the last
/// component; with [`Parents::NoSymlinks`] anywhere), and anything that is not a regular
/// file (or block device, if accepted).
pub fn open(path: &Path, what: &str, how: How) -> Result<Option<File>, SafeOpenError> {
    let shown = || path.display().to_string();
    let ctx = Ctx { path, what, how };
    let mut flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    flags |= if how.write {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    let (dir, name) = match how.parents {
        Parents::AsGiven => (None, path.as_os_str()),
        Parents::NoSymlinks => {
            let (dir, name) = ctx.walk_parents()?;
            (Some(dir), name)
        }
    };
    // lstat first: a FIFO, socket, directory or device is never opened at all.
    let pre = match &dir {
        Some(d) => rustix::fs::statat(d, name, AtFlags::SYMLINK_NOFOLLOW),
        None => rustix::fs::lstat(path),
    };
    match pre {
        Ok(st) => ctx.check_type(FileType::from_raw_mode(st.st_mode))?,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(ctx.io("inspect", e.into())),
    }
    let opened = match &dir {
        Some(d) => rustix::fs::openat(d, name, flags, Mode::empty()),
        None => rustix::fs::open(path, flags, Mode::empty()),
    };
    let fd: OwnedFd = match opened {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        // Replaced by a link between the lstat and the open.
        Err(Errno::LOOP) => return Err(ctx.symlink()),
        // A FIFO without a reader opened for writing, or a socket.
        Err(Errno::NXIO) => {
            return Err(SafeOpenError::NotRegular {
                what: what.into(),
                path: shown(),
                kind: "a FIFO or socket",
                block_ok: how.accept == Accept::RegularOrBlock,
            })
        }
        Err(e) => return Err(ctx.io("open", e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| ctx.io("stat", e.into()))?;
    ctx.check_type(FileType::from_raw_mode(st.st_mode))?;
    // Known to be a regular file or block device now: back to ordinary blocking I/O.
    let fl = rustix::fs::fcntl_getfl(&fd).map_err(|e| ctx.io("open", e.into()))?;
    rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK).map_err(|e| ctx.io("open", e.into()))?;
    Ok(Some(File::from(fd)))
}

/// [`open`] and read at most `limit` bytes. `None` when there is no file.
pub fn read(
    path: &Path,
    what: &str,
    limit: u64,
    parents: Parents,
) -> Result<Option<Vec<u8>>, SafeOpenError> {
    let Some(f) = open(path, what, How::READ.parents(parents))? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    f.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|source| SafeOpenError::Io {
            op: "read",
            what: what.into(),
            path: path.display().to_string(),
            source,
        })?;
    Ok(Some(bytes))
}

struct Ctx<'a> {
    path: &'a Path,
    what: &'a str,
    how: How,
}

impl<'a> Ctx<'a> {
    fn io(&self, op: &'static str, source: io::Error) -> SafeOpenError {
        SafeOpenError::Io {
            op,
            what: self.what.into(),
            path: self.path.display().to_string(),
            source,
        }
    }

    fn symlink(&self) -> SafeOpenError {
        SafeOpenError::Symlink {
            what: self.what.into(),
            path: self.path.display().to_string(),
            target: std::fs::read_link(self.path).ok(),
        }
    }

    fn check_type(&self, t: FileType) -> Result<(), SafeOpenError> {
        let block_ok = self.how.accept == Accept::RegularOrBlock;
        let kind = match t {
            FileType::RegularFile => return Ok(()),
            FileType::BlockDevice if block_ok => return Ok(()),
            FileType::Symlink => return Err(self.symlink()),
            FileType::BlockDevice => "a block device",
            FileType::Fifo => "a FIFO (named pipe)",
            FileType::Socket => "a socket",
            FileType::CharacterDevice => "a character device",
            FileType::Directory => "a directory",
            FileType::Unknown => "of an unknown type",
        };
        Err(SafeOpenError::NotRegular {
            what: self.what.into(),
            path: self.path.display().to_string(),
            kind,
            block_ok,
        })
    }

    /// Open every directory of the path in turn, never through a link; the last one's
    /// descriptor and the file's name in it.
    fn walk_parents(&self) -> Result<(OwnedFd, &'a OsStr), SafeOpenError> {
        let bad = || SafeOpenError::BadPath {
            what: self.what.into(),
            path: self.path.display().to_string(),
        };
        let mut names = Vec::new();
        for c in self.path.components() {
            match c {
                Component::Normal(n) => names.push(n),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => return Err(bad()),
            }
        }
        let name = names.pop().ok_or_else(bad)?;
        let start = if self.path.is_absolute() { "/" } else { "." };
        let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut dir = rustix::fs::openat(CWD, start, dir_flags, Mode::empty())
            .map_err(|e| self.io("open the directories of", e.into()))?;
        let mut so_far = PathBuf::from(start);
        for n in names {
            so_far.push(n);
            dir = match rustix::fs::openat(&dir, n, dir_flags, Mode::empty()) {
                Ok(d) => d,
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    return Err(SafeOpenError::SymlinkDir {
                        what: self.what.into(),
                        path: self.path.display().to_string(),
                        dir: so_far.display().to_string(),
                    })
                }
                Err(e) => return Err(self.io("open the directories of", e.into())),
            };
        }
        Ok((dir, name))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, Instant};

    fn mkfifo(p: &Path) {
        rustix::fs::mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_writing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        mkfifo(&p);
        for parents in [Parents::AsGiven, Parents::NoSymlinks] {
            for write in [false, true] {
                let t = Instant::now();
                let how = How::READ.write(write).parents(parents);
                let e = open(&p, "seal record", how).unwrap_err();
                assert!(t.elapsed() < Duration::from_secs(1));
                let text = e.to_string();
                assert!(
                    text.contains("seal record") && text.contains("FIFO"),
                    "{text}"
                );
                assert!(text.contains(&p.display().to_string()), "{text}");
            }
        }
        let e = read(&p, "key slot", 10, Parents::AsGiven).unwrap_err();
        assert!(matches!(e, SafeOpenError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn devices_directories_and_links_are_refused_regular_files_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(
            read(&f, "x", 100, Parents::NoSymlinks).unwrap().unwrap(),
            b"hello"
        );
        assert_eq!(read(&f, "x", 2, Parents::AsGiven).unwrap().unwrap(), b"he");
        assert!(read(&dir.path().join("none"), "x", 9, Parents::AsGiven)
            .unwrap()
            .is_none());
        let e = open(Path::new("/dev/zero"), "seal record", How::READ).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = open(dir.path(), "seal record", How::READ).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let link = dir.path().join("link");
        symlink(&f, &link).unwrap();
        for parents in [Parents::AsGiven, Parents::NoSymlinks] {
            let e = open(&link, "key file", How::READ.parents(parents)).unwrap_err();
            assert!(
                matches!(&e, SafeOpenError::Symlink { target: Some(t), .. } if t == &f),
                "{e}"
            );
        }
        // An opened file is back to blocking I/O.
        let file = open(&f, "x", How::READ).unwrap().unwrap();
        let fl = rustix::fs::fcntl_getfl(&file).unwrap();
        assert!(!fl.contains(OFlags::NONBLOCK));
    }

    #[test]
    fn a_linked_directory_is_refused_only_when_no_symlinks_are_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("f"), b"x").unwrap();
        let via = dir.path().join("via");
        symlink(&real, &via).unwrap();
        let p = via.join("f");
        assert!(open(&p, "x", How::READ).unwrap().is_some());
        let e = open(&p, "image", How::READ.parents(Parents::NoSymlinks)).unwrap_err();
        assert!(
            matches!(&e, SafeOpenError::SymlinkDir { dir, .. } if dir == &via.display().to_string()),
            "{e}"
        );
        let dotdot = real.join("..").join("real").join("f");
        let e = open(&dotdot, "image", How::READ.parents(Parents::NoSymlinks)).unwrap_err();
        assert!(matches!(e, SafeOpenError::BadPath { .. }), "{e}");
    }

    #[test]
    fn identity_names_device_inode_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let file = open(&f, "x", How::READ).unwrap().unwrap();
        let id = FileIdentity::of(&file).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((id.dev, id.ino, id.size), (m.dev(), m.ino(), 4096));
        assert_eq!(id, FileIdentity::of_metadata(&m));
        let text = id.to_string();
        assert!(text.contains(&format!("inode {}", m.ino())) && text.contains("4096 bytes"));
        // A new file that gets the freed inode number of a deleted one is another file.
        drop(file);
        std::fs::remove_file(&f).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let again = FileIdentity::of(&open(&f, "x", How::READ).unwrap().unwrap()).unwrap();
        if again.ino == id.ino && id.born_ns != 0 {
            assert_ne!(again, id, "a reused inode number passed for the same file");
        }
    }
}
