//! The plaintext metrics port: `GET /metrics` in the Prometheus text format,
//! answered by a deliberately tiny HTTP/1.1 responder (one request per
//! connection, nothing else served).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

/// Serves `render()` at `/metrics` until `stop` changes.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let mut request = vec![0u8; 2048];
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
            let Ok(Ok(n)) = read else { return };
            let line = String::from_utf8_lossy(&request[..n]);
            let first = line.lines().next().unwrap_or_default();
            let (status, body, kind) =
                if first.starts_with("GET /metrics ") || first == "GET /metrics" {
                    ("200 OK", render(), "text/plain; version=0.0.4")
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_owned(),
                        "text/plain",
                    )
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
