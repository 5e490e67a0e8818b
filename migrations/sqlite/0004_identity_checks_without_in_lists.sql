-- The access flow's cost per session (issues 12 and 15), SQLite only: both tables rebuilt with
-- the same columns, rows, ids, constraints and indexes, two things changed.
-- - The CHECK constraints compare with `=` … `OR` instead of `IN (…)`: SQLite builds a
--   temporary b-tree for an `IN` list of more than two values each time it checks one, that is
--   for every intent, activation and event written (seen in the callgrind profile); the `OR`
--   form accepts exactly the same values.
-- - `identity_events` drops `AUTOINCREMENT`, which made every commit with an event rewrite the
--   table's row in `sqlite_sequence` (one more page, one more WAL frame). A plain INTEGER PRIMARY
--   KEY takes the largest id plus one (sqlite.org/autoinc.html): events are never deleted, so
--   ids still ascend in order of appending, which `recent_events` orders ties by.
-- The rebuild follows sqlite.org/lang_altertable.html#otheralter with foreign keys on: the new
-- events table references the new identities table, the old tables are dropped child first, and
-- renaming the new identities table rewrites the new events table's reference to it.
CREATE TABLE identities_new (
    id                TEXT    NOT NULL PRIMARY KEY,
    finapi_user_id    TEXT    NOT NULL,
    caller            TEXT    NOT NULL,
    reference_digest  TEXT    NULL,
    key_id            TEXT    NOT NULL,
    finapi_client     TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state = 'intent' OR state = 'active' OR state = 'deleting' OR state = 'deleted'),
    created_at        INTEGER NOT NULL,
    last_session_at   INTEGER NULL,
    delete_after      INTEGER NOT NULL,
    deleted_at        INTEGER NULL,
    deletion_attempts INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NULL,
    next_attempt_at   INTEGER NOT NULL,
    lease_owner       TEXT    NULL,
    lease_until       INTEGER NULL
);

INSERT INTO identities_new (id, finapi_user_id, caller, reference_digest, key_id, finapi_client,
        state, created_at, last_session_at, delete_after, deleted_at, deletion_attempts,
        last_error, next_attempt_at, lease_owner, lease_until)
    SELECT id, finapi_user_id, caller, reference_digest, key_id, finapi_client, state,
        created_at, last_session_at, delete_after, deleted_at, deletion_attempts, last_error,
        next_attempt_at, lease_owner, lease_until
    FROM identities;

CREATE TABLE identity_events_new (
    id          INTEGER NOT NULL PRIMARY KEY,
    identity_id TEXT    NOT NULL REFERENCES identities_new (id),
    kind        TEXT    NOT NULL CHECK (kind = 'created' OR kind = 'reused' OR kind = 'deleted' OR kind = 'deletion_failed' OR kind = 'never_created'),
    caller      TEXT    NOT NULL,
    request_id  TEXT    NULL,
    at          INTEGER NOT NULL,
    detail      TEXT    NULL
);

INSERT INTO identity_events_new (id, identity_id, kind, caller, request_id, at, detail)
    SELECT id, identity_id, kind, caller, request_id, at, detail FROM identity_events;

DROP TABLE identity_events;
DROP TABLE identities;
ALTER TABLE identities_new RENAME TO identities;
ALTER TABLE identity_events_new RENAME TO identity_events;

-- The indexes of migrations 0001 to 0003, unchanged.
CREATE UNIQUE INDEX identities_finapi_user ON identities (lower(finapi_user_id));
CREATE UNIQUE INDEX identities_live_reference ON identities (caller, finapi_client, reference_digest)
    WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active');
CREATE INDEX identities_reference ON identities (caller, finapi_client, reference_digest, created_at)
    WHERE reference_digest IS NOT NULL;
CREATE INDEX identities_due_active ON identities (delete_after) WHERE state = 'active';
CREATE INDEX identities_due_retry ON identities (next_attempt_at) WHERE state IN ('intent', 'deleting');
CREATE INDEX identity_events_identity ON identity_events (identity_id, at, id);
