//! Booting: loading the kernel image and preparing the state the first instruction sees.
//!
//! Two kinds of image, told apart by their content (see [`detect`]):
//! - **Linux**: a bzImage or an ELF `vmlinux`, entered at its 64-bit entry point with a
//!   `boot_params` zero page, e820 map, command line, initramfs and an MP table for SMP.
//! - **Bare metal**: any other x86-64 ELF, entered in long mode on every vCPU at once with a
//!   Ferry boot-info block (`docs/boot.md`).
//!
//! Both are entered in 64-bit long mode: [`long_mode`] builds the GDT and identity page tables.

pub mod bare_metal;
pub mod layout;
pub mod linux;
pub mod long_mode;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of kernel loading and boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel (or initrd) file cannot be opened or read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not an image Ferry can boot.
    #[error(
        "{0} is not a bootable image (expected a Linux bzImage, a vmlinux or a 64-bit x86 ELF)"
    )]
    UnknownFormat(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Loader's message (linux-loader's error type is not `Send + Sync` friendly to wrap).
        reason: String,
    },
    /// Something does not fit in guest memory.
    #[error("guest memory of {mem_mib} MiB is too small for {what}")]
    TooSmall {
        /// What did not fit.
        what: String,
        /// Guest memory size.
        mem_mib: u64,
    },
    /// Command line too long or invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// What kind of image a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelKind {
    /// Linux bzImage.
    Bzimage,
    /// Linux ELF vmlinux.
    Vmlinux,
    /// Bare-metal 64-bit ELF (Ferry boot-info protocol).
    BareMetal,
}

/// Looks at a kernel file and says what it is.
pub fn detect(path: &Path) -> Result<KernelKind, BootError> {
    let rd = |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(rd)?;
    let mut head = vec![0u8; 0x240];
    let n = read_up_to(&mut f, &mut head).map_err(rd)?;
    head.truncate(n);
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelKind::Bzimage);
    }
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err(BootError::UnknownFormat(path.to_path_buf()));
    }
    // 64-bit, little endian, x86-64.
    if head[4] != 2 || head[5] != 1 || u16::from_le_bytes([head[18], head[19]]) != 62 {
        return Err(BootError::UnknownFormat(path.to_path_buf()));
    }
    // A vmlinux carries ELF notes owned by "Linux" or "Xen" (PVH entry).
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8]));
    let phentsize = u64::from(u16::from_le_bytes([head[54], head[55]]));
    let phnum = u64::from(u16::from_le_bytes([head[56], head[57]]));
    for i in 0..phnum.min(64) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize)).map_err(rd)?;
        if read_up_to(&mut f, &mut ph).map_err(rd)? < 56 {
            break;
        }
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or([0; 4]));
        if p_type != 4 {
            continue;
        }
        let off = u64::from_le_bytes(ph[8..16].try_into().unwrap_or([0; 8]));
        let size = u64::from_le_bytes(ph[32..40].try_into().unwrap_or([0; 8])).min(64 * 1024);
        let mut notes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        f.seek(SeekFrom::Start(off)).map_err(rd)?;
        let got = read_up_to(&mut f, &mut notes).map_err(rd)?;
        notes.truncate(got);
        if contains(&notes, b"Linux\0") || contains(&notes, b"Xen\0") {
            return Ok(KernelKind::Vmlinux);
        }
    }
    Ok(KernelKind::BareMetal)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where and how vCPUs start after the image is loaded.
#[derive(Clone, Debug)]
pub struct EntryPoint {
    /// First instruction (guest physical = virtual, identity mapped).
    pub rip: u64,
    /// Value of RSI for the boot vCPU (Linux: the zero page) — for bare metal, see
    /// [`bare_metal`]: every vCPU gets the boot-info block in RDI and its index in RSI.
    pub boot_params: u64,
    /// Whether every vCPU starts at `rip` (bare metal) or only vCPU 0 (Linux: the others wait
    /// for INIT/SIPI in the in-kernel LAPIC).
    pub all_vcpus: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_bare_metal_guest_and_refuses_junk() {
        assert_eq!(
            detect(&ferry_guests::dirtier()).unwrap(),
            KernelKind::BareMetal
        );
        let junk = std::env::temp_dir().join(format!("ferry-junk-{}", std::process::id()));
        std::fs::write(&junk, b"not a kernel at all").unwrap();
        assert!(matches!(detect(&junk), Err(BootError::UnknownFormat(_))));
        std::fs::remove_file(&junk).unwrap();
        assert!(matches!(
            detect(Path::new("/nonexistent/k")),
            Err(BootError::Read { .. })
        ));
    }

    #[test]
    fn detects_the_shared_linux_guest() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/guest");
        if !shared.join("bzImage").exists() {
            return;
        }
        assert_eq!(
            detect(&shared.join("bzImage")).unwrap(),
            KernelKind::Bzimage
        );
        assert_eq!(
            detect(&shared.join("vmlinux")).unwrap(),
            KernelKind::Vmlinux
        );
    }
}
