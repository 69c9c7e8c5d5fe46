-- Prepaid wallets (see the SQLite migration for the model).
ALTER TABLE customers ADD COLUMN billing_mode TEXT NOT NULL DEFAULT 'postpaid'
    CHECK (billing_mode IN ('prepaid', 'postpaid'));

CREATE TABLE wallet_transactions (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    kind          TEXT NOT NULL CHECK (kind IN ('purchased', 'granted', 'charge')),
    amount        NUMERIC NOT NULL,
    currency      TEXT NOT NULL,
    event_id      TEXT UNIQUE REFERENCES usage_events(id),
    expires_at_us BIGINT,
    created_at_us BIGINT NOT NULL,
    CHECK ((kind = 'charge') = (event_id IS NOT NULL))
);
CREATE INDEX wallet_transactions_customer ON wallet_transactions(customer_id, created_at_us);
