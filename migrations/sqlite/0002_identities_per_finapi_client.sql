-- Several named finAPI clients (issue 13): a reference names one identity per (caller, finAPI
-- client), since a finAPI user exists at one client only. `finapi_client` already holds the
-- client each identity was made with ('default' for every record written before).
DROP INDEX identities_live_reference;
CREATE UNIQUE INDEX identities_live_reference ON identities (caller, finapi_client, reference_digest)
    WHERE reference_digest IS NOT NULL AND state IN ('intent', 'active');

DROP INDEX identities_reference;
CREATE INDEX identities_reference ON identities (caller, finapi_client, reference_digest, created_at);
