//! A minimal Croquet-protocol WebSocket client for tests and the bench: JSON text frames in and
//! out, close codes seen.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What the reflector sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    /// A text frame, parsed.
    Json(Value),
    /// The text of a frame, unparsed (see [`CroquetClient::next_text`]).
    Text(String),
    /// The connection was closed with this code (None: no close frame).
    Closed(Option<u16>),
}

/// One client connection to `/reflector/<session>`.
pub struct CroquetClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// A JOIN with an apiKey, a protocol version and a 20 ticks/s request, as clients send.
pub fn join_args(user: &str) -> Value {
    json!({
        "name": "app/test", "apiKey": "k", "appId": "io.isthmus.test", "persistentId": "p",
        "version": 1, "user": user, "ticks": {"tick": 50}, "tove": "t0ve",
    })
}

impl CroquetClient {
    /// Connects to `ws://ADDR/reflector/<session>`.
    pub async fn connect(addr: SocketAddr, session: &str) -> CroquetClient {
        let url = format!("ws://{addr}/reflector/{session}");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        CroquetClient { ws }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    /// Sends `{id, action, args}`.
    pub async fn send(&mut self, action: &str, args: Value) {
        let frame = json!({"id": "x", "action": action, "args": args});
        self.send_text(frame.to_string()).await;
    }

    /// Queues a frame without flushing (for batches).
    pub async fn feed(&mut self, text: String) {
        self.ws
            .feed(Message::Text(text.into()))
            .await
            .expect("feed");
    }

    /// Feeds and flushes a batch; false once the connection is gone.
    pub async fn try_send_batch(&mut self, frames: impl IntoIterator<Item = String>) -> bool {
        for f in frames {
            if self.ws.feed(Message::Text(f.into())).await.is_err() {
                return false;
            }
        }
        self.ws.flush().await.is_ok()
    }

    /// Flushes fed frames.
    pub async fn flush(&mut self) {
        self.ws.flush().await.expect("flush");
    }

    /// The next text frame as text, or the close.
    pub async fn next_text(&mut self) -> Got {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Got::Text(t.to_string()),
                Some(Ok(Message::Close(c))) => return Got::Closed(c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Got::Closed(None),
            }
        }
    }

    /// The next frame parsed (text frames are JSON), waiting at most `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Got> {
        let got = tokio::time::timeout(limit, self.next_text()).await.ok()?;
        Some(match got {
            Got::Text(t) => Got::Json(serde_json::from_str(&t).expect("reflector frames are JSON")),
            other => other,
        })
    }

    /// The next frame whose action is `action` (others skipped), waiting at most `limit`.
    pub async fn next_action(&mut self, action: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(Got::Json(v)) if v["action"] == action => return v,
                Some(Got::Json(_)) => continue,
                other => panic!("waited for {action}, got {other:?}"),
            }
        }
    }

    /// The close code the reflector ends with (frames before it skipped).
    pub async fn close_code(&mut self, limit: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(Got::Closed(code)) => return code,
                Some(_) => continue,
                None => panic!("no close within {limit:?}"),
            }
        }
    }
}
