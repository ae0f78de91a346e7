//! The `isthmus` command end to end: real processes, real loopback sockets.

mod island;
mod lan;
mod proc;
mod router;
