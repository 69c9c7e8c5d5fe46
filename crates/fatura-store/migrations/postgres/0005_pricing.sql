-- The pricing engine: plans (versioned; terms are JSON with decimals as strings),
-- customers' plan assignments over time, dated exchange rates and operator alerts.
-- Every change to plans, assignments or rates bumps catalog_meta.revision, so events are
-- always rated with the pricing inputs current at commit (see Store::insert_events).
CREATE TABLE plans (
    id            TEXT PRIMARY KEY,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE plan_versions (
    plan_id           TEXT NOT NULL REFERENCES plans(id),
    version           BIGINT NOT NULL CHECK (version >= 1),
    name              TEXT NOT NULL,
    effective_from_us BIGINT NOT NULL,
    terms             TEXT NOT NULL,
    created_at_us     BIGINT NOT NULL,
    PRIMARY KEY (plan_id, version)
);

CREATE TABLE customer_plans (
    customer_id       TEXT NOT NULL REFERENCES customers(id),
    effective_from_us BIGINT NOT NULL,
    plan_id           TEXT REFERENCES plans(id),
    created_at_us     BIGINT NOT NULL,
    PRIMARY KEY (customer_id, effective_from_us)
);

CREATE TABLE fx_rates (
    currency      TEXT NOT NULL CHECK (currency IN ('BRL', 'EUR')),
    rate_date     DATE NOT NULL,
    rate          NUMERIC NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (currency, rate_date)
);

CREATE TABLE alerts (
    id            TEXT PRIMARY KEY,
    dedupe_key    TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    severity      TEXT NOT NULL,
    customer_id   TEXT,
    plan_id       TEXT,
    provider      TEXT,
    model         TEXT,
    reason        TEXT,
    message       TEXT NOT NULL,
    first_seen_us BIGINT NOT NULL,
    last_seen_us  BIGINT NOT NULL,
    occurrences   BIGINT NOT NULL
);
CREATE INDEX price_versions_imported ON price_versions(imported_at_us);
