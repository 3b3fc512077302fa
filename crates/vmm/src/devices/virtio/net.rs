//! virtio-net over a TAP interface on a host bridge: one receive and one transmit queue, the
//! virtio-net header passed through to the TAP (so checksum and TCP segmentation offloads work
//! end to end), the MTU told to the guest, and an announcement (RARP from the VM's MAC, like
//! QEMU's self-announce) after a move so that switches re-learn where the VM is.
//!
//! Transmit runs on the vCPU thread that notified; receive runs there too when the guest adds
//! buffers, and otherwise on the device's poll thread when the TAP has frames
//! ([`crate::machine`] starts it). A frame that finds no buffer waits in the device (one
//! frame; the TAP queue holds the rest) until the guest adds some.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{offload, Tap, VNET_HDR_LEN};
use super::{read_config_bytes, VirtioDevice};
use crate::memory::{GuestMemoryMmap, GuestRam};

/// virtio device ID of a network device.
pub const DEVICE_TYPE: u32 = 1;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;

/// Largest frame with its header: a 64 KiB TSO segment plus headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

const RX: usize = 0;
const TX: usize = 1;

/// A virtio network device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    config: [u8; 12],
    /// A received frame that found no guest buffer yet.
    pending: Option<Vec<u8>>,
    /// No receive buffers: the poll thread stops watching the TAP until the guest adds some.
    starved: bool,
    /// Wakes the poll thread (the guest added receive buffers; the VM resumed).
    kick: EventFd,
    buf: Vec<u8>,
}

impl Net {
    /// A device on `tap` with address `mac`, telling the guest `mtu`.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16) -> Result<Net, std::io::Error> {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Ok(Net {
            tap,
            mac,
            config,
            pending: None,
            starved: false,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            buf: vec![0; MAX_FRAME],
        })
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
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

    fn receive(&mut self, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(Some(n)) if n >= VNET_HDR_LEN => {
                        let mut f = self.buf[..n].to_vec();
                        // One buffer per frame (no VIRTIO_NET_F_MRG_RXBUF): num_buffers = 1.
                        f[10..12].copy_from_slice(&1u16.to_le_bytes());
                        f
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        self.starved = false;
                        return used;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-net: {e}");
                        return used;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending = Some(frame);
                self.starved = true;
                return used;
            };
            let head = chain.head_index();
            let len = Self::deliver(chain, &frame, ram);
            if queue.add_used(mem, head, len).is_err() {
                return used;
            }
            used = true;
        }
    }

    fn transmit(&mut self, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Ok(mut r) = chain.reader(mem) {
                let n = r.available_bytes();
                if (VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                    && r.read_exact(&mut self.buf[..n]).is_ok()
                {
                    if let Err(e) = self.tap.write_frame(&self.buf[..n]) {
                        tracing::warn!("virtio-net: {e}");
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
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_CSUM
            | F_GUEST_CSUM
            | F_MTU
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        match index {
            RX => {
                let was = self.starved;
                let used = self.receive(queue, ram);
                if was && !self.starved {
                    let _ = self.kick.write(1);
                }
                used
            }
            TX => self.transmit(queue, ram),
            _ => false,
        }
    }

    fn activate(&mut self, acked: u64) {
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
    }

    fn poll_fds(&self) -> Option<(std::os::fd::RawFd, EventFd)> {
        use std::os::fd::AsRawFd;
        Some((self.tap.as_raw_fd(), self.kick.try_clone().ok()?))
    }

    fn wants_input(&self) -> bool {
        !self.starved
    }

    fn announce(&mut self) {
        if let Err(e) = self.tap.write_frame(&Self::announcement(self.mac)) {
            tracing::warn!("virtio-net announce: {e}");
        }
    }

    fn wake(&self) {
        let _ = self.kick.write(1);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::virtio::testing::{Driver, WRITE};

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

    /// A raw packet socket on interface `ifname` for frames of `proto`.
    fn packet_socket(ifname: &str, proto: u16) -> OwnedFd {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {ifname}");
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto.to_be()),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto.to_be();
        sa.sll_ifindex = index as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        fd
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
        let tap = Tap::create(&name, [0xfe, 0x54, 0, 0x12, 0x34, 0x56], 9000, None).unwrap();
        let net = Net::new(tap, MAC, 9000).unwrap();
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
        while d.t.wants_input() {
            d.t.poll_input();
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
            d.t.poll_input();
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
    }

    #[test]
    fn random_descriptor_tables_never_crash_the_device() {
        let name = format!("feg{}", std::process::id() % 1_000_000);
        let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 2], 1500, None).unwrap();
        let mut d = Driver::new(
            "net-garbage",
            Box::new(Net::new(tap, MAC, 1500).unwrap()),
            |f| f,
        );
        for seed in 1..=10 {
            d.garbage(1, seed, 50); // transmit
            d.garbage(0, seed + 100, 20); // receive buffers (frames may or may not come)
            d.t.poll_input();
        }
    }

    #[test]
    fn tap_setup_errors_are_clear() {
        let host = [0xfe, 0, 0, 0, 0, 1];
        let e = Tap::create("this-name-is-far-too-long", host, 1500, None).unwrap_err();
        assert!(e.to_string().contains("invalid interface name"), "{e}");
        let e = Tap::create("fetx0", host, 1500, Some("no-such-br")).unwrap_err();
        assert!(
            e.to_string().contains("bridge no-such-br does not exist"),
            "{e}"
        );
    }
}
