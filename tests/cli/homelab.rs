//! The home network lab's commands, shared by the UPnP and PCP / NAT-PMP tests: the router on
//! the LAN host from a profile, an island on it, and a remote user joining by postcard.

use crate::proc::Proc;
use isthmus_tests::netns::{HomeNet, GW_WAN_IP, LAN_IP};
use serde_json::Value;

pub(crate) fn in_ns(net: &HomeNet, ns: &str, args: &[&str]) -> Proc {
    crate::proc::in_netns(&net.lab, ns, args)
}

pub(crate) fn prefs_file(net: &HomeNet, text: &str) -> String {
    let path = net.scratch.join("prefs.toml");
    std::fs::write(&path, text).expect("write prefs");
    path.to_string_lossy().into_owned()
}

/// Starts the LAN host's router from a `[profiles.home]` with these settings (beacon off).
pub(crate) fn router_with_profile(net: &HomeNet, settings: &str) -> Proc {
    let prefs = prefs_file(net, &format!("[profiles.home]\n{settings}"));
    let router = in_ns(
        net,
        &net.lan,
        &[
            "--prefs",
            &prefs,
            "router",
            "--profile",
            "home",
            "--no-beacon",
        ],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    router
}

/// Creates an island on the LAN host's router and returns (creator, postcard fields).
pub(crate) fn island(net: &HomeNet, name: &str) -> (Proc, String, Value) {
    let creator = in_ns(
        net,
        &net.lan,
        &[
            "island",
            "new",
            name,
            "--router",
            &format!("{LAN_IP}:7470"),
            "--json",
        ],
    );
    let card = creator.next_line();
    let (status, lines, err) =
        in_ns(net, &net.lan, &["postcard", "show", &card, "--json"]).finish();
    assert!(status.success(), "{err}");
    let fields: Value = serde_json::from_str(&lines[0]).expect("json");
    (creator, card, fields)
}

/// The remote user joins by postcard, sends a line and sees it come back.
pub(crate) fn remote_join(net: &HomeNet, card: &str) {
    let (status, lines, err) = in_ns(
        net,
        &net.wan,
        &[
            "join",
            card,
            "--send",
            "hello from afar",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "remote join failed: {err}");
    let v: Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(v["text"], "hello from afar");
}

/// Adds a second machine to the LAN, played by a second address of the LAN host (10.210.1.3).
pub(crate) fn second_lan_machine(net: &HomeNet) {
    let iface = net.lab.iface_of(&net.lan, LAN_IP);
    net.lab.run(
        &net.lan,
        "ip",
        &["addr", "add", "10.210.1.3/24", "dev", &iface],
    );
}

/// The second LAN machine's router takes external port 7471 by UPnP; ours then asks for the
/// same port with `forwarding` (its log says `label` mapping): it gets another port, the
/// postcard names it, a remote user joins through it, and renewals keep it.
pub(crate) fn a_taken_port_gets_another_that_renewals_keep(
    net: &HomeNet,
    forwarding: &str,
    label: &str,
) {
    let first = in_ns(
        net,
        &net.lan,
        &[
            "router",
            "--forwarding",
            "upnp",
            "--listen",
            "10.210.1.3",
            "--port",
            "7471",
            "--no-beacon",
        ],
    );
    assert_eq!(first.next_line(), "listening on 10.210.1.3:7471");
    assert!(
        net.nat_rules().contains("dnat ip to 10.210.1.3:7471"),
        "{}",
        net.nat_rules()
    );
    let router = router_with_profile(
        net,
        &format!(
            "forwarding = \"{forwarding}\"\nupnp.external_port = 7471\nupnp.lease_secs = 2\nupnp.fallback = \"fail\"\n"
        ),
    );
    let (creator, card, fields) = island(net, "reef");
    let external: std::net::SocketAddr = fields["external"]
        .as_str()
        .expect("an external address")
        .parse()
        .expect("addr");
    assert_eq!(external.ip().to_string(), GW_WAN_IP);
    assert_ne!(external.port(), 7471, "not the taken port");
    remote_join(net, &card);
    // Renewals (every second) keep that port: the postcard already handed out stays good.
    let renewed = format!("{label} mapping renewed");
    router.wait_stderr(&renewed, 3);
    let rule = format!("dport {} dnat ip to {LAN_IP}:7470", external.port());
    assert!(net.nat_rules().contains(&rule), "{}", net.nat_rules());
    remote_join(net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(err.matches(&renewed).count() >= 2, "{err}");
    assert_eq!(
        err.matches(&format!("external={GW_WAN_IP}:")).count(),
        err.matches(&format!("external={external}")).count(),
        "every grant and renewal names the same external port: {err}"
    );
    first.signal("TERM");
    assert!(first.finish().0.success());
    let _ = creator.finish_killed();
}

/// Behind a gateway whose own external address is private (10.99.0.1: double NAT), a router
/// told to map by `forwarding` with `upnp.fallback = "fail"` says so and does not start.
/// Returns its stderr for protocol-specific checks.
pub(crate) fn double_nat_stops_a_strict_router(net: &HomeNet, forwarding: &str) -> String {
    let prefs = prefs_file(
        net,
        &format!("[profiles.strict]\nforwarding = \"{forwarding}\"\nupnp.fallback = \"fail\"\n"),
    );
    let router = in_ns(
        net,
        &net.lan,
        &[
            "--prefs",
            &prefs,
            "router",
            "--profile",
            "strict",
            "--no-beacon",
        ],
    );
    let (status, lines, err) = router.finish();
    assert!(!status.success());
    assert!(lines.is_empty(), "never said it was listening: {lines:?}");
    assert!(
        err.contains("10.99.0.1") && err.contains("double NAT"),
        "{err}"
    );
    assert!(err.contains("not starting"), "{err}");
    err
}
