//! virtio-blk over a raw disk image ([`crate::disk::Disk`]): read, write, flush, get-ID,
//! discard and write-zeroes requests, each done before it is answered, on the device's I/O
//! thread. Discard punches a hole in the (sparse) image; write-zeroes zeroes the range in
//! place, or punches a hole when the guest allows unmapping.
//!
//! Data the guest is told was written has reached the image file (`pwrite`); a FLUSH request
//! is answered only after `fdatasync`. Every request is checked before anything is done: its
//! header, that data lengths are whole sectors, that the sectors lie inside the disk, that a
//! read-only disk is not written, that buffers lie in guest RAM. A bad request gets
//! `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type); a chain without a place for the
//! status byte is returned unused. The guest can never make the VMM panic or touch memory
//! outside its RAM.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::{read_config_bytes, BackendError, DeviceState, DeviceStateError, VirtioDevice};
use crate::disk::{Disk, SECTOR};
use crate::memory::{GuestMemoryMmap, GuestRam};

/// virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Largest discard or write-zeroes range, in sectors (1 GiB).
const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// Segments per discard or write-zeroes request.
const MAX_ZERO_SEGMENTS: u32 = 16;
/// Write-zeroes segment flag: the range may be unmapped.
const ZERO_UNMAP: u32 = 1;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Bytes of the device ID string.
const ID_LEN: usize = 20;
/// Largest piece of data moved between the image and guest memory at once.
const CHUNK: usize = 128 * 1024;

/// A virtio block device.
pub struct Block {
    /// The open image; `None` while released (a migration handing it over).
    disk: Option<Disk>,
    path: std::path::PathBuf,
    readonly: bool,
    size: u64,
    config: [u8; 60],
    id: [u8; ID_LEN],
    buf: Vec<u8>,
    /// Data read and written for the guest.
    io: super::IoTotals,
}

impl Block {
    /// A device in front of `disk`; `id` is what the guest reads as its serial (cut to 20 bytes).
    pub fn new(disk: Disk, id: &str) -> Self {
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&(disk.size() / SECTOR).to_le_bytes());
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // Discard: largest range, segments, alignment (sectors); write-zeroes: largest range,
        // segments, may unmap.
        config[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_ZERO_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_ZERO_SEGMENTS.to_le_bytes());
        config[56] = 1;
        let mut idb = [0u8; ID_LEN];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Block {
            path: disk.path().to_path_buf(),
            readonly: disk.readonly(),
            size: disk.size(),
            disk: Some(disk),
            config,
            id: idb,
            buf: Vec::new(),
            io: super::IoTotals::default(),
        }
    }

    /// The image behind the device.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Runs one request; returns the bytes written into the chain (status included), or
    /// `None` when the chain has nowhere to put a status.
    fn execute(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, ram: &GuestRam) -> Option<u32> {
        let mem = ram.memory();
        let writable = super::WritableRanges::of(&chain);
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let data_len = writer.available_bytes().checked_sub(1)?;
        let mut status_w = writer.split_at(data_len).ok()?;
        let status = self.request(&mut reader, &mut writer);
        let data_written = writer.bytes_written();
        status_w.write_all(&[status]).ok()?;
        writable.mark(ram);
        u32::try_from(data_written + 1).ok()
    }

    fn request(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> u8 {
        let mut hdr = [0u8; 16];
        if reader.read_exact(&mut hdr).is_err() {
            return S_IOERR;
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        match kind {
            T_IN => {
                let len = writer.available_bytes();
                let Some(off) = self.range(sector, len) else {
                    return S_IOERR;
                };
                let status = self.copy_in(writer, off, len);
                if status == S_OK {
                    self.io.disk_read_bytes += len as u64;
                }
                status
            }
            T_OUT => {
                let len = reader.available_bytes();
                if self.readonly {
                    return S_IOERR;
                }
                let Some(off) = self.range(sector, len) else {
                    return S_IOERR;
                };
                let status = self.copy_out(reader, off, len);
                if status == S_OK {
                    self.io.disk_write_bytes += len as u64;
                }
                status
            }
            T_FLUSH => match self.disk.as_ref().map(Disk::flush) {
                Some(Ok(())) => S_OK,
                Some(Err(e)) => {
                    tracing::warn!("virtio-blk flush: {e}");
                    S_IOERR
                }
                None => S_IOERR,
            },
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => S_OK,
                    Err(_) => S_IOERR,
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.readonly {
                    return S_IOERR;
                }
                self.zero(reader, kind == T_DISCARD)
            }
            _ => S_UNSUPP,
        }
    }

    /// Discard (`discard`) or write-zeroes: every segment is checked before any is done.
    fn zero(&mut self, reader: &mut virtio_queue::Reader<'_>, discard: bool) -> u8 {
        let n = reader.available_bytes();
        if n == 0 || !n.is_multiple_of(16) || n / 16 > MAX_ZERO_SEGMENTS as usize {
            return S_IOERR;
        }
        let mut segments = Vec::with_capacity(n / 16);
        for _ in 0..n / 16 {
            let mut seg = [0u8; 16];
            if reader.read_exact(&mut seg).is_err() {
                return S_IOERR;
            }
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Discard takes no flags; write-zeroes only "may unmap".
            let allowed = if discard { 0 } else { ZERO_UNMAP };
            if count > MAX_ZERO_SECTORS || flags & !allowed != 0 {
                return S_UNSUPP;
            }
            let len = u64::from(count) * SECTOR;
            let Some(off) = usize::try_from(len)
                .ok()
                .and_then(|l| self.range(sector, l))
            else {
                return S_IOERR;
            };
            segments.push((off, len, discard || flags & ZERO_UNMAP != 0));
        }
        let Some(disk) = self.disk.as_ref() else {
            return S_IOERR;
        };
        for (off, len, unmap) in segments {
            if let Err(e) = disk.zero_range(off, len, unmap) {
                tracing::warn!("virtio-blk discard/write-zeroes: {e}");
                return S_IOERR;
            }
        }
        S_OK
    }

    /// Byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors inside the
    /// disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        if !len.is_multiple_of(SECTOR) {
            return None;
        }
        let off = sector.checked_mul(SECTOR)?;
        (off.checked_add(len)? <= self.size).then_some(off)
    }

    /// Disk → guest.
    fn copy_in(&mut self, writer: &mut virtio_queue::Writer<'_>, mut off: u64, len: usize) -> u8 {
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.buf.resize(n, 0);
            let Some(disk) = self.disk.as_ref() else {
                return S_IOERR;
            };
            if let Err(e) = disk.read_at(&mut self.buf[..n], off) {
                tracing::warn!("virtio-blk read: {e}");
                return S_IOERR;
            }
            if writer.write_all(&self.buf[..n]).is_err() {
                return S_IOERR;
            }
            off += n as u64;
            left -= n;
        }
        S_OK
    }

    /// Guest → disk.
    fn copy_out(&mut self, reader: &mut virtio_queue::Reader<'_>, mut off: u64, len: usize) -> u8 {
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.buf.resize(n, 0);
            if reader.read_exact(&mut self.buf[..n]).is_err() {
                return S_IOERR;
            }
            let Some(disk) = self.disk.as_ref() else {
                return S_IOERR;
            };
            if let Err(e) = disk.write_at(&self.buf[..n], off) {
                tracing::warn!("virtio-blk write: {e}");
                return S_IOERR;
            }
            off += n as u64;
            left -= n;
        }
        S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let access = if self.readonly {
            F_RO
        } else {
            F_DISCARD | F_WRITE_ZEROES
        };
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | access
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn io(&self) -> super::IoTotals {
        self.io
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.execute(chain, ram).unwrap_or(0);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: cannot return a buffer: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn release(&mut self) -> Result<(), BackendError> {
        if let Some(d) = &self.disk {
            d.flush()?;
        }
        self.disk = None;
        Ok(())
    }

    fn reacquire(&mut self) -> Result<(), BackendError> {
        if self.disk.is_none() {
            let d = Disk::open(&self.path, self.readonly)?;
            if d.size() != self.size {
                return Err(BackendError::Resized {
                    path: self.path.clone(),
                    was: self.size,
                    now: d.size(),
                });
            }
            self.disk = Some(d);
        }
        Ok(())
    }

    fn released(&self) -> bool {
        self.disk.is_none()
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::None
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::None => Ok(()),
            other => Err(DeviceStateError::WrongKind {
                saved: other.kind(),
                device: "block",
            }),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use crate::persist::Persist;
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::testing::{r32, Driver, WRITE};

    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x30000;
    const STATUS: u64 = 0x40000;

    /// A block device on a fresh 1 MiB image, set up by the test driver.
    struct Blk {
        d: Driver,
        path: PathBuf,
    }

    impl Blk {
        fn new(name: &str, readonly: bool) -> Blk {
            let path =
                std::env::temp_dir().join(format!("ferry-vblk-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            crate::disk::create(&path, 1 << 20).unwrap();
            let disk = Disk::open(&path, readonly).unwrap();
            let dev = Box::new(Block::new(disk, "disk-id-0123456789abcdef"));
            let mut d = Driver::new(name, dev, |offered| {
                assert_ne!(offered & F_FLUSH, 0, "FLUSH offered");
                assert_eq!(offered & F_RO != 0, readonly, "RO offered iff read-only");
                offered
            });
            let mut cap = [0u8; 8];
            d.t.read(0x100, &mut cap);
            assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
            assert_eq!(r32(&mut d.t, 0x34), u32::from(QUEUE_SIZE));
            Blk { d, path }
        }

        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.d.ram.write(HDR, &h).unwrap();
            self.d.ram.write(STATUS, &[0xee]).unwrap();
        }

        fn status(&self) -> u8 {
            let mut s = [0u8];
            self.d.ram.read(STATUS, &mut s).unwrap();
            s[0]
        }

        /// A whole request: header, one data buffer, status.
        fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_flags: u16) -> u8 {
            self.header(kind, sector);
            self.d.post(
                0,
                0,
                &[
                    (HDR, 16, 0),
                    (DATA, data_len, data_flags),
                    (STATUS, 1, WRITE),
                ],
            );
            self.status()
        }
    }

    impl Drop for Blk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A discard or write-zeroes request with `segments` (sector, count, flags).
    fn zero_request(b: &mut Blk, kind: u32, segments: &[(u64, u32, u32)]) -> u8 {
        let mut data = Vec::new();
        for &(sector, count, flags) in segments {
            data.extend_from_slice(&sector.to_le_bytes());
            data.extend_from_slice(&count.to_le_bytes());
            data.extend_from_slice(&flags.to_le_bytes());
        }
        b.d.ram.write(DATA, &data).unwrap();
        b.request(kind, 0, data.len() as u32, 0)
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range_and_give_space_back() {
        use std::os::unix::fs::MetadataExt;
        let mut b = Blk::new("zero", false);
        let mut cfg = [0u8; 4];
        b.d.t.read(0x100 + 36, &mut cfg);
        assert_eq!(
            u32::from_le_bytes(cfg),
            MAX_ZERO_SECTORS,
            "max_discard_sectors"
        );
        // 512 sectors of 0xa5, 32 KiB at a time (the data buffer ends before the status byte).
        let ones = vec![0xa5u8; 32 * 1024];
        let write = |b: &mut Blk| {
            for i in 0..8u64 {
                b.d.ram.write(DATA, &ones).unwrap();
                assert_eq!(b.request(T_OUT, i * 64, 32 * 1024, 0), S_OK);
            }
        };
        let image = |b: &Blk| std::fs::read(&b.path).unwrap();
        let blocks = |b: &Blk| std::fs::metadata(&b.path).unwrap().blocks();
        write(&mut b);
        let full = blocks(&b);
        // Discard 64 KiB at sector 128 and 4 KiB at sector 8: zeros there, the rest untouched,
        // and the image holds less.
        assert_eq!(
            zero_request(&mut b, T_DISCARD, &[(128, 128, 0), (8, 8, 0)]),
            S_OK
        );
        let img = image(&b);
        assert!(img[128 * 512..256 * 512].iter().all(|&x| x == 0));
        assert!(img[8 * 512..16 * 512].iter().all(|&x| x == 0));
        assert!(img[..8 * 512].iter().all(|&x| x == 0xa5));
        assert!(img[16 * 512..128 * 512].iter().all(|&x| x == 0xa5));
        assert!(img[256 * 512..512 * 512].iter().all(|&x| x == 0xa5));
        assert!(
            blocks(&b) < full,
            "no space given back: {} >= {full} blocks",
            blocks(&b)
        );
        // Write-zeroes, in place and with unmap allowed.
        write(&mut b);
        assert_eq!(
            zero_request(&mut b, T_WRITE_ZEROES, &[(300, 4, 0), (400, 3, ZERO_UNMAP)]),
            S_OK
        );
        let img = image(&b);
        for (s, n) in [(300usize, 4usize), (400, 3)] {
            assert!(
                img[s * 512..(s + n) * 512].iter().all(|&x| x == 0),
                "sector {s}"
            );
            assert_eq!(img[(s + n) * 512], 0xa5, "past sector {s}");
            assert_eq!(img[s * 512 - 1], 0xa5, "before sector {s}");
        }
        // Bad requests: nothing is done, even for the good segments before a bad one.
        for (kind, segs, want) in [
            (T_DISCARD, vec![(0, 8, ZERO_UNMAP)], S_UNSUPP),
            (T_WRITE_ZEROES, vec![(0, 8, 2)], S_UNSUPP),
            (T_DISCARD, vec![(0, 8, 0), (2047, 2, 0)], S_IOERR),
            (T_WRITE_ZEROES, vec![(u64::MAX / 256, 8, 0)], S_IOERR),
            (T_DISCARD, vec![(0, MAX_ZERO_SECTORS + 1, 0)], S_UNSUPP),
            (T_DISCARD, vec![(0, 1, 0); 17], S_IOERR),
            (T_DISCARD, vec![], S_IOERR),
        ] {
            assert_eq!(zero_request(&mut b, kind, &segs), want, "{kind} {segs:?}");
        }
        assert_eq!(
            image(&b)[..512],
            [0xa5; 512],
            "a refused request changed data"
        );
        // A segment cut short.
        b.d.ram.write(DATA, &[0u8; 15]).unwrap();
        assert_eq!(b.request(T_DISCARD, 0, 15, 0), S_IOERR);

        // Read-only disks offer neither and refuse both.
        let mut ro = Blk::new("zero-ro", true);
        assert_eq!(zero_request(&mut ro, T_DISCARD, &[(0, 8, 0)]), S_IOERR);
        assert_eq!(zero_request(&mut ro, T_WRITE_ZEROES, &[(0, 8, 0)]), S_IOERR);
    }

    #[test]
    fn data_written_reads_back_from_the_image_and_flush_and_id_work() {
        let mut b = Blk::new("rw", false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        b.d.ram.write(DATA, &pattern).unwrap();
        assert_eq!(b.request(T_OUT, 3, 1024, 0), S_OK);
        Disk::open(&b.path, true)
            .map(|_| ())
            .expect_err("the image is locked for writing");
        let mut on_disk = vec![0u8; 1024];
        std::fs::File::open(&b.path)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut on_disk, 3 * 512)
            })
            .unwrap();
        assert_eq!(on_disk, pattern, "the write reached the image");
        b.d.ram.write(DATA, &[0u8; 1024]).unwrap();
        assert_eq!(b.request(T_IN, 3, 1024, WRITE), S_OK);
        let mut back = vec![0u8; 1024];
        b.d.ram.read(DATA, &mut back).unwrap();
        assert_eq!(back, pattern);
        // Counted for utilization: what was moved, not what was refused.
        assert_eq!(b.request(T_IN, 1 << 20, 1024, WRITE), S_IOERR);
        let io = b.d.t.device().io();
        assert_eq!((io.disk_read_bytes, io.disk_write_bytes), (1024, 1024));
        b.header(T_FLUSH, 0);
        let (head, len) = b.d.post(0, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!((head, len, b.status()), (0, 1, S_OK));
        assert_eq!(b.request(T_GET_ID, 0, 20, WRITE), S_OK);
        let mut id = [0u8; 20];
        b.d.ram.read(DATA, &mut id).unwrap();
        assert_eq!(&id, b"disk-id-0123456789ab");
    }

    #[test]
    fn bad_requests_get_an_error_status_and_never_crash() {
        let mut b = Blk::new("bad", false);
        // Past the end, straddling the end, not whole sectors, overflowing, unknown type.
        assert_eq!(b.request(T_IN, 2048, 512, WRITE), S_IOERR);
        assert_eq!(b.request(T_OUT, 2047, 1024, 0), S_IOERR);
        assert_eq!(b.request(T_IN, 0, 100, WRITE), S_IOERR);
        assert_eq!(b.request(T_OUT, u64::MAX / 256, 512, 0), S_IOERR);
        assert_eq!(b.request(99, 0, 512, 0), S_UNSUPP);
        // A header shorter than 16 bytes.
        b.header(T_IN, 0);
        b.d.post(0, 0, &[(HDR, 8, 0), (STATUS, 1, WRITE)]);
        assert_eq!(b.status(), S_IOERR);
        // Buffers outside guest RAM: the chain comes back unused, nothing is touched.
        b.header(T_IN, 0);
        let (_, len) = b.d.post(
            0,
            0,
            &[(HDR, 16, 0), (0xF000_0000, 512, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(len, 0);
        assert_eq!(b.status(), 0xee);
        // No writable descriptor for the status.
        b.header(T_IN, 0);
        let (_, len) = b.d.post(0, 0, &[(HDR, 16, 0)]);
        assert_eq!(len, 0);
        // A descriptor chain that loops back on itself ends (the queue's TTL).
        b.header(T_IN, 0);
        b.d.raw_desc(0, 5, HDR, 16, 1, 5);
        b.d.add_head(0, 5);
        b.d.notify(0);
        b.d.used(0);
        // The device still serves good requests afterwards.
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_OK);
    }

    #[test]
    fn random_descriptor_tables_never_crash_the_device() {
        let mut b = Blk::new("garbage", false);
        for seed in 1..=20 {
            b.d.garbage(0, seed, 50);
        }
        // A driver that reset and set up again finds a working device.
        let mut b = Blk::new("garbage2", false);
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_OK);
    }

    #[test]
    fn a_request_whose_notify_was_set_aside_runs_when_the_live_queues_are_run() {
        // What a resume does for a notify that came while the VM was paused.
        let mut b = Blk::new("aside", false);
        b.header(T_IN, 0);
        b.d.add(
            0,
            0,
            &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(b.status(), 0xee, "nothing runs without a notify");
        assert!(b.d.used(0).is_empty());
        b.d.t.run_live_queues();
        assert_eq!(b.status(), S_OK);
        assert_eq!(b.d.used(0), vec![(0, 513)]);
        // Run again: nothing new is available, nothing more is used.
        b.d.t.run_live_queues();
        assert!(b.d.used(0).is_empty());
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mut b = Blk::new("ro", true);
        assert_eq!(b.request(T_OUT, 0, 512, 0), S_IOERR);
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_OK);
    }

    #[test]
    fn state_round_trips_and_device_writes_are_logged() {
        let mut b = Blk::new("state", false);
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_OK);
        let saved = b.d.t.save();
        assert_eq!(saved.queues[0].next_avail, 1);
        // A second transport on the same memory carries on where the first stopped.
        let other = b.path.with_extension("2");
        let _ = std::fs::remove_file(&other);
        crate::disk::create(&other, 1 << 20).unwrap();
        b.d.t = MmioTransport::new(
            Box::new(Block::new(Disk::open(&other, false).unwrap(), "x")),
            Arc::clone(&b.d.ram),
            b.d.irq.try_clone().unwrap(),
        );
        let _ = std::fs::remove_file(&other);
        b.d.t.load(&saved).unwrap();
        assert_eq!(b.d.t.save(), saved);
        b.d.ram.set_device_logging(true);
        assert_eq!(b.request(T_IN, 1, 4096, WRITE), S_OK);
        let dirty = b.d.ram.take_device_dirty();
        for page in [DATA / 4096, STATUS / 4096, Driver::used_ring(0) / 4096] {
            assert!(
                dirty.contains(&page),
                "page {page:#x} not logged: {dirty:?}"
            );
        }
        assert!(
            !dirty.contains(&(HDR / 4096)),
            "a page only read was logged"
        );
        // Saved state that does not fit is refused.
        let mut wrong = saved.clone();
        wrong.device_type = 1;
        assert!(b.d.t.load(&wrong).is_err());
        let mut wrong = saved;
        wrong.queues[0].size = 1000;
        assert!(b.d.t.load(&wrong).is_err());
    }

    #[test]
    fn a_released_disk_is_closed_and_comes_back() {
        let mut b = Blk::new("release", false);
        b.d.t.release().unwrap();
        assert!(b.d.t.released());
        // Closed: another process may open it now; requests meanwhile fail cleanly.
        drop(Disk::open(&b.path, false).unwrap());
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_IOERR);
        b.d.t.reacquire().unwrap();
        assert!(!b.d.t.released());
        assert_eq!(b.request(T_IN, 0, 512, WRITE), S_OK);
        // Held elsewhere: taking it back fails and says why.
        b.d.t.release().unwrap();
        let other = Disk::open(&b.path, false).unwrap();
        let e = b.d.t.reacquire().unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(other);
        b.d.t.reacquire().unwrap();
    }
}
