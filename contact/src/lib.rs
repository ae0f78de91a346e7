//! # isthmus-contact
//!
//! Owns how people find and reach an island: contact points (the internal LAN addresses and the
//! external address of a router, per session), the join secret and what is derived from it, the
//! postcard text a user pastes to a remote friend, and (later) the UDP LAN beacon that announces
//! live islands. Everything here is pure code.
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

mod postcard;
mod secret;

pub use postcard::{ContactPoint, Postcard, PostcardError, MAX_ISLAND_NAME_BYTES, POSTCARD_KIND};
pub use secret::JoinSecret;
