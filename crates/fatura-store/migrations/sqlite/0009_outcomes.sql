-- Outcomes: the value an agent generated (a conversion, a resolved ticket), idempotent by id
-- like usage events, for ROI = value / AI spend.
CREATE TABLE outcomes (
    id            TEXT PRIMARY KEY,
    content_hash  TEXT NOT NULL,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    ts_us         INTEGER NOT NULL,
    agent         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    value         TEXT NOT NULL,
    currency      TEXT NOT NULL,
    tags          TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
);
CREATE INDEX outcomes_ts ON outcomes(ts_us);
