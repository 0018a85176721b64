//! One crypto provider for every dependency: with all TLS features on, every
//! library that does TLS or signatures works in one process without anyone
//! having installed a provider first — which rustls only allows when exactly
//! one provider (aws-lc-rs) is compiled in. A second one (ring) sneaking in
//! through a dependency's default features makes this test panic with "no
//! process-level CryptoProvider"; `scripts/test` also refuses `ring` in
//! `cargo tree`.
//!
//! Its own test binary, so no other test has installed a provider before.

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Claims {
    sub: String,
    exp: u64,
}

fn kx_group_names(provider: &CryptoProvider) -> Vec<String> {
    provider
        .kx_groups
        .iter()
        .map(|group| format!("{:?}", group.name()))
        .collect()
}

#[tokio::test]
async fn every_tls_library_works_in_one_process_on_aws_lc_rs() {
    assert!(
        CryptoProvider::get_default().is_none(),
        "nothing has installed a provider yet"
    );

    // rustls infers the provider from its crate features: this panics when
    // more than one is compiled in.
    let _ = rustls::ClientConfig::builder();
    let inferred = CryptoProvider::get_default().expect("rustls installed the inferred provider");
    // aws-lc-rs offers the post-quantum X25519MLKEM768 group, ring does not.
    let aws_lc_rs = rustls::crypto::aws_lc_rs::default_provider();
    assert_eq!(kx_group_names(inferred), kx_group_names(&aws_lc_rs));
    assert!(
        kx_group_names(inferred)
            .iter()
            .any(|name| name.contains("MLKEM")),
        "{:?}",
        kx_group_names(inferred)
    );
    // Ours is idempotent and leaves the one in force.
    let installed = switchboard::tls::install_default_provider();
    assert!(std::sync::Arc::ptr_eq(&installed, inferred));

    // reqwest: its own default client, and ours with a preconfigured config.
    reqwest::Client::builder()
        .build()
        .expect("reqwest's default client");
    switchboard::transport::http::tls_client(rustls::RootCertStore::empty())
        .expect("an HTTPS client");

    // tonic: client and server TLS configs.
    let endpoint = tonic::transport::Endpoint::from_static("https://localhost:1")
        .tls_config(tonic::transport::ClientTlsConfig::new().domain_name("localhost"))
        .expect("tonic client TLS");
    drop(endpoint.connect_lazy());
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(
                certified.cert.pem(),
                certified.signing_key.serialize_pem(),
            ),
        ))
        .expect("tonic server TLS");

    // jsonwebtoken signs and verifies on its aws-lc-rs backend.
    let claims = Claims {
        sub: "player-1".into(),
        exp: 4_102_444_800,
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"secret"),
    )
    .expect("jsonwebtoken signs");
    let decoded = jsonwebtoken::decode::<Claims>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"secret"),
        &jsonwebtoken::Validation::default(),
    )
    .expect("jsonwebtoken verifies");
    assert_eq!(decoded.claims, claims);
}
