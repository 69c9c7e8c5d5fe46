-- Gateway metering: which upstream served an event, and whether its tokens were estimated.
ALTER TABLE usage_events ADD COLUMN upstream TEXT;
ALTER TABLE usage_events ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT FALSE;
