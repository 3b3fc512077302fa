//! Intel MultiProcessor Specification 1.4 table, so that Linux (built without ACPI) finds every
//! vCPU, the IOAPIC and the ISA interrupt routing.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::{GuestRam, MemoryError};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201; // FPU + APIC
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table for `vcpus` processors (for address `base`).
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(0u8); // processor
        entries.push(id); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT -> LINT0, NMI -> LINT1 on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let len = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&len.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"FERRY   ");
    header.extend_from_slice(b"FERRYVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended checksum
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fps = Vec::with_capacity(16);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fps.push(1); // length in 16-byte units
    fps.push(4);
    fps.push(0); // checksum
    fps.extend_from_slice(&[0; 5]);
    fps[10] = checksum(&fps);

    let mut out = fps;
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table into guest memory.
pub fn write(ram: &GuestRam, vcpus: u8) -> Result<(), MemoryError> {
    ram.write(MPTABLE_ADDR, &build(vcpus, MPTABLE_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_layout_are_valid() {
        let t = build(2, MPTABLE_ADDR);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // 2 processors + bus + ioapic + 16 irqs + 2 local = 22 entries
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 22);
        // fits below 640 KiB
        assert!(MPTABLE_ADDR + t.len() as u64 <= 0xa0000);
    }
}
