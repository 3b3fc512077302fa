//! Live migration of a running VM from one worker to another over TCP.
//!
//! The source worker drives it: setup (config, CPU check, skeleton VM on the destination),
//! iterative pre-copy with KVM's dirty log, stop-and-copy, then a single commit point. See
//! `docs/migration-protocol.md` for the wire format, the phases and what each side does when
//! anything fails.
#![deny(missing_docs)]

pub mod commit;
pub mod dest;
mod fault;
pub mod policy;
pub mod protocol;
pub mod source;
pub mod tls;

pub use protocol::MigrationError;
pub use source::{MigrateOptions, MigrationReport, MigrationStatus, Phase, TimeoutPolicy};
