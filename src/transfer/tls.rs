//! TLS for file transfer: rustls on aws-lc-rs, with ALPN `h2`.
//!
//! The crypto provider is passed to every config explicitly instead of
//! relying on rustls' process-wide default: with two providers compiled in
//! (Cargo unifies features across the dependency graph) the default cannot be
//! inferred and `ClientConfig::builder()` panics. aws-lc-rs is the one
//! provider this crate uses everywhere.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Error, ErrorKind};

/// The ALPN protocol id of HTTP/2 over TLS.
pub(super) const H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config for [`TransferServer::serve_tls`] from a certificate
/// chain and its private key: aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2`.
///
/// [`TransferServer::serve_tls`]: super::TransferServer::serve_tls
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_config_error)?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .map_err(tls_config_error)?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client config for [`TransferClient::connect_tls`] that trusts `roots`:
/// aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2`.
///
/// [`TransferClient::connect_tls`]: super::TransferClient::connect_tls
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_config_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// Refuses a config that does not offer `h2`: without it the peer may fall
/// back to HTTP/1.1, which this transport does not speak.
pub(super) fn require_h2(alpn: &[Vec<u8>]) -> Result<(), Error> {
    if alpn.iter().any(|protocol| protocol == H2) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            "the TLS config must offer ALPN \"h2\" (see transfer::tls::server_config / client_config)",
        ))
    }
}

fn tls_config_error(error: rustls::Error) -> Error {
    Error::new(ErrorKind::Config, format!("TLS configuration: {error}")).with_source(error)
}
