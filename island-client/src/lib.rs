//! # isthmus-island-client
//!
//! Owns the replica side of Isthmus: what an application embeds to become an island replica.
//!
//! - [`Island`]: the trait the application implements for its deterministic state (apply a
//!   message, take and restore a snapshot, compute a digest).
//! - [`replica`]: the sans-IO replica state machine: frames in, island updates, events and frames
//!   out. It resumes after reconnects, resends only the sends the welcome did not confirm,
//!   uploads snapshots when asked and reports digests every K messages.
//! - [`client`]: the tokio driver: races candidate addresses, handshakes, keeps the connection
//!   alive with pings and a liveness timeout, and reconnects with exponential back-off and
//!   jitter. A lost session is reported, never papered over.
//! - [`seal`]: end-to-end sealing: payloads and snapshots travel as XChaCha20-Poly1305
//!   ciphertext under a key derived from the island's capability, which the router never holds.
//!   The [`Island`] only ever sees plaintext.
//! - [`chat`]: the demo island, a replicated chat log.
//!
//! ```no_run
//! use isthmus_island_client::{chat::ChatIsland, client, ClientConfig, Event, ReplicaConfig};
//! # async fn demo(postcard: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let card: isthmus_contact::Postcard = postcard.parse()?;
//! let me = ReplicaConfig::from_postcard(&card, "ada");
//! let cfg = ClientConfig::new(card.contact.addresses(), me);
//! let (handle, mut events) = client::connect(cfg, ChatIsland::default()).await?;
//! handle.send(ChatIsland::payload("ada", "hello")).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {:?}", m.seq, ChatIsland::parse(&m.payload));
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod chat;
pub mod client;
pub mod replica;
pub mod seal;

pub use client::{ClientConfig, ClientHandle};
pub use replica::{Event, ReplicaConfig};

use isthmus_router::ids::RouterTime;
use isthmus_router::wire::{Code, Message};
use std::net::SocketAddr;

/// The application's replicated state. Every method must be deterministic: replicas that apply
/// the same messages from the same state must end in the same state.
pub trait Island: Send + 'static {
    /// Applies one stamped message.
    fn apply(&mut self, message: &Message);
    /// Island time moved on without a message.
    fn tick(&mut self, _time: RouterTime) {}
    /// The whole state as bytes.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// Back to the initial state.
    fn reset(&mut self);
    /// A digest of the state, compared across replicas to catch divergence.
    fn digest(&self) -> Vec<u8>;
}

/// What can go wrong for a replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No candidate address answered as an Isthmus router.
    #[error(
        "cannot reach the router ({detail}); check the address and that the router is running"
    )]
    Unreachable {
        /// What was tried.
        addrs: Vec<SocketAddr>,
        /// What went wrong, per address.
        detail: String,
    },
    /// The router refused the hello.
    #[error("{}", refusal_text(*.code, .reason))]
    Refused {
        /// Why.
        code: Code,
        /// The router's words.
        reason: String,
    },
    /// The router speaks another protocol version.
    #[error("the router at {addr} speaks protocol version {theirs} and this isthmus speaks version {ours}; upgrade the older side")]
    Version {
        /// The router's address.
        addr: SocketAddr,
        /// The router's version.
        theirs: u16,
        /// This build's version.
        ours: u16,
    },
    /// An observer tried to send.
    #[error("observers cannot send; this postcard only lets you watch")]
    ObserverCannotSend,
    /// An admin command needs the admin postcard.
    #[error("this needs the island's admin postcard; {} postcard cannot give admin commands", with_article(.0))]
    NotAdmin(&'static str),
    /// The router did not carry out an admin command.
    #[error("the router did not do it: {0}")]
    AdminRefused(String),
    /// The client task has ended (left, stopped, or the session was lost).
    #[error("the replica is no longer connected to its island")]
    Ended,
    /// A payload over the router's limit.
    #[error("payload of {len} bytes exceeds the router's limit of {max}")]
    PayloadTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too many sends are waiting for their echo.
    #[error("{0} sends are still waiting for the router; slow down")]
    TooManyPending(usize),
    /// Nothing to connect to.
    #[error("no router address to connect to")]
    NoAddress,
    /// The router is not the island's home and named where it is (followed by the client
    /// itself; seen only if the redirect could not be followed).
    #[error("the router sent this replica to the island's home (epoch {epoch})")]
    Redirected {
        /// The home's contact points, best first.
        contacts: Vec<isthmus_router::wire::Contacts>,
        /// The home's placement epoch.
        epoch: u64,
    },
}

/// "an observer", "a participant".
fn with_article(word: &str) -> String {
    let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {word}")
}

fn refusal_text(code: Code, reason: &str) -> String {
    match code {
        Code::BAD_CREDENTIALS => {
            format!("the router refused this postcard: {reason} (ask for a fresh postcard)")
        }
        Code::BUSY => format!("the router is busy: {reason}; try again later"),
        Code::KICKED => format!("an admin removed this replica from the island: {reason}"),
        Code::CLOSED => format!("the island was closed by its admin: {reason}"),
        Code::UNKNOWN_SESSION => format!(
            "the router does not have this island; it ended, or the router restarted since the postcard was made ({code})"
        ),
        _ => format!("the router refused to join: {reason} ({code})"),
    }
}
