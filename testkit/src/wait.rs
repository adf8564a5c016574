//! Waiting for a condition with a bound: [`eventually`], [`eventually_within`] and the
//! gateway's readiness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{SOON, get};

/// Waits until `check` returns true, polling every 20 ms, for at most [`SOON`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, SOON, check).await
}

/// Waits until `check` returns true, polling every 20 ms, for at most `wait`: for what must
/// happen well before a periodic fallback would make it happen anyway.
pub async fn eventually_within<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {wait:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway at `addr` answers `/readyz` with `status` (200 ready, 503 not),
/// for at most [`SOON`].
pub async fn until_readyz(addr: SocketAddr, status: u16) {
    let what = format!("the gateway at {addr} to answer /readyz with {status}");
    eventually(&what, || async {
        get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == status)
    })
    .await;
}

/// Waits until the gateway at `addr` (in-process or a `pgfeed serve` child) answers
/// `/readyz` with 200, for at most [`SOON`].
pub async fn wait_until_ready(addr: SocketAddr) {
    until_readyz(addr, 200).await
}
