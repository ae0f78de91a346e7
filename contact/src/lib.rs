//! # isthmus-contact
//!
//! Owns how people find and reach an island: contact points (the internal LAN addresses and the
//! external address of a router, per session), the postcard text a user pastes to a remote
//! friend, and the UDP LAN beacon that announces live islands. The formats are pure code; the
//! beacon tasks are a thin tokio layer on top. (Being built: see the contact issue.)
