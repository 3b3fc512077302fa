//! Raw disk images — sparse files on the cluster's shared directory — and host block devices
//! (pass-through disks, e.g. a LUN of a SAN every host sees), each opened under an
//! open-file-description (OFD) lock so that two processes — on this host or, on a file system
//! that forwards POSIX locks such as NFSv4, on two hosts — can never have the same disk open
//! read-write (readers share; a writer excludes everyone). The lock lives as long as the open
//! file and goes away with the process, whatever way it ends.
//!
//! The virtio-blk device (devices issue) serves these; `ferry disk create|inspect` makes and
//! shows them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Sector size of the images.
pub const SECTOR: u64 = 512;
/// Largest image Ferry creates (16 TiB).
pub const MAX_SIZE: u64 = 16 << 40;

/// Disk image errors.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file could not be created, opened or read.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Another process has the disk open in a conflicting way.
    #[error("disk {0} is in use by another process ({1}); a disk is open read-write in one place at most")]
    InUse(PathBuf, &'static str),
    /// A size that is zero, too large or not whole sectors.
    #[error("invalid disk size {0} bytes: must be 1 sector to 16 TiB, a multiple of 512")]
    BadSize(u64),
    /// The image exists already (create never overwrites).
    #[error("{0} exists already")]
    Exists(PathBuf),
}

/// An open disk image, locked for as long as it is open.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
}

/// What `inspect` tells about an image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiskInfo {
    /// The file.
    pub path: PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes actually allocated on the file system (sparse images use less).
    pub allocated: u64,
    /// Who holds it: `free`, `read-only` (one or more readers) or `read-write`.
    pub lock: &'static str,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DiskError + '_ {
    move |e| DiskError::Io(path.to_path_buf(), e)
}

/// Creates a sparse raw image of `size` bytes (never overwriting a file).
pub fn create(path: &Path, size: u64) -> Result<DiskInfo, DiskError> {
    if size == 0 || size > MAX_SIZE || !size.is_multiple_of(SECTOR) {
        return Err(DiskError::BadSize(size));
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => DiskError::Exists(path.to_path_buf()),
            _ => DiskError::Io(path.to_path_buf(), e),
        })?;
    f.set_len(size).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    inspect(path)
}

/// The size of an open image or host block device (whose metadata says 0: its end is its
/// size).
fn size_of(f: &File, path: &Path) -> Result<u64, DiskError> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let m = f.metadata().map_err(io(path))?;
    if m.file_type().is_block_device() {
        let mut f = f;
        return f.seek(std::io::SeekFrom::End(0)).map_err(io(path));
    }
    if !m.is_file() {
        return Err(DiskError::Io(
            path.to_path_buf(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a disk image or a block device",
            ),
        ));
    }
    Ok(m.len())
}

/// Size, allocation and lock state of an image or host block device.
pub fn inspect(path: &Path) -> Result<DiskInfo, DiskError> {
    let f = File::open(path).map_err(io(path))?;
    let m = f.metadata().map_err(io(path))?;
    let size = size_of(&f, path)?;
    let lock = match probe(&f, libc::F_WRLCK).map_err(io(path))? {
        None => "free",
        Some(t) if t == libc::F_RDLCK as i16 => "read-only",
        Some(_) => "read-write",
    };
    Ok(DiskInfo {
        path: path.to_path_buf(),
        size,
        allocated: m.blocks() * 512,
        lock,
    })
}

/// The whole-file OFD lock request of type `kind`.
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value, then filled in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, however large the file grows
    fl
}

/// The type of a lock that would conflict with taking `kind`, if any (`F_OFD_GETLK`).
fn probe(f: &File, kind: libc::c_int) -> std::io::Result<Option<i16>> {
    let mut fl = whole_file(kind);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass; the fd is open.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as i16).then_some(fl.l_type))
}

impl Disk {
    /// Opens an image read-write (exclusive) or read-only (shared with other readers).
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(io(path))?;
        let kind = if readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        let fl = whole_file(kind);
        // SAFETY: F_OFD_SETLK reads the flock we pass; the fd is open. Non-blocking: a
        // conflicting lock fails at once.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => DiskError::InUse(
                    path.to_path_buf(),
                    if readonly {
                        "open read-write elsewhere"
                    } else {
                        "open elsewhere"
                    },
                ),
                _ => DiskError::Io(path.to_path_buf(), e),
            });
        }
        let size = size_of(&file, path)?;
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(DiskError::BadSize(size));
        }
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            size,
            readonly,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether it was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `buf.len()` bytes at `offset` (past the end: an error).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset).map_err(io(&self.path))
    }

    /// Writes `buf` at `offset` (read-only or past the end: an error).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check(offset, buf.len())?;
        self.file.write_all_at(buf, offset).map_err(io(&self.path))
    }

    /// Zeroes `len` bytes at `offset`; with `unmap` the space is given back to the file system
    /// too (a hole). Reads of the range return zeros afterwards either way. Where the file
    /// system cannot do either in place, zeros are written.
    pub fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // Both fit: offset + len <= size <= 16 TiB (checked above).
        let (o, l) = (offset as libc::off_t, len as libc::off_t);
        // SAFETY: fallocate(2) on our open file; no memory is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(DiskError::Io(self.path.clone(), e));
        }
        let zeros = vec![0u8; 128 * 1024];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(io(&self.path))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes everything written so far durable (what a guest's flush asks for).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(io(&self.path))
    }

    fn check_writable(&self) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::Io(
                self.path.clone(),
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the disk is read-only",
                ),
            ));
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(DiskError::Io(
                self.path.clone(),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} go past the end ({} bytes)",
                        self.size
                    ),
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn images_are_sparse_and_never_overwritten() {
        let p = tmp("sparse");
        let info = create(&p, 1 << 30).unwrap();
        assert_eq!(info.size, 1 << 30);
        assert!(info.allocated < 1 << 20, "{info:?}");
        assert_eq!(info.lock, "free");
        assert!(matches!(create(&p, 1 << 20), Err(DiskError::Exists(_))));
        for bad in [0, 511, MAX_SIZE + 512] {
            assert!(matches!(
                create(&tmp("bad"), bad),
                Err(DiskError::BadSize(_))
            ));
        }
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn one_writer_or_many_readers() {
        let p = tmp("lock");
        create(&p, 1 << 20).unwrap();
        let w = Disk::open(&p, false).unwrap();
        assert_eq!(inspect(&p).unwrap().lock, "read-write");
        // OFD locks conflict between open files even within one process, as between hosts.
        let e = Disk::open(&p, false).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        assert!(matches!(Disk::open(&p, true), Err(DiskError::InUse(..))));
        drop(w);
        let r1 = Disk::open(&p, true).unwrap();
        let r2 = Disk::open(&p, true).unwrap();
        assert_eq!(inspect(&p).unwrap().lock, "read-only");
        assert!(matches!(Disk::open(&p, false), Err(DiskError::InUse(..))));
        drop((r1, r2));
        Disk::open(&p, false).unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn reads_and_writes_stay_inside_the_disk() {
        let p = tmp("io");
        create(&p, 4096).unwrap();
        let d = Disk::open(&p, false).unwrap();
        d.write_at(b"ferry", 4091).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 5];
        d.read_at(&mut b, 4091).unwrap();
        assert_eq!(&b, b"ferry");
        assert!(d.write_at(b"xx", 4095).is_err());
        assert!(d.read_at(&mut b, u64::MAX - 1).is_err());
        drop(d);
        let r = Disk::open(&p, true).unwrap();
        assert!(r.write_at(b"x", 0).is_err());
        let _ = std::fs::remove_file(&p);
    }
}
