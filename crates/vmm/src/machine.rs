//! A running VM: KVM VM + RAM + vCPU threads + devices, with pause/resume and complete
//! save/restore.
//!
//! vCPU threads own nothing but their loop: each vCPU fd sits in a mutex that its thread holds
//! only while in `KVM_RUN` and handling the exit, so a paused machine can read every vCPU's
//! state from the controlling thread. Pausing kicks each thread out of `KVM_RUN` with a signal
//! whose handler sets `immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost,
//! and completes any pending port I/O before parking.

use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, kvm_run};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, KernelKind};
use crate::config::VmConfig;
use crate::cpuid;
use crate::devices::serial::{ConsoleOut, SerialDevice, SerialDeviceState, COM1_BASE, COM1_IRQ};
use crate::devices::virtio::{self, block::Block, mmio::MmioState, mmio::MmioTransport};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::snapshot::{self, SnapshotReader, SnapshotWriter};
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
    /// A disk could not be attached.
    #[error("disk {path}: {source}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: crate::disk::DiskError,
    },
    /// A device's backend (a disk) could not be released or taken back.
    #[error("device {index}: {source}")]
    Backend {
        /// Device (disk) index.
        index: usize,
        /// Why.
        #[source]
        source: virtio::BackendError,
    },
    /// A network interface could not be set up.
    #[error("NIC {index} (bridge {bridge}): {source}")]
    Nic {
        /// NIC index.
        index: usize,
        /// Its bridge.
        bridge: String,
        /// Why.
        #[source]
        source: virtio::tap::TapError,
    },
    /// Saved virtio device state that does not fit the VM.
    #[error(transparent)]
    Virtio(#[from] virtio::mmio::MmioError),
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
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// virtio-mmio devices, in the config's order (disks, then NICs).
    pub virtio: Vec<MmioState>,
}

#[derive(Debug)]
struct Control {
    target: RunState,
    parked: usize,
    exited: usize,
    reason: Option<StopReason>,
    /// When the last vCPU to park did so (µs since the Unix epoch; 0: never).
    last_parked_us: u64,
    /// When the first vCPU entered the guest after the last resume (0: none yet).
    first_entry_us: u64,
}

/// A virtio-mmio device in its window of guest-physical addresses.
struct Slot {
    base: u64,
    dev: Mutex<MmioTransport>,
    /// One eventfd per queue, which KVM signals when the guest writes that queue's index to
    /// the notify register (`ioeventfd`: no exit to the VMM); the device's I/O thread then runs
    /// the queue, so the vCPU goes straight back to the guest.
    notifiers: Vec<EventFd>,
}

struct Shared {
    /// Percent of time vCPUs are kept out of the guest (auto-converge), 0 = none.
    throttle: std::sync::atomic::AtomicU8,
    ctl: Mutex<Control>,
    cv: Condvar,
    serial: Mutex<SerialDevice>,
    /// virtio-mmio devices, each in its window.
    mmio: Vec<Slot>,
    /// Set while the VM is paused: device I/O threads leave guest memory alone (checked with
    /// the device's lock held, so once `pause` has taken every device lock none is mid-way).
    devices_paused: std::sync::atomic::AtomicBool,
    /// The eventfds that wake the devices' I/O threads: a stop ends them at once, a resume
    /// lets them watch their queues and inputs again.
    io_wakes: Mutex<Vec<EventFd>>,
    nvcpus: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds for the control state, or `timeout` passes; returns the
    /// locked state and whether `done` held.
    fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Control) -> bool,
    ) -> (MutexGuard<'_, Control>, bool) {
        let deadline = Instant::now() + timeout;
        let mut c = self.lock();
        while !done(&c) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (c, false);
            }
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (c, true)
    }

    fn request_stop(&self, reason: StopReason) {
        let mut c = self.lock();
        if c.target != RunState::Stopped {
            c.target = RunState::Stopped;
            c.reason.get_or_insert(reason);
            self.wake_io_threads();
        }
        self.cv.notify_all();
    }

    /// A throttled vCPU's rest: until `until`, or sooner when the VM is no longer running
    /// (a pause or stop must not wait out the period) or the throttle is lifted.
    fn rest_until(&self, until: Instant) {
        let _ = self.wait_for(until.saturating_duration_since(Instant::now()), |c| {
            c.target != RunState::Running
                || self.throttle.load(std::sync::atomic::Ordering::SeqCst) == 0
        });
    }

    fn wake_io_threads(&self) {
        for w in self
            .io_wakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = w.write(1);
        }
    }
}

/// Report of a save.
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

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` is this thread's own kvm_run mapping, set by the vCPU thread before it
        // first runs and valid until the vCPU fd (which the thread keeps alive) is dropped; a
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), MachineError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| MachineError::Threads(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

impl Machine {
    /// Creates a VM from `config`, boots its image and starts the vCPUs.
    pub fn boot(config: VmConfig, console: ConsoleOut) -> Result<Machine, MachineError> {
        config.validate()?;
        let kind = boot::detect(&config.kernel)?;
        if let Some(i) = &config.initrd {
            std::fs::metadata(i).map_err(|source| boot::BootError::Read {
                path: i.clone(),
                source,
            })?;
        }
        let ram = GuestRam::new(&config.name, config.memory_bytes())?;
        let (kvm, vmfd) = vm::create(&ram)?;
        // What this host offers, narrowed to the VM's CPU model.
        let host = crate::host::cpuid(&kvm)?;
        let missing = cpuid::model_missing(host.as_slice(), config.cpu);
        if !missing.is_empty() {
            return Err(MachineError::ModelUnavailable {
                model: config.cpu,
                missing,
            });
        }
        let mut entries = host.as_slice().to_vec();
        cpuid::apply_model(&mut entries, config.cpu);
        cpuid::hide(&mut entries, &config.cpu_hide)?;
        let supported = kvm_bindings::CpuId::from_entries(&entries)
            .map_err(|_| cpuid::CpuidError::TooMany(entries.len()))?;
        let mut fds = Vec::new();
        let mut cpuids = Vec::new();
        for id in 0..config.vcpus {
            let fd = vmfd
                .create_vcpu(u64::from(id))
                .map_err(|e| vm::VmError::Kvm("KVM_CREATE_VCPU", e))?;
            let c = cpuid::for_vcpu(&supported, id, config.vcpus)?;
            fd.set_cpuid2(&c)
                .map_err(|e| vm::VmError::Kvm("KVM_SET_CPUID2", e))?;
            cpuids.push(c.as_slice().to_vec());
            fds.push(fd);
        }
        let tsc_khz = fds[0].get_tsc_khz().unwrap_or(0);
        let ram = Arc::new(ram);
        let mmio = attach_devices(&config, &vmfd, &ram)?;
        boot::long_mode::write_tables(&ram)?;
        let entry = match kind {
            KernelKind::BareMetal => boot::bare_metal::load(
                &ram,
                &config.kernel,
                &config.cmdline,
                config.vcpus,
                tsc_khz,
            )?,
            _ => {
                boot::mptable::write(&ram, config.vcpus)?;
                // Linux learns of the virtio-mmio devices from its command line.
                let mut cmdline = config.cmdline.clone();
                for i in 0..mmio.len() {
                    if let Some(dev) = virtio::linux_cmdline(i) {
                        cmdline.push(' ');
                        cmdline.push_str(&dev);
                    }
                }
                boot::linux::load(
                    &ram,
                    kind,
                    &config.kernel,
                    config.initrd.as_deref(),
                    cmdline.trim_start(),
                )?
            }
        };
        for (id, fd) in fds.iter().enumerate() {
            if id > 0 && !entry.all_vcpus {
                continue; // APs wait for INIT/SIPI in the in-kernel LAPIC
            }
            let mut sregs = fd
                .get_sregs()
                .map_err(|e| vm::VmError::Kvm("KVM_GET_SREGS", e))?;
            boot::long_mode::setup_sregs(&mut sregs);
            fd.set_sregs(&sregs)
                .map_err(|e| vm::VmError::Kvm("KVM_SET_SREGS", e))?;
            let (rsp, rdi, rsi) = if entry.all_vcpus {
                let top = boot::layout::BARE_STACK_TOP - id as u64 * boot::layout::BARE_STACK_SIZE;
                (top, entry.boot_params, id as u64)
            } else {
                (boot::layout::BARE_STACK_TOP, 0, entry.boot_params)
            };
            let regs = boot::long_mode::entry_regs(entry.rip, rsp, rdi, rsi);
            fd.set_regs(&regs)
                .map_err(|e| vm::VmError::Kvm("KVM_SET_REGS", e))?;
            fd.set_fpu(&boot::long_mode::initial_fpu())
                .map_err(|e| vm::VmError::Kvm("KVM_SET_FPU", e))?;
            if id > 0 {
                // With the in-kernel LAPIC an AP waits for INIT/SIPI unless made runnable.
                let runnable = kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                fd.set_mp_state(runnable)
                    .map_err(|e| vm::VmError::Kvm("KVM_SET_MP_STATE", e))?;
            }
        }
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Threads)?;
        vmfd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
        let serial = SerialDevice::new(serial_irq, console);
        let msr_list = vcpu::saveable_msrs(&kvm, &fds[0])?;
        let m = Machine::assemble(
            config, kind, kvm, vmfd, fds, msr_list, cpuids, serial, mmio, ram,
        )?;
        m.start_threads(RunState::Running)?;
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: VmConfig,
        kind: KernelKind,
        kvm: Kvm,
        vmfd: VmFd,
        fds: Vec<VcpuFd>,
        msr_list: Vec<u32>,
        cpuids: Vec<Vec<kvm_cpuid_entry2>>,
        serial: SerialDevice,
        mmio: Vec<Slot>,
        ram: Arc<GuestRam>,
    ) -> Result<Machine, MachineError> {
        let nvcpus = fds.len();
        Ok(Machine {
            config,
            kind,
            _kvm: kvm,
            vm: vmfd,
            vcpus: fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect(),
            threads: Arc::new(Mutex::new(Vec::new())),
            shared: Arc::new(Shared {
                throttle: std::sync::atomic::AtomicU8::new(0),
                ctl: Mutex::new(Control {
                    target: RunState::Paused,
                    parked: 0,
                    exited: 0,
                    reason: None,
                    last_parked_us: 0,
                    first_entry_us: 0,
                }),
                cv: Condvar::new(),
                serial: Mutex::new(serial),
                mmio,
                devices_paused: std::sync::atomic::AtomicBool::new(true),
                io_wakes: Mutex::new(Vec::new()),
                nvcpus,
            }),
            msr_list,
            cpuids,
            ram,
        })
    }

    fn start_threads(&self, initial: RunState) -> Result<(), MachineError> {
        install_kick_handler()?;
        self.shared.lock().target = initial;
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = Arc::clone(fd);
            let shared = Arc::clone(&self.shared);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, &fd, &shared))
                .map_err(MachineError::Threads)?;
            threads.push(t);
        }
        // One I/O thread per device, joined with the vCPUs' (the stop wakes it).
        for index in 0..self.shared.mmio.len() {
            let (inputs, wake) = match self.shared.mmio[index]
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .poll_fds()
            {
                Some(fds) => fds,
                None => (
                    Vec::new(),
                    EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Threads)?,
                ),
            };
            let machine_wake = wake.try_clone().map_err(MachineError::Threads)?;
            self.shared
                .io_wakes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(machine_wake);
            let shared = Arc::clone(&self.shared);
            let t = std::thread::Builder::new()
                .name(format!("dev{index}-io"))
                .spawn(move || device_io_loop(&shared, index, &inputs, &wake))
                .map_err(MachineError::Threads)?;
            threads.push(t);
        }
        drop(threads);
        if initial == RunState::Paused {
            self.wait_parked(Duration::from_secs(10))?;
        } else {
            self.set_devices_paused(false);
        }
        Ok(())
    }

    /// Restores a VM from a state file; vCPUs start running unless `paused`.
    pub fn restore(
        path: &Path,
        name: Option<&str>,
        console: ConsoleOut,
        paused: bool,
    ) -> Result<Machine, MachineError> {
        let mut r = SnapshotReader::open(path)?;
        let mut saved = SavedConfig::decode(&r.section(snapshot::MAX_CONFIG)?)?;
        if let Some(n) = name {
            saved.config.name = n.to_string();
        }
        saved.config.validate()?;
        let snap = VmSnapshot {
            vcpus: r.decode()?,
            vm: r.decode()?,
            devices: r.decode()?,
        };
        snap.check(&saved.config)?;
        check_host_cpu(&snap.vcpus[0].cpuid)?;
        let ram = GuestRam::new(&saved.config.name, saved.config.memory_bytes())?;
        r.memory(&ram)?;
        r.finish()?;
        Machine::from_parts(saved, ram, &snap, console, paused)
    }

    /// Builds a VM from its saved parts: guest RAM already holding the guest's memory, and the
    /// vCPU, VM and device state. vCPUs start running unless `paused`.
    pub fn from_parts(
        saved: SavedConfig,
        ram: GuestRam,
        snap: &VmSnapshot,
        console: ConsoleOut,
        paused: bool,
    ) -> Result<Machine, MachineError> {
        // Checked before the KVM VM is built; `restore` checks the state again only because it
        // may be given one later (a migration's).
        snap.check(&saved.config)?;
        Skeleton::new(saved, ram)?.restore(snap, console, paused)
    }
}

/// A VM built but for its state: the KVM VM with its irqchip, PIT and memory slots, and its
/// vCPUs, over guest RAM that may still be filling. A migration destination builds it at
/// setup, so that between the source's pause and the resume only the state is loaded (and a
/// host that cannot create the VM says so before a page is sent).
pub struct Skeleton {
    saved: SavedConfig,
    ram: GuestRam,
    kvm: Kvm,
    vmfd: VmFd,
    fds: Vec<VcpuFd>,
    /// The MSRs this host's KVM saves (probed one by one: hundreds of ioctls, kept out of
    /// the downtime).
    msr_list: Vec<u32>,
    /// What this host's KVM can give a guest (checked against the state's CPUID).
    host_cpuid: kvm_bindings::CpuId,
    /// The NICs' backends, their TAPs already on their bridges (the disks are opened at the
    /// restore: the source holds their locks until it has handed them over).
    nics: Vec<Backend>,
}

impl Skeleton {
    /// The KVM VM and `saved.config.vcpus` vCPUs (ids 0 …) over `ram`.
    pub fn new(saved: SavedConfig, ram: GuestRam) -> Result<Skeleton, MachineError> {
        let (kvm, vmfd) = vm::create(&ram)?;
        let mut fds = Vec::new();
        for id in 0..saved.config.vcpus {
            let fd = vmfd
                .create_vcpu(u64::from(id))
                .map_err(|e| vm::VmError::Kvm("KVM_CREATE_VCPU", e))?;
            fds.push(fd);
        }
        let Some(probe) = fds.first() else {
            return Err(MachineError::Inconsistent("a VM without vCPUs".into()));
        };
        let msr_list = vcpu::saveable_msrs(&kvm, probe)?;
        let host_cpuid = crate::host::cpuid(&kvm)?;
        let nics = open_nics(&saved.config)?;
        Ok(Skeleton {
            saved,
            ram,
            kvm,
            vmfd,
            fds,
            msr_list,
            host_cpuid,
            nics,
        })
    }

    /// The guest RAM, to be filled before [`Skeleton::restore`].
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Loads the vCPU, VM and device state, opens the devices' backends (disks, TAPs) and
    /// starts the vCPU threads; they run unless `paused`.
    pub fn restore(
        self,
        snap: &VmSnapshot,
        console: ConsoleOut,
        paused: bool,
    ) -> Result<Machine, MachineError> {
        let Skeleton {
            saved,
            ram,
            kvm,
            vmfd,
            fds,
            msr_list,
            host_cpuid,
            nics,
        } = self;
        let t0 = Instant::now();
        snap.check(&saved.config)?;
        let missing = cpuid::incompatibilities(&snap.vcpus[0].cpuid, host_cpuid.as_slice());
        if !missing.is_empty() {
            return Err(MachineError::IncompatibleCpu(missing));
        }
        vm::restore(&vmfd, &snap.vm)?;
        for (fd, s) in fds.iter().zip(&snap.vcpus) {
            vcpu::restore(fd, s)?;
        }
        let t_state = t0.elapsed();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Threads)?;
        vmfd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
        let serial = SerialDevice::restore(serial_irq, console, &snap.devices.serial)?;
        let ram = Arc::new(ram);
        let mut backends = open_disks(&saved.config)?;
        backends.extend(nics);
        let mmio = place_devices(backends, &vmfd, &ram)?;
        if snap.devices.virtio.len() != mmio.len() {
            return Err(MachineError::Inconsistent(format!(
                "{} virtio device states for {} devices",
                snap.devices.virtio.len(),
                mmio.len()
            )));
        }
        for (slot, state) in mmio.iter().zip(&snap.devices.virtio) {
            slot.dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)?;
        }
        let cpuids = snap.vcpus.iter().map(|s| s.cpuid.clone()).collect();
        let m = Machine::assemble(
            saved.config,
            saved.kind,
            kvm,
            vmfd,
            fds,
            msr_list,
            cpuids,
            serial,
            mmio,
            ram,
        )?;
        let t_devices = t0.elapsed();
        m.start_threads(if paused {
            RunState::Paused
        } else {
            RunState::Running
        })?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            "restored the skeleton VM in {:.1} ms: vCPU and VM state {:.1} ms, devices {:.1} ms, threads {:.1} ms",
            ms(t0.elapsed()),
            ms(t_state),
            ms(t_devices - t_state),
            ms(t0.elapsed() - t_devices)
        );
        if !paused {
            // Restored, perhaps on another host: tell the network.
            m.announce();
        }
        Ok(m)
    }
}

impl Machine {
    /// What the CONF section of this VM's state holds.
    pub fn saved_config(&self) -> SavedConfig {
        SavedConfig {
            config: self.config.clone(),
            kind: self.kind,
        }
    }

    /// Host timestamps of the guest's console lines.
    pub fn console_clock(&self) -> Arc<crate::devices::serial::LineClock> {
        self.shared
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clock()
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

    /// The configuration.
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
        kick_threads(&self.threads);
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
        self.set_devices_paused(true);
        self.kick_all();
        self.wait_parked(Duration::from_secs(10))?;
        Ok(true)
    }

    /// Lets the devices' I/O threads work on guest memory, or stops them doing so: once this
    /// returns, none is mid-way (each device's lock was taken after the flag). On the way out
    /// of a pause every live queue is run once: a notify that came while paused (or before a
    /// save, or on the source of a migration) was set aside, and the driver will not repeat it.
    fn set_devices_paused(&self, paused: bool) {
        use std::sync::atomic::Ordering;
        self.shared.devices_paused.store(paused, Ordering::SeqCst);
        for slot in &self.shared.mmio {
            let mut d = slot.dev.lock().unwrap_or_else(|p| p.into_inner());
            if !paused {
                d.run_live_queues();
            }
        }
        if !paused {
            self.shared.wake_io_threads();
        }
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
                    for slot in &shared.mmio {
                        slot.dev
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .announce();
                    }
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
        for (index, slot) in self.shared.mmio.iter().enumerate() {
            slot.dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release()
                .map_err(|source| MachineError::Backend { index, source })?;
        }
        Ok(())
    }

    /// Takes released backends back, retrying for up to `patience` while another process still
    /// holds a disk (a migration destination that has not yet given up).
    pub fn reacquire_devices(&self, patience: Duration) -> Result<(), MachineError> {
        let deadline = Instant::now() + patience;
        for (index, slot) in self.shared.mmio.iter().enumerate() {
            loop {
                let r = slot
                    .dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reacquire();
                match r {
                    Ok(()) => break,
                    Err(virtio::BackendError::Disk(crate::disk::DiskError::InUse(..)))
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(source) => return Err(MachineError::Backend { index, source }),
                }
            }
        }
        Ok(())
    }

    /// Lets the vCPUs run again (taking back released devices first: a VM never runs without
    /// its disks).
    pub fn resume(&self) -> Result<(), MachineError> {
        if self
            .shared
            .mmio
            .iter()
            .any(|s| s.dev.lock().unwrap_or_else(|p| p.into_inner()).released())
        {
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
                self.set_devices_paused(false);
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
        let serial = self
            .shared
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save();
        let virtio = self
            .shared
            .mmio
            .iter()
            .map(|s| s.dev.lock().unwrap_or_else(|p| p.into_inner()).save())
            .collect();
        Ok(VmSnapshot {
            vcpus: states,
            vm: vm_state,
            devices: DeviceStates { serial, virtio },
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

fn kick_threads(threads: &Mutex<Vec<JoinHandle<()>>>) {
    let threads = threads.lock().unwrap_or_else(|p| p.into_inner());
    for t in threads.iter() {
        // SAFETY: the pthread handle belongs to a thread we spawned and have not joined
        // (joining takes this lock), so it is valid; the signal has a handler installed.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
}

fn is_interrupted(e: &kvm_ioctls::Error) -> bool {
    e.errno() == libc::EINTR || e.errno() == libc::EAGAIN
}

/// Completes pending I/O (KVM finishes an `in` instruction only on the next `KVM_RUN`) so that
/// the state read while parked is consistent.
fn flush_pending(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

fn vcpu_loop(id: usize, fd: &Mutex<VcpuFd>, shared: &Shared) {
    {
        let mut f = fd.lock().unwrap_or_else(|p| p.into_inner());
        let p: *mut kvm_run = f.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(p));
    }
    let mut parked = false;
    let mut slices = crate::throttle::Slices::new(kick_signal());
    loop {
        {
            let mut c = shared.lock();
            loop {
                match c.target {
                    RunState::Running => break,
                    RunState::Paused => {
                        if !parked {
                            flush_pending(&mut fd.lock().unwrap_or_else(|p| p.into_inner()));
                            parked = true;
                            c.parked += 1;
                            c.last_parked_us = crate::devices::serial::unix_us();
                            shared.cv.notify_all();
                        }
                        c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    RunState::Stopped => {
                        if parked {
                            c.parked -= 1;
                        }
                        c.exited += 1;
                        shared.cv.notify_all();
                        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
                        return;
                    }
                }
            }
            if parked {
                c.parked -= 1;
                parked = false;
            }
            if c.first_entry_us == 0 {
                c.first_entry_us = crate::devices::serial::unix_us();
                shared.cv.notify_all();
            }
        }
        let throttle = shared.throttle.load(std::sync::atomic::Ordering::Relaxed);
        slices.before_run(id, throttle);
        let mut f = fd.lock().unwrap_or_else(|p| p.into_inner());
        let mut rest = None;
        let stop = match f.run() {
            Ok(exit) => handle_exit(id, exit, shared),
            Err(e) if is_interrupted(&e) => {
                // A kick (pause, stop, throttle start) or the end of a throttle slice; either
                // way the top of the loop reads the target state before the next KVM_RUN.
                f.set_kvm_immediate_exit(0);
                rest = slices.rest_until(throttle);
                None
            }
            Err(e) => Some(StopReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        if matches!(stop, Some(StopReason::GuestShutdown | StopReason::Error(_))) {
            log_registers(id, &f);
        }
        drop(f);
        if let Some(reason) = stop {
            shared.request_stop(reason);
        }
        if let Some(until) = rest {
            shared.rest_until(until);
        }
    }
}

/// Logs where a vCPU was when the guest stopped on its own (a shutdown, a triple fault, an
/// error): enough to tell a guest's reboot from a VMM bug.
fn log_registers(id: usize, fd: &VcpuFd) {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => tracing::warn!(
            vcpu = id,
            "stopped at rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(vcpu = id, "stopped; its registers cannot be read: {e}")
        }
    }
}

/// What a device's I/O thread watches besides its wake-up.
#[derive(Clone, Copy)]
enum IoSource {
    /// The guest notified queue `q` (its ioeventfd).
    Queue(usize),
    /// The device's input `i` (a TAP queue) is readable.
    Input(usize),
}

/// A device's I/O thread: runs the queues the guest notifies (through their ioeventfds) and
/// takes the device's input (each input while the device has guest buffers for it), never
/// while the VM is paused. Ends when the VM stops (the stop wakes it). Whatever changes what
/// is watched wakes it too: the VM resuming, a driver becoming ready or being reset, a receive
/// queue getting buffers again, the queue pairs in use changing.
fn device_io_loop(shared: &Shared, index: usize, inputs: &[std::os::fd::RawFd], wake: &EventFd) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let Some(slot) = shared.mmio.get(index) else {
        return;
    };
    let mut fds = Vec::with_capacity(1 + slot.notifiers.len() + inputs.len());
    let mut sources = Vec::with_capacity(fds.capacity());
    let mut ready = Vec::with_capacity(fds.capacity());
    let pollfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        if shared.lock().target == RunState::Stopped {
            return;
        }
        fds.clear();
        sources.clear();
        fds.push(pollfd(wake.as_raw_fd()));
        if !shared.devices_paused.load(Ordering::SeqCst) {
            for (q, n) in slot.notifiers.iter().enumerate() {
                sources.push(IoSource::Queue(q));
                fds.push(pollfd(n.as_raw_fd()));
            }
            let d = slot.dev.lock().unwrap_or_else(|p| p.into_inner());
            for (input, &fd) in inputs.iter().enumerate() {
                if d.wants_input(input) {
                    sources.push(IoSource::Input(input));
                    fds.push(pollfd(fd));
                }
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let _ = wake.read();
        }
        ready.clear();
        for (source, pfd) in sources.iter().zip(&fds[1..]) {
            if pfd.revents == 0 {
                continue;
            }
            if let IoSource::Queue(q) = *source {
                // Consumed before the queue runs: a notify that comes while it runs is seen
                // on the next round.
                if let Some(n) = slot.notifiers.get(q) {
                    let _ = n.read();
                }
            }
            ready.push(*source);
        }
        let mut d = slot.dev.lock().unwrap_or_else(|p| p.into_inner());
        if shared.devices_paused.load(Ordering::SeqCst) {
            // Set aside: resuming runs every live queue.
            continue;
        }
        for source in &ready {
            match *source {
                IoSource::Queue(q) => d.queue_notified(q),
                IoSource::Input(i) => d.poll_input(i),
            }
        }
    }
}

/// The virtio-mmio device whose window holds `addr`, and the offset in it.
fn mmio_device(shared: &Shared, addr: u64) -> Option<(u64, &Mutex<MmioTransport>)> {
    shared.mmio.iter().find_map(|slot| {
        let off = addr.checked_sub(slot.base)?;
        (off < virtio::MMIO_SIZE).then_some((off, &slot.dev))
    })
}

/// Opens the VM's disks and creates its NICs' TAPs (in that order), and puts each behind a
/// virtio-mmio transport in its slot with its interrupt line (an irqfd) and one ioeventfd per
/// queue on its notify register.
/// A virtio device's backend, before it is placed on the bus.
type Backend = Box<dyn virtio::VirtioDevice>;

fn attach_devices(
    config: &VmConfig,
    vmfd: &VmFd,
    ram: &Arc<GuestRam>,
) -> Result<Vec<Slot>, MachineError> {
    let mut backends = open_disks(config)?;
    backends.extend(open_nics(config)?);
    place_devices(backends, vmfd, ram)
}

/// The disks' backends, in the config's order (each under its one-writer lock).
fn open_disks(config: &VmConfig) -> Result<Vec<Backend>, MachineError> {
    let mut backends: Vec<Backend> = Vec::new();
    for d in &config.disks {
        let disk =
            crate::disk::Disk::open(&d.path, d.readonly).map_err(|source| MachineError::Disk {
                path: d.path.clone(),
                source,
            })?;
        let id = d
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        backends.push(Box::new(Block::new(disk, &id)));
    }
    Ok(backends)
}

/// The NICs' backends (a TAP on its bridge each), in the config's order.
fn open_nics(config: &VmConfig) -> Result<Vec<Backend>, MachineError> {
    let mut backends: Vec<Backend> = Vec::new();
    for (index, n) in config.nics.iter().enumerate() {
        let mac = n.mac_bytes().ok_or_else(|| {
            MachineError::Config(crate::config::ConfigError::BadNic(n.mac.clone()))
        })?;
        // Unique on the host even while a VM's source and destination workers both run.
        let tap_name = format!("fe{}n{index}", std::process::id());
        // The host side of the TAP: the guest's MAC with fe as its first byte (libvirt's
        // choice), so the bridge's own address never follows a TAP.
        let mut host_mac = mac;
        host_mac[0] = 0xfe;
        let tap = virtio::tap::Tap::create(
            &tap_name,
            host_mac,
            n.mtu,
            Some(&n.bridge),
            usize::from(n.queues),
        )
        .map_err(|source| MachineError::Nic {
            index,
            bridge: n.bridge.clone(),
            source,
        })?;
        let net =
            virtio::net::Net::new(tap, mac, n.mtu, n.offloads).map_err(MachineError::Threads)?;
        backends.push(Box::new(net));
    }
    Ok(backends)
}

/// Places `backends` in the virtio-mmio slots, in order: each gets its window, its interrupt
/// (an irqfd) and one ioeventfd per queue.
fn place_devices(
    backends: Vec<Backend>,
    vmfd: &VmFd,
    ram: &Arc<GuestRam>,
) -> Result<Vec<Slot>, MachineError> {
    let count = backends.len();
    let mut devices = Vec::new();
    for (slot, device) in backends.into_iter().enumerate() {
        let (base, irq) = virtio::slot(slot).ok_or_else(|| {
            MachineError::Config(crate::config::ConfigError::BadNic(format!(
                "{count} devices (disks and NICs), at most {}",
                virtio::MAX_DEVICES
            )))
        })?;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Threads)?;
        vmfd.register_irqfd(&evt, irq)
            .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
        let mut notifiers = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let n = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Threads)?;
            // The driver writes the queue's index, 32 bits wide (no NOTIFICATION_DATA).
            let index = u32::try_from(q).unwrap_or(u32::MAX);
            vmfd.register_ioevent(
                &n,
                &IoEventAddress::Mmio(base + virtio::mmio::QUEUE_NOTIFY),
                index,
            )
            .map_err(|e| vm::VmError::Kvm("KVM_IOEVENTFD", e))?;
            notifiers.push(n);
        }
        let dev = MmioTransport::new(device, Arc::clone(ram), evt);
        devices.push(Slot {
            base,
            dev: Mutex::new(dev),
            notifiers,
        });
    }
    Ok(devices)
}

fn handle_exit(id: usize, exit: VcpuExit<'_>, shared: &Shared) -> Option<StopReason> {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if (COM1_BASE..COM1_BASE + 8).contains(&port) {
                if let Some(&b) = data.first() {
                    let off = u8::try_from(port - COM1_BASE).unwrap_or(0);
                    shared
                        .serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write(off, b);
                }
            } else if port == 0x64 && data.first() == Some(&0xfe) {
                tracing::warn!(vcpu = id, "the guest reset itself through the i8042");
                return Some(StopReason::GuestShutdown); // i8042 reset line
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            if (COM1_BASE..COM1_BASE + 8).contains(&port) {
                let off = u8::try_from(port - COM1_BASE).unwrap_or(0);
                let v = shared
                    .serial
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            } else {
                data.fill(0xff); // nothing there
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            match mmio_device(shared, addr) {
                Some((off, dev)) => dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data),
                None => data.fill(0xff),
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if let Some((off, dev)) = mmio_device(shared, addr) {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
            }
            None
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => {
            tracing::warn!(
                vcpu = id,
                "KVM_EXIT_SHUTDOWN: the guest triple-faulted (or its CPU was reset)"
            );
            Some(StopReason::GuestShutdown)
        }
        VcpuExit::SystemEvent(t, _) => {
            tracing::info!(vcpu = id, "guest system event {t}");
            Some(StopReason::GuestShutdown)
        }
        VcpuExit::FailEntry(reason, cpu) => Some(StopReason::Error(format!(
            "vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(StopReason::Error(format!(
            "vCPU {id}: KVM internal error (emulation failed)"
        ))),
        other => {
            tracing::warn!(vcpu = id, "unhandled exit {other:?}");
            None
        }
    }
}
