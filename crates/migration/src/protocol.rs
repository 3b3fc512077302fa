//! Wire format: every message is one frame.
//!
//! ```text
//! kind u8 | flags u8 | reserved u16 (0) | length u32 | payload [length] | crc32 u32
//! ```
//! little endian; the CRC-32 covers header and payload as sent; payloads are at most
//! [`MAX_PAYLOAD`] bytes, also once decompressed. `flags` says how the payload is compressed
//! ([`Compression`]). Version 2; the peers exchange `HELLO` first.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol magic in `HELLO`.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version this build speaks.
pub const VERSION: u16 = 4;
/// Oldest version this build accepts from a peer.
pub const MIN_VERSION: u16 = 4;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// How long either side waits for the peer to read or write before giving up (a cut link).
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Most connections one migration may use.
pub const MAX_CONNECTIONS: u8 = 16;
/// How long the source waits for PONG before committing; no answer in time means the
/// destination or the link is gone, and the VM stays on the source.
pub const PRECOMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Pages per `PAGES` frame.
pub const BATCH_PAGES: usize = 256;

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection failed.
    #[error("migration connection failed")]
    Io(#[source] std::io::Error),
    /// TLS: the peer is not a member of this cluster (or this side is not, for the peer).
    #[error("the peer could not be authenticated: {0}")]
    Auth(String),
    /// The peer is not a Ferry migration peer of a compatible version.
    #[error("peer speaks an incompatible protocol: {0}")]
    Protocol(String),
    /// A frame failed its checks.
    #[error("corrupted migration stream: {0}")]
    Corrupt(String),
    /// The destination refused the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The peer reported an error.
    #[error("the peer failed: {0}")]
    Peer(String),
    /// Cancelled by the user (the VM continues on the source).
    #[error("migration cancelled{0}")]
    Cancelled(String),
    /// Did not converge and the policy says cancel.
    #[error("migration did not converge: {0}")]
    NotConverged(String),
    /// VM-side failure.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// Guest memory access failure.
    #[error(transparent)]
    Memory(#[from] vmm::memory::MemoryError),
    /// The migration failed before the commit, and the VM could not resume on the source
    /// either: a disk it handed over is still held elsewhere. It stays paused there, whole.
    #[error("{failure}; the VM stays paused on the source: {cause}")]
    SourcePaused {
        /// Why the migration failed.
        failure: String,
        /// Why the VM could not resume.
        cause: String,
    },
    /// The commit message was sent but its acknowledgement never came.
    #[error("commit outcome unknown: COMMIT was sent but the destination did not confirm; the source VM stays paused and will not resume by itself ({0})")]
    CommitUnknown(String),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        // rustls reports handshake and certificate failures as I/O errors wrapping its own.
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t @ rustls::Error::InvalidMessage(_)) => MigrationError::Protocol(format!(
                "the peer does not speak TLS (a peer without TLS, or not Ferry): {t}"
            )),
            Some(t) => MigrationError::Auth(t.to_string()),
            None => MigrationError::Io(e),
        }
    }
}

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both ways, first: magic, version, oldest accepted version.
    Hello = 0x01,
    /// Source → destination: [`Setup`].
    Setup = 0x02,
    /// Source → destination, first on each additional connection: session id [16], lane u8.
    Join = 0x05,
    /// Destination → source: ready to receive.
    Accept = 0x03,
    /// Destination → source: UTF-8 reason.
    Refuse = 0x04,
    /// Source → destination: page batch.
    Pages = 0x10,
    /// Source → destination: pages that are now all zero.
    ZeroPages = 0x11,
    /// Source → destination: end of a round (u32 round number).
    RoundEnd = 0x12,
    /// Source → destination, on each additional connection: no more pages on it.
    DataEnd = 0x13,
    /// Source → destination: postcard `VmSnapshot` (vCPU, irqchip, clock, devices).
    State = 0x20,
    /// Destination → source: everything loaded, vCPUs created and paused.
    Ready = 0x21,
    /// Source → destination: ownership moves now.
    Commit = 0x22,
    /// Destination → source: resumed.
    Resumed = 0x23,
    /// Destination → source, after RESUMED: when the guest's first console line on the
    /// destination ended (u64 µs since the Unix epoch; 0: none within the wait).
    FirstOutput = 0x24,
    /// Source → destination: discard everything (UTF-8 reason).
    Cancel = 0x30,
    /// Either way: failing (UTF-8 reason).
    Error = 0x31,
    /// Source → destination, right before COMMIT: are you still there?
    Ping = 0x32,
    /// Destination → source: yes.
    Pong = 0x33,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Setup,
            0x03 => Accept,
            0x04 => Refuse,
            0x05 => Join,
            0x10 => Pages,
            0x11 => ZeroPages,
            0x12 => RoundEnd,
            0x13 => DataEnd,
            0x20 => State,
            0x21 => Ready,
            0x22 => Commit,
            0x23 => Resumed,
            0x24 => FirstOutput,
            0x30 => Cancel,
            0x31 => Error,
            0x32 => Ping,
            0x33 => Pong,
            _ => return None,
        })
    }
}

/// What the source tells the destination in setup.
#[derive(Debug, Serialize, Deserialize)]
pub struct Setup {
    /// The VM's config and boot kind (JSON, the state file's CONF section).
    pub config_json: Vec<u8>,
    /// The CPUID the guest sees (vCPU 0), for the destination's compatibility check.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Connections the memory travels over (1 = only this one).
    pub connections: u8,
    /// Identifies this migration's additional connections (their JOIN).
    pub session: [u8; 16],
}

/// How a frame's payload is compressed (the frame's `flags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Sent as is (flags 0).
    #[default]
    None,
    /// LZ4 block (flags 1): fast, modest ratio.
    Lz4,
    /// Zstandard level 1 (flags 2): better ratio, more CPU.
    Zstd,
}

impl Compression {
    fn flags(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
}

/// Compresses frame payloads of one connection.
pub struct Packer {
    how: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl Packer {
    /// A packer for `how`.
    pub fn new(how: Compression) -> Result<Packer, MigrationError> {
        let zstd = match how {
            Compression::Zstd => Some(zstd::bulk::Compressor::new(1)?),
            _ => None,
        };
        Ok(Packer {
            how,
            zstd,
            out: Vec::new(),
        })
    }

    /// Whether this packer compresses at all.
    pub fn compresses(&self) -> bool {
        self.how != Compression::None
    }

    /// Compresses `payload`: returns the flags and the bytes to send (the payload itself when
    /// compression does not make it smaller).
    pub fn pack<'a>(&'a mut self, payload: &'a [u8]) -> Result<(u8, &'a [u8]), MigrationError> {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.out.clear();
        self.out.extend_from_slice(&len.to_le_bytes());
        match self.how {
            Compression::None => return Ok((0, payload)),
            Compression::Lz4 => {
                let bound = lz4_flex::block::get_maximum_output_size(payload.len());
                self.out.resize(4 + bound, 0);
                let n = lz4_flex::block::compress_into(payload, &mut self.out[4..])
                    .map_err(|e| MigrationError::Protocol(format!("lz4: {e}")))?;
                self.out.truncate(4 + n);
            }
            Compression::Zstd => {
                let bound = zstd::compress_bound(payload.len());
                self.out.resize(4 + bound, 0);
                let n = match &mut self.zstd {
                    Some(z) => z.compress_to_buffer(payload, &mut self.out[4..])?,
                    None => bound,
                };
                self.out.truncate(4 + n);
            }
        }
        if self.out.len() >= payload.len() {
            return Ok((0, payload));
        }
        Ok((self.how.flags(), &self.out))
    }
}

/// Undoes [`Packer::pack`] into `out`.
fn unpack(flags: u8, packed: &[u8], out: &mut Vec<u8>) -> Result<(), MigrationError> {
    let bad = |m: String| MigrationError::Corrupt(format!("compressed frame: {m}"));
    if packed.len() < 4 {
        return Err(bad("too short".into()));
    }
    let len = u32::from_le_bytes([packed[0], packed[1], packed[2], packed[3]]);
    if len > MAX_PAYLOAD {
        return Err(bad(format!("expands to {len} bytes (limit {MAX_PAYLOAD})")));
    }
    out.clear();
    match flags {
        1 => {
            out.resize(len as usize, 0);
            let n = lz4_flex::block::decompress_into(&packed[4..], out)
                .map_err(|e| bad(e.to_string()))?;
            if n != len as usize {
                return Err(bad(format!("{n} bytes instead of {len}")));
            }
        }
        2 => {
            out.resize(len as usize, 0);
            let n = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&packed[4..], &mut out[..]))
                .map_err(|e| bad(e.to_string()))?;
            if n != len as usize {
                return Err(bad(format!("{n} bytes instead of {len}")));
            }
        }
        f => {
            return Err(MigrationError::Corrupt(format!(
                "unknown frame flags {f:#x}"
            )))
        }
    }
    Ok(())
}

/// Sets up a migration connection: no Nagle delay, read/write timeouts, and a TCP user
/// timeout so that data left unacknowledged (a cut link) fails the connection within
/// [`IO_TIMEOUT`] even while it still fits in the socket buffers.
pub fn tune(stream: &std::net::TcpStream) -> Result<(), MigrationError> {
    use std::os::fd::AsRawFd;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let ms = libc::c_uint::try_from(IO_TIMEOUT.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt on a valid TCP socket fd with a pointer to a live c_uint and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            std::ptr::addr_of!(ms).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
    write_frame_flags(w, kind, 0, payload)
}

/// Writes one frame whose payload was packed with `flags` (see [`Packer`]).
pub fn write_frame_flags<W: Write>(
    w: &mut W,
    kind: Kind,
    flags: u8,
    payload: &[u8],
) -> Result<(), MigrationError> {
    write_frame_vectored(w, kind, flags, &[payload])
}

/// Writes one uncompressed frame whose payload is the concatenation of `parts`, without
/// copying them together first.
pub fn write_frame_parts<W: Write>(
    w: &mut W,
    kind: Kind,
    parts: &[&[u8]],
) -> Result<(), MigrationError> {
    write_frame_vectored(w, kind, 0, parts)
}

fn write_frame_vectored<W: Write>(
    w: &mut W,
    kind: Kind,
    flags: u8,
    parts: &[&[u8]],
) -> Result<(), MigrationError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(total)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or_else(|| MigrationError::Corrupt(format!("payload of {total} bytes")))?;
    let mut head = [0u8; 8];
    head[0] = kind as u8;
    head[1] = flags;
    head[4..8].copy_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    for p in parts {
        h.update(p);
    }
    let crc = h.finalize().to_le_bytes();
    if total <= SMALL_FRAME {
        // Control frames go out in one write even on an unbuffered socket: no partial frame
        // on the wire if the peer hangs up between segments.
        let mut f = Vec::with_capacity(12 + total);
        f.extend_from_slice(&head);
        for p in parts {
            f.extend_from_slice(p);
        }
        f.extend_from_slice(&crc);
        w.write_all(&f)?;
    } else {
        w.write_all(&head)?;
        for p in parts {
            w.write_all(p)?;
        }
        w.write_all(&crc)?;
    }
    Ok(())
}

/// Frames up to this payload size are written with a single `write`.
const SMALL_FRAME: usize = 64 * 1024;

/// Reads one frame, decompressing it if needed; `buf` is reused for the payload.
pub fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Kind, MigrationError> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let kind = Kind::from_u8(head[0])
        .ok_or_else(|| MigrationError::Corrupt(format!("unknown message kind {:#x}", head[0])))?;
    if head[1] > 2 || head[2] != 0 || head[3] != 0 {
        return Err(MigrationError::Corrupt("unknown frame flags".into()));
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_PAYLOAD {
        return Err(MigrationError::Corrupt(format!(
            "frame of {len} bytes (limit {MAX_PAYLOAD})"
        )));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf)?;
    let mut c = [0u8; 4];
    r.read_exact(&mut c)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(buf);
    if u32::from_le_bytes(c) != h.finalize() {
        return Err(MigrationError::Corrupt(format!(
            "checksum mismatch in a {kind:?} frame"
        )));
    }
    if head[1] != 0 {
        let mut out = Vec::new();
        unpack(head[1], buf, &mut out)?;
        *buf = out;
    }
    Ok(kind)
}

/// Sends HELLO and checks the peer's.
pub fn handshake<S: Read + Write>(s: &mut S) -> Result<(), MigrationError> {
    let mut hello = Vec::with_capacity(12);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&MIN_VERSION.to_le_bytes());
    write_frame(s, Kind::Hello, &hello)?;
    s.flush()?;
    let mut buf = Vec::new();
    let mut head = [0u8; 8];
    // Read the header by hand first: a peer of another protocol gets a clear error, not a
    // checksum complaint.
    s.read_exact(&mut head)?;
    if head[0] == 0x16 && head[1] == 0x03 {
        return Err(MigrationError::Protocol(
            "the peer opened a TLS session but this side runs without TLS (--insecure)".into(),
        ));
    }
    if head[0] != Kind::Hello as u8
        || u32::from_le_bytes([head[4], head[5], head[6], head[7]]) != 12
    {
        return Err(MigrationError::Protocol(
            "the peer did not start with a Ferry HELLO".into(),
        ));
    }
    buf.resize(12, 0);
    s.read_exact(&mut buf)?;
    let mut c = [0u8; 4];
    s.read_exact(&mut c)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&buf);
    if u32::from_le_bytes(c) != h.finalize() || buf[..8] != MAGIC {
        return Err(MigrationError::Protocol("bad HELLO".into()));
    }
    let peer = u16::from_le_bytes([buf[8], buf[9]]);
    let peer_min = u16::from_le_bytes([buf[10], buf[11]]);
    if peer < MIN_VERSION || peer_min > VERSION {
        return Err(MigrationError::Protocol(format!(
            "peer speaks version {peer} (accepts {peer_min}+), this side speaks {VERSION} (accepts {MIN_VERSION}+)"
        )));
    }
    Ok(())
}

/// Encodes a page batch: count u32, page numbers, then the data.
pub fn encode_pages(pages: &[u64], data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&u32::try_from(pages.len()).unwrap_or(0).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out.extend_from_slice(data);
}

/// Decodes a page batch (or, with `with_data = false`, a zero-page list).
pub fn decode_pages(payload: &[u8], with_data: bool) -> Result<(Vec<u64>, &[u8]), MigrationError> {
    let bad = |m: &str| MigrationError::Corrupt(format!("page batch: {m}"));
    if payload.len() < 4 {
        return Err(bad("too short"));
    }
    let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    let idx_end = n
        .checked_mul(8)
        .and_then(|x| x.checked_add(4))
        .ok_or_else(|| bad("count"))?;
    let data_len = if with_data {
        n.checked_mul(vmm::memory::PAGE_SIZE)
            .ok_or_else(|| bad("count"))?
    } else {
        0
    };
    if payload.len() != idx_end + data_len {
        return Err(bad("length does not match the page count"));
    }
    let pages = payload[4..idx_end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok((pages, &payload[idx_end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_any_flip_is_caught() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Pages, b"0123456789").unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_frame(&mut wire.as_slice(), &mut buf).unwrap(),
            Kind::Pages
        );
        assert_eq!(buf, b"0123456789");
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x04;
            assert!(
                read_frame(&mut bad.as_slice(), &mut buf).is_err(),
                "flip at {i}"
            );
        }
        let mut huge = wire.clone();
        huge[4..8].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut huge.as_slice(), &mut buf),
            Err(MigrationError::Corrupt(_))
        ));
    }

    #[test]
    fn compressed_frames_round_trip_and_lies_are_caught() {
        let mut payload = vec![0u8; 300_000];
        for (i, b) in payload.iter_mut().enumerate().step_by(7) {
            *b = (i % 251) as u8;
        }
        for how in [Compression::Lz4, Compression::Zstd] {
            let mut p = Packer::new(how).unwrap();
            let (flags, packed) = p.pack(&payload).unwrap();
            assert_ne!(flags, 0, "{how:?} did not compress");
            assert!(packed.len() < payload.len() / 2);
            let mut wire = Vec::new();
            write_frame_flags(&mut wire, Kind::Pages, flags, packed).unwrap();
            let mut buf = Vec::new();
            read_frame(&mut wire.as_slice(), &mut buf).unwrap();
            assert_eq!(buf, payload);
            // A declared size that does not match what the data expands to.
            let mut lie = packed.to_vec();
            lie[0..4].copy_from_slice(&1000u32.to_le_bytes());
            let mut wire = Vec::new();
            write_frame_flags(&mut wire, Kind::Pages, flags, &lie).unwrap();
            assert!(matches!(
                read_frame(&mut wire.as_slice(), &mut buf),
                Err(MigrationError::Corrupt(_))
            ));
            // A bomb: declares more than the frame limit.
            lie[0..4].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
            let mut wire = Vec::new();
            write_frame_flags(&mut wire, Kind::Pages, flags, &lie).unwrap();
            assert!(matches!(
                read_frame(&mut wire.as_slice(), &mut buf),
                Err(MigrationError::Corrupt(_))
            ));
        }
        // Incompressible data goes as is.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut p = Packer::new(Compression::Lz4).unwrap();
        assert_eq!(p.pack(&noise).unwrap().0, 0);
    }

    #[test]
    fn a_frame_written_in_parts_reads_as_one() {
        let mut a = Vec::new();
        write_frame(&mut a, Kind::Pages, b"headerdata").unwrap();
        let mut b = Vec::new();
        write_frame_parts(&mut b, Kind::Pages, &[b"header", b"data"]).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn page_batches_are_checked() {
        let mut out = Vec::new();
        encode_pages(&[3, 9], &[7u8; 8192], &mut out);
        let (p, d) = decode_pages(&out, true).unwrap();
        assert_eq!(p, vec![3, 9]);
        assert_eq!(d.len(), 8192);
        assert!(decode_pages(&out[..out.len() - 1], true).is_err());
        encode_pages(&[1, 2, 3], &[], &mut out);
        assert_eq!(decode_pages(&out, false).unwrap().0, vec![1, 2, 3]);
        let mut lie = out.clone();
        lie[0] = 200;
        assert!(decode_pages(&lie, false).is_err());
    }
}
