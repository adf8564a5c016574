//! `pgfeed demo` on the command line: its flags checked, run until SIGTERM or SIGINT
//! (the demo itself is [`crate::demo`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::CliError;
use super::serve::wait_for_signal;
use crate::config::Config;

/// Runs the demo; `listen_flag` says whether `--listen` set the gateway's address.
pub(super) async fn run(
    config: Config,
    listen_flag: bool,
    page_listen: Option<SocketAddr>,
    token_ttl: &str,
    allow_remote: bool,
) -> Result<(), CliError> {
    let token_ttl = humantime::parse_duration(token_ttl)
        .ok()
        .filter(|ttl| *ttl >= Duration::from_secs(1))
        .ok_or_else(|| CliError::Argument {
            arg: "--token-ttl",
            message: format!("{token_ttl:?} is not a duration of at least 1s, like \"1h\""),
        })?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        trigger.cancel();
    });
    let options = crate::demo::Options {
        page_listen,
        token_ttl,
        allow_remote,
        listen_setting: if listen_flag {
            "--listen"
        } else {
            "server.listen"
        },
    };
    crate::demo::run(config, options, shutdown).await?;
    Ok(())
}
