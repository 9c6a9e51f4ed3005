-- Add :rows extra orders (default 100000), spread over the existing customers, to make the
-- example database bigger. Run after `alembic upgrade` has reached at least 8d4b6a0c9e12:
--
--   psql -v ON_ERROR_STOP=1 -v rows=1000000 -f examples/seed_bulk.sql "$DATABASE_URL"
--
-- The rows are deterministic for a given starting state; running it twice adds them twice.

\if :{?rows}
\else
\set rows 100000
\endif

INSERT INTO orders (customer_id, amount, placed_at)
SELECT c.ids[1 + g % cardinality(c.ids)],
       ((g::bigint * 7919) % 100000) / 100.0,
       timestamptz '2024-06-01 00:00:00+00' + g * interval '1 minute'
FROM generate_series(1, :rows) AS g,
     (SELECT array_agg(id ORDER BY id) AS ids FROM customers) AS c
WHERE cardinality(c.ids) > 0;

ANALYZE customers;
ANALYZE orders;
