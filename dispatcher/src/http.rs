//! The HTTP front door on the router's one port.
//!
//! A native replica opens with the magic `ISTHMUS\0`; anything that opens with an HTTP method
//! is served here instead, on the same connection and under the same admission caps, by hyper's
//! HTTP/1.1 server (keep-alive and upgrades included). Web clients, the status page and
//! `/metrics` therefore need no second port to forward through a home router.
//!
//! Every route is one arm of [`route`]; each feature keeps its handlers in its own module.

use crate::{ConnGuard, Shared};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

/// The body of every response: whole buffers or streams, boxed so routes can differ.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// What a handler knows about the request besides the request itself.
pub(crate) struct Ctx {
    /// The dispatcher's shared state: registry, config, external address.
    pub(crate) shared: Arc<Shared>,
    /// Who asked.
    pub(crate) peer: SocketAddr,
    /// The address the request arrived at.
    pub(crate) local: SocketAddr,
    /// This connection's slot under the admission caps. A route that upgrades the connection
    /// (a WebSocket) keeps a clone in the task it spawns, so the slot is held until that ends.
    pub(crate) guard: Arc<ConnGuard>,
}

/// Whether the first bytes of a connection start an HTTP/1 request: an upper-case method token
/// and a space. A native replica's preamble starts with `ISTHMUS\0`, which never matches.
pub(crate) fn looks_like_http(first: &[u8]) -> bool {
    let Some(space) = first.iter().position(|&b| b == b' ') else {
        return false;
    };
    (3..=7).contains(&space) && first[..space].iter().all(u8::is_ascii_uppercase)
}

/// Serves HTTP on a connection whose first bytes (`prefix`) were already read to tell it from
/// a native replica. Returns when the peer closes, the connection fails, or it was upgraded
/// (an upgraded connection lives on in the task its route spawned).
pub(crate) async fn serve(ctx: Ctx, prefix: Vec<u8>, stream: TcpStream) {
    let ctx = Arc::new(ctx);
    let peer = ctx.peer;
    let header_timeout = ctx.shared.cfg.handshake_timeout;
    let io = TokioIo::new(Rewind::new(prefix, stream));
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(route(&ctx, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that trickles its headers holds a connection slot: it gets as long as a
        // native replica has for its hello.
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BUF)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, "http connection ended: {e}");
    }
}

/// Bytes hyper buffers for one request's head; larger heads are refused.
pub const MAX_HEADER_BUF: usize = 64 * 1024;

/// Picks the handler for a request by its path.
async fn route(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let _ = (&ctx.shared, ctx.local, &ctx.guard);
    let path = req.uri().path();
    let own_page = matches!(
        path,
        "/metrics" | "/status" | "/status.json" | "/status.fragment" | "/status.js" | "/status.css"
    ) || (path == "/" && !crate::croquet::serves_web(ctx));
    if own_page && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("isthmus router: {path} is read with GET\n"),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => crate::metrics::respond(ctx, req.headers()),
        // With --web the app has "/" (a person opens http://ROUTER:7470/ and gets the app);
        // the status page is then at /status.
        "/" if crate::croquet::serves_web(ctx) => crate::croquet::web(ctx, req).await,
        "/status" => crate::status::respond(ctx, req.headers(), "/").await,
        p @ ("/" | "/status.json" | "/status.fragment" | "/status.js" | "/status.css") => {
            crate::status::respond(ctx, req.headers(), p).await
        }
        p if p.starts_with("/reflector/") => crate::croquet::reflector(ctx, req).await,
        p if p.starts_with("/files/") => crate::croquet::files(ctx, req).await,
        // The fallback: the --web app's files, or 404.
        _ => crate::croquet::web(ctx, req).await,
    }
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    bytes(status, "text/plain; charset=utf-8", body)
}

/// A response with a whole body of the given type.
pub(crate) fn bytes(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A whole body, boxed.
pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A stream that first yields bytes already read from it.
struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn http_methods_are_told_from_the_native_preamble() {
        for ok in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PUT /files/x",
            b"POST /x",
            b"HEAD / H",
            b"OPTIONS * ",
            b"DELETE /a",
        ] {
            assert!(looks_like_http(&ok[..ok.len().min(10)]), "{ok:?}");
        }
        for no in [
            &isthmus_router::wire::preamble()[..],
            b"get / HTTP",
            b"GE / HTTP/",
            b"GETTINGLONG",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03",
            b"",
        ] {
            assert!(!looks_like_http(no), "{no:?}");
        }
    }

    #[tokio::test]
    async fn rewind_yields_the_prefix_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(b"hello ".to_vec(), b);
        a.write_all(b"world").await.expect("write");
        drop(a);
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
