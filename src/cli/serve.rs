//! `pgfeed serve`: the open-file limit, the listening socket, and shutdown on SIGTERM or
//! SIGINT.

use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::config::Config;

/// Raises the open-file soft limit to the hard limit (each connection is a file: under
/// systemd the soft limit is 1024) and logs both.
fn raise_open_file_limit() {
    use rlimit::Resource;
    let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE) else {
        return;
    };
    match rlimit::increase_nofile_limit(hard) {
        Ok(raised) if raised > soft => tracing::info!(
            soft_was = soft,
            soft = raised,
            hard,
            "raised the open-file soft limit to the hard limit"
        ),
        Ok(raised) => tracing::info!(soft = raised, hard, "open-file limit"),
        Err(err) => {
            tracing::warn!(soft, hard, cause = %err, "cannot raise the open-file soft limit")
        }
    }
}

pub(super) async fn serve(config: Config) -> Result<(), CliError> {
    raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| CliError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancelled before anything else: nothing (not even the log) stands in its way.
        trigger.cancel();
        tracing::info!("shutting down");
    });
    crate::serve(config, listener, shutdown).await?;
    Ok(())
}

/// Returns on SIGTERM or SIGINT.
pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
