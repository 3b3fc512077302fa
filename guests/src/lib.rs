//! Ferry's bare-metal test guests.
//!
//! The guests are small freestanding C programs entered by the VMM in 64-bit long mode (see
//! `docs/boot.md`). `build.rs` compiles them with the machine's `gcc`; this crate only tells
//! where the images are.

use std::path::PathBuf;

/// Path of the bare-metal dirtier image (`target/guests/dirtier.elf` is a copy of it).
///
/// The dirtier prints `beat <n> ok` (or `beat <n> BAD <reason>`) on the serial port; its
/// parameters come from the command line: `mb=<MiB> rate=<pages/s> beat_ms=<ms>`.
pub fn dirtier() -> PathBuf {
    PathBuf::from(env!("FERRY_GUEST_DIRTIER"))
}
