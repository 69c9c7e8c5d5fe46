-- fatura foundation schema (PostgreSQL). Money is NUMERIC (exact); instants are BIGINT
-- microseconds since the Unix epoch, UTC, as on SQLite, so both stores share one model.
CREATE TABLE customers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    currency      TEXT NOT NULL CHECK (currency IN ('USD', 'BRL', 'EUR')),
    created_at_us BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    revoked_at_us BIGINT
);
CREATE INDEX api_keys_customer ON api_keys(customer_id);

CREATE TABLE catalog_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO catalog_meta (id, revision) VALUES (1, 0);

CREATE TABLE price_versions (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    effective_from_us BIGINT NOT NULL,
    prompt            NUMERIC NOT NULL,
    completion        NUMERIC NOT NULL,
    cache_read        NUMERIC,
    cache_write       NUMERIC,
    reasoning         NUMERIC,
    per_request       NUMERIC NOT NULL,
    per_image         NUMERIC NOT NULL,
    web_search        NUMERIC NOT NULL,
    source            TEXT NOT NULL,
    imported_at_us    BIGINT NOT NULL,
    UNIQUE (provider, model, effective_from_us)
);

CREATE TABLE usage_events (
    id                  TEXT PRIMARY KEY,
    content_hash        TEXT NOT NULL,
    customer_id         TEXT NOT NULL REFERENCES customers(id),
    ts_us               BIGINT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    reasoning_tokens    BIGINT NOT NULL,
    requests            BIGINT NOT NULL,
    tags                JSONB NOT NULL,
    upstream_cost       NUMERIC,
    price_version_id    BIGINT REFERENCES price_versions(id),
    cost                NUMERIC,
    revenue             NUMERIC,
    ingested_at_us      BIGINT NOT NULL,
    CHECK ((price_version_id IS NULL) = (cost IS NULL) AND (cost IS NULL) = (revenue IS NULL))
);
CREATE INDEX usage_events_customer_ts ON usage_events(customer_id, ts_us);
CREATE INDEX usage_events_ts ON usage_events(ts_us);
CREATE INDEX usage_events_model_ts ON usage_events(provider, model, ts_us);
CREATE INDEX usage_events_unpriced ON usage_events(provider, model) WHERE cost IS NULL;
