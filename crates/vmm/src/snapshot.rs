//! The state file: Ferry's quick-migration format (documented in `docs/state-format.md`).
//!
//! ```text
//! header   "FERRYST\0" | major u16 | minor u16 | flags u32          (16 bytes, little endian)
//! section  tag [4] | length u64 | payload [length] | crc32 u32       (crc over tag, length, payload)
//!          CONF (JSON VmConfig) · VCPU (postcard) · VMST (postcard) · DEVS (postcard)
//!          · MEMR (memory: page runs, zero pages left out) · "END " (empty)
//! ```
//! A reader refuses another major version, a newer minor version, a wrong checksum, a section
//! out of order or over its size limit, and a file that ends early.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::memory::{GuestRam, PAGE_SIZE};

/// File magic.
pub const MAGIC: [u8; 8] = *b"FERRYST\0";
/// Format major version: a reader refuses any other.
pub const MAJOR: u16 = 3;
/// Format minor version: a reader refuses a newer one.
pub const MINOR: u16 = 1;
/// Size limit of the CONF section.
pub const MAX_CONFIG: u64 = 1 << 20;
/// Size limit of the VCPU, VMST and DEVS sections.
pub const MAX_STATE: u64 = 64 << 20;

/// Section tags, in file order.
pub const SECTIONS: [[u8; 4]; 6] = [*b"CONF", *b"VCPU", *b"VMST", *b"DEVS", *b"MEMR", *b"END "];

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O error.
    #[error("state file I/O failed")]
    Io(#[from] std::io::Error),
    /// Not a Ferry state file.
    #[error("not a Ferry state file (bad magic)")]
    BadMagic,
    /// Unsupported version.
    #[error("state file format {major}.{minor} is not supported (this Ferry reads {MAJOR}.0 to {MAJOR}.{MINOR})")]
    Version {
        /// Major.
        major: u16,
        /// Minor.
        minor: u16,
    },
    /// Header flags this reader does not know.
    #[error("state file uses unknown header flags {0:#x}")]
    Flags(u32),
    /// The file ended early.
    #[error("state file is truncated (in section {0})")]
    Truncated(String),
    /// Section out of order or unknown.
    #[error("state file is corrupted: expected section {expected}, found {found:?}")]
    UnexpectedSection {
        /// Expected tag.
        expected: String,
        /// Found bytes.
        found: String,
    },
    /// Section too large.
    #[error("state file is corrupted: section {tag} claims {len} bytes (limit {limit})")]
    TooLarge {
        /// Tag.
        tag: String,
        /// Claimed length.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// Checksum mismatch.
    #[error("state file is corrupted: checksum mismatch in section {0}")]
    Checksum(String),
    /// Payload does not decode.
    #[error("state file is corrupted: section {tag} does not decode: {reason}")]
    Decode {
        /// Tag.
        tag: String,
        /// Decoder message.
        reason: String,
    },
    /// Memory section inconsistent with the config.
    #[error("state file is corrupted: memory section {0}")]
    BadMemory(String),
}

fn tag_str(t: &[u8]) -> String {
    String::from_utf8_lossy(t).trim_end().to_string()
}

/// Writes sections with checksums.
pub struct SnapshotWriter<W: Write> {
    out: W,
    next: usize,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W) -> Result<Self, SnapshotError> {
        out.write_all(&MAGIC)?;
        out.write_all(&MAJOR.to_le_bytes())?;
        out.write_all(&MINOR.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(SnapshotWriter { out, next: 0 })
    }

    fn begin(&mut self, tag: [u8; 4], len: u64) -> Result<crc32fast::Hasher, SnapshotError> {
        debug_assert_eq!(SECTIONS.get(self.next), Some(&tag));
        self.next += 1;
        let mut h = crc32fast::Hasher::new();
        h.update(&tag);
        h.update(&len.to_le_bytes());
        self.out.write_all(&tag)?;
        self.out.write_all(&len.to_le_bytes())?;
        Ok(h)
    }

    /// Writes a whole section.
    pub fn section(&mut self, tag: [u8; 4], payload: &[u8]) -> Result<(), SnapshotError> {
        let mut h = self.begin(tag, payload.len() as u64)?;
        h.update(payload);
        self.out.write_all(payload)?;
        self.out.write_all(&h.finalize().to_le_bytes())?;
        Ok(())
    }

    /// Writes the memory section: non-zero pages only.
    pub fn memory(&mut self, ram: &GuestRam) -> Result<u64, SnapshotError> {
        let runs = nonzero_runs(ram)?;
        let data_pages: u64 = runs.iter().map(|r| r.1).sum();
        let len = 16 + 16 * runs.len() as u64 + data_pages * PAGE_SIZE as u64;
        let mut h = self.begin(*b"MEMR", len)?;
        let mut put = |out: &mut W, b: &[u8]| -> Result<(), SnapshotError> {
            h.update(b);
            out.write_all(b)?;
            Ok(())
        };
        put(
            &mut self.out,
            &(ram.size() / PAGE_SIZE as u64).to_le_bytes(),
        )?;
        put(&mut self.out, &(runs.len() as u64).to_le_bytes())?;
        for (start, count) in &runs {
            put(&mut self.out, &start.to_le_bytes())?;
            put(&mut self.out, &count.to_le_bytes())?;
        }
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        for (start, count) in &runs {
            let mut page = *start;
            let end = start + count;
            while page < end {
                let n = (end - page).min(256);
                let bytes = usize::try_from(n).unwrap_or(0) * PAGE_SIZE;
                ram.read(page * PAGE_SIZE as u64, &mut buf[..bytes])
                    .map_err(|e| SnapshotError::BadMemory(e.to_string()))?;
                put(&mut self.out, &buf[..bytes])?;
                page += n;
            }
        }
        self.out.write_all(&h.finalize().to_le_bytes())?;
        Ok(len)
    }

    /// Writes the end marker and returns the writer.
    pub fn finish(mut self) -> Result<W, SnapshotError> {
        self.section(*b"END ", &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Runs of non-zero pages as (first guest page number, page count). Only the memfd's data
/// ranges are looked at, each page checked in place: a hole is zero and is never read (reading
/// it through the mapping would allocate and zero it).
pub fn nonzero_runs(ram: &GuestRam) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let bad = |e: crate::memory::MemoryError| SnapshotError::BadMemory(e.to_string());
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ram.data_ranges().map_err(bad)? {
        let mut addr = start;
        while addr < start + len {
            if !ram.page_is_zero(addr).map_err(bad)? {
                let pn = addr / PAGE_SIZE as u64;
                match runs.last_mut() {
                    Some((s, c)) if *s + *c == pn => *c += 1,
                    _ => runs.push((pn, 1)),
                }
            }
            addr += PAGE_SIZE as u64;
        }
    }
    Ok(runs)
}

/// Reads sections in order, checking each.
pub struct SnapshotReader<R: Read> {
    inp: R,
    next: usize,
}

impl SnapshotReader<BufReader<File>> {
    /// Opens a state file and checks its header.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        Self::new(BufReader::with_capacity(1 << 20, File::open(path)?))
    }
}

fn read_exact_or<R: Read>(inp: &mut R, buf: &mut [u8], tag: &str) -> Result<(), SnapshotError> {
    inp.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated(tag.to_string()),
        _ => SnapshotError::Io(e),
    })
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header.
    pub fn new(mut inp: R) -> Result<Self, SnapshotError> {
        let mut hdr = [0u8; 16];
        read_exact_or(&mut inp, &mut hdr, "header")?;
        if hdr[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let major = u16::from_le_bytes([hdr[8], hdr[9]]);
        let minor = u16::from_le_bytes([hdr[10], hdr[11]]);
        if major != MAJOR || minor > MINOR {
            return Err(SnapshotError::Version { major, minor });
        }
        let flags = u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if flags != 0 {
            return Err(SnapshotError::Flags(flags));
        }
        Ok(SnapshotReader { inp, next: 0 })
    }

    fn begin(&mut self, limit: u64) -> Result<(String, u64, crc32fast::Hasher), SnapshotError> {
        let expected = SECTIONS.get(self.next).copied().unwrap_or(*b"????");
        let name = tag_str(&expected);
        let mut head = [0u8; 12];
        read_exact_or(&mut self.inp, &mut head, &name)?;
        if head[..4] != expected {
            return Err(SnapshotError::UnexpectedSection {
                expected: name,
                found: String::from_utf8_lossy(&head[..4]).into_owned(),
            });
        }
        let len = u64::from_le_bytes(head[4..12].try_into().unwrap_or([0; 8]));
        if len > limit {
            return Err(SnapshotError::TooLarge {
                tag: name,
                len,
                limit,
            });
        }
        self.next += 1;
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        Ok((name, len, h))
    }

    fn end(&mut self, name: &str, h: crc32fast::Hasher) -> Result<(), SnapshotError> {
        let mut c = [0u8; 4];
        read_exact_or(&mut self.inp, &mut c, name)?;
        if u32::from_le_bytes(c) != h.finalize() {
            return Err(SnapshotError::Checksum(name.to_string()));
        }
        Ok(())
    }

    /// Reads the next whole section (not MEMR) of at most `limit` bytes.
    pub fn section(&mut self, limit: u64) -> Result<Vec<u8>, SnapshotError> {
        let (name, len, mut h) = self.begin(limit)?;
        let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
        read_exact_or(&mut self.inp, &mut payload, &name)?;
        h.update(&payload);
        self.end(&name, h)?;
        Ok(payload)
    }

    /// Reads the next section and decodes it with postcard.
    pub fn decode<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, SnapshotError> {
        let tag = tag_str(SECTIONS.get(self.next).map(|t| &t[..]).unwrap_or(b"?"));
        let payload = self.section(MAX_STATE)?;
        postcard::from_bytes(&payload).map_err(|e| SnapshotError::Decode {
            tag,
            reason: e.to_string(),
        })
    }

    /// Reads the memory section into `ram`. Nothing of it is trusted before its checksum
    /// matches; the caller must discard `ram` on error.
    pub fn memory(&mut self, ram: &GuestRam) -> Result<(), SnapshotError> {
        let total_pages = ram.size() / PAGE_SIZE as u64;
        let limit = 16 + 16 * total_pages + ram.size();
        let (name, len, mut h) = self.begin(limit)?;
        let mut fixed = [0u8; 16];
        read_exact_or(&mut self.inp, &mut fixed, &name)?;
        h.update(&fixed);
        let pages = u64::from_le_bytes(fixed[..8].try_into().unwrap_or([0; 8]));
        let nruns = u64::from_le_bytes(fixed[8..].try_into().unwrap_or([0; 8]));
        if pages != total_pages {
            return Err(SnapshotError::BadMemory(format!(
                "is for {} MiB of RAM, the config says {} MiB",
                pages.saturating_mul(PAGE_SIZE as u64) >> 20,
                ram.size() >> 20
            )));
        }
        if nruns > total_pages || 16u64.saturating_add(nruns.saturating_mul(16)) > len {
            return Err(SnapshotError::BadMemory(
                "has an impossible run count".into(),
            ));
        }
        let mut table = vec![0u8; usize::try_from(nruns * 16).unwrap_or(0)];
        read_exact_or(&mut self.inp, &mut table, &name)?;
        h.update(&table);
        let mut data_pages = 0u64;
        let mut prev_end = 0u64;
        let mut runs = Vec::new();
        for r in table.chunks_exact(16) {
            let s = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
            let c = u64::from_le_bytes(r[8..].try_into().unwrap_or([0; 8]));
            let ok = c > 0
                && s >= prev_end
                && s.checked_mul(PAGE_SIZE as u64)
                    .zip(c.checked_mul(PAGE_SIZE as u64))
                    .is_some_and(|(a, l)| ram.contains(a, l));
            if !ok {
                return Err(SnapshotError::BadMemory(format!(
                    "run {s}+{c} is outside RAM or out of order"
                )));
            }
            prev_end = s + c;
            data_pages += c;
            runs.push((s, c));
        }
        if 16 + 16 * nruns + data_pages * PAGE_SIZE as u64 != len {
            return Err(SnapshotError::BadMemory(
                "length does not match its runs".into(),
            ));
        }
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        for (s, c) in runs {
            let mut page = s;
            while page < s + c {
                let n = (s + c - page).min(256);
                let bytes = usize::try_from(n).unwrap_or(0) * PAGE_SIZE;
                read_exact_or(&mut self.inp, &mut buf[..bytes], &name)?;
                h.update(&buf[..bytes]);
                ram.write(page * PAGE_SIZE as u64, &buf[..bytes])
                    .map_err(|e| SnapshotError::BadMemory(e.to_string()))?;
                page += n;
            }
        }
        self.end(&name, h)
    }

    /// Reads the end marker.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        self.section(0).map(|_| ())
    }
}

/// Encodes a state section with postcard.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(value).map_err(|e| SnapshotError::Decode {
        tag: "encode".into(),
        reason: e.to_string(),
    })
}

/// Writes a state file atomically: to a temporary file beside `path`, synced, then renamed.
/// On any error the temporary file is removed and `path` is untouched.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), SnapshotError>,
) -> Result<u64, SnapshotError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{fname}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| SnapshotError::Io(e.into_error()))?;
        f.sync_all()?;
        let size = f.metadata()?.len();
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ram: &GuestRam) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        w.section(*b"CONF", b"{}").unwrap();
        w.section(*b"VCPU", &encode(&vec![1u32, 2, 3]).unwrap())
            .unwrap();
        w.section(*b"VMST", &encode(&7u8).unwrap()).unwrap();
        w.section(*b"DEVS", &encode(&"serial").unwrap()).unwrap();
        w.memory(ram).unwrap();
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8], ram: &GuestRam) -> Result<(), SnapshotError> {
        let mut r = SnapshotReader::new(bytes)?;
        r.section(MAX_CONFIG)?;
        let v: Vec<u32> = r.decode()?;
        assert_eq!(v, vec![1, 2, 3]);
        let _: u8 = r.decode()?;
        let _: String = r.decode()?;
        r.memory(ram)?;
        r.finish()
    }

    #[test]
    fn round_trip_skips_zero_pages() {
        let ram = GuestRam::new("a", 16 << 20).unwrap();
        ram.write(0x5000, b"hello").unwrap();
        ram.write(0x6ff0, b"world").unwrap();
        ram.write(0x10_0000, &[9u8; 4096 * 3]).unwrap();
        assert_eq!(nonzero_runs(&ram).unwrap(), vec![(5, 2), (256, 3)]);
        // Finding them allocated nothing: the holes are still holes.
        let held: u64 = ram.data_ranges().unwrap().iter().map(|r| r.1).sum();
        assert!(held <= 16 * 4096, "the scan allocated {held} bytes");
        let bytes = sample(&ram);
        assert!(bytes.len() < 6 * 4096, "zero pages must not be stored");
        let back = GuestRam::new("b", 16 << 20).unwrap();
        read_all(&bytes, &back).unwrap();
        let mut b = [0u8; 5];
        back.read(0x6ff0, &mut b).unwrap();
        assert_eq!(&b, b"world");
        assert_eq!(nonzero_runs(&back).unwrap(), nonzero_runs(&ram).unwrap());
    }

    #[test]
    fn every_corruption_is_refused() {
        let ram = GuestRam::new("a", 16 << 20).unwrap();
        ram.write(0x5000, b"hello").unwrap();
        let good = sample(&ram);
        let fresh = || GuestRam::new("b", 16 << 20).unwrap();
        // Every single-byte flip and every truncation is an error, never a panic.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad, &fresh()).is_err(), "flip at {i} accepted");
        }
        for cut in [0, 5, 16, 20, good.len() / 2, good.len() - 1] {
            let err = read_all(&good[..cut], &fresh()).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated(_)),
                "cut {cut}: {err}"
            );
        }
        let mut newer = good.clone();
        newer[10] = (MINOR + 1) as u8;
        assert!(matches!(
            read_all(&newer, &fresh()),
            Err(SnapshotError::Version { major: MAJOR, minor }) if minor == MINOR + 1
        ));
        // Another major: the one before (files of an older Ferry) and the one after.
        for major in [MAJOR - 1, MAJOR + 1] {
            let mut other = good.clone();
            other[8..10].copy_from_slice(&major.to_le_bytes());
            assert!(matches!(
                read_all(&other, &fresh()),
                Err(SnapshotError::Version { major: m, .. }) if m == major
            ));
        }
        // Wrong RAM size is named.
        let big = GuestRam::new("c", 32 << 20).unwrap();
        assert!(matches!(
            read_all(&good, &big),
            Err(SnapshotError::BadMemory(_))
        ));
    }
}
