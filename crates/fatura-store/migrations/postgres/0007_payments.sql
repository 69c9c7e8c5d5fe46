-- Payment collection: each attempt to collect money (an invoice, a wallet top-up) or to
-- return it (a refund) is a row whose id is the idempotency key sent to the processor, so a
-- retried push reuses it. Webhook event ids are remembered so a repeat is ignored.
ALTER TABLE customers ADD COLUMN payment_method_id TEXT;
-- Prepaid wallets topped up automatically: when the balance drops under the threshold, the
-- amount is charged to the saved payment method.
ALTER TABLE customers ADD COLUMN auto_top_up_threshold NUMERIC;
ALTER TABLE customers ADD COLUMN auto_top_up_amount NUMERIC;

CREATE TABLE payments (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    invoice_id    TEXT REFERENCES invoices(id),
    kind          TEXT NOT NULL CHECK (kind IN ('invoice', 'top_up', 'refund')),
    amount        NUMERIC NOT NULL,
    currency      TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reference     TEXT,
    error         TEXT,
    created_at_us BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL
);
CREATE INDEX payments_invoice ON payments(invoice_id);
CREATE INDEX payments_customer ON payments(customer_id, created_at_us);

CREATE TABLE webhook_events (
    id             TEXT PRIMARY KEY,
    type           TEXT NOT NULL,
    received_at_us BIGINT NOT NULL
);
