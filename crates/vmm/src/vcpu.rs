//! One vCPU: its complete architectural state and its save/restore.
//!
//! The run loop lives in [`crate::machine`]; this module only knows how to read and write a
//! vCPU's state through KVM, in the order KVM needs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors of vCPU state handling.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Only some MSRs were accepted.
    #[error("vCPU {id}: KVM accepted {done} of {total} MSRs (first refused: {first:#x})")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// Accepted count.
        done: usize,
        /// Total.
        total: usize,
        /// First refused MSR index.
        first: u32,
    },
    /// Too many entries for KVM's containers.
    #[error("vCPU {0}: too many CPUID or MSR entries")]
    TooMany(u8),
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC id).
    pub id: u8,
    /// The CPUID the VMM gave this vCPU (what the guest sees). Recorded from what was set,
    /// not read back: KVM_GET_CPUID2 is not a faithful mirror on every KVM.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (x87 FPU, SSE, AVX... state).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable, TSC included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
    /// TSC frequency the guest runs at (kHz), when KVM can tell.
    pub tsc_khz: Option<u32>,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

/// The MSRs of this host that KVM can both read and write for a guest.
pub fn saveable_msrs(kvm: &Kvm, probe: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err(0, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::TooMany(0))?;
        if probe.get_msrs(&mut one).unwrap_or(0) == 1 {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// Reads the full state of a vCPU that is not running.
pub fn save(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &[kvm_cpuid_entry2],
    msr_list: &[u32],
) -> Result<VcpuState, VcpuError> {
    // KVM_GET_MP_STATE may process pending LAPIC events and change other state: first.
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooMany(id))?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            done: n,
            total: entries.len(),
            first: entries[n].index,
        });
    }
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid: cpuid.to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
        tsc_khz,
    })
}

/// Writes a saved state into a freshly created vCPU.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    let id = s.id;
    if let Some(khz) = s.tsc_khz {
        // Hosts that cannot scale the TSC keep their own rate; the guest's kvmclock copes.
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                tracing::warn!(vcpu = id, "cannot set TSC to {khz} kHz: {e}");
            }
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::TooMany(id))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(kvm_err(id, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a complete legacy-size kvm_xsave (4 KiB, as KVM_GET_XSAVE wrote
    // it); the VM has no dynamically sized XSAVE features enabled (no KVM_CAP_XSAVE2 use).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs)
        .map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::TooMany(id))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(VcpuError::Msrs {
            id,
            done: n,
            total: s.msrs.len(),
            first: s.msrs[n].index,
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    // MP state again: setting the LAPIC can reset it for APs.
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    Ok(())
}
