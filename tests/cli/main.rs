//! The `isthmus` command end to end: real processes, real loopback sockets.

mod capture;
mod cluster;
mod croquet;
mod homelab;
mod island;
mod lan;
mod lan6;
mod nat;
mod natpmp;
mod proc;
mod prometheus;
mod recover;
mod router;
mod status;
