-- Budgets shared by a fleet of instances (PostgreSQL only; one SQLite file serves one
-- process, which keeps its budgets in memory).
--
-- Each instance holds a share of a customer's budget (a prepaid wallet or a postpaid
-- monthly spend limit) and spends from it locally; a share is granted under a per-customer
-- advisory lock only if every live share together stays within the budget. The writer that
-- records a call's event shrinks its instance's share by the call's price in the event's
-- transaction (and adds a wallet charge to `charged`), so a committed call moves from the
-- share into the ledger without changing what is left to grant. A share is live until
-- `expires_at_us`; instances renew theirs, and the share of a dead instance runs out.
CREATE TABLE wallet_holds (
    customer_id   TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    amount        NUMERIC NOT NULL,
    charged       NUMERIC NOT NULL DEFAULT 0,
    expires_at_us BIGINT NOT NULL,
    PRIMARY KEY (customer_id, instance_id)
);
-- Charges recorded so far sit in one expired row per customer (instance '').
INSERT INTO wallet_holds (customer_id, instance_id, amount, charged, expires_at_us)
SELECT customer_id, '', 0, -SUM(amount), 0 FROM wallet_transactions
WHERE kind = 'charge' GROUP BY customer_id;
-- Credits are summed at each grant: index them apart from the (many) charges.
CREATE INDEX wallet_transactions_credits ON wallet_transactions(customer_id) WHERE kind <> 'charge';

-- Per-key rate limit windows (UTC minutes), counted by every instance.
CREATE TABLE rate_windows (
    key_id    TEXT NOT NULL,
    window_us BIGINT NOT NULL,
    requests  BIGINT NOT NULL,
    tokens    BIGINT NOT NULL,
    PRIMARY KEY (key_id, window_us)
);
