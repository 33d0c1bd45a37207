//! Real files: raw images, block devices and sparse thin disks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use pdguard_core::keyslot::{MAX_SLOT_BYTES, SLOT_SUFFIX};
use pdguard_core::place_table::PLACE_SUFFIX;
use pdguard_core::region_tree::TREE_SUFFIX;
use rand::RngCore;

use super::safe_open::{self, Accept, FileIdentity, How, Parents, SafeOpenError};
use super::{
    check_seal_id, DataMap, Disk, ImageLock, LockMode, MigrationFile, Result, Storage, StoreError,
};

/// `O_NOFOLLOW` for [`OpenOptionsExt::custom_flags`]: a symbolic link as the last component
/// fails with `ELOOP` instead of being followed.
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Open an existing file for pdguard's own use ([`safe_open`]): never through a symbolic
/// link, never waiting, and only a regular file. `None` when there is none.
fn open_own(path: &Path, write: bool, what: &str, parents: Parents) -> Result<Option<File>> {
    Ok(safe_open::open(
        path,
        what,
        How::READ.write(write).parents(parents),
    )?)
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

    fn no_read_ahead(&self) {
        // POSIX_FADV_RANDOM: this descriptor reads nothing ahead (a hint: a refusal changes
        // nothing but the speed).
        let _ = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::Random);
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
///
/// The image is checked at every open, not once (DESIGN.md §6): the first open pins the
/// file's [`FileIdentity`] (device, inode, size, birth time), or the daemon gives the identity it
/// recorded at adoption ([`Self::with_identity`]), and every open compares the opened
/// file's `fstat` with it. A command-line path that is a symbolic link (an offline
/// command's `PATH`, e.g. `/dev/disk/by-id/...`) is resolved once, at that first open;
/// the daemon's storage never follows a link anywhere on its paths.
#[derive(Clone)]
pub struct ImageStorage {
    image: PathBuf,
    record: PathBuf,
    thin_dir: PathBuf,
    watch: Option<std::sync::Arc<dyn RecordWatch>>,
    /// The daemon's storage: no symbolic link on any path, the identity from the registry.
    strict: bool,
    /// The resolved image path and the identity every open must find there; shared by
    /// clones, so one command or job pins one file.
    pin: Arc<OnceLock<Pin>>,
}

#[derive(Debug, Clone)]
struct Pin {
    path: PathBuf,
    id: FileIdentity,
}

impl std::fmt::Debug for ImageStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStorage")
            .field("image", &self.image)
            .field("record", &self.record)
            .field("thin_dir", &self.thin_dir)
            .field("watched", &self.watch.is_some())
            .field("strict", &self.strict)
            .field("pin", &self.pin.get())
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
            strict: false,
            pin: Arc::new(OnceLock::new()),
        }
    }

    /// The daemon's storage: the image must be the file recorded at adoption (`None`: an
    /// entry older than that record; the first open pins it), and no path is followed
    /// through a symbolic link, in any component.
    pub fn with_identity(mut self, id: Option<FileIdentity>) -> Self {
        self.strict = true;
        let pin = OnceLock::new();
        if let Some(id) = id {
            let _ = pin.set(Pin {
                path: self.image.clone(),
                id,
            });
        }
        self.pin = Arc::new(pin);
        self
    }

    fn parents(&self) -> Parents {
        if self.strict {
            Parents::NoSymlinks
        } else {
            Parents::AsGiven
        }
    }

    /// Open the image and check that it is the pinned file (pinning it at the first open).
    fn open_image_file(&self, write: bool) -> Result<File> {
        let name = self.image_name();
        let how = How::READ
            .write(write)
            .accept(Accept::RegularOrBlock)
            .parents(Parents::NoSymlinks);
        let missing = || {
            StoreError::io(
                "open",
                format!("image {name}"),
                io::ErrorKind::NotFound.into(),
            )
        };
        if let Some(pin) = self.pin.get() {
            return open_identified(&pin.path, &name, write, pin.id);
        }
        // The first open: an offline command's path is resolved once, here; the daemon's
        // is canonical already and is never followed.
        let path = if self.strict {
            self.image.clone()
        } else {
            fs::canonicalize(&self.image)
                .map_err(|e| StoreError::io("resolve the path of", format!("image {name}"), e))?
        };
        let file = safe_open::open(&path, "image", how)?.ok_or_else(missing)?;
        let id = FileIdentity::of(&file)
            .map_err(|e| StoreError::io("stat", format!("image {name}"), e))?;
        let pin = self.pin.get_or_init(|| Pin { path, id });
        if pin.id != id {
            return Err(replaced(&name, pin.id, id.to_string()));
        }
        Ok(file)
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

    /// The region digest tree beside the record: `PATH.pdguard.tree`.
    pub fn tree_path(&self) -> PathBuf {
        let mut s = self.record.as_os_str().to_owned();
        s.push(TREE_SUFFIX);
        PathBuf::from(s)
    }

    /// The placement table beside the record: `PATH.pdguard.place`.
    pub fn place_path(&self) -> PathBuf {
        let mut s = self.record.as_os_str().to_owned();
        s.push(PLACE_SUFFIX);
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

    /// A migration's file beside the record: `PATH.pdguard.evacuation`, `PATH.pdguard.moved`.
    fn migration_path(&self, which: MigrationFile) -> PathBuf {
        let mut s = self.record.as_os_str().to_owned();
        s.push(which.suffix());
        PathBuf::from(s)
    }
}

/// Open the disk file at `path` (`name` in messages) for I/O, only if it is the file
/// `expected` describes: never through a symbolic link in any component, never waiting on
/// a FIFO, and refused with [`StoreError::Replaced`] (naming both identities) when the
/// opened file's `fstat` differs. For every front-end that opens a disk's file itself.
pub fn open_identified(
    path: &Path,
    name: &str,
    write: bool,
    expected: FileIdentity,
) -> Result<File> {
    let how = How::READ
        .write(write)
        .accept(Accept::RegularOrBlock)
        .parents(Parents::NoSymlinks);
    let file = match safe_open::open(path, "image", how) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(StoreError::io(
                "open",
                format!("image {name}"),
                io::ErrorKind::NotFound.into(),
            ))
        }
        Err(SafeOpenError::Symlink { target, .. }) => {
            return Err(replaced(name, expected, link_found(path, target)))
        }
        Err(e) => return Err(e.into()),
    };
    let found =
        FileIdentity::of(&file).map_err(|e| StoreError::io("stat", format!("image {name}"), e))?;
    if found != expected {
        return Err(replaced(name, expected, found.to_string()));
    }
    Ok(file)
}

fn replaced(image: &str, expected: FileIdentity, found: String) -> StoreError {
    StoreError::Replaced(Box::new(super::ImageReplaced {
        image: image.into(),
        expected,
        found,
    }))
}

/// What a symbolic link found where the image was leads to, for the message (never
/// opened: `stat` only).
fn link_found(path: &Path, target: Option<PathBuf>) -> String {
    let to = target.map_or_else(|| "?".into(), |t| t.display().to_string());
    match fs::metadata(path) {
        Ok(m) => format!("a symbolic link to {to}, {}", FileIdentity::of_metadata(&m)),
        Err(_) => format!("a symbolic link to {to}, which cannot be reached"),
    }
}

impl Storage for ImageStorage {
    fn image_name(&self) -> String {
        self.image.display().to_string()
    }

    fn lock_image(&self, mode: LockMode) -> Result<ImageLock> {
        let file = self.open_image_file(false)?;
        super::lock::flock_file(file, &self.image_name(), mode)
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
        let file = self.open_image_file(write)?;
        Ok(Box::new(FileDisk::new(file, what)?))
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
        match open_own(&path, true, "thin disk", self.parents())? {
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

    fn migration_file_name(&self, which: MigrationFile) -> String {
        self.migration_path(which).display().to_string()
    }

    fn create_migration_file(&self, which: MigrationFile, bytes: u64) -> Result<Box<dyn Disk>> {
        let path = self.migration_path(which);
        let what = format!("{} {}", which.what(), path.display());
        remove_own(&path, &what)?;
        let file = create_own(&path, &what)?;
        file.set_len(bytes)
            .map_err(|e| StoreError::io("size", &what, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", &what, e))?;
        sync_dir(&parent_of(&path))
            .map_err(|e| StoreError::io("fsync the directory of", &what, e))?;
        Ok(Box::new(FileDisk::new(file, what)?))
    }

    fn open_migration_file(&self, which: MigrationFile) -> Result<Option<Box<dyn Disk>>> {
        let path = self.migration_path(which);
        let what = format!("{} {}", which.what(), path.display());
        match open_own(&path, true, which.what(), self.parents())? {
            Some(f) => Ok(Some(Box::new(FileDisk::new(f, what)?))),
            None => Ok(None),
        }
    }

    fn remove_migration_file(&self, which: MigrationFile) -> Result<()> {
        let path = self.migration_path(which);
        remove_own(&path, &format!("{} {}", which.what(), path.display()))
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
        let path = self.key_slot_path();
        // One byte over the limit is enough for the decoder to refuse it.
        let limit = MAX_SLOT_BYTES + 1;
        Ok(safe_open::read(&path, "key slot", limit, self.parents())?)
    }

    fn destroy_key_slot(&self) -> Result<()> {
        let path = self.key_slot_path();
        let what = format!("key slot {}", path.display());
        let Some(f) = open_own(&path, true, "key slot", self.parents())? else {
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

    fn tree_name(&self) -> String {
        self.tree_path().display().to_string()
    }

    fn write_tree(&self, bytes: &[u8]) -> Result<()> {
        self.remove_tree()?;
        let path = self.tree_path();
        let what = format!("region digest tree {}", path.display());
        let mut f = create_own(&path, &what)?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("write", &what, e))?;
        sync_dir(&parent_of(&path)).map_err(|e| StoreError::io("fsync the directory of", &what, e))
    }

    fn read_tree(&self, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.tree_path();
        Ok(safe_open::read(
            &path,
            "region digest tree",
            limit,
            self.parents(),
        )?)
    }

    fn remove_tree(&self) -> Result<()> {
        let path = self.tree_path();
        remove_own(&path, &format!("region digest tree {}", path.display()))
    }

    fn place_name(&self) -> String {
        self.place_path().display().to_string()
    }

    fn write_place(&self, bytes: &[u8]) -> Result<()> {
        self.remove_place()?;
        let path = self.place_path();
        let what = format!("placement table {}", path.display());
        let mut f = create_own(&path, &what)?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("write", &what, e))?;
        sync_dir(&parent_of(&path)).map_err(|e| StoreError::io("fsync the directory of", &what, e))
    }

    fn read_place(&self, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.place_path();
        Ok(safe_open::read(
            &path,
            "placement table",
            limit,
            self.parents(),
        )?)
    }

    fn remove_place(&self) -> Result<()> {
        let path = self.place_path();
        remove_own(&path, &format!("placement table {}", path.display()))
    }

    fn read_record(&self) -> Result<Option<Vec<u8>>> {
        // One byte over the limit is enough for the decoder to refuse it (`--record
        // /dev/zero` is refused anyway: not a regular file).
        let limit = pdguard_core::record::MAX_RECORD_BYTES as u64 + 1;
        Ok(safe_open::read(
            &self.record,
            "seal record",
            limit,
            self.parents(),
        )?)
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
    fn the_region_tree_is_made_exclusively_beside_the_record_never_through_a_link() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let (dir, st, victim) = setup();
        assert_eq!(st.tree_path(), dir.path().join("v.img.pdguard.tree"));
        assert_eq!(st.read_tree(100).unwrap(), None);
        st.write_tree(b"first").unwrap();
        st.write_tree(b"second tree").unwrap();
        let meta = fs::symlink_metadata(st.tree_path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(st.read_tree(100).unwrap().unwrap(), b"second tree");
        // Read no further than asked: a reader asks for one byte more than it accepts.
        assert_eq!(st.read_tree(6).unwrap().unwrap(), b"second");
        st.remove_tree().unwrap();
        st.remove_tree().unwrap();
        assert!(!st.tree_path().exists());
        assert_eq!(st.place_path(), dir.path().join("v.img.pdguard.place"));
        st.write_place(b"table").unwrap();
        assert_eq!(st.read_place(100).unwrap().unwrap(), b"table");
        st.remove_place().unwrap();
        assert!(!st.place_path().exists());
        // A link planted in its place is never followed: not read, removed (not its
        // target) and replaced by a new file.
        symlink(&victim, st.tree_path()).unwrap();
        assert!(st.read_tree(100).is_err());
        st.write_tree(b"tree").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!fs::symlink_metadata(st.tree_path()).unwrap().is_symlink());
        fs::remove_file(st.tree_path()).unwrap();
        symlink(&victim, st.tree_path()).unwrap();
        st.remove_tree().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
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

    /// An instant reclaim's files are beside the record, made exclusively (a stale file or a
    /// planted link in their place is removed, never followed), sparse, and removable.
    #[test]
    fn migration_files_are_derived_made_anew_and_never_followed() {
        use std::os::unix::fs::symlink;
        let (dir, st, victim) = setup();
        for which in [MigrationFile::EvacuationCopy, MigrationFile::MovedMap] {
            let path = PathBuf::from(st.migration_file_name(which));
            assert_eq!(path.parent(), Some(dir.path()));
            assert!(path
                .to_string_lossy()
                .ends_with(&format!("v.img.pdguard{}", which.suffix())));
            assert!(st.open_migration_file(which).unwrap().is_none());
            symlink(&victim, &path).unwrap();
            assert!(
                st.open_migration_file(which).is_err(),
                "{which:?} opened through a link"
            );
            let d = st.create_migration_file(which, 1 << 20).unwrap();
            assert_eq!(d.len(), 1 << 20);
            d.write_at(&[7; 512], 4096).unwrap();
            d.sync().unwrap();
            assert!(!fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink());
            let again = st.open_migration_file(which).unwrap().unwrap();
            let mut back = [0u8; 512];
            again.read_at(&mut back, 4096).unwrap();
            assert_eq!(back, [7; 512]);
            // Sparse: a 1 MiB file holding one written page.
            assert!(fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
            st.remove_migration_file(which).unwrap();
            assert!(!path.exists());
            st.remove_migration_file(which).unwrap();
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    /// The first open pins the image; a file renamed over it, or a symbolic link swapped in
    /// for it, is refused at the next open, naming both identities, and its target is never
    /// opened for writing.
    #[test]
    fn a_swapped_image_is_refused_at_the_next_open() {
        use std::os::unix::fs::symlink;
        let (dir, st, victim) = setup();
        let id = {
            let held = st.lock_image(LockMode::Shared).unwrap();
            drop(held);
            st.pin.get().unwrap().id
        };
        assert_eq!(id.size, 4096);
        st.open_image(true).unwrap();
        let other = dir.path().join("other");
        fs::write(&other, vec![2u8; 4096]).unwrap();
        fs::rename(&other, st.image_path()).unwrap();
        let e = st.open_image(true).err().unwrap();
        let text = e.to_string();
        assert!(matches!(e, StoreError::Replaced { .. }), "{text}");
        assert!(text.contains(&id.to_string()), "{text}");
        fs::remove_file(st.image_path()).unwrap();
        symlink(&victim, st.image_path()).unwrap();
        for e in [
            st.open_image(true).err().unwrap(),
            st.lock_image(LockMode::Exclusive).err().unwrap(),
        ] {
            let text = e.to_string();
            assert!(text.contains(&id.to_string()), "{text}");
            assert!(text.contains("symbolic link to"), "{text}");
            use std::os::unix::fs::MetadataExt;
            let v = fs::metadata(&victim).unwrap();
            assert!(text.contains(&format!("inode {}", v.ino())), "{text}");
        }
        // The daemon's storage, given the identity recorded at adoption, refuses the same.
        let daemon = ImageStorage::new(
            st.image_path().to_path_buf(),
            st.record_path().to_path_buf(),
            None,
        )
        .with_identity(Some(id));
        assert!(matches!(
            daemon.open_image(true),
            Err(StoreError::Replaced { .. })
        ));
        // Without a recorded identity it still never follows the link.
        let legacy = ImageStorage::new(
            st.image_path().to_path_buf(),
            st.record_path().to_path_buf(),
            None,
        )
        .with_identity(None);
        assert!(matches!(
            legacy.open_image(true).err().unwrap(),
            StoreError::Untrusted(e) if matches!(*e, SafeOpenError::Symlink { .. })
        ));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    /// An offline command's path may be a symbolic link (`/dev/disk/by-id/...`): followed
    /// once, at the first open; the daemon's never.
    #[test]
    fn an_offline_path_through_a_link_is_resolved_once() {
        use std::os::unix::fs::symlink;
        let (dir, st, _) = setup();
        let link = dir.path().join("link.img");
        symlink(st.image_path(), &link).unwrap();
        let via = ImageStorage::new(link.clone(), default_record_path(&link), None);
        assert_eq!(via.open_image(false).unwrap().len(), 4096);
        let daemon =
            ImageStorage::new(link.clone(), default_record_path(&link), None).with_identity(None);
        assert!(daemon.open_image(false).is_err());
    }

    #[test]
    fn fifos_at_the_record_and_key_slot_are_refused_at_once() {
        let (_dir, st, _) = setup();
        for p in [st.record_path().to_path_buf(), st.key_slot_path()] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
        }
        let t = std::time::Instant::now();
        let e = st.read_record().unwrap_err().to_string();
        assert!(e.contains("seal record") && e.contains("FIFO"), "{e}");
        let e = st.read_key_slot().unwrap_err().to_string();
        assert!(e.contains("key slot") && e.contains("FIFO"), "{e}");
        assert!(st.destroy_key_slot().is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
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
