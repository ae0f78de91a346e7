//! # isthmus-router
//!
//! Owns what one island session *is* on the router side:
//!
//! - [`wire`]: the protocol both sides speak (preamble, length-prefixed bincode frames, limits,
//!   close codes). Always compiled, no tokio: replicas use it too.
//! - [`session`]: the sans-IO session core that stamps every message with a gap-free seq and a
//!   never-decreasing router time, reflects it to every replica in one order, ticks idle sessions,
//!   syncs late joiners (snapshot + backlog + live), resumes reconnecting replicas, compares state
//!   digests and disconnects slow consumers; it carries out signed admin commands and keeps its
//!   history and snapshots within a router-wide memory budget. Deterministic: it is fed `now`
//!   and never reads a clock.
//! - [`auth`]: capability secrets, the island's keys, signed hellos and admin commands.
//! - [`budget`]: the byte budget every session's history and snapshots share.
//! - [`stats`]: the counters behind the router's metrics and status page, per session and
//!   router-wide, cheap enough for the hot path.
//! - `framed` (feature `io`): whole frames off a tokio stream, the one read loop both sides use.
//! - `driver` (feature `server`, on by default): the tokio task that runs one session core and the
//!   per-connection reader and writer tasks around it.
//!
//! ```no_run
//! use isthmus_router::auth::{island_keys, Capability};
//! use isthmus_router::session::{Session, SessionConfig};
//! use std::time::Instant;
//! let keys = island_keys(&Capability::new_island()).expect("a new island's admin capability");
//! let mut core = Session::new(keys.session_id(), keys, SessionConfig::default(), Instant::now());
//! while let Some(output) = core.poll_output() {
//!     // write frames, close connections, log notices
//!     let _ = output;
//! }
//! ```

pub mod auth;
pub mod budget;
pub mod ids;
pub mod session;
pub mod stats;
pub mod wire;

#[cfg(feature = "server")]
pub mod driver;
#[cfg(feature = "io")]
pub mod framed;

pub use ids::{ConnId, ReplicaId, RouterTime, Seq, SessionId};
