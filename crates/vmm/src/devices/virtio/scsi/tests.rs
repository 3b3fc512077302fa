//! The controller against images, driven the way Linux's virtio_scsi driver drives it.

use std::path::PathBuf;
use std::sync::Arc;

use super::commands::Sense;
use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::testing::{Driver, WRITE};

const REQ: u64 = 0x20000;
const RESP: u64 = 0x21000;
const EVENT: u64 = 0x22000;
const CTRL: u64 = 0x23000;
const OUT: u64 = 0x100000;
const DATA: u64 = 0x200000;
const REQUEST_Q: u16 = FIRST_REQUEST_QUEUE as u16;

/// A test image of `size` bytes.
fn image(name: &str, size: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-vscsi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    crate::disk::create(&path, size).unwrap();
    path
}

/// A controller with one request queue, set up by the test driver (hot-plug accepted).
struct Ctl {
    d: Driver,
    images: Vec<PathBuf>,
}

/// What one command came back with.
#[derive(Debug)]
struct Reply {
    status: u8,
    response: u8,
    sense: Option<Sense>,
    residual: u32,
    data: Vec<u8>,
}

impl Ctl {
    /// LUNs `luns` (number, read-only), each on a fresh 1 MiB image.
    fn new(name: &str, luns: &[(u16, bool)]) -> Ctl {
        let mut scsi = Scsi::new(1).unwrap();
        let mut images = Vec::new();
        for &(n, ro) in luns {
            let p = image(&format!("{name}-{n}"), 1 << 20);
            scsi.attach(Some(n), Disk::open(&p, ro).unwrap()).unwrap();
            images.push(p);
        }
        let mut d = Driver::new(name, Box::new(scsi), |offered| {
            assert_ne!(offered & F_HOTPLUG, 0, "HOTPLUG offered");
            offered
        });
        let mut num_queues = [0u8; 4];
        let mut max_lun = [0u8; 4];
        d.t.read(0x100, &mut num_queues);
        d.t.read(0x100 + 32, &mut max_lun);
        assert_eq!(u32::from_le_bytes(num_queues), 1);
        assert_eq!(u32::from_le_bytes(max_lun), 255);
        Ctl { d, images }
    }

    fn scsi(&mut self) -> &mut Scsi {
        self.d
            .t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Scsi>()
            .unwrap()
    }

    /// Sends `cdb` to `lun` (Linux's addressing), with `out` as data-out and room for
    /// `in_len` bytes of data-in.
    fn cmd(&mut self, lun: u16, cdb: &[u8], out: &[u8], in_len: u32) -> Reply {
        self.cmd_at([1, 0, 0x40 | (lun >> 8) as u8, lun as u8], cdb, out, in_len)
    }

    fn cmd_at(&mut self, addr: [u8; 4], cdb: &[u8], out: &[u8], in_len: u32) -> Reply {
        let mut req = [0u8; REQUEST_HEADER];
        req[0..4].copy_from_slice(&addr);
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.d.ram.write(REQ, &req).unwrap();
        self.d.ram.write(RESP, &[0xee; RESPONSE_HEADER]).unwrap();
        self.d.ram.write(OUT, out).unwrap();
        let mut chain = vec![(REQ, REQUEST_HEADER as u32, 0)];
        if !out.is_empty() {
            chain.push((OUT, out.len() as u32, 0));
        }
        chain.push((RESP, RESPONSE_HEADER as u32, WRITE));
        if in_len > 0 {
            chain.push((DATA, in_len, WRITE));
        }
        let (_, used) = self.d.post(REQUEST_Q, 0, &chain);
        let mut resp = [0u8; RESPONSE_HEADER];
        self.d.ram.read(RESP, &mut resp).unwrap();
        let written_in = used.saturating_sub(RESPONSE_HEADER as u32);
        let mut data = vec![0u8; written_in as usize];
        self.d.ram.read(DATA, &mut data).unwrap();
        Reply {
            status: resp[10],
            response: resp[11],
            sense: sense_of(&resp),
            residual: u32::from_le_bytes(resp[4..8].try_into().unwrap()),
            data,
        }
    }

    /// A GOOD command's data-in.
    fn good(&mut self, lun: u16, cdb: &[u8], out: &[u8], in_len: u32) -> Vec<u8> {
        let r = self.cmd(lun, cdb, out, in_len);
        assert_eq!(
            (r.response, r.status, r.sense),
            (S_OK, commands::GOOD, None),
            "{cdb:02x?}"
        );
        r.data
    }

    /// A command that must end in CHECK CONDITION with `sense`.
    fn check(&mut self, lun: u16, cdb: &[u8], out: &[u8], in_len: u32, sense: Sense) {
        let r = self.cmd(lun, cdb, out, in_len);
        assert_eq!(r.response, S_OK, "{cdb:02x?}");
        assert_eq!(r.status, commands::CHECK_CONDITION, "{cdb:02x?}");
        assert_eq!(r.sense, Some(sense), "{cdb:02x?}");
    }

    /// Posts `n` event buffers of 16 bytes, at descriptors 0.., and notifies.
    fn post_event_buffers(&mut self, n: u16) {
        for i in 0..n {
            self.d.add(
                EVENT_QUEUE as u16,
                i,
                &[(EVENT + u64::from(i) * 16, 16, WRITE)],
            );
        }
        self.d.notify(EVENT_QUEUE as u16);
    }

    /// Events delivered since the last call: (event, lun, reason).
    fn events(&mut self) -> Vec<(u32, u16, u32)> {
        self.d
            .used(EVENT_QUEUE as u16)
            .into_iter()
            .map(|(head, len)| {
                assert_eq!(len, 16);
                let mut e = [0u8; 16];
                self.d
                    .ram
                    .read(EVENT + u64::from(head) * 16, &mut e)
                    .unwrap();
                assert_eq!(e[4], 1);
                (
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    u16::from(e[6] & 0x3f) << 8 | u16::from(e[7]),
                    u32::from_le_bytes(e[12..16].try_into().unwrap()),
                )
            })
            .collect()
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        for p in &self.images {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}

#[test]
fn the_target_reports_its_luns_and_each_lun_says_what_it_is() {
    let mut c = Ctl::new("inquiry", &[(0, false), (5, true)]);
    // Standard INQUIRY: a connected disk, SPC-3, command queuing, Ferry's names.
    let d = c.good(0, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(d.len(), 36);
    assert_eq!((d[0], d[2], d[7] & 0x02), (0x00, 5, 0x02));
    assert_eq!(&d[8..16], b"FERRY   ");
    // Allocation length cuts the answer.
    assert_eq!(c.good(0, &[0x12, 0, 0, 0, 5, 0], &[], 96).len(), 5);
    // No LUN 3: peripheral qualifier 3, and REPORT LUNS lists 0 and 5.
    let d = c.good(3, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(d[0], 0x7f);
    let d = c.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(be32(&d[0..4]), 16);
    assert_eq!((d[8 + 1], d[16 + 1]), (0, 5));
    // REPORT LUNS is the target's: asked of an absent LUN, it answers the same.
    let again = c.good(7, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(again, d);
    // VPD: the pages Linux reads.
    let d = c.good(0, &[0x12, 1, 0x00, 0, 64, 0], &[], 64);
    assert_eq!(&d[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let serial = c.good(0, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
    assert_eq!(
        &serial[4..],
        b"ferry-vscsi-inquiry-",
        "the file name, cut to 20 bytes"
    );
    let id = c.good(0, &[0x12, 1, 0x83, 0, 64, 0], &[], 64);
    assert_eq!(&id[4..6], &[0x02, 0x01]);
    assert_eq!(&id[8..16], b"FERRY   ");
    let limits = c.good(0, &[0x12, 1, 0xb0, 0, 64, 0], &[], 64);
    assert_eq!(limits.len(), 64);
    assert_eq!(be32(&limits[8..12]), commands::MAX_TRANSFER);
    assert_eq!(be32(&limits[20..24]), 1 << 21, "max unmap LBA count");
    let rot = c.good(0, &[0x12, 1, 0xb1, 0, 64, 0], &[], 64);
    assert_eq!(&rot[4..6], &[0, 1], "non-rotating");
    let prov = c.good(0, &[0x12, 1, 0xb2, 0, 64, 0], &[], 64);
    assert_eq!(prov[5] & 0xe0, 0xe0, "UNMAP and WRITE SAME with UNMAP");
    // A read-only LUN offers no unmapping.
    let prov = c.good(5, &[0x12, 1, 0xb2, 0, 64, 0], &[], 64);
    assert_eq!(prov[5], 0);
    c.check(0, &[0x12, 1, 0x99, 0, 64, 0], &[], 64, Sense::INVALID_FIELD);
    c.check(0, &[0x12, 0, 0x80, 0, 64, 0], &[], 64, Sense::INVALID_FIELD);
    // Capacity, both ways.
    let d = c.good(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!((be32(&d[0..4]), be32(&d[4..8])), (2047, 512));
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let d = c.good(0, &rc16, &[], 32);
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 2047);
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    // MODE SENSE: write cache on; write-protect only on the read-only LUN.
    let d = c.good(0, &[0x1a, 0, 0x08, 0, 255, 0], &[], 255);
    assert_eq!(
        (d[0] as usize + 1, d[2] & 0x80, d[4], d[6] & 0x04),
        (d.len(), 0, 0x08, 0x04)
    );
    let d = c.good(5, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(d[2] & 0x80, 0x80);
    let mut ms10 = [0u8; 10];
    ms10[0] = 0x5a;
    ms10[2] = 0x08;
    ms10[8] = 255;
    let d = c.good(5, &ms10, &[], 255);
    assert_eq!((d[3] & 0x80, d[8]), (0x80, 0x08));
    c.check(
        0,
        &[0x1a, 0, 0xc8, 0, 255, 0],
        &[],
        255,
        Sense::SAVING_NOT_SUPPORTED,
    );
    c.check(
        0,
        &[0x1a, 0, 0x19, 0, 255, 0],
        &[],
        255,
        Sense::INVALID_FIELD,
    );
    // The rest of what sd and scsi_scan send.
    c.good(0, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    c.good(0, &[0x1b, 0, 0, 0, 1, 0], &[], 0);
    let sense = c.good(0, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!((sense[0], sense[2]), (0x70, 0));
}

#[test]
fn data_written_reads_back_from_the_image_in_every_command_size() {
    let mut c = Ctl::new("rw", &[(2, false)]);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    c.good(2, &write10(100, 16), &pattern, 0);
    let mut on_disk = vec![0u8; 8192];
    Disk::open(&c.images[0], true).unwrap_err(); // held read-write by the controller
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&c.images[0])
        .unwrap()
        .read_exact_at(&mut on_disk, 100 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern, "acknowledged data is in the image");
    assert_eq!(c.good(2, &read10(100, 16), &[], 8192), pattern);
    // READ(6), (12), (16) of the same blocks.
    assert_eq!(c.good(2, &[0x08, 0, 0, 100, 16, 0], &[], 8192), pattern);
    let mut r12 = [0u8; 12];
    r12[0] = 0xa8;
    r12[2..6].copy_from_slice(&100u32.to_be_bytes());
    r12[6..10].copy_from_slice(&16u32.to_be_bytes());
    assert_eq!(c.good(2, &r12, &[], 8192), pattern);
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[2..10].copy_from_slice(&100u64.to_be_bytes());
    r16[10..14].copy_from_slice(&16u32.to_be_bytes());
    assert_eq!(c.good(2, &r16, &[], 8192), pattern);
    // WRITE(16) with FUA, then SYNCHRONIZE CACHE(10) and (16).
    let mut w16 = r16;
    w16[0] = 0x8a;
    w16[1] = 0x08;
    w16[2..10].copy_from_slice(&200u64.to_be_bytes());
    c.good(2, &w16, &pattern, 0);
    c.good(2, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    c.good(
        2,
        &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
        0,
    );
    assert_eq!(c.good(2, &read10(200, 16), &[], 8192), pattern);
    // A read into a larger buffer says how much it left.
    let r = c.cmd(2, &read10(100, 1), &[], 4096);
    assert_eq!(
        (r.status, r.residual, r.data.len()),
        (commands::GOOD, 3584, 512)
    );
    // Past the end, or a buffer too small: refused, nothing moved.
    c.check(2, &read10(2047, 2), &[], 1024, Sense::LBA_OUT_OF_RANGE);
    c.check(2, &write10(2040, 16), &pattern, 0, Sense::LBA_OUT_OF_RANGE);
    c.check(2, &read10(0, 16), &[], 512, Sense::INVALID_FIELD);
    c.check(2, &write10(0, 16), &pattern[..512], 0, Sense::INVALID_FIELD);
    assert_eq!(c.good(2, &read10(0, 1), &[], 512), vec![0u8; 512]);
}

#[test]
fn a_read_only_lun_refuses_every_write_with_data_protect() {
    let mut c = Ctl::new("ro", &[(0, true)]);
    let block = [0x5au8; 512];
    c.check(0, &write10(0, 1), &block, 0, Sense::WRITE_PROTECTED);
    c.check(0, &[0x0a, 0, 0, 0, 1, 0], &block, 0, Sense::WRITE_PROTECTED);
    c.check(
        0,
        &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 8, 0],
        &block,
        0,
        Sense::WRITE_PROTECTED,
    );
    c.check(
        0,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &[0; 24],
        0,
        Sense::WRITE_PROTECTED,
    );
    assert_eq!(c.good(0, &read10(0, 1), &[], 512), vec![0u8; 512]);
}

#[test]
fn unmap_and_write_same_zero_the_range_and_give_space_back() {
    let mut c = Ctl::new("unmap", &[(0, false)]);
    let allocated = |p: &PathBuf| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let data = vec![0xa5u8; 128 * 512];
    c.good(0, &write10(0, 128), &data, 0);
    c.good(0, &write10(512, 128), &data, 0);
    c.good(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    let before = allocated(&c.images[0]);
    // UNMAP blocks 0..128: a hole, reading zeros.
    let mut list = vec![0u8; 24];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&0u64.to_be_bytes());
    list[16..20].copy_from_slice(&128u32.to_be_bytes());
    c.good(0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    assert_eq!(
        c.good(0, &read10(0, 128), &[], 128 * 512),
        vec![0u8; 128 * 512]
    );
    assert!(allocated(&c.images[0]) < before, "UNMAP gave no space back");
    // WRITE SAME(16) with UNMAP of a zero block over 512..640.
    let mut ws16 = [0u8; 16];
    ws16[0] = 0x93;
    ws16[1] = 0x08;
    ws16[2..10].copy_from_slice(&512u64.to_be_bytes());
    ws16[10..14].copy_from_slice(&128u32.to_be_bytes());
    c.good(0, &ws16, &[0u8; 512], 0);
    assert_eq!(
        c.good(0, &read10(512, 128), &[], 128 * 512),
        vec![0u8; 128 * 512]
    );
    assert_eq!(allocated(&c.images[0]), 0, "both ranges are holes");
    // WRITE SAME(10) of a non-zero block writes it over the range.
    let block: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    c.good(0, &[0x41, 0, 0, 0, 0, 10, 0, 0, 3, 0], &block, 0);
    assert_eq!(c.good(0, &read10(10, 3), &[], 1536), block.repeat(3));
    // Bad lists and ranges are refused before anything is done.
    c.check(
        0,
        &[0x41, 0, 0, 0, 0, 10, 0, 0, 0, 0],
        &block,
        0,
        Sense::INVALID_FIELD,
    );
    let mut past = list.clone();
    past[8..16].copy_from_slice(&2040u64.to_be_bytes());
    past[16..20].copy_from_slice(&16u32.to_be_bytes());
    c.check(
        0,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &past,
        0,
        Sense::LBA_OUT_OF_RANGE,
    );
    let mut odd = list.clone();
    odd[2..4].copy_from_slice(&15u16.to_be_bytes());
    c.check(
        0,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &odd,
        0,
        Sense::PARAMETER_LENGTH,
    );
    assert_eq!(c.good(0, &read10(10, 3), &[], 1536), block.repeat(3));
}

#[test]
fn bad_requests_get_a_clean_answer_and_never_crash() {
    let mut c = Ctl::new("bad", &[(0, false)]);
    // Unknown opcode, absent LUN, target other than 0.
    c.check(0, &[0xee, 0, 0, 0, 0, 0], &[], 0, Sense::INVALID_OPCODE);
    c.check(9, &read10(0, 1), &[], 512, Sense::LUN_NOT_SUPPORTED);
    let r = c.cmd_at([1, 3, 0x40, 0], &read10(0, 1), &[], 512);
    assert_eq!(r.response, S_BAD_TARGET);
    let r = c.cmd_at([2, 0, 0x40, 0], &read10(0, 1), &[], 512);
    assert_eq!(r.response, S_BAD_TARGET);
    let sense = c.good(9, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(
        (sense[2], sense[12]),
        (0x05, 0x25),
        "REQUEST SENSE of an absent LUN"
    );
    // A request header cut short.
    c.d.ram.write(RESP, &[0xee; RESPONSE_HEADER]).unwrap();
    let (_, len) = c.d.post(
        REQUEST_Q,
        0,
        &[(REQ, 20, 0), (RESP, RESPONSE_HEADER as u32, WRITE)],
    );
    assert_eq!(len, RESPONSE_HEADER as u32);
    let mut resp = [0u8; RESPONSE_HEADER];
    c.d.ram.read(RESP, &mut resp).unwrap();
    assert_eq!(resp[11], S_OVERRUN);
    // No room for a response: returned unused.
    let (_, len) = c.d.post(
        REQUEST_Q,
        0,
        &[(REQ, REQUEST_HEADER as u32, 0), (RESP, 10, WRITE)],
    );
    assert_eq!(len, 0);
    // Buffers outside guest RAM.
    let (_, len) = c.d.post(
        REQUEST_Q,
        0,
        &[(REQ, REQUEST_HEADER as u32, 0), (0xF000_0000, 512, WRITE)],
    );
    assert_eq!(len, 0);
    // And it still serves good requests.
    c.good(0, &read10(0, 1), &[], 512);
}

#[test]
fn random_descriptor_tables_never_crash_the_controller() {
    let mut c = Ctl::new("garbage", &[(0, false), (1, true)]);
    for q in 0..3 {
        for seed in 1..=10 {
            c.d.garbage(q, seed * 31 + u64::from(q), 40);
        }
    }
    // A driver starting over finds a working controller.
    c.d.reset(|offered| offered);
    c.good(0, &read10(0, 1), &[], 512);
}

#[test]
fn task_management_and_event_queries_are_answered() {
    let mut c = Ctl::new("tmf", &[(0, false)]);
    let tmf = |c: &mut Ctl, subtype: u32, lun: [u8; 4]| {
        let mut req = [0u8; 24];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..12].copy_from_slice(&lun);
        c.d.ram.write(CTRL, &req).unwrap();
        c.d.ram.write(CTRL + 0x100, &[0xee]).unwrap();
        let (_, len) = c.d.post(0, 0, &[(CTRL, 24, 0), (CTRL + 0x100, 1, WRITE)]);
        assert_eq!(len, 1);
        let mut r = [0u8];
        c.d.ram.read(CTRL + 0x100, &mut r).unwrap();
        r[0]
    };
    // Abort task, LUN reset, query task set: done (nothing is ever in flight).
    for sub in [0, 5, 7] {
        assert_eq!(tmf(&mut c, sub, [1, 0, 0x40, 0]), S_OK);
    }
    assert_eq!(tmf(&mut c, 5, [1, 0, 0x40, 9]), S_INCORRECT_LUN);
    assert_eq!(tmf(&mut c, 5, [1, 4, 0x40, 0]), S_BAD_TARGET);
    assert_eq!(tmf(&mut c, 99, [1, 0, 0x40, 0]), S_FUNCTION_REJECTED);
    // An asynchronous-notification query: no events supported.
    let mut an = [0u8; 16];
    an[0..4].copy_from_slice(&T_AN_QUERY.to_le_bytes());
    an[4] = 1;
    c.d.ram.write(CTRL, &an).unwrap();
    let (_, len) = c.d.post(0, 0, &[(CTRL, 16, 0), (CTRL + 0x100, 5, WRITE)]);
    assert_eq!(len, 5);
    let mut r = [0u8; 5];
    c.d.ram.read(CTRL + 0x100, &mut r).unwrap();
    assert_eq!(r, [0, 0, 0, 0, S_OK]);
}

#[test]
fn luns_come_and_go_and_the_guest_hears_of_it_even_without_buffers() {
    let mut c = Ctl::new("hotplug", &[(0, false)]);
    let extra = image("hotplug-extra", 1 << 20);
    c.images.push(extra.clone());
    c.post_event_buffers(2);
    assert!(c.events().is_empty(), "no event before a change");
    // Add: the lowest free LUN, the guest told.
    let n = c
        .scsi()
        .plug(None, Disk::open(&extra, false).unwrap())
        .unwrap();
    assert_eq!(n, 1);
    c.d.t.kick_queue(EVENT_QUEUE);
    // The spec's numbers, written out (virtio 1.2, 5.6.6.3.1): TRANSPORT_RESET 1, RESCAN 1.
    assert_eq!(c.events(), vec![(1, 1, 1)]);
    let d = c.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(be32(&d[0..4]), 16, "REPORT LUNS lists the new LUN");
    c.good(1, &write10(0, 1), &[7u8; 512], 0);
    // Refusals change nothing.
    let again = Disk::open(&c.images[0], true);
    assert!(again.is_err(), "LUN 0's image is held read-write");
    assert!(matches!(
        c.scsi().check_add(Some(1), std::path::Path::new("/x")),
        Err(ScsiError::LunTaken(1, _))
    ));
    assert!(matches!(
        c.scsi().check_add(None, &extra),
        Err(ScsiError::AlreadyAttached(_, 1))
    ));
    assert!(matches!(
        c.scsi().check_add(Some(256), std::path::Path::new("/x")),
        Err(ScsiError::BadLun(256))
    ));
    assert!(matches!(c.scsi().unplug(7), Err(ScsiError::NoSuchLun(7))));
    // Remove: flushed, closed (lock released), the guest told.
    let info = c.scsi().unplug(1).unwrap();
    assert_eq!((info.lun, info.path.as_path()), (1, extra.as_path()));
    c.d.t.kick_queue(EVENT_QUEUE);
    assert_eq!(c.events(), vec![(1, 1, 2)], "TRANSPORT_RESET, REMOVED");
    let reopened = Disk::open(&extra, false).expect("the lock went with the LUN");
    let mut b = [0u8; 512];
    reopened.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [7u8; 512], "the write reached the image");
    drop(reopened);
    c.check(1, &read10(0, 1), &[], 512, Sense::LUN_NOT_SUPPORTED);
    // No event buffers left: the add is remembered as "missed" and said with the next one.
    let n = c
        .scsi()
        .plug(Some(200), Disk::open(&extra, true).unwrap())
        .unwrap();
    assert_eq!(n, 200);
    c.d.t.kick_queue(EVENT_QUEUE);
    assert!(c.events().is_empty());
    c.post_event_buffers(1);
    assert_eq!(c.events(), vec![(0x8000_0000, 0, 0)], "EVENTS_MISSED");
    let d = c.good(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!((be32(&d[0..4]), d[16 + 1]), (16, 200));
}

#[test]
fn state_round_trips_with_luns_and_undelivered_events() {
    let mut c = Ctl::new("state", &[(0, false), (3, true)]);
    let extra = image("state-extra", 1 << 20);
    c.images.push(extra.clone());
    c.scsi()
        .plug(Some(4), Disk::open(&extra, false).unwrap())
        .unwrap();
    let saved = c.d.t.save();
    let DeviceState::Scsi(s) = &saved.device else {
        panic!("{:?}", saved.device)
    };
    assert_eq!(
        s.luns.iter().map(|l| l.lun).collect::<Vec<_>>(),
        vec![0, 3, 4]
    );
    assert_eq!(
        s.pending,
        vec![ScsiEvent {
            lun: 4,
            removed: false
        }]
    );
    assert!(s.luns[1].readonly);
    // The disks are handed over, then opened by the restore from the state alone.
    c.d.t.release().unwrap();
    let scsi = Scsi::restore((), s).unwrap();
    let ram = Arc::clone(&c.d.ram);
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let back = MmioTransport::restore((Box::new(scsi), ram, irq), &saved).unwrap();
    assert_eq!(back.save(), saved);
    // A LUN set that is not the controller's is refused.
    let mut other = saved.clone();
    if let DeviceState::Scsi(s) = &mut other.device {
        s.luns.pop();
    }
    let mut wrong = Scsi::new(1).unwrap();
    assert!(matches!(
        wrong.restore_state(&other.device),
        Err(DeviceStateError::LunSet { .. })
    ));
    // A disk that changed size while handed over is refused.
    drop(back);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&extra)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    assert!(matches!(
        Scsi::restore((), s),
        Err(ScsiError::Resized { lun: 4, .. })
    ));
}

/// A loop device over a fresh image, detached on drop.
struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop {
    fn new(name: &str) -> Loop {
        let backing = image(name, 1 << 20);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup (util-linux) is needed for the pass-through tests");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop { dev, backing }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

#[test]
fn a_host_block_device_is_a_lun_like_an_image() {
    use std::os::unix::fs::FileExt;
    let lo = Loop::new("passthrough");
    let mut c = Ctl::new("passthrough", &[]);
    let n = c
        .scsi()
        .plug(None, Disk::open(&lo.dev, false).unwrap())
        .unwrap();
    assert_eq!(
        c.scsi().luns()[0].size,
        1 << 20,
        "the device's size, not its inode's"
    );
    assert!(
        Disk::open(&lo.dev, true).is_err(),
        "the device is locked like an image"
    );
    let d = c.good(n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(be32(&d[0..4]), 2047);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    c.good(n, &write10(8, 8), &data, 0);
    c.good(n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(c.good(n, &read10(8, 8), &[], 4096), data);
    // Unmapping a block device zeroes the range (whatever the device does underneath).
    let mut list = vec![0u8; 24];
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&8u64.to_be_bytes());
    list[16..20].copy_from_slice(&4u32.to_be_bytes());
    c.good(n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    assert_eq!(c.good(n, &read10(8, 4), &[], 2048), vec![0u8; 2048]);
    // Counted for utilization: reads and writes of data, not the other commands.
    let io = crate::devices::virtio::VirtioDevice::io(c.scsi());
    assert_eq!(
        (io.disk_read_bytes, io.disk_write_bytes),
        (4096 + 2048, 4096)
    );
    c.scsi().unplug(n).unwrap();
    // Through the device to the file beneath it.
    let mut under = vec![0u8; 2048];
    std::fs::File::open(&lo.backing)
        .unwrap()
        .read_exact_at(&mut under, 12 * 512)
        .unwrap();
    assert_eq!(under, data[2048..], "the writes reached the backing file");
    Disk::open(&lo.dev, false).expect("the lock went with the LUN");
}

#[test]
fn a_full_controller_refuses_another_disk_and_changes_nothing() {
    let mut scsi = Scsi::new(1).unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-vscsi-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..MAX_LUNS {
        let p = dir.join(format!("{i}.img"));
        crate::disk::create(&p, 512).unwrap();
        assert_eq!(scsi.attach(None, Disk::open(&p, true).unwrap()).unwrap(), i);
    }
    let extra = dir.join("extra.img");
    crate::disk::create(&extra, 512).unwrap();
    assert!(matches!(scsi.check_add(None, &extra), Err(ScsiError::Full)));
    let disk = Disk::open(&extra, false).unwrap();
    assert!(matches!(scsi.plug(None, disk), Err(ScsiError::Full)));
    assert_eq!(scsi.luns().len(), usize::from(MAX_LUNS));
    // The refused disk was dropped, not kept: its lock is free.
    Disk::open(&extra, false).expect("the refused disk is not held");
    let _ = std::fs::remove_dir_all(&dir);
}
