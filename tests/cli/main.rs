//! The `isthmus` command end to end: real processes, real loopback sockets.

mod capture;
mod island;
mod lan;
mod nat;
mod proc;
mod prometheus;
mod router;
mod status;
