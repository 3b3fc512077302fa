//! The KVM VM: creation with the in-kernel irqchip and PIT, and the VM-wide state (PIC, IOAPIC,
//! PIT, KVM clock) with its save/restore.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestRam;

/// Errors of VM-level KVM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open {0} (is KVM available, and may this user use it?)")]
    OpenKvm(String, #[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A capability Ferry needs is missing.
    #[error("KVM lacks a capability Ferry needs: {0}")]
    MissingCap(&'static str),
}

/// VM-wide device state held by KVM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Opens the KVM device: `$FERRY_KVM_DEVICE` when set, else `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var("FERRY_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let c = std::ffi::CString::new(path.clone())
        .map_err(|_| VmError::OpenKvm(path.clone(), kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(&c).map_err(|e| VmError::OpenKvm(path, e))
}

/// Opens KVM and creates a VM with its irqchip, PIT and memory slots.
pub fn create(ram: &GuestRam) -> Result<(Kvm, VmFd), VmError> {
    let kvm = open_kvm()?;
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
        (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
        (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (kvm_ioctls::Cap::Xsave, "KVM_CAP_XSAVE"),
        (kvm_ioctls::Cap::Xcrs, "KVM_CAP_XCRS"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    ram.for_each_region(|slot, guest, len, host| {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: `host` is the start of a live mapping of `len` bytes owned by `ram`, which
        // outlives the VM (the machine drops the VM's vCPUs and fds before the RAM).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
    })?;
    Ok((kvm, vm))
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| VmError::Kvm("KVM_GET_IRQCHIP", e))?;
    Ok(c)
}

/// Reads the VM-wide state (all vCPUs paused).
pub fn save(vm: &VmFd) -> Result<VmState, VmError> {
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|e| VmError::Kvm("KVM_GET_PIT2", e))?,
        clock: vm
            .get_clock()
            .map_err(|e| VmError::Kvm("KVM_GET_CLOCK", e))?,
    })
}

/// Writes VM-wide state into a new VM (before its vCPUs run).
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c)
            .map_err(|e| VmError::Kvm("KVM_SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| VmError::Kvm("KVM_SET_PIT2", e))?;
    // Only the clock value is meaningful to KVM_SET_CLOCK here; the flags describe the source.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| VmError::Kvm("KVM_SET_CLOCK", e))?;
    Ok(())
}
