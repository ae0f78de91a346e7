//! `isthmus island new|close|kick|tick`, `isthmus join` and `isthmus postcard`: a replica of the
//! demo chat island on the terminal, and the island's admin commands.

use crate::{eprint_line, print_line};
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use isthmus_contact::beacon::{Discovery, Heard};
use isthmus_contact::lan::Listener;
use isthmus_contact::{ContactPoint, Postcard, POSTCARD_KIND};
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, ClientError, Event, ReplicaConfig};
use isthmus_router::auth::{self, Capability};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};
use isthmus_router::wire::{AdminCommand, Announce, Code, CreateOptions, Message, Origin, Role};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Exit code for a join string (postcard, or an ISLAND argument) that cannot be read.
pub const EXIT_BAD_JOIN_STRING: u8 = 2;
/// Time an admin command may take, connection and answer each.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Create a new island and join it as its first replica; prints its participant postcard
    /// first and keeps the admin postcard in the data directory.
    New(NewArgs),
    /// Close the island: every replica is told and the router forgets it.
    Close {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Remove one replica from the island.
    Kick {
        #[command(flatten)]
        target: AdminTarget,
        /// The replica's id (a UUID, as shown in `--json` output's "from").
        #[arg(value_name = "REPLICA_UUID")]
        replica: uuid::Uuid,
    },
    /// Set the island's tick interval: a tick after this many idle milliseconds.
    Tick {
        #[command(flatten)]
        target: AdminTarget,
        /// Milliseconds.
        #[arg(value_name = "MS")]
        ms: u32,
    },
}

/// Which island an admin command is for, and where its router is.
#[derive(Args)]
pub struct AdminTarget {
    /// The island's admin postcard, or its session id when its admin postcard is kept in the
    /// data directory (the machine that created it).
    #[arg(value_name = "ISLAND")]
    island: String,
    /// The router to talk to, as ADDR:PORT (default: the addresses on the admin postcard).
    #[arg(long)]
    router: Option<String>,
}

#[derive(Args)]
pub struct NewArgs {
    /// The island's name (at most 64 bytes).
    #[arg(value_name = "NAME", value_parser = island_name)]
    island: String,
    /// The router to create it on, as ADDR:PORT (or HOST:PORT).
    #[arg(long)]
    router: String,
    /// Keep the participant secret out of the LAN beacon: the island is listed, but only its
    /// postcard lets anyone in, and the router holds no secret of it.
    #[arg(long)]
    private: bool,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Args)]
pub struct JoinArgs {
    /// The island's postcard (`isthmus2:...`). An observer postcard joins to watch only.
    #[arg(required_unless_present = "discover")]
    postcard: Option<String>,
    /// Join a LAN-open island heard on the LAN: the one named, or the only one.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "", conflicts_with = "postcard")]
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
    /// Print what a postcard holds and the role it grants (never its secret).
    Show {
        /// The postcard.
        postcard: String,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the observer postcard of an island: it lets its holder watch, never send.
    Observer {
        /// Any postcard of the island (admin, participant or observer).
        postcard: String,
    },
    /// Print the participant postcard (join and send) of an island created on this machine,
    /// or of any admin postcard.
    Participant {
        /// The island's session id (or its admin postcard).
        #[arg(value_name = "ISLAND")]
        island: String,
    },
    /// Print the admin postcard of an island created on this machine.
    Admin {
        /// The island's session id (or its admin postcard).
        #[arg(value_name = "ISLAND")]
        island: String,
    },
}

#[derive(Args, Clone)]
pub struct ReplicaArgs {
    /// Send this line (repeatable; sent in order, as soon as the router welcomes the replica).
    #[arg(long = "send", value_name = "TEXT")]
    send: Vec<String>,
    /// Print one JSON object per delivered message, and a summary on exit.
    #[arg(long)]
    json: bool,
    /// Exit 0 once this seq is applied (live or inside a snapshot) and every --send line is
    /// stamped.
    #[arg(long, value_name = "N")]
    exit_after_seq: Option<u64>,
    /// Display name in the chat (default: $USER), at most 256 bytes.
    #[arg(long, value_parser = display_name)]
    name: Option<String>,
    /// Seconds to keep trying to get back to a router that went away, then exit 1.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    give_up_after: u64,
}

/// An island name a postcard can carry, checked before anything is sent.
fn island_name(text: &str) -> Result<String, String> {
    let max = isthmus_contact::MAX_ISLAND_NAME_BYTES;
    if text.trim().is_empty() {
        return Err("an island needs a name people can tell apart".into());
    }
    if text.len() > max {
        return Err(format!(
            "an island name is at most {max} bytes; this one is {}",
            text.len()
        ));
    }
    Ok(text.to_string())
}

/// A display name the router will accept, checked before anything is sent.
fn display_name(text: &str) -> Result<String, String> {
    let max = isthmus_router::wire::MAX_NAME_BYTES;
    if text.trim().is_empty() {
        return Err("a display name cannot be empty".into());
    }
    if text.len() > max {
        return Err(format!(
            "a display name is at most {max} bytes; this one is {}",
            text.len()
        ));
    }
    Ok(text.to_string())
}

pub async fn run_island(cmd: IslandCommand) -> Result<u8> {
    match cmd {
        IslandCommand::New(args) => {
            let routers = resolve(&args.router).await?;
            let admin = Capability::new_island();
            let contact = ContactPoint::new(SessionId::random(), args.island, routers);
            let card = Postcard::for_new_island(contact, admin).map_err(|e| anyhow!("{e}"))?;
            let participant = card
                .participant()
                .context("an admin capability derives the participant's")?;
            // LAN-open means the router announces the participant secret on its LAN, so the
            // secret crosses the wire to it: only to a router on this machine or its LAN.
            let lan_router = {
                let here = isthmus_dispatcher::contacts::local_addrs();
                card.contact
                    .internal
                    .iter()
                    .all(|a| isthmus_dispatcher::contacts::is_lan_peer(a.ip(), &here))
            };
            let open = !args.private && lan_router;
            if !args.private && !lan_router {
                eprint_line(&format!(
                    "the router {} is not on this machine's LAN, so the island is private: its participant secret stays here and only its postcard lets anyone in",
                    args.router
                ));
            }
            let create = CreateOptions {
                announce: Some(Announce {
                    name: card.contact.name.clone(),
                    destination: card.contact.destination,
                    secret: open.then_some(*participant.capability.secret()),
                }),
                ..CreateOptions::default()
            };
            run_replica(card, args.replica, Some(create)).await
        }
        IslandCommand::Close { target } => run_admin(target, AdminCommand::Close).await,
        IslandCommand::Kick { target, replica } => {
            run_admin(
                target,
                AdminCommand::Kick {
                    replica: ReplicaId(replica),
                },
            )
            .await
        }
        // The router says which intervals it allows (its floor is a router setting).
        IslandCommand::Tick { target, ms } => run_admin(target, AdminCommand::SetTick { ms }).await,
    }
}

async fn run_admin(target: AdminTarget, command: AdminCommand) -> Result<u8> {
    let card = admin_postcard(&target.island)?;
    let routers = match &target.router {
        Some(r) => resolve(r).await?,
        None => card.contact.addresses(),
    };
    let said = client::admin(&routers, &card, command, ADMIN_TIMEOUT)
        .await
        .map_err(|e: ClientError| anyhow!("{e}"))?;
    let _ = print_line(&said.to_string());
    Ok(0)
}

/// Where isthmus keeps what it must remember: `$ISTHMUS_DATA_DIR`, else the platform's data
/// directory.
fn data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ISTHMUS_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    dirs::data_dir()
        .map(|d| d.join("isthmus"))
        .context("this platform has no data directory; set ISTHMUS_DATA_DIR to one")
}

fn admin_path(session: SessionId) -> Result<PathBuf> {
    Ok(data_dir()?.join("islands").join(format!("{session}.admin")))
}

/// Keeps an island's admin postcard where only this user can read it.
fn keep_admin_postcard(card: &Postcard) -> Result<PathBuf> {
    use std::io::Write;
    let path = admin_path(card.session())?;
    let dir = path.parent().context("the admin file has a directory")?;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{card}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn bad_island(text: String) -> anyhow::Error {
    anyhow::Error::new(ExitCode(EXIT_BAD_JOIN_STRING, text))
}

/// An ISLAND argument: an admin postcard, or the session id of an island whose admin postcard
/// is kept in the data directory.
fn admin_postcard(island: &str) -> Result<Postcard> {
    let trimmed = island.trim();
    if trimmed.to_ascii_lowercase().starts_with(POSTCARD_KIND) {
        let card = parse_postcard(trimmed)?;
        if card.role() != Role::Admin {
            return Err(bad_island(format!(
                "this is {} {} postcard; admin commands need the island's admin postcard (`isthmus postcard admin SESSION` prints it on the machine that created the island)",
                if card.role() == Role::Observer { "an" } else { "a" },
                auth::role_name(card.role())
            )));
        }
        return Ok(card);
    }
    let Ok(id) = uuid::Uuid::parse_str(trimmed) else {
        return Err(bad_island(format!(
            "{trimmed:?} is neither an admin postcard nor an island's session id"
        )));
    };
    let session = SessionId(id);
    let path = admin_path(session)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad_island(format!(
                "no admin postcard for island {session} is kept here ({} does not exist); give the admin postcard itself, or run this on the machine that created the island",
                path.display()
            )))
        }
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let card: Postcard = text.trim().parse().map_err(|e| {
        bad_island(format!(
            "the admin postcard kept in {} cannot be read: {e}",
            path.display()
        ))
    })?;
    if card.role() != Role::Admin || card.session() != session {
        return Err(bad_island(format!(
            "{} does not hold the admin postcard of island {session}",
            path.display()
        )));
    }
    Ok(card)
}

pub async fn run_join(args: JoinArgs) -> Result<u8> {
    let card = match (&args.postcard, &args.discover) {
        (Some(text), _) => parse_postcard(text)?,
        (None, Some(name)) => {
            let name = (!name.is_empty()).then_some(name.as_str());
            let heard = discover_one(&args.lan, name).await?;
            heard_postcard(&heard, "ask whoever runs it for its postcard")?
        }
        (None, None) => anyhow::bail!("give a postcard, or --discover [NAME]"),
    };
    if card.role() == Role::Observer && !args.replica.send.is_empty() {
        anyhow::bail!(
            "observers cannot send: this is an observer postcard, it only lets you watch (drop --send, or ask for a participant postcard)"
        );
    }
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

/// The participant postcard of a heard island, or why there is none.
fn heard_postcard(heard: &Heard, private_hint: &str) -> Result<Postcard> {
    let name = &heard.island.name;
    match heard.postcard() {
        Some(card) => Ok(card),
        None if heard.is_open() => Err(anyhow!(
            "island {name:?} was announced with a secret that does not belong to it (a forged or broken announcement from {}); ask whoever runs it for its postcard",
            heard.router
        )),
        None => Err(anyhow!("island {name:?} is private: {private_hint}")),
    }
}

fn listen_for(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
        anyhow::bail!(
            "--timeout must be more than 0 and at most 3600 seconds (got {secs}); the router announces every 2 s, so 3 or more finds every island"
        );
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
    // Check the flags before binding: joining the IPv6 beacon group announces itself (MLD).
    let limit = listen_for(lan.timeout)?;
    let listener = bind_listener(lan.beacon_port)?;
    let mut table = Discovery::default();
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
    // Check the flags before binding: joining the IPv6 beacon group announces itself (MLD).
    let limit = listen_for(args.timeout)?;
    let listener = bind_listener(args.beacon_port)?;
    let mut table = Discovery::default();
    if args.watch {
        watch(&listener, &mut table, limit, args.json).await;
        return Ok(0);
    }
    listener.listen(&mut table, limit, |_| false).await;
    let islands = table.islands();
    if args.json {
        for h in &islands {
            let _ = print_line(&format!("{}", heard_json(h, None)));
        }
    } else if islands.is_empty() {
        eprint_line("no islands heard on the LAN");
    } else {
        let _ = print_line(&format!(
            "{:<24} {:<36} {:<22} ACCESS",
            "NAME", "SESSION", "ROUTER"
        ));
        for h in &islands {
            let _ = print_line(&format!(
                "{:<24} {:<36} {:<22} {}",
                h.island.name,
                h.island.session,
                h.router,
                if h.is_open() { "open" } else { "private" }
            ));
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
        let _ = print_line(&format!("{}", heard_json(h, Some(event))));
    } else {
        let _ = print_line(&format!(
            "{event:<6} {:<24} {} at {} ({})",
            h.island.name,
            h.island.session,
            h.router,
            if h.is_open() { "open" } else { "private" }
        ));
    }
}

pub async fn run_postcard(args: PostcardArgs) -> Result<u8> {
    match (args.command, args.discover) {
        (Some(PostcardCommand::Show { postcard, json }), _) => {
            let card = parse_postcard(&postcard)?;
            show_postcard(&card, json);
            Ok(0)
        }
        (Some(PostcardCommand::Observer { postcard }), _) => {
            let card = parse_postcard(&postcard)?;
            let observer = card
                .observer()
                .context("every postcard derives its island's observer postcard")?;
            let _ = print_line(&format!("{observer}"));
            Ok(0)
        }
        (Some(PostcardCommand::Participant { island }), _) => {
            let participant = admin_postcard(&island)?
                .participant()
                .context("an admin capability derives the participant's")?;
            let _ = print_line(&participant.to_string());
            Ok(0)
        }
        (Some(PostcardCommand::Admin { island }), _) => {
            let _ = print_line(&format!("{}", admin_postcard(&island)?));
            Ok(0)
        }
        (None, Some(name)) => {
            let heard = discover_one(&args.lan, Some(&name)).await?;
            let card = heard_postcard(&heard, "only its owner can hand out its postcard")?;
            let _ = print_line(&format!("{card}"));
            Ok(0)
        }
        (None, None) => Err(crate::usage(
            "say what to do with postcards: `isthmus postcard show|observer|participant|admin ...` or `isthmus postcard --discover NAME` (see --help)".into(),
        )),
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
            "role": auth::role_name(card.role()),
        });
        print_line(&v.to_string());
    } else {
        let lines = [
            format!("island:      {}", c.name),
            format!("role:        {}", role_words(card.role())),
            format!("session:     {}", c.session),
            format!("internal:    {}", list(&c.internal).join(", ")),
            format!(
                "external:    {}",
                c.external.map_or_else(
                    || "none (the router had no Internet address; LAN only)".to_string(),
                    |e| e.to_string()
                )
            ),
            format!(
                "router:      {}",
                c.router
                    .map_or_else(|| "not named".to_string(), |r| r.to_string())
            ),
            format!(
                "destination: {}",
                c.destination.map_or_else(
                    || "none (joiners arrive where the island starts them)".to_string(),
                    |d| d.to_string()
                )
            ),
        ];
        for l in lines {
            if !print_line(&l) {
                return;
            }
        }
    }
}

fn role_words(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin (join, send, and close the island, remove replicas, set its tick)",
        Role::Replica => "participant (join and send)",
        Role::Observer => "observer (watch only)",
    }
}

async fn resolve(router: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(router)
        .await
        .map_err(|_| crate::usage(format!("--router {router:?} is not ADDR:PORT or HOST:PORT")))?
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
    // Ctrl-C and SIGTERM leave the island the same way (summary, then goodbye); caught from
    // the start, so one that comes while connecting is not lost.
    let mut signals = crate::Signals::install()?;
    let creating = create.is_some();
    let name = args.name.clone().unwrap_or_else(default_name);
    let observer = card.role() == Role::Observer;
    let mut replica = ReplicaConfig::from_postcard(&card, name.clone());
    replica.create = create;
    replica.stop_after = args.exit_after_seq.map(Seq);
    let me = replica.replica();
    let first_router = card.contact.internal.first().copied();
    let mut cfg = ClientConfig::new(card.contact.addresses(), replica);
    cfg.give_up_after = Duration::from_secs(args.give_up_after);
    // Queued before the first connection: they go out on the welcome, and a replica told to
    // exit after some seq does not exit before they are stamped.
    cfg.initial_sends = args
        .send
        .iter()
        .map(|text| ChatIsland::payload(&name, text))
        .collect();
    let connected = tokio::select! {
        r = client::connect(cfg, ChatIsland::default()) => r,
        // Ctrl-C while still connecting: nothing joined, nothing to leave.
        _ = signals.recv() => return Ok(0),
    };
    let (handle, mut events) = connected.map_err(|e: ClientError| match e {
        // The island is gone (or was never there): the same exit as losing it later.
        ClientError::Refused { code, .. }
            if [Code::UNKNOWN_SESSION, Code::CLOSED, Code::SESSION_RESET].contains(&code) =>
        {
            anyhow::Error::new(ExitCode(EXIT_SESSION_LOST, e.to_string()))
        }
        e => anyhow!("{e}"),
    })?;
    // On a terminal the chat is a terminal UI, entered once the welcome is handled (so a
    // creator's postcard is printed on the normal screen first, where it can be copied);
    // pipes keep the line mode, where each line read is sent.
    let mut want_tui =
        !args.json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut face = if args.json { Face::Json } else { Face::Lines };
    let mut stdin = (!want_tui && !args.json && !observer)
        .then(|| tokio::io::BufReader::new(tokio::io::stdin()).lines());
    let mut keys = None;
    if observer {
        face.note("watching as an observer: this postcard does not let you send");
    }
    let mut printed_upto = 0u64;
    let mut postcard_printed = false;
    // Who is attached, as presence events tell (bounded like the replica's own list).
    let mut present: std::collections::BTreeMap<ReplicaId, (String, Role)> =
        std::collections::BTreeMap::new();
    let mut signal = std::pin::pin!(signals.recv());
    let mut reader_gone = std::pin::pin!(stdout_reader_gone());
    let outcome: Result<Flow> = loop {
        let flow = tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    break Err(anyhow!("the replica stopped unexpectedly"));
                };
                match event {
                    Event::Welcomed { contacts, .. } => {
                        if creating && !postcard_printed {
                            postcard_printed = true;
                            // The router knows its own contact points better than the address
                            // we happened to use: both go into the postcard.
                            if !contacts.internal.is_empty() {
                                let mut internal = contacts.internal;
                                // The address this creator reached goes first: a postcard
                                // keeps only the first few.
                                if let Some(pos) = first_router.and_then(|f| internal.iter().position(|a| *a == f)) {
                                    let reached = internal.remove(pos);
                                    internal.insert(0, reached);
                                }
                                card.contact.internal = internal;
                            }
                            card.contact.external = contacts.external;
                            card.contact.router = Some(contacts.router);
                            match announce_created(&card, &mut face) {
                                Ok(flow) => flow,
                                Err(e) => break Err(e),
                            }
                        } else {
                            face.connected(&card.contact.name, !postcard_printed);
                            postcard_printed = true;
                            Flow::Go
                        }
                    }
                    Event::Restored { at } => {
                        let lines = handle
                            .inspect(move |chat: &ChatIsland, _| {
                                chat.lines().filter(|l| l.seq <= at.0).cloned().collect::<Vec<_>>()
                            })
                            .await?;
                        face.clear_chat();
                        let mut flow = Flow::Go;
                        for l in lines {
                            flow = flow.and(face.line(l.seq, l.time_us, l.from, &l.name, &l.text));
                        }
                        printed_upto = at.0;
                        flow
                    }
                    Event::StartedFresh => {
                        printed_upto = 0;
                        face.clear_chat();
                        Flow::Go
                    }
                    Event::Message(m) => {
                        let flow = if m.seq.0 > printed_upto { face.message(&m) } else { Flow::Go };
                        printed_upto = printed_upto.max(m.seq.0);
                        // The window shows the digest; ask for it only when there is a window.
                        let digest = if matches!(face, Face::Tui(_)) {
                            handle.inspect(|chat: &ChatIsland, _| chat.digest_hex()).await.ok()
                        } else {
                            None
                        };
                        face.status(|s| {
                            s.seq = m.seq.0;
                            s.time_us = m.time.0;
                            if let Some(d) = digest {
                                s.digest = d;
                            }
                        });
                        flow
                    }
                    Event::Tick(time) => {
                        face.status(|s| s.time_us = time.0);
                        Flow::Go
                    }
                    Event::Synced { seq } => {
                        let digest = handle.inspect(|chat: &ChatIsland, _| chat.digest_hex()).await.unwrap_or_default();
                        face.status(|s| {
                            s.seq = seq.0;
                            s.digest = digest;
                        });
                        Flow::Go
                    }
                    Event::Presence { whole, joined, left } => {
                        if whole {
                            present.clear();
                        }
                        for (r, name, role) in joined {
                            if present.len() < isthmus_island_client::replica::MAX_PRESENT || present.contains_key(&r) {
                                present.insert(r, (name, role));
                            }
                        }
                        for r in left {
                            present.remove(&r);
                        }
                        face.members(&present, me);
                        Flow::Go
                    }
                    Event::Undecryptable { seq, origin } => {
                        let from = match origin {
                            Origin::Replica(r) => r.to_string(),
                            Origin::Router => "the router".to_string(),
                        };
                        face.note(&format!("warning: message {seq} from {from} does not open with this island's key (sealed under another key, or changed on the way); skipped"));
                        Flow::Go
                    }
                    Event::SendDropped { len, max, .. } => {
                        face.note(&format!("not sent: a message of {len} bytes is over this router's limit of {max}"));
                        Flow::Go
                    }
                    Event::Replayed { seq, origin } => {
                        let from = match origin {
                            Origin::Replica(r) => r.to_string(),
                            Origin::Router => "the router".to_string(),
                        };
                        face.note(&format!("warning: message {seq} repeats an earlier message of {from} (the router stamped it again); skipped"));
                        Flow::Go
                    }
                    Event::Divergence(d) => {
                        face.note(&format!("warning: replicas diverged at seq {}: {} different states", d.seq, d.groups.len()));
                        Flow::Go
                    }
                    Event::Disconnected { reason } => {
                        face.note(&format!("disconnected: {reason}"));
                        face.status(|s| s.connection = "disconnected".into());
                        Flow::Go
                    }
                    Event::Reconnecting { attempt, delay, routers } => {
                        let to = routers.first().map_or_else(String::new, |a| a.to_string());
                        let mut line = format!("reconnecting to {to} in {:.1} s (attempt {attempt})", delay.as_secs_f64());
                        // A cluster's other routers are raced too; naming them keeps the line
                        // honest when the first one is the router that died.
                        if routers.len() > 1 {
                            let others: Vec<String> = routers[1..].iter().map(|a| a.to_string()).collect();
                            line.push_str(&format!(", or {}", others.join(", ")));
                        }
                        face.status(|s| s.connection = line.clone());
                        face.note(&line);
                        Flow::Go
                    }
                    Event::Reconnected => {
                        face.note("reconnected");
                        Flow::Go
                    }
                    Event::GaveUp { after, last_error } => {
                        break Err(anyhow!(
                            "gave up after {} s without the router (wait longer with --give-up-after); the last attempt said: {last_error}",
                            after.as_secs()
                        ));
                    }
                    Event::SessionLost { reason } => {
                        break Err(anyhow::Error::new(ExitCode(
                            EXIT_SESSION_LOST,
                            format!("the island's session is lost: {reason}"),
                        )));
                    }
                    Event::Stopped { seq, digest } => Flow::Done(seq.0, hex_string(&digest)),
                }
            }
            line = next_line(&mut stdin) => match line {
                Some(text) => {
                    if !text.trim().is_empty() {
                        send_line(&handle, &name, &text, &mut face).await?;
                    }
                    Flow::Go
                }
                None => {
                    stdin = None;
                    Flow::Go
                }
            },
            key = next_key(&mut keys) => match key {
                Some(key) => match face.key(&key) {
                    Some(crate::tui::Action::Send(text)) => {
                        if observer {
                            face.note("observers cannot send: this postcard only lets you watch");
                        } else {
                            send_line(&handle, &name, &text, &mut face).await?;
                        }
                        Flow::Go
                    }
                    Some(crate::tui::Action::Quit) => Flow::Leave,
                    None => Flow::Go,
                },
                None => {
                    keys = None;
                    Flow::Go
                }
            },
            _ = &mut signal => Flow::Leave,
            _ = &mut reader_gone => Flow::OutputClosed,
        };
        match flow {
            Flow::Go => {}
            done => break Ok(done),
        }
        if want_tui && postcard_printed {
            want_tui = false;
            let mut tui = Face::tui(&card.contact.name)?;
            // The same banner for the creator and for every joiner.
            if creating {
                tui.note(&format!(
                    "created island {:?}; its postcard is on the terminal behind this window (there again when you leave), and `isthmus postcard participant {}` prints it from another terminal",
                    card.contact.name,
                    card.contact.session
                ));
            } else {
                tui.note(&format!("joined island {:?}", card.contact.name));
            }
            tui.note("type a line and press Enter to send it; Ctrl-C, or Ctrl-D on an empty line, leaves");
            if let (Face::Tui(t), Face::Lines) = (&mut tui, &face) {
                t.1.status.connection = format!("connected to {}", card.contact.name);
            }
            face = tui;
            keys = Some(crate::tui::events());
        }
        face.draw();
    };
    // Give the terminal back before anything more is printed.
    face.leave_screen();
    let flow = outcome?;
    let output_closed = matches!(flow, Flow::OutputClosed);
    let (seq, digest) = match flow {
        Flow::Done(seq, digest) => (seq, digest),
        _ => handle
            .inspect(|chat: &ChatIsland, seq| (seq.0, chat.digest_hex()))
            .await
            .unwrap_or((0, String::new())),
    };
    // Output closed early (e.g. piped to `head`): leave quietly, nobody reads a summary.
    if !output_closed {
        let _ = face.summary(seq, &digest);
    }
    leave(handle).await;
    Ok(0)
}

/// Prints the participant postcard (the first line of stdout, always) and keeps the admin one.
fn announce_created(card: &Postcard, face: &mut Face) -> Result<Flow> {
    let admin = Postcard::new(card.contact.clone(), card.capability, card.keys)
        .map_err(|e| anyhow!("{e}"))?;
    let participant = admin
        .participant()
        .context("an admin capability derives the participant's")?;
    // The first line of stdout in every mode; the terminal UI starts after it, so it stays on
    // the normal screen to copy.
    let flow = Face::out(&participant.to_string());
    match keep_admin_postcard(&admin) {
        Ok(path) => face.note(&format!(
            "the admin postcard of {:?} is kept in {} (`isthmus postcard admin {}` prints it; `isthmus island close|kick|tick` use it)",
            admin.contact.name,
            path.display(),
            admin.session()
        )),
        Err(e) => face.note(&format!(
            "warning: the admin postcard could not be kept ({e:#}); nobody will be able to close this island or remove replicas"
        )),
    }
    face.note(&format!(
        "island {:?} created; paste its postcard to invite someone",
        admin.contact.name
    ));
    Ok(flow)
}

/// Resolves when stdout is a pipe whose reader has gone (`| head -1` after its line): a quiet
/// island would otherwise never write again, and the replica would never notice. Never
/// resolves for a terminal or a file.
async fn stdout_reader_gone() {
    let is_pipe = rustix::fs::fstat(rustix::stdio::stdout()).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo
    });
    if !is_pipe {
        return std::future::pending().await;
    }
    let gone = tokio::task::spawn_blocking(|| {
        use rustix::event::{poll, PollFd, PollFlags};
        let stdout = rustix::stdio::stdout();
        loop {
            // No events asked for: a pipe's write end still reports POLLERR once no reader is
            // left (and POLLHUP on some systems).
            let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
            match poll(&mut fds, None) {
                Ok(_) => {
                    let got = fds[0].revents();
                    if got.intersects(PollFlags::ERR | PollFlags::HUP) {
                        return true;
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(gone, Ok(true)) {
        std::future::pending::<()>().await;
    }
}

/// Sends one typed or piped line. A line the router would refuse as too long is reported and
/// skipped, not fatal: the lines after it still go.
async fn send_line(
    handle: &ClientHandle<ChatIsland>,
    name: &str,
    text: &str,
    face: &mut Face,
) -> Result<()> {
    match handle.send(ChatIsland::payload(name, text)).await {
        Ok(_) => Ok(()),
        Err(ClientError::PayloadTooLarge { max, .. }) => {
            face.note(&format!(
                "not sent: a line of {} bytes is too long (with your name, a message may be at most {max} bytes)",
                text.len()
            ));
            Ok(())
        }
        Err(e) => Err(anyhow!("{e}")),
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

async fn next_key(
    keys: &mut Option<crossterm::event::EventStream>,
) -> Option<crossterm::event::Event> {
    use futures_util::StreamExt;
    match keys {
        Some(k) => k.next().await.and_then(Result::ok),
        None => std::future::pending().await,
    }
}

/// What the loop does next.
enum Flow {
    /// Carry on.
    Go,
    /// The user asked to leave (Ctrl-C, Ctrl-D, SIGTERM).
    Leave,
    /// The stop seq was applied: (seq, digest).
    Done(u64, String),
    /// Whoever read stdout went away.
    OutputClosed,
}

impl Flow {
    /// Keeps the first reason to stop.
    fn and(self, next: Flow) -> Flow {
        match self {
            Flow::Go => next,
            done => done,
        }
    }
}

/// Where the chat shows itself: JSON lines, plain lines, or the terminal UI.
enum Face {
    Json,
    Lines,
    Tui(Box<(crate::tui::Screen, crate::tui::ChatView)>),
}

impl Face {
    fn tui(island: &str) -> Result<Face> {
        let screen = crate::tui::Screen::enter().context("cannot take over the terminal")?;
        Ok(Face::Tui(Box::new((
            screen,
            crate::tui::ChatView::new(island),
        ))))
    }

    /// Writes one line to stdout; a closed stdout ends the replica quietly, never a panic.
    fn out(text: &str) -> Flow {
        if print_line(text) {
            Flow::Go
        } else {
            Flow::OutputClosed
        }
    }

    fn note(&mut self, text: &str) {
        let text = shown(text);
        match self {
            Face::Tui(t) => t.1.push_note(text),
            _ => eprint_line(&text),
        }
    }

    /// A welcome: the first one says where we are, later ones that we are back.
    fn connected(&mut self, island: &str, first: bool) {
        if first {
            self.note(&format!("joined island {island:?}"));
        }
        self.status(|s| s.connection = "connected".into());
    }

    fn status(&mut self, f: impl FnOnce(&mut crate::tui::Status)) {
        if let Face::Tui(t) = self {
            f(&mut t.1.status);
        }
    }

    fn members(
        &mut self,
        members: &std::collections::BTreeMap<ReplicaId, (String, Role)>,
        me: ReplicaId,
    ) {
        if let Face::Tui(t) = self {
            let mut list: Vec<String> = members
                .iter()
                .map(|(r, (n, role))| {
                    let mut s = shown(n);
                    if *r == me {
                        s.push_str(" (you)");
                    }
                    if *role == Role::Observer {
                        s.push_str(" (watching)");
                    }
                    s
                })
                .collect();
            list.sort();
            t.1.set_members(list);
        }
    }

    fn clear_chat(&mut self) {
        if let Face::Tui(t) = self {
            t.1.clear_chat();
        }
    }

    fn message(&mut self, m: &Message) -> Flow {
        let from = match m.origin {
            Origin::Replica(r) => r,
            Origin::Router => return self.router_event(m),
        };
        let (name, text) = ChatIsland::parse(&m.payload);
        self.line(m.seq.0, m.time.0, Some(from), &name, &text)
    }

    /// A message the router made itself: never shown as a chat line (the router could write
    /// anything there), only as the membership event it must be.
    fn router_event(&mut self, m: &Message) -> Flow {
        use isthmus_router::wire::RouterEvent;
        let event = isthmus_router::session::parse_router_event(&m.payload).ok();
        let (kind, replica, name) = match &event {
            Some(RouterEvent::Joined { replica, name }) => ("joined", *replica, name.as_str()),
            Some(RouterEvent::Left { replica }) => ("left", *replica, ""),
            None => {
                self.note(&format!(
                    "warning: the router put message {} in the order that is not a membership event; ignored",
                    m.seq.0
                ));
                return Flow::Go;
            }
        };
        match self {
            Face::Json => {
                let line = serde_json::json!({
                    "seq": m.seq.0,
                    "time_us": m.time.0,
                    "from": null,
                    "event": kind,
                    "replica": replica.to_string(),
                    "name": name,
                });
                Self::out(&line.to_string())
            }
            _ => {
                self.note(&format!("[{}] {} {kind}", m.seq.0, shown(name)));
                Flow::Go
            }
        }
    }

    fn line(
        &mut self,
        seq: u64,
        time_us: u64,
        from: Option<ReplicaId>,
        name: &str,
        text: &str,
    ) -> Flow {
        match self {
            Face::Json => {
                // Written by hand to keep the documented key order.
                let from = from.map_or("null".to_string(), |r| format!("\"{r}\""));
                let name = serde_json::Value::from(name);
                let text = serde_json::Value::from(text);
                Self::out(&format!(
                    "{{\"seq\":{seq},\"time_us\":{time_us},\"from\":{from},\"name\":{name},\"text\":{text}}}"
                ))
            }
            Face::Lines => Self::out(&format!("[{seq}] {}: {}", shown(name), shown(text))),
            Face::Tui(t) => {
                t.1.push_chat(seq, &shown(name), &shown(text));
                Flow::Go
            }
        }
    }

    fn key(&mut self, event: &crossterm::event::Event) -> Option<crate::tui::Action> {
        match self {
            Face::Tui(t) => t.1.handle_event(event),
            _ => None,
        }
    }

    fn draw(&mut self) {
        if let Face::Tui(t) = self {
            let (screen, view) = &mut **t;
            // A terminal that cannot be drawn on is not worth stopping the replica for.
            let _ = screen.draw(view);
        }
    }

    /// Restores the terminal (the UI's notes were on screen only) and carries on in line mode.
    fn leave_screen(&mut self) {
        if matches!(self, Face::Tui(_)) {
            *self = Face::Lines;
        }
    }

    fn summary(&self, last_seq: u64, digest: &str) -> Flow {
        match self {
            Face::Json => Self::out(&format!(
                "{{\"last_seq\":{last_seq},\"digest\":\"{digest}\"}}"
            )),
            _ => {
                eprint_line(&format!("left at seq {last_seq}, digest {digest}"));
                Flow::Go
            }
        }
    }
}

/// Text from the network made safe for a terminal: control characters (escape sequences could
/// rewrite the screen, or forge lines) are shown as `\u{..}` escapes. JSON output escapes on its own.
fn shown(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
