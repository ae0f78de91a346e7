//! # isthmus-prefs
//!
//! Owns the saved configuration profiles file (`prefs.toml`): loading, validating with errors
//! that name the file, line and allowed values, and saving atomically while keeping comments.
//! It has no internal dependencies; the `isthmus` binary turns a profile into dispatcher
//! configuration. (Being built: see the prefs and forwarding issue.)
