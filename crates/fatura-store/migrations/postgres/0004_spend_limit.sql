-- Postpaid customers' monthly spend limit (see the SQLite migration).
ALTER TABLE customers ADD COLUMN monthly_spend_limit NUMERIC;
