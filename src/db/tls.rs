//! TLS to Postgres (rustls), with libpq's meaning of `sslmode` and one addition.
//!
//! - `sslmode=disable`: no TLS.
//! - `sslmode=prefer` (the default) and `require`: TLS when the server offers it (required
//!   with `require`), without verifying the server's certificate, exactly as libpq does:
//!   the link is encrypted, the server is not authenticated.
//! - `RELAY_DATABASE_CA_FILE=<pem>` (or `system` for the system's roots): the server's
//!   certificate must chain to those roots and name the host connected to (libpq's
//!   `verify-full`). Set it in production.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("RELAY_DATABASE_CA_FILE {path}: {error}")]
    CaFile { path: String, error: String },
    #[error("RELAY_DATABASE_CA_FILE {0} holds no certificate")]
    NoCertificate(String),
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The connector every relay connection uses. `ca`: `None` (encrypt without verifying,
/// libpq's `prefer`/`require`), `Some("system")`, or `Some(<path of a PEM bundle>)`.
pub fn connector(ca: Option<&str>) -> Result<MakeRustlsConnect, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match ca {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
        Some(ca) => builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn roots(ca: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    if ca == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError::NoCertificate("system".into()));
        }
        return Ok(roots);
    }
    let bad = |error: String| TlsError::CaFile {
        path: ca.to_owned(),
        error,
    };
    for certificate in
        CertificateDer::pem_file_iter(Path::new(ca)).map_err(|e| bad(e.to_string()))?
    {
        roots
            .add(certificate.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate(ca.to_owned()));
    }
    Ok(roots)
}

/// libpq's `sslmode=require` without a root certificate: any server certificate is
/// accepted, but the handshake's signatures are still checked, so the session is
/// encrypted end to end with whoever answered.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
