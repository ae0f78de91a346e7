//! `versus`: Isthmus side by side with NATS and Redis, one sitting, one load generator.
//!
//! ```text
//! cargo build --release --bin isthmus -p isthmus-tests --bin versus
//! target/release/versus [--quick] [--rounds N] [--only NAME] [--router PATH]
//!                        [--before PATH] [--no-peers]
//! ```
//!
//! `--router` names the `isthmus` binary to measure (default: the one next to this binary).
//! `--before` adds a second `isthmus` binary (e.g. one built from an older commit) that takes
//! its turn in every round like the others, so a change to the data path is measured before
//! and after in one sitting; its column and the ratio after / before are printed. `--no-peers`
//! leaves NATS and Redis out.
//!
//! Each server runs alone on core 0 (`taskset -c 0`; the router with one tokio worker, so it is
//! as single-threaded as Redis); this generator pins itself to core 1 and runs on one thread.
//! The same generator speaks each protocol raw (NATS's text protocol, RESP2 pub/sub, Isthmus
//! wire frames), the systems take turns round after round, and every figure is the median over
//! the rounds. A run counts only if every message reached every receiver in order; the
//! generator's own CPU is reported, and a run where it was the bottleneck is flagged.
//!
//! Needs `nats-server` and `redis-server` on the PATH (Debian: `apt-get install nats-server
//! redis-server`) and the release `isthmus` binary next to this one. BENCHMARKS.md has the
//! figures and how they were taken.

use anyhow::{bail, Context as _, Result};
use bytes::{Buf, Bytes, BytesMut};
use isthmus_router::auth::Capability;
use isthmus_router::wire::{self, ClientFrame};
use isthmus_tests::{exchange_preambles, process_cpu_seconds, HelloOpts};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Bytes of every payload: publisher seq, send time, publisher index, padding.
const PAYLOAD: usize = 64;
/// Messages a throughput publisher keeps ahead of its slowest receiver.
const WINDOW: u64 = 20_000;
/// Bytes a receiver's buffer is topped up to before a read.
const READ_BUFFER: usize = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Nats,
    Redis,
    /// The `--before` router binary.
    Before,
    Isthmus,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Nats => "NATS",
            System::Redis => "Redis",
            System::Before => "Isthmus before",
            System::Isthmus => "Isthmus",
        }
    }

    /// Speaks the Isthmus wire protocol.
    fn is_isthmus(self) -> bool {
        matches!(self, System::Isthmus | System::Before)
    }

    /// The systems this sitting measures, in the order they take turns.
    fn selected() -> Vec<System> {
        let o = options();
        let mut all = Vec::new();
        if !o.no_peers {
            all.extend([System::Nats, System::Redis]);
        }
        if o.before.is_some() {
            all.push(System::Before);
        }
        all.push(System::Isthmus);
        all
    }
}

/// The command line's choices of binaries and systems.
struct Options {
    router: Option<std::path::PathBuf>,
    before: Option<std::path::PathBuf>,
    no_peers: bool,
}

static OPTIONS: OnceLock<Options> = OnceLock::new();

fn options() -> &'static Options {
    OPTIONS.get_or_init(|| Options {
        router: None,
        before: None,
        no_peers: false,
    })
}

/// Nanoseconds since the generator started: the clock payloads carry.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn payload(seq: u64, publisher: u32) -> [u8; PAYLOAD] {
    let mut p = [b'x'; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&now_ns().to_le_bytes());
    p[16..20].copy_from_slice(&publisher.to_le_bytes());
    p
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A server process on core 0.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(system: System) -> Result<Server> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg("0");
        match system {
            System::Nats => {
                cmd.arg("nats-server")
                    .args(["-a", "127.0.0.1", "-p"])
                    .arg(port.to_string());
            }
            System::Redis => {
                cmd.arg("redis-server")
                    .args(["--bind", "127.0.0.1", "--port"])
                    .arg(port.to_string())
                    .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                    .args(["--maxclients", "15000"])
                    .args(["--client-output-buffer-limit", "pubsub 0 0 0"]);
            }
            System::Isthmus | System::Before => {
                let isthmus = match (system, &options().router, &options().before) {
                    (System::Before, _, Some(before)) => before.clone(),
                    (System::Isthmus, Some(router), _) => router.clone(),
                    _ => std::env::current_exe()?.with_file_name("isthmus"),
                };
                if !isthmus.exists() {
                    bail!(
                        "{} is missing; build it first: cargo build --release --bin isthmus",
                        isthmus.display()
                    );
                }
                cmd.arg(isthmus)
                    .arg("router")
                    .arg("--listen")
                    .arg(addr.to_string())
                    .args(["--no-beacon", "--linger-ms", "1000"])
                    .args(["--max-connections-per-ip", "100000"])
                    .args(["--max-handshakes-per-ip", "100000"])
                    .env("TOKIO_WORKER_THREADS", "1")
                    .env("RUST_LOG", "warn");
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: is it installed? (apt-get install nats-server redis-server)",
                    system.name()
                )
            })?;
        let server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr} within 10 s", system.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

/// CPU of the server and of this generator over a measured stretch.
struct CpuMeter {
    pid: String,
    server: f64,
    me: f64,
    wall: Instant,
}

impl CpuMeter {
    fn start(server: &Server) -> CpuMeter {
        let pid = server.pid().to_string();
        CpuMeter {
            server: process_cpu_seconds(&pid),
            me: process_cpu_seconds("self"),
            wall: Instant::now(),
            pid,
        }
    }

    /// (wall seconds, server CPU seconds, generator CPU seconds).
    fn stop(&self) -> (f64, f64, f64) {
        (
            self.wall.elapsed().as_secs_f64(),
            process_cpu_seconds(&self.pid) - self.server,
            process_cpu_seconds("self") - self.me,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// What one receiver saw.
#[derive(Default)]
struct Seen {
    /// Payloads received.
    count: AtomicU64,
    /// Messages out of order or missing (per publisher).
    disorder: AtomicU64,
    /// Latencies in microseconds, when sampled.
    latencies: Mutex<Vec<u32>>,
    /// Tells the receiver to hand in its latencies and end.
    stop: tokio_util::sync::CancellationToken,
}

/// A topic: a NATS subject, a Redis channel, an Isthmus island.
#[derive(Clone)]
struct Topic {
    name: String,
    island: Capability,
}

impl Topic {
    fn new(i: usize) -> Topic {
        Topic {
            name: format!("bench.{i}"),
            island: Capability::new_island(),
        }
    }
}

/// Loopback source addresses, so the router's per-address caps see many households.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 200) as u8, (i % 200 + 1) as u8))
}

async fn connect(from: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let s = socket.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A connection that has subscribed (or joined) and is ready to receive, and may publish.
struct Conn {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    /// Bytes read past the subscription's confirmation.
    buf: BytesMut,
    /// Isthmus only: this connection's client seq.
    client_seq: u64,
}

impl Conn {
    /// Connects from `from` and subscribes to `topic`; `create` makes an Isthmus island.
    async fn subscribe(
        system: System,
        addr: SocketAddr,
        from: IpAddr,
        topic: &Topic,
        create: bool,
    ) -> Result<Conn> {
        let stream = connect(from, addr).await?;
        let (read, write) = stream.into_split();
        let mut c = Conn {
            read,
            write,
            buf: BytesMut::with_capacity(4096),
            client_seq: 0,
        };
        match system {
            System::Nats => {
                let sub = format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {} 1\r\nPING\r\n",
                    topic.name
                );
                c.write.write_all(sub.as_bytes()).await?;
                c.read_until(|b| find(b, b"PONG\r\n")).await?;
            }
            System::Redis => {
                let sub = resp(&[b"SUBSCRIBE", topic.name.as_bytes()]);
                c.write.write_all(&sub).await?;
                c.read_until(|b| {
                    find(b, b"subscribe\r\n").and_then(|i| find_from(b, i, b":1\r\n"))
                })
                .await?;
            }
            System::Isthmus | System::Before => {
                let mut stream = c.read.reunite(c.write).context("reunite")?;
                let nonce = exchange_preambles(&mut stream).await?;
                let mut opts = HelloOpts::new(&topic.island, create);
                opts.name = "bench".into();
                stream
                    .write_all(&wire::encode(&ClientFrame::Hello(opts.sign(&nonce))))
                    .await?;
                let (read, write) = stream.into_split();
                c = Conn {
                    read,
                    write,
                    buf: BytesMut::with_capacity(4096),
                    client_seq: 0,
                };
                // Walk frames until Synced (variant 7); a Refuse (1) is an error.
                loop {
                    let mut at = 0;
                    while c.buf.len() >= at + 5 {
                        let len = u32::from_be_bytes([
                            c.buf[at],
                            c.buf[at + 1],
                            c.buf[at + 2],
                            c.buf[at + 3],
                        ]) as usize;
                        if c.buf.len() < at + 4 + len {
                            break;
                        }
                        match c.buf[at + 4] {
                            1 => bail!("the router refused the bench replica"),
                            7 => {
                                c.buf.advance(at + 4 + len);
                                return Ok(c);
                            }
                            _ => at += 4 + len,
                        }
                    }
                    c.buf.advance(at);
                    if c.read.read_buf(&mut c.buf).await? == 0 {
                        bail!("the router closed the bench replica");
                    }
                }
            }
        }
        Ok(c)
    }

    /// A publishing-only connection (Redis: a subscribed connection cannot publish).
    async fn publisher(system: System, addr: SocketAddr, from: IpAddr) -> Result<Conn> {
        let stream = connect(from, addr).await?;
        let (read, mut write) = stream.into_split();
        if system == System::Nats {
            write
                .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
                .await?;
        }
        Ok(Conn {
            read,
            write,
            buf: BytesMut::new(),
            client_seq: 0,
        })
    }

    async fn read_until(&mut self, done: impl Fn(&[u8]) -> Option<usize>) -> Result<()> {
        loop {
            if let Some(end) = done(&self.buf) {
                self.buf.advance(end);
                return Ok(());
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.read.read_buf(&mut self.buf))
                    .await
                    .context("no subscription confirmation within 10 s")??;
            if read == 0 {
                bail!("the server closed the connection while subscribing");
            }
        }
    }

    /// Appends one publish of `payload` to `out`.
    fn publish(&mut self, system: System, topic: &Topic, payload: &[u8], out: &mut Vec<u8>) {
        publish_into(system, topic, &mut self.client_seq, payload, out);
    }
}

/// Appends one publish of `payload` to `topic` to `out`, written by hand with no allocation
/// for every protocol alike (`client_seq`: Isthmus's, advanced here).
fn publish_into(
    system: System,
    topic: &Topic,
    client_seq: &mut u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    match system {
        System::Nats => {
            out.extend_from_slice(b"PUB ");
            out.extend_from_slice(topic.name.as_bytes());
            out.push(b' ');
            push_decimal(out, payload.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        System::Redis => {
            out.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n$");
            push_decimal(out, topic.name.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(topic.name.as_bytes());
            out.extend_from_slice(b"\r\n$");
            push_decimal(out, payload.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        System::Isthmus | System::Before => {
            *client_seq += 1;
            let from = out.len();
            push_send(out, *client_seq, payload);
            // The hand encoding must stay the protocol's: check it against `wire::encode` at
            // every power of two, which covers each width of the varints.
            if client_seq.is_power_of_two() {
                let frame = wire::encode(&ClientFrame::Send {
                    client_seq: *client_seq,
                    payload: Bytes::copy_from_slice(payload),
                });
                assert!(
                    out[from..] == frame[..],
                    "versus's hand-encoded Send differs from wire::encode; update push_send"
                );
            }
        }
    }
}

/// One `ClientFrame::Send` as `wire::encode` writes it: a big-endian length prefix, then the
/// bincode body (variant 1, varint client seq, varint payload length, payload).
fn push_send(out: &mut Vec<u8>, client_seq: u64, payload: &[u8]) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(1);
    push_varint(out, client_seq);
    push_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
    let body = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&body.to_be_bytes());
}

/// bincode's standard varint: one byte below 251, else a tag and the little-endian integer.
fn push_varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v <= u64::from(u16::MAX) {
        out.push(251);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(252);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    find_from(hay, 0, needle)
}

/// The end of the first `needle` at or after `from`.
fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i + needle.len())
}

fn resp(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Takes complete messages off the front of `buf`, calling `each` with every payload; returns
/// false if the stream holds something this generator does not expect. Each protocol's framing
/// is parsed in full by hand, with no allocation, so every system's receiver does the same
/// kind of work per message.
fn parse(system: System, buf: &mut BytesMut, mut each: impl FnMut(&[u8])) -> bool {
    let mut at = 0;
    let ok = loop {
        let rest = &buf[at..];
        let step = match system {
            System::Nats => parse_nats(rest),
            System::Redis => parse_resp(rest),
            System::Isthmus | System::Before => parse_isthmus(rest),
        };
        match step {
            Step::Message(used, p) => {
                each(p);
                at += used;
            }
            Step::Other(used) => at += used,
            Step::Incomplete => break true,
            Step::Error => break false,
        }
    };
    buf.advance(at);
    ok
}

/// One unit off the front of a receiver's stream.
enum Step<'a> {
    /// A published message: (bytes used, its payload).
    Message(usize, &'a [u8]),
    /// Something else (a ping, a confirmation, an Isthmus tick): bytes used.
    Other(usize),
    /// More bytes are needed.
    Incomplete,
    /// The server said something this generator does not expect (an error, a refusal).
    Error,
}

/// The line at `from` (without its CRLF) and where the next one starts.
fn line_at(b: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(from..)?;
    // Lines here are short (a RESP header is 4-5 bytes): a plain scan of the first few bytes
    // beats memchr's setup; memchr takes over for anything longer.
    let lf = match rest.iter().take(32).position(|&c| c == b'\n') {
        Some(lf) => lf,
        None => 32 + memchr::memchr(b'\n', rest.get(32..)?)?,
    };
    let line = rest[..lf].strip_suffix(b"\r")?;
    Some((line, from + lf + 1))
}

/// A decimal without sign, as NATS and RESP write lengths.
fn decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    s.iter().try_fold(0usize, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
    })
}

/// NATS: `MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n`, or `PING`, `+OK`...
fn parse_nats(b: &[u8]) -> Step<'_> {
    let Some((line, next)) = line_at(b, 0) else {
        // A line longer than any this generator expects is an error, not an incomplete read.
        return if b.len() > 4096 {
            Step::Error
        } else {
            Step::Incomplete
        };
    };
    if let Some(head) = line.strip_prefix(b"MSG ") {
        let mut fields = head.split(|&c| c == b' ');
        let (Some(_subject), Some(_sid)) = (fields.next(), fields.next()) else {
            return Step::Error;
        };
        let Some(n) = head.rsplit(|&c| c == b' ').next().and_then(decimal) else {
            return Step::Error;
        };
        let end = next + n;
        if b.len() < end + 2 {
            return Step::Incomplete;
        }
        if &b[end..end + 2] != b"\r\n" {
            return Step::Error;
        }
        Step::Message(end + 2, &b[next..end])
    } else if line.starts_with(b"-ERR") {
        Step::Error
    } else {
        // PING (servers ping every two minutes, longer than any run), +OK, INFO.
        Step::Other(next)
    }
}

/// RESP2: a pub/sub push `*3 $7 message $n <channel> $n <payload>`, or a confirmation.
fn parse_resp(b: &[u8]) -> Step<'_> {
    let Some((first, mut at)) = line_at(b, 0) else {
        return if b.len() > 4096 {
            Step::Error
        } else {
            Step::Incomplete
        };
    };
    match first.first() {
        Some(b':') | Some(b'+') => Step::Other(at),
        Some(b'*') => {
            let Some(n) = decimal(&first[1..]) else {
                return Step::Error;
            };
            let mut kind: &[u8] = b"";
            let mut last: &[u8] = b"";
            for i in 0..n {
                let Some((head, next)) = line_at(b, at) else {
                    return Step::Incomplete;
                };
                match head.first() {
                    Some(b'$') => {
                        let Some(len) = decimal(&head[1..]) else {
                            return Step::Error;
                        };
                        let end = next + len;
                        if b.len() < end + 2 {
                            return Step::Incomplete;
                        }
                        if &b[end..end + 2] != b"\r\n" {
                            return Step::Error;
                        }
                        if i == 0 {
                            kind = &b[next..end];
                        }
                        last = &b[next..end];
                        at = end + 2;
                    }
                    Some(b':') => at = next,
                    _ => return Step::Error,
                }
            }
            if n == 3 && kind == b"message" {
                Step::Message(at, last)
            } else {
                Step::Other(at)
            }
        }
        _ => Step::Error,
    }
}

/// Isthmus: a length-prefixed frame. A `Message` (variant 2) is walked field by field as a
/// client must (seq, time, origin, client seq, payload length, all bincode varints), so this
/// receiver does as much framing work per message as the NATS and RESP ones. A refusal (1) or
/// goodbye (8) is an error.
fn parse_isthmus(b: &[u8]) -> Step<'_> {
    if b.len() < 4 {
        return Step::Incomplete;
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if b.len() < 4 + len {
        return Step::Incomplete;
    }
    let body = &b[4..4 + len];
    match body.first() {
        Some(2) => match message_payload(&body[1..]) {
            Some(payload) => Step::Message(4 + len, payload),
            None => Step::Error,
        },
        Some(1) | Some(8) => Step::Error,
        _ => Step::Other(4 + len),
    }
}

/// The payload of a `Message` body (after its variant byte), or `None` if the fields do not
/// add up to the frame's length.
fn message_payload(b: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    varint(b, &mut at)?; // seq
    varint(b, &mut at)?; // router time
    match varint(b, &mut at)? {
        // Origin::Replica: a replica id, 16 bytes behind their length.
        0 => {
            if varint(b, &mut at)? != 16 {
                return None;
            }
            at += 16;
        }
        1 => {} // Origin::Router
        _ => return None,
    }
    varint(b, &mut at)?; // client seq
    let n = usize::try_from(varint(b, &mut at)?).ok()?;
    (b.len().checked_sub(at)? == n).then(|| &b[at..])
}

/// One bincode varint at `*at`: a byte below 251, or a marker (251, 252, 253) and then 2, 4 or
/// 8 little-endian bytes.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let first = *b.get(*at)?;
    let width = match first {
        0..=250 => {
            *at += 1;
            return Some(u64::from(first));
        }
        251 => 2,
        252 => 4,
        253 => 8,
        _ => return None,
    };
    let bytes = b.get(*at + 1..*at + 1 + width)?;
    *at += 1 + width;
    let mut le = [0u8; 8];
    le[..width].copy_from_slice(bytes);
    Some(u64::from_le_bytes(le))
}

/// Reads `conn` until `stop`, checking that each publisher's seqs arrive as 1, 2, 3...
fn spawn_receiver(
    system: System,
    mut read: OwnedReadHalf,
    mut buf: BytesMut,
    seen: Arc<Seen>,
    publishers: usize,
    sample_latency: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = vec![1u64; publishers];
        let mut lat = Vec::new();
        // One cancellation future for the whole run, not a fresh one per read.
        let stop = seen.stop.clone().cancelled_owned();
        tokio::pin!(stop);
        loop {
            let mut n = 0u64;
            let mut bad = 0u64;
            let ok = parse(system, &mut buf, |p| {
                if p.len() != PAYLOAD {
                    bad += 1;
                    return;
                }
                let seq = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
                let publisher = u32::from_le_bytes(p[16..20].try_into().unwrap_or_default());
                match next.get_mut(publisher as usize) {
                    Some(expected) if *expected == seq => *expected += 1,
                    _ => bad += 1,
                }
                if sample_latency {
                    let sent = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                    lat.push(
                        (now_ns().saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32,
                    );
                }
                n += 1;
            });
            if n > 0 {
                seen.count.fetch_add(n, Ordering::Relaxed);
            }
            if bad > 0 || !ok {
                seen.disorder.fetch_add(bad.max(1), Ordering::Relaxed);
            }
            if !lat.is_empty() && lat.len() >= 4096 {
                if let Ok(mut l) = seen.latencies.lock() {
                    l.append(&mut lat);
                }
            }
            // Large reads: one system call takes whatever the server has written since.
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(READ_BUFFER);
            }
            // The read comes first: the stop is looked at only when nothing is left to read.
            tokio::select! {
                biased;
                r = read.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = &mut stop => break,
            }
        }
        if let Ok(mut l) = seen.latencies.lock() {
            l.append(&mut lat);
        }
    })
}

/// Drains what a publishing connection is sent (Redis's replies, Isthmus's echoes).
fn spawn_drain(mut read: OwnedReadHalf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// One row's figures for one system and round; `None` where it does not apply.
#[derive(Clone, Debug, Default)]
struct Figures {
    values: BTreeMap<&'static str, f64>,
    /// The run broke a rule (lost or reordered messages) or failed.
    invalid: Option<String>,
    /// The generator was the bottleneck.
    generator_bound: bool,
}

impl Figures {
    fn set(&mut self, k: &'static str, v: f64) {
        self.values.insert(k, v);
    }
}

fn check_generator(f: &mut Figures, wall: f64, me: f64) {
    f.set("generator CPU %", me / wall * 100.0);
    // One thread on one core: past ~90% busy it, not the server, sets the pace.
    f.generator_bound = me / wall > 0.9;
}

/// One topic with `receivers` subscribers and a publisher (for Isthmus a replica of the island
/// too, whose echoes are drained).
struct Audience {
    topic: Topic,
    seen: Vec<Arc<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held: dropping a write half would shut its connection down.
    writers: Vec<OwnedWriteHalf>,
    publisher: Conn,
    drain: tokio::task::JoinHandle<()>,
}

impl Audience {
    async fn gather(
        system: System,
        server: &Server,
        receivers: usize,
        sample_latency: bool,
    ) -> Result<Audience> {
        let topic = Topic::new(0);
        let mut seen = Vec::new();
        let mut tasks = Vec::new();
        let mut writers = Vec::new();
        for i in 0..receivers {
            let c = Conn::subscribe(system, server.addr, source(i), &topic, i == 0).await?;
            let s = Arc::new(Seen::default());
            tasks.push(spawn_receiver(
                system,
                c.read,
                c.buf,
                s.clone(),
                1,
                sample_latency,
            ));
            writers.push(c.write);
            seen.push(s);
        }
        let mut publisher = if system.is_isthmus() {
            Conn::subscribe(system, server.addr, source(receivers), &topic, false).await?
        } else {
            Conn::publisher(system, server.addr, source(receivers)).await?
        };
        let read = std::mem::replace(&mut publisher.read, connect_dummy().await?);
        let drain = spawn_drain(read);
        Ok(Audience {
            topic,
            seen,
            tasks,
            writers,
            publisher,
            drain,
        })
    }
}

/// One publisher, `receivers` subscribers, `messages` of 64 B as fast as the slowest receiver
/// allows (at most [`WINDOW`] ahead).
async fn fan_out(system: System, receivers: usize, messages: u64) -> Result<Figures> {
    let server = Server::start(system)?;
    let Audience {
        topic,
        seen,
        tasks,
        writers: _writers,
        mut publisher,
        drain,
    } = Audience::gather(system, &server, receivers, false).await?;
    let meter = CpuMeter::start(&server);
    let mut out = Vec::with_capacity(256 * 1024);
    let slowest = |seen: &[Arc<Seen>]| {
        seen.iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    for k in 1..=messages {
        publisher.publish(system, &topic, &payload(k, 0), &mut out);
        if out.len() >= 32 * 1024 || k == messages {
            publisher.write.write_all(&out).await?;
            out.clear();
            // Sleep rather than yield while the window is full: yielding spins the runtime
            // (a zero-timeout poll of the sockets per turn) and the spin was counted as the
            // generator's work. A millisecond is ~1% of what the window holds at 9M/s.
            while k.saturating_sub(slowest(&seen)) > WINDOW {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if seen.iter().any(|s| s.disorder.load(Ordering::Relaxed) > 0) {
                    break;
                }
            }
        }
    }
    let expected = messages * receivers as u64;
    settle(&seen, expected, Duration::from_secs(120)).await;
    let (wall, server_cpu, me) = meter.stop();
    let mut f = Figures {
        invalid: verdict(&seen, expected),
        ..Figures::default()
    };
    let delivered = delivered(&seen);
    f.set("deliveries/s", delivered as f64 / wall);
    f.set("server CPU-s per 1M", server_cpu / (delivered as f64 / 1e6));
    check_generator(&mut f, wall, me);
    drop(server);
    for t in tasks {
        t.abort();
    }
    drain.abort();
    Ok(f)
}

/// A connected socket to stand in for a read half handed to a task.
async fn connect_dummy() -> Result<OwnedReadHalf> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let c = TcpStream::connect(l.local_addr()?).await?;
    Ok(c.into_split().0)
}

/// `sessions` topics of `members` each; every member publishes `rate` msgs/s to its topic and
/// receives everything on it (its own messages included) for `secs`.
async fn many_sessions(
    system: System,
    sessions: usize,
    members: usize,
    rate: u32,
    secs: f64,
) -> Result<Figures> {
    let server = Server::start(system)?;
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    let mut writers = Vec::new();
    let mut pubs = Vec::new();
    let mut drains = Vec::new();
    let topics: Vec<Topic> = (0..sessions).map(Topic::new).collect();
    for (t, topic) in topics.iter().enumerate() {
        for m in 0..members {
            let i = t * members + m;
            let c = Conn::subscribe(system, server.addr, source(i), topic, m == 0)
                .await
                .with_context(|| format!("connection {i} (topic {t})"))?;
            let s = Arc::new(Seen::default());
            tasks.push(spawn_receiver(
                system,
                c.read,
                c.buf,
                s.clone(),
                members,
                true,
            ));
            seen.push(s);
            let publisher = if system == System::Redis {
                writers.push(c.write);
                let p = Conn::publisher(system, server.addr, source(i)).await?;
                drains.push(spawn_drain(p.read));
                (p.write, 0)
            } else {
                (c.write, 0)
            };
            pubs.push((t, m as u32, publisher));
        }
    }
    // Every publisher sends at its own phase within each period.
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let n = pubs.len();
    let total_per = (secs * f64::from(rate)).round() as u64;
    let meter = CpuMeter::start(&server);
    let start = tokio::time::Instant::now();
    let mut out = Vec::new();
    let mut sent = vec![0u64; n];
    let mut client_seq = vec![0u64; n];
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    loop {
        ticker.tick().await;
        let elapsed = start.elapsed();
        let mut all_done = true;
        for (i, (t, m, (w, _))) in pubs.iter_mut().enumerate() {
            let phase = period.mul_f64(i as f64 / n as f64);
            let due = if elapsed < phase {
                0
            } else {
                ((elapsed - phase).as_secs_f64() / period.as_secs_f64()) as u64 + 1
            }
            .min(total_per);
            if sent[i] < total_per {
                all_done = false;
            }
            while sent[i] < due {
                sent[i] += 1;
                let p = payload(sent[i], *m);
                let topic = &topics[*t];
                out.clear();
                publish_into(system, topic, &mut client_seq[i], &p, &mut out);
                w.write_all(&out).await?;
            }
        }
        if all_done {
            break;
        }
    }
    let expected = total_per * members as u64 * members as u64 * sessions as u64;
    settle(&seen, expected, Duration::from_secs(30)).await;
    let (wall, server_cpu, me) = meter.stop();
    let mut f = Figures {
        invalid: verdict(&seen, expected),
        ..Figures::default()
    };
    let got = delivered(&seen);
    drop(pubs);
    for d in drains {
        d.abort();
    }
    let lat = latencies(&seen, tasks).await;
    f.set("server CPU-s per 1M", server_cpu / (got as f64 / 1e6));
    f.set("server CPU %", server_cpu / wall * 100.0);
    set_percentiles(&mut f, &lat);
    check_generator(&mut f, wall, me);
    Ok(f)
}

/// Messages delivered over all receivers.
fn delivered(seen: &[Arc<Seen>]) -> u64 {
    seen.iter().map(|s| s.count.load(Ordering::Relaxed)).sum()
}

/// Waits until `expected` messages were delivered in all, or `limit` passed, or one arrived
/// out of order.
async fn settle(seen: &[Arc<Seen>], expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while delivered(seen) < expected && Instant::now() < deadline {
        if seen.iter().any(|s| s.disorder.load(Ordering::Relaxed) > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Why the run does not count, if it does not: not every message delivered, or some out of
/// order.
fn verdict(seen: &[Arc<Seen>], expected: u64) -> Option<String> {
    let got = delivered(seen);
    let disorder: u64 = seen
        .iter()
        .map(|s| s.disorder.load(Ordering::Relaxed))
        .sum();
    (got != expected || disorder > 0)
        .then(|| format!("{got} of {expected} delivered, {disorder} out of order"))
}

/// Stops the receivers, waits for them to hand in their latencies, and returns those sorted.
async fn latencies(seen: &[Arc<Seen>], tasks: Vec<tokio::task::JoinHandle<()>>) -> Vec<u32> {
    for s in seen {
        s.stop.cancel();
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut lat: Vec<u32> = Vec::new();
    for s in seen {
        if let Ok(mut l) = s.latencies.lock() {
            lat.append(&mut l);
        }
    }
    lat.sort_unstable();
    lat
}

/// The three latency percentiles of a run.
fn set_percentiles(f: &mut Figures, sorted_us: &[u32]) {
    f.set("p50 ms", percentile(sorted_us, 0.5));
    f.set("p99 ms", percentile(sorted_us, 0.99));
    f.set("p999 ms", percentile(sorted_us, 0.999));
}

fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    f64::from(sorted_us[((sorted_us.len() - 1) as f64 * p).round() as usize]) / 1000.0
}

/// One publisher at a fixed `rate` to `receivers` subscribers for `secs`: latency.
async fn fixed_rate(system: System, receivers: usize, rate: u32, secs: f64) -> Result<Figures> {
    let server = Server::start(system)?;
    let Audience {
        topic,
        seen,
        tasks,
        writers: _writers,
        mut publisher,
        drain,
    } = Audience::gather(system, &server, receivers, true).await?;
    let total = (secs * f64::from(rate)) as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let meter = CpuMeter::start(&server);
    let pacer = Pacer::new(period)?;
    let mut out = Vec::new();
    let mut k = 0;
    while k < total {
        // Periods missed while the generator was busy are made up at once, as a fixed-rate
        // sender would; each message carries its own send time.
        let due = pacer.tick().await?;
        for _ in 0..due.min(total - k) {
            k += 1;
            out.clear();
            publisher.publish(system, &topic, &payload(k, 0), &mut out);
            publisher.write.write_all(&out).await?;
        }
    }
    let expected = total * receivers as u64;
    settle(&seen, expected, Duration::from_secs(10)).await;
    let (wall, server_cpu, me) = meter.stop();
    let mut f = Figures {
        invalid: verdict(&seen, expected),
        ..Figures::default()
    };
    let lat = latencies(&seen, tasks).await;
    drain.abort();
    set_percentiles(&mut f, &lat);
    f.set("server CPU %", server_cpu / wall * 100.0);
    check_generator(&mut f, wall, me);
    Ok(f)
}

/// A periodic timer with the kernel's precision. Tokio's timers tick in whole milliseconds, so
/// pacing 4,000 msgs/s with them sends a burst of four every millisecond, and the later
/// messages of each burst wait behind the earlier ones' fan-out: a latency of the generator,
/// not of the server. A timerfd wakes the runtime's one thread every period instead.
struct Pacer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Pacer {
    fn new(period: Duration) -> Result<Pacer> {
        use rustix::time::{
            timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
            TimerfdTimerFlags, Timespec,
        };
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .context("timerfd_create")?;
        let every = Timespec {
            tv_sec: period.as_secs() as _,
            tv_nsec: period.subsec_nanos() as _,
        };
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: every,
                it_value: every,
            },
        )
        .context("timerfd_settime")?;
        // `new` is deprecated because a raw fd could be closed under it; an `OwnedFd` moved in
        // stays open as long as the `AsyncFd` holds it (and `register` would need unsafe).
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(Pacer { fd })
    }

    /// Waits for the next period; returns how many periods passed (1 unless it was late).
    async fn tick(&self) -> Result<u64> {
        loop {
            let mut ready = self.fd.readable().await?;
            let read = ready.try_io(|fd| {
                let mut n = [0u8; 8];
                rustix::io::read(fd.get_ref(), &mut n)?;
                Ok(u64::from_ne_bytes(n))
            });
            if let Ok(n) = read {
                return Ok(n?);
            }
        }
    }
}

/// `conns` subscribers spread over `sessions` topics, then idle: the server's resident memory
/// per connection, and (Isthmus) the CPU its ticks cost over `secs`.
async fn idle(system: System, sessions: usize, conns: usize, secs: f64) -> Result<Figures> {
    let server = Server::start(system)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(server.pid());
    let topics: Vec<Topic> = (0..sessions).map(Topic::new).collect();
    let mut held = Vec::new();
    let per = conns / sessions;
    for (t, topic) in topics.iter().enumerate() {
        for m in 0..per {
            let i = t * per + m;
            let c = Conn::subscribe(system, server.addr, source(i), topic, m == 0)
                .await
                .with_context(|| format!("connection {i} (topic {t})"))?;
            // Keep reading (ticks arrive), counting nothing.
            held.push(spawn_drain(c.read));
            held.push(tokio::spawn(async move {
                let _w = c.write;
                std::future::pending::<()>().await;
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(server.pid());
    let meter = CpuMeter::start(&server);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (wall, server_cpu, me) = meter.stop();
    let mut f = Figures::default();
    f.set(
        "kB per connection",
        (after - before) / conns as f64 / 1024.0,
    );
    f.set("idle server CPU %", server_cpu / wall * 100.0);
    check_generator(&mut f, wall, me);
    for t in held {
        t.abort();
    }
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Late join (Isthmus only)

/// The late-join snapshot: 16 MiB, uploaded in the island client's 128 KiB pieces.
const LATE_JOIN_BYTES: usize = 16 << 20;
const LATE_JOIN_PIECE: usize = 128 * 1024;

/// Frame variants of `ServerFrame` the late-join clients look at.
const REFUSE: u8 = 1;
const SNAPSHOT_REQUEST: u8 = 4;
const SYNC_BEGIN: u8 = 5;
const SNAPSHOT_DATA: u8 = 6;
const SYNCED: u8 = 7;
const GOODBYE: u8 = 11;

/// Reads one whole frame's body off `read` (buffered in `buf`).
async fn read_body(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<BytesMut> {
    loop {
        if buf.len() >= wire::LENGTH_PREFIX_LEN {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() >= wire::LENGTH_PREFIX_LEN + len {
                buf.advance(wire::LENGTH_PREFIX_LEN);
                return Ok(buf.split_to(len));
            }
            buf.reserve(wire::LENGTH_PREFIX_LEN + len - buf.len());
        }
        if read.read_buf(buf).await? == 0 {
            bail!("the router closed the connection");
        }
    }
}

/// The data of a `SnapshotData` body, read in place: the variant, bincode's varint length,
/// the bytes.
fn snapshot_data(body: &[u8]) -> Result<&[u8]> {
    let (len, at) = match body.get(1) {
        Some(&n) if n < 251 => (u64::from(n), 2),
        Some(251) if body.len() >= 4 => (u64::from(u16::from_le_bytes([body[2], body[3]])), 4),
        Some(252) if body.len() >= 6 => (
            u64::from(u32::from_le_bytes([body[2], body[3], body[4], body[5]])),
            6,
        ),
        _ => bail!("a SnapshotData frame this generator cannot read"),
    };
    if at as u64 + len != body.len() as u64 {
        bail!("a SnapshotData frame of the wrong length");
    }
    Ok(&body[at..])
}

/// The provider's upload of `snap` for request `request` at `at`, encoded ahead.
fn upload_frames(snap: &Bytes, request: u64, at: u64) -> Vec<Bytes> {
    (0..snap.len().div_ceil(LATE_JOIN_PIECE).max(1))
        .map(|k| {
            let from = k * LATE_JOIN_PIECE;
            let to = (from + LATE_JOIN_PIECE).min(snap.len());
            wire::encode(&ClientFrame::SnapshotChunk {
                request,
                at: isthmus_router::ids::Seq(at),
                offset: from as u64,
                total: snap.len() as u64,
                data: snap.slice(from..to),
            })
        })
        .collect()
}

/// A raw-wire provider: answers every `SnapshotRequest` with `snap` in 128 KiB pieces. The
/// upload for the next request (one above the last, at the same seq) is encoded ahead, so the
/// generator's encoding is not on the measured path.
fn spawn_provider(mut c: Conn, snap: Bytes) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut ready = (1u64, 1u64, upload_frames(&snap, 1, 1));
        loop {
            let body = read_body(&mut c.read, &mut c.buf).await?;
            if body.first() != Some(&SNAPSHOT_REQUEST) {
                continue;
            }
            let wire::ServerFrame::SnapshotRequest { request, at } = wire::decode_body(&body)?
            else {
                bail!("a snapshot request that does not decode");
            };
            if (request, at.0) != (ready.0, ready.1) {
                ready = (request, at.0, upload_frames(&snap, request, at.0));
            }
            for f in &ready.2 {
                c.write.write_all(f).await?;
            }
            ready = (request + 1, at.0, upload_frames(&snap, request + 1, at.0));
        }
    })
}

/// One late join: an observer connects, says hello and reads to `Synced`. Returns the time from
/// connecting to `Synced`, after checking that the snapshot it got is `snap` byte for byte.
async fn late_joiner(
    server: &Server,
    from: IpAddr,
    island: &Capability,
    snap: &[u8],
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut stream = connect(from, server.addr).await?;
    let nonce = exchange_preambles(&mut stream).await?;
    let cap = island
        .derive(isthmus_router::wire::Role::Observer)
        .context("an admin capability derives an observer")?;
    let mut opts = HelloOpts::with_cap(isthmus_tests::keys_of(island), cap, false);
    opts.name = "late".into();
    stream
        .write_all(&wire::encode(&ClientFrame::Hello(opts.sign(&nonce))))
        .await?;
    let (mut read, _write) = stream.into_split();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut got = 0usize;
    let mut announced = None;
    loop {
        let body = read_body(&mut read, &mut buf).await?;
        match body.first().copied() {
            Some(SYNC_BEGIN) => {
                let wire::ServerFrame::SyncBegin { snapshot_len, .. } = wire::decode_body(&body)?
                else {
                    bail!("a SyncBegin that does not decode");
                };
                announced = snapshot_len;
                got = 0;
            }
            Some(SNAPSHOT_DATA) => {
                let data = snapshot_data(&body)?;
                if snap.get(got..got + data.len()) != Some(data) {
                    bail!("the joiner's snapshot differs from the provider's at byte {got}");
                }
                got += data.len();
            }
            Some(SYNCED) => break,
            Some(REFUSE) | Some(GOODBYE) => {
                let f: wire::ServerFrame = wire::decode_body(&body)?;
                bail!("the router closed the joiner: {f:?}");
            }
            _ => {}
        }
    }
    let took = t0.elapsed();
    if announced != Some(snap.len() as u64) || got != snap.len() {
        bail!(
            "the joiner got {got} snapshot bytes of {} announced, {} uploaded",
            announced.unwrap_or(0),
            snap.len()
        );
    }
    Ok(took)
}

/// A raw 16 MiB loopback copy in 128 KiB writes, for reference: both ends in this generator.
async fn loopback_copy(snap: &Bytes) -> Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut client, (mut server, _)) = (client?, server?);
    let data = snap.clone();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for piece in data.chunks(LATE_JOIN_PIECE) {
            client.write_all(piece).await?;
        }
        Ok::<_, std::io::Error>(client)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < snap.len() {
        let n = server.read(&mut buf).await?;
        if n == 0 {
            bail!("the loopback copy ended early");
        }
        got += n;
    }
    let took = t0.elapsed();
    writer.await??;
    Ok(took)
}

/// `joins` observers join one after another an island whose provider holds a 16 MiB state:
/// each is asked of the provider and streamed. Hello to `Synced` (p50) and router CPU per join.
async fn late_join(system: System, joins: usize) -> Result<Figures> {
    let server = Server::start(system)?;
    let snap: Bytes = (0..LATE_JOIN_BYTES)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let topic = Topic::new(0);
    let mut provider = Conn::subscribe(system, server.addr, source(0), &topic, true).await?;
    // One message, so a joiner needs a snapshot rather than the (empty) order from the start.
    let mut out = Vec::new();
    provider.publish(system, &topic, &payload(1, 0), &mut out);
    provider.write.write_all(&out).await?;
    let provider = spawn_provider(provider, snap.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let meter = CpuMeter::start(&server);
    let mut took = Vec::new();
    for k in 0..joins {
        let t = late_joiner(&server, source(k + 1), &topic.island, &snap)
            .await
            .with_context(|| format!("join {}", k + 1))?;
        took.push(t.as_secs_f64() * 1000.0);
    }
    let (wall, server_cpu, me) = meter.stop();
    provider.abort();
    let mut f = Figures::default();
    f.set("hello to synced p50 ms", median(took).unwrap_or(f64::NAN));
    f.set("router CPU ms per join", server_cpu * 1000.0 / joins as f64);
    check_generator(&mut f, wall, me);
    let mut copies = Vec::new();
    for _ in 0..3 {
        copies.push(loopback_copy(&snap).await?.as_secs_f64() * 1000.0);
    }
    f.set(
        "raw 16 MiB loopback copy ms",
        median(copies).unwrap_or(f64::NAN),
    );
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Report

/// A metric that gets no ratio column (it describes the generator, not the servers).
const NO_RATIO: Option<bool> = None;

struct Row {
    workload: String,
    metric: &'static str,
    /// Higher is better (throughput) or lower (CPU, latency, memory); `None`: no ratio.
    higher_better: Option<bool>,
    figures: BTreeMap<System, Vec<Figures>>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn fmt_value(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn print_rows(rows: &[Row]) {
    let before = options().before.is_some();
    if before {
        println!("| workload | metric | NATS | Redis | Isthmus before | Isthmus | Isthmus / best peer | after / before |");
        println!("|---|---|---|---|---|---|---|---|");
    } else {
        println!("| workload | metric | NATS | Redis | Isthmus | Isthmus / best peer |");
        println!("|---|---|---|---|---|---|");
    }
    for row in rows {
        let cell = |sys: System| -> (String, Option<f64>) {
            let Some(runs) = row.figures.get(&sys) else {
                return ("-".into(), None);
            };
            let valid: Vec<&Figures> = runs.iter().filter(|f| f.invalid.is_none()).collect();
            let m = median(
                valid
                    .iter()
                    .filter_map(|f| f.values.get(row.metric).copied())
                    .collect(),
            );
            let mut notes = Vec::new();
            let invalid = runs.len() - valid.len();
            if invalid > 0 {
                let why = runs
                    .iter()
                    .find_map(|f| f.invalid.clone())
                    .unwrap_or_default();
                notes.push(format!("{invalid} run(s) invalid: {why}"));
            }
            let bound = valid.iter().filter(|f| f.generator_bound).count();
            if bound > 0 {
                notes.push(format!("generator-bound in {bound} of {}", valid.len()));
            }
            let text = match m {
                Some(v) => fmt_value(v),
                None => "-".into(),
            };
            if notes.is_empty() {
                (text, m)
            } else {
                (format!("{text} ({})", notes.join("; ")), m)
            }
        };
        let (nats, n) = cell(System::Nats);
        let (redis, r) = cell(System::Redis);
        let (isthmus, i) = cell(System::Isthmus);
        let best = match (n, r, row.higher_better) {
            (_, _, None) => None,
            (Some(a), Some(b), Some(true)) => Some(a.max(b)),
            (Some(a), Some(b), Some(false)) => Some(a.min(b)),
            (a, b, _) => a.or(b),
        };
        let ratio = match (i, best) {
            (Some(i), Some(b)) if b > 0.0 => format!("{:.2}x", i / b),
            _ => "-".into(),
        };
        if before {
            let (was, b) = cell(System::Before);
            let change = match (i, b, row.higher_better) {
                (Some(i), Some(b), Some(_)) if b > 0.0 => format!("{:.2}x", i / b),
                _ => "-".into(),
            };
            println!(
                "| {} | {} | {nats} | {redis} | {was} | {isthmus} | {ratio} | {change} |",
                row.workload, row.metric
            );
        } else {
            println!(
                "| {} | {} | {nats} | {redis} | {isthmus} | {ratio} |",
                row.workload, row.metric
            );
        }
    }
}

type Run =
    Box<dyn Fn(System) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Figures>>>>>;

struct Workload {
    name: String,
    systems: Vec<System>,
    metrics: Vec<(&'static str, Option<bool>)>,
    run: Run,
}

fn workloads(quick: bool) -> Vec<Workload> {
    let q = |full: u64, quick_n: u64| if quick { quick_n } else { full };
    let secs = if quick { 2.0 } else { 8.0 };
    let mut w = Vec::new();
    for receivers in [50usize, 200] {
        let messages = q(if receivers == 50 { 400_000 } else { 100_000 }, 20_000);
        w.push(Workload {
            name: format!("fan-out, 1 session, {receivers} receivers, 64 B"),
            systems: System::selected(),
            metrics: vec![
                ("deliveries/s", Some(true)),
                ("server CPU-s per 1M", Some(false)),
                ("generator CPU %", NO_RATIO),
            ],
            run: Box::new(move |s| Box::pin(fan_out(s, receivers, messages))),
        });
    }
    w.push(Workload {
        name: "250 sessions x 4 replicas x 20 msg/s".into(),
        systems: System::selected(),
        metrics: vec![
            ("server CPU-s per 1M", Some(false)),
            ("p50 ms", Some(false)),
            ("p99 ms", Some(false)),
            ("p999 ms", Some(false)),
            ("generator CPU %", NO_RATIO),
        ],
        run: Box::new(move |s| Box::pin(many_sessions(s, 250, 4, 20, secs))),
    });
    w.push(Workload {
        name: "1,000 sessions x 4 replicas x 20 msg/s".into(),
        systems: System::selected(),
        metrics: vec![("server CPU %", Some(false)), ("p99 ms", Some(false))],
        run: Box::new(move |s| Box::pin(many_sessions(s, 1000, 4, 20, secs))),
    });
    w.push(Workload {
        name: "1 publisher, 50 receivers at 4,000 msg/s".into(),
        systems: System::selected(),
        metrics: vec![
            ("p50 ms", Some(false)),
            ("p99 ms", Some(false)),
            ("p999 ms", Some(false)),
            ("server CPU %", Some(false)),
            ("generator CPU %", NO_RATIO),
        ],
        run: Box::new(move |s| Box::pin(fixed_rate(s, 50, 4000, secs))),
    });
    w.push(Workload {
        name: "2,000 idle connections in 20 sessions (Isthmus: 50 ms ticks)".into(),
        systems: System::selected(),
        metrics: vec![
            ("kB per connection", Some(false)),
            ("idle server CPU %", Some(false)),
        ],
        run: Box::new(move |s| Box::pin(idle(s, 20, 2000, secs.min(5.0)))),
    });
    let joins = q(9, 5) as usize;
    w.push(Workload {
        name: "late join, 16 MiB snapshot".into(),
        // The peers have no snapshots to stream: their cells stay "-".
        systems: System::selected()
            .into_iter()
            .filter(|s| s.is_isthmus())
            .collect(),
        metrics: vec![
            ("hello to synced p50 ms", Some(false)),
            ("router CPU ms per join", Some(false)),
            ("raw 16 MiB loopback copy ms", NO_RATIO),
            ("generator CPU %", NO_RATIO),
        ],
        run: Box::new(move |s| Box::pin(late_join(s, joins))),
    });
    w
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .context("--rounds takes a number")?,
        None if quick => 1,
        None => 3,
    };
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let path_of = |flag: &str| -> Result<Option<std::path::PathBuf>> {
        match args.iter().position(|a| a == flag) {
            None => Ok(None),
            Some(i) => {
                let path = args
                    .get(i + 1)
                    .with_context(|| format!("{flag} takes the path of an isthmus binary"))?;
                let path = std::fs::canonicalize(path).with_context(|| {
                    format!(
                        "{flag} {path}: no such binary; build one with `cargo build \
                             --release --bin isthmus` and pass target/release/isthmus (or a \
                             copy of it)"
                    )
                })?;
                Ok(Some(path))
            }
        }
    };
    let chosen = Options {
        router: path_of("--router")?,
        before: path_of("--before")?,
        no_peers: args.iter().any(|a| a == "--no-peers"),
    };
    if OPTIONS.set(chosen).is_err() {
        bail!("options were read twice");
    }
    const KNOWN: [&str; 6] = [
        "--quick",
        "--rounds",
        "--only",
        "--router",
        "--before",
        "--no-peers",
    ];
    const USAGE: &str = "usage: versus [--quick] [--rounds N] [--only TEXT] [--router PATH] \
                         [--before PATH] [--no-peers] (BENCHMARKS.md explains each)";
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    if let Some(bad) = args
        .iter()
        .find(|a| a.starts_with("--") && !KNOWN.contains(&a.as_str()))
    {
        bail!("unknown option {bad}; {USAGE}");
    }
    // The generator on core 1, the servers on core 0 (each started under taskset).
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status();
    if !pinned.is_ok_and(|s| s.success()) {
        eprintln!(
            "warning: could not pin the generator to core 1 (taskset); figures will be noisier"
        );
    }
    now_ns();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for w in workloads(quick) {
        if only.as_ref().is_some_and(|o| !w.name.contains(o.as_str())) {
            continue;
        }
        let mut figures: BTreeMap<System, Vec<Figures>> = BTreeMap::new();
        for round in 0..rounds {
            for &s in &w.systems {
                eprintln!(
                    "[{:>4.0} s] {} / {} / round {}",
                    started.elapsed().as_secs_f64(),
                    w.name,
                    s.name(),
                    round + 1
                );
                // A run that fails (a server closing on the generator, say) does not count, and
                // the sitting goes on: its other figures are worth keeping.
                let f = match rt.block_on((w.run)(s)) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("{} / {}: the run failed: {e:#}", w.name, s.name());
                        Figures {
                            invalid: Some(format!("failed: {}", e.root_cause())),
                            ..Figures::default()
                        }
                    }
                };
                figures.entry(s).or_default().push(f);
                // Let the last server's sockets clear before the next starts.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for (metric, higher_better) in &w.metrics {
            rows.push(Row {
                workload: w.name.clone(),
                metric,
                higher_better: *higher_better,
                figures: figures.clone(),
            });
        }
    }
    print_rows(&rows);
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream of three publishes as each server would deliver them to a subscriber.
    fn stream(system: System) -> (Vec<u8>, Vec<[u8; PAYLOAD]>) {
        let payloads: Vec<[u8; PAYLOAD]> = (1..=3).map(|k| payload(k, 0)).collect();
        let mut out = Vec::new();
        for (k, p) in payloads.iter().enumerate() {
            match system {
                System::Nats => {
                    out.extend_from_slice(b"PING\r\nMSG bench.0 1 64\r\n");
                    out.extend_from_slice(p);
                    out.extend_from_slice(b"\r\n");
                }
                System::Redis => {
                    out.extend_from_slice(b"*3\r\n$9\r\nsubscribe\r\n$7\r\nbench.0\r\n:1\r\n");
                    out.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$7\r\nbench.0\r\n$64\r\n");
                    out.extend_from_slice(p);
                    out.extend_from_slice(b"\r\n");
                }
                System::Isthmus | System::Before => {
                    out.extend_from_slice(&wire::encode(&wire::ServerFrame::Tick {
                        time: Default::default(),
                    }));
                    out.extend_from_slice(&wire::encode(&wire::ServerFrame::Message(
                        wire::Message {
                            // Seqs and times of every varint width.
                            seq: isthmus_router::ids::Seq([1, 300, 70_000][k] as u64),
                            time: isthmus_router::ids::RouterTime([0, 5, 1 << 33][k]),
                            origin: wire::Origin::Replica(isthmus_router::ids::ReplicaId(
                                uuid::Uuid::from_u128(7),
                            )),
                            client_seq: k as u64 + 1,
                            payload: Bytes::copy_from_slice(p),
                        },
                    )));
                }
            }
        }
        (out, payloads)
    }

    /// Every protocol's parser finds the same payloads however the stream is cut into reads.
    #[test]
    fn parsers_find_every_payload_at_any_read_boundary() {
        for system in [System::Nats, System::Redis, System::Isthmus] {
            let (bytes, payloads) = stream(system);
            for cut in 0..bytes.len() {
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for part in [&bytes[..cut], &bytes[cut..]] {
                    buf.extend_from_slice(part);
                    assert!(parse(system, &mut buf, |p| got.push(p.to_vec())));
                }
                assert!(buf.is_empty(), "{system:?}: {} bytes left", buf.len());
                assert_eq!(got, payloads, "{system:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn parsers_refuse_errors_and_broken_framing() {
        let broken: [(System, &[u8]); 5] = [
            (System::Nats, b"-ERR 'Authorization Violation'\r\n"),
            (System::Nats, b"MSG bench.0 1 3\r\nabcXY"),
            (System::Nats, b"MSG bench.0 1 x\r\n"),
            (System::Redis, b"-ERR unknown command\r\n"),
            (
                System::Redis,
                b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nabXY",
            ),
        ];
        for (system, bytes) in broken {
            let mut buf = BytesMut::from(bytes);
            assert!(!parse(system, &mut buf, |_| {}), "{system:?}: {bytes:?}");
        }
        let refuse = wire::encode(&wire::ServerFrame::Refuse {
            code: wire::Code::BAD_CREDENTIALS,
            reason: "no".into(),
        });
        assert!(!parse(
            System::Isthmus,
            &mut BytesMut::from(&refuse[..]),
            |_| {}
        ));
        // A Message whose fields do not add up to its frame (one stray byte after the payload).
        let (good, _) = stream(System::Isthmus);
        let tick_len =
            4 + u32::from_be_bytes(good[..4].try_into().expect("a length prefix")) as usize;
        let first = &good[tick_len..];
        let len = u32::from_be_bytes(first[..4].try_into().expect("a length prefix")) as usize;
        let mut stray = ((len + 1) as u32).to_be_bytes().to_vec();
        stray.extend_from_slice(&first[4..4 + len]);
        stray.push(0);
        assert!(!parse(
            System::Isthmus,
            &mut BytesMut::from(&stray[..]),
            |_| {}
        ));
    }

    /// The hand-written publishes are what each protocol expects.
    #[test]
    fn publishes_are_encoded_as_each_protocol_says() {
        let topic = Topic::new(0);
        let p = payload(1, 0);
        let mut out = Vec::new();
        let mut seq = 0;
        publish_into(System::Nats, &topic, &mut seq, &p, &mut out);
        assert_eq!(out, [&b"PUB bench.0 64\r\n"[..], &p, b"\r\n"].concat());
        out.clear();
        publish_into(System::Redis, &topic, &mut seq, &p, &mut out);
        assert_eq!(out, resp(&[b"PUBLISH", b"bench.0", &p]));
        for client_seq in [1, 250, 251, 65_535, 65_536, u64::from(u32::MAX) + 1] {
            out.clear();
            push_send(&mut out, client_seq, &p);
            let frame = wire::encode(&ClientFrame::Send {
                client_seq,
                payload: Bytes::copy_from_slice(&p),
            });
            assert_eq!(out, frame[..], "client seq {client_seq}");
        }
    }
}
