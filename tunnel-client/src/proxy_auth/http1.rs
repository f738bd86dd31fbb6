//! The little of HTTP/1.1 the forwarder needs: reading one request or response head
//! (bounded), writing a request head with its `Proxy-Authorization` replaced, and finding
//! or skipping a body.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Most headers in one head.
const MAX_HEADERS: usize = 100;

/// Reads one head, up to and including its empty line, consuming nothing after it. `None` at
/// a clean end of stream before any byte.
pub(crate) async fn read_head<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside an HTTP head",
                ))
            };
        }
        let search_from = head.len().saturating_sub(3);
        let before = head.len();
        head.extend_from_slice(buf);
        if let Some(end) = find_end(&head[search_from..]) {
            let end = search_from + end;
            reader.consume(end - before);
            head.truncate(end);
            return Ok(Some(head));
        }
        let taken = buf.len();
        reader.consume(taken);
        if head.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP head longer than {max} bytes"),
            ));
        }
    }
}

/// The end (exclusive) of the first `\r\n\r\n` in `bytes`.
fn find_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

pub(crate) fn parse_request(head: &[u8]) -> io::Result<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head).map_err(bad)? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err(bad("incomplete request head")),
    }
    Ok(RequestHead {
        method: request.method.unwrap_or_default().to_string(),
        target: request.path.unwrap_or_default().to_string(),
        headers: owned(request.headers),
    })
}

pub(crate) fn parse_response(head: &[u8]) -> io::Result<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head).map_err(bad)? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err(bad("incomplete response head")),
    }
    Ok(ResponseHead {
        status: response.code.unwrap_or_default(),
        headers: owned(response.headers),
    })
}

fn owned(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect()
}

/// The values of header `name` (case-insensitive).
pub(crate) fn header_values<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    Fixed(u64),
    Chunked,
    /// Until the connection closes (a response without length).
    UntilClose,
}

/// The body length of a message with these headers (`request`: a request without length
/// has no body; a response without one runs until the connection closes).
pub(crate) fn body_length(headers: &[(String, Vec<u8>)], request: bool) -> io::Result<BodyLength> {
    if let Some(te) = header_values(headers, "transfer-encoding").last() {
        if te.to_ascii_lowercase().ends_with(b"chunked") {
            return Ok(BodyLength::Chunked);
        }
        return Err(bad("a transfer coding other than chunked"));
    }
    match header_values(headers, "content-length").next() {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(BodyLength::Fixed)
            .ok_or_else(|| bad("malformed Content-Length")),
        None if request => Ok(BodyLength::Fixed(0)),
        None => Ok(BodyLength::UntilClose),
    }
}

/// Whether the sender will close the connection after this message.
pub(crate) fn closes(headers: &[(String, Vec<u8>)]) -> bool {
    header_values(headers, "connection")
        .chain(header_values(headers, "proxy-connection"))
        .any(|v| v.eq_ignore_ascii_case(b"close"))
}

/// The request head to send upstream: the client's head without its own
/// `Proxy-Authorization`, with `authorization` in its place when given.
pub(crate) fn request_head_bytes(head: &RequestHead, authorization: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", head.method, head.target).as_bytes());
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("proxy-authorization") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(value) = authorization {
        out.extend_from_slice(b"Proxy-Authorization: ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads and drops a body of `length`, failing past `max` bytes (an error page of a 407).
/// Returns false when the body ran until the connection closed (the connection is done).
pub(crate) async fn skip_body<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    length: BodyLength,
    max: usize,
) -> io::Result<bool> {
    let too_long = || bad(format!("proxy error body longer than {max} bytes"));
    match length {
        BodyLength::Fixed(n) => {
            if n > max as u64 {
                return Err(too_long());
            }
            let copied = tokio::io::copy(&mut reader.take(n), &mut tokio::io::sink()).await?;
            if copied < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            Ok(true)
        }
        BodyLength::UntilClose => {
            let copied =
                tokio::io::copy(&mut reader.take(max as u64 + 1), &mut tokio::io::sink()).await?;
            if copied > max as u64 {
                return Err(too_long());
            }
            Ok(false)
        }
        BodyLength::Chunked => {
            let mut total = 0usize;
            loop {
                let line = read_line(reader, max).await?;
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| bad("malformed chunk size"))?;
                total = total.saturating_add(size);
                if total > max {
                    return Err(too_long());
                }
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(reader, max).await?.is_empty() {}
                    return Ok(true);
                }
                let mut chunk = vec![0u8; size + 2];
                reader.read_exact(&mut chunk).await?;
            }
        }
    }
}

async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "chunked body cut short",
        ));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// Writes a short response of our own to the HTTP client (a refusal) and closes.
pub(crate) async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    status: &str,
    reason: &str,
) -> io::Result<()> {
    let body = format!("{reason}\n");
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    writer.write_all(text.as_bytes()).await?;
    writer.shutdown().await
}

/// Reads exactly a body of `n` bytes (the first request's, kept to repeat it each round).
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    n: usize,
) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; n];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn heads_are_read_without_eating_the_body() {
        let data = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nContent-Length: 5\r\n\r\nhelloNEXT".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(7, &data[..]);
        let head = read_head(&mut reader, 1024).await.unwrap().unwrap();
        let parsed = parse_response(&head).unwrap();
        assert_eq!(parsed.status, 407);
        let length = body_length(&parsed.headers, false).unwrap();
        assert_eq!(length, BodyLength::Fixed(5));
        assert!(skip_body(&mut reader, length, 100).await.unwrap());
        let mut rest = String::new();
        reader.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[tokio::test]
    async fn long_heads_and_bodies_are_refused() {
        let data = vec![b'a'; 5000];
        let mut reader = tokio::io::BufReader::new(&data[..]);
        assert!(read_head(&mut reader, 1000).await.is_err());
        let chunked = b"5\r\nhello\r\n0\r\n\r\n".to_vec();
        assert!(skip_body(&mut &chunked[..], BodyLength::Chunked, 100)
            .await
            .unwrap());
        assert!(skip_body(&mut &chunked[..], BodyLength::Chunked, 3)
            .await
            .is_err());
    }

    #[test]
    fn the_clients_proxy_authorization_is_replaced() {
        let head = parse_request(
            b"CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        )
        .unwrap();
        let out = String::from_utf8(request_head_bytes(&head, Some("NTLM abc"))).unwrap();
        assert_eq!(
            out,
            "CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\nProxy-Authorization: NTLM abc\r\n\r\n"
        );
    }
}
