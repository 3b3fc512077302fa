//! A running VM: KVM VM + RAM + vCPU threads + devices, with pause/resume and complete
//! save/restore.
//!
//! vCPU threads own nothing but their loop: each vCPU fd sits in a mutex that its thread holds
//! only while in `KVM_RUN` and handling the exit, so a paused machine can read every vCPU's
//! state from the controlling thread. Pausing kicks each thread out of `KVM_RUN` with a signal
//! whose handler sets `immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost,
//! and completes any pending port I/O before parking.

mod build;
mod control;
mod io_thread;
mod vcpu_thread;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

pub use self::build::Skeleton;
use self::control::Shared;
use crate::boot::{self, KernelKind};
use crate::config::VmConfig;
use crate::cpuid;
pub use crate::device_manager::DeviceStates;
use crate::device_manager::{DeviceError, LunRef};
use crate::devices::virtio::scsi::LunInfo;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::persist::Persist;
use crate::snapshot::{self, SnapshotWriter};
use crate::vcpu::{self, VcpuState};
use crate::vm::{self, VmState};

/// Errors of machine life-cycle operations.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// VM-level KVM failure.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// vCPU-level KVM failure.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Host configuration.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The host cannot give guests everything the VM's CPU model promises.
    #[error("this host cannot run CPU model {model}: it lacks {}", missing.join(", "))]
    ModelUnavailable {
        /// The model.
        model: cpuid::CpuModel,
        /// Promised features the host lacks.
        missing: Vec<&'static str>,
    },
    /// Boot.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Serial device.
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialError),
    /// State file.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The saved guest saw CPU features this host lacks.
    #[error("this host cannot run the saved guest: it lacks {}", .0.join(", "))]
    IncompatibleCpu(Vec<String>),
    /// Thread creation / eventfd / signal setup.
    #[error("cannot set up the vCPU threads")]
    Threads(#[source] std::io::Error),
    /// Operation needs another state.
    #[error("the VM is {0}")]
    WrongState(RunState),
    /// vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The devices: a disk or NIC that cannot be set up, device state that does not fit,
    /// a disk change refused.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The state file's VM does not match what it says.
    #[error("state file is corrupted: {0}")]
    Inconsistent(String),
}

/// Life-cycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// vCPUs have exited.
    Stopped,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped => "stopped",
        })
    }
}

/// Why the vCPUs stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// Asked to stop.
    Requested,
    /// The guest shut down, reset or triple-faulted.
    GuestShutdown,
    /// KVM could not run the guest.
    Error(String),
}

/// The complete VM state saved to a file (memory travels separately, in MEMR).

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SaveReport {
    /// State file size in bytes.
    pub file_bytes: u64,
    /// Bytes of RAM stored (non-zero pages).
    pub memory_bytes: u64,
    /// How long the VM was paused for the save.
    pub duration_ms: u64,
}

/// A VM with its vCPU threads.
pub struct Machine {
    config: VmConfig,
    kind: KernelKind,
    _kvm: Kvm,
    vm: VmFd,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    shared: Arc<Shared>,
    msr_list: Vec<u32>,
    cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    ram: Arc<GuestRam>,
}

impl Machine {
    /// What the CONF section of this VM's state holds: the config with the disks the SCSI
    /// controller has now.
    pub fn saved_config(&self) -> SavedConfig {
        let mut config = self.config.clone();
        if let (Some(spec), Some(luns)) = (config.scsi.as_mut(), self.scsi_disks()) {
            spec.disks = luns
                .into_iter()
                .map(|l| crate::config::ScsiDiskSpec {
                    lun: l.lun,
                    path: l.path,
                    readonly: l.readonly,
                })
                .collect();
        }
        SavedConfig {
            config,
            kind: self.kind,
        }
    }

    /// What the VM's disks and NICs have moved since this worker started it.
    pub fn io(&self) -> crate::devices::virtio::IoTotals {
        self.shared.devices.io()
    }

    /// The SCSI controller's disks now (`None`: the VM has no controller).
    pub fn scsi_disks(&self) -> Option<Vec<LunInfo>> {
        self.shared.devices.scsi_disks()
    }

    /// Adds a disk to the running VM's SCSI controller at `lun` (the lowest free LUN if
    /// `None`); the guest is told, and sees it without a reboot. The disk is opened under its
    /// lock before anything changes; a refusal changes nothing.
    pub fn add_scsi_disk(
        &self,
        path: &Path,
        readonly: bool,
        lun: Option<u16>,
    ) -> Result<LunInfo, MachineError> {
        if self.state() == RunState::Stopped {
            return Err(MachineError::WrongState(RunState::Stopped));
        }
        Ok(self.shared.devices.scsi_add(path, readonly, lun)?)
    }

    /// Removes a disk from the SCSI controller: the requests in flight complete, the disk is
    /// flushed and closed (its lock released) and the guest is told.
    pub fn remove_scsi_disk(&self, which: &LunRef) -> Result<LunInfo, MachineError> {
        if self.state() == RunState::Stopped {
            return Err(MachineError::WrongState(RunState::Stopped));
        }
        Ok(self.shared.devices.scsi_remove(which)?)
    }

    /// Host timestamps of the guest's console lines.
    pub fn console_clock(&self) -> Arc<crate::devices::serial::LineClock> {
        self.shared.devices.serial().clock()
    }

    /// The CPUID vCPU 0 gives the guest.
    pub fn guest_cpuid(&self) -> &[kvm_cpuid_entry2] {
        self.cpuids.first().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Turns KVM's dirty-page logging on or off for all guest RAM. Turning it on starts a
    /// clean log: every page written from now on is reported once by [`Machine::dirty_pages`].
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), MachineError> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.ram.for_each_region(|slot, guest, len, host| {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: guest,
                memory_size: len,
                userspace_addr: host,
            };
            // SAFETY: the same live mapping that vm::create registered for this slot; only the
            // flags change.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(|e| vm::VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
        })?;
        // What devices write (disk reads, used rings) is logged by the VMM itself.
        self.ram.set_device_logging(on);
        Ok(())
    }

    /// Guest page numbers (guest physical address / 4096) written since the last call (or
    /// since logging was turned on), ascending. Fetching clears the log.
    pub fn dirty_pages(&self) -> Result<Vec<u64>, MachineError> {
        let mut pages = Vec::new();
        self.ram.for_each_region(|slot, guest, len, _| {
            let bitmap = self
                .vm
                .get_dirty_log(slot, usize::try_from(len).unwrap_or(0))
                .map_err(|e| vm::VmError::Kvm("KVM_GET_DIRTY_LOG", e))?;
            let first = guest / PAGE_SIZE as u64;
            for (w, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    pages.push(first + w as u64 * 64 + b);
                    bits &= bits - 1;
                }
            }
            Ok::<(), MachineError>(())
        })?;
        let by_devices = self.ram.take_device_dirty();
        if !by_devices.is_empty() {
            pages.extend(by_devices);
            pages.sort_unstable();
            pages.dedup();
        }
        Ok(pages)
    }

    /// The configuration the VM was built with (its SCSI disks as they were then: see
    /// [`Machine::saved_config`] for the ones it has now).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    /// The kind of image booted.
    pub fn kernel_kind(&self) -> KernelKind {
        self.kind
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Current life-cycle state.
    pub fn state(&self) -> RunState {
        let c = self.shared.lock();
        if c.exited > 0 || c.target == RunState::Stopped {
            RunState::Stopped
        } else if c.target == RunState::Paused && c.parked == self.shared.nvcpus {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Why the VM stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.shared.lock().reason.clone()
    }

    fn kick_all(&self) {
        vcpu_thread::kick_threads(&self.threads);
    }

    /// Keeps the vCPUs out of the guest `pct` percent of the time (0 to 99; 0 = full speed):
    /// live migration's auto-converge. Each vCPU then runs in slices of a fixed period
    /// ([`crate::throttle`]), so the throttle never stops the guest for longer than one period.
    pub fn set_throttle(&self, pct: u8) {
        use std::sync::atomic::Ordering;
        let pct = pct.min(crate::throttle::MAX_PCT);
        let was = self.shared.throttle.swap(pct, Ordering::SeqCst);
        if was == 0 && pct > 0 {
            // A vCPU that never leaves the guest on its own (in-kernel HLT and timers) learns
            // of the throttle by this kick; from then on its own timer ends each slice.
            self.kick_all();
        } else if pct == 0 {
            // Wake the vCPUs resting out their period.
            let _c = self.shared.lock();
            self.shared.cv.notify_all();
        }
    }

    fn wait_parked(&self, timeout: Duration) -> Result<(), MachineError> {
        let n = self.shared.nvcpus;
        let (c, parked) = self.shared.wait_for(timeout, |c| c.parked + c.exited >= n);
        if !parked {
            return Err(MachineError::PauseTimeout(timeout));
        }
        if c.exited > 0 {
            return Err(MachineError::WrongState(RunState::Stopped));
        }
        Ok(())
    }

    /// When the last vCPU stopped at the latest pause (µs since the Unix epoch; `None` before
    /// any): the instant the guest stopped running, for downtime measured from outside it.
    pub fn paused_at_us(&self) -> Option<u64> {
        Some(self.shared.lock().last_parked_us).filter(|&t| t != 0)
    }

    /// When the first vCPU entered the guest after the latest resume (µs since the Unix
    /// epoch), waiting for it up to `timeout`; `None` if none did by then.
    pub fn wait_first_entry(&self, timeout: Duration) -> Option<u64> {
        let (c, _) = self.shared.wait_for(timeout, |c| {
            c.first_entry_us != 0 || c.target != RunState::Running
        });
        Some(c.first_entry_us).filter(|&t| t != 0)
    }

    /// Stops every vCPU outside `KVM_RUN`. Returns whether it was running.
    pub fn pause(&self) -> Result<bool, MachineError> {
        {
            let mut c = self.shared.lock();
            match c.target {
                RunState::Stopped => return Err(MachineError::WrongState(RunState::Stopped)),
                RunState::Paused => return Ok(false),
                RunState::Running => c.target = RunState::Paused,
            }
            // A vCPU resting out a throttle period parks now, not at the period's end.
            self.shared.cv.notify_all();
        }
        self.shared.devices.set_paused(true);
        self.kick_all();
        self.wait_parked(Duration::from_secs(10))?;
        Ok(true)
    }

    /// Lets the devices work on guest memory again (see
    /// [`crate::device_manager::DeviceManager::set_paused`]) and wakes their I/O threads.
    fn unpause_devices(&self) {
        self.shared.devices.set_paused(false);
        self.shared.wake_io_threads();
    }

    /// Tells the network where the VM now runs (virtio-net: RARP from each NIC's MAC, five
    /// times over 350 ms, as QEMU does after a migration). Returns at once.
    pub fn announce(&self) {
        if self.config.nics.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let _ = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for delay_ms in [0u64, 50, 100, 100, 100] {
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    if shared.lock().target == RunState::Stopped {
                        return;
                    }
                    shared.devices.announce();
                }
            });
    }

    /// Lets go of the devices' backends — disks flushed, closed and unlocked — so that the
    /// destination of a migration can open them. The VM must be paused; it cannot resume until
    /// [`Machine::reacquire_devices`] has taken them back.
    pub fn release_devices(&self) -> Result<(), MachineError> {
        if self.state() != RunState::Paused {
            return Err(MachineError::WrongState(self.state()));
        }
        Ok(self.shared.devices.release()?)
    }

    /// Takes released backends back, retrying for up to `patience` while another process still
    /// holds a disk (a migration destination that has not yet given up).
    pub fn reacquire_devices(&self, patience: Duration) -> Result<(), MachineError> {
        Ok(self.shared.devices.reacquire(patience)?)
    }

    /// Lets the vCPUs run again (taking back released devices first: a VM never runs without
    /// its disks).
    pub fn resume(&self) -> Result<(), MachineError> {
        if self.shared.devices.any_released() {
            self.reacquire_devices(Duration::ZERO)?;
        }
        let mut c = self.shared.lock();
        match c.target {
            RunState::Stopped => Err(MachineError::WrongState(RunState::Stopped)),
            _ => {
                c.target = RunState::Running;
                c.first_entry_us = 0;
                self.shared.cv.notify_all();
                drop(c);
                self.unpause_devices();
                Ok(())
            }
        }
    }

    /// Captures vCPU, VM and device state (the VM must be paused).
    pub fn capture(&self) -> Result<VmSnapshot, MachineError> {
        if self.state() != RunState::Paused {
            return Err(MachineError::WrongState(self.state()));
        }
        let mut states = Vec::new();
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            let id = u8::try_from(id).unwrap_or(u8::MAX);
            states.push(vcpu::save(
                &fd,
                id,
                &self.cpuids[usize::from(id)],
                &self.msr_list,
            )?);
        }
        let vm_state = vm::save(&self.vm)?;
        Ok(VmSnapshot {
            vcpus: states,
            vm: vm_state,
            devices: self.shared.devices.save(),
        })
    }

    /// Pauses the VM and writes its complete state to `path` (atomically). On success the VM
    /// stays paused; on failure it is resumed if it was running, and `path` is untouched.
    pub fn save(&self, path: &Path) -> Result<SaveReport, MachineError> {
        let t0 = Instant::now();
        let was_running = self.pause()?;
        // Disks flushed and closed: the file and the images together are the VM (the worker
        // stops after a save; a failed save takes them back when the VM resumes).
        let result = self.release_devices().and_then(|_| self.write_state(path));
        match result {
            Ok((file_bytes, memory_bytes)) => Ok(SaveReport {
                file_bytes,
                memory_bytes,
                duration_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            Err(e) => {
                if was_running {
                    let _ = self.resume();
                }
                Err(e)
            }
        }
    }

    fn write_state(&self, path: &Path) -> Result<(u64, u64), MachineError> {
        let snap = self.capture()?;
        let conf = self.saved_config().encode()?;
        let mut mem_len = 0;
        let size = snapshot::write_atomically(path, |out| {
            let mut w = SnapshotWriter::new(out)?;
            w.section(*b"CONF", &conf)?;
            w.section(*b"VCPU", &snapshot::encode(&snap.vcpus)?)?;
            w.section(*b"VMST", &snapshot::encode(&snap.vm)?)?;
            w.section(*b"DEVS", &snapshot::encode(&snap.devices)?)?;
            mem_len = w.memory(&self.ram)?;
            w.finish()?;
            Ok(())
        })?;
        Ok((size, mem_len))
    }

    /// A hash of all guest RAM (for comparing two VMs' memory; pause first for a stable value).
    pub fn memory_hash(&self) -> Result<u64, MachineError> {
        let mut h = DefaultHasher::new();
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        for (start, len) in crate::memory::ram_ranges(self.ram.size()) {
            let mut a = start;
            while a < start + len {
                let n = usize::try_from((start + len - a).min(buf.len() as u64)).unwrap_or(0);
                self.ram.read(a, &mut buf[..n])?;
                h.write(&buf[..n]);
                a += n as u64;
            }
        }
        Ok(h.finish())
    }

    /// Stops the vCPUs for good and joins their threads and the devices' I/O threads.
    pub fn shutdown(&self) {
        self.shared
            .throttle
            .store(0, std::sync::atomic::Ordering::SeqCst);
        self.shared.request_stop(StopReason::Requested);
        self.kick_all();
        self.join();
    }

    /// Blocks until the vCPUs stop on their own (guest shutdown, error) or `shutdown` is called.
    pub fn wait(&self) -> StopReason {
        let mut c = self.shared.lock();
        while c.target != RunState::Stopped {
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.reason.clone().unwrap_or(StopReason::Requested)
    }

    fn join(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the CONF section holds: the config and how the kernel was booted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    /// The VM config.
    pub config: VmConfig,
    /// The kind of kernel image it booted.
    pub kind: KernelKind,
}

impl SavedConfig {
    /// Parses the CONF section.
    pub fn decode(bytes: &[u8]) -> Result<Self, MachineError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| MachineError::Inconsistent("config is not UTF-8".into()))?;
        serde_json::from_str(text).map_err(|e| MachineError::Inconsistent(format!("config: {e}")))
    }

    /// Encodes the CONF section.
    pub fn encode(&self) -> Result<Vec<u8>, MachineError> {
        serde_json::to_vec(self).map_err(|e| MachineError::Inconsistent(e.to_string()))
    }
}

/// Everything but memory and config: what stop-and-copy sends and a state file's VCPU, VMST
/// and DEVS sections hold.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// PIC, IOAPIC, PIT, clock.
    pub vm: VmState,
    /// Ferry's devices.
    pub devices: DeviceStates,
}

impl VmSnapshot {
    /// Checks the snapshot matches the config (one state per vCPU, in order).
    pub fn check(&self, config: &VmConfig) -> Result<(), MachineError> {
        if self.vcpus.len() != usize::from(config.vcpus)
            || self
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, s)| usize::from(s.id) != i)
        {
            return Err(MachineError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                config.vcpus
            )));
        }
        Ok(())
    }
}

/// Refuses early when this host's KVM cannot give a guest the CPU it saw.
pub fn check_host_cpu(guest: &[kvm_cpuid_entry2]) -> Result<(), MachineError> {
    let kvm = vm::open_kvm()?;
    let host = crate::host::cpuid(&kvm)?;
    let missing = cpuid::incompatibilities(guest, host.as_slice());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MachineError::IncompatibleCpu(missing))
    }
}
