//! The identity ledger (issue 12) against both backends: every scenario runs on an SQLite file
//! and on a real PostgreSQL server the tests start themselves (`common::pg`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::pg::{self, SharedDb, TempDir};
use futures_util::FutureExt;
use giroident_broker::identities::{
    ChangeEvent, EventKind, IdentityEvent, IdentityState, IdentityStore, Inserted, Millis,
    NewIdentity, StoreError,
};
use secrecy::SecretString;
use uuid::Uuid;

/// A fresh database of one backend, alive as long as this value.
struct Db {
    url: String,
    _keep: Keep,
}

/// What keeps the database alive: its directory, or its share of the PostgreSQL server.
enum Keep {
    File { _dir: TempDir },
    Postgres { _db: SharedDb },
}

impl Db {
    async fn sqlite() -> Self {
        let dir = TempDir::new("giroident-ledger");
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        Self {
            url,
            _keep: Keep::File { _dir: dir },
        }
    }

    async fn postgres() -> Self {
        let db = pg::database().await;
        Self {
            url: db.url(),
            _keep: Keep::Postgres { _db: db },
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self._keep, Keep::Postgres { .. })
    }

    async fn connect(&self) -> Result<IdentityStore, StoreError> {
        IdentityStore::connect(&SecretString::from(self.url.clone()), 8).await
    }

    async fn store(&self) -> IdentityStore {
        self.connect()
            .await
            .expect("the ledger connects and migrates")
    }

    /// Runs each of `statements` (no binds) straight on the database, bypassing the store;
    /// returns each one's result as text, `Err` with the database's message.
    async fn exec_raw(&self, statements: &[&str]) -> Vec<Result<(), String>> {
        let mut results = Vec::new();
        if self.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.url).await.expect("raw connect");
            for sql in statements {
                let done = sqlx::query(sql).execute(&pool).await;
                results.push(done.map(drop).map_err(|e| e.to_string()));
            }
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url)
                .await
                .expect("raw connect");
            for sql in statements {
                let done = sqlx::query(sql).execute(&pool).await;
                results.push(done.map(drop).map_err(|e| e.to_string()));
            }
            pool.close().await;
        }
        results
    }

    /// Applies this backend's first `count` migrations only, as a broker of that schema
    /// version did (sqlx's migrator on a copy of them).
    async fn migrate_to(&self, count: usize) {
        let backend = if self.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        };
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(backend);
        let mut files: Vec<_> = std::fs::read_dir(&source)
            .expect("migrations dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        let dir = TempDir::new("giroident-ledger-migrations");
        for file in &files[..count] {
            let name = file.file_name().expect("a file name");
            std::fs::copy(file, dir.path().join(name)).expect("migration copied");
        }
        let migrator = sqlx::migrate::Migrator::new(dir.path())
            .await
            .expect("migrations read");
        if self.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.url).await.expect("raw connect");
            migrator.run(&pool).await.expect("old migrations apply");
            pool.close().await;
        } else {
            let options = self
                .url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .expect("url")
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options)
                .await
                .expect("raw connect");
            migrator.run(&pool).await.expect("old migrations apply");
            pool.close().await;
        }
    }

    /// Runs `sql` with `binds` (i64, then a byte string) straight on the database, bypassing
    /// the store.
    async fn exec(&self, sql: &str, number: i64, bytes: Vec<u8>) {
        if self.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.url).await.expect("raw connect");
            sqlx::query(sql)
                .bind(number)
                .bind(bytes)
                .execute(&pool)
                .await
                .expect("raw statement runs");
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url)
                .await
                .expect("raw connect");
            sqlx::query(sql)
                .bind(number)
                .bind(bytes)
                .execute(&pool)
                .await
                .expect("raw statement runs");
            pool.close().await;
        }
    }
}

/// Runs each named scenario `async fn NAME(db: Db)` once on SQLite and once on PostgreSQL, as
/// the tests `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Db::sqlite().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::Db::postgres().await).await;
            }
        }
    )*};
}

on_both_backends!(
    migrations_apply_to_a_fresh_database_and_again_to_a_migrated_one,
    a_database_of_migration_3_is_upgraded_keeping_records_events_and_constraints,
    a_schema_newer_than_the_binary_is_refused,
    concurrent_intents_for_one_reference_yield_exactly_one_new_record,
    references_are_per_caller_and_intents_without_one_are_always_new,
    an_identity_moves_through_its_states_with_its_times,
    finapi_user_ids_are_found_case_insensitively,
    events_are_read_newest_first_up_to_the_limit,
    claim_due_takes_due_records_once_per_lease,
    concurrent_claimers_never_share_a_record_while_its_lease_runs,
    counts_and_the_oldest_overdue_record_feed_the_metrics,
    writes_queued_together_are_committed_together_and_each_answered_as_alone,
    a_bad_write_in_a_batch_fails_alone,
    one_reference_at_two_finapi_clients_is_two_identities_within_one_batch,
    more_batch_shapes_than_the_writer_keeps_prepared_are_all_committed,
);

const T0: Millis = 1_800_000_000_000;
const HOUR: Millis = 3_600_000;

fn new_identity<'a>(
    id: Uuid,
    user: &'a str,
    caller: &'a str,
    digest: Option<&'a str>,
    now: Millis,
) -> NewIdentity<'a> {
    NewIdentity {
        id,
        finapi_user_id: user,
        caller,
        reference_digest: digest,
        key_id: "k1",
        finapi_client: "default",
        now,
        delete_after: now + 24 * HOUR,
    }
}

/// Writes an intent for a fresh id and finAPI user; returns its id.
async fn intent(store: &IdentityStore, caller: &str, digest: Option<&str>, now: Millis) -> Uuid {
    let id = Uuid::new_v4();
    let user = format!("user-{}", id.simple());
    let inserted = store
        .insert_intent(&new_identity(id, &user, caller, digest, now))
        .await
        .expect("intent is written");
    assert_eq!(inserted, Inserted::New);
    id
}

async fn get(store: &IdentityStore, id: Uuid) -> giroident_broker::identities::IdentityRecord {
    store
        .get(id)
        .await
        .expect("get")
        .expect("the record exists")
}

async fn migrations_apply_to_a_fresh_database_and_again_to_a_migrated_one(db: Db) {
    let store = db.store().await;
    let id = intent(&store, "demo", Some("d1"), T0).await;
    drop(store);

    let again = db.store().await;
    again.ping().await.expect("ping");
    assert_eq!(
        get(&again, id).await.caller,
        "demo",
        "data survives a second start"
    );
    let expected = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(again.backend(), expected);
}

/// Migration 0004 rebuilds SQLite's tables (CHECK constraints without `IN` lists, events
/// without `AUTOINCREMENT`): a ledger written by a broker of migration 0003 keeps its records,
/// its events with their ids and order, its foreign key and its constraints.
async fn a_database_of_migration_3_is_upgraded_keeping_records_events_and_constraints(db: Db) {
    db.migrate_to(3).await;
    let old = Uuid::new_v4();
    let inserted = db
        .exec_raw(&[
            &format!(
                "INSERT INTO identities (id, finapi_user_id, caller, reference_digest, key_id, \
                 finapi_client, state, created_at, last_session_at, delete_after, \
                 next_attempt_at) VALUES ('{old}', 'gib-Old', 'demo', 'd-old', 'k1', 'default', \
                 'active', {T0}, {T0}, {}, {T0})",
                T0 + HOUR
            ),
            &format!(
                "INSERT INTO identity_events (identity_id, kind, caller, request_id, at) \
                 VALUES ('{old}', 'created', 'demo', 'req-1', {T0})"
            ),
            &format!(
                "INSERT INTO identity_events (identity_id, kind, caller, request_id, at) \
                 VALUES ('{old}', 'reused', 'demo', 'req-2', {T0})"
            ),
        ])
        .await;
    assert!(inserted.iter().all(Result::is_ok), "{inserted:?}");

    let store = db.store().await;
    let record = get(&store, old).await;
    assert_eq!(
        (
            record.state,
            record.finapi_user_id.as_str(),
            record.reference_digest.as_deref(),
            record.last_session_at,
            record.delete_after,
        ),
        (
            IdentityState::Active,
            "gib-Old",
            Some("d-old"),
            Some(T0),
            T0 + HOUR
        )
    );
    let found = store
        .find_by_finapi_user("GIB-old")
        .await
        .expect("lookup")
        .map(|r| r.id);
    assert_eq!(found, Some(old), "the case-insensitive index is back");
    let live = store
        .find_live("demo", "default", "d-old")
        .await
        .expect("lookup")
        .map(|r| r.id);
    assert_eq!(live, Some(old));

    // A new event at the same time as the old ones sorts after them: ids keep ascending.
    store
        .append_event(old, EventKind::Deleted, "demo", None, T0, None)
        .await
        .expect("append");
    let kinds: Vec<EventKind> = store
        .recent_events(old, 10)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [EventKind::Deleted, EventKind::Reused, EventKind::Created]
    );

    // The constraints hold as before.
    let unknown = store
        .append_event(Uuid::new_v4(), EventKind::Created, "demo", None, T0, None)
        .await;
    assert!(matches!(unknown, Err(StoreError::Other(_))), "{unknown:?}");
    let duplicate_reference = store
        .insert_intent(&new_identity(
            Uuid::new_v4(),
            "gib-new",
            "demo",
            Some("d-old"),
            T0,
        ))
        .await
        .expect("insert");
    assert!(
        matches!(&duplicate_reference, Inserted::Existing(r) if r.id == old),
        "{duplicate_reference:?}"
    );
    store.close().await;
    let refused = db
        .exec_raw(&[
            &format!("UPDATE identities SET state = 'gone' WHERE id = '{old}'"),
            &format!(
                "INSERT INTO identity_events (identity_id, kind, caller, at) \
                 VALUES ('{old}', 'vanished', 'demo', {T0})"
            ),
            "INSERT INTO identities (id, finapi_user_id, caller, key_id, finapi_client, state, \
             created_at, delete_after, next_attempt_at) \
             VALUES ('x', 'GIB-OLD', 'demo', 'k1', 'default', 'intent', 0, 0, 0)",
        ])
        .await;
    for (result, what) in refused.iter().zip(["state", "kind", "user id"]) {
        let message = result.as_ref().expect_err(what);
        assert!(
            message.contains("CHECK")
                || message.contains("check")
                || message.contains("UNIQUE")
                || message.contains("unique"),
            "{what}: {message}"
        );
    }
}

async fn a_schema_newer_than_the_binary_is_refused(db: Db) {
    db.store().await;
    db.exec(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer broker', TRUE, $2, 0)",
        99_990_101,
        vec![0u8; 48],
    )
    .await;

    let err = db.connect().await.expect_err("a newer schema is refused");
    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew {
                version: 99_990_101
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("newer than this binary") && message.contains("99990101"),
        "{message}"
    );
}

async fn concurrent_intents_for_one_reference_yield_exactly_one_new_record(db: Db) {
    let store = db.store().await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = Uuid::new_v4();
                let user = format!("user-{}", id.simple());
                let inserted = store
                    .insert_intent(&new_identity(id, &user, "demo", Some("digest-1"), T0))
                    .await
                    .expect("insert_intent");
                (id, inserted)
            })
        })
        .collect();
    let mut new = Vec::new();
    let mut existing = HashSet::new();
    for task in tasks {
        match task.await.expect("task") {
            (id, Inserted::New) => new.push(id),
            (_, Inserted::Existing(record)) => {
                assert_eq!(record.state, IdentityState::Intent);
                existing.insert(record.id);
            }
        }
    }
    assert_eq!(new.len(), 1, "exactly one intent is written");
    assert!(
        existing.iter().all(|id| *id == new[0]),
        "the others see the one written"
    );
    let live = store
        .find_live("demo", "default", "digest-1")
        .await
        .expect("find_live");
    assert_eq!(live.map(|r| r.id), Some(new[0]));
    let counts = store.counts_by_state().await.expect("counts");
    assert_eq!(counts[0], (IdentityState::Intent, 1));
}

async fn references_are_per_caller_and_intents_without_one_are_always_new(db: Db) {
    let store = db.store().await;
    let a = intent(&store, "caller-a", Some("same"), T0).await;
    let b = intent(&store, "caller-b", Some("same"), T0).await;
    assert_ne!(a, b);
    intent(&store, "caller-a", None, T0).await;
    intent(&store, "caller-a", None, T0).await;

    // An id or a finAPI user id already taken is an error, not a silent reuse.
    let record = get(&store, a).await;
    let taken = store
        .insert_intent(&new_identity(
            Uuid::new_v4(),
            &record.finapi_user_id.to_uppercase(),
            "caller-c",
            None,
            T0,
        ))
        .await;
    assert!(matches!(taken, Err(StoreError::Other(_))), "{taken:?}");
}

async fn an_identity_moves_through_its_states_with_its_times(db: Db) {
    let store = db.store().await;
    let id = Uuid::new_v4();
    let inserted = store
        .insert_intent(&NewIdentity {
            id,
            finapi_user_id: "Broker-User-1",
            caller: "demo",
            reference_digest: Some("ref-1"),
            key_id: "key-7",
            finapi_client: "default",
            now: T0,
            delete_after: T0 + HOUR,
        })
        .await
        .expect("insert");
    assert_eq!(inserted, Inserted::New);
    let r = get(&store, id).await;
    assert_eq!(r.finapi_user_id, "Broker-User-1");
    assert_eq!(r.reference_digest.as_deref(), Some("ref-1"));
    assert_eq!(r.key_id, "key-7");
    assert_eq!(r.finapi_client, "default");
    assert_eq!(r.state, IdentityState::Intent);
    assert_eq!(
        (r.created_at, r.delete_after, r.next_attempt_at),
        (T0, T0 + HOUR, T0)
    );
    assert_eq!((r.last_session_at, r.deleted_at), (None, None));
    assert_eq!((r.deletion_attempts, r.last_error.as_deref()), (0, None));

    // A touch before activation changes nothing: only active identities are reused.
    store.touch(id, T0 + 1, T0 + 5 * HOUR).await.expect("touch");
    assert_eq!(get(&store, id).await, r);

    store
        .activate(id, T0 + 10, T0 + 2 * HOUR)
        .await
        .expect("activate");
    let r = get(&store, id).await;
    assert_eq!(r.state, IdentityState::Active);
    assert_eq!(
        (r.last_session_at, r.delete_after),
        (Some(T0 + 10), T0 + 2 * HOUR)
    );

    store
        .touch(id, T0 + 20, T0 + 3 * HOUR)
        .await
        .expect("touch");
    let r = get(&store, id).await;
    assert_eq!(
        (r.last_session_at, r.delete_after),
        (Some(T0 + 20), T0 + 3 * HOUR)
    );

    store
        .mark_deleting(id, T0 + 30)
        .await
        .expect("mark_deleting");
    let r = get(&store, id).await;
    assert_eq!(
        (r.state, r.next_attempt_at),
        (IdentityState::Deleting, T0 + 30)
    );
    assert_eq!(
        store
            .find_live("demo", "default", "ref-1")
            .await
            .expect("find_live"),
        None,
        "a deleting identity is not reused"
    );

    store
        .record_failure(id, "FINAPI_UNAVAILABLE", T0 + 90)
        .await
        .expect("record_failure");
    // Idempotent: a repeated request keeps the backoff.
    store
        .mark_deleting(id, T0 + 40)
        .await
        .expect("mark_deleting");
    let r = get(&store, id).await;
    assert_eq!(r.state, IdentityState::Deleting);
    assert_eq!((r.deletion_attempts, r.next_attempt_at), (1, T0 + 90));
    assert_eq!(r.last_error.as_deref(), Some("FINAPI_UNAVAILABLE"));

    store
        .mark_deleted(id, T0 + 100)
        .await
        .expect("mark_deleted");
    store
        .mark_deleted(id, T0 + 200)
        .await
        .expect("mark_deleted again");
    let r = get(&store, id).await;
    assert_eq!(
        (r.state, r.deleted_at),
        (IdentityState::Deleted, Some(T0 + 100))
    );
    store
        .activate(id, T0 + 300, T0 + 400)
        .await
        .expect("activate");
    assert_eq!(get(&store, id).await.state, IdentityState::Deleted);

    // The reference is free again: a new identity, and the newest one is the latest.
    let next = intent(&store, "demo", Some("ref-1"), T0 + 1000).await;
    assert_ne!(next, id);
    let latest = store
        .find_latest("demo", "default", "ref-1")
        .await
        .expect("find_latest");
    assert_eq!(latest.map(|r| r.id), Some(next));
    store
        .mark_deleted(next, T0 + 1001)
        .await
        .expect("mark_deleted");
    let latest = store
        .find_latest("demo", "default", "ref-1")
        .await
        .expect("find_latest");
    assert_eq!(
        latest.map(|r| (r.id, r.state)),
        Some((next, IdentityState::Deleted))
    );
    assert_eq!(
        store
            .find_latest("other", "default", "ref-1")
            .await
            .expect("find"),
        None
    );
    assert_eq!(store.get(Uuid::new_v4()).await.expect("get"), None);
}

async fn finapi_user_ids_are_found_case_insensitively(db: Db) {
    let store = db.store().await;
    let id = Uuid::new_v4();
    store
        .insert_intent(&new_identity(id, "Giro-User-ABC", "demo", None, T0))
        .await
        .expect("insert");
    for spelling in ["Giro-User-ABC", "giro-user-abc", "GIRO-USER-ABC"] {
        let found = store.find_by_finapi_user(spelling).await.expect("find");
        assert_eq!(found.map(|r| r.id), Some(id), "{spelling}");
    }
    let none = store
        .find_by_finapi_user("giro-user-abd")
        .await
        .expect("find");
    assert_eq!(none, None);
}

async fn events_are_read_newest_first_up_to_the_limit(db: Db) {
    let store = db.store().await;
    let id = intent(&store, "demo", Some("r"), T0).await;
    let other = intent(&store, "demo", Some("s"), T0).await;
    let log = [
        (EventKind::Created, Some("req-1"), T0, None),
        (EventKind::Reused, Some("req-2"), T0 + 5, None),
        (
            EventKind::DeletionFailed,
            None,
            T0 + 9,
            Some("FINAPI_TIMEOUT"),
        ),
        // Same time as the one before: the order of appending decides.
        (EventKind::Deleted, None, T0 + 9, None),
    ];
    for (kind, request_id, at, detail) in log {
        store
            .append_event(id, kind, "demo", request_id, at, detail)
            .await
            .expect("append");
    }
    store
        .append_event(other, EventKind::NeverCreated, "demo", None, T0 + 100, None)
        .await
        .expect("append");

    let events = store.recent_events(id, 3).await.expect("events");
    let expected = |kind, request_id: Option<&str>, at, detail: Option<&str>| IdentityEvent {
        kind,
        caller: "demo".to_owned(),
        request_id: request_id.map(str::to_owned),
        at,
        detail: detail.map(str::to_owned),
    };
    assert_eq!(
        events,
        [
            expected(EventKind::Deleted, None, T0 + 9, None),
            expected(
                EventKind::DeletionFailed,
                None,
                T0 + 9,
                Some("FINAPI_TIMEOUT")
            ),
            expected(EventKind::Reused, Some("req-2"), T0 + 5, None),
        ]
    );
    assert_eq!(store.recent_events(id, 10).await.expect("events").len(), 4);
    let unknown = store
        .append_event(Uuid::new_v4(), EventKind::Created, "demo", None, T0, None)
        .await;
    assert!(matches!(unknown, Err(StoreError::Other(_))), "{unknown:?}");
}

async fn claim_due_takes_due_records_once_per_lease(db: Db) {
    let store = db.store().await;
    let now = T0 + 10 * HOUR;
    let orphan_age = 15 * 60_000;
    let lease = 60_000;

    let active_due = intent(&store, "c", None, T0).await;
    store.activate(active_due, T0, now).await.expect("activate");
    let active_later = intent(&store, "c", None, T0).await;
    store
        .activate(active_later, T0, now + 1)
        .await
        .expect("activate");
    let deleting_due = intent(&store, "c", None, T0).await;
    store
        .mark_deleting(deleting_due, T0 + HOUR)
        .await
        .expect("deleting");
    let deleting_backoff = intent(&store, "c", None, T0).await;
    store
        .mark_deleting(deleting_backoff, T0)
        .await
        .expect("deleting");
    store
        .record_failure(deleting_backoff, "E", now + 1)
        .await
        .expect("failure");
    let orphan = intent(&store, "c", None, now - orphan_age).await;
    let young_intent = intent(&store, "c", None, now - orphan_age + 1).await;
    let deleted = intent(&store, "c", None, T0).await;
    store.mark_deleted(deleted, T0).await.expect("deleted");

    let ids = |records: Vec<giroident_broker::identities::IdentityRecord>| -> HashSet<Uuid> {
        records.into_iter().map(|r| r.id).collect()
    };
    let claimed = store
        .claim_due(now, orphan_age, "replica-a", lease, 10)
        .await
        .expect("claim");
    assert_eq!(
        ids(claimed),
        HashSet::from([active_due, deleting_due, orphan]),
        "only due records: not {active_later}, {deleting_backoff}, {young_intent}, {deleted}"
    );

    // Leased: nobody else gets them until the lease ends.
    let again = store
        .claim_due(now, orphan_age, "replica-b", lease, 10)
        .await;
    assert!(again.expect("claim").is_empty());
    let before_expiry = store
        .claim_due(now + lease - 1, orphan_age, "replica-b", lease, 10)
        .await
        .expect("claim");
    assert_eq!(
        ids(before_expiry),
        HashSet::from([active_later, deleting_backoff, young_intent]),
        "records that became due since are claimable"
    );
    let expired = store
        .claim_due(now + lease, orphan_age, "replica-b", lease, 10)
        .await
        .expect("claim");
    assert_eq!(
        ids(expired),
        HashSet::from([active_due, deleting_due, orphan])
    );

    // Releasing (by the owner only) and recording a failure free a record at once.
    store
        .release(active_due, "replica-a")
        .await
        .expect("release");
    store
        .release(deleting_due, "replica-b")
        .await
        .expect("release");
    store
        .record_failure(orphan, "E", now + lease)
        .await
        .expect("failure");
    let freed = store
        .claim_due(now + lease, orphan_age, "replica-c", lease, 10)
        .await
        .expect("claim");
    assert_eq!(ids(freed), HashSet::from([deleting_due, orphan]));
    let r = get(&store, orphan).await;
    assert_eq!(
        (r.deletion_attempts, r.last_error.as_deref()),
        (1, Some("E"))
    );

    // The limit holds, most overdue first; a deleted record is never claimed.
    store
        .mark_deleted(deleting_due, now)
        .await
        .expect("deleted");
    let later = now + 10 * lease;
    let first = store
        .claim_due(later, orphan_age, "replica-d", lease, 1)
        .await
        .expect("claim");
    assert_eq!(ids(first), HashSet::from([active_due]));
    let rest = store
        .claim_due(later, orphan_age, "replica-d", lease, 100)
        .await
        .expect("claim");
    assert_eq!(
        ids(rest),
        HashSet::from([active_later, deleting_backoff, young_intent, orphan])
    );
}

async fn concurrent_claimers_never_share_a_record_while_its_lease_runs(db: Db) {
    const RECORDS: usize = 60;
    let setup = db.store().await;
    for _ in 0..RECORDS {
        let id = intent(&setup, "c", None, T0).await;
        setup.mark_deleting(id, T0).await.expect("deleting");
    }
    // Two handles, as two replicas would have: separate pools on one database.
    let replicas = [db.store().await, db.store().await];
    let now = T0 + HOUR;
    let lease = 60_000;

    for round_start in [now, now + lease] {
        let claimers: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(n, store)| {
                let store = store.clone();
                tokio::spawn(async move {
                    let owner = format!("replica-{n}");
                    let mut mine = Vec::new();
                    loop {
                        // The clock stands still: every lease runs for the whole round.
                        let claimed = store
                            .claim_due(round_start, 0, &owner, lease, 3)
                            .await
                            .expect("claim");
                        // More claims than records means some record came twice: stop, the
                        // check below names it.
                        if claimed.is_empty() || mine.len() > RECORDS {
                            return mine;
                        }
                        mine.extend(claimed.into_iter().map(|r| r.id));
                    }
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for claimer in claimers {
            for id in claimer.await.expect("claimer") {
                assert!(seen.insert(id), "{id} claimed twice while its lease ran");
            }
        }
        assert_eq!(
            seen.len(),
            RECORDS,
            "every due record is claimed in each lease period"
        );
    }
}

async fn counts_and_the_oldest_overdue_record_feed_the_metrics(db: Db) {
    let store = db.store().await;
    assert_eq!(store.oldest_overdue(T0).await.expect("overdue"), None);
    let now = T0 + 10 * HOUR;

    let _intent = intent(&store, "c", None, T0).await;
    let active_due = intent(&store, "c", None, T0).await;
    store
        .activate(active_due, T0, now - 5)
        .await
        .expect("activate");
    let active_not_due = intent(&store, "c", None, T0).await;
    store
        .activate(active_not_due, T0, now + 5)
        .await
        .expect("activate");
    let deleted = intent(&store, "c", None, T0).await;
    store.mark_deleted(deleted, T0).await.expect("deleted");

    assert_eq!(
        store.oldest_overdue(now).await.expect("overdue"),
        Some(now - 5)
    );
    // A deletion that keeps failing stays as overdue as it was: its delete_after counts, not
    // its next attempt.
    let deleting = intent(&store, "c", None, T0 - 30 * HOUR).await;
    store
        .mark_deleting(deleting, now + HOUR)
        .await
        .expect("deleting");
    store
        .record_failure(deleting, "LOCKED", now + 2 * HOUR)
        .await
        .expect("failure");
    assert_eq!(
        store.oldest_overdue(now).await.expect("overdue"),
        Some(T0 - 6 * HOUR)
    );

    assert_eq!(
        store.counts_by_state().await.expect("counts"),
        [
            (IdentityState::Intent, 1),
            (IdentityState::Active, 2),
            (IdentityState::Deleting, 1),
            (IdentityState::Deleted, 1),
        ]
    );
}

/// Starts every future (so that each queues its write before the store's writer takes any),
/// then awaits them all, in order.
async fn queued_together<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let all = futures_util::future::join_all(futures);
    tokio::pin!(all);
    if let Some(done) = all.as_mut().now_or_never() {
        return done;
    }
    all.await
}

async fn writes_queued_together_are_committed_together_and_each_answered_as_alone(db: Db) {
    let store = db.store().await;
    // 60 sessions without a reference and 60 for 6 references (10 each), queued at once.
    let ids: Vec<Uuid> = (0..120).map(|_| Uuid::new_v4()).collect();
    let users: Vec<String> = ids
        .iter()
        .map(|id| format!("user-{}", id.simple()))
        .collect();
    let digests: Vec<Option<String>> = (0..120)
        .map(|n| (n % 2 == 1).then(|| format!("ref-{}", n % 12)))
        .collect();
    let intents: Vec<NewIdentity> = (0..120)
        .map(|n| new_identity(ids[n], &users[n], "demo", digests[n].as_deref(), T0))
        .collect();
    let answers = queued_together(intents.iter().map(|i| store.insert_intent(i)).collect()).await;
    let mut new = Vec::new();
    let mut winner_of = std::collections::HashMap::new();
    for (n, answer) in answers.into_iter().enumerate() {
        match answer.expect("every write is answered with its own outcome") {
            Inserted::New => {
                new.push(ids[n]);
                if let Some(digest) = &digests[n] {
                    assert!(
                        winner_of.insert(digest.clone(), ids[n]).is_none(),
                        "two new intents for {digest}"
                    );
                }
            }
            Inserted::Existing(record) => {
                let digest = digests[n].as_deref().expect("only a reference can collide");
                assert_eq!(record.reference_digest.as_deref(), Some(digest));
                assert_eq!(record.state, IdentityState::Intent);
            }
        }
    }
    assert_eq!(
        new.len(),
        60 + 6,
        "one per session without a reference, one per reference"
    );
    for digest in digests.iter().flatten() {
        let live = store
            .find_live("demo", "default", digest)
            .await
            .expect("find_live");
        assert_eq!(live.map(|r| r.id), winner_of.get(digest).copied());
    }

    // Their activations and `created` events, queued at once: all applied, one event each.
    let created = |n: usize| ChangeEvent {
        kind: EventKind::Created,
        caller: "demo",
        request_id: Some("req"),
        at: T0 + n as Millis,
        detail: None,
        unchanged_detail: Some("not activated"),
    };
    let events: Vec<ChangeEvent> = (0..new.len()).map(created).collect();
    let activated = queued_together(
        new.iter()
            .zip(&events)
            .map(|(id, event)| store.activate_logged(*id, T0 + 1, T0 + HOUR, event))
            .collect(),
    )
    .await;
    assert!(activated.into_iter().all(|a| a.expect("activated")));
    // Activating again changes nothing but still logs, as asked, beside a plain event and a
    // touch of an active record.
    let again = queued_together(vec![
        store
            .activate_logged(new[0], T0 + 2, T0 + 2 * HOUR, &events[0])
            .boxed(),
        store.touch(new[1], T0 + 2, T0 + 2 * HOUR).boxed(),
        async {
            store
                .append_event(new[2], EventKind::Reused, "demo", None, T0 + 3, None)
                .await
                .map(|()| true)
        }
        .boxed(),
    ])
    .await;
    let again: Vec<bool> = again.into_iter().map(|a| a.expect("answered")).collect();
    assert_eq!(again, [false, true, true]);
    for (n, id) in new.iter().enumerate() {
        let record = get(&store, *id).await;
        assert_eq!(record.state, IdentityState::Active);
        let kinds: Vec<(EventKind, Option<String>)> = store
            .recent_events(*id, 10)
            .await
            .expect("events")
            .into_iter()
            .map(|e| (e.kind, e.detail))
            .collect();
        let expected: Vec<(EventKind, Option<String>)> = match n {
            0 => vec![
                (EventKind::Created, Some("not activated".into())),
                (EventKind::Created, None),
            ],
            1 => {
                assert_eq!(record.delete_after, T0 + 2 * HOUR);
                vec![(EventKind::Created, None)]
            }
            2 => vec![(EventKind::Reused, None), (EventKind::Created, None)],
            _ => vec![(EventKind::Created, None)],
        };
        assert_eq!(kinds, expected, "events of identity {n}");
    }
    let counts = store.counts_by_state().await.expect("counts");
    assert_eq!(counts[1], (IdentityState::Active, 66));
}

/// The SQLite writer keeps only a few batch statements prepared (issue 15: memory), so batches
/// of 40 sizes, twice, make it evict statements and prepare evicted shapes again.
async fn more_batch_shapes_than_the_writer_keeps_prepared_are_all_committed(db: Db) {
    let store = db.store().await;
    let mut written = 0;
    for size in (1..=40).chain(1..=40) {
        let ids: Vec<Uuid> = (0..size).map(|_| Uuid::new_v4()).collect();
        let users: Vec<String> = ids
            .iter()
            .map(|id| format!("user-{}", id.simple()))
            .collect();
        let digests: Vec<Option<String>> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| (n % 2 == 0).then(|| format!("ref-{}", id.simple())))
            .collect();
        let intents: Vec<NewIdentity> = (0..size)
            .map(|n| new_identity(ids[n], &users[n], "demo", digests[n].as_deref(), T0))
            .collect();
        let answers =
            queued_together(intents.iter().map(|i| store.insert_intent(i)).collect()).await;
        for (id, answer) in ids.iter().zip(answers) {
            assert!(
                matches!(answer, Ok(Inserted::New)),
                "batch of {size}: {answer:?}"
            );
            assert_eq!(get(&store, *id).await.state, IdentityState::Intent);
        }
        written += size;
    }
    let counts = store.counts_by_state().await.expect("counts");
    assert_eq!(counts[0], (IdentityState::Intent, written as u64));
}

async fn a_bad_write_in_a_batch_fails_alone(db: Db) {
    let store = db.store().await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (ua, ub, uc) = (
        "user-a".to_owned(),
        "user-b".to_owned(),
        "user-c".to_owned(),
    );
    let unknown = Uuid::new_v4();
    let answers = queued_together(vec![
        store
            .insert_intent(&new_identity(a, &ua, "demo", None, T0))
            .map(|r| r.map(|i| format!("{i:?}")))
            .boxed(),
        // An event for an identity that does not exist breaks the foreign key.
        store
            .append_event(unknown, EventKind::Reused, "demo", None, T0, None)
            .map(|r| r.map(|()| "event".to_owned()))
            .boxed(),
        store
            .insert_intent(&new_identity(b, &ub, "demo", Some("shared"), T0))
            .map(|r| r.map(|i| format!("{i:?}")))
            .boxed(),
        // A finAPI user id taken (case-insensitively) in the same batch.
        store
            .insert_intent(&new_identity(Uuid::new_v4(), "USER-A", "demo", None, T0))
            .map(|r| r.map(|i| format!("{i:?}")))
            .boxed(),
        store
            .insert_intent(&new_identity(c, &uc, "demo", Some("shared"), T0))
            .map(|r| r.map(|i| matches!(i, Inserted::Existing(r) if r.id == b).to_string()))
            .boxed(),
    ])
    .await;
    assert_eq!(answers[0].as_deref().ok(), Some("New"), "{answers:?}");
    assert!(
        matches!(answers[1], Err(StoreError::Other(_))),
        "{answers:?}"
    );
    assert_eq!(answers[2].as_deref().ok(), Some("New"), "{answers:?}");
    assert!(
        matches!(answers[3], Err(StoreError::Other(_))),
        "{answers:?}"
    );
    assert_eq!(answers[4].as_deref().ok(), Some("true"), "{answers:?}");
    assert_eq!(get(&store, a).await.state, IdentityState::Intent);
    assert_eq!(get(&store, b).await.state, IdentityState::Intent);
    assert_eq!(store.get(c).await.expect("get"), None);
    assert!(
        store
            .recent_events(unknown, 5)
            .await
            .expect("events")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_under_a_batch_answers_each_write_unavailable_not_hung() {
    let mut server = pg::start().await;
    let store = IdentityStore::connect(&SecretString::from(server.url()), 4)
        .await
        .expect("connects");
    intent(&store, "demo", None, T0).await;
    // A lock held elsewhere keeps the writer's next batch inside its transaction.
    let locker = sqlx::PgPool::connect(&server.url())
        .await
        .expect("raw connect");
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE identities IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let users: Vec<String> = ids
        .iter()
        .map(|id| format!("user-{}", id.simple()))
        .collect();
    let intents: Vec<NewIdentity> = ids
        .iter()
        .zip(&users)
        .map(|(id, user)| new_identity(*id, user, "demo", None, T0))
        .collect();
    let writes = futures_util::future::join_all(intents.iter().map(|i| store.insert_intent(i)));
    tokio::pin!(writes);
    assert!(
        writes.as_mut().now_or_never().is_none(),
        "the lock holds the writes"
    );
    let waiting = async {
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .fetch_one(&locker)
            .await
            .expect("pg_stat_activity");
            if blocked > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("a batch waits for the lock");
    server.stop();
    let answers = tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("every queued write is answered instead of hanging");
    for answer in answers {
        assert!(
            matches!(answer, Err(StoreError::Unavailable(_))),
            "{answer:?}"
        );
    }
    drop(lock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_postgresql_server_makes_the_store_unavailable_not_hung() {
    let mut server = pg::start().await;
    let store = IdentityStore::connect(&SecretString::from(server.url()), 4)
        .await
        .expect("connects");
    let id = intent(&store, "demo", None, T0).await;
    server.stop();

    for _ in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(20), store.get(id))
            .await
            .expect("the store answers instead of hanging");
        assert!(
            matches!(answer, Err(StoreError::Unavailable(_))),
            "{answer:?}"
        );
    }
    let connect = tokio::time::timeout(
        Duration::from_secs(20),
        IdentityStore::connect(&SecretString::from(server.url()), 4),
    )
    .await
    .expect("connect answers instead of hanging");
    assert!(
        matches!(connect, Err(StoreError::Unavailable(_))),
        "{connect:?}"
    );
}

#[tokio::test]
async fn a_file_that_is_not_an_sqlite_database_is_unavailable() {
    let dir = TempDir::new("giroident-ledger");
    let path = dir.path().join("ledger.db");
    std::fs::write(&path, vec![0x5a; 8192]).expect("write");
    let url = format!("sqlite://{}", path.display());
    let answer = IdentityStore::connect(&SecretString::from(url), 2).await;
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn database_urls_are_checked_and_never_echo_a_password() {
    const PASSWORD: &str = "s3cr3t-Pa55";
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let cases = [
        format!("postgres://user:{PASSWORD}@127.0.0.1:notaport/ledger"),
        format!("postgres://user:{PASSWORD}@127.0.0.1:{closed_port}/ledger?sslmode=bogus"),
        format!("postgresql://user@127.0.0.1:{closed_port}/ledger?password={PASSWORD}&sslmode=x"),
        // A password pasted into the wrong parameter: sqlx's message quotes the value.
        format!("postgres://user:{PASSWORD}@127.0.0.1/ledger?sslmode={PASSWORD}"),
        format!("mysql://user:{PASSWORD}@127.0.0.1/ledger"),
        format!("postgres://user:{PASSWORD}@127.0.0.1:{closed_port}/ledger"),
        "sqlite::memory:".to_owned(),
        "sqlite://file.db?mode=memory".to_owned(),
    ];
    for url in cases {
        let err = IdentityStore::connect(&SecretString::from(url.clone()), 1)
            .await
            .expect_err("refused");
        let shown = format!("{err} / {err:?} / {:?}", std::error::Error::source(&err));
        assert!(!shown.contains(PASSWORD), "{url}: {shown}");
        if url.contains(&format!(":{closed_port}/ledger")) && !url.contains("sslmode") {
            assert!(matches!(err, StoreError::Unavailable(_)), "{url}: {err:?}");
        } else {
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{url}: {err:?}");
        }
    }

    // A connected store does not show its URL either (the pool's options hold the password).
    let db = pg::database().await;
    let with_password = db
        .url()
        .replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let store = IdentityStore::connect(&SecretString::from(with_password), 1)
        .await
        .expect("trust authentication ignores the password");
    assert!(!format!("{store:?}").contains(PASSWORD));
}

#[test]
fn without_postgresql_binaries_the_tests_name_the_debian_package() {
    let empty = TempDir::new("giroident-ledger");
    let missing = pg::find_server_binaries(empty.path(), Some(empty.path().into()))
        .expect_err("no binaries in an empty directory");
    assert!(
        missing.contains("apt-get install postgresql") && missing.contains("`postgresql`"),
        "{missing}"
    );

    // The newest Debian version wins over PATH.
    for version in ["9", "15", "16"] {
        let bin = empty.path().join(version).join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for program in ["initdb", "pg_ctl"] {
            std::fs::write(bin.join(program), "").expect("write");
        }
    }
    let found = pg::find_server_binaries(empty.path(), None).expect("found");
    assert_eq!(found, empty.path().join("16").join("bin"));
}

/// A caller's reference is per finAPI client: the same reference at `default` and at `live`,
/// queued together, makes one identity at each, and each loser gets its own client's.
async fn one_reference_at_two_finapi_clients_is_two_identities_within_one_batch(db: Db) {
    let store = db.store().await;
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let users: Vec<String> = ids
        .iter()
        .map(|id| format!("user-{}", id.simple()))
        .collect();
    let client = |n: usize| {
        if n.is_multiple_of(2) {
            "default"
        } else {
            "live"
        }
    };
    let intents: Vec<NewIdentity> = (0..20)
        .map(|n| NewIdentity {
            finapi_client: client(n),
            ..new_identity(ids[n], &users[n], "demo", Some("shared-ref"), T0)
        })
        .collect();
    let answers = queued_together(intents.iter().map(|i| store.insert_intent(i)).collect()).await;
    let mut winners = std::collections::HashMap::new();
    let mut losers = Vec::new();
    for (n, answer) in answers.into_iter().enumerate() {
        match answer.expect("answered") {
            Inserted::New => assert!(
                winners.insert(client(n), ids[n]).is_none(),
                "two new intents at {}",
                client(n)
            ),
            Inserted::Existing(record) => losers.push((client(n), record)),
        }
    }
    assert_eq!(winners.len(), 2, "one identity per client");
    for (client, record) in losers {
        assert_eq!(record.finapi_client, client);
        assert_eq!(Some(&record.id), winners.get(client));
    }
    for client in ["default", "live"] {
        let live = store
            .find_live("demo", client, "shared-ref")
            .await
            .expect("find_live");
        assert_eq!(live.map(|r| r.id), winners.get(client).copied());
    }
}

/// The page size of the SQLite file at `db` (`PRAGMA page_size`), read beside the store.
async fn sqlite_page_size(db: &Db) -> i64 {
    let pool = sqlx::SqlitePool::connect(&db.url)
        .await
        .expect("raw connect");
    let size = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&pool)
        .await
        .expect("pragma");
    pool.close().await;
    size
}

/// A ledger the broker creates gets 2 KiB pages (fewer bytes per write-ahead-log frame); a
/// ledger created by an earlier broker with SQLite's 4 KiB keeps them and is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_sqlite_ledger_gets_small_pages_and_an_existing_one_keeps_its_own() {
    let fresh = Db::sqlite().await;
    let store = fresh.store().await;
    let id = intent(&store, "demo", Some("d1"), T0).await;
    assert_eq!(get(&store, id).await.caller, "demo");
    store.close().await;
    assert_eq!(sqlite_page_size(&fresh).await, 2048);

    let existing = Db::sqlite().await;
    existing.migrate_to(4).await;
    assert_eq!(sqlite_page_size(&existing).await, 4096);
    let store = existing.store().await;
    let id = intent(&store, "demo", Some("d1"), T0).await;
    assert!(
        store
            .activate(id, T0 + 1, T0 + HOUR)
            .await
            .expect("activate")
    );
    assert_eq!(get(&store, id).await.state, IdentityState::Active);
    store.close().await;
    assert_eq!(sqlite_page_size(&existing).await, 4096);
}
