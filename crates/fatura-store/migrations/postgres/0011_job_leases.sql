-- Leases for background work that must run on one instance of a fleet at a time (the
-- billing scheduler): the holder renews its lease every run; when it dies, the lease runs
-- out and another instance takes over.
CREATE TABLE job_leases (
    name           TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    lease_until_us BIGINT NOT NULL
);
