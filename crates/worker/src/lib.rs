//! The per-VM worker process (Hyper-V's VM worker process, one Cloud Hypervisor process): it
//! owns one [`vmm::Machine`] and serves a control socket. See `docs/worker-api.md`.
//!
//! Started detached by `ferry vm start|restore` (it reports readiness with one JSON line on
//! its standard output, then lets go of it) or in the foreground by `ferry vm run` (console on
//! the terminal, Ctrl-C stops it).
#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod fence;
pub mod paths;
pub mod server;

pub use api::{Request, Response, Status};
