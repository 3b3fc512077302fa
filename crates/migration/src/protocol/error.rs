//! The errors of a migration, on either side.

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection failed.
    #[error("migration connection failed")]
    Io(#[source] std::io::Error),
    /// TLS: the peer is not a member of this cluster (or this side is not, for the peer).
    #[error("the peer could not be authenticated: {0}")]
    Auth(String),
    /// The peer is not a Ferry migration peer of a compatible version.
    #[error("peer speaks an incompatible protocol: {0}")]
    Protocol(String),
    /// A frame failed its checks.
    #[error("corrupted migration stream: {0}")]
    Corrupt(String),
    /// The destination refused the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The peer reported an error.
    #[error("the peer failed: {0}")]
    Peer(String),
    /// Cancelled by the user (the VM continues on the source).
    #[error("migration cancelled{0}")]
    Cancelled(String),
    /// Did not converge and the policy says cancel.
    #[error("migration did not converge: {0}")]
    NotConverged(String),
    /// VM-side failure.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// Guest memory access failure.
    #[error(transparent)]
    Memory(#[from] vmm::memory::MemoryError),
    /// The migration failed before the commit, and the VM could not resume on the source
    /// either: a disk it handed over is still held elsewhere. It stays paused there, whole.
    #[error("{failure}; the VM stays paused on the source: {cause}")]
    SourcePaused {
        /// Why the migration failed.
        failure: String,
        /// Why the VM could not resume.
        cause: String,
    },
    /// The commit message was sent but its acknowledgement never came.
    #[error("commit outcome unknown: COMMIT was sent but the destination did not confirm; the source VM stays paused and will not resume by itself ({0})")]
    CommitUnknown(String),
    /// The cluster's answer at the commit point was lost: COMMIT was not sent, and the VM stays
    /// paused here until the store's record says where it runs.
    #[error("the cluster's commit decision was lost ({0}): COMMIT was not sent; the VM stays paused here until the cluster resolves it from its store")]
    GateLost(String),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        // rustls reports handshake and certificate failures as I/O errors wrapping its own.
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t @ rustls::Error::InvalidMessage(_)) => MigrationError::Protocol(format!(
                "the peer does not speak TLS (a peer without TLS, or not Ferry): {t}"
            )),
            Some(t) => MigrationError::Auth(t.to_string()),
            None => MigrationError::Io(e),
        }
    }
}
