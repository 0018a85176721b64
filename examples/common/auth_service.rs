//! Auth: registers users, publishes `user.registered`, issues tokens signed
//! with its own Ed25519 private key, and answers user lookups over gRPC.
//!
//! strategy §2 row and column: nobody calls Auth synchronously except Game's
//! user lookup (📞 Game → Auth); everyone else trusts its tokens by checking
//! the signature locally with the public key (✉ Auth → Game), so Auth being
//! down stops new logins but not existing sessions (§4.2).
//!
//! HTTP: `POST /v1/users`, `POST /v1/tokens`, `GET /v1/public-key`,
//! `GET /health`. gRPC: `auth.v1.Users/GetUser`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use switchboard::auth::TokenVerifier;
use switchboard::outbox::RelayHandle;
use switchboard::transport::grpc::status_from_error;
use switchboard::transport::http::{ErrorResponse, JsonBody};
use switchboard::{Error, ErrorKind, EventBus};
use tonic::{Request, Response, Status};

use super::auth_store::{AuthStore, User};
use super::brokers::Brokers;
use super::database::{Database, close_relays, spawn_relays};
use super::domain::UserRegistered;
use super::net::{Server, bind, stop_all};
use super::proto::auth as pb;

/// The `iss` of every token Auth signs.
pub const ISSUER: &str = "auth-service";
/// How long a token is good for.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Registered {
    pub user_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Token {
    pub token: String,
    pub expires_in_s: u64,
}

#[derive(Serialize)]
struct TokenClaims<'a> {
    sub: &'a str,
    iss: &'a str,
    iat: u64,
    exp: u64,
    name: &'a str,
}

struct AuthState {
    store: AuthStore,
    signing_key: EncodingKey,
    public_key_pem: String,
    /// For `/health`: where the relay sends user.registered.
    bus: EventBus,
}

fn password_hash(user_id: &str, password: &str) -> String {
    // Salted with the user id; a real Auth uses argon2. Enough for the demo.
    let digest: [u8; 32] = Sha256::new()
        .chain_update(user_id.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .finalize()
        .into();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl AuthState {
    async fn register(&self, credentials: Credentials) -> Result<Registered, Error> {
        if credentials.username.is_empty() || credentials.password.len() < 8 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "a username and a password of at least 8 characters are required",
            ));
        }
        let user_id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now();
        let user = User {
            password_sha256: password_hash(&user_id, &credentials.password),
            user_id: user_id.clone(),
            username: credentials.username.clone(),
            registered_unix_ms: now.timestamp_millis(),
        };
        // The user and user.registered commit together (a taken name
        // refuses both).
        let event = UserRegistered {
            user_id: user_id.clone(),
            username: credentials.username,
            registered_at: now,
        };
        self.store.register(&user, event, false).await?;
        Ok(Registered { user_id })
    }

    async fn issue(&self, credentials: &Credentials) -> Result<Token, Error> {
        let refused = || Error::new(ErrorKind::Unauthorized, "wrong username or password");
        let user = self
            .store
            .by_name(&credentials.username)
            .await?
            .ok_or_else(refused)?;
        if user.password_sha256 != password_hash(&user.user_id, &credentials.password) {
            return Err(refused());
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = TokenClaims {
            sub: &user.user_id,
            iss: ISSUER,
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
            name: &user.username,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.signing_key)
                .map_err(|error| Error::new(ErrorKind::Encode, format!("signing: {error}")))?;
        Ok(Token {
            token,
            expires_in_s: TOKEN_LIFETIME.as_secs(),
        })
    }

    async fn lookup(&self, user_id: &str) -> Result<pb::User, Error> {
        let user = self
            .store
            .by_id(user_id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no user {user_id}")))?;
        Ok(pb::User {
            user_id: user.user_id,
            username: user.username,
            registered_unix_ms: user.registered_unix_ms,
        })
    }
}

/// A new Ed25519 key pair: (private PKCS#8 PEM, public SPKI PEM). Auth
/// stores the first it makes and uses the stored one from then on (tokens
/// outlive a restart); a real deployment keeps it in a secret store.
fn key_pair() -> Result<(String, String), Error> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|error| Error::new(ErrorKind::Config, format!("key generation: {error}")))?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

/// Where Auth listens.
#[derive(Debug, Clone, Copy)]
pub struct AuthAddrs {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// A running Auth service.
pub struct AuthService {
    state: Arc<AuthState>,
    http: Option<Server>,
    grpc: Option<Server>,
    addrs: AuthAddrs,
    relays: Vec<RelayHandle>,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl AuthService {
    /// Starts Auth on `database` (its tables created if missing): HTTP on
    /// `http`, gRPC on any free port, the relay of its `user.registered`
    /// events.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        http: SocketAddr,
    ) -> Result<Self, Error> {
        let store = AuthStore::open(database, brokers).await?;
        let (private_pem, public_key_pem) = store.key_pair(key_pair()?).await?;
        // Building a verifier installs jsonwebtoken's crypto provider, which
        // signing needs too; it also proves the pair is usable.
        TokenVerifier::ed25519_pem(public_key_pem.as_bytes(), ISSUER)?;
        let signing_key = EncodingKey::from_ed_pem(private_pem.as_bytes())
            .map_err(|error| Error::new(ErrorKind::Config, format!("signing key: {error}")))?;
        let state = Arc::new(AuthState {
            store: store.clone(),
            signing_key,
            public_key_pem,
            bus: brokers.events("auth-service"),
        });
        let http_listener = bind(http).await?;
        let grpc_listener = bind(SocketAddr::new(http.ip(), 0)).await?;
        let addrs = AuthAddrs {
            http: http_listener.local_addr().map_err(io)?,
            grpc: grpc_listener.local_addr().map_err(io)?,
        };
        let mut service = Self {
            state,
            http: None,
            grpc: None,
            addrs,
            relays: spawn_relays(store.store(), brokers.events.clone(), None),
        };
        service.serve(http_listener, grpc_listener);
        Ok(service)
    }

    fn serve(&mut self, http: tokio::net::TcpListener, grpc: tokio::net::TcpListener) {
        self.http = Some(Server::http(http, router(self.state.clone(), self.addrs)));
        let users = pb::users_server::UsersServer::new(UsersGrpc(self.state.clone()));
        self.grpc = Some(Server::grpc(grpc, tonic::service::Routes::new(users)));
    }

    /// Restores a user under a known id (an operator's repair, as from a
    /// backup) and publishes `user.registered` for it.
    pub async fn restore_user(&self, user_id: &str, username: &str) -> Result<(), Error> {
        let now = Utc::now();
        let user = User {
            user_id: user_id.to_owned(),
            username: username.to_owned(),
            // No password matches: the user must reset it.
            password_sha256: String::new(),
            registered_unix_ms: now.timestamp_millis(),
        };
        let event = UserRegistered {
            user_id: user_id.to_owned(),
            username: username.to_owned(),
            registered_at: now,
        };
        self.state.store.register(&user, event, true).await
    }

    /// Where it listens.
    pub fn addrs(&self) -> AuthAddrs {
        self.addrs
    }

    /// The public key tokens are checked with.
    pub fn public_key_pem(&self) -> &str {
        &self.state.public_key_pem
    }

    /// Takes both servers down (the users stay in the database, the relay
    /// keeps sending).
    pub async fn stop(&mut self) {
        stop_all(self.http.take().into_iter().chain(self.grpc.take())).await;
    }

    /// Serves again on the same ports.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        let http = bind(self.addrs.http).await?;
        let grpc = bind(self.addrs.grpc).await?;
        self.serve(http, grpc);
        Ok(())
    }

    /// Stops the servers and the relay.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        close_relays(&mut self.relays).await
    }
}

fn io(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Connection, error.to_string())
}

fn router(state: Arc<AuthState>, addrs: AuthAddrs) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(state): State<Arc<AuthState>>| async move {
                super::brokers::health_response(&[&state.bus])
            }),
        )
        .route(
            "/v1/endpoints",
            get(move || async move { Json(serde_json::json!({ "grpc": addrs.grpc.to_string() })) }),
        )
        .route(
            "/v1/public-key",
            get(|State(state): State<Arc<AuthState>>| async move { state.public_key_pem.clone() }),
        )
        .route(
            "/v1/users",
            post(
                |State(state): State<Arc<AuthState>>,
                 JsonBody(credentials): JsonBody<Credentials>| async move {
                    state
                        .register(credentials)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .route(
            "/v1/tokens",
            post(
                |State(state): State<Arc<AuthState>>,
                 JsonBody(credentials): JsonBody<Credentials>| async move {
                    state
                        .issue(&credentials)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .with_state(state)
}

struct UsersGrpc(Arc<AuthState>);

#[tonic::async_trait]
impl pb::users_server::Users for UsersGrpc {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.0
            .lookup(&request.into_inner().user_id)
            .await
            .map(Response::new)
            .map_err(|error| status_from_error(&error))
    }
}
