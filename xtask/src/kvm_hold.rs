//! Holds one KVM VM open for the whole life of a lab host (`cargo xtask lab-kvm-hold`, started by
//! the lab's init before the command).
//!
//! Why: the lab host's kernel changes its own code whenever the number of KVM VMs goes between
//! zero and one (the scheduler's preempt-notifier static key, switched by every VM's creation and
//! destruction) and whenever the number of vCPUs with a software-disabled local APIC does (KVM's
//! `apic_sw_disabled` key). Linux patches such code live with a breakpoint, an IPI to every CPU
//! and a second write — cross-modifying code that QEMU's multi-threaded TCG, emulating the lab
//! host's CPUs, gets wrong now and then: both CPUs end stuck on the patched instruction of
//! `finish_task_switch` (a soft lockup; it failed a CI run). A loop creating and dropping VMs
//! wedges a fresh lab host within a few hundred; with this holder running, 2,000 go through in
//! 80 s. One VM whose one vCPU never enables its APIC, held from before the first test to the
//! lab's power-off, keeps both counts above zero, so the tests' VMs never make the
//! kernel patch itself. Nothing here is needed, or run, on a real host.

use std::path::Path;

use anyhow::{Context, Result};
use kvm_ioctls::Kvm;

/// Creates the VM (in-kernel irqchip, one vCPU), writes `ready` once it exists, then sleeps
/// until killed. With `cycles`, instead creates and drops that many such VMs (to measure how
/// often the lab wedges without a holder) and returns.
pub fn run(ready: &Path, cycles: Option<u32>) -> Result<()> {
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let make = || -> Result<_> {
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        Ok((vm, vcpu))
    };
    if let Some(n) = cycles {
        for i in 0..n {
            drop(make()?);
            if i % 50 == 49 {
                println!("kvm-hold: {} VMs created and dropped", i + 1);
            }
        }
        return Ok(());
    }
    let _held = make()?;
    std::fs::write(ready, b"held\n")
        .with_context(|| format!("cannot write {}", ready.display()))?;
    loop {
        std::thread::park();
    }
}
