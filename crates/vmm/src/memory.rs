//! Guest RAM: one memfd, mapped shared, registered with KVM through `vm-memory`.
//!
//! The memfd makes the RAM a file another process could map (a future live-migration receiver
//! or a memory-inspection tool); the shared mapping means what KVM and the VMM see is that file.
//! Layout: RAM from 0 up to the 32-bit MMIO gap (3 GiB), the rest from 4 GiB.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

/// The guest memory type used everywhere in Ferry.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Page size Ferry tracks and transfers memory in.
pub const PAGE_SIZE: usize = 4096;
/// Start of the 32-bit MMIO gap (IOAPIC, LAPIC, device windows).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Smallest guest Ferry accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest Ferry accepts.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size out of range.
    #[error("guest memory of {0} bytes is out of range (16 MiB to 1 TiB, a multiple of 2 MiB)")]
    BadSize(u64),
    /// memfd_create / ftruncate failed.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// Mapping failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// Writing or discarding through the memory file failed.
    #[error("cannot write guest memory through its file")]
    File(#[source] std::io::Error),
    /// An access out of guest memory.
    #[error("guest memory access at {addr:#x} (+{len}) is outside guest RAM")]
    OutOfRange {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: usize,
    },
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    size: u64,
    /// [`ram_ranges`] of `size`, computed once: the page paths look them up per page.
    ranges: Vec<(u64, u64)>,
    mem: GuestMemoryMmap,
    device_log: DeviceLog,
}

/// Pages the VMM itself wrote into guest RAM (device emulation: data read from a disk, used
/// rings) while logging is on. KVM's dirty log sees only what vCPUs write; a migration needs
/// both.
#[derive(Debug, Default)]
struct DeviceLog {
    on: std::sync::atomic::AtomicBool,
    /// One bit per page of guest-physical space up to the end of RAM.
    bits: std::sync::RwLock<Vec<std::sync::atomic::AtomicU64>>,
}

/// Whether the page-aligned 4 KiB at `page` are all zero. Pages with data are usually told by
/// their first word; a zero page is scanned whole, 64 bytes per step with SSE2 on x86-64.
fn zero_page(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    // Callers pass the start of a mapped, page-aligned 4 KiB of guest RAM that stays mapped
    // for the call. The guest may write it concurrently, so it is only read with volatile
    // loads or from assembly, never through a Rust reference.
    // SAFETY: as just said; the first u64 of the page is aligned and mapped.
    let first = unsafe { std::ptr::read_volatile(words) };
    if first != 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let acc: u64;
        // SAFETY: the page is mapped as above; `page` is 16-byte aligned (page-aligned), the loop reads exactly
        // [page, page + 4096), and only xmm0/xmm1 and the named registers are changed.
        unsafe {
            std::arch::asm!(
                "pxor xmm0, xmm0",
                "2:",
                "por xmm0, [{p}]",
                "por xmm0, [{p} + 16]",
                "por xmm0, [{p} + 32]",
                "por xmm0, [{p} + 48]",
                "add {p}, 64",
                "cmp {p}, {end}",
                "jb 2b",
                "movdqa xmm1, xmm0",
                "psrldq xmm1, 8",
                "por xmm0, xmm1",
                "movq {acc}, xmm0",
                p = inout(reg) page => _,
                end = in(reg) page.wrapping_add(PAGE_SIZE),
                acc = out(reg) acc,
                out("xmm0") _,
                out("xmm1") _,
                options(nostack, readonly),
            );
        }
        acc == 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (1..PAGE_SIZE / 8).all(|i| {
            // SAFETY: the page is mapped as above; every u64 of it is aligned.
            unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
        })
    }
}

/// The guest-physical ranges `size` bytes of RAM occupy: (start, length).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

impl GuestRam {
    /// Allocates `size` bytes of zeroed guest RAM in a new memfd named after the VM.
    pub fn new(name: &str, size: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let cname = CString::new(format!("ferry-ram-{name}").replace('\0', "_"))
            .map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
        // SAFETY: cname is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(MemoryError::Memfd)?;
        let mut regions = Vec::new();
        let mut file_off = 0u64;
        for (start, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::BadSize(size))?;
            let fo = FileOffset::new(memfd.try_clone().map_err(MemoryError::Memfd)?, file_off);
            let region = GuestRegionMmap::from_range(GuestAddress(start), len_usize, Some(fo))
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            regions.push(region);
            file_off += len;
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            memfd,
            size,
            ranges: ram_ranges(size),
            mem,
            device_log: DeviceLog::default(),
        })
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `vm-memory` view of the RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd holding the RAM.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Calls `f(slot, guest_addr, len, host_addr)` for every RAM region.
    pub fn for_each_region<E>(
        &self,
        mut f: impl FnMut(u32, u64, u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map(|p| p as u64)
                .unwrap_or(0);
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            f(slot, region.start_addr().raw_value(), region.len(), host)?;
        }
        Ok(())
    }

    /// Whether the 4 KiB page at `addr` (page-aligned) is all zero, read in place: most pages
    /// of a guest are, and copying them out only to find that is the larger cost of a full
    /// memory pass. The guest may write the page meanwhile; callers that care track that
    /// (the dirty log).
    pub fn page_is_zero(&self, addr: u64) -> Result<bool, MemoryError> {
        let bad = MemoryError::OutOfRange {
            addr,
            len: PAGE_SIZE,
        };
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad);
        }
        let slice = self
            .mem
            .get_slice(GuestAddress(addr), PAGE_SIZE)
            .map_err(|_| bad)?;
        let guard = slice.ptr_guard();
        Ok(zero_page(guard.as_ptr()))
    }

    /// Whether the 4 KiB page at `addr` (page-aligned) is resident in the memory file, asked
    /// without touching it (`mincore`): a page the guest never wrote is not, and reading it
    /// would make the host allocate it.
    pub fn page_resident(&self, addr: u64) -> Result<bool, MemoryError> {
        let bad = MemoryError::OutOfRange {
            addr,
            len: PAGE_SIZE,
        };
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad);
        }
        let slice = self
            .mem
            .get_slice(GuestAddress(addr), PAGE_SIZE)
            .map_err(|_| bad)?;
        let guard = slice.ptr_guard();
        let mut vec = 0u8;
        // SAFETY: the page is mapped (a slice of guest RAM) and page-aligned (RAM regions are
        // mapped page-aligned and addr is a multiple of the page size); mincore writes one
        // byte for one page into `vec`.
        let rc = unsafe { libc::mincore(guard.as_ptr().cast_mut().cast(), PAGE_SIZE, &mut vec) };
        if rc != 0 {
            return Err(MemoryError::File(std::io::Error::last_os_error()));
        }
        Ok(vec & 1 == 1)
    }

    /// Copies `buf.len()` bytes at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
            })
    }

    /// Copies `buf` into guest memory at `addr`.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
            })
    }

    /// Starts (clean) or stops logging the pages the VMM writes for devices
    /// ([`GuestRam::mark_dirty`]).
    pub fn set_device_logging(&self, on: bool) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let mut bits = self
            .device_log
            .bits
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if on {
            let end = ram_ranges(self.size)
                .last()
                .map(|&(s, l)| s + l)
                .unwrap_or(0);
            let words = usize::try_from(end / PAGE_SIZE as u64 / 64 + 1).unwrap_or(0);
            *bits = (0..words).map(|_| AtomicU64::new(0)).collect();
        } else {
            bits.clear();
        }
        self.device_log.on.store(on, Ordering::SeqCst);
    }

    /// Records that the VMM wrote `[addr, addr + len)` (when device logging is on).
    pub fn mark_dirty(&self, addr: u64, len: u64) {
        use std::sync::atomic::Ordering;
        if len == 0 || !self.device_log.on.load(Ordering::SeqCst) {
            return;
        }
        let bits = self
            .device_log
            .bits
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let first = addr / PAGE_SIZE as u64;
        let last = addr.saturating_add(len - 1) / PAGE_SIZE as u64;
        for page in first..=last {
            let Some(word) = usize::try_from(page / 64).ok().and_then(|w| bits.get(w)) else {
                break;
            };
            word.fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }

    /// Pages marked by [`GuestRam::mark_dirty`] since the last call (ascending); clears them.
    pub fn take_device_dirty(&self) -> Vec<u64> {
        use std::sync::atomic::Ordering;
        let bits = self
            .device_log
            .bits
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut pages = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            let mut v = word.swap(0, Ordering::SeqCst);
            while v != 0 {
                let b = u64::from(v.trailing_zeros());
                pages.push(w as u64 * 64 + b);
                v &= v - 1;
            }
        }
        pages
    }

    /// Where `[addr, addr + len)` lies in the memfd, when it lies within one RAM range.
    fn file_offset(&self, addr: u64, len: u64) -> Result<u64, MemoryError> {
        let mut off = 0;
        for &(s, l) in &self.ranges {
            if addr >= s && addr.checked_add(len).is_some_and(|e| e <= s + l) {
                return Ok(off + (addr - s));
            }
            off += l;
        }
        Err(MemoryError::OutOfRange {
            addr,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })
    }

    /// The guest-physical ranges of RAM that hold data, ascending: everything outside them is
    /// a hole of the memfd — never written, or given back — and reads as zeros. Found with
    /// `SEEK_DATA`/`SEEK_HOLE`, without touching a page: reading a hole through the mapping
    /// would allocate and zero it (shmem has no shared zero page), which is what a naive scan
    /// for zero pages costs. Ranges are page-aligned; a range may still contain zero pages.
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        use std::os::fd::AsRawFd;
        let fd = self.memfd.as_raw_fd();
        let seek = |off: u64, whence: libc::c_int| -> Result<Option<u64>, MemoryError> {
            let off = libc::off_t::try_from(off).map_err(|_| MemoryError::BadSize(off))?;
            // SAFETY: lseek on the memfd this struct owns; nothing reads or writes through its
            // file position (all I/O on it is positioned or through the mapping).
            let r = unsafe { libc::lseek(fd, off, whence) };
            if r >= 0 {
                return Ok(u64::try_from(r).ok());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None); // no data at or after `off`
            }
            Err(MemoryError::File(e))
        };
        let mut out = Vec::new();
        let mut file_off = 0u64;
        for &(start, len) in &self.ranges {
            let end = file_off + len;
            let mut at = file_off;
            while at < end {
                let Some(data) = seek(at, libc::SEEK_DATA)? else {
                    break;
                };
                if data >= end {
                    break;
                }
                let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                let page = PAGE_SIZE as u64;
                let (a, b) = (data / page * page, hole.div_ceil(page) * page);
                out.push((start + (a - file_off), b.min(end) - a));
                at = b.max(at + page);
            }
            file_off = end;
        }
        Ok(out)
    }

    /// Copies `buf` into guest memory at `addr` (one RAM range, page-aligned) with a write to
    /// the memfd rather than through the mapping. A page of the memfd not yet backed is then
    /// allocated by the write itself — no page fault, and a whole page is not zeroed first —
    /// which makes this the fast way to fill memory nobody else writes (a migration
    /// destination's). The mapping sees the data at once (one page cache).
    pub fn store(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        let off = self.file_offset(addr, buf.len() as u64)?;
        self.memfd.write_all_at(buf, off).map_err(MemoryError::File)
    }

    /// Makes `[addr, addr + len)` (page-aligned, one RAM range) zero by giving its pages back
    /// to the host (a hole in the memfd; it reads as zeros and takes no memory).
    pub fn discard(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        let bad = MemoryError::OutOfRange {
            addr,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        };
        if !addr.is_multiple_of(PAGE_SIZE as u64) || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad);
        }
        let off = self.file_offset(addr, len)?;
        let (off, len) = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(bad),
        };
        // SAFETY: fallocate on the memfd this struct owns; punching a hole only changes the
        // file's contents (to zeros), never the mappings' validity.
        let rc = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            return Err(MemoryError::File(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies entirely in RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(s, l)| addr >= s && addr.checked_add(len).is_some_and(|e| e <= s + l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_recognised_in_place() {
        let ram = GuestRam::new("zero-test", 16 << 20).unwrap();
        assert!(ram.page_is_zero(0x5000).unwrap());
        // A non-zero byte anywhere is seen: first word, inside the SSE2 loop, last byte.
        for off in [0u64, 17, 63, 64, 2049, 4095] {
            ram.write(0x5000 + off, &[1]).unwrap();
            assert!(!ram.page_is_zero(0x5000).unwrap(), "byte {off}");
            ram.write(0x5000 + off, &[0]).unwrap();
            assert!(ram.page_is_zero(0x5000).unwrap());
        }
        ram.write(0x5fff, &[1]).unwrap();
        assert!(!ram.page_is_zero(0x5000).unwrap());
        assert!(ram.page_is_zero(0x6000).unwrap());
        assert!(ram.page_is_zero(0x5001).is_err());
        assert!(ram.page_is_zero(16 << 20).is_err());
    }

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn stores_and_discards_through_the_file_are_seen_in_the_mapping() {
        let size = MMIO_GAP_START + (64 << 20);
        let ram = GuestRam::new("store", size).unwrap();
        for addr in [0x7000u64, MMIO_GAP_END + 0x3000] {
            ram.store(addr, &[0xa5; 8192]).unwrap();
            let mut buf = [0u8; 8192];
            ram.read(addr, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0xa5), "{addr:#x}");
            assert!(!ram.page_is_zero(addr + 4096).unwrap());
            ram.discard(addr, 4096).unwrap();
            assert!(ram.page_is_zero(addr).unwrap());
            assert!(
                !ram.page_is_zero(addr + 4096).unwrap(),
                "the next page stays"
            );
        }
        // The data is where it was stored, and only there (holes around it).
        let ranges = ram.data_ranges().unwrap();
        let covered = |a: u64| ranges.iter().any(|&(s, l)| a >= s && a < s + l);
        assert!(
            covered(0x8000) && covered(MMIO_GAP_END + 0x4000),
            "{ranges:x?}"
        );
        assert!(
            !covered(0x20_0000) && !covered(MMIO_GAP_END + (32 << 20)),
            "{ranges:x?}"
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < (4 << 20), "{ranges:x?}");
        // Nothing across the hole or past the end, nothing unaligned.
        assert!(ram.store(MMIO_GAP_START - 4096, &[1; 8192]).is_err());
        assert!(ram.store(MMIO_GAP_START, &[1; 16]).is_err());
        assert!(ram.discard(0x7001, 4096).is_err());
        assert!(ram.discard(size + (1 << 30), 4096).is_err());
    }

    #[test]
    fn ram_is_a_shared_memfd_mapping() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new("t", 32 << 20).unwrap();
        ram.write(0x1000, b"ferry").unwrap();
        let mut buf = [0u8; 5];
        ram.memfd().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(&buf, b"ferry");
        assert!(ram.write(32 << 20, b"x").is_err());
        assert!(matches!(
            GuestRam::new("t", 1 << 20),
            Err(MemoryError::BadSize(_))
        ));
    }
}
