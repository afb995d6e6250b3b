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

/// The wait before connection attempt `attempts` (1 for the first): none
/// for the first, so a start or a reconnect tries at once (the client also
/// counts the initial connection; 50 ms there delayed every start), then
/// 50 ms more per attempt up to [`RECONNECT_DELAY_MAX`].
fn reconnect_delay(attempts: usize) -> Duration {
    let retries = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(20);
    (Duration::from_millis(50) * retries).min(RECONNECT_DELAY_MAX)
}

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
        .reconnect_delay_callback(reconnect_delay);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_attempt_does_not_wait_and_the_backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(50));
        assert_eq!(reconnect_delay(5), Duration::from_millis(200));
        assert_eq!(reconnect_delay(1000), RECONNECT_DELAY_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_DELAY_MAX);
    }
}
