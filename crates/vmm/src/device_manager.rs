//! A VM's devices: COM1 and the i8042 reset line on the port bus, the virtio-mmio devices on
//! the MMIO bus (disks, then NICs, then the SCSI controller), their interrupts and
//! notifiers; the run-time changes (a SCSI LUN added or removed while the VM runs); and the
//! devices' part of a saved VM.
//!
//! vCPU exits find their device through [`Bus`] lookups. Each virtio device sits behind a
//! mutex that its I/O thread holds while it runs the device's queues, so an operation that
//! takes the same lock (a pause, a hot-plug) finds no request half done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::devices::serial::{ConsoleOut, SerialDevice, SerialDeviceState, COM1_BASE, COM1_IRQ};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport};
use crate::devices::virtio::scsi::{self, LunInfo, Scsi, ScsiError};
use crate::devices::virtio::{self, block::Block, DeviceState, VirtioDevice};
use crate::disk::{Disk, DiskError};
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::vm;

// A VM's controller has a request queue per vCPU.
const _: () = assert!(crate::config::MAX_VCPUS as u16 <= scsi::MAX_REQUEST_QUEUES);

/// The i8042's command port: writing 0xfe there pulses the CPU reset line.
const I8042_COMMAND: u64 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// The complete device state of a saved VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// virtio-mmio devices, in slot order (disks, then NICs, then the SCSI controller).
    pub virtio: Vec<MmioState>,
}

/// What building, restoring or changing the devices can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk could not be opened.
    #[error("disk {path}: {source}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// A device's backend (a disk) could not be released or taken back.
    #[error("device {index}: {source}")]
    Backend {
        /// Device (slot) index.
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
    /// A NIC without a valid unicast MAC.
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
    /// More virtio devices than slots.
    #[error("{0} virtio devices (disks, NICs and the SCSI controller): at most {max}", max = virtio::MAX_DEVICES)]
    TooMany(usize),
    /// KVM refused an interrupt or notifier.
    #[error(transparent)]
    Kvm(#[from] vm::VmError),
    /// An eventfd could not be made.
    #[error("cannot create a device eventfd")]
    EventFd(#[source] std::io::Error),
    /// The serial device.
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialError),
    /// A virtio device's saved state.
    #[error(transparent)]
    Virtio(#[from] MmioError),
    /// The SCSI controller refused.
    #[error(transparent)]
    Scsi(#[from] ScsiError),
    /// Two devices at one address (a bug in the layout).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Saved device state for another set of devices.
    #[error("{saved} virtio device states for {here} devices")]
    Count {
        /// States saved.
        saved: usize,
        /// Devices here.
        here: usize,
    },
    /// A SCSI operation on a VM without the controller.
    #[error("the VM has no SCSI controller (start it with --scsi)")]
    NoScsi,
    /// A disk change while the disks are handed over.
    #[error("the VM's disks are handed over (a migration or a save): try again when it ends")]
    HandedOver,
}

/// What answers at a port.
#[derive(Clone, Copy, Debug)]
enum Pio {
    Com1,
    I8042,
}

/// What a port write did beyond the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioEffect {
    /// Nothing more.
    None,
    /// The guest pulsed the reset line.
    Reset,
}

/// A virtio-mmio device in its window of guest-physical addresses.
pub struct Slot {
    /// The transport and device.
    pub dev: Mutex<MmioTransport>,
    /// One eventfd per queue, which KVM signals when the guest writes that queue's index to
    /// the notify register (`ioeventfd`: no exit to the VMM); the device's I/O thread then runs
    /// the queue, so the vCPU goes straight back to the guest.
    pub notifiers: Vec<EventFd>,
}

impl Slot {
    /// The transport, locked.
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A virtio device's backend, before it is placed on the bus.
type Backend = Box<dyn VirtioDevice>;

/// Which disk of the SCSI controller an operation is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LunRef {
    /// By LUN.
    Lun(u16),
    /// By the image (or host block device) it holds.
    Path(PathBuf),
}

/// Every device of a VM.
pub struct DeviceManager {
    serial: Mutex<SerialDevice>,
    slots: Vec<Slot>,
    pio: Bus<Pio>,
    mmio: Bus<usize>,
    /// The slot of the SCSI controller, if the VM has one.
    scsi: Option<usize>,
    /// Set while the VM is paused: device I/O threads leave guest memory alone (checked with
    /// the device's lock held, so once the pause has taken every device lock none is mid-way).
    paused: AtomicBool,
}

/// What restoring the devices needs besides their state.
pub struct DeviceArgs<'a> {
    /// The VM's config (its disks and NICs).
    pub config: &'a VmConfig,
    /// The KVM VM (interrupts, notifiers).
    pub vmfd: &'a VmFd,
    /// Guest RAM.
    pub ram: &'a Arc<GuestRam>,
    /// Where COM1 writes.
    pub console: ConsoleOut,
    /// The NICs' backends, their TAPs already made (see [`open_nics`]).
    pub nics: Vec<Box<dyn VirtioDevice>>,
}

impl DeviceManager {
    /// The devices of a VM booting from `config`: its disks opened (under their locks), its
    /// NICs' TAPs made, the SCSI controller with its first disks, COM1.
    pub fn build(
        config: &VmConfig,
        vmfd: &VmFd,
        ram: &Arc<GuestRam>,
        console: ConsoleOut,
    ) -> Result<DeviceManager, DeviceError> {
        let mut backends = open_disks(config)?;
        backends.extend(open_nics(config)?);
        let scsi = match &config.scsi {
            Some(spec) => {
                let mut c = Scsi::new(u16::from(config.vcpus))?;
                for d in &spec.disks {
                    c.attach(Some(d.lun), open_disk(&d.path, d.readonly)?)?;
                }
                backends.push(Box::new(c));
                Some(backends.len() - 1)
            }
            None => None,
        };
        let slots = place(backends, vmfd, ram, |_| Ok(None))?;
        let serial = SerialDevice::new(serial_irq(vmfd)?, console);
        DeviceManager::assemble(serial, slots, scsi)
    }

    fn assemble(
        serial: SerialDevice,
        slots: Vec<Slot>,
        scsi: Option<usize>,
    ) -> Result<DeviceManager, DeviceError> {
        let mut pio = Bus::new();
        pio.insert(u64::from(COM1_BASE), 8, Pio::Com1)?;
        pio.insert(I8042_COMMAND, 1, Pio::I8042)?;
        let mut mmio = Bus::new();
        for index in 0..slots.len() {
            let (base, _) = virtio::slot(index).ok_or(DeviceError::TooMany(slots.len()))?;
            mmio.insert(base, virtio::MMIO_SIZE, index)?;
        }
        Ok(DeviceManager {
            serial: Mutex::new(serial),
            slots,
            pio,
            mmio,
            scsi,
            paused: AtomicBool::new(true),
        })
    }

    /// COM1.
    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The virtio devices, in slot order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// A guest `in` from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff); // nothing there
        if let Some((off, Pio::Com1)) = self.pio.find(u64::from(port)) {
            let v = self.serial().read(u8::try_from(off).unwrap_or(0));
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
        }
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioEffect {
        match (self.pio.find(u64::from(port)), data.first()) {
            (Some((off, Pio::Com1)), Some(&b)) => {
                self.serial().write(u8::try_from(off).unwrap_or(0), b);
                PioEffect::None
            }
            (Some((_, Pio::I8042)), Some(&I8042_RESET)) => PioEffect::Reset,
            _ => PioEffect::None,
        }
    }

    /// A guest read of MMIO address `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio.find(addr) {
            Some((off, &i)) => self.slots[i].lock().read(off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to MMIO address `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, &i)) = self.mmio.find(addr) {
            self.slots[i].lock().write(off, data);
        }
    }

    /// Whether the devices are kept off guest memory (the VM is paused).
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Lets the devices' I/O threads work on guest memory, or stops them doing so: once this
    /// returns, none is mid-way (each device's lock was taken after the flag). On the way out
    /// of a pause every live queue is run once: a notify that came while paused (or before a
    /// save, or on the source of a migration) was set aside, and the driver will not repeat it.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        for slot in &self.slots {
            let mut d = slot.lock();
            if !paused {
                d.run_live_queues();
            }
        }
    }

    /// Each NIC tells the network where the VM now is.
    pub fn announce(&self) {
        for slot in &self.slots {
            slot.lock().announce();
        }
    }

    /// Lets go of every backend (disks flushed, closed, unlocked).
    pub fn release(&self) -> Result<(), DeviceError> {
        for (index, slot) in self.slots.iter().enumerate() {
            slot.lock()
                .release()
                .map_err(|source| DeviceError::Backend { index, source })?;
        }
        Ok(())
    }

    /// Takes released backends back, retrying for up to `patience` while another process still
    /// holds a disk (a migration destination that has not yet given up).
    pub fn reacquire(&self, patience: Duration) -> Result<(), DeviceError> {
        let deadline = Instant::now() + patience;
        for (index, slot) in self.slots.iter().enumerate() {
            loop {
                match slot.lock().reacquire() {
                    Ok(()) => break,
                    Err(virtio::BackendError::Disk(DiskError::InUse(..)))
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(source) => return Err(DeviceError::Backend { index, source }),
                }
            }
        }
        Ok(())
    }

    /// Whether any backend is released.
    pub fn any_released(&self) -> bool {
        self.slots.iter().any(|s| s.lock().released())
    }

    /// The SCSI controller's LUNs now (`None`: no controller).
    pub fn scsi_disks(&self) -> Option<Vec<LunInfo>> {
        let i = self.scsi?;
        let mut t = self.slots[i].lock();
        let c = t.device_mut().as_any_mut().downcast_mut::<Scsi>()?;
        Some(c.luns())
    }

    /// What the VM's devices have moved since this worker made them.
    pub fn io(&self) -> virtio::IoTotals {
        let mut t = virtio::IoTotals::default();
        for s in &self.slots {
            t += s.lock().device().io();
        }
        t
    }

    /// Runs `f` on the SCSI controller, then delivers the events it queued (unless the VM is
    /// paused: then the resume does).
    fn with_scsi<R>(
        &self,
        f: impl FnOnce(&mut Scsi) -> Result<R, DeviceError>,
    ) -> Result<R, DeviceError> {
        let i = self.scsi.ok_or(DeviceError::NoScsi)?;
        let mut t = self.slots[i].lock();
        if t.released() {
            return Err(DeviceError::HandedOver);
        }
        let c = t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Scsi>()
            .ok_or(DeviceError::NoScsi)?;
        let r = f(c)?;
        if !self.paused() {
            t.kick_queue(scsi::EVENT_QUEUE);
        }
        Ok(r)
    }

    /// Adds a disk to the SCSI controller at `lun` (the lowest free one if `None`): the disk is
    /// opened under its lock first, and nothing changes if anything is refused.
    pub fn scsi_add(
        &self,
        path: &Path,
        readonly: bool,
        lun: Option<u16>,
    ) -> Result<LunInfo, DeviceError> {
        self.with_scsi(|c| {
            // Refusals that need no disk come before the disk is touched.
            c.check_add(lun, path)?;
            let disk = open_disk(path, readonly)?;
            let n = c.plug(lun, disk)?;
            c.luns()
                .into_iter()
                .find(|l| l.lun == n)
                .ok_or(DeviceError::Scsi(ScsiError::NoSuchLun(n)))
        })
    }

    /// Removes a disk from the SCSI controller: flushed, closed, its lock released, the guest
    /// told.
    pub fn scsi_remove(&self, which: &LunRef) -> Result<LunInfo, DeviceError> {
        self.with_scsi(|c| {
            let lun = match which {
                LunRef::Lun(n) => *n,
                LunRef::Path(p) => c
                    .lun_of(p)
                    .ok_or_else(|| ScsiError::NoSuchDisk(p.clone()))?,
            };
            Ok(c.unplug(lun)?)
        })
    }

    /// The linux command-line fragments that tell Linux about the virtio-mmio devices.
    pub fn linux_cmdline(&self) -> Vec<String> {
        (0..self.slots.len())
            .filter_map(virtio::linux_cmdline)
            .collect()
    }
}

impl Persist for DeviceManager {
    type State = DeviceStates;
    type Args<'a> = DeviceArgs<'a>;
    type Error = DeviceError;

    fn save(&self) -> DeviceStates {
        DeviceStates {
            serial: self.serial().save(),
            virtio: self.slots.iter().map(|s| s.lock().save()).collect(),
        }
    }

    /// The disks of the config opened, the SCSI controller's LUNs opened from the state (the
    /// disks it had at the save or the switch), the NICs given, every transport's state loaded.
    fn restore(args: DeviceArgs<'_>, state: &DeviceStates) -> Result<Self, DeviceError> {
        restore(args, state)
    }
}

fn restore(args: DeviceArgs<'_>, state: &DeviceStates) -> Result<DeviceManager, DeviceError> {
    let DeviceArgs {
        config,
        vmfd,
        ram,
        console,
        nics,
    } = args;
    let mut backends = open_disks(config)?;
    backends.extend(nics);
    let scsi = if config.scsi.is_some() {
        let i = backends.len();
        let saved = match state.virtio.get(i).map(|s| &s.device) {
            Some(DeviceState::Scsi(s)) => s,
            _ => {
                return Err(DeviceError::Count {
                    saved: state.virtio.len(),
                    here: i + 1,
                })
            }
        };
        backends.push(Box::new(Scsi::restore((), saved)?));
        Some(i)
    } else {
        None
    };
    if state.virtio.len() != backends.len() {
        return Err(DeviceError::Count {
            saved: state.virtio.len(),
            here: backends.len(),
        });
    }
    let slots = place(backends, vmfd, ram, |i| Ok(state.virtio.get(i)))?;
    let irq = serial_irq(vmfd)?;
    let serial = SerialDevice::restore((irq, console), &state.serial)?;
    DeviceManager::assemble(serial, slots, scsi)
}

fn serial_irq(vmfd: &VmFd) -> Result<EventFd, DeviceError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vmfd.register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
    Ok(irq)
}

fn open_disk(path: &Path, readonly: bool) -> Result<Disk, DeviceError> {
    Disk::open(path, readonly).map_err(|source| DeviceError::Disk {
        path: path.to_path_buf(),
        source,
    })
}

/// The disks' backends, in the config's order (each under its one-writer lock).
fn open_disks(config: &VmConfig) -> Result<Vec<Backend>, DeviceError> {
    let mut backends: Vec<Backend> = Vec::new();
    for d in &config.disks {
        let disk = open_disk(&d.path, d.readonly)?;
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
pub fn open_nics(config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceError> {
    let mut backends: Vec<Backend> = Vec::new();
    for (index, n) in config.nics.iter().enumerate() {
        let nic_error = |source| DeviceError::Nic {
            index,
            bridge: n.bridge.clone(),
            source,
        };
        let mac = n
            .mac_bytes()
            .ok_or_else(|| DeviceError::BadMac(n.mac.clone()))?;
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
        .map_err(nic_error)?;
        let net =
            virtio::net::Net::new(tap, mac, n.mtu, n.offloads).map_err(DeviceError::EventFd)?;
        backends.push(Box::new(net));
    }
    Ok(backends)
}

/// Places `backends` in the virtio-mmio slots, in order: each gets its window, its interrupt
/// (an irqfd) and one ioeventfd per queue, and the state `saved(index)` gives, if any.
fn place<'s>(
    backends: Vec<Backend>,
    vmfd: &VmFd,
    ram: &Arc<GuestRam>,
    saved: impl Fn(usize) -> Result<Option<&'s MmioState>, DeviceError>,
) -> Result<Vec<Slot>, DeviceError> {
    let count = backends.len();
    let mut slots = Vec::new();
    for (index, device) in backends.into_iter().enumerate() {
        let (base, irq) = virtio::slot(index).ok_or(DeviceError::TooMany(count))?;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vmfd.register_irqfd(&evt, irq)
            .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
        let mut notifiers = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let n = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
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
        let dev = match saved(index)? {
            Some(state) => MmioTransport::restore((device, Arc::clone(ram), evt), state)?,
            None => MmioTransport::new(device, Arc::clone(ram), evt),
        };
        slots.push(Slot {
            dev: Mutex::new(dev),
            notifiers,
        });
    }
    Ok(slots)
}
