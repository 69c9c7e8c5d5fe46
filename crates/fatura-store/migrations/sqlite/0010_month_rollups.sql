-- A month grain (calendar months, UTC), so that a month's summary reads one row per
-- customer x provider x model x agent instead of one per day. SQLite cannot alter a CHECK
-- constraint: the table is rebuilt, then the month rows are summed from the day rows.
CREATE TABLE rollups_new (
    grain               TEXT NOT NULL CHECK (grain IN ('minute', 'hour', 'day', 'month')),
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
INSERT INTO rollups_new SELECT * FROM rollups;
DROP TABLE rollups;
ALTER TABLE rollups_new RENAME TO rollups;
CREATE INDEX rollups_customer ON rollups(grain, customer_id, bucket_us);

-- Attounits are summed in two 9-digit halves (no overflow), then carried.
INSERT INTO rollups
SELECT 'month', bucket_us, customer_id, provider, model, agent, events, requests, input_tokens,
       output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, unpriced_events,
       cost_units + (cost_hi + cost_lo / 1000000000) / 1000000000,
       ((cost_hi + cost_lo / 1000000000) % 1000000000) * 1000000000 + cost_lo % 1000000000,
       revenue_units + (revenue_hi + revenue_lo / 1000000000) / 1000000000,
       ((revenue_hi + revenue_lo / 1000000000) % 1000000000) * 1000000000 + revenue_lo % 1000000000
FROM (
    SELECT CAST(strftime('%s', bucket_us / 1000000, 'unixepoch', 'start of month') AS INTEGER) * 1000000
               AS bucket_us,
           customer_id, provider, model, agent,
           SUM(events) AS events, SUM(requests) AS requests, SUM(input_tokens) AS input_tokens,
           SUM(output_tokens) AS output_tokens, SUM(cached_input_tokens) AS cached_input_tokens,
           SUM(cache_write_tokens) AS cache_write_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
           SUM(unpriced_events) AS unpriced_events,
           SUM(cost_units) AS cost_units, SUM(cost_atto / 1000000000) AS cost_hi,
           SUM(cost_atto % 1000000000) AS cost_lo,
           SUM(revenue_units) AS revenue_units, SUM(revenue_atto / 1000000000) AS revenue_hi,
           SUM(revenue_atto % 1000000000) AS revenue_lo
    FROM rollups
    WHERE grain = 'day'
    GROUP BY 1, customer_id, provider, model, agent
);

-- Fleet rows (customer_id '' and agent ''): every customer and agent summed per grain x
-- bucket x provider x model, for fleet-wide series. Customer ids are never empty.
INSERT INTO rollups
SELECT grain, bucket_us, '', provider, model, '', events, requests, input_tokens,
       output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, unpriced_events,
       cost_units + (cost_hi + cost_lo / 1000000000) / 1000000000,
       ((cost_hi + cost_lo / 1000000000) % 1000000000) * 1000000000 + cost_lo % 1000000000,
       revenue_units + (revenue_hi + revenue_lo / 1000000000) / 1000000000,
       ((revenue_hi + revenue_lo / 1000000000) % 1000000000) * 1000000000 + revenue_lo % 1000000000
FROM (
    SELECT grain, bucket_us, provider, model,
           SUM(events) AS events, SUM(requests) AS requests, SUM(input_tokens) AS input_tokens,
           SUM(output_tokens) AS output_tokens, SUM(cached_input_tokens) AS cached_input_tokens,
           SUM(cache_write_tokens) AS cache_write_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
           SUM(unpriced_events) AS unpriced_events,
           SUM(cost_units) AS cost_units, SUM(cost_atto / 1000000000) AS cost_hi,
           SUM(cost_atto % 1000000000) AS cost_lo,
           SUM(revenue_units) AS revenue_units, SUM(revenue_atto / 1000000000) AS revenue_hi,
           SUM(revenue_atto % 1000000000) AS revenue_lo
    FROM rollups
    GROUP BY grain, bucket_us, provider, model
);
