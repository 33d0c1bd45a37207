//! Real files: raw images, block devices and sparse thin disks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use pdguard_core::keyslot::{MAX_SLOT_BYTES, SLOT_SUFFIX};
use rand::RngCore;

use super::{check_seal_id, DataMap, Disk, ImageLock, LockMode, Result, Storage, StoreError};

/// `O_NOFOLLOW` for [`OpenOptionsExt::custom_flags`]: a symbolic link as the last component
/// fails with `ELOOP` instead of being followed.
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Open an existing file for pdguard's own use: never through a symbolic link, and only a
/// regular file. `None` when there is none.
fn open_own(path: &Path, write: bool, what: &str) -> Result<Option<File>> {
    let file = match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nofollow())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(StoreError::io(
                "open",
                what,
                io::Error::other("it is a symbolic link, which pdguard never follows; remove it"),
            ))
        }
        Err(e) => return Err(StoreError::io("open", what, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io("stat", what, e))?;
    if !meta.file_type().is_file() {
        return Err(StoreError::io(
            "open",
            what,
            io::Error::other("it is not a regular file; remove it"),
        ));
    }
    Ok(Some(file))
}

/// Create `path` exclusively (`O_EXCL`: never an existing file, never through a link).
fn create_own(path: &Path, what: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(nofollow())
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io("create", what, e))
}

/// Unlink `path` if it exists (a symbolic link is removed, not followed), then fsync its
/// directory.
fn remove_own(path: &Path, what: &str) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(&parent_of(path))
            .map_err(|e| StoreError::io("fsync the directory of", what, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("delete", what, e)),
    }
}

/// Suffix of a thin disk's file name.
pub const THIN_SUFFIX: &str = ".pdguard-thin";

/// A file or block device; refuses all I/O after its first failed write or fsync (a failed
/// fsync may have dropped dirty pages, so nothing written before it can be trusted).
pub struct FileDisk {
    file: File,
    what: String,
    len: u64,
    poisoned: AtomicBool,
}

impl FileDisk {
    pub fn new(file: File, what: String) -> Result<Self> {
        // Seeking to the end measures block devices too, whose metadata length is 0.
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| StoreError::io("measure", &what, e))?;
        Ok(Self {
            file,
            what,
            len,
            poisoned: AtomicBool::new(false),
        })
    }

    fn check(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned {
                what: self.what.clone(),
            });
        }
        Ok(())
    }

    fn poison<T>(&self, r: io::Result<T>, op: &'static str, offset: Option<u64>) -> Result<T> {
        r.map_err(|e| {
            self.poisoned.store(true, Ordering::Release);
            let what = match offset {
                Some(o) => format!("{} at byte {o}", self.what),
                None => self.what.clone(),
            };
            StoreError::io(op, what, e)
        })
    }
}

impl FileDisk {
    fn map_error(&self, e: rustix::io::Errno) -> StoreError {
        StoreError::io("find the holes of", &self.what, e.into())
    }
}

impl Disk for FileDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check()?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| StoreError::io("read", format!("{} at byte {offset}", self.what), e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check()?;
        self.poison(self.file.write_all_at(buf, offset), "write", Some(offset))
    }

    fn sync(&self) -> Result<()> {
        self.check()?;
        self.poison(self.file.sync_all(), "fsync", None)
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`; where the file system or device cannot punch
    /// (`EOPNOTSUPP`, ...), zeros are written instead: the same bytes, allocated.
    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        use rustix::io::Errno;
        self.check()?;
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e @ (Errno::IO | Errno::NOSPC)) => {
                self.poison(Err(e.into()), "deallocate", Some(offset))
            }
            Err(_) => {
                let zeros = vec![0u8; (len.min(1 << 20)) as usize];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
        }
    }

    /// `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)` from the start to the end. A file system or
    /// device that does not support them (`EINVAL`, `EOPNOTSUPP`, ...) is all data, which is
    /// always safe; only an I/O error is an error.
    fn data_map(&self) -> Result<DataMap> {
        use rustix::fs::{seek, SeekFrom};
        use rustix::io::Errno;
        self.check()?;
        let mut ranges = Vec::new();
        let mut off = 0;
        while off < self.len {
            let start = match seek(&self.file, SeekFrom::Data(off)) {
                Ok(p) => p,
                Err(Errno::NXIO) => break,
                Err(Errno::IO) => return Err(self.map_error(Errno::IO)),
                Err(_) => return Ok(DataMap::full(self.len)),
            };
            let end = match seek(&self.file, SeekFrom::Hole(start)) {
                Ok(p) => p.max(start + 1),
                Err(Errno::IO) => return Err(self.map_error(Errno::IO)),
                Err(_) => return Ok(DataMap::full(self.len)),
            };
            ranges.push(start..end);
            off = end;
        }
        Ok(DataMap::from_ranges(self.len, ranges))
    }

    /// `posix_fadvise(DONTNEED)`: Linux starts writeback of the dirty pages of the range
    /// (without waiting) and drops its clean ones. A hint: errors are ignored.
    fn release(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ =
                rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

/// fsync a directory so that a create, rename or unlink inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// True when `path` is a block device.
pub fn is_block_device(path: &Path) -> io::Result<bool> {
    Ok(fs::metadata(path)?.file_type().is_block_device())
}

/// The record path used when none is given: `PATH.pdguard`.
pub fn default_record_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(pdguard_core::record::RECORD_SUFFIX);
    PathBuf::from(s)
}

/// Told before [`ImageStorage`] writes or removes the seal record, so that its caller
/// (the daemon's registry) always knows whether a record should exist. An error stops the
/// write or the removal.
pub trait RecordWatch: Send + Sync {
    fn before_write(&self) -> io::Result<()>;
    fn before_remove(&self) -> io::Result<()>;
}

/// One image on the host: its path, its record's path and the directory for thin disks.
#[derive(Clone)]
pub struct ImageStorage {
    image: PathBuf,
    record: PathBuf,
    thin_dir: PathBuf,
    watch: Option<std::sync::Arc<dyn RecordWatch>>,
}

impl std::fmt::Debug for ImageStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStorage")
            .field("image", &self.image)
            .field("record", &self.record)
            .field("thin_dir", &self.thin_dir)
            .field("watched", &self.watch.is_some())
            .finish()
    }
}

impl ImageStorage {
    /// `thin_dir` defaults to the record's directory (beside the image for a file).
    pub fn new(image: PathBuf, record: PathBuf, thin_dir: Option<PathBuf>) -> Self {
        let thin_dir = thin_dir.unwrap_or_else(|| parent_of(&record));
        Self {
            image,
            record,
            thin_dir,
            watch: None,
        }
    }

    /// Tell `watch` before every write or removal of the record.
    pub fn with_record_watch(mut self, watch: std::sync::Arc<dyn RecordWatch>) -> Self {
        self.watch = Some(watch);
        self
    }

    fn tell(&self, removing: bool) -> Result<()> {
        let Some(w) = &self.watch else {
            return Ok(());
        };
        let r = if removing {
            w.before_remove()
        } else {
            w.before_write()
        };
        r.map_err(|e| {
            StoreError::io(
                "note in the registry a change of",
                format!("seal record {}", self.record.display()),
                e,
            )
        })
    }

    pub fn image_path(&self) -> &Path {
        &self.image
    }

    pub fn record_path(&self) -> &Path {
        &self.record
    }

    /// The key slot beside the record: `PATH.pdguard.key`.
    pub fn key_slot_path(&self) -> PathBuf {
        let mut s = self.record.as_os_str().to_owned();
        s.push(SLOT_SUFFIX);
        PathBuf::from(s)
    }

    /// `THIN_DIR/<image file name>.<first 8 digits of the seal id>.pdguard-thin` (the name
    /// versions 1 and 2 used, so their interrupted jobs still resume).
    fn thin_path(&self, seal_id: &str) -> Result<PathBuf> {
        check_seal_id(seal_id)?;
        let name = self
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        Ok(self
            .thin_dir
            .join(format!("{name}.{}{THIN_SUFFIX}", &seal_id[..8])))
    }

    fn tmp_record(&self) -> PathBuf {
        let mut s = self.record.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    }

    fn open_disk(path: &Path, what: String, write: bool) -> Result<FileDisk> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| StoreError::io("open", &what, e))?;
        FileDisk::new(file, what)
    }
}

impl Storage for ImageStorage {
    fn image_name(&self) -> String {
        self.image.display().to_string()
    }

    fn lock_image(&self, mode: LockMode) -> Result<ImageLock> {
        super::lock::flock_path(&self.image, &self.image_name(), mode)
    }

    fn loop_devices(&self) -> Result<Vec<String>> {
        let loops = super::inuse::attached_loop_devices(&self.image).map_err(|e| {
            StoreError::io(
                "find the loop devices of",
                format!("image {}", self.image_name()),
                e,
            )
        })?;
        Ok(loops.iter().map(|p| p.display().to_string()).collect())
    }

    fn record_name(&self) -> String {
        self.record.display().to_string()
    }

    fn open_image(&self, write: bool) -> Result<Box<dyn Disk>> {
        let what = format!("image {}", self.image.display());
        Ok(Box::new(Self::open_disk(&self.image, what, write)?))
    }

    fn thin_name(&self, seal_id: &str) -> Result<String> {
        Ok(self.thin_path(seal_id)?.display().to_string())
    }

    fn free_bytes(&self, seal_id: &str) -> Result<u64> {
        let dir = parent_of(&self.thin_path(seal_id)?);
        let st = rustix::fs::statvfs(&dir).map_err(|e| {
            StoreError::io("measure free space of", dir.display().to_string(), e.into())
        })?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn create_thin(&self, seal_id: &str, bytes: u64) -> Result<Box<dyn Disk>> {
        let path = self.thin_path(seal_id)?;
        let what = format!("thin disk {}", path.display());
        remove_own(&path, &what)?;
        let file = create_own(&path, &what)?;
        // set_len on an empty file allocates nothing: the thin disk is sparse.
        file.set_len(bytes)
            .map_err(|e| StoreError::io("size", &what, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", &what, e))?;
        sync_dir(&parent_of(&path))
            .map_err(|e| StoreError::io("fsync the directory of", &what, e))?;
        Ok(Box::new(FileDisk::new(file, what)?))
    }

    fn open_thin(&self, seal_id: &str) -> Result<Option<Box<dyn Disk>>> {
        let path = self.thin_path(seal_id)?;
        let what = format!("thin disk {}", path.display());
        match open_own(&path, true, &what)? {
            Some(f) => Ok(Some(Box::new(FileDisk::new(f, what)?))),
            None => Ok(None),
        }
    }

    fn remove_thin(&self, seal_id: &str) -> Result<()> {
        let path = self.thin_path(seal_id)?;
        remove_own(&path, &format!("thin disk {}", path.display()))
    }

    fn key_slot_name(&self) -> String {
        self.key_slot_path().display().to_string()
    }

    fn create_key_slot(&self, bytes: &[u8]) -> Result<()> {
        self.destroy_key_slot()?;
        let path = self.key_slot_path();
        let what = format!("key slot {}", path.display());
        let mut f = create_own(&path, &what)?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("write", &what, e))?;
        sync_dir(&parent_of(&path)).map_err(|e| StoreError::io("fsync the directory of", &what, e))
    }

    fn read_key_slot(&self) -> Result<Option<Vec<u8>>> {
        use std::io::Read;
        let path = self.key_slot_path();
        let what = format!("key slot {}", path.display());
        let Some(f) = open_own(&path, false, &what)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        f.take(MAX_SLOT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| StoreError::io("read", &what, e))?;
        Ok(Some(bytes))
    }

    fn destroy_key_slot(&self) -> Result<()> {
        let path = self.key_slot_path();
        let what = format!("key slot {}", path.display());
        let Some(f) = open_own(&path, true, &what)? else {
            return remove_own(&path, &what);
        };
        let meta = f.metadata().map_err(|e| StoreError::io("stat", &what, e))?;
        if meta.nlink() != 1 {
            return Err(StoreError::io(
                "overwrite",
                &what,
                io::Error::other(format!(
                    "it has {} names (hard links), so it is not pdguard's own; remove it by hand",
                    meta.nlink()
                )),
            ));
        }
        // Overwritten in place: the blocks that held the wrapped key now hold noise.
        let mut noise = vec![0u8; meta.len() as usize];
        rand::thread_rng().fill_bytes(&mut noise);
        f.write_all_at(&noise, 0)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("overwrite", &what, e))?;
        drop(f);
        remove_own(&path, &what)
    }

    fn link_record_as_key_slot(&self) -> Result<()> {
        let path = self.key_slot_path();
        let what = format!("key slot {}", path.display());
        remove_own(&path, &what)?;
        fs::hard_link(&self.record, &path).map_err(|e| StoreError::io("link", &what, e))?;
        sync_dir(&parent_of(&path)).map_err(|e| StoreError::io("fsync the directory of", &what, e))
    }

    fn read_record(&self) -> Result<Option<Vec<u8>>> {
        // One byte over the limit is enough for the decoder to refuse it (`--record
        // /dev/zero` must not fill memory).
        let limit = pdguard_core::record::MAX_RECORD_BYTES as u64 + 1;
        let read = || -> io::Result<Vec<u8>> {
            let mut b = Vec::new();
            File::open(&self.record)?.take(limit).read_to_end(&mut b)?;
            Ok(b)
        };
        match read() {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(
                "read",
                format!("seal record {}", self.record.display()),
                e,
            )),
        }
    }

    fn write_record(&self, bytes: &[u8]) -> Result<()> {
        self.tell(false)?;
        let tmp = self.tmp_record();
        let what = format!("seal record {}", self.record.display());
        let write = || -> io::Result<()> {
            // A stale temporary file (or a link planted in its place) is removed, never
            // written through: the new one is created exclusively.
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(nofollow())
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.record)?;
            sync_dir(&parent_of(&self.record))
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StoreError::io("write", what, e)
        })
    }

    fn remove_record(&self) -> Result<()> {
        if !self.record.exists() {
            return Ok(());
        }
        self.tell(true)?;
        match fs::remove_file(&self.record) {
            Ok(()) => sync_dir(&parent_of(&self.record)).map_err(|e| {
                StoreError::io(
                    "fsync the directory of",
                    self.record.display().to_string(),
                    e,
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(
                "delete",
                format!("seal record {}", self.record.display()),
                e,
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn setup() -> (tempfile::TempDir, ImageStorage, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        fs::write(&image, vec![1u8; 4096]).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let st = ImageStorage::new(image.clone(), default_record_path(&image), None);
        (dir, st, victim)
    }

    #[test]
    fn the_thin_disk_path_is_derived_and_checked() {
        let (dir, st, _) = setup();
        assert_eq!(
            st.thin_name(ID).unwrap(),
            dir.path()
                .join("v.img.01234567.pdguard-thin")
                .display()
                .to_string()
        );
        for bad in ["", "../../etc/passwd", "0123456789ABCDEF0123456789ABCDEF"] {
            assert!(st.thin_name(bad).is_err(), "{bad}");
            assert!(st.create_thin(bad, 512).is_err(), "{bad}");
            assert!(st.remove_thin(bad).is_err(), "{bad}");
        }
    }

    /// A symbolic link planted at the derived thin-disk path, key-slot path or temporary
    /// record path is never followed: the file it points to keeps its bytes.
    #[test]
    fn planted_symlinks_are_never_followed() {
        use std::os::unix::fs::symlink;
        let (_dir, st, victim) = setup();
        let thin = PathBuf::from(st.thin_name(ID).unwrap());
        symlink(&victim, &thin).unwrap();
        assert!(
            st.open_thin(ID).is_err(),
            "opened a thin disk through a link"
        );
        let t = st.create_thin(ID, 8192).unwrap();
        t.write_at(&[9; 512], 0).unwrap();
        assert!(!fs::symlink_metadata(&thin)
            .unwrap()
            .file_type()
            .is_symlink());
        st.remove_thin(ID).unwrap();
        symlink(&victim, &thin).unwrap();
        st.remove_thin(ID).unwrap();
        assert!(!thin.exists());

        symlink(&victim, st.key_slot_path()).unwrap();
        assert!(st.read_key_slot().is_err());
        assert!(st.destroy_key_slot().is_err());
        fs::remove_file(st.key_slot_path()).unwrap();

        symlink(&victim, st.tmp_record()).unwrap();
        st.write_record(b"record").unwrap();
        assert_eq!(fs::read(st.record_path()).unwrap(), b"record");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn the_key_slot_is_written_once_and_destroyed_in_place() {
        use std::os::unix::fs::MetadataExt;
        let (_dir, st, victim) = setup();
        st.create_key_slot(&[0x5a; 4096]).unwrap();
        let ino = fs::metadata(st.key_slot_path()).unwrap().ino();
        assert_eq!(st.read_key_slot().unwrap().unwrap(), vec![0x5a; 4096]);
        // Keep a second handle to the inode to see what the destroy left in its blocks.
        let keep = File::open(st.key_slot_path()).unwrap();
        // A hard link makes it not ours alone: refused while it has two names.
        let link = st.key_slot_path().with_extension("other");
        fs::hard_link(st.key_slot_path(), &link).unwrap();
        assert!(st.destroy_key_slot().is_err());
        fs::remove_file(&link).unwrap();
        st.destroy_key_slot().unwrap();
        assert!(st.read_key_slot().unwrap().is_none());
        let mut left = vec![0u8; 4096];
        keep.read_exact_at(&mut left, 0).unwrap();
        assert_eq!(keep.metadata().unwrap().ino(), ino);
        assert!(
            left.windows(16).all(|w| w != [0x5a; 16]),
            "the slot's bytes were not overwritten in place"
        );
        st.destroy_key_slot().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    /// A version 2 record's file becomes the key slot: the next record write renames a new
    /// file over the record's name, and the old file, still holding its bytes under the
    /// slot's name, is then overwritten in place.
    #[test]
    fn a_legacy_record_file_is_kept_as_the_key_slot_until_destroyed() {
        use std::os::unix::fs::MetadataExt;
        let (_dir, st, _) = setup();
        st.write_record(&[0x77; 3000]).unwrap();
        let ino = fs::metadata(st.record_path()).unwrap().ino();
        st.link_record_as_key_slot().unwrap();
        st.write_record(b"shredding").unwrap();
        let slot = fs::metadata(st.key_slot_path()).unwrap();
        assert_eq!((slot.ino(), slot.nlink()), (ino, 1));
        assert_eq!(st.read_key_slot().unwrap().unwrap(), vec![0x77; 3000]);
        let keep = File::open(st.key_slot_path()).unwrap();
        st.destroy_key_slot().unwrap();
        let mut left = vec![0u8; 3000];
        keep.read_exact_at(&mut left, 0).unwrap();
        assert!(left.windows(16).all(|w| w != [0x77; 16]));
        assert_eq!(st.read_record().unwrap().unwrap(), b"shredding");
    }
}
