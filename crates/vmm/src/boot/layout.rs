//! Fixed guest-physical addresses of what the VMM places in low memory.

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot-info block (bare metal) or `boot_params` zero page (Linux).
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// PML4 of the identity page tables; PDPT and four PDs follow, one page each.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line (at most [`CMDLINE_MAX`] bytes with its NUL).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Command line capacity.
pub const CMDLINE_MAX: usize = 0x10000;
/// Top of vCPU 0's stack for bare-metal guests; vCPU n's is `n * BARE_STACK_SIZE` below.
pub const BARE_STACK_TOP: u64 = 0x80000;
/// Stack per vCPU for bare-metal guests.
pub const BARE_STACK_SIZE: u64 = 0x2000;
/// MP table (top of base memory, as a BIOS would put it in the EBDA).
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// Where base memory ends (e820).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels and bare-metal images load at or above this.
pub const HIMEM_START: u64 = 0x100000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for the in-kernel real-mode support.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
