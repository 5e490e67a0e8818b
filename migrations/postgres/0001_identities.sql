-- The identity ledger (issue 12): one row per finAPI user the broker creates, written as an
-- intent before `POST /api/v2/users`. Never a token, a password, an e-mail, a phone number or a
-- caller's raw reference in any column. Times are unix milliseconds (UTC).
CREATE TABLE identities (
    id                TEXT    NOT NULL PRIMARY KEY,
    finapi_user_id    TEXT    NOT NULL,
    caller            TEXT    NOT NULL,
    reference_digest  TEXT    NULL,
    key_id            TEXT    NOT NULL,
    finapi_client     TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('intent', 'active', 'deleting', 'deleted')),
    created_at        BIGINT  NOT NULL,
    last_session_at   BIGINT  NULL,
    delete_after      BIGINT  NOT NULL,
    deleted_at        BIGINT  NULL,
    deletion_attempts BIGINT  NOT NULL DEFAULT 0,
    last_error        TEXT    NULL,
    next_attempt_at   BIGINT  NOT NULL,
    lease_owner       TEXT    NULL,
    lease_until       BIGINT  NULL
);

-- finAPI user ids are case-insensitive: one record per id, looked up by its lower-case form.
CREATE UNIQUE INDEX identities_finapi_user ON identities (lower(finapi_user_id));

-- At most one reusable (intent or active) identity per caller and reference: concurrent
-- requests for one reference converge on one finAPI user.
CREATE UNIQUE INDEX identities_live_reference ON identities (caller, reference_digest)
    WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active');

-- The newest record of any state for a caller's reference (GET/DELETE of an identity).
CREATE INDEX identities_reference ON identities (caller, reference_digest, created_at);

-- The reaper's scans: active records by delete_after, intent and deleting ones by next attempt.
CREATE INDEX identities_due_active ON identities (delete_after) WHERE state = 'active';
CREATE INDEX identities_due_retry ON identities (next_attempt_at) WHERE state IN ('intent', 'deleting');

CREATE TABLE identity_events (
    id          BIGSERIAL PRIMARY KEY,
    identity_id TEXT    NOT NULL REFERENCES identities (id),
    kind        TEXT    NOT NULL CHECK (kind IN ('created', 'reused', 'deleted', 'deletion_failed', 'never_created')),
    caller      TEXT    NOT NULL,
    request_id  TEXT    NULL,
    at          BIGINT  NOT NULL,
    detail      TEXT    NULL
);

CREATE INDEX identity_events_identity ON identity_events (identity_id, at, id);
