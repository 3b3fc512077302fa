//! A hostile driver against the virtio-scsi controller: the input picks a queue (control,
//! event or a request queue) and whether a LUN is read-only or comes and goes first, then
//! every descriptor table, available ring and request content it describes (CDBs, task
//! management requests, UNMAP lists) is thrown at that queue. The controller must not panic,
//! touch memory outside guest RAM, or use more buffers than it was given (checked by the
//! driver).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::scsi::Scsi;
use vmm::devices::virtio::testing::Driver;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferry-fuzz-scsi-{}", std::process::id()));
    if !path.exists() {
        vmm::disk::create(&path, 1 << 20).expect("image");
    }
    let first = data.first().copied().unwrap_or(0);
    let readonly = first & 0x04 != 0;
    let mut scsi = Scsi::new(1).expect("controller");
    let disk = vmm::disk::Disk::open(&path, readonly).expect("open");
    scsi.attach(Some(u16::from(first >> 4)), disk).expect("attach");
    let mut d = Driver::new("fuzz-scsi", Box::new(scsi), |f| f);
    if first & 0x08 != 0 {
        // The LUN leaves and comes back: events queued for whatever buffers the input posts.
        let c = d
            .t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Scsi>()
            .expect("the controller");
        let lun = u16::from(first >> 4);
        c.unplug(lun).expect("unplug");
        let disk = vmm::disk::Disk::open(&path, readonly).expect("reopen");
        c.plug(Some(lun), disk).expect("plug");
    }
    d.fuzz(u16::from(first & 0x03).min(2), data.get(1..).unwrap_or_default());
});
