//! How fast a running guest writes its memory, measured without KVM's dirty log: a random
//! sample of guest pages is hashed at the start of a window and again at its end, and the
//! share that changed, times the RAM's size, over the window is the estimate (unique bytes
//! written per second over that window — what a live migration's pre-copy has to resend).
//! QEMU's `calc-dirty-rate` in its page-sampling mode works the same way.
//!
//! Pages the guest never touched are not read (that would make the host allocate them): a
//! page not resident in the memory file is recorded as absent, and one that became resident
//! during the window counts as written.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::memory::{ram_ranges, GuestRam, MemoryError, PAGE_SIZE};

/// Pages sampled per GiB of guest RAM (QEMU's default for page sampling).
pub const PAGES_PER_GIB: u64 = 512;
/// Fewest pages sampled, however small the guest.
pub const MIN_PAGES: u64 = 256;
/// Most pages sampled, however large the guest.
pub const MAX_PAGES: u64 = 16_384;

/// The estimate of one window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    /// Guest RAM written, bytes per second (estimated from the sample).
    pub bytes_per_second: f64,
    /// Pages in the sample.
    pub sampled_pages: u32,
    /// Of those, the pages that changed during the window.
    pub changed_pages: u32,
    /// How long the window was, milliseconds.
    pub window_ms: u64,
}

/// A sample taken at the start of a window: where each sampled page is and its hash (`None`:
/// not resident).
#[derive(Debug)]
pub struct DirtySample {
    pages: Vec<(u64, Option<u64>)>,
    started: Instant,
}

/// How many pages a guest of `size` bytes has sampled.
pub fn sample_size(size: u64) -> u64 {
    let pages = size / PAGE_SIZE as u64;
    (size * PAGES_PER_GIB / (1 << 30))
        .clamp(MIN_PAGES, MAX_PAGES)
        .min(pages)
}

/// xorshift64*: the sample's page numbers from `seed`.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn hash_page(ram: &GuestRam, addr: u64, buf: &mut [u8]) -> Result<Option<u64>, MemoryError> {
    if !ram.page_resident(addr)? {
        return Ok(None);
    }
    ram.read(addr, buf)?;
    let mut h = DefaultHasher::new();
    h.write(buf);
    Ok(Some(h.finish()))
}

impl DirtySample {
    /// Starts a window over `ram`: hashes a random sample of its pages (drawn from `seed`).
    pub fn take(ram: &GuestRam, seed: u64) -> Result<DirtySample, MemoryError> {
        let ranges = ram_ranges(ram.size());
        let total_pages = ram.size() / PAGE_SIZE as u64;
        let n = sample_size(ram.size());
        let mut state = seed | 1;
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut pages = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            // The page-th page of RAM, counted across the ranges.
            let mut page = next(&mut state) % total_pages.max(1);
            let mut addr = None;
            for &(start, len) in &ranges {
                let in_range = len / PAGE_SIZE as u64;
                if page < in_range {
                    addr = Some(start + page * PAGE_SIZE as u64);
                    break;
                }
                page -= in_range;
            }
            let Some(addr) = addr else {
                continue;
            };
            pages.push((addr, hash_page(ram, addr, &mut buf)?));
        }
        Ok(DirtySample {
            pages,
            started: Instant::now(),
        })
    }

    /// Ends the window: hashes the same pages again and estimates the rate.
    pub fn finish(self, ram: &GuestRam) -> Result<DirtyRate, MemoryError> {
        let elapsed = self.started.elapsed();
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut changed = 0u32;
        for &(addr, before) in &self.pages {
            if hash_page(ram, addr, &mut buf)? != before {
                changed += 1;
            }
        }
        let sampled = u32::try_from(self.pages.len()).unwrap_or(u32::MAX);
        let secs = elapsed.as_secs_f64();
        let bytes_per_second = if sampled == 0 || secs <= 0.0 {
            0.0
        } else {
            f64::from(changed) / f64::from(sampled) * ram.size() as f64 / secs
        };
        Ok(DirtyRate {
            bytes_per_second,
            sampled_pages: sampled,
            changed_pages: changed,
            window_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn fill(ram: &GuestRam, every: u64, byte: u8) {
        let page = vec![byte; PAGE_SIZE];
        let mut a = 0;
        while a < ram.size() {
            ram.write(a, &page).unwrap();
            a += every * PAGE_SIZE as u64;
        }
    }

    #[test]
    fn the_sample_scales_with_the_guest_within_bounds() {
        assert_eq!(sample_size(16 * MIB), MIN_PAGES);
        assert_eq!(sample_size(4 << 30), 4 * PAGES_PER_GIB);
        assert_eq!(sample_size(1 << 40), MAX_PAGES);
    }

    #[test]
    fn the_share_of_pages_written_in_the_window_is_the_estimate() {
        let ram = GuestRam::new("dirty-rate", 64 * MIB).unwrap();
        // Every page touched once before the window.
        fill(&ram, 1, 1);
        let s = DirtySample::take(&ram, 42).unwrap();
        // A quarter of the pages written during it.
        fill(&ram, 4, 2);
        let r = s.finish(&ram).unwrap();
        assert_eq!(u64::from(r.sampled_pages), MIN_PAGES);
        let share = f64::from(r.changed_pages) / f64::from(r.sampled_pages);
        assert!((0.15..0.35).contains(&share), "{r:?}");
        let secs = r.window_ms.max(1) as f64 / 1000.0;
        // bytes/s × window ≈ a quarter of 64 MiB (the window's own length is measured).
        let written = r.bytes_per_second * secs;
        assert!(
            written > 0.1 * 64.0 * MIB as f64 && written < 0.5 * 64.0 * MIB as f64,
            "{r:?}"
        );
        // Nothing written: nothing changed.
        let s = DirtySample::take(&ram, 43).unwrap();
        let r = s.finish(&ram).unwrap();
        assert_eq!(r.changed_pages, 0);
        assert_eq!(r.bytes_per_second, 0.0);
    }

    #[test]
    fn pages_the_guest_never_touched_are_not_allocated_but_their_first_write_counts() {
        let ram = GuestRam::new("dirty-rate-holes", 64 * MIB).unwrap();
        let s = DirtySample::take(&ram, 7).unwrap();
        let r = DirtySample::take(&ram, 7).unwrap().finish(&ram).unwrap();
        assert_eq!(r.changed_pages, 0);
        // Sampling read nothing in: still no page of the file is resident.
        assert!(
            s.pages
                .iter()
                .all(|&(a, h)| h.is_none() && !ram.page_resident(a).unwrap()),
            "sampling faulted pages in"
        );
        // Every page written (a guest touching its memory the first time): all changed.
        fill(&ram, 1, 3);
        let r = s.finish(&ram).unwrap();
        assert_eq!(r.changed_pages, r.sampled_pages);
    }
}
