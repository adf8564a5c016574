-- pgfeed schema migration 7: a tenant's replay reads its own changes, not everyone's.
--
-- A subscriber's resume (and a lagged stream's catch-up) read the journal in commit order
-- from its position, skipping other tenants' changes: a quiet tenant resuming scanned every
-- change of every tenant after its position, and a storm of such resumes kept the pool
-- busy for seconds. With these indexes a tenant with few changes in the journal reads its
-- own (and the public ones) and looks each one's commit up by xid (src/journal.rs,
-- read_tenant!). Capture pays one more index entry per tenant row (and per public row).
--
-- Building them locks the journal against watched writes for as long as they take (on a
-- large journal, run the install when it is quieter; after 30 s of waiting for the lock,
-- install gives up and can be run again).
SET LOCAL lock_timeout = '30s';
CREATE INDEX changes_tenant ON pgfeed.changes (tenant, xid) WHERE tenant IS NOT NULL;
CREATE INDEX changes_public ON pgfeed.changes (xid) WHERE public;
CREATE INDEX commits_xid ON pgfeed.commits (xid);
