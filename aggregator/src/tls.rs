//! The aggregator's TLS identity: a key and self-signed certificate created
//! on first start (rcgen) and kept in the state directory. Devices pin the
//! certificate's SHA-256 fingerprint, and so does a leaf aggregator its
//! parent's ([`client_config`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedge_proto::tls::{Pin, PinVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const ALPN: &[u8] = b"fedge/1";
const CERT_FILE: &str = "aggregator.cert.der";
const KEY_FILE: &str = "aggregator.key.der";
pub const FINGERPRINT_FILE: &str = "fingerprint.txt";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating the certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

pub struct TlsIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    /// SHA-256 of the certificate: what devices pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        fedge_proto::tls::fingerprint(self.cert.as_ref())
    }

    /// [`TlsIdentity::fingerprint`] in hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint())
    }

    /// Load the identity from `dir`, or create and store one.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|source| TlsError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            return Ok(TlsIdentity {
                cert: CertificateDer::from(read(&cert_path)?),
                key: PrivatePkcs8KeyDer::from(read(&key_path)?),
            });
        }
        let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        let ck = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = ck.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        let write = |p: &Path, data: &[u8], mode: u32| {
            fedge_proto::io::write_atomic(p, data, Some(mode)).map_err(|source| TlsError::Write {
                path: p.to_path_buf(),
                source,
            })
        };
        write(&key_path, key.secret_pkcs8_der(), 0o600)?;
        write(&cert_path, cert.as_ref(), 0o644)?;
        let id = TlsIdentity { cert, key };
        write(
            &dir.join(FINGERPRINT_FILE),
            id.fingerprint_hex().as_bytes(),
            0o644,
        )?;
        Ok(id)
    }

    /// The quinn server configuration: TLS 1.3 only, ALPN `fedge/1`.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// A leaf aggregator's QUIC client configuration for its parent: TLS 1.3
/// only, ALPN `fedge/1`, the parent pinned by the SHA-256 fingerprint of
/// its certificate (as devices pin their aggregator; `fedge_device`'s
/// transport adds trust on first use, which a leaf has no use for), and
/// keepalive, so the connection outlives a round of the leaf's devices.
pub fn client_config(
    pin: [u8; 32],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier::new(ParentPin(pin), Arc::clone(&provider)));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle_timeout).map_err(|e| TlsError::Config(e.to_string()))?,
    ));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// Accepts exactly one certificate: the parent's, by fingerprint.
#[derive(Debug)]
struct ParentPin([u8; 32]);

impl Pin for ParentPin {
    fn check(&self, got: [u8; 32]) -> Result<(), rustls::Error> {
        if got == self.0 {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "parent certificate fingerprint {} does not match the pinned {}",
                hex::encode(got),
                hex::encode(self.0)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = TlsIdentity::load_or_create(dir.path()).unwrap();
        let b = TlsIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint_hex(), b.fingerprint_hex());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FINGERPRINT_FILE)).unwrap(),
            a.fingerprint_hex()
        );
        a.server_config().unwrap();
    }
}
