//! The `isthmus` command: runs a router, creates and joins islands.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use isthmus_dispatcher::portmap::{Fallback, MapConfig, Protocol};
use isthmus_dispatcher::status::StatusAccess;
use isthmus_dispatcher::{
    BeaconConfig, CreatePolicy, Dispatcher, DispatcherConfig, Forwarding, DEFAULT_PORT,
};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod island;
mod prefs_cmd;
mod status;
mod tui;

#[derive(Parser)]
#[command(
    name = "isthmus",
    version,
    about = "A message router for replicated islands",
    after_help = "Exit codes: 0 done; 1 error (unreachable or busy router, refused credentials, ...); \
2 unreadable or damaged postcard (or an ISLAND that is neither an admin postcard nor a kept \
island); 3 island session lost (kicked, closed, the router shut down or forgot it); \
64 usage error (a bad flag or argument); 130 a second Ctrl-C while a router shuts down."
)]
struct Cli {
    /// The prefs file (default: $ISTHMUS_PREFS, else the platform config dir).
    #[arg(long, global = true, value_name = "PATH")]
    prefs: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a router (dispatcher) in the foreground.
    Router(RouterArgs),
    /// Create islands, and close them, remove replicas or set their tick as their admin.
    #[command(subcommand)]
    Island(island::IslandCommand),
    /// Join an island as a replica of its chat.
    Join(island::JoinArgs),
    /// List the islands announced on the LAN.
    Discover(island::DiscoverArgs),
    /// Read a postcard, derive its observer postcard, print a kept admin postcard, or make one for
    /// an island heard on the LAN.
    Postcard(island::PostcardArgs),
    /// Saved router profiles.
    #[command(subcommand)]
    Prefs(prefs_cmd::PrefsCommand),
    /// Show what a running router is doing: islands, members, forwarding, recent refusals.
    Status(status::StatusArgs),
}

#[derive(Args, Default)]
pub(crate) struct RouterArgs {
    /// Start from this saved profile (default: the prefs file's default, else "lan").
    #[arg(long, value_name = "NAME")]
    pub(crate) profile: Option<String>,
    /// TCP port to listen on (default 7470; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on: an IP, or IP:PORT (then --port is ignored). Default 0.0.0.0.
    #[arg(long)]
    listen: Option<String>,
    /// Idle milliseconds before a tick, for sessions that do not ask for their own (default 50).
    #[arg(long)]
    tick_ms: Option<u64>,
    /// How remote users reach this router: lan-only (no external address), manual (a port
    /// forwarded by hand; say where with --external), auto (ask the home router by PCP, then
    /// NAT-PMP, then UPnP), pcp, natpmp or upnp (ask with that protocol only). Default: the
    /// profile's, else lan-only.
    #[arg(long, value_enum)]
    forwarding: Option<ForwardingArg>,
    /// The external IP:PORT forwarded by hand to this router (implies --forwarding manual).
    #[arg(long, value_name = "IP:PORT")]
    external: Option<SocketAddr>,
    /// Do not announce islands on the LAN (IPv4 broadcast and IPv6 multicast).
    #[arg(long)]
    no_beacon: bool,
    /// UDP port the LAN beacon announces to (default 7471).
    #[arg(long)]
    beacon_port: Option<u16>,
    /// Milliseconds between LAN announcements (default 2000).
    #[arg(long)]
    beacon_interval_ms: Option<u64>,
    /// Milliseconds an empty session is kept before it is dropped (default 10000).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Who may create islands: lan = peers on loopback or this machine's own subnets, any =
    /// anyone who reaches the router, none = nobody (default lan).
    #[arg(long, value_enum)]
    create: Option<CreateArg>,
    /// Who may see the status page (/), its JSON and /metrics on the router's port: lan =
    /// loopback and this machine's own subnets, any = anyone who reaches the router, none =
    /// nobody (default lan).
    #[arg(long, value_enum, value_name = "WHO")]
    status_from: Option<CreateArg>,
    /// Sessions alive at once; past it creating is refused as busy (default 10000).
    #[arg(long, value_name = "N")]
    max_sessions: Option<u64>,
    /// Connections open at once from one address, an IPv6 /64 counting as one (default 256).
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<u64>,
    /// Connections from one address still in their handshake (default 16).
    #[arg(long, value_name = "N")]
    max_handshakes_per_ip: Option<u64>,
    /// MiB for every session's history and snapshots together; past 90% no new sessions are
    /// created (default 2048).
    #[arg(long, value_name = "MIB")]
    memory_budget_mb: Option<u64>,
    /// The shortest tick interval a creator or admin may ask for, in ms (default 10).
    #[arg(long, value_name = "MS")]
    min_tick_ms: Option<u64>,
    /// Do not serve Croquet / Multisynq clients (their reflector, /files and --web) on the port.
    #[arg(long)]
    no_croquet: bool,
    /// Serve this directory's static files (a Croquet app) from the router's port: a browser
    /// opens http://ROUTER:PORT/ and the app joins through this router.
    #[arg(long, value_name = "DIR")]
    web: Option<std::path::PathBuf>,
    /// Where Croquet snapshots and persistent data are kept (default: the platform data
    /// directory's isthmus/croquet), and the islands this router is home for, so their
    /// replicas re-create them after a crash (default: $ISTHMUS_DATA_DIR, else the platform
    /// data directory's isthmus).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Join a router cluster through etcd: etcd://HOST:PORT[,HOST:PORT...] (default: the
    /// profile's cluster.etcd, else run alone). Islands get one home router each, chosen by load;
    /// a replica that knocks on another router is redirected there.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// The cluster's name: routers with the same etcd and name form one cluster (default: the
    /// profile's cluster.name, else "default").
    #[arg(long, value_name = "NAME")]
    cluster_name: Option<String>,
}

// The defaults the help text above states.
const _: () = assert!(isthmus_dispatcher::DEFAULT_MAX_SESSIONS == 10_000);
const _: () = assert!(isthmus_dispatcher::DEFAULT_MAX_CONNECTIONS_PER_IP == 256);
const _: () = assert!(isthmus_dispatcher::DEFAULT_MAX_HANDSHAKES_PER_IP == 16);
const _: () = assert!(isthmus_dispatcher::DEFAULT_MEMORY_BUDGET_BYTES == 2048 * 1024 * 1024);
const _: () = assert!(isthmus_router::session::DEFAULT_MIN_TICK_INTERVAL.as_millis() == 10);
// The frame-size range of the prefs is the wire's.
const _: () =
    assert!(isthmus_prefs::MIN_FRAME_BYTES == isthmus_router::wire::MAX_HELLO_BYTES as u64);
const _: () =
    assert!(isthmus_prefs::MAX_FRAME_BYTES == isthmus_router::wire::HARD_MAX_FRAME_BYTES as u64);

#[derive(Clone, Copy, clap::ValueEnum)]
enum CreateArg {
    Lan,
    Any,
    None,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ForwardingArg {
    LanOnly,
    Manual,
    Auto,
    Pcp,
    Natpmp,
    Upnp,
}

/// Exit code of a usage error (a bad flag or argument), apart from 2, a damaged postcard.
pub(crate) const EXIT_USAGE: u8 = 64;

/// A bad flag or argument found after parsing (a range, a contradiction): exit 64, like the
/// parser's own usage errors.
pub(crate) fn usage(message: String) -> anyhow::Error {
    anyhow::Error::new(island::ExitCode(EXIT_USAGE, message))
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    std::process::ExitCode::SUCCESS
                }
                _ => std::process::ExitCode::from(EXIT_USAGE),
            };
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprint_line(&format!("error: cannot start the async runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Router(args) => run_router(args, cli.prefs.as_deref()).await.map(|_| 0u8),
            Command::Prefs(cmd) => prefs_cmd::run(cmd, cli.prefs.as_deref()),
            Command::Island(cmd) => island::run_island(cmd).await,
            Command::Join(args) => island::run_join(args).await,
            Command::Discover(args) => island::run_discover(args).await,
            Command::Postcard(args) => island::run_postcard(args).await,
            Command::Status(args) => status::run(args).await,
        }
    });
    // A replica may leave a blocking stdin read behind: do not wait for it to see a line.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprint_line(&format!("error: {}", describe(&e)));
            let code = e.downcast_ref::<island::ExitCode>().map_or(1, |c| c.0);
            std::process::ExitCode::from(code)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        // A failed log write would otherwise be reported with eprintln!, which panics when
        // stderr is closed (e.g. `2>&1 | head`).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// stderr that swallows write errors: a closed stderr must never stop or hang the router.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Writes a line to stdout; false once stdout is closed (e.g. piped to `head`). println!
/// would panic there; every command ends quietly instead.
pub(crate) fn print_line(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|_| out.flush()).is_ok()
}

/// Writes a line to stderr, ignoring a closed stderr.
pub(crate) fn eprint_line(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// An error and its causes, each cause only if the words before do not already say it (some
/// errors quote their source in their own message).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

fn listen_addr(listen: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip: IpAddr = listen.parse().with_context(|| {
        format!("--listen {listen:?} is not an IP address or IP:PORT (try 0.0.0.0 or 127.0.0.1)")
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// The settings a router started with profile `name` (and no flags) would run with, one per
/// line, for `prefs show`.
pub(crate) fn effective_settings(
    name: &str,
    prefs_path: Option<&std::path::Path>,
) -> Result<Vec<String>> {
    let args = RouterArgs {
        profile: Some(name.to_string()),
        ..RouterArgs::default()
    };
    let cfg = router_config(&args, prefs_path)?;
    let s = &cfg.driver.session;
    let forwarding = match &cfg.forwarding {
        Forwarding::LanOnly => "lan-only".to_string(),
        Forwarding::Manual { external } => format!("manual, external {external}"),
        Forwarding::Gateway(u) => format!(
            "{}, lease {} s, fallback {}",
            match u.protocols.as_slice() {
                [Protocol::Upnp] => "upnp",
                [Protocol::Pcp] => "pcp",
                [Protocol::NatPmp] => "natpmp",
                _ => "auto",
            },
            u.lease.as_secs(),
            match u.fallback {
                Fallback::Fail => "fail",
                _ => "lan-only",
            }
        ),
        _ => "other".to_string(),
    };
    let beacon = match &cfg.beacon {
        Some(b) => format!("on, UDP {} every {} ms", b.port, b.interval.as_millis()),
        None => "off".to_string(),
    };
    let create = match cfg.create {
        CreatePolicy::Lan => "lan",
        CreatePolicy::Any => "any",
        CreatePolicy::None => "none",
        _ => "other",
    };
    let ms = |d: Duration| d.as_millis();
    let cluster = cfg.cluster.as_ref().map(|c| {
        format!(
            "cluster = etcd://{}, name {}",
            c.etcd.endpoints.join(","),
            c.etcd.name
        )
    });
    let mut lines = vec![
        format!("listen = {}", cfg.listen),
        format!("forwarding = {forwarding}"),
        format!("beacon = {beacon}"),
        format!("create = {create}"),
        format!("status_from = {}", cfg.status_from),
        format!("tick_ms = {}", ms(s.tick_interval)),
        format!("linger_ms = {}", ms(s.linger)),
        format!("limits.max_connections = {}", cfg.max_connections),
        format!(
            "limits.max_connections_per_ip = {}",
            cfg.max_connections_per_ip
        ),
        format!(
            "limits.max_handshakes_per_ip = {}",
            cfg.max_handshakes_per_ip
        ),
        format!("limits.max_sessions = {}", cfg.max_sessions),
        format!(
            "limits.memory_budget_mb = {}",
            cfg.memory_budget_bytes / (1024 * 1024)
        ),
        format!("limits.min_tick_ms = {}", ms(s.min_tick_interval)),
        format!("limits.max_frame_bytes = {}", cfg.driver.max_frame_bytes),
        format!("limits.max_payload_bytes = {}", s.max_payload_bytes),
        format!("limits.max_outbound_bytes = {}", s.max_outbound_bytes),
        format!("limits.max_history_messages = {}", s.max_history_messages),
        format!("limits.max_history_bytes = {}", s.max_history_bytes),
        format!("limits.max_snapshot_bytes = {}", s.max_snapshot_bytes),
        format!(
            "limits.handshake_timeout_ms = {}",
            ms(cfg.handshake_timeout)
        ),
        format!("limits.idle_timeout_ms = {}", ms(s.idle_timeout)),
        match &cfg.croquet {
            None => "croquet = off".to_string(),
            Some(c) => format!(
                "croquet = on, data dir {}, web {}, {}",
                c.store
                    .as_ref()
                    .map_or("none".to_string(), |st| st.dir.display().to_string()),
                c.web
                    .as_ref()
                    .map_or("none".to_string(), |w| w.display().to_string()),
                if c.api_keys.is_empty() {
                    format!("joins by the create policy ({create})")
                } else {
                    format!("{} apiKeys", c.api_keys.len())
                }
            ),
        },
    ];
    // Only a clustered profile gets the line: a lone router's settings read as before.
    lines.extend(cluster);
    Ok(lines)
}

/// Turns a profile plus the flags that override it into the dispatcher's configuration.
fn router_config(
    args: &RouterArgs,
    prefs_path: Option<&std::path::Path>,
) -> Result<DispatcherConfig> {
    let path = isthmus_prefs::resolve_path(prefs_path)?;
    let prefs = isthmus_prefs::Prefs::load(&path)?;
    let name = args.profile.as_deref().unwrap_or(prefs.default_name());
    let p = prefs.profile(name)?;
    let mut cfg = DispatcherConfig::default();
    let port = args.port.or(p.port).unwrap_or(DEFAULT_PORT);
    cfg.listen = match &args.listen {
        Some(l) => listen_addr(l, port)?,
        None => SocketAddr::new(p.listen.unwrap_or(cfg.listen.ip()), port),
    };
    // A flag obeys the same range as the profile key it overrides.
    let flag = |name: &str, key: &str, v: Option<u64>| -> Result<Option<u64>> {
        if let Some(n) = v {
            isthmus_prefs::check_number(key, n).map_err(|m| usage(format!("--{name} {m}")))?;
        }
        Ok(v)
    };
    let l = &p.limits;
    let tick_ms = flag("tick-ms", "tick_ms", args.tick_ms)?
        .or(p.tick_ms)
        .unwrap_or(50);
    let linger_ms = flag("linger-ms", "linger_ms", args.linger_ms)?
        .or(p.linger_ms)
        .unwrap_or(10_000);
    let s = &mut cfg.driver.session;
    s.tick_interval = Duration::from_millis(tick_ms);
    s.linger = Duration::from_millis(linger_ms);
    if let Some(ms) = flag("min-tick-ms", "limits.min_tick_ms", args.min_tick_ms)?.or(l.min_tick_ms)
    {
        s.min_tick_interval = Duration::from_millis(ms);
    }
    if s.tick_interval < s.min_tick_interval {
        anyhow::bail!(
            "the tick interval ({tick_ms} ms) is below the tick floor ({} ms): raise --tick-ms (tick_ms) or lower --min-tick-ms (limits.min_tick_ms)",
            s.min_tick_interval.as_millis()
        );
    }
    let size = |v: Option<u64>, d: usize| v.map_or(d, |v| usize::try_from(v).unwrap_or(usize::MAX));
    s.max_payload_bytes = size(l.max_payload_bytes, s.max_payload_bytes);
    s.max_outbound_bytes = size(l.max_outbound_bytes, s.max_outbound_bytes);
    s.max_history_messages = size(l.max_history_messages, s.max_history_messages);
    s.max_history_bytes = size(l.max_history_bytes, s.max_history_bytes);
    s.max_snapshot_bytes = size(l.max_snapshot_bytes, s.max_snapshot_bytes);
    if let Some(ms) = l.idle_timeout_ms {
        s.idle_timeout = Duration::from_millis(ms);
    }
    cfg.driver.max_frame_bytes = size(l.max_frame_bytes, cfg.driver.max_frame_bytes);
    cfg.max_connections = size(l.max_connections, cfg.max_connections);
    if let Some(ms) = l.handshake_timeout_ms {
        cfg.handshake_timeout = Duration::from_millis(ms);
    }
    if cfg.driver.session.max_outbound_bytes < 2 * cfg.driver.max_frame_bytes {
        anyhow::bail!(
            "limits.max_outbound_bytes must be at least twice limits.max_frame_bytes, or one large frame would count as a slow consumer"
        );
    }
    cfg.max_sessions = size(
        flag("max-sessions", "limits.max_sessions", args.max_sessions)?.or(l.max_sessions),
        cfg.max_sessions,
    );
    cfg.max_connections_per_ip = size(
        flag(
            "max-connections-per-ip",
            "limits.max_connections_per_ip",
            args.max_connections_per_ip,
        )?
        .or(l.max_connections_per_ip),
        cfg.max_connections_per_ip,
    );
    cfg.max_handshakes_per_ip = size(
        flag(
            "max-handshakes-per-ip",
            "limits.max_handshakes_per_ip",
            args.max_handshakes_per_ip,
        )?
        .or(l.max_handshakes_per_ip),
        cfg.max_handshakes_per_ip,
    );
    if let Some(mb) = flag(
        "memory-budget-mb",
        "limits.memory_budget_mb",
        args.memory_budget_mb,
    )?
    .or(l.memory_budget_mb)
    {
        cfg.memory_budget_bytes =
            usize::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
    }
    cfg.create = match args.create {
        Some(CreateArg::Lan) => CreatePolicy::Lan,
        Some(CreateArg::Any) => CreatePolicy::Any,
        Some(CreateArg::None) => CreatePolicy::None,
        None => match p.create {
            Some(isthmus_prefs::CreateMode::Any) => CreatePolicy::Any,
            Some(isthmus_prefs::CreateMode::None) => CreatePolicy::None,
            Some(isthmus_prefs::CreateMode::Lan) | None => CreatePolicy::Lan,
        },
    };
    cfg.status_from = match args.status_from.or(p.status_from.map(|m| match m {
        isthmus_prefs::CreateMode::Lan => CreateArg::Lan,
        isthmus_prefs::CreateMode::Any => CreateArg::Any,
        isthmus_prefs::CreateMode::None => CreateArg::None,
    })) {
        Some(CreateArg::Any) => StatusAccess::Any,
        Some(CreateArg::None) => StatusAccess::None,
        Some(CreateArg::Lan) | None => StatusAccess::Lan,
    };

    use isthmus_prefs::ForwardingMode as M;
    let mode = match (args.forwarding, args.external) {
        (Some(ForwardingArg::LanOnly), Some(e)) => return Err(usage(format!(
            "--forwarding lan-only and --external {e} contradict each other: a LAN-only router has no external address (drop one of them)"
        ))),
        (Some(ForwardingArg::LanOnly), None) => M::LanOnly,
        (Some(ForwardingArg::Manual), _) => M::Manual,
        (Some(f), e) => {
            let m = match f {
                ForwardingArg::Auto => M::Auto,
                ForwardingArg::Pcp => M::Pcp,
                ForwardingArg::Natpmp => M::NatPmp,
                _ => M::Upnp,
            };
            if let Some(e) = e {
                let how = match m {
                    M::Upnp => "with UPnP",
                    M::Pcp => "with PCP",
                    M::NatPmp => "with NAT-PMP",
                    _ => "with auto,"
                };
                return Err(usage(format!(
                    "--forwarding {} and --external {e} contradict each other: {how} the gateway says the external address (drop --external, or use --forwarding manual)",
                    m.name()
                )));
            }
            m
        }
        (None, Some(_)) => M::Manual,
        (None, None) => p.forwarding.unwrap_or(M::LanOnly),
    };
    cfg.forwarding = match mode {
        M::LanOnly => Forwarding::LanOnly,
        M::Manual => Forwarding::Manual {
            external: args.external.or(p.external).context(
                "manual forwarding needs the forwarded address: --external IP:PORT (or `external` in the profile)",
            )?,
        },
        M::Upnp | M::Auto | M::Pcp | M::NatPmp => {
            let u = &p.upnp;
            let mut up = MapConfig {
                protocols: match mode {
                    M::Pcp => vec![Protocol::Pcp],
                    M::NatPmp => vec![Protocol::NatPmp],
                    M::Upnp => vec![Protocol::Upnp],
                    _ => isthmus_dispatcher::portmap::AUTO.to_vec(),
                },
                ..MapConfig::default()
            };
            if let Some(l) = u.lease_secs {
                up.lease = Duration::from_secs(u64::from(l));
            }
            up.external_port = u.external_port;
            if let Some(d) = &u.description {
                up.description = d.clone();
            }
            up.fallback = match u.fallback {
                Some(isthmus_prefs::Fallback::Fail) => Fallback::Fail,
                _ => Fallback::LanOnly,
            };
            match cfg.listen.ip() {
                IpAddr::V4(v4) if !v4.is_unspecified() => up.lan_ip = Some(v4),
                IpAddr::V4(_) => {}
                // A router that takes IPv6 also gets a pinhole in the gateway's IPv6 firewall
                // (PCP only), for its own address when it listens on one.
                IpAddr::V6(v6) => {
                    up.pinhole_v6 = true;
                    if !v6.is_unspecified() {
                        up.lan_ipv6 = Some(v6);
                    }
                }
            }
            Forwarding::Gateway(up)
        }
    };
    cfg.croquet = croquet_config(args, &p.croquet)?;
    cfg.cluster = cluster_config(args, &p.cluster)?;
    cfg.remember_dir = remember_dir(args, &p.croquet);
    let beacon_on = !args.no_beacon && p.beacon.unwrap_or(true);
    if beacon_on {
        let interval = flag(
            "beacon-interval-ms",
            "beacon_interval_ms",
            args.beacon_interval_ms,
        )?
        .or(p.beacon_interval_ms)
        .unwrap_or(2000);
        cfg.beacon = Some(BeaconConfig {
            port: args
                .beacon_port
                .or(p.beacon_port)
                .unwrap_or(isthmus_contact::beacon::DEFAULT_BEACON_PORT),
            interval: Duration::from_millis(interval),
        });
    }
    Ok(cfg)
}

/// The router cluster from `--cluster` / `--cluster-name` and the profile's `cluster.*` keys;
/// `None` runs alone.
fn cluster_config(
    args: &RouterArgs,
    p: &isthmus_prefs::ClusterPrefs,
) -> Result<Option<isthmus_dispatcher::cluster::ClusterSettings>> {
    let name = args
        .cluster_name
        .clone()
        .or(p.name.clone())
        .unwrap_or_else(|| isthmus_cluster::DEFAULT_CLUSTER_NAME.to_string());
    let url = match (&args.cluster, &p.etcd) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => {
            if args.cluster_name.is_some() {
                return Err(usage(
                    "--cluster-name names a cluster, but no etcd is given: add --cluster etcd://HOST:PORT (or cluster.etcd in the profile)".to_string(),
                ));
            }
            return Ok(None);
        }
    };
    let etcd =
        isthmus_cluster::ClusterConfig::from_url(&url, &name).map_err(|e| usage(e.to_string()))?;
    Ok(Some(isthmus_dispatcher::cluster::ClusterSettings::new(
        etcd,
    )))
}

/// Where the router remembers the islands it is home for, so their replicas re-create them
/// after a crash: `--data-dir` (or the profile's `croquet.data_dir`), else `$ISTHMUS_DATA_DIR`,
/// else the platform's data directory's `isthmus`.
fn remember_dir(args: &RouterArgs, p: &isthmus_prefs::CroquetPrefs) -> Option<std::path::PathBuf> {
    args.data_dir
        .clone()
        .or(p.data_dir.as_ref().map(Into::into))
        .or_else(|| {
            std::env::var_os("ISTHMUS_DATA_DIR")
                .filter(|d| !d.is_empty())
                .map(Into::into)
        })
        .or_else(|| dirs::data_dir().map(|d| d.join("isthmus")))
}

/// The Croquet front door from flags and the profile's `croquet.*` keys; `None` when off.
fn croquet_config(
    args: &RouterArgs,
    p: &isthmus_prefs::CroquetPrefs,
) -> Result<Option<isthmus_dispatcher::croquet::CroquetConfig>> {
    use isthmus_croquet::store::StoreConfig;
    if args.no_croquet || p.enabled == Some(false) {
        if args.web.is_some() {
            return Err(usage(
                "--web serves a Croquet app, but the Croquet front door is off (--no-croquet or croquet.enabled = false)".to_string(),
            ));
        }
        return Ok(None);
    }
    let mut c = isthmus_dispatcher::croquet::CroquetConfig {
        web: args.web.clone().or(p.web.as_ref().map(Into::into)),
        ..Default::default()
    };
    if let Some(web) = &c.web {
        if !web.is_dir() {
            return Err(usage(format!(
                "--web {}: not a directory; give the folder that holds the app's index.html",
                web.display()
            )));
        }
    }
    let dir = match args
        .data_dir
        .clone()
        .or(p.data_dir.as_ref().map(Into::into))
    {
        Some(d) => Some(d),
        None => dirs::data_dir().map(|d| d.join("isthmus").join("croquet")),
    };
    if let Some(dir) = dir {
        let mut store = StoreConfig::new(dir);
        if let Some(mb) = p.max_file_mb {
            store.max_file_bytes = mb * 1024 * 1024;
        }
        if let Some(mb) = p.max_store_mb {
            store.max_total_bytes = mb * 1024 * 1024;
        }
        c.store = Some(store);
    } else {
        tracing::warn!(
            "no data directory for Croquet files (give one with --data-dir); /files is off"
        );
    }
    if let Some(keys) = &p.api_keys {
        c.api_keys = keys
            .split(',')
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
    }
    Ok(Some(c))
}

async fn run_router(args: RouterArgs, prefs: Option<&std::path::Path>) -> Result<()> {
    let mut cfg = router_config(&args, prefs)?;
    // Catch Ctrl-C and SIGTERM before anything can be mapped or announced. Asking the gateway
    // can take seconds per protocol when nothing answers: a signal meanwhile cuts it short
    // (what was granted is removed) instead of waiting for it.
    let signals = Signals::install()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals.cancel_on_signal(shutdown.clone()));
    if let Forwarding::Gateway(map) = &mut cfg.forwarding {
        map.cancel = Some(shutdown.clone());
    }
    let beacon = cfg.beacon.clone();
    let croquet = cfg.croquet.clone();
    let dispatcher = Dispatcher::bind(cfg).await?;
    let local = dispatcher.local_addr();
    print_line(&format!("listening on {local}"));
    let summary = dispatcher.summary();
    let cluster_line = dispatcher.cluster_summary();
    let check = dispatcher.reachability();
    // The reachability check connects to the router through the gateway: it needs the
    // dispatcher accepting, so the summary follows it (a few seconds at most).
    let running = tokio::spawn(dispatcher.run(shutdown.clone()));
    // One line that says where the router can be reached, whatever RUST_LOG says.
    match check {
        Some(check) => {
            let outcome = tokio::select! {
                r = check => r.to_string(),
                _ = shutdown.cancelled() => "reachability not checked: stopping".to_string(),
            };
            eprint_line(&format!("isthmus router: {summary}; {outcome}"));
        }
        None => eprint_line(&format!("isthmus router: {summary}")),
    }
    if let Some(cluster) = &cluster_line {
        eprint_line(&format!("isthmus router: {cluster}"));
    }
    if let Some(c) = &croquet {
        // Listening on every address: name the one a browser elsewhere on the LAN uses (the
        // apps' reflector and files URLs must carry it); localhost only serves this machine.
        let lan = || {
            isthmus_dispatcher::contacts::local_addrs()
                .into_iter()
                .map(|a| a.ip)
                .find(|ip| match ip {
                    IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                    IpAddr::V6(_) => false,
                })
        };
        let host = match local.ip() {
            ip if ip.is_unspecified() => lan().map_or("localhost".to_string(), |ip| ip.to_string()),
            IpAddr::V6(v6) => format!("[{v6}]"),
            ip => ip.to_string(),
        };
        let port = local.port();
        let web = if c.web.is_some() {
            format!("; web app http://{host}:{port}/ (status page at /status)")
        } else {
            String::new()
        };
        eprint_line(&format!(
            "isthmus router: Croquet reflector ws://{host}:{port}/reflector, files http://{host}:{port}/files{web}"
        ));
    }
    match &beacon {
        _ if shutdown.is_cancelled() => {}
        Some(b) => tracing::info!(
            %local,
            "router ready; announcing islands on UDP {} every {:?}",
            b.port,
            b.interval
        ),
        None => tracing::info!(%local, "router ready; LAN beacon off"),
    }
    running
        .await
        .context("the router's accept loop stopped unexpectedly")?;
    tracing::info!("router stopped");
    Ok(())
}

/// Ctrl-C and SIGTERM, registered when installed (so none is missed in between).
pub(crate) struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next Ctrl-C or SIGTERM.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }

    async fn cancel_on_signal(mut self, shutdown: CancellationToken) {
        self.recv().await;
        // Cancel first: shutting down (and removing a UPnP mapping) must never depend on a log
        // line reaching a stderr that may be closed.
        shutdown.cancel();
        tracing::info!("signal received, shutting down; a second Ctrl-C stops at once");
        // Cleanup is bounded (a gateway that stopped answering costs a few seconds), but a
        // person who presses again wants out now.
        self.recv().await;
        eprint_line("second signal: stopping now; a port mapping may be left until its lease ends");
        std::process::exit(130);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
