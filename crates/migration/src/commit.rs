//! The commit point when a cluster decides it (docs/migration-protocol.md, "Commit through
//! the store").
//!
//! Between two workers alone, COMMIT on the wire is the commit point. In a cluster it is a
//! compare-and-swap of the VM's record in the store (owner source → destination, epoch + 1),
//! which exactly one party can win:
//! - the source asks a [`Gate`] once the destination holds the whole VM, and sends COMMIT only
//!   if the gate answers [`GateAnswer::Commit`] (the swap is won); on [`GateAnswer::Abort`] it
//!   takes the VM back, as for any failure before the commit;
//! - a destination that loses its source after READY does not discard the VM: it waits for a
//!   [`Decision`] (its agent reads the store: the swap won means run, anything else means
//!   discard), so a COMMIT lost on the wire never leaves the VM running nowhere.

use std::sync::{Condvar, Mutex};

/// The cluster's answer to "may this migration commit now?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateAnswer {
    /// The store now names the destination as the VM's owner: send COMMIT.
    Commit,
    /// The store says no (the record changed, the host is fenced): take the VM back (why).
    Abort(String),
    /// The answer was lost (the one asked went away mid-answer): it may have won the swap, so
    /// neither COMMIT nor a resume; the VM stays paused here until the store's owner decides.
    Unknown(String),
}

/// Asked by the source, once, right before COMMIT.
pub type Gate<'a> = &'a (dyn Fn() -> GateAnswer + Sync);

/// A destination's wait for the cluster's decision after its source went away after READY.
#[derive(Debug, Default)]
pub struct Decision {
    value: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Decision {
    /// No decision yet.
    pub fn new() -> Decision {
        Decision::default()
    }

    /// Decides: `true` runs the VM here (the store names this host), `false` discards it.
    /// The first decision stands.
    pub fn decide(&self, commit: bool) -> bool {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        let first = *v.get_or_insert(commit);
        self.cv.notify_all();
        first
    }

    /// Blocks until decided.
    pub(crate) fn wait(&self) -> bool {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = *v {
                return d;
            }
            v = self.cv.wait(v).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_decision_stands_and_wakes_the_waiter() {
        let d = std::sync::Arc::new(Decision::new());
        let waiter = {
            let d = std::sync::Arc::clone(&d);
            std::thread::spawn(move || d.wait())
        };
        assert!(d.decide(true));
        assert!(d.decide(false), "a second decision changes nothing");
        assert!(waiter.join().unwrap());
    }
}
