//! The authenticating forwarder: a listener on `127.0.0.1:0` that the HTTP client uses as
//! its proxy. Each connection accepted gets a connection of its own to the real proxy,
//! authenticated by a handshake on the connection's first request, then the bytes are
//! copied both ways (see the [module docs](super) for why).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tunnel_proto::warn_limit::WarningLimit;

use super::challenge::parse_challenges;
use super::http1::{self, BodyLength, RequestHead};
use super::session::Session;
use super::{AuthSetup, AuthStatus, ProxyAuthConfig};

/// Most requests of one handshake: the unauthenticated one, then up to three rounds
/// (NTLM needs two, Kerberos one, SPNEGO with mutual authentication at most two).
const MAX_ROUNDS: usize = 4;

/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A running forwarder; dropping it stops its listener and every connection through it.
#[derive(Debug)]
pub(crate) struct Forwarder {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::AbortHandle,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): they end with it.
        self.task.abort();
    }
}

#[derive(Debug)]
struct Shared {
    proxy: (String, u16),
    setup: AuthSetup,
    tcp_connect_timeout: Duration,
    /// Largest body of a first request, which is kept to be sent again in each round.
    max_first_body: usize,
    config: ProxyAuthConfig,
    status: AuthStatus,
}

/// Why a handshake did not authenticate the connection.
enum HandshakeError {
    /// The proxy refused, or asks for what we cannot give: final (a 407 to the client).
    Refused(String),
    /// The proxy could not be reached or broke off: the client may retry (a 502).
    Unreachable(String),
}

/// The connection to the proxy after a successful handshake, and the proxy's answer to the
/// first request (not yet sent to the client).
struct Established {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    response_head: Vec<u8>,
    session: Option<Session>,
    /// The `Proxy-Authorization` value of the last round (Basic repeats it on every request).
    authorization: Option<String>,
}

impl Forwarder {
    /// Binds the listener and starts accepting: on the current tokio runtime, or, for a
    /// client made outside one, on a runtime of its own in a thread of its own (which ends
    /// when the forwarder is dropped).
    pub(super) fn start(
        proxy: (String, u16),
        setup: AuthSetup,
        tcp_connect_timeout: Duration,
        max_first_body: usize,
        config: ProxyAuthConfig,
    ) -> io::Result<Forwarder> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            proxy,
            setup,
            tcp_connect_timeout,
            max_first_body,
            config,
            status: AuthStatus::default(),
        });
        let accepting = accept_loop(listener, shared.clone());
        let task = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn(accepting).abort_handle(),
            Err(_) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let task = runtime.spawn(accepting);
                let abort = task.abort_handle();
                std::thread::Builder::new()
                    .name("proxy-auth-forwarder".into())
                    .spawn(move || {
                        let _ = runtime.block_on(task);
                    })?;
                abort
            }
        };
        tracing::debug!(%addr, proxy = ?shared.proxy, "proxy authentication forwarder listening");
        Ok(Forwarder { addr, shared, task })
    }

    /// The URL the HTTP client is to use as its proxy.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn status(&self) -> &AuthStatus {
        &self.shared.status
    }
}

async fn accept_loop(listener: std::net::TcpListener, shared: Arc<Shared>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("proxy authentication forwarder cannot listen: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    static ACCEPT_FAILURES: WarningLimit = WarningLimit::new(Duration::from_secs(10));
    loop {
        while connections.try_join_next().is_some() {}
        // Waits here while max_connections are open: the HTTP client's connect waits too.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tunnel_proto::warn_limited!(ACCEPT_FAILURES,
                        "proxy authentication forwarder: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            },
            // Reap finished connections while idle, so their memory does not wait for the
            // next accept.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve(stream, &shared).await {
                tracing::debug!("proxy authentication forwarder: connection ended: {e}");
            }
        });
    }
}

/// One connection from the HTTP client: read its first request, authenticate a connection
/// to the proxy with it, then relay.
async fn serve(client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    let (client_reader, mut client_writer) = client.into_split();
    let mut client_reader = BufReader::new(client_reader);
    let config = &shared.config;

    let first = tokio::time::timeout(
        config.handshake_timeout,
        read_first_request(&mut client_reader, shared),
    )
    .await;
    let (head, body) = match first {
        Err(_) => return Ok(()),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(request))) => request,
        Ok(Err((status, why))) => {
            tracing::warn!(
                "proxy authentication forwarder: bad request from the HTTP client: {why}"
            );
            return http1::respond(&mut client_writer, status, &why).await;
        }
    };

    let handshake = tokio::time::timeout(config.handshake_timeout, handshake(shared, &head, &body));
    let established = match handshake.await {
        Ok(Ok(established)) => established,
        Ok(Err(HandshakeError::Refused(why))) => {
            tracing::warn!(proxy = %shared.proxy.0, "proxy authentication failed: {why}");
            shared.status.set_failure(why.clone());
            return http1::respond(
                &mut client_writer,
                "407 Proxy Authentication Required",
                &why,
            )
            .await;
        }
        Ok(Err(HandshakeError::Unreachable(why))) => {
            tracing::debug!(proxy = %shared.proxy.0, "proxy not reachable: {why}");
            return http1::respond(&mut client_writer, "502 Bad Gateway", &why).await;
        }
        Err(_) => {
            let why = format!(
                "the proxy authentication handshake took longer than {:?}",
                config.handshake_timeout
            );
            tracing::warn!(proxy = %shared.proxy.0, "{why}");
            return http1::respond(&mut client_writer, "504 Gateway Timeout", &why).await;
        }
    };
    let Established {
        reader: mut upstream_reader,
        writer: mut upstream_writer,
        response_head,
        session,
        authorization,
    } = established;
    let negotiated = match &session {
        Some(s) => s.describe(),
        None => "none (the proxy asked for no authentication)".to_string(),
    };
    tracing::debug!(proxy = %shared.proxy.0, "proxy connection authenticated: {negotiated}");
    shared.status.set_negotiated(negotiated);
    client_writer.write_all(&response_head).await?;

    // After CONNECT, or once the connection itself is authenticated, bytes are bytes. Basic
    // authenticates requests, so each later request of a plain-HTTP connection gets it too.
    let per_request = match (&session, &authorization) {
        (Some(s), Some(value))
            if !s.binds_connection() && !head.method.eq_ignore_ascii_case("CONNECT") =>
        {
            Some(value.clone())
        }
        _ => None,
    };
    let up = async {
        match per_request {
            Some(value) => {
                forward_requests(&mut client_reader, &mut upstream_writer, &value, config).await?
            }
            None => {
                tokio::io::copy_buf(&mut client_reader, &mut upstream_writer).await?;
            }
        }
        upstream_writer.shutdown().await
    };
    let down = async {
        tokio::io::copy_buf(&mut upstream_reader, &mut client_writer).await?;
        client_writer.shutdown().await
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

/// The client's first request: its head and (for a request with a body) the body, kept to
/// be sent again in each round. `Err` holds the status to answer and why.
async fn read_first_request(
    reader: &mut BufReader<OwnedReadHalf>,
    shared: &Shared,
) -> Result<Option<(RequestHead, Vec<u8>)>, (&'static str, String)> {
    let bad = |e: io::Error| ("400 Bad Request", e.to_string());
    let Some(raw) = http1::read_head(reader, shared.config.max_header_bytes)
        .await
        .map_err(bad)?
    else {
        return Ok(None);
    };
    let head = http1::parse_request(&raw).map_err(bad)?;
    let body = match http1::body_length(&head.headers, true).map_err(bad)? {
        BodyLength::Fixed(0) => Vec::new(),
        BodyLength::Fixed(n) if n > shared.max_first_body as u64 => {
            return Err((
                "413 Content Too Large",
                format!(
                    "first request body of {n} bytes over {}",
                    shared.max_first_body
                ),
            ))
        }
        BodyLength::Fixed(n) => http1::read_body(reader, n as usize).await.map_err(bad)?,
        BodyLength::Chunked | BodyLength::UntilClose => {
            return Err((
                "501 Not Implemented",
                "chunked request bodies are not forwarded".to_string(),
            ))
        }
    };
    Ok(Some((head, body)))
}

async fn connect_upstream(shared: &Shared) -> Result<TcpStream, HandshakeError> {
    let (host, port) = &shared.proxy;
    let connect = TcpStream::connect((host.as_str(), *port));
    let stream = tokio::time::timeout(shared.tcp_connect_timeout, connect)
        .await
        .map_err(|_| {
            HandshakeError::Unreachable(format!(
                "no connection to the proxy {host}:{port} within {:?}",
                shared.tcp_connect_timeout
            ))
        })?
        .map_err(|e| HandshakeError::Unreachable(format!("proxy {host}:{port}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Authenticates a connection to the proxy with the client's first request and sends it.
///
/// A request without a body (a CONNECT, a pull) is itself the handshake's request. One with a
/// body goes once, after the handshake, which runs on a body-less `OPTIONS` for the same URL
/// instead: a proxy answers 407 without reading a body and may stop reading, so a body sent
/// in every round could block the handshake until its deadline. Should the proxy want no
/// authentication, that probe reaches the relay, which refuses the method (405) and does
/// nothing.
async fn handshake(
    shared: &Shared,
    head: &RequestHead,
    body: &[u8],
) -> Result<Established, HandshakeError> {
    if body.is_empty() {
        return authenticate(shared, head).await;
    }
    let max = shared.config.max_header_bytes;
    let broke = |e: io::Error| HandshakeError::Unreachable(format!("proxy connection: {e}"));
    let mut established = authenticate(shared, &probe_of(head)).await?;
    let probe_answer = http1::parse_response(&established.response_head).map_err(broke)?;
    let length = http1::body_length(&probe_answer.headers, false).map_err(broke)?;
    let still_open = http1::skip_body(&mut established.reader, length, max)
        .await
        .map_err(broke)?
        && !http1::closes(&probe_answer.headers);
    // What the session says, taken now: a session is not `Sync`, so no reference to it
    // is held across the awaits below.
    let binds_connection = established
        .session
        .as_ref()
        .is_some_and(Session::binds_connection);
    let described = established.session.as_ref().map(Session::describe);
    if !still_open {
        if let (true, Some(described)) = (binds_connection, &described) {
            return Err(HandshakeError::Unreachable(format!(
                "the proxy closed the connection right after authenticating it ({described})"
            )));
        }
        let (r, w) = connect_upstream(shared).await?.into_split();
        established.reader = BufReader::new(r);
        established.writer = w;
    }
    // A per-request scheme (Basic) goes with the request too.
    let authorization = match binds_connection {
        false => established.authorization.clone(),
        true => None,
    };
    let mut request = http1::request_head_bytes(head, authorization.as_deref());
    request.extend_from_slice(body);
    established
        .writer
        .write_all(&request)
        .await
        .map_err(broke)?;
    let response_head = http1::read_head(&mut established.reader, max)
        .await
        .map_err(broke)?
        .ok_or_else(|| broke(io::ErrorKind::UnexpectedEof.into()))?;
    if http1::parse_response(&response_head).map_err(broke)?.status == 407 {
        return Err(HandshakeError::Refused(match described {
            Some(described) => format!("the proxy refused {described} after the handshake"),
            None => "the proxy asked for authentication only after a probe passed".to_string(),
        }));
    }
    established.response_head = response_head;
    Ok(established)
}

/// The body-less stand-in for `head` that carries a handshake: `OPTIONS` for the same URL,
/// without the body's headers.
fn probe_of(head: &RequestHead) -> RequestHead {
    const BODY_HEADERS: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "content-type",
        "expect",
    ];
    RequestHead {
        method: "OPTIONS".to_string(),
        target: head.target.clone(),
        headers: head
            .headers
            .iter()
            .filter(|(name, _)| !BODY_HEADERS.iter().any(|b| name.eq_ignore_ascii_case(b)))
            .cloned()
            .collect(),
    }
}

/// Sends `head` (again, with a new `Proxy-Authorization`, after each 407) until the proxy
/// answers something else than 407, or refuses for good.
async fn authenticate(shared: &Shared, head: &RequestHead) -> Result<Established, HandshakeError> {
    let max = shared.config.max_header_bytes;
    let broke = |e: io::Error| HandshakeError::Unreachable(format!("proxy connection: {e}"));
    let mut upstream: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)> = None;
    let mut session: Option<Session> = None;
    let mut authorization: Option<String> = None;
    for round in 0..MAX_ROUNDS {
        if upstream.is_none() {
            let (r, w) = connect_upstream(shared).await?.into_split();
            upstream = Some((BufReader::new(r), w));
        }
        let Some((reader, writer)) = upstream.as_mut() else {
            unreachable!("connected just above");
        };
        let request = http1::request_head_bytes(head, authorization.as_deref());
        writer.write_all(&request).await.map_err(broke)?;
        let response_head = http1::read_head(reader, max)
            .await
            .map_err(broke)?
            .ok_or_else(|| broke(io::ErrorKind::UnexpectedEof.into()))?;
        let response = http1::parse_response(&response_head).map_err(broke)?;
        if response.status != 407 {
            let (reader, writer) = upstream.take().expect("present");
            return Ok(Established {
                reader,
                writer,
                response_head,
                session,
                authorization,
            });
        }
        // A 407: drop its error page, then answer its challenge.
        let length = http1::body_length(&response.headers, false).map_err(broke)?;
        let still_open = http1::skip_body(reader, length, max).await.map_err(broke)?
            && !http1::closes(&response.headers);
        let challenges = parse_challenges(http1::header_values(
            &response.headers,
            "proxy-authenticate",
        ));
        let next = match session.as_mut() {
            None => {
                let (chosen, value) = Session::choose(&challenges, &shared.setup)
                    .await
                    .map_err(HandshakeError::Refused)?;
                session = Some(chosen);
                value
            }
            Some(s) => s.next(&challenges).await.map_err(HandshakeError::Refused)?,
        };
        authorization = Some(next);
        if !still_open {
            // A connection-bound handshake cannot go on over a new connection once its first
            // message was answered.
            if let Some(s) = session
                .as_ref()
                .filter(|s| s.binds_connection() && round > 0)
            {
                return Err(HandshakeError::Refused(format!(
                    "{}: the proxy closed the connection in the middle of the handshake",
                    s.describe()
                )));
            }
            upstream = None;
        }
    }
    Err(HandshakeError::Refused(format!(
        "the proxy still answered 407 after {MAX_ROUNDS} requests{}",
        session
            .map(|s| format!(" ({})", s.describe()))
            .unwrap_or_default()
    )))
}

/// Relays the client's later requests of a plain-HTTP connection, each with `authorization`
/// (Basic), until the client closes it or leaves it idle past the idle timeout.
async fn forward_requests(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    authorization: &str,
    config: &ProxyAuthConfig,
) -> io::Result<()> {
    loop {
        let next = tokio::time::timeout(
            config.idle_timeout,
            http1::read_head(reader, config.max_header_bytes),
        )
        .await;
        let raw = match next {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Some(raw))) => raw,
        };
        let head = http1::parse_request(&raw)?;
        writer
            .write_all(&http1::request_head_bytes(&head, Some(authorization)))
            .await?;
        match http1::body_length(&head.headers, true)? {
            BodyLength::Fixed(n) => {
                let copied =
                    tokio::io::copy(&mut tokio::io::AsyncReadExt::take(&mut *reader, n), writer)
                        .await?;
                if copied < n {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            BodyLength::Chunked | BodyLength::UntilClose => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunked request bodies are not forwarded",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A forwarder toward a proxy on loopback `port`, as `user` with password `pw`.
    fn forwarder_toward(port: u16, user: &str, max_first_body: usize) -> Forwarder {
        let setup = AuthSetup {
            credentials: Some((user.into(), "pw".into())),
            proxy_host: "127.0.0.1".into(),
        };
        let config = ProxyAuthConfig::default();
        let proxy = ("127.0.0.1".to_string(), port);
        Forwarder::start(proxy, setup, Duration::from_secs(2), max_first_body, config).unwrap()
    }

    /// A forwarder toward a proxy that is not there, made without a tokio runtime.
    fn forwarder_to_nowhere() -> Forwarder {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        forwarder_toward(port, "CORP\\alice", 1024)
    }

    fn ask(forwarder: &Forwarder, request: &[u8]) -> String {
        let mut stream = std::net::TcpStream::connect(forwarder.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn made_outside_a_runtime_it_runs_on_its_own_and_answers_what_went_wrong() {
        let forwarder = forwarder_to_nowhere();
        let answer = ask(
            &forwarder,
            b"CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        let answer = ask(&forwarder, b"not http at all\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let answer = ask(
            &forwarder,
            b"POST http://relay/ HTTP/1.1\r\nHost: relay\r\nContent-Length: 5000\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    }

    /// Reads one request head from a fake proxy's connection; its `Proxy-Authorization`.
    async fn proxy_reads(reader: &mut BufReader<OwnedReadHalf>) -> Option<String> {
        let head = http1::read_head(reader, 64 * 1024).await.unwrap().unwrap();
        let head = http1::parse_request(&head).unwrap();
        let value = http1::header_values(&head.headers, "proxy-authorization")
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned());
        value
    }

    /// A proxy that closes the connection after its first 407 (allowed before a handshake
    /// starts), then runs NTLM on a second connection: the forwarder reconnects, and the
    /// CONNECT is authenticated on that second connection.
    #[tokio::test]
    async fn ntlm_goes_on_over_a_new_connection_when_the_first_challenge_closes() {
        use base64::Engine;
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = proxy.local_addr().unwrap().port();
        let fake_proxy = tokio::spawn(async move {
            let (first, _) = proxy.accept().await.unwrap();
            let (r, mut w) = first.into_split();
            assert_eq!(proxy_reads(&mut BufReader::new(r)).await, None);
            w.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await.unwrap();
            drop(w);
            let (second, _) = proxy.accept().await.unwrap();
            let (r, mut w) = second.into_split();
            let mut r = BufReader::new(r);
            let type1 = proxy_reads(&mut r).await.unwrap();
            assert!(type1.starts_with("NTLM "), "{type1}");
            let mut type2 = b"NTLMSSP\0\x02\0\0\0".to_vec();
            type2.extend_from_slice(&[0; 8]);
            type2.extend_from_slice(&0x0000_0201u32.to_le_bytes());
            type2.extend_from_slice(b"8 bytes!");
            let token = base64::engine::general_purpose::STANDARD.encode(type2);
            let challenge = format!("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM {token}\r\nContent-Length: 3\r\n\r\nno!");
            w.write_all(challenge.as_bytes()).await.unwrap();
            let type3 = proxy_reads(&mut r).await.unwrap();
            assert!(type3.starts_with("NTLM TlRMTVNTUAAD"), "{type3}");
            w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes")
                .await
                .unwrap();
        });
        let forwarder = forwarder_toward(port, "CORP\\alice", 1024);
        let mut client = TcpStream::connect(forwarder.addr).await.unwrap();
        client
            .write_all(b"CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut client, &mut answer);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap()
            .unwrap();
        fake_proxy.await.unwrap();
        assert_eq!(
            answer,
            "HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes"
        );
        assert_eq!(
            forwarder.status().negotiated().as_deref(),
            Some("NTLM as CORP\\alice")
        );
    }

    /// A first request with a body: the handshake runs on a body-less OPTIONS probe (a proxy
    /// answering 407 need not read a body), and the body goes once, with the real request.
    #[tokio::test]
    async fn a_first_request_body_waits_for_the_handshake_on_a_probe() {
        const BODY: usize = 512 * 1024;
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = proxy.local_addr().unwrap().port();
        let fake_proxy = tokio::spawn(async move {
            let (conn, _) = proxy.accept().await.unwrap();
            let (r, mut w) = conn.into_split();
            let mut r = BufReader::new(r);
            let mut heads = Vec::new();
            for answer in [
                "407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"",
                "405 Method Not Allowed",
                "200 OK",
            ] {
                let raw = http1::read_head(&mut r, 64 * 1024).await.unwrap().unwrap();
                let head = http1::parse_request(&raw).unwrap();
                let length = http1::body_length(&head.headers, true).unwrap();
                if let BodyLength::Fixed(n) = length {
                    http1::read_body(&mut r, n as usize).await.unwrap();
                }
                let auth = http1::header_values(&head.headers, "proxy-authorization").next();
                heads.push((head.method.clone(), length, auth.is_some()));
                let response = format!("HTTP/1.1 {answer}\r\nContent-Length: 0\r\n\r\n");
                w.write_all(response.as_bytes()).await.unwrap();
            }
            heads
        });
        let forwarder = forwarder_toward(port, "alice", BODY);
        let mut client = TcpStream::connect(forwarder.addr).await.unwrap();
        let head = format!("POST http://relay/tunnel?Type=push HTTP/1.1\r\nHost: relay\r\nContent-Type: application/octet-stream\r\nContent-Length: {BODY}\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(&vec![7u8; BODY]).await.unwrap();
        let mut reader = BufReader::new(client);
        let read = http1::read_head(&mut reader, 1024);
        let answer = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
        let fixed = |n: usize| BodyLength::Fixed(n as u64);
        assert_eq!(
            fake_proxy.await.unwrap(),
            [
                ("OPTIONS".to_string(), fixed(0), false),
                ("OPTIONS".to_string(), fixed(0), true),
                ("POST".to_string(), fixed(BODY), true),
            ]
        );
    }
}
