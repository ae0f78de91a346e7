//! The `isthmus` command end to end: real processes, real loopback sockets.

mod capture;
mod croquet;
mod island;
mod lan;
mod nat;
mod proc;
mod router;
