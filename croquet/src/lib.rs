//! # isthmus-croquet
//!
//! Unmodified Croquet OS and Multisynq clients speak WebSocket + JSON to a "reflector". This
//! crate is that protocol as a thin, sans-IO adapter over the Isthmus session core
//! ([`isthmus_router::session::Session`]): the core keeps doing the ordering, seq and router
//! time, ticks, the history since the snapshot, linger, slow-consumer bounds and the memory
//! budget; the adapter translates frames and adds what only Croquet has (SYNC assembly, "users"
//! and "tally" messages, debounce, snapshot and persistence bookkeeping).
//!
//! - [`frames`]: the JSON framing (RECV and TICK encoded once per message), the seq and time
//!   mapping, client frame parsing, close codes.
//! - [`adapter`]: [`adapter::CroquetSession`], one Croquet session as a state machine fed
//!   events with `now` and drained of actions.
//! - [`store`]: the `/files` store on disk (snapshots and persistent data), with path checks,
//!   size limits and clean-up.
//!
//! The tokio driver that holds the WebSockets lives in the dispatcher (`dispatcher/src/croquet.rs`).

pub mod adapter;
pub mod frames;
pub mod store;

/// Failures of this crate's parts that a caller must handle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CroquetError {
    /// A `/files` path that could escape the store or is not a plain relative path.
    #[error("file path {0:?} is not allowed: use a relative path of plain names (letters, digits, '.', '_', '-', '%'), no '..'")]
    BadPath(String),
    /// A file larger than the store's limit.
    #[error(
        "file of {size} bytes is larger than the limit of {limit} bytes (files.max_file_bytes)"
    )]
    TooLarge {
        /// Bytes offered.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The store as a whole is full.
    #[error("the file store is full ({used} of {limit} bytes); old sessions' snapshots are removed as they end, try again later")]
    StoreFull {
        /// Bytes stored.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// No such file.
    #[error("no file {0:?} in the store")]
    NotFound(String),
    /// The disk said no.
    #[error("file store i/o error on {path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
