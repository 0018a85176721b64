//! TLS with rustls on one crypto provider, aws-lc-rs, for every transport.
//!
//! Why one provider, and why explicitly: rustls can be built with several
//! crypto providers, and Cargo unifies features across the whole dependency
//! graph. When two are compiled in (say aws-lc-rs from reqwest and ring from
//! some other crate) rustls cannot infer which one to use and
//! `ClientConfig::builder()` panics with "no process-level CryptoProvider".
//! This crate therefore
//!
//! - turns on aws-lc-rs, and only aws-lc-rs, in every dependency that does
//!   TLS or signatures (rustls, tokio-rustls, tonic, reqwest, lapin,
//!   jsonwebtoken) — `scripts/test` fails the build when `ring` appears in
//!   `cargo tree --all-features`;
//! - passes the provider to every config it builds itself
//!   ([`server_config`], [`client_config`]), so those never consult the
//!   process default;
//! - offers [`install_default_provider`] for the libraries that do consult
//!   the process default (tonic's server TLS, lapin's connector): the
//!   transports call it before they build such a config, and an application
//!   that builds its own rustls configs may call it first thing in `main`.
//!
//! Certificates and keys are read from PEM ([`certificates_from_pem`],
//! [`private_key_from_pem`], [`root_store_from_pem`]), the format every CA
//! tool and Kubernetes secret hands out.

use std::io;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Error, ErrorKind};

/// The crypto provider this crate uses everywhere: aws-lc-rs with its
/// default cipher suites and key exchange groups.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as rustls' process-wide default provider unless one is
/// installed already, and returns the default now in force. Idempotent and
/// cheap; safe to call from many threads.
///
/// A provider the application installed before stays in force: this crate
/// never replaces a choice made on purpose.
///
/// ```
/// let provider = switchboard::tls::install_default_provider();
/// assert!(std::sync::Arc::ptr_eq(
///     &provider,
///     &switchboard::tls::install_default_provider(),
/// ));
/// ```
pub fn install_default_provider() -> Arc<CryptoProvider> {
    if let Some(installed) = CryptoProvider::get_default() {
        return installed.clone();
    }
    // Losing a race to another thread is fine: whichever won is installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default()
        .expect("a rustls crypto provider was just installed")
        .clone()
}

/// Every certificate in a PEM document (a chain: leaf first), refusing a
/// document with none.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error("certificate", error))?;
    if certificates.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            "TLS: the PEM holds no CERTIFICATE block",
        ));
    }
    Ok(certificates)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM document.
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| pem_error("private key", error))
}

/// A root store trusting every certificate in a PEM document: the CA (or
/// CAs) that signed the servers a client talks to.
pub fn root_store_from_pem(pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates_from_pem(pem)? {
        roots.add(certificate).map_err(config_error)?;
    }
    Ok(roots)
}

/// A server config on aws-lc-rs, TLS 1.2 and 1.3, no client certificates,
/// offering the ALPN protocols given in order of preference (for example
/// `[b"h2", b"http/1.1"]`).
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config on aws-lc-rs, TLS 1.2 and 1.3, trusting exactly `roots`
/// and offering the ALPN protocols given.
pub fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS failure of rustls' own (an untrusted or mismatched certificate, a
/// refused handshake) somewhere in `error`'s causes, described. Such a
/// failure does not pass by trying again, unlike a reset connection.
#[cfg_attr(
    not(any(feature = "grpc-tls", feature = "http-tls", feature = "amqp-tls")),
    allow(dead_code)
)]
pub(crate) fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // `io::Error::source` skips the error it wraps; look at it directly.
        if let Some(found) = error
            .downcast_ref::<io::Error>()
            .and_then(|error| error.get_ref())
            .and_then(|inner| tls_failure(inner))
        {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

fn pem_error(what: &str, error: rustls::pki_types::pem::Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("TLS: no readable {what} in the PEM: {error}"),
    )
}

fn config_error(error: rustls::Error) -> Error {
    Error::new(ErrorKind::Config, format!("TLS configuration: {error}")).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_certificates_is_a_config_error() {
        let error = certificates_from_pem(b"not a pem").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        let error = private_key_from_pem(b"").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
    }

    #[test]
    fn a_rustls_error_inside_an_io_error_is_found() {
        let wrapped = io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let found = tls_failure(&wrapped).expect("the rustls error is found");
        assert!(found.contains("UnknownIssuer"), "{found}");
        assert_eq!(tls_failure(&io::Error::other("reset")), None);
    }
}
