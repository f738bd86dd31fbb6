//! A seeded, fault-injecting HTTP reverse proxy to put between the tunnel client and the relay.
//!
//! The client's relay URL points at the proxy (`http://<proxy>/tunnel`); the proxy forwards
//! every request to the relay's address. Like the corporate proxies the tunnel must survive,
//! it buffers: it reads each whole request before forwarding it and, by default, each whole
//! response before sending it on, so a session's streamed pull (docs/protocol.md §2.2)
//! delivers nothing until it ends and the client falls back to polling. With
//! [`FaultConfig::stream_responses`] it passes response bodies on as they come instead, and
//! the client streams through it. On top of that, per request and with configured probabilities drawn
//! from a seeded generator, it can
//! - delay the request (uniform in `0..max_delay`, which reorders concurrent requests),
//! - drop the request (the relay never sees it),
//! - forward it twice (the duplicate goes after the first answer arrived, as a retrying proxy
//!   would; its answer is thrown away),
//! - drop the response (the relay acted, the client learns nothing),
//! - reset mid-body (status, headers and part of the body, then the connection is cut: half
//!   of a buffered body; of a passed-on body, a random count of bytes below 256 KiB, so a
//!   stream is cut early in its life).
//!
//! A dropped request or response is answered per [`DropStyle`]: connection closed without an
//! answer, or 502.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, CONTENT_LENGTH};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;

use crate::servers::spawn_accept_loop;

/// How a dropped request or response looks to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropStyle {
    /// The connection is closed without an answer.
    Close,
    /// `502 Bad Gateway`, as a proxy reports an unreachable upstream.
    BadGateway,
    /// Either, chosen by the seeded generator for each fault.
    Mixed,
}

/// What the proxy does to traffic. All rates are probabilities in `0.0..=1.0`, drawn
/// independently per request; [`FaultConfig::none`] passes everything through.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Seed of the fault generator: the same seed and the same request order give the same
    /// faults.
    pub seed: u64,
    /// Rate of requests held for a random time in `0..max_delay` before forwarding.
    pub delay: f64,
    /// Upper bound of an injected delay. Default 200 ms.
    pub max_delay: Duration,
    /// Rate of requests not forwarded at all.
    pub drop_request: f64,
    /// Rate of requests forwarded a second time.
    pub duplicate_request: f64,
    /// Rate of responses thrown away after the upstream answered.
    pub drop_response: f64,
    /// Rate of responses cut after half their body.
    pub reset_mid_body: f64,
    /// How drops look. Default [`DropStyle::Mixed`].
    pub drop_style: DropStyle,
    /// Pass response bodies on as they arrive instead of buffering them whole; the upstream
    /// deadline then covers the response head only. Default false.
    pub stream_responses: bool,
    /// Largest request or response body buffered; beyond it the client gets 413 (request)
    /// or 502 (response). Default 16 MiB (above the relay's 4 MiB body and 1 MiB response
    /// limits).
    pub max_body: usize,
    /// Longest wait for the upstream's answer, whole body included. Default 60 s (above
    /// the relay's 20 s pull wait).
    pub upstream_timeout: Duration,
    /// Longest wait for a client's request body. Default 30 s.
    pub request_body_timeout: Duration,
}

impl FaultConfig {
    /// No faults: a plain buffering reverse proxy.
    pub fn none(seed: u64) -> FaultConfig {
        FaultConfig {
            seed,
            delay: 0.0,
            max_delay: Duration::from_millis(200),
            drop_request: 0.0,
            duplicate_request: 0.0,
            drop_response: 0.0,
            reset_mid_body: 0.0,
            drop_style: DropStyle::Mixed,
            stream_responses: false,
            max_body: 16 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(60),
            request_body_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig::none(0)
    }
}

/// Counts of what the proxy did, for test reports and assertions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests received from clients.
    pub requests: u64,
    /// Requests sent upstream, duplicates included.
    pub forwarded: u64,
    /// Responses delivered whole to clients (passed-on responses: counted when they start).
    pub delivered: u64,
    pub delayed: u64,
    pub dropped_requests: u64,
    pub duplicated: u64,
    pub dropped_responses: u64,
    pub resets: u64,
    /// Upstream failures (refused, timed out, broken) answered 502: not injected faults.
    pub upstream_errors: u64,
    /// Bodies over `max_body`.
    pub too_large: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    forwarded: AtomicU64,
    delivered: AtomicU64,
    delayed: AtomicU64,
    dropped_requests: AtomicU64,
    duplicated: AtomicU64,
    dropped_responses: AtomicU64,
    resets: AtomicU64,
    upstream_errors: AtomicU64,
    too_large: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The faults drawn for one request, all at once so each request consumes the same number
/// of random draws whatever happens to it.
#[derive(Debug, Clone, Copy)]
struct Plan {
    delay: Option<Duration>,
    drop_request: bool,
    duplicate: bool,
    drop_response: bool,
    reset: bool,
    /// For a drop: close (true) or 502 (false).
    close: bool,
    /// Passed-on bodies: bytes sent before a reset.
    reset_at: u64,
}

/// Passed-on bodies are reset within their first this many bytes.
const STREAM_RESET_WITHIN: u64 = 256 * 1024;

struct Faults {
    config: FaultConfig,
    rng: StdRng,
}

impl Faults {
    fn new(config: FaultConfig) -> Faults {
        let rng = StdRng::seed_from_u64(config.seed);
        Faults { config, rng }
    }

    fn plan(&mut self) -> Plan {
        let c = &self.config;
        let rng = &mut self.rng;
        let delayed = rng.random_bool(c.delay.clamp(0.0, 1.0));
        let max_delay_us = c.max_delay.as_micros().min(u128::from(u64::MAX)) as u64;
        let delay_us = rng.random_range(0..=max_delay_us);
        let plan = Plan {
            delay: delayed.then(|| Duration::from_micros(delay_us)),
            drop_request: rng.random_bool(c.drop_request.clamp(0.0, 1.0)),
            duplicate: rng.random_bool(c.duplicate_request.clamp(0.0, 1.0)),
            drop_response: rng.random_bool(c.drop_response.clamp(0.0, 1.0)),
            reset: rng.random_bool(c.reset_mid_body.clamp(0.0, 1.0)),
            close: rng.random_bool(0.5),
            reset_at: 0,
        };
        // Drawn only when streaming, so that buffering runs keep their fault sequences.
        let reset_at = if c.stream_responses {
            rng.random_range(0..STREAM_RESET_WITHIN)
        } else {
            0
        };
        let close = match c.drop_style {
            DropStyle::Close => true,
            DropStyle::BadGateway => false,
            DropStyle::Mixed => plan.close,
        };
        Plan {
            close,
            reset_at,
            ..plan
        }
    }
}

type UpstreamClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    counters: Counters,
    client: UpstreamClient,
}

/// A running proxy; stops (dropping its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (ephemeral port) and forwards to `upstream`, which need not be
    /// up yet (requests meanwhile get 502).
    pub async fn start(upstream: SocketAddr, config: FaultConfig) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(Faults::new(config)),
            counters: Counters::default(),
            client,
        });
        let for_loop = Arc::clone(&shared);
        let task = spawn_accept_loop(listener, move |stream, peer| {
            let shared = Arc::clone(&for_loop);
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = Arc::clone(&shared);
                    async move { handle(shared, req).await }
                });
                let result = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = result {
                    // Includes the connections the proxy cuts on purpose.
                    tracing::debug!(%peer, error = %e, "fault proxy connection ended");
                }
            }
        });
        Ok(FaultProxy { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<proxy addr><path>`, e.g. `url("/tunnel")` for the client's relay URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the fault configuration (and restarts the generator from its seed); for
    /// example faults off to let a test finish cleanly.
    pub fn set_config(&self, config: FaultConfig) {
        *self.shared.faults.lock().expect("fault lock") = Faults::new(config);
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            requests: get(&c.requests),
            forwarded: get(&c.forwarded),
            delivered: get(&c.delivered),
            delayed: get(&c.delayed),
            dropped_requests: get(&c.dropped_requests),
            duplicated: get(&c.duplicated),
            dropped_responses: get(&c.dropped_responses),
            resets: get(&c.resets),
            upstream_errors: get(&c.upstream_errors),
            too_large: get(&c.too_large),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the service answers: a response, or an error, which makes hyper cut the connection
/// without answering.
type Answer = Result<Response<ProxyBody>, CutConnection>;

#[derive(Debug)]
struct CutConnection(&'static str);

impl std::fmt::Display for CutConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fault proxy cut the connection: {}", self.0)
    }
}

impl std::error::Error for CutConnection {}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Answer {
    let counters = &shared.counters;
    bump(&counters.requests);
    let (max_body, body_timeout, upstream_timeout, stream_responses) = {
        let faults = shared.faults.lock().expect("fault lock");
        (
            faults.config.max_body,
            faults.config.request_body_timeout,
            faults.config.upstream_timeout,
            faults.config.stream_responses,
        )
    };
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(body_timeout, Limited::new(body, max_body).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    bump(&counters.too_large);
                    return Ok(status_response(StatusCode::PAYLOAD_TOO_LARGE));
                }
                return Err(CutConnection("request body broken"));
            }
            Err(_) => return Ok(status_response(StatusCode::REQUEST_TIMEOUT)),
        };
    let plan = shared.faults.lock().expect("fault lock").plan();

    if let Some(delay) = plan.delay {
        bump(&counters.delayed);
        tokio::time::sleep(delay).await;
    }
    if plan.drop_request {
        bump(&counters.dropped_requests);
        return dropped(plan, "request dropped");
    }

    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri: Uri = match format!("http://{}{path}", shared.upstream).parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(status_response(StatusCode::BAD_REQUEST)),
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let build = || {
        let mut upstream_req = Request::builder()
            .method(parts.method.clone())
            .uri(uri.clone())
            .body(Full::new(body.clone()))
            .expect("method and URI come from a parsed request");
        *upstream_req.headers_mut() = headers.clone();
        upstream_req
    };

    if stream_responses {
        return pass_on(&shared, plan, build, upstream_timeout).await;
    }
    let first = forward(&shared, build(), max_body, upstream_timeout).await;
    if plan.duplicate {
        bump(&counters.duplicated);
        let shared = Arc::clone(&shared);
        let again = build();
        tokio::spawn(async move {
            let _ = forward(&shared, again, max_body, upstream_timeout).await;
        });
    }
    let (status, resp_headers, resp_body) = match first {
        Ok(answer) => answer,
        Err(status) => return Ok(status_response(status)),
    };
    if plan.drop_response {
        bump(&counters.dropped_responses);
        return dropped(plan, "response dropped");
    }

    let mut response = Response::new(if plan.reset {
        bump(&counters.resets);
        ProxyBody::truncated(resp_body)
    } else {
        bump(&counters.delivered);
        ProxyBody::whole(resp_body)
    });
    *response.status_mut() = status;
    *response.headers_mut() = resp_headers;
    Ok(response)
}

/// The streaming half of [`handle`]: forwards the request (twice for a duplicate, whose
/// answer is read and thrown away) and passes the answer's body on as it comes, with the
/// planned drop or reset.
async fn pass_on(
    shared: &Arc<Shared>,
    plan: Plan,
    build: impl Fn() -> Request<Full<Bytes>>,
    timeout: Duration,
) -> Answer {
    let counters = &shared.counters;
    bump(&counters.forwarded);
    let head = tokio::time::timeout(timeout, shared.client.request(build())).await;
    if plan.duplicate {
        bump(&counters.duplicated);
        let shared = Arc::clone(shared);
        let again = build();
        tokio::spawn(async move {
            bump(&shared.counters.forwarded);
            if let Ok(Ok(resp)) = tokio::time::timeout(timeout, shared.client.request(again)).await
            {
                // Bounded by the relay: a streamed pull ends after its pull wait.
                let mut body = resp.into_body();
                while let Some(Ok(_)) = body.frame().await {}
            }
        });
    }
    let resp = match head {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "fault proxy: upstream request failed");
            bump(&counters.upstream_errors);
            return Ok(status_response(StatusCode::BAD_GATEWAY));
        }
        Err(_) => {
            bump(&counters.upstream_errors);
            return Ok(status_response(StatusCode::GATEWAY_TIMEOUT));
        }
    };
    if plan.drop_response {
        bump(&counters.dropped_responses);
        return dropped(plan, "response dropped");
    }
    let (parts, body) = resp.into_parts();
    let cut_after = plan.reset.then_some(plan.reset_at);
    if plan.reset {
        bump(&counters.resets);
    } else {
        bump(&counters.delivered);
    }
    let mut response = Response::new(ProxyBody::passed_on(body, cut_after));
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    *response.status_mut() = parts.status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Sends one request upstream and buffers the whole answer. Errors are the status to give
/// the client (and are counted).
async fn forward(
    shared: &Shared,
    req: Request<Full<Bytes>>,
    max_body: usize,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), StatusCode> {
    bump(&shared.counters.forwarded);
    let exchange = async {
        let resp = shared.client.request(req).await.map_err(|e| {
            tracing::debug!(error = %e, "fault proxy: upstream request failed");
            StatusCode::BAD_GATEWAY
        })?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    bump(&shared.counters.too_large);
                }
                StatusCode::BAD_GATEWAY
            })?
            .to_bytes();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        Ok((parts.status, headers, bytes))
    };
    let result = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(StatusCode::GATEWAY_TIMEOUT));
    if result.is_err() {
        bump(&shared.counters.upstream_errors);
    }
    result
}

fn dropped(plan: Plan, why: &'static str) -> Answer {
    if plan.close {
        Err(CutConnection(why))
    } else {
        Ok(status_response(StatusCode::BAD_GATEWAY))
    }
}

fn status_response(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::whole(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Headers that describe one hop, not the message; the proxy sets its own (`content-length`
/// comes from the buffered body, `host` from the upstream URI).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    ];
    for name in HOP {
        headers.remove(HeaderName::from_static(name));
    }
    headers.remove(CONTENT_LENGTH);
}

/// Pause between the partial body and the reset, so hyper flushes the part first.
const RESET_PAUSE: Duration = Duration::from_millis(20);

/// A response body: whole, or announced whole and cut after half, or passed on as it comes
/// (and perhaps cut).
pub struct ProxyBody {
    data: Option<Bytes>,
    /// Length announced (`content-length`); none for a passed-on body.
    announced: Option<u64>,
    /// Truncated bodies: the pause, then the error that makes hyper cut the connection.
    reset: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A passed-on body still coming from upstream.
    upstream: Option<Incoming>,
    /// A passed-on body is cut once this many more bytes went through.
    cut_after: Option<u64>,
}

impl ProxyBody {
    fn whole(data: Bytes) -> ProxyBody {
        ProxyBody {
            announced: Some(data.len() as u64),
            data: Some(data),
            reset: None,
            upstream: None,
            cut_after: None,
        }
    }

    fn passed_on(upstream: Incoming, cut_after: Option<u64>) -> ProxyBody {
        ProxyBody {
            announced: None,
            data: None,
            reset: None,
            upstream: Some(upstream),
            cut_after,
        }
    }

    fn truncated(data: Bytes) -> ProxyBody {
        // An empty body cannot be cut short, so announce one byte more than exists.
        let announced = (data.len() as u64).max(1);
        let half = data.slice(..data.len() / 2);
        ProxyBody {
            announced: Some(announced),
            data: Some(half),
            reset: Some(Box::pin(tokio::time::sleep(RESET_PAUSE))),
            upstream: None,
            cut_after: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(data) = self.data.take() {
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        while let Some(upstream) = self.upstream.as_mut() {
            let frame = match std::task::ready!(Pin::new(upstream).poll_frame(cx)) {
                None => {
                    self.upstream = None;
                    break;
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(io::Error::other(e)))),
                Some(Ok(frame)) => frame,
            };
            // Trailers (none come from the relay) are not passed on.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if let Some(left) = self.cut_after {
                if data.len() as u64 >= left {
                    data = data.slice(..left as usize);
                    self.upstream = None;
                    self.reset = Some(Box::pin(tokio::time::sleep(RESET_PAUSE)));
                } else {
                    self.cut_after = Some(left - data.len() as u64);
                }
            }
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        match self.reset.as_mut() {
            None => Poll::Ready(None),
            Some(pause) => {
                std::task::ready!(pause.as_mut().poll(cx));
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "fault proxy reset mid-body",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reset.is_none()
            && self.upstream.is_none()
            && !matches!(&self.data, Some(d) if !d.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match self.announced {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    const T: Duration = Duration::from_secs(10);

    /// An upstream that counts requests and answers `<method> <path?query> <body>` with a
    /// marker header.
    struct Upstream {
        addr: SocketAddr,
        seen: Arc<AtomicU64>,
        _task: tokio::task::JoinHandle<()>,
    }

    async fn upstream() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        let task = spawn_accept_loop(listener, move |stream, _| {
            let counter = Arc::clone(&counter);
            async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let line = format!("{} {} ", req.method(), req.uri());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut out = line.into_bytes();
                        out.extend_from_slice(&body);
                        let resp = Response::builder()
                            .header("x-upstream", "yes")
                            .body(Full::new(Bytes::from(out)))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        Upstream {
            addr,
            seen,
            _task: task,
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(T)
            .build()
            .unwrap()
    }

    async fn post(proxy: &FaultProxy, body: &'static str) -> reqwest::Result<(u16, String, bool)> {
        let resp = client()
            .post(proxy.url("/tunnel?Type=push&ConnId=7"))
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let marked = resp.headers().contains_key("x-upstream");
        let text = resp.text().await?;
        Ok((status, text, marked))
    }

    async fn wait_seen(up: &Upstream, n: u64) {
        let deadline = tokio::time::Instant::now() + T;
        while up.seen.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream saw {} < {n}",
                up.seen.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn no_faults_passes_requests_and_answers_unchanged() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr, FaultConfig::none(1))
            .await
            .unwrap();
        for _ in 0..5 {
            let (status, text, marked) = post(&proxy, "hello").await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(text, "POST /tunnel?Type=push&ConnId=7 hello");
            assert!(marked, "upstream headers must pass");
        }
        assert_eq!(up.seen.load(Ordering::SeqCst), 5);
        let stats = proxy.stats();
        assert_eq!(
            (stats.requests, stats.forwarded, stats.delivered),
            (5, 5, 5),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn drop_request_never_reaches_upstream() {
        let up = upstream().await;
        for style in [DropStyle::Close, DropStyle::BadGateway] {
            let config = FaultConfig {
                drop_request: 1.0,
                drop_style: style,
                ..FaultConfig::none(2)
            };
            let proxy = FaultProxy::start(up.addr, config).await.unwrap();
            for _ in 0..3 {
                match (style, post(&proxy, "x").await) {
                    (DropStyle::Close, Err(_)) => {}
                    (DropStyle::BadGateway, Ok((502, _, false))) => {}
                    (style, other) => panic!("{style:?}: unexpected {other:?}"),
                }
            }
            assert_eq!(proxy.stats().dropped_requests, 3);
            assert_eq!(proxy.stats().forwarded, 0);
        }
        assert_eq!(up.seen.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn drop_response_reaches_upstream_but_not_the_client() {
        let up = upstream().await;
        for (i, style) in [DropStyle::Close, DropStyle::BadGateway]
            .into_iter()
            .enumerate()
        {
            let config = FaultConfig {
                drop_response: 1.0,
                drop_style: style,
                ..FaultConfig::none(3)
            };
            let proxy = FaultProxy::start(up.addr, config).await.unwrap();
            match (style, post(&proxy, "x").await) {
                (DropStyle::Close, Err(_)) => {}
                (DropStyle::BadGateway, Ok((502, _, false))) => {}
                (style, other) => panic!("{style:?}: unexpected {other:?}"),
            }
            assert_eq!(up.seen.load(Ordering::SeqCst), i as u64 + 1);
            assert_eq!(proxy.stats().dropped_responses, 1);
        }
    }

    #[tokio::test]
    async fn duplicate_sends_each_request_twice_and_answers_once() {
        let up = upstream().await;
        let config = FaultConfig {
            duplicate_request: 1.0,
            ..FaultConfig::none(4)
        };
        let proxy = FaultProxy::start(up.addr, config).await.unwrap();
        for _ in 0..3 {
            let (status, text, _) = post(&proxy, "dup").await.unwrap();
            assert_eq!(
                (status, text.as_str()),
                (200, "POST /tunnel?Type=push&ConnId=7 dup")
            );
        }
        wait_seen(&up, 6).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(up.seen.load(Ordering::SeqCst), 6);
        assert_eq!(proxy.stats().duplicated, 3);
        assert_eq!(proxy.stats().forwarded, 6);
    }

    #[tokio::test]
    async fn reset_mid_body_breaks_the_response() {
        let up = upstream().await;
        let config = FaultConfig {
            reset_mid_body: 1.0,
            ..FaultConfig::none(5)
        };
        let proxy = FaultProxy::start(up.addr, config).await.unwrap();
        let resp = client()
            .post(proxy.url("/tunnel"))
            .body("a body long enough to be cut in half")
            .send()
            .await
            .expect("status and headers arrive before the reset");
        assert_eq!(resp.status().as_u16(), 200);
        assert!(
            resp.text().await.is_err(),
            "a cut body must not read as complete"
        );
        assert_eq!(up.seen.load(Ordering::SeqCst), 1);
        assert_eq!(proxy.stats().resets, 1);
    }

    #[tokio::test]
    async fn same_seed_same_fault_sequence() {
        let config = FaultConfig {
            drop_request: 0.3,
            duplicate_request: 0.3,
            delay: 0.5,
            ..FaultConfig::none(6)
        };
        let run = |config: FaultConfig| {
            let mut faults = Faults::new(config);
            (0..200)
                .map(|_| {
                    let p = faults.plan();
                    (
                        p.delay,
                        p.drop_request,
                        p.duplicate,
                        p.drop_response,
                        p.reset,
                        p.close,
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = run(config.clone());
        assert_eq!(a, run(config.clone()));
        assert_ne!(a, run(FaultConfig { seed: 7, ..config }));
        let drops = a.iter().filter(|p| p.1).count();
        assert!(
            (30..90).contains(&drops),
            "{drops} drops of 200 at rate 0.3"
        );
    }

    #[tokio::test]
    async fn delay_holds_requests() {
        let up = upstream().await;
        let config = FaultConfig {
            delay: 1.0,
            max_delay: Duration::from_millis(300),
            ..FaultConfig::none(8)
        };
        let proxy = FaultProxy::start(up.addr, config).await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..5 {
            assert_eq!(post(&proxy, "slow").await.unwrap().0, 200);
        }
        assert_eq!(proxy.stats().delayed, 5);
        // Five uniform draws in 0..300 ms summing under 50 ms would be a broken generator.
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn unreachable_upstream_is_a_502_not_a_fault() {
        let proxy = FaultProxy::start(crate::net::free_addr(), FaultConfig::none(9))
            .await
            .unwrap();
        assert_eq!(post(&proxy, "x").await.unwrap().0, 502);
        assert_eq!(proxy.stats().upstream_errors, 1);
    }
}
