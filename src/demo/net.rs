//! Where the demo listens: loopback unless told otherwise, the page next to the gateway,
//! and the origins the page is reached from.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpListener;

use super::DemoError;

/// Refuses an address that other machines can reach; `setting` names where it was set.
pub(super) fn local_only(
    addr: SocketAddr,
    setting: &'static str,
    what: &'static str,
) -> Result<(), DemoError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(DemoError::Remote {
            addr,
            setting,
            what,
        })
    }
}

/// The page's address when none is given: the gateway's, with the next port (8081 next
/// to the default 8080), or any free port when the gateway's was chosen by the system.
pub(super) fn default_page_addr(gateway: SocketAddr) -> SocketAddr {
    let port = match gateway.port() {
        0 | u16::MAX => 0,
        p => p + 1,
    };
    SocketAddr::new(gateway.ip(), port)
}

pub(super) async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, DemoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, what, source })
}

/// Origins the page is reached from, for CORS: its address, and for a loopback address
/// the other loopback names too.
pub(super) fn page_origins(page: SocketAddr, existing: &[String]) -> Vec<String> {
    let port = page.port();
    let mut origins = if page.ip().is_unspecified() {
        // Reached through any of the machine's addresses: which one is not known here.
        vec!["*".to_string()]
    } else {
        vec![format!("http://{}", browser_addr(page))]
    };
    if page.ip().is_loopback() {
        origins.extend([
            format!("http://localhost:{port}"),
            format!("http://127.0.0.1:{port}"),
            format!("http://[::1]:{port}"),
        ]);
    }
    let mut unique = Vec::new();
    for origin in origins {
        if !existing.contains(&origin) && !unique.contains(&origin) {
            unique.push(origin);
        }
    }
    unique
}

/// The address as a browser would write it: an unspecified address becomes 127.0.0.1.
pub(super) fn browser_addr(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("[::1]:{}", addr.port()),
        _ => addr.to_string(),
    }
}
