//! The Isthmus wire protocol: preamble, framing, and every frame in both directions.
//!
//! A connection starts with a 10-byte preamble from each side: the magic `ISTHMUS\0` and the
//! protocol version as a big-endian `u16`. The replica speaks first; the router answers with its
//! own preamble, so a replica of another version can read why it was refused, followed (when the
//! versions match) by a fresh 32-byte nonce that the hello's signatures must cover. After that
//! every frame is a big-endian `u32` body length followed by a bincode-2 (standard configuration)
//! body of [`ClientFrame`] (replica to router) or [`ServerFrame`] (router to replica).
//!
//! ```text
//! replica                                    router
//!   preamble                   ------------>
//!                              <------------  preamble, nonce
//!   Hello (signed over nonce)  ------------>
//!                              <------------  Welcome | Refuse
//!                              <------------  SyncBegin, SnapshotData..., Message..., Synced
//!   Send, Digest, Ping, ...    ------------>
//!                              <------------  Message, Tick, SnapshotRequest, Divergence, ...
//!   SnapshotChunk...           ------------>  (only after a SnapshotRequest)
//!   Leave                      ------------>  | <------------ Goodbye
//! ```
//!
//! Every length is checked against a limit before anything is allocated, and a frame that has not
//! fully arrived decodes as `Ok(None)`, never as an error. `docs/protocol.md` describes each frame.

use crate::auth::{IslandKeys, PublicKey, Signature, NONCE_LEN};
use crate::ids::{ReplicaId, RouterTime, Seq, SessionId};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;

/// The first eight bytes of every Isthmus connection, in both directions.
pub const MAGIC: [u8; 8] = *b"ISTHMUS\0";
/// The protocol version this build speaks. Bumped on any change to a frame's layout. Version 2
/// brought signed hellos, capability roles, admin frames and end-to-end sealed payloads.
pub const PROTOCOL_VERSION: u16 = 2;
/// Magic plus version.
pub const PREAMBLE_LEN: usize = 10;
/// The router's preamble: magic, version, then the connection's nonce.
pub const ROUTER_PREAMBLE_LEN: usize = PREAMBLE_LEN + NONCE_LEN;
/// Bytes of the length prefix in front of every frame body.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Default largest frame body either side accepts: big enough for a maximal payload or snapshot
/// chunk plus headers, small enough that one connection cannot make the router buffer much.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Largest hello the router reads before it knows who is calling; a hello is ids plus a name.
pub const MAX_HELLO_BYTES: usize = 4096;
/// Largest replica display name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest state digest a replica may report (a 512-bit hash).
pub const MAX_DIGEST_BYTES: usize = 64;
/// Routers of a cluster a welcome or a redirect names at most ([`Welcome::cluster`],
/// [`ServerFrame::Redirect`]): enough to find a live one, small enough for a hello-sized frame.
pub const MAX_CLUSTER_CONTACTS: usize = 4;
/// The hard ceiling for any configured frame limit; bincode refuses to claim more than this for
/// any one field even if a configuration asks for more.
pub const HARD_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<HARD_MAX_FRAME_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME_BYTES>()
}

/// What went wrong reading bytes from a peer. Every variant means the peer is broken or hostile:
/// the connection should be refused or closed with the matching [`Code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The peer is not speaking Isthmus at all.
    #[error("not an Isthmus connection (first bytes {found:02x?}); check that the address points at an Isthmus router")]
    BadMagic {
        /// What arrived instead of the magic.
        found: [u8; 8],
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs} is not supported (this side speaks {ours}); upgrade the older side")]
    UnsupportedVersion {
        /// The version the peer announced.
        theirs: u16,
        /// The version this build speaks.
        ours: u16,
    },
    /// A length prefix above the limit: refused before anything is allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced body length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A complete frame whose body is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(#[source] bincode::error::DecodeError),
    /// A frame body with bytes left over after the frame.
    #[error("malformed frame: {extra} unused bytes after the body")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
}

/// The preamble this build sends.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    preamble_for(PROTOCOL_VERSION)
}

/// A preamble announcing any version; tests use it to play an old or future peer.
pub fn preamble_for(version: u16) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..].copy_from_slice(&version.to_be_bytes());
    out
}

/// Checks a peer's preamble: the magic must match and the version must be ours.
pub fn check_preamble(bytes: &[u8; PREAMBLE_LEN]) -> Result<(), DecodeError> {
    let mut found = [0u8; 8];
    found.copy_from_slice(&bytes[..8]);
    if found != MAGIC {
        return Err(DecodeError::BadMagic { found });
    }
    let theirs = u16::from_be_bytes([bytes[8], bytes[9]]);
    if theirs != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// The router's preamble for a connection: our magic and version, then its fresh nonce.
pub fn router_preamble(nonce: &[u8; NONCE_LEN]) -> [u8; ROUTER_PREAMBLE_LEN] {
    let mut out = [0u8; ROUTER_PREAMBLE_LEN];
    out[..PREAMBLE_LEN].copy_from_slice(&preamble());
    out[PREAMBLE_LEN..].copy_from_slice(nonce);
    out
}

/// Encodes a value as a bare body (no length prefix): what signatures cover.
pub fn encode_body<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(value));
    encode_with(value, &mut out);
    out
}

/// Encodes one frame: length prefix plus body, ready to write. The buffer is sized exactly
/// first (bincode counts the body without writing it), so a frame is one allocation and one
/// copy of its payload, and the `Bytes` made of it needs no second allocation.
pub fn encode<T: Serialize>(frame: &T) -> Bytes {
    let body = encoded_len(frame);
    let mut out = Vec::with_capacity(LENGTH_PREFIX_LEN + body);
    out.extend_from_slice(&frame_len(body).to_be_bytes());
    encode_with(frame, &mut out);
    debug_assert_eq!(out.len(), LENGTH_PREFIX_LEN + body);
    Bytes::from(out)
}

/// Appends one encoded frame to `out`; for callers that batch frames into one buffer.
pub fn encode_into<T: Serialize>(frame: &T, out: &mut BytesMut) {
    let body = encoded_len(frame);
    out.reserve(LENGTH_PREFIX_LEN + body);
    out.put_u32(frame_len(body));
    let mut w = VecLike(out);
    // See `encode_with`: writing into memory cannot fail.
    bincode::serde::encode_into_writer(frame, &mut w, config())
        .expect("encoding a frame into memory cannot fail");
}

/// The frame of one stamped message, as `encode(&ServerFrame::Message(..))` makes it but written
/// by hand: this runs for every message the router stamps, and it needs neither a clone of the
/// message nor a counting pass.
pub fn encode_message(m: &Message) -> Bytes {
    let origin_len = match m.origin {
        Origin::Replica(_) => 1 + 1 + 16,
        Origin::Router => 1,
    };
    let payload = m.payload.len();
    let body = 1
        + varint_len(m.seq.0)
        + varint_len(m.time.0)
        + origin_len
        + varint_len(m.client_seq)
        + varint_len(payload as u64)
        + payload;
    let mut out = Vec::with_capacity(LENGTH_PREFIX_LEN + body);
    out.extend_from_slice(&frame_len(body).to_be_bytes());
    out.push(SERVER_MESSAGE);
    put_varint(&mut out, m.seq.0);
    put_varint(&mut out, m.time.0);
    match m.origin {
        Origin::Replica(r) => {
            // Variant 0, then the id as a byte string of 16.
            out.extend_from_slice(&[0, 16]);
            out.extend_from_slice(r.0.as_bytes());
        }
        Origin::Router => out.push(1),
    }
    put_varint(&mut out, m.client_seq);
    put_varint(&mut out, payload as u64);
    out.extend_from_slice(&m.payload);
    debug_assert_eq!(out.len(), LENGTH_PREFIX_LEN + body);
    Bytes::from(out)
}

/// The frame of a tick, written by hand like [`encode_message`].
pub fn encode_tick(time: RouterTime) -> Bytes {
    let body = 1 + varint_len(time.0);
    let mut out = Vec::with_capacity(LENGTH_PREFIX_LEN + body);
    out.extend_from_slice(&frame_len(body).to_be_bytes());
    out.push(SERVER_TICK);
    put_varint(&mut out, time.0);
    Bytes::from(out)
}

/// The body length as the prefix carries it. Frames are bounded far below 4 GiB by every
/// caller (payload and chunk limits); a larger one is a bug, not a peer's doing.
fn frame_len(body: usize) -> u32 {
    u32::try_from(body).expect("a frame body fits a u32 length prefix")
}

/// Bytes bincode writes for `value`, counted without writing them.
fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut size = bincode::enc::write::SizeWriter::default();
    // Frames are plain structs of integers, byte strings and enums, and counting writes
    // nothing: the only failures bincode can report (writer errors, unsized sequences) cannot
    // happen here.
    bincode::serde::encode_into_writer(value, &mut size, config())
        .expect("counting a frame's bytes cannot fail");
    size.bytes_written
}

fn encode_with<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let mut w = VecLike(out);
    bincode::serde::encode_into_writer(value, &mut w, config())
        .expect("encoding a frame into memory cannot fail");
}

/// A growable buffer as a bincode writer (bincode's own `std::io::Write` adapter adds a layer
/// of error plumbing that memory never needs).
struct VecLike<'a, B>(&'a mut B);

impl bincode::enc::write::Writer for VecLike<'_, Vec<u8>> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

impl bincode::enc::write::Writer for VecLike<'_, BytesMut> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

// Variant numbers of the frames encoded or decoded by hand; `hand_written_frames_match_serde`
// checks them (and the layouts) against the derived encoding.
const CLIENT_SEND: u8 = 1;
const CLIENT_SNAPSHOT_CHUNK: u8 = 2;
const SERVER_MESSAGE: u8 = 2;
const SERVER_TICK: u8 = 3;
const SERVER_SNAPSHOT_DATA: u8 = 6;

/// Bytes of bincode's variable-length integer for `v`.
fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Appends bincode's variable-length integer (standard configuration, little-endian).
fn put_varint(out: &mut Vec<u8>, v: u64) {
    match varint_len(v) {
        1 => out.push(v as u8),
        3 => {
            out.push(251);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        5 => {
            out.push(252);
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        _ => {
            out.push(253);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Takes one complete frame off the front of `buf`. `Ok(None)` means more bytes are needed; the
/// length prefix is checked against `max_len` before the body is waited for or allocated.
///
/// The body is split off `buf` without a copy, and the payload of a [`ClientFrame::Send`],
/// [`ClientFrame::SnapshotChunk`], [`ServerFrame::Message`] or [`ServerFrame::SnapshotData`]
/// stays a slice of it (see [`Frame`]).
pub fn decode<T: Frame>(buf: &mut BytesMut, max_len: usize) -> Result<Option<T>, DecodeError> {
    if buf.len() < LENGTH_PREFIX_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let max = max_len.min(HARD_MAX_FRAME_BYTES);
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    if buf.len() < LENGTH_PREFIX_LEN + len {
        buf.reserve(LENGTH_PREFIX_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_PREFIX_LEN);
    let body = buf.split_to(len).freeze();
    T::from_body(body).map(Some)
}

/// Decodes one frame body (without its length prefix). Byte strings are copied out of `body`;
/// [`decode`] keeps the payloads of the frames that carry them as slices of the read buffer.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    // Borrowed decoding reads byte strings straight from the body, so a forged length inside
    // the body fails on "not enough bytes" instead of allocating what it claims.
    decode_borrowed(body)
}

fn decode_borrowed<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (frame, used) = bincode::serde::borrow_decode_from_slice::<T, _>(body, config())
        .map_err(DecodeError::Malformed)?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes {
            extra: body.len() - used,
        });
    }
    Ok(frame)
}

/// A frame [`decode`] can take off a read buffer: its whole body arrives as `Bytes` split off
/// that buffer, so a frame that carries a payload can keep it as a slice (refcounted, no copy)
/// rather than copying it out as serde would.
///
/// A slice keeps its whole read buffer alive (64 KiB, or as large as a big frame of the same
/// connection made it grow): what is kept for long, or counted against a memory bound by its
/// length, should be copied out (`Bytes::copy_from_slice`). The
/// router copies a payload into its message frame as it stamps it, so only frames in flight
/// hold read buffers.
pub trait Frame: Sized {
    /// Decodes one whole frame body. Bad bytes are an error, never a panic.
    fn from_body(body: Bytes) -> Result<Self, DecodeError>;
}

/// The fields of `ClientFrame::Send` with the payload borrowed from the body.
#[derive(Deserialize)]
struct SendRef<'a> {
    client_seq: u64,
    #[serde(borrow)]
    payload: &'a [u8],
}

/// The fields of `ClientFrame::SnapshotChunk` with the data borrowed from the body.
#[derive(Deserialize)]
struct SnapshotChunkRef<'a> {
    request: u64,
    at: Seq,
    offset: u64,
    total: u64,
    #[serde(borrow)]
    data: &'a [u8],
}

/// The fields of [`Message`] with the payload borrowed from the body.
#[derive(Deserialize)]
struct MessageRef<'a> {
    seq: Seq,
    time: RouterTime,
    origin: Origin,
    client_seq: u64,
    #[serde(borrow)]
    payload: &'a [u8],
}

impl MessageRef<'_> {
    fn owned(self, body: &Bytes) -> Message {
        Message {
            seq: self.seq,
            time: self.time,
            origin: self.origin,
            client_seq: self.client_seq,
            payload: body.slice_ref(self.payload),
        }
    }
}

// The payload-carrying variants are told by their first byte: bincode writes a variant number
// below 251 as that one byte. Any other body (a number written long-hand included) takes the
// derived decoding, which refuses what it must.
impl Frame for ClientFrame {
    fn from_body(body: Bytes) -> Result<Self, DecodeError> {
        match body.first() {
            Some(&CLIENT_SEND) => {
                let f: SendRef = decode_borrowed(&body[1..])?;
                Ok(ClientFrame::Send {
                    client_seq: f.client_seq,
                    payload: body.slice_ref(f.payload),
                })
            }
            Some(&CLIENT_SNAPSHOT_CHUNK) => {
                let f: SnapshotChunkRef = decode_borrowed(&body[1..])?;
                Ok(ClientFrame::SnapshotChunk {
                    request: f.request,
                    at: f.at,
                    offset: f.offset,
                    total: f.total,
                    data: body.slice_ref(f.data),
                })
            }
            _ => decode_body(&body),
        }
    }
}

impl Frame for ServerFrame {
    fn from_body(body: Bytes) -> Result<Self, DecodeError> {
        match body.first() {
            Some(&SERVER_MESSAGE) => {
                let m: MessageRef = decode_borrowed(&body[1..])?;
                Ok(ServerFrame::Message(m.owned(&body)))
            }
            Some(&SERVER_SNAPSHOT_DATA) => {
                let data: &[u8] = decode_borrowed(&body[1..])?;
                Ok(ServerFrame::SnapshotData {
                    data: body.slice_ref(data),
                })
            }
            _ => decode_body(&body),
        }
    }
}

/// A bare [`Message`] (as some replicas keep their log in a snapshot), payload sliced too.
impl Frame for Message {
    fn from_body(body: Bytes) -> Result<Self, DecodeError> {
        let m: MessageRef = decode_borrowed(&body)?;
        Ok(m.owned(&body))
    }
}

/// What a connection may do in a session; proven by the key that signs its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A participant: sends messages and may be asked for snapshots.
    Replica,
    /// Follows the session but may not send; never asked for snapshots.
    Observer,
    /// A participant that may also send admin commands (tick rate, remove a replica, close).
    Admin,
}

impl Role {
    /// Whether this role may put messages into the order.
    pub fn may_send(self) -> bool {
        matches!(self, Role::Replica | Role::Admin)
    }
}

/// Settings a replica proposes when it creates a session. Ignored when the session exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CreateOptions {
    /// Ticks after this many idle milliseconds; `None` takes the router's default.
    pub tick_interval_ms: Option<u32>,
    /// Stamp replica joins and leaves into the order as router messages ([`RouterEvent`]).
    pub announce_membership: bool,
    /// List the island in the router's LAN beacon; `None` keeps it off the beacon entirely.
    pub announce: Option<Announce>,
}

/// How an island appears in the router's LAN beacon.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The island's name, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// Where in the island to arrive, if anywhere.
    pub destination: Option<uuid::Uuid>,
    /// The participant secret, for a LAN-open island: anyone on the LAN may join (and the router,
    /// which sees it, is trusted like the LAN). The router accepts it only from its own LAN and
    /// only if it matches the island's participant key. `None` lists the island as private:
    /// visible, but joinable only with its postcard, and the router holds no secret.
    pub secret: Option<[u8; 32]>,
}

impl fmt::Debug for Announce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Announce")
            .field("name", &self.name)
            .field("destination", &self.destination)
            .field("open", &self.secret.is_some())
            .finish()
    }
}

/// Where a replica can reach the router, as the router sees it for this requester.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Contacts {
    /// Addresses on the router's LAN(s), the one on the requester's subnet first.
    pub internal: Vec<SocketAddr>,
    /// The address from the Internet (manual forwarding or UPnP), if any.
    pub external: Option<SocketAddr>,
    /// The requester came from outside the router's subnets: the external address is its best.
    pub remote: bool,
    /// The router (dispatcher) instance, to tell routers apart.
    pub router: uuid::Uuid,
}

impl Contacts {
    /// Every address, best first for this requester.
    pub fn ordered(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if self.remote {
            out.extend(self.external);
        }
        out.extend(self.internal.iter().copied());
        if !self.remote {
            out.extend(self.external.filter(|e| !out.contains(e)));
        }
        out
    }
}

/// What a hello says; both of its signatures cover this (and the router's nonce).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloBody {
    /// The session to join or create; must be the hash of `keys`.
    pub session: SessionId,
    /// The island's three public keys, so the router can check the id and the role.
    pub keys: IslandKeys,
    /// Stable across reconnects of the same replica: the hash of `replica_key`.
    pub replica: ReplicaId,
    /// The replica's own public key; it signs the hello too, so nobody else can use its id.
    pub replica_key: PublicKey,
    /// A display name, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// What the replica may do, proven by the role's key.
    pub role: Role,
    /// The last seq this replica applied when it reconnects; `None` asks for a full sync.
    pub resume_from: Option<Seq>,
    /// Create the session if the router does not have it (participants and admins only).
    pub create: Option<CreateOptions>,
    /// An admin's control connection: welcomed, then only admin commands; it is not synced and
    /// receives no messages.
    pub control: bool,
    /// Sent by a replica that was welcomed before, on every reconnect: what it knows of the
    /// island, so a router that lost the session (it restarted, or the island's home died) can
    /// re-create it from its replicas. Participants and admins may re-create; an observer's is
    /// only counted while the router gathers.
    pub recover: Option<Recover>,
}

/// What a reconnecting replica knows of its island: enough for a router that does not have the
/// session to re-create it and continue the order where the most advanced replica left it. A
/// replica whose state is consistent also sends [`ClientFrame::Seen`] right after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recover {
    /// The incarnation it was welcomed at ([`Welcome::incarnation`]): a re-created session keeps
    /// it, so replicas resume instead of seeing a new island.
    pub incarnation: u64,
    /// The placement epoch of the order its state belongs to: that of the welcome before its
    /// last `Synced` (a replica welcomed by a new home but not yet synced still holds the old
    /// home's order).
    pub epoch: u64,
    /// The newest router time it applied (message or tick): router time never goes back.
    pub time: RouterTime,
    /// Replicas it saw attached (itself included) when it lost the connection: the gathering
    /// waits for this many before it continues the order.
    pub members: u32,
    /// The session's tick interval, as its welcome said.
    pub tick_interval_us: u64,
    /// The options it created the island with, if it was the creator (announce included).
    pub create: Option<CreateOptions>,
}

/// One entry of a replica's duplicate table: the highest client seq of `replica` it applied,
/// and at which seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenEntry {
    /// The sender.
    pub replica: ReplicaId,
    /// Its highest client seq applied.
    pub client_seq: u64,
    /// The seq that message got.
    pub at: Seq,
}

/// The first frame a replica sends: the body signed by the role's key and the replica's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// What is asked.
    pub body: HelloBody,
    /// Signature by the key of `body.role`.
    pub role_sig: Signature,
    /// Signature by `body.replica_key`.
    pub replica_sig: Signature,
}

/// What an admin may ask of the router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCommand {
    /// Tick after this many idle milliseconds from now on.
    SetTick {
        /// Within the router's allowed range.
        ms: u32,
    },
    /// Remove a replica: it is closed with code 2009.
    Kick {
        /// Who.
        replica: ReplicaId,
    },
    /// Close the island: everyone gets 2010 and the router forgets it.
    Close,
}

/// The router's acceptance of a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The session joined.
    pub session: SessionId,
    /// Echoes the replica's id.
    pub replica: ReplicaId,
    /// True when this hello created the session.
    pub created: bool,
    /// The newest seq stamped when the replica was admitted.
    pub last_seq: Seq,
    /// Router time when the replica was admitted.
    pub time: RouterTime,
    /// How long the session may be idle before a tick, in microseconds.
    pub tick_interval_us: u64,
    /// The highest client seq of this replica already stamped, so a resuming replica knows which
    /// of its unconfirmed sends to drop rather than resend.
    pub last_client_seq: u64,
    /// The largest payload the router accepts in a send.
    pub max_payload_bytes: u32,
    /// The router's contact points as seen for this replica.
    pub contacts: Contacts,
    /// Drawn at random when this session was created. The same island keys give the same
    /// session id when an island is created again (after a linger or a restart); a replica that
    /// resumes and sees another incarnation knows its island is gone.
    pub incarnation: u64,
    /// The placement epoch: 1 for an island a lone router created, one above the highest any
    /// recovering hello claimed for one it re-created, the etcd revision of the placement record
    /// in a cluster. A replica refuses a welcome below the highest epoch it was welcomed at, so
    /// a home that was replaced can never feed it again (docs/scale-out.md, fencing).
    pub epoch: u64,
    /// Other routers of the cluster (at most [`MAX_CLUSTER_CONTACTS`]); empty for a lone router.
    /// The replica adds them to the addresses it reconnects to.
    pub cluster: Vec<Contacts>,
}

/// One replica attached to a session, as presence frames name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {
    /// Its id.
    pub replica: ReplicaId,
    /// Its display name.
    pub name: String,
    /// Participant, observer or admin.
    pub role: Role,
}

/// Who put a message into the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// Sent by this replica.
    Replica(ReplicaId),
    /// Made by the router itself; the payload is an encoded [`RouterEvent`].
    Router,
}

/// The payload of a router-originated message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouterEvent {
    /// A replica joined the session.
    Joined {
        /// Who joined.
        replica: ReplicaId,
        /// Its display name.
        name: String,
    },
    /// A replica left or was dropped.
    Left {
        /// Who left.
        replica: ReplicaId,
    },
}

/// One stamped message of the total order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Position in the order: from 1, no gaps.
    pub seq: Seq,
    /// Router time of stamping; never decreases.
    pub time: RouterTime,
    /// Who sent it.
    pub origin: Origin,
    /// The sender's own counter for this send (0 for router messages), so the sender knows
    /// exactly which of its sends this confirms.
    pub client_seq: u64,
    /// Opaque to the router.
    pub payload: Bytes,
}

/// Replicas that reported one digest at a seq.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestGroup {
    /// The state digest they reported.
    pub hash: Bytes,
    /// Who reported it.
    pub replicas: Vec<ReplicaId>,
}

/// Replicas disagree about the state after one seq.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The seq whose digests differ.
    pub seq: Seq,
    /// One group per distinct digest, largest first.
    pub groups: Vec<DigestGroup>,
}

/// Frames a replica sends to the router.
// The hello (two keys sets and two signatures) is the largest variant, but it is sent once per
// connection and frames are moved, not stored in bulk: boxing it would only complicate matches.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Always the first frame.
    Hello(Hello),
    /// A payload to stamp into the order. `client_seq` counts this replica's sends from 1 and
    /// makes a resend after a reconnect harmless.
    Send {
        /// This replica's own counter.
        client_seq: u64,
        /// Opaque to the router.
        payload: Bytes,
    },
    /// A piece of the snapshot asked for by a [`ServerFrame::SnapshotRequest`].
    SnapshotChunk {
        /// The request's id, so pieces of an abandoned request are not mistaken for a new one.
        request: u64,
        /// The seq the snapshot was taken after.
        at: Seq,
        /// Where this piece starts in the whole snapshot.
        offset: u64,
        /// Size of the whole snapshot.
        total: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The replica's state digest after applying `seq`.
    Digest {
        /// The checkpoint.
        seq: Seq,
        /// At most [`MAX_DIGEST_BYTES`].
        hash: Bytes,
    },
    /// Liveness probe; the router answers with a pong.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a router ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The replica leaves for good; the router closes after it.
    Leave,
    /// An admin command, signed with the island's admin key over the connection's nonce.
    Admin {
        /// Counts this connection's commands from 1; each must be higher than the last.
        seq: u64,
        /// What to do.
        command: AdminCommand,
        /// Signature over [`crate::auth::admin_transcript`].
        sig: Signature,
    },
    /// The replica's duplicate table, pipelined right after a recovering hello (no round trip):
    /// a router re-creating the session takes the most advanced replica's, so a send stamped
    /// before the loss and resent after it is not stamped twice. At most
    /// `SessionConfig::max_remembered_replicas` entries; ignored by a router that has the session.
    Seen {
        /// One entry per sender.
        entries: Vec<SeenEntry>,
    },
}

/// Frames the router sends to a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The hello was refused; the router closes after it.
    Refuse {
        /// See [`Code`].
        code: Code,
        /// For people.
        reason: String,
    },
    /// A stamped message.
    Message(Message),
    /// Nothing was stamped for a tick interval; island time moves on.
    Tick {
        /// Current router time.
        time: RouterTime,
    },
    /// Take a snapshot of the state right after applying `at` and upload it in chunks. A new
    /// request replaces any earlier one still being uploaded.
    SnapshotRequest {
        /// Echoed in every chunk.
        request: u64,
        /// The seq after which to snapshot.
        at: Seq,
    },
    /// Starts a sync: `snapshot_len` bytes of [`ServerFrame::SnapshotData`] follow (or none: start
    /// from the empty initial state), then every message after `at`, then [`ServerFrame::Synced`].
    SyncBegin {
        /// The seq the snapshot was taken after (0: the initial state).
        at: Seq,
        /// Total snapshot size, or `None` to start from the initial state.
        snapshot_len: Option<u64>,
    },
    /// A piece of the snapshot announced by `SyncBegin`.
    SnapshotData {
        /// The bytes.
        data: Bytes,
    },
    /// The replica has everything up to `seq`; messages from here on are live.
    Synced {
        /// The newest seq sent so far.
        seq: Seq,
        /// The highest client seq of this replica stamped so far. Sends stamped before the
        /// snapshot point arrive inside the snapshot, not as messages; this tells the replica
        /// they were stamped.
        last_client_seq: u64,
    },
    /// Replicas reported different digests for one seq.
    Divergence(Divergence),
    /// Liveness probe.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a replica ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The router is closing this connection.
    Goodbye {
        /// See [`Code`].
        code: Code,
        /// For people.
        reason: String,
    },
    /// Who is attached to the session now (a change, or the whole list right after a
    /// welcome). Not numbered and not part of the order: presence is the router's knowledge,
    /// not island state, so it costs no seq and never enters a snapshot.
    Presence {
        /// Replicas that arrived (right after a welcome: everyone attached, this one included).
        joined: Vec<Present>,
        /// Replicas that left.
        left: Vec<ReplicaId>,
    },
    /// The outcome of an admin command.
    AdminDone {
        /// The command's `seq`.
        seq: u64,
        /// Whether it was carried out.
        ok: bool,
        /// For people: what was done, or why not.
        message: String,
    },
    /// Sent instead of a welcome by a router that is not the island's home; the connection
    /// closes after it. The replica races `contacts` (the home first) as it races a postcard's.
    Redirect {
        /// Where the home is (at most [`MAX_CLUSTER_CONTACTS`]), best first.
        contacts: Vec<Contacts>,
        /// The placement epoch of the home; a redirect below what the replica knows is ignored.
        epoch: u64,
    },
}

/// Why a hello was refused or a connection closed. Codes below 2000 are retryable (try again,
/// perhaps after a back-off); 2000 and above are fatal (retrying the same thing fails again).
/// A number this build does not know keeps its meaning by range.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Code(pub u16);

impl Code {
    /// The router is shutting down.
    pub const SHUTTING_DOWN: Code = Code(1000);
    /// No hello arrived in time.
    pub const HANDSHAKE_TIMEOUT: Code = Code(1001);
    /// The router or the session is at its connection limit.
    pub const BUSY: Code = Code(1002);
    /// The replica's outbound queue passed its bound; it should resume.
    pub const SLOW_CONSUMER: Code = Code(1003);
    /// Nothing was heard from the replica for too long.
    pub const IDLE_TIMEOUT: Code = Code(1004);
    /// No snapshot could be had to sync a joiner; try again later.
    pub const NO_SNAPSHOT: Code = Code(1005);
    /// The messages this replica still needed were dropped from the bounded history.
    pub const FELL_BEHIND: Code = Code(1006);
    /// The same replica (proven by its key) connected again; this older connection is closed.
    /// Retryable: only the replica itself can do this, so the old connection was stale.
    pub const REPLACED: Code = Code(1007);
    /// The router's placement epoch is below one the replica was welcomed at: it is no longer
    /// the island's home. Said by a replica to itself (it closes and tries its other routers).
    pub const STALE_EPOCH: Code = Code(1008);
    /// The session is being re-created from its replicas and nobody who can found it (a
    /// participant with a consistent state) came back in time; try again shortly.
    pub const RECOVERING: Code = Code(1009);
    /// This router stops serving the island, which goes on at another router of its cluster:
    /// the router lost its cluster lease (it must not stamp any more) or is leaving the
    /// cluster. Reconnect to the cluster's other routers.
    pub const MOVING: Code = Code(1010);
    /// The peer speaks another protocol version.
    pub const UNSUPPORTED_VERSION: Code = Code(2000);
    /// The hello's keys or signatures do not prove what it asks (wrong postcard, replayed hello).
    pub const BAD_CREDENTIALS: Code = Code(2001);
    /// The session does not exist on this router (and the hello did not ask to create it).
    pub const UNKNOWN_SESSION: Code = Code(2002);
    /// A frame could not be decoded.
    pub const MALFORMED: Code = Code(2003);
    /// A well-formed frame that breaks the protocol (wrong moment, bad field).
    pub const PROTOCOL_VIOLATION: Code = Code(2004);
    /// A send over the payload limit.
    pub const PAYLOAD_TOO_LARGE: Code = Code(2005);
    /// The role does not allow this (an observer sent, a non-admin sent an admin command).
    pub const NOT_PERMITTED: Code = Code(2007);
    /// The replica resumes from a seq this session never reached: the session it knew is gone.
    pub const SESSION_RESET: Code = Code(2008);
    /// The island's admin removed this replica.
    pub const KICKED: Code = Code(2009);
    /// The island's admin closed the island.
    pub const CLOSED: Code = Code(2010);
    /// This router does not create islands for this requester (its `create` setting).
    pub const CREATE_NOT_ALLOWED: Code = Code(2011);

    /// Whether trying again can succeed.
    pub fn is_retryable(self) -> bool {
        self.0 < 2000
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Code::SHUTTING_DOWN => "shutting down",
            Code::HANDSHAKE_TIMEOUT => "handshake timeout",
            Code::BUSY => "busy",
            Code::SLOW_CONSUMER => "slow consumer",
            Code::IDLE_TIMEOUT => "idle timeout",
            Code::NO_SNAPSHOT => "no snapshot",
            Code::FELL_BEHIND => "fell behind",
            Code::REPLACED => "replaced",
            Code::STALE_EPOCH => "stale epoch",
            Code::RECOVERING => "recovering",
            Code::MOVING => "moving",
            Code::UNSUPPORTED_VERSION => "unsupported version",
            Code::BAD_CREDENTIALS => "bad credentials",
            Code::UNKNOWN_SESSION => "unknown session",
            Code::MALFORMED => "malformed",
            Code::PROTOCOL_VIOLATION => "protocol violation",
            Code::PAYLOAD_TOO_LARGE => "payload too large",
            Code::NOT_PERMITTED => "not permitted",
            Code::SESSION_RESET => "session reset",
            Code::KICKED => "removed by the admin",
            Code::CLOSED => "island closed",
            Code::CREATE_NOT_ALLOWED => "creation not allowed",
            c if c.is_retryable() => "unknown (retryable)",
            _ => "unknown (fatal)",
        }
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.name())
    }
}

/// Builds the router's goodbye frame.
pub fn goodbye(code: Code, reason: impl Into<String>) -> Bytes {
    encode(&ServerFrame::Goodbye {
        code,
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn hello_body(session: u128, resume: Option<u64>, name: String) -> HelloBody {
        let keys = IslandKeys {
            admin: PublicKey([1; 32]),
            participant: PublicKey([2; 32]),
            observer: PublicKey([3; 32]),
        };
        HelloBody {
            session: SessionId(Uuid::from_u128(session)),
            keys,
            replica: ReplicaId(Uuid::from_u128(2)),
            replica_key: PublicKey([4; 32]),
            name,
            role: Role::Replica,
            resume_from: resume.map(Seq),
            create: Some(CreateOptions::default()),
            control: false,
            recover: None,
        }
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello(Hello {
            body: hello_body(1, Some(9), "ada".into()),
            role_sig: Signature([7; 64]),
            replica_sig: Signature([8; 64]),
        })
    }

    #[test]
    fn preamble_round_trip_and_refusals() {
        assert!(check_preamble(&preamble()).is_ok());
        assert!(matches!(
            check_preamble(&preamble_for(99)),
            Err(DecodeError::UnsupportedVersion { theirs: 99, .. })
        ));
        assert!(matches!(
            check_preamble(b"GET / HTTP"),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn partial_frame_needs_more_not_error() {
        let bytes = encode(&hello());
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(decode::<ClientFrame>(&mut buf, MAX_HELLO_BYTES)
                .expect("partial frame is not an error")
                .is_none());
        }
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode::<ClientFrame>(&mut buf, MAX_HELLO_BYTES)
                .ok()
                .flatten(),
            Some(hello())
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn the_largest_recovering_hello_fits_the_hello_limit() {
        let announce = Announce {
            name: "n".repeat(MAX_NAME_BYTES),
            destination: Some(Uuid::from_u128(u128::MAX)),
            secret: Some([0xff; 32]),
        };
        let opts = CreateOptions {
            tick_interval_ms: Some(u32::MAX),
            announce_membership: true,
            announce: Some(announce),
        };
        let mut body = hello_body(u128::MAX, Some(u64::MAX), "x".repeat(MAX_NAME_BYTES));
        body.create = Some(opts.clone());
        body.recover = Some(Recover {
            incarnation: u64::MAX,
            epoch: u64::MAX,
            time: RouterTime(u64::MAX),
            members: u32::MAX,
            tick_interval_us: u64::MAX,
            create: Some(opts),
        });
        let frame = ClientFrame::Hello(Hello {
            body,
            role_sig: Signature([0xff; 64]),
            replica_sig: Signature([0xff; 64]),
        });
        let bytes = encode(&frame);
        assert!(
            bytes.len() - LENGTH_PREFIX_LEN <= MAX_HELLO_BYTES,
            "{}",
            bytes.len()
        );
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode::<ClientFrame>(&mut buf, MAX_HELLO_BYTES)
                .ok()
                .flatten(),
            Some(frame)
        );
    }

    #[test]
    fn redirects_and_welcomes_with_cluster_contacts_round_trip() {
        let contacts = Contacts {
            internal: vec!["10.0.0.2:7470".parse().expect("addr")],
            external: None,
            remote: false,
            router: Uuid::from_u128(9),
        };
        let frame = ServerFrame::Redirect {
            contacts: vec![contacts.clone(); MAX_CLUSTER_CONTACTS],
            epoch: 42,
        };
        let bytes = encode(&frame);
        assert_eq!(decode_body::<ServerFrame>(&bytes[4..]).ok(), Some(frame));
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(&(5_000_000u32).to_be_bytes()[..]);
        assert!(matches!(
            decode::<ClientFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES),
            Err(DecodeError::FrameTooLarge { len: 5_000_000, .. })
        ));
    }

    #[test]
    fn forged_inner_length_does_not_allocate() {
        // A Send frame whose payload claims an enormous length but carries three bytes.
        let mut body = vec![1u8, 5]; // variant Send, client_seq 5
        body.push(253); // varint marker: u64 follows
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        body.extend_from_slice(b"abc");
        let mut framed = BytesMut::new();
        framed.put_u32(body.len() as u32);
        framed.put_slice(&body);
        assert!(matches!(
            decode::<ClientFrame>(&mut framed, DEFAULT_MAX_FRAME_BYTES),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let bytes = encode(&ClientFrame::Leave);
        let mut body = bytes[4..].to_vec();
        body.push(0);
        assert!(matches!(
            decode_body::<ClientFrame>(&body),
            Err(DecodeError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn forged_inner_lengths_fail_cleanly_on_every_sliced_frame() {
        // A byte string claiming far more than the body holds, in each frame decoded by hand.
        let huge = {
            let mut v = vec![253u8];
            v.extend_from_slice(&(1u64 << 60).to_le_bytes());
            v
        };
        let chunk: Vec<u8> = [&[2u8, 1, 2, 0, 9][..], &huge, b"abc"].concat();
        let data: Vec<u8> = [&[6u8][..], &huge, b"abc"].concat();
        let message: Vec<u8> = [&[2u8, 1, 2, 1, 0][..], &huge, b"abc"].concat();
        // Lengths just one past what is there, and a body cut inside the fixed fields.
        let short: Vec<u8> = vec![1, 5, 4, b'a', b'b', b'c'];
        let cut: Vec<u8> = vec![2, 253, 1];
        for (body, server) in [
            (chunk, false),
            (short, false),
            (cut, false),
            (data, true),
            (message, true),
        ] {
            let mut framed = BytesMut::new();
            framed.put_u32(body.len() as u32);
            framed.put_slice(&body);
            let r = if server {
                decode::<ServerFrame>(&mut framed, DEFAULT_MAX_FRAME_BYTES).map(|_| ())
            } else {
                decode::<ClientFrame>(&mut framed, DEFAULT_MAX_FRAME_BYTES).map(|_| ())
            };
            assert!(
                matches!(r, Err(DecodeError::Malformed(_))),
                "{body:?}: {r:?}"
            );
        }
        // Trailing bytes after a sliced payload are refused as after any other frame.
        let mut body = encode(&ClientFrame::Send {
            client_seq: 1,
            payload: Bytes::from_static(b"xy"),
        })[4..]
            .to_vec();
        body.push(0);
        assert!(matches!(
            ClientFrame::from_body(Bytes::from(body)),
            Err(DecodeError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn payloads_are_slices_of_the_read_buffer_not_copies() {
        let mut bytes = BytesMut::new();
        encode_into(
            &ClientFrame::Send {
                client_seq: 3,
                payload: Bytes::from(vec![5u8; 1000]),
            },
            &mut bytes,
        );
        encode_into(
            &ClientFrame::SnapshotChunk {
                request: 1,
                at: Seq(2),
                offset: 0,
                total: 300,
                data: Bytes::from(vec![6u8; 300]),
            },
            &mut bytes,
        );
        let message = Message {
            seq: Seq(70_000),
            time: RouterTime(1 << 40),
            origin: Origin::Replica(ReplicaId(Uuid::from_u128(77))),
            client_seq: 300,
            payload: Bytes::from(vec![8u8; 500]),
        };
        bytes.put_slice(&encode_message(&message));
        bytes.put_slice(&encode(&ServerFrame::SnapshotData {
            data: Bytes::from(vec![9u8; 200]),
        }));
        let mut buf = bytes;
        // Decoding splits `buf` and never moves it: every payload must point into this memory.
        let read_buffer = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Ok(Some(ClientFrame::Send { payload, .. })) =
            decode::<ClientFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES)
        else {
            panic!("a send")
        };
        assert_eq!(payload.len(), 1000);
        let Ok(Some(ClientFrame::SnapshotChunk { data, .. })) =
            decode::<ClientFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES)
        else {
            panic!("a chunk")
        };
        assert_eq!(data.len(), 300);
        let Ok(Some(ServerFrame::Message(m))) =
            decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES)
        else {
            panic!("a message")
        };
        assert_eq!(m, message);
        let Ok(Some(ServerFrame::SnapshotData { data: piece })) =
            decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES)
        else {
            panic!("snapshot data")
        };
        assert_eq!(&piece[..], &[9u8; 200][..]);
        for p in [&payload, &data, &m.payload, &piece] {
            let start = p.as_ptr() as usize;
            assert!(
                read_buffer.contains(&start) && read_buffer.contains(&(start + p.len() - 1)),
                "a payload was copied out of the read buffer"
            );
        }
    }

    #[test]
    fn exact_size_encoding_allocates_what_it_writes() {
        let frames = [
            ServerFrame::Tick {
                time: RouterTime(u64::MAX),
            },
            ServerFrame::SnapshotData {
                data: Bytes::from(vec![1u8; 70_000]),
            },
            ServerFrame::Goodbye {
                code: Code::BUSY,
                reason: "r".repeat(300),
            },
        ];
        for f in &frames {
            let v = encode_body(f);
            assert_eq!(v.len(), v.capacity());
            let b = encode(f);
            assert_eq!(b.len(), LENGTH_PREFIX_LEN + v.len());
            assert_eq!(&b[4..], &v[..]);
        }
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (
                any::<u128>(),
                any::<u128>(),
                ".{0,20}",
                any::<Option<u64>>(),
                any::<bool>()
            )
                .prop_map(|(s, r, name, resume, create)| {
                    let mut body = hello_body(s, resume, name);
                    body.replica = ReplicaId(Uuid::from_u128(r));
                    body.role = Role::Observer;
                    body.create = create.then_some(CreateOptions {
                        tick_interval_ms: Some(20),
                        announce_membership: true,
                        announce: Some(Announce {
                            name: "n".into(),
                            destination: None,
                            secret: Some([4; 32]),
                        }),
                    });
                    ClientFrame::Hello(Hello {
                        body,
                        role_sig: Signature([5; 64]),
                        replica_sig: Signature([6; 64]),
                    })
                }),
            (any::<u64>(), arb_bytes()).prop_map(|(client_seq, payload)| ClientFrame::Send {
                client_seq,
                payload
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), arb_bytes()).prop_map(
                |(at, offset, total, data)| ClientFrame::SnapshotChunk {
                    request: at ^ offset,
                    at: Seq(at),
                    offset,
                    total,
                    data
                }
            ),
            (any::<u64>(), arb_bytes())
                .prop_map(|(s, hash)| ClientFrame::Digest { seq: Seq(s), hash }),
            any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
            Just(ClientFrame::Leave),
            proptest::collection::vec((any::<u128>(), any::<u64>(), any::<u64>()), 0..8).prop_map(
                |entries| ClientFrame::Seen {
                    entries: entries
                        .into_iter()
                        .map(|(r, client_seq, at)| SeenEntry {
                            replica: ReplicaId(Uuid::from_u128(r)),
                            client_seq,
                            at: Seq(at),
                        })
                        .collect(),
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
                |(incarnation, epoch, time, members)| {
                    let mut body = hello_body(3, Some(time), "re".into());
                    body.create = None;
                    body.recover = Some(Recover {
                        incarnation,
                        epoch,
                        time: RouterTime(time),
                        members,
                        tick_interval_us: 50_000,
                        create: Some(CreateOptions::default()),
                    });
                    ClientFrame::Hello(Hello {
                        body,
                        role_sig: Signature([1; 64]),
                        replica_sig: Signature([2; 64]),
                    })
                }
            ),
            (any::<u64>(), any::<u32>(), any::<u128>()).prop_map(|(seq, ms, r)| {
                ClientFrame::Admin {
                    seq,
                    command: match ms % 3 {
                        0 => AdminCommand::SetTick { ms },
                        1 => AdminCommand::Kick {
                            replica: ReplicaId(Uuid::from_u128(r)),
                        },
                        _ => AdminCommand::Close,
                    },
                    sig: Signature([ms as u8; 64]),
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn client_frames_round_trip(frame in arb_client_frame()) {
            let bytes = encode(&frame);
            let mut buf = BytesMut::from(&bytes[..]);
            let back: ClientFrame = decode(&mut buf, DEFAULT_MAX_FRAME_BYTES)
                .expect("valid").expect("complete");
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn hand_written_frames_match_serde(
            seq in any::<u64>(),
            time in any::<u64>(),
            replica in proptest::option::of(any::<u128>()),
            client_seq in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            shift in 0u32..64,
        ) {
            // Varints of every width: shifting spreads the values over 1..=9 bytes.
            let (seq, time, client_seq) = (seq >> shift, time >> (63 - shift), client_seq >> shift);
            let message = Message {
                seq: Seq(seq),
                time: RouterTime(time),
                origin: replica.map_or(Origin::Router, |r| Origin::Replica(ReplicaId(Uuid::from_u128(r)))),
                client_seq,
                payload: Bytes::from(payload),
            };
            let by_hand = encode_message(&message);
            let derived = encode(&ServerFrame::Message(message.clone()));
            prop_assert_eq!(&by_hand[..], &derived[..]);
            let mut buf = BytesMut::from(&by_hand[..]);
            let back = decode::<ServerFrame>(&mut buf, usize::MAX).expect("valid").expect("whole");
            prop_assert_eq!(back, ServerFrame::Message(message.clone()));
            let bare = encode(&message);
            let mut buf = BytesMut::from(&bare[..]);
            prop_assert_eq!(decode::<Message>(&mut buf, usize::MAX).expect("valid"), Some(message));
            let tick = encode_tick(RouterTime(time));
            prop_assert_eq!(&tick[..], &encode(&ServerFrame::Tick { time: RouterTime(time) })[..]);
        }

        #[test]
        fn server_frames_round_trip(
            data in arb_bytes(),
            reason in ".{0,40}",
            nonce in any::<u64>(),
        ) {
            for frame in [
                ServerFrame::SnapshotData { data: data.clone() },
                ServerFrame::Goodbye { code: Code(1003), reason: reason.clone() },
                ServerFrame::Pong { nonce },
                ServerFrame::Tick { time: RouterTime(nonce) },
            ] {
                let bytes = encode(&frame);
                let mut buf = BytesMut::from(&bytes[..]);
                let back: ServerFrame = decode(&mut buf, DEFAULT_MAX_FRAME_BYTES)
                    .expect("valid").expect("complete");
                prop_assert_eq!(back, frame);
                prop_assert!(buf.is_empty());
            }
        }

        #[test]
        fn flipped_or_truncated_bytes_never_panic(
            frame in arb_client_frame(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&frame).to_vec();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            let keep = cut.index(bytes.len() + 1);
            let mut buf = BytesMut::from(&bytes[..keep]);
            let _ = decode::<ClientFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES);
            let _ = decode_body::<ServerFrame>(&bytes[4.min(bytes.len())..]);
            let mut buf = BytesMut::from(&bytes[..keep]);
            let _ = decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode::<ClientFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES) {}
            let _ = decode_body::<ServerFrame>(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME_BYTES) {}
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode::<Message>(&mut buf, DEFAULT_MAX_FRAME_BYTES) {}
        }
    }
}
