//! # isthmus-contact
//!
//! Owns how people find and reach an island: contact points (the internal LAN addresses and the
//! external address of a router, per session), the postcard text a user pastes to a remote friend
//! (a contact point plus one capability of the island: admin, participant or observer), and the UDP LAN beacon that announces live
//! islands. The formats and the listener's table are pure code ([`beacon`]); [`lan`] is the thin
//! tokio layer with the sockets.
//!
//! ```
//! use isthmus_contact::{ContactPoint, Postcard};
//! use isthmus_router::auth::Capability;
//! use isthmus_router::ids::SessionId;
//! let contact = ContactPoint::new(SessionId::random(), "garden", vec!["192.168.1.5:7470".parse().unwrap()]);
//! let admin = Postcard::for_new_island(contact, Capability::new_island()).unwrap();
//! let card = admin.participant().unwrap();
//! let text = card.to_string();
//! assert_eq!(text.parse::<Postcard>().unwrap(), card);
//! assert_eq!(card.contact.session, card.keys.session_id());
//! ```

pub mod beacon;
pub mod lan;
mod postcard;

pub use postcard::{
    ContactPoint, Postcard, PostcardError, MAX_INTERNAL_ADDRESSES, MAX_ISLAND_NAME_BYTES,
    POSTCARD_KIND,
};
