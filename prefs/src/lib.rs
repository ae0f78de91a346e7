//! # isthmus-prefs
//!
//! Owns the saved configuration profiles file (`prefs.toml`): where it lives, loading it,
//! validating it with errors that name the file, the line and what is allowed, and saving edits
//! atomically while keeping the user's comments. It has no internal dependencies; the `isthmus`
//! binary turns a [`Profile`] into dispatcher configuration.
//!
//! ```toml
//! # Which profile `isthmus router` uses without --profile.
//! default = "home"
//!
//! [profiles.home]
//! forwarding = "upnp"        # lan-only | manual | auto | pcp | natpmp | upnp
//! upnp.lease_secs = 3600
//! upnp.fallback = "lan-only" # lan-only | fail
//!
//! [profiles.office]
//! forwarding = "manual"
//! external = "203.0.113.7:7470"
//! ```
//!
//! Three profiles are built in and work with no file at all: `lan` (the default), `auto` (ask
//! the home router by PCP, then NAT-PMP, then UPnP) and `upnp`. The `upnp.*` keys (lease,
//! external port, fallback) apply to whichever of the three protocols grants the mapping.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use toml_edit::{DocumentMut, Item, Table, Value};

/// The variable that names the prefs file, below `--prefs` and above the platform default.
pub const PREFS_ENV: &str = "ISTHMUS_PREFS";
/// The profile used when neither `--profile` nor the file's `default` names one.
pub const DEFAULT_PROFILE: &str = "lan";

/// How the router is reachable from outside its LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardingMode {
    /// Reachable on the LAN only.
    LanOnly,
    /// A port was forwarded by hand; `external` says where.
    Manual,
    /// Ask the home router for a mapping with UPnP IGD.
    Upnp,
    /// Ask the home router with PCP, then NAT-PMP, then UPnP IGD; keep the first that grants.
    Auto,
    /// Ask the home router with PCP (RFC 6887) only.
    Pcp,
    /// Ask the home router with NAT-PMP (RFC 6886) only.
    NatPmp,
}

impl ForwardingMode {
    /// The name in the file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ForwardingMode::LanOnly => "lan-only",
            ForwardingMode::Manual => "manual",
            ForwardingMode::Upnp => "upnp",
            ForwardingMode::Auto => "auto",
            ForwardingMode::Pcp => "pcp",
            ForwardingMode::NatPmp => "natpmp",
        }
    }

    /// The mode a name stands for.
    pub fn from_name(name: &str) -> Option<ForwardingMode> {
        [
            ForwardingMode::LanOnly,
            ForwardingMode::Manual,
            ForwardingMode::Upnp,
            ForwardingMode::Auto,
            ForwardingMode::Pcp,
            ForwardingMode::NatPmp,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// What to do when UPnP cannot give a usable mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Carry on reachable on the LAN only, with a warning.
    LanOnly,
    /// Exit with an error.
    Fail,
}

/// Who may create islands on the router (the dispatcher's create policy), and who may see its
/// status page and metrics (`status_from`): the same three audiences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// Peers on loopback or the router's own subnets (the router's default).
    Lan,
    /// Anyone who reaches the router.
    Any,
    /// Nobody.
    None,
}

/// Port-mapping settings of a profile (UPnP, PCP and NAT-PMP alike; the description is UPnP's
/// only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpnpPrefs {
    /// Lease asked for, in seconds.
    pub lease_secs: Option<u32>,
    /// External port wanted (the router port when unset).
    pub external_port: Option<u16>,
    /// The mapping's description on the gateway.
    pub description: Option<String>,
    /// What to do when mapping fails.
    pub fallback: Option<Fallback>,
}

/// Limits of a profile (see docs/protocol.md for what each bounds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitPrefs {
    /// Connections open at once.
    pub max_connections: Option<u64>,
    /// Largest frame body.
    pub max_frame_bytes: Option<u64>,
    /// Largest payload of one send.
    pub max_payload_bytes: Option<u64>,
    /// Bytes queued to one replica before it is a slow consumer.
    pub max_outbound_bytes: Option<u64>,
    /// History entries kept since the newest snapshot.
    pub max_history_messages: Option<u64>,
    /// History bytes kept since the newest snapshot.
    pub max_history_bytes: Option<u64>,
    /// Largest snapshot accepted.
    pub max_snapshot_bytes: Option<u64>,
    /// Time for preamble and hello.
    pub handshake_timeout_ms: Option<u64>,
    /// Silence after which a replica is dropped.
    pub idle_timeout_ms: Option<u64>,
    /// Sessions alive at once.
    pub max_sessions: Option<u64>,
    /// Connections open at once from one source address.
    pub max_connections_per_ip: Option<u64>,
    /// Handshakes in progress at once from one source address.
    pub max_handshakes_per_ip: Option<u64>,
    /// MiB for every session's history and snapshots together.
    pub memory_budget_mb: Option<u64>,
    /// The shortest tick interval a creator or admin may ask for, in ms.
    pub min_tick_ms: Option<u64>,
}

/// The Croquet front door of a profile (see docs/croquet.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CroquetPrefs {
    /// Serve Croquet / Multisynq clients (default true).
    pub enabled: Option<bool>,
    /// A static web app directory served from the router's port.
    pub web: Option<String>,
    /// Where the file store keeps snapshots and persistent data.
    pub data_dir: Option<String>,
    /// apiKeys accepted in JOIN, comma-separated; unset lets the create policy decide.
    pub api_keys: Option<String>,
    /// Largest uploaded file, MiB.
    pub max_file_mb: Option<u64>,
    /// Largest file store, MiB.
    pub max_store_mb: Option<u64>,
}

/// The router cluster a profile joins (see docs/scale-out.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterPrefs {
    /// etcd's client URL list, `etcd://HOST:PORT[,HOST:PORT...]`; unset runs alone.
    pub etcd: Option<String>,
    /// The cluster's name (default "default"): routers with the same etcd and name form one
    /// cluster.
    pub name: Option<String>,
}

/// One profile. Unset fields take the router's defaults; command-line flags override both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// The forwarding mode.
    pub forwarding: Option<ForwardingMode>,
    /// The external address of a manual forward.
    pub external: Option<SocketAddr>,
    /// Router TCP port.
    pub port: Option<u16>,
    /// Listen address.
    pub listen: Option<IpAddr>,
    /// LAN beacon on or off.
    pub beacon: Option<bool>,
    /// LAN beacon UDP port.
    pub beacon_port: Option<u16>,
    /// Milliseconds between beacons.
    pub beacon_interval_ms: Option<u64>,
    /// Idle milliseconds before a tick.
    pub tick_ms: Option<u64>,
    /// Milliseconds an empty session lingers.
    pub linger_ms: Option<u64>,
    /// Who may create islands.
    pub create: Option<CreateMode>,
    /// Who may see the status page, its JSON and `/metrics`.
    pub status_from: Option<CreateMode>,
    /// UPnP settings.
    pub upnp: UpnpPrefs,
    /// Limits.
    pub limits: LimitPrefs,
    /// The Croquet front door.
    pub croquet: CroquetPrefs,
    /// The router cluster.
    pub cluster: ClusterPrefs,
}

/// Everything that can go wrong with the prefs file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefsError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: not valid TOML: {message}", path.display())]
    Syntax {
        /// Which file.
        path: PathBuf,
        /// The parser's words, with line and column.
        message: String,
    },
    /// A key or value the file may not have.
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// 1-based line of the offending key.
        line: usize,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// No profile of that name.
    #[error("no profile named {name:?} (known: {})", known.join(", "))]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// What exists.
        known: Vec<String>,
    },
    /// A bad `prefs set` or `prefs remove`.
    #[error("{0}")]
    Edit(String),
    /// No place for the file could be found.
    #[error("cannot tell where the prefs file lives (no config directory); use --prefs PATH or set {PREFS_ENV}")]
    NoPath,
}

/// Settles `external` against `forwarding`: an external address alone means manual forwarding
/// (as `--external` does on the command line); manual needs one; lan-only and UPnP refuse one.
fn forwarding_consistent(name: &str, p: &mut Profile) -> Result<(), String> {
    match (p.forwarding, p.external) {
        (None, Some(_)) => p.forwarding = Some(ForwardingMode::Manual),
        (Some(ForwardingMode::Manual), None) => {
            return Err(format!(
                "profile `{name}` has forwarding = \"manual\" but no `external = \"IP:PORT\"`: say where the port is forwarded (`isthmus prefs set {name} external IP:PORT`)"
            ))
        }
        (Some(ForwardingMode::LanOnly), Some(e)) => {
            return Err(format!(
                "profile `{name}` has forwarding = \"lan-only\" and external = \"{e}\": a LAN-only router has no external address; remove `external`, or set forwarding = \"manual\""
            ))
        }
        (Some(m @ (ForwardingMode::Upnp | ForwardingMode::Auto | ForwardingMode::Pcp | ForwardingMode::NatPmp)), Some(e)) => {
            let how = match m {
                ForwardingMode::Upnp => "with UPnP",
                ForwardingMode::Pcp => "with PCP",
                ForwardingMode::NatPmp => "with NAT-PMP",
                _ => "with auto,"
            };
            return Err(format!(
                "profile `{name}` has forwarding = \"{}\" and external = \"{e}\": {how} the gateway says the external address; remove `external` (or use upnp.external_port to ask for a port), or set forwarding = \"manual\"",
                m.name()
            ))
        }
        _ => {}
    }
    Ok(())
}

/// The platform's place for the file: `$XDG_CONFIG_HOME/isthmus/prefs.toml` on Linux.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("isthmus").join("prefs.toml"))
}

/// `--prefs PATH`, else `$ISTHMUS_PREFS`, else the platform default.
pub fn resolve_path(flag: Option<&Path>) -> Result<PathBuf, PrefsError> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(PREFS_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    default_path().ok_or(PrefsError::NoPath)
}

/// The profiles that exist without any file.
pub fn builtin(name: &str) -> Option<Profile> {
    match name {
        "lan" => Some(Profile {
            forwarding: Some(ForwardingMode::LanOnly),
            ..Profile::default()
        }),
        "auto" => Some(Profile {
            forwarding: Some(ForwardingMode::Auto),
            upnp: UpnpPrefs {
                fallback: Some(Fallback::LanOnly),
                ..UpnpPrefs::default()
            },
            ..Profile::default()
        }),
        "upnp" => Some(Profile {
            forwarding: Some(ForwardingMode::Upnp),
            upnp: UpnpPrefs {
                fallback: Some(Fallback::LanOnly),
                ..UpnpPrefs::default()
            },
            ..Profile::default()
        }),
        _ => None,
    }
}

const BUILTINS: [&str; 3] = ["lan", "auto", "upnp"];

#[derive(Clone, Copy)]
enum Kind {
    Forwarding,
    Fallback,
    Create,
    Addr,
    Ip,
    Port,
    Bool,
    U32,
    /// A whole number within an inclusive range.
    Range(u64, u64),
    Text,
    /// A longer string: a path or a list.
    LongText,
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    EtcdUrl,
    /// A cluster name: 1 to 64 of letters, digits, `-`, `_`, `.`.
    ClusterName,
}

impl Kind {
    fn allowed(self) -> String {
        match self {
            Kind::Forwarding => {
                "\"lan-only\", \"manual\", \"auto\", \"pcp\", \"natpmp\" or \"upnp\"".into()
            }
            Kind::Fallback => "\"lan-only\" or \"fail\"".into(),
            Kind::Create => "\"lan\", \"any\" or \"none\"".into(),
            Kind::Addr => "an \"IP:PORT\" string".into(),
            Kind::Ip => "an IP address string, e.g. \"0.0.0.0\"".into(),
            Kind::Port => "a whole number from 1 to 65535".into(),
            Kind::Bool => "true or false".into(),
            Kind::U32 => "a whole number from 1 to 4294967295".into(),
            Kind::Range(lo, hi) => format!("a whole number from {lo} to {hi}"),
            Kind::Text => "a string of at most 64 characters".into(),
            Kind::LongText => "a non-empty string of at most 4096 characters".into(),
            Kind::EtcdUrl => {
                "an \"etcd://HOST:PORT\" string (several: \"etcd://HOST:PORT,HOST:PORT\")".into()
            }
            Kind::ClusterName => "a name of 1 to 64 letters, digits, '-', '_' or '.'".into(),
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// The smallest `limits.max_frame_bytes`: a frame must hold the largest hello (the wire's
/// `MAX_HELLO_BYTES`).
pub const MIN_FRAME_BYTES: u64 = 4096;
/// The largest `limits.max_frame_bytes` (the wire's `HARD_MAX_FRAME_BYTES`).
pub const MAX_FRAME_BYTES: u64 = 16 * MIB;

/// Every key a profile may have.
const KEYS: &[(&str, Kind)] = &[
    ("forwarding", Kind::Forwarding),
    ("external", Kind::Addr),
    // 0 asks the system for a free port, as `--port 0` does.
    ("port", Kind::Range(0, 65535)),
    ("listen", Kind::Ip),
    ("beacon", Kind::Bool),
    ("beacon_port", Kind::Port),
    ("beacon_interval_ms", Kind::Range(100, 3_600_000)),
    ("tick_ms", Kind::Range(1, 60_000)),
    ("linger_ms", Kind::Range(1, 86_400_000)),
    ("create", Kind::Create),
    ("status_from", Kind::Create),
    ("upnp.lease_secs", Kind::U32),
    ("upnp.external_port", Kind::Port),
    ("upnp.description", Kind::Text),
    ("upnp.fallback", Kind::Fallback),
    ("limits.max_connections", Kind::Range(1, 1_000_000)),
    (
        "limits.max_frame_bytes",
        Kind::Range(MIN_FRAME_BYTES, MAX_FRAME_BYTES),
    ),
    ("limits.max_payload_bytes", Kind::Range(1, MAX_FRAME_BYTES)),
    (
        "limits.max_outbound_bytes",
        Kind::Range(64 * 1024, 4096 * MIB),
    ),
    ("limits.max_history_messages", Kind::Range(16, 100_000_000)),
    (
        "limits.max_history_bytes",
        Kind::Range(64 * 1024, 64 * 1024 * MIB),
    ),
    ("limits.max_snapshot_bytes", Kind::Range(4096, 4096 * MIB)),
    ("limits.handshake_timeout_ms", Kind::Range(100, 600_000)),
    ("limits.idle_timeout_ms", Kind::Range(1_000, 86_400_000)),
    ("limits.max_sessions", Kind::Range(1, 1_000_000)),
    ("limits.max_connections_per_ip", Kind::Range(1, 1_000_000)),
    ("limits.max_handshakes_per_ip", Kind::Range(1, 100_000)),
    ("limits.memory_budget_mb", Kind::Range(16, 1024 * 1024)),
    ("limits.min_tick_ms", Kind::Range(1, 60_000)),
    ("croquet.enabled", Kind::Bool),
    ("croquet.web", Kind::LongText),
    ("croquet.data_dir", Kind::LongText),
    ("croquet.api_keys", Kind::LongText),
    ("croquet.max_file_mb", Kind::Range(1, 4096)),
    ("croquet.max_store_mb", Kind::Range(16, 1024 * 1024)),
    ("cluster.etcd", Kind::EtcdUrl),
    ("cluster.name", Kind::ClusterName),
];

/// Checks a number given for `key` on the command line against the range the file allows, so
/// flags and profiles obey the same bounds. `Err` says what is allowed.
pub fn check_number(key: &str, n: u64) -> Result<(), String> {
    match kind_of(key) {
        Some(Kind::Range(lo, hi)) if (lo..=hi).contains(&n) => Ok(()),
        Some(kind @ Kind::Range(..)) => Err(format!("must be {}, not {n}", kind.allowed())),
        _ => Err(format!("`{key}` is not a numeric setting")),
    }
}

/// The names a profile may set, for help text.
pub fn keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(k, _)| *k)
}

fn kind_of(key: &str) -> Option<Kind> {
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, kind)| *kind)
}

/// A value of the right kind, or what is wrong with it.
fn check(kind: Kind, v: &Value) -> Result<(), String> {
    let ok = match kind {
        Kind::Forwarding => v
            .as_str()
            .is_some_and(|s| ForwardingMode::from_name(s).is_some()),
        Kind::Fallback => v.as_str().is_some_and(|s| matches!(s, "lan-only" | "fail")),
        Kind::Create => v
            .as_str()
            .is_some_and(|s| matches!(s, "lan" | "any" | "none")),
        Kind::Addr => v.as_str().is_some_and(|s| s.parse::<SocketAddr>().is_ok()),
        Kind::Ip => v.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        Kind::Port => v.as_integer().is_some_and(|n| (1..=65535).contains(&n)),
        Kind::Bool => v.as_bool().is_some(),
        Kind::U32 => v
            .as_integer()
            .is_some_and(|n| (1..=i64::from(u32::MAX)).contains(&n)),
        Kind::Range(lo, hi) => v
            .as_integer()
            .and_then(|n| u64::try_from(n).ok())
            .is_some_and(|n| (lo..=hi).contains(&n)),
        Kind::Text => v.as_str().is_some_and(|s| s.chars().count() <= 64),
        Kind::LongText => v
            .as_str()
            .is_some_and(|s| !s.is_empty() && s.chars().count() <= 4096),
        Kind::EtcdUrl => v.as_str().is_some_and(is_etcd_url),
        Kind::ClusterName => v.as_str().is_some_and(|s| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be {}, not {}",
            kind.allowed(),
            v.to_string().trim()
        ))
    }
}

/// `etcd://HOST:PORT[,HOST:PORT...]`, each port 1 to 65535 (the router checks it again, with
/// the same rules, in `isthmus_cluster::member::parse_url`).
fn is_etcd_url(s: &str) -> bool {
    s.len() <= 4096
        && s.strip_prefix("etcd://").is_some_and(|rest| {
            rest.split(',').all(|part| {
                let part = part.trim().trim_end_matches('/');
                part.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && host.bytes().all(|b| {
                            b.is_ascii_alphanumeric()
                                || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
                        })
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                })
            })
        })
}

fn apply(p: &mut Profile, key: &str, v: &Value) {
    let s = || v.as_str().unwrap_or_default().to_string();
    let n = || v.as_integer().unwrap_or_default() as u64;
    match key {
        "forwarding" => {
            p.forwarding = Some(
                v.as_str()
                    .and_then(ForwardingMode::from_name)
                    .unwrap_or(ForwardingMode::LanOnly),
            )
        }
        "external" => p.external = s().parse().ok(),
        "port" => p.port = Some(n() as u16),
        "listen" => p.listen = s().parse().ok(),
        "beacon" => p.beacon = v.as_bool(),
        "beacon_port" => p.beacon_port = Some(n() as u16),
        "beacon_interval_ms" => p.beacon_interval_ms = Some(n()),
        "tick_ms" => p.tick_ms = Some(n()),
        "linger_ms" => p.linger_ms = Some(n()),
        "create" => {
            p.create = Some(match v.as_str() {
                Some("any") => CreateMode::Any,
                Some("none") => CreateMode::None,
                _ => CreateMode::Lan,
            })
        }
        "status_from" => {
            p.status_from = Some(match v.as_str() {
                Some("any") => CreateMode::Any,
                Some("none") => CreateMode::None,
                _ => CreateMode::Lan,
            })
        }
        "upnp.lease_secs" => p.upnp.lease_secs = Some(n() as u32),
        "upnp.external_port" => p.upnp.external_port = Some(n() as u16),
        "upnp.description" => p.upnp.description = Some(s()),
        "upnp.fallback" => {
            p.upnp.fallback = Some(if v.as_str() == Some("fail") {
                Fallback::Fail
            } else {
                Fallback::LanOnly
            })
        }
        "limits.max_connections" => p.limits.max_connections = Some(n()),
        "limits.max_frame_bytes" => p.limits.max_frame_bytes = Some(n()),
        "limits.max_payload_bytes" => p.limits.max_payload_bytes = Some(n()),
        "limits.max_outbound_bytes" => p.limits.max_outbound_bytes = Some(n()),
        "limits.max_history_messages" => p.limits.max_history_messages = Some(n()),
        "limits.max_history_bytes" => p.limits.max_history_bytes = Some(n()),
        "limits.max_snapshot_bytes" => p.limits.max_snapshot_bytes = Some(n()),
        "limits.handshake_timeout_ms" => p.limits.handshake_timeout_ms = Some(n()),
        "limits.idle_timeout_ms" => p.limits.idle_timeout_ms = Some(n()),
        "limits.max_sessions" => p.limits.max_sessions = Some(n()),
        "limits.max_connections_per_ip" => p.limits.max_connections_per_ip = Some(n()),
        "limits.max_handshakes_per_ip" => p.limits.max_handshakes_per_ip = Some(n()),
        "limits.memory_budget_mb" => p.limits.memory_budget_mb = Some(n()),
        "limits.min_tick_ms" => p.limits.min_tick_ms = Some(n()),
        "croquet.enabled" => p.croquet.enabled = v.as_bool(),
        "croquet.web" => p.croquet.web = Some(s()),
        "croquet.data_dir" => p.croquet.data_dir = Some(s()),
        "croquet.api_keys" => p.croquet.api_keys = Some(s()),
        "croquet.max_file_mb" => p.croquet.max_file_mb = Some(n()),
        "croquet.max_store_mb" => p.croquet.max_store_mb = Some(n()),
        "cluster.etcd" => p.cluster.etcd = Some(s()),
        "cluster.name" => p.cluster.name = Some(s()),
        _ => {}
    }
}

/// The loaded file (or nothing, when there is none).
#[derive(Debug)]
pub struct Prefs {
    path: PathBuf,
    doc: DocumentMut,
    default: Option<String>,
    profiles: BTreeMap<String, Profile>,
}

fn line_of(text: &str, offset: Option<std::ops::Range<usize>>) -> usize {
    offset.map_or(1, |r| {
        text[..r.start.min(text.len())].matches('\n').count() + 1
    })
}

impl Prefs {
    /// Reads and validates the file at `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Prefs, PrefsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(PrefsError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(path, &text)
    }

    /// Validates `text` as the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Prefs, PrefsError> {
        let parsed = toml_edit::Document::parse(text).map_err(|e| PrefsError::Syntax {
            path: path.into(),
            message: e.to_string().trim().to_string(),
        })?;
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| PrefsError::Invalid {
            path: path.into(),
            line: line_of(text, span),
            message,
        };
        let mut default = None;
        let mut profiles = BTreeMap::new();
        for (key, item) in parsed.as_table().iter() {
            let span = parsed.as_table().key(key).and_then(|k| k.span());
            match key {
                "default" => match item.as_str() {
                    Some(name) => default = Some((name.to_string(), span)),
                    None => {
                        return Err(invalid(span, "`default` must be a profile name string".into()))
                    }
                },
                "profiles" => {
                    let Some(table) = item.as_table_like() else {
                        return Err(invalid(span, "`profiles` must be a table of profiles".into()));
                    };
                    for (name, body) in table.iter() {
                        let name_span = table.key(name).and_then(|k| k.span());
                        let Some(body) = body.as_table_like() else {
                            return Err(invalid(
                                name_span,
                                format!("profile `{name}` must be a table ([profiles.{name}])"),
                            ));
                        };
                        let mut profile = Profile::default();
                        let mut flat = Vec::new();
                        flatten("", body, &mut flat);
                        for (k, value, kspan) in flat {
                            let Some(kind) = kind_of(&k) else {
                                return Err(invalid(
                                    kspan,
                                    format!(
                                        "unknown key `{k}` in profile `{name}`; allowed: {}",
                                        keys().collect::<Vec<_>>().join(", ")
                                    ),
                                ));
                            };
                            let Some(value) = value else {
                                return Err(invalid(kspan, format!("`{k}` {}", kind.allowed())));
                            };
                            check(kind, &value).map_err(|m| {
                                invalid(kspan, format!("`{k}` in profile `{name}` {m}"))
                            })?;
                            apply(&mut profile, &k, &value);
                        }
                        if let Err(m) = forwarding_consistent(name, &mut profile) {
                            return Err(invalid(name_span, m));
                        }
                        profiles.insert(name.to_string(), profile);
                    }
                }
                other => {
                    return Err(invalid(
                        span,
                        format!("unknown key `{other}`; the file holds `default = \"NAME\"` and [profiles.NAME] tables"),
                    ))
                }
            }
        }
        let default = match default {
            Some((name, span)) => {
                if !profiles.contains_key(&name) && builtin(&name).is_none() {
                    return Err(invalid(
                        span,
                        format!("`default` names {name:?}, which is not a profile"),
                    ));
                }
                Some(name)
            }
            None => None,
        };
        Ok(Prefs {
            path: path.into(),
            doc: parsed.into_mut(),
            default,
            profiles,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The profile used without `--profile`.
    pub fn default_name(&self) -> &str {
        self.default.as_deref().unwrap_or(DEFAULT_PROFILE)
    }

    /// Every profile name, with whether it is built in and whether the file sets it.
    pub fn names(&self) -> Vec<(String, bool, bool)> {
        let mut names: Vec<String> = BUILTINS.iter().map(|s| s.to_string()).collect();
        names.extend(self.profiles.keys().cloned());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let b = builtin(&n).is_some();
                let f = self.profiles.contains_key(&n);
                (n, b, f)
            })
            .collect()
    }

    /// A profile by name; one in the file replaces a built-in of the same name.
    pub fn profile(&self, name: &str) -> Result<Profile, PrefsError> {
        if let Some(p) = self.profiles.get(name) {
            return Ok(p.clone());
        }
        builtin(name).ok_or_else(|| PrefsError::UnknownProfile {
            name: name.into(),
            known: self.names().into_iter().map(|(n, _, _)| n).collect(),
        })
    }

    /// Sets `key` of profile `name` (creating it) from the text `value`, keeping the rest of the
    /// file as it was. The result is validated before it is accepted.
    pub fn set(&mut self, name: &str, key: &str, value: &str) -> Result<(), PrefsError> {
        let kind = kind_of(key).ok_or_else(|| {
            PrefsError::Edit(format!(
                "unknown key `{key}`; allowed: {}",
                keys().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if name.is_empty() || name.contains(['.', '"', '[', ']']) {
            return Err(PrefsError::Edit(format!(
                "{name:?} is not a usable profile name"
            )));
        }
        let v: Value = match kind {
            Kind::Port | Kind::U32 | Kind::Range(..) => value
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| PrefsError::Edit(format!("`{key}` must be {}", kind.allowed())))?,
            Kind::Bool => value
                .trim()
                .parse::<bool>()
                .map(Value::from)
                .map_err(|_| PrefsError::Edit(format!("`{key}` must be {}", kind.allowed())))?,
            _ => Value::from(value),
        };
        check(kind, &v).map_err(|m| PrefsError::Edit(format!("`{key}` {m}")))?;
        let mut doc = self.doc.clone();
        let profiles = doc
            .entry("profiles")
            .or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            })
            .as_table_mut()
            .ok_or_else(|| PrefsError::Edit("`profiles` in the file is not a table".into()))?;
        let mut table = profiles
            .entry(name)
            .or_insert_with(|| Item::Table(Table::new()))
            .as_table_like_mut()
            .ok_or_else(|| PrefsError::Edit(format!("profile `{name}` is not a table")))?;
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().unwrap_or(key);
        for part in parts {
            table = table
                .entry(part)
                .or_insert(Item::Table(Table::new()))
                .as_table_like_mut()
                .ok_or_else(|| {
                    PrefsError::Edit(format!("`{part}` in profile `{name}` is not a table"))
                })?;
        }
        table.insert(leaf, Item::Value(v));
        // A line number would point into a file that may not exist yet: say what to do instead.
        let checked = Self::parse(&self.path, &doc.to_string()).map_err(|e| match e {
            PrefsError::Invalid { message, .. } => PrefsError::Edit(message),
            other => other,
        })?;
        *self = checked;
        Ok(())
    }

    /// Makes `name` the default profile.
    pub fn set_default(&mut self, name: &str) -> Result<(), PrefsError> {
        self.profile(name)?;
        let mut doc = self.doc.clone();
        doc.insert("default", Item::Value(Value::from(name)));
        *self = Self::parse(&self.path, &doc.to_string())?;
        Ok(())
    }

    /// Removes one key from profile `name`, so its default applies again; the rest of the file
    /// (comments included) stays. Refused when the key is not set there, or when the profile
    /// without it would not be valid.
    pub fn unset(&mut self, name: &str, key: &str) -> Result<(), PrefsError> {
        if kind_of(key).is_none() {
            return Err(PrefsError::Edit(format!(
                "unknown key `{key}`; allowed: {}",
                keys().collect::<Vec<_>>().join(", ")
            )));
        }
        let mut doc = self.doc.clone();
        let mut table = doc
            .get_mut("profiles")
            .and_then(|p| p.as_table_like_mut())
            .and_then(|p| p.get_mut(name))
            .and_then(|t| t.as_table_like_mut())
            .ok_or_else(|| {
                PrefsError::Edit(format!(
                    "no profile named {name:?} in {}",
                    self.path.display()
                ))
            })?;
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().unwrap_or(key);
        for part in parts {
            table = table
                .get_mut(part)
                .and_then(|t| t.as_table_like_mut())
                .ok_or_else(|| {
                    PrefsError::Edit(format!("`{key}` is not set in profile `{name}`"))
                })?;
        }
        if table.remove(leaf).is_none() {
            return Err(PrefsError::Edit(format!(
                "`{key}` is not set in profile `{name}`"
            )));
        }
        *self = Self::parse(&self.path, &doc.to_string()).map_err(|e| match e {
            PrefsError::Invalid { message, .. } => PrefsError::Edit(message),
            other => other,
        })?;
        Ok(())
    }

    /// Removes profile `name` from the file.
    pub fn remove(&mut self, name: &str) -> Result<(), PrefsError> {
        if !self.profiles.contains_key(name) {
            return Err(PrefsError::Edit(if builtin(name).is_some() {
                format!("`{name}` is a built-in profile; only profiles in the file can be removed")
            } else {
                format!("no profile named {name:?} in {}", self.path.display())
            }));
        }
        if self.default.as_deref() == Some(name) && builtin(name).is_none() {
            return Err(PrefsError::Edit(format!(
                "`{name}` is the default profile; make another the default first"
            )));
        }
        let mut doc = self.doc.clone();
        if let Some(p) = doc.get_mut("profiles").and_then(|i| i.as_table_like_mut()) {
            p.remove(name);
        }
        *self = Self::parse(&self.path, &doc.to_string())?;
        Ok(())
    }

    /// Writes the file atomically: a temporary file beside it, flushed, then renamed over it.
    pub fn save(&self) -> Result<(), PrefsError> {
        let io = |source| PrefsError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("prefs"),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.doc.to_string().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// The profile as TOML lines, for `prefs show`.
    pub fn render(&self, name: &str) -> Result<String, PrefsError> {
        let p = self.profile(name)?;
        Ok(p.to_string())
    }
}

/// A key as dotted path, its value (None when it is not a plain value) and where it stands.
type FlatEntry = (String, Option<Value>, Option<std::ops::Range<usize>>);

fn flatten(prefix: &str, table: &dyn toml_edit::TableLike, out: &mut Vec<FlatEntry>) {
    for (k, item) in table.iter() {
        let span = table.key(k).and_then(|key| key.span());
        let full = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        match item {
            Item::Value(Value::InlineTable(t)) => flatten(&full, t, out),
            Item::Table(t) => flatten(&full, t, out),
            Item::Value(v) => out.push((full, Some(v.clone()), span)),
            _ => out.push((full, None, span)),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn line<T: fmt::Display>(
            f: &mut fmt::Formatter<'_>,
            k: &str,
            v: &Option<T>,
            quote: bool,
        ) -> fmt::Result {
            match v {
                Some(v) if quote => writeln!(f, "{k} = \"{v}\""),
                Some(v) => writeln!(f, "{k} = {v}"),
                None => Ok(()),
            }
        }
        let fwd = self.forwarding.map(ForwardingMode::name);
        line(f, "forwarding", &fwd, true)?;
        line(f, "external", &self.external, true)?;
        line(f, "port", &self.port, false)?;
        line(f, "listen", &self.listen, true)?;
        line(f, "beacon", &self.beacon, false)?;
        line(f, "beacon_port", &self.beacon_port, false)?;
        line(f, "beacon_interval_ms", &self.beacon_interval_ms, false)?;
        line(f, "tick_ms", &self.tick_ms, false)?;
        line(f, "linger_ms", &self.linger_ms, false)?;
        let audience = |c: CreateMode| match c {
            CreateMode::Lan => "lan",
            CreateMode::Any => "any",
            CreateMode::None => "none",
        };
        line(f, "create", &self.create.map(audience), true)?;
        line(f, "status_from", &self.status_from.map(audience), true)?;
        line(f, "upnp.lease_secs", &self.upnp.lease_secs, false)?;
        line(f, "upnp.external_port", &self.upnp.external_port, false)?;
        line(f, "upnp.description", &self.upnp.description, true)?;
        let fb = self.upnp.fallback.map(|x| match x {
            Fallback::LanOnly => "lan-only",
            Fallback::Fail => "fail",
        });
        line(f, "upnp.fallback", &fb, true)?;
        let l = &self.limits;
        line(f, "limits.max_connections", &l.max_connections, false)?;
        line(f, "limits.max_frame_bytes", &l.max_frame_bytes, false)?;
        line(f, "limits.max_payload_bytes", &l.max_payload_bytes, false)?;
        line(f, "limits.max_outbound_bytes", &l.max_outbound_bytes, false)?;
        line(
            f,
            "limits.max_history_messages",
            &l.max_history_messages,
            false,
        )?;
        line(f, "limits.max_history_bytes", &l.max_history_bytes, false)?;
        line(f, "limits.max_snapshot_bytes", &l.max_snapshot_bytes, false)?;
        line(
            f,
            "limits.handshake_timeout_ms",
            &l.handshake_timeout_ms,
            false,
        )?;
        line(f, "limits.idle_timeout_ms", &l.idle_timeout_ms, false)?;
        line(f, "limits.max_sessions", &l.max_sessions, false)?;
        line(
            f,
            "limits.max_connections_per_ip",
            &l.max_connections_per_ip,
            false,
        )?;
        line(
            f,
            "limits.max_handshakes_per_ip",
            &l.max_handshakes_per_ip,
            false,
        )?;
        line(f, "limits.memory_budget_mb", &l.memory_budget_mb, false)?;
        line(f, "limits.min_tick_ms", &l.min_tick_ms, false)?;
        let c = &self.croquet;
        line(f, "croquet.enabled", &c.enabled, false)?;
        line(f, "croquet.web", &c.web, true)?;
        line(f, "croquet.data_dir", &c.data_dir, true)?;
        line(f, "croquet.api_keys", &c.api_keys, true)?;
        line(f, "croquet.max_file_mb", &c.max_file_mb, false)?;
        line(f, "croquet.max_store_mb", &c.max_store_mb, false)?;
        line(f, "cluster.etcd", &self.cluster.etcd, true)?;
        line(f, "cluster.name", &self.cluster.name, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# my router settings
default = "home"   # used without --profile

[profiles.home]
# ask the box in the hall
forwarding = "upnp"
upnp.lease_secs = 7200
upnp.fallback = "fail"

[profiles.office]
forwarding = "manual"
external = "203.0.113.7:7000"
port = 7471
"#;

    fn load(text: &str) -> Result<Prefs, PrefsError> {
        Prefs::parse(Path::new("/tmp/prefs.toml"), text)
    }

    #[test]
    fn a_good_file_loads_and_builtins_work_without_one() {
        let p = load(SAMPLE).expect("valid");
        assert_eq!(p.default_name(), "home");
        let home = p.profile("home").expect("home");
        assert_eq!(home.forwarding, Some(ForwardingMode::Upnp));
        assert_eq!(home.upnp.lease_secs, Some(7200));
        assert_eq!(home.upnp.fallback, Some(Fallback::Fail));
        let office = p.profile("office").expect("office");
        assert_eq!(
            office.external,
            Some("203.0.113.7:7000".parse().expect("addr"))
        );
        let empty = load("").expect("empty");
        assert_eq!(empty.default_name(), "lan");
        assert_eq!(
            empty.profile("lan").expect("lan").forwarding,
            Some(ForwardingMode::LanOnly)
        );
        assert_eq!(
            empty.profile("upnp").expect("upnp").upnp.fallback,
            Some(Fallback::LanOnly)
        );
        let auto = empty.profile("auto").expect("auto");
        assert_eq!(auto.forwarding, Some(ForwardingMode::Auto));
        assert_eq!(auto.upnp.fallback, Some(Fallback::LanOnly));
        for m in ["auto", "pcp", "natpmp", "upnp", "manual", "lan-only"] {
            let mode = ForwardingMode::from_name(m).expect("a mode");
            assert_eq!(mode.name(), m);
        }
        assert!(matches!(
            empty.profile("nope"),
            Err(PrefsError::UnknownProfile { .. })
        ));
    }

    fn invalid(text: &str) -> (usize, String) {
        match load(text) {
            Err(PrefsError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn cluster_keys_take_an_etcd_url_and_a_name_and_refuse_others() {
        let p =
            load("[profiles.c]\ncluster = { etcd = \"etcd://a:2379,b:2379\", name = \"eu-1\" }\n")
                .expect("valid");
        let c = p.profile("c").expect("c").cluster;
        assert_eq!(c.etcd.as_deref(), Some("etcd://a:2379,b:2379"));
        assert_eq!(c.name.as_deref(), Some("eu-1"));
        for bad in [
            "[profiles.c]\ncluster.etcd = \"http://a:2379\"\n",
            "[profiles.c]\ncluster.etcd = \"etcd://a\"\n",
            "[profiles.c]\ncluster.etcd = \"etcd://a:0\"\n",
            "[profiles.c]\ncluster.name = \"a/b\"\n",
        ] {
            let (line, message) = invalid(bad);
            assert_eq!(line, 2, "{message}");
            assert!(message.contains("must be"), "{message}");
        }
    }

    #[test]
    fn an_external_address_alone_means_manual_and_port_zero_picks_a_free_port() {
        let prefs = Prefs::parse(
            Path::new("p.toml"),
            "[profiles.office]\nexternal = \"203.0.113.7:7470\"\nport = 0\n",
        )
        .expect("valid");
        let p = prefs.profile("office").expect("office");
        assert_eq!(p.forwarding, Some(ForwardingMode::Manual));
        assert_eq!(p.port, Some(0));
    }

    #[test]
    fn unset_removes_one_key_and_keeps_the_rest() {
        let mut prefs = Prefs::parse(
            Path::new("p.toml"),
            "# mine\n[profiles.home]\nexternal = \"203.0.113.7:7470\"\ntick_ms = 30\nupnp.lease_secs = 60\n",
        )
        .expect("valid");
        prefs.unset("home", "external").expect("unset");
        prefs
            .set("home", "forwarding", "lan-only")
            .expect("no contradiction left");
        prefs.unset("home", "upnp.lease_secs").expect("dotted key");
        let p = prefs.profile("home").expect("home");
        assert_eq!(p.external, None);
        assert_eq!(p.tick_ms, Some(30));
        assert_eq!(p.upnp.lease_secs, None);
        assert!(prefs.doc.to_string().contains("# mine"));
        let err = prefs
            .unset("home", "external")
            .expect_err("not set")
            .to_string();
        assert!(err.contains("not set"), "{err}");
    }

    #[test]
    fn setting_manual_on_a_new_profile_says_what_to_set_first() {
        let dir = std::env::temp_dir().join(format!("isthmus-prefs-new-{}", std::process::id()));
        let mut prefs = Prefs::load(&dir.join("absent.toml")).expect("a missing file is empty");
        let err = prefs
            .set("office", "forwarding", "manual")
            .expect_err("manual needs external")
            .to_string();
        assert!(!err.contains("line"), "{err}");
        assert!(err.contains("prefs set office external"), "{err}");
        prefs
            .set("office", "external", "203.0.113.7:7470")
            .expect("external alone");
        prefs
            .set("office", "forwarding", "manual")
            .expect("now manual is fine");
    }

    #[test]
    fn errors_name_the_line_the_key_and_what_is_allowed() {
        let (line, msg) = invalid("[profiles.x]\nport = 80\nforwardng = \"upnp\"\n");
        assert_eq!(line, 3);
        assert!(
            msg.contains("unknown key `forwardng`") && msg.contains("forwarding"),
            "{msg}"
        );
        let (line, msg) = invalid("\n\n[profiles.x]\nforwarding = \"carrier-pigeon\"\n");
        assert_eq!(line, 4);
        assert!(
            msg.contains("\"lan-only\", \"manual\", \"auto\", \"pcp\", \"natpmp\" or \"upnp\""),
            "{msg}"
        );
        let (line, msg) = invalid("[profiles.x]\nport = 99999\n");
        assert_eq!(line, 2);
        assert!(msg.contains("0 to 65535"), "{msg}");
        let (_, msg) = invalid("[profiles.x]\nforwarding = \"manual\"\n");
        assert!(msg.contains("external"), "{msg}");
        let (_, msg) =
            invalid("[profiles.x]\nforwarding = \"lan-only\"\nexternal = \"203.0.113.7:7470\"\n");
        assert!(
            msg.contains("LAN-only router has no external address"),
            "{msg}"
        );
        let (_, msg) =
            invalid("[profiles.x]\nforwarding = \"upnp\"\nexternal = \"203.0.113.7:7470\"\n");
        assert!(msg.contains("with UPnP the gateway says"), "{msg}");
        let (line, msg) = invalid("default = \"ghost\"\n");
        assert_eq!(line, 1);
        assert!(msg.contains("ghost"), "{msg}");
        let (line, msg) =
            invalid("[profiles.x]\nport = 7470\n\n[profiles.x.limits]\nmax_frame_bytes = 10\n");
        assert_eq!(line, 5);
        assert!(
            msg.contains("`limits.max_frame_bytes`") && msg.contains("from 4096 to 16777216"),
            "{msg}"
        );
        let (line, msg) = invalid("[profiles.x]\ncreate = \"everyone\"\n");
        assert_eq!(line, 2);
        assert!(msg.contains("\"lan\", \"any\" or \"none\""), "{msg}");
        let (line, msg) = invalid("[profiles.x]\nlimits.memory_budget_mb = -5\n");
        assert_eq!(line, 2);
        assert!(msg.contains("from 16 to 1048576"), "{msg}");
        let (line, _) = invalid("[profiles.x]\nupnp = { lease_secs = 0 }\n");
        assert_eq!(line, 2);
        assert!(matches!(
            load("[profiles.x\n"),
            Err(PrefsError::Syntax { .. })
        ));
    }

    #[test]
    fn every_limit_has_a_range_and_the_new_settings_load() {
        for key in keys().filter(|k| k.starts_with("limits.")) {
            assert!(
                matches!(kind_of(key), Some(Kind::Range(lo, hi)) if lo >= 1 && lo < hi),
                "{key} has no sane range"
            );
            let (line, msg) = invalid(&format!("[profiles.x]\n{key} = 0\n"));
            assert_eq!(line, 2);
            assert!(msg.contains("a whole number from"), "{key}: {msg}");
        }
        let p = load(
            "[profiles.pub]\ncreate = \"any\"\n[profiles.pub.limits]\nmax_sessions = 50\nmax_connections_per_ip = 8\nmax_handshakes_per_ip = 4\nmemory_budget_mb = 512\nmin_tick_ms = 20\n",
        )
        .expect("valid");
        let pub_ = p.profile("pub").expect("pub");
        assert_eq!(pub_.create, Some(CreateMode::Any));
        let l = &pub_.limits;
        assert_eq!(
            (
                l.max_sessions,
                l.max_connections_per_ip,
                l.max_handshakes_per_ip,
                l.memory_budget_mb,
                l.min_tick_ms
            ),
            (Some(50), Some(8), Some(4), Some(512), Some(20))
        );
        // What is shown loads back to the same profile.
        let shown = format!("[profiles.pub]\n{}", p.render("pub").expect("render"));
        assert_eq!(
            load(&shown).expect("reload").profile("pub").expect("pub"),
            pub_
        );
        assert_eq!(check_number("limits.max_sessions", 10), Ok(()));
        let err = check_number("limits.min_tick_ms", 0).expect_err("out of range");
        assert!(err.contains("from 1 to 60000"), "{err}");
        assert!(check_number("create", 1).is_err());
    }

    #[test]
    fn edits_keep_comments_validate_and_save_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("isthmus").join("prefs.toml");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, SAMPLE).expect("write");
        let mut p = Prefs::load(&path).expect("load");
        p.set("home", "upnp.lease_secs", "600").expect("set");
        p.set("cabin", "forwarding", "manual")
            .expect_err("manual needs external");
        p.set("cabin", "external", "198.51.100.4:7470")
            .expect("set");
        p.set("cabin", "forwarding", "manual").expect("set");
        p.set("cabin", "beacon", "false").expect("set");
        p.set("cabin", "create", "none").expect("set");
        p.set("cabin", "status_from", "any").expect("set");
        assert!(matches!(
            p.set("cabin", "status_from", "world"),
            Err(PrefsError::Edit(_))
        ));
        let e = p
            .set("cabin", "limits.max_frame_bytes", "10")
            .expect_err("too small");
        assert!(e.to_string().contains("from 4096 to"), "{e}");
        assert!(matches!(
            p.set("cabin", "port", "http"),
            Err(PrefsError::Edit(_))
        ));
        assert!(matches!(
            p.set("cabin", "colour", "red"),
            Err(PrefsError::Edit(_))
        ));
        p.save().expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("# my router settings"));
        assert!(text.contains("# ask the box in the hall"));
        assert!(text.contains("# used without --profile"));
        let again = Prefs::load(&path).expect("reload");
        assert_eq!(
            again.profile("home").expect("home").upnp.lease_secs,
            Some(600)
        );
        let cabin = again.profile("cabin").expect("cabin");
        assert_eq!(cabin.forwarding, Some(ForwardingMode::Manual));
        assert_eq!(cabin.beacon, Some(false));
        assert_eq!(cabin.status_from, Some(CreateMode::Any));
        // No temporary files left behind.
        let left: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");

        let mut again = again;
        assert!(
            again.remove("home").is_err(),
            "the default cannot be removed"
        );
        again.set_default("cabin").expect("default");
        again.remove("home").expect("remove");
        assert!(again.remove("lan").is_err(), "built-ins cannot be removed");
        again.save().expect("save");
        let last = Prefs::load(&path).expect("reload");
        assert_eq!(last.default_name(), "cabin");
        assert!(last.profile("home").is_err());
    }
}
