-- Notify a group: one statement writes one notification per employee on the ops team,
-- across every tenant. It commits once and rings pgfeed's doorbell once; the gateway reads
-- the rows from the journal and each tenant's subscribers receive exactly their own.
-- Run: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f notify.sql

INSERT INTO notifications (tenant, employee_id, message)
SELECT e.tenant, e.id, 'The on-call rota for next week is published'
FROM employees AS e
WHERE e.team = 'ops'
ORDER BY e.id;
