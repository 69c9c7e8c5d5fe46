-- Billing: per-customer settings, invoices (and credit notes) with gapless numbers, and the
-- link from each billed event to the one invoice that billed it.
ALTER TABLE customers ADD COLUMN billing_anchor_day INTEGER NOT NULL DEFAULT 1
    CHECK (billing_anchor_day BETWEEN 1 AND 28);
ALTER TABLE customers ADD COLUMN timezone TEXT NOT NULL DEFAULT 'UTC';
ALTER TABLE customers ADD COLUMN payment_terms_days INTEGER NOT NULL DEFAULT 30
    CHECK (payment_terms_days BETWEEN 0 AND 365);
ALTER TABLE customers ADD COLUMN tax_rate TEXT;
ALTER TABLE customers ADD COLUMN locale TEXT NOT NULL DEFAULT 'en' CHECK (locale IN ('en', 'pt-BR'));
ALTER TABLE customers ADD COLUMN stripe_customer_id TEXT;
ALTER TABLE customers ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'suspended'));
ALTER TABLE customers ADD COLUMN status_reason TEXT;

CREATE TABLE invoices (
    id                  TEXT PRIMARY KEY,
    customer_id         TEXT NOT NULL REFERENCES customers(id),
    kind                TEXT NOT NULL CHECK (kind IN ('invoice', 'credit_note')),
    number              TEXT UNIQUE,
    status              TEXT NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'void')),
    period_start_us     INTEGER NOT NULL,
    period_end_us       INTEGER NOT NULL,
    currency            TEXT NOT NULL,
    subtotal            TEXT NOT NULL,
    tax                 TEXT NOT NULL,
    total               TEXT NOT NULL,
    prepaid_applied     TEXT NOT NULL,
    prepaid_excess      TEXT NOT NULL,
    amount_due          TEXT NOT NULL,
    document            TEXT NOT NULL,
    corrects_invoice_id TEXT REFERENCES invoices(id),
    events              INTEGER NOT NULL,
    created_at_us       INTEGER NOT NULL,
    finalized_at_us     INTEGER,
    due_at_us           INTEGER,
    paid_at_us          INTEGER,
    voided_at_us        INTEGER,
    payment_attempts    INTEGER NOT NULL DEFAULT 0,
    payment_reference   TEXT,
    last_payment_error  TEXT,
    -- A number exactly when finalised (drafts have none; void keeps it).
    CHECK ((number IS NULL) = (finalized_at_us IS NULL))
);
-- One live invoice per customer cycle: a second run, or a second instance, inserts nothing.
CREATE UNIQUE INDEX invoices_one_per_cycle ON invoices(customer_id, period_start_us)
    WHERE kind = 'invoice' AND status <> 'void';
CREATE INDEX invoices_customer ON invoices(customer_id, period_start_us);

CREATE TABLE invoice_numbers (
    series TEXT PRIMARY KEY,
    last   INTEGER NOT NULL
);

ALTER TABLE usage_events ADD COLUMN invoice_id TEXT REFERENCES invoices(id);
CREATE INDEX usage_events_uninvoiced ON usage_events(customer_id, ts_us) WHERE invoice_id IS NULL;
