use std::time::Duration;

/// How long the first connection may take, TCP plus the NATS handshake. A port
/// that accepts TCP but never speaks NATS fails here instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound on the whole start-up check, whatever the client does inside.
const CONNECT_CHECK_DEADLINE: Duration = Duration::from_secs(8);
/// Reconnect backoff cap: a restarted server is picked up within a second.
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(1000);
/// Core request timeout; JetStream calls have their own on the context.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ConnectCheckError {
    #[error("{url}: not a reachable NATS server: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("{url}: no NATS handshake within {secs}s (is this port really a NATS server?)")]
    TimedOut { url: String, secs: u64 },
}

/// Connects to NATS and fails fast, naming the URL, when the address does not
/// answer as a NATS server. After this first connection the client reconnects
/// by itself forever with capped backoff.
///
/// # Errors
/// [`ConnectCheckError`] naming the URL and the cause.
pub async fn connect_checked(
    urls: &[String],
    client_name: &str,
) -> Result<async_nats::Client, ConnectCheckError> {
    let joined = urls.join(",");
    let options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX).min(20);
            (Duration::from_millis(50) * attempts).min(RECONNECT_DELAY_MAX)
        });
    let servers: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e: std::io::Error| ConnectCheckError::Unreachable {
                    url: u.clone(),
                    cause: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    match tokio::time::timeout(CONNECT_CHECK_DEADLINE, options.connect(servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(ConnectCheckError::Unreachable {
            url: joined,
            cause: e.to_string(),
        }),
        Err(_) => Err(ConnectCheckError::TimedOut {
            url: joined,
            secs: CONNECT_CHECK_DEADLINE.as_secs(),
        }),
    }
}
