//! `isthmus status`: what a running router is doing, from its `/status.json` on its one port,
//! for people (plain lines) or scripts (`--json`, the schema in docs/status.md).

use crate::usage;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Empty, Limited};
use isthmus_dispatcher::status::{ago, count, rate, Event, Island, Status, SCHEMA_VERSION};
use isthmus_dispatcher::DEFAULT_PORT;
use std::time::Duration;

/// How long the whole request may take: a router on the LAN answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest status accepted: thousands of islands with their members fit well inside.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// `isthmus status` arguments.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The router's address and port (a port alone or an address alone takes the default for
    /// the other).
    #[arg(long, value_name = "ADDR:PORT", default_value_t = format!("127.0.0.1:{DEFAULT_PORT}"))]
    router: String,
    /// Print the status as JSON (the schema is in docs/status.md) instead of lines for people.
    #[arg(long)]
    json: bool,
}

/// Fetches and prints the status. Exit 0 when shown, 1 when the router could not be asked or
/// refused, 64 for a bad `--router`.
pub(crate) async fn run(args: StatusArgs) -> Result<u8> {
    let target = target(&args.router)?;
    let body = tokio::time::timeout(TIMEOUT, fetch(&target, "/status.json"))
        .await
        .map_err(|_| {
            anyhow!("the router at {target} did not answer within {TIMEOUT:?}; is it an isthmus router, and running?")
        })??;
    let status: Status = serde_json::from_slice(&body).with_context(|| {
        format!("the router at {target} sent a status this isthmus does not understand (it reads schema version {SCHEMA_VERSION}); is it an older or newer isthmus?")
    })?;
    if args.json {
        // As the router sent it: fields a newer router adds are passed on, not dropped.
        let text = String::from_utf8_lossy(&body);
        write_out([text.trim_end().to_string()])?;
    } else {
        write_out(lines(&status))?;
    }
    Ok(0)
}

/// Prints the lines. A reader that went away (`| head`) ends the output quietly; any other
/// failure (a full disk) is an error, so a script never takes a cut-off status for a whole one.
fn write_out(lines: impl IntoIterator<Item = String>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = lines
        .into_iter()
        .try_for_each(|l| writeln!(out, "{l}"))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow!(
            "writing the status to stdout failed ({e}); is the disk full, or the output closed?"
        )),
        _ => Ok(()),
    }
}

/// `host:port`, with the default port or host filled in. The page's URL as a browser shows it
/// (`http://192.168.1.5:7470/`) is taken too: it is what a newcomer has at hand.
fn target(router: &str) -> Result<String> {
    let router = router.trim();
    let router = router.strip_prefix("http://").unwrap_or(router);
    let router = router.strip_suffix('/').unwrap_or(router);
    // `[v6]` alone.
    let router = match router.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ip,
        _ => router,
    };
    if router.is_empty() {
        return Err(usage(
            "--router needs an address, e.g. 127.0.0.1:7470".into(),
        ));
    }
    if router.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(router.to_string());
    }
    if let Ok(port) = router.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    if let Ok(ip) = router.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    match router.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(router.to_string())
        }
        Some(_) => Err(usage(format!(
            "--router {router:?} is not ADDR:PORT (e.g. 192.168.1.5:7470)"
        ))),
        None if router
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
        {
            Ok(format!("{router}:{DEFAULT_PORT}"))
        }
        None => Err(usage(format!(
            "--router {router:?} is not ADDR:PORT (e.g. 192.168.1.5:7470)"
        ))),
    }
}

/// GETs `path` from the router over HTTP/1.1 and returns the body of a 200.
async fn fetch(target: &str, path: &str) -> Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(target).await.with_context(|| {
        format!("cannot reach the router at {target}; is it running (isthmus router), and is the address right?")
    })?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io)
        .await
        .with_context(|| format!("the router at {target} did not speak HTTP"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, target)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("the router at {target} closed the connection instead of answering; is it an isthmus router with the status page (0.1 or newer)?"))?;
    let code = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the status from {target} failed: {e}"))?
        .to_bytes();
    driver.abort();
    if code == hyper::StatusCode::FORBIDDEN {
        return Err(anyhow!(
            "the router at {target} refuses to show its status to this machine: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    if !code.is_success() {
        let said = String::from_utf8_lossy(&body);
        let said = said.trim();
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        };
        return Err(anyhow!(
            "the router at {target} answered {code}{said}; is it an isthmus router with the status page?"
        ));
    }
    Ok(body.to_vec())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Text from the network (names in a divergence, a gateway's words in the forwarding detail)
/// with control characters shown escaped, so it cannot move the cursor or recolour a terminal.
/// Names elsewhere are printed quoted (`{:?}`), which escapes them the same way.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn event_line(e: &Event, now: f64) -> String {
    let mut line = format!("  {} ago", ago(now - e.at));
    if let (Some(code), Some(name)) = (e.code, &e.code_name) {
        line.push_str(&format!("  {code} {}", clean(name)));
    }
    if !e.island.is_empty() {
        line.push_str(&format!("  island {:?}", e.island));
    }
    if !e.who.is_empty() {
        line.push_str(&format!("  {}", clean(&e.who)));
    }
    if !e.what.is_empty() {
        line.push_str(&format!(": {}", clean(&e.what)));
    }
    line
}

/// The status as lines for people.
pub(crate) fn lines(s: &Status) -> Vec<String> {
    let now = s.router.started + s.router.uptime_seconds;
    let mut out = router_lines(s);
    out.push(String::new());
    out.push(format!("islands: {}", s.islands.len()));
    for i in &s.islands {
        out.extend(island_lines(i));
    }
    if let Some(c) = &s.cluster {
        out.push(String::new());
        out.extend(cluster_lines(c));
    }
    for (title, list) in [
        ("recent refusals", &s.recent_refusals),
        ("recent divergences", &s.recent_divergences),
    ] {
        out.push(String::new());
        out.push(if list.is_empty() {
            format!("{title}: none")
        } else {
            format!("{title}:")
        });
        out.extend(list.iter().map(|e| event_line(e, now)));
    }
    out
}

/// The router, its forwarding and its totals.
fn router_lines(s: &Status) -> Vec<String> {
    let f = &s.forwarding;
    let t = &s.totals;
    let internal = if f.internal.is_empty() {
        "none".to_string()
    } else {
        f.internal.join(", ")
    };
    let mut external = format!("  external: {}", f.external.as_deref().unwrap_or("none"));
    if f.mode == "gateway" {
        external.push_str(&match (f.mapped, f.lease_seconds) {
            (true, Some(l)) => format!(", lease {}", ago(l as f64)),
            (true, None) => ", permanent mapping".to_string(),
            (false, _) => ", no mapping now".to_string(),
        });
    }
    if f.public == Some(false) {
        external.push_str(" (not public: double NAT)");
    }
    vec![
        format!(
            "router {} on {}, up {} (instance {})",
            s.router.version,
            s.router.listen,
            ago(s.router.uptime_seconds),
            s.router.instance
        ),
        // As on the page: the detail only where it says more than the mode.
        if f.detail.eq_ignore_ascii_case(&f.mode) {
            format!("forwarding: {}", clean(&f.mode))
        } else {
            format!("forwarding: {} ({})", clean(&f.mode), clean(&f.detail))
        },
        format!("  internal: {internal}"),
        external,
        format!(
            "totals: {}, {}, {} stamped, {}, {} in, {} out, {} refused, {} shed",
            count(t.sessions, "session", "sessions"),
            count(t.replicas, "replica", "replicas"),
            count(t.messages_stamped, "message", "messages"),
            count(t.deliveries, "delivery", "deliveries"),
            bytes(t.bytes_in),
            bytes(t.bytes_out),
            t.refusals,
            t.connections_shed
        ),
    ]
}

/// The cluster's routers, then where each island lives.
fn cluster_lines(c: &isthmus_dispatcher::cluster::ClusterView) -> Vec<String> {
    let mut out = vec![format!(
        "cluster {}: {}{}",
        clean(&c.name),
        count(c.routers.len() as u64, "router", "routers"),
        if c.lease {
            ""
        } else {
            " (this router lost its lease: it serves nothing until it has a new one)"
        }
    )];
    for r in &c.routers {
        out.push(format!(
            "  router {}{}  {}  {}, {}{}",
            r.id,
            if r.here { " (this one)" } else { "" },
            if r.contacts.is_empty() {
                "no contacts".to_string()
            } else {
                r.contacts.join(", ")
            },
            count(r.sessions, "session", "sessions"),
            count(r.replicas, "replica", "replicas"),
            if r.draining { ", draining" } else { "" }
        ));
    }
    out.push(format!("cluster islands: {}", c.islands.len()));
    for i in &c.islands {
        out.push(format!(
            "  island {}  home {}  epoch {}",
            i.session, i.home, i.epoch
        ));
    }
    if let Some(e) = &c.error {
        out.push(format!("  (islands unavailable: {})", clean(e)));
    }
    out
}

/// One island: its line, its members, its postcard.
fn island_lines(i: &Island) -> Vec<String> {
    let name = if i.name.is_empty() {
        "(unnamed)".to_string()
    } else {
        format!("{:?}", i.name)
    };
    let mut out = vec![format!(
        "  {name} {}  seq {}  {} msgs/s  up {}  session {}",
        if i.lan_open { "LAN-open" } else { "private" },
        i.seq,
        rate(i.msgs_per_sec),
        ago(i.age_seconds),
        i.session
    )];
    if i.members.is_empty() {
        out.push("    nobody attached (lingering)".to_string());
    }
    for m in &i.members {
        out.push(format!(
            "    {:?} for {}{}",
            m.name,
            ago(m.connected_seconds),
            if m.resumed { ", resumed" } else { "" }
        ));
    }
    if let Some(card) = &i.postcard {
        out.push(format!("    postcard: {card}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_addresses_take_defaults() {
        assert_eq!(target("10.0.0.2:9000").expect("ok"), "10.0.0.2:9000");
        assert_eq!(target("10.0.0.2").expect("ok"), "10.0.0.2:7470");
        assert_eq!(target("9000").expect("ok"), "127.0.0.1:9000");
        assert_eq!(target("cabin.local").expect("ok"), "cabin.local:7470");
        assert_eq!(target("[::1]:7470").expect("ok"), "[::1]:7470");
        assert_eq!(target("[::1]").expect("ok"), "[::1]:7470");
        assert_eq!(
            target("http://192.168.1.5:7470/").expect("ok"),
            "192.168.1.5:7470"
        );
        assert_eq!(
            target("http://cabin.local").expect("ok"),
            "cabin.local:7470"
        );
        assert!(target("https://cabin.local/").is_err());
        assert!(target("a:b:c").is_err());
        assert!(target("").is_err());
    }

    #[test]
    fn divergences_cannot_drive_the_terminal() {
        let e = Event {
            at: 100.0,
            code: None,
            code_name: None,
            session: None,
            island: "isle".into(),
            who: "ann\u{1b}[2J, bob | eve\r".into(),
            what: "digests differ at seq 7".into(),
        };
        let line = event_line(&e, 105.0);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains(r"ann\u{1b}[2J, bob | eve\r"), "{line}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500_000), "1.5 MB");
    }
}
