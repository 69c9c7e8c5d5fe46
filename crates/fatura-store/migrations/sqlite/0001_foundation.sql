-- fatura foundation schema (SQLite). Money is TEXT holding exact decimals (never REAL);
-- instants are INTEGER microseconds since the Unix epoch, UTC.
CREATE TABLE customers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    currency      TEXT NOT NULL CHECK (currency IN ('USD', 'BRL', 'EUR')),
    created_at_us INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    revoked_at_us INTEGER
);
CREATE INDEX api_keys_customer ON api_keys(customer_id);

CREATE TABLE catalog_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO catalog_meta (id, revision) VALUES (1, 0);

CREATE TABLE price_versions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    effective_from_us INTEGER NOT NULL,
    prompt            TEXT NOT NULL,
    completion        TEXT NOT NULL,
    cache_read        TEXT,
    cache_write       TEXT,
    reasoning         TEXT,
    per_request       TEXT NOT NULL,
    per_image         TEXT NOT NULL,
    web_search        TEXT NOT NULL,
    source            TEXT NOT NULL,
    imported_at_us    INTEGER NOT NULL,
    UNIQUE (provider, model, effective_from_us)
);

CREATE TABLE usage_events (
    id                  TEXT PRIMARY KEY,
    content_hash        TEXT NOT NULL,
    customer_id         TEXT NOT NULL REFERENCES customers(id),
    ts_us               INTEGER NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    requests            INTEGER NOT NULL,
    tags                TEXT NOT NULL,
    upstream_cost       TEXT,
    price_version_id    INTEGER REFERENCES price_versions(id),
    cost                TEXT,
    revenue             TEXT,
    ingested_at_us      INTEGER NOT NULL,
    -- An event is either priced (version, cost and revenue all set) or unpriced (none set).
    CHECK ((price_version_id IS NULL) = (cost IS NULL) AND (cost IS NULL) = (revenue IS NULL))
);
CREATE INDEX usage_events_customer_ts ON usage_events(customer_id, ts_us);
CREATE INDEX usage_events_ts ON usage_events(ts_us);
CREATE INDEX usage_events_model_ts ON usage_events(provider, model, ts_us);
CREATE INDEX usage_events_unpriced ON usage_events(provider, model) WHERE cost IS NULL;
