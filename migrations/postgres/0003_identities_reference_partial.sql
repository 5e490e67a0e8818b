-- The access flow's cost per session (issue 12): a record without a reference is never looked
-- up by reference, so `identities_reference` leaves it out and an intent without a
-- `clientReference` writes one index entry fewer. Its lookups (`find_latest`: caller,
-- finAPI client and `reference_digest = $3`) imply `reference_digest IS NOT NULL`, so they
-- still use it (checked with EXPLAIN QUERY PLAN on SQLite and EXPLAIN on PostgreSQL).
DROP INDEX identities_reference;
CREATE INDEX identities_reference ON identities (caller, finapi_client, reference_digest, created_at)
    WHERE reference_digest IS NOT NULL;
