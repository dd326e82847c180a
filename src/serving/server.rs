//! Connections: the accept loop, its bounds, and the drain.
//!
//! Why not `axum::serve`: it offers no connection cap and no header-read timeout, so a client that
//! opens sockets and sends nothing holds them for ever (tens of thousands of idle sockets ran the
//! process out of file descriptors). Here every connection needs a permit from a semaphore before
//! it is accepted (past the cap, new clients wait in the kernel's backlog), and hyper closes a
//! connection whose request head does not arrive within the header-read timeout — which also
//! closes keep-alive connections that sit idle that long.
//!
//! The drain is the one Kubernetes expects. SIGTERM flips readiness to 503 at once, but the
//! listener keeps accepting for `drain_delay`, so clients still routed here (endpoints take a
//! while to update) are served, not refused. Then the listener closes, each connection finishes
//! the request it is in and closes, and in-flight work gets `shutdown_timeout`; rows still queued
//! at that deadline are answered 503 and the process exits on time.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// Bounds on connections.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A request head (and, on a kept-alive connection, the next one) must arrive within this.
    pub header_read_timeout: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The running accept loop. Dropping it does not stop anything; [`Listener::close`] does.
pub struct Listener {
    stop_accepting: watch::Sender<bool>,
    finish_connections: watch::Sender<bool>,
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
}

impl Listener {
    /// Starts accepting on `listener`, serving `router` on every connection.
    pub fn start(listener: TcpListener, router: Router, config: ConnConfig) -> Self {
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (finish_connections, finish_rx) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel::<()>(1);
        let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let builder = {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout);
            b
        };
        let done = done_tx.clone();
        tokio::spawn(accept_loop(listener, router, builder, permits, stop_rx, finish_rx, done));
        Self {
            stop_accepting,
            finish_connections,
            done_tx: Some(done_tx),
            done_rx,
        }
    }

    /// Closes the listener, asks every connection to finish its current request and close, and
    /// waits until they all have, or until `deadline` passes. Returns whether all closed.
    pub async fn close(&mut self, deadline: tokio::time::Instant) -> bool {
        let _ = self.stop_accepting.send(true);
        let _ = self.finish_connections.send(true);
        self.done_tx.take();
        // Every connection task holds a clone of the sender: recv yields None once all are gone.
        tokio::time::timeout_at(deadline, self.done_rx.recv()).await.is_ok()
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    finish: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let conn = serve_connection(stream, router.clone(), builder.clone(), finish.clone());
        let done = done.clone();
        tokio::spawn(async move {
            conn.await;
            drop(permit);
            drop(done);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    mut finish: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut finishing = *finish.borrow();
    if finishing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = finish.changed(), if !finishing => {
                finishing = true;
                if changed.is_ok() {
                    // Finish the request in progress (keep-alive off), then close.
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
