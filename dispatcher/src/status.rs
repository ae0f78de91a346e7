//! The status page (`/`), its JSON (`/status.json`, the schema `isthmus status --json` prints,
//! documented in docs/status.md) and who may see them.
//!
//! The page is rendered on the server, so it works without JavaScript (it then reloads itself
//! every [`NOSCRIPT_REFRESH_SECS`] seconds); a small script compiled into the binary fetches
//! the live part (`/status.fragment`) every [`POLL_MS`] ms and adds copy buttons. Islands and
//! display names are private to the household, so only loopback and the router's own subnets
//! may look by default ([`StatusAccess`]). A LAN-open island's participant postcard is shown
//! only to a requester on the router's own network, whatever the setting: that is where its
//! beacon carries the secret anyway. A private island's secret is never known to the router.

use crate::contacts;
use crate::http::{self, Body, Ctx};
use crate::metrics::forwarding_state;
use crate::{lock, Shared};
use hyper::header::HOST;
use hyper::{HeaderMap, Response, StatusCode};
use isthmus_contact::{ContactPoint, Postcard};
use isthmus_router::auth::Capability;
use isthmus_router::stats::RecentEvent;
use isthmus_router::wire::Role;
use isthmus_router::SessionId;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The version of the JSON schema (`version` in [`Status`]); raised when a field changes
/// meaning or goes away (new fields may appear without it).
pub const SCHEMA_VERSION: u32 = 1;
/// How often the page's script fetches the live part.
pub const POLL_MS: u64 = 2000;
/// How often the page reloads itself without JavaScript.
pub const NOSCRIPT_REFRESH_SECS: u64 = 10;
/// A message rate is measured over at least this long (a reading sooner reuses the last).
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

const PAGE: &str = include_str!("status.html");
const SCRIPT: &str = include_str!("status.js");
const STYLE: &str = include_str!("status.css");

/// Who may see the status page, its JSON and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusAccess {
    /// Loopback and the router's own subnets (the default): the page names islands and people.
    #[default]
    Lan,
    /// Anyone who reaches the port (behind a reverse proxy or for a public router).
    Any,
    /// Nobody: every request for them gets 403.
    None,
}

impl fmt::Display for StatusAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StatusAccess::Lan => "lan",
            StatusAccess::Any => "any",
            StatusAccess::None => "none",
        })
    }
}

impl std::str::FromStr for StatusAccess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lan" => Ok(StatusAccess::Lan),
            "any" => Ok(StatusAccess::Any),
            "none" => Ok(StatusAccess::None),
            other => Err(format!(
                "status access {other:?} is not one of \"lan\", \"any\" or \"none\""
            )),
        }
    }
}

/// `None` when the requester may see the status and metrics, else the 403 to answer.
///
/// Under `lan` the request must also name the router by an address or a name that only a local
/// network resolves (see [`local_host_name`]): a web page on the Internet could otherwise point
/// a name of its own at the router's LAN address (DNS rebinding) and read the status, postcards
/// included, through the browser of anyone on the LAN.
pub(crate) fn refusal(ctx: &Ctx, headers: &HeaderMap) -> Option<Response<Body>> {
    let lan = || contacts::is_lan_peer(ctx.peer.ip(), &contacts::local_addrs());
    let host = headers
        .get(HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()));
    let why = match ctx.shared.cfg.status_from {
        StatusAccess::Any => return None,
        StatusAccess::Lan if !lan() => format!(
            "403 forbidden: this router shows its status and metrics only to its own network (status_from = \"lan\"), and {} is not on it; ask its operator, or run the router with --status-from any\n",
            ctx.peer.ip()
        ),
        StatusAccess::Lan => match host.as_deref() {
            Some(host) if !local_host_name(host) => format!(
                "403 forbidden: this router shows its status and metrics only to its own network (status_from = \"lan\"), and this request named it {host:?}, a name from outside that network (a web page can point such a name at the router to read it through your browser); open it by its address (http://{}/), localhost or a .local name, or run the router with --status-from any\n",
                ctx.local
            ),
            // No Host at all (HTTP/1.0, scripts): browsers always send one, so no page can be
            // behind such a request.
            _ => return None,
        },
        StatusAccess::None => "403 forbidden: this router shows its status and metrics to nobody (status_from = \"none\"); run it with --status-from lan to see them from its own network\n".to_string(),
    };
    Some(http::text(StatusCode::FORBIDDEN, why))
}

/// Whether a `Host` header names the router by an IP address, `localhost`, a one-label name or a
/// name under a suffix reserved for local networks (`.local`, `.lan`, `.home.arpa`, ...): names
/// no web site on the Internet can own, and so cannot rebind to the router's LAN address.
pub fn local_host_name(host: &str) -> bool {
    let host = host.trim();
    // `[v6]:port`, `[v6]`, `name:port`, `v4:port`, `name`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            // A link-local address may carry its zone (`fe80::1%25eth0`).
            Some((ip, _)) => {
                let ip = ip.split_once('%').map_or(ip, |(ip, _)| ip);
                return ip.parse::<std::net::Ipv6Addr>().is_ok();
            }
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if name.parse::<std::net::IpAddr>().is_ok() || !name.contains('.') {
        return true;
    }
    const LOCAL_SUFFIXES: [&str; 7] = [
        ".localhost",
        ".local",
        ".lan",
        ".home",
        ".home.arpa",
        ".internal",
        ".localdomain",
    ];
    LOCAL_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Answers `/`, `/status.json`, `/status.fragment`, `/status.js` and `/status.css`.
pub(crate) async fn respond(ctx: &Ctx, headers: &HeaderMap, path: &str) -> Response<Body> {
    if let Some(refused) = refusal(ctx, headers) {
        return refused;
    }
    // Read from etcd once per request, only on a clustered router.
    let cluster = match (&ctx.shared.cluster, path) {
        (Some(c), "/" | "/status.json" | "/status.fragment") => Some(c.view().await),
        _ => None,
    };
    let collect = |shared: &Arc<Shared>, peer, local| {
        let mut s = collect(shared, peer, local);
        s.cluster = cluster.clone();
        s
    };
    let with_cache = |mut r: Response<Body>| {
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        r
    };
    match path {
        "/status.js" => http::bytes(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        "/status.css" => http::bytes(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        "/status.json" => {
            let status = collect(&ctx.shared, ctx.peer, ctx.local);
            match serde_json::to_vec_pretty(&status) {
                Ok(json) => with_cache(http::bytes(StatusCode::OK, "application/json", json)),
                Err(e) => http::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "the status could not be encoded ({e}); this is a bug, please report it\n"
                    ),
                ),
            }
        }
        "/status.fragment" => {
            let status = collect(&ctx.shared, ctx.peer, ctx.local);
            with_cache(http::bytes(
                StatusCode::OK,
                "text/html; charset=utf-8",
                fragment(&status),
            ))
        }
        _ => {
            let status = collect(&ctx.shared, ctx.peer, ctx.local);
            let page = PAGE
                .replace("{{refresh}}", &NOSCRIPT_REFRESH_SECS.to_string())
                .replace("{{poll_ms}}", &POLL_MS.to_string())
                .replace("{{live}}", &fragment(&status));
            with_cache(http::bytes(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page,
            ))
        }
    }
}

/// Everything the status page shows; `/status.json` and `isthmus status --json` print it.
/// See docs/status.md for the meaning of each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// The router itself.
    pub router: RouterInfo,
    /// How it is reachable.
    pub forwarding: ForwardingInfo,
    /// Counters since the router started.
    pub totals: Totals,
    /// Live sessions, the busiest first.
    pub islands: Vec<Island>,
    /// The newest refusals, newest first.
    pub recent_refusals: Vec<Event>,
    /// The newest divergences, newest first.
    pub recent_divergences: Vec<Event>,
    /// The router cluster (`--cluster`): its routers and where islands live. Absent on a lone
    /// router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterView>,
}

/// The router process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterInfo {
    /// The dispatcher's instance id (in beacons and welcomes).
    pub instance: String,
    /// The isthmus version.
    pub version: String,
    /// The address it listens on.
    pub listen: String,
    /// When it started (Unix seconds).
    pub started: f64,
    /// Seconds since then.
    pub uptime_seconds: f64,
    /// Who may see this status: `lan`, `any` (or `none`, which nobody would read).
    pub status_from: String,
}

/// The forwarding mode and the contact points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardingInfo {
    /// `lan-only`, `manual` or `gateway` (a mapping asked of the home gateway).
    pub mode: String,
    /// The protocol of the gateway mapping in place: `pcp`, `natpmp` or `upnp`; `null` without
    /// one.
    pub protocol: Option<String>,
    /// For people: how the external address was obtained, or why there is none.
    pub detail: String,
    /// The router's LAN addresses, best first for the requester.
    pub internal: Vec<String>,
    /// The external address published now, if any.
    pub external: Option<String>,
    /// The gateway mapping's lease in seconds; `null` for a permanent mapping or another mode.
    pub lease_seconds: Option<u64>,
    /// Whether a gateway mapping is in place now (false in other modes).
    pub mapped: bool,
    /// Whether the external address is on the Internet (false: double NAT); `null` without one.
    pub public: Option<bool>,
}

/// Counters since the router started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Sessions alive now.
    pub sessions: u64,
    /// Replica connections attached now.
    pub replicas: u64,
    /// Messages stamped.
    pub messages_stamped: u64,
    /// Frames handed to replicas.
    pub deliveries: u64,
    /// Bytes read from replicas.
    pub bytes_in: u64,
    /// Bytes written to replicas.
    pub bytes_out: u64,
    /// Ticks sent.
    pub ticks: u64,
    /// Replicas that resumed.
    pub resumes: u64,
    /// Replicas that joined with something to catch up on (not a fresh island's creator).
    pub late_joins: u64,
    /// Snapshots stored.
    pub snapshot_uploads: u64,
    /// Islands re-created from their replicas.
    pub islands_recovered: u64,
    /// Replicas closed as slow consumers.
    pub slow_consumers: u64,
    /// Divergences seen.
    pub divergences: u64,
    /// Hellos and joins refused.
    pub refusals: u64,
    /// Connections turned away at an admission cap.
    pub connections_shed: u64,
}

/// One live session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Island {
    /// The session id.
    pub session: String,
    /// Its announced name; empty for an island that was not announced.
    pub name: String,
    /// Whether anyone on the LAN may join it (its beacon carries the participant secret).
    pub lan_open: bool,
    /// A participant postcard, for a LAN-open island and a requester on the router's network
    /// only; `null` otherwise.
    pub postcard: Option<String>,
    /// The newest seq stamped.
    pub seq: u64,
    /// Messages stamped per second, lately.
    pub msgs_per_sec: f64,
    /// Seconds since the session started.
    pub age_seconds: f64,
    /// Who is attached, in the order they joined.
    pub members: Vec<Member>,
}

/// A replica attached to an island.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its display name.
    pub name: String,
    /// Its replica id.
    pub replica: String,
    /// Seconds since it attached.
    pub connected_seconds: f64,
    /// Whether it resumed rather than synced afresh.
    pub resumed: bool,
}

/// A refusal or divergence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When (Unix seconds).
    pub at: f64,
    /// The close code of a refusal; `null` for a divergence.
    pub code: Option<u16>,
    /// The code's name.
    pub code_name: Option<String>,
    /// The session, when known.
    pub session: Option<String>,
    /// The island's name, when it has one.
    pub island: String,
    /// Who: a peer address or replica; for a divergence, the groups of names that agree.
    pub who: String,
    /// What happened.
    pub what: String,
}

/// A session's stamped count when its rate was last measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RateSample {
    at: Instant,
    stamped: u64,
    rate: f64,
}

/// Message rates per session, measured between readings of the status.
#[derive(Debug, Default)]
pub(crate) struct Rates(std::sync::Mutex<HashMap<SessionId, RateSample>>);

impl Rates {
    fn rate(&self, id: SessionId, stamped: u64, age: f64, now: Instant) -> f64 {
        let mut map = lock(&self.0);
        let s = map.entry(id).or_insert(RateSample {
            at: now,
            stamped,
            // Until a second reading, the average over the session's life.
            rate: if age > 0.0 { stamped as f64 / age } else { 0.0 },
        });
        let elapsed = now.saturating_duration_since(s.at);
        if elapsed >= RATE_WINDOW {
            s.rate = stamped.saturating_sub(s.stamped) as f64 / elapsed.as_secs_f64();
            s.at = now;
            s.stamped = stamped;
        }
        s.rate
    }

    /// Forgets ended sessions; a set, as a router may hold thousands of sessions and every
    /// request for the status comes through here.
    fn keep_only(&self, live: &HashSet<SessionId>) {
        lock(&self.0).retain(|id, _| live.contains(id));
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn event(e: &RecentEvent) -> Event {
    Event {
        at: e.at,
        code: e.code.map(|c| c.0),
        code_name: e.code.map(|c| c.name().to_string()),
        session: e.session.map(|s| s.to_string()),
        island: e.island.clone(),
        who: e.who.clone(),
        what: e.what.clone(),
    }
}

/// Reads the status as the requester at `peer`, who reached the router at `local`, sees it.
pub(crate) fn collect(shared: &Arc<Shared>, peer: SocketAddr, local: SocketAddr) -> Status {
    let monitor = &shared.monitor;
    let now = unix_now();
    let host = contacts::local_addrs();
    let lan = contacts::is_lan_peer(peer.ip(), &host);
    let contacts = contacts::contacts_for(
        shared.cfg.listen,
        local,
        peer,
        &host,
        shared.external.current(),
        shared.instance,
    );
    let ev = monitor.stats.events();
    let started = monitor
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Status {
        version: SCHEMA_VERSION,
        router: RouterInfo {
            instance: shared.instance.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen: shared.cfg.listen.to_string(),
            started,
            uptime_seconds: (now - started).max(0.0),
            status_from: shared.cfg.status_from.to_string(),
        },
        forwarding: forwarding_info(shared, &contacts),
        totals: totals(shared, &ev),
        islands: islands(shared, &announced(shared, &contacts, lan), now),
        recent_refusals: ev.recent_refusals.iter().rev().map(event).collect(),
        recent_divergences: ev.recent_divergences.iter().rev().map(event).collect(),
        cluster: None,
    }
}

fn forwarding_info(shared: &Shared, contacts: &isthmus_router::wire::Contacts) -> ForwardingInfo {
    let fwd = forwarding_state(&shared.external);
    ForwardingInfo {
        mode: fwd.mode.to_string(),
        protocol: fwd.protocol.map(str::to_string),
        detail: shared.monitor.how.clone(),
        internal: contacts.internal.iter().map(|a| a.to_string()).collect(),
        external: fwd.external.map(|a| a.to_string()),
        lease_seconds: fwd.lease_seconds,
        mapped: fwd.mapped,
        public: fwd.public,
    }
}

fn totals(shared: &Shared, ev: &isthmus_router::stats::Events) -> Totals {
    let monitor = &shared.monitor;
    let (t, sessions) = monitor.stats.totals();
    Totals {
        sessions: sessions as u64,
        replicas: monitor.stats.replicas() as u64,
        messages_stamped: t.stamped,
        deliveries: t.deliveries,
        bytes_in: t.bytes_in,
        bytes_out: t.bytes_out,
        ticks: t.ticks,
        resumes: ev.resumes,
        late_joins: ev.late_joins,
        snapshot_uploads: ev.snapshots,
        islands_recovered: ev.recoveries,
        slow_consumers: ev.slow_consumers,
        divergences: ev.divergences,
        refusals: ev.refusals.values().sum(),
        connections_shed: monitor.shed_counts().iter().map(|(_, n)| n).sum(),
    }
}

/// What only the registry knows of an island: its announced name and, for a LAN-open one, a
/// participant postcard (for a requester on the LAN only: `lan`).
struct Announced {
    name: String,
    lan_open: bool,
    postcard: Option<Postcard>,
}

fn announced(
    shared: &Shared,
    contacts: &isthmus_router::wire::Contacts,
    lan: bool,
) -> HashMap<SessionId, Announced> {
    // Copied out first: deriving each postcard's key pair costs an Ed25519 key derivation,
    // and the registry's lock is the one every hello and island creation waits for.
    let slots: Vec<_> = lock(&shared.registry)
        .sessions
        .iter()
        .map(|(id, slot)| (*id, slot.announce.clone(), slot.keys))
        .collect();
    slots
        .into_iter()
        .map(|(id, a, keys)| {
            let a = a.as_ref();
            let name = a.map(|a| a.name.clone()).unwrap_or_default();
            let secret = a.and_then(|a| a.secret);
            let postcard = secret.filter(|_| lan).and_then(|secret| {
                let contact = ContactPoint {
                    session: id,
                    name: name.clone(),
                    destination: a.and_then(|a| a.destination),
                    internal: contacts.internal.clone(),
                    external: contacts.external,
                    router: Some(shared.instance),
                };
                let cap = Capability::from_parts(Role::Replica, secret);
                Postcard::new(contact, cap, keys).ok()
            });
            let entry = Announced {
                name,
                lan_open: secret.is_some(),
                postcard,
            };
            (id, entry)
        })
        .collect()
}

/// The live sessions, the most members first, then the highest seq.
fn islands(shared: &Shared, announced: &HashMap<SessionId, Announced>, now: f64) -> Vec<Island> {
    let rates = &shared.monitor.rates;
    let clock = Instant::now();
    let readings = shared.monitor.stats.sessions();
    rates.keep_only(&readings.iter().map(|r| r.id).collect());
    let mut islands: Vec<Island> = readings
        .into_iter()
        .map(|r| {
            let age = (now - r.started).max(0.0);
            let a = announced.get(&r.id);
            Island {
                session: r.id.to_string(),
                name: a.map_or_else(|| r.island.clone(), |a| a.name.clone()),
                lan_open: a.is_some_and(|a| a.lan_open),
                postcard: a.and_then(|a| a.postcard.as_ref()).map(|c| c.to_string()),
                seq: r.traffic.stamped,
                msgs_per_sec: rates.rate(r.id, r.traffic.stamped, age, clock),
                age_seconds: age,
                members: r
                    .members
                    .iter()
                    .map(|m| Member {
                        name: m.name.clone(),
                        replica: m.replica.to_string(),
                        connected_seconds: (now - m.since).max(0.0),
                        resumed: m.resumed,
                    })
                    .collect(),
            }
        })
        .collect();
    islands.sort_by(|a, b| {
        b.members
            .len()
            .cmp(&a.members.len())
            .then(b.seq.cmp(&a.seq))
            .then(a.session.cmp(&b.session))
    });
    islands
}

/// Text safe inside HTML elements and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration for people: "42 s", "5 min", "3 h 20 min", "2 d 4 h".
pub fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A count for people: "1 session", "2 sessions".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A rate for people.
pub fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

fn when(at: f64) -> String {
    format!("{} ago", ago(unix_now() - at))
}

/// The live part of the page: everything but the frame, styles and script.
pub fn fragment(s: &Status) -> String {
    let mut h = String::new();
    // Writing to a String cannot fail.
    let _ = write_fragment(&mut h, s);
    h
}

fn write_fragment(h: &mut String, s: &Status) -> fmt::Result {
    write_router(h, s)?;
    if let Some(c) = &s.cluster {
        write_cluster(h, c)?;
    }
    write_islands(h, &s.islands)?;
    write_events(h, s)
}

fn write_router(h: &mut String, s: &Status) -> fmt::Result {
    let f = &s.forwarding;
    writeln!(h, r#"<section class="card"><h2>Router</h2><dl>"#)?;
    // The detail says more than the mode except in the plainest case ("LAN-only").
    let detail = if f.detail.eq_ignore_ascii_case(&f.mode) {
        String::new()
    } else {
        format!(" &middot; {}", escape(&f.detail))
    };
    writeln!(
        h,
        "<dt>Forwarding</dt><dd><b>{}</b>{detail}</dd>",
        escape(&f.mode)
    )?;
    writeln!(
        h,
        "<dt>Internal</dt><dd>{}</dd>",
        if f.internal.is_empty() {
            "none".to_string()
        } else {
            f.internal
                .iter()
                .map(|a| format!("<code>{}</code>", escape(a)))
                .collect::<Vec<_>>()
                .join(" ")
        }
    )?;
    let lease = match (f.mode.as_str(), f.lease_seconds, f.mapped) {
        ("gateway", Some(l), true) => format!(" &middot; lease {}", ago(l as f64)),
        ("gateway", None, true) => " &middot; permanent mapping".to_string(),
        ("gateway", _, false) => " &middot; <span class=\"bad\">no mapping now</span>".to_string(),
        _ => String::new(),
    };
    let public = if f.public == Some(false) {
        " &middot; <span class=\"bad\">not public (double NAT)</span>"
    } else {
        ""
    };
    writeln!(
        h,
        "<dt>External</dt><dd>{}{lease}{public}</dd>",
        f.external.as_ref().map_or("none".to_string(), |e| format!(
            "<code>{}</code>",
            escape(e)
        ))
    )?;
    let t = &s.totals;
    writeln!(
        h,
        "<dt>Up</dt><dd>{} &middot; version {} &middot; {}, {}, {}, {} refused, {} shed</dd>",
        ago(s.router.uptime_seconds),
        escape(&s.router.version),
        count(t.sessions, "session", "sessions"),
        count(t.replicas, "replica", "replicas"),
        count(t.messages_stamped, "message", "messages"),
        t.refusals,
        t.connections_shed
    )?;
    writeln!(h, "</dl></section>")?;
    Ok(())
}

fn write_cluster(h: &mut String, c: &crate::cluster::ClusterView) -> fmt::Result {
    writeln!(
        h,
        r#"<section class="card"><h2>Cluster <code>{}</code> <span class="count">{}</span></h2>"#,
        escape(&c.name),
        c.routers.len()
    )?;
    if !c.lease {
        writeln!(
            h,
            r#"<p class="bad">This router has lost its cluster lease: it serves no island until it has a new one.</p>"#
        )?;
    }
    writeln!(h, "<dl>")?;
    for r in &c.routers {
        let homes = c.islands.iter().filter(|i| i.home == r.id).count();
        writeln!(
            h,
            "<dt><code>{}</code>{}</dt><dd>{} &middot; {}, {} &middot; home of {}{}</dd>",
            escape(&r.id),
            if r.here { " (this router)" } else { "" },
            r.contacts
                .iter()
                .map(|a| format!("<code>{}</code>", escape(a)))
                .collect::<Vec<_>>()
                .join(" "),
            count(r.sessions, "session", "sessions"),
            count(r.replicas, "replica", "replicas"),
            count(homes as u64, "island", "islands"),
            if r.draining { " &middot; draining" } else { "" }
        )?;
    }
    writeln!(h, "</dl></section>")
}

fn write_islands(h: &mut String, islands: &[Island]) -> fmt::Result {
    writeln!(
        h,
        r#"<section class="card"><h2>Islands <span class="count">{}</span></h2>"#,
        islands.len()
    )?;
    if islands.is_empty() {
        writeln!(
            h,
            r#"<p class="none">No island is live on this router.</p>"#
        )?;
    }
    for i in islands {
        let title = if i.name.is_empty() {
            "<i>unnamed island</i>".to_string()
        } else {
            escape(&i.name)
        };
        let kind = if i.lan_open { "LAN-open" } else { "private" };
        writeln!(
            h,
            r#"<article class="island" data-session="{}"><h3>{title} <span class="tag">{kind}</span></h3>"#,
            escape(&i.session)
        )?;
        writeln!(
            h,
            r#"<p class="facts">seq <b class="seq">{}</b> &middot; <span class="rate">{}</span> msgs/s &middot; up {} &middot; <code class="sid">{}</code></p>"#,
            i.seq,
            rate(i.msgs_per_sec),
            ago(i.age_seconds),
            escape(&i.session)
        )?;
        if i.members.is_empty() {
            writeln!(
                h,
                r#"<p class="none">Nobody is attached; the island lingers.</p>"#
            )?;
        } else {
            writeln!(h, r#"<ul class="members">"#)?;
            for m in &i.members {
                let name = if m.name.is_empty() {
                    "<i>no name</i>".to_string()
                } else {
                    escape(&m.name)
                };
                writeln!(
                    h,
                    r#"<li><span class="name">{name}</span> <span class="since">{}{}</span></li>"#,
                    ago(m.connected_seconds),
                    if m.resumed { ", resumed" } else { "" }
                )?;
            }
            writeln!(h, "</ul>")?;
        }
        if let Some(card) = &i.postcard {
            writeln!(
                h,
                r#"<div class="postcard"><label>Participant postcard</label><textarea readonly rows="2">{}</textarea><button type="button" class="copy" data-copy="{}">Copy</button></div>"#,
                escape(card),
                escape(card)
            )?;
        }
        writeln!(h, "</article>")?;
    }
    writeln!(h, "</section>")?;
    Ok(())
}

fn write_events(h: &mut String, s: &Status) -> fmt::Result {
    for (title, list, empty) in [
        ("Recent refusals", &s.recent_refusals, "No refusals."),
        (
            "Recent divergences",
            &s.recent_divergences,
            "No divergences.",
        ),
    ] {
        writeln!(h, r#"<section class="card"><h2>{title}</h2>"#)?;
        if list.is_empty() {
            writeln!(h, r#"<p class="none">{empty}</p>"#)?;
        } else {
            writeln!(h, "<table><tr><th>when</th><th>island</th><th>code</th><th>who</th><th>what</th></tr>")?;
            for e in list {
                writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    when(e.at),
                    escape(&e.island),
                    e.code.map_or(String::new(), |c| format!(
                        "{c} {}",
                        escape(e.code_name.as_deref().unwrap_or(""))
                    )),
                    escape(&e.who),
                    escape(&e.what)
                )?;
            }
            writeln!(h, "</table>")?;
        }
        writeln!(h, "</section>")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_in_the_page() {
        assert_eq!(
            escape(r#"<b a="x">&'"#),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn counts_read_well() {
        assert_eq!(count(1, "session", "sessions"), "1 session");
        assert_eq!(count(0, "session", "sessions"), "0 sessions");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(ago(5.2), "5 s");
        assert_eq!(ago(301.0), "5 min");
        assert_eq!(ago(3.0 * 3600.0 + 1200.0), "3 h 20 min");
        assert_eq!(ago(2.0 * 86_400.0 + 4.0 * 3600.0), "2 d 4 h");
    }

    #[test]
    fn rates_are_measured_between_readings() {
        let rates = Rates::default();
        let id = SessionId(uuid::Uuid::new_v4());
        let t0 = Instant::now();
        assert_eq!(
            rates.rate(id, 100, 10.0, t0),
            10.0,
            "lifetime average first"
        );
        let t1 = t0 + std::time::Duration::from_secs(2);
        assert_eq!(rates.rate(id, 160, 12.0, t1), 30.0);
        assert_eq!(
            rates.rate(id, 170, 12.1, t1 + std::time::Duration::from_millis(100)),
            30.0
        );
        rates.keep_only(&HashSet::new());
        assert!(lock(&rates.0).is_empty());
    }

    #[test]
    fn only_names_a_local_network_owns_pass_the_rebinding_check() {
        for ok in [
            "127.0.0.1:7470",
            "192.168.1.5",
            "[::1]:7470",
            "[fe80::1]",
            "[fe80::1%25eth0]:7470",
            "localhost:7470",
            "cabin",
            "cabin:7470",
            "cabin.local",
            "Cabin.Local.:7470",
            "nas.home.arpa",
            "router.lan",
        ] {
            assert!(local_host_name(ok), "{ok}");
        }
        for no in [
            "evil.example",
            "rebind.attacker.com:7470",
            "192.168.1.5.nip.io",
            "local.example.com",
            "[::1",
            "",
            ":7470",
        ] {
            assert!(!local_host_name(no), "{no}");
        }
    }

    #[test]
    fn the_access_setting_round_trips() {
        for a in [StatusAccess::Lan, StatusAccess::Any, StatusAccess::None] {
            assert_eq!(a.to_string().parse::<StatusAccess>(), Ok(a));
        }
        assert!("world".parse::<StatusAccess>().is_err());
    }
}
