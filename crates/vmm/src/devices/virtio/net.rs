//! virtio-net over a TAP interface on a host bridge: one receive and one transmit queue per
//! queue pair (several pairs on a multi-queue TAP, one per guest CPU as the driver chooses),
//! a control queue, the virtio-net header passed through to the TAP (so checksum and TCP
//! segmentation offloads work end to end), the MTU told to the guest, and an announcement
//! after a move so that switches re-learn where the VM is: RARP from the VM's MAC (like
//! QEMU's self-announce), and, when the driver took `VIRTIO_NET_F_GUEST_ANNOUNCE`, the
//! guest's own gratuitous ARPs, asked for through the config space.
//!
//! Everything runs on the device's I/O thread ([`crate::machine`] starts it): transmit and
//! receive when the guest notifies a queue (through its ioeventfd), receive when a TAP queue
//! has frames. A frame that finds no buffer waits in its queue (one frame; the TAP queue holds
//! the rest) until the guest adds some.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{offload, Tap, VNET_HDR_LEN};
use super::{read_config_bytes, DeviceState, DeviceStateError, VirtioDevice};
use crate::memory::{GuestMemoryMmap, GuestRam};

/// virtio device ID of a network device.
pub const DEVICE_TYPE: u32 = 1;
/// Entries of each data queue.
pub const QUEUE_SIZE: u16 = 256;
/// Entries of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const F_MQ: u64 = 1 << 22;

/// Config-space status: the link is up.
const S_LINK_UP: u16 = 1;
/// Config-space status: the device asks the driver to announce the VM.
const S_ANNOUNCE: u16 = 2;

/// Control commands (`class`, `command`) and their answers.
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Largest frame with its header: a 64 KiB TSO segment plus headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// One receive queue's waiting frame.
#[derive(Default)]
struct RxQueue {
    /// A received frame that found no guest buffer yet.
    pending: Option<Vec<u8>>,
    /// No receive buffers: the I/O thread stops watching this TAP queue until the guest
    /// adds some.
    starved: bool,
}

/// A virtio network device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    mtu: u16,
    /// Queue pairs offered (the TAP's queues).
    pairs: u16,
    /// Queue pairs the driver uses.
    active_pairs: u16,
    /// Config-space status.
    status: u16,
    /// Features the driver accepted.
    acked: u64,
    /// Whether checksum and segmentation offloads are offered.
    offloads: bool,
    rx: Vec<RxQueue>,
    /// Wakes the I/O thread (the guest added receive buffers, the pairs in use changed; the
    /// machine's clone of it: the VM resumed or stopped).
    kick: EventFd,
    queue_sizes: Vec<u16>,
    buf: Vec<u8>,
    /// Frames received and sent.
    io: super::IoTotals,
}

/// Which queue of the device a queue index is, given whether multi-queue was negotiated.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    Rx(usize),
    Tx(usize),
    Ctrl,
    Unused,
}

impl Net {
    /// A device on `tap` (one queue pair per TAP queue) with address `mac`, telling the guest
    /// `mtu`, offering checksum and segmentation offloads if `offloads`.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16, offloads: bool) -> Result<Net, std::io::Error> {
        let pairs = u16::try_from(tap.queues()).unwrap_or(1).max(1);
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * usize::from(pairs)];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        let mut net = Net {
            tap,
            mac,
            mtu,
            pairs,
            active_pairs: 1,
            status: S_LINK_UP,
            acked: 0,
            offloads,
            rx: (0..pairs).map(|_| RxQueue::default()).collect(),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            queue_sizes,
            buf: vec![0; MAX_FRAME],
            io: super::IoTotals::default(),
        };
        net.use_pairs(1);
        Ok(net)
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn role(&self, index: usize) -> Role {
        let data = if self.acked & F_MQ != 0 {
            2 * usize::from(self.pairs)
        } else {
            2
        };
        match index {
            i if i < data && i % 2 == 0 => Role::Rx(i / 2),
            i if i < data => Role::Tx(i / 2),
            i if i == data => Role::Ctrl,
            _ => Role::Unused,
        }
    }

    /// Steers received traffic to the first `n` queue pairs only.
    fn use_pairs(&mut self, n: u16) {
        self.active_pairs = n;
        if let Err(e) = self.tap.use_queues(usize::from(n)) {
            tracing::warn!("virtio-net: {e}");
        }
        for q in usize::from(n)..self.rx.len() {
            self.rx[q] = RxQueue::default();
        }
        // The I/O thread then watches the TAP queues of the pairs now in use.
        let _ = self.kick.write(1);
    }

    /// Copies `frame` into the chain; returns the bytes written, or 0 when the chain cannot
    /// take it (it is then returned empty and the frame dropped).
    fn deliver(chain: DescriptorChain<&GuestMemoryMmap>, frame: &[u8], ram: &GuestRam) -> u32 {
        let writable = super::WritableRanges::of(&chain);
        let Ok(mut w) = chain.writer(ram.memory()) else {
            return 0;
        };
        if w.available_bytes() < frame.len() || w.write_all(frame).is_err() {
            return 0;
        }
        writable.mark(ram);
        u32::try_from(frame.len()).unwrap_or(0)
    }

    fn receive(&mut self, pair: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        let Some(rx) = self.rx.get_mut(pair) else {
            return false;
        };
        loop {
            let frame = match rx.pending.take() {
                Some(f) => f,
                None => match self.tap.read_frame(pair, &mut self.buf) {
                    Ok(Some(n)) if n >= VNET_HDR_LEN => {
                        let mut f = self.buf[..n].to_vec();
                        // One buffer per frame (no VIRTIO_NET_F_MRG_RXBUF): num_buffers = 1.
                        f[10..12].copy_from_slice(&1u16.to_le_bytes());
                        f
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        rx.starved = false;
                        return used;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-net: {e}");
                        return used;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                rx.pending = Some(frame);
                rx.starved = true;
                return used;
            };
            let head = chain.head_index();
            let len = Self::deliver(chain, &frame, ram);
            self.io.net_rx_bytes += u64::from(len);
            if queue.add_used(mem, head, len).is_err() {
                return used;
            }
            used = true;
        }
    }

    fn transmit(&mut self, pair: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut r) = chain.reader(mem) {
                let n = r.available_bytes();
                if (VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                    && r.read_exact(&mut self.buf[..n]).is_ok()
                {
                    match self.tap.write_frame(pair, &self.buf[..n]) {
                        Ok(()) => self.io.net_tx_bytes += n as u64,
                        Err(e) => tracing::warn!("virtio-net: {e}"),
                    }
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Carries out the control commands on the control queue.
    fn control(&mut self, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let writable = super::WritableRanges::of(&chain);
            let mut len = 0;
            if let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(mem), chain.writer(mem)) {
                let mut command = vec![0u8; r.available_bytes().min(64)];
                if w.available_bytes() >= 1 && r.read_exact(&mut command).is_ok() {
                    let ack = self.command(&command);
                    if w.write_all(&[ack]).is_ok() {
                        writable.mark(ram);
                        len = 1;
                    }
                }
            }
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// One control command (class, command, data); the answer.
    fn command(&mut self, c: &[u8]) -> u8 {
        match c {
            [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, ..] if self.acked & F_GUEST_ANNOUNCE != 0 => {
                self.status &= !S_ANNOUNCE;
                CTRL_OK
            }
            [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] if self.acked & F_MQ != 0 => {
                let n = u16::from_le_bytes([*lo, *hi]);
                if (1..=self.pairs).contains(&n) {
                    self.use_pairs(n);
                    CTRL_OK
                } else {
                    CTRL_ERR
                }
            }
            _ => CTRL_ERR,
        }
    }

    /// A RARP announcement from the VM's MAC (what QEMU sends after a migration), with its
    /// virtio-net header.
    pub fn announcement(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x80, 0x35]); // RARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet/IPv4, reverse request
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(VNET_HDR_LEN + 60, 0);
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = F_MTU | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;
        if self.offloads {
            f |= F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
        }
        if self.pairs > 1 {
            f |= F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn io(&self) -> super::IoTotals {
        self.io
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        match self.role(index) {
            Role::Rx(pair) => {
                let was = self.rx.get(pair).is_some_and(|r| r.starved);
                let used = self.receive(pair, queue, ram);
                if was && !self.rx.get(pair).is_some_and(|r| r.starved) {
                    let _ = self.kick.write(1);
                }
                used
            }
            Role::Tx(pair) => self.transmit(pair, queue, ram),
            Role::Ctrl => self.control(queue, ram),
            Role::Unused => false,
        }
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
        let mut flags = 0;
        if acked & F_GUEST_CSUM != 0 {
            flags |= offload::CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                flags |= offload::TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                flags |= offload::TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(flags) {
            tracing::warn!("virtio-net: {e}");
        }
        self.use_pairs(self.active_pairs);
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.status = S_LINK_UP;
        self.use_pairs(1);
        for rx in &mut self.rx {
            *rx = RxQueue::default();
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Net {
            active_pairs: self.active_pairs,
            status: self.status,
        }
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match *state {
            DeviceState::Net {
                active_pairs,
                status,
            } => {
                if !(1..=self.pairs).contains(&active_pairs) {
                    return Err(DeviceStateError::OutOfRange {
                        what: "active queue pairs",
                        value: u64::from(active_pairs),
                        max: u64::from(self.pairs),
                    });
                }
                self.active_pairs = active_pairs;
                self.status = status | S_LINK_UP;
                Ok(())
            }
            ref other => Err(DeviceStateError::WrongKind {
                saved: other.kind(),
                device: "network",
            }),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn poll_fds(&self) -> Option<(Vec<std::os::fd::RawFd>, EventFd)> {
        let fds = (0..self.tap.queues())
            .filter_map(|q| self.tap.queue_fd(q))
            .collect();
        Some((fds, self.kick.try_clone().ok()?))
    }

    fn wants_input(&self, input: usize) -> bool {
        input < usize::from(self.active_pairs) && self.rx.get(input).is_some_and(|r| !r.starved)
    }

    fn input_queue(&self, input: usize) -> usize {
        2 * input
    }

    fn announce(&mut self) -> bool {
        if let Err(e) = self.tap.write_frame(0, &Self::announcement(self.mac)) {
            tracing::warn!("virtio-net announce: {e}");
        }
        if self.acked & F_GUEST_ANNOUNCE != 0 && self.status & S_ANNOUNCE == 0 {
            self.status |= S_ANNOUNCE;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use crate::persist::Persist;
    use std::os::fd::{AsRawFd, OwnedFd};

    use ferry_guests::packet_socket;
    use std::time::{Duration, Instant};

    use std::sync::Arc;

    use super::*;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::testing::{r32, w32, Driver, WRITE};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const ETHERTYPE: u16 = 0x88b5; // local experimental
    const RX_BUFS: u64 = 0x20000;
    const TX_BUF: u64 = 0x40000;

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    fn send(fd: &OwnedFd, f: &[u8]) {
        // SAFETY: `f` is a valid buffer of the length given.
        let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// The next frame on `fd` that `want` accepts, within 5 s.
    fn recv(fd: &OwnedFd, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: `buf` is a valid writable buffer of the length given.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[..n as usize]) {
                return buf[..n as usize].to_vec();
            }
            assert!(Instant::now() < deadline, "no such frame within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn frames_flow_both_ways_through_the_tap_and_a_move_is_announced() {
        let name = format!("fet{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0x54, 0, 0x12, 0x34, 0x56], 9000, None, 1).unwrap();
        let net = Net::new(tap, MAC, 9000, true).unwrap();
        let mut d = Driver::new("net", Box::new(net), |offered| {
            for f in [F_MAC, F_MTU, F_CSUM, F_GUEST_CSUM, F_HOST_TSO4] {
                assert_ne!(offered & f, 0, "feature {f:#x} offered");
            }
            offered
        });
        let mut cfg = [0u8; 12];
        d.t.read(0x100, &mut cfg);
        assert_eq!(&cfg[..6], &MAC);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
        let host = packet_socket(&name, ETHERTYPE);

        // Host → guest: nothing to receive into yet, so the frame waits.
        let to_guest = frame(MAC, PEER, b"to the guest");
        send(&host, &to_guest);
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.t.wants_input(0) {
            d.t.poll_input(0);
            assert!(
                Instant::now() < deadline,
                "the device never ran out of buffers"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The guest adds buffers and notifies: the waiting frame (and anything after it)
        // lands in them, with its header.
        for i in 0..8u16 {
            d.add(0, i, &[(RX_BUFS + u64::from(i) * 0x2000, 0x2000, WRITE)]);
        }
        d.notify(0);
        let mut found = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !found {
            d.t.poll_input(0);
            for (head, len) in d.used(0) {
                let mut b = vec![0u8; len as usize];
                d.ram
                    .read(RX_BUFS + u64::from(head) * 0x2000, &mut b)
                    .unwrap();
                assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1, "num_buffers");
                found |= b[VNET_HDR_LEN..] == to_guest[..];
            }
            assert!(
                Instant::now() < deadline,
                "the frame never reached the guest"
            );
            std::thread::sleep(Duration::from_millis(5));
        }

        // Guest → host: header plus frame out of the TAP.
        let from_guest = frame(PEER, MAC, b"from the guest");
        let mut tx = vec![0u8; VNET_HDR_LEN];
        tx.extend_from_slice(&from_guest);
        d.ram.write(TX_BUF, &tx).unwrap();
        let (_, len) = d.post(1, 0, &[(TX_BUF, tx.len() as u32, 0)]);
        assert_eq!(len, 0);
        let got = recv(&host, |f| f.windows(14).any(|w| w == b"from the guest"));
        assert_eq!(&got[..14], &from_guest[..14]);
        // Counted for utilization (the host may have sent the TAP more than our frame).
        let io = d.t.device().io();
        assert!(
            io.net_rx_bytes >= (VNET_HDR_LEN + to_guest.len()) as u64,
            "{io:?}"
        );
        assert_eq!(io.net_tx_bytes, tx.len() as u64);

        // After a move: RARP from the VM's MAC, broadcast.
        let rarp = packet_socket(&name, 0x8035);
        d.t.announce();
        let a = recv(&rarp, |f| f.len() >= 42);
        assert_eq!(&a[..6], &[0xff; 6]);
        assert_eq!(&a[6..12], &MAC);
        assert_eq!(&a[12..14], &[0x80, 0x35]);

        // A frame without a header, or a bigger one than a frame can be, is dropped, and the
        // device goes on.
        for bad in [4u32, 70_000] {
            d.ram.write(TX_BUF, &vec![0u8; bad as usize]).unwrap();
            d.post(1, 0, &[(TX_BUF, bad, 0)]);
        }
        d.ram.write(TX_BUF, &tx).unwrap();
        d.post(1, 0, &[(TX_BUF, tx.len() as u32, 0)]);
        recv(&host, |f| f.windows(14).any(|w| w == b"from the guest"));
        // Dropped frames are not counted as sent.
        assert_eq!(d.t.device().io().net_tx_bytes, 2 * tx.len() as u64);
    }

    /// An IPv4/UDP frame to the guest from source port `sport` (a flow of its own).
    fn udp_frame(sport: u16) -> Vec<u8> {
        let payload = format!("flow {sport}");
        let mut f = MAC.to_vec();
        f.extend_from_slice(&PEER);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&5001u16.to_be_bytes());
        f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload.as_bytes());
        f
    }

    /// Posts control command `cmd` on queue `ctrl`; the device's answer.
    fn control(d: &mut Driver, ctrl: u16, cmd: &[u8]) -> u8 {
        const CMD: u64 = 0xf0000;
        const ACK: u64 = 0xf1000;
        d.ram.write(CMD, cmd).unwrap();
        d.ram.write(ACK, &[0xee]).unwrap();
        let (_, len) = d.post(ctrl, 0, &[(CMD, cmd.len() as u32, 0), (ACK, 1, WRITE)]);
        assert_eq!(len, 1, "the answer's length");
        let mut ack = [0u8];
        d.ram.read(ACK, &mut ack).unwrap();
        ack[0]
    }

    /// Gives receive queue `q` 16 fresh 4 KiB buffers at `base`.
    fn give_rx_buffers(d: &mut Driver, q: u16, base: u64) {
        for i in 0..16u16 {
            d.add(q, i, &[(base + u64::from(i) * 0x1000, 0x1000, WRITE)]);
        }
        d.notify(q);
    }

    /// Polls every input until `want` of the test's UDP frames arrived over receive queues
    /// `queues` (each with buffers at `base`, as [`give_rx_buffers`] put them, given back once
    /// read); how many each got. (The host sends frames of its own on a new interface; those
    /// are not counted.)
    fn receive_all(d: &mut Driver, queues: &[(u16, u64)], want: usize) -> Vec<usize> {
        let mut got = vec![0; queues.len()];
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.iter().sum::<usize>() < want {
            for (i, &(q, base)) in queues.iter().enumerate() {
                d.t.poll_input(usize::from(q / 2));
                for (head, len) in d.used(q) {
                    let mut b = vec![0u8; len as usize];
                    d.ram.read(base + u64::from(head) * 0x1000, &mut b).unwrap();
                    if b.windows(5).any(|w| w == b"flow ") {
                        got[i] += 1;
                    }
                    // Refilled at once, as a driver does.
                    let head = u16::try_from(head).unwrap();
                    d.add(q, head, &[(base + u64::from(head) * 0x1000, 0x1000, WRITE)]);
                }
                d.notify(q);
            }
            assert!(
                Instant::now() < deadline,
                "{got:?} of {want} frames arrived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn flows_spread_over_the_queue_pairs_the_driver_enables() {
        let name = format!("fem{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 3], 1500, None, 2).unwrap();
        assert!(Tap::create("femx0", [0xfe, 0, 0, 0, 0, 4], 1500, None, 17).is_err());
        let mut d = Driver::new(
            "net-mq",
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            |f| {
                assert_ne!(f & F_MQ, 0, "multi-queue offered");
                f
            },
        );
        let mut cfg = [0u8; 2];
        d.t.read(0x100 + 8, &mut cfg);
        assert_eq!(u16::from_le_bytes(cfg), 2, "max_virtqueue_pairs");
        let host = packet_socket(&name, 0x0800);
        // rx0 tx0 rx1 tx1 ctrl
        let ctrl = 4;

        // Until the driver asks for more, only the first pair receives.
        give_rx_buffers(&mut d, 0, 0x100000);
        give_rx_buffers(&mut d, 2, 0x200000);
        for sport in 1000..1008 {
            send(&host, &udp_frame(sport));
        }
        assert_eq!(
            receive_all(&mut d, &[(0, 0x100000), (2, 0x200000)], 8),
            vec![8, 0]
        );

        assert_eq!(
            control(&mut d, ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0]),
            CTRL_ERR
        );
        assert_eq!(
            control(&mut d, ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0]),
            CTRL_ERR
        );
        assert_eq!(control(&mut d, ctrl, &[9, 9]), CTRL_ERR);
        assert_eq!(
            control(&mut d, ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
            CTRL_OK
        );
        assert_eq!(
            d.t.save().device,
            DeviceState::Net {
                active_pairs: 2,
                status: S_LINK_UP
            }
        );
        // Now flows are spread over both (16 flows all hashing to one queue: 1 in 2^15).
        for sport in 2000..2016 {
            send(&host, &udp_frame(sport));
        }
        let got = receive_all(&mut d, &[(0, 0x100000), (2, 0x200000)], 16);
        assert!(got.iter().all(|&n| n > 0), "flows per queue: {got:?}");

        // The second pair's transmit queue reaches the wire too.
        let from_guest = frame(PEER, MAC, b"from pair two");
        let mut tx = vec![0u8; VNET_HDR_LEN];
        tx.extend_from_slice(&from_guest);
        d.ram.write(TX_BUF, &tx).unwrap();
        let exp = packet_socket(&name, ETHERTYPE);
        d.post(3, 0, &[(TX_BUF, tx.len() as u32, 0)]);
        recv(&exp, |f| f.windows(13).any(|w| w == b"from pair two"));

        // Back to one pair: the second queue is detached again.
        assert_eq!(
            control(&mut d, ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]),
            CTRL_OK
        );
        for sport in 3000..3008 {
            send(&host, &udp_frame(sport));
        }
        assert_eq!(
            receive_all(&mut d, &[(0, 0x100000), (2, 0x200000)], 8),
            vec![8, 0]
        );
        assert!(!d.t.wants_input(1));
    }

    #[test]
    fn the_guest_is_asked_to_announce_itself_and_acknowledges() {
        let name = format!("fea{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 5], 1500, None, 1).unwrap();
        let ctrl = 2; // rx tx ctrl: one pair, no multi-queue
        let status = |d: &mut Driver| {
            let mut b = [0u8; 2];
            d.t.read(0x100 + 6, &mut b);
            u16::from_le_bytes(b)
        };

        // A driver that did not take GUEST_ANNOUNCE gets no config interrupt; its link is up.
        let mut d = Driver::new(
            "net-noannounce",
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            |f| f & !F_GUEST_ANNOUNCE,
        );
        assert_eq!(status(&mut d), S_LINK_UP);
        d.t.announce();
        assert!(d.irq.read().is_err(), "no interrupt");
        assert_eq!(status(&mut d), S_LINK_UP);
        assert_eq!(
            control(&mut d, ctrl, &[CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK]),
            CTRL_ERR
        );
        let Driver { t, .. } = d;
        drop(t);

        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 5], 1500, None, 1).unwrap();
        let mut d = Driver::new(
            "net-announce",
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            |f| f,
        );
        let generation = r32(&mut d.t, 0xfc);
        d.t.announce();
        assert!(d.irq.read().is_ok(), "an interrupt");
        assert_eq!(r32(&mut d.t, 0x60) & 2, 2, "config changed");
        assert_ne!(r32(&mut d.t, 0xfc), generation);
        assert_eq!(status(&mut d), S_LINK_UP | S_ANNOUNCE);
        // The request survives a save and restore (the guest may not have seen it yet)...
        let saved = d.t.save();
        let tap = Tap::create(&format!("{name}r"), [0xfe, 0, 0, 0, 0, 6], 1500, None, 1).unwrap();
        let mut restored = MmioTransport::new(
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            Arc::clone(&d.ram),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        restored.load(&saved).unwrap();
        assert_eq!(restored.save(), saved);
        // ...but not into a device with another shape.
        let tap = Tap::create(&format!("{name}q"), [0xfe, 0, 0, 0, 0, 7], 1500, None, 2).unwrap();
        let mut other = MmioTransport::new(
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            Arc::clone(&d.ram),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        assert!(other.load(&saved).is_err());
        let mut bad = saved.clone();
        bad.device = DeviceState::Net {
            active_pairs: 2,
            status: 1,
        };
        assert!(restored.load(&bad).is_err(), "two pairs on a one-pair NIC");
        // The driver announces and acknowledges: the request is cleared.
        w32(&mut d.t, 0x64, 2);
        assert_eq!(
            control(&mut d, ctrl, &[CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK]),
            CTRL_OK
        );
        assert_eq!(status(&mut d), S_LINK_UP);
    }

    #[test]
    fn random_descriptor_tables_never_crash_the_device() {
        let name = format!("feg{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 2], 1500, None, 1).unwrap();
        let mut d = Driver::new(
            "net-garbage",
            Box::new(Net::new(tap, MAC, 1500, true).unwrap()),
            |f| f,
        );
        for seed in 1..=10 {
            d.garbage(1, seed, 50); // transmit
            d.garbage(0, seed + 100, 20); // receive buffers (frames may or may not come)
            d.garbage(2, seed + 200, 20); // control commands
            d.t.poll_input(0);
        }
    }

    #[test]
    fn offloads_off_offers_no_checksum_or_segmentation_features() {
        let name = format!("feo{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 8], 1500, None, 1).unwrap();
        let off = Net::new(tap, MAC, 1500, false).unwrap().features();
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 8], 1500, None, 1).unwrap();
        let on = Net::new(tap, MAC, 1500, true).unwrap().features();
        let offload_bits =
            F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
        assert_eq!(on & offload_bits, offload_bits);
        assert_eq!(off & offload_bits, 0);
        assert_eq!(on & !offload_bits, off, "everything else unchanged");
    }

    #[test]
    fn tap_setup_errors_are_clear() {
        let host = [0xfe, 0, 0, 0, 0, 1];
        let e = Tap::create("this-name-is-far-too-long", host, 1500, None, 1).unwrap_err();
        assert!(e.to_string().contains("invalid interface name"), "{e}");
        let e = Tap::create("fetx0", host, 1500, Some("no-such-br"), 1).unwrap_err();
        assert!(
            e.to_string().contains("bridge no-such-br does not exist"),
            "{e}"
        );
    }
}
