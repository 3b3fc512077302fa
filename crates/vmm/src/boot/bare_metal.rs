//! Bare-metal ELF guests: Ferry's own boot protocol (documented in `docs/boot.md`).
//!
//! The image's PT_LOAD segments are loaded at their physical addresses (at or above 1 MiB); every
//! vCPU enters at the ELF entry point in long mode with RDI = the boot-info block, RSI = its vCPU
//! index and RSP = its own stack below 512 KiB.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::GuestAddress;

use super::layout::{BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START};
use super::{BootError, EntryPoint};
use crate::memory::GuestRam;

/// "ERRYBOOT" read as a little-endian u64: the boot-info magic.
pub const BOOT_MAGIC: u64 = 0x544f_4f42_5952_5245;

/// Loads a bare-metal ELF and writes its boot-info block.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    cmdline: &str,
    vcpus: u8,
    tsc_khz: u32,
) -> Result<EntryPoint, BootError> {
    let mut f = File::open(kernel).map_err(|source| BootError::Read {
        path: kernel.to_path_buf(),
        source,
    })?;
    let res = Elf::load(ram.memory(), None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(
        |e| match e {
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => {
                BootError::TooSmall {
                    what: "the image".into(),
                    mem_mib: ram.size() >> 20,
                }
            }
            e => BootError::Load {
                path: kernel.to_path_buf(),
                reason: format!("{e}"),
            },
        },
    )?;
    let end = res.kernel_end;
    let low_ram = crate::memory::ram_ranges(ram.size())[0].1;
    if end > low_ram {
        return Err(BootError::TooSmall {
            what: "the image".into(),
            mem_mib: ram.size() >> 20,
        });
    }
    if cmdline.len() + 1 > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline("too long or contains NUL".into()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_ADDR, &c)?;
    let mut info = Vec::with_capacity(48);
    info.extend_from_slice(&BOOT_MAGIC.to_le_bytes());
    info.extend_from_slice(&low_ram.to_le_bytes());
    info.extend_from_slice(&end.to_le_bytes());
    info.extend_from_slice(&u64::from(tsc_khz).to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&u32::from(vcpus).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    ram.write(BOOT_INFO_ADDR, &info)?;
    Ok(EntryPoint {
        rip: res.kernel_load.0,
        boot_params: BOOT_INFO_ADDR,
        all_vcpus: true,
    })
}
