//! The SCSI commands a LUN answers: what Linux's `sd` and `scsi_scan` send to a disk (SPC-3 /
//! SBC-3), over a raw image or a host block device ([`crate::disk::Disk`]), 512-byte blocks.
//!
//! Every command is decoded and checked whole before anything is done: its fields, that the
//! blocks lie inside the disk, that a read-only LUN is not written, that the buffers are large
//! enough. Anything else ends in CHECK CONDITION with fixed-format sense data: ILLEGAL REQUEST
//! (invalid operation code, invalid field, LBA out of range, logical unit not supported),
//! DATA PROTECT (write protected), MEDIUM ERROR or HARDWARE ERROR when the host's I/O fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use virtio_queue::{Reader, Writer};

use super::{LunInfo, MAX_LUNS};
use crate::disk::{Disk, DiskError};

/// Bytes per logical block.
pub const BLOCK: u64 = 512;
/// Largest READ/WRITE transfer, in blocks (1 MiB; also the controller's `max_sectors`).
pub const MAX_TRANSFER: u32 = 2048;
/// Largest UNMAP or WRITE SAME range, in blocks (1 GiB).
const MAX_ZERO_BLOCKS: u32 = 1 << 21;
/// Block descriptors per UNMAP.
const MAX_UNMAP_DESCRIPTORS: u32 = 16;
/// Largest piece of data moved between the image and guest memory at once.
const CHUNK: usize = 128 * 1024;

const VENDOR: &[u8; 8] = b"FERRY   ";
const PRODUCT: &[u8; 16] = b"VIRTUAL DISK    ";
const REVISION: &[u8; 4] = b"1.0 ";

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION (sense data follows).
pub const CHECK_CONDITION: u8 = 0x02;

/// Operation codes answered.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    /// SERVICE ACTION IN(16)'s READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Its qualifier.
    pub ascq: u8,
}

impl Sense {
    /// Nothing to report.
    pub const NO_SENSE: Sense = Sense::new(0x00, 0x00, 0x00);
    /// ILLEGAL REQUEST: INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// ILLEGAL REQUEST: LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// ILLEGAL REQUEST: INVALID FIELD IN CDB.
    pub const INVALID_FIELD: Sense = Sense::new(0x05, 0x24, 0x00);
    /// ILLEGAL REQUEST: LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// ILLEGAL REQUEST: INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_PARAMETER: Sense = Sense::new(0x05, 0x26, 0x00);
    /// ILLEGAL REQUEST: PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LENGTH: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// ILLEGAL REQUEST: SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    /// DATA PROTECT: WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    /// MEDIUM ERROR: UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    /// MEDIUM ERROR: WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
    /// HARDWARE ERROR: INTERNAL TARGET FAILURE (a flush that failed, a released disk).
    pub const TARGET_FAILURE: Sense = Sense::new(0x04, 0x44, 0x00);

    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (response code 0x70, current error).
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        s[7] = 10; // additional sense length
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// How a command ended: GOOD, or CHECK CONDITION with this sense.
pub type Outcome = Result<(), Sense>;

/// One logical unit: a disk on the controller.
#[derive(Debug)]
pub struct Lun {
    /// The open disk; `None` while released (a migration handing it over).
    disk: Option<Disk>,
    path: PathBuf,
    readonly: bool,
    size: u64,
    /// What INQUIRY's serial-number page says (the image's file name, up to 20 bytes).
    serial: Vec<u8>,
}

impl Lun {
    /// A LUN in front of `disk`.
    pub fn new(disk: Disk) -> Lun {
        let serial: Vec<u8> = disk
            .path()
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .bytes()
            .filter(|b| b.is_ascii_graphic())
            .take(20)
            .collect();
        Lun {
            path: disk.path().to_path_buf(),
            readonly: disk.readonly(),
            size: disk.size(),
            disk: Some(disk),
            serial,
        }
    }

    /// The disk behind it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `disk list` shows of it, as LUN `lun`.
    pub fn info(&self, lun: u16) -> LunInfo {
        LunInfo {
            lun,
            path: self.path.clone(),
            readonly: self.readonly,
            size: self.size,
        }
    }

    fn blocks(&self) -> u64 {
        self.size / BLOCK
    }

    /// Flushes the disk (everything acknowledged is durable afterwards).
    pub fn flush(&self) -> Result<(), DiskError> {
        match &self.disk {
            Some(d) => d.flush(),
            None => Ok(()),
        }
    }

    /// Flushes and closes the disk, releasing its lock.
    pub fn release(&mut self) -> Result<(), DiskError> {
        self.flush()?;
        self.disk = None;
        Ok(())
    }

    /// Opens the disk again after [`Lun::release`]; `Ok(Some(now))` if it changed size.
    pub fn reacquire(&mut self) -> Result<Option<u64>, DiskError> {
        if self.disk.is_none() {
            let d = Disk::open(&self.path, self.readonly)?;
            if d.size() != self.size {
                return Ok(Some(d.size()));
            }
            self.disk = Some(d);
        }
        Ok(None)
    }

    /// Whether the disk is released.
    pub fn released(&self) -> bool {
        self.disk.is_none()
    }

    fn disk(&self) -> Result<&Disk, Sense> {
        self.disk.as_ref().ok_or(Sense::TARGET_FAILURE)
    }
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Writes `data` cut to the command's allocation length and to the buffer.
fn reply(w: &mut Writer<'_>, data: &[u8], alloc: usize) -> Outcome {
    let n = data.len().min(alloc).min(w.available_bytes());
    w.write_all(&data[..n]).map_err(|_| Sense::INVALID_FIELD)
}

/// What a command needs besides its LUN: the scratch buffer and the LUNs present.
pub struct Context<'a> {
    /// Reused for data moved between disk and guest.
    pub buf: &'a mut Vec<u8>,
    /// The LUNs present, ascending (REPORT LUNS).
    pub present: &'a [u16],
}

/// Whether operation code `op` reads data from the disk for the guest.
pub fn is_read(code: u8) -> bool {
    matches!(code, op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16)
}

/// Whether operation code `op` writes the guest's data to the disk.
pub fn is_write(code: u8) -> bool {
    matches!(
        code,
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16
    )
}

/// Runs `cdb` for `lun` (`None`: no such LUN), reading data from `r` and writing it to `w`.
/// On CHECK CONDITION nothing was changed on the disk, except by an I/O error part-way.
pub fn execute(
    lun: Option<&Lun>,
    cdb: &[u8],
    r: &mut Reader<'_>,
    w: &mut Writer<'_>,
    cx: &mut Context<'_>,
) -> Outcome {
    let Some(&code) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    // Commands the target answers whatever the LUN.
    match code {
        op::INQUIRY => return inquiry(lun, cdb, w),
        op::REPORT_LUNS => return report_luns(cdb, w, cx.present),
        op::REQUEST_SENSE => {
            let sense = if lun.is_some() {
                Sense::NO_SENSE
            } else {
                Sense::LUN_NOT_SUPPORTED
            };
            return reply(w, &sense.fixed(), usize::from(cdb[4]));
        }
        _ => {}
    }
    let Some(lun) = lun else {
        return Err(Sense::LUN_NOT_SUPPORTED);
    };
    match code {
        op::TEST_UNIT_READY | op::START_STOP_UNIT | op::PREVENT_ALLOW_MEDIUM_REMOVAL => Ok(()),
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
            let (lba, blocks, _) = transfer(cdb);
            read(lun, lba, blocks, w, cx.buf)
        }
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
            let (lba, blocks, fua) = transfer(cdb);
            write(lun, lba, blocks, fua, r, cx.buf)
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => lun.disk()?.flush().map_err(|e| {
            tracing::warn!("virtio-scsi flush: {e}");
            Sense::TARGET_FAILURE
        }),
        op::READ_CAPACITY_10 => {
            let last = u32::try_from(lun.blocks().saturating_sub(1)).unwrap_or(u32::MAX);
            let mut d = [0u8; 8];
            d[0..4].copy_from_slice(&last.to_be_bytes());
            d[4..8].copy_from_slice(&(BLOCK as u32).to_be_bytes());
            reply(w, &d, d.len())
        }
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SA_READ_CAPACITY_16 => {
            let mut d = [0u8; 32];
            d[0..8].copy_from_slice(&lun.blocks().saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
            if !lun.readonly {
                d[14] = 0x80 | 0x40; // LBPME: thin provisioned; LBPRZ: unmapped reads zeros
            }
            reply(w, &d, be32(&cdb[10..14]) as usize)
        }
        op::MODE_SENSE_6 => mode_sense(lun, cdb, false, w),
        op::MODE_SENSE_10 => mode_sense(lun, cdb, true, w),
        op::UNMAP => unmap(lun, cdb, r),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => write_same(lun, cdb, r, cx.buf),
        _ => Err(Sense::INVALID_OPCODE),
    }
}

/// LBA, blocks and FUA of a READ or WRITE of any size.
fn transfer(cdb: &[u8]) -> (u64, u32, bool) {
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(cdb[1] & 0x1f) << 16 | u64::from(cdb[2]) << 8 | u64::from(cdb[3]);
            let n = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, n, false)
        }
        op::READ_10 | op::WRITE_10 => (
            u64::from(be32(&cdb[2..6])),
            be16(&cdb[7..9]),
            cdb[1] & 0x08 != 0,
        ),
        op::READ_12 | op::WRITE_12 => (
            u64::from(be32(&cdb[2..6])),
            be32(&cdb[6..10]),
            cdb[1] & 0x08 != 0,
        ),
        _ => (be64(&cdb[2..10]), be32(&cdb[10..14]), cdb[1] & 0x08 != 0),
    }
}

/// Byte offset and length of `blocks` at `lba`, if they lie inside the LUN.
fn range(lun: &Lun, lba: u64, blocks: u32) -> Result<(u64, u64), Sense> {
    let end = lba
        .checked_add(u64::from(blocks))
        .ok_or(Sense::LBA_OUT_OF_RANGE)?;
    if end > lun.blocks() {
        return Err(Sense::LBA_OUT_OF_RANGE);
    }
    Ok((lba * BLOCK, u64::from(blocks) * BLOCK))
}

fn read(lun: &Lun, lba: u64, blocks: u32, w: &mut Writer<'_>, buf: &mut Vec<u8>) -> Outcome {
    let (mut off, len) = range(lun, lba, blocks)?;
    if blocks > MAX_TRANSFER || (w.available_bytes() as u64) < len {
        return Err(Sense::INVALID_FIELD);
    }
    let disk = lun.disk()?;
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(CHUNK);
        buf.resize(n, 0);
        disk.read_at(&mut buf[..n], off).map_err(|e| {
            tracing::warn!("virtio-scsi read: {e}");
            Sense::READ_ERROR
        })?;
        w.write_all(&buf[..n]).map_err(|_| Sense::INVALID_FIELD)?;
        off += n as u64;
        left -= n;
    }
    Ok(())
}

fn write(
    lun: &Lun,
    lba: u64,
    blocks: u32,
    fua: bool,
    r: &mut Reader<'_>,
    buf: &mut Vec<u8>,
) -> Outcome {
    if lun.readonly {
        return Err(Sense::WRITE_PROTECTED);
    }
    let (mut off, len) = range(lun, lba, blocks)?;
    if blocks > MAX_TRANSFER || (r.available_bytes() as u64) < len {
        return Err(Sense::INVALID_FIELD);
    }
    let disk = lun.disk()?;
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(CHUNK);
        buf.resize(n, 0);
        r.read_exact(&mut buf[..n])
            .map_err(|_| Sense::INVALID_FIELD)?;
        disk.write_at(&buf[..n], off).map_err(|e| {
            tracing::warn!("virtio-scsi write: {e}");
            Sense::WRITE_ERROR
        })?;
        off += n as u64;
        left -= n;
    }
    if fua {
        disk.flush().map_err(|e| {
            tracing::warn!("virtio-scsi write (FUA): {e}");
            Sense::WRITE_ERROR
        })?;
    }
    Ok(())
}

/// UNMAP: every descriptor checked, then each range given back (a hole in the image).
fn unmap(lun: &Lun, cdb: &[u8], r: &mut Reader<'_>) -> Outcome {
    if lun.readonly {
        return Err(Sense::WRITE_PROTECTED);
    }
    let len = be16(&cdb[7..9]) as usize;
    if len == 0 {
        return Ok(());
    }
    if len < 8 || r.available_bytes() < len {
        return Err(Sense::PARAMETER_LENGTH);
    }
    let mut list = vec![0u8; len];
    r.read_exact(&mut list)
        .map_err(|_| Sense::PARAMETER_LENGTH)?;
    let descriptors = be16(&list[2..4]) as usize;
    if !descriptors.is_multiple_of(16) || 8 + descriptors > len {
        return Err(Sense::PARAMETER_LENGTH);
    }
    if descriptors / 16 > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::INVALID_PARAMETER);
    }
    let mut ranges = Vec::new();
    for d in list[8..8 + descriptors].chunks_exact(16) {
        let blocks = be32(&d[8..12]);
        if blocks > MAX_ZERO_BLOCKS {
            return Err(Sense::INVALID_PARAMETER);
        }
        ranges.push(range(lun, be64(&d[0..8]), blocks)?);
    }
    let disk = lun.disk()?;
    for (off, len) in ranges {
        if len > 0 {
            disk.zero_range(off, len, true).map_err(|e| {
                tracing::warn!("virtio-scsi unmap: {e}");
                Sense::WRITE_ERROR
            })?;
        }
    }
    Ok(())
}

/// WRITE SAME(10/16): one block written over a range; a block of zeros zeroes the range in
/// place, or gives it back (a hole) when UNMAP is set.
fn write_same(lun: &Lun, cdb: &[u8], r: &mut Reader<'_>, buf: &mut Vec<u8>) -> Outcome {
    if lun.readonly {
        return Err(Sense::WRITE_PROTECTED);
    }
    let unmap_bit = cdb[1] & 0x08 != 0;
    let (lba, blocks, no_data) = if cdb[0] == op::WRITE_SAME_10 {
        (u64::from(be32(&cdb[2..6])), be16(&cdb[7..9]), false)
    } else {
        (be64(&cdb[2..10]), be32(&cdb[10..14]), cdb[1] & 0x01 != 0)
    };
    // Zero blocks would mean "to the end of the disk"; the block limits page says WSNZ.
    if blocks == 0 || blocks > MAX_ZERO_BLOCKS {
        return Err(Sense::INVALID_FIELD);
    }
    let (off, len) = range(lun, lba, blocks)?;
    let mut block = [0u8; BLOCK as usize];
    if !no_data {
        if r.available_bytes() < block.len() {
            return Err(Sense::INVALID_FIELD);
        }
        r.read_exact(&mut block).map_err(|_| Sense::INVALID_FIELD)?;
    }
    let disk = lun.disk()?;
    let failed = |e: DiskError| {
        tracing::warn!("virtio-scsi write same: {e}");
        Sense::WRITE_ERROR
    };
    if block.iter().all(|&b| b == 0) {
        return disk.zero_range(off, len, unmap_bit).map_err(failed);
    }
    buf.clear();
    while buf.len() < CHUNK {
        buf.extend_from_slice(&block);
    }
    let mut at = off;
    while at < off + len {
        let n = usize::try_from((off + len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        disk.write_at(&buf[..n], at).map_err(failed)?;
        at += n as u64;
    }
    Ok(())
}

fn inquiry(lun: Option<&Lun>, cdb: &[u8], w: &mut Writer<'_>) -> Outcome {
    let alloc = be16(&cdb[3..5]) as usize;
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let Some(lun) = lun else {
        // No LUN here, but a target that answers: peripheral qualifier 3, SPC-3 (Linux then
        // asks REPORT LUNS).
        if evpd {
            return Err(Sense::LUN_NOT_SUPPORTED);
        }
        let mut d = [0u8; 36];
        d[0] = 0x7f;
        d[2] = 5;
        d[3] = 2;
        d[4] = 31;
        return reply(w, &d, alloc);
    };
    if !evpd {
        if page != 0 {
            return Err(Sense::INVALID_FIELD);
        }
        let mut d = [0u8; 36];
        d[0] = 0x00; // direct-access block device, connected
        d[2] = 5; // SPC-3
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = 31;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(VENDOR);
        d[16..32].copy_from_slice(PRODUCT);
        d[32..36].copy_from_slice(REVISION);
        return reply(w, &d, alloc);
    }
    let mut d = vec![0u8, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]),
        0x80 => d.extend_from_slice(&lun.serial),
        0x83 => {
            // One designator: T10 vendor ID, ASCII, of the logical unit.
            let id_len = u8::try_from(VENDOR.len() + lun.serial.len()).unwrap_or(u8::MAX);
            d.extend_from_slice(&[0x02, 0x01, 0x00, id_len]);
            d.extend_from_slice(VENDOR);
            d.extend_from_slice(&lun.serial);
        }
        0xb0 => {
            let mut p = [0u8; 60];
            p[0] = 0x01; // WSNZ: WRITE SAME of zero blocks is refused
            p[4..8].copy_from_slice(&MAX_TRANSFER.to_be_bytes());
            if !lun.readonly {
                p[16..20].copy_from_slice(&MAX_ZERO_BLOCKS.to_be_bytes());
                p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                p[24..28].copy_from_slice(&1u32.to_be_bytes()); // unmap granularity
                p[32..40].copy_from_slice(&u64::from(MAX_ZERO_BLOCKS).to_be_bytes());
            }
            d.extend_from_slice(&p);
        }
        0xb1 => {
            let mut p = [0u8; 60];
            p[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            d.extend_from_slice(&p);
        }
        0xb2 => {
            if lun.readonly {
                d.extend_from_slice(&[0, 0, 0, 0]);
            } else {
                // UNMAP, WRITE SAME(16) and (10) with UNMAP; unmapped blocks read zeros;
                // thin provisioned.
                d.extend_from_slice(&[0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]);
            }
        }
        _ => return Err(Sense::INVALID_FIELD),
    }
    let n = u16::try_from(d.len() - 4).unwrap_or(u16::MAX);
    d[2..4].copy_from_slice(&n.to_be_bytes());
    reply(w, &d, alloc)
}

fn report_luns(cdb: &[u8], w: &mut Writer<'_>, present: &[u16]) -> Outcome {
    let alloc = be32(&cdb[6..10]) as usize;
    if alloc < 16 || cdb[2] > 2 {
        return Err(Sense::INVALID_FIELD);
    }
    // Select report 1: well-known LUNs only, of which there are none.
    let listed: &[u16] = if cdb[2] == 1 { &[] } else { present };
    let mut d = vec![0u8; 8];
    for &lun in listed.iter().filter(|&&l| l < MAX_LUNS) {
        // Peripheral device addressing: bus 0, the LUN in the second byte.
        let mut e = [0u8; 8];
        e[1] = u8::try_from(lun).unwrap_or(u8::MAX);
        d.extend_from_slice(&e);
    }
    let n = u32::try_from(d.len() - 8).unwrap_or(u32::MAX);
    d[0..4].copy_from_slice(&n.to_be_bytes());
    reply(w, &d, alloc)
}

fn mode_sense(lun: &Lun, cdb: &[u8], ten: bool, w: &mut Writer<'_>) -> Outcome {
    let control = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        be16(&cdb[7..9]) as usize
    } else {
        usize::from(cdb[4])
    };
    if control == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    let changeable = control == 1;
    // Caching page: write cache on (data reaches the host's page cache first; SYNCHRONIZE
    // CACHE makes it durable), nothing changeable.
    let caching = {
        let mut p = [0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        if !changeable {
            p[2] = 0x04; // WCE
        }
        p
    };
    let control_page = {
        let mut p = [0u8; 12];
        p[0] = 0x0a;
        p[1] = 0x0a;
        p
    };
    let mut pages = Vec::new();
    match (page, subpage) {
        (0x08, 0) => pages.extend_from_slice(&caching),
        (0x0a, 0) => pages.extend_from_slice(&control_page),
        (0x3f, 0 | 0xff) => {
            pages.extend_from_slice(&caching);
            pages.extend_from_slice(&control_page);
        }
        _ => return Err(Sense::INVALID_FIELD),
    }
    let wp = if lun.readonly { 0x80 } else { 0 };
    let mut d = if ten {
        let n = u16::try_from(6 + pages.len()).unwrap_or(u16::MAX);
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&n.to_be_bytes());
        h[3] = wp;
        h
    } else {
        vec![u8::try_from(3 + pages.len()).unwrap_or(u8::MAX), 0, wp, 0]
    };
    d.extend_from_slice(&pages);
    reply(w, &d, alloc)
}
