-- pgfeed schema migration 1: the journal and the watch registry.
--
-- Applied once by `pgfeed install` (inside its transaction) when pgfeed.meta.version < 1.
-- Tables only; functions live in functions.sql, which every install re-applies.

-- Which tables are watched, and how. `pgfeed status` reads it; the triggers carry the same
-- settings as arguments so that capture never has to look them up.
CREATE TABLE pgfeed.watched (
    tbl             regclass PRIMARY KEY,
    tenant_column   name,
    exclude_columns name[]      NOT NULL DEFAULT '{}',
    public          boolean     NOT NULL,
    pk_columns      name[]      NOT NULL,
    watched_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per captured change, keyed by the writing transaction and the change's ordinal
-- inside it (statement order). The commit number is not known when the row is written;
-- it lives in pgfeed.commits and is joined by xid.
CREATE TABLE pgfeed.changes (
    xid        xid8    NOT NULL,
    ord        integer NOT NULL,
    table_name text    NOT NULL,
    op         text    NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')),
    tenant     text,
    public     boolean NOT NULL,
    pk         jsonb,
    new        jsonb,
    old        jsonb,
    changed    text[],
    PRIMARY KEY (xid, ord)
);

-- One row per committed transaction that changed watched tables. seq is drawn at commit
-- time under an advisory lock held until the commit completes, so seq follows commit
-- order: a reader that sees seq N also sees every seq below N.
CREATE TABLE pgfeed.commits (
    seq          bigint      PRIMARY KEY,
    xid          xid8        NOT NULL,
    n            integer     NOT NULL,
    committed_at timestamptz NOT NULL
);
CREATE INDEX commits_committed_at ON pgfeed.commits (committed_at);

CREATE SEQUENCE pgfeed.commit_seq AS bigint;

-- Once-per-transaction marker: its deferred constraint trigger seals the transaction at
-- commit. Rows live only for the duration of their transaction, so it is unlogged.
CREATE UNLOGGED TABLE pgfeed.seal (
    xid xid8 PRIMARY KEY
);

-- The newest position removed by pruning (pgfeed.prune): a client resuming from before it
-- has missed changes and must refetch (`event: reset`).
CREATE TABLE pgfeed.pruned (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    commit_seq bigint  NOT NULL,
    ord        integer NOT NULL
);
INSERT INTO pgfeed.pruned (commit_seq, ord) VALUES (0, 0);
