//! # isthmus-island-client
//!
//! Owns the replica side of Isthmus: what an application embeds to become an island replica.
//! (Being built: see the island client issue.)
