//! Issue 15, items 1 and 2, as the attacker: an ordinary application role that owns the
//! database (and so, on PostgreSQL 15, its `public` schema) plants traps for every
//! operator and function pgfeed's SQL could bind to through `search_path`, both in `public`
//! and in a schema it puts first with `ALTER DATABASE ... SET search_path`. Each trap
//! records who called it and returns the right answer. pgfeed's privileged side (install,
//! watch and status from the CLI, and a gateway serving, replaying and reloading its
//! catalog) must never call one. And the least-privilege role a gateway can run as.

use pgfeed_testkit as support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use support::{Gateway, Run, SseClient, TestDb, eventually, query_i64, sample, scrape};
use tokio_postgres::Client;

use support::Notices;

/// The prefix of the warning a trap raises when a role other than the application's calls
/// it: the only record left when the caller's work is rolled back (capture's rendering
/// sandbox is always rolled back, and is read-only besides).
const TRAP_WARNING: &str = "pgfeed-test trap";

/// Connects to `db` as `role` (password `pw`; the test URL's user when `None`), with
/// `search_path` pinned by a startup option when given. Notices are collected.
async fn session(db: &TestDb, role: Option<&str>, search_path: Option<&str>) -> (Client, Notices) {
    let mut config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    if let Some(role) = role {
        config.user(role).password("pw");
    }
    if let Some(path) = search_path {
        let options = match config.get_options() {
            Some(theirs) => format!("{theirs} -c search_path={path}"),
            None => format!("-c search_path={path}"),
        };
        config.options(&options);
    }
    support::connect_collecting_notices(&config).await
}

/// A connection as the test URL's (super)user that searches nothing an application can
/// create objects in, for the test's own queries.
async fn superuser(db: &TestDb) -> Client {
    session(db, None, Some("pg_catalog,pg_temp")).await.0
}

/// The user of the test URL: pgfeed's privileged side.
fn superuser_name(db: &TestDb) -> String {
    let config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    config.get_user().unwrap_or("postgres").to_string()
}

/// The test URL with the user replaced by `role` (password `pw`).
fn url_as(db: &TestDb, role: &str) -> String {
    let config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => panic!("this test needs a TCP host in the test URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("postgres://{role}:pw@{host}:{port}/{}", db.name)
}

/// Runs a `pgfeed` subcommand on `db` as the test URL's user and asserts it succeeded;
/// returns its stdout.
async fn cli(db: &TestDb, args: &[&str]) -> String {
    let out = support::pgfeed_cli(db, args).await;
    assert!(
        out.status.success(),
        "`pgfeed {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names of every function pgfeed's own SQL and Rust could call: identifiers followed by
/// `(` in `sql/*.sql` and `src/**/*.rs`, lower-cased. Most are not PostgreSQL functions;
/// the trap setup keeps those that are.
fn names_called_in_source() -> Vec<String> {
    fn files(dir: &Path, ext: &str, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, ext, out);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    files(&root.join("sql"), "sql", &mut paths);
    files(&root.join("src"), "rs", &mut paths);
    let mut names = std::collections::BTreeSet::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            let starts = (c.is_ascii_alphabetic() || c == b'_')
                && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
            if !starts {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let mut j = i;
            while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t') {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'(' {
                names.insert(text[start..i].to_ascii_lowercase());
            }
        }
    }
    names.into_iter().collect()
}

/// The trap net, run by the application role on a connection whose `search_path` is
/// `pg_catalog, public` (`{app}` is its name). `pg_temp.make_traps(names)` returns how many
/// traps of each kind it made: identical copies in `evil` of pg_catalog's operators over
/// ordinary types; exact-match operators, in `public` and `evil`, that pg_catalog lacks but
/// would match by coercion; identical copies in `evil` of the pg_catalog functions named in
/// `names`; and concrete exact-match copies, in `public` and `evil`, of those of them that
/// take pseudo types. Every trap logs and then returns what pg_catalog's would.
const TRAP_NET: &str = r##"
CREATE TABLE public.trap_log (caller name, session_caller name, what text);
GRANT INSERT ON public.trap_log TO PUBLIC;
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO PUBLIC;

-- Logs a call. The insert fails in a read-only transaction (capture's rendering sandbox)
-- and is undone with a rolled-back subtransaction: the warning, sent to whichever session
-- ran the trap, stays.
CREATE FUNCTION public.trap_note(what text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    BEGIN
        INSERT INTO public.trap_log VALUES (current_user, session_user, what);
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    IF current_user OPERATOR(pg_catalog.<>) '{app}'
       OR session_user OPERATOR(pg_catalog.<>) '{app}' THEN
        RAISE WARNING 'pgfeed-test trap % called by % (session %)', what, current_user, session_user;
    END IF;
END
$f$;

CREATE FUNCTION pg_temp.make_traps(fnames text[]) RETURNS int[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    ordinary regtype[] := ARRAY['oid', 'regclass', 'regtype', 'name', 'text', '"char"', 'int2',
        'int4', 'int8', 'numeric', 'bool', 'jsonb', 'json', 'xid8', 'timestamptz', 'interval',
        'int2vector', 'text[]', 'name[]', 'int2[]']::regtype[];
    used_ops text[] := ARRAY['=', '<>', '<', '<=', '>', '>=', '||', '-', '->', '->>', '?', '?&',
        '@>', '<@', '&&', '~~'];
    o record;
    f record;
    sch text;
    op text;
    l regtype;
    r regtype;
    res regtype;
    fn text;
    args text;
    call text;
    e regtype;
    a regtype;
    d regtype;
    extra text;
    sig text;
    done text[];
    has_elem boolean;
    has_any boolean;
    n_ops int := 0;
    n_coerced int := 0;
    n_funcs int := 0;
    n_concrete int := 0;
BEGIN
    -- Identical copies in evil of pg_catalog's operators over ordinary types.
    FOR o IN
        SELECT p.oid, p.oprname, p.oprleft, p.oprright, p.oprresult
        FROM pg_operator AS p
        WHERE p.oprnamespace = 'pg_catalog'::regnamespace
          AND (p.oprleft = 0 OR p.oprleft = ANY (ordinary))
          AND p.oprright = ANY (ordinary)
          AND (SELECT t.typtype FROM pg_type AS t WHERE t.oid = p.oprresult) <> 'p'
    LOOP
        fn := format('evil.trap_op_%s', o.oid);
        BEGIN
            IF o.oprleft = 0 THEN
                EXECUTE format('CREATE FUNCTION %s(%s) RETURNS %s LANGUAGE sql '
                               'SET search_path = pg_catalog, pg_temp AS %L',
                    fn, o.oprright::regtype, o.oprresult::regtype,
                    format('SELECT public.trap_note(%L); SELECT OPERATOR(pg_catalog.%s) $1',
                           'evil.' || o.oid::regoperator::text, o.oprname));
                EXECUTE format('CREATE OPERATOR evil.%s (RIGHTARG = %s, FUNCTION = %s)',
                    o.oprname, o.oprright::regtype, fn);
            ELSE
                EXECUTE format('CREATE FUNCTION %s(%s, %s) RETURNS %s LANGUAGE sql '
                               'SET search_path = pg_catalog, pg_temp AS %L',
                    fn, o.oprleft::regtype, o.oprright::regtype, o.oprresult::regtype,
                    format('SELECT public.trap_note(%L); SELECT $1 OPERATOR(pg_catalog.%s) $2',
                           'evil.' || o.oid::regoperator::text, o.oprname));
                EXECUTE format('CREATE OPERATOR evil.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %s)',
                    o.oprname, o.oprleft::regtype, o.oprright::regtype, fn);
            END IF;
            n_ops := n_ops + 1;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
    END LOOP;

    -- Exact-match operators that pg_catalog lacks, in public and evil, for the pairs of
    -- ordinary types that pg_catalog's operator of that name accepts by coercion.
    FOREACH op IN ARRAY used_ops LOOP
        FOREACH l IN ARRAY ordinary LOOP
            FOREACH r IN ARRAY ordinary LOOP
                CONTINUE WHEN EXISTS (
                    SELECT FROM pg_operator AS p
                    WHERE p.oprnamespace = 'pg_catalog'::regnamespace AND p.oprname = op
                      AND p.oprleft = l AND p.oprright = r);
                BEGIN
                    EXECUTE format('SELECT pg_typeof(NULL::%s OPERATOR(pg_catalog.%s) NULL::%s)',
                                   l, op, r)
                        INTO res;
                EXCEPTION WHEN OTHERS THEN
                    CONTINUE;
                END;
                FOREACH sch IN ARRAY ARRAY['public', 'evil'] LOOP
                    fn := format('%I.trap_coerced_%s', sch, n_coerced);
                    BEGIN
                        EXECUTE format('CREATE FUNCTION %s(%s, %s) RETURNS %s LANGUAGE sql '
                                       'SET search_path = pg_catalog, pg_temp AS %L',
                            fn, l, r, res,
                            format('SELECT public.trap_note(%L); SELECT $1 OPERATOR(pg_catalog.%s) $2',
                                   format('%s.%s(%s,%s)', sch, op, l, r), op));
                        EXECUTE format('CREATE OPERATOR %I.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %s)',
                            sch, op, l, r, fn);
                        n_coerced := n_coerced + 1;
                    EXCEPTION WHEN OTHERS THEN
                        NULL;
                    END;
                END LOOP;
            END LOOP;
        END LOOP;
    END LOOP;

    -- Identical copies in evil of the named pg_catalog functions without pseudo types.
    FOR f IN
        SELECT p.oid, p.proname, p.pronargs, p.provariadic, p.proretset,
               p.proallargtypes IS NOT NULL AS has_out
        FROM pg_proc AS p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind = 'f'
          AND p.proname = ANY (fnames)
          AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::oid[]) AS a(t)
                          JOIN pg_type AS ty ON ty.oid = a.t WHERE ty.typtype = 'p')
    LOOP
        SELECT string_agg(CASE WHEN i = f.pronargs AND f.provariadic <> 0 THEN 'VARIADIC ' ELSE '' END
                          || '$' || i, ', ' ORDER BY i)
        INTO args FROM generate_series(1, f.pronargs) AS i;
        IF f.proretset OR f.has_out THEN
            call := format('SELECT * FROM pg_catalog.%I(%s)', f.proname, coalesce(args, ''));
        ELSE
            call := format('SELECT pg_catalog.%I(%s)', f.proname, coalesce(args, ''));
        END IF;
        BEGIN
            EXECUTE format('CREATE FUNCTION evil.%I(%s) RETURNS %s LANGUAGE sql '
                           'SET search_path = pg_catalog, pg_temp AS %L',
                f.proname, pg_get_function_arguments(f.oid), pg_get_function_result(f.oid),
                format('SELECT public.trap_note(%L); %s', 'evil.' || f.oid::regprocedure::text, call));
            n_funcs := n_funcs + 1;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
    END LOOP;

    -- Concrete exact-match copies, in public and evil, of the named pg_catalog functions
    -- that take polymorphic types or "any" (VARIADIC "any" with up to two arguments).
    FOR f IN
        SELECT p.oid, p.proname, p.proargtypes::oid[] AS argtypes, p.provariadic, p.proretset,
               p.prorettype
        FROM pg_proc AS p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind = 'f'
          AND p.proname = ANY (fnames)
          AND EXISTS (SELECT FROM unnest(p.proargtypes::oid[]) AS a(t)
                      JOIN pg_type AS ty ON ty.oid = a.t WHERE ty.typtype = 'p')
          AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::oid[]) AS a(t)
                          JOIN pg_type AS ty ON ty.oid = a.t
                          WHERE ty.typtype = 'p' AND a.t <> ALL (ARRAY['"any"', 'anyelement',
                              'anyarray', 'anynonarray', 'anycompatible', 'anycompatiblearray',
                              'anycompatiblenonarray']::regtype[]))
    LOOP
        done := '{}';
        has_elem := f.argtypes && ARRAY['anyelement', 'anynonarray', 'anycompatible',
            'anycompatiblenonarray', 'anyarray', 'anycompatiblearray']::regtype[]::oid[];
        has_any := array_position(f.argtypes, '"any"'::regtype::oid) < cardinality(f.argtypes)
            OR (f.provariadic = 0 AND '"any"'::regtype = ANY (f.argtypes));
        FOREACH e IN ARRAY ordinary LOOP
            CONTINUE WHEN NOT has_elem AND e <> 'text'::regtype;
            CONTINUE WHEN (SELECT t.typcategory = 'A' OR t.typarray = 0 FROM pg_type AS t WHERE t.oid = e);
            a := (SELECT t.typarray FROM pg_type AS t WHERE t.oid = e);
            FOREACH d IN ARRAY ordinary LOOP
                CONTINUE WHEN NOT has_any AND d <> 'text'::regtype;
                FOR extra IN SELECT '' UNION ALL SELECT x::text FROM unnest(ordinary) AS x
                             UNION ALL SELECT x::text || ', ' || y::text
                             FROM unnest(ordinary) AS x, unnest(ordinary) AS y LOOP
                    CONTINUE WHEN f.provariadic <> '"any"'::regtype AND extra <> '';
                    SELECT string_agg(CASE
                               WHEN i = cardinality(f.argtypes) AND f.provariadic = '"any"'::regtype THEN extra
                               WHEN t IN ('anyelement'::regtype, 'anynonarray'::regtype, 'anycompatible'::regtype,
                                          'anycompatiblenonarray'::regtype) THEN e::text
                               WHEN t IN ('anyarray'::regtype, 'anycompatiblearray'::regtype) THEN a::text
                               WHEN t = '"any"'::regtype THEN d::text
                               ELSE t::regtype::text END, ', ' ORDER BY i)
                    INTO sig
                    FROM unnest(f.argtypes) WITH ORDINALITY AS u(t, i);
                    sig := regexp_replace(coalesce(sig, ''), '(^, |, $)', '');
                    CONTINUE WHEN sig = ANY (done);
                    done := done || sig;
                    res := CASE
                        WHEN f.prorettype IN ('anyelement'::regtype, 'anycompatible'::regtype) THEN e
                        WHEN f.prorettype IN ('anyarray'::regtype, 'anycompatiblearray'::regtype) THEN a
                        ELSE f.prorettype END;
                    SELECT string_agg('$' || i, ', ' ORDER BY i) INTO args
                    FROM generate_series(1, cardinality(string_to_array(nullif(sig, ''), ', '))) AS i;
                    IF f.proretset THEN
                        call := format('SELECT * FROM pg_catalog.%I(%s)', f.proname, coalesce(args, ''));
                    ELSE
                        call := format('SELECT pg_catalog.%I(%s)', f.proname, coalesce(args, ''));
                    END IF;
                    FOREACH sch IN ARRAY ARRAY['public', 'evil'] LOOP
                        BEGIN
                            EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s%s LANGUAGE sql '
                                           'SET search_path = pg_catalog, pg_temp AS %L',
                                sch, f.proname, sig, CASE WHEN f.proretset THEN 'SETOF ' ELSE '' END, res,
                                format('SELECT public.trap_note(%L); %s',
                                       format('%s.%s(%s)', sch, f.proname, sig), call));
                            n_concrete := n_concrete + 1;
                        EXCEPTION WHEN OTHERS THEN
                            NULL;
                        END;
                    END LOOP;
                END LOOP;
            END LOOP;
        END LOOP;
    END LOOP;
    -- SQL functions cannot take record; PL/pgSQL ones can.
    FOREACH sch IN ARRAY ARRAY['public', 'evil'] LOOP
        EXECUTE format('CREATE FUNCTION %I.to_jsonb(r record) RETURNS jsonb LANGUAGE plpgsql '
                       'SET search_path = pg_catalog, pg_temp AS %L', sch,
            format('BEGIN PERFORM public.trap_note(%L); RETURN pg_catalog.to_jsonb(r); END',
                   sch || '.to_jsonb(record)'));
        n_concrete := n_concrete + 1;
    END LOOP;

    RETURN ARRAY[n_ops, n_coerced, n_funcs, n_concrete];
END
$f$;
"##;

/// Traps the issue names, each of which pgfeed's SQL bound to or could bind to.
const MUST_EXIST: &[&str] = &[
    "SELECT 'public.=(oid,regclass)'::regoperator",
    "SELECT 'evil.=(oid,regclass)'::regoperator",
    "SELECT 'public.||(name,name)'::regoperator",
    "SELECT 'public.>=(oid,integer)'::regoperator",
    "SELECT 'evil.=(oid,oid)'::regoperator",
    "SELECT 'evil.=(name,name)'::regoperator",
    "SELECT 'evil.=(integer,integer)'::regoperator",
    "SELECT 'public.pg_column_size(jsonb)'::regprocedure",
    "SELECT 'public.jsonb_build_object(text,jsonb)'::regprocedure",
    "SELECT 'public.to_jsonb(record)'::regprocedure",
    "SELECT 'evil.now()'::regprocedure",
    "SELECT 'evil.pg_notify(text,text)'::regprocedure",
];

/// The application role sets up its tables and the trap net. Returns its connection
/// (pinned to `pg_catalog, public`, so that its own statements trip nothing) and the
/// notices that connection receives.
async fn plant_traps(db: &TestDb, app: &str, superuser: &str) -> (Client, Notices) {
    let (client, notices) = session(db, Some(app), Some("pg_catalog,public")).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE public.invoices (id int PRIMARY KEY, tenant text NOT NULL, amount numeric);
             CREATE TABLE public.receipts (id int PRIMARY KEY, tenant text NOT NULL, note text);
             -- With the default search_path (\"$user\", public) this one would win.
             CREATE SCHEMA \"{superuser}\";
             GRANT USAGE ON SCHEMA \"{superuser}\" TO PUBLIC;
             CREATE TABLE \"{superuser}\".invoices
                 (id int PRIMARY KEY, tenant text NOT NULL, amount numeric, decoy text);
             {}",
            TRAP_NET.replace("{app}", app)
        ))
        .await
        .unwrap_or_else(|e| panic!("planting the traps: {}", pgfeed::db::describe(&e)));
    let names = names_called_in_source();
    assert!(
        ["now", "pg_notify", "pg_column_size", "format"]
            .iter()
            .all(|n| names.iter().any(|m| m == n)),
        "the source scan finds names: {names:?}"
    );
    let counts: Vec<i32> = client
        .query_one("SELECT pg_temp.make_traps($1)", &[&names])
        .await
        .unwrap_or_else(|e| panic!("making the traps: {}", pgfeed::db::describe(&e)))
        .get(0);
    assert!(
        counts[0] > 150 && counts[1] > 200 && counts[2] > 30 && counts[3] > 50,
        "a broad net (operators, coerced operators, functions, concrete functions): {counts:?}"
    );
    for query in MUST_EXIST {
        client
            .query_one(*query, &[])
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
    }
    (client, notices)
}

/// Calls of a trap by any role but `app` (as `caller / session_caller: what`, with counts).
async fn trap_calls_by_others(su: &Client, app: &str) -> Vec<String> {
    su.query(
        "SELECT format('%s / %s: %s (%s calls)', caller, session_caller, what, count(*))
         FROM public.trap_log
         WHERE caller OPERATOR(pg_catalog.<>) $1::text::name
            OR session_caller OPERATOR(pg_catalog.<>) $1::text::name
         GROUP BY caller, session_caller, what ORDER BY 1",
        &[&app],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Dependencies of pgfeed's objects (its tables, views, functions, types, and the
/// defaults, constraints, rules, triggers, policies and event triggers on or of them) on
/// operators and functions, as (dependent, referenced, referenced schema).
async fn pgfeed_dependencies(su: &Client) -> Vec<(String, String, String)> {
    su.query(
        "WITH nsp AS (SELECT n.oid FROM pg_namespace AS n WHERE n.nspname = 'pgfeed'),
         rels AS (SELECT c.oid FROM pg_class AS c WHERE c.relnamespace IN (SELECT oid FROM nsp)),
         procs AS (SELECT p.oid FROM pg_proc AS p WHERE p.pronamespace IN (SELECT oid FROM nsp)),
         mine (classid, objid) AS (
             SELECT 'pg_class'::regclass, oid FROM rels
             UNION ALL SELECT 'pg_proc'::regclass, oid FROM procs
             UNION ALL SELECT 'pg_type'::regclass, t.oid FROM pg_type AS t
                 WHERE t.typnamespace IN (SELECT oid FROM nsp)
             UNION ALL SELECT 'pg_rewrite'::regclass, r.oid FROM pg_rewrite AS r
                 WHERE r.ev_class IN (SELECT oid FROM rels)
             UNION ALL SELECT 'pg_attrdef'::regclass, a.oid FROM pg_attrdef AS a
                 WHERE a.adrelid IN (SELECT oid FROM rels)
             UNION ALL SELECT 'pg_constraint'::regclass, c.oid FROM pg_constraint AS c
                 WHERE c.conrelid IN (SELECT oid FROM rels) OR c.connamespace IN (SELECT oid FROM nsp)
             UNION ALL SELECT 'pg_trigger'::regclass, t.oid FROM pg_trigger AS t
                 WHERE t.tgrelid IN (SELECT oid FROM rels) OR t.tgfoid IN (SELECT oid FROM procs)
             UNION ALL SELECT 'pg_policy'::regclass, p.oid FROM pg_policy AS p
                 WHERE p.polrelid IN (SELECT oid FROM rels)
             UNION ALL SELECT 'pg_event_trigger'::regclass, e.oid FROM pg_event_trigger AS e
                 WHERE e.evtfoid IN (SELECT oid FROM procs)
         )
         SELECT pg_describe_object(d.classid, d.objid, d.objsubid),
                pg_describe_object(d.refclassid, d.refobjid, 0),
                coalesce((SELECT p.pronamespace FROM pg_proc AS p
                          WHERE d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid),
                         (SELECT o.oprnamespace FROM pg_operator AS o
                          WHERE d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid)
                        )::regnamespace::text
         FROM pg_depend AS d
         JOIN mine AS m ON m.classid = d.classid AND m.objid = d.objid
         WHERE d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass)
         ORDER BY 3, 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Distinct warnings from traps among `notices`.
fn trap_warnings(notices: &Notices) -> std::collections::BTreeSet<String> {
    notices
        .lock()
        .unwrap()
        .iter()
        .filter(|n| n.contains(TRAP_WARNING))
        .cloned()
        .collect()
}

/// Changes of one stream up to and including the insert of `sentinel` (the row id).
async fn changes_until(stream: &mut SseClient, sentinel: i64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let change = stream.next_change().await;
        let done = change["op"] == "insert" && change["pk"]["id"] == sentinel;
        out.push(change);
        if done {
            return out;
        }
    }
}

/// Changes grouped by transaction and op, each as (op, sorted ids): the order of rows
/// within one statement is PostgreSQL's, not the test's.
fn by_commit(changes: &[Value]) -> Vec<(String, Vec<i64>)> {
    let mut groups: BTreeMap<(i64, String), Vec<i64>> = BTreeMap::new();
    let mut order = Vec::new();
    for c in changes {
        let position = c["position"].as_str().unwrap();
        let commit: i64 = position.split('.').next().unwrap().parse().unwrap();
        let key = (commit, c["op"].as_str().unwrap().to_string());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        let ids = groups.entry(key).or_default();
        if let Some(id) = c["pk"]["id"].as_i64() {
            ids.push(id);
        }
    }
    order
        .into_iter()
        .map(|key| {
            let mut ids = groups.remove(&key).unwrap();
            ids.sort_unstable();
            (key.1, ids)
        })
        .collect()
}

/// The expected [`by_commit`] groups.
fn expect(groups: &[(&str, &[i64])]) -> Vec<(String, Vec<i64>)> {
    groups
        .iter()
        .map(|(op, ids)| (op.to_string(), ids.to_vec()))
        .collect()
}

/// Reads `stream` up to the insert of row `sentinel` and asserts that its changes, grouped
/// as [`by_commit`] groups them, are `groups`; returns the changes.
async fn assert_commits(
    stream: &mut SseClient,
    sentinel: i64,
    groups: &[(&str, &[i64])],
) -> Vec<Value> {
    let changes = changes_until(stream, sentinel).await;
    assert_eq!(by_commit(&changes), expect(groups), "{changes:#?}");
    changes
}

/// Waits until the gateway accepts a stream of `table` for `tenant`: its catalog has been
/// reloaded since `table` was watched.
async fn until_streamable(gw: &Gateway, tenant: &str, table: &str) {
    let what = format!("the gateway's catalog lists {table}");
    eventually(&what, || async {
        gw.stream(tenant, &format!("tables={table}")).await.status == 200
    })
    .await;
}

/// The position `/v1/position` reports.
async fn head_position(gw: &Gateway) -> String {
    let auth = format!("Bearer {}", gw.token("acme"));
    let r = support::get_soon(gw.addr, "/v1/position", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["position"].as_str().unwrap().to_string()
}

/// User triggers on table `invoices` of `schema`.
async fn capture_triggers(su: &Client, schema: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_trigger AS t
         JOIN pg_class AS c ON c.oid = t.tgrelid
         JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE c.relname = 'invoices' AND n.nspname = $1 AND NOT t.tgisinternal",
        &[&schema],
    )
    .await
    .unwrap()
    .get(0)
}

/// Best-effort removal of the test's cluster-wide roles once its database is gone.
async fn drop_roles(db: TestDb, roles: &[&str]) {
    drop(db);
    let admin = support::connect(&support::server().url("postgres")).await;
    for role in roles {
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await;
    }
}

/// Asserts that no trap has run as anyone but `app` (`what` names who would have called
/// one).
async fn assert_no_trap_calls(su: &Client, app: &str, what: &str) {
    assert_eq!(
        trap_calls_by_others(su, app).await,
        Vec::<String>::new(),
        "{what} called the application's traps"
    );
}

/// Gateway settings on `db` connecting with `url` instead of the test URL, plus `env`.
fn sources_as(db: &TestDb, url: &str, env: &[(&str, &str)]) -> pgfeed::config::Sources {
    let mut sources = support::sources(db);
    sources.env.retain(|(k, _)| k != "DATABASE_URL");
    sources
        .env
        .push(("DATABASE_URL".to_string(), url.to_string()));
    sources
        .env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    sources
}

/// Streams of `acme` and `globex`, both opened before either is read up to `live`.
async fn acme_and_globex(gw: &Gateway) -> (SseClient, SseClient) {
    let mut acme = gw.stream("acme", "").await;
    let mut globex = gw.stream("globex", "").await;
    assert!(acme.until_live().await.is_empty());
    assert!(globex.until_live().await.is_empty());
    (acme, globex)
}

/// Resumes `acme` after the first of `acme_changes` and checks that the rest come back,
/// read from the journal, and that `/v1/position` reports `last`'s position. Returns the
/// first position and the resumed stream.
async fn assert_replay(gw: &Gateway, acme_changes: &[Value], last: &Value) -> (String, SseClient) {
    let first = acme_changes[0]["position"].as_str().unwrap().to_string();
    let mut resumed = gw.resume("acme", "", &first).await;
    assert_eq!(resumed.status, 200);
    assert_eq!(resumed.until_live().await, acme_changes[1..]);
    let metrics = scrape(gw).await;
    assert!(
        sample(&metrics, r#"pgfeed_journal_reads_total{kind="replay"}"#).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert_eq!(head_position(gw).await, last["position"].as_str().unwrap());
    (first, resumed)
}

#[tokio::test]
async fn application_traps_in_search_path_are_never_called_by_pgfeed() {
    let db = TestDb::empty().await;
    let su = superuser(&db).await;
    let su_name = superuser_name(&db);
    let app = support::create_login_role(&db, "app").await;
    su.run(&format!("ALTER DATABASE {} OWNER TO {app}", db.name))
        .await;
    let can_create: bool = su
        .query_one(
            "SELECT has_schema_privilege($1, 'public', 'CREATE')",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(can_create, "the application may create objects in public");

    // The application's setup, then the path that puts its schema first (with the
    // connecting role's own schema next, as the default path has it).
    let (app_pinned, app_notices) = plant_traps(&db, &app, &su_name).await;
    app_pinned
        .run(&format!(
            "ALTER DATABASE {} SET search_path = evil, \"$user\", public, pg_catalog",
            db.name
        ))
        .await;

    // pgfeed's privileged side, from the command line.
    cli(&db, &["install"]).await;
    cli(&db, &["watch", "invoices", "--tenant-column", "tenant"]).await;
    let status_text = cli(&db, &["status"]).await;
    let status: Value = serde_json::from_str(&cli(&db, &["status", "--json"]).await).unwrap();
    assert_no_trap_calls(&su, &app, "install, watch or status").await;
    assert!(status_text.contains("public.invoices"), "{status_text}");
    assert_eq!(
        support::status_tables(&status),
        ["public.invoices"],
        "a bare name means public.invoices, not {su_name}.invoices"
    );
    assert!(
        capture_triggers(&su, "public").await > 0,
        "public.invoices is captured"
    );
    assert_eq!(
        capture_triggers(&su, &su_name).await,
        0,
        "the decoy {su_name}.invoices is not"
    );

    // The gateway, as the superuser; no replay from memory, so a resume reads the journal.
    let no_replay_memory = [("PGFEED_SERVER_REPLAY_MEMORY", "0")];
    let gw = Gateway::start_with(support::sources_with(&db, &no_replay_memory)).await;
    let (mut acme, mut globex) = acme_and_globex(&gw).await;

    // The application writes on its pinned connection ...
    for sql in [
        "INSERT INTO invoices VALUES (1, 'acme', 10)",
        "INSERT INTO invoices VALUES (2, 'acme', 20), (3, 'globex', 30), (4, 'acme', 40)",
        "UPDATE invoices SET amount = amount + 1 WHERE tenant = 'acme'",
        "DELETE FROM invoices WHERE id = 2",
        "TRUNCATE invoices",
    ] {
        app_pinned.run(sql).await;
    }
    // ... and, as an attacker would, on one with the database's path, where pgfeed's code
    // that runs in its session (capture, the DDL event trigger) meets the traps first.
    let (app_default, app_default_notices) = session(&db, Some(&app), None).await;
    let path: String = app_default
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert!(path.starts_with("evil"), "{path}");
    // (One simple query runs as one transaction: hence one call per transaction.)
    for sql in [
        "INSERT INTO invoices VALUES (5, 'acme', 50)".to_string(),
        "ALTER TABLE invoices ADD COLUMN memo text".to_string(),
        format!(
            "BEGIN;
             INSERT INTO invoices VALUES (6, 'acme', 60, 'm');
             INSERT INTO \"{su_name}\".invoices VALUES (7, 'acme', 70, 'decoy');
             COMMIT;"
        ),
        "INSERT INTO invoices (id, tenant) VALUES (100, 'acme'), (101, 'globex')".to_string(),
    ] {
        app_default
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", pgfeed::db::describe(&e)));
    }

    let mut acme_changes = assert_commits(
        &mut acme,
        100,
        &[
            ("insert", &[1]),
            ("insert", &[2, 4]),
            ("update", &[1, 2, 4]),
            ("delete", &[2]),
            ("truncate", &[]),
            ("insert", &[5]),
            ("insert", &[6]),
            ("insert", &[100]),
        ],
    )
    .await;
    assert!(
        acme_changes
            .iter()
            .all(|c| c["table"] == "public.invoices"
                && (c["op"] == "truncate" || c["tenant"] == "acme")),
        "{acme_changes:#?}"
    );
    let update_1 = acme_changes
        .iter()
        .find(|c| c["op"] == "update" && c["pk"]["id"] == 1)
        .unwrap();
    assert_eq!(update_1["old"]["amount"], json!(10));
    assert_eq!(update_1["new"]["amount"], json!(11));
    assert_eq!(update_1["changed"], json!(["amount"]));
    let insert_6 = acme_changes
        .iter()
        .find(|c| c["op"] == "insert" && c["pk"]["id"] == 6)
        .unwrap();
    assert_eq!(
        insert_6["new"],
        json!({"id": 6, "tenant": "acme", "amount": 60, "memo": "m"})
    );
    assert_commits(
        &mut globex,
        101,
        &[("insert", &[3]), ("truncate", &[]), ("insert", &[101])],
    )
    .await;

    // Anyone may ring the doorbell that reloads every gateway's catalog. A second watch
    // after it shows that a reload has happened since.
    app_pinned.run("NOTIFY pgfeed, 'watch'").await;
    cli(&db, &["watch", "receipts", "--tenant-column", "tenant"]).await;
    until_streamable(&gw, "acme", "public.receipts").await;
    app_pinned
        .run("INSERT INTO receipts VALUES (1, 'acme', 'paid')")
        .await;
    let receipt = acme.next_change().await;
    assert_eq!(receipt["table"], "public.receipts", "{receipt}");
    acme_changes.push(receipt);

    // A resume replays from the journal.
    let (_, resumed) = assert_replay(&gw, &acme_changes, acme_changes.last().unwrap()).await;
    drop((acme, globex, resumed));
    gw.stop().await;
    // The rest of the command line: with a journal to describe, an unwatch, and install
    // again (nothing to migrate, functions re-applied).
    cli(&db, &["status"]).await;
    cli(&db, &["unwatch", "receipts"]).await;
    cli(&db, &["install"]).await;

    // Not one trap ran as anyone but the application.
    assert_no_trap_calls(&su, &app, "pgfeed's privileged side").await;
    let mut warnings = trap_warnings(&app_notices);
    warnings.extend(trap_warnings(&app_default_notices));
    assert_eq!(
        warnings,
        Default::default(),
        "traps ran with privileges in the application's sessions"
    );

    // The net was live: the same calls from a session with the database's path land in
    // the traps (so this test can fail).
    let logged = |what: &'static str| {
        let su = &su;
        let app = app.clone();
        async move {
            query_i64(
                su,
                "SELECT count(*) FROM public.trap_log
                 WHERE caller OPERATOR(pg_catalog.=) $1::text::name
                   AND what OPERATOR(pg_catalog.=) $2",
                &[&app, &what],
            )
            .await
        }
    };
    let before = (
        logged("evil.=(oid,regclass)").await,
        logged("evil.pg_column_size(jsonb)").await,
        logged("evil.now()").await,
    );
    let (fresh, _) = session(&db, Some(&app), None).await;
    let row = fresh
        .query_one(
            "SELECT 1259::oid = 'pg_class'::regclass, pg_column_size('{}'::jsonb), now() IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(2));
    let after = (
        logged("evil.=(oid,regclass)").await,
        logged("evil.pg_column_size(jsonb)").await,
        logged("evil.now()").await,
    );
    assert!(
        after.0 > before.0 && after.1 > before.1 && after.2 > before.2,
        "the traps are reachable: {before:?} -> {after:?}"
    );

    // Item 2: nothing pgfeed installed is bound to an operator or function outside
    // pg_catalog and pgfeed (a view, default, constraint, trigger or policy binds its
    // operators and functions when created, under the installer's search_path).
    // Dependencies on built-in objects are not recorded (PostgreSQL pins them); those on
    // pgfeed's own functions, as of its triggers, show that the query sees pgfeed's objects.
    let dependencies = pgfeed_dependencies(&su).await;
    assert!(
        dependencies
            .iter()
            .any(|(on, _, schema)| schema == "pgfeed" && on.starts_with("trigger seal")),
        "the query sees pgfeed's objects: {dependencies:#?}"
    );
    let foreign: Vec<_> = dependencies
        .iter()
        .filter(|(_, _, schema)| schema != "pg_catalog" && schema != "pgfeed")
        .collect();
    assert!(
        foreign.is_empty(),
        "pgfeed's objects depend on the application's: {foreign:#?}"
    );

    // Last, uninstall, which must not call a trap either.
    cli(&db, &["uninstall"]).await;
    assert_no_trap_calls(&su, &app, "uninstall").await;
    drop((su, app_pinned, app_default, fresh));
    drop_roles(db, &[&app]).await;
}

#[tokio::test]
async fn a_gateway_runs_the_whole_path_as_a_role_granted_only_pgfeed_gateway() {
    let db = TestDb::new().await;
    let su = superuser(&db).await;
    let app = support::create_login_role(&db, "app").await;
    let gw_role = support::create_login_role(&db, "gw").await;
    su.run(&format!(
        "ALTER DATABASE {} OWNER TO {app}; GRANT pgfeed_gateway TO {gw_role}",
        db.name
    ))
    .await;
    let row = su
        .query_one(
            "SELECT r.rolsuper, r.rolinherit,
                    array(SELECT m.roleid::regrole::text FROM pg_auth_members AS m
                          WHERE m.member = r.oid)
             FROM pg_roles AS r WHERE r.rolname = $1",
            &[&gw_role],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0) && row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Vec<String>>(2), ["pgfeed_gateway"]);

    let (writer, _) = session(&db, Some(&app), Some("pg_catalog,public")).await;
    writer
        .run(
            "CREATE TABLE public.orders (id int PRIMARY KEY, tenant text NOT NULL, body text);
             CREATE TABLE public.notes (id int PRIMARY KEY, tenant text NOT NULL, body text);",
        )
        .await;
    cli(&db, &["watch", "orders", "--tenant-column", "tenant"]).await;

    // The role cannot write changes or record commits (only capture does), change what is
    // watched, nor read the application's tables. (It numbers recorded commits: sealing
    // is a gateway's job since schema 5.)
    let (gw_client, _) = session(&db, Some(&gw_role), None).await;
    for sql in [
        "INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public)
         VALUES (pg_current_xact_id(), 1, 'public.orders', 'insert', 'globex', false)",
        "INSERT INTO pgfeed.pending (xid, draw, n, committed_at)
         VALUES (pg_current_xact_id(), 1, 1, now())",
        "UPDATE pgfeed.watched SET public = true",
        "SELECT pgfeed.watch('public.notes', public => true)",
        "SELECT * FROM public.orders",
    ] {
        let err = gw_client
            .batch_execute(sql)
            .await
            .expect_err("refused to the gateway role");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {}",
            pgfeed::db::describe(&err)
        );
    }

    // Gateway one, as that role: live delivery with isolation, replay, position, metrics
    // and a catalog reload.
    let gw_url = url_as(&db, &gw_role);
    let no_replay_memory = [("PGFEED_SERVER_REPLAY_MEMORY", "0")];
    let gw = Gateway::start_with(sources_as(&db, &gw_url, &no_replay_memory)).await;
    let users: Vec<String> = su
        .query(
            "SELECT DISTINCT usename::text FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'pgfeed%'",
            &[&db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        users,
        [gw_role.as_str()],
        "the gateway connects as its role"
    );
    let (mut acme, mut globex) = acme_and_globex(&gw).await;
    for sql in [
        "INSERT INTO orders VALUES (1, 'acme', 'a1')",
        "INSERT INTO orders VALUES (2, 'globex', 'g1')",
        "INSERT INTO orders VALUES (3, 'acme', 'a2'), (4, 'globex', 'g2'), (5, 'acme', 'a3')",
        "UPDATE orders SET body = body || '!' WHERE id IN (1, 2)",
        "DELETE FROM orders WHERE id = 3",
        "INSERT INTO orders VALUES (100, 'acme', 'end'), (101, 'globex', 'end')",
    ] {
        writer.run(sql).await;
    }
    let acme_changes = assert_commits(
        &mut acme,
        100,
        &[
            ("insert", &[1]),
            ("insert", &[3, 5]),
            ("update", &[1]),
            ("delete", &[3]),
            ("insert", &[100]),
        ],
    )
    .await;
    let globex_changes = assert_commits(
        &mut globex,
        101,
        &[
            ("insert", &[2]),
            ("insert", &[4]),
            ("update", &[2]),
            ("insert", &[101]),
        ],
    )
    .await;
    for (tenant, changes) in [("acme", &acme_changes), ("globex", &globex_changes)] {
        assert!(
            changes.iter().all(|c| c["tenant"] == tenant),
            "{tenant} sees only its rows: {changes:#?}"
        );
    }

    let (first, resumed) = assert_replay(&gw, &acme_changes, globex_changes.last().unwrap()).await;

    cli(&db, &["watch", "notes", "--tenant-column", "tenant"]).await;
    until_streamable(&gw, "acme", "public.notes").await;
    let mut notes = gw.stream("acme", "tables=public.notes").await;
    assert!(notes.until_live().await.is_empty());
    writer
        .run("INSERT INTO notes VALUES (1, 'globex', 'no'), (2, 'acme', 'yes')")
        .await;
    let note = notes.next_change().await;
    assert_eq!(
        (note["table"].as_str(), note["pk"]["id"].as_i64()),
        (Some("public.notes"), Some(2))
    );
    drop((acme, globex, resumed, notes));
    gw.stop().await;

    // Gateway two, as the same role, prunes everything older than a second.
    let count = |table: &'static str| {
        let su = &su;
        async move { query_i64(su, &format!("SELECT count(*) FROM pgfeed.{table}"), &[]).await }
    };
    let commits = count("commits").await;
    assert!(commits >= 7, "{commits} commits");
    let gw = Gateway::start_with(sources_as(&db, &gw_url, support::FAST_PRUNING)).await;
    eventually("the gateway role prunes every old commit", || async {
        sample(&scrape(&gw).await, "pgfeed_pruned_commits_total") == Some(commits as f64)
    })
    .await;
    assert_eq!((count("commits").await, count("changes").await), (0, 0));
    let mut late = gw.resume("acme", "", &first).await;
    assert_eq!(late.status, 200);
    let reset = late.next().await.expect("an event");
    assert_eq!(reset.event, "reset", "{reset:?}");
    drop(late);
    gw.stop().await;
    drop((su, writer, gw_client));
    drop_roles(db, &[&app, &gw_role]).await;
}
