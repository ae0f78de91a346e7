//! `isthmus island new` and `isthmus join`: a replica of the demo chat island on the terminal.

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use isthmus_contact::beacon::{Discovery, Heard};
use isthmus_contact::lan::Listener;
use isthmus_contact::{ContactPoint, JoinSecret, Postcard};
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, ClientError, Event, ReplicaConfig};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};
use isthmus_router::wire::{Announce, CreateOptions, Message, Origin, Role};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;
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
    /// Keep the join secret out of the LAN beacon: the island is listed, but only its postcard
    /// lets anyone in.
    #[arg(long)]
    private: bool,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Args)]
pub struct JoinArgs {
    /// The postcard (join string) of the island.
    #[arg(required_unless_present = "discover")]
    join_string: Option<String>,
    /// Join a LAN-open island heard on the LAN: the one named, or the only one.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "", conflicts_with = "join_string")]
    discover: Option<String>,
    #[command(flatten)]
    lan: LanArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Args, Clone)]
pub struct LanArgs {
    /// Seconds to listen for LAN announcements.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,
    /// UDP port of the LAN beacon.
    #[arg(long, default_value_t = isthmus_contact::beacon::DEFAULT_BEACON_PORT)]
    beacon_port: u16,
}

#[derive(Args)]
pub struct DiscoverArgs {
    /// Seconds to listen.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    timeout: f64,
    /// UDP port of the LAN beacon.
    #[arg(long, default_value_t = isthmus_contact::beacon::DEFAULT_BEACON_PORT)]
    beacon_port: u16,
    /// One JSON object per island.
    #[arg(long)]
    json: bool,
    /// Print islands as they are heard and as they go quiet, until the timeout.
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PostcardArgs {
    #[command(subcommand)]
    command: Option<PostcardCommand>,
    /// Print the postcard of this LAN-open island heard on the LAN, ready to paste.
    #[arg(long, value_name = "NAME")]
    discover: Option<String>,
    #[command(flatten)]
    lan: LanArgs,
}

#[derive(Subcommand)]
pub enum PostcardCommand {
    /// Print what a postcard holds (never the whole secret).
    Show {
        /// The postcard.
        postcard: String,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
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
            let create = CreateOptions {
                announce: Some(Announce {
                    name: card.contact.name.clone(),
                    destination: card.contact.destination,
                    secret: (!args.private).then_some(card.secret.0),
                }),
                ..CreateOptions::default()
            };
            run_replica(card, args.replica, Some(create)).await
        }
    }
}

pub async fn run_join(args: JoinArgs) -> Result<u8> {
    let card = match (&args.join_string, &args.discover) {
        (Some(text), _) => parse_postcard(text)?,
        (None, Some(name)) => {
            let name = (!name.is_empty()).then_some(name.as_str());
            let heard = discover_one(&args.lan, name).await?;
            heard.postcard().ok_or_else(|| {
                anyhow!(
                    "island {:?} is private: ask whoever runs it for its postcard",
                    heard.island.name
                )
            })?
        }
        (None, None) => anyhow::bail!("give a postcard, or --discover [NAME]"),
    };
    run_replica(card, args.replica, None).await
}

fn parse_postcard(text: &str) -> Result<Postcard> {
    text.parse().map_err(|e| {
        anyhow::Error::new(ExitCode(
            EXIT_BAD_JOIN_STRING,
            format!("cannot read the postcard: {e}"),
        ))
    })
}

fn listen_for(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
        anyhow::bail!("--timeout must be between 0 and 3600 seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn bind_listener(port: u16) -> Result<Listener> {
    Listener::bind(port).with_context(|| {
        format!("cannot listen for LAN announcements on UDP port {port}; is another program using it without sharing?")
    })
}

/// Listens until an island matching `name` (or, without a name, exactly one open island) is
/// heard.
async fn discover_one(lan: &LanArgs, name: Option<&str>) -> Result<Heard> {
    let listener = bind_listener(lan.beacon_port)?;
    let mut table = Discovery::default();
    let limit = listen_for(lan.timeout)?;
    match name {
        Some(name) => {
            listener
                .listen(&mut table, limit, |t| {
                    t.islands().iter().any(|h| h.island.name == name)
                })
                .await;
            let found: Vec<&Heard> = table
                .islands()
                .into_iter()
                .filter(|h| h.island.name == name)
                .collect();
            match found.as_slice() {
                [] => anyhow::bail!(
                    "no island named {name:?} heard on the LAN within {:?}{}",
                    limit,
                    heard_list(&table)
                ),
                [one] => Ok((*one).clone()),
                many => {
                    // Prefer an open one when a name is announced twice.
                    Ok(many
                        .iter()
                        .find(|h| h.is_open())
                        .copied()
                        .unwrap_or(many[0])
                        .clone())
                }
            }
        }
        None => {
            listener.listen(&mut table, limit, |_| false).await;
            let open: Vec<&Heard> = table
                .islands()
                .into_iter()
                .filter(|h| h.is_open())
                .collect();
            match open.as_slice() {
                [one] => Ok((*one).clone()),
                [] => anyhow::bail!(
                    "no LAN-open island heard within {:?}{}",
                    limit,
                    heard_list(&table)
                ),
                _ => anyhow::bail!(
                    "several LAN-open islands heard; name one with --discover NAME{}",
                    heard_list(&table)
                ),
            }
        }
    }
}

fn heard_list(table: &Discovery) -> String {
    let names: Vec<String> = table
        .islands()
        .iter()
        .map(|h| {
            format!(
                "{:?}{}",
                h.island.name,
                if h.is_open() { "" } else { " (private)" }
            )
        })
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (heard: {})", names.join(", "))
    }
}

pub async fn run_discover(args: DiscoverArgs) -> Result<u8> {
    let listener = bind_listener(args.beacon_port)?;
    let mut table = Discovery::default();
    let limit = listen_for(args.timeout)?;
    if args.watch {
        watch(&listener, &mut table, limit, args.json).await;
        return Ok(0);
    }
    listener.listen(&mut table, limit, |_| false).await;
    let islands = table.islands();
    if args.json {
        for h in &islands {
            println!("{}", heard_json(h, None));
        }
    } else if islands.is_empty() {
        eprintln!("no islands heard on the LAN");
    } else {
        println!("{:<24} {:<36} {:<22} ACCESS", "NAME", "SESSION", "ROUTER");
        for h in &islands {
            println!(
                "{:<24} {:<36} {:<22} {}",
                h.island.name,
                h.island.session,
                h.router,
                if h.is_open() { "open" } else { "private" }
            );
        }
    }
    Ok(0)
}

fn heard_json(h: &Heard, event: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "name": h.island.name,
        "session": h.island.session.to_string(),
        "router": h.router.to_string(),
        "external": h.external.map(|e| e.to_string()),
        "open": h.is_open(),
    });
    if let Some(e) = event {
        v["event"] = serde_json::Value::from(e);
    }
    v
}

/// Reports changes to the table in short slices, so an island that goes quiet is reported as
/// gone when it expires, not when the next packet happens to arrive.
async fn watch(listener: &Listener, table: &mut Discovery, limit: Duration, json: bool) {
    use std::collections::BTreeMap;
    let deadline = tokio::time::Instant::now() + limit;
    let mut known: BTreeMap<(String, SessionId), Heard> = BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        let slice = Duration::from_millis(100).min(deadline - tokio::time::Instant::now());
        listener.listen(table, slice, |_| false).await;
        let now: BTreeMap<(String, SessionId), Heard> = table
            .islands()
            .into_iter()
            .map(|h| ((h.router.to_string(), h.island.session), h.clone()))
            .collect();
        for (k, h) in &now {
            if !known.contains_key(k) {
                report(h, "heard", json);
            }
        }
        for (k, h) in &known {
            if !now.contains_key(k) {
                report(h, "gone", json);
            }
        }
        known = now;
    }
}

fn report(h: &Heard, event: &str, json: bool) {
    if json {
        println!("{}", heard_json(h, Some(event)));
    } else {
        println!(
            "{event:<6} {:<24} {} at {} ({})",
            h.island.name,
            h.island.session,
            h.router,
            if h.is_open() { "open" } else { "private" }
        );
    }
}

pub async fn run_postcard(args: PostcardArgs) -> Result<u8> {
    match (args.command, args.discover) {
        (Some(PostcardCommand::Show { postcard, json }), _) => {
            let card = parse_postcard(&postcard)?;
            show_postcard(&card, json);
            Ok(0)
        }
        (None, Some(name)) => {
            let heard = discover_one(&args.lan, Some(&name)).await?;
            let card = heard.postcard().ok_or_else(|| {
                anyhow!("island {name:?} is private: only its owner can hand out its postcard")
            })?;
            println!("{card}");
            Ok(0)
        }
        (None, None) => anyhow::bail!(
            "say `isthmus postcard show POSTCARD` or `isthmus postcard --discover NAME`"
        ),
    }
}

fn show_postcard(card: &Postcard, json: bool) {
    let c = &card.contact;
    let list = |v: &[SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    if json {
        let v = serde_json::json!({
            "island": c.name,
            "session": c.session.to_string(),
            "internal": list(&c.internal),
            "external": c.external.map(|e| e.to_string()),
            "router": c.router.map(|r| r.to_string()),
            "destination": c.destination.map(|d| d.to_string()),
            "secret": format!("{}...", card.secret.fingerprint()),
        });
        println!("{v}");
    } else {
        let none = || "none".to_string();
        println!("island:      {}", c.name);
        println!("session:     {}", c.session);
        println!("internal:    {}", list(&c.internal).join(", "));
        println!(
            "external:    {}",
            c.external.map_or_else(none, |e| e.to_string())
        );
        println!(
            "router:      {}",
            c.router.map_or_else(none, |r| r.to_string())
        );
        println!(
            "destination: {}",
            c.destination.map_or_else(none, |d| d.to_string())
        );
        println!(
            "secret:      {}... (not shown in full)",
            card.secret.fingerprint()
        );
    }
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

async fn run_replica(
    mut card: Postcard,
    args: ReplicaArgs,
    create: Option<CreateOptions>,
) -> Result<u8> {
    let creating = create.is_some();
    let name = args.name.clone().unwrap_or_else(default_name);
    let session = card.contact.session;
    let replica = ReplicaConfig {
        session,
        token: card.secret.join_token(session),
        replica: ReplicaId::random(),
        name: name.clone(),
        role: Role::Replica,
        create,
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
    let mut postcard_printed = false;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(anyhow!("the replica stopped unexpectedly"));
                };
                match event {
                    Event::Welcomed { contacts, .. } => {
                        if creating && !postcard_printed {
                            postcard_printed = true;
                            // The router knows its own contact points better than the address
                            // we happened to use: both go into the postcard.
                            if !contacts.internal.is_empty() {
                                card.contact.internal = contacts.internal;
                            }
                            card.contact.external = contacts.external;
                            card.contact.router = Some(contacts.router);
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
