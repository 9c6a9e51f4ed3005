"""Backups: create (pg_dump with a manifest), the catalog of stored backups, verification."""
