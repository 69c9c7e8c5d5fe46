-- Gateway metering: which upstream served an event, and whether its tokens were estimated.
ALTER TABLE usage_events ADD COLUMN upstream TEXT;
ALTER TABLE usage_events ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0 CHECK (estimated IN (0, 1));
