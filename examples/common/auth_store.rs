//! Auth's tables: its users. (Its signing keys live in its key directory,
//! `auth_keys`.)
//!
//! A registration and its `user.registered` (outbox, relayed to the events
//! broker) commit together: a user Auth knows is a user Game hears of.

use std::sync::Arc;

use sqlx::AssertSqlSafe;
use switchboard::{Error, ErrorKind};

use super::brokers::Brokers;
use super::database::{Database, Store, db_error, is_unique_violation, on_db, open_store};
use super::domain::UserRegistered;

const DDL: &[&str] = &["CREATE TABLE IF NOT EXISTS {p}users (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_sha256 TEXT NOT NULL,
        registered_unix_ms BIGINT NOT NULL)"];

struct Sql {
    insert: String,
    restore: String,
    by_name: String,
    by_id: String,
}

impl Sql {
    fn new(users: &str) -> Self {
        let columns = "user_id, username, password_sha256, registered_unix_ms";
        Self {
            insert: format!("INSERT INTO {users} ({columns}) VALUES ($1, $2, $3, $4)"),
            restore: format!(
                "INSERT INTO {users} ({columns}) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (user_id) DO NOTHING"
            ),
            by_name: format!("SELECT {columns} FROM {users} WHERE username = $1"),
            by_id: format!("SELECT {columns} FROM {users} WHERE user_id = $1"),
        }
    }
}

/// A user as Auth stores them.
#[derive(Debug, Clone)]
pub struct User {
    pub user_id: String,
    pub username: String,
    /// Hex of the salted SHA-256.
    pub password_sha256: String,
    pub registered_unix_ms: i64,
}

type UserRow = (String, String, String, i64);

fn user((user_id, username, password_sha256, registered_unix_ms): UserRow) -> User {
    User {
        user_id,
        username,
        password_sha256,
        registered_unix_ms,
    }
}

/// Auth's users in the database.
#[derive(Clone)]
pub struct AuthStore {
    store: Store,
    sql: Arc<Sql>,
}

impl AuthStore {
    /// Opens (and creates) Auth's tables.
    pub async fn open(database: &Database, brokers: &Brokers) -> Result<Self, Error> {
        let store = open_store(database, brokers, "auth", "auth-service", false, DDL).await?;
        let sql = on_db!(&store, tables => Sql::new(&tables.table("users")));
        Ok(Self {
            store,
            sql: Arc::new(sql),
        })
    }

    /// The underlying tables (for the relay).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores a new user with its `user.registered`, in one transaction;
    /// `restore` keeps an existing user of that id instead of refusing.
    pub async fn register(
        &self,
        user: &User,
        event: UserRegistered,
        restore: bool,
    ) -> Result<(), Error> {
        let sql = &self.sql;
        let statement = if restore { &sql.restore } else { &sql.insert };
        on_db!(&self.store, tables => {
            let mut tx = tables.pool.begin().await.map_err(|e| db_error("begin a registration", e))?;
            sqlx::query(AssertSqlSafe(statement.as_str()))
                .bind(&user.user_id)
                .bind(&user.username)
                .bind(&user.password_sha256)
                .bind(user.registered_unix_ms)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        Error::new(ErrorKind::Rejected, format!("{} is taken", user.username))
                    } else {
                        db_error("record the user", e)
                    }
                })?;
            tables.events.enqueue_event_keyed(&mut tx, &user.user_id, event).await?;
            tx.commit().await.map_err(|e| db_error("commit the registration", e))
        })
    }

    /// The user named `username`.
    pub async fn by_name(&self, username: &str) -> Result<Option<User>, Error> {
        self.find(&self.sql.by_name, username).await
    }

    /// The user with id `user_id`.
    pub async fn by_id(&self, user_id: &str) -> Result<Option<User>, Error> {
        self.find(&self.sql.by_id, user_id).await
    }

    async fn find(&self, statement: &str, key: &str) -> Result<Option<User>, Error> {
        let row: Option<UserRow> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(statement))
                .bind(key)
                .fetch_optional(&tables.pool)
                .await
                .map_err(|e| db_error("read the user", e))?
        });
        Ok(row.map(user))
    }
}
