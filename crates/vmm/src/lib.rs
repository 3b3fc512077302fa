//! Ferry's virtual machine monitor library.
//!
//! A [`machine::Machine`] is one KVM VM: guest RAM in a memfd ([`memory`]), vCPU threads,
//! in-kernel irqchip and PIT ([`vm`]), a 16550 serial console ([`devices`]), booted from a Linux
//! kernel or a bare-metal ELF ([`boot`]). Every component has a plain state struct with explicit
//! save and restore; [`snapshot`] composes them into Ferry's versioned state file.
#![deny(missing_docs)]

pub mod boot;
pub mod bus;
pub mod config;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod dirty_rate;
pub mod disk;
pub mod host;
pub mod machine;
pub mod memory;
pub mod persist;
pub mod snapshot;
pub mod throttle;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use machine::{Machine, MachineError, RunState};
