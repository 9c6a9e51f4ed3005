"""The PostgreSQL layer: connections, client tools, catalog queries, DDL, restore, swap, lock.

Every SQL statement the tool runs lives in this package."""
