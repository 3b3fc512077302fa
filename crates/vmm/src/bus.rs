//! An address bus: non-overlapping ranges of port or guest-physical addresses, each naming
//! the device that answers there. A vCPU exit finds its device by one ordered lookup instead of
//! a chain of range checks.

use std::collections::BTreeMap;

/// Errors of building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps past the end of the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    BadRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps {other:#x}+{other_len:#x}")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
        /// The range it overlaps.
        other: u64,
        /// That range's length.
        other_len: u64,
    },
}

/// Ranges of addresses, each with the `T` that answers there.
#[derive(Debug)]
pub struct Bus<T> {
    /// Keyed by each range's first address: (length, device).
    ranges: BTreeMap<u64, (u64, T)>,
}

impl<T> Default for Bus<T> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<T> Bus<T> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`; refused if the range is empty, wraps or overlaps.
    pub fn insert(&mut self, base: u64, len: u64, device: T) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The nearest range starting at or below the new one, and the first starting above.
        let below = self.ranges.range(..=base).next_back();
        let above = self.ranges.range(base..).next();
        for (&other, &(other_len, _)) in below.into_iter().chain(above) {
            if other < end && base < other + other_len {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other,
                    other_len,
                });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds `addr`, with `addr`'s offset from the range's start.
    pub fn find(&self, addr: u64) -> Option<(u64, &T)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off < *len).then_some((off, device))
    }

    /// How many ranges the bus holds.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the bus holds no range.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_device_and_offset_and_nothing_between_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, "com1").unwrap();
        bus.insert(0x64, 1, "i8042").unwrap();
        bus.insert(0x1000, 0x1000, "mmio0").unwrap();
        assert_eq!(bus.find(0x3f8), Some((0, &"com1")));
        assert_eq!(bus.find(0x3ff), Some((7, &"com1")));
        assert_eq!(bus.find(0x400), None);
        assert_eq!(bus.find(0x63), None);
        assert_eq!(bus.find(0x64), Some((0, &"i8042")));
        assert_eq!(bus.find(0x1fff), Some((0xfff, &"mmio0")));
        assert_eq!(bus.find(0x2000), None);
        assert_eq!(bus.find(0), None);
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn refuses_overlaps_empty_and_wrapping_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x1000, 1).unwrap();
        for (base, len) in [(0x1000, 1), (0xfff, 2), (0x1fff, 1), (0x800, 0x2000)] {
            assert!(
                matches!(bus.insert(base, len, 2), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(
            bus.insert(5, 0, 2),
            Err(BusError::BadRange { base: 5, len: 0 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, 2),
            Err(BusError::BadRange { .. })
        ));
        // Touching is not overlapping.
        bus.insert(0x2000, 0x10, 3).unwrap();
        bus.insert(0xff0, 0x10, 4).unwrap();
        assert_eq!(bus.find(0xfff), Some((0xf, &4)));
        assert_eq!(bus.find(0x2000), Some((0, &3)));
    }
}
