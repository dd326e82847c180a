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
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
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
        // HTTP/1 only: the auto (h1/h2) builder first waits for a protocol preface with no
        // timeout at all, so a silent connection stayed open for ever.
        let builder = {
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout);
            b
        };
        let done = done_tx.clone();
        tokio::spawn(accept_loop(
            listener, router, builder, permits, stop_rx, finish_rx, done,
        ));
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
        tokio::time::timeout_at(deadline, self.done_rx.recv())
            .await
            .is_ok()
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    builder: http1::Builder,
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
    builder: http1::Builder,
    mut finish: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let conn = builder
        .serve_connection(TokioIo::new(JsonProtocolErrors::new(stream)), service)
        .with_upgrades();
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

/// hyper answers a request it cannot parse (400) or whose head is too large (431) by itself,
/// before any handler runs, with an empty body. This wrapper rewrites exactly those responses —
/// a 4xx with `content-length: 0` is never one of ours, since every error we send is JSON — so
/// they too carry `{"error", "error_type"}`.
struct JsonProtocolErrors {
    inner: TcpStream,
    /// Rewritten bytes still to be written.
    pending: Vec<u8>,
}

impl JsonProtocolErrors {
    fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            pending: Vec::new(),
        }
    }

    fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
        let head = std::str::from_utf8(buf).ok()?;
        if !head.starts_with("HTTP/1.1 4")
            || !head.ends_with("\r\n\r\n")
            || head.matches("\r\n\r\n").count() != 1
        {
            return None;
        }
        let lower = head.to_ascii_lowercase();
        if !lower.contains("\r\ncontent-length: 0\r\n") {
            return None;
        }
        let status_line = head.lines().next()?;
        let code = status_line.get(9..12)?;
        let (error_type, message) = match code {
            "431" => ("headers_too_large", "the request's headers are too large"),
            "400" => (
                "invalid_request",
                "the request could not be parsed as HTTP/1.1",
            ),
            _ => (
                "invalid_request",
                "the request was refused before it could be read",
            ),
        };
        let body = serde_json::json!({"error": message, "error_type": error_type}).to_string();
        let mut out = String::with_capacity(head.len() + body.len() + 64);
        for line in head.trim_end().split("\r\n") {
            if line.to_ascii_lowercase().starts_with("content-length:") {
                out.push_str(&format!(
                    "content-length: {}\r\ncontent-type: application/json\r\n",
                    body.len()
                ));
            } else {
                out.push_str(line);
                out.push_str("\r\n");
            }
        }
        out.push_str("\r\n");
        out.push_str(&body);
        Some(out.into_bytes())
    }

    fn poll_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use tokio::io::AsyncWrite;
        while !self.pending.is_empty() {
            let n = std::task::ready!(
                std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending)
            )?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncRead for JsonProtocolErrors {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for JsonProtocolErrors {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let Some(rewritten) = Self::rewrite(buf) {
            self.pending = rewritten;
            // The caller's bytes are taken whole; ours go out as the writes allow.
            let _ = self.poll_pending(cx)?;
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::JsonProtocolErrors;

    #[test]
    fn only_empty_4xx_heads_are_rewritten() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(JsonProtocolErrors::rewrite(hyper_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431") && head.contains("content-type: application/json")
        );
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error_type"], "headers_too_large");
        // Ours (a JSON body follows), successes, and bodies split off are left alone.
        assert!(JsonProtocolErrors::rewrite(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 40\r\n\r\n"
        )
        .is_none());
        assert!(
            JsonProtocolErrors::rewrite(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none()
        );
        assert!(JsonProtocolErrors::rewrite(b"{\"error\": 1}").is_none());
    }
}
