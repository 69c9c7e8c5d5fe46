-- A month grain (calendar months, UTC), so that a month's summary reads one row per
-- customer x provider x model x agent instead of one per day; month rows are summed from
-- the day rows.
ALTER TABLE rollups DROP CONSTRAINT rollups_grain_check;
ALTER TABLE rollups ADD CONSTRAINT rollups_grain_check
    CHECK (grain IN ('minute', 'hour', 'day', 'month'));
INSERT INTO rollups
SELECT 'month',
       (EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(bucket_us / 1000000) AT TIME ZONE 'UTC'))
           * 1000000)::BIGINT,
       customer_id, provider, model, agent,
       SUM(events), SUM(requests), SUM(input_tokens), SUM(output_tokens),
       SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(reasoning_tokens),
       SUM(unpriced_events), SUM(cost), SUM(revenue)
FROM rollups
WHERE grain = 'day'
GROUP BY 2, customer_id, provider, model, agent;

-- Fleet rows (customer_id '' and agent ''): every customer and agent summed per grain x
-- bucket x provider x model, for fleet-wide series. Customer ids are never empty.
INSERT INTO rollups
SELECT grain, bucket_us, '', provider, model, '',
       SUM(events), SUM(requests), SUM(input_tokens), SUM(output_tokens),
       SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(reasoning_tokens),
       SUM(unpriced_events), SUM(cost), SUM(revenue)
FROM rollups
GROUP BY grain, bucket_us, provider, model;
