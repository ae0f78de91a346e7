//! `/metrics`: the router's counters in the OpenMetrics text format, for Prometheus (and in
//! the older Prometheus text format for clients that do not ask for OpenMetrics).
//!
//! Nothing here is counted per message: the sessions count in their own [`RouterStats`]
//! entries, and a scrape reads them all through one [`Collector`]. The names follow
//! Prometheus's conventions: an `isthmus_` prefix, `_total` on counters, base units (seconds,
//! bytes) in the name. Process basics use the standard `process_*` names every Prometheus
//! client library exports, so existing dashboards and alerts work unchanged.

use crate::http::{self, Body, Ctx};
use crate::{External, Shared};
use hyper::{Response, StatusCode};
use isthmus_router::stats::{Histogram, RouterStats, DURATION_BUCKETS};
use isthmus_router::wire::Code;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::SystemTime;

/// The OpenMetrics text format's content type, which Prometheus asks for and understands.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type, for a client that does not ask for OpenMetrics
/// (curl, a browser, `promtool check metrics`, older scrapers).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An admission cap a connection can be turned away at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `max_connections`.
    Connections = 0,
    /// `max_connections_per_ip`.
    ConnectionsPerIp = 1,
    /// `max_handshakes_per_ip`.
    HandshakesPerIp = 2,
}

const LIMIT_NAMES: [&str; 3] = ["connections", "connections_per_ip", "handshakes_per_ip"];

/// What the dispatcher counts itself, beside the sessions' [`RouterStats`].
#[derive(Debug)]
pub(crate) struct Monitor {
    /// Every session's counters and the rarer events.
    pub(crate) stats: Arc<RouterStats>,
    shed: [AtomicU64; 3],
    /// How the external address was obtained, for people ("UPnP, lease 1 h", "LAN-only: ...").
    pub(crate) how: String,
    /// When the router started.
    pub(crate) started: SystemTime,
    /// Message rates per session, for the status page.
    pub(crate) rates: crate::status::Rates,
}

impl Monitor {
    pub(crate) fn new(stats: Arc<RouterStats>, how: String) -> Self {
        Monitor {
            stats,
            shed: Default::default(),
            how,
            started: SystemTime::now(),
            rates: Default::default(),
        }
    }

    /// A connection was turned away at `limit`.
    pub(crate) fn shed(&self, limit: Limit) {
        self.shed[limit as usize].fetch_add(1, Relaxed);
    }

    /// Connections turned away at each limit, by the limit's name.
    pub(crate) fn shed_counts(&self) -> Vec<(&'static str, u64)> {
        LIMIT_NAMES
            .iter()
            .zip(&self.shed)
            .map(|(n, c)| (*n, c.load(Relaxed)))
            .collect()
    }
}

/// The forwarding mode as metrics and the status page name it, with the gateway mapping's state.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ForwardingState {
    /// `lan-only`, `manual` or `gateway` (a mapping asked of the home gateway).
    pub(crate) mode: &'static str,
    /// The protocol that granted the mapping in place (`pcp`, `natpmp`, `upnp`, as the
    /// `--forwarding` flag names them); `None` without one.
    pub(crate) protocol: Option<&'static str>,
    /// The external address published now.
    pub(crate) external: Option<std::net::SocketAddr>,
    /// The mapping's lease; `None` for permanent mappings and other modes.
    pub(crate) lease_seconds: Option<u64>,
    /// Whether a gateway mapping is in place now (false in other modes).
    pub(crate) mapped: bool,
    /// Whether the external address is on the Internet (false under double NAT).
    pub(crate) public: Option<bool>,
}

fn protocol_name(p: crate::portmap::Protocol) -> &'static str {
    use crate::portmap::Protocol;
    match p {
        Protocol::Pcp => "pcp",
        Protocol::NatPmp => "natpmp",
        Protocol::Upnp => "upnp",
    }
}

/// Reads the forwarding state now (a gateway mapping can come and go).
pub(crate) fn forwarding_state(external: &External) -> ForwardingState {
    match external {
        External::None => ForwardingState {
            mode: "lan-only",
            protocol: None,
            external: None,
            lease_seconds: None,
            mapped: false,
            public: None,
        },
        External::Fixed(a) => ForwardingState {
            mode: "manual",
            protocol: None,
            external: Some(*a),
            lease_seconds: None,
            mapped: false,
            public: Some(crate::portmap::is_public(a.ip())),
        },
        External::Mapped(w) => {
            let m = w.borrow().clone();
            ForwardingState {
                mode: "gateway",
                protocol: m.as_ref().map(|m| protocol_name(m.protocol)),
                external: m.as_ref().map(|m| m.external),
                lease_seconds: m.as_ref().and_then(|m| m.lease).map(|l| l.as_secs()),
                mapped: m.is_some(),
                public: m.as_ref().map(|m| m.public),
            }
        }
    }
}

/// Answers `/metrics`.
pub(crate) fn respond(ctx: &Ctx, headers: &hyper::HeaderMap) -> Response<Body> {
    if let Some(refused) = crate::status::refusal(ctx, headers) {
        return refused;
    }
    let openmetrics = headers.get_all(hyper::header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    match render(&ctx.shared) {
        Ok(text) if openmetrics => http::bytes(StatusCode::OK, CONTENT_TYPE, text),
        Ok(text) => http::bytes(StatusCode::OK, TEXT_CONTENT_TYPE, to_text_format(&text)),
        Err(_) => http::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded; this is a bug, please report it\n",
        ),
    }
}

/// OpenMetrics text as the Prometheus text format (0.0.4) has it: a counter family is named
/// with its `_total`, an info family becomes a gauge named with its `_info`, and `# UNIT` and
/// `# EOF` go (the unit is in the names already). Samples read the same in both formats.
/// prometheus-client encodes OpenMetrics only; this small rewrite of its output spares a client
/// that asks for nothing else an `unknown metric type "info"`.
pub(crate) fn to_text_format(openmetrics: &str) -> String {
    let kinds: std::collections::HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let renamed = |name: &str| match kinds.get(name) {
        Some(&"counter") => format!("{name}_total"),
        Some(&"info") => format!("{name}_info"),
        _ => name.to_string(),
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some((name, help)) = line.strip_prefix("# HELP ").and_then(|l| l.split_once(' ')) {
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
        } else if let Some((name, kind)) =
            line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' '))
        {
            let kind = if kind == "info" { "gauge" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
        } else if !(line.starts_with("# UNIT ") || line == "# EOF") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The whole exposition, as a scrape sees it.
pub(crate) fn render(shared: &Arc<Shared>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("isthmus");
    registry.register_collector(Box::new(RouterCollector {
        shared: shared.clone(),
    }));
    let mut process = Registry::default();
    process.register_collector(Box::new(ProcessCollector));
    let mut out = String::new();
    // Two registries so the process metrics keep their standard, unprefixed names; the first
    // is encoded without its end-of-file marker.
    prometheus_client::encoding::text::encode_registry(&mut out, &registry)?;
    prometheus_client::encoding::text::encode(&mut out, &process)?;
    Ok(out)
}

struct RouterCollector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterCollector")
    }
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn gauge<N>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> std::fmt::Result {
    // Per bucket, not cumulative: the encoder sums them into the exposition's `le` counts.
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                *n,
            )
        })
        .collect();
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)
}

fn by_code(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counts: &std::collections::BTreeMap<u16, u64>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (code, n) in counts {
        let labels = [
            ("code", code.to_string()),
            ("name", Code(*code).name().to_string()),
        ];
        ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for RouterCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut e;
        self.encode_traffic(e)?;
        self.encode_events(e)?;
        self.encode_admission_and_forwarding(e)
    }
}

impl RouterCollector {
    /// The gauges of what is live and the per-message counters the sessions keep.
    fn encode_traffic(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let monitor = &self.shared.monitor;
        let (t, sessions) = monitor.stats.totals();
        gauge(
            e,
            "sessions",
            "Sessions alive now (lingering ones included).",
            None,
            sessions as i64,
        )?;
        gauge(
            e,
            "replicas",
            "Replica connections attached to sessions now.",
            None,
            monitor.stats.replicas() as i64,
        )?;
        let open = self.shared.cfg.max_connections.max(1) - self.shared.permits.available_permits();
        gauge(
            e,
            "connections",
            "Connections open now: native replicas, handshakes and HTTP.",
            None,
            open as i64,
        )?;
        counter(
            e,
            "messages_stamped",
            "Messages stamped into an order (replicas' and the router's membership messages).",
            None,
            t.stamped,
        )?;
        counter(
            e,
            "deliveries",
            "Frames handed to replicas' connections: every copy of a message, ticks, sync pieces.",
            None,
            t.deliveries,
        )?;
        counter(
            e,
            "received",
            "Bytes read from attached replicas.",
            Some(&Unit::Bytes),
            t.bytes_in,
        )?;
        counter(
            e,
            "sent",
            "Bytes written to attached replicas.",
            Some(&Unit::Bytes),
            t.bytes_out,
        )?;
        counter(
            e,
            "ticks",
            "Ticks sent to idle sessions (one per tick, whatever the number of replicas).",
            None,
            t.ticks,
        )?;
        Ok(())
    }

    /// Joins, snapshots, closes, refusals, divergences: the rarer events.
    fn encode_events(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let ev = self.shared.monitor.stats.events();
        counter(
            e,
            "snapshot_uploads",
            "Snapshots uploaded by a replica and stored.",
            None,
            ev.snapshots,
        )?;
        histogram(
            e,
            "snapshot_upload_duration",
            "From the snapshot request to its last piece.",
            &ev.upload_durations,
        )?;
        counter(
            e,
            "late_joins",
            "Replicas that joined an island with something to catch up on (a snapshot or stamped messages) and went live.",
            None,
            ev.late_joins,
        )?;
        histogram(
            e,
            "late_join_duration",
            "From a late joiner's hello to its Synced.",
            &ev.join_durations,
        )?;
        counter(
            e,
            "islands_recovered",
            "Islands re-created from their replicas after this router restarted (or took them over).",
            None,
            ev.recoveries,
        )?;
        counter(
            e,
            "resumes",
            "Replicas that resumed after a reconnect.",
            None,
            ev.resumes,
        )?;
        counter(
            e,
            "slow_consumers",
            "Replicas closed because their queue passed its bound (code 1003).",
            None,
            ev.slow_consumers,
        )?;
        counter(
            e,
            "divergences",
            "Checkpoints at which replicas reported different state digests.",
            None,
            ev.divergences,
        )?;
        by_code(
            e,
            "refusals",
            "Hellos and joins refused, by close code.",
            &ev.refusals,
        )?;
        by_code(
            e,
            "closes",
            "Replica connections the router closed, by close code.",
            &ev.closes,
        )?;
        Ok(())
    }

    /// What the admission caps turned away, and how the router is reachable.
    fn encode_admission_and_forwarding(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let monitor = &self.shared.monitor;
        let mut m = e.encode_descriptor(
            "connections_shed",
            "Connections turned away at an admission cap, by cap.",
            None,
            MetricType::Counter,
        )?;
        for (limit, n) in monitor.shed_counts() {
            ConstCounter::new(n).encode(m.encode_family(&[("limit", limit)])?)?;
        }
        let fwd = forwarding_state(&self.shared.external);
        let mut m = e.encode_descriptor(
            "forwarding",
            "How the router is reachable from outside: the mode, and the protocol of a gateway mapping in place.",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&[("mode", fwd.mode), ("protocol", fwd.protocol.unwrap_or(""))])?;
        gauge(
            e,
            "port_mapped",
            "1 while a port mapping by the home gateway (PCP, NAT-PMP or UPnP) is in place (0 otherwise, and in other modes).",
            None,
            i64::from(fwd.mapped),
        )?;
        gauge(
            e,
            "port_mapping_lease",
            "The gateway mapping's lease (0 for a permanent mapping or none).",
            Some(&Unit::Seconds),
            fwd.lease_seconds.unwrap_or(0) as i64,
        )?;
        Ok(())
    }
}

/// `process_*` from `/proc/self`, as Prometheus's own client libraries name them.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(p) = process() else {
            return Ok(());
        };
        let e = &mut e;
        let c = ConstCounter::new(p.cpu_seconds);
        c.encode(e.encode_descriptor(
            "process_cpu",
            "User and system CPU time spent.",
            Some(&Unit::Seconds),
            c.metric_type(),
        )?)?;
        gauge(
            e,
            "process_resident_memory",
            "Resident memory size.",
            Some(&Unit::Bytes),
            p.rss_bytes as i64,
        )?;
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors.",
            None,
            p.open_fds as i64,
        )?;
        gauge(
            e,
            "process_start_time",
            "When the process started, since the Unix epoch.",
            Some(&Unit::Seconds),
            p.start_time,
        )?;
        Ok(())
    }
}

/// The process basics at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Process {
    pub(crate) cpu_seconds: f64,
    pub(crate) rss_bytes: u64,
    pub(crate) open_fds: u64,
    pub(crate) start_time: f64,
}

/// Reads `/proc/self`; `None` where there is none (not Linux).
pub(crate) fn process() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    parse_process(
        &stat,
        &boot,
        &statm,
        fds,
        rustix::param::clock_ticks_per_second(),
        rustix::param::page_size() as u64,
    )
}

fn parse_process(
    stat: &str,
    boot: &str,
    statm: &str,
    fds: u64,
    ticks: u64,
    page: u64,
) -> Option<Process> {
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = ticks.max(1) as f64;
    let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let start_time = btime as f64 + field(22)? as f64 / ticks;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Process {
        cpu_seconds,
        rss_bytes: rss_pages * page,
        open_fds: fds,
        start_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_the_kernel_writes_them() {
        let stat = "4242 (isthmus (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 12345 100000000 2000 18446744073709551615";
        let p = parse_process(
            stat,
            "cpu 1 2 3\nbtime 1700000000\n",
            "25000 2000 300 1 0 500 0\n",
            12,
            100,
            4096,
        )
        .expect("parses");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.start_time, 1_700_000_123.45);
        assert_eq!(p.rss_bytes, 2000 * 4096);
        assert_eq!(p.open_fds, 12);
        assert_eq!(parse_process("garbage", "", "", 0, 100, 4096), None);
    }

    #[test]
    fn openmetrics_is_rewritten_for_the_older_text_format() {
        let om = "# HELP x_ticks Ticks.\n# TYPE x_ticks counter\nx_ticks_total 3\n\
                  # HELP x_fwd How.\n# TYPE x_fwd info\nx_fwd_info{mode=\"lan-only\"} 1\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\nx_up 2\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP x_ticks_total Ticks.\n# TYPE x_ticks_total counter\nx_ticks_total 3\n\
             # HELP x_fwd_info How.\n# TYPE x_fwd_info gauge\nx_fwd_info{mode=\"lan-only\"} 1\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 2\n"
        );
    }

    #[test]
    fn this_process_has_a_plausible_reading() {
        let p = process().expect("Linux has /proc/self");
        assert!(
            p.rss_bytes > 0 && p.open_fds > 0 && p.start_time > 1.6e9,
            "{p:?}"
        );
    }
}
