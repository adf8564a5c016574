//! The demo table: created with seed rows if absent, safely when two demos start at once.

use super::DemoError;
use crate::db;

/// The demo table, created with seed rows when it does not exist yet. The touch trigger
/// keeps `updated_at` current; its `WHEN` keeps an update that changes nothing a no-op,
/// as pgfeed treats it.
const CREATE_TABLE: &str = "
CREATE TABLE public.demo_orders (
    id         serial PRIMARY KEY,
    tenant     text NOT NULL,
    item       text,
    status     text NOT NULL DEFAULT 'new',
    amount     numeric(10, 2) NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION public.demo_orders_touch() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER demo_orders_touch BEFORE UPDATE ON public.demo_orders
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION public.demo_orders_touch();
INSERT INTO public.demo_orders (tenant, item, status, amount) VALUES
    ('acme',   'Standing desk',        'paid',      499.00),
    ('acme',   'Ergonomic chair',      'shipped',   289.00),
    ('acme',   'Monitor arm',          'new',        79.90),
    ('acme',   'USB-C dock',           'delivered', 129.00),
    ('globex', 'Label printer',        'paid',      219.00),
    ('globex', 'Barcode scanner',      'new',        64.50),
    ('globex', 'Thermal labels (500)', 'shipped',    18.75);
";

/// Creates the demo table with its seed rows if it does not exist; returns whether it did.
///
/// It takes no lock of its own (an advisory lock's key is public: any role could hold it
/// and stall the demo). Two demos starting at once on one database both find no table;
/// the second's `CREATE TABLE` waits on the catalog's unique indexes until the first
/// commits, then fails as a duplicate, and the second, trying again, finds the table.
pub(super) async fn create_table(client: &mut tokio_postgres::Client) -> Result<bool, DemoError> {
    let failed = |source: tokio_postgres::Error| DemoError::Table {
        message: db::describe(&source),
        source,
    };
    let mut retried = false;
    loop {
        let tx = client.transaction().await.map_err(failed)?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('public.demo_orders') IS NOT NULL", &[])
            .await
            .map_err(failed)?
            .try_get(0)
            .map_err(failed)?;
        if exists {
            tx.commit().await.map_err(failed)?;
            return Ok(false);
        }
        match tx.batch_execute(CREATE_TABLE).await {
            Ok(()) => {
                tx.commit().await.map_err(failed)?;
                return Ok(true);
            }
            Err(err) if !retried && created_meanwhile(&err) => {
                tx.rollback().await.map_err(failed)?;
                retried = true;
            }
            Err(err) => return Err(failed(err)),
        }
    }
}

/// Whether creating the demo table failed because another session created it first.
fn created_meanwhile(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    err.code().is_some_and(|code| {
        [
            SqlState::UNIQUE_VIOLATION,
            SqlState::DUPLICATE_TABLE,
            SqlState::DUPLICATE_FUNCTION,
            SqlState::DUPLICATE_OBJECT,
        ]
        .contains(code)
    })
}
