//! What the demo prints: the lines to try, without echoing a password.

use std::time::Duration;

/// What `psql` is pointed at in the printed lines. A configured URL is not echoed if it
/// carries a password: `$DATABASE_URL` stands for it when that variable holds it.
pub(super) fn psql_target(url: &str, throwaway: bool) -> String {
    if throwaway {
        return url.to_string();
    }
    if std::env::var("DATABASE_URL").is_ok_and(|v| v == url) {
        return "$DATABASE_URL".into();
    }
    redact_password(url)
}

pub(super) fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // A key=value string.
        return url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

pub(super) struct Banner {
    pub(super) page: String,
    pub(super) gateway: String,
    pub(super) database: String,
    pub(super) psql: String,
    pub(super) token: String,
    pub(super) token_ttl: Duration,
}

pub(super) fn print_banner(b: &Banner) {
    let psql = format!("psql \"{}\" -c", b.psql);
    let ttl = humantime::format_duration(b.token_ttl);
    println!(
        "
pgfeed demo is running. Open the live page:

    {page}

Gateway   {gateway}   (tenants acme and globex, table public.demo_orders)
Database  {database}

Change rows and watch the page follow (it shows tenant acme; switch tenants at the top):

    {psql} \"INSERT INTO demo_orders (tenant, item, status, amount) VALUES ('acme', 'Walnut monitor stand', 'new', 84.00)\"
    {psql} \"UPDATE demo_orders SET status = 'shipped' WHERE tenant = 'acme' AND status = 'paid'\"
    {psql} \"DELETE FROM demo_orders WHERE id = (SELECT max(id) FROM demo_orders WHERE tenant = 'acme')\"

Follow tenant acme's raw stream (this token is valid for {ttl}):

    curl -N -H \"Authorization: Bearer {token}\" {gateway}/v1/stream

Stop with Ctrl-C.
",
        page = b.page,
        gateway = b.gateway,
        database = b.database,
        token = b.token,
    );
}
