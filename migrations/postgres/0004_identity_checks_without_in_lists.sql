-- Migration 0004 rebuilds SQLite's tables (CHECK constraints without `IN` lists, events without
-- `AUTOINCREMENT`). PostgreSQL checks an `IN` list without a temporary structure and its
-- BIGSERIAL has no per-commit counter row, so nothing changes here; the migration exists so
-- that both backends carry the same versions (the schema-too-new check compares against one
-- list).
SELECT 1;
