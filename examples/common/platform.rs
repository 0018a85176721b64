//! All four services in one process: what `trading` embeds when it is not
//! given the others' addresses, what `platform` runs against real brokers,
//! and what the degradation tests take apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use switchboard::Error;
use switchboard::middleware::Resilience;
use switchboard::middleware::dead_letter::DeadLetterAlert;

use super::auth_keys::KeySource;
use super::auth_service::{AuthConfig, AuthService};
use super::brokers::Brokers;
use super::database::Database;
use super::game_service::{GameConfig, GameService};
use super::market_service::MarketService;
use super::session::Addresses;
use super::trading_service::{TradingConfig, TradingService};

fn any_port() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

/// The four services, running.
#[derive(Debug)]
pub struct Platform {
    pub auth: AuthService,
    pub market: MarketService,
    pub game: GameService,
    pub trading: TradingService,
}

impl Platform {
    /// Starts Auth, Market, Game and Trading on free loopback ports, each
    /// with its tables in `database`.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        resilience: &Resilience,
        alert: Option<Arc<dyn DeadLetterAlert>>,
    ) -> Result<Self, Error> {
        let mut auth_config = AuthConfig::in_memory(any_port());
        if let Some(dir) = database.auth_keys_dir() {
            auth_config.keys = KeySource::Dir(dir);
        }
        let auth = AuthService::start(brokers, database, auth_config).await?;
        let market = MarketService::start(brokers, database, any_port()).await?;
        let game = GameService::start(
            brokers,
            database,
            GameConfig {
                http: any_port(),
                market_http: market.addrs().http,
                market_transfer: market.addrs().transfer,
                auth_grpc: auth.addrs().grpc,
                auth_trust_anchor_pem: auth.trust_anchor_pem(),
                resilience: resilience.clone(),
                alert,
            },
        )
        .await?;
        let trading = TradingService::start(
            brokers,
            database,
            TradingConfig {
                http: any_port(),
                market_grpc: market.addrs().grpc,
                auth_trust_anchor_pem: auth.trust_anchor_pem(),
                resilience: resilience.clone(),
            },
        )
        .await?;
        Ok(Self {
            auth,
            market,
            game,
            trading,
        })
    }

    /// Where the four HTTP APIs are.
    pub fn addresses(&self) -> Addresses {
        Addresses {
            auth: self.auth.addrs().http,
            trading: self.trading.addr(),
            market: self.market.addrs().http,
            game: self.game.addr(),
        }
    }

    /// Prints each service's operator console URL and token.
    pub fn print_consoles(&self) {
        for (name, url, token) in [
            ("auth", self.auth.console_url(), self.auth.console_token()),
            (
                "market",
                self.market.console_url(),
                self.market.console_token(),
            ),
            ("game", self.game.console_url(), self.game.console_token()),
            (
                "trading",
                self.trading.console_url(),
                self.trading.console_token(),
            ),
        ] {
            println!("console  {name:<8}{url}  (operator token {token})");
        }
    }

    /// Stops everything, draining the consumers.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.trading.shutdown().await?;
        self.game.shutdown().await?;
        self.market.shutdown().await?;
        self.auth.shutdown().await
    }
}
