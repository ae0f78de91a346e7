//! The Croquet reflector's JSON frames, the seq and time mapping, and close codes.
//!
//! Frames are JSON text `{id, action, args[, tags]}`. Outgoing RECV and TICK frames are made by
//! [`CroquetFraming`], the core's [`Framing`]: a message is encoded once, kept in the history
//! as those bytes and shared by every recipient; a SYNC replays the `args` of the same bytes.

use bytes::{BufMut, Bytes, BytesMut};
use isthmus_router::ids::{RouterTime, SessionId};
use isthmus_router::session::Framing;
use isthmus_router::wire::{Code, Message};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// The Croquet seq of the state before the first message (the clients expect exactly this);
/// each message takes the next uint32, wrapping past 2^32.
pub const INITIAL_SEQ: u32 = 0xFFFF_FFF0;

/// Longest Croquet session id accepted (the clients use 64 hex digits, or shorter names).
pub const MAX_SESSION_ID_BYTES: usize = 128;

/// Close codes of the Croquet protocol: below 4100 the client reconnects, from 4100 on it gives
/// up (the reference reflector's list).
pub mod close {
    /// The session is not known here (reconnect).
    pub const UNKNOWN_SESSION: u16 = 4000;
    /// The client stopped answering (reconnect).
    pub const UNRESPONSIVE: u16 = 4001;
    /// Nothing heard from the client for too long (reconnect).
    pub const INACTIVE: u16 = 4002;
    /// Please reconnect (router busy, shutting down, the client fell behind).
    pub const RECONNECT: u16 = 4003;
    /// The client speaks a protocol (version or action) this reflector does not.
    pub const BAD_PROTOCOL: u16 = 4100;
    /// The session has no appId where one is needed (SAVE).
    pub const BAD_APPID: u16 = 4101;
    /// A frame that is not a JSON object of the expected shape.
    pub const MALFORMED: u16 = 4102;
    /// The apiKey is missing or not accepted by this router.
    pub const BAD_APIKEY: u16 = 4103;
    /// Anything else that is fatal.
    pub const UNKNOWN_ERROR: u16 = 4109;
    /// The client connected but never sent JOIN.
    pub const NO_JOIN: u16 = 4121;
}

/// The Croquet close code (and the reason text clients show) for a core goodbye code.
pub fn close_for(code: Code) -> (u16, &'static str) {
    match code {
        Code::IDLE_TIMEOUT => (close::INACTIVE, "client inactive"),
        Code::SLOW_CONSUMER => (close::UNRESPONSIVE, "client unresponsive"),
        Code::BUSY
        | Code::SHUTTING_DOWN
        | Code::NO_SNAPSHOT
        | Code::FELL_BEHIND
        | Code::REPLACED => (close::RECONNECT, "please reconnect"),
        Code::UNKNOWN_SESSION | Code::SESSION_RESET => (close::UNKNOWN_SESSION, "unknown session"),
        Code::MALFORMED | Code::PROTOCOL_VIOLATION | Code::PAYLOAD_TOO_LARGE => {
            (close::MALFORMED, "malformed message")
        }
        Code::CREATE_NOT_ALLOWED | Code::BAD_CREDENTIALS | Code::NOT_PERMITTED => {
            (close::BAD_APIKEY, "bad apiKey")
        }
        _ => (close::UNKNOWN_ERROR, "unknown error"),
    }
}

/// The Croquet seq of core seq `seq` (core seqs count from 1; 0 is the initial state).
pub fn croquet_seq(seq: u64) -> u32 {
    INITIAL_SEQ.wrapping_add(seq as u32)
}

/// The core seq a Croquet seq names, given the newest core seq: the latest one at or before
/// `last` whose Croquet seq is `cseq`, or `None` if that would be before the start.
pub fn core_seq(last: u64, cseq: u32) -> Option<u64> {
    let back = u64::from(croquet_seq(last).wrapping_sub(cseq));
    last.checked_sub(back)
}

/// Croquet time: integer milliseconds of the core's microsecond router time (floored, so it
/// never decreases when the core's time does not).
pub fn millis(time: RouterTime) -> u64 {
    time.0 / 1000
}

/// Whether a Croquet session id (the last path segment of `/reflector/<id>`) is acceptable:
/// 1 to [`MAX_SESSION_ID_BYTES`] of letters, digits, `_` and `-`, so it needs no escaping in
/// JSON, logs or file names.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The core's session id for a Croquet session id: a version-8 UUID of SHA-256 over a domain
/// tag and the id, so the same Croquet id always lands in the same core session, and never in
/// a native island's (those are hashes of island keys under another tag).
pub fn session_id(croquet_id: &str) -> SessionId {
    let mut h = Sha256::new();
    h.update(b"isthmus croquet session v1\0");
    h.update(croquet_id.as_bytes());
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    SessionId(uuid::Builder::from_custom_bytes(b).into_uuid())
}

/// Encodes RECV and TICK frames of one session for the core.
#[derive(Debug, Clone)]
pub struct CroquetFraming {
    recv_prefix: Bytes,
    tick_prefix: Bytes,
}

impl CroquetFraming {
    /// The framing for Croquet session `id` (already checked by [`valid_session_id`]).
    pub fn new(id: &str) -> Self {
        CroquetFraming {
            recv_prefix: Bytes::from(format!("{{\"id\":\"{id}\",\"action\":\"RECV\",\"args\":[")),
            tick_prefix: Bytes::from(format!("{{\"id\":\"{id}\",\"action\":\"TICK\",\"args\":")),
        }
    }

    /// Whether `frame` is a RECV frame of this framing.
    pub fn is_recv(&self, frame: &[u8]) -> bool {
        frame.starts_with(&self.recv_prefix)
    }

    /// The `args` array of a RECV frame made here (`[time,seq,payload...]`), sharing its bytes.
    pub fn recv_args(&self, frame: &Bytes) -> Bytes {
        // The prefix ends with the array's '['; the frame ends with '}'.
        frame.slice(self.recv_prefix.len() - 1..frame.len() - 1)
    }
}

impl Framing for CroquetFraming {
    /// The payload is the JSON text of the SEND args after time and seq (the client's payload
    /// string and latency), or a router message's object.
    fn message(&self, m: &Message) -> Bytes {
        let mut b = BytesMut::with_capacity(self.recv_prefix.len() + m.payload.len() + 32);
        b.put_slice(&self.recv_prefix);
        b.put_slice(millis(m.time).to_string().as_bytes());
        b.put_u8(b',');
        b.put_slice(croquet_seq(m.seq.0).to_string().as_bytes());
        b.put_u8(b',');
        b.put_slice(&m.payload);
        b.put_slice(b"]}");
        b.freeze()
    }

    fn tick(&self, time: RouterTime) -> Bytes {
        let mut b = BytesMut::with_capacity(self.tick_prefix.len() + 24);
        b.put_slice(&self.tick_prefix);
        b.put_slice(millis(time).to_string().as_bytes());
        b.put_u8(b'}');
        b.freeze()
    }
}

/// One frame from a client, its parts left as raw JSON for the action to parse.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    /// What the client asks.
    #[serde(borrow, default)]
    pub action: Option<Cow<'a, str>>,
    /// The action's arguments.
    #[serde(borrow, default)]
    pub args: Option<&'a RawValue>,
    /// SEND's optional tags (debounce).
    #[serde(borrow, default)]
    pub tags: Option<&'a RawValue>,
}

/// Parses a client frame: a JSON object with an optional string `action`.
pub fn parse_incoming(text: &str) -> Option<Incoming<'_>> {
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_router::ids::Seq;
    use isthmus_router::wire::Origin;

    #[test]
    fn seqs_start_at_the_clients_initial_value_and_wrap() {
        assert_eq!(croquet_seq(0), INITIAL_SEQ);
        assert_eq!(croquet_seq(1), 0xFFFF_FFF1);
        assert_eq!(croquet_seq(15), 0xFFFF_FFFF);
        assert_eq!(croquet_seq(16), 0);
        assert_eq!(croquet_seq(17 + (1 << 32)), 1);
        for last in [0u64, 1, 15, 16, 17, 100, 1 << 33] {
            for back in [0u64, 1, 5, 20] {
                if back <= last {
                    assert_eq!(core_seq(last, croquet_seq(last - back)), Some(last - back));
                }
            }
        }
        assert_eq!(core_seq(3, croquet_seq(10)), None);
    }

    #[test]
    fn recv_frames_carry_ms_time_and_croquet_seq_and_replay_their_args() {
        let f = CroquetFraming::new("abc");
        let frame = f.message(&Message {
            seq: Seq(17),
            time: RouterTime(12_345_678),
            origin: Origin::Router,
            client_seq: 0,
            payload: Bytes::from_static(b"\"xyz\",3"),
        });
        assert_eq!(
            &frame[..],
            br#"{"id":"abc","action":"RECV","args":[12345,1,"xyz",3]}"#
        );
        assert!(f.is_recv(&frame));
        assert_eq!(&f.recv_args(&frame)[..], br#"[12345,1,"xyz",3]"#);
        assert_eq!(
            &f.tick(RouterTime(999))[..],
            br#"{"id":"abc","action":"TICK","args":0}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&frame).expect("valid JSON");
        assert_eq!(v["args"][1], 1);
    }

    #[test]
    fn session_ids_are_checked_and_mapped_stably() {
        assert!(valid_session_id("0123abcdef"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a/b"));
        assert!(!valid_session_id("a\"b"));
        assert!(!valid_session_id(&"a".repeat(MAX_SESSION_ID_BYTES + 1)));
        assert_eq!(session_id("x"), session_id("x"));
        assert_ne!(session_id("x"), session_id("y"));
    }
}
