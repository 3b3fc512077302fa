//! Building a machine: booting one from its config, or restoring one from its state (a state
//! file, or a migration's [`Skeleton`] built at setup and filled as the pages arrive).

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::control::{Control, Shared};
use super::io_thread::device_io_loop;
use super::vcpu_thread::{install_kick_handler, vcpu_loop};
use super::{check_host_cpu, Machine, MachineError, RunState, SavedConfig, VmSnapshot};
use crate::boot::{self, KernelKind};
use crate::config::VmConfig;
use crate::cpuid;
use crate::device_manager::{self, DeviceArgs, DeviceManager};
use crate::devices::serial::ConsoleOut;
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::snapshot::{self, SnapshotReader};
use crate::vcpu;
use crate::vm;

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
        let devices = DeviceManager::build(&config, &vmfd, &ram, console)?;
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
                for dev in devices.linux_cmdline() {
                    cmdline.push(' ');
                    cmdline.push_str(&dev);
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
        let msr_list = vcpu::saveable_msrs(&kvm, &fds[0])?;
        let m = Machine::assemble(config, kind, kvm, vmfd, fds, msr_list, cpuids, devices, ram)?;
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
        devices: DeviceManager,
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
                devices,
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
        for (index, slot) in self.shared.devices.slots().iter().enumerate() {
            let (inputs, wake) = match slot.lock().poll_fds() {
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
            self.unpause_devices();
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
    nics: Vec<Box<dyn VirtioDevice>>,
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
        let nics = device_manager::open_nics(&saved.config)?;
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
        let ram = Arc::new(ram);
        let devices = DeviceManager::restore(
            DeviceArgs {
                config: &saved.config,
                vmfd: &vmfd,
                ram: &ram,
                console,
                nics,
            },
            &snap.devices,
        )?;
        let cpuids = snap.vcpus.iter().map(|s| s.cpuid.clone()).collect();
        let m = Machine::assemble(
            saved.config,
            saved.kind,
            kvm,
            vmfd,
            fds,
            msr_list,
            cpuids,
            devices,
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
