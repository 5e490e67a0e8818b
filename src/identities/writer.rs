//! Group commit for the ledger's per-session writes (intents, activations, touches and
//! events): requests from concurrent sessions queue on a channel, a writer task takes every
//! request pending, commits them together in one transaction with one multi-row statement per
//! kind, and only then answers each requester. A session therefore still learns that its intent
//! is durable before it calls `POST /api/v2/users`, but concurrent sessions share one commit
//! (one SQLite write lock and WAL append, one PostgreSQL `fsync`) instead of taking turns.
//!
//! A batch that fails on a database that is not usable (see `classify`) fails every request in
//! it with [`StoreError::Unavailable`]. A batch that fails otherwise (one bad row, e.g. an event
//! for an unknown identity) is run again one request at a time, so that only the culprit fails.
//! A writer that is gone answers nothing: its requesters see [`StoreError::Unavailable`].

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::postgres::{PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{FromRow, QueryBuilder, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::store::{Backend, RECORD_COLUMNS, RawRecord, SqliteSync, StoreError, classify};
use super::{EventKind, Millis};

/// Most requests in one batch. The largest statement then binds 128 × 8 values, well below
/// SQLite's 32766 and PostgreSQL's 65535 parameters.
const MAX_BATCH: usize = 128;

/// Prepared statements the SQLite writer connection keeps (sqlx's per-connection LRU cache,
/// keyed by the SQL text). A batch's SQL depends on how many rows of each kind it holds, so
/// under load nearly every batch has a shape of its own, and SQLite keeps a compiled program
/// with a register per bound value for each cached one. A cache of 4 × [`MAX_BATCH`] + 16
/// held about 34 MiB more after 100,000 sessions at concurrency 64 (≈ 70 KiB per statement;
/// docs/BENCHMARKS.md, issue 15); 32 keeps the shapes a quiet broker repeats prepared.
pub(super) const WRITER_STATEMENT_CACHE: usize = 32;

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

/// Where a writer commits: SQLite's single writer connection (with the configured
/// [`SqliteSync`]), or the PostgreSQL pool.
#[derive(Clone)]
pub(super) enum WritePool {
    Sqlite(SqlitePool, SqliteSync),
    Postgres(PgPool),
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

impl WritePool {
    fn backend(&self) -> Backend {
        match self {
            WritePool::Sqlite(..) => Backend::Sqlite,
            WritePool::Postgres(_) => Backend::Postgres,
        }
    }

    async fn run(&self, writes: &[&Request]) -> Result<Vec<Outcome>, sqlx::Error> {
        match self {
            WritePool::Sqlite(pool, sync) => {
                let relax = *sync == SqliteSync::Intents && !needs_sync(writes);
                run_sqlite(pool, relax, writes).await
            }
            WritePool::Postgres(pool) => run_postgres(pool, writes).await,
        }
    }
}

/// Starts `writers` writer tasks sharing one queue and returns the queue's sending end. The
/// tasks end when every sender is dropped (the last clone of the store).
pub(super) fn spawn(pool: WritePool, writers: usize) -> mpsc::UnboundedSender<Request> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..writers.max(1) {
        tokio::spawn(run_writer(pool.clone(), Arc::clone(&rx)));
    }
    tx
}

async fn run_writer(pool: WritePool, queue: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
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
        commit(&pool, batch).await;
    }
}

/// Commits `batch` and answers every request in it. Under [`SqliteSync::Intents`] a batch that
/// holds both kinds is committed in two transactions: first the writes that need no sync (their
/// sessions are answered without waiting for an fsync), then the intents, whose synced commit
/// makes the first one's log frames durable too (sqlite.org/wal.html). Under load nearly every
/// batch holds an intent, so without the split every activation would wait for an fsync all
/// the same. No write in a batch depends on an intent of the same batch: a session writes
/// anything else about its identity only after its intent was answered.
pub(super) async fn commit(pool: &WritePool, batch: Vec<Request>) {
    if let WritePool::Sqlite(_, SqliteSync::Intents) = pool {
        let must_sync = |r: &Request| needs_sync(&[r]);
        if batch.iter().any(must_sync) && !batch.iter().all(must_sync) {
            let (synced, relaxed): (Vec<Request>, Vec<Request>) =
                batch.into_iter().partition(|r| must_sync(r));
            commit_group(pool, relaxed).await;
            commit_group(pool, synced).await;
            return;
        }
    }
    commit_group(pool, batch).await;
}

/// Commits `batch` in one transaction and answers every request in it.
async fn commit_group(pool: &WritePool, batch: Vec<Request>) {
    let refs: Vec<&Request> = batch.iter().collect();
    let error = match pool.run(&refs).await {
        Ok(outcomes) => {
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                answer(request, Ok(outcome));
            }
            return;
        }
        Err(e) => classify(pool.backend(), e),
    };
    match error {
        StoreError::Other(_) if batch.len() > 1 => {
            // One bad row spoils the statement it is in: find it by going one by one.
            for request in batch {
                let result = pool
                    .run(&[&request])
                    .await
                    .map(|mut outcomes| outcomes.remove(0))
                    .map_err(|e| classify(pool.backend(), e));
                answer(request, result);
            }
        }
        StoreError::Unavailable(source) => {
            // The first requester gets the cause itself, the others its description.
            let mut first = Some(source);
            for request in batch {
                let source = first.take().unwrap_or_else(|| {
                    sqlx::Error::Io(std::io::Error::other("identity store unavailable"))
                });
                answer(request, Err(StoreError::Unavailable(source)));
            }
        }
        other => {
            let mut first = Some(other);
            for request in batch {
                let err = first.take().unwrap_or_else(|| {
                    StoreError::Other(sqlx::Error::Protocol(
                        "identity store batch failed".to_owned(),
                    ))
                });
                answer(request, Err(err));
            }
        }
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
const ON_LIVE_REFERENCE_TAGGED: &str = " ON CONFLICT (caller, finapi_client, reference_digest) \
     WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active') DO NOTHING \
     RETURNING 'new' AS tag, id; ";
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

/// Runs one batch on SQLite as ONE command to the connection's worker thread: `BEGIN
/// IMMEDIATE`, the statements, `COMMIT`, in one multi-statement string. sqlx runs every SQLite
/// statement on a worker thread of the connection and hands each command and its answer across
/// threads; one command per batch instead of one per statement is most of what group commit
/// saves on SQLite. Each statement's rows carry a `tag` column saying which statement they
/// come from.
///
/// The statements: the intents without a reference in one plain multi-row `INSERT`, those with
/// one in one `INSERT … ON CONFLICT DO NOTHING RETURNING`; the live
/// records of the batch's references (for the intents that lost); the events of the state
/// changes, chosen by the records' states *before* the changes (the write lock is held, so the
/// `UPDATE`s that follow see the same states); the activations and the touches in one
/// `UPDATE … FROM (VALUES …)` each; the plain events in one `INSERT`.
///
/// `relax`: the batch commits with `synchronous=NORMAL` (no fsync; see [`needs_sync`]), and
/// the connection is back at FULL before it is released, for the writes made on it directly
/// (a separate command: an error there must not report the committed batch failed).
async fn run_sqlite(
    pool: &SqlitePool,
    relax: bool,
    writes: &[&Request],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let intents: Vec<&IntentRow> = writes
        .iter()
        .filter_map(|w| match w {
            Request::Intent(row, _) => Some(row),
            _ => None,
        })
        .collect();
    let transitions = |change: Change| -> Vec<&TransitionRow> {
        writes
            .iter()
            .filter_map(|w| match w {
                Request::Transition(row, _) if row.change == change => Some(row),
                _ => None,
            })
            .collect()
    };
    let activations = transitions(Change::Activate);
    let touches = transitions(Change::Touch);
    let logged: Vec<(&TransitionRow, &EventRow)> = activations
        .iter()
        .chain(&touches)
        .filter_map(|row| row.event.as_ref().map(|event| (*row, event)))
        .collect();
    let events: Vec<&EventRow> = writes
        .iter()
        .filter_map(|w| match w {
            Request::Event(row, _) => Some(row),
            _ => None,
        })
        .collect();
    let (referenced, unreferenced): (Vec<&IntentRow>, Vec<&IntentRow>) = intents
        .iter()
        .copied()
        .partition(|row| row.reference_digest.is_some());

    // SQLite refuses the level's change inside a transaction, so it comes first. A pragma
    // statement expires itself when run (sqlite3.c, `sqlite3VdbeRunOnlyOnce`), so the cached
    // batch recompiles it, and applies it, at every run.
    let mut query = QueryBuilder::<Sqlite>::new(if relax {
        "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; "
    } else {
        "BEGIN IMMEDIATE; "
    });
    // Two statements, so that the intents without a reference (which no live record can
    // hold) skip `RETURNING`: SQLite collects a statement's `RETURNING` rows in a temporary
    // table first, a cost per statement that a plain `INSERT` does not pay.
    for (rows, conflict) in [
        (&unreferenced, "; "),
        (&referenced, ON_LIVE_REFERENCE_TAGGED),
    ] {
        if rows.is_empty() {
            continue;
        }
        query.push(INSERT_INTENTS);
        query.push_values(rows.iter(), |mut b, row| row.push_values(&mut b));
        query.push(conflict);
    }
    if !referenced.is_empty() {
        query.push(format_args!(
            "SELECT 'live' AS tag, {RECORD_COLUMNS} FROM identities \
             WHERE state IN ('intent', 'active') AND reference_digest IS NOT NULL \
             AND (caller, finapi_client, reference_digest) IN ("
        ));
        query.push_values(&referenced, |mut b, row| {
            b.push_bind(row.caller.as_str())
                .push_bind(row.finapi_client.as_str())
                .push_bind(row.reference_digest.as_deref());
        });
        query.push("); ");
    }
    if !logged.is_empty() {
        query.push(INSERT_EVENTS);
        query.push(
            "SELECT v.column1, v.column2, v.column3, v.column4, v.column5, \
             CASE WHEN i.state = v.column6 THEN v.column7 ELSE v.column8 END FROM (",
        );
        query.push_values(&logged, |mut b, (row, event)| {
            b.push_bind(event.identity_id.as_str())
                .push_bind(event.kind.as_str())
                .push_bind(event.caller.as_str())
                .push_bind(event.request_id.as_deref())
                .push_bind(event.at)
                .push_bind(from_state(row.change))
                .push_bind(event.detail.as_deref())
                .push_bind(row.unchanged_detail.clone().flatten())
                .push_bind(row.unchanged_detail.is_some());
        });
        query.push(
            ") AS v JOIN identities AS i ON i.id = v.column1 \
             WHERE i.state = v.column6 OR v.column9; ",
        );
    }
    for (rows, head, tag) in [(&activations, ACTIVATE, "a"), (&touches, TOUCH, "t")] {
        if rows.is_empty() {
            continue;
        }
        query.push(head);
        query.push_values(rows.iter(), |mut b, row| {
            b.push_bind(row.id.as_str())
                .push_bind(row.now)
                .push_bind(row.delete_after);
        });
        let state = from_state(rows[0].change);
        query.push(format_args!(
            ") AS v WHERE id = v.column1 AND state = '{state}' RETURNING '{tag}' AS tag, id; "
        ));
    }
    if !events.is_empty() {
        query.push(INSERT_EVENTS);
        query.push_values(&events, |mut b, event| event.push_values(&mut b));
        query.push("; ");
    }
    query.push("COMMIT");

    let mut conn = pool.acquire().await?;
    let rows = match query.build().fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(e) => {
            // The statement that failed left the transaction open: roll it back, and if that
            // fails too, let the pool open a fresh connection (at the configured FULL).
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err()
                || (relax && set_synchronous(&mut conn, false).await.is_err())
            {
                let _ = conn.close().await;
            }
            return Err(e);
        }
    };
    if relax && set_synchronous(&mut conn, false).await.is_err() {
        // The batch is committed and must not be reported failed (it would be run again); a
        // fresh connection opens at the configured FULL.
        let _ = conn.close().await;
    }

    let mut new = HashSet::new();
    let mut live = Vec::new();
    let mut changed = HashSet::new();
    for row in rows {
        let tag: String = row.try_get("tag")?;
        match tag.as_str() {
            "new" => {
                new.insert(row.try_get::<String, _>("id")?);
            }
            "live" => live.push(RawRecord::from_row(&row)?),
            change => {
                changed.insert((change == "a", row.try_get::<String, _>("id")?));
            }
        }
    }
    Ok(writes
        .iter()
        .map(|w| match w {
            // Without a reference the intent was written: the command succeeded.
            Request::Intent(row, _) => {
                Outcome::Intent(if row.reference_digest.is_none() || new.contains(&row.id) {
                    IntentOutcome::New
                } else {
                    // Lost to a live record of an earlier batch, or of this one.
                    let index = live.iter().position(|r| {
                        r.caller == row.caller
                            && r.finapi_client == row.finapi_client
                            && r.reference_digest == row.reference_digest
                    });
                    match index {
                        Some(i) if row.reference_digest.is_some() => {
                            IntentOutcome::Existing(Box::new(live[i].clone()))
                        }
                        _ => IntentOutcome::Gone,
                    }
                })
            }
            Request::Transition(row, _) => Outcome::Transition(
                changed.contains(&(row.change == Change::Activate, row.id.clone())),
            ),
            Request::Event(..) => Outcome::Event,
        })
        .collect())
}

/// Sets the connection's `PRAGMA synchronous` (NORMAL or FULL) for the transactions that
/// follow; outside a transaction only (SQLite refuses the change inside one). Unprepared
/// (`raw_sql`): SQLite recompiles a pragma at every run anyway, so caching it gains nothing.
pub(super) async fn set_synchronous(
    conn: &mut sqlx::SqliteConnection,
    normal: bool,
) -> Result<(), sqlx::Error> {
    let sql = if normal {
        "PRAGMA synchronous = NORMAL"
    } else {
        "PRAGMA synchronous = FULL"
    };
    sqlx::Executor::execute(conn, sqlx::raw_sql(sql))
        .await
        .map(drop)
}

/// The state a change applies to.
fn from_state(change: Change) -> &'static str {
    match change {
        Change::Activate => "intent",
        Change::Touch => "active",
    }
}
