//! The one save/restore contract every stateful component of a VM keeps: a plain state struct
//! out, and the component built back from what it needs plus that state. No component has a
//! default "nothing to save" body: each says what its state is, and a state that does not fit
//! is refused with a typed error rather than half-applied.

/// A component whose state can be saved and from which it can be built again.
pub trait Persist: Sized {
    /// The saved state (serialisable; versioned by the state file or migration stream around it).
    type State;
    /// What restoring needs besides the state: host resources that do not travel (an
    /// interrupt eventfd, an open disk, guest RAM).
    type Args<'a>;
    /// Why a state cannot be restored.
    type Error: std::error::Error;

    /// The component's state (the VM is paused).
    fn save(&self) -> Self::State;

    /// Builds the component from `args` and a state from [`Persist::save`].
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
