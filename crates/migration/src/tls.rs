//! Mutual TLS for migration connections.
//!
//! Every host of a cluster holds an *identity*: the cluster CA's certificate, its own
//! certificate signed by that CA, and its private key, in one directory:
//!
//! ```text
//! ca.pem    the cluster CA certificate (the only trust anchor)
//! cert.pem  this host's certificate (signed by the CA)
//! key.pem   this host's private key (mode 0600)
//! ```
//!
//! The CA itself (`ca.pem` + `ca-key.pem`) lives wherever the operator keeps it; [`init_ca`]
//! creates one and [`issue`] signs a host identity with it. Both ends of a migration present
//! their certificate and verify the peer's against the cluster CA (TLS 1.3 only): a peer that
//! is not a member of the cluster — no certificate, or one of another CA — is refused during
//! the handshake, before a single migration message is read.
//!
//! Authentication is by cluster membership: every host certificate carries the name
//! [`PEER_NAME`], which is what the client verifies, so any member of the cluster may
//! receive a VM from any other. The cluster layer decides *which* host receives.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::protocol::MigrationError;

/// The CA certificate, in a CA directory and in every identity directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (CA directory only).
pub const CA_KEY: &str = "ca-key.pem";
/// A host's certificate.
pub const CERT: &str = "cert.pem";
/// A host's private key.
pub const KEY: &str = "key.pem";
/// The DNS name every host certificate carries and every client verifies.
pub const PEER_NAME: &str = "member.ferry-cluster";

/// Errors of certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{path} does not hold a valid {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it.
        what: &'static str,
    },
    /// Refusing to overwrite an existing CA or identity.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The certificates do not make a usable TLS configuration.
    #[error("unusable TLS identity: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, data: &[u8], private: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                err(e)
            }
        })?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn ensure_absent(paths: &[PathBuf]) -> Result<(), TlsError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(TlsError::Exists(p.clone())),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates a new cluster CA (`ca.pem`, `ca-key.pem`) in `dir`, named after `cluster`.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<(), TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    ensure_absent(&[cert_path.clone(), key_path.clone()])?;
    create_dir(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferry");
    dn.push(DnType::CommonName, format!("Ferry cluster CA ({cluster})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)
}

/// Signs a new identity for `host` with the CA in `ca_dir` and writes it to `out_dir`
/// (`ca.pem`, `cert.pem`, `key.pem`). `out_dir` may be `ca_dir` itself.
pub fn issue(ca_dir: &Path, out_dir: &Path, host: &str) -> Result<(), TlsError> {
    let ca_pem = String::from_utf8_lossy(&read(&ca_dir.join(CA_CERT))?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_dir.join(CA_KEY))?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| TlsError::Pem {
        path: ca_dir.join(CA_KEY),
        what: "private key",
    })?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|_| TlsError::Pem {
            path: ca_dir.join(CA_CERT),
            what: "CA certificate",
        })?
        .self_signed(&ca_key)?;
    let (cert_path, key_path) = (out_dir.join(CERT), out_dir.join(KEY));
    let same_dir = out_dir.join(CA_CERT) == ca_dir.join(CA_CERT);
    let mut check = vec![cert_path.clone(), key_path.clone()];
    if !same_dir {
        check.push(out_dir.join(CA_CERT));
    }
    ensure_absent(&check)?;
    create_dir(out_dir)?;

    let mut params = CertificateParams::new(vec![PEER_NAME.to_string(), host.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferry");
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)?;
    if !same_dir {
        write(&out_dir.join(CA_CERT), ca_pem.as_bytes(), false)?;
    }
    Ok(())
}

/// A host's identity: the cluster CA, its certificate and key, as rustls configurations.
#[derive(Clone)]
pub struct Identity {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

impl Identity {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let pem =
            |name: &str, what: &'static str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
                let path = dir.join(name);
                let data = read(&path)?;
                let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
                    .collect::<Result<_, _>>()
                    .map_err(|_| TlsError::Pem {
                        path: path.clone(),
                        what,
                    })?;
                if certs.is_empty() {
                    return Err(TlsError::Pem { path, what });
                }
                Ok(certs)
            };
        let ca = pem(CA_CERT, "CA certificate")?;
        let chain = pem(CERT, "certificate")?;
        let key_path = dir.join(KEY);
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|_| TlsError::Pem {
            path: key_path,
            what: "private key",
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(cfg)?;
        Ok(Identity {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// One migration connection: plain TCP (only when the user asked for it) or TLS.
pub enum Channel {
    /// No TLS (`--insecure`).
    Plain(TcpStream),
    /// The source's end.
    Client(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
    /// The destination's end.
    Server(Box<rustls::StreamOwned<ServerConnection, TcpStream>>),
}

impl Channel {
    /// The connecting side (the source). With an identity, completes the TLS handshake.
    pub fn connect(tcp: TcpStream, id: Option<&Identity>) -> Result<Channel, MigrationError> {
        let Some(id) = id else {
            return Ok(Channel::Plain(tcp));
        };
        let name = ServerName::try_from(PEER_NAME)
            .map_err(|e| MigrationError::Auth(e.to_string()))?
            .to_owned();
        let conn = ClientConnection::new(id.client.clone(), name)
            .map_err(|e| MigrationError::Auth(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel::Client(Box::new(s)))
    }

    /// The accepting side (the destination). With an identity, completes the TLS handshake.
    pub fn accept(tcp: TcpStream, id: Option<&Identity>) -> Result<Channel, MigrationError> {
        let Some(id) = id else {
            return Ok(Channel::Plain(tcp));
        };
        let conn = ServerConnection::new(id.server.clone())
            .map_err(|e| MigrationError::Auth(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Channel::Server(Box::new(s)))
    }

    /// The TCP socket underneath (to shut it down from another thread, via a clone).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Channel::Plain(t) => t,
            Channel::Client(s) => &s.sock,
            Channel::Server(s) => &s.sock,
        }
    }

    /// Whether the channel is encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Channel::Plain(_))
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Plain(t) => t.read(buf),
            Channel::Client(s) => s.read(buf),
            Channel::Server(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Plain(t) => t.write(buf),
            Channel::Client(s) => s.write(buf),
            Channel::Server(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Channel::Plain(t) => t.write_vectored(bufs),
            // rustls' owned stream writes only the first slice; its borrowed one takes all.
            Channel::Client(s) => {
                rustls::Stream::new(&mut s.conn, &mut s.sock).write_vectored(bufs)
            }
            Channel::Server(s) => {
                rustls::Stream::new(&mut s.conn, &mut s.sock).write_vectored(bufs)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Channel::Plain(t) => t.flush(),
            Channel::Client(s) => s.flush(),
            Channel::Server(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ca_and_identities_are_created_once_and_loaded() {
        let ca = dir("ca");
        init_ca(&ca, "test").unwrap();
        assert!(matches!(init_ca(&ca, "test"), Err(TlsError::Exists(_))));
        issue(&ca, &ca, "host-a").unwrap();
        let b = ca.join("b");
        issue(&ca, &b, "host-b").unwrap();
        assert!(matches!(issue(&ca, &b, "host-b"), Err(TlsError::Exists(_))));
        Identity::load(&ca).unwrap();
        Identity::load(&b).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(b.join(KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key readable by others");
        std::fs::write(b.join(CERT), "not a certificate").unwrap();
        assert!(matches!(Identity::load(&b), Err(TlsError::Pem { .. })));
        assert!(matches!(
            Identity::load(&ca.join("nowhere")),
            Err(TlsError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&ca);
    }
}
