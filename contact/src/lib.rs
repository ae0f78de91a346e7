//! # isthmus-contact
//!
//! Owns how people find and reach an island: contact points (the internal LAN addresses and the
//! external address of a router, per session), the join secret and what is derived from it, the
//! postcard text a user pastes to a remote friend, and the UDP LAN beacon that announces live
//! islands. The formats and the listener's table are pure code ([`beacon`]); [`lan`] is the thin
//! tokio layer with the sockets.
//!
//! ```
//! use isthmus_contact::{ContactPoint, JoinSecret, Postcard};
//! use isthmus_router::ids::SessionId;
//! let card = Postcard {
//!     contact: ContactPoint::new(SessionId::random(), "garden", vec!["192.168.1.5:7470".parse().unwrap()]),
//!     secret: JoinSecret::random(),
//! };
//! let text = card.to_string();
//! assert_eq!(text.parse::<Postcard>().unwrap(), card);
//! ```

pub mod beacon;
pub mod lan;
mod postcard;
mod secret;

pub use postcard::{ContactPoint, Postcard, PostcardError, MAX_ISLAND_NAME_BYTES, POSTCARD_KIND};
pub use secret::JoinSecret;
