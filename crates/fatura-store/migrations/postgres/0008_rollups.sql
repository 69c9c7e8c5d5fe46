-- Rollups: usage and money per bucket (minute, hour, day; UTC) x customer x provider x
-- model x agent tag, maintained in the transaction that writes (or prices) the events.
-- Decimals are NUMERIC and are added in SQL.
CREATE TABLE rollups (
    grain               TEXT NOT NULL CHECK (grain IN ('minute', 'hour', 'day')),
    bucket_us           BIGINT NOT NULL,
    customer_id         TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    agent               TEXT NOT NULL,
    events              BIGINT NOT NULL,
    requests            BIGINT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    reasoning_tokens    BIGINT NOT NULL,
    unpriced_events     BIGINT NOT NULL,
    cost                NUMERIC NOT NULL,
    revenue             NUMERIC NOT NULL,
    PRIMARY KEY (grain, bucket_us, customer_id, provider, model, agent)
);
CREATE INDEX rollups_customer ON rollups(grain, customer_id, bucket_us);
