//! Real files: raw images, block devices and sparse thin disks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{DataMap, Disk, Result, Storage, StoreError};

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

/// One image on the host: its path, its record's path and the directory for thin disks.
#[derive(Debug, Clone)]
pub struct ImageStorage {
    image: PathBuf,
    record: PathBuf,
    thin_dir: PathBuf,
}

impl ImageStorage {
    /// `thin_dir` defaults to the record's directory (beside the image for a file).
    pub fn new(image: PathBuf, record: PathBuf, thin_dir: Option<PathBuf>) -> Self {
        let thin_dir = thin_dir.unwrap_or_else(|| parent_of(&record));
        Self {
            image,
            record,
            thin_dir,
        }
    }

    pub fn image_path(&self) -> &Path {
        &self.image
    }

    pub fn record_path(&self) -> &Path {
        &self.record
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

    fn record_name(&self) -> String {
        self.record.display().to_string()
    }

    fn open_image(&self, write: bool) -> Result<Box<dyn Disk>> {
        let what = format!("image {}", self.image.display());
        Ok(Box::new(Self::open_disk(&self.image, what, write)?))
    }

    fn new_thin_path(&self, seal_id: &str) -> String {
        let name = self
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let short = seal_id.get(..8).unwrap_or(seal_id);
        self.thin_dir
            .join(format!("{name}.{short}{THIN_SUFFIX}"))
            .display()
            .to_string()
    }

    fn free_bytes(&self, thin_path: &str) -> Result<u64> {
        let dir = parent_of(Path::new(thin_path));
        let st = rustix::fs::statvfs(&dir).map_err(|e| {
            StoreError::io("measure free space of", dir.display().to_string(), e.into())
        })?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn create_thin(&self, thin_path: &str, bytes: u64) -> Result<Box<dyn Disk>> {
        let path = Path::new(thin_path);
        let what = format!("thin disk {thin_path}");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io("create", &what, e))?;
        // set_len on an empty file allocates nothing: the thin disk is sparse.
        file.set_len(bytes)
            .map_err(|e| StoreError::io("size", &what, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", &what, e))?;
        sync_dir(&parent_of(path))
            .map_err(|e| StoreError::io("fsync the directory of", &what, e))?;
        Ok(Box::new(FileDisk::new(file, what)?))
    }

    fn open_thin(&self, thin_path: &str) -> Result<Option<Box<dyn Disk>>> {
        let path = Path::new(thin_path);
        if !path.exists() {
            return Ok(None);
        }
        let what = format!("thin disk {thin_path}");
        Ok(Some(Box::new(Self::open_disk(path, what, true)?)))
    }

    fn remove_thin(&self, thin_path: &str) -> Result<()> {
        let path = Path::new(thin_path);
        match fs::remove_file(path) {
            Ok(()) => sync_dir(&parent_of(path))
                .map_err(|e| StoreError::io("fsync the directory of", thin_path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(
                "delete",
                format!("thin disk {thin_path}"),
                e,
            )),
        }
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
        let tmp = self.tmp_record();
        let what = format!("seal record {}", self.record.display());
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
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

    fn overwrite_record(&self) -> Result<()> {
        let what = format!("seal record {}", self.record.display());
        let overwrite = || -> io::Result<()> {
            let f = OpenOptions::new().write(true).open(&self.record)?;
            let len = f.metadata()?.len();
            f.write_all_at(&vec![0u8; len as usize], 0)?;
            f.sync_all()
        };
        overwrite().map_err(|e| StoreError::io("overwrite", what, e))
    }

    fn remove_record(&self) -> Result<()> {
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
