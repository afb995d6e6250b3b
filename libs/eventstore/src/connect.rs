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

/// `urls` with `user` and `password` in each one's userinfo
/// (`nats://user:password@host:port`, percent-encoded), the form
/// [`connect_checked`] takes credentials in: a service turns its
/// `--nats-user`/`--nats-password` into this once, and every connection it
/// makes (readers included) authenticates alike. Without a user, `urls` as
/// they are.
#[must_use]
pub fn with_credentials(
    urls: &[String],
    user: Option<&str>,
    password: Option<&str>,
) -> Vec<String> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return urls.to_vec();
    };
    let userinfo = match password {
        Some(p) => format!("{}:{}", percent_encode(user), percent_encode(p)),
        None => percent_encode(user),
    };
    urls.iter()
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url.as_str()));
            // Credentials already in the URL win over the flags.
            if authority(rest).contains('@') {
                url.clone()
            } else {
                format!("{scheme}://{userinfo}@{rest}")
            }
        })
        .collect()
}

/// `urls` for messages and logs, without credentials: the addresses, then
/// the user when there is one (`nats://h:4222 (as NATS user replay)`).
#[must_use]
pub fn shown_urls(urls: &[String]) -> String {
    let mut user = None;
    let addresses: Vec<String> = urls
        .iter()
        .map(|url| {
            let (address, creds) = split_userinfo(url);
            if user.is_none() {
                user = creds.map(|(u, _)| u);
            }
            address
        })
        .collect();
    let joined = addresses.join(",");
    match user {
        Some(user) => format!("{joined} (as NATS user {user})"),
        None => joined,
    }
}

fn authority(rest: &str) -> &str {
    rest.split('/').next().unwrap_or(rest)
}

/// A URL without its userinfo, and the user and password that were in it.
fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let Some((userinfo, host)) = authority(rest).rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let after = &rest[authority(rest).len()..];
    let address = match scheme {
        Some(scheme) => format!("{scheme}://{host}{after}"),
        None => format!("{host}{after}"),
    };
    let creds = match userinfo.split_once(':') {
        Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
        None => (percent_decode(userinfo), None),
    };
    (address, Some(creds))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects to NATS and fails fast, naming the URL, when the address does not
/// answer as a NATS server. After this first connection the client reconnects
/// by itself forever with capped backoff. Credentials come in the URLs'
/// userinfo (see [`with_credentials`]); with them, the client's inboxes are
/// `_INBOX_<user>.>`, so that a server can let each user subscribe to its
/// own replies only.
///
/// # Errors
/// [`ConnectCheckError`] naming the URL (never its password) and the cause.
pub async fn connect_checked(
    urls: &[String],
    client_name: &str,
) -> Result<async_nats::Client, ConnectCheckError> {
    let joined = shown_urls(urls);
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay);
    let mut servers: Vec<async_nats::ServerAddr> = Vec::with_capacity(urls.len());
    let mut credentials = None;
    for u in urls {
        let (address, creds) = split_userinfo(u);
        if credentials.is_none() {
            credentials = creds;
        }
        servers.push(address.parse().map_err(|e: std::io::Error| {
            ConnectCheckError::Unreachable {
                url: shown_urls(std::slice::from_ref(u)),
                cause: e.to_string(),
            }
        })?);
    }
    if let Some((user, password)) = credentials {
        options = options
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .user_and_password(user, password.unwrap_or_default());
    }
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
    fn credentials_go_into_the_urls_and_never_into_messages() {
        let urls = with_credentials(
            &["nats://127.0.0.1:4222".into(), "10.0.0.2:4222".into()],
            Some("posts-query"),
            Some("p@ss:w/rd"),
        );
        assert_eq!(
            urls,
            [
                "nats://posts-query:p%40ss%3Aw%2Frd@127.0.0.1:4222",
                "nats://posts-query:p%40ss%3Aw%2Frd@10.0.0.2:4222"
            ]
        );
        let (address, creds) = split_userinfo(&urls[0]);
        assert_eq!(address, "nats://127.0.0.1:4222");
        assert_eq!(
            creds,
            Some(("posts-query".to_string(), Some("p@ss:w/rd".to_string())))
        );
        let shown = shown_urls(&urls);
        assert_eq!(
            shown,
            "nats://127.0.0.1:4222,nats://10.0.0.2:4222 (as NATS user posts-query)"
        );
        assert_eq!(with_credentials(&urls, Some("other"), Some("x")), urls);
        assert_eq!(
            with_credentials(&["nats://h:1".into()], None, Some("x")),
            ["nats://h:1"]
        );
        assert_eq!(shown_urls(&["nats://h:1".into()]), "nats://h:1");
    }

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
