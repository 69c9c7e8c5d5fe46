-- Postpaid customers may have a monthly spend limit (USD, the provisional price of their
-- calls in the current UTC month); the gateway refuses calls that could exceed it.
ALTER TABLE customers ADD COLUMN monthly_spend_limit TEXT;
