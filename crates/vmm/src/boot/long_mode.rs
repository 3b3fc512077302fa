//! 64-bit long mode entry: a flat GDT, identity page tables for the first 4 GiB (2 MiB pages),
//! and the segment/control registers that go with them.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{GDT_ADDR, PML4_ADDR};
use crate::memory::{GuestRam, MemoryError};

const GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 0x08: code, 64-bit, present, DPL 0
    0x00cf_9300_0000_ffff, // 0x10: data, present, writable
    0x008f_8b00_0000_ffff, // 0x18: TSS (busy)
];
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT and the identity page tables into guest memory.
pub fn write_tables(ram: &GuestRam) -> Result<(), MemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        ram.write(GDT_ADDR + 8 * i as u64, &e.to_le_bytes())?;
    }
    let pdpt = PML4_ADDR + 0x1000;
    let pd0 = PML4_ADDR + 0x2000;
    ram.write(PML4_ADDR, &(pdpt | 0x3).to_le_bytes())?;
    for g in 0..4u64 {
        let pd = pd0 + g * 0x1000;
        ram.write(pdpt + 8 * g, &(pd | 0x3).to_le_bytes())?;
        let mut page = vec![0u8; 4096];
        for (j, chunk) in page.chunks_exact_mut(8).enumerate() {
            let phys = (g << 30) | ((j as u64) << 21);
            chunk.copy_from_slice(&(phys | 0x83).to_le_bytes()); // present, writable, 2 MiB
        }
        ram.write(pd, &page)?;
    }
    Ok(())
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flags = (descriptor >> 40) & 0xff | ((descriptor >> 52) & 0xf) << 8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 10) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 9) & 1) as u8,
        g: ((flags >> 11) & 1) as u8,
        avl: ((flags >> 8) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Turns `sregs` (as read from a fresh vCPU) into long mode with the tables above.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    let code = segment(CODE_SEL, GDT[1]);
    let data = segment(DATA_SEL, GDT[2]);
    let mut tss = segment(TSS_SEL, GDT[3]);
    tss.limit = 0xfffff;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers for the entry point.
pub fn entry_regs(rip: u64, rsp: u64, rdi: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip,
        rsp,
        rbp: rsp,
        rdi,
        rsi,
        ..Default::default()
    }
}

/// The FPU as firmware leaves it.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_64_bit_segments() {
        let cs = segment(CODE_SEL, GDT[1]);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.g),
            (1, 0, 1, 1, 0xb, 1)
        );
        let ds = segment(DATA_SEL, GDT[2]);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let ram = GuestRam::new("pt", 16 << 20).unwrap();
        write_tables(&ram).unwrap();
        let mut e = [0u8; 8];
        // PD 3, entry 511 maps the last 2 MiB below 4 GiB.
        ram.read(PML4_ADDR + 0x2000 + 3 * 0x1000 + 511 * 8, &mut e)
            .unwrap();
        assert_eq!(u64::from_le_bytes(e), 0xffe0_0000 | 0x83);
    }
}
