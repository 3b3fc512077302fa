//! The page codec: how guest pages travel inside PAGES and ZERO_PAGES frames.
//!
//! ```text
//! PAGES      count u32 | count × page number u64 | count × 4096 bytes
//! ZERO_PAGES count u32 | count × page number u64
//! ```
//! Page numbers are guest-physical addresses ÷ 4096. A PAGES payload may be compressed as a
//! whole ([`Compression`]); a compressed payload is `uncompressed length u32 | bytes`.
//!
//! The sender copies each non-zero page once, into its batch, and the batch goes to the
//! connection as it is ([`write_batch`]). The receiver reads a batch into one reused buffer,
//! checks its CRC, and writes its runs of consecutive pages into the guest's memory file in
//! one write each ([`PageReader`]) — no page fault and no zeroing for a page not yet backed;
//! pages that became zero are given back to the host instead of being written.

use std::io::{Read, Write};

use vmm::memory::{GuestRam, PAGE_SIZE};

use super::frame::{self, Header, Kind};
use super::{MigrationError, MAX_PAYLOAD};

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
pub(crate) fn unpack(flags: u8, packed: &[u8], out: &mut Vec<u8>) -> Result<(), MigrationError> {
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

/// Encodes a page list: count u32, then the page numbers.
pub fn encode_index(pages: &[u64], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&u32::try_from(pages.len()).unwrap_or(0).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
}

/// Decodes a PAGES payload (`with_data`) or a ZERO_PAGES payload into its page numbers and
/// data.
pub fn decode(payload: &[u8], with_data: bool) -> Result<(Vec<u64>, &[u8]), MigrationError> {
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
        n.checked_mul(PAGE_SIZE).ok_or_else(|| bad("count"))?
    } else {
        0
    };
    if payload.len() != idx_end + data_len {
        return Err(bad("length does not match the page count"));
    }
    let pages = payload[4..idx_end]
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    Ok((pages, &payload[idx_end..]))
}

/// Writes one PAGES frame: `pages` and their data (`pages.len()` × 4096 bytes, in order),
/// compressed by `packer` when it compresses and that pays. `index` is a reused buffer.
/// Returns the payload bytes before and after compression.
pub fn write_batch<W: Write>(
    w: &mut W,
    packer: &mut Packer,
    pages: &[u64],
    data: &[u8],
    index: &mut Vec<u8>,
    corrupt: bool,
) -> Result<(u64, u64), MigrationError> {
    encode_index(pages, index);
    let raw = (index.len() + data.len()) as u64;
    if !packer.compresses() && !corrupt {
        // The page data goes out from the batch buffer as it is.
        frame::write(w, Kind::Pages, 0, &[index, data])?;
        return Ok((raw, raw));
    }
    index.extend_from_slice(data);
    let (flags, wire) = packer.pack(index)?;
    if corrupt {
        // Fault injection: one byte flipped after the checksum was computed.
        let mut f = Vec::new();
        frame::write(&mut f, Kind::Pages, flags, &[wire])?;
        let mid = f.len() / 2;
        f[mid] ^= 0x20;
        w.write_all(&f)?;
    } else {
        frame::write(w, Kind::Pages, flags, &[wire])?;
    }
    Ok((raw, wire.len() as u64))
}

/// The receiver's page path, with its reused buffers.
#[derive(Default)]
pub struct PageReader {
    buf: Vec<u8>,
}

impl PageReader {
    /// Reads the rest of the PAGES or ZERO_PAGES frame `head` and puts its pages into `ram`.
    /// Nothing is written before the frame's CRC has been checked. Returns the pages received.
    pub fn receive<R: Read>(
        &mut self,
        r: &mut R,
        head: Header,
        ram: &GuestRam,
    ) -> Result<u64, MigrationError> {
        frame::read_body(r, head, &mut self.buf)?;
        let with_data = head.kind == Kind::Pages;
        let (pages, data) = decode(&self.buf, with_data)?;
        for p in &pages {
            let ok = p
                .checked_mul(PAGE_SIZE as u64)
                .is_some_and(|a| ram.contains(a, PAGE_SIZE as u64));
            if !ok {
                return Err(MigrationError::Corrupt(format!(
                    "page {p} is outside guest RAM"
                )));
            }
        }
        // Runs of consecutive pages go in one write (or one hole).
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len()
                && pages[j] == pages[j - 1] + 1
                && same_range(ram, pages[i], pages[j])
            {
                j += 1;
            }
            let addr = pages[i] * PAGE_SIZE as u64;
            if with_data {
                ram.store(addr, &data[i * PAGE_SIZE..j * PAGE_SIZE])?;
            } else {
                ram.discard(addr, ((j - i) * PAGE_SIZE) as u64)?;
            }
            i = j;
        }
        Ok(pages.len() as u64)
    }
}

/// Whether pages `a` and `b` lie in one RAM range (a run never crosses the MMIO hole).
fn same_range(ram: &GuestRam, a: u64, b: u64) -> bool {
    let (a, b) = (a * PAGE_SIZE as u64, b * PAGE_SIZE as u64);
    ram.contains(a, b - a + PAGE_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            frame::write(&mut wire, Kind::Pages, flags, &[packed]).unwrap();
            let mut buf = Vec::new();
            frame::read(&mut wire.as_slice(), &mut buf).unwrap();
            assert_eq!(buf, payload);
            // A declared size that does not match what the data expands to.
            let mut lie = packed.to_vec();
            lie[0..4].copy_from_slice(&1000u32.to_le_bytes());
            let mut wire = Vec::new();
            frame::write(&mut wire, Kind::Pages, flags, &[&lie]).unwrap();
            assert!(matches!(
                frame::read(&mut wire.as_slice(), &mut buf),
                Err(MigrationError::Corrupt(_))
            ));
            // A bomb: declares more than the frame limit.
            lie[0..4].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
            let mut wire = Vec::new();
            frame::write(&mut wire, Kind::Pages, flags, &[&lie]).unwrap();
            assert!(matches!(
                frame::read(&mut wire.as_slice(), &mut buf),
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
    fn page_batches_are_checked() {
        let mut out = Vec::new();
        encode_index(&[3, 9], &mut out);
        out.extend_from_slice(&[7u8; 8192]);
        let (p, d) = decode(&out, true).unwrap();
        assert_eq!(p, vec![3, 9]);
        assert_eq!(d.len(), 8192);
        assert!(decode(&out[..out.len() - 1], true).is_err());
        encode_index(&[1, 2, 3], &mut out);
        assert_eq!(decode(&out, false).unwrap().0, vec![1, 2, 3]);
        let mut lie = out.clone();
        lie[0] = 200;
        assert!(decode(&lie, false).is_err());
    }

    fn pattern(page: u64) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (page as usize * 31 + i) as u8)
            .collect()
    }

    #[test]
    fn batches_land_in_guest_memory_and_zero_lists_make_holes() {
        let ram = GuestRam::new("pages", 16 << 20).unwrap();
        // Two runs (3, 4, 5 and 9), written plain and compressed.
        let pages = [3u64, 4, 5, 9];
        let data: Vec<u8> = pages.iter().flat_map(|&p| pattern(p)).collect();
        let mut reader = PageReader::default();
        for how in [Compression::None, Compression::Lz4] {
            let mut wire = Vec::new();
            let mut packer = Packer::new(how).unwrap();
            write_batch(
                &mut wire,
                &mut packer,
                &pages,
                &data,
                &mut Vec::new(),
                false,
            )
            .unwrap();
            let mut r = wire.as_slice();
            let head = frame::read_header(&mut r).unwrap();
            assert_eq!(reader.receive(&mut r, head, &ram).unwrap(), 4);
            for &p in &pages {
                let mut got = vec![0u8; PAGE_SIZE];
                ram.read(p * PAGE_SIZE as u64, &mut got).unwrap();
                assert_eq!(got, pattern(p), "page {p} ({how:?})");
            }
            assert!(ram.page_is_zero(6 * PAGE_SIZE as u64).unwrap());
        }
        let mut zeros = Vec::new();
        encode_index(&[4, 9], &mut zeros);
        let mut wire = Vec::new();
        frame::write(&mut wire, Kind::ZeroPages, 0, &[&zeros]).unwrap();
        let mut r = wire.as_slice();
        let head = frame::read_header(&mut r).unwrap();
        reader.receive(&mut r, head, &ram).unwrap();
        assert!(ram.page_is_zero(4 * PAGE_SIZE as u64).unwrap());
        assert!(ram.page_is_zero(9 * PAGE_SIZE as u64).unwrap());
        assert!(!ram.page_is_zero(5 * PAGE_SIZE as u64).unwrap());
    }

    #[test]
    fn a_damaged_or_foreign_batch_writes_nothing() {
        let ram = GuestRam::new("pages-bad", 16 << 20).unwrap();
        let mut wire = Vec::new();
        write_batch(
            &mut wire,
            &mut Packer::new(Compression::None).unwrap(),
            &[7],
            &pattern(7),
            &mut Vec::new(),
            true,
        )
        .unwrap();
        let mut r = wire.as_slice();
        let head = frame::read_header(&mut r).unwrap();
        let mut reader = PageReader::default();
        assert!(matches!(
            reader.receive(&mut r, head, &ram),
            Err(MigrationError::Corrupt(_))
        ));
        assert!(ram.page_is_zero(7 * PAGE_SIZE as u64).unwrap());
        // A page beyond the end of RAM.
        let mut wire = Vec::new();
        let far = (64 << 20) / PAGE_SIZE as u64;
        write_batch(
            &mut wire,
            &mut Packer::new(Compression::None).unwrap(),
            &[far],
            &pattern(far),
            &mut Vec::new(),
            false,
        )
        .unwrap();
        let mut r = wire.as_slice();
        let head = frame::read_header(&mut r).unwrap();
        assert!(matches!(
            reader.receive(&mut r, head, &ram),
            Err(MigrationError::Corrupt(_))
        ));
    }
}
