//! The identity ledger: one durable record per finAPI user the broker creates, plus an
//! append-only event log, in SQLite (embedded, the default) or PostgreSQL (shared by replicas).
//!
//! The store knows no HTTP and no finAPI wire type. It never holds a token, a password, an
//! e-mail, a phone number or a caller's raw reference: the caller's reference arrives as a keyed
//! digest. Both backends run the same SQL (sqlx binds `$N` positionally on SQLite too), except
//! where PostgreSQL needs row locks to share work between replicas ([`IdentityStore::claim_due`])
//! and in the group commit (`writer.rs`), which writes SQLite through rusqlite.
//! Migrations are versioned per backend in `migrations/sqlite/` and `migrations/postgres/` and
//! applied by [`IdentityStore::connect`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::writer::{
    self, Change, EventRow, IntentOutcome, IntentRow, SqliteWriter, TransitionRow,
};

/// Unix time in milliseconds (UTC); the store's only time type.
pub type Millis = i64;

/// How long a request waits for a pooled connection before the store counts as unavailable:
/// short, so that a dead database answers `503` quickly instead of holding requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long SQLite waits for another writer's lock (another connection or process on the
/// same file) before it reports the database busy.
pub(super) const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The page size, in bytes, of an SQLite ledger the broker creates (`PRAGMA page_size`,
/// sqlite.org/pragma.html#pragma_page_size; SQLite's default is 4096). Each page a commit
/// changes is one write-ahead-log frame, checksummed over all its bytes, and an access session's
/// activation changes about five pages (the record, two of its partial indexes, the event and
/// its index) that hold far fewer bytes than 4096: smaller pages halve that work, while the
/// largest record (about 300 bytes) stays well inside one. An existing file keeps the page size
/// it was created with (WAL mode cannot change it).
const SQLITE_NEW_PAGE_SIZE: u32 = 2048;

/// Group-commit writers on PostgreSQL at most (SQLite has one).
const POSTGRES_WRITERS: usize = 4;

/// How often [`IdentityStore::insert_intent`] retries when the live record it collided with
/// left the live states before it could be read (a deletion racing the insert).
const INSERT_ATTEMPTS: usize = 5;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// How an SQLite ledger's write-ahead log reaches the disk (`identities.sqlite_synchronous`;
/// PostgreSQL ignores it). sqlite.org/pragma.html#pragma_synchronous, in WAL mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteSync {
    /// `synchronous=FULL`: every commit syncs the log before it is answered, so a committed
    /// write survives an OS crash or power loss.
    #[default]
    Full,
    /// `synchronous=FULL` for the commits that hold an intent, `NORMAL` for those that hold
    /// only activations, touches and events: the intents (what guarantees that no finAPI user
    /// exists the ledger does not know) survive power loss as under [`SqliteSync::Full`]; an
    /// activation, touch or event survives the broker's crash, and power loss once the next
    /// synced commit or checkpoint has made the log durable (sqlite.org/wal.html).
    Intents,
    /// `synchronous=NORMAL`: only checkpoints sync; a committed write survives the broker's
    /// crash, but an OS crash or power loss can lose the commits since the last checkpoint.
    Normal,
}

/// The life cycle of a managed finAPI user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityState {
    /// Written before `POST /api/v2/users`; the finAPI user may or may not exist.
    Intent,
    /// The finAPI user exists and may be reused for the caller's reference.
    Active,
    /// Deletion requested or due; the reaper deletes the finAPI user.
    Deleting,
    /// The finAPI user is gone (or was never created).
    Deleted,
}

impl IdentityState {
    /// Every state, in life-cycle order.
    pub const ALL: [IdentityState; 4] = [
        IdentityState::Intent,
        IdentityState::Active,
        IdentityState::Deleting,
        IdentityState::Deleted,
    ];

    /// The stored form: `intent`, `active`, `deleting` or `deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityState::Intent => "intent",
            IdentityState::Active => "active",
            IdentityState::Deleting => "deleting",
            IdentityState::Deleted => "deleted",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        IdentityState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }
}

/// One managed finAPI user, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRecord {
    /// The broker's identity id.
    pub id: Uuid,
    /// The finAPI user id, generated before `POST /api/v2/users` (finAPI treats it
    /// case-insensitively).
    pub finapi_user_id: String,
    /// The caller (API key name) the identity belongs to.
    pub caller: String,
    /// Hex keyed digest (HMAC) of the caller's `clientReference`, never the raw reference;
    /// `None` when the caller sent none (such an identity is never reused).
    pub reference_digest: Option<String>,
    /// Id of the password key the finAPI user's password derives from.
    pub key_id: String,
    /// The finAPI client (config name) that created the user.
    pub finapi_client: String,
    /// Where the identity is in its life cycle.
    pub state: IdentityState,
    /// When the intent was written.
    pub created_at: Millis,
    /// When a session last used the identity (`None` while an intent).
    pub last_session_at: Option<Millis>,
    /// When the identity is due for deletion.
    pub delete_after: Millis,
    /// When the finAPI user was found deleted.
    pub deleted_at: Option<Millis>,
    /// Failed deletion attempts so far.
    pub deletion_attempts: u32,
    /// Short error code of the last failed attempt (the broker's code, never a finAPI message).
    pub last_error: Option<String>,
    /// When the reaper may next work on the identity.
    pub next_attempt_at: Millis,
}

/// An intent, written before `POST /api/v2/users` (state [`IdentityState::Intent`]).
#[derive(Clone, Copy, Debug)]
pub struct NewIdentity<'a> {
    /// The broker's identity id.
    pub id: Uuid,
    /// The finAPI user id about to be created.
    pub finapi_user_id: &'a str,
    /// The caller the identity belongs to.
    pub caller: &'a str,
    /// Hex keyed digest of the caller's reference (never the raw reference), if any.
    pub reference_digest: Option<&'a str>,
    /// Id of the password key the user's password derives from.
    pub key_id: &'a str,
    /// The finAPI client name.
    pub finapi_client: &'a str,
    /// The current time; becomes `created_at` and `next_attempt_at`.
    pub now: Millis,
    /// When the identity becomes due for deletion.
    pub delete_after: Millis,
}

/// What [`IdentityStore::insert_intent`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
// Returned once per insert and matched at once: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Inserted {
    /// The intent was written.
    New,
    /// Nothing was written: this live (intent or active) record already holds the caller's
    /// reference.
    Existing(IdentityRecord),
}

/// What happened to an identity, appended to its event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The finAPI user was created.
    Created,
    /// A session reused the identity.
    Reused,
    /// The finAPI user was deleted.
    Deleted,
    /// A deletion attempt failed.
    DeletionFailed,
    /// An intent turned out never to have become a finAPI user.
    NeverCreated,
}

impl EventKind {
    const ALL: [EventKind; 5] = [
        EventKind::Created,
        EventKind::Reused,
        EventKind::Deleted,
        EventKind::DeletionFailed,
        EventKind::NeverCreated,
    ];

    /// The stored form: `created`, `reused`, `deleted`, `deletion_failed` or `never_created`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Reused => "reused",
            EventKind::Deleted => "deleted",
            EventKind::DeletionFailed => "deletion_failed",
            EventKind::NeverCreated => "never_created",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

/// One entry of an identity's event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEvent {
    /// What happened.
    pub kind: EventKind,
    /// The caller on whose behalf it happened (the reaper's own work names the owner caller).
    pub caller: String,
    /// The request id (`X-Request-Id`) of the request that caused it; `None` for the reaper.
    pub request_id: Option<String>,
    /// When it happened.
    pub at: Millis,
    /// A short code or note (e.g. the error code of a failed deletion); never a finAPI message.
    pub detail: Option<String>,
}

/// An event appended in the same transaction as a state change
/// ([`IdentityStore::activate_logged`], [`IdentityStore::touch_logged`]).
#[derive(Clone, Copy, Debug)]
pub struct ChangeEvent<'a> {
    /// What happened.
    pub kind: EventKind,
    /// The caller on whose behalf it happened.
    pub caller: &'a str,
    /// The request id (`X-Request-Id`) of the request that caused it.
    pub request_id: Option<&'a str>,
    /// When it happened (Unix ms).
    pub at: Millis,
    /// A short code or note when the change applied; never a finAPI message.
    pub detail: Option<&'a str>,
    /// `Some(note)`: the event is appended with this detail when the change did not apply
    /// (the record had left the state the change expects); `None`: it is then not appended.
    pub unchanged_detail: Option<&'a str>,
}

/// The answer when the group-commit writers are gone (they only end with the store, or by a
/// bug): the ledger cannot be written, so requests get `503` rather than hang.
fn writer_gone() -> StoreError {
    StoreError::Unavailable(sqlx::Error::WorkerCrashed)
}

/// Why a store operation failed. No variant's text contains a password from the database URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or used right now (connection refused or lost, pool
    /// timeout after 2 s, I/O error, SQLite file busy, unreadable or not a database). The HTTP
    /// layer answers `503 STORE_UNAVAILABLE`.
    #[error("identity store unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database holds migration `version`, which this binary does not know: it was
    /// migrated by a newer broker. The broker refuses to start rather than misread it.
    #[error(
        "identity store schema is newer than this binary: the database has migration {version}, \
         the newest this binary knows is {known}; run a broker at least as new as the one that \
         migrated it",
        known = latest_known_version()
    )]
    SchemaTooNew {
        /// The newest migration version found in the database.
        version: i64,
    },
    /// Applying the migrations failed (a changed, failed or missing migration).
    #[error("identity store migration failed")]
    Migrate(#[source] MigrateError),
    /// Any other database error (an unexpected constraint, a value that does not decode): a bug
    /// or a hand-edited database, `500` to a caller.
    #[error("identity store error")]
    Other(#[source] sqlx::Error),
    /// `identities.database_url` is not usable; the message says why and never repeats the
    /// URL's password.
    #[error("invalid identities.database_url: {0}")]
    InvalidUrl(String),
}

fn latest_known_version() -> i64 {
    // Both backends carry the same migration versions.
    SQLITE_MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Sorts a database error into "the database is not usable right now" and everything else.
pub(super) fn classify(backend: Backend, error: sqlx::Error) -> StoreError {
    let unavailable = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            match backend {
                // SQLSTATE classes (PostgreSQL appendix A): 08 connection exception, 53
                // insufficient resources, 57P01-57P03 server shutting down or starting, 58
                // system error (I/O).
                Backend::Postgres => {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                        || code.starts_with("58")
                }
                // Primary result codes (sqlite.org/rescode.html) of a file that cannot be used
                // now: PERM 3, BUSY 5, LOCKED 6, NOMEM 7, READONLY 8, IOERR 10, CORRUPT 11,
                // FULL 13, CANTOPEN 14, NOTADB 26. sqlx reports the extended code.
                Backend::Sqlite => code
                    .parse::<i32>()
                    .map(|c| matches!(c & 0xff, 3 | 5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 26))
                    .unwrap_or(false),
            }
        }
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(error)
    } else {
        StoreError::Other(error)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
enum Pool {
    /// SQLite takes one writer at a time. The sessions' writes go to the group-commit writer
    /// thread and its own connection ([`SqliteWriter`]); the migrations and the rare writes
    /// outside the group commit (deletions, the reaper's leases) use `write`, a pool of one
    /// connection, each in its turn with the thread ([`SqliteWriter::turn`]), so that writes
    /// queue in the broker instead of meeting a held lock and sleeping in SQLite's busy
    /// handler. Reads (never blocked under WAL) use `read`.
    Sqlite {
        read: SqlitePool,
        write: SqlitePool,
        writer: SqliteWriter,
    },
    Postgres(PgPool),
}

/// The identity ledger. Cheap to clone (a connection pool and the queue to its group-commit
/// writers inside); every clone shares them.
///
/// The writes of an access session ([`IdentityStore::insert_intent`],
/// [`IdentityStore::activate_logged`], [`IdentityStore::touch_logged`], …) are committed in
/// batches with those of concurrent sessions: one transaction, one multi-row statement per kind,
/// answered only once committed. The other writes (deletions, the reaper's claims) are rare and
/// go straight to the database.
#[derive(Clone)]
pub struct IdentityStore {
    pool: Pool,
    writes: mpsc::UnboundedSender<writer::Request>,
    /// Whether the last group commit answered failed with [`StoreError::Unavailable`] (e.g.
    /// the disk is full: reads still work, so a `SELECT 1` alone would call the ledger up).
    writes_failing: Arc<AtomicBool>,
}

impl fmt::Debug for IdentityStore {
    // Only the backend: nothing derived from the connect options (which hold the password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Runs `$body` with `$pool` bound to whichever pool the store has; the SQL is shared, the
/// driver types differ per arm. Errors are classified for the store's backend.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            Pool::Sqlite { read: $pool, .. } => ($body).map_err(|e| classify(Backend::Sqlite, e)),
            Pool::Postgres($pool) => ($body).map_err(|e| classify(Backend::Postgres, e)),
        }
    };
}

/// Like `with_pool!`, for statements that write: SQLite's sqlx writer connection, in turn with
/// the group-commit writer thread.
macro_rules! with_writer {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            Pool::Sqlite {
                write: $pool,
                writer,
                ..
            } => {
                let _turn = writer.turn().await;
                ($body).map_err(|e| classify(Backend::Sqlite, e))
            }
            Pool::Postgres($pool) => ($body).map_err(|e| classify(Backend::Postgres, e)),
        }
    };
}

/// The record as stored; converted to [`IdentityRecord`] by [`RawRecord::into_record`].
#[derive(Clone, sqlx::FromRow)]
pub(super) struct RawRecord {
    id: String,
    finapi_user_id: String,
    pub(super) caller: String,
    pub(super) reference_digest: Option<String>,
    key_id: String,
    pub(super) finapi_client: String,
    state: String,
    created_at: i64,
    last_session_at: Option<i64>,
    delete_after: i64,
    deleted_at: Option<i64>,
    deletion_attempts: i64,
    last_error: Option<String>,
    next_attempt_at: i64,
}

pub(super) const RECORD_COLUMNS: &str = "id, finapi_user_id, caller, reference_digest, key_id, finapi_client, \
     state, created_at, last_session_at, delete_after, deleted_at, deletion_attempts, last_error, \
     next_attempt_at";

fn decode_error(column: &str, value: &str) -> StoreError {
    StoreError::Other(sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("unexpected value {value:?}").into(),
    })
}

impl RawRecord {
    /// The record from a row of `SELECT {RECORD_COLUMNS}` on the SQLite writer's connection.
    pub(super) fn from_sqlite_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            finapi_user_id: row.get(1)?,
            caller: row.get(2)?,
            reference_digest: row.get(3)?,
            key_id: row.get(4)?,
            finapi_client: row.get(5)?,
            state: row.get(6)?,
            created_at: row.get(7)?,
            last_session_at: row.get(8)?,
            delete_after: row.get(9)?,
            deleted_at: row.get(10)?,
            deletion_attempts: row.get(11)?,
            last_error: row.get(12)?,
            next_attempt_at: row.get(13)?,
        })
    }

    fn into_record(self) -> Result<IdentityRecord, StoreError> {
        let id = Uuid::parse_str(&self.id).map_err(|_| decode_error("id", &self.id))?;
        let state =
            IdentityState::parse(&self.state).ok_or_else(|| decode_error("state", &self.state))?;
        Ok(IdentityRecord {
            id,
            finapi_user_id: self.finapi_user_id,
            caller: self.caller,
            reference_digest: self.reference_digest,
            key_id: self.key_id,
            finapi_client: self.finapi_client,
            state,
            created_at: self.created_at,
            last_session_at: self.last_session_at,
            delete_after: self.delete_after,
            deleted_at: self.deleted_at,
            deletion_attempts: u32::try_from(self.deletion_attempts.max(0)).unwrap_or(u32::MAX),
            last_error: self.last_error,
            next_attempt_at: self.next_attempt_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RawEvent {
    kind: String,
    caller: String,
    request_id: Option<String>,
    at: i64,
    detail: Option<String>,
}

fn records(raw: Vec<RawRecord>) -> Result<Vec<IdentityRecord>, StoreError> {
    raw.into_iter().map(RawRecord::into_record).collect()
}

fn record(raw: Option<RawRecord>) -> Result<Option<IdentityRecord>, StoreError> {
    raw.map(RawRecord::into_record).transpose()
}

/// The reason sqlx gives for refusing `url`, without its password and without sqlx's
/// repeated "error with configuration" prefixes.
fn invalid_url(error: &sqlx::Error, url: &str) -> StoreError {
    let reason = error.to_string().replace("error with configuration: ", "");
    StoreError::InvalidUrl(scrub(reason, url))
}

/// Removes the URL's passwords (user info and a libpq `password=` parameter), raw and
/// percent-decoded, from a message about the URL.
fn scrub(mut message: String, url: &str) -> String {
    for password in url_passwords(url) {
        for form in [password.to_owned(), percent_decode(password)] {
            if !form.is_empty() {
                message = message.replace(&form, "***");
            }
        }
    }
    message
}

/// The passwords in `scheme://user:password@host/…?password=…`.
fn url_passwords(url: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some(at) = authority.rfind('@')
        && let Some((_, password)) = authority[..at].split_once(':')
    {
        found.push(password);
    }
    if let Some(query) = url.split_once('?').map(|(_, q)| q) {
        let query = query.split('#').next().unwrap_or("");
        for pair in query.split('&') {
            if let Some(("password", value)) = pair.split_once('=') {
                found.push(value);
            }
        }
    }
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How often the SQLite write-ahead log is copied back into the database file.
const SQLITE_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Copies the SQLite write-ahead log back into the database file every
/// [`SQLITE_CHECKPOINT_INTERVAL`], on a reading connection, while the store lives. A `PASSIVE`
/// checkpoint never waits for the writer or readers (sqlite.org/c3ref/wal_checkpoint_v2.html), so
/// its fsyncs stay off the sessions' path; the writer restarts the log once it is copied.
async fn checkpoints(read: SqlitePool, store: mpsc::WeakUnboundedSender<writer::Request>) {
    loop {
        tokio::time::sleep(SQLITE_CHECKPOINT_INTERVAL).await;
        if store.upgrade().is_none() || read.is_closed() {
            return;
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&read)
            .await
        {
            tracing::debug!(%error, "ledger checkpoint failed; the next one tries again");
        }
    }
}

impl IdentityStore {
    /// Connects to `url`, checks that the schema is not newer than this binary, and applies
    /// the migrations this binary carries (idempotent; PostgreSQL replicas starting together
    /// serialise on sqlx's advisory lock).
    ///
    /// `url` is `sqlite://PATH` or `sqlite:PATH` (the file is created if missing; WAL journal,
    /// 5 s busy timeout, foreign keys on; in-memory databases are refused because the ledger
    /// must outlive the process), or `postgres://…` / `postgresql://…` (libpq URL syntax, TLS
    /// via `sslmode`; PostgreSQL 12 or newer). `max_connections` bounds the pool (at least 1). A connection is opened
    /// at once, so a database that cannot be reached fails here.
    ///
    /// Errors: [`StoreError::InvalidUrl`] for an unknown scheme, an in-memory SQLite database or
    /// an unparsable URL; [`StoreError::Unavailable`] when the database cannot be reached or
    /// opened; [`StoreError::SchemaTooNew`]; [`StoreError::Migrate`].
    pub async fn connect(url: &SecretString, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with(url, max_connections, SqliteSync::Full).await
    }

    /// [`IdentityStore::connect`] with an SQLite ledger's [`SqliteSync`] (PostgreSQL ignores
    /// it). Errors: as [`IdentityStore::connect`].
    pub async fn connect_with(
        url: &SecretString,
        max_connections: u32,
        sync: SqliteSync,
    ) -> Result<Self, StoreError> {
        let raw = url.expose_secret().trim();
        let max_connections = max_connections.max(1);
        let store = if raw.starts_with("sqlite:") {
            Self::connect_sqlite(raw, max_connections, sync).await?
        } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            Self::connect_postgres(raw, max_connections).await?
        } else {
            return Err(StoreError::InvalidUrl(
                "expected sqlite://PATH, postgres://… or postgresql://…".to_owned(),
            ));
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn connect_sqlite(
        raw: &str,
        max_connections: u32,
        sync: SqliteSync,
    ) -> Result<Self, StoreError> {
        let path = raw.trim_start_matches("sqlite:").trim_start_matches("//");
        if path.is_empty() || path.starts_with(":memory:") || raw.contains("mode=memory") {
            return Err(StoreError::InvalidUrl(
                "an SQLite ledger needs a file (sqlite://PATH); in-memory databases are lost at exit"
                    .to_owned(),
            ));
        }
        // WAL; with synchronous=FULL each commit syncs the log before it is answered, with
        // NORMAL it is only in the OS's page cache (it survives the broker's crash, not the OS's)
        // and only checkpoints sync. No automatic checkpoints: they would run, fsync included,
        // inside the committing writer's COMMIT and stall every session queued behind it;
        // `checkpoints` runs them beside the writer instead.
        let synchronous = match sync {
            // The writer relaxes single batches itself and restores FULL after each.
            SqliteSync::Full | SqliteSync::Intents => SqliteSynchronous::Full,
            SqliteSync::Normal => SqliteSynchronous::Normal,
        };
        let options = SqliteConnectOptions::from_str(raw)
            .map_err(|e| invalid_url(&e, raw))?
            .create_if_missing(true)
            // Before `journal_mode` (sqlx issues it first): it only applies to a file that
            // has no table yet.
            .page_size(SQLITE_NEW_PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("wal_autocheckpoint", "0");
        // The sqlx writer first: it creates the file and sets WAL before the others open it.
        // Its one connection is only ever used by this process, so it is not pinged before each
        // use.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(|e| classify(Backend::Sqlite, e))?;
        let path = options.get_filename().to_owned();
        let read = SqlitePoolOptions::new()
            .max_connections(max_connections.saturating_sub(1).max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| classify(Backend::Sqlite, e))?;
        // One writer: SQLite serialises writers on the file anyway.
        let (writes, writer) = SqliteWriter::spawn(path, sync).await?;
        tokio::spawn(checkpoints(read.clone(), writes.downgrade()));
        Ok(Self {
            pool: Pool::Sqlite {
                read,
                write,
                writer,
            },
            writes,
            writes_failing: Arc::default(),
        })
    }

    async fn connect_postgres(raw: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(raw).map_err(|e| invalid_url(&e, raw))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| classify(Backend::Postgres, e))?;
        // Several writers, so that one batch is collected while another waits for its commit's
        // fsync (PostgreSQL flushes concurrent commits together); half the pool at most.
        let writers = usize::try_from(max_connections.div_ceil(2))
            .unwrap_or(1)
            .min(POSTGRES_WRITERS);
        let writes = writer::spawn_postgres(pool.clone(), writers);
        Ok(Self {
            pool: Pool::Postgres(pool),
            writes,
            writes_failing: Arc::default(),
        })
    }

    /// Refuses a schema newer than this binary, then applies the pending migrations.
    async fn migrate(&self) -> Result<(), StoreError> {
        if let Some(version) = self.newest_applied_migration().await?
            && version > latest_known_version()
        {
            return Err(StoreError::SchemaTooNew { version });
        }
        let result = match &self.pool {
            Pool::Sqlite { write, .. } => SQLITE_MIGRATOR.run(write).await,
            Pool::Postgres(pool) => POSTGRES_MIGRATOR.run(pool).await,
        };
        result.map_err(|e| match e {
            // Another replica may have migrated further between the check and the run.
            MigrateError::VersionMissing(version) if version > latest_known_version() => {
                StoreError::SchemaTooNew { version }
            }
            MigrateError::Execute(e) => match classify(self.backend_kind(), e) {
                unavailable @ StoreError::Unavailable(_) => unavailable,
                StoreError::Other(e) => StoreError::Migrate(MigrateError::Execute(e)),
                other => other,
            },
            e => StoreError::Migrate(e),
        })
    }

    /// The newest version in sqlx's `_sqlx_migrations` table, `None` on a fresh database.
    async fn newest_applied_migration(&self) -> Result<Option<i64>, StoreError> {
        const SQLITE_HAS_TABLE: &str =
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";
        const PG_HAS_TABLE: &str = "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = '_sqlx_migrations'";
        const NEWEST: &str = "SELECT MAX(version) FROM _sqlx_migrations";
        let has_table: i64 = with_pool!(self, |pool| {
            let sql = match self.backend_kind() {
                Backend::Sqlite => SQLITE_HAS_TABLE,
                Backend::Postgres => PG_HAS_TABLE,
            };
            sqlx::query_scalar(sql).fetch_one(pool).await
        })?;
        if has_table == 0 {
            return Ok(None);
        }
        with_pool!(self, |pool| sqlx::query_scalar(NEWEST)
            .fetch_one(pool)
            .await)
    }

    fn backend_kind(&self) -> Backend {
        match self.pool {
            Pool::Sqlite { .. } => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// `"sqlite"` or `"postgres"` (for logs and metrics labels).
    pub fn backend(&self) -> &'static str {
        match self.backend_kind() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// Closes every connection, waiting for those in use. SQLite writes its write-ahead log
    /// back into the database file when the last connection closes, so a stopped broker
    /// leaves one self-contained file.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite {
                read,
                write,
                writer,
            } => {
                read.close().await;
                write.close().await;
                writer.close().await;
            }
            Pool::Postgres(pool) => pool.close().await,
        }
    }

    /// Readiness: the group-commit writers are running, the last group commit did not fail
    /// as unavailable (until one succeeds again; a full disk fails writes, not reads), an SQLite
    /// ledger's file is still the one the broker opened (not removed or replaced), and one
    /// round trip to the database.
    /// Errors: [`StoreError::Unavailable`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        if self.writes.is_closed() {
            return Err(writer_gone());
        }
        if self.writes_failing.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::other("the last group commit failed"),
            )));
        }
        if let Pool::Sqlite { writer, .. } = &self.pool
            && !writer.file_in_place()
        {
            return Err(writer_gone());
        }
        let _: i32 = with_pool!(self, |pool| sqlx::query_scalar("SELECT 1")
            .fetch_one(pool)
            .await)?;
        Ok(())
    }

    /// Writes an intent (state `intent`, `next_attempt_at = now`), before the finAPI user is
    /// created. With a `reference_digest` there is at most one live (intent or active) record
    /// per (caller, finAPI client, digest), enforced by a partial unique index: of any number of concurrent
    /// inserts exactly one gets [`Inserted::New`], the others [`Inserted::Existing`] with the
    /// live record. Without a digest the intent is always new. Appends no event.
    ///
    /// Errors: [`StoreError::Other`] when `id` or `finapi_user_id` (case-insensitively) is
    /// already taken; [`StoreError::Unavailable`].
    pub async fn insert_intent(&self, new: &NewIdentity<'_>) -> Result<Inserted, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("insert_intent");
        for _ in 0..INSERT_ATTEMPTS {
            let row = IntentRow {
                id: new.id.to_string(),
                finapi_user_id: new.finapi_user_id.to_owned(),
                caller: new.caller.to_owned(),
                reference_digest: new.reference_digest.map(str::to_owned),
                key_id: new.key_id.to_owned(),
                finapi_client: new.finapi_client.to_owned(),
                now: new.now,
                delete_after: new.delete_after,
            };
            match self.submit(|tx| writer::Request::Intent(row, tx)).await? {
                IntentOutcome::New => return Ok(Inserted::New),
                IntentOutcome::Existing(live) => {
                    return Ok(Inserted::Existing(live.into_record()?));
                }
                // Only the live-reference index can swallow an insert, so there is a digest.
                IntentOutcome::Gone if new.reference_digest.is_none() => break,
                IntentOutcome::Gone => {}
            }
        }
        // The live record kept leaving the live states between our insert and our read.
        Err(StoreError::Other(sqlx::Error::RowNotFound))
    }

    /// Writes `intents`, none of which may carry a `reference_digest`, as
    /// [`IdentityStore::insert_intent`] would, but queued all at once, so that the group-commit
    /// writer takes them into one batch (one transaction, one synced commit) when it is idle,
    /// and at worst into a few. Answers each intent in its place: `Ok(())` once committed.
    /// Errors per intent: [`StoreError::Other`] for one with a digest (not written), or as
    /// [`IdentityStore::insert_intent`].
    pub async fn insert_intents(&self, intents: &[NewIdentity<'_>]) -> Vec<Result<(), StoreError>> {
        let _span = crate::telemetry::otel::ledger_span!("insert_intents");
        let pending: Vec<Result<oneshot::Receiver<_>, StoreError>> = intents
            .iter()
            .map(|new| {
                if new.reference_digest.is_some() {
                    // A digest needs the conflict handling of `insert_intent`.
                    return Err(StoreError::Other(sqlx::Error::Protocol(
                        "an intent written ahead carries no reference".to_owned(),
                    )));
                }
                let row = IntentRow {
                    id: new.id.to_string(),
                    finapi_user_id: new.finapi_user_id.to_owned(),
                    caller: new.caller.to_owned(),
                    reference_digest: None,
                    key_id: new.key_id.to_owned(),
                    finapi_client: new.finapi_client.to_owned(),
                    now: new.now,
                    delete_after: new.delete_after,
                };
                let (tx, rx) = oneshot::channel();
                self.writes
                    .send(writer::Request::Intent(row, tx))
                    .map_err(|_| writer_gone())?;
                Ok(rx)
            })
            .collect();
        let mut results = Vec::with_capacity(pending.len());
        for rx in pending {
            results.push(match rx {
                Ok(rx) => match rx.await {
                    Ok(result) => {
                        self.note_commit(&result);
                        // Without a digest no live record can take an intent's place.
                        result.map(drop)
                    }
                    Err(_) => Err(writer_gone()),
                },
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Deletes the records `ids` that are still unleased intents: intents the broker wrote
    /// ahead and knows it never sent `POST /api/v2/users` for, so no finAPI user can exist for
    /// them and nothing needs recording (they have no events). A record the reaper holds or
    /// that moved on is left alone. Returns how many were deleted.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn delete_unused_intents(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("delete_unused_intents");
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let placeholders: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "DELETE FROM identities WHERE state = 'intent' AND lease_owner IS NULL \
             AND id IN ({})",
            placeholders.join(", ")
        );
        with_writer!(self, |pool| {
            let mut query = sqlx::query(&sql);
            for id in &ids {
                query = query.bind(id);
            }
            query.execute(pool).await.map(|done| done.rows_affected())
        })
    }

    /// Queues a write for the group-commit writers and waits for its commit.
    async fn submit<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> writer::Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writes.send(request(tx)).map_err(|_| writer_gone())?;
        let result = rx.await.map_err(|_| writer_gone())?;
        self.note_commit(&result);
        result
    }

    /// Remembers whether a group commit failed as unavailable, for [`IdentityStore::ping`]. A
    /// failure for its own reason (one bad row) says nothing about the database.
    fn note_commit<T>(&self, result: &Result<T, StoreError>) {
        let failing = match result {
            Ok(_) => false,
            Err(StoreError::Unavailable(_)) => true,
            Err(_) => return,
        };
        // Read first: the flag's cache line is then only shared, not written, per commit.
        if self.writes_failing.load(Ordering::Relaxed) != failing {
            self.writes_failing.store(failing, Ordering::Relaxed);
        }
    }

    /// A state change with its event, through the group-commit writers.
    async fn transition(
        &self,
        change: Change,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
        event: Option<&ChangeEvent<'_>>,
    ) -> Result<bool, StoreError> {
        let id = id.to_string();
        let row = TransitionRow {
            change,
            event: event.map(|e| EventRow {
                identity_id: id.clone(),
                kind: e.kind,
                caller: e.caller.to_owned(),
                request_id: e.request_id.map(str::to_owned),
                at: e.at,
                detail: e.detail.map(str::to_owned),
            }),
            unchanged_detail: event
                .and_then(|e| e.unchanged_detail)
                .map(|d| Some(d.to_owned())),
            id,
            now,
            delete_after,
        };
        self.submit(|tx| writer::Request::Transition(row, tx)).await
    }

    /// The reusable (intent or active) record for the caller's reference at a finAPI client,
    /// if any.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn find_live(
        &self,
        caller: &str,
        finapi_client: &str,
        reference_digest: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("find_live");
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM identities WHERE caller = $1 AND finapi_client = $2 \
             AND reference_digest = $3 AND state IN ('intent', 'active')"
        );
        let raw = with_pool!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(caller)
            .bind(finapi_client)
            .bind(reference_digest)
            .fetch_optional(pool)
            .await)?;
        record(raw)
    }

    /// The newest record (by `created_at`) of any state for the caller's reference at a finAPI
    /// client, if any.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn find_latest(
        &self,
        caller: &str,
        finapi_client: &str,
        reference_digest: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("find_latest");
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM identities WHERE caller = $1 AND finapi_client = $2 \
             AND reference_digest = $3 ORDER BY created_at DESC, id DESC LIMIT 1"
        );
        let raw = with_pool!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(caller)
            .bind(finapi_client)
            .bind(reference_digest)
            .fetch_optional(pool)
            .await)?;
        record(raw)
    }

    /// The record of a finAPI user id, compared case-insensitively (finAPI user ids are).
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn find_by_finapi_user(
        &self,
        finapi_user_id: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("find_by_finapi_user");
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM identities WHERE lower(finapi_user_id) = lower($1)"
        );
        let raw = with_pool!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(finapi_user_id)
            .fetch_optional(pool)
            .await)?;
        record(raw)
    }

    /// The record with the broker's identity id `id`, if any.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn get(&self, id: Uuid) -> Result<Option<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("get");
        let sql = format!("SELECT {RECORD_COLUMNS} FROM identities WHERE id = $1");
        let id = id.to_string();
        let raw = with_pool!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(&id)
            .fetch_optional(pool)
            .await)?;
        record(raw)
    }

    /// Runs a state change: `sql` with `$1` the identity id and `$2…` the `times`.
    /// Runs an update of one record; returns how many rows it changed (0 or 1).
    async fn update(&self, sql: &str, id: Uuid, times: &[Millis]) -> Result<u64, StoreError> {
        let id = id.to_string();
        with_writer!(self, |pool| {
            let mut query = sqlx::query(sql).bind(&id);
            for time in times {
                query = query.bind(*time);
            }
            query.execute(pool).await.map(|done| done.rows_affected())
        })
    }

    /// `intent` → `active`: the finAPI user exists. Sets `last_session_at = now` and
    /// `delete_after`. Returns `false`, changing nothing, when the record is no longer an intent
    /// (a caller's deletion or the reaper came first). Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Other`].
    pub async fn activate(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
    ) -> Result<bool, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("activate");
        self.transition(Change::Activate, id, now, delete_after, None)
            .await
    }

    /// [`IdentityStore::activate`] and `event` (e.g. `created`) in one transaction: the event
    /// is appended when the record was activated, and also, with `event.unchanged_detail`, when
    /// it was not, if that is set. Returns whether the record was activated.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`] (nothing of it is written).
    pub async fn activate_logged(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
        event: &ChangeEvent<'_>,
    ) -> Result<bool, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("activate");
        self.transition(Change::Activate, id, now, delete_after, Some(event))
            .await
    }

    /// A reused session: `last_session_at = now` and the new `delete_after`, only while the
    /// record is active; returns `false`, changing nothing, when it no longer is (its deletion
    /// began). Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn touch(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
    ) -> Result<bool, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("touch");
        self.transition(Change::Touch, id, now, delete_after, None)
            .await
    }

    /// [`IdentityStore::touch`] and `event` (e.g. `reused`) in one transaction, the event
    /// appended as for [`IdentityStore::activate_logged`]. Returns whether the record was
    /// touched. Errors: [`StoreError::Unavailable`], [`StoreError::Other`] (nothing of it is
    /// written).
    pub async fn touch_logged(
        &self,
        id: Uuid,
        now: Millis,
        delete_after: Millis,
        event: &ChangeEvent<'_>,
    ) -> Result<bool, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("touch");
        self.transition(Change::Touch, id, now, delete_after, Some(event))
            .await
    }

    /// `intent`/`active` → `deleting` (a caller asked, or deletion is due), with
    /// `next_attempt_at = now` so that the reaper picks it up at once. Idempotent: a record
    /// already deleting (its backoff is kept) or deleted is left alone; a lease is kept (the
    /// reaper holding it goes on). Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn mark_deleting(&self, id: Uuid, now: Millis) -> Result<(), StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("mark_deleting");
        self.update(
            "UPDATE identities SET state = 'deleting', next_attempt_at = $2 \
             WHERE id = $1 AND state IN ('intent', 'active')",
            id,
            &[now],
        )
        .await
        .map(drop)
    }

    /// Any state → `deleted`, `deleted_at = now`, lease released. A record already deleted
    /// keeps its first `deleted_at`. Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn mark_deleted(&self, id: Uuid, now: Millis) -> Result<(), StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("mark_deleted");
        self.update(
            "UPDATE identities SET state = 'deleted', deleted_at = COALESCE(deleted_at, $2), \
             lease_owner = NULL, lease_until = NULL WHERE id = $1",
            id,
            &[now],
        )
        .await
        .map(drop)
    }

    /// A failed deletion attempt: `deletion_attempts += 1`, `last_error = code` (a short broker
    /// error code), `next_attempt_at`, lease released; the state is unchanged.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn record_failure(
        &self,
        id: Uuid,
        code: &str,
        next_attempt_at: Millis,
    ) -> Result<(), StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("record_failure");
        let id = id.to_string();
        with_writer!(self, |pool| sqlx::query(
            "UPDATE identities SET deletion_attempts = deletion_attempts + 1, last_error = $2, \
             next_attempt_at = $3, lease_owner = NULL, lease_until = NULL WHERE id = $1"
        )
        .bind(&id)
        .bind(code)
        .bind(next_attempt_at)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        Ok(())
    }

    /// Claims up to `limit` due records for `lease` milliseconds on behalf of `owner` (a
    /// replica id) and returns them. Due means:
    /// - `active` with `delete_after <= now`,
    /// - `deleting` with `next_attempt_at <= now`,
    /// - `intent` with `created_at <= now - orphan_min_age` and `next_attempt_at <= now` (an
    ///   orphan: the request that wrote it never finished),
    ///
    /// and with no lease, or an expired one (`lease_until <= now`). Claimed records get
    /// `lease_owner = owner`, `lease_until = now + lease`; the most overdue go first. No record
    /// is claimed by two owners while a lease runs, across any number of store handles or
    /// replicas: PostgreSQL locks candidate rows with `FOR UPDATE SKIP LOCKED` inside one
    /// `UPDATE … RETURNING`, SQLite runs the same `UPDATE` as one write transaction (writers on
    /// one file are serialised). A dead owner's lease simply expires.
    ///
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn claim_due(
        &self,
        now: Millis,
        orphan_min_age: Millis,
        owner: &str,
        lease: Millis,
        limit: u32,
    ) -> Result<Vec<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("claim_due");
        const DUE: &str = "((state = 'active' AND delete_after <= $3) \
             OR (state = 'deleting' AND next_attempt_at <= $3) \
             OR (state = 'intent' AND created_at <= $4 AND next_attempt_at <= $3)) \
             AND (lease_until IS NULL OR lease_until <= $3)";
        // Most overdue first: each record by the time it became due.
        const ORDER: &str = "ORDER BY CASE WHEN state = 'active' THEN delete_after \
             WHEN state = 'deleting' THEN next_attempt_at \
             WHEN next_attempt_at > created_at + $6 THEN next_attempt_at \
             ELSE created_at + $6 END, id";
        let sql = match self.backend_kind() {
            Backend::Postgres => format!(
                "WITH due AS MATERIALIZED (SELECT id FROM identities WHERE {DUE} {ORDER} \
                 LIMIT $5 FOR UPDATE SKIP LOCKED) \
                 UPDATE identities SET lease_owner = $1, lease_until = $2 \
                 FROM due WHERE identities.id = due.id RETURNING {}",
                RECORD_COLUMNS
                    .split(", ")
                    .map(|c| format!("identities.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Backend::Sqlite => format!(
                "UPDATE identities SET lease_owner = $1, lease_until = $2 \
                 WHERE id IN (SELECT id FROM identities WHERE {DUE} {ORDER} LIMIT $5) \
                 RETURNING {RECORD_COLUMNS}"
            ),
        };
        let orphan_before = now.saturating_sub(orphan_min_age);
        let lease_until = now.saturating_add(lease);
        let raw = with_writer!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(orphan_before)
            .bind(i64::from(limit))
            .bind(orphan_min_age)
            .fetch_all(pool)
            .await)?;
        records(raw)
    }

    /// Releases `owner`'s lease on the record without any other change (e.g. at shutdown); a
    /// lease held by another owner is left alone.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn release(&self, id: Uuid, owner: &str) -> Result<(), StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("release");
        let id = id.to_string();
        with_writer!(self, |pool| sqlx::query(
            "UPDATE identities SET lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2"
        )
        .bind(&id)
        .bind(owner)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        Ok(())
    }

    /// Claims the record `id` for a deletion on behalf of `owner` (one request), as
    /// [`IdentityStore::claim_due`] claims for the reaper: `lease_owner = owner`,
    /// `lease_until = now + lease`, and an `active` record turns `deleting` (`next_attempt_at =
    /// now`, so that the reaper takes it over once the lease expires, should the request die).
    /// Only an `active` or `deleting` record that nobody holds (no lease, or an expired one) is
    /// claimed; returns it as claimed, or `None` when another request or a reaper holds it, or
    /// it is an intent or deleted. One statement, so that of concurrent claims exactly one
    /// wins: SQLite serialises writers on one file, and PostgreSQL re-checks the `WHERE` of an
    /// `UPDATE` that waited for a concurrent one on the row's new version (READ COMMITTED).
    ///
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn claim_for_deletion(
        &self,
        id: Uuid,
        owner: &str,
        now: Millis,
        lease: Millis,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("claim_for_deletion");
        let sql = format!(
            "UPDATE identities SET state = 'deleting', \
             next_attempt_at = CASE WHEN state = 'active' THEN $3 ELSE next_attempt_at END, \
             lease_owner = $2, lease_until = $4 \
             WHERE id = $1 AND state IN ('active', 'deleting') \
             AND (lease_until IS NULL OR lease_until <= $3) \
             RETURNING {RECORD_COLUMNS}"
        );
        let id = id.to_string();
        let raw = with_writer!(self, |pool| sqlx::query_as::<_, RawRecord>(&sql)
            .bind(&id)
            .bind(owner)
            .bind(now)
            .bind(now.saturating_add(lease))
            .fetch_optional(pool)
            .await)?;
        record(raw)
    }

    /// Appends an event to the identity's log. `detail` is a short code or note, never a
    /// finAPI message or anything secret.
    /// Errors: [`StoreError::Other`] when no identity `identity_id` exists (foreign key);
    /// [`StoreError::Unavailable`].
    pub async fn append_event(
        &self,
        identity_id: Uuid,
        kind: EventKind,
        caller: &str,
        request_id: Option<&str>,
        at: Millis,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("append_event");
        let row = EventRow {
            identity_id: identity_id.to_string(),
            kind,
            caller: caller.to_owned(),
            request_id: request_id.map(str::to_owned),
            at,
            detail: detail.map(str::to_owned),
        };
        self.submit(|tx| writer::Request::Event(row, tx)).await
    }

    /// The identity's newest `limit` events, newest first (by time, then by order of
    /// appending). Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn recent_events(
        &self,
        identity_id: Uuid,
        limit: u32,
    ) -> Result<Vec<IdentityEvent>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("recent_events");
        let identity_id = identity_id.to_string();
        let raw = with_pool!(self, |pool| sqlx::query_as::<_, RawEvent>(
            "SELECT kind, caller, request_id, at, detail FROM identity_events \
             WHERE identity_id = $1 ORDER BY at DESC, id DESC LIMIT $2"
        )
        .bind(&identity_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        raw.into_iter()
            .map(|e| {
                Ok(IdentityEvent {
                    kind: EventKind::parse(&e.kind).ok_or_else(|| decode_error("kind", &e.kind))?,
                    caller: e.caller,
                    request_id: e.request_id,
                    at: e.at,
                    detail: e.detail,
                })
            })
            .collect()
    }

    /// The number of records in each state, for metrics: all four states, in life-cycle order,
    /// zero included. Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn counts_by_state(&self) -> Result<Vec<(IdentityState, u64)>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("counts_by_state");
        let rows: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT state, COUNT(*) FROM identities GROUP BY state"
        )
        .fetch_all(pool)
        .await)?;
        let mut counts: Vec<(IdentityState, u64)> =
            IdentityState::ALL.into_iter().map(|s| (s, 0)).collect();
        for (state, count) in rows {
            let state =
                IdentityState::parse(&state).ok_or_else(|| decode_error("state", &state))?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = u64::try_from(count).unwrap_or(0);
            }
        }
        Ok(counts)
    }

    /// The password key ids that records not yet deleted were made with, and how many each:
    /// those keys must stay configured (a reload that drops one is refused).
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn key_ids_in_use(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("key_ids_in_use");
        let rows: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT key_id, COUNT(*) FROM identities WHERE state <> 'deleted' GROUP BY key_id"
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(id, count)| (id, u64::try_from(count).unwrap_or(0)))
            .collect())
    }

    /// For metrics: the earliest `delete_after` at or before `now` of a record not yet deleted
    /// (active or deleting; failed attempts do not make it look younger); `None` when no
    /// deletion is overdue.
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Other`].
    pub async fn oldest_overdue(&self, now: Millis) -> Result<Option<Millis>, StoreError> {
        let _span = crate::telemetry::otel::ledger_span!("oldest_overdue");
        with_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT MIN(delete_after) FROM identities \
             WHERE state IN ('active', 'deleting') AND delete_after <= $1",
            )
            .bind(now)
            .fetch_one(pool)
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_of_a_url_is_found_and_scrubbed_raw_and_decoded() {
        let url = "postgres://user:p%40ss@db.example:5432/ledger?sslmode=require";
        assert_eq!(url_passwords(url), ["p%40ss"]);
        let scrubbed = scrub("bad p%40ss and p@ss".to_owned(), url);
        assert_eq!(scrubbed, "bad *** and ***");
        assert!(url_passwords("postgres://user@host/db").is_empty());
        assert_eq!(
            url_passwords("postgres://host/db?sslmode=require&password=hunter2"),
            ["hunter2"]
        );
    }

    /// A store on a fresh SQLite file in the temp dir, with the file's path (removed by the
    /// caller).
    async fn sqlite_store() -> (IdentityStore, std::path::PathBuf) {
        sqlite_store_with(SqliteSync::Full).await
    }

    /// [`sqlite_store`] with the writer's `sync` setting (`identities.sqlite_synchronous`).
    async fn sqlite_store_with(sync: SqliteSync) -> (IdentityStore, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("giroident-store-unit-{}.db", Uuid::new_v4()));
        let url = SecretString::from(format!("sqlite://{}", path.display()));
        let store = IdentityStore::connect_with(&url, 2, sync)
            .await
            .expect("connects");
        (store, path)
    }

    fn remove_sqlite(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    fn intent(id: Uuid, user: &str) -> NewIdentity<'_> {
        NewIdentity {
            id,
            finapi_user_id: user,
            caller: "demo",
            reference_digest: None,
            key_id: "k1",
            finapi_client: "default",
            now: 1,
            delete_after: 2,
        }
    }

    #[tokio::test]
    async fn intents_written_ahead_commit_together_and_only_unused_unleased_ones_are_deleted() {
        let (store, path) = sqlite_store().await;
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let users: Vec<String> = (0..4).map(|n| format!("gib-ahead-{n}")).collect();
        let mut intents: Vec<NewIdentity<'_>> = ids
            .iter()
            .zip(&users)
            .map(|(id, u)| intent(*id, u))
            .collect();
        let with_digest = NewIdentity {
            reference_digest: Some("d"),
            ..intent(Uuid::now_v7(), "gib-ahead-digest")
        };
        intents.push(with_digest);
        let results = store.insert_intents(&intents).await;
        assert!(results[..4].iter().all(Result::is_ok));
        assert!(matches!(results[4], Err(StoreError::Other(_))));
        assert_eq!(store.counts_by_state().await.unwrap()[0].1, 4);

        // One taken by a session (active), one held by a reaper: those stay.
        assert!(store.activate(ids[0], 5, 10).await.unwrap());
        store
            .claim_due(i64::MAX / 2, 0, "reaper", 1_000, 1)
            .await
            .unwrap();
        let leased = store.get(ids[1]).await.unwrap().unwrap();
        assert_eq!(leased.state, IdentityState::Intent);
        assert_eq!(store.delete_unused_intents(&ids).await.unwrap(), 2);
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(store.get(*id).await.unwrap().is_some(), n < 2, "{n}");
        }
        assert_eq!(store.delete_unused_intents(&[]).await.unwrap(), 0);
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn writes_answer_unavailable_at_once_when_the_writer_is_gone() {
        let (mut store, path) = sqlite_store().await;
        let (closed, _) = mpsc::unbounded_channel();
        store.writes = closed;
        let written = store.insert_intent(&intent(Uuid::new_v4(), "u-1")).await;
        assert!(
            matches!(written, Err(StoreError::Unavailable(_))),
            "{written:?}"
        );
        let ping = store.ping().await;
        assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn a_writer_that_dies_holding_a_write_answers_it_unavailable() {
        let (mut store, path) = sqlite_store().await;
        let (queue, mut taken) = mpsc::unbounded_channel();
        store.writes = queue;
        // A writer that takes the request and dies before committing it.
        let dying = tokio::spawn(async move {
            let request = taken.recv().await;
            drop(request);
            drop(taken);
        });
        let written = store.activate(Uuid::new_v4(), 1, 2).await;
        assert!(
            matches!(written, Err(StoreError::Unavailable(_))),
            "{written:?}"
        );
        dying.await.expect("the stand-in writer ends");
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn the_sqlite_writer_syncs_as_configured_full_by_default() {
        for (sync, expected) in [
            (None, 2),
            (Some(SqliteSync::Full), 2),
            (Some(SqliteSync::Normal), 1),
        ] {
            let path =
                std::env::temp_dir().join(format!("giroident-store-sync-{}.db", Uuid::new_v4()));
            let url = SecretString::from(format!("sqlite://{}", path.display()));
            let store = match sync {
                None => IdentityStore::connect(&url, 2).await,
                Some(sync) => IdentityStore::connect_with(&url, 2, sync).await,
            }
            .expect("connects");
            let Pool::Sqlite { write, writer, .. } = &store.pool else {
                panic!("an SQLite store");
            };
            // sqlite.org/pragma.html#pragma_synchronous: 2 is FULL, 1 is NORMAL.
            assert_eq!(
                writer.synchronous().await,
                Some(expected),
                "writer thread, {sync:?}"
            );
            let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(write)
                .await
                .expect("pragma");
            assert_eq!(level, expected, "direct writes, {sync:?}");
            store.close().await;
            remove_sqlite(&path);
        }
    }

    /// The level `identities.sqlite_synchronous = "intents"` commits each kind of write with.
    #[test]
    fn only_batches_holding_an_intent_need_a_synced_commit() {
        let row = IntentRow {
            id: "i".into(),
            finapi_user_id: "u".into(),
            caller: "demo".into(),
            reference_digest: None,
            key_id: "k1".into(),
            finapi_client: "default".into(),
            now: 1,
            delete_after: 2,
        };
        let event = || EventRow {
            identity_id: "i".into(),
            kind: EventKind::Created,
            caller: "demo".into(),
            request_id: None,
            at: 1,
            detail: None,
        };
        let transition = |change| TransitionRow {
            change,
            id: "i".into(),
            now: 1,
            delete_after: 2,
            event: Some(event()),
            unchanged_detail: None,
        };
        let intent = writer::Request::Intent(row, oneshot::channel().0);
        let activate =
            writer::Request::Transition(transition(Change::Activate), oneshot::channel().0);
        let touch = writer::Request::Transition(transition(Change::Touch), oneshot::channel().0);
        let logged = writer::Request::Event(event(), oneshot::channel().0);
        assert!(writer::needs_sync(&[&intent]));
        assert!(writer::needs_sync(&[&activate, &intent, &logged]));
        assert!(!writer::needs_sync(&[&activate]));
        assert!(!writer::needs_sync(&[&touch]));
        assert!(!writer::needs_sync(&[&logged]));
        assert!(!writer::needs_sync(&[&activate, &touch, &logged]));
    }

    /// The writer thread's connection level, read between batches.
    async fn writer_level(store: &IdentityStore) -> Option<i64> {
        let Pool::Sqlite { writer, .. } = &store.pool else {
            panic!("an SQLite store");
        };
        writer.synchronous().await
    }

    #[tokio::test]
    async fn a_relaxed_batch_leaves_the_writer_at_full() {
        let (store, path) = sqlite_store_with(SqliteSync::Intents).await;
        let id = Uuid::new_v4();
        store
            .insert_intent(&intent(id, "u-1"))
            .await
            .expect("intent");
        assert_eq!(writer_level(&store).await, Some(2), "after a synced batch");
        // Twice: the second relaxed batch of the same kind runs cached statements.
        assert!(store.activate(id, 3, 4).await.expect("activation"));
        assert_eq!(writer_level(&store).await, Some(2), "after a relaxed batch");
        assert!(store.touch(id, 5, 6).await.expect("touch"));
        assert!(store.touch(id, 7, 8).await.expect("touch"));
        assert_eq!(writer_level(&store).await, Some(2), "after relaxed batches");
        let Pool::Sqlite { write, .. } = &store.pool else {
            panic!("an SQLite store");
        };
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(write)
            .await
            .expect("pragma");
        assert_eq!(level, 2, "direct writes commit at FULL");
        store.close().await;
        assert_eq!(writer_level(&store).await, None, "closed with the store");
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn a_batch_of_intents_and_activations_is_split_and_answers_every_write() {
        let (store, path) = sqlite_store_with(SqliteSync::Intents).await;
        let first = Uuid::new_v4();
        store
            .insert_intent(&intent(first, "u-1"))
            .await
            .expect("intent");
        let Pool::Sqlite { writer, .. } = &store.pool else {
            panic!("an SQLite store");
        };
        let second = Uuid::new_v4();
        let (intent_tx, intent_rx) = oneshot::channel();
        let (activation_tx, activation_rx) = oneshot::channel();
        let batch = vec![
            writer::Request::Intent(
                IntentRow {
                    id: second.to_string(),
                    finapi_user_id: "u-2".into(),
                    caller: "demo".into(),
                    reference_digest: None,
                    key_id: "k1".into(),
                    finapi_client: "default".into(),
                    now: 1,
                    delete_after: 2,
                },
                intent_tx,
            ),
            writer::Request::Transition(
                TransitionRow {
                    change: Change::Activate,
                    id: first.to_string(),
                    now: 3,
                    delete_after: 4,
                    event: None,
                    unchanged_detail: None,
                },
                activation_tx,
            ),
        ];
        // The batch as the writer thread takes it from the queue, on its connection.
        let writer = writer.clone();
        tokio::task::spawn_blocking(move || writer.commit(batch))
            .await
            .expect("committed");
        assert!(matches!(intent_rx.await, Ok(Ok(IntentOutcome::New))));
        assert!(matches!(activation_rx.await, Ok(Ok(true))));
        for (id, expected) in [
            (first, IdentityState::Active),
            (second, IdentityState::Intent),
        ] {
            let record = store.get(id).await.expect("read").expect("a record");
            assert_eq!(record.state, expected);
        }
        assert_eq!(writer_level(&store).await, Some(2), "back at FULL");
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn a_batch_that_panics_fails_only_its_own_writes_and_the_writer_goes_on() {
        let (store, path) = sqlite_store().await;
        let Pool::Sqlite { writer, .. } = &store.pool else {
            unreachable!("an SQLite store");
        };
        let id = Uuid::new_v4();
        store
            .insert_intent(&intent(id, "gib-before-the-bug"))
            .await
            .expect("written");
        let (tx, rx) = oneshot::channel();
        let batch = vec![writer::Request::Transition(
            writer::TransitionRow {
                change: writer::Change::Activate,
                id: id.to_string(),
                now: 3,
                delete_after: 4,
                event: None,
                unchanged_detail: None,
            },
            tx,
        )];
        let panicking = writer.clone();
        tokio::task::spawn_blocking(move || panicking.commit_panicking(batch))
            .await
            .expect("the panic stays inside the batch");
        assert!(
            rx.await.is_err(),
            "its requester is answered, not left waiting"
        );
        assert_eq!(
            writer.synchronous().await,
            None,
            "its connection is dropped"
        );
        // The writer thread and a fresh connection take the next writes.
        assert!(store.activate(id, 3, 4).await.expect("activated"));
        assert_eq!(writer_level(&store).await, Some(2));
        store.ping().await.expect("ready");
        store.close().await;
        remove_sqlite(&path);
    }

    /// A full disk fails every write (`SQLITE_FULL`) while reads still work: readiness says
    /// unavailable from the first failed group commit until one succeeds again. The database
    /// is filled with `max_page_count` on the writer's connection (sqlite.org/pragma.html), so
    /// that no disk is filled and no privilege is needed.
    #[tokio::test]
    async fn a_full_ledger_is_unavailable_until_a_write_succeeds_again() {
        let (store, path) = sqlite_store().await;
        let Pool::Sqlite { writer, .. } = &store.pool else {
            unreachable!("an SQLite store");
        };
        store.ping().await.expect("ready");
        // No more pages than the database has now (SQLite keeps it at least that).
        writer.execute("PRAGMA max_page_count = 1").await;
        let mut refused = None;
        for n in 0..10_000 {
            let user = format!("gib-full-{n}");
            if let Err(error) = store.insert_intent(&intent(Uuid::new_v4(), &user)).await {
                refused = Some(error);
                break;
            }
        }
        assert!(
            matches!(refused, Some(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        let ping = store.ping().await;
        assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
        // Space again: the next write commits, and the ledger is ready again.
        writer.execute("PRAGMA max_page_count = 1073741823").await;
        store
            .insert_intent(&intent(Uuid::new_v4(), "gib-after-full"))
            .await
            .expect("written");
        store.ping().await.expect("ready again");
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn a_direct_write_waits_for_its_turn_with_the_writer_thread() {
        let (store, path) = sqlite_store().await;
        let id = Uuid::new_v4();
        store
            .insert_intent(&intent(id, "u-1"))
            .await
            .expect("intent");
        let Pool::Sqlite { writer, .. } = &store.pool else {
            panic!("an SQLite store");
        };
        // Held as the thread holds it while it commits a batch.
        let turn = writer.turn().await;
        let deleting = store.mark_deleting(id, 5);
        tokio::pin!(deleting);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut deleting)
                .await
                .is_err(),
            "the direct write waits while the writer holds its turn"
        );
        drop(turn);
        deleting.await.expect("written once the turn is free");
        let record = store.get(id).await.expect("read").expect("a record");
        assert_eq!(record.state, IdentityState::Deleting);
        store.close().await;
        remove_sqlite(&path);
    }

    #[tokio::test]
    async fn the_writer_thread_answers_unavailable_when_its_file_becomes_unusable() {
        use std::io::Write;
        let (store, path) = sqlite_store().await;
        store
            .insert_intent(&intent(Uuid::new_v4(), "u-1"))
            .await
            .expect("intent");
        // Overwritten in place, as a failing disk or another program might: no valid log, and
        // a first page that is not SQLite's.
        for suffix in ["", "-wal", "-shm"] {
            let file = format!("{}{suffix}", path.display());
            let len = std::fs::metadata(&file).expect("ledger file").len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|mut f| f.write_all(&vec![0x5a; len as usize]))
                .expect("overwritten");
        }
        let written = store.insert_intent(&intent(Uuid::new_v4(), "u-2")).await;
        let Err(StoreError::Unavailable(sqlx::Error::Database(error))) = &written else {
            panic!("unavailable with SQLite's failure: {written:?}");
        };
        // sqlite.org/rescode.html: 26 NOTADB, 11 CORRUPT.
        let code = error
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .unwrap_or(0);
        assert!(matches!(code & 0xff, 11 | 26), "{error}");
        store.close().await;
        remove_sqlite(&path);
    }

    #[test]
    fn states_and_kinds_round_trip_their_stored_form() {
        for state in IdentityState::ALL {
            assert_eq!(IdentityState::parse(state.as_str()), Some(state));
        }
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
    }
}
