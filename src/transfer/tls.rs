//! TLS for file transfer: rustls on aws-lc-rs, with ALPN `h2`.
//!
//! The configs come from [`crate::tls`], which passes the aws-lc-rs provider
//! explicitly (see there why); this module only adds the ALPN `h2` that the
//! transfer requires.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Error, ErrorKind};

/// The ALPN protocol id of HTTP/2 over TLS.
pub(super) const H2: &[u8] = b"h2";

/// A server config for [`TransferServer::serve_tls`] from a certificate
/// chain and its private key: aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2`.
///
/// [`TransferServer::serve_tls`]: super::TransferServer::serve_tls
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, Error> {
    crate::tls::server_config(cert_chain, key, &[H2])
}

/// A client config for an `https://` [`TransferClient`] (given to
/// [`TransferClientBuilder::tls_config`]) that trusts `roots`: aws-lc-rs,
/// TLS 1.2 and 1.3, ALPN `h2`.
///
/// [`TransferClient`]: super::TransferClient
/// [`TransferClientBuilder::tls_config`]: super::TransferClientBuilder::tls_config
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, Error> {
    crate::tls::client_config(roots, &[H2])
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
