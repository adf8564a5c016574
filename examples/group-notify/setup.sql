-- Employees of three tenants, and the notifications pgfeed delivers to them.
-- Run once: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f setup.sql (after `pgfeed install`).

CREATE TABLE employees (
    id     serial PRIMARY KEY,
    tenant text NOT NULL,
    name   text NOT NULL,
    team   text NOT NULL
);

CREATE TABLE notifications (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    employee_id integer NOT NULL REFERENCES employees,
    message     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Each tenant's subscribers see their tenant's notifications, and no one else's.
SELECT pgfeed.watch('notifications', tenant_column => 'tenant');

INSERT INTO employees (tenant, name, team) VALUES
    ('acme',    'Ada',      'ops'),
    ('acme',    'Brian',    'ops'),
    ('acme',    'Chen',     'sales'),
    ('globex',  'Dana',     'ops'),
    ('globex',  'Emeka',    'ops'),
    ('globex',  'Farah',    'ops'),
    ('globex',  'Gus',      'finance'),
    ('initech', 'Hiro',     'ops'),
    ('initech', 'Ines',     'support');
