"""Rollbacks: the lifecycle and the data, schema, full and undo procedures plugged into it;
validation, preflight status and the cleanup of their artifacts."""
