//! Webhook delivery: each prediction event is POSTed as JSON to the prediction's
//! `webhook` URL, in order, from one task. Plain `http://` only (a loopback receiver,
//! a sidecar): a minimal HTTP/1.1 client over a TCP stream, so the server needs no
//! TLS or client stack.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::worker::Delivery;

/// Delivers until every sender is gone; returns then (shutdown waits for it).
pub async fn deliver(mut rx: UnboundedReceiver<Delivery>) {
    while let Some((p, body)) = rx.recv().await {
        let Some(url) = &p.webhook else { continue };
        // Cog retries the final event; we retry each a few times with backoff
        for attempt in 0..3u64 {
            match post(url, &body).await {
                Ok(status) if status < 500 => break,
                Ok(status) => tracing::warn!("webhook {url}: HTTP {status}"),
                Err(e) => tracing::warn!("webhook {url}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
}

/// POSTs `body` to an `http://host[:port]/path` URL; returns the status code.
pub async fn post(url: &str, body: &Value) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// webhooks are supported, not {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let payload = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let io = async {
        let mut stream = TcpStream::connect(&addr).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nUser-Agent: wuerstchen\r\n\r\n",
            payload.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&payload).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // "HTTP/1.1 200 OK"
    let line = String::from_utf8_lossy(&response);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "no HTTP status line in the reply".into())
}
