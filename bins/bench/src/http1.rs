//! A lean HTTP/1.1 client for the create runs, in the manner of `wrk`: a pool
//! of keep-alive connections, one request in flight on each, requests written
//! whole in one `write` and responses parsed with `httparse`.
//!
//! The load generator shares the machine's cores with nats-server and the
//! services, so what it spends per request is taken from what it measures.
//! reqwest spent ~35 CPU us per create here (URL and header maps, its pool,
//! a timer per request, a task hop to hyper's connection task), twice what
//! async-nats spends per publish on the raw side; this client spends about
//! what async-nats does. (A client on another machine would take nothing
//! from the services.) Every response is still read in full and checked:
//! status line, `Content-Length` framing, `Connection: close`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers a response may carry; ours carry about five.
const RESPONSE_HEADERS_MAX: usize = 32;
/// Largest response head or body this client accepts.
const RESPONSE_BYTES_MAX: usize = 1 << 20;
/// Read buffer of each connection: one create's response fits many times.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// A response, read in full.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// One keep-alive connection.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
        })
    }

    /// Writes `request` and reads one response. The flag says whether the
    /// connection may carry another request.
    async fn exchange(&mut self, request: &[u8]) -> Result<(Response, bool), String> {
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some(done) = take_response(&mut self.buf)? {
                return Ok(done);
            }
            if self.buf.len() > RESPONSE_BYTES_MAX {
                return Err(format!("response over {RESPONSE_BYTES_MAX} bytes"));
            }
            self.buf.reserve(READ_BUFFER_BYTES);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before a full response".into());
            }
        }
    }
}

/// A complete response at the front of `buf`, taken out of it, and whether
/// its connection may carry another request; `None` while bytes are missing.
fn take_response(buf: &mut BytesMut) -> Result<Option<(Response, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = head.code.ok_or("response without a status")?;
    let mut body_len = None;
    let mut reusable = head.version == Some(1);
    for h in head.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|e| e.to_string())?;
            let len: usize = text
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {text:?}"))?;
            body_len = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("responses with a Transfer-Encoding are not supported".into());
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            reusable = false;
        }
    }
    // 204 and 304 have no body; every other response from our services is
    // framed by Content-Length. No request asks for a 1xx.
    let body_len = match (status, body_len) {
        (100..=199, _) => return Err(format!("unexpected interim response {status}")),
        (204 | 304, _) => 0,
        (_, Some(len)) => len,
        (_, None) => return Err(format!("{status} response without Content-Length")),
    };
    if body_len > RESPONSE_BYTES_MAX {
        return Err(format!("response body of {body_len} bytes"));
    }
    if buf.len() < head_len + body_len {
        return Ok(None);
    }
    buf.advance(head_len);
    let body = buf.split_to(body_len).freeze();
    // One request in flight: bytes past the response mean the framing is off.
    let reusable = reusable && buf.is_empty();
    Ok(Some((Response { status, body }, reusable)))
}

/// Keep-alive connections to one address, opened on demand and reused.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    host: Arc<str>,
    idle: Arc<Mutex<Vec<Conn>>>,
    timeout: Duration,
}

impl Client {
    /// A client for `base` (`http://host:port`, an IP address).
    ///
    /// # Errors
    /// When `base` is not of that form.
    pub fn new(base: &str, timeout: Duration) -> anyhow::Result<Self> {
        let host = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("{base}: only http:// is supported"))?
            .trim_end_matches('/');
        let addr: SocketAddr = host
            .parse()
            .map_err(|e| anyhow::anyhow!("{base}: the bench client wants ip:port ({e})"))?;
        Ok(Self {
            addr,
            host: host.into(),
            idle: Arc::new(Mutex::new(Vec::new())),
            timeout,
        })
    }

    /// A whole `POST` request with a JSON body, to send with [`Client::send`].
    #[must_use]
    /// A `POST` of a JSON `body` to `path`, with `extra` header lines, each
    /// ending in CRLF (`"Authorization: Bearer ...\r\n"`), or none.
    pub fn post_json_with(&self, path: &str, body: &[u8], extra: &str) -> Bytes {
        self.json_request("POST", path, body, extra)
    }

    /// A `method` request of a JSON `body` to `path`, with `extra` header
    /// lines as for [`Client::post_json_with`].
    #[must_use]
    pub fn json_request(&self, method: &str, path: &str, body: &[u8], extra: &str) -> Bytes {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request.into()
    }

    /// Sends a request built by this client and reads its response.
    ///
    /// # Errors
    /// On a connection error, a malformed response or the timeout; the
    /// connection is then dropped and the next request opens a new one.
    pub async fn send(&self, request: &[u8]) -> Result<Response, String> {
        let idle = self.idle.lock().map_err(|e| e.to_string())?.pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => Conn::open(self.addr).await?,
        };
        let (response, reusable) = tokio::time::timeout(self.timeout, conn.exchange(request))
            .await
            .map_err(|_| format!("no response within {:?}", self.timeout))??;
        if reusable {
            self.idle.lock().map_err(|e| e.to_string())?.push(conn);
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status, body, reusable, bytes left in the buffer.
    type Parsed = (u16, Vec<u8>, bool, usize);

    fn parse(bytes: &[u8]) -> Result<Option<Parsed>, String> {
        let mut buf = BytesMut::from(bytes);
        Ok(take_response(&mut buf)?
            .map(|(r, reusable)| (r.status, r.body.to_vec(), reusable, buf.len())))
    }
    #[test]
    fn reads_a_content_length_response() {
        let got = parse(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(got, Ok(Some((201, b"hello".to_vec(), true, 0))));
        // Bytes past the response: the connection is not reused.
        let got = parse(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1");
        assert_eq!(got, Ok(Some((201, b"hello".to_vec(), false, 8))));
    }

    #[test]
    fn waits_for_the_whole_body() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
            Ok(None)
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
    }

    #[test]
    fn connection_close_and_http_1_0_are_not_reused() {
        let got = parse(
            b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(got, Ok(Some((413, Vec::new(), false, 0))));
        let got = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(got, Ok(Some((200, Vec::new(), false, 0))));
    }

    #[test]
    fn unframed_and_malformed_responses_are_errors() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\nbody").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse(b"HTTX/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 100 Continue\r\n\r\n").is_err());
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Ok(Some((204, Vec::new(), true, 0)))
        );
    }
}
