-- Rollups: usage and money per bucket (minute, hour, day; UTC) x customer x provider x
-- model x agent tag, maintained in the transaction that writes (or prices) the events.
-- Cost and revenue (non-negative, at most 18 decimal places) are kept exactly as two
-- integers, whole units and attounits (10^-18), so the upsert adds them in SQL with
-- integer arithmetic (SQLite would add decimal text as floats).
CREATE TABLE rollups (
    grain               TEXT NOT NULL CHECK (grain IN ('minute', 'hour', 'day')),
    bucket_us           INTEGER NOT NULL,
    customer_id         TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    agent               TEXT NOT NULL,
    events              INTEGER NOT NULL,
    requests            INTEGER NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    unpriced_events     INTEGER NOT NULL,
    cost_units          INTEGER NOT NULL,
    cost_atto           INTEGER NOT NULL CHECK (cost_atto BETWEEN 0 AND 999999999999999999),
    revenue_units       INTEGER NOT NULL,
    revenue_atto        INTEGER NOT NULL CHECK (revenue_atto BETWEEN 0 AND 999999999999999999),
    PRIMARY KEY (grain, bucket_us, customer_id, provider, model, agent)
);
CREATE INDEX rollups_customer ON rollups(grain, customer_id, bucket_us);
