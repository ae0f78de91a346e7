//! Whole frames off a byte stream: the read loop every side of the protocol needs (the router's
//! handshake and readers, the replica, the test clients), written once.
//!
//! The buffer starts small and doubles only when a read fills it, so an idle connection holds
//! about a kilobyte while a busy one still reads in large gulps. Every frame's length is checked
//! against the limit before its body is buffered.

use crate::wire::{self, DecodeError, Frame};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A reader's first buffer, and the least free room it reads into.
pub const READ_ROOM_MIN: usize = 1024;
/// The most a reader's buffer grows by for one read.
pub const READ_ROOM_MAX: usize = 64 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a frame of this protocol (or one past the size limit).
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The stream failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream (at a frame boundary or inside a frame).
    #[error("the peer closed the connection")]
    Closed,
}

/// Reads length-prefixed frames from `R`, keeping what arrived past the last whole frame.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame: usize,
    room: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames of at most `max_frame` body bytes.
    pub fn new(inner: R, max_frame: usize) -> Self {
        Self::with_buffered(inner, BytesMut::new(), max_frame)
    }

    /// A reader that starts with bytes already read from `inner` (e.g. past a handshake).
    pub fn with_buffered(inner: R, buffered: BytesMut, max_frame: usize) -> Self {
        FrameReader {
            inner,
            buf: buffered,
            max_frame,
            room: READ_ROOM_MIN,
        }
    }

    /// The next frame, reading as much as it takes. Cancel-safe: bytes read before a
    /// cancellation stay buffered for the next call.
    pub async fn read<T: Frame>(&mut self) -> Result<T, ReadError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            if self.fill().await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// The next frame if it is already buffered, without reading. A payload it carries is a
    /// slice of this reader's buffer (see [`wire::decode`]).
    pub fn buffered<T: Frame>(&mut self) -> Result<Option<T>, DecodeError> {
        wire::decode(&mut self.buf, self.max_frame)
    }

    /// Reads once into the buffer: the bytes read, 0 at the end of the stream. For callers that
    /// take every buffered frame after each read (one wake-up, many frames). Cancel-safe.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM_MIN / 2 {
            self.buf.reserve(self.room);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == spare {
            self.room = (self.room * 2).min(READ_ROOM_MAX);
        }
        Ok(n)
    }

    /// Bytes buffered and not yet taken as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// The stream, for writing to a stream that is not split.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The stream and what is buffered past the last frame taken.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientFrame, ServerFrame};
    use crate::RouterTime;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn frames_split_anywhere_arrive_whole_and_in_order() {
        let mut bytes = Vec::new();
        for t in 0..50u64 {
            bytes.extend_from_slice(&wire::encode(&ServerFrame::Tick {
                time: RouterTime(t * 1_000_003),
            }));
        }
        let (mut a, b) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(5) {
                a.write_all(piece).await.expect("write");
            }
        });
        let mut r = FrameReader::new(b, 1024);
        for t in 0..50u64 {
            match r.read::<ServerFrame>().await.expect("frame") {
                ServerFrame::Tick { time } => assert_eq!(time, RouterTime(t * 1_000_003)),
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.await.expect("writer");
        assert!(matches!(
            r.read::<ServerFrame>().await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_body_arrives() {
        let (mut a, b) = tokio::io::duplex(64);
        // A length prefix far past the limit, and no body at all.
        a.write_all(&(1u32 << 30).to_be_bytes())
            .await
            .expect("write");
        let mut r = FrameReader::new(b, 1024);
        assert!(matches!(
            r.read::<ClientFrame>().await,
            Err(ReadError::Decode(DecodeError::FrameTooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn bytes_past_a_handshake_are_read_first_and_the_buffer_grows_only_when_filled() {
        let first = wire::encode(&ServerFrame::Tick {
            time: RouterTime(1),
        });
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::with_buffered(b, BytesMut::from(&first[..]), 1 << 20);
        assert!(matches!(
            r.read::<ServerFrame>().await,
            Ok(ServerFrame::Tick {
                time: RouterTime(1)
            })
        ));
        // Idle: one small read buffer.
        a.write_all(&wire::encode(&ServerFrame::Tick {
            time: RouterTime(2),
        }))
        .await
        .expect("write");
        r.read::<ServerFrame>().await.expect("tick");
        assert!(
            r.buf.capacity() <= 2 * READ_ROOM_MIN,
            "{}",
            r.buf.capacity()
        );
        // A burst: reads that fill the buffer make room for bigger ones.
        let burst: Vec<u8> = (0..20_000u64)
            .flat_map(|t| {
                wire::encode(&ServerFrame::Tick {
                    time: RouterTime(t),
                })
                .to_vec()
            })
            .collect();
        a.write_all(&burst).await.expect("write");
        for _ in 0..20_000 {
            r.read::<ServerFrame>().await.expect("tick");
        }
        assert_eq!(r.room, READ_ROOM_MAX);
    }
}
