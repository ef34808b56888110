//! QUIC client setup: TLS 1.3 only (rustls with the ring provider), the
//! aggregator pinned by the SHA-256 fingerprint of its certificate, and
//! keepalive that survives minutes of local training.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedge_proto::tls::{Pin, PinVerifier};

/// ALPN protocol id spoken by fedge.
pub const ALPN: &[u8] = b"fedge/1";

/// How the device decides to trust the aggregator.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Accept only a certificate with this SHA-256 fingerprint.
    Pinned([u8; 32]),
    /// Trust-on-first-use: pin whatever certificate is seen first and store
    /// its fingerprint at `path`; later connections must match it.
    FirstUse { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("fingerprint must be 64 hex digits (SHA-256 of the aggregator certificate), got `{0}`")]
    BadFingerprint(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot store pinned fingerprint at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parse a fingerprint written as hex (colons allowed).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TransportError> {
    let clean: String = s.trim().chars().filter(|c| *c != ':').collect();
    hex::decode(&clean)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| TransportError::BadFingerprint(s.trim().to_string()))
}

pub use fedge_proto::tls::fingerprint;

/// The aggregator's pin: fixed, or taken from the first certificate seen
/// and stored at `store` (trust on first use).
#[derive(Debug)]
struct DevicePin {
    pin: Mutex<Option<[u8; 32]>>,
    store: Option<PathBuf>,
}

impl Pin for DevicePin {
    fn check(&self, got: [u8; 32]) -> Result<(), rustls::Error> {
        let mut pin = self.pin.lock().expect("pin lock");
        match *pin {
            Some(p) if p == got => Ok(()),
            Some(p) => Err(rustls::Error::General(format!(
                "aggregator certificate fingerprint {} does not match the pinned {}",
                hex::encode(got),
                hex::encode(p)
            ))),
            None => {
                if let Some(path) = &self.store {
                    fedge_proto::io::write_atomic(path, hex::encode(got).as_bytes(), None)
                        .map_err(|e| rustls::Error::General(format!("storing pin: {e}")))?;
                }
                tracing::warn!(
                    fingerprint = %hex::encode(got),
                    "trust on first use: pinned the aggregator's certificate"
                );
                *pin = Some(got);
                Ok(())
            }
        }
    }
}

/// Timing of the QUIC connection.
#[derive(Clone, Debug)]
pub struct QuicTiming {
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
}

impl Default for QuicTiming {
    fn default() -> Self {
        QuicTiming {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A client QUIC endpoint for `peer`'s address family on an ephemeral
/// port, its socket buffers enlarged to `buffer_bytes` each way as far as
/// the kernel allows: one for many devices in one process (a simulation;
/// see `DriverConfig::endpoint`), whose packets then share the socket.
/// Needs a tokio runtime.
pub fn shared_endpoint(
    peer: std::net::SocketAddr,
    buffer_bytes: usize,
) -> std::io::Result<quinn::Endpoint> {
    let any: std::net::SocketAddr = match peer {
        std::net::SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        std::net::SocketAddr::V6(_) => ([0u16; 8], 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // A smaller buffer than asked for only means more loss under load.
    let _ = state.set_recv_buffer_size((&socket).into(), buffer_bytes);
    let _ = state.set_send_buffer_size((&socket).into(), buffer_bytes);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
}

/// Build the quinn client configuration for `trust`.
pub fn client_config(
    trust: &Trust,
    timing: &QuicTiming,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (pin, store) = match trust {
        Trust::Pinned(p) => (Some(*p), None),
        Trust::FirstUse { path } => match std::fs::read_to_string(path) {
            Ok(s) => (Some(parse_fingerprint(&s)?), None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Some(path.clone())),
            Err(source) => {
                return Err(TransportError::Pin {
                    path: path.clone(),
                    source,
                });
            }
        },
    };
    let verifier = Arc::new(PinVerifier::new(
        DevicePin {
            pin: Mutex::new(pin),
            store,
        },
        Arc::clone(&provider),
    ));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(timing.keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(timing.idle_timeout)
            .map_err(|e| TransportError::Tls(e.to_string()))?,
    ));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex64).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
