//! Tenant isolation with selections and row filters, at scale: 30 subscribed tenants with
//! three streams each (90 streams) asking for random `tables=`, `ops=`, `filter=` and
//! `payload=`, two tenant tables and a public one, and 2 000 random inserts, updates and
//! deletes across 34 tenants (rows moving in and out of filters, rows moving to another
//! tenant, key changes, no-op updates, truncates, rolled-back transactions and
//! savepoints), committed in transactions of random size.
//!
//! The test keeps its own model of every row and computes, independently of the gateway,
//! the exact list of events each stream must receive; every stream must receive exactly
//! that list, in order, and nothing after it. The workload comes from a seeded RNG: the
//! seed is printed, and `PGFEED_TEST_SEED=<seed>` replays a run.

use pgfeed_testkit as support;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::workload::{self, Positions, Reader, Rng};
use support::{Gateway, SseClient, TestDb};
use tokio_postgres::Transaction;

/// Tenants with subscribers: the first `SUBSCRIBED` names of [`tenant_names`].
const SUBSCRIBED: usize = 30;

/// Statements committed by the workload (rolled-back ones come on top).
const STATEMENTS: usize = 2000;

/// How long a stream must stay silent after its last expected event.
const QUIET: Duration = Duration::from_millis(500);

/// Every tenant that writes. Names that differ only by case, a suffix, a space or a
/// leading zero, digits, non-ASCII, a quote and a comma, so that no loose comparison
/// passes; the last four write rows that no stream may see.
fn tenant_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "acme", "ACME", "acme2", "acme ", "42", "émile", "o'hara", "x,y",
    ]
    .map(String::from)
    .to_vec();
    while names.len() < SUBSCRIBED {
        names.push(format!("t{:02}", names.len()));
    }
    names.extend(["Acme", "nobody", "t8", "042"].map(String::from));
    names
}

/// Watched tables: two tenant tables and a public one, all with the same columns (the
/// public one without `tenant`).
const TABLES: [&str; 3] = ["public.items", "public.tasks", "public.news"];
const PUBLIC: usize = 2;

fn sql_name(table: usize) -> &'static str {
    TABLES[table].strip_prefix("public.").unwrap()
}

/// Values of the text column: byte order puts upper case first, `"10"` before `"9"` and
/// non-ASCII last; some carry the characters the filter syntax uses.
const LABELS: [&str; 12] = [
    "apple",
    "Apple",
    "banana",
    "a,b",
    "10",
    "9",
    "émile",
    "Zeta",
    "zeta",
    "v1.2:x=y",
    "say \"hi\"",
    "",
];

/// More literals for comparisons on the text column, falling between the labels.
const TEXT_BOUNDS: [&str; 6] = ["b", "B", "a", "zz", "1", "é"];

/// The model of a row (its primary key is the model's map key).
#[derive(Clone, Debug, PartialEq)]
struct Row {
    /// `None` in the public table.
    tenant: Option<usize>,
    /// `label text NOT NULL`.
    label: &'static str,
    /// `qty integer NOT NULL`.
    qty: i32,
    /// `score numeric` (nullable), in quarters so that every value is exact.
    score: Option<i32>,
}

/// The canonical text of a score, which is also how PostgreSQL renders it in JSON.
fn score_text(quarters: i32) -> String {
    format!("{}", f64::from(quarters) / 4.0)
}

impl Row {
    fn json(&self, id: i32, names: &[String]) -> Value {
        let score = match self.score {
            Some(q) => serde_json::from_str(&score_text(q)).unwrap(),
            None => Value::Null,
        };
        let mut v = json!({"id": id, "label": self.label, "qty": self.qty, "score": score});
        if let Some(t) = self.tenant {
            v["tenant"] = json!(names[t]);
        }
        v
    }
}

/// A column a filter can name.
#[derive(Clone, Copy, Debug)]
enum Col {
    Label,
    Qty,
    Score,
}

impl Col {
    fn name(self) -> &'static str {
        match self {
            Col::Label => "label",
            Col::Qty => "qty",
            Col::Score => "score",
        }
    }
}

/// A literal as written in the filter, and the number the test means by it (`None`: not
/// a number). The test never parses its own literals: it writes a known number in one of
/// several spellings.
#[derive(Clone, Debug)]
struct Lit {
    text: String,
    num: Option<f64>,
}

#[derive(Clone, Debug)]
enum Cond {
    Cmp(&'static str, Lit),
    In(Vec<Lit>),
    IsNull,
}

/// One row filter of a subscription.
#[derive(Clone, Debug)]
struct Filter {
    table: usize,
    col: Col,
    cond: Cond,
    /// The `filter=` value, before URL encoding.
    text: String,
}

/// A column's value, as the JSON of an event carries it.
enum Val<'a> {
    Text(&'a str),
    Num(f64),
    Null,
}

impl Filter {
    /// The documented semantics: numbers compare as numbers, text by byte order, a null
    /// column matches only `is.null`.
    fn matches(&self, row: &Row) -> bool {
        let value = match self.col {
            Col::Label => Val::Text(row.label),
            Col::Qty => Val::Num(f64::from(row.qty)),
            Col::Score => row
                .score
                .map_or(Val::Null, |q| Val::Num(f64::from(q) / 4.0)),
        };
        let compare = |lit: &Lit| -> Option<Ordering> {
            match value {
                Val::Text(s) => Some(s.as_bytes().cmp(lit.text.as_bytes())),
                Val::Num(x) => x.partial_cmp(&lit.num?),
                Val::Null => None,
            }
        };
        match &self.cond {
            Cond::IsNull => matches!(value, Val::Null),
            Cond::In(items) => items.iter().any(|l| compare(l) == Some(Ordering::Equal)),
            Cond::Cmp(op, lit) => compare(lit).is_some_and(|o| match *op {
                "eq" => o == Ordering::Equal,
                "neq" => o != Ordering::Equal,
                "lt" => o == Ordering::Less,
                "lte" => o != Ordering::Greater,
                "gt" => o == Ordering::Greater,
                "gte" => o != Ordering::Less,
                other => unreachable!("{other}"),
            }),
        }
    }
}

/// A number literal for `v`, spelled one of several ways that all mean `v`.
fn num_lit(rng: &mut Rng, v: f64) -> Lit {
    let text = match rng.below(6) {
        0 | 1 => format!("{v}"),
        2 => format!("{v:.2}"),
        3 => format!("{v}e0"),
        4 if v >= 0.0 => format!("+{v}"),
        // Quarters need two decimals: `{:.1}` would round 2.25 to "2.2".
        _ if v.fract() == 0.0 => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    };
    Lit { text, num: Some(v) }
}

/// A literal that is not a number, for a numeric column: it never matches.
fn not_a_number(rng: &mut Rng) -> Lit {
    Lit {
        text: rng.pick(&["abc", "1,5", "five", "7x"]).to_string(),
        num: None,
    }
}

fn text_lit(rng: &mut Rng) -> Lit {
    let text = if rng.chance(70) {
        rng.pick(&LABELS)
    } else {
        rng.pick(&TEXT_BOUNDS)
    };
    Lit {
        text: text.to_string(),
        num: None,
    }
}

/// An `in.(...)` list: items with a comma, a quote or a backslash are quoted, others
/// sometimes.
fn in_list(rng: &mut Rng, items: &[Lit]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|l| {
            let t = &l.text;
            if t.contains([',', '"', '\\', '(', ')']) || t.is_empty() || rng.chance(20) {
                format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
            } else {
                t.clone()
            }
        })
        .collect();
    format!("in.({})", parts.join(","))
}

const CMP_OPS: [&str; 6] = ["eq", "neq", "lt", "lte", "gt", "gte"];

fn gen_filter(rng: &mut Rng, table: usize) -> Filter {
    let col = rng.pick(&[Col::Label, Col::Qty, Col::Score]);
    let lit = |rng: &mut Rng| match col {
        Col::Label => text_lit(rng),
        Col::Qty | Col::Score if rng.chance(5) => not_a_number(rng),
        Col::Qty => {
            let v = f64::from(rng.range(-3, 12));
            num_lit(rng, v)
        }
        Col::Score => {
            let v = f64::from(rng.range(-8, 20)) / 4.0;
            num_lit(rng, v)
        }
    };
    let (cond, expr) = if matches!(col, Col::Score) && rng.chance(25) {
        (Cond::IsNull, "is.null".to_string())
    } else if rng.chance(20) {
        // A single empty item, `in.("")`, is refused by the parser: lists of one item
        // are never empty here.
        let n = 1 + rng.below(3);
        let items: Vec<Lit> = (0..n)
            .map(|_| {
                loop {
                    let l = lit(rng);
                    if n > 1 || !l.text.is_empty() {
                        break l;
                    }
                }
            })
            .collect();
        let expr = in_list(rng, &items);
        (Cond::In(items), expr)
    } else {
        let op = rng.pick(&CMP_OPS);
        let l = lit(rng);
        let expr = format!("{op}.{}", l.text);
        (Cond::Cmp(op, l), expr)
    };
    let table_name = if rng.chance(50) {
        TABLES[table]
    } else {
        sql_name(table)
    };
    Filter {
        table,
        col,
        cond,
        text: format!("{table_name}:{}={expr}", col.name()),
    }
}

/// Encodes a query value: everything but a few safe characters, or (like most clients
/// do for the filter syntax) only what would break the query.
fn encode(rng: &mut Rng, value: &str) -> String {
    if rng.chance(50) {
        return form_urlencoded::byte_serialize(value.as_bytes()).collect();
    }
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:=(),*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// One subscriber: what it asked for, and how.
struct Sub {
    tenant: usize,
    query: String,
    tables: Option<Vec<usize>>,
    ops: Option<Vec<&'static str>>,
    filters: Vec<Filter>,
    keys: bool,
}

impl Sub {
    fn random(rng: &mut Rng, tenant: usize) -> Sub {
        let mut params = Vec::new();
        let tables = (!rng.chance(30)).then(|| rng.subset(TABLES.len()));
        if let Some(t) = &tables {
            let names: Vec<&str> = t
                .iter()
                .map(|&i| {
                    if rng.chance(50) {
                        TABLES[i]
                    } else {
                        sql_name(i)
                    }
                })
                .collect();
            params.push(format!("tables={}", names.join(",")));
        }
        let ops = (!rng.chance(40)).then(|| {
            let s = rng.subset(OPS.len());
            s.into_iter().map(|i| OPS[i]).collect::<Vec<_>>()
        });
        if let Some(o) = &ops {
            params.push(format!("ops={}", o.join(",")));
        }
        // A filter may only name a table the stream receives.
        let allowed = tables
            .clone()
            .unwrap_or_else(|| (0..TABLES.len()).collect());
        let mut filters = Vec::new();
        let n = match rng.below(100) {
            0..25 => 0,
            25..70 => 1,
            _ => 2,
        };
        for k in 0..n {
            let table = if k == 1 && rng.chance(50) {
                filters.first().map_or(0, |f: &Filter| f.table)
            } else {
                rng.pick(&allowed)
            };
            let f = gen_filter(rng, table);
            params.push(format!("filter={}", encode(rng, &f.text)));
            filters.push(f);
        }
        let keys = rng.chance(15);
        if keys {
            params.push("payload=keys".into());
        } else if rng.chance(10) {
            params.push("payload=full".into());
        }
        // In any order.
        for i in (1..params.len()).rev() {
            params.swap(i, rng.below(i + 1));
        }
        Sub {
            tenant,
            query: params.join("&"),
            tables,
            ops,
            filters,
            keys,
        }
    }

    /// Whether the contract gives this subscriber `c`: its tenant's changes and public
    /// ones, on its tables and ops, that pass its filters.
    fn wants(&self, c: &Change) -> bool {
        self.selects(c) && self.passes_filters(c)
    }

    /// Tenant, tables and ops.
    fn selects(&self, c: &Change) -> bool {
        (c.public || c.tenant == Some(self.tenant))
            && self.tables.as_ref().is_none_or(|t| t.contains(&c.table))
            && self.ops.as_ref().is_none_or(|o| o.contains(&c.op))
    }

    /// The filters on `c`'s table (others do not apply), all holding on `new` for an
    /// insert, on `old` for a delete, on either for an update; a truncate always passes.
    fn passes_filters(&self, c: &Change) -> bool {
        let filters: Vec<&Filter> = self.filters.iter().filter(|f| f.table == c.table).collect();
        let all = |row: &Option<Row>| {
            row.as_ref()
                .is_some_and(|r| filters.iter().all(|f| f.matches(r)))
        };
        filters.is_empty()
            || match c.op {
                "insert" => all(&c.new),
                "delete" => all(&c.old),
                "update" => all(&c.new) || all(&c.old),
                _ => true,
            }
    }

    /// The event data this subscriber receives for `c` (without position and time).
    fn sees(&self, c: &Change) -> Value {
        let mut data = c.data.clone();
        if self.keys {
            let obj = data.as_object_mut().unwrap();
            obj.remove("new");
            obj.remove("old");
        }
        data
    }
}

/// A change the database must capture, as the event data shows it.
#[derive(Clone, Debug)]
struct Change {
    table: usize,
    op: &'static str,
    tenant: Option<usize>,
    public: bool,
    new: Option<Row>,
    old: Option<Row>,
    /// Half of an update that moved the row to another tenant.
    moved: bool,
    data: Value,
}

fn change(
    table: usize,
    op: &'static str,
    new: Option<(i32, &Row)>,
    old: Option<(i32, &Row)>,
    names: &[String],
) -> Change {
    let tenant = new.or(old).and_then(|(_, r)| r.tenant);
    let mut data = json!({"table": TABLES[table], "op": op});
    if let Some(t) = tenant {
        data["tenant"] = json!(names[t]);
    }
    if let Some((id, _)) = new.or(old) {
        data["pk"] = json!({ "id": id });
    }
    if let Some((id, r)) = new {
        data["new"] = r.json(id, names);
    }
    if let Some((id, r)) = old {
        data["old"] = r.json(id, names);
    }
    if let (Some(n), Some(o)) = (&data.get("new"), &data.get("old")) {
        let mut changed: Vec<&String> = n
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, v)| o.get(k.as_str()) != Some(v))
            .map(|(k, _)| k)
            .collect();
        changed.sort();
        data["changed"] = json!(changed);
    }
    Change {
        table,
        op,
        tenant,
        public: table == PUBLIC || op == "truncate",
        new: new.map(|(_, r)| r.clone()),
        old: old.map(|(_, r)| r.clone()),
        moved: false,
        data,
    }
}

/// Things the workload did, to check that it covered what it should.
#[derive(Debug, Default)]
struct Stats {
    rolled_back_txs: usize,
    rolled_back_savepoints: usize,
    tenant_moves: usize,
    key_changes: usize,
    noop_updates: usize,
    truncates: usize,
}

/// The workload and the test's model of every row.
struct Model {
    rng: Rng,
    names: Vec<String>,
    rows: BTreeMap<(usize, i32), Row>,
    step: usize,
    stats: Stats,
}

impl Model {
    fn random_row(&mut self, table: usize) -> Row {
        Row {
            tenant: (table != PUBLIC).then(|| self.rng.below(self.names.len())),
            label: self.rng.pick(&LABELS),
            qty: self.rng.range(-3, 12),
            score: (!self.rng.chance(30)).then(|| self.rng.range(-8, 20)),
        }
    }

    /// `TRUNCATE` of a random table: one event, to every subscriber allowed the table.
    async fn truncate(&mut self, tx: &Transaction<'_>) -> Vec<Change> {
        let table = self.rng.below(TABLES.len());
        tx.batch_execute(&format!("TRUNCATE {}", sql_name(table)))
            .await
            .unwrap();
        self.rows.retain(|(t, _), _| *t != table);
        self.stats.truncates += 1;
        vec![change(table, "truncate", None, None, &self.names)]
    }

    /// One random statement touching one row; returns the changes it must capture.
    async fn statement(&mut self, tx: &Transaction<'_>) -> Vec<Change> {
        self.step += 1;
        let rng = &mut self.rng;
        let table = match rng.below(100) {
            0..40 => 0,
            40..75 => 1,
            _ => PUBLIC,
        };
        let name = sql_name(table);
        let existing: Vec<i32> = self
            .rows
            .range((table, i32::MIN)..=(table, i32::MAX))
            .map(|((_, id), _)| *id)
            .collect();
        let roll = rng.below(100);
        if existing.is_empty() || roll < 38 {
            let row = self.random_row(table);
            let score = row.score.map(score_text);
            let id: i32 = match row.tenant {
                Some(t) => tx
                    .query_one(
                        &format!(
                            "INSERT INTO {name} (tenant, label, qty, score) \
                             VALUES ($1, $2, $3, $4::text::numeric) RETURNING id"
                        ),
                        &[&self.names[t], &row.label, &row.qty, &score],
                    )
                    .await
                    .unwrap()
                    .get(0),
                None => tx
                    .query_one(
                        &format!(
                            "INSERT INTO {name} (label, qty, score) \
                             VALUES ($1, $2, $3::text::numeric) RETURNING id"
                        ),
                        &[&row.label, &row.qty, &score],
                    )
                    .await
                    .unwrap()
                    .get(0),
            };
            self.rows.insert((table, id), row.clone());
            return vec![change(table, "insert", Some((id, &row)), None, &self.names)];
        }
        let id = rng.pick(&existing);
        let old = self.rows[&(table, id)].clone();
        if roll >= 80 {
            tx.execute(&format!("DELETE FROM {name} WHERE id = $1"), &[&id])
                .await
                .unwrap();
            self.rows.remove(&(table, id));
            return vec![change(table, "delete", None, Some((id, &old)), &self.names)];
        }
        if rng.chance(4) {
            // Touches the row, changes nothing: captured as nothing.
            tx.execute(
                &format!("UPDATE {name} SET label = label, qty = qty WHERE id = $1"),
                &[&id],
            )
            .await
            .unwrap();
            self.stats.noop_updates += 1;
            return Vec::new();
        }
        // Change some of the values (perhaps to the same ones), so that rows move in and
        // out of filters; sometimes the tenant, sometimes the key.
        let mut new = old.clone();
        if rng.chance(60) {
            new.label = rng.pick(&LABELS);
        }
        if rng.chance(60) {
            new.qty = rng.range(-3, 12);
        }
        if rng.chance(50) {
            new.score = (!rng.chance(30)).then(|| rng.range(-8, 20));
        }
        let kind = rng.below(100);
        if table != PUBLIC && kind < 15 {
            let from = old.tenant.unwrap();
            new.tenant = Some((from + 1 + rng.below(self.names.len() - 1)) % self.names.len());
        }
        let new_id = if (15..21).contains(&kind) {
            self.stats.key_changes += 1;
            1_000_000 + self.step as i32
        } else {
            id
        };
        let score = new.score.map(score_text);
        match new.tenant {
            Some(t) => tx
                .execute(
                    &format!(
                        "UPDATE {name} SET tenant = $1, label = $2, qty = $3, \
                         score = $4::text::numeric, id = $5 WHERE id = $6"
                    ),
                    &[&self.names[t], &new.label, &new.qty, &score, &new_id, &id],
                )
                .await
                .unwrap(),
            None => tx
                .execute(
                    &format!(
                        "UPDATE {name} SET label = $1, qty = $2, \
                         score = $3::text::numeric, id = $4 WHERE id = $5"
                    ),
                    &[&new.label, &new.qty, &score, &new_id, &id],
                )
                .await
                .unwrap(),
        };
        self.rows.remove(&(table, id));
        self.rows.insert((table, new_id), new.clone());
        let names = &self.names;
        if new.tenant != old.tenant {
            // As `_capture_update` does: the old tenant sees the row leave, the new one
            // sees it arrive, and neither sees the other's row.
            self.stats.tenant_moves += 1;
            let mut halves = vec![
                change(table, "delete", None, Some((id, &old)), names),
                change(table, "insert", Some((new_id, &new)), None, names),
            ];
            for half in &mut halves {
                half.moved = true;
            }
            return halves;
        }
        let c = change(
            table,
            "update",
            Some((new_id, &new)),
            Some((id, &old)),
            names,
        );
        if c.data["changed"].as_array().unwrap().is_empty() {
            // Every value set to what it was: no event.
            self.stats.noop_updates += 1;
            return Vec::new();
        }
        vec![c]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_random_workload_reaches_exactly_the_right_subscribers() {
    let seed = workload::seed("isolation_filters");
    let started = Instant::now();

    let db = TestDb::new().await;
    let mut c = db.client().await;
    c.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, tenant text NOT NULL, label text NOT NULL,
                             qty integer NOT NULL, score numeric);
         CREATE TABLE tasks (id serial PRIMARY KEY, tenant text NOT NULL, label text NOT NULL,
                             qty integer NOT NULL, score numeric);
         CREATE TABLE news (id serial PRIMARY KEY, label text NOT NULL, qty integer NOT NULL,
                            score numeric);
         SELECT pgfeed.watch('items', 'tenant');
         SELECT pgfeed.watch('tasks', 'tenant');
         SELECT pgfeed.watch('news', public => true);",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;

    let mut rng = Rng::seeded(seed);
    let names = tenant_names();
    let mut subs = Vec::new();
    let mut readers = Vec::new();
    for (tenant, name) in names.iter().enumerate().take(SUBSCRIBED) {
        for _ in 0..3 {
            let sub = Sub::random(&mut rng, tenant);
            let mut stream = gw.stream(name, &sub.query).await;
            assert_eq!(stream.status, 200, "seed {seed}: {name:?} ?{}", sub.query);
            assert!(
                stream.until_live().await.is_empty(),
                "nothing to replay on a fresh stream"
            );
            readers.push(Reader::spawn(stream));
            subs.push(sub);
        }
    }
    let opened = started.elapsed();

    // The workload: transactions of random size, each statement touching one row, so that
    // the order of changes is the order of statements. Some transactions roll back, some
    // savepoints too; two truncates happen in committed transactions.
    let mut model = Model {
        rng: Rng::seeded(seed ^ 0x5eed),
        names: names.clone(),
        rows: BTreeMap::new(),
        step: 0,
        stats: Stats::default(),
    };
    let mut all: Vec<Change> = Vec::new();
    let mut committed = 0usize;
    let mut truncate_at = vec![STATEMENTS * 2 / 3, STATEMENTS / 3];
    while committed < STATEMENTS {
        let rollback = model.rng.chance(8);
        let size = if model.rng.chance(50) {
            1 + model.rng.below(5)
        } else {
            1 + model.rng.below(40)
        };
        let saved = model.rows.clone();
        let mut pending = Vec::new();
        let mut statements = 0;
        let mut tx = c.transaction().await.unwrap();
        for _ in 0..size {
            if !rollback && truncate_at.last().is_some_and(|&at| committed >= at) {
                truncate_at.pop();
                pending.extend(model.truncate(&tx).await);
            }
            if model.rng.chance(3) {
                // A savepoint rolled back: none of its changes may be delivered.
                let before = model.rows.clone();
                let sp = tx.savepoint("sp").await.unwrap();
                for _ in 0..1 + model.rng.below(4) {
                    model.statement(&sp).await;
                }
                if model.rng.chance(10) {
                    model.truncate(&sp).await;
                }
                sp.rollback().await.unwrap();
                model.rows = before;
                model.stats.rolled_back_savepoints += 1;
            }
            pending.extend(model.statement(&tx).await);
            statements += 1;
        }
        if rollback {
            if model.rng.chance(20) {
                pending.extend(model.truncate(&tx).await);
            }
            tx.rollback().await.unwrap();
            model.rows = saved;
            model.stats.rolled_back_txs += 1;
        } else {
            tx.commit().await.unwrap();
            all.extend(pending);
            committed += statements;
        }
    }
    let wrote = started.elapsed();
    let stats = &model.stats;
    workload::assert_journal_holds(&c, all.len(), &format!("seed {seed}: ")).await;

    // What each subscriber must receive, as indexes into `all`.
    let wanted = workload::wanted(&subs, &all, Sub::wants);

    // Collect that many events from every stream (read all along by its task), then
    // nothing more, on any stream.
    let counts: Vec<usize> = wanted.iter().map(Vec::len).collect();
    let received = workload::collect(&mut readers, &counts, QUIET).await;
    let read = started.elapsed();

    let mut positions = Positions::default();
    for (k, s) in subs.iter().enumerate() {
        let who = format!(
            "seed {seed}: stream #{k} of {:?} ?{}",
            names[s.tenant], s.query
        );
        let expect: Vec<Value> = wanted[k].iter().map(|&i| s.sees(&all[i])).collect();
        let got = workload::check_stream(&who, &received[k], &expect);
        for (&i, event) in wanted[k].iter().zip(&got) {
            positions.record(&who, i, event);
        }
    }
    // Positions follow the workload's order.
    positions.assert_in_order(&format!("seed {seed}: "));

    // The workload covered what it should, so that passing means something.
    let deliveries: usize = wanted.iter().map(Vec::len).sum();
    let pairs = || subs.iter().flat_map(|s| all.iter().map(move |c| (s, c)));
    let filtered_out = pairs()
        .filter(|(s, c)| s.selects(c) && !s.passes_filters(c))
        .count();
    let moved_out = pairs()
        .filter(|(s, c)| {
            c.op == "update"
                && s.wants(c)
                && s.filters
                    .iter()
                    .any(|f| f.table == c.table && !f.matches(c.new.as_ref().unwrap()))
        })
        .count();
    let tenant_moves_seen = pairs().filter(|(s, c)| c.moved && s.wants(c)).count();
    eprintln!(
        "isolation_filters: {} changes, {deliveries} deliveries to {} streams, {filtered_out} \
         held back by filters, {moved_out} updates leaving a filter delivered; {stats:?}; \
         streams open at {opened:?}, workload done at {wrote:?}, all read at {read:?}",
        all.len(),
        subs.len()
    );
    assert!(subs.len() >= 90 && committed >= STATEMENTS);
    assert!(
        filtered_out > 100 && moved_out > 10 && tenant_moves_seen > 0,
        "seed {seed}: filters held back {filtered_out} events and let {moved_out} updates \
         out; the workload is too tame"
    );
    assert!(
        stats.rolled_back_txs > 0
            && stats.rolled_back_savepoints > 0
            && stats.tenant_moves > 20
            && stats.key_changes > 0
            && stats.noop_updates > 0
            && stats.truncates >= 2,
        "seed {seed}: the workload missed a case: {stats:?}"
    );

    for reader in readers {
        reader.finish().await;
    }
    gw.stop().await;
}

/// Snowflake-style bigint ids and long numerics, as a client filters on them: an id one
/// above another (both beyond 2^53, one float apart) must not match the other's filter,
/// nor a numeric that differs in its 30th digit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_filters_are_exact_for_big_ids_and_long_numerics() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, tenant text NOT NULL, amount numeric);
         SELECT pgfeed.watch('orders', 'tenant');",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let mut by_id = gw
        .stream("acme", "filter=orders:id=eq.9007199254740993")
        .await;
    assert_eq!(by_id.status, 200, "{}", by_id.raw);
    by_id.until_live().await;
    let mut in_list = gw
        .stream("acme", "filter=orders:id=in.(1,9007199254740993,3)")
        .await;
    in_list.until_live().await;
    let mut by_amount = gw
        .stream(
            "acme",
            "filter=orders:amount=gt.123456789012345678901234567890.4",
        )
        .await;
    by_amount.until_live().await;
    c.batch_execute(
        "INSERT INTO orders VALUES (9007199254740992, 'acme', 123456789012345678901234567890.4);
         INSERT INTO orders VALUES (9007199254740993, 'acme', 123456789012345678901234567890.5);",
    )
    .await
    .unwrap();
    for s in [&mut by_id, &mut in_list] {
        let change = s.next_change().await;
        assert_eq!(change["new"]["id"], json!(9007199254740993u64), "{change}");
        s.assert_quiet(QUIET).await;
    }
    let change = by_amount.next_change().await;
    assert_eq!(change["new"]["id"], json!(9007199254740993u64), "{change}");
    by_amount.assert_quiet(QUIET).await;
    gw.stop().await;
}

/// A client cannot make every change cost thousands of comparisons: the literals of one
/// stream's filters are capped, and the cap is a 400 naming `filter`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_values_per_stream_are_capped() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let items = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let max = pgfeed::filter::MAX_FILTER_VALUES;
    // Exactly the cap, over two filters, is accepted.
    let ok = gw
        .stream(
            "acme",
            &format!(
                "filter=orders:id=in.({})&filter=orders:body=in.({})",
                items(max / 2),
                items(max - max / 2)
            ),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.raw);
    drop(ok);
    let over = support::get_soon(
        gw.addr,
        &format!(
            "/v1/stream?filter=orders:id=in.({})&filter=orders:body=in.({})",
            items(max / 2),
            items(max - max / 2 + 1)
        ),
        &[("Authorization", &format!("Bearer {}", gw.token("acme")))],
    )
    .await;
    let (code, message) = support::assert_error(&over, 400, "filter");
    assert_eq!(code, "bad_request");
    assert!(message.contains(&max.to_string()), "{message}");
    gw.stop().await;
}

/// One rule for names, PostgreSQL's, on the CLI, in `tables`, in `filter` and in the tables
/// claim: unquoted names fold to lower case, quoted ones keep case, spaces and dots, and
/// URL-encoded quotes work. A user who watched `"Mixed Case"` and `ORDERS` on the CLI
/// reaches them with the same spellings over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_follow_postgresql_rules_everywhere() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        r#"CREATE TABLE "Mixed Case" (id int PRIMARY KEY, tenant text NOT NULL, "Total Amount" numeric);
           CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL);
           CREATE SCHEMA "Shop.Front";
           CREATE TABLE "Shop.Front"."a""b" (id int PRIMARY KEY, tenant text NOT NULL);"#,
    )
    .await
    .unwrap();
    for args in [
        &["watch", r#""Mixed Case""#, "--tenant-column", "TENANT"][..],
        &["watch", "ORDERS", "--tenant-column", "Tenant"],
        &[
            "watch",
            r#""Shop.Front"."a""b""#,
            "--tenant-column",
            "tenant",
        ],
    ] {
        let out = support::pgfeed_cli(&db, args).await;
        assert!(
            out.status.success(),
            "pgfeed {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let gw = Gateway::start_with(support::sources_with(
        &db,
        &[("PGFEED_AUTH_TABLES_CLAIM", "tables")],
    ))
    .await;
    let claim = |tables: &[&str]| {
        let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        pgfeed::auth::mint(
            &gw.config.auth,
            "acme",
            Some(&tables),
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let token = claim(&[r#""Mixed Case""#, "ORDERS", r#""Shop.Front"."a""b""#]);
    let open = |query: &str, token: &str| {
        let path = format!("/v1/stream?{query}");
        let auth = format!("Bearer {token}");
        let addr = gw.addr;
        async move { SseClient::open(addr, &path, &[("Authorization", &auth)]).await }
    };
    // Quoted names, URL-encoded (%22 and %20, or `+` for a space), and folded ones.
    let mut mixed = open(
        "tables=%22Mixed%20Case%22,public.Orders&filter=%22Mixed+Case%22:%22Total%20Amount%22=gt.5",
        &token,
    )
    .await;
    assert_eq!(mixed.status, 200, "{}", mixed.raw);
    mixed.until_live().await;
    let mut upper = open("tables=ORDERS", &token).await;
    assert_eq!(upper.status, 200, "{}", upper.raw);
    upper.until_live().await;
    let mut dotted = open(
        &format!(
            "tables={}",
            form_urlencoded::byte_serialize(r#""Shop.Front"."a""b""#.as_bytes())
                .collect::<String>()
        ),
        &token,
    )
    .await;
    assert_eq!(dotted.status, 200, "{}", dotted.raw);
    dotted.until_live().await;
    c.batch_execute(
        r#"INSERT INTO "Mixed Case" VALUES (1, 'acme', 3), (2, 'acme', 7);
           INSERT INTO orders VALUES (1, 'acme');
           INSERT INTO "Shop.Front"."a""b" VALUES (1, 'acme');"#,
    )
    .await
    .unwrap();
    let first = mixed.next_change().await;
    assert_eq!(
        (first["table"].as_str(), first["new"]["id"].as_i64()),
        (Some("public.Mixed Case"), Some(2)),
        "{first}"
    );
    let second = mixed.next_change().await;
    assert_eq!(second["table"], "public.orders", "{second}");
    mixed.assert_quiet(QUIET).await;
    assert_eq!(upper.next_change().await["table"], "public.orders");
    upper.assert_quiet(QUIET).await;
    assert_eq!(dotted.next_change().await["table"], "Shop.Front.a\"b");
    dotted.assert_quiet(QUIET).await;

    // An unquoted name with a space is not a name, nor an unclosed quote: 400 naming
    // `tables`. A quoted `"ORDERS"` keeps its case: not the claim's `orders` (403).
    let auth = format!("Bearer {token}");
    for query in ["tables=Mixed%20Case", "tables=%22orders", "tables=1abc"] {
        let r = support::get_soon(
            gw.addr,
            &format!("/v1/stream?{query}"),
            &[("Authorization", &auth)],
        )
        .await;
        let (code, message) = support::assert_error(&r, 400, query);
        assert_eq!(code, "bad_request", "{query}");
        assert!(message.contains("`tables`"), "{query}: {message}");
    }
    let r = support::get_soon(
        gw.addr,
        "/v1/stream?tables=%22ORDERS%22",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(
        support::assert_error(&r, 403, "quoted ORDERS").0,
        "forbidden"
    );
    // The claim folds as well: `ORDERS` in a claim does not allow `"ORDERS"`, a table that
    // does not exist, nor "Mixed Case" when the claim lists only orders.
    let only_orders = claim(&["ORDERS"]);
    let r = support::get_soon(
        gw.addr,
        "/v1/stream?tables=%22Mixed%20Case%22",
        &[("Authorization", &format!("Bearer {only_orders}"))],
    )
    .await;
    assert_eq!(
        support::assert_error(&r, 403, "outside the claim").0,
        "forbidden"
    );
    // A claim item that is not a name is refused whole.
    let bad = claim(&["orders;drop"]);
    let r = support::get_soon(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {bad}"))],
    )
    .await;
    assert_eq!(
        support::assert_error(&r, 401, "bad claim").0,
        "invalid_token"
    );
    gw.stop().await;
}
