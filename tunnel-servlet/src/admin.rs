//! The admin listener (`RelayConfig::admin_listen`, off by default): `/metrics`,
//! `/healthz`, the `/status` page and `/status.json`, on an address of its own so the
//! public side need not expose them. Read-only: every route is a GET and none takes
//! parameters. The accept loop is the public listener's (`relay::serve_http`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};

use crate::http::{self, Body};
use crate::state::Shared;
use crate::status::StatusSnapshot;

/// The page's Content-Security-Policy: no script, no outside resource, inline style only.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";

/// Entry point of every admin request.
pub(crate) async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let known = matches!(path, "/healthz" | "/metrics" | "/status" | "/status.json");
    if !known {
        return Ok(http::error(StatusCode::NOT_FOUND, "no such path"));
    }
    if req.method() != Method::GET {
        tracing::debug!(%peer, method = %req.method(), path, "admin: method not allowed");
        let mut resp = http::error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(resp);
    }
    let resp = match path {
        "/healthz" => http::healthz(),
        "/metrics" => http::metrics(&StatusSnapshot::gather(&shared)),
        "/status" => page(
            "text/html; charset=utf-8",
            StatusSnapshot::gather(&shared).to_html(),
        ),
        _ => page(
            "application/json",
            StatusSnapshot::gather(&shared).to_json(),
        ),
    };
    Ok(resp)
}

/// A 200 with `body`, never cached, never sniffed as another type.
fn page(content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = http::uncached(StatusCode::OK, content_type, body);
    let headers = resp.headers_mut();
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(PAGE_CSP),
    );
    resp
}
