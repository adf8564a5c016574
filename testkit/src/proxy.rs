//! TCP proxies in front of PostgreSQL for the fault tests: [`Proxy`] freezes or holds
//! connections (a network partition without a reset), [`FreezingProxy`] freezes the
//! connection that sends a given statement (a query that runs for ever).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP proxy in front of PostgreSQL that can freeze its connections: bytes stop flowing
/// but the sockets stay open, as in a network partition that sends no reset.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Connections accepted before this generation are frozen.
    frozen_before: tokio::sync::watch::Sender<u64>,
    /// Generation of the next accepted connection.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While true, accepted connections wait before connecting to the server.
    held: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// A proxy to the server behind `url`.
    pub async fn start(url: &str) -> Proxy {
        let upstream = upstream(url);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen_before, _) = tokio::sync::watch::channel(0u64);
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let (held, _) = tokio::sync::watch::channel(false);
        let (tx, gen_counter, mut hold) =
            (frozen_before.clone(), generation.clone(), held.subscribe());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let my_gen = gen_counter.fetch_add(1, Ordering::SeqCst);
                if hold.wait_for(|held| !held).await.is_err() {
                    return;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, tx.subscribe(), my_gen));
                tokio::spawn(pipe(sr, cw, tx.subscribe(), my_gen));
            }
        });
        Proxy {
            addr,
            frozen_before,
            generation,
            held,
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        through(self.addr, url)
    }

    /// Holds new connections (they wait, unanswered) until [`Proxy::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets held and new connections through.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Freezes every connection open now; later ones flow normally.
    pub fn freeze_existing(&self) {
        let current = self.generation.load(Ordering::SeqCst);
        self.frozen_before.send_replace(current);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen_before: tokio::sync::watch::Receiver<u64>,
    generation: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *frozen_before.borrow() > generation {
            // Hold both sockets open and move nothing, forever.
            std::future::pending::<()>().await;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *frozen_before.borrow() > generation {
                        continue;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = frozen_before.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// A TCP proxy in front of PostgreSQL that freezes each connection whose client sends
/// `needle` (a piece of a statement's text, sent when it is prepared), once armed: from
/// then on that connection moves no byte either way, as if its query ran for ever.
/// Connections that never send it flow normally.
pub struct FreezingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Whether sending `needle` freezes a connection.
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections frozen so far.
    frozen: std::sync::Arc<AtomicUsize>,
}

impl FreezingProxy {
    /// A proxy to the server behind `url`, not armed yet.
    pub async fn start(url: &str, needle: &'static [u8]) -> FreezingProxy {
        let upstream = upstream(url);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen = std::sync::Arc::new(AtomicUsize::new(0));
        let (armed_, frozen_) = (armed.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (stop, _) = tokio::sync::watch::channel(false);
                let (armed, frozen, stop_tx) = (armed_.clone(), frozen_.clone(), stop.clone());
                let mut stopped = stop.subscribe();
                // Client to server, watching for the needle (also across reads).
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buf[..n]);
                        if armed.load(Ordering::SeqCst)
                            && crate::wire::find(&tail, needle).is_some()
                        {
                            frozen.fetch_add(1, Ordering::SeqCst);
                            stop_tx.send_replace(true);
                            // Hold both halves open and move nothing, for ever.
                            let _keep = (cr, sw);
                            return std::future::pending::<()>().await;
                        }
                        let keep = tail.len().saturating_sub(needle.len());
                        tail.drain(..keep);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                // Server to client, until the connection is frozen.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            read = sr.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if *stopped.borrow() {
                                        break;
                                    }
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                            _ = stopped.changed() => break,
                        }
                    }
                    let _keep = (sr, cw);
                    std::future::pending::<()>().await;
                });
            }
        });
        FreezingProxy {
            addr,
            armed,
            frozen,
        }
    }

    /// From now on, a connection that sends the needle is frozen.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections were frozen.
    pub fn frozen(&self) -> usize {
        self.frozen.load(Ordering::SeqCst)
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        through(self.addr, url)
    }
}

/// The `host:port` of the server behind `url` (a TCP host).
fn upstream(url: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => panic!("the proxy needs a TCP host"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// `url` (its user and database) through the proxy at `addr`.
fn through(addr: SocketAddr, url: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{addr}/{db}")
}
