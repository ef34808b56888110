//! The server-certificate check devices and leaf aggregators share: TLS
//! 1.3 only, signatures checked by the crypto provider, and the
//! certificate accepted by its SHA-256 fingerprint as a [`Pin`] decides
//! (a fixed fingerprint, or trust on first use). No certificate chain is
//! built: the fingerprint is the whole of the trust.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The SHA-256 fingerprint of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Decides whether a server certificate, by its fingerprint, is the one.
pub trait Pin: std::fmt::Debug + Send + Sync {
    fn check(&self, fingerprint: [u8; 32]) -> Result<(), rustls::Error>;
}

/// A [`ServerCertVerifier`] that leaves the certificate to a [`Pin`].
#[derive(Debug)]
pub struct PinVerifier<P> {
    pin: P,
    provider: Arc<CryptoProvider>,
}

impl<P: Pin> PinVerifier<P> {
    pub fn new(pin: P, provider: Arc<CryptoProvider>) -> Self {
        PinVerifier { pin, provider }
    }
}

impl<P: Pin> ServerCertVerifier for PinVerifier<P> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.pin.check(fingerprint(end_entity.as_ref()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
