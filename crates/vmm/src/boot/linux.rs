//! Linux boot: bzImage or vmlinux through `linux-loader`, entered at the 64-bit entry point
//! with a `boot_params` zero page (e820 map, command line, initramfs).

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START};
use super::{BootError, EntryPoint, KernelKind};
use crate::memory::{ram_ranges, GuestRam};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Loads a Linux kernel (and initramfs) and writes the zero page.
pub fn load(
    ram: &GuestRam,
    kind: KernelKind,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<EntryPoint, BootError> {
    let mut f = File::open(kernel).map_err(|source| BootError::Read {
        path: kernel.to_path_buf(),
        source,
    })?;
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: kernel.to_path_buf(),
        reason: if matches!(
            e,
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
                | linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel
                )
        ) {
            format!(
                "{e} (guest memory of {} MiB is too small for it?)",
                ram.size() >> 20
            )
        } else {
            format!("{e}")
        },
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (res, rip) = match kind {
        KernelKind::Bzimage => {
            let r = BzImage::load(ram.memory(), None, &mut f, himem).map_err(load_err)?;
            (r, r.kernel_load.0 + 0x200)
        }
        _ => {
            let r = Elf::load(ram.memory(), None, &mut f, himem).map_err(load_err)?;
            (r, r.kernel_load.0)
        }
    };
    let low_end = ram_ranges(ram.size())[0].1;
    if res.kernel_end > low_end {
        return Err(BootError::TooSmall {
            what: "the kernel".into(),
            mem_mib: ram.size() >> 20,
        });
    }

    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    if cmdline.len() + 1 > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline("too long or contains NUL".into()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_ADDR, &c)?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = u32::try_from(cmdline.len()).unwrap_or(u32::MAX);

    if let Some(initrd) = initrd {
        let data = std::fs::read(initrd).map_err(|source| BootError::Read {
            path: initrd.to_path_buf(),
            source,
        })?;
        let max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let top = low_end.min(max + 1);
        let size = data.len() as u64;
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= res.kernel_end);
        let Some(addr) = addr else {
            return Err(BootError::TooSmall {
                what: "the kernel and the initramfs".into(),
                mem_mib: ram.size() >> 20,
            });
        };
        ram.write(addr, &data)?;
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }

    let mut e820 = vec![(0, EBDA_START)];
    for (i, (start, len)) in ram_ranges(ram.size()).into_iter().enumerate() {
        if i == 0 {
            e820.push((HIMEM_START, len - HIMEM_START));
        } else {
            e820.push((start, len));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = u8::try_from(e820.len()).unwrap_or(0);
    ram.memory()
        .write_obj(params, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|_| crate::memory::MemoryError::OutOfRange {
            addr: BOOT_INFO_ADDR,
            len: 4096,
        })?;
    Ok(EntryPoint {
        rip,
        boot_params: BOOT_INFO_ADDR,
        all_vcpus: false,
    })
}
