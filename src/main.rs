//! The `isthmus` command: runs a router, creates and joins islands.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use isthmus_dispatcher::{BeaconConfig, Dispatcher, DispatcherConfig, DEFAULT_PORT};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod island;

#[derive(Parser)]
#[command(
    name = "isthmus",
    version,
    about = "A message router for replicated islands"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a router (dispatcher) in the foreground.
    Router(RouterArgs),
    /// Create islands.
    #[command(subcommand)]
    Island(island::IslandCommand),
    /// Join an island as a replica of its chat.
    Join(island::JoinArgs),
    /// List the islands announced on the LAN.
    Discover(island::DiscoverArgs),
    /// Read a postcard, or make one for an island heard on the LAN.
    Postcard(island::PostcardArgs),
}

#[derive(Args)]
struct RouterArgs {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address to listen on: an IP, or IP:PORT (then --port is ignored).
    #[arg(long, default_value = "0.0.0.0")]
    listen: String,
    /// Idle milliseconds before a tick, for sessions that do not ask for their own.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
    /// Do not announce islands by LAN broadcast.
    #[arg(long)]
    no_beacon: bool,
    /// UDP port the LAN beacon announces to.
    #[arg(long, default_value_t = isthmus_contact::beacon::DEFAULT_BEACON_PORT)]
    beacon_port: u16,
    /// Milliseconds between LAN announcements.
    #[arg(long, default_value_t = 2000)]
    beacon_interval_ms: u64,
    /// Milliseconds an empty session is kept before it is dropped.
    #[arg(long, default_value_t = 10_000)]
    linger_ms: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Router(args) => run_router(args).await.map(|_| 0u8),
            Command::Island(cmd) => island::run_island(cmd).await,
            Command::Join(args) => island::run_join(args).await,
            Command::Discover(args) => island::run_discover(args).await,
            Command::Postcard(args) => island::run_postcard(args).await,
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
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
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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

async fn run_router(args: RouterArgs) -> Result<()> {
    let mut cfg = DispatcherConfig {
        listen: listen_addr(&args.listen, args.port)?,
        ..DispatcherConfig::default()
    };
    if args.tick_ms == 0 {
        anyhow::bail!("--tick-ms must be at least 1");
    }
    cfg.driver.session.tick_interval = Duration::from_millis(args.tick_ms);
    cfg.driver.session.linger = Duration::from_millis(args.linger_ms);
    if !args.no_beacon {
        if args.beacon_interval_ms < 100 {
            anyhow::bail!("--beacon-interval-ms must be at least 100");
        }
        cfg.beacon = Some(BeaconConfig {
            port: args.beacon_port,
            interval: Duration::from_millis(args.beacon_interval_ms),
        });
    }
    let beacon = cfg.beacon.clone();
    let dispatcher = Dispatcher::bind(cfg).await?;
    let local = dispatcher.local_addr();
    println!("listening on {local}");
    match &beacon {
        Some(b) => tracing::info!(
            %local,
            "router ready (LAN-only); announcing islands on UDP {} every {:?}",
            b.port,
            b.interval
        ),
        None => tracing::info!(%local, "router ready (LAN-only); LAN beacon off"),
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    dispatcher.run(shutdown).await;
    tracing::info!("router stopped");
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
