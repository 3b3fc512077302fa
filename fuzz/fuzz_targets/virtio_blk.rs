//! A hostile driver against virtio-blk: every descriptor table, available ring and request
//! content the input describes is thrown at the request queue of a device on a small image.
//! The device must not panic, touch memory outside guest RAM, or use more buffers than it
//! was given (checked by the driver).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::testing::Driver;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferry-fuzz-blk-{}", std::process::id()));
    if !path.exists() {
        vmm::disk::create(&path, 1 << 20).expect("image");
    }
    let readonly = data.first().is_some_and(|b| b & 1 == 1);
    let disk = vmm::disk::Disk::open(&path, readonly).expect("open");
    let mut d = Driver::new("fuzz-blk", Box::new(Block::new(disk, "fuzz")), |f| f);
    d.fuzz(0, data.get(1..).unwrap_or_default());
});
