//! Framing: every message is one frame.
//!
//! ```text
//! kind u8 | flags u8 | reserved u16 (0) | length u32 | payload [length] | crc32 u32
//! ```
//! little endian; the CRC-32 covers header and payload as sent; payloads are at most
//! [`MAX_PAYLOAD`] bytes, also once decompressed. `flags` says how the payload is compressed
//! (see [`super::pages::Compression`]). Nothing here knows what a payload means: that is
//! [`super::message`] (control messages) and [`super::pages`] (page data).

use std::io::{Read, Write};

use super::{pages, MigrationError, MAX_PAYLOAD};

/// Bytes before a frame's payload.
pub const HEADER_LEN: usize = 8;
/// Bytes after it (the CRC).
pub const TRAILER_LEN: usize = 4;

/// Frames up to this payload size are written with a single `write`, so that a control frame
/// is never left half on the wire when the peer hangs up between segments.
const SMALL_FRAME: usize = 64 * 1024;

/// Message kinds (a frame's first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both ways, first: magic, version, oldest accepted version.
    Hello = 0x01,
    /// Source → destination: the VM's setup.
    Setup = 0x02,
    /// Destination → source: ready to receive.
    Accept = 0x03,
    /// Destination → source: UTF-8 reason.
    Refuse = 0x04,
    /// Source → destination, first on each additional connection.
    Join = 0x05,
    /// Source → destination: page batch.
    Pages = 0x10,
    /// Source → destination: pages that are now all zero.
    ZeroPages = 0x11,
    /// Source → destination: end of a round.
    RoundEnd = 0x12,
    /// Source → destination, on each additional connection: no more pages on it.
    DataEnd = 0x13,
    /// Source → destination: vCPU, irqchip, clock and device state.
    State = 0x20,
    /// Destination → source: everything loaded, vCPUs created and paused.
    Ready = 0x21,
    /// Source → destination: ownership moves now.
    Commit = 0x22,
    /// Destination → source: resumed.
    Resumed = 0x23,
    /// Destination → source, after RESUMED: the guest's first console line there.
    FirstOutput = 0x24,
    /// Source → destination: discard everything.
    Cancel = 0x30,
    /// Either way: failing.
    Error = 0x31,
    /// Source → destination, right before COMMIT: are you still there?
    Ping = 0x32,
    /// Destination → source: yes.
    Pong = 0x33,
}

impl Kind {
    /// The kind of a frame's first byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
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

/// A frame's header, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The message kind.
    pub kind: Kind,
    /// How the payload is compressed (0: not).
    pub flags: u8,
    /// Payload bytes on the wire.
    pub len: u32,
}

impl Header {
    fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut head = [0u8; HEADER_LEN];
        head[0] = self.kind as u8;
        head[1] = self.flags;
        head[4..8].copy_from_slice(&self.len.to_le_bytes());
        head
    }

    /// A CRC hasher that has taken in this header, to be fed the payload.
    pub fn hasher(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.bytes());
        h
    }
}

/// Writes one frame whose payload is the concatenation of `parts`, without copying them
/// together first (except for small frames, which go out in one write).
pub fn write<W: Write>(
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
    let head = Header { kind, flags, len };
    let mut h = head.hasher();
    for p in parts {
        h.update(p);
    }
    let crc = h.finalize().to_le_bytes();
    if total <= SMALL_FRAME {
        let mut f = Vec::with_capacity(HEADER_LEN + total + TRAILER_LEN);
        f.extend_from_slice(&head.bytes());
        for p in parts {
            f.extend_from_slice(p);
        }
        f.extend_from_slice(&crc);
        w.write_all(&f)?;
    } else {
        // Large frames (page batches) in as few system calls as the writer allows: one
        // `writev` of header, parts and CRC on a socket or a buffered writer's way to one.
        let head = head.bytes();
        let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(parts.len() + 2);
        slices.push(std::io::IoSlice::new(&head));
        slices.extend(parts.iter().map(|p| std::io::IoSlice::new(p)));
        slices.push(std::io::IoSlice::new(&crc));
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Reads and checks a frame's header (kind, flags, reserved bytes, length).
pub fn read_header<R: Read>(r: &mut R) -> Result<Header, MigrationError> {
    let mut head = [0u8; HEADER_LEN];
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
    Ok(Header {
        kind,
        flags: head[1],
        len,
    })
}

/// Reads a frame's CRC and checks it against `h` (header and payload as read).
pub fn check_trailer<R: Read>(
    r: &mut R,
    h: crc32fast::Hasher,
    kind: Kind,
) -> Result<(), MigrationError> {
    let mut c = [0u8; TRAILER_LEN];
    r.read_exact(&mut c)?;
    if u32::from_le_bytes(c) != h.finalize() {
        return Err(MigrationError::Corrupt(format!(
            "checksum mismatch in a {kind:?} frame"
        )));
    }
    Ok(())
}

/// Reads the payload and CRC of the frame `head` into `buf` (decompressed, if it was).
pub fn read_body<R: Read>(
    r: &mut R,
    head: Header,
    buf: &mut Vec<u8>,
) -> Result<(), MigrationError> {
    buf.resize(head.len as usize, 0);
    r.read_exact(buf)?;
    let mut h = head.hasher();
    h.update(buf);
    check_trailer(r, h, head.kind)?;
    if head.flags != 0 {
        let mut out = Vec::new();
        pages::unpack(head.flags, buf, &mut out)?;
        *buf = out;
    }
    Ok(())
}

/// Reads one whole frame into `buf`; returns its kind.
pub fn read<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Kind, MigrationError> {
    let head = read_header(r)?;
    read_body(r, head, buf)?;
    Ok(head.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_any_flip_is_caught() {
        let mut wire = Vec::new();
        write(&mut wire, Kind::Pages, 0, &[b"0123456789"]).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read(&mut wire.as_slice(), &mut buf).unwrap(), Kind::Pages);
        assert_eq!(buf, b"0123456789");
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x04;
            assert!(read(&mut bad.as_slice(), &mut buf).is_err(), "flip at {i}");
        }
        let mut huge = wire.clone();
        huge[4..8].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read(&mut huge.as_slice(), &mut buf),
            Err(MigrationError::Corrupt(_))
        ));
    }

    #[test]
    fn a_frame_written_in_parts_reads_as_one() {
        let mut a = Vec::new();
        write(&mut a, Kind::Pages, 0, &[b"headerdata"]).unwrap();
        let mut b = Vec::new();
        write(&mut b, Kind::Pages, 0, &[b"header", b"data"]).unwrap();
        assert_eq!(a, b);
        // A large frame goes out piece by piece, and reads the same.
        let big = vec![7u8; 100_000];
        let mut c = Vec::new();
        write(&mut c, Kind::Pages, 0, &[&big[..40_000], &big[40_000..]]).unwrap();
        let mut buf = Vec::new();
        read(&mut c.as_slice(), &mut buf).unwrap();
        assert_eq!(buf, big);
    }
}
