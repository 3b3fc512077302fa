//! A test driver for virtio-mmio devices: rings laid out in guest RAM by hand, registers
//! programmed through the transport the way Linux's driver does, buffers posted and notified,
//! results read back from the used rings. Also what the fuzz targets (`fuzz/`) drive, through
//! the `fuzzing` feature.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::memory::GuestRam;

/// Entries the test driver gives each queue.
pub const QSIZE: u16 = 16;
/// Descriptor flag: device writes.
pub const WRITE: u16 = 2;
const NEXT: u16 = 1;
/// Where queue `q`'s rings live: 16 KiB apart from 0x10000.
const RINGS: u64 = 0x10000;

fn rings(q: u16) -> (u64, u64, u64) {
    let base = RINGS + u64::from(q) * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// A driver bound to one device.
pub struct Driver {
    /// The transport under test.
    pub t: MmioTransport,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The device's interrupt line.
    pub irq: EventFd,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

/// Writes a 32-bit register.
pub fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Reads a 32-bit register.
pub fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    /// Negotiates `accept(offered)` features and sets up every queue of `device`.
    pub fn new(name: &str, device: Box<dyn VirtioDevice>, accept: impl Fn(u64) -> u64) -> Driver {
        let ram = Arc::new(GuestRam::new(name, 16 << 20).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let nq = device.queue_max_sizes().len();
        let dtype = device.device_type();
        let mut t = MmioTransport::new(device, Arc::clone(&ram), irq.try_clone().unwrap());
        assert_eq!(r32(&mut t, 0x08), dtype);
        let mut d = Driver {
            t,
            ram,
            irq,
            avail_idx: vec![0; nq],
            used_seen: vec![0; nq],
        };
        d.init(accept);
        d
    }

    /// Resets the device (status 0) and sets it up again from scratch on zeroed rings, as a
    /// driver reloading would: the device and its backend are kept (a fuzz target reuses
    /// one TAP this way).
    pub fn reset(&mut self, accept: impl Fn(u64) -> u64) {
        w32(&mut self.t, 0x70, 0);
        assert_eq!(r32(&mut self.t, 0x70), 0, "reset");
        let nq = self.avail_idx.len() as u16;
        for q in 0..nq {
            let (d, _, _) = rings(q);
            self.ram.write(d, &[0u8; 0x3000]).unwrap();
        }
        self.avail_idx.fill(0);
        self.used_seen.fill(0);
        let _ = self.irq.read();
        self.init(accept);
    }

    fn init(&mut self, accept: impl Fn(u64) -> u64) {
        let nq = self.avail_idx.len();
        let t = &mut self.t;
        assert_eq!(r32(t, 0x00), 0x7472_6976);
        assert_eq!(r32(t, 0x04), 2);
        w32(t, 0x70, 1 | 2);
        w32(t, 0x14, 0);
        let low = u64::from(r32(t, 0x10));
        w32(t, 0x14, 1);
        let high = u64::from(r32(t, 0x10));
        let offered = low | high << 32;
        assert_ne!(offered & super::F_VERSION_1, 0, "VERSION_1 offered");
        let acked = accept(offered) | super::F_VERSION_1;
        w32(t, 0x24, 0);
        w32(t, 0x20, acked as u32);
        w32(t, 0x24, 1);
        w32(t, 0x20, (acked >> 32) as u32);
        w32(t, 0x70, 1 | 2 | 8);
        assert_eq!(r32(t, 0x70) & 8, 8, "features accepted");
        for q in 0..nq as u16 {
            w32(t, 0x30, u32::from(q));
            assert!(r32(t, 0x34) >= u32::from(QSIZE));
            w32(t, 0x38, u32::from(QSIZE));
            let (d, a, u) = rings(q);
            for (off, addr) in [(0x80, d), (0x90, a), (0xa0, u)] {
                w32(t, off, addr as u32);
                w32(t, off + 4, 0);
            }
            w32(t, 0x44, 1);
            assert_eq!(r32(t, 0x44), 1, "queue {q} live");
        }
        w32(t, 0x70, 1 | 2 | 8 | 4);
        assert_eq!(r32(t, 0x70), 1 | 2 | 8 | 4, "driver running");
    }

    /// Writes a chain of (addr, len, flags) descriptors at table index `first` of queue `q` and
    /// makes it available (without notifying).
    pub fn add(&mut self, q: u16, first: u16, descs: &[(u64, u32, u16)]) {
        let (dt, _, _) = rings(q);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = u64::from(first) + i as u64;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < descs.len() { NEXT } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&((first + i as u16 + 1) % QSIZE).to_le_bytes());
            self.ram.write(dt + idx * 16, &d).unwrap();
        }
        self.add_head(q, first);
    }

    /// Makes the chain at descriptor `head` of queue `q` available as it is.
    pub fn add_head(&mut self, q: u16, head: u16) {
        let (_, av, _) = rings(q);
        let qi = usize::from(q);
        let slot = u64::from(self.avail_idx[qi] % QSIZE);
        self.ram
            .write(av + 4 + slot * 2, &head.to_le_bytes())
            .unwrap();
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
        self.ram
            .write(av + 2, &self.avail_idx[qi].to_le_bytes())
            .unwrap();
    }

    /// Writes raw descriptor `idx` of queue `q`.
    pub fn raw_desc(&self, q: u16, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let (dt, _, _) = rings(q);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram.write(dt + u64::from(idx) * 16, &d).unwrap();
    }

    /// Notifies queue `q`.
    pub fn notify(&mut self, q: u16) {
        w32(&mut self.t, 0x50, u32::from(q));
    }

    /// Used elements of queue `q` not seen before: (head, len). Acknowledges the interrupt
    /// and checks one was raised when there are any.
    pub fn used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let (_, _, ur) = rings(q);
        let qi = usize::from(q);
        let mut idx = [0u8; 2];
        self.ram.read(ur + 2, &mut idx).unwrap();
        let now = u16::from_le_bytes(idx);
        let mut out = Vec::new();
        while self.used_seen[qi] != now {
            let slot = u64::from(self.used_seen[qi] % QSIZE);
            let mut e = [0u8; 8];
            self.ram.read(ur + 4 + slot * 8, &mut e).unwrap();
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
        }
        if !out.is_empty() {
            assert!(self.irq.read().is_ok(), "no interrupt for used buffers");
            assert_eq!(r32(&mut self.t, 0x60) & 1, 1);
            w32(&mut self.t, 0x64, 1);
        }
        out
    }

    /// Posts a chain on queue `q`, notifies, and returns the one used element it produced.
    pub fn post(&mut self, q: u16, first: u16, descs: &[(u64, u32, u16)]) -> (u32, u32) {
        self.add(q, first, descs);
        self.notify(q);
        let used = self.used(q);
        assert_eq!(used.len(), 1, "request not used exactly once: {used:?}");
        used[0]
    }

    /// Throws `rounds` rounds of random descriptor tables and available entries at queue `q`
    /// (see [`Driver::hostile_round`]), deterministic from `seed`.
    pub fn garbage(&mut self, q: u16, seed: u64, rounds: usize) {
        let mut x = seed | 1;
        let mut rnd = move || {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for _ in 0..rounds {
            self.hostile_round(q, &mut rnd);
        }
    }

    /// Runs rounds at queue `q` drawn from `data` (a fuzzer's input: each 8 bytes one draw,
    /// zeros once it runs out) until it is used up.
    pub fn fuzz(&mut self, q: u16, data: &[u8]) {
        let mut at = 0;
        let mut draw = || {
            let mut b = [0u8; 8];
            for x in &mut b {
                *x = data.get(at).copied().unwrap_or(0);
                at += 1;
            }
            u64::from_le_bytes(b)
        };
        // Each round draws at least 3 values per descriptor.
        let rounds = 1 + data.len() / (8 * 3 * usize::from(QSIZE));
        for _ in 0..rounds {
            self.hostile_round(q, &mut draw);
        }
    }

    /// One round of a hostile driver at queue `q`, every choice drawn from `draw`: a descriptor
    /// table of addresses in and out of RAM, any lengths and flags (indirect, next, write), any
    /// next indices, and available entries that may run ahead of the table, then a notify. The
    /// device must neither panic nor use more buffers than were made available and not used.
    pub fn hostile_round(&mut self, q: u16, draw: &mut impl FnMut() -> u64) {
        let (_, _, ur) = rings(q);
        for i in 0..QSIZE {
            let r = draw();
            let addr = match r % 4 {
                0 => draw() % (16 << 20),        // anywhere in RAM
                1 => 0x30000 + draw() % 0x4000,  // the data area
                2 => (16 << 20) - (draw() % 64), // straddling the end
                _ => draw(),                     // anywhere at all
            };
            let len = match (r >> 8) % 4 {
                0 => (draw() % 64) as u32,
                1 => (draw() % 0x10000) as u32,
                2 => 16,
                _ => draw() as u32,
            };
            let flags = ((r >> 16) % 8) as u16; // NEXT | WRITE | INDIRECT
            let next = ((r >> 24) % u64::from(QSIZE + 2)) as u16;
            self.raw_desc(q, i, addr, len, flags, next);
        }
        // Some content where the buffers point (request headers, control commands).
        for k in 0..8u64 {
            let v = draw();
            self.ram.write(0x30000 + k * 8, &v.to_le_bytes()).unwrap();
        }
        let qi = usize::from(q);
        let mut used_before = [0u8; 2];
        self.ram.read(ur + 2, &mut used_before).unwrap();
        let made = 1 + (draw() % u64::from(QSIZE)) as u16;
        for _ in 0..made {
            let head = (draw() % u64::from(QSIZE + 1)) as u16;
            self.add_head(q, head);
        }
        self.notify(q);
        let mut used_after = [0u8; 2];
        self.ram.read(ur + 2, &mut used_after).unwrap();
        // Buffers of earlier rounds that the device had not used yet count too (a receive
        // queue uses them when a frame arrives): never more than all not yet used.
        let outstanding = self.avail_idx[qi].wrapping_sub(u16::from_le_bytes(used_before));
        let n = u16::from_le_bytes(used_after).wrapping_sub(u16::from_le_bytes(used_before));
        assert!(
            n <= outstanding,
            "{n} buffers used of {outstanding} available ({made} made available this round)"
        );
        self.used_seen[qi] = u16::from_le_bytes(used_after);
        let _ = self.irq.read();
        w32(&mut self.t, 0x64, 1);
    }

    /// Where queue `q`'s used ring is.
    pub fn used_ring(q: u16) -> u64 {
        rings(q).2
    }
}
