//! Group commit for the ledger's per-session writes (intents, activations, touches and
//! events): requests from concurrent sessions queue on a channel, a writer takes every request
//! pending, commits them together in one transaction, and only then answers each requester. A
//! session therefore still learns that its intent is durable before it calls
//! `POST /api/v2/users`, but concurrent sessions share one commit (one SQLite write lock and WAL
//! append, one PostgreSQL `fsync`) instead of taking turns.
//!
//! A batch that fails on a database that is not usable (see `classify`) fails every request in
//! it with [`StoreError::Unavailable`]. A batch that fails otherwise (one bad row, e.g. an event
//! for an unknown identity) is run again one request at a time, so that only the culprit fails.
//! A writer that is gone answers nothing: its requesters see [`StoreError::Unavailable`].
//!
//! PostgreSQL: writer tasks on the sqlx pool, one multi-row statement per kind of write.
//!
//! SQLite: a thread of its own (`ledger-writer`) that owns one connection opened with rusqlite,
//! blocks on the queue, and runs each batch as `BEGIN IMMEDIATE`, one cached prepared statement
//! per row, `COMMIT`. SQLite writes bypass sqlx because sqlx ran them on the connection's worker
//! thread: every batch crossed threads twice (futex wake-ups, context switches), was built as one
//! SQL text per shape of batch and parsed again whenever that shape had left the connection's
//! statement cache, and collected its `RETURNING` rows in temporary tables. With SQLite a
//! statement is a function call, not a round trip, so the writer thread runs per-row statements
//! that are compiled once: an access session costs 15 % fewer instructions (402.7k → 340.2k Ir
//! at `warn`; SQL compilation 14.1k → 0.1k of them; docs/BENCHMARKS.md, "Issue 12 and 15: a
//! writer thread that owns its SQLite connection").
//! Migrations, reads and the rare writes outside the group commit stay on sqlx; those writes
//! take turns with the thread ([`SqliteWriter::turn`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rusqlite::{CachedStatement, Connection, OpenFlags, OptionalExtension, params};
use sqlx::QueryBuilder;
use sqlx::postgres::{PgPool, Postgres};
use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};

use super::store::{
    Backend, RECORD_COLUMNS, RawRecord, SQLITE_BUSY_TIMEOUT, SqliteSync, StoreError, classify,
};
use super::{EventKind, Millis};

/// Most requests in one batch. The largest PostgreSQL statement then binds 128 × 8 values, well
/// below its 65535 parameters.
const MAX_BATCH: usize = 128;

/// Prepared statements the SQLite writer connection keeps (rusqlite's per-connection LRU cache,
/// keyed by the SQL text): the writer runs 9 statements of fixed text, whatever its batches hold.
const WRITER_STATEMENT_CACHE: usize = 16;

/// An intent row ([`super::NewIdentity`], owned).
pub(super) struct IntentRow {
    pub id: String,
    pub finapi_user_id: String,
    pub caller: String,
    pub reference_digest: Option<String>,
    pub key_id: String,
    pub finapi_client: String,
    pub now: Millis,
    pub delete_after: Millis,
}

impl IntentRow {
    /// This intent's values for `INSERT_INTENTS`, in its column order, on either backend.
    fn push_values<'args, DB: sqlx::Database>(
        &'args self,
        b: &mut sqlx::query_builder::Separated<'_, 'args, DB, &'static str>,
    ) where
        &'args str: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
        Option<&'args str>: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
        Millis: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
    {
        b.push_bind(self.id.as_str())
            .push_bind(self.finapi_user_id.as_str())
            .push_bind(self.caller.as_str())
            .push_bind(self.reference_digest.as_deref())
            .push_bind(self.key_id.as_str())
            .push_bind(self.finapi_client.as_str())
            .push("'intent'")
            .push_bind(self.now)
            .push_bind(self.delete_after)
            .push_bind(self.now);
    }
}

/// An event row for `identity_events`.
pub(super) struct EventRow {
    pub identity_id: String,
    pub kind: EventKind,
    pub caller: String,
    pub request_id: Option<String>,
    pub at: Millis,
    pub detail: Option<String>,
}

impl EventRow {
    /// This event's values for `INSERT_EVENTS`, in its column order, on either backend.
    fn push_values<'args, DB: sqlx::Database>(
        &'args self,
        b: &mut sqlx::query_builder::Separated<'_, 'args, DB, &'static str>,
    ) where
        &'args str: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
        Option<&'args str>: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
        Millis: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
    {
        b.push_bind(self.identity_id.as_str())
            .push_bind(self.kind.as_str())
            .push_bind(self.caller.as_str())
            .push_bind(self.request_id.as_deref())
            .push_bind(self.at)
            .push_bind(self.detail.as_deref());
    }
}

/// Which state change a [`TransitionRow`] makes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// `intent` → `active`, `last_session_at` and `delete_after` set.
    Activate,
    /// `last_session_at` and `delete_after` set, while `active`.
    Touch,
}

/// A state change of one record, with the event that reports it.
pub(super) struct TransitionRow {
    pub change: Change,
    pub id: String,
    pub now: Millis,
    pub delete_after: Millis,
    /// Appended when the change applied.
    pub event: Option<EventRow>,
    /// `Some(detail)`: the event is appended with this detail when the change did not apply
    /// too; `None`: only when it applied.
    pub unchanged_detail: Option<Option<String>>,
}

/// One write and where its answer goes.
pub(super) enum Request {
    Intent(
        IntentRow,
        oneshot::Sender<Result<IntentOutcome, StoreError>>,
    ),
    Transition(TransitionRow, oneshot::Sender<Result<bool, StoreError>>),
    Event(EventRow, oneshot::Sender<Result<(), StoreError>>),
}

/// What became of an intent.
pub(super) enum IntentOutcome {
    /// Written.
    New,
    /// Not written: this live record holds the caller's reference (rare: boxed).
    Existing(Box<RawRecord>),
    /// Not written, and the live record it collided with was gone when read (a deletion raced
    /// the insert); the requester tries again.
    Gone,
}

/// A batch's result for one request, in the request's place.
enum Outcome {
    Intent(IntentOutcome),
    Transition(bool),
    Event,
}

/// Whether a batch must be synced before its requesters are answered, i.e. whether it holds a
/// write whose loss in a power failure would lose track of a finAPI user. Only
/// [`SqliteSync::Intents`] asks; the writes that are not sent through this writer
/// (`mark_deleting`, `mark_deleted`, `record_failure`, the reaper's leases) always commit with
/// the connection's FULL.
pub(super) fn needs_sync(writes: &[&Request]) -> bool {
    writes.iter().any(|w| match w {
        // Made durable before `POST /api/v2/users`: without it, power loss could leave a finAPI
        // user the ledger does not know, which nothing would ever delete.
        Request::Intent(..) => true,
        // If power loss drops an activation, the durable intent stays and the reaper's orphan
        // path still deletes the user (README "Durability" says what that costs); a dropped
        // touch leaves the earlier `delete_after`, which the reaper still honours.
        Request::Transition(..) => false,
        // The audit log: no state the reaper or the API decides on.
        Request::Event(..) => false,
    })
}

/// Starts `writers` PostgreSQL writer tasks sharing one queue and returns the queue's sending
/// end. The tasks end when every sender is dropped (the last clone of the store).
pub(super) fn spawn_postgres(pool: PgPool, writers: usize) -> mpsc::UnboundedSender<Request> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..writers.max(1) {
        tokio::spawn(run_postgres_writer(pool.clone(), Arc::clone(&rx)));
    }
    tx
}

async fn run_postgres_writer(pool: PgPool, queue: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
    loop {
        let batch = {
            // One writer at a time takes what is pending; the others commit meanwhile.
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch
        };
        commit_postgres(&pool, batch).await;
    }
}

/// Commits `batch` in one transaction and answers every request in it.
async fn commit_postgres(pool: &PgPool, batch: Vec<Request>) {
    let refs: Vec<&Request> = batch.iter().collect();
    let result = run_postgres(pool, &refs)
        .await
        .map_err(|e| classify(Backend::Postgres, e));
    drop(refs);
    match result {
        Ok(outcomes) => answer_all(batch, outcomes),
        Err(StoreError::Other(_)) if batch.len() > 1 => {
            // One bad row spoils the statement it is in: find it by going one by one.
            for request in batch {
                let result = run_postgres(pool, &[&request])
                    .await
                    .map_err(|e| classify(Backend::Postgres, e))
                    .and_then(single);
                answer(request, result);
            }
        }
        Err(error) => fail_all(batch, error),
    }
}

/// The one outcome of a batch of one request.
fn single(outcomes: Vec<Outcome>) -> Result<Outcome, StoreError> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Other(sqlx::Error::Protocol("write left unanswered".to_owned())))
}

/// Answers each request with its outcome, in order.
fn answer_all(batch: Vec<Request>, outcomes: Vec<Outcome>) {
    for (request, outcome) in batch.into_iter().zip(outcomes) {
        answer(request, Ok(outcome));
    }
}

/// Answers every request of a failed batch: the first requester gets `error` itself, the others
/// an error of the same class (`Unavailable` or `Other`) with its description.
fn fail_all(batch: Vec<Request>, error: StoreError) {
    let unavailable = matches!(error, StoreError::Unavailable(_));
    let mut first = Some(error);
    for request in batch {
        let error = first.take().unwrap_or_else(|| {
            if unavailable {
                StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(
                    "identity store unavailable",
                )))
            } else {
                StoreError::Other(sqlx::Error::Protocol(
                    "identity store batch failed".to_owned(),
                ))
            }
        });
        answer(request, Err(error));
    }
}

/// Sends a result to its requester; a requester that gave up (its request was cancelled) is
/// not waited for.
fn answer(request: Request, result: Result<Outcome, StoreError>) {
    match (request, result) {
        (Request::Intent(_, tx), Ok(Outcome::Intent(outcome))) => {
            let _ = tx.send(Ok(outcome));
        }
        (Request::Transition(_, tx), Ok(Outcome::Transition(changed))) => {
            let _ = tx.send(Ok(changed));
        }
        (Request::Event(_, tx), Ok(Outcome::Event)) => {
            let _ = tx.send(Ok(()));
        }
        (Request::Intent(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Request::Transition(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (Request::Event(_, tx), Err(e)) => {
            let _ = tx.send(Err(e));
        }
        // An outcome of another kind cannot be produced (`run` answers each request in kind);
        // dropping the sender answers "unavailable" rather than a wrong value.
        _ => {}
    }
}

const INSERT_INTENTS: &str = "INSERT INTO identities (id, finapi_user_id, caller, \
     reference_digest, key_id, finapi_client, state, created_at, delete_after, next_attempt_at) ";
const ON_LIVE_REFERENCE: &str = " ON CONFLICT (caller, finapi_client, reference_digest) \
     WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active') DO NOTHING RETURNING id";
const ACTIVATE: &str = "UPDATE identities SET state = 'active', last_session_at = v.column2, \
     delete_after = v.column3 FROM (";
const TOUCH: &str =
    "UPDATE identities SET last_session_at = v.column2, delete_after = v.column3 FROM (";
const INSERT_EVENTS: &str =
    "INSERT INTO identity_events (identity_id, kind, caller, request_id, at, detail) ";

/// Runs one batch on PostgreSQL in one transaction: all intents in one
/// `INSERT … ON CONFLICT DO NOTHING RETURNING`, the activations and the touches in one
/// `UPDATE … FROM (VALUES …)` each, and all events in one `INSERT`; a statement each, since
/// PostgreSQL prepares one statement at a time.
async fn run_postgres(pool: &PgPool, writes: &[&Request]) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut outcomes: Vec<Option<Outcome>> = writes.iter().map(|_| None).collect();
    let mut tx = pool.begin().await?;

    let intents: Vec<(usize, &IntentRow)> = writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            Request::Intent(row, _) => Some((i, row)),
            _ => None,
        })
        .collect();
    if !intents.is_empty() {
        let mut query = QueryBuilder::<Postgres>::new(INSERT_INTENTS);
        query.push_values(&intents, |mut b, (_, row)| row.push_values(&mut b));
        query.push(ON_LIVE_REFERENCE);
        let written: Vec<String> = query
            .build_query_scalar::<String>()
            .fetch_all(&mut *tx)
            .await?;
        let written: HashSet<&str> = written.iter().map(String::as_str).collect();
        let find_live = format!(
            "SELECT {RECORD_COLUMNS} FROM identities WHERE caller = $1 AND finapi_client = $2 \
             AND reference_digest = $3 AND state IN ('intent', 'active')"
        );
        for (i, row) in intents {
            let outcome = if written.contains(row.id.as_str()) {
                IntentOutcome::New
            } else if let Some(digest) = &row.reference_digest {
                // Lost to a live record (of an earlier batch, or earlier in this one).
                sqlx::query_as::<_, RawRecord>(&find_live)
                    .bind(&row.caller)
                    .bind(&row.finapi_client)
                    .bind(digest)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map_or(IntentOutcome::Gone, |r| {
                        IntentOutcome::Existing(Box::new(r))
                    })
            } else {
                IntentOutcome::Gone
            };
            outcomes[i] = Some(Outcome::Intent(outcome));
        }
    }

    let mut events: Vec<&EventRow> = Vec::new();
    let mut unchanged_events: Vec<EventRow> = Vec::new();
    for (change, head, from_state) in [
        (Change::Activate, ACTIVATE, "intent"),
        (Change::Touch, TOUCH, "active"),
    ] {
        let rows: Vec<(usize, &TransitionRow)> = writes
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match w {
                Request::Transition(row, _) if row.change == change => Some((i, row)),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut query = QueryBuilder::<Postgres>::new(head);
        query.push_values(&rows, |mut b, (_, row)| {
            b.push_bind(row.id.as_str())
                .push_bind(row.now)
                .push_bind(row.delete_after);
        });
        query.push(format_args!(
            ") AS v WHERE id = v.column1 AND state = '{from_state}' RETURNING id"
        ));
        let changed: Vec<String> = query
            .build_query_scalar::<String>()
            .fetch_all(&mut *tx)
            .await?;
        let changed: HashSet<&str> = changed.iter().map(String::as_str).collect();
        for (i, row) in rows {
            let applied = changed.contains(row.id.as_str());
            match (&row.event, &row.unchanged_detail) {
                (Some(event), _) if applied => events.push(event),
                (Some(event), Some(detail)) => unchanged_events.push(EventRow {
                    identity_id: event.identity_id.clone(),
                    kind: event.kind,
                    caller: event.caller.clone(),
                    request_id: event.request_id.clone(),
                    at: event.at,
                    detail: detail.clone(),
                }),
                _ => {}
            }
            outcomes[i] = Some(Outcome::Transition(applied));
        }
    }

    for (i, write) in writes.iter().enumerate() {
        if let Request::Event(row, _) = write {
            events.push(row);
            outcomes[i] = Some(Outcome::Event);
        }
    }
    events.extend(unchanged_events.iter());
    if !events.is_empty() {
        let mut query = QueryBuilder::<Postgres>::new(INSERT_EVENTS);
        query.push_values(&events, |mut b, event| event.push_values(&mut b));
        query.build().execute(&mut *tx).await?;
    }

    tx.commit().await?;
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| sqlx::Error::Protocol("write left unanswered".to_owned())))
        .collect()
}

/// The SQLite group-commit writer: the `ledger-writer` thread, and the handle that closes its
/// connection. Cheap to clone.
#[derive(Clone)]
pub(super) struct SqliteWriter {
    /// A tokio mutex: the thread takes it blocking, the store's direct writes wait for it.
    slot: Arc<Mutex<Slot>>,
    /// The ledger's file, for readiness ([`SqliteWriter::file_in_place`]).
    file: LedgerFile,
}

/// A file's device and inode number: which file a path names. Removing the ledger's directory
/// (or replacing its file) does not disturb open SQLite connections: they go on committing into
/// the unlinked file, and every record written from then on vanishes with the process, leaving
/// finAPI users no ledger knows. So the writer checks after each commit that the path still
/// names the file it started with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId(u64, u64);

impl FileId {
    /// The identity of the file at `path`; `None` when there is none.
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Some(Self(meta.dev(), meta.ino()))
        }
        #[cfg(not(unix))]
        {
            // Only whether a file is there.
            let _ = meta;
            Some(Self(0, 0))
        }
    }
}

/// The ledger's path and the file it named when the writer started.
#[derive(Clone)]
struct LedgerFile {
    path: Arc<Path>,
    started: Option<FileId>,
}

impl LedgerFile {
    fn at(path: &Path) -> Self {
        Self {
            path: Arc::from(path),
            started: FileId::of(path),
        }
    }

    /// Whether the path still names the file the writer started with (see [`FileId`]).
    fn in_place(&self) -> bool {
        self.started.is_some() && FileId::of(&self.path) == self.started
    }
}

/// The writer's connection and settings, locked by the thread for each batch, by
/// [`SqliteWriter::turn`] and by [`SqliteWriter::close`].
struct Slot {
    /// The ledger's file: connections are opened at its path.
    file: LedgerFile,
    sync: SqliteSync,
    /// `None` once an error left the connection in an unknown state (a failed `ROLLBACK`, or
    /// the level not restored to FULL): the next batch opens a fresh one.
    conn: Option<Connection>,
    /// Set by [`SqliteWriter::close`]: no connection is opened again.
    closed: bool,
}

impl SqliteWriter {
    /// Opens the writer's connection to the SQLite file at `path` (created, migrated or not, in
    /// WAL mode) with `sync`, and starts the `ledger-writer` thread. Returns the queue's sending
    /// end and the writer; the thread ends when every sender is dropped (the last clone of the
    /// store). Errors: [`StoreError::Unavailable`] when the file cannot be opened as a database
    /// or the thread cannot be started.
    pub(super) async fn spawn(
        path: PathBuf,
        sync: SqliteSync,
    ) -> Result<(mpsc::UnboundedSender<Request>, SqliteWriter), StoreError> {
        let (path, opened) = tokio::task::spawn_blocking(move || {
            let opened = open(&path, sync);
            (path, opened)
        })
        .await
        .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(e))))?;
        let conn = opened.map_err(|e| classify(Backend::Sqlite, sqlite_error(e)))?;
        let file = LedgerFile::at(&path);
        let writer = SqliteWriter {
            file: file.clone(),
            slot: Arc::new(Mutex::new(Slot {
                file,
                sync,
                conn: Some(conn),
                closed: false,
            })),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = writer.clone();
        std::thread::Builder::new()
            .name("ledger-writer".to_owned())
            .spawn(move || thread.run(rx))
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        Ok((tx, writer))
    }

    /// The thread: takes every request pending (up to [`MAX_BATCH`]), commits them, answers.
    fn run(&self, mut queue: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = queue.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Commits `batch` and answers every request in it, on the calling thread (blocking; not
    /// on a runtime thread).
    pub(super) fn commit(&self, batch: Vec<Request>) {
        self.slot
            .blocking_lock()
            .surviving_panics(|slot| slot.commit(batch));
    }

    /// A batch whose commit panics, for the unit test of [`Slot::surviving_panics`].
    #[cfg(test)]
    pub(super) fn commit_panicking(&self, batch: Vec<Request>) {
        self.slot.blocking_lock().surviving_panics(|_| {
            let _held = batch;
            panic!("a bug in a batch");
        });
    }

    /// Waits until no batch is being committed and keeps the writer from starting one while
    /// the turn is held: the store's direct writes on its sqlx connection take it, so that
    /// they and the writer thread take turns in the broker (FIFO) instead of meeting each
    /// other's lock in SQLite's busy handler, which sleeps 1, 2, 5, 10 … ms between tries
    /// (sqlite3.c, `sqliteDefaultBusyCallback`).
    pub(super) async fn turn(&self) -> WriterTurn<'_> {
        WriterTurn(self.slot.lock().await)
    }

    /// Closes the connection once the batch in progress is committed; the writes queued after
    /// it answer [`StoreError::Unavailable`]. As the last connection to the file it copies the
    /// write-ahead log back into the database file (sqlite.org/wal.html).
    pub(super) async fn close(&self) {
        let mut slot = self.slot.lock().await;
        slot.closed = true;
        if let Some(Err((_, error))) = slot.conn.take().map(Connection::close) {
            tracing::debug!(error = %sqlite_error(error), "ledger writer connection did not close cleanly");
        }
    }

    /// Whether the ledger's path still names the file the writer started with (see [`FileId`]).
    pub(super) fn file_in_place(&self) -> bool {
        self.file.in_place()
    }

    /// Runs `sql` on the writer's connection between batches, for tests that set a pragma
    /// there (e.g. `max_page_count`, to fill the database without filling a disk).
    #[cfg(test)]
    pub(super) async fn execute(&self, sql: &str) {
        let slot = self.slot.lock().await;
        let conn = slot.conn.as_ref().expect("an open writer connection");
        conn.execute_batch(sql).expect("the statement runs");
    }

    /// The connection's `PRAGMA synchronous` (sqlite.org/pragma.html#pragma_synchronous: 2 is
    /// FULL, 1 is NORMAL), for tests; `None` when it is closed.
    #[cfg(test)]
    pub(super) async fn synchronous(&self) -> Option<i64> {
        let slot = self.slot.lock().await;
        let conn = slot.conn.as_ref()?;
        conn.query_row("PRAGMA synchronous", [], |row| row.get(0))
            .ok()
    }
}

/// The writer kept idle while held ([`SqliteWriter::turn`]).
pub(super) struct WriterTurn<'a>(#[allow(dead_code)] MutexGuard<'a, Slot>);

/// Opens the writer's connection with the pragmas the sqlx connections of the store get
/// (`IdentityStore::connect`): WAL, the busy timeout, foreign keys, no automatic checkpoints
/// (the store's `checkpoints` task runs them beside the writer), and the level of `sync`.
fn open(path: &Path, sync: SqliteSync) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0",
    )?;
    // `Intents` relaxes single batches and restores FULL after each.
    set_synchronous(&conn, sync == SqliteSync::Normal)?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
    Ok(conn)
}

impl Slot {
    /// Commits `batch` and answers every request in it. Under [`SqliteSync::Intents`] a batch
    /// that holds both kinds is committed in two transactions: first the writes that need no
    /// sync (their sessions are answered without waiting for an fsync), then the intents, whose
    /// synced commit makes the first one's log frames durable too (sqlite.org/wal.html). Under
    /// load nearly every batch holds an intent, so without the split every activation would
    /// wait for an fsync all the same. No write in a batch depends on an intent of the same
    /// batch: a session writes anything else about its identity only after its intent was
    /// answered.
    fn commit(&mut self, batch: Vec<Request>) {
        if self.sync == SqliteSync::Intents {
            let must_sync = |r: &Request| needs_sync(&[r]);
            if batch.iter().any(must_sync) && !batch.iter().all(must_sync) {
                let (synced, relaxed): (Vec<Request>, Vec<Request>) =
                    batch.into_iter().partition(|r| must_sync(r));
                self.commit_group(relaxed);
                self.commit_group(synced);
                return;
            }
        }
        self.commit_group(batch);
    }

    /// Runs `work` (a batch's commit). Should it panic (a bug: no input is known to make it),
    /// the batch's requesters get [`StoreError::Unavailable`] (their answer channels are
    /// dropped with the batch), the connection, whose transaction may still be open, is
    /// dropped so that the next batch opens a fresh one, and the thread goes on. Otherwise the
    /// thread would end, and every later write would be refused until a restart.
    fn surviving_panics(&mut self, work: impl FnOnce(&mut Slot)) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self)));
        if outcome.is_err() {
            self.conn = None;
            tracing::error!(
                "the ledger writer failed a batch on a bug; its writes were refused as unavailable, \
                 and it goes on with a fresh connection"
            );
        }
    }

    /// Commits `batch` in one transaction and answers every request in it.
    fn commit_group(&mut self, batch: Vec<Request>) {
        let refs: Vec<&Request> = batch.iter().collect();
        let result = self.run(&refs);
        drop(refs);
        match result {
            Ok(outcomes) => answer_all(batch, outcomes),
            Err(StoreError::Other(_)) if batch.len() > 1 => {
                // One bad row aborts the transaction it is in: find it by going one by one.
                for request in batch {
                    let result = self.run(&[&request]).and_then(single);
                    answer(request, result);
                }
            }
            Err(error) => fail_all(batch, error),
        }
    }

    /// Runs `writes` in one transaction (see [`transact`]), on the open connection or a fresh
    /// one. `relax` ([`needs_sync`]): the transaction commits at NORMAL, and the connection is
    /// back at FULL before the next one, for the level of every other write; a connection whose
    /// state is in doubt after an error is dropped (a committed batch is still reported
    /// committed: run again, it would fail).
    fn run(&mut self, writes: &[&Request]) -> Result<Vec<Outcome>, StoreError> {
        if self.closed {
            return Err(StoreError::Unavailable(sqlx::Error::PoolClosed));
        }
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                // A file put in the ledger's place gets no write either.
                if !self.file.in_place() {
                    return Err(file_gone());
                }
                let conn = open(&self.file.path, self.sync)
                    .map_err(|e| classify(Backend::Sqlite, sqlite_error(e)))?;
                self.conn.insert(conn)
            }
        };
        let relax = self.sync == SqliteSync::Intents && !needs_sync(writes);
        let result = transact(conn, relax, writes);
        // An error may leave the transaction open (SQLite rolls some back itself).
        let rolled_back = result.is_ok()
            || conn.is_autocommit()
            || conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]))
                .is_ok();
        let healthy = rolled_back && (!relax || set_synchronous(conn, false).is_ok());
        if !healthy {
            self.conn = None;
        }
        let outcomes = result.map_err(|e| classify(Backend::Sqlite, sqlite_error(e)))?;
        // Checked after the commit, so that no write is reported durable unless the file it
        // went into was still the ledger when it was synced.
        if !self.file.in_place() {
            self.conn = None;
            return Err(file_gone());
        }
        Ok(outcomes)
    }
}

/// The error of a write refused because the ledger's file was removed or replaced ([`FileId`]).
fn file_gone() -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the ledger file was removed or replaced since the broker started",
    )))
}

/// Sets the connection's `PRAGMA synchronous` to NORMAL or FULL for the transactions that
/// follow; outside a transaction only (SQLite refuses the change inside one). Not cached: a
/// pragma statement expires itself when run (sqlite3.c, `sqlite3VdbeRunOnlyOnce`).
fn set_synchronous(conn: &Connection, normal: bool) -> rusqlite::Result<()> {
    conn.execute_batch(if normal {
        "PRAGMA synchronous = NORMAL"
    } else {
        "PRAGMA synchronous = FULL"
    })
}

const BEGIN: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
/// An intent; the live-reference index swallows it (no row changed) when a live record holds
/// its reference already. Without a reference it cannot conflict there.
const INSERT_INTENT: &str = "INSERT INTO identities (id, finapi_user_id, caller, \
     reference_digest, key_id, finapi_client, state, created_at, delete_after, next_attempt_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'intent', ?7, ?8, ?7) \
     ON CONFLICT (caller, finapi_client, reference_digest) \
     WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active') DO NOTHING";
static FIND_LIVE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {RECORD_COLUMNS} FROM identities WHERE caller = ?1 AND finapi_client = ?2 \
         AND reference_digest = ?3 AND state IN ('intent', 'active')"
    )
});
const ACTIVATE_ONE: &str = "UPDATE identities SET state = 'active', last_session_at = ?2, \
     delete_after = ?3 WHERE id = ?1 AND state = 'intent'";
const TOUCH_ONE: &str = "UPDATE identities SET last_session_at = ?2, delete_after = ?3 \
     WHERE id = ?1 AND state = 'active'";
const INSERT_EVENT: &str = "INSERT INTO identity_events \
     (identity_id, kind, caller, request_id, at, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// The event of a change that did not apply: only for a record that exists (a change of an
/// unknown record is not an error, and logs nothing).
const INSERT_EVENT_IF_KNOWN: &str = "INSERT INTO identity_events \
     (identity_id, kind, caller, request_id, at, detail) \
     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM identities WHERE id = ?1)";

/// The per-row statements of [`write_one`].
#[derive(Clone, Copy)]
enum Row {
    InsertIntent,
    Activate,
    Touch,
    InsertEvent,
    InsertEventIfKnown,
}

impl Row {
    const COUNT: usize = 5;

    fn sql(self) -> &'static str {
        match self {
            Row::InsertIntent => INSERT_INTENT,
            Row::Activate => ACTIVATE_ONE,
            Row::Touch => TOUCH_ONE,
            Row::InsertEvent => INSERT_EVENT,
            Row::InsertEventIfKnown => INSERT_EVENT_IF_KNOWN,
        }
    }
}

/// The statements of one batch: each is taken from the connection's cache at its first use in
/// the batch and goes back when the batch ends, not once per row. rusqlite's cache is an LRU
/// keyed by the SQL text, so every take and every return hashes and compares the whole text
/// (≈ 1.8k instructions per row in the callgrind profile, for an insert of ≈ 16k).
struct Statements<'conn> {
    conn: &'conn Connection,
    taken: [Option<CachedStatement<'conn>>; Row::COUNT],
}

impl<'conn> Statements<'conn> {
    fn new(conn: &'conn Connection) -> Self {
        Self {
            conn,
            taken: Default::default(),
        }
    }

    fn get(&mut self, row: Row) -> rusqlite::Result<&mut CachedStatement<'conn>> {
        let index = row as usize;
        match self.taken[index] {
            Some(ref mut statement) => Ok(statement),
            None => Ok(self.taken[index].insert(self.conn.prepare_cached(row.sql())?)),
        }
    }
}

/// Runs `writes` in one `BEGIN IMMEDIATE … COMMIT`, one statement per row in the writes' order,
/// each prepared once per connection. The write lock is taken at `BEGIN`, so each row sees the
/// rows before it, of this batch and of earlier ones: an intent that loses to a live record
/// reads that record, and a change's event is chosen by whether the change applied. On an
/// error the transaction may still be open; [`Slot::run`] rolls it back.
fn transact(conn: &Connection, relax: bool, writes: &[&Request]) -> rusqlite::Result<Vec<Outcome>> {
    // SQLite refuses the level's change inside a transaction, so it comes first.
    if relax {
        set_synchronous(conn, true)?;
    }
    conn.prepare_cached(BEGIN)?.execute([])?;
    let mut statements = Statements::new(conn);
    let outcomes = writes
        .iter()
        .map(|write| write_one(&mut statements, write))
        .collect::<rusqlite::Result<Vec<Outcome>>>()?;
    // Each statement was reset after its last row; back to the cache before the commit.
    drop(statements);
    conn.prepare_cached(COMMIT)?.execute([])?;
    Ok(outcomes)
}

fn write_one(statements: &mut Statements<'_>, write: &Request) -> rusqlite::Result<Outcome> {
    Ok(match write {
        Request::Intent(row, _) => {
            let written = statements.get(Row::InsertIntent)?.execute(params![
                row.id,
                row.finapi_user_id,
                row.caller,
                row.reference_digest,
                row.key_id,
                row.finapi_client,
                row.now,
                row.delete_after,
            ])?;
            Outcome::Intent(match &row.reference_digest {
                _ if written > 0 => IntentOutcome::New,
                Some(digest) => statements
                    .conn
                    .prepare_cached(&FIND_LIVE)?
                    .query_row(
                        params![row.caller, row.finapi_client, digest],
                        RawRecord::from_sqlite_row,
                    )
                    .optional()?
                    .map_or(IntentOutcome::Gone, |live| {
                        IntentOutcome::Existing(Box::new(live))
                    }),
                None => IntentOutcome::Gone,
            })
        }
        Request::Transition(row, _) => {
            let change = match row.change {
                Change::Activate => Row::Activate,
                Change::Touch => Row::Touch,
            };
            let applied =
                statements
                    .get(change)?
                    .execute(params![row.id, row.now, row.delete_after])?
                    > 0;
            match (&row.event, &row.unchanged_detail) {
                (Some(event), _) if applied => {
                    insert_event(statements, Row::InsertEvent, event, event.detail.as_deref())?;
                }
                (Some(event), Some(detail)) => {
                    insert_event(
                        statements,
                        Row::InsertEventIfKnown,
                        event,
                        detail.as_deref(),
                    )?;
                }
                _ => {}
            }
            Outcome::Transition(applied)
        }
        Request::Event(row, _) => {
            insert_event(statements, Row::InsertEvent, row, row.detail.as_deref())?;
            Outcome::Event
        }
    })
}

fn insert_event(
    statements: &mut Statements<'_>,
    sql: Row,
    event: &EventRow,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    statements.get(sql)?.execute(params![
        event.identity_id,
        event.kind.as_str(),
        event.caller,
        event.request_id,
        event.at,
        detail,
    ])?;
    Ok(())
}

/// A failure SQLite reported to the writer thread, as a [`sqlx::error::DatabaseError`] so that
/// `classify` sorts it like the failures of the store's sqlx connections: SQLite's extended
/// result code (sqlite.org/rescode.html) and `sqlite3_errmsg`, which names a constraint or a
/// column but never quotes a bound value.
#[derive(Debug)]
struct SqliteFailure {
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLite code {})", self.message, self.code)
    }
}

impl std::error::Error for SqliteFailure {}

impl sqlx::error::DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        // Extended codes of SQLITE_CONSTRAINT (19), sqlite.org/rescode.html.
        match self.code {
            // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE
            1555 | 2067 => ErrorKind::UniqueViolation,
            // SQLITE_CONSTRAINT_FOREIGNKEY
            787 => ErrorKind::ForeignKeyViolation,
            // SQLITE_CONSTRAINT_NOTNULL
            1299 => ErrorKind::NotNullViolation,
            // SQLITE_CONSTRAINT_CHECK
            275 => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// A rusqlite error in the store's error type. SQLite's own failures keep their code and
/// message; rusqlite's other errors concern a value read or bound (some quote it), so only
/// their kind is kept.
fn sqlite_error(error: rusqlite::Error) -> sqlx::Error {
    let kind = match error {
        rusqlite::Error::SqliteFailure(failure, message) => {
            return sqlx::Error::Database(Box::new(SqliteFailure {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }));
        }
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => "a stored value does not decode",
        rusqlite::Error::ToSqlConversionFailure(..) => "a value does not encode",
        _ => "the SQLite API refused a call",
    };
    sqlx::Error::Protocol(format!("identity store writer: {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_failures_are_classified_as_the_sqlx_ones_and_quote_no_value() {
        let failure = |code: i32, message: &str| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                Some(message.to_owned()),
            )
        };
        // sqlite.org/rescode.html: BUSY 5, IOERR_FSYNC 1034, READONLY 8, CORRUPT 11, NOTADB 26.
        for code in [5, 1034, 8, 11, 26] {
            let error = classify(Backend::Sqlite, sqlite_error(failure(code, "no")));
            assert!(
                matches!(error, StoreError::Unavailable(_)),
                "{code}: {error:?}"
            );
        }
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_FOREIGNKEY: a bad row, not a bad database.
        for code in [2067, 787] {
            let error = classify(Backend::Sqlite, sqlite_error(failure(code, "constraint")));
            assert!(matches!(error, StoreError::Other(_)), "{code}: {error:?}");
        }
        let StoreError::Other(sqlx::Error::Database(unique)) = classify(
            Backend::Sqlite,
            sqlite_error(failure(2067, "UNIQUE constraint failed: identities.id")),
        ) else {
            panic!("a database error");
        };
        assert!(unique.is_unique_violation());
        assert_eq!(unique.message(), "UNIQUE constraint failed: identities.id");
        // rusqlite's own errors may quote a value: only their kind is kept.
        const VALUE: i64 = 4_711_000_042;
        let shown = sqlite_error(rusqlite::Error::IntegralValueOutOfRange(3, VALUE));
        let shown = format!("{shown} / {shown:?}");
        assert!(!shown.contains(&VALUE.to_string()), "{shown}");
    }

    #[test]
    fn the_level_is_set_again_at_every_call() {
        let path =
            std::env::temp_dir().join(format!("giroident-writer-unit-{}.db", uuid::Uuid::new_v4()));
        let conn = Connection::open(&path).expect("opens");
        let level = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA synchronous", [], |row| row.get(0))
                .expect("pragma")
        };
        for _ in 0..2 {
            set_synchronous(&conn, true).expect("NORMAL");
            assert_eq!(level(&conn), 1);
            set_synchronous(&conn, false).expect("FULL");
            assert_eq!(level(&conn), 2);
        }
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }
}
