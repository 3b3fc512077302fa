//! A TAP interface for a virtio-net device: created by the worker, with the virtio-net header
//! on every frame (`IFF_VNET_HDR`, 12 bytes: the guest's own header format with
//! `VIRTIO_F_VERSION_1`), its MTU set, brought up and attached to a host bridge. With more
//! than one queue (`IFF_MULTI_QUEUE`) each queue is its own descriptor; the kernel spreads
//! received flows over the attached ones, and a queue the guest does not use is detached
//! (`TUNSETQUEUE`) so that nothing is steered to it.
//!
//! Plain ioctls on `/dev/net/tun` and an `AF_INET` socket: the well-kept VMMs keep their own
//! small TAP code too, and no maintained crate offers this.

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

/// Bytes of the virtio-net header on each frame (virtio 1.x: `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: u16 = 1;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// TAP offload flags (`TUN_F_*`): what the host may hand the guest unfinished.
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TCP segmentation over IPv4.
    pub const TSO4: u32 = 0x02;
    /// TCP segmentation over IPv6.
    pub const TSO6: u32 = 0x04;
}

/// Errors of TAP setup and I/O.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// An interface name that does not fit.
    #[error("invalid interface name {0:?}: 1 to 15 characters, no '/' or spaces")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are we root?)")]
    Open(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("{what} on {ifname}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// Interface.
        ifname: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bridge does not exist.
    #[error("bridge {0} does not exist on this host")]
    NoBridge(String),
    /// A queue count out of range.
    #[error("{0} queues: a TAP has 1 to {MAX_QUEUES}")]
    BadQueues(usize),
    /// Reading or writing a frame.
    #[error("tap {0}: {1}")]
    Io(String, #[source] std::io::Error),
}

#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    /// The union: flags (short), ifindex / mtu (int).
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq::default();
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > 15
        || name
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

/// `ioctl(fd, req, &mut ifr)`, errors named.
fn ifioctl(
    fd: &impl AsRawFd,
    req: libc::c_ulong,
    ifr: &mut IfReq,
    what: &'static str,
    ifname: &str,
) -> Result<(), TapError> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq` (16-byte name + 24-byte union, the
    // kernel's layout on 64-bit Linux) that outlives the call; `fd` is an open descriptor.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if r < 0 {
        return Err(TapError::Ioctl {
            what,
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn inet_socket() -> Result<File, TapError> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TapError::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Most queues a TAP is given (one per queue pair of the device).
pub const MAX_QUEUES: usize = 16;

/// A TAP interface with virtio-net headers and one or more queues.
#[derive(Debug)]
pub struct Tap {
    /// One descriptor per queue.
    files: Vec<File>,
    /// Which queues are attached.
    attached: Vec<bool>,
    name: String,
}

/// Opens `/dev/net/tun` and binds it to a new queue of TAP `name` (the first queue creates the
/// interface).
fn open_queue(name: &str, multi: bool) -> Result<File, TapError> {
    let path: &CStr = c"/dev/net/tun";
    // SAFETY: a valid NUL-terminated path; the result is checked and owned below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut ifr = IfReq::new(name);
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if multi {
        flags |= IFF_MULTI_QUEUE;
    }
    ifr.set_short(flags);
    ifioctl(&file, TUNSETIFF, &mut ifr, "TUNSETIFF", name)?;
    let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the valid pointer given.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) } < 0 {
        return Err(TapError::Ioctl {
            what: "TUNSETVNETHDRSZ",
            ifname: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

impl Tap {
    /// Creates TAP `name` (removed again when this is dropped) with `queues` queues (1 to
    /// [`MAX_QUEUES`], all attached), host-side address `mac`, sets its `mtu`, brings it up
    /// and, with `bridge`, attaches it there.
    ///
    /// Give it an address no guest uses and that sorts high (`fe:…`, as libvirt does): a
    /// Linux bridge without an address of its own takes the lowest of its ports', and a TAP
    /// coming or going would otherwise change the bridge's address under the hosts that use
    /// it as their gateway.
    pub fn create(
        name: &str,
        mac: [u8; 6],
        mtu: u16,
        bridge: Option<&str>,
        queues: usize,
    ) -> Result<Tap, TapError> {
        check_name(name)?;
        if let Some(b) = bridge {
            check_name(b)?;
            if !std::path::Path::new("/sys/class/net")
                .join(b)
                .join("bridge")
                .exists()
            {
                return Err(TapError::NoBridge(b.to_string()));
            }
        }
        if !(1..=MAX_QUEUES).contains(&queues) {
            return Err(TapError::BadQueues(queues));
        }
        let files = (0..queues)
            .map(|_| open_queue(name, queues > 1))
            .collect::<Result<Vec<_>, _>>()?;
        let tap = Tap {
            attached: vec![true; files.len()],
            files,
            name: name.to_string(),
        };
        tap.set_offload(0)?;
        let sock = inet_socket()?;
        let mut ifr = IfReq::new(name);
        // struct sockaddr: family, then the address bytes.
        ifr.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        ifr.data[2..8].copy_from_slice(&mac);
        ifioctl(&sock, SIOCSIFHWADDR, &mut ifr, "setting its address", name)?;
        let mut ifr = IfReq::new(name);
        ifr.set_int(libc::c_int::from(mtu));
        ifioctl(&sock, SIOCSIFMTU, &mut ifr, "setting the MTU", name)?;
        let mut ifr = IfReq::new(name);
        ifioctl(&sock, SIOCGIFFLAGS, &mut ifr, "reading the flags", name)?;
        let flags = ifr.short() | libc::IFF_UP as libc::c_short;
        ifr.set_short(flags);
        ifioctl(&sock, SIOCSIFFLAGS, &mut ifr, "bringing it up", name)?;
        if let Some(b) = bridge {
            let mut ifr = IfReq::new(name);
            ifioctl(&sock, SIOCGIFINDEX, &mut ifr, "reading its index", name)?;
            let index = ifr.int();
            let mut br = IfReq::new(b);
            br.set_int(index);
            ifioctl(&sock, SIOCBRADDIF, &mut br, "attaching it to the bridge", b)?;
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many queues it has.
    pub fn queues(&self) -> usize {
        self.files.len()
    }

    /// The descriptor of queue `q`.
    pub fn queue_fd(&self, q: usize) -> Option<std::os::fd::RawFd> {
        self.files.get(q).map(AsRawFd::as_raw_fd)
    }

    /// Whether queue `q` is attached (frames are steered to it).
    pub fn attached(&self, q: usize) -> bool {
        self.attached.get(q).copied().unwrap_or(false)
    }

    /// Attaches the first `n` queues and detaches the others (at least queue 0 stays).
    pub fn use_queues(&mut self, n: usize) -> Result<(), TapError> {
        if self.files.len() < 2 {
            return Ok(());
        }
        for q in 0..self.files.len() {
            let want = q < n.max(1);
            if self.attached[q] == want {
                continue;
            }
            let mut ifr = IfReq::new(&self.name);
            ifr.set_short(if want {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            });
            ifioctl(
                &self.files[q],
                TUNSETQUEUE,
                &mut ifr,
                "TUNSETQUEUE",
                &self.name,
            )?;
            self.attached[q] = want;
        }
        Ok(())
    }

    /// Which offloads (`offload::*`) the guest accepts unfinished frames for (the whole
    /// interface).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        let Some(file) = self.files.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0
        {
            return Err(TapError::Ioctl {
                what: "TUNSETOFFLOAD",
                ifname: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first) from queue `q` into `buf`; `None` when none
    /// is waiting (or the queue is detached).
    pub fn read_frame(&self, q: usize, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        let Some(file) = self.files.get(q).filter(|_| self.attached(q)) else {
            return Ok(None);
        };
        match (&*file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(TapError::Io(self.name.clone(), e)),
        }
    }

    /// Writes one frame (virtio-net header first) through queue `q` (queue 0 if `q` is not
    /// attached).
    pub fn write_frame(&self, q: usize, frame: &[u8]) -> Result<(), TapError> {
        let q = if self.attached(q) { q } else { 0 };
        let Some(file) = self.files.get(q) else {
            return Ok(());
        };
        match (&*file).write(frame) {
            Ok(_) => Ok(()),
            // A full queue drops the frame, as a real link would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(TapError::Io(self.name.clone(), e)),
        }
    }
}
