//! `isthmus island new` and `isthmus join`: a replica of the demo chat island on the terminal.

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use isthmus_contact::{ContactPoint, JoinSecret, Postcard};
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, ClientError, Event, ReplicaConfig};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};
use isthmus_router::wire::{CreateOptions, Message, Origin, Role};
use std::io::IsTerminal;
use std::net::SocketAddr;
use tokio::io::AsyncBufReadExt;

/// Exit code for a join string that cannot be read.
pub const EXIT_BAD_JOIN_STRING: u8 = 2;
/// Exit code when the router lost the island.
pub const EXIT_SESSION_LOST: u8 = 3;

/// An error that carries its own exit code.
#[derive(Debug)]
pub struct ExitCode(pub u8, pub String);

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}
impl std::error::Error for ExitCode {}

#[derive(Subcommand)]
pub enum IslandCommand {
    /// Create a new island and join it as its first replica; prints its postcard first.
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// The island's name.
    #[arg(value_name = "NAME")]
    island: String,
    /// The router to create it on, as ADDR:PORT (or HOST:PORT).
    #[arg(long)]
    router: String,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Args)]
pub struct JoinArgs {
    /// The postcard (join string) of the island.
    join_string: String,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Args, Clone)]
pub struct ReplicaArgs {
    /// Send this line once synced (repeatable; sent in order).
    #[arg(long = "send", value_name = "TEXT")]
    send: Vec<String>,
    /// Print one JSON object per delivered message, and a summary on exit.
    #[arg(long)]
    json: bool,
    /// Exit 0 once this seq is applied (live or inside a snapshot).
    #[arg(long, value_name = "N")]
    exit_after_seq: Option<u64>,
    /// Display name in the chat.
    #[arg(long)]
    name: Option<String>,
}

pub async fn run_island(cmd: IslandCommand) -> Result<u8> {
    match cmd {
        IslandCommand::New(args) => {
            let routers = resolve(&args.router).await?;
            let card = Postcard {
                contact: ContactPoint::new(SessionId::random(), args.island, routers),
                secret: JoinSecret::random(),
            };
            card.validate().map_err(|e| anyhow!("{e}"))?;
            run_replica(card, args.replica, true).await
        }
    }
}

pub async fn run_join(args: JoinArgs) -> Result<u8> {
    let card: Postcard = args.join_string.parse().map_err(|e| {
        anyhow::Error::new(ExitCode(
            EXIT_BAD_JOIN_STRING,
            format!("cannot read the join string: {e}"),
        ))
    })?;
    run_replica(card, args.replica, false).await
}

async fn resolve(router: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(router)
        .await
        .with_context(|| format!("--router {router:?} is not ADDR:PORT or HOST:PORT"))?
        .collect();
    if addrs.is_empty() {
        anyhow::bail!("--router {router:?} resolves to no address");
    }
    Ok(addrs)
}

fn default_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "replica".into())
}

async fn run_replica(mut card: Postcard, args: ReplicaArgs, create: bool) -> Result<u8> {
    let name = args.name.clone().unwrap_or_else(default_name);
    let session = card.contact.session;
    let replica = ReplicaConfig {
        session,
        token: card.secret.join_token(session),
        replica: ReplicaId::random(),
        name: name.clone(),
        role: Role::Replica,
        create: create.then(CreateOptions::default),
        digest_every: isthmus_island_client::replica::DEFAULT_DIGEST_EVERY,
        max_pending_sends: isthmus_island_client::replica::DEFAULT_MAX_PENDING_SENDS,
        stop_after: args.exit_after_seq.map(Seq),
    };
    let cfg = ClientConfig::new(card.contact.addresses(), replica);
    let (handle, mut events) = client::connect(cfg, ChatIsland::default())
        .await
        .map_err(|e: ClientError| anyhow!("{e}"))?;
    let out = Output { json: args.json };
    let interactive = !args.json && std::io::stdin().is_terminal();
    let mut stdin = (!args.json).then(|| tokio::io::BufReader::new(tokio::io::stdin()).lines());
    let mut to_send = args.send.clone();
    let mut printed_upto = 0u64;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(anyhow!("the replica stopped unexpectedly"));
                };
                match event {
                    Event::Welcomed { contacts, .. } => {
                        if create && printed_upto == 0 {
                            if !contacts.is_empty() {
                                card.contact.internal = contacts;
                            }
                            // The join string is the first line of stdout, always.
                            println!("{card}");
                            if interactive {
                                eprintln!("island {:?} created; paste the line above to invite someone", card.contact.name);
                            }
                        }
                    }
                    Event::Restored { at } => {
                        let lines = handle
                            .inspect(move |chat: &ChatIsland, _| {
                                chat.lines().filter(|l| l.seq <= at.0).cloned().collect::<Vec<_>>()
                            })
                            .await?;
                        for l in lines {
                            out.line(l.seq, l.time_us, l.from, &l.name, &l.text);
                        }
                        printed_upto = at.0;
                    }
                    Event::StartedFresh => printed_upto = 0,
                    Event::Message(m) => {
                        if m.seq.0 > printed_upto {
                            out.message(&m);
                            printed_upto = m.seq.0;
                        }
                    }
                    Event::Synced { .. } => {
                        for text in to_send.drain(..) {
                            handle.send(ChatIsland::payload(&name, &text)).await?;
                        }
                    }
                    Event::Divergence(d) => {
                        eprintln!("warning: replicas diverged at seq {}: {} different states", d.seq, d.groups.len());
                    }
                    Event::Disconnected { reason } => eprintln!("disconnected: {reason}; reconnecting"),
                    Event::Reconnected => eprintln!("reconnected"),
                    Event::SessionLost { reason } => {
                        return Err(anyhow::Error::new(ExitCode(
                            EXIT_SESSION_LOST,
                            format!("the island's session is lost: {reason}"),
                        )));
                    }
                    Event::Stopped { seq, digest } => {
                        out.summary(seq.0, &hex_string(&digest));
                        return Ok(0);
                    }
                    Event::Tick(_) => {}
                }
            }
            line = next_line(&mut stdin) => match line {
                Some(text) => {
                    if !text.trim().is_empty() {
                        handle.send(ChatIsland::payload(&name, &text)).await?;
                    }
                }
                None => stdin = None,
            },
            _ = tokio::signal::ctrl_c() => {
                let (seq, digest) = handle
                    .inspect(|chat: &ChatIsland, seq| (seq, chat.digest_hex()))
                    .await
                    .unwrap_or((Seq(0), String::new()));
                out.summary(seq.0, &digest);
                leave(handle).await;
                return Ok(0);
            }
        }
    }
}

async fn leave(handle: ClientHandle<ChatIsland>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), handle.leave()).await;
}

async fn next_line(
    stdin: &mut Option<tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>>,
) -> Option<String> {
    match stdin {
        Some(lines) => lines.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Output {
    json: bool,
}

impl Output {
    fn message(&self, m: &Message) {
        let from = match m.origin {
            Origin::Replica(r) => Some(r),
            Origin::Router => None,
        };
        let (name, text) = ChatIsland::parse(&m.payload);
        self.line(m.seq.0, m.time.0, from, &name, &text);
    }

    fn line(&self, seq: u64, time_us: u64, from: Option<ReplicaId>, name: &str, text: &str) {
        if self.json {
            // Written by hand to keep the documented key order.
            let from = from.map_or("null".to_string(), |r| format!("\"{r}\""));
            let text = serde_json::Value::from(text);
            println!("{{\"seq\":{seq},\"time_us\":{time_us},\"from\":{from},\"text\":{text}}}");
        } else {
            println!("[{seq}] {name}: {text}");
        }
    }

    fn summary(&self, last_seq: u64, digest: &str) {
        if self.json {
            println!("{{\"last_seq\":{last_seq},\"digest\":\"{digest}\"}}");
        } else {
            eprintln!("left at seq {last_seq}, digest {digest}");
        }
    }
}
